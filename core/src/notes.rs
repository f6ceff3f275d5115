//! Notes on this host that an operation on a VM is under way, so that a run after a crash,
//! a kill or a power cut knows what was left half-done. Checkpoints and restores both read
//! them, so they live here, below both.
//!
//! - [`RestoreMarker`]: a restore of a VM is writing its disks. A restore cut short leaves
//!   them half-old, half-new: the next restore of that VM takes no safety checkpoint of
//!   that mixture (the one taken before the interrupted restore stays the way back), and
//!   checkpoints of the VM are refused until it is restored or the restore undone.
//!   `<state dir>/restoring/<vm uuid>.json` ([`crate::paths::state_dir`]), written durably.
//! - [`FROZEN`] and [`SAVED`]: this process froze a VM's file systems, or saved its state
//!   for a full-state checkpoint and has not let it run again; a later run thaws or
//!   resumes it. `<runtime dir>/frozen|saved/<vm uuid>` ([`crate::paths::runtime_dir`],
//!   private to Rewind's user), holding the process id.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What an unfinished restore of a VM was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMarker {
    /// The checkpoint being restored.
    pub checkpoint: String,
    /// The safety checkpoint taken before it, if any: the way back.
    pub safety_checkpoint: Option<String>,
    /// The store's folder.
    pub store: PathBuf,
    /// The process that wrote it.
    pub pid: u32,
}

/// The folder of the notes of restores under way.
#[must_use]
pub fn restoring_dir() -> PathBuf {
    crate::paths::state_dir().join("restoring")
}

fn path(vm: &Uuid) -> PathBuf {
    restoring_dir().join(format!("{vm}.json"))
}

impl RestoreMarker {
    /// Writes the marker of VM `vm` (durably: it must outlive a power cut).
    pub fn write(&self, vm: &Uuid) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::atomic_file::write(&path(vm), &bytes, 0o644)
    }

    /// The marker of VM `vm` left by another process, if there is one, and whether that
    /// process still runs (a restore going on now) or not (a restore cut short).
    #[must_use]
    pub fn left_for(vm: &Uuid) -> Option<(Self, bool)> {
        let marker: Self = serde_json::from_slice(&std::fs::read(path(vm)).ok()?).ok()?;
        if marker.pid == std::process::id() {
            return None;
        }
        let running = Path::new("/proc").join(marker.pid.to_string()).exists();
        Some((marker, running))
    }

    /// Removes the marker of VM `vm`.
    pub fn remove(vm: &Uuid) {
        crate::cleanup::remove_file(&path(vm));
    }
}

/// A note "process P is in the middle of something with VM X" in the runtime folder.
#[derive(Debug)]
pub(crate) struct ProcessNote(&'static str);

/// The guest's file systems are frozen.
pub(crate) const FROZEN: ProcessNote = ProcessNote("frozen");
/// The VM was saved (managed save) for a full-state checkpoint and may not run yet.
pub(crate) const SAVED: ProcessNote = ProcessNote("saved");

impl ProcessNote {
    /// Where the note of VM `uuid` is (its folder made private on the way).
    pub(crate) fn path(&self, uuid: &Uuid) -> std::io::Result<PathBuf> {
        let dir = crate::paths::runtime_dir()?.join(self.0);
        crate::paths::private_dir(&dir, 0o700)?;
        Ok(dir.join(uuid.to_string()))
    }

    /// Leaves the note for VM `uuid`, naming this process.
    pub(crate) fn create(&self, uuid: &Uuid) -> std::io::Result<()> {
        std::fs::write(self.path(uuid)?, std::process::id().to_string())
    }

    /// Takes the note of VM `uuid` away.
    pub(crate) fn remove(&self, uuid: &Uuid) {
        match self.path(uuid) {
            Ok(path) => crate::cleanup::remove_file(&path),
            Err(e) => tracing::warn!("could not reach the note of VM {uuid}: {e}"),
        }
    }

    /// Whether a note is there from a process that no longer runs.
    pub(crate) fn left_by_dead_process(&self, uuid: &Uuid) -> bool {
        let Ok(path) = self.path(uuid) else {
            return false;
        };
        std::fs::read_to_string(path).is_ok_and(|pid| {
            let pid = pid.trim();
            pid != std::process::id().to_string() && !Path::new("/proc").join(pid).exists()
        })
    }
}
