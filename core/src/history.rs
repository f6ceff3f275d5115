//! What every scheduled or manual job did, kept in Rewind's state folder as JSON lines
//! (`history.jsonl`, one record per line, appended and synced), so that `rewind history`,
//! `rewind status` and the window can say when a VM was last protected and why a job
//! failed — also after a restart. The file is rotated to `history.1.jsonl` once it passes
//! [`ROTATE_BYTES`]; both are read.
//!
//! A job under way has a file of its own beside the history (`running/`, written by
//! [`begin`], removed by [`InFlight::end`] once its record is in the history). One left
//! there is a job whose process died with it: killed, or the power went. The next start of
//! the protection service turns each into a failed record that says so
//! ([`recover_interrupted`]), so the user sees what happened to that checkpoint.

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

impl Record {
    /// Whether this is the record of a scheduled boot-check (trigger
    /// [`Why::BootCheck`]: `checkpoint` is the one checked, `outcome` `ok` when it booted,
    /// `error` why not), not of a checkpoint.
    #[must_use]
    pub fn is_boot_check(&self) -> bool {
        self.trigger == Why::BootCheck
    }

    /// The record of a job of `vm` into `destination` that begins at `started` (finished
    /// then too, `Ok`, nothing counted yet: the job fills it in).
    #[must_use]
    pub fn starting(vm: &str, destination: &str, trigger: Why, started: DateTime<Utc>) -> Self {
        Self {
            vm: vm.to_owned(),
            vm_uuid: None,
            destination: destination.to_owned(),
            location: None,
            trigger,
            started,
            finished: started,
            outcome: Outcome::Ok,
            checkpoint: None,
            incremental: None,
            read_bytes: 0,
            new_bytes: 0,
            pruned: 0,
            error: None,
            retryable: false,
        }
    }
}

/// The folder of the jobs under way, beside the history at `history`.
fn running_dir(history: &Path) -> PathBuf {
    history.with_file_name("running")
}

/// What a job that died with its process is told as (the record's error).
pub const INTERRUPTED: &str = "interrupted: Rewind's protection service stopped while this job \
     ran (it was killed, or the power went), so it took no checkpoint. Nothing it left is \
     used; the next checkpoint of this VM is taken as usual";

/// A job under way, on record until [`InFlight::end`].
#[derive(Debug)]
#[must_use = "a job left in flight is reported as interrupted at the next start"]
pub struct InFlight(PathBuf);

impl InFlight {
    /// The job's record is in the history (or could not be written): it is no longer under
    /// way. Not done on drop, so a job that panics is reported as interrupted too.
    pub fn end(self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// Puts a job that begins on record (its record as it starts), beside the history at
/// `history`.
///
/// # Errors
/// The file could not be written (the job may still run; it is just not on record).
pub fn begin(history: &Path, record: &Record) -> std::io::Result<InFlight> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = running_dir(history);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "{}-{}-{}.json",
        record.started.timestamp_micros(),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let bytes = serde_json::to_vec(record).expect("records serialise");
    crate::atomic_file::write(&path, &bytes, 0o600)?;
    Ok(InFlight(path))
}

/// Whether the job file at `path` (`<micros>-<pid>-<n>.json`) is another process's that
/// still runs.
fn run_by_a_live_process(path: &Path) -> bool {
    let pid = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.split('-').nth(1))
        .and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

/// Turns every job left under way (its process died) into a failed record in the history
/// at `history`, ended when its file was last written, with [`INTERRUPTED`] as the error;
/// returns those records. Call it only where no job of this history runs: as the one
/// scheduler of this state folder starts.
pub fn recover_interrupted(history: &Path) -> Vec<Record> {
    let dir = running_dir(history);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut left: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    left.sort();
    let mut recovered = Vec::new();
    for path in left {
        if run_by_a_live_process(&path) {
            // Another Rewind's job (root's CLI working by itself) that runs on.
            continue;
        }
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok());
        if let Some(mut record) = parsed {
            record.outcome = Outcome::Failed;
            record.error = Some(INTERRUPTED.to_owned());
            record.retryable = true;
            record.finished = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_or(record.started, DateTime::<Utc>::from)
                .max(record.started);
            if let Err(e) = append(history, &record) {
                tracing::warn!(
                    "could not record the interrupted job of {} in {}: {e}",
                    record.vm,
                    history.display()
                );
                continue;
            }
            recovered.push(record);
        } else {
            tracing::warn!(
                "{} is not a job record (cut short by a crash?): removed",
                path.display()
            );
        }
        InFlight(path).end();
    }
    recovered
}

/// What the history says about the checkpoints of VM `vm` (name or UUID) into destination
/// `destination` (boot-checks are not checkpoints and do not count).
#[must_use]
pub fn track(records: &[Record], vm: &str, uuid: Option<&str>, destination: &str) -> Track {
    let mut track = Track::default();
    for r in records.iter().filter(|r| {
        r.destination == destination
            && !r.is_boot_check()
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
            vm_uuid: Some("u-1".into()),
            outcome,
            ..Record::starting("win11", "usb", Why::Due, t)
        }
    }

    #[test]
    fn a_job_left_in_flight_becomes_one_failed_record_that_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("history.jsonl");
        let done = begin(&history, &record(1, Outcome::Ok)).unwrap();
        append(&history, &record(1, Outcome::Ok)).unwrap();
        done.end();
        // The process dies with this one under way.
        let left = begin(&history, &record(2, Outcome::Ok)).unwrap();
        std::mem::forget(left);
        std::fs::write(dir.path().join("running/torn.json"), b"{\"vm\": \"win").unwrap();
        let recovered = recover_interrupted(&history);
        assert_eq!(recovered.len(), 1);
        let all = read(&history);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].outcome, Outcome::Failed);
        assert_eq!(all[1].started, record(2, Outcome::Ok).started);
        assert!(all[1].error.as_deref().unwrap().starts_with("interrupted:"));
        assert!(all[1].retryable);
        // Nothing is left to report twice.
        assert!(recover_interrupted(&history).is_empty());
        assert_eq!(read(&history).len(), 2);
        assert_eq!(
            std::fs::read_dir(dir.path().join("running"))
                .unwrap()
                .count(),
            0
        );
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
        // A boot-check that failed is no failed checkpoint.
        let mut check = record(20, Outcome::Failed);
        check.trigger = Why::BootCheck;
        let mut all = all;
        all.push(check);
        assert!(all[3].is_boot_check());
        assert_eq!(track(&all, "win11", None, "usb").failures, 2);
    }
}
