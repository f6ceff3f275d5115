//! The engine: owns the libvirt connection and runs all blocking work off the UI thread.
//!
//! Front ends (the window, the tray) talk to it only through [`Command`]s and receive
//! [`Event`]s over a bounded channel; after each event the engine calls the front end's
//! waker (the GUI passes `egui::Context::request_repaint`), so the UI never polls and never
//! blocks. The engine reconnects by itself when the daemon goes away and comes back.
//!
//! Beyond the VM list it keeps the window's picture of protection current: the
//! configuration (watched: hand edits show up), every destination's store and checkpoints
//! ([`catalog`], looked at again after each job, configuration change and plugged-in
//! drive), the job history, and the scheduler — run by the engine itself when the window
//! is the one scheduler of the user, or `rewind daemon`'s, whose `status.json` is watched.
//! The window's long jobs ([`jobs`]: checkpoint now, restore, undo, verify, delete, export)
//! run on blocking threads; while any runs, their progress is sent four times a second.

pub mod jobs;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cleanup::OrWarn as _;
use crate::config::{Config, ConfigWatcher};
use crate::error::Error;
use crate::history::Record;
use crate::libvirt::{Hypervisor, Subscription, VmEvent};
use crate::progress::{Control, Phase};
use crate::scheduler::status::Status;
use crate::scheduler::{Event as SchedEvent, Paths, SchedulerHandle};
use crate::view::catalog::{self, DestinationView};
use crate::vm::VmInfo;
use jobs::{ErrorKind, JobError, JobId, JobOutput, JobRequest};

/// Requests from a front end.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Command {
    /// List the VMs again now.
    RefreshVms,
    /// Look at every destination and its checkpoints again now.
    RefreshCheckpoints,
    /// Start a long job.
    Start(JobRequest),
    /// Cancel a running job (it stops at its next check and cleans up).
    Cancel(JobId),
    /// A job waiting for a guest to shut down (before a restore) turns the VM off now.
    ForceOff(JobId),
    /// Find out whether a full-state checkpoint can resume its VM (before a restore is
    /// asked for), answered by [`Event::ResumeChecked`].
    CheckResume(ResumeKey),
    /// Look for removable drives (to suggest one for checkpoints), answered by
    /// [`Event::DrivesFound`].
    ScanDrives,
    /// Start Rewind at login, or not (the XDG autostart entry), answered by
    /// [`Event::Autostart`].
    SetAutostart(bool),
    /// Save this configuration (the scheduler picks it up).
    SaveConfig(Box<Config>),
    /// Add the store in this folder as a destination (created if the folder is missing or
    /// empty), answered by [`Event::DestinationAdded`].
    AddFolderDestination {
        /// The folder.
        folder: std::path::PathBuf,
        /// Its passphrase (encrypts a new store; opens an encrypted one), kept in a file only
        /// the user can read so checkpoints run by themselves.
        passphrase: Option<zeroize::Zeroizing<String>>,
        /// The VMs' disk images: the answer warns if the folder is on the same disk.
        vm_disks: Vec<std::path::PathBuf>,
    },
    /// Add the store in a folder on another host (`ssh://[user@]host[:port]/path`) as a
    /// destination (created if the folder is missing or empty), answered by
    /// [`Event::DestinationAdded`].
    AddRemoteDestination {
        /// The `ssh://` URL.
        url: String,
        /// Its passphrase, as for [`Command::AddFolderDestination`].
        passphrase: Option<zeroize::Zeroizing<String>>,
    },
    /// Try to reach a destination that is not added yet (`ssh://…` or a folder) and say
    /// what is there, answered by [`Event::DestinationTested`].
    TestDestination {
        /// The folder or `ssh://` URL.
        location: String,
    },
    /// Have the scheduler take a checkpoint of this VM (or of all) now; without a
    /// scheduler of this window's, the engine takes it itself.
    CheckpointNow {
        /// The VM; `None` for every protected VM.
        vm: Option<String>,
    },
    /// Stop the engine (and its scheduler: running jobs are cancelled and waited for).
    Shutdown,
}

/// A checkpoint, for [`Command::CheckResume`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResumeKey {
    /// The destination it is in.
    pub destination: String,
    /// Its VM.
    pub vm_uuid: uuid::Uuid,
    /// Its id.
    pub checkpoint: String,
}

/// Who runs the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulerView {
    /// This engine runs it.
    Here,
    /// Another process does (`rewind daemon`): what it said it does, if it runs.
    Elsewhere {
        /// Who holds the scheduler's lock.
        holder: String,
        /// Its live status.
        status: Option<Box<Status>>,
    },
    /// None runs, and this engine was not asked to run one.
    None,
}

/// What the engine reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Connected (or reconnected) to libvirt.
    Connected {
        /// The URI in use.
        uri: String,
    },
    /// The connection failed or was lost; the engine retries by itself after `retry_in`.
    ConnectionFailed {
        /// What went wrong and what to do.
        error: Arc<Error>,
        /// When the engine tries again.
        retry_in: Duration,
    },
    /// The current list of VMs.
    Vms(Vec<VmInfo>),
    /// A VM changed state (the list follows shortly).
    VmChanged(VmEvent),
    /// An operation failed.
    Failed {
        /// What went wrong and what to do.
        error: Arc<Error>,
    },
    /// The configuration in use, and why the file does not load if it does not.
    Config {
        /// The configuration.
        config: Arc<Config>,
        /// What is wrong with the file (the last good configuration is in use).
        error: Option<String>,
    },
    /// Every destination as found now, with its checkpoints.
    Destinations(Arc<Vec<DestinationView>>),
    /// The job history.
    History(Arc<Vec<Record>>),
    /// Who runs the scheduler, and what it does.
    Scheduler(SchedulerView),
    /// Something the scheduler of this engine reported.
    Scheduled(Arc<SchedEvent>),
    /// The live status of this engine's own scheduler.
    SchedulerStatus(Box<Status>),
    /// A job began.
    JobStarted {
        /// Its number.
        job: JobId,
        /// What it does, in a few words.
        label: String,
        /// What was asked.
        request: Arc<JobRequest>,
    },
    /// The answer to [`Command::AddFolderDestination`] (the configuration follows).
    DestinationAdded {
        /// The destination, or why it could not be added.
        result: Result<crate::destination::Added, JobError>,
        /// Set when the folder is on the same disk as a VM's disk images.
        warning: Option<String>,
    },
    /// The answer to [`Command::TestDestination`].
    DestinationTested {
        /// The location as asked.
        location: String,
        /// What is there ("a store with 12 checkpoints", "an empty folder: a new store
        /// will be made"), or why it could not be reached.
        result: Result<String, JobError>,
    },
    /// How far a job is.
    JobProgress {
        /// Its number.
        job: JobId,
        /// What it does now.
        phase: Phase,
        /// Bytes done.
        done_bytes: u64,
        /// Bytes in all (for this phase).
        total_bytes: u64,
        /// While it waits for a guest to shut down: how long until it turns the VM off.
        force_off_in: Option<Duration>,
    },
    /// A job ended.
    JobFinished {
        /// Its number.
        job: JobId,
        /// What it did, or what went wrong and what to do.
        result: Result<JobOutput, JobError>,
    },
    /// The mount points of removable drives (the answer to [`Command::ScanDrives`]).
    DrivesFound(Vec<std::path::PathBuf>),
    /// Whether Rewind starts at login: at start, and after [`Command::SetAutostart`] (with
    /// what went wrong, if that failed).
    Autostart {
        /// Whether it does now.
        enabled: bool,
        /// The answer to a [`Command::SetAutostart`]: `Err` says why the change was not made.
        changed: Option<Result<(), JobError>>,
    },
    /// The answer to [`Command::CheckResume`].
    ResumeChecked {
        /// The checkpoint asked about.
        key: ResumeKey,
        /// `Err`: why it cannot resume its VM (a disk-only restore still can be done), or
        /// why that could not be found out.
        result: Result<(), JobError>,
    },
}

/// Called after each event so a sleeping front end wakes up and drains the channel.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Capacity of the event channel: enough for bursts, small enough to bound memory.
const EVENT_CAPACITY: usize = 256;
/// Capacity of the command channel.
const COMMAND_CAPACITY: usize = 64;
/// Lifecycle events arriving within this window cause one refresh, not many.
const REFRESH_DEBOUNCE: Duration = Duration::from_millis(150);
/// How often the progress of running jobs is sent.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Reconnect back-off bounds.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The front end's side of a running engine.
#[derive(Debug)]
pub struct EngineHandle {
    commands: Option<mpsc::Sender<Command>>,
    events: mpsc::Receiver<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineHandle {
    /// Queues a command without blocking. Returns `false` if the engine is gone or its queue
    /// is full (the front end may show that the engine is busy).
    #[must_use]
    pub fn send(&self, command: Command) -> bool {
        self.commands
            .as_ref()
            .is_some_and(|c| c.try_send(command).is_ok())
    }

    /// Takes the next pending event, if any, without blocking.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Waits for the next event, up to `timeout` (for tests and the CLI, never the UI thread).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.try_recv() {
                return Some(event);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Dropping the sender ends the engine's loop; closing the event channel releases an
        // engine waiting to send, so the join below cannot hang.
        self.commands = None;
        self.events.close();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the engine's thread panicked");
        }
    }
}

/// How to start an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The libvirt URI.
    pub uri: String,
    /// Run the scheduler here unless another process runs one (the window does; tests
    /// of the VM list do not).
    pub host_scheduler: bool,
    /// Where the configuration, history and status are.
    pub paths: Paths,
}

/// Starts the engine on its own thread, connected to `uri`, without a scheduler of its own.
///
/// # Errors
/// Fails only if the thread or its runtime cannot be created.
pub fn spawn(uri: String, waker: Waker) -> std::io::Result<EngineHandle> {
    spawn_with(
        EngineOptions {
            uri,
            host_scheduler: false,
            paths: Paths::default(),
        },
        waker,
    )
}

/// Starts the engine on its own thread.
///
/// # Errors
/// Fails only if the thread or its runtime cannot be created.
pub fn spawn_with(options: EngineOptions, waker: Waker) -> std::io::Result<EngineHandle> {
    let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rewind-engine-worker")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("rewind-engine".into())
        .spawn(move || {
            let engine = Engine {
                uri: options.uri.clone(),
                events: event_tx,
                waker,
            };
            runtime.block_on(engine.run(command_rx, options));
        })?;
    Ok(EngineHandle {
        commands: Some(command_tx),
        events: event_rx,
        thread: Some(thread),
    })
}

struct Engine {
    uri: String,
    events: mpsc::Sender<Event>,
    waker: Waker,
}

/// What woke the main loop.
enum Wake {
    Command(Option<Command>),
    Lifecycle(VmEvent),
    Inner(Inner),
    Tick,
    Retry,
}

/// Messages from the engine's own helpers (watchers, jobs, the scheduler).
enum Inner {
    Config(Result<Config, crate::config::ConfigError>),
    Status,
    Mounts,
    Scheduled(SchedEvent),
    JobDone(JobId, Result<JobOutput, JobError>),
    /// An event made off the loop, to send on.
    Emit(Event),
    Scanned(Vec<DestinationView>),
}

/// What the engine keeps about protection.
struct Protection {
    paths: Paths,
    config: Config,
    scheduler: Option<SchedulerHandle>,
    holder: Option<String>,
    jobs: HashMap<JobId, Arc<Control>>,
    next_job: JobId,
    scanning: bool,
    rescan: bool,
    _watchers: Vec<Box<dyn std::any::Any + Send>>,
}

impl Protection {
    /// Looks at every destination again, off the loop (once at a time).
    fn scan(&mut self, inner: &mpsc::Sender<Inner>) {
        if self.scanning {
            self.rescan = true;
            return;
        }
        self.scanning = true;
        let config = self.config.clone();
        let state_dir = self.paths.state_dir();
        let tx = inner.clone();
        tokio::task::spawn_blocking(move || {
            // A closed channel: the engine is stopping, nobody waits for the scan.
            drop(tx.blocking_send(Inner::Scanned(catalog::scan(&config, &state_dir))));
        });
    }

    fn start_job(&mut self, request: JobRequest, inner: &mpsc::Sender<Inner>) -> Event {
        let job = self.next_job;
        self.next_job += 1;
        let control = Arc::new(Control::new());
        self.jobs.insert(job, control.clone());
        let label = request.label();
        let request = Arc::new(request);
        let config = self.config.clone();
        let state_dir = self.paths.state_dir();
        let tx = inner.clone();
        let run = request.clone();
        tokio::task::spawn_blocking(move || {
            let result = jobs::run(&config, &state_dir, &run, &control);
            // A closed channel: the engine is stopping; the job was cancelled with it.
            drop(tx.blocking_send(Inner::JobDone(job, result)));
        });
        Event::JobStarted {
            job,
            label,
            request,
        }
    }
}

/// Watches the configuration file, the scheduler's status file and the mounts; the
/// watchers stop when the returned handles drop (the mount thread when `inner` closes).
fn watch(paths: &Paths, inner: &mpsc::Sender<Inner>) -> Vec<Box<dyn std::any::Any + Send>> {
    let mut watchers: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let tx = inner.clone();
    if let Ok(w) = ConfigWatcher::start(&paths.config, move |r| {
        // Waits for room rather than lose an edit; a closed channel: the engine is stopping.
        drop(tx.blocking_send(Inner::Config(r)));
    }) {
        watchers.push(Box::new(w));
    }
    // The scheduler's status file (ours or the daemon's) and plugged-in drives.
    if let Some(dir) = paths.status.parent() {
        std::fs::create_dir_all(dir).or_warn(format_args!("create {}", dir.display()));
        let tx = inner.clone();
        let name = paths.status.file_name().map(std::ffi::OsStr::to_os_string);
        let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            // Only changes: reading the file (ours included) raises access events, and
            // answering those would read it again, for ever.
            if e.is_ok_and(|e| {
                !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| p.file_name() == name.as_deref())
            }) {
                // A full channel already holds a wake-up; a closed one: the engine stops.
                drop(tx.try_send(Inner::Status));
            }
        });
        if let Ok(mut w) = watcher {
            use notify::Watcher as _;
            if w.watch(dir, notify::RecursiveMode::NonRecursive).is_ok() {
                watchers.push(Box::new(w));
            }
        }
    }
    let tx = inner.clone();
    // A full channel already holds a wake-up; a closed one means the engine is stopping.
    match crate::mounts::watch("rewind-engine-mounts", move || {
        drop(tx.try_send(Inner::Mounts));
    }) {
        Ok(w) => watchers.push(Box::new(w)),
        Err(e) => tracing::warn!("drives plugged in will be noticed only at the next look: {e}"),
    }
    watchers
}

impl Engine {
    async fn emit(&self, event: Event) {
        // A full channel means the UI is not draining; waiting here is the intended
        // back-pressure, and a closed channel means the front end is gone.
        if self.events.send(event).await.is_ok() {
            (self.waker)();
        }
    }

    /// Loads the configuration, starts the watchers and the scheduler.
    async fn start_protection(
        &self,
        options: &EngineOptions,
        inner: &mpsc::Sender<Inner>,
    ) -> Protection {
        let (config, error) = Config::load_or_last_good(&options.paths.config);
        self.emit(Event::Config {
            config: Arc::new(config.clone()),
            error: error.map(|e| e.to_string()),
        })
        .await;
        let watchers = watch(&options.paths, inner);
        let tx = inner.clone();
        tokio::task::spawn_blocking(move || {
            let enabled = crate::autostart::is_enabled();
            // A closed channel: the engine is stopping, nobody waits for the answer.
            drop(tx.blocking_send(Inner::Emit(Event::Autostart {
                enabled,
                changed: None,
            })));
        });
        let mut protection = Protection {
            paths: options.paths.clone(),
            config,
            scheduler: None,
            holder: None,
            jobs: HashMap::new(),
            next_job: 1,
            scanning: false,
            rescan: false,
            _watchers: watchers,
        };
        if options.host_scheduler {
            match crate::scheduler::instance::SchedulerLock::acquire("the Rewind window") {
                Ok(lock) => {
                    let tx = inner.clone();
                    let sink: crate::scheduler::EventSink = Arc::new(move |ev| {
                        // Called inside the scheduler's runtime, so it must not block. A
                        // full channel loses this report (the history file keeps the job's
                        // record); a closed one: the engine is stopping.
                        if tx.try_send(Inner::Scheduled(ev)).is_err() {
                            tracing::debug!("a scheduler event was not passed to the window");
                        }
                    });
                    match crate::scheduler::start(
                        options.paths.clone(),
                        lock,
                        "the Rewind window",
                        sink,
                        crate::scheduler::Watch::Host,
                    ) {
                        Ok(handle) => protection.scheduler = Some(handle),
                        Err(e) => {
                            self.emit(Event::Failed {
                                error: Arc::new(Error::Invalid(format!(
                                    "the scheduler could not start: {e}"
                                ))),
                            })
                            .await;
                        }
                    }
                }
                Err(crate::scheduler::instance::InstanceError::AlreadyRunning { holder }) => {
                    protection.holder = Some(holder);
                }
                Err(e) => {
                    self.emit(Event::Failed {
                        error: Arc::new(Error::Invalid(e.to_string())),
                    })
                    .await;
                }
            }
        }
        self.emit_scheduler(&protection).await;
        self.emit(Event::History(Arc::new(crate::history::read(
            &protection.paths.history,
        ))))
        .await;
        protection.scan(inner);
        protection
    }

    async fn emit_scheduler(&self, p: &Protection) {
        let status = Status::read_live(&p.paths.status);
        let view = if p.scheduler.is_some() {
            SchedulerView::Here
        } else if let Some(s) = status {
            SchedulerView::Elsewhere {
                holder: p
                    .holder
                    .clone()
                    .unwrap_or_else(|| format!("process {} ({})", s.pid, s.program)),
                status: Some(Box::new(s)),
            }
        } else if let Some(holder) = &p.holder {
            SchedulerView::Elsewhere {
                holder: holder.clone(),
                status: None,
            }
        } else {
            SchedulerView::None
        };
        self.emit(Event::Scheduler(view)).await;
    }

    async fn handle_inner(&self, p: &mut Protection, msg: Inner, inner: &mpsc::Sender<Inner>) {
        match msg {
            Inner::Config(r) => {
                // The one watcher of the file: the hosted scheduler hears of it from here.
                if let Some(s) = &p.scheduler {
                    s.config_changed(r.clone());
                }
                match r {
                    Ok(config) => {
                        p.config = config.clone();
                        self.emit(Event::Config {
                            config: Arc::new(config),
                            error: None,
                        })
                        .await;
                        p.scan(inner);
                    }
                    Err(e) => {
                        self.emit(Event::Config {
                            config: Arc::new(p.config.clone()),
                            error: Some(e.to_string()),
                        })
                        .await;
                    }
                }
            }
            Inner::Status => {
                if p.scheduler.is_some() {
                    if let Some(s) = Status::read_live(&p.paths.status) {
                        self.emit(Event::SchedulerStatus(Box::new(s))).await;
                    }
                } else {
                    self.emit_scheduler(p).await;
                }
            }
            Inner::Mounts => {
                if let Some(s) = &p.scheduler {
                    s.mounts_changed();
                }
                p.scan(inner);
            }
            Inner::Scheduled(ev) => {
                let finished = matches!(ev, SchedEvent::Finished(_));
                self.emit(Event::Scheduled(Arc::new(ev))).await;
                if finished {
                    self.emit(Event::History(Arc::new(crate::history::read(
                        &p.paths.history,
                    ))))
                    .await;
                    p.scan(inner);
                }
            }
            Inner::JobDone(job, result) => {
                p.jobs.remove(&job);
                self.emit(Event::JobFinished { job, result }).await;
                p.scan(inner);
            }
            Inner::Emit(event) => self.emit(event).await,
            Inner::Scanned(views) => {
                p.scanning = false;
                self.emit(Event::Destinations(Arc::new(views))).await;
                if std::mem::take(&mut p.rescan) {
                    p.scan(inner);
                }
            }
        }
    }

    async fn handle_command(
        &self,
        p: &mut Protection,
        command: Command,
        inner: &mpsc::Sender<Inner>,
    ) {
        match command {
            Command::RefreshCheckpoints => p.scan(inner),
            Command::Start(request) => {
                let started = p.start_job(request, inner);
                self.emit(started).await;
            }
            Command::AddFolderDestination {
                folder,
                passphrase,
                vm_disks,
            } => {
                self.add_destination(p, AddTarget::Folder { folder, vm_disks }, passphrase, inner)
                    .await;
            }
            Command::AddRemoteDestination { url, passphrase } => {
                self.add_destination(p, AddTarget::Remote(url), passphrase, inner)
                    .await;
            }
            Command::TestDestination { location } => {
                let tested = location.clone();
                let result = tokio::task::spawn_blocking(move || test_destination(&tested))
                    .await
                    .unwrap_or_else(|join| Err(JobError::internal(&join)));
                self.emit(Event::DestinationTested { location, result })
                    .await;
            }
            Command::Cancel(job) => {
                if let Some(c) = p.jobs.get(&job) {
                    c.cancel();
                }
            }
            Command::ForceOff(job) => {
                if let Some(c) = p.jobs.get(&job) {
                    c.force_off_now();
                }
            }
            Command::ScanDrives | Command::SetAutostart(_) | Command::CheckResume(_) => {
                answer_off_the_loop(command, p.config.clone(), inner.clone());
            }
            Command::SaveConfig(config) => {
                let path = p.paths.config.clone();
                let saved =
                    tokio::task::spawn_blocking(move || config.save(&path).map(|()| config))
                        .await
                        .unwrap_or_else(|join| {
                            Err(crate::config::ConfigError::Io {
                                action: "write",
                                path: p.paths.config.clone(),
                                detail: join.to_string(),
                            })
                        });
                match saved {
                    Ok(config) => {
                        p.config = (*config).clone();
                        self.emit(Event::Config {
                            config: Arc::new(*config),
                            error: None,
                        })
                        .await;
                        p.scan(inner);
                    }
                    Err(e) => {
                        self.emit(Event::Failed {
                            error: Arc::new(Error::Invalid(e.to_string())),
                        })
                        .await;
                    }
                }
            }
            Command::CheckpointNow { vm } => {
                if let Some(s) = &p.scheduler {
                    if !s.send(crate::scheduler::Command::RunNow { vm }) {
                        tracing::warn!(
                            "the scheduler did not take \"checkpoint now\": it is stopping or busy"
                        );
                    }
                } else {
                    let vms: Vec<String> = match vm {
                        Some(vm) => vec![vm],
                        None => p.config.vms.iter().map(|v| v.vm.clone()).collect(),
                    };
                    for vm in vms {
                        let started = p.start_job(JobRequest::Checkpoint { vm }, inner);
                        self.emit(started).await;
                    }
                }
            }
            Command::RefreshVms | Command::Shutdown => {}
        }
    }

    /// Adds a folder destination to the configuration and saves it (off the loop: creating
    /// an encrypted store derives a key, which takes a moment).
    async fn add_destination(
        &self,
        p: &mut Protection,
        target: AddTarget,
        passphrase: Option<zeroize::Zeroizing<String>>,
        inner: &mpsc::Sender<Inner>,
    ) {
        let mut config = p.config.clone();
        let path = p.paths.config.clone();
        let keys_dir = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("keys");
        let done = tokio::task::spawn_blocking(move || {
            let pass = match &passphrase {
                Some(text) => crate::destination::Passphrase::Typed {
                    passphrase: text.as_bytes(),
                    keys_dir: &keys_dir,
                },
                None => crate::destination::Passphrase::None,
            };
            let (added, warning) = match &target {
                AddTarget::Folder { folder, vm_disks } => {
                    let added = crate::destination::add_folder(&mut config, folder, pass)?;
                    let warning = vm_disks
                        .iter()
                        .any(|d| crate::destination::same_device(d, folder))
                        .then(|| {
                            format!(
                                "{} is on the same disk as virtual machine disks: if that disk fails, the checkpoints are lost with it. A removable drive or another host is safer.",
                                folder.display()
                            )
                        });
                    (added, warning)
                }
                AddTarget::Remote(url) => {
                    let location = crate::store::Location::parse(url)?;
                    if !location.is_remote() {
                        return Err(JobError::new(
                            ErrorKind::Invalid,
                            format!(
                                "{url} is not an ssh:// address; write ssh://[user@]host[:port]/folder"
                            ),
                        ));
                    }
                    let added = crate::destination::add_at(&mut config, &location, pass)?;
                    (added, None)
                }
            };
            config.save(&path)?;
            Ok::<_, JobError>((added, config, warning))
        })
        .await
        .unwrap_or_else(|join| Err(JobError::internal(&join)));
        match done {
            Ok((added, config, warning)) => {
                p.config = config.clone();
                self.emit(Event::DestinationAdded {
                    result: Ok(added),
                    warning,
                })
                .await;
                self.emit(Event::Config {
                    config: Arc::new(config),
                    error: None,
                })
                .await;
                p.scan(inner);
            }
            Err(e) => {
                self.emit(Event::DestinationAdded {
                    result: Err(e),
                    warning: None,
                })
                .await;
            }
        }
    }

    async fn progress(&self, p: &Protection) {
        for (job, control) in &p.jobs {
            let (done_bytes, total_bytes) = control.progress_bytes();
            self.emit(Event::JobProgress {
                job: *job,
                phase: control.phase(),
                done_bytes,
                total_bytes,
                force_off_in: control.force_off_in(),
            })
            .await;
        }
    }

    async fn run(self, mut commands: mpsc::Receiver<Command>, options: EngineOptions) {
        let (lifecycle_tx, mut lifecycle_rx) = mpsc::channel::<VmEvent>(EVENT_CAPACITY);
        let (inner_tx, mut inner_rx) = mpsc::channel::<Inner>(EVENT_CAPACITY);
        let mut protection = self.start_protection(&options, &inner_tx).await;
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut session: Option<(Arc<Hypervisor>, Subscription)> = None;
        let mut retry = RETRY_FIRST;
        loop {
            if session.as_ref().is_none_or(|(hv, _)| !hv.is_alive()) {
                session = None;
                match self.connect(lifecycle_tx.clone(), overflowed.clone()).await {
                    Ok(s) => {
                        retry = RETRY_FIRST;
                        self.emit(Event::Connected {
                            uri: self.uri.clone(),
                        })
                        .await;
                        self.refresh(&s.0).await;
                        session = Some(s);
                    }
                    Err(error) => {
                        self.emit(Event::ConnectionFailed {
                            error: Arc::new(error),
                            retry_in: retry,
                        })
                        .await;
                    }
                }
            }
            let wait = if session.is_some() { RETRY_MAX } else { retry };
            // Progress only while a job runs: an idle engine sleeps.
            let tick = if protection.jobs.is_empty() {
                wait
            } else {
                PROGRESS_EVERY
            };
            let wake = tokio::select! {
                cmd = commands.recv() => Wake::Command(cmd),
                Some(ev) = lifecycle_rx.recv() => Wake::Lifecycle(ev),
                Some(msg) = inner_rx.recv() => Wake::Inner(msg),
                () = tokio::time::sleep(tick) => if tick < wait { Wake::Tick } else { Wake::Retry },
            };
            match wake {
                Wake::Command(None | Some(Command::Shutdown)) => {
                    for control in protection.jobs.values() {
                        control.cancel();
                    }
                    if let Some(s) = protection.scheduler.take()
                        && let Err(e) = tokio::task::spawn_blocking(move || s.stop()).await
                    {
                        tracing::warn!("the scheduler did not stop cleanly: {e}");
                    }
                    return;
                }
                Wake::Command(Some(Command::RefreshVms)) => {
                    if let Some((hv, _)) = &session {
                        self.refresh(hv).await;
                    }
                }
                Wake::Command(Some(command)) => {
                    self.handle_command(&mut protection, command, &inner_tx)
                        .await;
                }
                Wake::Inner(msg) => self.handle_inner(&mut protection, msg, &inner_tx).await,
                Wake::Tick => self.progress(&protection).await,
                Wake::Lifecycle(ev) => {
                    self.emit(Event::VmChanged(ev)).await;
                    // Let a burst (define + start + resume) settle, then list once.
                    tokio::time::sleep(REFRESH_DEBOUNCE).await;
                    while let Ok(ev) = lifecycle_rx.try_recv() {
                        self.emit(Event::VmChanged(ev)).await;
                    }
                    overflowed.store(false, Ordering::Relaxed);
                    if let Some((hv, _)) = &session {
                        self.refresh(hv).await;
                    }
                }
                Wake::Retry => {
                    if session.is_none() {
                        retry = (retry * 2).min(RETRY_MAX);
                    } else if overflowed.swap(false, Ordering::Relaxed)
                        && let Some((hv, _)) = &session
                    {
                        self.refresh(hv).await;
                    }
                }
            }
        }
    }

    async fn connect(
        &self,
        lifecycle: mpsc::Sender<VmEvent>,
        overflowed: Arc<AtomicBool>,
    ) -> Result<(Arc<Hypervisor>, Subscription), Error> {
        let uri = self.uri.clone();
        tokio::task::spawn_blocking(move || {
            let hv = Hypervisor::connect(&uri)?;
            let subscription = hv.subscribe(move |ev| {
                // Runs on libvirt's event thread: never block it.
                if lifecycle.try_send(ev).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                }
            })?;
            Ok((Arc::new(hv), subscription))
        })
        .await
        .unwrap_or_else(|join| Err(panicked("connect to libvirt", &join)))
    }

    async fn refresh(&self, hv: &Arc<Hypervisor>) {
        let hv = hv.clone();
        let listed = tokio::task::spawn_blocking(move || hv.list_vms())
            .await
            .unwrap_or_else(|join| Err(panicked("list the VMs", &join)));
        match listed {
            Ok(vms) => self.emit(Event::Vms(vms)).await,
            Err(error) => {
                self.emit(Event::Failed {
                    error: Arc::new(error),
                })
                .await;
            }
        }
    }
}

fn panicked(action: &str, join: &tokio::task::JoinError) -> Error {
    Error::Libvirt {
        action: action.to_owned(),
        detail: format!("internal error: {join}"),
        connection_lost: false,
    }
}

/// Where [`Command::AddFolderDestination`] and [`Command::AddRemoteDestination`] add.
enum AddTarget {
    Folder {
        folder: std::path::PathBuf,
        vm_disks: Vec<std::path::PathBuf>,
    },
    Remote(String),
}

/// Answers a command that reads or writes files on a blocking thread, so the loop goes on
/// meanwhile: the answer comes back as an event.
fn answer_off_the_loop(command: Command, config: Config, tx: mpsc::Sender<Inner>) {
    tokio::task::spawn_blocking(move || {
        let event = match command {
            Command::ScanDrives => {
                Event::DrivesFound(crate::destination::removable_drives(&config))
            }
            Command::SetAutostart(enabled) => {
                let changed = std::env::current_exe()
                    .map_err(|e| {
                        JobError::new(
                            ErrorKind::Failed,
                            format!("could not find Rewind's own program: {e}"),
                        )
                    })
                    .and_then(|exe| Ok(crate::autostart::set_enabled(enabled, &exe)?));
                Event::Autostart {
                    enabled: crate::autostart::is_enabled(),
                    changed: Some(changed),
                }
            }
            Command::CheckResume(key) => {
                let result =
                    jobs::check_resume(&config, &key.destination, &key.vm_uuid, &key.checkpoint);
                Event::ResumeChecked { key, result }
            }
            _ => return,
        };
        // A closed channel: the engine is stopping, nobody waits for the answer.
        drop(tx.blocking_send(Inner::Emit(event)));
    });
}

/// What is at `location` (for [`Command::TestDestination`]): a store (how many
/// checkpoints, encrypted or not), a place where one can be made, or why it cannot be
/// reached.
fn test_destination(location: &str) -> Result<String, JobError> {
    use crate::store::{Location, Store, StoreError};
    let place = Location::parse(location.trim())?;
    let host = match &place {
        Location::Ssh(ssh) => format!("Reached {}. ", ssh.host),
        Location::Local(_) => String::new(),
    };
    match Store::probe_at(&place) {
        Ok(c) if c.encryption.is_some() => Ok(format!(
            "{host}There is an encrypted Rewind store (ID {}): adding it needs its passphrase.",
            c.id
        )),
        Ok(c) => {
            let count = Store::open_at(&place, None)
                .and_then(|s| s.catalog())
                .map(|cat| cat.checkpoints.len());
            Ok(match count {
                Ok(n) => format!(
                    "{host}There is a Rewind store (ID {}) with {n} checkpoint(s).",
                    c.id
                ),
                Err(e) => format!("{host}There is a Rewind store (ID {}), but: {e}", c.id),
            })
        }
        Err(StoreError::Missing { .. }) => Ok(format!(
            "{host}The folder does not exist yet: adding it creates a new store there."
        )),
        Err(StoreError::NotAStore { .. }) => Ok(format!(
            "{host}The folder holds no Rewind store: adding it creates one if the folder is empty."
        )),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// An engine on `uri` whose configuration and state are in `dir`.
    fn engine(uri: &str, dir: &std::path::Path, waker: Waker) -> EngineHandle {
        spawn_with(
            EngineOptions {
                uri: uri.into(),
                host_scheduler: false,
                paths: Paths {
                    config: dir.join("config.ron"),
                    history: dir.join("history.jsonl"),
                    status: dir.join("status.json"),
                },
            },
            waker,
        )
        .unwrap()
    }

    /// The next event about libvirt (the others are about protection).
    fn next_libvirt(engine: &mut EngineHandle) -> Option<Event> {
        while let Some(ev) = engine.recv_timeout(Duration::from_secs(10)) {
            if matches!(
                ev,
                Event::Connected { .. } | Event::ConnectionFailed { .. } | Event::Vms(_)
            ) {
                return Some(ev);
            }
        }
        None
    }

    /// An idle engine (scheduler included) sends next to nothing, so an idle window does
    /// not redraw: once it read its own status file, the read itself used to be taken for
    /// a change, and the engine answered with status events tens of thousands of times a
    /// second.
    #[test]
    fn an_idle_engine_with_its_scheduler_stays_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = spawn_with(
            EngineOptions {
                uri: "test:///default".into(),
                host_scheduler: true,
                paths: Paths {
                    config: dir.path().join("config.ron"),
                    history: dir.path().join("history.jsonl"),
                    status: dir.path().join("status.json"),
                },
            },
            Arc::new(|| {}),
        )
        .unwrap();
        // The start: connection, lists, configuration, the scheduler's first status.
        let settle = std::time::Instant::now();
        while settle.elapsed() < Duration::from_secs(2) {
            let _ = engine.recv_timeout(Duration::from_millis(100));
        }
        let mut seen = Vec::new();
        let quiet = std::time::Instant::now();
        while quiet.elapsed() < Duration::from_secs(4) {
            if let Some(ev) = engine.recv_timeout(Duration::from_millis(100)) {
                seen.push(format!("{ev:?}").chars().take(60).collect::<String>());
            }
        }
        assert!(
            seen.len() <= 4,
            "{} events in 4 idle seconds: {:?}",
            seen.len(),
            &seen[..seen.len().min(5)]
        );
    }

    /// The engine's one watcher of the configuration passes a hand edit on to the
    /// scheduler it hosts (which watches nothing itself): the scheduler's status file soon
    /// says what the edited file says.
    #[test]
    fn a_hand_edit_of_the_configuration_reaches_the_hosted_scheduler() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            config: dir.path().join("config.ron"),
            history: dir.path().join("history.jsonl"),
            status: dir.path().join("status.json"),
        };
        let mut engine = spawn_with(
            EngineOptions {
                uri: "test:///default".into(),
                host_scheduler: true,
                paths: paths.clone(),
            },
            Arc::new(|| {}),
        )
        .unwrap();
        let status_paused = || Status::read_live(&paths.status).map(|s| s.paused);
        let started = std::time::Instant::now();
        while status_paused() != Some(false) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no status from the scheduler"
            );
            let _ = engine.recv_timeout(Duration::from_millis(100));
        }
        // An edit by hand (not through the engine): only a watcher can notice it.
        let config = Config {
            paused: true,
            ..Config::default()
        };
        config.save(&paths.config).unwrap();
        let edited = std::time::Instant::now();
        while status_paused() != Some(true) {
            assert!(
                edited.elapsed() < Duration::from_secs(20),
                "the hosted scheduler never heard of the edit"
            );
            let _ = engine.recv_timeout(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_destination_test_says_what_is_there_before_it_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine("test:///default", dir.path(), Arc::new(|| {}));
        let mut ask = |location: String| -> Result<String, JobError> {
            assert!(engine.send(Command::TestDestination {
                location: location.clone()
            }));
            while let Some(ev) = engine.recv_timeout(Duration::from_secs(10)) {
                if let Event::DestinationTested {
                    location: l,
                    result,
                } = ev
                {
                    assert_eq!(l, location);
                    return result;
                }
            }
            panic!("no answer for {location}");
        };
        let missing = dir.path().join("new");
        let said = ask(missing.display().to_string()).unwrap();
        assert!(said.contains("does not exist yet"), "{said}");
        let store_dir = dir.path().join("store");
        crate::store::Store::init(&store_dir, &crate::store::InitOptions::default()).unwrap();
        let said = ask(store_dir.display().to_string()).unwrap();
        assert!(
            said.contains("Rewind store") && said.contains("0 checkpoint"),
            "{said}"
        );
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "x").unwrap();
        let said = ask(other.display().to_string()).unwrap();
        assert!(said.contains("no Rewind store"), "{said}");
        let bad = ask("nas:/srv/rewind".into()).unwrap_err();
        assert!(bad.message.contains("ssh://"), "{bad}");
        // Adding a remote destination refuses a folder path, saying what to write.
        assert!(engine.send(Command::AddRemoteDestination {
            url: store_dir.display().to_string(),
            passphrase: None,
        }));
        loop {
            match engine.recv_timeout(Duration::from_secs(10)) {
                Some(Event::DestinationAdded { result, .. }) => {
                    let e = result.unwrap_err();
                    assert!(e.message.contains("ssh://[user@]host"), "{e}");
                    break;
                }
                Some(_) => {}
                None => panic!("no answer to AddRemoteDestination"),
            }
        }
    }

    #[test]
    fn lists_vms_of_the_test_driver_and_wakes_the_ui() {
        let dir = tempfile::tempdir().unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        let mut engine = engine(
            "test:///default",
            dir.path(),
            Arc::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
        );
        assert!(matches!(
            next_libvirt(&mut engine),
            Some(Event::Connected { .. })
        ));
        let Some(Event::Vms(vms)) = next_libvirt(&mut engine) else {
            panic!("no VM list")
        };
        assert_eq!(
            vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["test"]
        );
        assert!(
            wakes.load(Ordering::Relaxed) >= 2,
            "the waker runs per event"
        );
        assert!(engine.send(Command::RefreshVms));
        assert!(matches!(next_libvirt(&mut engine), Some(Event::Vms(_))));
    }

    #[test]
    fn reports_the_configuration_and_destinations_and_saves_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine("test:///default", dir.path(), Arc::new(|| {}));
        let mut seen_config = false;
        let mut seen_destinations = false;
        while let Some(ev) = engine.recv_timeout(Duration::from_secs(10)) {
            match ev {
                Event::Config { config, error } => {
                    assert!(error.is_none());
                    assert!(config.vms.is_empty());
                    seen_config = true;
                }
                Event::Destinations(d) => {
                    assert!(d.is_empty());
                    seen_destinations = true;
                }
                Event::Scheduler(view) => assert_eq!(view, SchedulerView::None),
                _ => {}
            }
            if seen_config && seen_destinations {
                break;
            }
        }
        assert!(seen_config && seen_destinations);
        let config = Config {
            paused: true,
            ..Config::default()
        };
        assert!(engine.send(Command::SaveConfig(Box::new(config.clone()))));
        let saved = loop {
            match engine.recv_timeout(Duration::from_secs(10)) {
                Some(Event::Config { config, .. }) if config.paused => break config,
                Some(_) => {}
                None => panic!("the saved configuration was not reported"),
            }
        };
        assert_eq!(*saved, config);
        assert_eq!(
            Config::load(&dir.path().join("config.ron")).unwrap(),
            config
        );
    }

    #[test]
    fn reports_connection_failure_with_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine(
            "qemu:///system?socket=/nonexistent/sock",
            dir.path(),
            Arc::new(|| {}),
        );
        match next_libvirt(&mut engine) {
            Some(Event::ConnectionFailed { error, retry_in }) => {
                assert!(matches!(*error, Error::DaemonNotRunning { .. }));
                assert_eq!(retry_in, RETRY_FIRST);
            }
            other => panic!("expected a connection failure, got {other:?}"),
        }
        drop(engine); // Shuts down promptly even while waiting to retry.
    }
}
