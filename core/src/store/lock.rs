//! Who may use the store at once: one protocol for every process, on this host or another.
//!
//! Every holder keeps a lock file in `locks/` (`lockfile.rs`): `shared-<token>.lock` or
//! `exclusive-<token>.lock`, naming its host, machine and boot ID, process and purpose,
//! refreshed every minute (its lease). Writers, readers (restore, export), verify and prune
//! hold the lock shared; garbage collection and the clean-up of leftovers exclusively. A
//! taker creates its file, then looks at the others: of two takers, at least one sees the
//! other, so two conflicting holders never both go ahead. A lock file whose holder is gone
//! (its process no longer runs on this machine, its machine has booted since, or it has not
//! been refreshed for ten minutes) is stale: the next taker removes it and logs whose it was.
//!
//! A process on the store's own machine also holds `locks/store.lock` with `flock(2)`
//! first: local processes then wait for each other in the kernel, which releases the lock of
//! a process that dies at once. Processes on other hosts (over SSH) see local holders by
//! their lock files, and local holders see them the same way.

use std::fs::{File, TryLockError};
use std::path::Path;
use std::time::Duration;

use super::backend::Backend;
use super::error::{StoreError, io_error};
use super::local::LocalRoot;
use super::lockfile::{self, FileLock};
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
    /// `flock(2)` on `locks/store.lock`, and a lock file as on another host.
    Local { file: File, lock: FileLock },
    /// A lock file of a remote store.
    Remote(FileLock),
}

const LOCK_DIR: &str = "locks";

/// What the holders of the other lock files say about themselves (`flock` holders are
/// busy with their own).
fn describe_holders(fs: &Backend, mode: LockMode) -> String {
    match lockfile::fresh_conflicts(fs, mode, None) {
        Ok(who) if !who.is_empty() => who.join("; "),
        _ => "another Rewind process".into(),
    }
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
        store: &Path,
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
                // Then the lock file, which processes on other hosts see.
                Ok(()) => match FileLock::acquire(fs, store, mode, purpose, None) {
                    Ok(lock) => {
                        if mode == LockMode::Exclusive {
                            remove_legacy_holder_files(root);
                        }
                        return Ok(Self {
                            held: Held::Local { file, lock },
                            mode,
                        });
                    }
                    Err(StoreError::Busy { holder, .. }) => {
                        file.unlock().or_warn("release the store's lock");
                        holder
                    }
                    Err(e) => return Err(e),
                },
                Err(TryLockError::WouldBlock) => describe_holders(fs, mode),
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
                        path: store.to_path_buf(),
                        holder,
                    });
                }
            }
        }
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
            Backend::Local(root) => Self::acquire_local(fs, root, store, mode, purpose, wait),
            Backend::Sftp(_) => Ok(Self {
                held: Held::Remote(FileLock::acquire(fs, store, mode, purpose, wait)?),
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

    /// Fails if the lock is no longer held: its lock file was removed by a process that
    /// took it as stale (this one was paused or cut off for long).
    pub(crate) fn check_held(&self) -> Result<(), StoreError> {
        match &self.held {
            Held::Local { lock, .. } | Held::Remote(lock) => lock.check_held(),
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
            Held::Local { file, lock } => {
                file.lock_shared()
                    .map_err(|e| io_error("lock", "locks/store.lock", e))?;
                lock.downgrade()?;
            }
            Held::Remote(lock) => lock.downgrade()?,
        }
        self.mode = LockMode::Shared;
        Ok(())
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let Held::Local { file, .. } = &self.held {
            // Closing the file releases the lock in any case; the lock file goes with the
            // FileLock's drop.
            drop(file.unlock());
        }
    }
}

/// Removes the `holder-*` files that Rewind before December 2026 left in `locks/` (under
/// the exclusive lock: nobody else holds the store).
fn remove_legacy_holder_files(root: &LocalRoot) {
    let dir = Path::new(LOCK_DIR);
    for entry in root.list(dir, false).unwrap_or_default() {
        if entry.name.starts_with("holder-") {
            let rel = dir.join(&entry.name);
            root.remove_file(&rel)
                .or_warn(format_args!("remove {}", root.join(&rel).display()));
        }
    }
}
