//! Finding a destination's store right now. A store is recognised by its ID
//! (`rewind-store.json`), not by where it is mounted: a removable drive may come back
//! under another path (`/media/me/BACKUP1` instead of `/media/me/BACKUP`), and a folder that
//! holds no store with that ID — above all an empty mount point while the drive is
//! unplugged — is never written to (that would fill the system disk, and the checkpoints
//! would not be on the drive).
//!
//! Drives appear under `/media/$USER`, `/run/media/$USER` and `/mnt` (what udisks2 and
//! people use) and under the folders the configuration adds; they are searched two levels
//! deep.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::config::{Config, Destination};
use crate::store::Store;

/// Where a destination's store is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// A store with the right ID, in this folder.
    Folder(PathBuf),
    /// A store on another host (`ssh://…`): reachable or not shows when it is opened.
    Remote(String),
    /// Not there now.
    Missing {
        /// What is missing and what to do, for the user.
        reason: String,
    },
}

/// The folders searched for removable drives.
#[must_use]
pub fn watch_roots(config: &Config) -> Vec<PathBuf> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".into());
    let mut roots = vec![
        Path::new("/media").join(&user),
        Path::new("/run/media").join(&user),
        PathBuf::from("/mnt"),
    ];
    roots.extend(config.watch_paths.iter().cloned());
    roots
}

/// Whether `dir` holds the store `id` (or any store, for `None`).
fn holds(dir: &Path, id: Option<Uuid>) -> bool {
    Store::probe(dir).is_ok_and(|c| id.is_none_or(|id| c.id == id))
}

/// Looks for the store of `dest` now.
#[must_use]
pub fn locate(dest: &Destination, roots: &[PathBuf]) -> Availability {
    if dest.location.starts_with("ssh://") {
        return Availability::Remote(dest.location.clone());
    }
    let configured = PathBuf::from(&dest.location);
    if holds(&configured, dest.store_id) {
        return Availability::Folder(configured);
    }
    if let Some(id) = dest.store_id {
        // The same drive under another mount point: the store keeps its place in the
        // drive, so look for the same relative place below each root, then anywhere two
        // levels down.
        for root in roots {
            for candidate in candidates(root) {
                if holds(&candidate, Some(id)) {
                    return Availability::Folder(candidate);
                }
            }
        }
    }
    let reason = match dest.store_id {
        Some(id) if configured.exists() => format!(
            "the backup drive is not plugged in: {} holds no Rewind store with ID {id}. Plug in the drive; Rewind finds it wherever it is mounted",
            configured.display()
        ),
        Some(id) => format!(
            "the backup drive is not plugged in: no Rewind store with ID {id} at {} or under {}. Plug in the drive",
            configured.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "there is no Rewind store at {}; create one with `rewind protect` or `rewind init`",
            configured.display()
        ),
    };
    Availability::Missing { reason }
}

/// The folders one and two levels below `root`, and a `rewind` folder in each (where
/// `rewind protect` suggests putting a store on a drive).
fn candidates(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(first) = std::fs::read_dir(root) else {
        return out;
    };
    for a in first.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        out.push(a.clone());
        if let Ok(second) = std::fs::read_dir(&a) {
            out.extend(second.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InitOptions;

    #[test]
    fn a_store_is_found_by_its_id_wherever_the_drive_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let drive = dir.path().join("media/BACKUP");
        let store = Store::init(&drive.join("rewind"), &InitOptions::default()).unwrap();
        let id = store.config().id;
        let dest = Destination {
            name: "usb".into(),
            location: drive.join("rewind").display().to_string(),
            store_id: Some(id),
            passphrase_file: None,
        };
        let roots = vec![dir.path().join("media")];
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(drive.join("rewind"))
        );

        // Unplugged: the mount point is an empty folder, which is never taken for it.
        std::fs::rename(&drive, dir.path().join("elsewhere")).unwrap();
        std::fs::create_dir_all(&drive).unwrap();
        let Availability::Missing { reason } = locate(&dest, &roots) else {
            panic!("found a store that is not there")
        };
        assert!(
            reason.contains("not plugged in") && reason.contains(&id.to_string()),
            "{reason}"
        );

        // Plugged in again under another name.
        let again = dir.path().join("media/BACKUP1");
        std::fs::rename(dir.path().join("elsewhere"), &again).unwrap();
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(again.join("rewind"))
        );

        // Another store in the configured place does not count.
        let other = Store::init(&drive.join("rewind"), &InitOptions::default()).unwrap();
        assert_ne!(other.config().id, id);
        assert_eq!(
            locate(&dest, &roots),
            Availability::Folder(again.join("rewind"))
        );
    }
}
