//! Who may use the store at once.
//!
//! `locks/store.lock` is held with `flock(2)`: shared by everything that writes or reads
//! checkpoints (several checkpoints may be written at once — chunk writes are idempotent
//! and manifests have distinct names), exclusive by garbage collection and by the clean-up
//! of leftovers. The kernel releases a lock when its process dies, so a killed Rewind never
//! leaves a stale lock behind. Each holder also writes `locks/holder-<pid>-<n>` describing
//! itself, so that a process that has to wait can say for whom; files left by killed
//! processes are removed by the next exclusive holder.
//!
//! A store on another host cannot be flocked: there, holders keep lock files instead
//! (`lockfile.rs`), with the same shared/exclusive meaning. A process that uses the folder
//! directly (on that host) respects those files too.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::backend::Backend;
use super::error::{StoreError, io_error};
use super::local::{self, LocalRoot};
use super::lockfile::{self, RemoteLock};
use crate::cleanup::OrWarn as _;
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
    held: Held,
    mode: LockMode,
}

#[derive(Debug)]
enum Held {
    /// `flock(2)` on `locks/store.lock`, and the holder file.
    Local {
        file: File,
        /// The holder file, inside the store.
        holder_file: Option<PathBuf>,
        root: LocalRoot,
    },
    /// A lock file of a remote store.
    Remote(RemoteLock),
}

const LOCK_DIR: &str = "locks";

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "this host".into(), |s| s.trim().to_owned())
}

/// The holder files in `locks/`.
fn holder_files(root: &LocalRoot) -> Vec<PathBuf> {
    root.list(Path::new(LOCK_DIR), false)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.name.starts_with("holder-"))
        .map(|e| Path::new(LOCK_DIR).join(e.name))
        .collect()
}

/// What the current holders said about themselves.
fn describe_holders(root: &LocalRoot) -> String {
    let mut who: Vec<String> = holder_files(root)
        .iter()
        .filter_map(|rel| root.read(rel, 4096).ok())
        .map(|s| String::from_utf8_lossy(&s).trim().to_owned())
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
        Self::acquire_in(&Backend::local(root), root, mode, purpose, wait)
    }

    fn acquire_local(
        fs: &Backend,
        root: &LocalRoot,
        mode: LockMode,
        purpose: &str,
        wait: Option<&Control>,
    ) -> Result<Self, StoreError> {
        let dir = Path::new(LOCK_DIR);
        fs.create_dir_durable(dir)?;
        let rel = dir.join("store.lock");
        let file = root
            .open_or_create(&rel)
            .map_err(|e| io_error("open the lock file", root.join(&rel), e))?;
        loop {
            let attempt = match mode {
                LockMode::Shared => file.try_lock_shared(),
                LockMode::Exclusive => file.try_lock(),
            };
            let holder = match attempt {
                // Processes on other hosts hold the store with lock files.
                Ok(()) => {
                    let others = lockfile::fresh_conflicts(fs, mode, None)?;
                    if others.is_empty() {
                        break;
                    }
                    file.unlock().or_warn("release the store's lock");
                    others.join("; ")
                }
                Err(TryLockError::WouldBlock) => describe_holders(root),
                Err(TryLockError::Error(e)) => {
                    return Err(io_error("lock", root.join(&rel), e));
                }
            };
            match wait {
                Some(control) => {
                    control.check()?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                None => {
                    return Err(StoreError::Busy {
                        path: root.path().to_path_buf(),
                        holder,
                    });
                }
            }
        }
        if mode == LockMode::Exclusive {
            // Nobody else holds the store: holder files still present are from killed processes.
            for stale in holder_files(root) {
                root.remove_file(&stale)
                    .or_warn(format_args!("remove {}", root.join(&stale).display()));
            }
        }
        let holder = dir.join(local::temp_name("holder").trim_end_matches(".tmp"));
        let text = format!(
            "process {} on {}: {purpose} (since {})\n",
            std::process::id(),
            host_name(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
        );
        let holder_file = root
            .write_new(&holder, text.as_bytes(), false)
            .is_ok()
            .then_some(holder);
        Ok(Self {
            held: Held::Local {
                file,
                holder_file,
                root: root.clone(),
            },
            mode,
        })
    }

    /// Takes the lock of the store in `fs` (whose messages name it `store`), as
    /// [`StoreLock::acquire`] does.
    pub(crate) fn acquire_in(
        fs: &Backend,
        store: &Path,
        mode: LockMode,
        purpose: &str,
        wait: Option<&Control>,
    ) -> Result<Self, StoreError> {
        match fs {
            Backend::Local(root) => Self::acquire_local(fs, root, mode, purpose, wait),
            Backend::Sftp(_) => Ok(Self {
                held: Held::Remote(RemoteLock::acquire(fs, store, mode, purpose, wait)?),
                mode,
            }),
        }
    }

    /// [`StoreLock::try_exclusive`] for the store in `fs`.
    pub(crate) fn try_exclusive_in(
        fs: &Backend,
        store: &Path,
        purpose: &str,
    ) -> Result<Option<Self>, StoreError> {
        match Self::acquire_in(fs, store, LockMode::Exclusive, purpose, None) {
            Ok(lock) => Ok(Some(lock)),
            Err(StoreError::Busy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fails if the lock is no longer held: a remote lock that another process removed as
    /// stale. (A local lock cannot be lost.)
    pub(crate) fn check_held(&self) -> Result<(), StoreError> {
        match &self.held {
            Held::Local { .. } => Ok(()),
            Held::Remote(lock) => lock.check_held(),
        }
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
        match &mut self.held {
            Held::Local { file, .. } => file
                .lock_shared()
                .map_err(|e| io_error("lock", "locks/store.lock", e))?,
            Held::Remote(lock) => lock.downgrade()?,
        }
        self.mode = LockMode::Shared;
        Ok(())
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let Held::Local {
            file,
            holder_file,
            root,
        } = &self.held
        {
            if let Some(holder) = holder_file {
                root.remove_file(holder)
                    .or_warn(format_args!("remove {}", root.join(holder).display()));
            }
            // Closing the file releases the lock in any case.
            drop(file.unlock());
        }
    }
}
