//! A folder for one job's sockets and scratch files, removed when dropped, in Rewind's
//! private work folder ([`crate::paths::work_dir`]; never a shared name in `/tmp`). The
//! checkpoint engine makes one folder per VM inside it that only that VM's QEMU can write;
//! QEMU only needs to pass through this one (mode 0711). The name holds the process id, so
//! a later run removes the folder of a killed one.

use std::path::{Path, PathBuf};

/// The folder; removed with everything in it when dropped.
#[derive(Debug)]
pub struct WorkDir(PathBuf);

const PREFIX: &str = "rewind-checkpoint-";

impl WorkDir {
    /// Makes a new one in the work folder (first removing those of dead processes).
    ///
    /// # Errors
    /// The work folder cannot be made private, or the new folder cannot be made.
    pub fn new() -> std::io::Result<Self> {
        let base = crate::paths::work_dir()?;
        remove_dead_runs(&base, PREFIX);
        Ok(Self(new_folder_in(&base, PREFIX, 12)?))
    }

    /// Its path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        crate::cleanup::remove_dir_all(&self.0);
    }
}

/// Removes the folders in `dir` named `<prefix><pid>-…` whose process no longer runs (what
/// a killed Rewind left).
pub(crate) fn remove_dead_runs(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = pid_in_name(&entry.file_name(), prefix) else {
            continue;
        };
        if !is_alive(pid) {
            crate::cleanup::remove_dir_all(&entry.path());
        }
    }
}

/// Makes a new folder `<prefix><pid>-<id_len hex digits>` in `base`, mode 0711 (QEMU only
/// needs to pass through it). Short: a socket's whole path in it must fit 107 bytes.
pub(crate) fn new_folder_in(base: &Path, prefix: &str, id_len: usize) -> std::io::Result<PathBuf> {
    let folder = base.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..id_len]
    ));
    std::fs::create_dir(&folder)?;
    std::fs::set_permissions(&folder, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    Ok(folder)
}

/// The process id in a folder name `<prefix><pid>-…`.
pub(crate) fn pid_in_name(name: &std::ffi::OsStr, prefix: &str) -> Option<u32> {
    name.to_str()
        .and_then(|n| n.strip_prefix(prefix))
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
}

/// Whether process `pid` is this one or still runs.
pub(crate) fn is_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}
