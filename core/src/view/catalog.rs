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
    /// Its last boot-check on the engine's machine, if it had one (absent from the
    /// summaries of Rewind before boot-checks: none).
    #[serde(default)]
    pub boot_check: Option<BootCheckSummary>,
}

/// The last boot-check of a checkpoint, as the timeline shows it: whether it booted, why
/// not, and a small picture of its last screen. It travels with the checkpoint to the
/// service's clients, which cannot read the service's state folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootCheckSummary {
    /// When it was checked.
    pub checked_at: DateTime<Utc>,
    /// Whether a throwaway copy of it booted.
    pub booted: bool,
    /// Why it did not boot.
    #[serde(default)]
    pub reason: Option<String>,
    /// The last screen, at most [`crate::engine::files::THUMBNAIL_PIXELS`] pixels wide or
    /// high, as PNG (hexadecimal on the wire).
    #[serde(default, with = "png_hex")]
    pub thumbnail_png: Option<Vec<u8>>,
}

/// The largest thumbnail taken into a summary: a 320-pixel PNG is far smaller; a bigger
/// file in the state folder is not one Rewind wrote.
pub const MAX_THUMBNAIL_BYTES: u64 = 512 << 10;

impl BootCheckSummary {
    /// From a kept boot-check and its thumbnail.
    #[must_use]
    pub fn of(check: &crate::bootcheck::BootCheck, thumbnail_png: Option<Vec<u8>>) -> Self {
        let reason = match &check.outcome {
            crate::bootcheck::Outcome::Booted { .. } => None,
            crate::bootcheck::Outcome::Failed { failure } => Some(failure.to_string()),
        };
        Self {
            checked_at: check.checked_at,
            booted: check.booted(),
            reason,
            thumbnail_png: thumbnail_png
                .filter(|p| u64::try_from(p.len()).is_ok_and(|n| n <= MAX_THUMBNAIL_BYTES)),
        }
    }

    /// The last boot-check of checkpoint `id` of VM `vm` kept in the state folder
    /// `state_dir`, with its thumbnail, if it had one.
    #[must_use]
    pub fn read(state_dir: &Path, vm: &Uuid, id: &str) -> Option<Self> {
        let check = crate::bootcheck::last_check(state_dir, vm, id)?;
        let png = check
            .thumbnail
            .then(|| crate::bootcheck::thumbnail_path(state_dir, vm, id))
            .flatten()
            .and_then(|path| read_small(&path));
        Some(Self::of(&check, png))
    }
}

/// The file at `path` if it is at most [`MAX_THUMBNAIL_BYTES`] long.
fn read_small(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_THUMBNAIL_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (u64::try_from(bytes.len()).ok()? <= MAX_THUMBNAIL_BYTES).then_some(bytes)
}

/// A PNG as a hexadecimal string: the service's JSON would spell each byte as a number.
mod png_hex {
    use serde::{Deserialize as _, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` hands the field by reference
    pub(super) fn serialize<S: Serializer>(png: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match png {
            Some(bytes) => s.serialize_some(&hex::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
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
            boot_check: None,
        }
    }

    /// Marks it as the last verify of its store found it.
    fn apply(&mut self, record: Option<&VerifyRecord>) {
        let Some(r) = record else { return };
        if self.time >= r.started && r.fully_checked().is_none_or(|t| self.time >= t) {
            return; // taken after the checks began
        }
        self.damaged = r
            .broken
            .iter()
            .any(|(vm, id)| *vm == self.vm_uuid && *id == self.id);
        // Whole when a full verify began after it was taken, or when every share of the
        // rotating check was re-hashed after that.
        let whole = r.fully_checked().is_some_and(|t| self.time < t);
        self.verified = (!self.damaged && whole).then_some(r.finished);
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
    /// Since when every chunk of its store has been re-hashed (by a full verify or the
    /// rotating check), if it has.
    #[serde(default)]
    pub fully_checked: Option<DateTime<Utc>>,
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
    /// The rotating check ([`crate::policy::VERIFY_SHARES`] shares of the data): when the
    /// re-hash of each share last began. A full verify sets them all.
    #[serde(default)]
    pub shares: Vec<Option<DateTime<Utc>>>,
}

impl VerifyRecord {
    /// A full verify (not quick) that began at `started`: every share is re-hashed then.
    #[must_use]
    pub fn full(
        started: DateTime<Utc>,
        finished: DateTime<Utc>,
        broken: Vec<(Uuid, String)>,
    ) -> Self {
        Self {
            started,
            finished,
            quick: false,
            broken,
            shares: vec![Some(started); crate::policy::VERIFY_SHARES as usize],
        }
    }

    /// Adds the rotating check of share `share` (begun at `started`, ended at `finished`,
    /// finding `broken`) to the last record, if any.
    #[must_use]
    pub fn with_share(
        last: Option<Self>,
        share: u32,
        started: DateTime<Utc>,
        finished: DateTime<Utc>,
        broken: Vec<(Uuid, String)>,
    ) -> Self {
        let mut record = last.unwrap_or(Self {
            // No full verify: nothing is marked verified by it.
            started: DateTime::<Utc>::MIN_UTC,
            finished: DateTime::<Utc>::MIN_UTC,
            quick: true,
            broken: Vec::new(),
            shares: Vec::new(),
        });
        record
            .shares
            .resize(crate::policy::VERIFY_SHARES as usize, None);
        if let Some(slot) = record.shares.get_mut(share as usize) {
            *slot = Some(started);
        }
        for b in broken {
            if !record.broken.contains(&b) {
                record.broken.push(b);
            }
        }
        record.finished = record.finished.max(finished);
        record
    }

    /// Since when every chunk has been re-hashed at least once: the oldest share's check
    /// (`None` while some share never was). Checkpoints taken before it were checked whole.
    #[must_use]
    pub fn fully_checked(&self) -> Option<DateTime<Utc>> {
        if self.shares.len() < crate::policy::VERIFY_SHARES as usize {
            return (!self.quick).then_some(self.started);
        }
        self.shares
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .min()
    }
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

/// Looks at every destination of `config` now; `state_dir` holds the verify records and
/// the boot-checks' results.
#[must_use]
pub fn scan(config: &Config, state_dir: &Path) -> Vec<DestinationView> {
    let roots = destination::watch_roots(config);
    config
        .destinations
        .iter()
        .map(|d| {
            let found = destination::locate(d, &roots);
            let mut fully_checked = d
                .store_id
                .and_then(|id| verify_record(state_dir, id))
                .and_then(|r| r.fully_checked());
            let (checkpoints, error) = match &found {
                Availability::Missing { .. } => (Vec::new(), None),
                _ => match destination::open(d, &found).and_then(|s| {
                    let record = verify_record(state_dir, s.config().id);
                    Ok((s.catalog()?, record))
                }) {
                    Ok((catalog, record)) => {
                        fully_checked = record.as_ref().and_then(VerifyRecord::fully_checked);
                        (
                            catalog
                                .checkpoints
                                .iter()
                                .map(|m| {
                                    let mut c = CheckpointSummary::of(m);
                                    c.apply(record.as_ref());
                                    c.boot_check =
                                        BootCheckSummary::read(state_dir, &c.vm_uuid, &c.id);
                                    c
                                })
                                .collect(),
                            None,
                        )
                    }
                    Err(e) => (Vec::new(), Some(e.to_string())),
                },
            };
            DestinationView {
                destination: d.clone(),
                found,
                checkpoints,
                error,
                fully_checked,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::VERIFY_SHARES;
    use chrono::TimeZone as _;

    fn summary(time: DateTime<Utc>, id: &str) -> CheckpointSummary {
        let mut c = CheckpointSummary::of(&crate::store::Manifest {
            format_version: 2,
            id: id.into(),
            vm: crate::store::VmRef {
                name: "vm".into(),
                uuid: Uuid::from_bytes([1; 16]),
            },
            time,
            kind: crate::store::CheckpointKind::Disk,
            consistency: crate::store::Consistency::Crash,
            domain_xml: String::new(),
            disks: Vec::new(),
            blobs: Vec::new(),
            logical_bytes: 0,
            new_bytes: 0,
            parent: None,
            full_reason: None,
            consistency_note: None,
            duration_ms: 0,
            read_bytes: 0,
            labels: Vec::new(),
            libvirt_checkpoint: None,
            program_version: String::new(),
        });
        c.verified = None;
        c
    }

    /// A checkpoint is marked verified once every share of the rotating check was re-hashed
    /// after it was taken, and "checked whole" is the oldest share's time.
    #[test]
    fn the_rotating_checks_shares_add_up_to_a_whole_check() {
        let day = |d: u32| Utc.with_ymd_and_hms(2026, 3, d, 4, 0, 0).unwrap();
        let old = summary(day(1) - chrono::TimeDelta::days(1), "old");
        let mut record = None;
        for k in 0..VERIFY_SHARES {
            let at = day(1 + k);
            let r = VerifyRecord::with_share(record, k, at, at, Vec::new());
            if k + 1 < VERIFY_SHARES {
                assert_eq!(r.fully_checked(), None, "after {} shares", k + 1);
                let mut c = old.clone();
                c.apply(Some(&r));
                assert_eq!(c.verified, None);
            }
            record = Some(r);
        }
        let record = record.unwrap();
        assert_eq!(record.fully_checked(), Some(day(1)));
        let mut c = old.clone();
        c.apply(Some(&record));
        assert!(c.verified.is_some() && !c.damaged);
        // Taken after the first share's check: not yet whole.
        let mut late = summary(day(2), "late");
        late.apply(Some(&record));
        assert_eq!(late.verified, None);
        // Damage found by a share marks it, and a full verify starts afresh.
        let broken = VerifyRecord::with_share(
            Some(record),
            3,
            day(29),
            day(29),
            vec![(old.vm_uuid, old.id.clone())],
        );
        let mut c = old.clone();
        c.apply(Some(&broken));
        assert!(c.damaged && c.verified.is_none());
        let full = VerifyRecord::full(day(30), day(30), Vec::new());
        assert_eq!(full.fully_checked(), Some(day(30)));
        let mut c = old;
        c.apply(Some(&full));
        assert!(!c.damaged && c.verified.is_some());
        // A record from before shares existed (a full verify's): as it always was.
        let legacy = VerifyRecord {
            started: day(5),
            finished: day(5),
            quick: false,
            broken: Vec::new(),
            shares: Vec::new(),
        };
        assert_eq!(legacy.fully_checked(), Some(day(5)));
    }

    fn kept(
        dir: &Path,
        id: &str,
        outcome: crate::bootcheck::Outcome,
        png: Option<Vec<u8>>,
    ) -> crate::bootcheck::BootCheck {
        let check = crate::bootcheck::BootCheck {
            vm_uuid: Uuid::from_bytes([1; 16]),
            checkpoint: id.into(),
            checked_at: Utc.with_ymd_and_hms(2026, 12, 5, 3, 0, 0).unwrap(),
            took_ms: 21_000,
            outcome,
            thumbnail: png.is_some(),
        };
        crate::bootcheck::Checked {
            check: check.clone(),
            thumbnail_png: png,
        }
        .save_in(dir)
        .unwrap();
        check
    }

    /// The summary carries what the state folder keeps of a checkpoint's last boot-check:
    /// booted with its picture, or not and why; nothing for one never checked; and no
    /// picture bigger than a thumbnail can be.
    #[test]
    fn a_checkpoints_last_boot_check_is_read_from_the_state_folder() {
        use crate::bootcheck::{BootFailure, BootSignal, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let vm = Uuid::from_bytes([1; 16]);
        let png = b"\x89PNG not really, but bytes".to_vec();
        let good = kept(
            dir.path(),
            "20261205T010000Z",
            Outcome::Booted {
                signal: BootSignal::Agent,
            },
            Some(png.clone()),
        );
        let read = BootCheckSummary::read(dir.path(), &vm, "20261205T010000Z").unwrap();
        assert_eq!(
            read,
            BootCheckSummary {
                checked_at: good.checked_at,
                booted: true,
                reason: None,
                thumbnail_png: Some(png),
            }
        );
        kept(
            dir.path(),
            "20261205T020000Z",
            Outcome::Failed {
                failure: BootFailure::Timeout {
                    seconds: 600,
                    screen: Some(crate::bootcheck::screen::ScreenKind::TextMode),
                },
            },
            None,
        );
        let bad = BootCheckSummary::read(dir.path(), &vm, "20261205T020000Z").unwrap();
        assert!(!bad.booted);
        assert_eq!(bad.thumbnail_png, None);
        let reason = bad.reason.unwrap();
        assert!(
            reason.contains("600 s") && reason.contains("text screen"),
            "{reason}"
        );
        assert_eq!(BootCheckSummary::read(dir.path(), &vm, "never"), None);
        assert_eq!(
            BootCheckSummary::read(dir.path(), &Uuid::nil(), "20261205T010000Z"),
            None
        );
        // A huge "thumbnail" (not one Rewind wrote) is left out, the result kept.
        let huge = vec![0_u8; usize::try_from(MAX_THUMBNAIL_BYTES).unwrap() + 1];
        kept(
            dir.path(),
            "20261205T030000Z",
            Outcome::Booted {
                signal: BootSignal::Screen,
            },
            Some(huge),
        );
        let read = BootCheckSummary::read(dir.path(), &vm, "20261205T030000Z").unwrap();
        assert!(read.booted && read.thumbnail_png.is_none());
    }

    /// The thumbnail crosses the service's socket as hexadecimal and comes back the same,
    /// and a summary from a Rewind before boot-checks (no field) reads as never checked.
    #[test]
    fn a_summarys_boot_check_crosses_the_wire_and_old_summaries_still_read() {
        let mut c = summary(Utc.with_ymd_and_hms(2026, 12, 5, 1, 0, 0).unwrap(), "a");
        c.boot_check = Some(BootCheckSummary {
            checked_at: Utc.with_ymd_and_hms(2026, 12, 5, 3, 0, 0).unwrap(),
            booted: false,
            reason: Some("the screen showed a blue screen".into()),
            thumbnail_png: Some(vec![0x89, b'P', b'N', b'G', 0, 255]),
        });
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains("\"thumbnail_png\":\"89504e4700ff\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<CheckpointSummary>(&json).unwrap(), c);
        let mut old: serde_json::Value = serde_json::to_value(&c).unwrap();
        old.as_object_mut().unwrap().remove("boot_check");
        let old: CheckpointSummary = serde_json::from_value(old).unwrap();
        assert_eq!(old.boot_check, None);
        let mut bare = c.boot_check.clone().unwrap();
        bare.thumbnail_png = None;
        let json = serde_json::to_value(&bare).unwrap();
        assert_eq!(
            serde_json::from_value::<BootCheckSummary>(json).unwrap(),
            bare
        );
    }
}
