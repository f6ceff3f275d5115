//! Rewind's log: `rewind.log` in the state folder, one line per event with its time,
//! rotated at [`ROTATE_BYTES`] into `rewind.log.1` … `rewind.log.3` (the oldest dropped).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A log file rotates past this size.
pub const ROTATE_BYTES: u64 = 2 << 20;
/// Rotated files kept.
pub const KEEP_FILES: u32 = 3;

/// An open log; lines from several threads do not interleave.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    lock: Mutex<()>,
}

/// The log file in the state folder.
#[must_use]
pub fn log_path() -> PathBuf {
    crate::paths::state_dir().join("rewind.log")
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl LogFile {
    /// A log at `path` (its folder is made when the first line is written).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` with the local time in front. Failing to log is not an error the
    /// caller could act on, so it is ignored.
    pub fn line(&self, line: &str) {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
            for n in (1..KEEP_FILES).rev() {
                let _ = std::fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1));
            }
            let _ = std::fs::rename(&self.path, numbered(&self.path, 1));
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
            let _ = writeln!(file, "{now} {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_and_old_logs_rotate_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("rewind.log"));
        log.line("first");
        assert!(
            std::fs::read_to_string(log.path())
                .unwrap()
                .ends_with(" first\n")
        );
        let big = "x".repeat(1 << 20);
        for _ in 0..12 {
            log.line(&big);
        }
        let files: Vec<_> = (1..=KEEP_FILES + 1)
            .map(|n| numbered(log.path(), n).exists())
            .collect();
        assert_eq!(
            files,
            vec![true, true, true, false],
            "three rotated files kept"
        );
        assert!(std::fs::metadata(log.path()).unwrap().len() <= ROTATE_BYTES + (1 << 20) + 64);
    }
}
