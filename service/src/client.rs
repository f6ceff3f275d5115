//! The clients' side of the socket: connect, say hello, then send commands and read events,
//! either one by one ([`Connection`], for the CLI) or as an [`EngineHandle`] whose channels
//! the socket feeds ([`Connection::into_engine`], for the window and the tray).

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rewind_core::engine::{Command, EngineHandle, Event, Waker};
use rewind_core::job_error::JobError;
use tokio::sync::mpsc;

use crate::wire::{self, FrameError, FromService, ToService};

/// The variable that names another socket (tests, several services on one machine).
pub const SOCKET_ENV: &str = "REWIND_SOCKET";
/// Where the service listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rewind/rewind.sock";

/// The socket to use: `$REWIND_SOCKET`, else [`DEFAULT_SOCKET`].
#[must_use]
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// Why a client could not use the service.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens on the socket.
    #[error(
        "Rewind's protection service is not running (nothing answers on {}): start it with \
         `systemctl start rewind` (or, without systemd, run `rewind service` as root)",
        socket.display()
    )]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// The service said no.
    #[error(transparent)]
    Refused(JobError),
    /// The service's answer could not be read.
    #[error("Rewind's protection service did not answer as expected: {0}")]
    Protocol(#[from] FrameError),
}

impl ConnectError {
    /// Whether the service simply is not there (a root user may then work without it).
    #[must_use]
    pub fn is_not_running(&self) -> bool {
        matches!(self, Self::NotRunning { .. })
    }
}

/// What the service said when it let the client in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The service's version.
    pub version: String,
    /// The libvirt connection it protects through.
    pub uri: String,
}

/// A connection to the service.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    input: BufReader<UnixStream>,
    line: Vec<u8>,
    welcome: Welcome,
}

/// Connects to the service at `socket` as a `client` (`cli`, `window`, `tray`).
///
/// # Errors
/// Nothing listens there, the service refuses this user, or it answers garbage.
pub fn connect_to(socket: &Path, client: &str) -> Result<Connection, ConnectError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ConnectError::NotRunning {
        socket: socket.to_path_buf(),
        source,
    })?;
    let input = BufReader::new(stream.try_clone().map_err(FrameError::Io)?);
    wire::write(
        &mut stream,
        &ToService::Hello {
            protocol: wire::PROTOCOL,
            client: client.to_owned(),
        },
    )
    .map_err(FrameError::Io)?;
    let mut connection = Connection {
        stream,
        input,
        line: Vec::new(),
        welcome: Welcome {
            version: String::new(),
            uri: String::new(),
        },
    };
    match wire::read::<FromService>(&mut connection.input, &mut connection.line)? {
        Some(FromService::Welcome { version, uri, .. }) => {
            connection.welcome = Welcome { version, uri };
            Ok(connection)
        }
        Some(FromService::Refused(why)) => Err(ConnectError::Refused(why)),
        Some(FromService::Event(_)) | None => Err(ConnectError::Protocol(FrameError::Io(
            std::io::ErrorKind::UnexpectedEof.into(),
        ))),
    }
}

/// Connects to the service at [`socket_path`].
///
/// # Errors
/// As [`connect_to`].
pub fn connect(client: &str) -> Result<Connection, ConnectError> {
    connect_to(&socket_path(), client)
}

/// A second way to send on a connection, for a signal handler: it cancels jobs.
#[derive(Debug)]
pub struct Canceller {
    stream: UnixStream,
}

impl Canceller {
    /// Asks the service to cancel `job`.
    ///
    /// # Errors
    /// The connection is gone.
    pub fn cancel(&mut self, job: rewind_core::engine::jobs::JobId) -> std::io::Result<()> {
        wire::write(&mut self.stream, &ToService::Command(Command::Cancel(job)))
    }
}

impl Connection {
    /// A canceller on this connection.
    ///
    /// # Errors
    /// The socket cannot be shared.
    pub fn canceller(&self) -> std::io::Result<Canceller> {
        Ok(Canceller {
            stream: self.stream.try_clone()?,
        })
    }

    /// What the service said.
    #[must_use]
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends a command.
    ///
    /// # Errors
    /// The connection is gone.
    pub fn send(&mut self, command: Command) -> std::io::Result<()> {
        wire::write(&mut self.stream, &ToService::Command(command))
    }

    /// Waits for the next event; `Ok(None)` when the service closed the connection.
    ///
    /// # Errors
    /// The connection failed, or the service sent something that is not an event.
    pub fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        match wire::read::<FromService>(&mut self.input, &mut self.line)? {
            Some(FromService::Event(event)) => Ok(Some(event)),
            Some(FromService::Refused(why)) => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why.message,
            ))),
            Some(FromService::Welcome { .. }) | None => Ok(None),
        }
    }

    /// Turns the connection into an engine handle, as if the engine ran here: its
    /// commands go over the socket, and the service's events come back to it (after each,
    /// `waker` is called). When the service goes away, the handle reports it with
    /// [`Event::ConnectionFailed`] and its channel ends.
    ///
    /// # Errors
    /// The threads that carry the messages could not be started.
    pub fn into_engine(self, waker: Waker) -> std::io::Result<EngineHandle> {
        let (command_tx, mut command_rx) = mpsc::channel::<Command>(64);
        let (event_tx, event_rx) = mpsc::channel::<Event>(256);
        let Self {
            mut stream,
            mut input,
            mut line,
            ..
        } = self;
        let reader_stream = stream.try_clone()?;
        let reader = std::thread::Builder::new()
            .name("rewind-service-in".into())
            .spawn(move || {
                loop {
                    let event = match wire::read::<FromService>(&mut input, &mut line) {
                        Ok(Some(FromService::Event(event))) => event,
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => {
                            let lost = Event::ConnectionFailed {
                                error: JobError::new(
                                    rewind_core::job_error::ErrorKind::Unavailable,
                                    "the connection to Rewind's protection service was lost",
                                )
                                .retryable(),
                                retry_in: std::time::Duration::from_secs(5),
                            };
                            if event_tx.blocking_send(lost).is_ok() {
                                waker();
                            }
                            return;
                        }
                    };
                    if event_tx.blocking_send(event).is_err() {
                        return; // the handle is gone
                    }
                    waker();
                }
            })?;
        let writer = std::thread::Builder::new()
            .name("rewind-service-out".into())
            .spawn(move || {
                while let Some(command) = command_rx.blocking_recv() {
                    if wire::write(&mut stream, &ToService::Command(command)).is_err() {
                        break;
                    }
                }
                // The handle is gone (or the service): end the reading side too.
                reader_stream.shutdown(std::net::Shutdown::Both).ok();
                if reader.join().is_err() {
                    tracing::error!("the service connection's reading thread panicked");
                }
            })?;
        Ok(EngineHandle::from_channels(command_tx, event_rx, writer))
    }
}
