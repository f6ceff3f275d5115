//! The file operations a store needs, on a local folder or over SFTP on another host.
//!
//! Everything inside the store goes through [`Backend`] with paths relative to the store's
//! folder. The local backend is exactly what the store always did (see `fsutil`): chunk
//! files are written without fsync and flushed together by `syncfs(2)` at commit. Over
//! SFTP there is neither `syncfs` nor fsync of a folder: each chunk file is renamed into
//! place (`posix-rename@openssh.com`: rename(2), atomic and replacing) and then fsynced
//! (`fsync@openssh.com`) through its still-open handle, so the commit has nothing left to
//! flush; see `sftp/`.
//!
//! Errors are `io::Error`s as from the local file system, so that every caller maps them
//! the same way ([`super::error::io_error`]). A broken connection is an `io::Error` that
//! wraps a [`RemoteFailure`]; `io_error` turns it into [`StoreError::ConnectionLost`] (or
//! the connection error), never into "missing" or "damaged".

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::error::{StoreError, io_error};
use super::local::{self, LocalRoot};
use super::sftp::Remote;

/// Where the store's files are.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// A folder on this machine, reached safely (see `local`).
    Local(LocalRoot),
    /// A folder on another host, over one shared SFTP session.
    Sftp(Arc<Remote>),
}

/// Why a remote operation failed without the server answering it.
#[derive(Debug)]
pub(crate) enum RemoteFailure {
    /// The connection broke (or the server stopped answering) during the operation.
    Lost(String),
    /// Connecting again failed.
    Connect(StoreError),
}

impl std::fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lost(detail) => f.write_str(detail),
            Self::Connect(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RemoteFailure {}

impl RemoteFailure {
    /// As an `io::Error`.
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, self)
    }
}

/// Whether `e` is a broken connection rather than an answer about the file.
pub(crate) fn is_remote_failure(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(<dyn std::error::Error + Send + Sync>::is::<RemoteFailure>)
}

/// One entry of a folder.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// File name.
    pub name: String,
    /// Length in bytes (0 when unknown).
    pub len: u64,
    /// Last modification, by the clock of the machine that holds the file.
    pub modified: Option<SystemTime>,
}

/// When a new file must be on the drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Before the call returns (fsync).
    Now,
    /// By the next [`Backend::sync_all`] (a commit).
    AtCommit,
}

/// A file that is larger than it may be.
#[derive(Debug)]
pub(crate) struct TooLarge {
    /// Its length.
    pub len: u64,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "it is {} bytes long", self.len)
    }
}

impl std::error::Error for TooLarge {}

impl Backend {
    /// A folder on this machine.
    pub(crate) fn local(path: &Path) -> Self {
        Self::Local(LocalRoot::new(path.to_path_buf()))
    }

    /// Whether the store is on this machine.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    /// The store's folder, for a local store.
    pub(crate) fn local_root(&self) -> Option<&LocalRoot> {
        match self {
            Self::Local(root) => Some(root),
            Self::Sftp(_) => None,
        }
    }

    /// How `rel` is named in messages: the local path, or `ssh://host/path/rel`.
    pub(crate) fn display(&self, rel: &Path) -> PathBuf {
        match self {
            Self::Local(root) => root.join(rel),
            Self::Sftp(remote) => {
                let root = remote.display_root();
                if rel.as_os_str().is_empty() {
                    root
                } else {
                    root.join(rel)
                }
            }
        }
    }

    /// A name for a temporary file unique to this process and call (and, on a remote store
    /// that several hosts may write, to this process among those of other hosts).
    pub(crate) fn temp_name(&self, prefix: &str) -> String {
        match self {
            Self::Local(_) => local::temp_name(prefix),
            Self::Sftp(remote) => remote.temp_name(prefix),
        }
    }

    /// Whether `rel` exists. Locally, a link, device or FIFO there is an error.
    pub(crate) fn exists(&self, rel: &Path) -> io::Result<bool> {
        match self {
            Self::Local(root) => root.exists(rel),
            Self::Sftp(remote) => remote.exists(rel),
        }
    }

    /// Whether `rel` is a folder.
    pub(crate) fn is_dir(&self, rel: &Path) -> io::Result<bool> {
        match self {
            Self::Local(root) => root.is_dir(rel),
            Self::Sftp(remote) => remote.is_dir(rel),
        }
    }

    /// The length of file `rel`.
    pub(crate) fn len(&self, rel: &Path) -> io::Result<u64> {
        match self {
            Self::Local(root) => root.open_read(rel)?.metadata().map(|m| m.len()),
            Self::Sftp(remote) => remote.len(rel),
        }
    }

    /// The whole of file `rel`. A file longer than `max_bytes` is an error that wraps
    /// [`TooLarge`].
    pub(crate) fn read(&self, rel: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
        match self {
            Self::Local(root) => root.read(rel, max_bytes),
            Self::Sftp(remote) => remote.read(rel, max_bytes),
        }
    }

    /// Reads a whole file, refusing files larger than `max_bytes` (a damaged or hostile
    /// store must not make Rewind allocate without bound).
    pub(crate) fn read_bounded(
        &self,
        rel: &Path,
        max_bytes: u64,
        store: &Path,
    ) -> Result<Vec<u8>, StoreError> {
        match self.read(rel, max_bytes) {
            Ok(bytes) => Ok(bytes),
            Err(e)
                if e.get_ref()
                    .is_some_and(<dyn std::error::Error + Send + Sync>::is::<TooLarge>) =>
            {
                Err(StoreError::Damaged {
                    path: self.display(rel),
                    detail: format!("{e}, more than the {max_bytes} such a file can be"),
                    store: store.to_path_buf(),
                })
            }
            Err(e) => Err(io_error("read", self.display(rel), e)),
        }
    }

    /// The first `n` bytes of `rel` (fewer if it is shorter) and its length.
    pub(crate) fn read_prefix(&self, rel: &Path, n: usize) -> io::Result<(Vec<u8>, u64)> {
        match self {
            Self::Local(root) => root.read_prefix(rel, n),
            Self::Sftp(remote) => remote.read_prefix(rel, n),
        }
    }

    /// Creates `rel` (which must not exist) with `bytes`.
    pub(crate) fn write_new(
        &self,
        rel: &Path,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => root.write_new(rel, bytes, durability == Durability::Now),
            // Nothing like syncfs over SFTP: every file is durable before it is renamed.
            Self::Sftp(remote) => remote.write_new(rel, bytes, durability == Durability::Now),
        }
        .map_err(|e| io_error("create", self.display(rel), e))
    }

    /// Writes `bytes` over the start of the existing file `rel` (never creating it): a lock
    /// file's refresh, which also tells whether someone removed it.
    pub(crate) fn rewrite_existing(&self, rel: &Path, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Local(root) => root.open_write(rel)?.write_all(bytes),
            Self::Sftp(remote) => remote.rewrite_existing(rel, bytes),
        }
    }

    /// Renames `from` to `to`, replacing `to` atomically if it exists.
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self {
            Self::Local(root) => root.rename(from, to),
            Self::Sftp(remote) => remote.rename(from, to),
        }
    }

    /// Creates folder `rel`; an existing one is an `AlreadyExists` error.
    pub(crate) fn create_dir(&self, rel: &Path) -> io::Result<()> {
        match self {
            Self::Local(root) => root.create_dir(rel),
            Self::Sftp(remote) => remote.create_dir(rel),
        }
    }

    /// Removes file `rel` (locally, refusing anything but a file).
    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        match self {
            Self::Local(root) => root.remove_file(rel),
            Self::Sftp(remote) => remote.remove_file(rel),
        }
    }

    /// Removes each of `rels`, as many at once as the backend can; the result of each.
    pub(crate) fn remove_files(&self, rels: &[PathBuf]) -> Vec<io::Result<()>> {
        match self {
            Self::Local(_) => rels.iter().map(|rel| self.remove_file(rel)).collect(),
            Self::Sftp(remote) => remote.remove_files(rels),
        }
    }

    /// The entries of folder `rel`, sorted by name, without `.` and `..`; nothing when it
    /// does not exist. A link, device or FIFO in it is an error.
    pub(crate) fn list(&self, rel: &Path) -> Result<Vec<Entry>, StoreError> {
        match self {
            Self::Local(root) => root.list(rel, true),
            Self::Sftp(remote) => match remote.list(rel) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                other => other,
            },
        }
        .map_err(|e| io_error("list", self.display(rel), e))
    }

    /// The names in folder `rel`, sorted; nothing when it does not exist.
    pub(crate) fn list_names(&self, rel: &Path) -> Result<Vec<String>, StoreError> {
        match self {
            // Without the metadata the store never needed locally.
            Self::Local(root) => root
                .list(rel, false)
                .map_err(|e| io_error("list", self.display(rel), e)),
            Self::Sftp(_) => self.list(rel),
        }
        .map(|entries| entries.into_iter().map(|e| e.name).collect())
    }

    /// Makes folder `rel`'s entries (creations, renames, removals) durable.
    pub(crate) fn sync_dir(&self, rel: &Path) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => root
                .sync_dir(rel)
                .map_err(|e| io_error("flush to disk", self.display(rel), e)),
            // SFTP cannot fsync a folder. Creations and renames over SFTP are made durable
            // by the fsync of the file concerned (see `sftp/`); a removal becomes durable
            // with the server's next journal commit, in order with everything after it.
            Self::Sftp(_) => Ok(()),
        }
    }

    /// Makes everything written since the store was opened durable; fails if the drive
    /// reported a write error meanwhile.
    pub(crate) fn sync_all(&self) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => root
                .sync_all()
                .map_err(|e| io_error("flush to disk", root.path(), e)),
            // Every chunk was fsynced as it was stored.
            Self::Sftp(_) => Ok(()),
        }
    }

    /// Writes `bytes` to `dest` atomically and durably: temp file in `tmp_dir`, fsync,
    /// rename, fsync of `dest`'s folder.
    pub(crate) fn write_atomic(
        &self,
        tmp_dir: &Path,
        dest: &Path,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => root.write_atomic(tmp_dir, dest, bytes),
            // fsynced before the rename, and again after it (which makes the rename durable).
            Self::Sftp(remote) => {
                remote.put_file(&tmp_dir.join(self.temp_name("atomic")), dest, bytes, true)
            }
        }
        .map_err(|e| io_error("write", self.display(dest), e))
    }

    /// Creates folder `rel` (and missing parents) and makes its creation durable.
    pub(crate) fn create_dir_durable(&self, rel: &Path) -> Result<(), StoreError> {
        match self {
            Self::Local(root) => root.create_dir_durable(rel),
            Self::Sftp(remote) => remote.create_dir_durable(rel),
        }
        .map_err(|e| io_error("create the folder", self.display(rel), e))
    }

    /// Asks for file `rel` to be read ahead (a hint; only a local store takes it). Whether
    /// the file is there to be read ahead.
    pub(crate) fn prefetch(&self, rel: &Path) -> bool {
        if let Self::Local(root) = self
            && let Ok(file) = root.open_read(rel)
        {
            // Only a hint.
            if let Err(e) = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed) {
                tracing::debug!("fadvise(WILLNEED) on {}: {e}", rel.display());
            }
            return true;
        }
        false
    }

    /// Whether the backend can still talk to the store without connecting again (always,
    /// locally).
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Self::Local(_) => true,
            Self::Sftp(remote) => remote.is_connected(),
        }
    }
}
