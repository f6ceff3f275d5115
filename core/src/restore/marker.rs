//! A note on the host that a restore of a VM is writing its disks, so that a restore cut
//! short by a crash or a power cut is noticed: its disks are then half-old, half-new. The
//! next restore of that VM does not take a safety checkpoint of that mixture (the one taken
//! before the interrupted restore stays the way back), and checkpoints of the VM are
//! refused until it is restored or the restore undone.
//!
//! `<state dir>/restoring/<vm uuid>.json`, where the state folder is `$REWIND_STATE_DIR`,
//! else `/var/lib/rewind` for root, else `$XDG_STATE_HOME/rewind` (`~/.local/state/rewind`).

use std::path::PathBuf;

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

/// Rewind's folder for state that must survive a reboot.
#[must_use]
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REWIND_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/rewind");
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("rewind")
}

fn path(vm: &Uuid) -> PathBuf {
    state_dir().join("restoring").join(format!("{vm}.json"))
}

impl RestoreMarker {
    /// Writes the marker of VM `vm` (durably: it must outlive a power cut).
    pub fn write(&self, vm: &Uuid) -> std::io::Result<()> {
        use std::io::Write as _;
        let path = path(vm);
        let dir = path.parent().expect("has a folder");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{vm}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(self).expect("serialises"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// The marker of VM `vm` left by another process, if there is one, and whether that
    /// process still runs (a restore going on now) or not (a restore cut short).
    #[must_use]
    pub fn left_for(vm: &Uuid) -> Option<(Self, bool)> {
        let marker: Self = serde_json::from_slice(&std::fs::read(path(vm)).ok()?).ok()?;
        if marker.pid == std::process::id() {
            return None;
        }
        let running = std::path::Path::new("/proc")
            .join(marker.pid.to_string())
            .exists();
        Some((marker, running))
    }

    /// Removes the marker of VM `vm`.
    pub fn remove(vm: &Uuid) {
        let _ = std::fs::remove_file(path(vm));
    }
}
