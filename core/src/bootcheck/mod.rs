//! Boot-checks: proving that a checkpoint starts, by starting it.
//!
//! [`boot_check`] starts a throwaway clone of the checkpoint straight from the store
//! ([`ThrowawayClone`]: its own name and UUID, no network, no host devices, its disks
//! overlays over the store's read-only NBD export) and watches it until it gives a **boot
//! signal** or the time is up:
//!
//! 1. **The guest agent answers** (`guest-ping`), for a VM whose definition has the agent's
//!    channel: the operating system is up far enough to run services. Booted.
//! 2. **The screen settles on a picture**: the same screen ([`screen::same_screen`]) for
//!    the settle time, in a graphics mode, not mostly one colour and not a blue screen
//!    ([`screen::ScreenKind::Picture`]): a login screen or a desktop. Booted.
//! 3. **A blue screen** (a Windows stop error or recovery screen) seen on two screenshots
//!    in a row: failed.
//! 4. **The clone stops** by itself (a crash, a guest that turns itself off): failed.
//! 5. **Time is up** without any of these: failed, with what the screen showed last (a
//!    text screen such as `SeaBIOS`' "No bootable device", a blank screen…).
//!
//! The last screenshot is kept, made small by the thumbnailer the program installs
//! ([`crate::engine::files::set_thumbnailer`]; the core has no image codec), with the
//! result in `<state dir>/boot-checks/<vm uuid>/<checkpoint>.json` and `.png`. Then the
//! clone goes with every trace of it.

pub mod screen;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::libvirt::Hypervisor;
use crate::progress::Control;
use crate::restore::RestoreError;
use crate::restore::clone::ThrowawayClone;
use crate::store::{Manifest, Store};
use screen::{Picture, ScreenKind};

/// How long a boot-check waits, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct BootCheckOptions {
    /// The longest it waits for a boot signal.
    pub timeout: Duration,
    /// How long the screen must stay the same to count as settled.
    pub settle: Duration,
    /// How often it asks the guest agent (which fails at once while none listens).
    pub poll: Duration,
    /// How often it takes a screenshot.
    pub screenshot_every: Duration,
}

impl Default for BootCheckOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_mins(10),
            settle: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            screenshot_every: Duration::from_secs(2),
        }
    }
}

/// What told that the clone booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootSignal {
    /// Its guest agent answered.
    Agent,
    /// Its screen settled on a picture.
    Screen,
}

/// Why a boot-check failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum BootFailure {
    /// No boot signal in time; what the screen showed last (if a screenshot could be
    /// taken).
    Timeout {
        /// Seconds waited.
        seconds: u64,
        /// The last screen.
        screen: Option<ScreenKind>,
    },
    /// A blue screen: a Windows stop error or recovery screen.
    BlueScreen,
    /// The clone stopped by itself.
    Stopped,
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout { seconds, screen } => {
                write!(f, "no sign of a started system after {seconds} s")?;
                match screen {
                    Some(kind) => write!(f, "; the screen showed {}", kind.describe()),
                    None => write!(f, "; no screenshot could be taken"),
                }
            }
            Self::BlueScreen => {
                write!(f, "the screen showed {}", ScreenKind::BlueScreen.describe())
            }
            Self::Stopped => write!(f, "the copy turned itself off or crashed while starting"),
        }
    }
}

/// The outcome of a boot-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// It booted.
    Booted {
        /// What said so.
        signal: BootSignal,
    },
    /// It did not.
    Failed {
        /// Why.
        failure: BootFailure,
    },
}

/// A boot-check's result, as kept for the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootCheck {
    /// The VM's UUID.
    pub vm_uuid: Uuid,
    /// The checkpoint.
    pub checkpoint: String,
    /// When it was checked.
    pub checked_at: DateTime<Utc>,
    /// How long from the clone's start to the outcome, in milliseconds.
    pub took_ms: u64,
    /// What came of it.
    pub outcome: Outcome,
    /// Whether a thumbnail of the last screen is kept beside it.
    pub thumbnail: bool,
}

impl BootCheck {
    /// Whether the checkpoint booted.
    #[must_use]
    pub fn booted(&self) -> bool {
        matches!(self.outcome, Outcome::Booted { .. })
    }
}

/// Why a boot-check could not be done (as opposed to done and failed).
#[derive(Debug, thiserror::Error)]
pub enum BootCheckError {
    /// The clone could not be made or started.
    #[error("could not start a throwaway copy of the checkpoint: {0}")]
    Clone(#[from] RestoreError),
    /// Cancelled; the clone was removed.
    #[error("the boot-check was cancelled; its copy of the VM was removed")]
    Cancelled,
}

/// A boot-check's result, with its thumbnail (PNG) when one could be made.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The result.
    pub check: BootCheck,
    /// The last screen, small, as PNG.
    pub thumbnail_png: Option<Vec<u8>>,
}

/// Boot-checks checkpoint `m` of `store` on this machine's libvirt `hv` (see the module
/// documentation). The clone is gone when this returns, whatever the outcome.
///
/// # Errors
/// The clone could not be started, or `control` cancelled the check.
pub fn boot_check(
    hv: &Hypervisor,
    store: &Arc<Store>,
    m: &Manifest,
    options: BootCheckOptions,
    control: &Control,
) -> Result<Checked, BootCheckError> {
    let checked_at = Utc::now();
    let clone = ThrowawayClone::start(hv, store, m)?;
    let has_agent = m.domain_xml.contains("org.qemu.guest_agent.0");
    let started = Instant::now();
    let mut took = None;
    let mut last_shot: Option<Instant> = None;
    let mut last_picture: Option<Picture> = None;
    let mut settled_since: Option<(Instant, Vec<u8>)> = None;
    let mut blue_in_a_row = 0;
    let outcome = loop {
        if control.check().is_err() {
            drop(clone.finish());
            return Err(BootCheckError::Cancelled);
        }
        if !hv.is_running(clone.name()) {
            break Outcome::Failed {
                failure: BootFailure::Stopped,
            };
        }
        if has_agent && hv.agent_answers(clone.name(), Duration::from_secs(1)) {
            took = Some(started.elapsed());
            // A moment for the screen to show what the system shows (not counted).
            std::thread::sleep(options.screenshot_every);
            last_picture = take_picture(hv, clone.name()).or(last_picture);
            break Outcome::Booted {
                signal: BootSignal::Agent,
            };
        }
        let shoot = last_shot.is_none_or(|at| at.elapsed() >= options.screenshot_every);
        if let Some(picture) = shoot.then(|| take_picture(hv, clone.name())).flatten() {
            last_shot = Some(Instant::now());
            let kind = picture.kind();
            blue_in_a_row = if kind == ScreenKind::BlueScreen {
                blue_in_a_row + 1
            } else {
                0
            };
            let print = picture.fingerprint();
            let now = Instant::now();
            settled_since = match settled_since {
                Some((since, before)) if screen::same_screen(&before, &print) => {
                    Some((since, before))
                }
                _ => Some((now, print)),
            };
            last_picture = Some(picture);
            if blue_in_a_row >= 2 {
                break Outcome::Failed {
                    failure: BootFailure::BlueScreen,
                };
            }
            if kind == ScreenKind::Picture
                && settled_since
                    .as_ref()
                    .is_some_and(|(since, _)| now.duration_since(*since) >= options.settle)
            {
                break Outcome::Booted {
                    signal: BootSignal::Screen,
                };
            }
        }
        if started.elapsed() >= options.timeout {
            break Outcome::Failed {
                failure: BootFailure::Timeout {
                    seconds: started.elapsed().as_secs(),
                    screen: last_picture.as_ref().map(Picture::kind),
                },
            };
        }
        std::thread::sleep(options.poll);
    };
    let took = took.unwrap_or_else(|| started.elapsed());
    if let Err(e) = clone.finish() {
        tracing::warn!("after the boot-check: {e}");
    }
    let thumbnail_png = last_picture
        .as_ref()
        .and_then(|p| crate::engine::files::thumbnail(&p.to_ppm(), "ppm"));
    tracing::info!(checkpoint = %m.id, ?outcome, "boot-check done");
    Ok(Checked {
        check: BootCheck {
            vm_uuid: m.vm.uuid,
            checkpoint: m.id.clone(),
            checked_at,
            took_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            outcome,
            thumbnail: thumbnail_png.is_some(),
        },
        thumbnail_png,
    })
}

/// A screenshot of VM `vm`, decoded; `None` when libvirt gives none (no screen yet) or
/// one that does not decode.
fn take_picture(hv: &Hypervisor, vm: &str) -> Option<Picture> {
    let shot = hv.screenshot(vm).ok()?;
    screen::decode(&shot.mime, &shot.bytes)
}

/// The folder of boot-check results of VM `vm` in the state folder `state_dir`.
fn records_dir(state_dir: &Path, vm: &Uuid) -> PathBuf {
    state_dir.join("boot-checks").join(vm.to_string())
}

/// A checkpoint id as a file name, if it is a plain one (ids come from a store).
fn file_stem(checkpoint: &str) -> Option<&str> {
    (!checkpoint.is_empty()
        && checkpoint.len() <= 64
        && checkpoint
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !checkpoint.starts_with('.'))
    .then_some(checkpoint)
}

impl Checked {
    /// Keeps the result (and thumbnail) for the checkpoint on this machine, durably, in
    /// this process's state folder.
    ///
    /// # Errors
    /// The state folder cannot be written, or the checkpoint's id cannot name a file.
    pub fn save(&self) -> std::io::Result<()> {
        self.save_in(&crate::paths::state_dir())
    }

    /// [`Checked::save`] into the state folder `state_dir`.
    ///
    /// # Errors
    /// As [`Checked::save`].
    pub fn save_in(&self, state_dir: &Path) -> std::io::Result<()> {
        let stem = file_stem(&self.check.checkpoint).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the checkpoint's id cannot name a file",
            )
        })?;
        let dir = records_dir(state_dir, &self.check.vm_uuid);
        std::fs::create_dir_all(&dir)?;
        let png = dir.join(format!("{stem}.png"));
        match &self.thumbnail_png {
            Some(bytes) => crate::atomic_file::write(&png, bytes, 0o644)?,
            None => crate::cleanup::remove_file(&png),
        }
        let json = serde_json::to_vec_pretty(&self.check).map_err(std::io::Error::other)?;
        crate::atomic_file::write(&dir.join(format!("{stem}.json")), &json, 0o644)
    }
}

/// The kept result of the last boot-check of `checkpoint` of VM `vm` in the state folder
/// `state_dir`, if any.
#[must_use]
pub fn last_check(state_dir: &Path, vm: &Uuid, checkpoint: &str) -> Option<BootCheck> {
    let stem = file_stem(checkpoint)?;
    let bytes = std::fs::read(records_dir(state_dir, vm).join(format!("{stem}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Forgets the kept result (and thumbnail) of `checkpoint` of VM `vm` in the state folder
/// `state_dir`: the checkpoint was removed from its store. The VM's folder goes once empty.
pub fn forget(state_dir: &Path, vm: &Uuid, checkpoint: &str) {
    let Some(stem) = file_stem(checkpoint) else {
        return;
    };
    let dir = records_dir(state_dir, vm);
    for ext in ["json", "png"] {
        crate::cleanup::remove_file(&dir.join(format!("{stem}.{ext}")));
    }
    // Fails while other results are kept: left then.
    std::fs::remove_dir(&dir).ok();
}

/// [`forget`] for each checkpoint that `decisions` (of a prune that was done, not a dry
/// run) removed. Checkpoint ids are times: the same id in another store would be a copy of
/// the store, whose result is forgotten too.
pub fn forget_pruned(state_dir: &Path, decisions: &[crate::store::prune::PruneDecision]) {
    for d in decisions.iter().filter(|d| !d.keep) {
        forget(state_dir, &d.vm_uuid, &d.id);
    }
}

/// The path of the kept thumbnail of `checkpoint` of VM `vm` in the state folder
/// `state_dir`, if there is one.
#[must_use]
pub fn thumbnail_path(state_dir: &Path, vm: &Uuid, checkpoint: &str) -> Option<PathBuf> {
    let path = records_dir(state_dir, vm).join(format!("{}.png", file_stem(checkpoint)?));
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(state_dir: &Path, vm: Uuid, checkpoint: &str) {
        Checked {
            check: BootCheck {
                vm_uuid: vm,
                checkpoint: checkpoint.into(),
                checked_at: Utc::now(),
                took_ms: 1,
                outcome: Outcome::Booted {
                    signal: BootSignal::Agent,
                },
                thumbnail: true,
            },
            thumbnail_png: Some(vec![1, 2, 3]),
        }
        .save_in(state_dir)
        .unwrap();
    }

    #[test]
    fn the_results_of_pruned_checkpoints_are_forgotten_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let vm = Uuid::new_v4();
        kept(dir.path(), vm, "20261201T000000.000Z");
        kept(dir.path(), vm, "20261202T000000.000Z");
        let decision = |id: &str, keep: bool| crate::store::prune::PruneDecision {
            vm: "win11".into(),
            vm_uuid: vm,
            id: id.into(),
            time: Utc::now(),
            keep,
            reasons: Vec::new(),
        };
        forget_pruned(
            dir.path(),
            &[
                decision("20261201T000000.000Z", false),
                decision("20261202T000000.000Z", true),
            ],
        );
        assert!(last_check(dir.path(), &vm, "20261201T000000.000Z").is_none());
        assert!(thumbnail_path(dir.path(), &vm, "20261201T000000.000Z").is_none());
        assert!(last_check(dir.path(), &vm, "20261202T000000.000Z").is_some());
        assert!(thumbnail_path(dir.path(), &vm, "20261202T000000.000Z").is_some());
        // The last one goes with its VM's folder; a name that is not an id does nothing.
        forget(dir.path(), &vm, "../../etc");
        forget(dir.path(), &vm, "20261202T000000.000Z");
        assert!(!records_dir(dir.path(), &vm).exists());
    }
}
