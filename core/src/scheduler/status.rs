//! What a running scheduler is doing, written to `status.json` in Rewind's state folder at
//! every change (atomically) so that `rewind status` and a second window can show it: the
//! jobs under way (don't unplug that drive now), the destinations found or missing, and when
//! each VM's next checkpoint is due. The file goes when the scheduler stops; one left by a
//! killed scheduler is recognised by its process id.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::destination::Availability;
use crate::policy::Why;

/// A job under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    /// The VM.
    pub vm: String,
    /// The destination.
    pub destination: String,
    /// Where its store is.
    pub location: String,
    /// When it began.
    pub since: DateTime<Utc>,
    /// Why it runs.
    pub why: Why,
    /// What it is doing.
    pub phase: String,
    /// Progress.
    pub done_bytes: u64,
    /// Of.
    pub total_bytes: u64,
}

/// A destination as last looked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationStatus {
    /// Its name.
    pub name: String,
    /// Whether its store is there.
    pub available: bool,
    /// Where (folder or `ssh://` URL).
    pub location: Option<String>,
    /// Why not.
    pub reason: Option<String>,
}

impl DestinationStatus {
    /// From what [`crate::destination::locate`] found.
    #[must_use]
    pub fn of(name: &str, found: &Availability) -> Self {
        let (available, location, reason) = match found {
            Availability::Folder(p) => (true, Some(p.display().to_string()), None),
            Availability::Remote(l) => (true, Some(l.clone()), None),
            Availability::Missing { reason } => (false, None, Some(reason.clone())),
        };
        Self {
            name: name.to_owned(),
            available,
            location,
            reason,
        }
    }
}

/// The next checkpoint of a VM into a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextRun {
    /// The VM.
    pub vm: String,
    /// The destination.
    pub destination: String,
    /// When (now or later).
    pub at: DateTime<Utc>,
    /// Why then.
    pub why: Why,
    /// Protection paused.
    pub paused: bool,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The scheduler's process.
    pub pid: u32,
    /// `rewind daemon` or the window.
    pub program: String,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When this was written.
    pub updated: DateTime<Utc>,
    /// All protection paused.
    pub paused: bool,
    /// Why the configuration file does not load (the last good one is in use).
    pub config_error: Option<String>,
    /// Jobs under way.
    pub running: Vec<RunningJob>,
    /// Destinations as last looked for.
    pub destinations: Vec<DestinationStatus>,
    /// What comes next.
    pub next: Vec<NextRun>,
}

/// The status file.
#[must_use]
pub fn status_path() -> PathBuf {
    crate::paths::state_dir().join("status.json")
}

impl Status {
    /// Writes it atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::atomic_file::write(path, &bytes, 0o644)
    }

    /// The status of a scheduler that runs now, if one does.
    #[must_use]
    pub fn read_live(path: &Path) -> Option<Self> {
        let status: Self = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        Path::new("/proc")
            .join(status.pid.to_string())
            .exists()
            .then_some(status)
    }
}
