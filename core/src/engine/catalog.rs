//! What the window shows of each destination: whether its store is there, and a light
//! summary of every checkpoint in it (the full manifests hold the domain XML and the
//! indexes, which the timeline does not need).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::{Config, Destination};
use crate::destination::{self, Availability};
use crate::store::{CheckpointKind, Consistency, Manifest, Store};

/// One checkpoint as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// Its id.
    pub id: String,
    /// The VM's name when taken.
    pub vm: String,
    /// The VM's UUID.
    pub vm_uuid: Uuid,
    /// The instant captured.
    pub time: DateTime<Utc>,
    /// Disk-only or full state.
    pub kind: CheckpointKind,
    /// Crash- or application-consistent.
    pub consistency: Consistency,
    /// Why only crash-consistent, or what was frozen.
    pub consistency_note: Option<String>,
    /// Incremental (from a parent) or full.
    pub incremental: bool,
    /// Why full where an incremental was expected.
    pub full_reason: Option<String>,
    /// Bytes of data it holds.
    pub logical_bytes: u64,
    /// Bytes it added to the store.
    pub new_bytes: u64,
    /// How long taking it took.
    pub duration_ms: u64,
    /// Labels (`safety`).
    pub labels: Vec<String>,
    /// Disk targets.
    pub disks: Vec<String>,
    /// Whether the last verify of this store found it damaged.
    pub damaged: bool,
}

impl CheckpointSummary {
    /// From a manifest.
    #[must_use]
    pub fn of(m: &Manifest) -> Self {
        Self {
            id: m.id.clone(),
            vm: m.vm.name.clone(),
            vm_uuid: m.vm.uuid,
            time: m.time,
            kind: m.kind,
            consistency: m.consistency,
            consistency_note: m.consistency_note.clone(),
            incremental: m.parent.is_some(),
            full_reason: m.full_reason.clone(),
            logical_bytes: m.logical_bytes,
            new_bytes: m.new_bytes,
            duration_ms: m.duration_ms,
            labels: m.labels.clone(),
            disks: m.disks.iter().map(|d| d.target.clone()).collect(),
            damaged: false,
        }
    }

    /// Whether it is a safety checkpoint (taken before a restore).
    #[must_use]
    pub fn is_safety(&self) -> bool {
        self.labels
            .iter()
            .any(|l| l == crate::restore::SAFETY_LABEL)
    }
}

/// A destination as the window shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationView {
    /// Its configuration.
    pub destination: Destination,
    /// Where its store is now, or why not.
    pub found: Availability,
    /// Its checkpoints, oldest first (empty when missing).
    pub checkpoints: Vec<CheckpointSummary>,
    /// Why the store could not be read, if it could not.
    pub error: Option<String>,
}

/// Opens the store of a destination found at `found` (with its passphrase file).
pub(crate) fn open(dest: &Destination, found: &Availability) -> Result<Store, String> {
    let pass = match &dest.passphrase_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| format!("could not read the passphrase file {}: {e}", file.display()))?
                .trim_end_matches(['\n', '\r'])
                .as_bytes()
                .to_vec(),
        ),
        None => None,
    };
    match found {
        Availability::Folder(path) => Store::open(path, pass.as_deref()).map_err(|e| e.to_string()),
        Availability::Remote(location) => Err(format!(
            "ssh:// destinations cannot be shown by this version yet ({location})"
        )),
        Availability::Missing { reason } => Err(reason.clone()),
    }
}

/// Looks at every destination of `config` now.
#[must_use]
pub fn scan(config: &Config) -> Vec<DestinationView> {
    let roots = destination::watch_roots(config);
    config
        .destinations
        .iter()
        .map(|d| {
            let found = destination::locate(d, &roots);
            let (checkpoints, error) = match &found {
                Availability::Missing { .. } => (Vec::new(), None),
                _ => match open(d, &found).and_then(|s| s.catalog().map_err(|e| e.to_string())) {
                    Ok(catalog) => (
                        catalog
                            .checkpoints
                            .iter()
                            .map(CheckpointSummary::of)
                            .collect(),
                        None,
                    ),
                    Err(e) => (Vec::new(), Some(e)),
                },
            };
            DestinationView {
                destination: d.clone(),
                found,
                checkpoints,
                error,
            }
        })
        .collect()
}
