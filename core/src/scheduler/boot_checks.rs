//! The scheduler's boot-checks (issue 23): what [`crate::policy::next_boot_check`] is given
//! (the protected VMs' newest checkpoints from the history, the boot-checks kept in the
//! state folder and those in the history, how loaded the machine is), and the job that
//! runs one ([`crate::engine::jobs`]' `BootCheck`, so a scheduled check and `rewind
//! boot-check` are the same) and turns its outcome into a history record.
//!
//! A record of a boot-check has the trigger [`Why::BootCheck`] and the checked checkpoint;
//! it is `ok` when the checkpoint booted, `failed` with the reason when it did not, and
//! `failed` with an error that begins with [`NOT_DONE`] when the check could not be done
//! (no notification for that one: it is tried again an interval later).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::{Config, Protection};
use crate::engine::jobs::{JobOutput, JobRequest};
use crate::history::{Outcome, Record};
use crate::policy::{BootCheckCandidate, CheckSeen, Newest, Why};
use crate::progress::Control;

/// How the error of a boot-check that could not be done begins.
pub const NOT_DONE: &str = "the boot-check could not be done: ";

/// The one-minute load average per CPU, in percent (0 when `/proc/loadavg` cannot be read).
#[must_use]
pub fn load_percent() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| load_percent_of(&text, cpus))
        .unwrap_or(0)
}

/// The one-minute load average in `loadavg` (the text of `/proc/loadavg`) per CPU of
/// `cpus`, in percent.
fn load_percent_of(loadavg: &str, cpus: usize) -> Option<u32> {
    let one: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    let per_cpu = one * 100.0 / f64::from(u32::try_from(cpus.max(1)).unwrap_or(u32::MAX));
    // Rounded down and clamped: a measure, not an amount.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "clamped to 0..=100000 first"
    )]
    Some(per_cpu.clamp(0.0, 100_000.0) as u32)
}

/// Whether record `r` is about VM `p`.
fn of_vm(r: &Record, p: &Protection, uuid: Option<&str>) -> bool {
    r.vm == p.vm || (uuid.is_some() && r.vm_uuid.as_deref() == uuid)
}

/// The VM's UUID: its configuration's, or the one its newest checkpoint record names.
fn uuid_of(p: &Protection, records: &[Record]) -> Option<Uuid> {
    p.uuid
        .as_deref()
        .or_else(|| {
            records
                .iter()
                .rev()
                .find(|r| r.vm == p.vm && r.vm_uuid.is_some())
                .and_then(|r| r.vm_uuid.as_deref())
        })
        .and_then(|u| Uuid::parse_str(u).ok())
}

/// The boot-checks kept in `state_dir` for VM `vm` (by `rewind boot-check`, the window and
/// the scheduler alike).
fn kept_checks(state_dir: &Path, vm: &Uuid) -> Vec<CheckSeen> {
    let dir = state_dir.join("boot-checks").join(vm.to_string());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json")?;
            crate::bootcheck::last_check(state_dir, vm, stem)
        })
        .map(|c| CheckSeen {
            booted: Some(c.booted()),
            checkpoint: c.checkpoint,
            at: c.checked_at,
        })
        .collect()
}

/// What the policy knows of each protected VM (every destination counted as here; the
/// caller finds out for the one chosen), and each VM's UUID.
#[must_use]
pub fn candidates(
    config: &Config,
    records: &[Record],
    state_dir: &Path,
    now: DateTime<Utc>,
) -> (Vec<BootCheckCandidate>, HashMap<String, Uuid>) {
    let mut uuids = HashMap::new();
    let mut out = Vec::new();
    for p in &config.vms {
        let uuid = uuid_of(p, records);
        let uuid_text = uuid.map(|u| u.to_string());
        let mine = |r: &&Record| of_vm(r, p, uuid_text.as_deref());
        let newest = p
            .destinations
            .iter()
            .filter_map(|dest| {
                let r = records.iter().rev().filter(mine).find(|r| {
                    &r.destination == dest && !r.is_boot_check() && r.outcome == Outcome::Ok
                })?;
                Some(Newest {
                    destination: dest.clone(),
                    checkpoint: r.checkpoint.clone()?,
                    taken: r.started,
                    here: true,
                })
            })
            .collect();
        let mut checks: Vec<CheckSeen> = records
            .iter()
            .filter(mine)
            .filter(|r| r.is_boot_check() && r.outcome != Outcome::Cancelled)
            .filter_map(|r| {
                Some(CheckSeen {
                    checkpoint: r.checkpoint.clone()?,
                    at: r.started,
                    booted: (r.outcome == Outcome::Ok).then_some(true),
                })
            })
            .collect();
        if let Some(u) = uuid {
            checks.extend(kept_checks(state_dir, &u));
            uuids.insert(p.vm.clone(), u);
        }
        out.push(BootCheckCandidate {
            vm: p.vm.clone(),
            // A VM whose UUID is unknown has no checkpoint to check yet.
            enabled: p.boot_check && uuid.is_some() && !config.vm_paused_at(p, now),
            newest,
            checks,
        });
    }
    (out, uuids)
}

/// What a boot-check of `checkpoint` of VM `vm` (`vm_uuid`) from `destination` is, as a
/// record that begins now (the job fills it in).
#[must_use]
pub fn record(vm: &str, vm_uuid: Uuid, destination: &str, checkpoint: &str) -> Record {
    let mut r = Record::starting(vm, destination, Why::BootCheck, Utc::now());
    r.vm_uuid = Some(vm_uuid.to_string());
    r.checkpoint = Some(checkpoint.to_owned());
    r
}

/// Runs the boot-check that `record` (from [`record`]) describes with `config` and the
/// scheduler's `paths` (the result is kept in the state folder too), and fills in its
/// outcome.
#[must_use]
pub fn run(
    config: &Config,
    paths: &super::Paths,
    mut record: Record,
    control: &Arc<Control>,
) -> Record {
    let request = JobRequest::BootCheck {
        destination: record.destination.clone(),
        vm_uuid: record
            .vm_uuid
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok())
            .unwrap_or_default(),
        checkpoint: record.checkpoint.clone().unwrap_or_default(),
        timeout_secs: config.boot_checks.timeout_secs,
    };
    let result = crate::engine::jobs::run(config, paths, &request, control);
    record.finished = Utc::now();
    match result {
        Ok(JobOutput::BootChecked { check, .. }) => {
            if let crate::bootcheck::Outcome::Failed { failure } = &check.outcome {
                record.outcome = Outcome::Failed;
                record.error = Some(failure.to_string());
            }
        }
        Ok(_) => {
            record.outcome = Outcome::Failed;
            record.error = Some(format!("{NOT_DONE}the job answered something else"));
        }
        Err(e) if control.is_cancelled() || e.kind == crate::job_error::ErrorKind::Cancelled => {
            record.outcome = Outcome::Cancelled;
        }
        Err(e) => {
            record.outcome = Outcome::Failed;
            record.retryable = e.retryable;
            record.error = Some(format!("{NOT_DONE}{e}"));
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn the_load_is_per_cpu_in_percent() {
        assert_eq!(load_percent_of("0.50 0.40 0.30 1/100 123\n", 2), Some(25));
        assert_eq!(load_percent_of("2.98 2.85 2.51 4/184 2666", 2), Some(149));
        assert_eq!(load_percent_of("", 2), None);
        assert_eq!(load_percent_of("x 1 2", 4), None);
    }

    /// From a history and kept results: each VM's newest checkpoint per destination, and
    /// its boot-checks from both places; a cancelled one and another VM's do not count.
    #[test]
    fn candidates_come_from_the_history_and_the_kept_results() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = Uuid::from_bytes([3; 16]);
        let t = |h| Utc.with_ymd_and_hms(2026, 12, 1, h, 0, 0).unwrap();
        let ok = |h, dest: &str, id: &str| {
            let mut r = Record::starting("win11", dest, Why::Due, t(h));
            r.vm_uuid = Some(uuid.to_string());
            r.checkpoint = Some(id.into());
            r
        };
        let mut failed_checkpoint = ok(6, "usb", "c6");
        failed_checkpoint.outcome = Outcome::Failed;
        let mut cancelled_check = record("win11", uuid, "usb", "c4");
        cancelled_check.outcome = Outcome::Cancelled;
        let mut not_done = record("win11", uuid, "usb", "c4");
        not_done.started = t(5);
        not_done.outcome = Outcome::Failed;
        let records = vec![
            ok(3, "usb", "c3"),
            ok(4, "usb", "c4"),
            ok(5, "nas", "c5"),
            failed_checkpoint,
            cancelled_check,
            not_done,
            Record::starting("other", "usb", Why::Due, t(7)),
        ];
        crate::bootcheck::Checked {
            check: crate::bootcheck::BootCheck {
                vm_uuid: uuid,
                checkpoint: "c3".into(),
                checked_at: t(4),
                took_ms: 1,
                outcome: crate::bootcheck::Outcome::Booted {
                    signal: crate::bootcheck::BootSignal::Agent,
                },
                thumbnail: false,
            },
            thumbnail_png: None,
        }
        .save_in(dir.path())
        .unwrap();
        let config = Config {
            vms: vec![Protection {
                vm: "win11".into(),
                destinations: vec!["usb".into(), "nas".into()],
                ..Protection::default()
            }],
            ..Config::default()
        };
        let (c, uuids) = candidates(&config, &records, dir.path(), t(8));
        assert_eq!(uuids["win11"], uuid);
        assert!(c[0].enabled);
        let newest: Vec<_> = c[0]
            .newest
            .iter()
            .map(|n| (n.destination.as_str(), n.checkpoint.as_str()))
            .collect();
        assert_eq!(newest, [("usb", "c4"), ("nas", "c5")]);
        let mut checks: Vec<_> = c[0]
            .checks
            .iter()
            .map(|s| (s.checkpoint.as_str(), s.at, s.booted))
            .collect();
        checks.sort();
        assert_eq!(checks, [("c3", t(4), Some(true)), ("c4", t(5), None)]);

        let mut off = config.clone();
        off.vms[0].boot_check = false;
        assert!(!candidates(&off, &records, dir.path(), t(8)).0[0].enabled);
        off.vms[0].boot_check = true;
        off.paused = true;
        assert!(!candidates(&off, &records, dir.path(), t(8)).0[0].enabled);
    }
}
