//! Private folders for a VM's saved memory on its way into or out of the store, beside the
//! VM's own storage.
//!
//! A full-state checkpoint's memory image is as large as the VM's RAM (8–16 GiB for a
//! Windows VM). `/tmp` is the wrong place for it: on many desktops it is a small tmpfs (in
//! RAM itself), and it is shared by every user. The folder of the VM's disks is on a disk
//! sized for the VM, and the image is removed again as soon as it has been read.
//!
//! A staging folder is `.rewind-staging-<pid>-<random>` (mode 0700) inside the VM's disk
//! folder, made only after checking that the file system has room for the image and
//! [`RESERVE_BYTES`] more for the VM's own writes meanwhile; it is removed when dropped,
//! and those of processes that no longer run are removed when the next one is made there.

use std::path::{Path, PathBuf};

use crate::units::human_bytes;

/// Space that must stay free beside a staged image, so that the VM's own writes (which go
/// to the same disk) do not run out of room while it is there.
pub const RESERVE_BYTES: u64 = 256 << 20;

const PREFIX: &str = ".rewind-staging-";

/// What can go wrong when making a staging folder.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The file system has too little free space.
    #[error(
        "there is not enough room to {purpose} in {}: it needs up to {}, plus {} left free for the VM, and only {} is free there; free up space on that disk, or take a disk-only checkpoint or restore instead",
        dir.display(),
        human_bytes(*needed_bytes),
        human_bytes(RESERVE_BYTES),
        human_bytes(*free_bytes)
    )]
    NoRoom {
        /// What the room is for ("save the memory of VM \"win11\"").
        purpose: String,
        /// Where.
        dir: PathBuf,
        /// The image's size (at most).
        needed_bytes: u64,
        /// What is free there.
        free_bytes: u64,
    },
    /// The folder could not be made.
    #[error("could not use {} to {purpose}: {source}", dir.display())]
    Io {
        /// What it is for.
        purpose: String,
        /// Where.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A private folder beside a VM's storage; removed with its contents when dropped.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Makes one in `beside` (created if missing) for a file of up to `needed_bytes`, to
    /// `purpose` (words for errors). `owner` hands the folder to that user and group (the
    /// user QEMU runs the VM as, when libvirt writes the file there); it stays private
    /// (0700) either way.
    pub fn new(
        beside: &Path,
        needed_bytes: u64,
        purpose: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, StagingError> {
        let failed = |source| StagingError::Io {
            purpose: purpose.to_owned(),
            dir: beside.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(beside).map_err(failed)?;
        crate::workdir::remove_dead_runs(beside, PREFIX);
        check_room(beside, needed_bytes, purpose)?;
        let dir = beside.join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        let made = Self { dir };
        std::fs::create_dir(&made.dir).map_err(failed)?;
        std::fs::set_permissions(
            &made.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(failed)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&made.dir, Some(uid), Some(gid)).map_err(failed)?;
        }
        Ok(made)
    }

    /// The folder.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // One left behind is removed by the next run that stages beside it.
        crate::cleanup::remove_dir_all(&self.dir);
    }
}

/// Whether the file system of `dir` has room for a file of `needed_bytes` and
/// [`RESERVE_BYTES`] more (to `purpose`: words for the error).
pub fn check_room(dir: &Path, needed_bytes: u64, purpose: &str) -> Result<(), StagingError> {
    let free_bytes = free_bytes(dir).map_err(|source| StagingError::Io {
        purpose: purpose.to_owned(),
        dir: dir.to_path_buf(),
        source,
    })?;
    if free_bytes < needed_bytes.saturating_add(RESERVE_BYTES) {
        return Err(StagingError::NoRoom {
            purpose: purpose.to_owned(),
            dir: dir.to_path_buf(),
            needed_bytes,
            free_bytes,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_private_folder_that_goes_away_and_takes_a_dead_runs_folder_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        // A run that was killed: pid 0 never names a live process here.
        let stale = tmp.path().join(format!("{PREFIX}0-abcdef012345"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("memory.save"), b"old").unwrap();
        let staging = Staging::new(tmp.path(), 1 << 20, "test", None).unwrap();
        assert!(!stale.exists(), "a dead run's folder is removed");
        let dir = staging.path().to_path_buf();
        assert!(dir.starts_with(tmp.path()));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.join("memory.save"), b"image").unwrap();
        drop(staging);
        assert!(!dir.exists(), "removed with its contents");
    }

    #[test]
    fn too_little_room_is_said_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let free = free_bytes(tmp.path()).unwrap();
        let err = Staging::new(tmp.path(), free, "save the memory of VM \"w\"", None)
            .expect_err("it cannot fit with the reserve");
        let text = err.to_string();
        assert!(
            text.contains("not enough room to save the memory of VM \"w\"")
                && text.contains("free up space"),
            "{text}"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
