//! Retention: which checkpoints of one VM to keep, like `restic forget --keep-*`.
//!
//! Pure: no clock, no I/O. The rules are a union: a checkpoint is kept if any rule keeps it.
//!
//! - `last: N` keeps the N newest.
//! - `hourly: N` (and `daily`, `weekly`, `monthly`, `yearly`) walks from newest to oldest,
//!   puts each checkpoint in its hour (day, ISO week, month, year) in the given time zone,
//!   and keeps the newest checkpoint of each of the N most recent such periods that have
//!   one. Periods without checkpoints do not count.
//!
//! Buckets follow wall-clock time in the time zone: the hour that repeats when daylight
//! saving time ends is one bucket.
//!
//! Example: checkpoints every 15 minutes for three days with `last: 4, daily: 7` keep the
//! four newest plus the newest of each of the three days: six checkpoints (the newest one is
//! kept by both rules).

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How many checkpoints to keep per rule; 0 turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRules {
    /// The N newest.
    pub last: u32,
    /// The newest of each of the last N hours that have one.
    pub hourly: u32,
    /// The newest of each of the last N days that have one.
    pub daily: u32,
    /// The newest of each of the last N ISO weeks that have one.
    pub weekly: u32,
    /// The newest of each of the last N months that have one.
    pub monthly: u32,
    /// The newest of each of the last N years that have one.
    pub yearly: u32,
}

impl KeepRules {
    /// True when every rule is off. [`plan`] then keeps everything; callers that delete
    /// must refuse such rules instead (they would otherwise mean "delete all").
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Why a checkpoint is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// Among the newest N.
    Last,
    /// Newest of its hour.
    Hourly,
    /// Newest of its day.
    Daily,
    /// Newest of its week.
    Weekly,
    /// Newest of its month.
    Monthly,
    /// Newest of its year.
    Yearly,
    /// The VM's newest safety checkpoint (taken before a restore), kept so that the
    /// restore can be undone; not a rule of [`plan`], the caller adds it.
    Safety,
}

/// The decision for one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<K> {
    /// The caller's key for the checkpoint.
    pub key: K,
    /// Its time.
    pub time: DateTime<Utc>,
    /// Whether it is kept.
    pub keep: bool,
    /// Every rule that keeps it, in the order of [`KeepReason`].
    pub reasons: Vec<KeepReason>,
}

/// The period a time falls in, for each period rule.
fn bucket<Tz: TimeZone>(reason: KeepReason, time: &DateTime<Utc>, tz: &Tz) -> (i32, u32, u32, u32) {
    let t = time.with_timezone(tz);
    match reason {
        KeepReason::Hourly => (t.year(), t.month(), t.day(), t.hour()),
        KeepReason::Daily => (t.year(), t.month(), t.day(), 0),
        KeepReason::Weekly => {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }
        KeepReason::Monthly => (t.year(), t.month(), 0, 0),
        KeepReason::Yearly | KeepReason::Last | KeepReason::Safety => (t.year(), 0, 0, 0),
    }
}

/// Decides which of one VM's checkpoints to keep. Returns one decision per item, newest
/// first (items with equal times keep their input order).
pub fn plan<K: Clone, Tz: TimeZone>(
    items: &[(K, DateTime<Utc>)],
    rules: &KeepRules,
    tz: &Tz,
) -> Vec<Decision<K>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].1.cmp(&items[a].1)); // stable: equal times keep input order
    let mut out: Vec<Decision<K>> = order
        .iter()
        .map(|&i| Decision {
            key: items[i].0.clone(),
            time: items[i].1,
            keep: rules.is_empty(),
            reasons: Vec::new(),
        })
        .collect();
    for d in out.iter_mut().take(rules.last as usize) {
        d.reasons.push(KeepReason::Last);
    }
    let periods = [
        (KeepReason::Hourly, rules.hourly),
        (KeepReason::Daily, rules.daily),
        (KeepReason::Weekly, rules.weekly),
        (KeepReason::Monthly, rules.monthly),
        (KeepReason::Yearly, rules.yearly),
    ];
    for (reason, count) in periods {
        // A set, not just the previous bucket: where the clock goes back across a bucket
        // boundary, a bucket can recur further down the list.
        let mut seen = std::collections::HashSet::new();
        for d in &mut out {
            if seen.len() == count as usize {
                break;
            }
            if seen.insert(bucket(reason, &d.time, tz)) {
                d.reasons.push(reason);
            }
        }
    }
    for d in &mut out {
        d.keep |= !d.reasons.is_empty();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_wrap)]
    use super::*;
    use chrono::FixedOffset;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn kept(items: &[(usize, DateTime<Utc>)], rules: KeepRules) -> Vec<usize> {
        let mut k: Vec<usize> = plan(items, &rules, &Utc)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.key)
            .collect();
        k.sort_unstable();
        k
    }

    fn every(start: &str, step_minutes: i64, n: usize) -> Vec<(usize, DateTime<Utc>)> {
        (0..n)
            .map(|i| {
                (
                    i,
                    t(start) + chrono::Duration::minutes(step_minutes * i as i64),
                )
            })
            .collect()
    }

    #[test]
    fn keep_last() {
        let items = every("2026-01-01T00:00:00Z", 15, 10);
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    last: 3,
                    ..KeepRules::default()
                }
            ),
            vec![7, 8, 9]
        );
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    last: 30,
                    ..KeepRules::default()
                }
            )
            .len(),
            10
        );
    }

    #[test]
    fn hourly_keeps_the_newest_of_each_hour() {
        // 00:00 00:15 00:30 00:45 01:00 … 02:15: the newest of hours 2, 1 and 0 are 9, 7, 3.
        let items = every("2026-01-01T00:00:00Z", 15, 10);
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    hourly: 3,
                    ..KeepRules::default()
                }
            ),
            vec![3, 7, 9]
        );
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    hourly: 2,
                    ..KeepRules::default()
                }
            ),
            vec![7, 9]
        );
    }

    #[test]
    fn daily_over_a_month_with_gaps() {
        // Every 6 hours for 30 days, then the days without checkpoints do not count.
        let items = every("2026-03-01T00:00:00Z", 360, 120);
        let k = kept(
            &items,
            KeepRules {
                daily: 7,
                ..KeepRules::default()
            },
        );
        assert_eq!(k, (0..7).map(|d| 119 - 4 * d).rev().collect::<Vec<_>>());
        let sparse = vec![
            (0, t("2026-03-01T10:00:00Z")),
            (1, t("2026-03-10T10:00:00Z")),
            (2, t("2026-03-10T11:00:00Z")),
        ];
        assert_eq!(
            kept(
                &sparse,
                KeepRules {
                    daily: 2,
                    ..KeepRules::default()
                }
            ),
            vec![0, 2]
        );
    }

    #[test]
    fn weekly_follows_iso_weeks_across_the_year_boundary() {
        // 2020-12-31 (Thu) and 2021-01-03 (Sun) are both in ISO week 2020-W53.
        let items = vec![
            (0, t("2020-12-28T12:00:00Z")),
            (1, t("2020-12-31T12:00:00Z")),
            (2, t("2021-01-03T12:00:00Z")),
            (3, t("2021-01-04T12:00:00Z")),
        ];
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    weekly: 2,
                    ..KeepRules::default()
                }
            ),
            vec![2, 3]
        );
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    yearly: 5,
                    ..KeepRules::default()
                }
            ),
            vec![1, 3]
        );
    }

    #[test]
    fn monthly_and_yearly() {
        let items = vec![
            (0, t("2024-05-01T00:00:00Z")),
            (1, t("2024-05-20T00:00:00Z")),
            (2, t("2025-02-01T00:00:00Z")),
            (3, t("2026-01-01T00:00:00Z")),
            (4, t("2026-01-31T00:00:00Z")),
        ];
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    monthly: 2,
                    ..KeepRules::default()
                }
            ),
            vec![2, 4]
        );
        assert_eq!(
            kept(
                &items,
                KeepRules {
                    yearly: 3,
                    ..KeepRules::default()
                }
            ),
            vec![1, 2, 4]
        );
    }

    #[test]
    fn rules_are_a_union_with_reasons() {
        let items = every("2026-01-01T00:00:00Z", 15, 10);
        let d = plan(
            &items,
            &KeepRules {
                last: 2,
                hourly: 2,
                ..KeepRules::default()
            },
            &Utc,
        );
        assert_eq!(d[0].key, 9);
        assert_eq!(d[0].reasons, vec![KeepReason::Last, KeepReason::Hourly]);
        assert_eq!(d[1].reasons, vec![KeepReason::Last]);
        assert_eq!(d[2].reasons, vec![KeepReason::Hourly]);
        assert!(!d[3].keep && d[3].reasons.is_empty());
    }

    #[test]
    fn time_zone_moves_checkpoints_into_other_days() {
        // 23:30 UTC on the 1st is the 2nd at UTC+2: both checkpoints are then on the 2nd.
        let items = vec![
            (0, t("2026-06-01T23:30:00Z")),
            (1, t("2026-06-02T08:00:00Z")),
        ];
        let rules = KeepRules {
            daily: 5,
            ..KeepRules::default()
        };
        assert_eq!(kept(&items, rules), vec![0, 1]);
        let plus2 = FixedOffset::east_opt(2 * 3600).unwrap();
        let k: Vec<usize> = plan(&items, &rules, &plus2)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.key)
            .collect();
        assert_eq!(k, vec![1]);
    }

    #[test]
    fn empty_input_and_empty_rules() {
        assert!(
            plan::<usize, _>(
                &[],
                &KeepRules {
                    last: 3,
                    ..KeepRules::default()
                },
                &Utc
            )
            .is_empty()
        );
        let items = every("2026-01-01T00:00:00Z", 15, 5);
        assert!(KeepRules::default().is_empty());
        assert!(
            plan(&items, &KeepRules::default(), &Utc)
                .iter()
                .all(|d| d.keep && d.reasons.is_empty())
        );
    }

    #[test]
    fn equal_times_keep_input_order() {
        let when = t("2026-01-01T00:00:00Z");
        let items = vec![(0, when), (1, when), (2, when)];
        let d = plan(
            &items,
            &KeepRules {
                last: 1,
                ..KeepRules::default()
            },
            &Utc,
        );
        assert_eq!(d.iter().map(|d| d.key).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(d[0].keep && !d[1].keep);
    }

    fn arb_rules() -> impl Strategy<Value = KeepRules> {
        (0u32..5, 0u32..5, 0u32..5, 0u32..5, 0u32..5, 0u32..5).prop_map(
            |(last, hourly, daily, weekly, monthly, yearly)| KeepRules {
                last,
                hourly,
                daily,
                weekly,
                monthly,
                yearly,
            },
        )
    }

    proptest! {
        #[test]
        fn properties(minutes in proptest::collection::vec(0i64..2_000_000, 0..60), rules in arb_rules()) {
            let base = t("2020-01-01T00:00:00Z");
            let items: Vec<(usize, DateTime<Utc>)> = minutes.iter().enumerate().map(|(i, m)| (i, base + chrono::Duration::minutes(*m))).collect();
            let d = plan(&items, &rules, &Utc);
            // A permutation of the input, newest first.
            let mut keys: Vec<usize> = d.iter().map(|d| d.key).collect();
            keys.sort_unstable();
            prop_assert_eq!(keys, (0..items.len()).collect::<Vec<_>>());
            prop_assert!(d.windows(2).all(|w| w[0].time >= w[1].time));
            let kept = d.iter().filter(|d| d.keep).count();
            if !rules.is_empty() {
                let sum = rules.last + rules.hourly + rules.daily + rules.weekly + rules.monthly + rules.yearly;
                prop_assert!(kept <= sum as usize);
                if let Some(first) = d.first() {
                    prop_assert!(first.keep, "the newest is always kept");
                }
            }
            let only_last = KeepRules { last: rules.last, ..KeepRules::default() };
            if rules.last > 0 {
                let d = plan(&items, &only_last, &Utc);
                let n = (rules.last as usize).min(items.len());
                prop_assert!(d.iter().take(n).all(|d| d.keep));
                prop_assert!(d.iter().skip(n).all(|d| !d.keep));
            }
        }
    }
}
