//! Scratch folders for test VMs and cross-process locks.
//!
//! QEMU runs as `libvirt-qemu`, so VM files cannot live under a private folder such as a
//! clone in `/root`. Every test folder lives under [`root`] (default
//! `/var/tmp/rewind-tests`), is named `<pid>-<n>-<label>` so that a later run can tell a
//! dead run's leftovers from a live one's, and is removed when its guard drops.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::HarnessError;

/// Root of all test scratch folders.
#[must_use]
pub fn root() -> PathBuf {
    std::env::var_os("REWIND_TEST_SCRATCH")
        .map_or_else(|| PathBuf::from("/var/tmp/rewind-tests"), PathBuf::from)
}

/// Creates `path` and its missing parents, readable and writable by the QEMU user.
pub fn create_open_dir(path: &Path) -> Result<(), HarnessError> {
    fs::create_dir_all(path).map_err(|e| HarnessError::io("create", path, &e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))
        .map_err(|e| HarnessError::io("open up", path, &e))
}

/// A folder removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<root>/<pid>-<n>-<label>`.
    pub fn new(label: &str) -> Result<Self, HarnessError> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let slug: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let root = root();
        create_open_dir(&root)?;
        let path = root.join(format!("{}-{n}-{slug}", std::process::id()));
        create_open_dir(&path)?;
        Ok(Self { path })
    }

    /// The folder.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// A scratch folder with a tmpfs of a given size mounted on it (needs root): unmounted, then
/// removed, when dropped, also when the test panics.
#[derive(Debug)]
pub struct Tmpfs {
    mounted: bool,
    // Dropped after the unmount.
    dir: ScratchDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` (mode 0755) on a new scratch folder named after `label`.
    pub fn mount(label: &str, size_bytes: u64) -> Result<Self, HarnessError> {
        let dir = ScratchDir::new(label)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0755"))
            .arg("rewind-test-tmpfs")
            .arg(dir.path())
            .status()
            .map_err(|e| HarnessError(format!("could not run mount: {e}")))?;
        if !status.success() {
            return Err(HarnessError(format!(
                "could not mount a tmpfs on {} ({status}): this test needs root, run it with \
                 ./x test",
                dir.path().display()
            )));
        }
        Ok(Self { mounted: true, dir })
    }

    /// The mount point.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if std::mem::take(&mut self.mounted) {
            drop(
                std::process::Command::new("umount")
                    .arg(self.dir.path())
                    .status(),
            );
        }
    }
}

/// The process id a scratch entry belongs to, from its `<pid>-...` name.
#[must_use]
pub fn owner_pid(name: &str) -> Option<u32> {
    name.split('-').next()?.parse().ok()
}

/// Whether a process with this id exists.
#[must_use]
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Holds an exclusive lock on `<root>/.<name>.lock` until dropped (across processes).
pub fn lock_file(name: &str) -> Result<File, HarnessError> {
    let root = root();
    create_open_dir(&root)?;
    let path = root.join(format!(".{name}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| HarnessError::io("open", &path, &e))?;
    file.lock()
        .map_err(|e| HarnessError::io("lock", &path, &e))?;
    Ok(file)
}
