//! The engine: owns the libvirt connection and runs all blocking work off the UI thread.
//!
//! Front ends (the window, the tray) talk to it only through [`Command`]s and receive
//! [`Event`]s over a bounded channel; after each event the engine calls the front end's
//! waker (the GUI passes `egui::Context::request_repaint`), so the UI never polls and never
//! blocks. The engine reconnects by itself when the daemon goes away and comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::Error;
use crate::libvirt::{Hypervisor, Subscription, VmEvent};
use crate::vm::VmInfo;

/// Requests from a front end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// List the VMs again now.
    RefreshVms,
    /// Stop the engine.
    Shutdown,
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
}

/// Called after each event so a sleeping front end wakes up and drains the channel.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Capacity of the event channel: enough for bursts, small enough to bound memory.
const EVENT_CAPACITY: usize = 256;
/// Capacity of the command channel.
const COMMAND_CAPACITY: usize = 64;
/// Lifecycle events arriving within this window cause one refresh, not many.
const REFRESH_DEBOUNCE: Duration = Duration::from_millis(150);
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
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the engine on its own thread, connected to `uri`.
///
/// # Errors
/// Fails only if the thread or its runtime cannot be created.
pub fn spawn(uri: String, waker: Waker) -> std::io::Result<EngineHandle> {
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
                uri,
                events: event_tx,
                waker,
            };
            runtime.block_on(engine.run(command_rx));
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
    Retry,
}

impl Engine {
    async fn emit(&self, event: Event) {
        // A full channel means the UI is not draining; waiting here is the intended
        // back-pressure, and a closed channel means the front end is gone.
        if self.events.send(event).await.is_ok() {
            (self.waker)();
        }
    }

    async fn run(self, mut commands: mpsc::Receiver<Command>) {
        let (lifecycle_tx, mut lifecycle_rx) = mpsc::channel::<VmEvent>(EVENT_CAPACITY);
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
            let wake = tokio::select! {
                cmd = commands.recv() => Wake::Command(cmd),
                Some(ev) = lifecycle_rx.recv() => Wake::Lifecycle(ev),
                () = tokio::time::sleep(wait) => Wake::Retry,
            };
            match wake {
                Wake::Command(None | Some(Command::Shutdown)) => return,
                Wake::Command(Some(Command::RefreshVms)) => {
                    if let Some((hv, _)) = &session {
                        self.refresh(hv).await;
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn lists_vms_of_the_test_driver_and_wakes_the_ui() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        let mut engine = spawn(
            "test:///default".into(),
            Arc::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        let mut seen = Vec::new();
        while let Some(ev) = engine.recv_timeout(Duration::from_secs(10)) {
            let done = matches!(ev, Event::Vms(_));
            seen.push(ev);
            if done {
                break;
            }
        }
        assert!(
            matches!(seen.first(), Some(Event::Connected { .. })),
            "{seen:?}"
        );
        let Some(Event::Vms(vms)) = seen.last() else {
            panic!("no VM list: {seen:?}")
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
        assert!(matches!(
            engine.recv_timeout(Duration::from_secs(10)),
            Some(Event::Vms(_))
        ));
    }

    #[test]
    fn reports_connection_failure_with_retry() {
        let mut engine = spawn(
            "qemu:///system?socket=/nonexistent/sock".into(),
            Arc::new(|| {}),
        )
        .unwrap();
        match engine.recv_timeout(Duration::from_secs(10)) {
            Some(Event::ConnectionFailed { error, retry_in }) => {
                assert!(matches!(*error, Error::DaemonNotRunning { .. }));
                assert_eq!(retry_in, RETRY_FIRST);
            }
            other => panic!("expected a connection failure, got {other:?}"),
        }
        drop(engine); // Shuts down promptly even while waiting to retry.
    }
}
