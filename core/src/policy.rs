//! When to take the next checkpoint of a VM into a destination: pure, no clock, no I/O,
//! tested with literal times.
//!
//! - A VM never checkpointed into a destination is checkpointed at once.
//! - Then every `interval_secs` after the last success. A run that was missed — the host
//!   slept, the drive was unplugged for a week — is caught up once as soon as possible,
//!   not once per missed interval: the next one is counted from that success.
//! - Early, once the VM has written `activity_bytes` since the last checkpoint (but not
//!   within [`MIN_ACTIVITY_GAP_SECS`] of it).
//! - After a failure, again after a back-off that doubles from a minute up to an hour (never
//!   longer than the interval), so a flapping network is not hammered and a fixed problem
//!   is picked up soon.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Protection;

/// No activity-triggered checkpoint sooner than this after the last one.
pub const MIN_ACTIVITY_GAP_SECS: i64 = 5 * 60;
/// The first retry after a failure.
pub const FIRST_RETRY_SECS: i64 = 60;
/// The longest back-off.
pub const MAX_RETRY_SECS: i64 = 3600;

/// What is known about one VM's checkpoints into one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// The last checkpoint that succeeded.
    pub last_success: Option<DateTime<Utc>>,
    /// The last attempt, successful or not.
    pub last_attempt: Option<DateTime<Utc>>,
    /// Failures since the last success.
    pub failures: u32,
    /// Bytes the VM wrote since the last checkpoint began, when libvirt reports it.
    pub written_since_bytes: Option<u64>,
}

/// Why a checkpoint runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// There is none in this destination yet.
    First,
    /// Its interval is up.
    Due,
    /// At least one interval was missed (asleep, drive absent): one run catches up.
    CatchUp,
    /// The VM wrote more than its policy's amount since the last one.
    Activity,
    /// The last attempt failed.
    Retry,
    /// Asked for ("Checkpoint now").
    Manual,
    /// Not a checkpoint: the scheduled boot-check of the VM's newest checkpoint
    /// ([`next_boot_check`]). A history with such records is not read by a Rewind older
    /// than issue 23, which skips those lines.
    BootCheck,
}

impl Why {
    /// A word for the user.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::First => "first checkpoint",
            Self::Due => "scheduled",
            Self::CatchUp => "catching up",
            Self::Activity => "the VM wrote a lot",
            Self::Retry => "retry after a failure",
            Self::Manual => "asked for",
            Self::BootCheck => "boot-check",
        }
    }
}

/// The back-off after `failures` failures in a row.
#[must_use]
pub fn retry_after(failures: u32, interval_secs: u64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let secs = FIRST_RETRY_SECS
        .saturating_mul(1 << exp)
        .min(MAX_RETRY_SECS)
        .min(i64::try_from(interval_secs).unwrap_or(i64::MAX));
    Duration::seconds(secs)
}

/// When the next checkpoint is due and why (a time in the past means now).
#[must_use]
pub fn next_run(policy: &Protection, track: &Track, now: DateTime<Utc>) -> (DateTime<Utc>, Why) {
    let interval = Duration::seconds(i64::try_from(policy.interval_secs).unwrap_or(i64::MAX));
    if track.failures > 0
        && let Some(attempt) = track.last_attempt
    {
        return (
            attempt + retry_after(track.failures, policy.interval_secs),
            Why::Retry,
        );
    }
    let Some(success) = track.last_success else {
        return (now, Why::First);
    };
    if let (Some(limit), Some(written)) = (policy.activity_bytes, track.written_since_bytes)
        && written >= limit
    {
        return (
            (success + Duration::seconds(MIN_ACTIVITY_GAP_SECS)).max(now),
            Why::Activity,
        );
    }
    let due = success + interval;
    if now >= due + interval {
        (due, Why::CatchUp)
    } else {
        (due, Why::Due)
    }
}

/// Whether a checkpoint should start now.
#[must_use]
pub fn is_due(policy: &Protection, track: &Track, now: DateTime<Utc>) -> Option<Why> {
    let (at, why) = next_run(policy, track, now);
    (at <= now).then_some(why)
}

/// Whether the next checkpoint should hold memory and device state too: always with
/// `kind: full`; with `kind: disk` and `full_state_every_secs`, when the newest full-state
/// checkpoint (`last_full_state`, in the destination at hand) is that old or there is none.
/// Only a running VM has memory to save: a shut-off one gets a disk checkpoint.
#[must_use]
pub fn wants_full_state(
    policy: &Protection,
    running: bool,
    last_full_state: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    if !running {
        return false;
    }
    match (policy.kind, policy.full_state_every_secs) {
        (crate::config::Kind::Full, _) => true,
        (crate::config::Kind::Disk, None) => false,
        (crate::config::Kind::Disk, Some(every_secs)) => last_full_state.is_none_or(|t| {
            now - t >= Duration::seconds(i64::try_from(every_secs).unwrap_or(i64::MAX))
        }),
    }
}

/// Whether the newest checkpoint is older than the policy allows (or there has been none
/// for that long since `protected_since`).
#[must_use]
pub fn is_stale(
    policy: &Protection,
    track: &Track,
    protected_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let limit = Duration::from_std(policy.stale_after()).unwrap_or(Duration::MAX);
    now - track.last_success.unwrap_or(protected_since) > limit
}

/// The rotating check re-hashes the data of every store in this many shares, one a day:
/// every chunk at least every four weeks.
pub const VERIFY_SHARES: u32 = 28;
/// The rotating check's pace: one share per this long, unless some are overdue.
pub const VERIFY_SHARE_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(20);
/// A share not re-hashed for this long is overdue: it is checked without waiting its turn
/// (after the store was away, say), so that no chunk goes four weeks unchecked.
pub const VERIFY_SHARE_OVERDUE: chrono::TimeDelta = chrono::TimeDelta::days(27);

/// Which share of a store's data the rotating check re-hashes now, given when each share
/// last was (`shares`, any length: missing ones never were): the one checked longest ago,
/// if a share is due at all — none was checked in the last [`VERIFY_SHARE_EVERY`], or the
/// oldest is overdue. `None` while nothing is due.
#[must_use]
pub fn next_verify_share(shares: &[Option<DateTime<Utc>>], now: DateTime<Utc>) -> Option<u32> {
    let at = |k: u32| shares.get(k as usize).copied().flatten();
    let oldest = (0..VERIFY_SHARES).min_by_key(|&k| at(k))?;
    let latest = (0..VERIFY_SHARES).filter_map(at).max();
    // A share never checked is not overdue: a store new to the check is read one share a
    // day, not all at once.
    let overdue = at(oldest).is_some_and(|t| now - t > VERIFY_SHARE_OVERDUE);
    let paced = latest.is_none_or(|t| now - t >= VERIFY_SHARE_EVERY);
    (paced || overdue).then_some(oldest)
}

/// The newest checkpoint of a VM in one destination, as the history knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Newest {
    /// The destination.
    pub destination: String,
    /// The checkpoint's id.
    pub checkpoint: String,
    /// When it was taken.
    pub taken: DateTime<Utc>,
    /// Whether the destination's store is here now (a drive may be unplugged).
    pub here: bool,
}

/// A boot-check of one of a VM's checkpoints that ran, or was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSeen {
    /// The checkpoint.
    pub checkpoint: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Whether it booted; `None` when the check could not be done at all.
    pub booted: Option<bool>,
}

/// What the boot-check policy knows of one protected VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCheckCandidate {
    /// The VM's name.
    pub vm: String,
    /// Whether its boot-checks are on (its own setting, and that it is not paused).
    pub enabled: bool,
    /// Its newest checkpoint in each destination.
    pub newest: Vec<Newest>,
    /// The boot-checks of any of its checkpoints.
    pub checks: Vec<CheckSeen>,
}

/// How busy the machine is, measured outside the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// The scheduler runs a job (a checkpoint, the rotating check, a boot-check).
    pub jobs_running: bool,
    /// The one-minute load average per CPU, in percent (`/proc/loadavg`; 0 when unknown).
    pub load_percent: u32,
    /// How long the scheduler has run no job (or has run at all), in seconds.
    pub quiet_secs: u64,
}

/// Why a boot-check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCheckWhy {
    /// None of the VM's checkpoints was boot-checked yet.
    First,
    /// Its last boot-check is an interval old, and its newest checkpoint is not proven yet.
    Due,
    /// Its last boot-check failed or could not be done, an interval ago.
    Retry,
}

/// The boot-check to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCheckDue {
    /// The VM.
    pub vm: String,
    /// The destination the checkpoint is read from.
    pub destination: String,
    /// The checkpoint.
    pub checkpoint: String,
    /// Why.
    pub why: BootCheckWhy,
}

/// Which boot-check, if any, starts now (at most one at a time: the caller starts none
/// while one runs, which `busy.jobs_running` says).
///
/// - Never while the scheduler runs a job or the machine is busy (`load_percent` at or
///   above `settings.max_load_percent`), nor when `settings.enabled` is off or the VM's
///   own check is (`enabled`).
/// - For a VM, the newest checkpoint in a destination that is here.
/// - Due when the VM's last boot-check of any of its checkpoints (passed, failed or not
///   possible) is at least `settings.interval_secs` old, or it has none: so a failure is
///   tried again an interval later, not sooner, and a new checkpoint every 15 minutes does
///   not bring a check every 15 minutes.
/// - Not when that newest checkpoint already booted in a check: nothing new to prove (a VM
///   left shut off for a week is not started again every day).
/// - Of several VMs due, the one whose last check is oldest (never checked first), so that
///   no VM waits for the others.
#[must_use]
pub fn next_boot_check(
    settings: &crate::config::BootChecks,
    vms: &[BootCheckCandidate],
    busy: Busy,
    now: DateTime<Utc>,
) -> Option<BootCheckDue> {
    if !settings.enabled
        || busy.jobs_running
        || busy.load_percent >= settings.max_load_percent
        || busy.quiet_secs < settings.quiet_secs
    {
        return None;
    }
    let interval = Duration::seconds(i64::try_from(settings.interval_secs).unwrap_or(i64::MAX));
    let mut best: Option<(Option<DateTime<Utc>>, BootCheckDue)> = None;
    for vm in vms.iter().filter(|v| v.enabled) {
        let Some(newest) = vm.newest.iter().filter(|n| n.here).max_by_key(|n| n.taken) else {
            continue;
        };
        let last = vm.checks.iter().max_by_key(|c| c.at);
        // A check "in the future" (the clock was set back) counts as recent only within
        // an interval of now.
        if let Some(last) = last
            && (now - last.at < interval && last.at - now < interval)
        {
            continue;
        }
        if vm
            .checks
            .iter()
            .any(|c| c.checkpoint == newest.checkpoint && c.booted == Some(true))
        {
            continue;
        }
        let why = match last {
            None => BootCheckWhy::First,
            Some(c) if c.booted != Some(true) => BootCheckWhy::Retry,
            Some(_) => BootCheckWhy::Due,
        };
        let at = last.map(|c| c.at);
        if best.as_ref().is_none_or(|(b, _)| at < *b) {
            best = Some((
                at,
                BootCheckDue {
                    vm: vm.vm.clone(),
                    destination: newest.destination.clone(),
                    checkpoint: newest.checkpoint.clone(),
                    why,
                },
            ));
        }
    }
    best.map(|(_, due)| due)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotating check, day by day with a fake clock: one share a day, every share
    /// within four weeks; after the store was away, the overdue shares at once; and every
    /// chunk re-hashed at least every 28 days over a year of daily runs.
    #[test]
    fn the_rotating_check_re_hashes_every_share_within_four_weeks() {
        use chrono::TimeZone as _;
        let day0 = Utc.with_ymd_and_hms(2026, 1, 1, 3, 0, 0).unwrap();
        let mut shares: Vec<Option<DateTime<Utc>>> = Vec::new();
        // A new store: one share a day, the first at once.
        assert_eq!(next_verify_share(&shares, day0), Some(0));
        let mut longest_gap = chrono::TimeDelta::zero();
        let mut checks = 0;
        // The scheduler looks every few minutes; simulate hourly looks for a year.
        for hour in 0..24 * 365 {
            let now = day0 + chrono::TimeDelta::hours(hour);
            if let Some(k) = next_verify_share(&shares, now) {
                shares.resize(VERIFY_SHARES as usize, None);
                if let Some(before) = shares[k as usize] {
                    longest_gap = longest_gap.max(now - before);
                }
                shares[k as usize] = Some(now);
                checks += 1;
                assert!(
                    next_verify_share(&shares, now).is_none(),
                    "two shares at {now} with none overdue"
                );
            }
        }
        assert!(
            longest_gap <= chrono::TimeDelta::days(28),
            "a share waited {longest_gap}"
        );
        assert!((360..=460).contains(&checks), "{checks} checks in a year");

        // The drive was away for 40 days: every share is overdue and they run back to back.
        let back = day0 + chrono::TimeDelta::days(365 + 40);
        let mut run = 0;
        while let Some(k) = next_verify_share(&shares, back) {
            shares[k as usize] = Some(back);
            run += 1;
            assert!(run <= VERIFY_SHARES, "the overdue ones never end");
        }
        assert_eq!(run, VERIFY_SHARES);
    }
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, m, 0).unwrap()
    }

    fn every(minutes: u64) -> Protection {
        Protection {
            vm: "win11".into(),
            destinations: vec!["usb".into()],
            interval_secs: minutes * 60,
            ..Protection::default()
        }
    }

    fn after(success: DateTime<Utc>) -> Track {
        Track {
            last_success: Some(success),
            last_attempt: Some(success),
            ..Track::default()
        }
    }

    #[test]
    fn full_state_every_hour_and_disk_only_in_between() {
        let mut p = every(10);
        p.full_state_every_secs = Some(3600);
        // None yet: the first one holds the memory.
        assert!(wants_full_state(&p, true, None, at(9, 0)));
        // Then disk-only until the newest full-state one is an hour old.
        assert!(!wants_full_state(&p, true, Some(at(9, 0)), at(9, 10)));
        assert!(!wants_full_state(&p, true, Some(at(9, 0)), at(9, 59)));
        assert!(wants_full_state(&p, true, Some(at(9, 0)), at(10, 0)));
        // A shut-off VM has no memory to save.
        assert!(!wants_full_state(&p, false, None, at(9, 0)));
        // kind: full means every one; kind: disk alone none.
        let mut full = every(10);
        full.kind = crate::config::Kind::Full;
        assert!(wants_full_state(&full, true, Some(at(9, 9)), at(9, 10)));
        assert!(!wants_full_state(&full, false, Some(at(8, 0)), at(9, 10)));
        assert!(!wants_full_state(&every(10), true, None, at(9, 10)));
    }

    #[test]
    fn first_at_once_then_every_interval() {
        let p = every(15);
        assert_eq!(
            next_run(&p, &Track::default(), at(9, 0)),
            (at(9, 0), Why::First)
        );
        let t = after(at(9, 0));
        assert_eq!(next_run(&p, &t, at(9, 5)), (at(9, 15), Why::Due));
        assert_eq!(is_due(&p, &t, at(9, 14)), None);
        assert_eq!(is_due(&p, &t, at(9, 15)), Some(Why::Due));
    }

    #[test]
    fn a_week_asleep_is_caught_up_once() {
        let p = every(15);
        let t = after(at(9, 0));
        let a_week_later = at(9, 0) + Duration::days(7);
        assert_eq!(is_due(&p, &t, a_week_later), Some(Why::CatchUp));
        // That one run counts: the next is an interval after it, not the 671 missed ones.
        let caught_up = after(a_week_later);
        assert_eq!(
            is_due(&p, &caught_up, a_week_later + Duration::minutes(1)),
            None
        );
        assert_eq!(
            next_run(&p, &caught_up, a_week_later).0,
            a_week_later + Duration::minutes(15)
        );
    }

    #[test]
    fn failures_back_off_from_a_minute_to_an_hour_and_never_past_the_interval() {
        let p = every(4 * 60);
        let failing = |n| Track {
            last_success: Some(at(8, 0)),
            last_attempt: Some(at(9, 0)),
            failures: n,
            written_since_bytes: None,
        };
        assert_eq!(next_run(&p, &failing(1), at(9, 0)), (at(9, 1), Why::Retry));
        assert_eq!(next_run(&p, &failing(2), at(9, 0)).0, at(9, 2));
        assert_eq!(next_run(&p, &failing(4), at(9, 0)).0, at(9, 8));
        assert_eq!(next_run(&p, &failing(7), at(9, 0)).0, at(10, 0));
        assert_eq!(next_run(&p, &failing(40), at(9, 0)).0, at(10, 0));
        let short = every(5);
        assert_eq!(next_run(&short, &failing(9), at(9, 0)).0, at(9, 5));
    }

    #[test]
    fn much_writing_brings_the_next_one_forward_but_not_too_soon() {
        let mut p = every(60);
        p.activity_bytes = Some(1 << 30);
        let mut t = after(at(9, 0));
        t.written_since_bytes = Some(2 << 30);
        assert_eq!(next_run(&p, &t, at(9, 2)), (at(9, 5), Why::Activity));
        assert_eq!(is_due(&p, &t, at(9, 6)), Some(Why::Activity));
        t.written_since_bytes = Some(1 << 20);
        assert_eq!(is_due(&p, &t, at(9, 6)), None);
        // Without a report from libvirt, only the interval counts.
        t.written_since_bytes = None;
        assert_eq!(next_run(&p, &t, at(9, 6)), (at(10, 0), Why::Due));
    }

    #[test]
    fn stale_after_the_policy_s_limit() {
        let mut p = every(15);
        p.stale_after_secs = Some(3 * 86_400);
        let t = after(at(9, 0));
        assert!(!is_stale(&p, &t, at(0, 0), at(9, 0) + Duration::days(2)));
        assert!(is_stale(&p, &t, at(0, 0), at(9, 0) + Duration::days(4)));
        // Never one: counted from when protection began.
        assert!(is_stale(
            &p,
            &Track::default(),
            at(0, 0),
            at(0, 0) + Duration::days(4)
        ));
        // The default limit: a day, or three intervals if longer.
        let weekly = every(7 * 24 * 60);
        assert_eq!(weekly.stale_after().as_secs(), 21 * 86_400);
        assert_eq!(every(15).stale_after().as_secs(), 86_400);
    }

    mod boot_checks {
        use super::super::*;
        use crate::config::BootChecks;
        use chrono::TimeZone as _;

        fn day(d: u32, h: u32) -> DateTime<Utc> {
            Utc.with_ymd_and_hms(2026, 12, d, h, 0, 0).unwrap()
        }

        const IDLE: Busy = Busy {
            jobs_running: false,
            load_percent: 10,
            quiet_secs: 3600,
        };

        fn newest(dest: &str, taken: DateTime<Utc>) -> Newest {
            Newest {
                destination: dest.into(),
                checkpoint: crate::store::manifest::checkpoint_id(taken),
                taken,
                here: true,
            }
        }

        fn seen(taken: DateTime<Utc>, at: DateTime<Utc>, booted: Option<bool>) -> CheckSeen {
            CheckSeen {
                checkpoint: crate::store::manifest::checkpoint_id(taken),
                at,
                booted,
            }
        }

        fn vm(name: &str, newest: Vec<Newest>, checks: Vec<CheckSeen>) -> BootCheckCandidate {
            BootCheckCandidate {
                vm: name.into(),
                enabled: true,
                newest,
                checks,
            }
        }

        fn due(vms: &[BootCheckCandidate], busy: Busy, now: DateTime<Utc>) -> Option<BootCheckDue> {
            next_boot_check(&BootChecks::default(), vms, busy, now)
        }

        #[test]
        fn the_newest_checkpoint_here_is_checked_at_once_the_first_time() {
            let vms = [vm(
                "win11",
                vec![newest("usb", day(1, 9)), newest("nas", day(1, 10))],
                vec![],
            )];
            let d = due(&vms, IDLE, day(1, 11)).unwrap();
            assert_eq!(
                (d.vm.as_str(), d.destination.as_str(), d.why),
                ("win11", "nas", BootCheckWhy::First)
            );
            assert_eq!(
                d.checkpoint,
                crate::store::manifest::checkpoint_id(day(1, 10))
            );
            // The NAS is away: the newest one in a destination that is here.
            let mut away = vms.clone();
            away[0].newest[1].here = false;
            assert_eq!(due(&away, IDLE, day(1, 11)).unwrap().destination, "usb");
            // No checkpoint anywhere here: nothing to check.
            away[0].newest[0].here = false;
            assert_eq!(due(&away, IDLE, day(1, 11)), None);
            assert_eq!(due(&[vm("new", vec![], vec![])], IDLE, day(1, 11)), None);
        }

        #[test]
        fn never_while_a_job_runs_or_the_machine_is_busy() {
            let vms = [vm("win11", vec![newest("usb", day(1, 9))], vec![])];
            let running = Busy {
                jobs_running: true,
                ..IDLE
            };
            assert_eq!(due(&vms, running, day(1, 10)), None);
            let loaded = Busy {
                load_percent: 50,
                ..IDLE
            };
            assert_eq!(due(&vms, loaded, day(1, 10)), None);
            let calm = Busy {
                load_percent: 49,
                ..IDLE
            };
            assert!(due(&vms, calm, day(1, 10)).is_some());
            // Not right after a job (or the scheduler's start): 15 minutes of quiet first.
            let just_after = Busy {
                quiet_secs: 14 * 60,
                ..IDLE
            };
            assert_eq!(due(&vms, just_after, day(1, 10)), None);
            let quiet = Busy {
                quiet_secs: 15 * 60,
                ..IDLE
            };
            assert!(due(&vms, quiet, day(1, 10)).is_some());
        }

        #[test]
        fn turned_off_for_one_vm_or_for_all() {
            let mut vms = [
                vm("win11", vec![newest("usb", day(1, 9))], vec![]),
                vm("linux", vec![newest("usb", day(1, 8))], vec![]),
            ];
            vms[0].enabled = false;
            assert_eq!(due(&vms, IDLE, day(1, 10)).unwrap().vm, "linux");
            vms[1].enabled = false;
            assert_eq!(due(&vms, IDLE, day(1, 10)), None);
            vms[1].enabled = true;
            let off = BootChecks {
                enabled: false,
                ..BootChecks::default()
            };
            assert_eq!(next_boot_check(&off, &vms, IDLE, day(1, 10)), None);
        }

        /// A day of checkpoints every 15 minutes, hour by hour with a fake clock: one check
        /// a day, of the checkpoint that is newest then.
        #[test]
        fn after_a_success_once_a_day_of_the_newest_checkpoint() {
            let mut checks = vec![seen(day(1, 9), day(1, 9), Some(true))];
            let mut ran = Vec::new();
            for hour in 10..24 * 4 {
                let now = day(1, 9) + Duration::hours(hour);
                let vms = [vm(
                    "win11",
                    vec![newest("usb", now - Duration::minutes(7))],
                    checks.clone(),
                )];
                if let Some(d) = due(&vms, IDLE, now) {
                    assert_eq!(d.why, BootCheckWhy::Due);
                    assert_eq!(d.checkpoint, vms[0].newest[0].checkpoint);
                    checks.push(CheckSeen {
                        checkpoint: d.checkpoint,
                        at: now,
                        booted: Some(true),
                    });
                    ran.push(now);
                }
            }
            assert_eq!(ran, vec![day(2, 9), day(3, 9), day(4, 9)]);
        }

        #[test]
        fn a_newer_checkpoint_waits_for_the_interval_and_a_proven_one_is_not_checked_again() {
            let checks = vec![seen(day(1, 9), day(1, 10), Some(true))];
            // A newer checkpoint an hour later: the last check is only an hour old.
            let vms = [vm("win11", vec![newest("usb", day(1, 11))], checks.clone())];
            assert_eq!(due(&vms, IDLE, day(1, 12)), None);
            assert_eq!(due(&vms, IDLE, day(2, 9)), None);
            assert_eq!(due(&vms, IDLE, day(2, 10)).unwrap().why, BootCheckWhy::Due);
            // The VM was off for a week: its newest checkpoint booted already.
            let same = [vm("win11", vec![newest("usb", day(1, 9))], checks)];
            assert_eq!(due(&same, IDLE, day(8, 10)), None);
        }

        #[test]
        fn after_a_failure_tried_again_an_interval_later_not_sooner() {
            for booted in [Some(false), None] {
                let checks = vec![seen(day(1, 9), day(1, 10), booted)];
                let vms = [vm("win11", vec![newest("usb", day(1, 9))], checks)];
                assert_eq!(due(&vms, IDLE, day(1, 11)), None);
                assert_eq!(due(&vms, IDLE, day(2, 9)), None);
                let d = due(&vms, IDLE, day(2, 10)).unwrap();
                assert_eq!(d.why, BootCheckWhy::Retry);
                assert_eq!(
                    d.checkpoint,
                    crate::store::manifest::checkpoint_id(day(1, 9))
                );
            }
        }

        #[test]
        fn the_vm_checked_longest_ago_goes_first() {
            let vms = [
                vm(
                    "a",
                    vec![newest("usb", day(3, 9))],
                    vec![seen(day(1, 9), day(1, 12), Some(true))],
                ),
                vm(
                    "b",
                    vec![newest("usb", day(3, 9))],
                    vec![seen(day(1, 9), day(1, 10), Some(true))],
                ),
                vm(
                    "c",
                    vec![newest("usb", day(3, 9))],
                    vec![seen(day(3, 9), day(3, 9), Some(true))],
                ),
            ];
            assert_eq!(due(&vms, IDLE, day(3, 10)).unwrap().vm, "b");
            let with_new = [
                vms[0].clone(),
                vm("d", vec![newest("usb", day(3, 9))], vec![]),
            ];
            assert_eq!(due(&with_new, IDLE, day(3, 10)).unwrap().vm, "d");
        }
    }
}
