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
use crate::libvirt::{Hypervisor, Subscription, VmEvent};
use crate::progress::Control;
use crate::scheduler::status::Status;
use crate::scheduler::{Event as SchedEvent, Paths, SchedulerHandle};
use crate::view::catalog::{self, DestinationView};
use jobs::{ErrorKind, JobError, JobId, JobOutput, JobRequest};

mod commands;
mod destinations;
pub mod files;
mod protection;
mod protocol;

pub use commands::answer_for_this_user;
use destinations::AddTarget;
use protection::Protection;
pub use protocol::{Command, Event, ResumeKey, RunInfo, SchedulerView, Waker};

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
    /// A handle over channels that something else feeds: the protection service's client,
    /// which carries the commands over a socket and brings the events back. Dropping the
    /// handle closes `commands`, after which `thread` must end; it is then joined.
    #[must_use]
    pub fn from_channels(
        commands: mpsc::Sender<Command>,
        events: mpsc::Receiver<Event>,
        thread: std::thread::JoinHandle<()>,
    ) -> Self {
        Self {
            commands: Some(commands),
            events,
            thread: Some(thread),
        }
    }

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

/// The name of a window's own scheduler.
pub const THE_WINDOW: &str = "the Rewind window";

/// How to start an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The libvirt URI.
    pub uri: String,
    /// Run the scheduler here, under this name ("the Rewind window", "Rewind's protection
    /// service"), unless another process runs one; `None`: no scheduler (tests of the VM
    /// list).
    pub scheduler: Option<&'static str>,
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
            scheduler: None,
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
    /// Time to list the VMs after a burst of libvirt events.
    Refresh,
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
    /// A job the engine starts by itself (a keep that a stopped Rewind left unfinished).
    Start(JobRequest),
    /// The VMs listed off the loop after libvirt events (handled by the loop itself).
    Listed(Result<Vec<crate::vm::VmInfo>, Error>),
    Scanned(Vec<DestinationView>),
}

impl Engine {
    async fn emit(&self, event: Event) {
        // A full channel means the UI is not draining; waiting here is the intended
        // back-pressure, and a closed channel means the front end is gone.
        if self.events.send(event).await.is_ok() {
            (self.waker)();
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
        let mut listing = Listing::default();
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
                            error: JobError::from(error),
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
            let refresh = listing.timer();
            let wake = tokio::select! {
                cmd = commands.recv() => Wake::Command(cmd),
                Some(ev) = lifecycle_rx.recv() => Wake::Lifecycle(ev),
                Some(msg) = inner_rx.recv() => Wake::Inner(msg),
                () = refresh => Wake::Refresh,
                () = tokio::time::sleep(tick) => if tick < wait { Wake::Tick } else { Wake::Retry },
            };
            match wake {
                Wake::Command(None | Some(Command::Shutdown)) => {
                    // A copy of a run cancelled now is asked again of the next process.
                    crate::restore::run::process_stopping();
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
                Wake::Inner(Inner::Listed(listed)) => {
                    self.emit_listed(listed).await;
                    listing.done(session.as_ref().map(|s| &s.0), &inner_tx);
                }
                Wake::Inner(msg) => self.handle_inner(&mut protection, msg, &inner_tx).await,
                Wake::Tick => self.progress(&protection).await,
                Wake::Lifecycle(ev) => {
                    self.emit(Event::VmChanged(ev)).await;
                    listing.due();
                }
                Wake::Refresh => {
                    overflowed.store(false, Ordering::Relaxed);
                    listing.fire(session.as_ref().map(|s| &s.0), &inner_tx);
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
        self.emit_listed(listed).await;
    }

    async fn emit_listed(&self, listed: Result<Vec<crate::vm::VmInfo>, Error>) {
        match listed {
            Ok(vms) => self.emit(Event::Vms(vms)).await,
            Err(error) => {
                self.emit(Event::Failed {
                    error: JobError::from(error),
                })
                .await;
            }
        }
    }
}

/// Listing the VMs after libvirt events: a burst (define + start + resume) settles for
/// [`REFRESH_DEBOUNCE`], then the VMs are listed once, on a blocking thread, so that a
/// command sent meanwhile (the window's "Run from this checkpoint" just after the VM
/// stopped) is not held up by the listing. One listing at a time, so that an older list
/// never comes after a newer one; the list comes back to the loop as [`Inner::Listed`].
#[derive(Default)]
struct Listing {
    /// When to list.
    at: Option<tokio::time::Instant>,
    /// A listing is under way.
    busy: bool,
    /// Another is due once it is done.
    again: bool,
}

impl Listing {
    /// A libvirt event came.
    fn due(&mut self) {
        self.at
            .get_or_insert_with(|| tokio::time::Instant::now() + REFRESH_DEBOUNCE);
    }

    /// Ends when it is time to list.
    async fn timer(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The time came: list on `hv`, or after the listing under way.
    fn fire(&mut self, hv: Option<&Arc<Hypervisor>>, inner: &mpsc::Sender<Inner>) {
        self.at = None;
        if self.busy {
            self.again = true;
        } else if let Some(hv) = hv {
            self.start(hv, inner);
        }
    }

    /// A listing came back.
    fn done(&mut self, hv: Option<&Arc<Hypervisor>>, inner: &mpsc::Sender<Inner>) {
        self.busy = false;
        if std::mem::take(&mut self.again)
            && let Some(hv) = hv
        {
            self.start(hv, inner);
        }
    }

    fn start(&mut self, hv: &Arc<Hypervisor>, inner: &mpsc::Sender<Inner>) {
        self.busy = true;
        let (hv, tx) = (hv.clone(), inner.clone());
        tokio::task::spawn_blocking(move || {
            // A closed channel: the engine is stopping.
            drop(tx.blocking_send(Inner::Listed(hv.list_vms())));
        });
    }
}

fn panicked(action: &str, join: &tokio::task::JoinError) -> Error {
    Error::Libvirt {
        action: action.to_owned(),
        detail: format!("internal error: {join}"),
        connection_lost: false,
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
                scheduler: None,
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
        // A mount made by another test meanwhile would rightly wake the engine.
        let _no_mounts = crate::mounts::MOUNT_TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let mut engine = spawn_with(
            EngineOptions {
                uri: "test:///default".into(),
                scheduler: Some(THE_WINDOW),
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
                scheduler: Some(THE_WINDOW),
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

    /// The engine says at start which runs from checkpoints its process serves, and again
    /// after each job that starts, keeps or discards one, even a failed one.
    #[test]
    fn the_engine_lists_the_runs_it_serves_at_start_and_after_a_run_s_job() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine("test:///default", dir.path(), Arc::new(|| {}));
        let next_runs_or_end = |engine: &mut EngineHandle| {
            while let Some(ev) = engine.recv_timeout(Duration::from_secs(10)) {
                if matches!(ev, Event::Runs(_) | Event::JobFinished { .. }) {
                    return ev;
                }
            }
            panic!("no list of runs, no job's end");
        };
        assert!(matches!(next_runs_or_end(&mut engine), Event::Runs(_)));
        let vm_uuid = uuid::Uuid::new_v4();
        assert!(engine.send(Command::Start(JobRequest::DiscardRun { vm_uuid })));
        assert!(matches!(
            next_runs_or_end(&mut engine),
            Event::JobFinished { result: Err(_), .. }
        ));
        match next_runs_or_end(&mut engine) {
            Event::Runs(runs) => assert!(runs.iter().all(|r| r.vm_uuid != vm_uuid)),
            other => panic!("{other:?}"),
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
                assert_eq!(error.kind, ErrorKind::Unavailable);
                assert!(error.retryable, "{error:?}");
                assert!(
                    error
                        .source
                        .as_deref()
                        .and_then(|s| s.downcast_ref::<Error>())
                        .is_some_and(|e| matches!(e, Error::DaemonNotRunning { .. })),
                    "{error:?}"
                );
                assert_eq!(retry_in, RETRY_FIRST);
            }
            other => panic!("expected a connection failure, got {other:?}"),
        }
        drop(engine); // Shuts down promptly even while waiting to retry.
    }
}
