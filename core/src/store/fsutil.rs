//! File-system steps that make writes durable and atomic.
//!
//! The rule everywhere: write a temporary file, make it durable, rename it into place, make
//! the directory durable. A reader therefore sees either the old state or the complete new
//! file, whatever instant the process dies or the drive disappears.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{StoreError, io_error};

/// A name for a temporary file unique to this process and call.
pub(crate) fn temp_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}.tmp", std::process::id())
}

/// Creates `path` with `bytes`; with `durable`, also fsyncs it before returning.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| io_error("write", path, e))?;
    if durable {
        file.sync_all()
            .map_err(|e| io_error("flush to disk", path, e))?;
    } else {
        // Start writing it out now, without waiting: otherwise the kernel holds back
        // gigabytes of chunk files until the commit's syncfs, which then writes them all
        // while nothing else happens. Only a hint, so failure does not matter.
        if let Err(e) = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed) {
            tracing::debug!("fadvise(DONTNEED): {e}");
        }
    }
    Ok(())
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("flush to disk", dir, e))
}

/// Flushes everything written to the file system that holds `path` (`syncfs(2)`): one call
/// instead of an fsync per chunk file.
pub(crate) fn sync_filesystem(path: &Path) -> Result<(), StoreError> {
    let dir = File::open(path).map_err(|e| io_error("open", path, e))?;
    rustix::fs::syncfs(&dir).map_err(|e| io_error("flush to disk", path, e.into()))
}

/// Writes `bytes` to `dest` atomically and durably: temp file in `tmp_dir` (same file
/// system), fsync, rename, fsync of `dest`'s directory.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_dir.join(temp_name("atomic"));
    write_new_file(&tmp, bytes, true)?;
    if let Err(e) = fs::rename(&tmp, dest) {
        crate::cleanup::remove_file(&tmp);
        return Err(io_error("rename into place", dest, e));
    }
    sync_dir(parent(dest))
}

/// Creates `dir` (and missing parents) and makes its creation durable.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent_dir = parent(dir).to_path_buf();
    if !parent_dir.is_dir() {
        create_dir_durable(&parent_dir)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(&parent_dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create the folder", dir, e)),
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Reads a whole file, refusing files larger than `max_bytes` (a damaged or hostile store
/// must not make Rewind allocate without bound).
pub(crate) fn read_bounded(
    path: &Path,
    max_bytes: u64,
    store: &Path,
) -> Result<Vec<u8>, StoreError> {
    let len = fs::metadata(path)
        .map_err(|e| io_error("read", path, e))?
        .len();
    if len > max_bytes {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            detail: format!("it is {len} bytes long, more than the {max_bytes} such a file can be"),
            store: store.to_path_buf(),
        });
    }
    fs::read(path).map_err(|e| io_error("read", path, e))
}

/// The entries of a folder, or nothing when it does not exist.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut out = Vec::new();
            for entry in entries {
                out.push(entry.map_err(|e| io_error("list", dir, e))?.path());
            }
            out.sort();
            Ok(out)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error("list", dir, e)),
    }
}
