//! How well each VM is protected, in one look: the badge of the VM list and the tray, the
//! age of its newest checkpoint, the state of its destinations and its next checkpoint.
//!
//! Pure: everything comes in as arguments (the configuration, what the destinations hold,
//! the history, the clock), so the rules are tested with a fake clock.

use chrono::{DateTime, Utc};

use crate::config::{Config, Protection};
use crate::destination::Availability;
use crate::history::{self, Outcome, Record};
use crate::policy;
use crate::view::catalog::DestinationView;

/// A VM's protection in a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Badge {
    /// No protection configured.
    NotProtected,
    /// Protected, and its checkpoints are current.
    Protected,
    /// Protection paused (for this VM, or for all).
    Paused,
    /// Protection configured but not working: the last attempt failed, or the newest
    /// checkpoint is older than the policy allows.
    Failing {
        /// Why, for the user.
        why: String,
    },
}

impl Badge {
    /// The badge's word.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotProtected => "not protected",
            Self::Protected => "protected",
            Self::Paused => "paused",
            Self::Failing { .. } => "failing",
        }
    }

    /// Whether the user should look.
    #[must_use]
    pub fn needs_attention(&self) -> bool {
        matches!(self, Self::Failing { .. })
    }
}

/// One of a VM's destinations now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationState {
    /// The destination's name.
    pub name: String,
    /// Whether its store can be written now.
    pub available: bool,
    /// Where it is, or why it is not there (and what to do).
    pub detail: String,
    /// This VM's checkpoints in it.
    pub checkpoints: usize,
}

/// Everything the VM list shows about one VM's protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOverview {
    /// Its badge.
    pub badge: Badge,
    /// The newest checkpoint in any destination.
    pub last_checkpoint: Option<DateTime<Utc>>,
    /// When the next checkpoint is due (earliest over its destinations); `None` when not
    /// protected or paused.
    pub next_run: Option<DateTime<Utc>>,
    /// Its destinations.
    pub destinations: Vec<DestinationState>,
}

/// The protection of the VM `name` with UUID `uuid`, if it has one.
#[must_use]
pub fn protection_of<'a>(config: &'a Config, name: &str, uuid: &str) -> Option<&'a Protection> {
    config
        .vms
        .iter()
        .find(|p| p.uuid.as_deref() == Some(uuid))
        .or_else(|| config.vms.iter().find(|p| p.uuid.is_none() && p.vm == name))
}

/// How VM `name` (`uuid`) is protected at `now`.
#[must_use]
pub fn vm_overview(
    config: &Config,
    name: &str,
    uuid: &str,
    destinations: &[DestinationView],
    history: &[Record],
    now: DateTime<Utc>,
) -> VmOverview {
    let mine = |d: &&DestinationView| {
        d.checkpoints
            .iter()
            .filter(|c| c.vm_uuid.to_string() == uuid)
            .count()
    };
    let last_checkpoint = destinations
        .iter()
        .flat_map(|d| d.checkpoints.iter())
        .filter(|c| c.vm_uuid.to_string() == uuid)
        .map(|c| c.time)
        .max();
    let Some(protection) = protection_of(config, name, uuid) else {
        return VmOverview {
            badge: Badge::NotProtected,
            last_checkpoint,
            next_run: None,
            destinations: Vec::new(),
        };
    };
    let states: Vec<DestinationState> = protection
        .destinations
        .iter()
        .map(|d| match destinations.iter().find(|v| &v.destination.name == d) {
            None => DestinationState {
                name: d.clone(),
                available: false,
                detail: format!(
                    "there is no destination {d:?} in the configuration; choose another in Settings"
                ),
                checkpoints: 0,
            },
            Some(v) => {
                let (available, detail) = match (&v.found, &v.error) {
                    (_, Some(e)) => (false, e.clone()),
                    (Availability::Folder(p), None) => (true, p.display().to_string()),
                    (Availability::Remote(l), None) => (true, l.clone()),
                    (Availability::Missing { reason }, None) => (false, reason.clone()),
                };
                DestinationState {
                    name: d.clone(),
                    available,
                    detail,
                    checkpoints: mine(&v),
                }
            }
        })
        .collect();
    let paused = config.vm_paused_at(protection, now);
    let tracks: Vec<(String, policy::Track)> = protection
        .destinations
        .iter()
        .map(|d| (d.clone(), history::track(history, name, Some(uuid), d)))
        .collect();
    let next_run = (!paused)
        .then(|| {
            tracks
                .iter()
                .map(|(_, t)| policy::next_run(protection, t, now).0.max(now))
                .min()
        })
        .flatten();
    let badge = if paused {
        Badge::Paused
    } else if let Some(why) = failing(protection, name, uuid, &tracks, &states, history, now) {
        Badge::Failing { why }
    } else {
        Badge::Protected
    };
    VmOverview {
        badge,
        last_checkpoint,
        next_run,
        destinations: states,
    }
}

/// Why protection is failing, if it is.
fn failing(
    protection: &Protection,
    name: &str,
    uuid: &str,
    tracks: &[(String, policy::Track)],
    states: &[DestinationState],
    history: &[Record],
    now: DateTime<Utc>,
) -> Option<String> {
    if protection.destinations.is_empty() {
        return Some("it has no destination: choose one in Settings".into());
    }
    for (dest, track) in tracks {
        if track.failures > 0 {
            let error = history
                .iter()
                .rev()
                .find(|r| {
                    &r.destination == dest
                        && r.outcome == Outcome::Failed
                        && !r.is_boot_check()
                        && (r.vm_uuid.as_deref() == Some(uuid) || r.vm == name)
                })
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| "the last checkpoint failed".into());
            return Some(format!("the last checkpoint into {dest} failed: {error}"));
        }
    }
    // Protected since the first thing the history says about it (a VM protected just now
    // is not late yet).
    let since = history
        .iter()
        .filter(|r| r.vm_uuid.as_deref() == Some(uuid) || r.vm == name)
        .map(|r| r.started)
        .min()
        .unwrap_or(now);
    for ((dest, track), state) in tracks.iter().zip(states) {
        if policy::is_stale(protection, track, since, now) {
            let age = track.last_success.map_or_else(
                || "there is no checkpoint yet".to_owned(),
                |t| {
                    format!(
                        "the newest checkpoint is {} old",
                        crate::units::human_age_secs(
                            u64::try_from((now - t).num_seconds()).unwrap_or(0)
                        )
                    )
                },
            );
            let cause = if state.available {
                String::new()
            } else {
                format!(" ({})", state.detail)
            };
            return Some(format!("in {dest}, {age}{cause}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Destination;
    use crate::policy::Why;
    use crate::store::{CheckpointKind, Consistency};
    use crate::view::catalog::CheckpointSummary;
    use chrono::{Duration, TimeZone};

    const UUID: &str = "5b1c1f0e-0000-4000-8000-000000000001";

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, 0, 0).unwrap()
    }

    fn config() -> Config {
        let mut c = Config::default();
        c.destinations.push(Destination {
            name: "usb".into(),
            location: "/media/me/usb/rewind".into(),
            store_id: None,
            passphrase_file: None,
            store_secret: None,
        });
        c.vms.push(Protection {
            vm: "win11".into(),
            uuid: Some(UUID.into()),
            destinations: vec!["usb".into()],
            interval_secs: 3600,
            ..Protection::default()
        });
        c
    }

    fn checkpoint(t: DateTime<Utc>) -> CheckpointSummary {
        CheckpointSummary {
            id: t.format("%Y%m%dT%H%M%SZ").to_string(),
            vm: "win11".into(),
            vm_uuid: UUID.parse().unwrap(),
            time: t,
            kind: CheckpointKind::Disk,
            consistency: Consistency::Crash,
            consistency_note: None,
            incremental: false,
            full_reason: None,
            logical_bytes: 1,
            new_bytes: 1,
            duration_ms: 1,
            labels: Vec::new(),
            disks: vec!["vda".into()],
            damaged: false,
            verified: None,
            boot_check: None,
        }
    }

    fn view(found: Availability, checkpoints: Vec<CheckpointSummary>) -> DestinationView {
        DestinationView {
            destination: config().destinations[0].clone(),
            found,
            checkpoints,
            error: None,
            fully_checked: None,
        }
    }

    fn record(t: DateTime<Utc>, outcome: Outcome, error: Option<&str>) -> Record {
        Record {
            vm: "win11".into(),
            vm_uuid: Some(UUID.into()),
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
            error: error.map(str::to_owned),
            retryable: true,
        }
    }

    fn here() -> Availability {
        Availability::Folder("/media/me/usb/rewind".into())
    }

    #[test]
    fn an_unconfigured_vm_is_not_protected_but_its_old_checkpoints_count() {
        let views = [view(here(), vec![checkpoint(at(8))])];
        let o = vm_overview(&Config::default(), "win11", UUID, &views, &[], at(9));
        assert_eq!(o.badge, Badge::NotProtected);
        assert_eq!(o.last_checkpoint, Some(at(8)));
        assert_eq!(o.next_run, None);
    }

    #[test]
    fn current_checkpoints_are_protected_with_the_next_one_an_interval_later() {
        let views = [view(here(), vec![checkpoint(at(7)), checkpoint(at(8))])];
        let history = [record(at(8), Outcome::Ok, None)];
        let o = vm_overview(
            &config(),
            "win11",
            UUID,
            &views,
            &history,
            at(8) + Duration::minutes(10),
        );
        assert_eq!(o.badge, Badge::Protected);
        assert_eq!(o.last_checkpoint, Some(at(8)));
        assert_eq!(o.next_run, Some(at(9)));
        assert_eq!(o.destinations.len(), 1);
        assert!(o.destinations[0].available);
        assert_eq!(o.destinations[0].checkpoints, 2);
    }

    #[test]
    fn a_failed_attempt_makes_it_failing_with_the_error_in_plain_words() {
        let views = [view(here(), vec![checkpoint(at(7))])];
        let history = [
            record(at(7), Outcome::Ok, None),
            record(
                at(8),
                Outcome::Failed,
                Some("the drive is full: free some space"),
            ),
        ];
        let o = vm_overview(&config(), "win11", UUID, &views, &history, at(8));
        let Badge::Failing { why } = &o.badge else {
            panic!("{o:?}")
        };
        assert!(why.contains("the drive is full"), "{why}");
        assert!(why.contains("usb"), "{why}");
        // A success afterwards clears it.
        let history = [history[1].clone(), record(at(9), Outcome::Ok, None)];
        let o = vm_overview(&config(), "win11", UUID, &views, &history, at(9));
        assert_eq!(o.badge, Badge::Protected);
    }

    #[test]
    fn a_drive_missing_for_longer_than_the_policy_allows_is_failing_and_says_why() {
        let missing = Availability::Missing {
            reason: "the backup drive is not plugged in".into(),
        };
        let views = [view(missing, Vec::new())];
        let history = [record(at(1), Outcome::Ok, None)];
        // Missing for a few hours: not late yet (the policy allows a day).
        let o = vm_overview(&config(), "win11", UUID, &views, &history, at(5));
        assert_eq!(o.badge, Badge::Protected);
        assert!(!o.destinations[0].available);
        let o = vm_overview(
            &config(),
            "win11",
            UUID,
            &views,
            &history,
            at(1) + Duration::days(2),
        );
        let Badge::Failing { why } = &o.badge else {
            panic!("{o:?}")
        };
        assert!(why.contains("2 days old"), "{why}");
        assert!(why.contains("not plugged in"), "{why}");
    }

    #[test]
    fn pausing_wins_over_everything_and_has_no_next_run() {
        let mut c = config();
        c.paused = true;
        let history = [record(at(8), Outcome::Failed, Some("x"))];
        let o = vm_overview(
            &c,
            "win11",
            UUID,
            &[view(here(), Vec::new())],
            &history,
            at(9),
        );
        assert_eq!(o.badge, Badge::Paused);
        assert_eq!(o.next_run, None);
        let mut c = config();
        c.vms[0].paused = true;
        let o = vm_overview(&c, "win11", UUID, &[], &[], at(9));
        assert_eq!(o.badge, Badge::Paused);
    }

    #[test]
    fn a_renamed_vm_is_found_by_its_uuid() {
        let o = vm_overview(&config(), "win11-renamed", UUID, &[], &[], at(9));
        assert_ne!(o.badge, Badge::NotProtected);
        // The destination it names is not in the list of views: it says so.
        assert!(!o.destinations[0].available);
    }
}
