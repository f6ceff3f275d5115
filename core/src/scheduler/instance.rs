//! One scheduler per user: the window and `rewind daemon` both run one, never both at once.
//! The lock is `scheduler.lock` in Rewind's state folder, held with `flock(2)` (so it goes
//! when its process dies, however it dies); the holder writes who it is into the file, so
//! that a second one can say which process holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::PathBuf;

/// Another scheduler runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    /// Held by another process.
    #[error(
        "Rewind's scheduler already runs in {holder}; only one may run per user. Stop that one first, or leave the protecting to it"
    )]
    AlreadyRunning {
        /// Who holds it, as it said (process id and program).
        holder: String,
    },
    /// The lock file cannot be used.
    #[error("could not take the scheduler's lock: {detail} ({})", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS's words.
        detail: String,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct SchedulerLock {
    _file: File,
}

/// The lock file.
#[must_use]
pub fn lock_path() -> PathBuf {
    lock_path_in(&crate::paths::state_dir())
}

/// The lock file in state folder `state_dir`.
#[must_use]
pub fn lock_path_in(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("scheduler.lock")
}

impl SchedulerLock {
    /// Takes the lock for `who` (e.g. `rewind daemon`), or says who has it.
    pub fn acquire(who: &str) -> Result<Self, InstanceError> {
        Self::acquire_at(&lock_path(), who)
    }

    /// [`SchedulerLock::acquire`] with the lock file at `path`.
    pub fn acquire_at(path: &std::path::Path, who: &str) -> Result<Self, InstanceError> {
        let io = |e: std::io::Error| InstanceError::Io {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // Who holds it is a courtesy for the message; the lock is the answer.
                drop(file.read_to_string(&mut holder));
                let holder = holder.trim();
                return Err(InstanceError::AlreadyRunning {
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "process {} ({who})", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_scheduler_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.lock");
        let first = SchedulerLock::acquire_at(&path, "rewind daemon").unwrap();
        let e = SchedulerLock::acquire_at(&path, "the Rewind window").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("process {} (rewind daemon)", std::process::id())),
            "{text}"
        );
        drop(first);
        let again = SchedulerLock::acquire_at(&path, "the Rewind window").unwrap();
        drop(again);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("the Rewind window")
        );
    }
}
