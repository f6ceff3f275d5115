//! The service: one engine (with the scheduler) behind a Unix socket.
//!
//! Threads, all plain and blocking:
//! - the engine's own (`rewind_core::engine`), which runs the jobs and the scheduler;
//! - `rewind-accept`, which takes connections;
//! - one `rewind-client` per connection, which checks who it is, then reads its commands,
//!   and one `rewind-send` per connection, which writes its events;
//! - `rewind-fanout`, which wakes when the engine has events and hands each to every client.
//!
//! A client that connects gets the state as it is first (the connection, the VMs, the
//! configuration, the destinations, the history, the scheduler, the running jobs and their
//! progress), then every event as it comes. A client too slow to take its events (its queue
//! full) is cut off rather than let hold up the others; it connects again and gets the state
//! anew.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rewind_core::engine::jobs::{JobId, JobRequest, Owner};
use rewind_core::engine::{self, Command, EngineHandle, EngineOptions, Event, SchedulerView};
use rewind_core::job_error::{ErrorKind, JobError};
use rewind_core::restore::{DiskStorage, NewVm};
use rewind_core::scheduler::Paths;

use crate::access::{self, Peer};
use crate::wire::{self, FromService, ToService};

/// Who protects, as the clients show it ("Protecting (the protection service)").
const HOLDER: &str = "the protection service";
/// Events queued for one client before it counts as stuck and is cut off.
const CLIENT_QUEUE: usize = 4096;
/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run the service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The libvirt connection (`qemu:///system`).
    pub uri: String,
    /// Where the socket goes.
    pub socket: PathBuf,
    /// The configuration, history and status.
    pub paths: Paths,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Another service answers on the socket.
    #[error(
        "another Rewind service is running already (it answers on {}); stop it first, or \
         give this one another socket with REWIND_SOCKET",
        socket.display()
    )]
    AlreadyRunning {
        /// The socket.
        socket: PathBuf,
    },
    /// The socket could not be made.
    #[error("could not {action} {}: {source}", path.display())]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The engine could not start.
    #[error("could not start the engine: {0}")]
    Engine(#[source] std::io::Error),
}

/// The state as a new client must first see it: the newest of each kind of event that
/// describes how things are (not what happened).
#[derive(Debug, Default)]
struct Snapshot {
    connection: Option<Event>,
    vms: Option<Event>,
    config: Option<Event>,
    destinations: Option<Event>,
    history: Option<Event>,
    scheduler: Option<Event>,
    ssh_identity: Option<Event>,
    /// The VMs that run from a checkpoint the service serves.
    runs: Option<Event>,
    /// Running jobs: how each began, and its newest progress.
    jobs: BTreeMap<JobId, (Event, Option<Event>)>,
}

impl Snapshot {
    fn apply(&mut self, event: &Event) {
        let slot = match event {
            Event::Connected { .. } | Event::ConnectionFailed { .. } => &mut self.connection,
            Event::Vms(_) => &mut self.vms,
            Event::Config { .. } => &mut self.config,
            Event::Destinations(_) => &mut self.destinations,
            Event::History(_) => &mut self.history,
            Event::Scheduler(_) => &mut self.scheduler,
            Event::SshIdentity { .. } => &mut self.ssh_identity,
            Event::Runs(_) => &mut self.runs,
            Event::JobStarted { job, .. } => {
                self.jobs.insert(*job, (event.clone(), None));
                return;
            }
            Event::JobProgress { job, .. } => {
                if let Some((_, progress)) = self.jobs.get_mut(job) {
                    *progress = Some(event.clone());
                }
                return;
            }
            Event::JobFinished { job, .. } => {
                self.jobs.remove(job);
                return;
            }
            _ => return,
        };
        *slot = Some(event.clone());
    }

    /// The engine's scheduler, as its clients see it: not theirs ("this window"), but the
    /// service's, with its live status.
    fn as_clients_see(&self, event: Event) -> Event {
        let status = match event {
            Event::Scheduler(SchedulerView::Here) => match &self.scheduler {
                Some(Event::Scheduler(SchedulerView::Elsewhere { status, .. })) => status.clone(),
                _ => None,
            },
            Event::SchedulerStatus(status) => Some(status),
            other => return other,
        };
        Event::Scheduler(SchedulerView::Elsewhere {
            holder: HOLDER.into(),
            status,
        })
    }

    fn replay(&self) -> Vec<Event> {
        let state = [
            &self.connection,
            &self.config,
            &self.vms,
            &self.destinations,
            &self.history,
            &self.scheduler,
            &self.ssh_identity,
            &self.runs,
        ];
        let mut events: Vec<Event> = state.into_iter().flatten().cloned().collect();
        for (started, progress) in self.jobs.values() {
            events.push(started.clone());
            events.extend(progress.iter().cloned());
        }
        events
    }
}

#[derive(Debug)]
struct Client {
    id: u64,
    events: SyncSender<Event>,
    /// Shut down to cut a stuck client off.
    socket: UnixStream,
}

#[derive(Debug, Default)]
struct Clients {
    next_id: u64,
    list: Vec<Client>,
    snapshot: Snapshot,
}

/// What every thread shares.
#[derive(Debug)]
struct Hub {
    engine: Mutex<Option<EngineHandle>>,
    clients: Mutex<Clients>,
    /// Set by the engine's waker; the fan-out thread waits on it.
    woken: Mutex<bool>,
    wake: Condvar,
    uri: String,
    /// Set when the service stops: no new clients.
    stopping: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding a lock leaves data that is still consistent here
    // (lists and snapshots are replaced whole).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    fn send_to_engine(&self, command: Command) -> bool {
        lock(&self.engine).as_ref().is_some_and(|e| e.send(command))
    }

    /// Hands every pending engine event to every client.
    fn fan_out(&self) {
        loop {
            let Some(event) = lock(&self.engine).as_mut().and_then(EngineHandle::try_recv) else {
                return;
            };
            if matches!(event, Event::Autostart { .. }) {
                // Starting at login is each user's own matter: their client answers it.
                continue;
            }
            let mut clients = lock(&self.clients);
            let event = clients.snapshot.as_clients_see(event);
            clients.snapshot.apply(&event);
            clients
                .list
                .retain(|c| match c.events.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        tracing::warn!("client {} does not take its events: cut off", c.id);
                        c.socket.shutdown(std::net::Shutdown::Both).ok();
                        false
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                });
        }
    }
}

/// Makes the socket: its folder (world-searchable), no stale file, and the socket itself
/// open to every local user (who may use it is decided per connection).
fn bind(socket: &Path) -> Result<UnixListener, ServiceError> {
    let err = |action, source| ServiceError::Socket {
        action,
        path: socket.to_path_buf(),
        source,
    };
    if let Some(folder) = socket.parent()
        && !folder.is_dir()
    {
        // World-searchable whatever the umask (the unit's is 0077): clients must reach it.
        std::fs::create_dir_all(folder).map_err(|e| err("create the folder of", e))?;
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| err("open the folder of", e))?;
    }
    if UnixStream::connect(socket).is_ok() {
        return Err(ServiceError::AlreadyRunning {
            socket: socket.to_path_buf(),
        });
    }
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!("removed the stale socket {}", socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("remove the stale socket", e)),
    }
    let listener = UnixListener::bind(socket).map_err(|e| err("listen on", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| err("open to local users", e))?;
    Ok(listener)
}

/// A running service; [`Running::stop`] (or dropping it) stops the engine, cancelling and
/// waiting for running jobs, and removes the socket.
#[derive(Debug)]
pub struct Running {
    hub: Arc<Hub>,
    socket: PathBuf,
    fanout: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops the service.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let hub = &self.hub;
        if hub.stopping.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Wake the accepting thread so that it sees the service stopping and ends.
        drop(UnixStream::connect(&self.socket));
        // Dropping the engine's handle ends it: its scheduler cancels running jobs and
        // waits for them to clean up.
        let engine = lock(&self.hub.engine).take();
        drop(engine);
        *lock(&self.hub.woken) = true;
        self.hub.wake.notify_all();
        if let Some(fanout) = self.fanout.take()
            && fanout.join().is_err()
        {
            tracing::error!("the service's fan-out thread panicked");
        }
        // Every client learns at once that the service is gone.
        for client in lock(&self.hub.clients).list.drain(..) {
            client.socket.shutdown(std::net::Shutdown::Both).ok();
        }
        if let Err(e) = std::fs::remove_file(&self.socket)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove the socket {}: {e}", self.socket.display());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Starts the service: binds the socket, starts the engine with its scheduler, and serves
/// clients on threads of its own until stopped.
///
/// # Errors
/// The socket cannot be made (or another service has it), or the engine cannot start.
pub fn start(options: ServiceOptions) -> Result<Running, ServiceError> {
    let listener = bind(&options.socket)?;
    let hub = Arc::new(Hub {
        engine: Mutex::new(None),
        clients: Mutex::new(Clients::default()),
        woken: Mutex::new(false),
        wake: Condvar::new(),
        uri: options.uri.clone(),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    let waker_hub = Arc::downgrade(&hub);
    let waker: engine::Waker = Arc::new(move || {
        if let Some(hub) = waker_hub.upgrade() {
            *lock(&hub.woken) = true;
            hub.wake.notify_one();
        }
    });
    let handle = engine::spawn_with(
        EngineOptions {
            uri: options.uri,
            scheduler: Some("Rewind's protection service"),
            paths: options.paths,
        },
        waker,
    )
    .map_err(ServiceError::Engine)?;
    *lock(&hub.engine) = Some(handle);
    let fanout_hub = Arc::clone(&hub);
    let fanout = std::thread::Builder::new()
        .name("rewind-fanout".into())
        .spawn(move || {
            loop {
                {
                    let mut woken = lock(&fanout_hub.woken);
                    while !*woken {
                        woken = fanout_hub
                            .wake
                            .wait(woken)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    *woken = false;
                }
                if lock(&fanout_hub.engine).is_none() {
                    return;
                }
                fanout_hub.fan_out();
            }
        })
        .map_err(ServiceError::Engine)?;
    let accept_hub = Arc::downgrade(&hub);
    std::thread::Builder::new()
        .name("rewind-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Some(hub) = accept_hub.upgrade() else {
                    return;
                };
                if hub.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                match stream {
                    Ok(stream) => {
                        if let Err(e) = std::thread::Builder::new()
                            .name("rewind-client".into())
                            .spawn(move || serve(&hub, stream))
                        {
                            tracing::error!("could not start a thread for a client: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("could not accept a client: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(ServiceError::Engine)?;
    tracing::info!(
        "listening on {} (protocol {})",
        options.socket.display(),
        wire::PROTOCOL
    );
    Ok(Running {
        hub,
        socket: options.socket,
        fanout: Some(fanout),
    })
}

/// Says `answer` to a client that is then dropped.
fn refuse(stream: &mut UnixStream, answer: JobError) {
    if let Err(e) = wire::write(stream, &FromService::Refused(answer)) {
        tracing::debug!("the refused client left before its answer: {e}");
    }
}

/// The hello, the protocol and the user checked: the client's name if it may go on (it
/// has been welcomed), `None` if it was refused or left.
fn handshake(
    hub: &Hub,
    peer: &Peer,
    stream: &mut UnixStream,
    input: &mut BufReader<UnixStream>,
    line: &mut Vec<u8>,
) -> Option<String> {
    if let Err(e) = stream.set_read_timeout(Some(HELLO_TIMEOUT)) {
        tracing::warn!("could not time the hello of {}: {e}", peer.describe());
    }
    let client = match wire::read::<ToService>(input, line) {
        Ok(Some(ToService::Hello { protocol, client })) if protocol == wire::PROTOCOL => client,
        Ok(Some(ToService::Hello { protocol, .. })) => {
            refuse(
                stream,
                JobError::new(
                    ErrorKind::Invalid,
                    format!(
                        "this client speaks protocol {protocol} and the service {}: \
                         install the same version of Rewind for both, then restart the \
                         service",
                        wire::PROTOCOL
                    ),
                ),
            );
            return None;
        }
        Ok(_) | Err(_) => {
            tracing::debug!("{} did not say hello: dropped", peer.describe());
            return None;
        }
    };
    if let Err(refusal) = access::authorise(peer) {
        tracing::info!(
            "refused {} ({client}): {}",
            peer.describe(),
            refusal.message
        );
        refuse(stream, refusal);
        return None;
    }
    if let Err(e) = stream.set_read_timeout(None) {
        tracing::warn!("{e}");
        return None;
    }
    let welcome = FromService::Welcome {
        protocol: wire::PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uri: hub.uri.clone(),
    };
    if wire::write(stream, &welcome).is_err() {
        return None;
    }
    Some(client)
}

/// One connection, from hello to hang-up.
fn serve(hub: &Hub, mut stream: UnixStream) {
    let peer = match Peer::of(&stream) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!("a client whose credentials cannot be read was dropped: {e}");
            return;
        }
    };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(read_half);
    let mut line = Vec::new();
    let Some(client) = handshake(hub, &peer, &mut stream, &mut input, &mut line) else {
        return;
    };
    if hub.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return; // it would not be told when the service goes
    }
    let (events, queue) = std::sync::mpsc::sync_channel(CLIENT_QUEUE);
    let Ok(cut_off) = stream.try_clone() else {
        return;
    };
    let id = {
        let mut clients = lock(&hub.clients);
        clients.next_id += 1;
        let id = clients.next_id;
        for event in clients.snapshot.replay() {
            // The queue is new and far larger than the state.
            events.try_send(event).ok();
        }
        clients.list.push(Client {
            id,
            events: events.clone(),
            socket: cut_off,
        });
        id
    };
    tracing::info!("client {id}: {} ({client}) connected", peer.describe());
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let sender = std::thread::Builder::new()
        .name("rewind-send".into())
        .spawn(move || send_events(write_half, &queue));
    loop {
        match wire::read::<ToService>(&mut input, &mut line) {
            Ok(Some(ToService::Command(command))) => {
                if let Some(answer) = dispatch(hub, &peer, command) {
                    // Full: the client is being cut off anyway.
                    events.try_send(answer).ok();
                }
            }
            Ok(Some(ToService::Hello { .. })) => {}
            // A client that exits without closing first resets the connection: an end
            // like any other.
            Ok(None) => break,
            Err(wire::FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break;
            }
            Err(e) => {
                tracing::info!("client {id}: {e}; dropped");
                break;
            }
        }
    }
    lock(&hub.clients).list.retain(|c| c.id != id);
    drop(events);
    if let Err(e) = stream.shutdown(std::net::Shutdown::Both) {
        tracing::debug!("client {id}: {e}");
    }
    if let Ok(sender) = sender
        && sender.join().is_err()
    {
        tracing::error!("client {id}: its sending thread panicked");
    }
    tracing::info!("client {id} left");
}

fn send_events(mut stream: UnixStream, queue: &Receiver<Event>) {
    for event in queue {
        if wire::write(&mut stream, &FromService::Event(event)).is_err() {
            // Gone: stop the reading side too.
            stream.shutdown(std::net::Shutdown::Both).ok();
            return;
        }
    }
}

/// A folder or file that `command` would write on the client's behalf.
fn written_path(command: &Command) -> Option<&Path> {
    match command {
        Command::AddFolderDestination { folder, .. } => Some(folder),
        Command::Start(JobRequest::Export { out, .. }) => Some(out),
        Command::Start(JobRequest::RestoreFiles { to, .. }) => Some(to),
        Command::Start(JobRequest::Restore {
            as_new: Some(new), ..
        }) => match &new.storage {
            DiskStorage::Folder(folder) => Some(folder),
            DiskStorage::Pool(_) => None,
        },
        _ => None,
    }
}

/// Whether `command` writes the disks of a VM restored as a new one.
fn is_new_vm_disks(command: &Command) -> bool {
    matches!(
        command,
        Command::Start(JobRequest::Restore {
            as_new: Some(NewVm {
                storage: DiskStorage::Folder(_),
                ..
            }),
            ..
        })
    )
}

/// Passes a client's command to the engine, or answers it here: the event for this
/// client alone, if any.
fn dispatch(hub: &Hub, peer: &Peer, mut command: Command) -> Option<Event> {
    match &command {
        Command::Shutdown => {
            tracing::info!("{} asked the service to stop: ignored", peer.describe());
            return None;
        }
        Command::SetAutostart(_) => return None,
        _ => {}
    }
    if let Some(path) = written_path(&command)
        && let Err(refusal) = access::may_write(peer, path)
        && !(is_new_vm_disks(&command) && access::libvirt_image_folder(&hub.uri, path))
    {
        return Some(match command {
            Command::AddFolderDestination { .. } => Event::DestinationAdded {
                result: Err(refusal),
                warning: None,
            },
            _ => Event::Failed { error: refusal },
        });
    }
    if let Command::Start(
        JobRequest::Export { owner, .. } | JobRequest::RestoreFiles { owner, .. },
    ) = &mut command
    {
        // What the service writes for a user is that user's, whatever the client said.
        *owner = (peer.uid != 0).then_some(Owner {
            uid: peer.uid,
            gid: peer.gid,
        });
    }
    if hub.send_to_engine(command) {
        None
    } else {
        Some(Event::Failed {
            error: JobError::new(
                ErrorKind::Busy,
                "the service is busy or stopping and did not take the request: try again in \
                 a moment",
            )
            .retryable(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_core::progress::Phase;

    fn started(job: JobId) -> Event {
        Event::JobStarted {
            job,
            label: format!("job {job}"),
            request: Arc::new(JobRequest::Verify {
                destination: "usb".into(),
                quick: false,
            }),
        }
    }

    fn progress(job: JobId, done_bytes: u64) -> Event {
        Event::JobProgress {
            job,
            phase: Phase::Copying,
            done_bytes,
            total_bytes: 100,
            force_off_in: None,
        }
    }

    fn describe(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Vms(vms) => format!("vms {}", vms.len()),
                Event::JobStarted { job, .. } => format!("started {job}"),
                Event::JobProgress {
                    job, done_bytes, ..
                } => format!("progress {job} {done_bytes}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_new_client_gets_the_newest_state_and_the_running_jobs_with_their_progress() {
        let mut s = Snapshot::default();
        s.apply(&Event::Vms(Vec::new()));
        s.apply(&started(1));
        s.apply(&progress(1, 10));
        s.apply(&started(2));
        s.apply(&progress(1, 60));
        s.apply(&Event::DrivesFound(Vec::new())); // an answer, not state
        s.apply(&Event::JobFinished {
            job: 2,
            result: Err(JobError::new(ErrorKind::Cancelled, "cancelled")),
        });
        assert_eq!(
            describe(&s.replay()),
            ["vms 0", "started 1", "progress 1 60"]
        );
        // The scheduler is the service's, with its newest status.
        let here = s.as_clients_see(Event::Scheduler(SchedulerView::Here));
        s.apply(&here);
        let status = rewind_core::scheduler::status::Status {
            pid: 1,
            program: "rewind service".into(),
            started: chrono::Utc::now(),
            updated: chrono::Utc::now(),
            paused: false,
            config_error: None,
            running: Vec::new(),
            destinations: Vec::new(),
            next: Vec::new(),
        };
        let live = s.as_clients_see(Event::SchedulerStatus(Box::new(status.clone())));
        s.apply(&live);
        let again = s.as_clients_see(Event::Scheduler(SchedulerView::Here));
        assert!(
            matches!(&again, Event::Scheduler(SchedulerView::Elsewhere { holder, status: Some(s) })
                if holder == HOLDER && **s == status),
            "{again:?}"
        );
        s.apply(&again);
        assert_eq!(describe(&s.replay()).len(), 4);
        // Progress of a job that never began for this service is not kept.
        s.apply(&progress(7, 1));
        assert_eq!(describe(&s.replay()).len(), 4);
        // The runs from checkpoints that the service serves: only the newest list, with the
        // state, before the running jobs.
        let run = |vm: &str| engine::RunInfo {
            vm_uuid: uuid::Uuid::new_v4(),
            vm: vm.into(),
            checkpoint: "20261205-030400".into(),
        };
        s.apply(&Event::Runs(vec![run("web"), run("db")]));
        let web = run("web");
        s.apply(&Event::Runs(vec![web.clone()]));
        let replayed = s.replay();
        let runs: Vec<_> = replayed
            .iter()
            .filter_map(|e| match e {
                Event::Runs(runs) => Some(runs.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(runs, [vec![web]]);
        assert!(
            matches!(&replayed[replayed.len() - 3], Event::Runs(_)),
            "{:?}",
            describe(&replayed)
        );
    }
}
