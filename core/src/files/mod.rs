//! What is inside a checkpoint's disk, read in place from the store (file-level restore):
//! its partition table and volumes, and the file system of each.
//!
//! Everything here reads through [`crate::store::random::ObjectCursor`] (or any
//! [`Read`] + [`Seek`]), so nothing is restored first, and nothing needs root, a kernel
//! mount or an NBD device. A disk is input that anyone may have written (a guest, a store on
//! a drive): every offset and count it holds is checked before it is used, and a damaged
//! table or file system is reported, never followed out of the disk.

pub mod browse;
pub mod changes;
pub mod exfat;
pub mod ext4;
pub mod fat;
pub mod ntfs;
pub(crate) mod restore;
pub mod staging;
#[cfg(test)]
mod tests;
pub mod volumes;

use std::io::{self, Read, Seek, SeekFrom, Write};

pub use volumes::{FileSystem, PartitionTable, Volume, volumes};

use crate::progress::{Cancelled, Control};

/// Why a disk's volumes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Reading the disk failed (the store: missing or damaged chunks, a pulled drive).
    #[error("could not read disk {disk}: {source}")]
    Read {
        /// The disk's target (`vda`).
        disk: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The store could not give the disk.
    #[error(transparent)]
    Store(Box<crate::store::StoreError>),
    /// A path's first part names no volume.
    #[error("this checkpoint has no volume named \"{name}\"; a path starts with a volume: {known}")]
    NoVolume {
        /// The name given.
        name: String,
        /// The volumes there are.
        known: String,
    },
    /// A label names several volumes.
    #[error("several volumes are named \"{name}\" ({volumes}); use one of those names instead")]
    Ambiguous {
        /// The label given.
        name: String,
        /// The volumes it names.
        volumes: String,
    },
    /// Something inside a volume could not be listed or read.
    #[error("{path}: {source}")]
    Tree {
        /// The path, volume first.
        path: String,
        /// What failed.
        #[source]
        source: TreeError,
    },
    /// A restore would write over something.
    #[error(
        "{} already exists; Rewind never writes over files: choose another folder, or move it \
         away first",
        path.display()
    )]
    Exists {
        /// What exists.
        path: std::path::PathBuf,
    },
    /// Writing a restored file or folder failed.
    #[error("could not write {}: {source}", path.display())]
    Output {
        /// What was being written.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The partition table is damaged or not one Rewind understands.
    #[error(
        "the partition table of disk {disk} is damaged ({detail}); its volumes cannot be listed, \
         but the whole VM or the disk can still be restored or exported"
    )]
    BadTable {
        /// The disk's target.
        disk: String,
        /// What is wrong.
        detail: String,
    },
}

/// A disk to look into: anything that reads at any offset.
pub trait Disk: Read + Seek {}

impl<T: Read + Seek> Disk for T {}

/// A moment in a file system's records, as seconds and nanoseconds since 1970-01-01 UTC
/// (negative before).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds within the second (below 1 000 000 000).
    pub nanos: u32,
}

/// What an entry of a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A folder (directory).
    Folder,
    /// A symbolic link (restored as a link, never followed).
    Symlink,
    /// Anything else: a device node, a socket, a FIFO, an NTFS reparse point Rewind does
    /// not follow. Listed, but not restored.
    Other,
}

/// A named data stream of a file besides its content (an NTFS alternate data stream).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stream {
    /// Its name (`Zone.Identifier`).
    pub name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
}

/// One entry of a folder in a checkpoint's file system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Its name in its folder.
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Its content's size in bytes (0 for a folder).
    pub size_bytes: u64,
    /// When its content last changed, by the file system's own records.
    pub modified: Option<Timestamp>,
    /// The file system's own number for it (inode, MFT record), where it has one: what
    /// tells a file that was replaced from one that was changed.
    pub id: Option<u64>,
    /// Its named data streams (NTFS alternate data streams), without the content itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<Stream>,
}

/// Why something inside a volume could not be listed or read.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Nothing is at that path.
    #[error("there is no {path} in this volume; list its folder to see what is there")]
    NotFound {
        /// The path, from the volume's root.
        path: String,
    },
    /// A folder was asked for, and the path names something else.
    #[error(
        "{path} is not a folder, so it has nothing to list: list the folder it is in, or \
         restore it with `rewind restore-files`"
    )]
    NotAFolder {
        /// The path, from the volume's root.
        path: String,
    },
    /// A file's content was asked for, and the path names something else.
    #[error(
        "{path} is not a file, so it has no content to read: list it if it is a folder, or \
         restore it whole with `rewind restore-files` (devices and other special files are \
         not restored)"
    )]
    NotAFile {
        /// The path, from the volume's root.
        path: String,
    },
    /// The file system's records are damaged or not what Rewind understands.
    #[error(
        "the file system is damaged or uses a feature Rewind does not read ({detail}); \
         restore the whole VM or export the disk to get at it"
    )]
    Damaged {
        /// What is wrong, and where.
        detail: String,
    },
    /// That file is stored in a way Rewind cannot read (encrypted with EFS, an unknown
    /// compression).
    #[error("{path} cannot be read by Rewind ({detail}); restore the whole VM to get at it")]
    Unsupported {
        /// The path, from the volume's root.
        path: String,
        /// Why.
        detail: String,
    },
    /// Reading the disk failed (the store: missing or damaged chunks, a pulled drive).
    #[error("could not read the disk: {0}")]
    Read(#[source] io::Error),
    /// Writing what was read failed.
    #[error("could not write {path}: {source}")]
    Write {
        /// What was being written.
        path: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The volume is encrypted with BitLocker.
    #[error(
        "this volume is encrypted with BitLocker, so its files cannot be read from the backup; \
         restore the VM (as a new VM, to keep the current one) and unlock it in Windows"
    )]
    Locked,
    /// The volume holds no file system Rewind reads.
    #[error(
        "this volume holds no file system Rewind can read (it reads NTFS, FAT, exFAT and ext4); \
         export the disk to look at it with other tools"
    )]
    NoFileSystem,
    /// The user cancelled.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
}

/// Whether `name` can be a path's component here and on the host: not empty, `.` or `..`,
/// and without a `/` or a NUL (which a damaged or hostile folder may hold).
pub(crate) fn usable_name(name: &str) -> bool {
    !(name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']))
}

/// Hands `bytes` of the file at `path` to `out`, counting them as done in `control`.
pub(crate) fn deliver(
    out: &mut dyn Write,
    bytes: &[u8],
    path: &str,
    control: &Control,
) -> Result<u64, TreeError> {
    out.write_all(bytes).map_err(|source| TreeError::Write {
        path: path.to_owned(),
        source,
    })?;
    control.add_done_bytes(bytes.len() as u64);
    Ok(bytes.len() as u64)
}

/// A volume to read a file system from: a window of a disk that the reader owns.
pub type VolumeDisk = Slice<Box<dyn Disk + Send>>;

/// Opens the file system of `volume` on `disk`.
///
/// # Errors
/// The volume is locked (BitLocker) or holds no file system Rewind reads, its file system
/// is damaged, or reading failed.
pub fn open_tree(
    disk: Box<dyn Disk + Send>,
    volume: &Volume,
) -> Result<Box<dyn FileTree>, TreeError> {
    let disk = Slice::new(disk, volume.start_bytes, volume.size_bytes);
    match volume.file_system {
        FileSystem::Ext => ext4::open(disk),
        FileSystem::Fat | FileSystem::Fat32 => fat::open(disk),
        FileSystem::Exfat => exfat::open(disk),
        FileSystem::Ntfs => ntfs::open(disk),
        FileSystem::Bitlocker => Err(TreeError::Locked),
        FileSystem::Unknown => Err(TreeError::NoFileSystem),
    }
}

/// The folders and files of one volume, read in place.
///
/// A path is the list of names from the volume's root (`["Users", "me", "thesis.docx"]`);
/// the root is the empty list. Names are compared as the file system does (NTFS and FAT
/// ignore case; ext4 does not).
pub trait FileTree {
    /// The entries of the folder at `folder`, without `.` and `..`, in the file system's
    /// order.
    ///
    /// # Errors
    /// No such folder, a damaged file system, or a read error.
    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError>;

    /// The entry at `path` (the root is a folder named "").
    ///
    /// # Errors
    /// No such entry, a damaged file system, or a read error.
    fn entry(&mut self, path: &[String]) -> Result<Entry, TreeError>;

    /// Writes the content of the file at `path` (or of its data stream `stream`) to `out`,
    /// from its start, adding what it reads to `control`'s done bytes and stopping when it
    /// is cancelled. Returns the bytes written. Holes and unwritten ranges are written as
    /// zeros (the caller may turn them back into holes).
    ///
    /// # Errors
    /// No such file, an unreadable file, a read or write error, or cancelled.
    fn read(
        &mut self,
        path: &[String],
        stream: Option<&str>,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError>;

    /// Where the symbolic link at `path` points.
    ///
    /// # Errors
    /// No such link, or a read error.
    fn read_link(&mut self, path: &[String]) -> Result<String, TreeError> {
        Err(TreeError::NotFound {
            path: path.join("/"),
        })
    }
}

/// A window of a disk: a volume, seen as a disk of its own (offset 0 is its first byte,
/// nothing past its end is read).
#[derive(Debug)]
pub struct Slice<D> {
    disk: D,
    start: u64,
    len: u64,
    position: u64,
}

impl<D: Disk> Slice<D> {
    /// The `len` bytes of `disk` from `start`.
    pub fn new(disk: D, start: u64, len: u64) -> Self {
        Self {
            disk,
            start,
            len,
            position: 0,
        }
    }

    /// Its length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The disk it is a window of.
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// Reads exactly `buf.len()` bytes from `offset`: an error if they are not all inside
    /// the volume.
    ///
    /// # Errors
    /// The range is outside the volume, or reading failed.
    pub fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at offset {offset} lie outside the volume of {} bytes",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.disk.seek(SeekFrom::Start(self.start + offset))?;
        self.disk.read_exact(buf)?;
        self.position = offset + buf.len() as u64;
        Ok(())
    }
}

impl<D: Disk> Read for Slice<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.position);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        self.disk
            .seek(SeekFrom::Start(self.start + self.position))?;
        let n = self.disk.read(&mut buf[..want])?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<D: Disk> Seek for Slice<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        let Some(target) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to before the start of the volume",
            ));
        };
        self.position = target;
        Ok(target)
    }
}
