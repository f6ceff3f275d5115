//! What the window shows of each destination: whether its store is there, and a light
//! summary of every checkpoint in it (the full manifests hold the domain XML and the
//! indexes, which the timeline does not need).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Config, Destination};
use crate::destination::{self, Availability};
use crate::store::{CheckpointKind, Consistency, Manifest};

/// One checkpoint as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// When a verify last found it whole (read back every chunk it needs).
    pub verified: Option<DateTime<Utc>>,
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
            verified: None,
        }
    }

    /// Marks it as the last verify of its store found it.
    fn apply(&mut self, record: Option<&VerifyRecord>) {
        let Some(r) = record else { return };
        if self.time >= r.started {
            return; // taken after that verify began
        }
        self.damaged = r
            .broken
            .iter()
            .any(|(vm, id)| *vm == self.vm_uuid && *id == self.id);
        self.verified = (!self.damaged && !r.quick).then_some(r.finished);
    }

    /// Whether it is a safety checkpoint (taken before a restore).
    #[must_use]
    pub fn is_safety(&self) -> bool {
        self.labels.iter().any(|l| l == crate::store::SAFETY_LABEL)
    }
}

/// A destination as the window shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// What the last verify of a store found, kept in Rewind's state folder
/// (`verified/<store id>.json`) so the timeline can mark checkpoints verified or damaged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    /// When it began (checkpoints taken later were not checked).
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// Only presence was checked.
    pub quick: bool,
    /// Checkpoints found damaged: (VM UUID, checkpoint id).
    pub broken: Vec<(Uuid, String)>,
}

fn verify_record_path(state_dir: &Path, store_id: Uuid) -> PathBuf {
    state_dir.join("verified").join(format!("{store_id}.json"))
}

/// Keeps `record` as the last verify of store `store_id` (written then renamed).
///
/// # Errors
/// The state folder cannot be written.
pub fn save_verify_record(
    state_dir: &Path,
    store_id: Uuid,
    record: &VerifyRecord,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    crate::atomic_file::write(&verify_record_path(state_dir, store_id), &bytes, 0o644)
}

/// The last verify of store `store_id`, if one was kept (and can be read).
#[must_use]
pub fn verify_record(state_dir: &Path, store_id: Uuid) -> Option<VerifyRecord> {
    serde_json::from_slice(&std::fs::read(verify_record_path(state_dir, store_id)).ok()?).ok()
}

/// Looks at every destination of `config` now; `state_dir` holds the verify records.
#[must_use]
pub fn scan(config: &Config, state_dir: &Path) -> Vec<DestinationView> {
    let roots = destination::watch_roots(config);
    config
        .destinations
        .iter()
        .map(|d| {
            let found = destination::locate(d, &roots);
            let (checkpoints, error) = match &found {
                Availability::Missing { .. } => (Vec::new(), None),
                _ => match destination::open(d, &found).and_then(|s| {
                    let record = verify_record(state_dir, s.config().id);
                    Ok((s.catalog()?, record))
                }) {
                    Ok((catalog, record)) => (
                        catalog
                            .checkpoints
                            .iter()
                            .map(|m| {
                                let mut c = CheckpointSummary::of(m);
                                c.apply(record.as_ref());
                                c
                            })
                            .collect(),
                        None,
                    ),
                    Err(e) => (Vec::new(), Some(e.to_string())),
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
