//! Who may use the store at once.
//!
//! `locks/store.lock` is held with `flock(2)`: shared by everything that writes or reads
//! checkpoints (several checkpoints may be written at once — chunk writes are idempotent
//! and manifests have distinct names), exclusive by garbage collection and by the clean-up
//! of leftovers. The kernel releases a lock when its process dies, so a killed Rewind never
//! leaves a stale lock behind. Each holder also writes `locks/holder-<pid>-<n>` describing
//! itself, so that a process that has to wait can say for whom; files left by killed
//! processes are removed by the next exclusive holder.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{StoreError, io_error};
use super::fsutil;
use crate::progress::Control;

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Writing or reading checkpoints.
    Shared,
    /// Garbage collection, clean-up.
    Exclusive,
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    holder_file: Option<PathBuf>,
    mode: LockMode,
}

fn lock_dir(root: &Path) -> PathBuf {
    root.join("locks")
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "this host".into(), |s| s.trim().to_owned())
}

/// What the current holders said about themselves.
fn describe_holders(root: &Path) -> String {
    let mut who: Vec<String> = fsutil::list_dir(&lock_dir(root))
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("holder-"))
        })
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .collect();
    if who.is_empty() {
        who.push("another Rewind process".into());
    }
    who.join("; ")
}

impl StoreLock {
    /// Takes the lock. Without `wait`, a lock held by others is [`StoreError::Busy`]; with
    /// it, waits (checking for cancellation) until it is free.
    pub fn acquire(
        root: &Path,
        mode: LockMode,
        purpose: &str,
        wait: Option<&Control>,
    ) -> Result<Self, StoreError> {
        let dir = lock_dir(root);
        fsutil::create_dir_durable(&dir)?;
        let path = dir.join("store.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("open the lock file", &path, e))?;
        loop {
            let attempt = match mode {
                LockMode::Shared => file.try_lock_shared(),
                LockMode::Exclusive => file.try_lock(),
            };
            match attempt {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => match wait {
                    Some(control) => {
                        control.check()?;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    None => {
                        return Err(StoreError::Busy {
                            path: root.to_path_buf(),
                            holder: describe_holders(root),
                        });
                    }
                },
                Err(TryLockError::Error(e)) => return Err(io_error("lock", &path, e)),
            }
        }
        let mut lock = Self {
            file,
            holder_file: None,
            mode,
        };
        if mode == LockMode::Exclusive {
            // Nobody else holds the store: holder files still present are from killed processes.
            for stale in fsutil::list_dir(&dir)? {
                if stale
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("holder-"))
                {
                    let _ = fs::remove_file(stale);
                }
            }
        }
        let holder = dir.join(fsutil::temp_name("holder").trim_end_matches(".tmp"));
        let text = format!(
            "process {} on {}: {purpose} (since {})\n",
            std::process::id(),
            host_name(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
        );
        if fs::write(&holder, text).is_ok() {
            lock.holder_file = Some(holder);
        }
        Ok(lock)
    }

    /// Tries to take the lock exclusively without waiting; `None` when others hold it.
    pub fn try_exclusive(root: &Path, purpose: &str) -> Result<Option<Self>, StoreError> {
        match Self::acquire(root, LockMode::Exclusive, purpose, None) {
            Ok(lock) => Ok(Some(lock)),
            Err(StoreError::Busy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The mode held.
    #[must_use]
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Turns an exclusive lock into a shared one (others may then join).
    pub fn downgrade(&mut self) -> Result<(), StoreError> {
        self.file
            .lock_shared()
            .map_err(|e| io_error("lock", "locks/store.lock", e))?;
        self.mode = LockMode::Shared;
        Ok(())
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let Some(holder) = &self.holder_file {
            let _ = fs::remove_file(holder);
        }
        let _ = self.file.unlock();
    }
}
