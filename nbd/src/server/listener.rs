//! Accepting connections, one thread each, and stopping them all promptly.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Export, ServerError, serve_connection};

/// Most connections served at once; more are closed as soon as they are accepted. QEMU
/// opens one or a few per disk; the socket is private, so this only bounds a bug.
pub const MAX_CONNECTIONS: usize = 16;
/// How often a listener waiting for connections looks at its [`StopFlag`].
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Tells connections and listeners to stop, and wakes those waiting for their client.
///
/// Clones share the flag. [`StopFlag::stop`] shuts down the socket of every connection
/// being served with it, so a thread blocked reading from a client returns at once.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    stopped: AtomicBool,
    /// The sockets of the connections being served, to shut down on stop.
    streams: Mutex<Streams>,
}

#[derive(Debug, Default)]
struct Streams {
    next_id: u64,
    open: HashMap<u64, UnixStream>,
}

impl StopFlag {
    /// A flag not yet set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and shuts down every connection served with it.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        let streams = self
            .0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in streams.open.values() {
            // Fails only on a socket already closed, which is the aim.
            drop(stream.shutdown(Shutdown::Both));
        }
    }

    /// Whether [`StopFlag::stop`] was called.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Records `stream` to be shut down on stop, until the registration is dropped.
    pub(crate) fn register(&self, stream: &UnixStream) -> io::Result<Registration> {
        let clone = stream.try_clone()?;
        let id = {
            let mut streams = self
                .0
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let id = streams.next_id;
            streams.next_id += 1;
            streams.open.insert(id, clone);
            id
        };
        // `stop` sets the flag before it takes the lock: either it saw this stream, or
        // this sees the flag.
        if self.is_stopped() {
            drop(stream.shutdown(Shutdown::Both));
        }
        Ok(Registration {
            flag: self.clone(),
            id,
        })
    }
}

/// A stream registered with a [`StopFlag`]; dropping it forgets the stream.
#[derive(Debug)]
pub(crate) struct Registration {
    flag: StopFlag,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self
            .flag
            .0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.open.remove(&self.id);
    }
}

/// Serves export `name` to every client that connects to `listener`, each on its own
/// thread with an export made by `open_export`, until `stop` is set; then ends every
/// connection and returns once all their threads have.
///
/// Waits for connections by polling every 20 ms, so a stop takes effect within that;
/// the caller then removes the socket file. A connection that fails is logged and does
/// not stop the others; a failure of `open_export` closes that one connection. At most
/// [`MAX_CONNECTIONS`] are served at once.
pub fn serve_listener<E, F>(
    listener: &UnixListener,
    name: &str,
    stop: &StopFlag,
    mut open_export: F,
) -> Result<(), ServerError>
where
    E: Export + 'static,
    F: FnMut() -> io::Result<E>,
{
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from))
        .unwrap_or_default();
    let accept_error = |source| ServerError::Accept {
        export: name.to_owned(),
        socket: socket.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(accept_error)?;
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    let result = loop {
        if stop.is_stopped() {
            break Ok(());
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            Err(e) => break Err(accept_error(e)),
        };
        join_finished(&mut connections);
        if connections.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                export = name,
                "refused an NBD connection: {MAX_CONNECTIONS} are already being served"
            );
            continue;
        }
        // Accepted sockets inherit nothing from the listener on Linux, but be sure.
        if let Err(source) = stream.set_nonblocking(false) {
            tracing::warn!(export = name, "cannot serve an NBD connection: {source}");
            continue;
        }
        let mut export = match open_export() {
            Ok(export) => export,
            Err(source) => {
                let error = ServerError::OpenExport {
                    export: name.to_owned(),
                    source,
                };
                tracing::warn!("{error}");
                continue;
            }
        };
        let (thread_name, thread_stop) = (name.to_owned(), stop.clone());
        let spawned = thread::Builder::new()
            .name(format!("nbd-serve-{next_id}"))
            .spawn(move || {
                if let Err(error) =
                    serve_connection(stream, &thread_name, &mut export, &thread_stop)
                {
                    tracing::info!("{error}");
                }
            });
        next_id += 1;
        match spawned {
            Ok(handle) => connections.push(handle),
            Err(source) => {
                break Err(ServerError::Spawn {
                    export: name.to_owned(),
                    source,
                });
            }
        }
    };
    stop.stop();
    for connection in connections {
        if connection.join().is_err() {
            tracing::error!(export = name, "a thread serving an NBD connection panicked");
        }
    }
    result
}

/// Joins the connection threads that have ended.
fn join_finished(connections: &mut Vec<JoinHandle<()>>) {
    let mut i = 0;
    while i < connections.len() {
        if connections[i].is_finished() {
            let handle = connections.swap_remove(i);
            if handle.join().is_err() {
                tracing::error!("a thread serving an NBD connection panicked");
            }
        } else {
            i += 1;
        }
    }
}

/// [`serve_listener`] on a thread of its own; dropping the handle stops it and waits.
///
/// The handle owns the listening socket's file: stopping removes it, so nothing is left
/// behind even when the caller panics.
#[derive(Debug)]
pub struct ListenerHandle {
    stop: StopFlag,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    socket: PathBuf,
    name: String,
}

impl ListenerHandle {
    /// Binds a Unix socket at `socket` (which must not exist yet) and serves export `name`
    /// on it from a new thread, with an export from `open_export` for each connection.
    ///
    /// Anyone who can reach the socket can read the export: put it in a folder that only
    /// the intended client (QEMU's user) can enter.
    pub fn spawn<E, F>(
        socket: impl Into<PathBuf>,
        name: &str,
        open_export: F,
    ) -> Result<ListenerHandle, ServerError>
    where
        E: Export + 'static,
        F: FnMut() -> io::Result<E> + Send + 'static,
    {
        let socket = socket.into();
        let listener = UnixListener::bind(&socket).map_err(|source| ServerError::Accept {
            export: name.to_owned(),
            socket: socket.clone(),
            source,
        })?;
        let stop = StopFlag::new();
        let (thread_stop, thread_name) = (stop.clone(), name.to_owned());
        let thread = thread::Builder::new()
            .name("nbd-listen".to_owned())
            .spawn(move || serve_listener(&listener, &thread_name, &thread_stop, open_export))
            .map_err(|source| {
                // Nothing listens: the socket file goes now.
                drop(std::fs::remove_file(&socket));
                ServerError::Spawn {
                    export: name.to_owned(),
                    source,
                }
            })?;
        Ok(ListenerHandle {
            stop,
            thread: Some(thread),
            socket,
            name: name.to_owned(),
        })
    }

    /// The path of the listening socket.
    #[must_use]
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The flag that stops this listener and its connections.
    #[must_use]
    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }

    /// Stops accepting, ends every connection, waits for their threads and removes the
    /// socket file; returns the listener's error, if it failed before.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), ServerError> {
        self.stop.stop();
        let result = match self.thread.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(ServerError::Panicked {
                    export: self.name.clone(),
                })
            }),
            None => Ok(()),
        };
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(
                    "cannot remove the NBD socket {}: {e}",
                    self.socket.display()
                );
            }
            _ => {}
        }
        result
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(error) = self.shut_down()
        {
            tracing::warn!("{error}");
        }
    }
}
