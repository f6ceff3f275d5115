//! What every scheduled or manual job did, kept in Rewind's state folder as JSON lines
//! (`history.jsonl`, one record per line, appended and synced), so that `rewind history`,
//! `rewind status` and the window can say when a VM was last protected and why a job
//! failed — also after a restart. The file is rotated to `history.1.jsonl` once it passes
//! [`ROTATE_BYTES`]; both are read.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::policy::{Track, Why};

/// The file is rotated past this size.
pub const ROTATE_BYTES: u64 = 8 << 20;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A checkpoint was taken.
    Ok,
    /// It failed (see the error).
    Failed,
    /// It was cancelled (Rewind was stopped).
    Cancelled,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The VM's name.
    pub vm: String,
    /// Its UUID, when known.
    #[serde(default)]
    pub vm_uuid: Option<String>,
    /// The destination's name.
    pub destination: String,
    /// Where the store was (a drive may be found elsewhere than configured).
    #[serde(default)]
    pub location: Option<String>,
    /// Why it ran.
    pub trigger: Why,
    /// When it began.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// How it ended.
    pub outcome: Outcome,
    /// The checkpoint taken.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Incremental or full.
    #[serde(default)]
    pub incremental: Option<bool>,
    /// Bytes read from the VM's disks.
    #[serde(default)]
    pub read_bytes: u64,
    /// Bytes added to the store.
    #[serde(default)]
    pub new_bytes: u64,
    /// Checkpoints retention removed afterwards.
    #[serde(default)]
    pub pruned: u32,
    /// What went wrong and what to do.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether trying again later can help.
    #[serde(default)]
    pub retryable: bool,
}

/// The history file in Rewind's state folder.
#[must_use]
pub fn history_path() -> PathBuf {
    crate::paths::state_dir().join("history.jsonl")
}

fn rotated(path: &Path) -> PathBuf {
    path.with_extension("1.jsonl")
}

/// Appends `record` to the history at `path` (durably).
pub fn append(path: &Path, record: &Record) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
        std::fs::rename(path, rotated(path))?;
    }
    let mut line = serde_json::to_vec(record).expect("records serialise");
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

/// Every record at `path` (the rotated file first), oldest first. Lines that do not parse
/// (a write cut short by a crash) are skipped.
#[must_use]
pub fn read(path: &Path) -> Vec<Record> {
    [rotated(path), path.to_path_buf()]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Record>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What the history says about VM `vm` (name or UUID) and destination `destination`.
#[must_use]
pub fn track(records: &[Record], vm: &str, uuid: Option<&str>, destination: &str) -> Track {
    let mut track = Track::default();
    for r in records.iter().filter(|r| {
        r.destination == destination
            && (r.vm == vm || (uuid.is_some() && r.vm_uuid.as_deref() == uuid))
    }) {
        if r.outcome == Outcome::Cancelled {
            continue;
        }
        track.last_attempt = Some(r.started);
        if r.outcome == Outcome::Ok {
            track.last_success = Some(r.started);
            track.failures = 0;
        } else {
            track.failures += 1;
        }
    }
    track
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn record(minute: u32, outcome: Outcome) -> Record {
        let t = Utc.with_ymd_and_hms(2026, 12, 1, 9, minute, 0).unwrap();
        Record {
            vm: "win11".into(),
            vm_uuid: Some("u-1".into()),
            destination: "usb".into(),
            location: None,
            trigger: Why::Due,
            started: t,
            finished: t,
            outcome,
            checkpoint: None,
            incremental: None,
            read_bytes: 0,
            new_bytes: 0,
            pruned: 0,
            error: None,
            retryable: false,
        }
    }

    #[test]
    fn history_is_appended_read_back_and_summed_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        for (m, o) in [
            (0, Outcome::Ok),
            (15, Outcome::Failed),
            (16, Outcome::Failed),
        ] {
            append(&path, &record(m, o)).unwrap();
        }
        // A line cut short by a crash is skipped, the rest reads.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"vm\": \"win")
            .unwrap();
        let all = read(&path);
        assert_eq!(all.len(), 3);
        let t = track(&all, "renamed", Some("u-1"), "usb");
        assert_eq!(t.failures, 2);
        assert_eq!(t.last_success, Some(record(0, Outcome::Ok).started));
        assert_eq!(t.last_attempt, Some(record(16, Outcome::Ok).started));
        assert_eq!(track(&all, "win11", None, "nas"), Track::default());
    }
}
