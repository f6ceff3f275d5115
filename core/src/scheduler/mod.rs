//! The scheduler: takes every protected VM's checkpoints by itself, on `tokio`.
//!
//! One loop owns the state. It wakes when a checkpoint is due, when a job ends, when the
//! configuration file changes ([`crate::config::ConfigWatcher`]; a broken file is reported
//! with line and column and the last good configuration stays in use), when a file system
//! is mounted or unmounted (a backup drive plugged in: `/proc/self/mountinfo` changes), and
//! at least every few seconds while a due checkpoint waits for its drive. For each VM and
//! destination it asks [`policy`] whether a checkpoint is due (from the job history), looks
//! for the destination's store ([`crate::destination`]: by its ID, never an empty mount
//! point) and starts [`job`]s on blocking threads — never two on one VM, at most
//! `max_concurrent_jobs` at once; the jobs it starts by itself, and the rotating check, run at
//! a low CPU and I/O priority ([`crate::priority`]). Each job's outcome goes into the history
//! ([`crate::history`]); what runs now, what is missing and what comes next goes into
//! `status.json` in the state folder for `rewind status`. Stopping it cancels the running
//! jobs (they clean up after themselves) and waits for them.
//!
//! Only one scheduler may run per user: callers hold an [`instance::SchedulerLock`].
//!
//! Boot-checks ([`boot_checks`], issue 23): after the checkpoint work of a pass, when no
//! job runs and the machine is idle, [`policy::next_boot_check`] may name one VM whose
//! newest checkpoint is to be started in a throwaway clone. It runs like a checkpoint job
//! (in flight on record, at low priority, its phase in the status, cancelled on
//! shutdown), one at a time and beside the checkpoints, which never wait for it; its
//! record goes into the history and out as [`Event::Finished`].
//!
//! Activity trigger: libvirt reports the bytes a running VM has written to each disk since
//! QEMU started (`virDomainBlockStats`); the loop reads them every minute for VMs whose
//! policy has `activity_bytes`, and a checkpoint comes early once the VM wrote that much
//! since the last one began (a restart of the VM starts the count again).

pub mod boot_checks;
pub mod instance;
pub mod job;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::cleanup::OrWarn as _;
use crate::config::{Config, ConfigError, ConfigWatcher};
use crate::destination::{self, Availability};
use crate::history::{self, Outcome, Record};
use crate::policy::{self, Why};
use crate::progress::Control;
use status::{DestinationStatus, NextRun, RunningJob, Status};

/// Requests to a running scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Take a checkpoint of this VM (or of every protected VM) into each destination now.
    RunNow {
        /// The VM's name; `None` for all.
        vm: Option<String>,
    },
    /// Cancel the running jobs, wait for them, stop.
    Shutdown,
}

/// What the scheduler reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// A job began.
    Started {
        /// The VM.
        vm: String,
        /// The destination.
        destination: String,
        /// Why.
        why: Why,
    },
    /// A job ended (also in the history).
    Finished(Box<Record>),
    /// A destination's store is not there (reported when that changes).
    DestinationMissing {
        /// The destination.
        destination: String,
        /// What is missing, for the user.
        reason: String,
    },
    /// A destination's store is there (again).
    DestinationFound {
        /// The destination.
        destination: String,
        /// Where.
        location: String,
    },
    /// A VM's newest checkpoint in a destination is older than its policy allows.
    Stale {
        /// The VM.
        vm: String,
        /// The destination.
        destination: String,
        /// Its newest checkpoint there, if any.
        last_success: Option<DateTime<Utc>>,
        /// Why (drive missing, failures).
        why: String,
    },
    /// The rotating check re-hashed a share of a destination's store (see
    /// [`crate::policy::next_verify_share`]).
    Checked {
        /// The destination.
        destination: String,
        /// Which share of how many.
        share: (u32, u32),
        /// Checkpoints it found damaged.
        broken: Vec<crate::store::verify::CheckpointRef>,
        /// Why it could not check, if it could not.
        error: Option<crate::job_error::JobError>,
    },
    /// A new version of the configuration is in use.
    ConfigReloaded,
    /// The configuration file does not load; the last good one stays in use.
    ConfigError(crate::job_error::JobError),
    /// The scheduler stopped.
    Stopped,
}

/// Re-hashes share `share` of `dest`'s store and keeps the result with `last` (the store's
/// verify record so far) in `state_dir`.
fn check_share(
    dest: &crate::config::Destination,
    found: &Availability,
    share: u32,
    last: Option<crate::view::catalog::VerifyRecord>,
    state_dir: &std::path::Path,
    control: &Control,
) -> Event {
    use crate::view::catalog::{VerifyRecord, save_verify_record};
    let of = policy::VERIFY_SHARES;
    let started = Utc::now();
    let checked = destination::open(dest, found)
        .map_err(crate::job_error::JobError::from)
        .and_then(|store| {
            let report = store.verify_share(share, of, control)?;
            Ok((store.config().id, report))
        });
    match checked {
        Ok((store_id, report)) => {
            let broken = report.broken_checkpoints();
            let record = VerifyRecord::with_share(
                last,
                share,
                started,
                Utc::now(),
                broken.iter().map(|c| (c.vm_uuid, c.id.clone())).collect(),
            );
            if let Err(e) = save_verify_record(state_dir, store_id, &record) {
                tracing::warn!(
                    "the rotating check's record of {} is not kept: {e}",
                    dest.name
                );
            }
            Event::Checked {
                destination: dest.name.clone(),
                share: (share, of),
                broken,
                error: None,
            }
        }
        Err(e) => Event::Checked {
            destination: dest.name.clone(),
            share: (share, of),
            broken: Vec::new(),
            error: Some(e),
        },
    }
}

/// Where a store was found, for the status.
fn location_of(found: &Availability) -> String {
    match found {
        Availability::Folder(path) => path.display().to_string(),
        Availability::Remote(l) => l.clone(),
        Availability::Missing { .. } => String::new(),
    }
}

/// Receives the scheduler's events (on its thread: return quickly).
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

enum Msg {
    Command(Command),
    Config(Result<Config, ConfigError>),
    Mounts,
    Done {
        vm: String,
        record: Box<Record>,
        in_flight: Option<history::InFlight>,
    },
    Written(HashMap<String, u64>),
    /// The rotating check of a destination ended.
    Checked(Box<Event>),
    /// A boot-check ended.
    BootChecked {
        record: Box<Record>,
        in_flight: Option<history::InFlight>,
    },
}

/// Who watches the configuration file and the mounts for the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// The scheduler itself (`rewind daemon`, where nothing else watches).
    Own,
    /// Its host, which watches them anyway and passes each change on with
    /// [`SchedulerHandle::config_changed`] and [`SchedulerHandle::mounts_changed`]: one
    /// watcher for each, however many parts need to know.
    Host,
}

/// A running scheduler; dropping it stops it (and waits for its jobs).
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchedulerHandle")
    }
}

impl SchedulerHandle {
    /// Queues a command without blocking; `false` if the scheduler is gone or busy.
    #[must_use]
    pub fn send(&self, command: Command) -> bool {
        self.tx.try_send(Msg::Command(command)).is_ok()
    }

    /// The configuration file changed (or became unreadable): what it now says. For a
    /// scheduler started with [`Watch::Host`].
    pub fn config_changed(&self, config: Result<Config, ConfigError>) {
        // A full channel is a stopping or stuck loop; it reads the file again when it starts.
        if self.tx.try_send(Msg::Config(config)).is_err() {
            tracing::warn!("the scheduler did not take the new configuration");
        }
    }

    /// A file system was mounted or unmounted. For a scheduler started with
    /// [`Watch::Host`].
    pub fn mounts_changed(&self) {
        // A full channel already holds a wake-up; a closed one means the loop ended.
        drop(self.tx.try_send(Msg::Mounts));
    }

    /// Stops the scheduler: running jobs are cancelled and waited for.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // A closed channel: the loop has ended already; a full one still sees the
        // handle's channel close when the thread is joined below.
        drop(self.tx.try_send(Msg::Command(Command::Shutdown)));
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the scheduler's thread panicked");
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Where the scheduler keeps and finds things.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The configuration file.
    pub config: PathBuf,
    /// The job history.
    pub history: PathBuf,
    /// The live status file.
    pub status: PathBuf,
}

impl Paths {
    /// Rewind's state folder (the status file's).
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.status
            .parent()
            .map_or_else(crate::paths::state_dir, std::path::Path::to_path_buf)
    }
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            config: crate::config::config_path(),
            history: history::history_path(),
            status: status::status_path(),
        }
    }
}

/// Starts the scheduler on its own thread. `lock` proves no other one runs; `program`
/// names the caller in the status (`rewind daemon`, `the Rewind window`).
pub fn start(
    paths: Paths,
    lock: instance::SchedulerLock,
    program: &str,
    events: EventSink,
    watch: Watch,
) -> std::io::Result<SchedulerHandle> {
    let (tx, rx) = mpsc::channel(256);
    let loop_tx = tx.clone();
    let program = program.to_owned();
    let thread = std::thread::Builder::new()
        .name("rewind-scheduler".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .max_blocking_threads(16)
                .build()
                .expect("a tokio runtime starts");
            runtime.block_on(run(paths, program, events, watch, loop_tx, rx));
            drop(lock);
        })?;
    Ok(SchedulerHandle {
        tx,
        thread: Some(thread),
    })
}

/// Jobs that were under way when the last scheduler of this state folder died (killed, a
/// power cut): each becomes a failed record that says so, is reported as finished (the
/// clients' history shows it; a tray connected then tells the user), and what it left running in its VM
/// (QEMU's backup job, a frozen guest) is stopped now rather than at the next checkpoint.
async fn recover_interrupted(paths: &Paths, uri: &str, events: &EventSink) {
    let interrupted = history::recover_interrupted(&paths.history);
    let mut vms = std::collections::BTreeSet::new();
    for record in interrupted {
        tracing::warn!(
            "the checkpoint of {} into {} that began {} was interrupted (Rewind stopped while it ran)",
            record.vm,
            record.destination,
            record.started
        );
        vms.insert(record.vm.clone());
        events(Event::Finished(Box::new(record)));
    }
    if vms.is_empty() {
        return;
    }
    let uri = uri.to_owned();
    // Before any job starts (one of the same VM would find the same leftovers), but never
    // held up long by a libvirt that does not answer: its jobs clean up then.
    let stopping = tokio::task::spawn_blocking(move || {
        for vm in vms {
            match crate::checkpoint::stop_interrupted(&uri, &vm) {
                Ok(true) => tracing::info!("stopped what the interrupted checkpoint left in {vm}"),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    "could not stop what the interrupted checkpoint left in {vm} ({e}); its next checkpoint does"
                ),
            }
        }
    });
    if tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .is_err()
    {
        tracing::warn!("libvirt is slow to answer: the next checkpoints clean up instead");
    }
}

/// The loop's state.
struct State {
    paths: Paths,
    program: String,
    config: Config,
    config_error: Option<String>,
    records: Vec<Record>,
    running: HashMap<String, RunningJob>,
    controls: HashMap<String, Arc<Control>>,
    /// Destination name → what was last found.
    found: BTreeMap<String, Availability>,
    /// VM name → bytes written since its last checkpoint began (when reported).
    written: HashMap<String, u64>,
    /// VM name → the block statistics' count when its last checkpoint began.
    written_base: HashMap<String, u64>,
    /// (VM, destination) → when a stale warning was last given.
    warned_stale: HashMap<(String, String), DateTime<Utc>>,
    /// When the scheduler began (for VMs never checkpointed).
    since: DateTime<Utc>,
    /// VMs asked to run now.
    manual: Vec<String>,
    started: DateTime<Utc>,
    /// The rotating check running now: its destination and control.
    checking: Option<(String, Arc<Control>)>,
    /// The boot-check running now, and its control.
    boot_checking: Option<(RunningJob, Arc<Control>)>,
    /// Since when no job of this scheduler was seen running (or it started).
    quiet_since: std::time::Instant,
}

async fn run(
    paths: Paths,
    program: String,
    events: EventSink,
    watch: Watch,
    tx: mpsc::Sender<Msg>,
    mut rx: mpsc::Receiver<Msg>,
) {
    let (config, error) = Config::load_or_last_good(&paths.config);
    if let Some(e) = &error {
        events(Event::ConfigError(e.clone().into()));
    }
    let _watchers = (watch == Watch::Own).then(|| own_watchers(&paths, &events, &tx));
    recover_interrupted(&paths, &config.uri, &events).await;
    let mut state = State {
        records: history::read(&paths.history),
        paths,
        program,
        config,
        config_error: error.map(|e| e.to_string()),
        running: HashMap::new(),
        controls: HashMap::new(),
        found: BTreeMap::new(),
        written: HashMap::new(),
        written_base: HashMap::new(),
        warned_stale: HashMap::new(),
        since: Utc::now(),
        manual: Vec::new(),
        started: Utc::now(),
        checking: None,
        boot_checking: None,
        quiet_since: std::time::Instant::now(),
    };
    let mut last_activity_poll: Option<std::time::Instant> = None;
    let mut stopping = false;
    loop {
        if stopping {
            if state.running.is_empty() && state.checking.is_none() && state.boot_checking.is_none()
            {
                break;
            }
            let Some(msg) = rx.recv().await else { break };
            // Already stopping: whether this message asks to stop too makes no difference.
            state.handle(msg, &events);
            state.write_status();
            continue;
        }
        let mut wait = state.start_due_jobs(&events, &tx);
        if !state.running.is_empty() || state.boot_checking.is_some() {
            // Keep status.json's progress of the running jobs current.
            wait = wait.min(Duration::from_secs(1));
        }
        state.warn_stale(&events);
        if last_activity_poll.is_none_or(|t| t.elapsed() >= Duration::from_mins(1)) {
            last_activity_poll = Some(std::time::Instant::now());
            state.poll_activity(&tx);
        }
        state.write_status();
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            () = tokio::time::sleep(wait) => continue,
        };
        let Some(msg) = msg else { break };
        stopping = state.handle(msg, &events);
    }
    crate::cleanup::remove_file(&state.paths.status);
    events(Event::Stopped);
}

/// The configuration file's watcher and the mount watcher, for [`Watch::Own`]; they stop
/// when dropped.
fn own_watchers(
    paths: &Paths,
    events: &EventSink,
    tx: &mpsc::Sender<Msg>,
) -> (Option<ConfigWatcher>, Option<crate::mounts::MountWatch>) {
    let watch_tx = tx.clone();
    let config = ConfigWatcher::start(&paths.config, move |r| {
        if watch_tx.try_send(Msg::Config(r)).is_err() {
            tracing::warn!("the scheduler did not take the new configuration");
        }
    })
    .map_err(|e| events(Event::ConfigError(e.into())))
    .ok();
    // Wakes the loop when a file system is mounted or unmounted.
    let mount_tx = tx.clone();
    let mounts = crate::mounts::watch("rewind-mounts", move || {
        // A full channel already holds a wake-up; a closed one means the loop ended.
        drop(mount_tx.try_send(Msg::Mounts));
    })
    .inspect_err(|e| {
        tracing::warn!("drives plugged in will be noticed only at the next look: {e}");
    })
    .ok();
    (config, mounts)
}

impl State {
    /// Starts what is due; returns how long to sleep at most.
    fn start_due_jobs(&mut self, events: &EventSink, tx: &mpsc::Sender<Msg>) -> Duration {
        let now = Utc::now();
        let mut wait = Duration::from_mins(1);
        if let Some(ends) = self.config.paused_until.filter(|t| *t > now) {
            // A timed pause ends by itself: be awake for it.
            wait = wait.min((ends - now).to_std().unwrap_or_default());
        }
        let roots = destination::watch_roots(&self.config);
        let max_jobs = usize::try_from(self.config.max_concurrent_jobs.max(1)).unwrap_or(1);
        let manual = std::mem::take(&mut self.manual);
        for p in self.config.vms.clone() {
            let asked = manual.iter().any(|m| m == &p.vm);
            if self.config.vm_paused_at(&p, now) && !asked {
                continue;
            }
            if self.running.contains_key(&p.vm) {
                if asked {
                    self.manual.push(p.vm.clone());
                }
                continue;
            }
            for dest_name in &p.destinations {
                let Some(dest) = self.config.destination(dest_name).cloned() else {
                    continue;
                };
                let mut track = history::track(&self.records, &p.vm, p.uuid.as_deref(), dest_name);
                track.written_since_bytes = self.written.get(&p.vm).copied();
                let (at, mut why) = policy::next_run(&p, &track, now);
                if asked {
                    why = Why::Manual;
                } else if at > now {
                    let until = (at - now).to_std().unwrap_or_default();
                    wait = wait.min(until + Duration::from_millis(50));
                    continue;
                }
                let found = destination::locate(&dest, &roots);
                self.note_found(dest_name, &found, events);
                if matches!(found, Availability::Missing { .. }) {
                    // Due, but its drive is not there: look again soon (a mount also wakes).
                    wait = wait.min(Duration::from_secs(5));
                    continue;
                }
                if self.running.len() >= max_jobs {
                    wait = wait.min(Duration::from_secs(5));
                    if asked {
                        self.manual.push(p.vm.clone());
                    }
                    break;
                }
                self.spawn_job(&p, &dest, &found, why, events, tx);
                break; // one job per VM at a time
            }
        }
        self.start_due_check(now, &roots, tx);
        self.start_due_boot_check(now, &roots, events, tx);
        wait
    }

    /// Starts the boot-check that is due, if one is ([`policy::next_boot_check`]): never
    /// while a job of this scheduler runs, nor while the machine is busy or protection is
    /// paused.
    fn start_due_boot_check(
        &mut self,
        now: DateTime<Utc>,
        roots: &[PathBuf],
        events: &EventSink,
        tx: &mpsc::Sender<Msg>,
    ) {
        let settings = self.config.boot_checks;
        if !settings.enabled || self.config.paused_at(now) {
            return;
        }
        let jobs_running =
            !self.running.is_empty() || self.checking.is_some() || self.boot_checking.is_some();
        if jobs_running {
            self.quiet_since = std::time::Instant::now();
            return;
        }
        let busy = policy::Busy {
            jobs_running,
            load_percent: boot_checks::load_percent(),
            quiet_secs: self.quiet_since.elapsed().as_secs(),
        };
        if busy.load_percent >= settings.max_load_percent {
            // Busy: not worth reading the history and the kept results for.
            return;
        }
        let state_dir = self.paths.state_dir();
        let (mut vms, uuids) =
            boot_checks::candidates(&self.config, &self.records, &state_dir, now);
        // Where the chosen checkpoint's store is not here, the next newest one is asked for.
        let (due, found) = loop {
            let Some(due) = policy::next_boot_check(&settings, &vms, busy, now) else {
                return;
            };
            let Some(dest) = self.config.destination(&due.destination).cloned() else {
                return;
            };
            let found = destination::locate(&dest, roots);
            self.note_found(&dest.name, &found, events);
            if !matches!(found, Availability::Missing { .. }) {
                break (due, found);
            }
            for n in vms.iter_mut().flat_map(|v| &mut v.newest) {
                if n.destination == due.destination {
                    n.here = false;
                }
            }
        };
        let Some(&uuid) = uuids.get(&due.vm) else {
            return;
        };
        tracing::info!(
            "boot-check of {}'s checkpoint {} in {} ({:?})",
            due.vm,
            due.checkpoint,
            due.destination,
            due.why
        );
        let record = boot_checks::record(&due.vm, uuid, &due.destination, &due.checkpoint);
        let control = Arc::new(Control::new());
        self.boot_checking = Some((
            RunningJob {
                vm: due.vm.clone(),
                destination: due.destination.clone(),
                location: location_of(&found),
                since: record.started,
                why: Why::BootCheck,
                phase: String::new(),
                done_bytes: 0,
                total_bytes: 0,
            },
            control.clone(),
        ));
        events(Event::Started {
            vm: due.vm.clone(),
            destination: due.destination.clone(),
            why: Why::BootCheck,
        });
        let in_flight = history::begin(&self.paths.history, &record)
            .inspect_err(|e| {
                tracing::warn!(
                    "the boot-check of {} is not on record as it runs: {e}",
                    due.vm
                );
            })
            .ok();
        let (config, paths, tx) = (self.config.clone(), self.paths.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            let record = crate::priority::run_at(
                Some(crate::priority::Priority::BACKGROUND),
                "rewind-bootcheck",
                || boot_checks::run(&config, &paths, record, &control),
            );
            // A closed channel: the loop is gone, which it is only after waiting for this.
            drop(tx.blocking_send(Msg::BootChecked {
                record: Box::new(record),
                in_flight,
            }));
        });
    }

    /// Starts the rotating check of a destination whose store is here and has a share due,
    /// when no checkpoint runs (one check at a time, never during a pause).
    fn start_due_check(&mut self, now: DateTime<Utc>, roots: &[PathBuf], tx: &mpsc::Sender<Msg>) {
        if !self.running.is_empty()
            || self.checking.is_some()
            || self.boot_checking.is_some()
            || self.config.paused_at(now)
        {
            return;
        }
        let state_dir = self.paths.state_dir();
        for dest in &self.config.destinations {
            let Some(store_id) = dest.store_id else {
                continue;
            };
            let last = crate::view::catalog::verify_record(&state_dir, store_id);
            let shares = last.as_ref().map(|r| r.shares.clone()).unwrap_or_default();
            let Some(share) = policy::next_verify_share(&shares, now) else {
                continue;
            };
            let found = destination::locate(dest, roots);
            if matches!(found, Availability::Missing { .. }) {
                continue;
            }
            let control = Arc::new(Control::new());
            self.checking = Some((dest.name.clone(), control.clone()));
            let (dest, tx, state_dir) = (dest.clone(), tx.clone(), state_dir.clone());
            tokio::task::spawn_blocking(move || {
                let event = crate::priority::run_at(
                    Some(crate::priority::Priority::BACKGROUND),
                    "rewind-check",
                    || check_share(&dest, &found, share, last, &state_dir, &control),
                );
                drop(tx.blocking_send(Msg::Checked(Box::new(event))));
            });
            return;
        }
    }

    fn note_found(&mut self, dest: &str, found: &Availability, events: &EventSink) {
        if self.found.get(dest) == Some(found) {
            return;
        }
        match found {
            Availability::Missing { reason } => events(Event::DestinationMissing {
                destination: dest.to_owned(),
                reason: reason.clone(),
            }),
            Availability::Folder(path) => events(Event::DestinationFound {
                destination: dest.to_owned(),
                location: path.display().to_string(),
            }),
            Availability::Remote(location) => events(Event::DestinationFound {
                destination: dest.to_owned(),
                location: location.clone(),
            }),
        }
        self.found.insert(dest.to_owned(), found.clone());
    }

    fn spawn_job(
        &mut self,
        p: &crate::config::Protection,
        dest: &crate::config::Destination,
        found: &Availability,
        why: Why,
        events: &EventSink,
        tx: &mpsc::Sender<Msg>,
    ) {
        let control = Arc::new(Control::new());
        let spec = job::JobSpec {
            uri: self.config.uri.clone(),
            protection: p.clone(),
            destination: dest.clone(),
            found: found.clone(),
            why,
            force_full_state: false,
        };
        self.running.insert(
            p.vm.clone(),
            RunningJob {
                vm: p.vm.clone(),
                destination: dest.name.clone(),
                location: location_of(found),
                since: Utc::now(),
                why,
                phase: String::new(),
                done_bytes: 0,
                total_bytes: 0,
            },
        );
        self.controls.insert(p.vm.clone(), control.clone());
        // The activity count starts again with this checkpoint.
        if let Some(&base) = self.written.get(&p.vm) {
            let old = self.written_base.get(&p.vm).copied().unwrap_or(0);
            self.written_base.insert(p.vm.clone(), old + base);
        }
        self.written.remove(&p.vm);
        events(Event::Started {
            vm: p.vm.clone(),
            destination: dest.name.clone(),
            why,
        });
        let tx = tx.clone();
        let vm = p.vm.clone();
        let in_flight = history::begin(&self.paths.history, &spec.record())
            .inspect_err(|e| tracing::warn!("the job of {vm} is not on record as it runs: {e}"))
            .ok();
        tokio::task::spawn_blocking(move || {
            let record = job::run(&spec, &control);
            // A closed channel: the loop is gone, which it is only after waiting for its jobs
            // (or after a panic, which the thread's join reports).
            drop(tx.blocking_send(Msg::Done {
                vm,
                record: Box::new(record),
                in_flight,
            }));
        });
    }

    /// Returns whether the scheduler is stopping.
    fn handle(&mut self, msg: Msg, events: &EventSink) -> bool {
        match msg {
            Msg::Command(Command::Shutdown) => {
                for control in self.controls.values() {
                    control.cancel();
                }
                if let Some((_, control)) = &self.checking {
                    control.cancel();
                }
                if let Some((_, control)) = &self.boot_checking {
                    control.cancel();
                }
                return true;
            }
            Msg::Command(Command::RunNow { vm }) => match vm {
                Some(vm) => self.manual.push(vm),
                None => self.manual = self.config.vms.iter().map(|p| p.vm.clone()).collect(),
            },
            Msg::Config(Ok(config)) => {
                self.config = config;
                self.config_error = None;
                events(Event::ConfigReloaded);
            }
            Msg::Config(Err(e)) => {
                self.config_error = Some(e.to_string());
                events(Event::ConfigError(e.into()));
            }
            Msg::Mounts => {}
            Msg::Done {
                vm,
                record,
                in_flight,
            } => {
                self.running.remove(&vm);
                self.controls.remove(&vm);
                if record.outcome == Outcome::Ok {
                    self.warned_stale
                        .remove(&(record.vm.clone(), record.destination.clone()));
                }
                self.finish(record, in_flight, events);
            }
            Msg::BootChecked { record, in_flight } => {
                self.boot_checking = None;
                self.finish(record, in_flight, events);
            }
            Msg::Checked(event) => {
                self.checking = None;
                if let Event::Checked {
                    destination,
                    error: Some(e),
                    ..
                } = &*event
                {
                    tracing::warn!("the rotating check of {destination} did not run: {e}");
                }
                events(*event);
            }
            Msg::Written(counts) => {
                for (vm, total) in counts {
                    let base = *self.written_base.entry(vm.clone()).or_insert(total);
                    // A restarted VM counts from zero again.
                    let since = if total < base {
                        self.written_base.insert(vm.clone(), 0);
                        total
                    } else {
                        total - base
                    };
                    self.written.insert(vm, since);
                }
            }
        }
        false
    }

    /// A job's `record` goes into the history (and its in-flight note away), then out as
    /// [`Event::Finished`].
    fn finish(
        &mut self,
        record: Box<Record>,
        in_flight: Option<history::InFlight>,
        events: &EventSink,
    ) {
        let appended = history::append(&self.paths.history, &record);
        if let Some(job) = in_flight {
            job.end();
        }
        if let Err(e) = appended {
            events(Event::ConfigError(
                ConfigError::Io {
                    action: "append to the history next to",
                    path: self.paths.history.clone(),
                    detail: e.to_string(),
                }
                .into(),
            ));
        }
        self.records.push((*record).clone());
        events(Event::Finished(record));
    }

    /// Reads how much the VMs with an activity trigger have written (off the loop).
    fn poll_activity(&self, tx: &mpsc::Sender<Msg>) {
        let vms: Vec<String> = self
            .config
            .vms
            .iter()
            .filter(|p| p.activity_bytes.is_some())
            .map(|p| p.uuid.clone().unwrap_or_else(|| p.vm.clone()))
            .collect();
        if vms.is_empty() {
            return;
        }
        let names: Vec<String> = self
            .config
            .vms
            .iter()
            .filter(|p| p.activity_bytes.is_some())
            .map(|p| p.vm.clone())
            .collect();
        let uri = self.config.uri.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(hv) = crate::libvirt::Hypervisor::connect(&uri) else {
                return;
            };
            let counts = vms
                .iter()
                .zip(names)
                .filter_map(|(id, name)| Some((name, hv.written_bytes(id).ok()??)))
                .collect();
            // A closed channel: the scheduler stopped and needs no counts.
            drop(tx.blocking_send(Msg::Written(counts)));
        });
    }

    fn warn_stale(&mut self, events: &EventSink) {
        let now = Utc::now();
        for p in &self.config.vms {
            if self.config.vm_paused_at(p, now) {
                continue;
            }
            for dest in &p.destinations {
                let track = history::track(&self.records, &p.vm, p.uuid.as_deref(), dest);
                if !policy::is_stale(p, &track, self.since, now) {
                    continue;
                }
                let key = (p.vm.clone(), dest.clone());
                if self
                    .warned_stale
                    .get(&key)
                    .is_some_and(|t| now - *t < chrono::Duration::hours(12))
                {
                    continue;
                }
                self.warned_stale.insert(key, now);
                let why = match self.found.get(dest) {
                    Some(Availability::Missing { reason }) => reason.clone(),
                    _ if track.failures > 0 => "the last checkpoints failed".into(),
                    _ => "no checkpoint could be taken".into(),
                };
                events(Event::Stale {
                    vm: p.vm.clone(),
                    destination: dest.clone(),
                    last_success: track.last_success,
                    why,
                });
            }
        }
    }

    fn write_status(&mut self) {
        for (vm, job) in &mut self.running {
            if let Some(c) = self.controls.get(vm) {
                let (done, total) = c.progress_bytes();
                job.done_bytes = done;
                job.total_bytes = total;
                c.phase().label().clone_into(&mut job.phase);
            }
        }
        if let Some((job, c)) = &mut self.boot_checking {
            let (done, total) = c.progress_bytes();
            job.done_bytes = done;
            job.total_bytes = total;
            c.phase().label().clone_into(&mut job.phase);
        }
        let now = Utc::now();
        let mut next = Vec::new();
        for p in &self.config.vms {
            for dest in &p.destinations {
                let mut track = history::track(&self.records, &p.vm, p.uuid.as_deref(), dest);
                track.written_since_bytes = self.written.get(&p.vm).copied();
                let (at, why) = policy::next_run(p, &track, now);
                next.push(NextRun {
                    vm: p.vm.clone(),
                    destination: dest.clone(),
                    at: at.max(now),
                    why,
                    paused: self.config.vm_paused_at(p, now),
                });
            }
        }
        let status = Status {
            pid: std::process::id(),
            program: self.program.clone(),
            started: self.started,
            updated: now,
            paused: self.config.paused_at(now),
            config_error: self.config_error.clone(),
            running: self
                .running
                .values()
                .chain(self.boot_checking.as_ref().map(|(job, _)| job))
                .cloned()
                .collect(),
            destinations: self
                .found
                .iter()
                .map(|(name, found)| DestinationStatus::of(name, found))
                .collect(),
            next,
        };
        status.write(&self.paths.status).or_warn(format_args!(
            "write the status to {}",
            self.paths.status.display()
        ));
    }
}
