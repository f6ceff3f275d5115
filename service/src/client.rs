//! The clients' side of the socket: connect, say hello, then send commands and read events,
//! either one by one ([`Connection`], for the CLI) or as an [`EngineHandle`] whose channels
//! the socket feeds ([`Connection::into_engine`], for the window and the tray).

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rewind_core::engine::{Command, EngineHandle, Event, Waker};
use rewind_core::job_error::{ErrorKind, JobError};
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
}

/// How soon a window tries the service again after failing to reach it; doubled up to
/// [`RETRY_MAX`] while it keeps failing.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(15);

/// An engine handle whose engine is the protection service at `socket`, as if it ran
/// here: commands go over the socket, the service's events come back (after each, `waker`
/// is called). It connects by itself, and again whenever the connection is lost (the
/// service restarted), saying so meanwhile with [`Event::ConnectionFailed`].
///
/// Two commands are answered here, as the user who runs the client, because they are that
/// user's own matter: the removable drives they mounted, and starting Rewind at their
/// login ([`rewind_core::engine::answer_for_this_user`]).
///
/// # Errors
/// The thread that carries the messages could not be started.
pub fn engine(client: &str, socket: PathBuf, waker: Waker) -> std::io::Result<EngineHandle> {
    let (command_tx, command_rx) = mpsc::channel::<Command>(64);
    let (event_tx, event_rx) = mpsc::channel::<Event>(256);
    let client = client.to_owned();
    let thread = std::thread::Builder::new()
        .name("rewind-service-link".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("could not start the service link's runtime: {e}");
                    return;
                }
            };
            let link = Link {
                client,
                socket,
                events: event_tx,
                waker,
                config: rewind_core::config::Config::default(),
            };
            runtime.block_on(link.run(command_rx));
        })?;
    Ok(EngineHandle::from_channels(command_tx, event_rx, thread))
}

/// The client's side of [`engine`].
struct Link {
    client: String,
    socket: PathBuf,
    events: mpsc::Sender<Event>,
    waker: Waker,
    /// The configuration as the service last said (for the drive scan's folders).
    config: rewind_core::config::Config,
}

/// Why one connection ended.
enum Ended {
    /// The handle was dropped: stop.
    Closed,
    /// The service went away: try again.
    Lost,
}

impl Link {
    async fn emit(&self, event: Event) -> bool {
        let sent = self.events.send(event).await.is_ok();
        if sent {
            (self.waker)();
        }
        sent
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut retry = RETRY_FIRST;
        // Starting at login is this user's, whatever the service says.
        self.emit(Event::Autostart {
            enabled: rewind_core::autostart::is_enabled(),
            changed: None,
        })
        .await;
        loop {
            let error = match connect_to(&self.socket, &self.client) {
                Ok(connection) => {
                    retry = RETRY_FIRST;
                    match self.serve(connection, &mut commands).await {
                        Ended::Closed => return,
                        Ended::Lost => JobError::new(
                            ErrorKind::Unavailable,
                            "the connection to Rewind's protection service was lost (it may \
                             be restarting)",
                        )
                        .retryable(),
                    }
                }
                Err(ConnectError::Refused(why)) => why,
                Err(e) => JobError::new(ErrorKind::Unavailable, e.to_string()).retryable(),
            };
            if !self
                .emit(Event::ConnectionFailed {
                    error,
                    retry_in: retry,
                })
                .await
            {
                return;
            }
            let wait = tokio::time::sleep(retry);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    command = commands.recv() => match command {
                        None => return,
                        Some(command) => {
                            if !self.answer_here(&command).await {
                                self.emit(Event::Failed {
                                    error: JobError::new(
                                        ErrorKind::Unavailable,
                                        "Rewind's protection service cannot be reached now, so \
                                         this was not done: try again once it is back",
                                    )
                                    .retryable(),
                                })
                                .await;
                            }
                        }
                    },
                }
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Answers a command this user's side answers, whether connected or not.
    async fn answer_here(&self, command: &Command) -> bool {
        let config = self.config.clone();
        let command = command.clone();
        let answer = tokio::task::spawn_blocking(move || {
            rewind_core::engine::answer_for_this_user(&command, &config)
        })
        .await
        .ok()
        .flatten();
        match answer {
            Some(event) => {
                self.emit(event).await;
                true
            }
            None => false,
        }
    }

    /// One connection, until the handle is dropped or the service goes away.
    async fn serve(
        &mut self,
        connection: Connection,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Ended {
        let Connection {
            mut stream,
            mut input,
            mut line,
            ..
        } = connection;
        let Ok(reader_stream) = stream.try_clone() else {
            return Ended::Lost;
        };
        let (incoming_tx, mut incoming) = mpsc::channel::<Event>(256);
        let reader = std::thread::Builder::new()
            .name("rewind-service-in".into())
            .spawn(move || {
                while let Ok(Some(message)) = wire::read::<FromService>(&mut input, &mut line) {
                    if let FromService::Event(event) = message
                        && incoming_tx.blocking_send(event).is_err()
                    {
                        return;
                    }
                }
            });
        let Ok(reader) = reader else {
            return Ended::Lost;
        };
        let ended = loop {
            tokio::select! {
                event = incoming.recv() => match event {
                    Some(event) => {
                        if let Event::Config { config, .. } = &event {
                            self.config = (**config).clone();
                        }
                        if !self.emit(event).await {
                            break Ended::Closed;
                        }
                    }
                    None => break Ended::Lost,
                },
                command = commands.recv() => match command {
                    None => break Ended::Closed,
                    Some(command) => {
                        if self.answer_here(&command).await {
                            continue;
                        }
                        if wire::write(&mut stream, &ToService::Command(command)).is_err() {
                            break Ended::Lost;
                        }
                    }
                },
            }
        };
        reader_stream.shutdown(std::net::Shutdown::Both).ok();
        drop(incoming);
        if tokio::task::spawn_blocking(move || reader.join())
            .await
            .map_or(true, |joined| joined.is_err())
        {
            tracing::error!("the service connection's reading thread panicked");
        }
        ended
    }
}
