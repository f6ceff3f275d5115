//! A store's folder on this machine, opened so that nothing in it leads out of it.
//!
//! A store on a drive is input that anyone may have written, and Rewind reads it as root.
//! So every file and folder of a store is reached from one descriptor of the store's folder
//! with `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV`: a symbolic link anywhere on the way, a `..`, or a mount point inside the
//! store fails the call instead of being followed. Only regular files and folders are used:
//!
//! - a file is first opened with `O_PATH` (which opens nothing) and looked at; a device, a
//!   FIFO or a socket is refused before it is opened for real (opening a device can have
//!   effects, and a FIFO would block);
//! - a listing refuses a folder that holds anything but files and folders;
//! - removing or renaming never goes through a link: the last step is `unlinkat(2)` or
//!   `renameat(2)` in the folder reached safely, and a removal refuses anything but a file.
//!
//! Everything Rewind creates is `0600` (files) or `0700` (folders), whatever the umask.
//!
//! The store's own folder is opened once, by the path the user configured (which is
//! trusted), and kept: an error the drive reports while writing back is then seen by the
//! `syncfs(2)` on that descriptor at commit (an error that happened before a descriptor was
//! opened is not reported through it).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use super::backend::Entry;

/// Mode of every file Rewind creates in a store.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of every folder Rewind creates in a store.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Why something in a store was refused rather than used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A symbolic link on the way (or a `..` that would leave the store).
    Link,
    /// A mount point inside the store.
    MountPoint,
    /// Not a regular file or folder: a device, FIFO or socket (or a link, in a listing).
    Special(&'static str),
    /// A path that is not a plain relative path (`..`, absolute, empty).
    BadPath(String),
    /// The kernel has no `openat2(2)` (Linux before 5.6, or a sandbox that forbids it).
    NoOpenat2,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Link => f.write_str("it is, or is reached through, a symbolic link"),
            Self::MountPoint => f.write_str("it is reached through a mount point inside the store"),
            Self::Special(kind) => write!(f, "it is a {kind}, not a file or folder"),
            Self::BadPath(path) => write!(f, "{path:?} is not a path inside the store"),
            Self::NoOpenat2 => f.write_str(
                "this kernel cannot open files confined to a folder (openat2, Linux 5.6 or \
                 newer), which Rewind needs to read a store safely",
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, self)
    }

    /// The refusal inside `e`, if `e` is one.
    pub(crate) fn of(e: &io::Error) -> Option<&Self> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<Self>())
    }
}

/// A name for a temporary file unique to this process and call.
pub(crate) fn temp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}.tmp", std::process::id())
}

/// A store's folder on this machine.
#[derive(Clone)]
pub(crate) struct LocalRoot {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The folder, once it could be opened (`init` creates it first).
    fd: Mutex<Option<Arc<OwnedFd>>>,
}

impl std::fmt::Debug for LocalRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LocalRoot").field(&self.inner.path).finish()
    }
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Socket => "socket",
        FileType::RegularFile => "file",
        FileType::Directory => "folder",
        FileType::Unknown => "file of unknown type",
    }
}

fn errno(e: rustix::io::Errno) -> io::Error {
    match e {
        rustix::io::Errno::LOOP => Refusal::Link.into_io(),
        rustix::io::Errno::XDEV => Refusal::MountPoint.into_io(),
        rustix::io::Errno::NOSYS => Refusal::NoOpenat2.into_io(),
        other => other.into(),
    }
}

/// Checks that `rel` names something inside the store: plain names only.
fn check(rel: &Path) -> io::Result<()> {
    if rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        Ok(())
    } else {
        Err(Refusal::BadPath(rel.display().to_string()).into_io())
    }
}

/// `rel`'s folder and name; `None` for the store's folder itself.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    check(rel)?;
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(Refusal::BadPath(rel.display().to_string()).into_io()),
    }
}

fn stat_kind(stat: &rustix::fs::Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

fn modified(stat: &rustix::fs::Stat) -> Option<SystemTime> {
    let secs = u64::try_from(stat.st_mtime).ok()?;
    let nanos = u32::try_from(stat.st_mtime_nsec).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Refuses anything but a regular file.
fn only_file(stat: &rustix::fs::Stat) -> io::Result<()> {
    match stat_kind(stat) {
        FileType::RegularFile => Ok(()),
        FileType::Directory => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "it is a folder, not a file",
        )),
        other => Err(Refusal::Special(kind_name(other)).into_io()),
    }
}

impl LocalRoot {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                fd: Mutex::new(None),
            }),
        }
    }

    /// The store's folder.
    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `rel` as a path on this machine (for messages).
    pub(crate) fn join(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.inner.path.clone()
        } else {
            self.inner.path.join(rel)
        }
    }

    /// The store's folder, opened.
    fn root(&self) -> io::Result<Arc<OwnedFd>> {
        let mut fd = self.inner.fd.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fd) = &*fd {
            return Ok(Arc::clone(fd));
        }
        let opened = Arc::new(rustix::fs::open(
            &self.inner.path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        *fd = Some(Arc::clone(&opened));
        Ok(opened)
    }

    /// Opens `rel` beneath the store's folder, following no link.
    fn open_beneath(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        check(rel)?;
        let root = self.root()?;
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        // openat2 takes nothing but these beside O_PATH.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC | OFlags::NOFOLLOW
        } else {
            OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY
        };
        rustix::fs::openat2(
            root.as_fd(),
            rel,
            flags | extra,
            Mode::from_raw_mode(mode),
            ResolveFlags::BENEATH
                | ResolveFlags::NO_SYMLINKS
                | ResolveFlags::NO_MAGICLINKS
                | ResolveFlags::NO_XDEV,
        )
        .map_err(|e| {
            // A folder asked for and something else found: say what it is.
            if e == rustix::io::Errno::NOTDIR
                && flags.contains(OFlags::DIRECTORY)
                && let Ok(found) = self.open_beneath(rel, OFlags::PATH, 0)
                && let Ok(stat) = rustix::fs::fstat(&found)
                && !matches!(
                    stat_kind(&stat),
                    FileType::RegularFile | FileType::Directory
                )
            {
                return Refusal::Special(kind_name(stat_kind(&stat))).into_io();
            }
            errno(e)
        })
    }

    /// What `rel` is, without opening it (`None` when it does not exist).
    pub(crate) fn stat(&self, rel: &Path) -> io::Result<Option<rustix::fs::Stat>> {
        match self.open_beneath(rel, OFlags::PATH, 0) {
            Ok(fd) => Ok(Some(rustix::fs::fstat(&fd)?)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What `rel` is: a file, a folder or nothing; anything else is refused.
    fn kind(&self, rel: &Path) -> io::Result<Option<FileType>> {
        match self.stat(rel)? {
            None => Ok(None),
            Some(stat) => match stat_kind(&stat) {
                kind @ (FileType::RegularFile | FileType::Directory) => Ok(Some(kind)),
                other => Err(Refusal::Special(kind_name(other)).into_io()),
            },
        }
    }

    /// Whether `rel` exists (as a file or folder; anything else is refused).
    pub(crate) fn exists(&self, rel: &Path) -> io::Result<bool> {
        Ok(self.kind(rel)?.is_some())
    }

    /// Whether `rel` is a folder (a link or device there is refused).
    pub(crate) fn is_dir(&self, rel: &Path) -> io::Result<bool> {
        Ok(self.kind(rel)? == Some(FileType::Directory))
    }

    /// Opens regular file `rel` with `flags` (`RDONLY` or `WRONLY`), refusing anything else
    /// before opening it for real.
    fn open_file(&self, rel: &Path, flags: OFlags) -> io::Result<File> {
        let probe = self.open_beneath(rel, OFlags::PATH, 0)?;
        let before = rustix::fs::fstat(&probe)?;
        only_file(&before)?;
        let fd = self.open_beneath(rel, flags | OFlags::NONBLOCK, 0)?;
        let after = rustix::fs::fstat(&fd)?;
        only_file(&after)?;
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) {
            return Err(io::Error::other(
                "the file was replaced while it was opened",
            ));
        }
        // Regular files ignore O_NONBLOCK; clear it anyway, for what reads it next.
        rustix::fs::fcntl_setfl(&fd, rustix::fs::fcntl_getfl(&fd)? - OFlags::NONBLOCK)?;
        Ok(File::from(fd))
    }

    /// Opens file `rel` for reading.
    pub(crate) fn open_read(&self, rel: &Path) -> io::Result<File> {
        self.open_file(rel, OFlags::RDONLY)
    }

    /// Opens existing file `rel` for writing (never creating it).
    pub(crate) fn open_write(&self, rel: &Path) -> io::Result<File> {
        self.open_file(rel, OFlags::WRONLY)
    }

    /// Opens file `rel` for writing, creating it (`0600`) if it does not exist.
    pub(crate) fn open_or_create(&self, rel: &Path) -> io::Result<File> {
        match self.create_new(rel) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self.open_write(rel),
            other => other,
        }
    }

    /// Creates file `rel` (`0600`), which must not exist.
    pub(crate) fn create_new(&self, rel: &Path) -> io::Result<File> {
        split(rel)?;
        let fd = self.open_beneath(
            rel,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            FILE_MODE,
        )?;
        Ok(File::from(fd))
    }

    /// The whole of file `rel`, refusing one longer than `max_bytes`.
    pub(crate) fn read(&self, rel: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
        let file = self.open_read(rel)?;
        let len = file.metadata()?.len();
        if len > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                super::backend::TooLarge { len },
            ));
        }
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        // A file that grows meanwhile is read only as far as it may be long.
        file.take(max_bytes + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                super::backend::TooLarge {
                    len: out.len() as u64,
                },
            ));
        }
        Ok(out)
    }

    /// The first `n` bytes of `rel` (fewer if it is shorter) and its length.
    pub(crate) fn read_prefix(&self, rel: &Path, n: usize) -> io::Result<(Vec<u8>, u64)> {
        let file = self.open_read(rel)?;
        let len = file.metadata()?.len();
        let mut prefix = Vec::with_capacity(n);
        file.take(n as u64).read_to_end(&mut prefix)?;
        Ok((prefix, len))
    }

    /// Creates `rel` (which must not exist) with `bytes`; with `durable`, fsyncs it.
    pub(crate) fn write_new(&self, rel: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let mut file = self.create_new(rel)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        Ok(())
    }

    /// Renames `from` to `to` (both inside the store), replacing `to` if it exists.
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let from_fd = self.open_beneath(from_dir, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        let to_fd = self.open_beneath(to_dir, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        // What is renamed must be a file or folder (a link would be moved, not followed,
        // but a store has no business holding one).
        let what = rustix::fs::statat(&from_fd, from_name, AtFlags::SYMLINK_NOFOLLOW)?;
        if !matches!(
            stat_kind(&what),
            FileType::RegularFile | FileType::Directory
        ) {
            return Err(Refusal::Special(kind_name(stat_kind(&what))).into_io());
        }
        rustix::fs::renameat(&from_fd, from_name, &to_fd, to_name).map_err(errno)
    }

    /// Creates folder `rel` (`0700`); an existing one is an `AlreadyExists` error.
    pub(crate) fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = split(rel)?;
        let dir_fd = self.open_beneath(dir, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        rustix::fs::mkdirat(&dir_fd, name, Mode::from_raw_mode(DIR_MODE)).map_err(errno)
    }

    /// Removes file `rel`; anything but a regular file is refused, not removed.
    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = split(rel)?;
        let dir_fd = self.open_beneath(dir, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        let what = rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)?;
        only_file(&what)?;
        rustix::fs::unlinkat(&dir_fd, name, AtFlags::empty()).map_err(errno)
    }

    /// The entries of folder `rel`, sorted by name, without `.` and `..`; nothing when it
    /// does not exist. Anything but files and folders in it is refused (with its name).
    /// Lengths and times only `with_metadata`.
    pub(crate) fn list(&self, rel: &Path, with_metadata: bool) -> io::Result<Vec<Entry>> {
        let dir_fd = match self.open_beneath(rel, OFlags::RDONLY | OFlags::DIRECTORY, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir_fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let mut kind = entry.file_type();
            let mut stat = None;
            if with_metadata || kind == FileType::Unknown {
                match rustix::fs::statat(&dir_fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(found) => {
                        kind = stat_kind(&found);
                        stat = Some(found);
                    }
                    // Removed since the folder was read (a lock released, a leftover
                    // cleaned by another process): not there any more.
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let name = OsStr::from_bytes(name);
            if !matches!(kind, FileType::RegularFile | FileType::Directory) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    Inside {
                        name: rel.join(name),
                        refusal: Refusal::Special(kind_name(kind)),
                    },
                ));
            }
            out.push(Entry {
                name: name.to_string_lossy().into_owned(),
                len: stat
                    .as_ref()
                    .map_or(0, |s| u64::try_from(s.st_size).unwrap_or(0)),
                modified: stat.as_ref().and_then(modified),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Makes folder `rel`'s entries durable.
    pub(crate) fn sync_dir(&self, rel: &Path) -> io::Result<()> {
        let fd = self.open_beneath(rel, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        rustix::fs::fsync(&fd).map_err(io::Error::from)
    }

    /// Flushes everything written to the store's file system (`syncfs(2)`), reporting any
    /// write-back error since the store's folder was opened.
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        rustix::fs::syncfs(self.root()?.as_fd()).map_err(io::Error::from)
    }

    /// Creates folder `rel` and missing parents (each `0700`), and makes each creation
    /// durable.
    pub(crate) fn create_dir_durable(&self, rel: &Path) -> io::Result<()> {
        check(rel)?;
        if rel.as_os_str().is_empty() {
            // The store's folder itself: by its trusted path.
            if self.inner.path.is_dir() {
                return Ok(());
            }
            // A relative path of one name ("backup") has the empty path as its parent: the
            // current folder.
            let parent = match self.inner.path.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                None => Path::new("/"),
            };
            std::fs::create_dir_all(parent)?;
            match std::fs::DirBuilder::new()
                .mode(DIR_MODE)
                .create(&self.inner.path)
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            }
            return File::open(parent).and_then(|d| d.sync_all());
        }
        if self.is_dir(rel)? {
            return Ok(());
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        self.create_dir_durable(parent)?;
        match self.create_dir(rel) {
            Ok(()) => self.sync_dir(parent),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes `bytes` to `dest` atomically and durably: a new file in `tmp_dir`, fsync,
    /// rename, fsync of `dest`'s folder.
    pub(crate) fn write_atomic(&self, tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = tmp_dir.join(temp_name("atomic"));
        self.write_new(&tmp, bytes, true)?;
        if let Err(e) = self.rename(&tmp, dest) {
            if let Err(gone) = self.remove_file(&tmp) {
                tracing::warn!("could not remove {}: {gone}", self.join(&tmp).display());
            }
            return Err(e);
        }
        self.sync_dir(dest.parent().unwrap_or(Path::new("")))
    }
}

use std::os::unix::fs::DirBuilderExt as _;

/// A refusal about an entry found in a listing.
#[derive(Debug)]
pub(crate) struct Inside {
    /// The entry, inside the store.
    pub name: PathBuf,
    /// What is wrong with it.
    pub refusal: Refusal,
}

impl std::fmt::Display for Inside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in the store: {}", self.name.display(), self.refusal)
    }
}

impl std::error::Error for Inside {}
