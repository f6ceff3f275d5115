//! Reading FAT12, FAT16 and FAT32 volumes (EFI system partitions, USB sticks' images) with
//! the `fatfs` crate, read-only.
//!
//! `fatfs` wants a disk it can write to: it gets `ReadOnly`, whose writes and flushes
//! fail, and is opened with options that never write (no accessed dates). It writes nothing
//! when it only reads: its dirty flag and `FSInfo` sector are written back only after a
//! change. It flushes the disk when a file it read is dropped, and on unmount; that flush
//! fails, and `fatfs` only logs it (through `log`, which Rewind does not route).
//!
//! The volume is hostile input. Every call into `fatfs` runs under `catch_unwind`, and
//! every folder walk has a budget of bytes it may read (`ReadOnly` counts them): a
//! folder whose cluster chain loops, which `fatfs` would follow forever, ends in an error.
//!
//! FAT stores local times with no zone: they are read as if they were UTC (what mtools and
//! Linux write when the system's zone is UTC). A volume written by Windows in another time
//! zone shows its times shifted by that zone's offset.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fatfs::{DirEntry, FileSystem, FsOptions};

use super::{Entry, EntryKind, FileTree, Timestamp, TreeError, VolumeDisk};
use crate::progress::Control;

/// At most this many entries are listed from one folder: FAT itself allows 65 536 slots.
const MAX_ENTRIES: usize = 65_536;

/// The bytes one walk of a folder may read: its 65 536 slots of 32 bytes, its FAT entries
/// and room to spare.
const FOLDER_BUDGET: u64 = 4 << 20;

/// How much of a file is written at a time (and how often cancelling is checked).
const BLOCK: usize = 1 << 20;

/// How much of the disk [`ReadOnly`] reads at once for `fatfs`'s small reads.
const CACHE_BLOCK: u64 = 64 << 10;

/// How many such blocks [`ReadOnly`] keeps.
const CACHE_BLOCKS: usize = 4;

/// Opens the FAT file system on `disk`.
///
/// # Errors
/// The boot sector is not a FAT one `fatfs` accepts, or reading failed.
pub fn open(mut disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    disk.seek(SeekFrom::Start(0)).map_err(TreeError::Read)?;
    let budget = Arc::new(AtomicU64::new(FOLDER_BUDGET));
    let wrapped = ReadOnly::new(disk, Arc::clone(&budget));
    let fs = guarded("the boot sector", || {
        FileSystem::new(wrapped, FsOptions::new())
    })?;
    Ok(Box::new(FatTree { fs, budget }))
}

/// A FAT volume opened by `fatfs`.
struct FatTree {
    fs: FileSystem<ReadOnly>,
    /// The bytes the current operation may still read (shared with [`ReadOnly`]).
    budget: Arc<AtomicU64>,
}

impl std::fmt::Debug for FatTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FatTree")
            .field("fat_type", &self.fs.fat_type())
            .finish_non_exhaustive()
    }
}

/// What a path names.
enum Found<'a> {
    /// The root folder.
    Root,
    /// An entry of a folder.
    Entry(DirEntry<'a, ReadOnly>),
}

impl FatTree {
    /// The entry at `path`.
    fn find(&self, path: &[String]) -> Result<Found<'_>, TreeError> {
        let mut found = Found::Root;
        for (depth, name) in path.iter().enumerate() {
            let folder = match &found {
                Found::Root => None,
                Found::Entry(entry) if entry.is_dir() => Some(entry),
                Found::Entry(_) => {
                    return Err(TreeError::NotAFolder {
                        path: path[..depth].join("/"),
                    });
                }
            };
            let mut hit = None;
            self.each_entry(folder, |entry| {
                if name_matches(&entry, name) {
                    hit = Some(entry);
                    false
                } else {
                    true
                }
            })?;
            found = Found::Entry(hit.ok_or_else(|| TreeError::NotFound {
                path: path.join("/"),
            })?);
        }
        Ok(found)
    }

    /// Calls `visit` with each entry of `folder` (the root if `None`), without `.`, `..`,
    /// volume labels and names no path can hold, until it returns `false`.
    fn each_entry<'a>(
        &'a self,
        folder: Option<&DirEntry<'a, ReadOnly>>,
        mut visit: impl FnMut(DirEntry<'a, ReadOnly>) -> bool,
    ) -> Result<(), TreeError> {
        self.budget.store(FOLDER_BUDGET, Ordering::Relaxed);
        guarded("a folder", || {
            let dir = match folder {
                Some(entry) => entry.to_dir(),
                None => self.fs.root_dir(),
            };
            for (seen, entry) in dir.iter().enumerate() {
                if seen >= MAX_ENTRIES {
                    return Err(io::Error::other(format!(
                        "a folder holds more than {MAX_ENTRIES} entries"
                    )));
                }
                let entry = entry?;
                if !super::usable_name(&entry.file_name()) {
                    continue;
                }
                if !visit(entry) {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// Whether `entry` is called `name`, as FAT compares names: its long or its short name,
/// ignoring case.
fn name_matches(entry: &DirEntry<'_, ReadOnly>, name: &str) -> bool {
    same_ignoring_case(&entry.file_name(), name)
        || same_ignoring_case(&entry.short_file_name(), name)
}

/// Whether `a` and `b` are the same name, ignoring case (as Windows does).
fn same_ignoring_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_uppercase)
        .eq(b.chars().flat_map(char::to_uppercase))
}

/// What [`FileTree`] tells of `entry`.
fn describe(entry: &DirEntry<'_, ReadOnly>) -> Entry {
    let folder = entry.is_dir();
    Entry {
        name: entry.file_name(),
        kind: if folder {
            EntryKind::Folder
        } else {
            EntryKind::File
        },
        size_bytes: if folder { 0 } else { entry.len() },
        modified: timestamp(entry.modified()),
        id: None,
        streams: Vec::new(),
    }
}

/// A FAT date and time (local, with no zone: read as UTC), if it is a real one.
fn timestamp(at: fatfs::DateTime) -> Option<Timestamp> {
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::from(at.date.year),
        u32::from(at.date.month),
        u32::from(at.date.day),
    )?;
    let time = date.and_hms_milli_opt(
        u32::from(at.time.hour),
        u32::from(at.time.min),
        u32::from(at.time.sec),
        u32::from(at.time.millis),
    )?;
    let utc = time.and_utc();
    Some(Timestamp {
        seconds: utc.timestamp(),
        nanos: utc.timestamp_subsec_nanos(),
    })
}

impl FileTree for FatTree {
    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError> {
        let found = self.find(folder)?;
        let parent = match &found {
            Found::Root => None,
            Found::Entry(entry) if entry.is_dir() => Some(entry),
            Found::Entry(_) => {
                return Err(TreeError::NotAFolder {
                    path: folder.join("/"),
                });
            }
        };
        let mut entries = Vec::new();
        self.each_entry(parent, |entry| {
            entries.push(describe(&entry));
            true
        })?;
        Ok(entries)
    }

    fn entry(&mut self, path: &[String]) -> Result<Entry, TreeError> {
        Ok(match self.find(path)? {
            Found::Root => Entry {
                name: String::new(),
                kind: EntryKind::Folder,
                size_bytes: 0,
                modified: None,
                id: None,
                streams: Vec::new(),
            },
            Found::Entry(entry) => describe(&entry),
        })
    }

    fn read(
        &mut self,
        path: &[String],
        stream: Option<&str>,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let shown = path.join("/");
        if let Some(stream) = stream {
            return Err(TreeError::NotFound {
                path: format!("{shown}:{stream}"),
            });
        }
        let entry = match self.find(path)? {
            Found::Entry(entry) if !entry.is_dir() => entry,
            _ => return Err(TreeError::NotAFile { path: shown }),
        };
        let size = entry.len();
        // A file's reads are bounded by its size (at most 4 GiB), not by the budget.
        self.budget.store(u64::MAX, Ordering::Relaxed);
        let mut file = guarded("a file", || Ok(entry.to_file()))?;
        let mut buf = vec![0; BLOCK];
        let mut done = 0u64;
        while done < size {
            control.check()?;
            let filled = guarded("a file's content", || {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                Ok(filled)
            })?;
            if filled == 0 {
                return Err(TreeError::Damaged {
                    detail: format!("the clusters of {shown} end after {done} of its {size} bytes"),
                });
            }
            done += super::deliver(out, &buf[..filled], &shown, control)?;
        }
        Ok(done)
    }
}

/// Runs `fatfs` on `what`, turning its panics and errors into [`TreeError`]s.
fn guarded<T>(what: &str, run: impl FnOnce() -> io::Result<T>) -> Result<T, TreeError> {
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(tree_error(what, error)),
        Err(_) => Err(TreeError::Damaged {
            detail: format!("the FAT records of {what} could not be parsed"),
        }),
    }
}

/// The [`TreeError`] for an error of `fatfs` while reading `what`.
fn tree_error(what: &str, error: io::Error) -> TreeError {
    if holds::<DiskFailed>(&error) {
        let inner = error
            .into_inner()
            .and_then(|inner| inner.downcast::<DiskFailed>().ok())
            .map_or_else(|| io::Error::other("read failed"), |failed| failed.0);
        return TreeError::Read(inner);
    }
    if holds::<OutOfBudget>(&error) {
        return TreeError::Damaged {
            detail: format!(
                "reading {what} went on past {} MiB: its cluster chain loops or is too long",
                FOLDER_BUDGET >> 20
            ),
        };
    }
    TreeError::Damaged {
        detail: format!("reading {what}: {error}"),
    }
}

/// Whether `error` wraps a `T`.
fn holds<T: std::error::Error + 'static>(error: &io::Error) -> bool {
    matches!(error.get_ref(), Some(inner) if inner.is::<T>())
}

/// A read of the disk itself failed (not a record of the volume found wrong).
#[derive(Debug)]
struct DiskFailed(io::Error);

impl std::fmt::Display for DiskFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DiskFailed {}

/// An operation read more than its budget.
#[derive(Debug)]
struct OutOfBudget;

impl std::fmt::Display for OutOfBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("read budget exhausted")
    }
}

impl std::error::Error for OutOfBudget {}

/// The volume as `fatfs` sees it: reads (through a small cache, as `fatfs` reads a few
/// bytes at a time), counted against a budget; writes fail.
struct ReadOnly {
    disk: VolumeDisk,
    budget: Arc<AtomicU64>,
    position: u64,
    /// Blocks of the disk read lately (where each starts, its bytes), the latest last: the
    /// FAT, a folder and a file's clusters are read in turns.
    cache: Vec<(u64, Vec<u8>)>,
}

impl ReadOnly {
    fn new(disk: VolumeDisk, budget: Arc<AtomicU64>) -> Self {
        Self {
            disk,
            budget,
            position: 0,
            cache: Vec::new(),
        }
    }

    /// Takes `n` bytes from the budget.
    fn charge(&self, n: usize) -> io::Result<()> {
        let n = (n as u64).max(1);
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
            .map_err(|_| io::Error::other(OutOfBudget))
    }

    /// Reads `buf.len()` bytes at `offset` (all inside the volume) from the disk.
    fn read_disk(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk
            .read_exact_at(offset, buf)
            .map_err(|e| io::Error::new(e.kind(), DiskFailed(e)))
    }
}

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.disk.len();
        let left = len.saturating_sub(self.position);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        self.charge(want)?;
        if want as u64 >= CACHE_BLOCK {
            let at = self.position;
            self.read_disk(at, &mut buf[..want])?;
            self.position += want as u64;
            return Ok(want);
        }
        let start = self.position - self.position % CACHE_BLOCK;
        let found = self.cache.iter().position(|(at, _)| *at == start);
        let slot = if let Some(slot) = found {
            slot
        } else {
            let size = CACHE_BLOCK.min(len - start);
            let mut block = vec![0; usize::try_from(size).unwrap_or(0)];
            self.read_disk(start, &mut block)?;
            if self.cache.len() == CACHE_BLOCKS {
                self.cache.remove(0);
            }
            self.cache.push((start, block));
            self.cache.len() - 1
        };
        let (_, block) = self.cache.remove(slot);
        let from = usize::try_from(self.position - start).unwrap_or(0);
        let n = want.min(block.len() - from);
        buf[..n].copy_from_slice(&block[from..from + n]);
        self.cache.push((start, block));
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for ReadOnly {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.disk.len().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek outside the volume")
        })?;
        self.position = target;
        Ok(target)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a volume in the store is never written",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a volume in the store is never written",
        ))
    }
}

#[cfg(test)]
pub(in crate::files) mod tests;
