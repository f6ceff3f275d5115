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

/// Folder for the ssh control sockets: the user's runtime folder, else the temp folder.
fn control_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// ssh's message in one line, without its banners.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@') && !l.starts_with("Warning: Permanently"))
        .collect();
    let joined = lines.join("; ");
    if joined.is_empty() {
        "ssh gave no reason".into()
    } else {
        joined
    }
}

/// Turns a failed `ssh` start into the error that says what to do.
fn connect_error(location: &SshLocation, e: &openssh::Error) -> StoreError {
    let place = location.to_string();
    let (kind, text) = match e {
        openssh::Error::Connect(io) => (io.kind(), io.to_string()),
        other => (io::ErrorKind::Other, format!("{other}")),
    };
    if kind == io::ErrorKind::NotFound && !text.contains(' ') {
        return StoreError::Ssh {
            location: place,
            detail: format!(
                "the `ssh` program could not be run ({text}); install OpenSSH's client \
                 (package openssh-client)"
            ),
        };
    }
    let lower = text.to_lowercase();
    if lower.contains("host key verification failed")
        || lower.contains("host identification has changed")
        || lower.contains("host key is known")
        || lower.contains("host key for")
    {
        let detail = if lower.contains("changed") {
            "its key has changed since it was accepted".to_owned()
        } else {
            "its key is not in known_hosts".to_owned()
        };
        return StoreError::HostKey {
            location: place,
            host: location.host.clone(),
            detail,
            accept: location.ssh_command(),
        };
    }
    if kind == io::ErrorKind::PermissionDenied || lower.contains("permission denied") {
        return StoreError::Login {
            location: place,
            host: location.host.clone(),
            detail: one_line(&text),
            command: location.ssh_command(),
        };
    }
    let network = [
        "connection refused",
        "timed out",
        "no route to host",
        "network is unreachable",
        "could not resolve",
        "connection closed",
        "connection reset",
        "kex_exchange_identification",
        "banner exchange",
        "broken pipe",
    ];
    if matches!(
        kind,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
    ) || network.iter().any(|n| lower.contains(n))
    {
        return StoreError::Unreachable {
            location: place,
            detail: one_line(&text),
        };
    }
    StoreError::Ssh {
        location: place,
        detail: one_line(&text),
    }
}

/// Connects, starts SFTP and checks the extensions the store needs.
async fn open_sftp(location: SshLocation) -> Result<Sftp, StoreError> {
    let mut builder = SessionBuilder::default();
    builder
        .known_hosts_check(KnownHosts::Strict)
        .connect_timeout(CONNECT_TIMEOUT)
        .server_alive_interval(ALIVE_INTERVAL)
        // The master ends by itself a minute after its last session, also when Rewind was
        // killed and could not close it.
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(60).expect("not zero"),
        ))
        .control_directory(control_dir());
    if let Some(user) = &location.user {
        builder.user(user.clone());
    }
    if let Some(port) = location.port {
        builder.port(port);
    }
    if let Some(config) = &location.ssh_config {
        builder.config_file(config);
    }
    let session = builder
        .connect_mux(&location.host)
        .await
        .map_err(|e| connect_error(&location, &e))?;
    let options = SftpOptions::new()
        // Send each request as soon as it is made: latency matters more here than
        // batching, and the store keeps several requests in flight anyway.
        .flush_interval(Duration::ZERO);
    let sftp = Sftp::from_session(session, options)
        .await
        .map_err(|e| StoreError::Ssh {
            location: location.to_string(),
            detail: format!(
                "the host's SFTP server did not start ({e}); check that sshd has an sftp \
                 Subsystem"
            ),
        })?;
    let mut missing = Vec::new();
    if !sftp.support_posix_rename() {
        missing.push("posix-rename@openssh.com (atomic renames)");
    }
    if !sftp.support_fsync() {
        missing.push("fsync@openssh.com (durable writes)");
    }
    if !missing.is_empty() {
        // The missing features are the error to report.
        drop(sftp.close().await);
        return Err(StoreError::ServerUnsupported {
            location: location.to_string(),
            missing: missing.join(" and "),
        });
    }
    Ok(sftp)
}

/// Reads `n` bytes at `offset` of `file` (fewer at the end of the file).
async fn read_at(file: &File, offset: u64, n: usize) -> OpResult<BytesMut> {
    let mut file = file.clone();
    Pin::new(&mut file).start_seek(io::SeekFrom::Start(offset))?;
    let mut out = BytesMut::with_capacity(n);
    while out.len() < n {
        let want = u32::try_from(n - out.len()).unwrap_or(u32::MAX);
        let at = out.len();
        match file.read(want, out.split_off(at)).await? {
            Some(piece) if !piece.is_empty() => out.unsplit(piece),
            _ => break,
        }
    }
    Ok(out)
}

/// Writes all of `bytes` at offset 0 of `file`, in pieces of the server's largest write,
/// all in flight at once.
async fn write_all_at_once(file: &mut File, bytes: Bytes) -> OpResult<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    Pin::new(&mut *file).start_seek(io::SeekFrom::Start(0))?;
    // The first write says how much one request may carry.
    let first = file.write(&bytes).await?;
    if first == 0 || first >= bytes.len() {
        return Ok(());
    }
    let mut writes = tokio::task::JoinSet::new();
    let mut offset = first;
    while offset < bytes.len() {
        let end = (offset + first).min(bytes.len());
        let piece = bytes.slice(offset..end);
        let mut clone = file.clone();
        writes.spawn(async move {
            Pin::new(&mut clone).start_seek(io::SeekFrom::Start(offset as u64))?;
            clone.write_all(&piece).await?;
            Ok::<(), OpError>(())
        });
        offset = end;
    }
    let mut outcome = Ok(());
    while let Some(done) = writes.join_next().await {
        let result = done
            .map_err(|e| OpError::Io(io::Error::other(e)))
            .and_then(|r| r);
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
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

    pub(crate) fn exists(&self, rel: &Path) -> io::Result<bool> {
        let path = self.path(rel);
        self.call(|c| async move {
            match c.sftp.fs().metadata(&path).await {
                Ok(_) => Ok(true),
                Err(SftpError::SftpError(_, _)) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    pub(crate) fn is_dir(&self, rel: &Path) -> io::Result<bool> {
        let path = self.path(rel);
        self.call(|c| async move {
            match c.sftp.fs().metadata(&path).await {
                Ok(meta) => Ok(meta.file_type().is_some_and(|t| t.is_dir())),
                Err(SftpError::SftpError(_, _)) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    pub(crate) fn len(&self, rel: &Path) -> io::Result<u64> {
        let path = self.path(rel);
        self.call(|c| async move {
            let meta = c.sftp.fs().metadata(&path).await?;
            Ok(meta.len().unwrap_or(0))
        })
    }

    /// The whole file; longer than `max_bytes` is an error wrapping [`TooLarge`]. Large
    /// files are read in pieces, all in flight at once.
    pub(crate) fn read(&self, rel: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut file = c.sftp.open(&path).await?;
            let len = file.metadata().await?.len().unwrap_or(0);
            if len > max_bytes {
                return Err(io::Error::other(TooLarge { len }).into());
            }
            let len = usize::try_from(len).map_err(io::Error::other)?;
            // The first read says how much one request may carry; the rest are then all
            // in flight at once.
            let mut out = match file
                .read(
                    u32::try_from(len.max(1)).unwrap_or(u32::MAX),
                    BytesMut::with_capacity(len.max(1)),
                )
                .await?
            {
                Some(bytes) => bytes,
                None => BytesMut::new(),
            };
            let piece = out.len();
            if piece > 0 && piece < len {
                let mut reads = tokio::task::JoinSet::new();
                let mut offset = piece;
                let mut n = 0usize;
                while offset < len {
                    let size = piece.min(len - offset);
                    let file = file.clone();
                    reads.spawn(async move { (n, read_at(&file, offset as u64, size).await) });
                    offset += size;
                    n += 1;
                }
                let mut pieces: Vec<Option<BytesMut>> = vec![None; n];
                while let Some(done) = reads.join_next().await {
                    let (i, bytes) = done.map_err(io::Error::other)?;
                    pieces[i] = Some(bytes?);
                }
                for bytes in pieces.into_iter().flatten() {
                    let short = bytes.len() < piece;
                    out.extend_from_slice(&bytes);
                    if short {
                        break; // the file got shorter while being read
                    }
                }
            }
            // Anything past the length it had (it grew meanwhile) is not read: a store's
            // files do not change once written.
            drop(file);
            Ok(out.to_vec())
        })
    }

    /// The first `n` bytes and the file's length.
    pub(crate) fn read_prefix(&self, rel: &Path, n: usize) -> io::Result<(Vec<u8>, u64)> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut file = c.sftp.open(&path).await?;
            let reader = file.clone();
            let (meta, prefix) = tokio::join!(file.metadata(), read_at(&reader, 0, n));
            Ok((prefix?.to_vec(), meta?.len().unwrap_or(0)))
        })
    }

    /// Creates `rel` exclusively with `bytes`, fsynced if `durable`.
    pub(crate) fn write_new(&self, rel: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let path = self.path(rel);
        let bytes = Bytes::copy_from_slice(bytes);
        let root = self.location.path.clone();
        self.call(|c| async move {
            let result = async {
                let mut file = create_new(&c.sftp, &path).await?;
                write_all_at_once(&mut file, bytes.clone()).await?;
                if durable {
                    file.sync_all().await?;
                }
                Ok(())
            }
            .await;
            explain_failure(&c.sftp, &root, result, bytes.len()).await
        })
    }

    /// Writes `bytes` to `tmp`, renames it to `dest` (creating `dest`'s folder if it is
    /// missing), then fsyncs it under its new name: both content and name are durable when
    /// this returns. With `durable_before`, also fsyncs before the rename (so that `dest`
    /// never names an incomplete file, even after a power loss). `tmp` is removed if the
    /// rename fails.
    pub(crate) fn put_file(
        &self,
        tmp: &Path,
        dest: &Path,
        bytes: &[u8],
        durable_before: bool,
    ) -> io::Result<()> {
        let (tmp, dest) = (self.path(tmp), self.path(dest));
        let bytes = Bytes::copy_from_slice(bytes);
        let root = self.location.path.clone();
        self.call(|c| async move {
            let result = async {
                let mut file = create_new(&c.sftp, &tmp).await?;
                write_all_at_once(&mut file, bytes.clone()).await?;
                if durable_before {
                    file.sync_all().await?;
                }
                let mut fs = c.sftp.fs();
                let renamed = match fs.rename(&tmp, &dest).await.map_err(OpError::from) {
                    Err(e) if is_not_found(&e) => {
                        let dir = dest.parent().unwrap_or(Path::new("/"));
                        match fs.create_dir(dir).await.map_err(OpError::from) {
                            Ok(()) => {}
                            Err(e) if is_failure(&e) => {} // there already (made by another writer)
                            Err(e) => return Err(e),
                        }
                        fs.rename(&tmp, &dest).await.map_err(OpError::from)
                    }
                    other => other,
                };
                if let Err(e) = renamed {
                    drop(file);
                    if let Err(gone) = fs.remove_file(&tmp).await {
                        tracing::warn!("could not remove {}: {gone}", tmp.display());
                    }
                    return Err(e);
                }
                file.sync_all().await?;
                Ok(())
            }
            .await;
            explain_failure(&c.sftp, &root, result, bytes.len()).await
        })
    }

    /// Writes `bytes` over the start of existing file `rel` (never creating it).
    pub(crate) fn rewrite_existing(&self, rel: &Path, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(rel);
        let bytes = Bytes::copy_from_slice(bytes);
        self.call(|c| async move {
            let mut file = c.sftp.options().write(true).open(&path).await?;
            file.write_all(&bytes).await?;
            drop(file);
            Ok(())
        })
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        self.call(|c| async move { Ok(c.sftp.fs().rename(&from, &to).await?) })
    }

    /// Creates a folder; one that exists is `AlreadyExists`.
    pub(crate) fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut fs = c.sftp.fs();
            match fs.create_dir(&path).await.map_err(OpError::from) {
                Err(e) if is_failure(&e) && fs.metadata(&path).await.is_ok() => {
                    Err(io::Error::new(io::ErrorKind::AlreadyExists, "the folder exists").into())
                }
                other => other,
            }
        })
    }

    /// Creates `rel` and every missing folder above it (also above the store's folder).
    pub(crate) fn create_dir_durable(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move {
            let mut fs = c.sftp.fs();
            let mut missing = Vec::new();
            let mut at = path.as_path();
            loop {
                match fs.metadata(at).await {
                    Ok(meta) if meta.file_type().is_some_and(|t| t.is_dir()) => break,
                    Ok(_) => {
                        return Err(io::Error::other(format!(
                            "{} exists and is not a folder",
                            at.display()
                        ))
                        .into());
                    }
                    Err(SftpError::SftpError(SftpErrorKind::NoSuchFile, _)) => {
                        missing.push(at.to_path_buf());
                    }
                    Err(e) => return Err(e.into()),
                }
                match at.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                    _ => break,
                }
            }
            // A folder's creation is made durable by the next fsync on that file system
            // (SFTP cannot fsync a folder): the store's files are all fsynced.
            for dir in missing.iter().rev() {
                match fs.create_dir(dir).await.map_err(OpError::from) {
                    Err(e) if is_failure(&e) && fs.metadata(dir).await.is_ok() => {}
                    other => other?,
                }
            }
            Ok(())
        })
    }

    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let path = self.path(rel);
        self.call(|c| async move { Ok(c.sftp.fs().remove_file(&path).await?) })
    }

    /// Removes files, many at once; the result of each.
    pub(crate) fn remove_files(&self, rels: &[PathBuf]) -> Vec<io::Result<()>> {
        let mut out = Vec::with_capacity(rels.len());
        for batch in rels.chunks(PARALLEL_REMOVALS * 4) {
            let paths: Vec<PathBuf> = batch.iter().map(|r| self.path(r)).collect();
            let conn = match self.connection() {
                Ok(conn) => conn,
                Err(e) => {
                    let detail = e.to_string();
                    out.extend(
                        batch
                            .iter()
                            .map(|_| Err(RemoteFailure::Lost(detail.clone()).into_io())),
                    );
                    continue;
                }
            };
            let sftp_conn = conn.clone();
            let results = self.block(
                async move {
                    let mut results: Vec<Option<Result<(), SftpError>>> =
                        (0..paths.len()).map(|_| None).collect();
                    let mut running = tokio::task::JoinSet::new();
                    for (i, path) in paths.into_iter().enumerate() {
                        if running.len() >= PARALLEL_REMOVALS
                            && let Some(Ok((j, r))) = running.join_next().await
                        {
                            results[j] = Some(r);
                        }
                        let fs = sftp_conn.sftp.fs();
                        running.spawn(async move {
                            let mut fs = fs;
                            (i, fs.remove_file(&path).await)
                        });
                    }
                    while let Some(done) = running.join_next().await {
                        if let Ok((j, r)) = done {
                            results[j] = Some(r);
                        }
                    }
                    results
                },
                OPERATION_TIMEOUT,
            );
            if let Some(results) = results {
                out.extend(results.into_iter().map(|r| match r {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(Self::io_error(&conn, OpError::Sftp(e))),
                    None => Err(io::Error::other("the removal did not finish")),
                }));
            } else {
                conn.broken.store(true, Ordering::Relaxed);
                out.extend(
                    batch.iter().map(|_| {
                        Err(RemoteFailure::Lost("the host did not answer".into()).into_io())
                    }),
                );
            }
        }
        out
    }

    /// The entries of a folder, sorted by name.
    pub(crate) fn list(&self, rel: &Path) -> io::Result<Vec<Entry>> {
        let path = self.path(rel);
        self.call(|c| async move {
            let dir = c.sftp.fs().open_dir(&path).await?;
            let mut entries = std::pin::pin!(dir.read_dir());
            let mut out = Vec::new();
            while let Some(entry) =
                std::future::poll_fn(|cx| futures_core::Stream::poll_next(entries.as_mut(), cx))
                    .await
            {
                let entry = entry?;
                let name = entry.filename().to_string_lossy().into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                let meta = entry.metadata();
                out.push(Entry {
                    name,
                    len: meta.len().unwrap_or(0),
                    modified: meta
                        .modified()
                        .map(|t| SystemTime::UNIX_EPOCH + t.as_duration()),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }
}

/// Opens `path` for writing, creating it; a file already there is `AlreadyExists`.
async fn create_new(sftp: &Sftp, path: &Path) -> OpResult<File> {
    match sftp
        .options()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(OpError::from)
    {
        Err(e) if is_failure(&e) && sftp.fs().metadata(path).await.is_ok() => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, "the file exists").into())
        }
        other => other,
    }
}

/// SFTP v3 reports a full drive as a bare "failure": ask the server for the free space,
/// and say "no space left" when that is why.
async fn explain_failure(
    sftp: &Sftp,
    root: &Path,
    result: OpResult<()>,
    len: usize,
) -> OpResult<()> {
    match result {
        Err(e) if is_failure(&e) && sftp.support_statvfs() => {
            let full = sftp.fs().statvfs(root).await.is_ok_and(|s| {
                s.bavail.saturating_mul(s.frsize) < (len as u64).saturating_add(1 << 20)
            });
            if full {
                Err(io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()).into())
            } else {
                Err(e)
            }
        }
        other => other,
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
