//! A store on another host, over SFTP through the user's own `ssh`.
//!
//! The `openssh` crate starts the system `ssh` as a control master (so `~/.ssh/config`,
//! the agent, keys, `known_hosts` and `ProxyJump` all work as in a terminal), with
//! `StrictHostKeyChecking=yes` and `BatchMode=yes`: an unknown or changed host key and a
//! password prompt are refused, never answered. `openssh-sftp-client` speaks SFTP over that
//! connection; many requests are in flight at once, so the store's worker threads share
//! one session. Both are async: they run on a small tokio runtime owned by [`Remote`], and
//! each store operation waits for its future there.
//!
//! What the store needs from the server, checked when connecting (OpenSSH's sftp-server
//! has all of it; a server without is refused rather than risking damage):
//! - `posix-rename@openssh.com`: rename(2), atomic and replacing (plain SFTP rename is
//!   neither);
//! - `fsync@openssh.com`: a file's data on the drive before its manifest refers to it.
//!
//! Durability without `syncfs` or folder fsync (SFTP has neither): a chunk file is
//! written under `tmp/`, renamed into place and then fsynced through the still-open
//! handle, so both its data and (on journaling file systems, which commit a rename with
//! the next fsync of the file renamed) its name are durable before the call returns; a
//! manifest is fsynced before its rename and again after it. A connection that breaks at
//! any instant therefore leaves at most files under `tmp/` and chunks no manifest names.
//!
//! A broken connection fails the operation in progress with
//! [`StoreError::ConnectionLost`] (retryable); the next operation connects again.

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use openssh::{ControlPersist, KnownHosts, SessionBuilder};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::File;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use tokio::io::AsyncSeek;

use super::backend::{Entry, RemoteFailure, TooLarge};
use super::error::StoreError;
use super::location::SshLocation;

mod connect;
mod files;

use connect::open_sftp;

/// Environment variable naming an `ssh_config` file that Rewind's `ssh` reads instead of
/// `~/.ssh/config` (`ssh -F`): for tests and unusual setups (see
/// [`SshLocation::ssh_config`](super::SshLocation::ssh_config)).
pub const SSH_CONFIG_ENV: &str = "REWIND_SSH_CONFIG";

/// How long ssh may take to connect and log in.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Keep-alive probes: a host that answers none of three is taken as gone (45 s).
const ALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// The longest one operation may wait for the server before the connection counts as
/// broken (a hung server, a link that drops packets silently).
const OPERATION_TIMEOUT: Duration = Duration::from_mins(3);
/// How long closing a session may take when the store is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Removals in flight at once (garbage collection, clean-up).
const PARALLEL_REMOVALS: usize = 32;

/// One SFTP session and whether it broke.
struct Conn {
    sftp: Sftp,
    broken: AtomicBool,
}

/// A store's folder on another host. Shared by every thread of the store (and by its
/// lock's refresher); reconnects on demand after a broken connection.
pub(crate) struct Remote {
    location: SshLocation,
    display_root: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    conn: Mutex<Option<Arc<Conn>>>,
    /// Random, so that temporary names of processes on different hosts never collide.
    tag: String,
    counter: AtomicU64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("location", &self.location.to_string())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// A failed request: the server's answer, or something of ours.
enum OpError {
    Sftp(SftpError),
    Io(io::Error),
}

impl From<SftpError> for OpError {
    fn from(e: SftpError) -> Self {
        Self::Sftp(e)
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

type OpResult<T> = Result<T, OpError>;

/// Whether the server answered "failure" (SFTP v3 has no finer code: EEXIST, ENOSPC, …).
fn is_failure(e: &OpError) -> bool {
    matches!(
        e,
        OpError::Sftp(SftpError::SftpError(SftpErrorKind::Failure, _))
    )
}

fn is_not_found(e: &OpError) -> bool {
    matches!(
        e,
        OpError::Sftp(SftpError::SftpError(SftpErrorKind::NoSuchFile, _))
    )
}

impl Remote {
    /// Connects to the host of `location` (the folder itself is not checked here).
    pub(crate) fn connect(location: &SshLocation) -> Result<Arc<Self>, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rewind-sftp")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Ssh {
                location: location.to_string(),
                detail: format!("could not start the threads that run ssh: {e}"),
            })?;
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag).map_err(|e| StoreError::Random(e.to_string()))?;
        let remote = Self {
            location: location.clone(),
            display_root: PathBuf::from(location.to_string()),
            runtime: Some(runtime),
            conn: Mutex::new(None),
            tag: hex::encode(tag),
            counter: AtomicU64::new(0),
        };
        let conn = remote.open_connection()?;
        *remote.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
        Ok(Arc::new(remote))
    }

    /// `ssh://…` of the store's folder, for messages.
    pub(crate) fn display_root(&self) -> PathBuf {
        self.display_root.clone()
    }

    pub(crate) fn temp_name(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{}-{n}.tmp", std::process::id(), self.tag)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|c| !c.broken.load(Ordering::Relaxed))
    }

    fn path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.location.path.clone()
        } else {
            self.location.path.join(rel)
        }
    }

    /// Runs `future` on the runtime and waits for it, at most `timeout`.
    fn block<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
        timeout: Duration,
    ) -> Option<T> {
        let runtime = self.runtime.as_ref()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            // A receiver gone has stopped waiting; the result has nowhere to go.
            drop(tx.send(tokio::time::timeout(timeout, future).await.ok()));
        });
        rx.recv().ok().flatten()
    }

    fn open_connection(&self) -> Result<Arc<Conn>, StoreError> {
        let location = self.location.clone();
        match self.block(open_sftp(location), CONNECT_TIMEOUT * 3) {
            Some(Ok(sftp)) => Ok(Arc::new(Conn {
                sftp,
                broken: AtomicBool::new(false),
            })),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::Unreachable {
                location: self.location.to_string(),
                detail: format!(
                    "ssh did not connect within {} s",
                    (CONNECT_TIMEOUT * 3).as_secs()
                ),
            }),
        }
    }

    /// The current session, connecting (again) if there is none or it broke.
    fn connection(&self) -> io::Result<Arc<Conn>> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = slot.as_ref()
            && !conn.broken.load(Ordering::Relaxed)
        {
            return Ok(conn.clone());
        }
        if let Some(old) = slot.take() {
            self.close_later(old);
        }
        let conn = self
            .open_connection()
            .map_err(|e| RemoteFailure::Connect(e).into_io())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Closes a session in the background (a broken one ends by itself).
    fn close_later(&self, conn: Arc<Conn>) {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                if let Ok(conn) = Arc::try_unwrap(conn) {
                    // Closing politely; the connection ends with the session either way.
                    drop(tokio::time::timeout(CLOSE_TIMEOUT, conn.sftp.close()).await);
                }
            });
        }
    }

    /// An answer of the server as an `io::Error`; anything else marks the session broken.
    fn io_error(conn: &Conn, e: OpError) -> io::Error {
        let e = match e {
            OpError::Io(e) => return e,
            OpError::Sftp(e) => e,
        };
        let kind = match &e {
            SftpError::SftpError(code, _) => Some(match code {
                SftpErrorKind::NoSuchFile => io::ErrorKind::NotFound,
                SftpErrorKind::PermDenied => io::ErrorKind::PermissionDenied,
                SftpErrorKind::OpUnsupported => io::ErrorKind::Unsupported,
                SftpErrorKind::BadMessage => io::ErrorKind::InvalidInput,
                _ => io::ErrorKind::Other,
            }),
            SftpError::UnsupportedExtension(_) => Some(io::ErrorKind::Unsupported),
            _ => None,
        };
        if let Some(kind) = kind {
            let text = match &e {
                SftpError::SftpError(_, msg) => format!("the SFTP server says: {}", msg.get().0),
                other => other.to_string(),
            };
            io::Error::new(kind, text)
        } else {
            conn.broken.store(true, Ordering::Relaxed);
            RemoteFailure::Lost(format!("the SSH connection broke ({e})")).into_io()
        }
    }

    /// Runs one operation (`make` builds its future from the session).
    fn call<T, F, Fut>(&self, make: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = OpResult<T>> + Send + 'static,
    {
        let conn = self.connection()?;
        let future = make(conn.clone());
        match self.block(future, OPERATION_TIMEOUT) {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(Self::io_error(&conn, e)),
            None => {
                conn.broken.store(true, Ordering::Relaxed);
                Err(RemoteFailure::Lost(format!(
                    "the host did not answer for {} s",
                    OPERATION_TIMEOUT.as_secs()
                ))
                .into_io())
            }
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = conn
            && let Ok(conn) = Arc::try_unwrap(conn)
        {
            // End the SFTP server and the ssh master cleanly (dropping would also end the
            // master, from the session's destructor).
            let _ = self.block(
                async move {
                    drop(conn.sftp.close().await);
                },
                CLOSE_TIMEOUT,
            );
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
