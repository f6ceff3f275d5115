//! Taking a checkpoint of a running VM into a store: its disks frozen at one instant (the
//! images under a live snapshot's short-lived overlays, read from their files, for a full;
//! a pull-mode backup's export, read over NBD, for an incremental) and streamed into the
//! store — full the first time, then incremental from the dirty bitmaps of the libvirt
//! checkpoint made by the previous checkpoint *into the same store*. A full-state checkpoint also holds the VM's memory and
//! device state, taken live (see `capture_full_state_live`) or by managed save.
//!
//! The chain cannot lie: the previous checkpoint's libvirt checkpoint must still exist,
//! cover every disk with a bitmap, and the disks must have kept their size; otherwise a
//! full capture is taken and the manifest says why. A libvirt checkpoint whose Rewind
//! checkpoint was not committed is deleted again, and the previous one of this store is
//! deleted once the new one is committed, so bitmaps do not pile up in the qcow2 files.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`take_with`]: the VM's state decides the way; options and errors |
//! | `plan.rs` | the store's chain, the disks, what killed runs left, the job's folder |
//! | `live.rs` | a running VM's disks at one instant, read over NBD or from files into the store |
//! | `overlays.rs` | the live snapshot: disks on short-lived overlays, the images under them read |
//! | `full_state.rs` | memory and devices too: the live snapshot, or the managed save |
//! | `shut_off.rs` | a shut-off VM's disk files, and a VM a restore just saved |
//! | `guards.rs` | what is undone on every path: frozen file systems, notes for a later run |

mod direct;
mod full_state;
mod guards;
mod live;
mod overlays;
mod plan;
mod shut_off;

use std::path::Path;

use chrono::Utc;
use uuid::Uuid;

use crate::libvirt::Hypervisor;
use crate::progress::{Control, Phase};
use crate::store::{Manifest, Store, StoreError};
use crate::vm::VmState;
use full_state::resume_after_killed_run;
use live::take_live;
use plan::{
    LivePlan, chain_prefix, chained, clean_up_after_killed_runs, job_dir, protected_disks,
    qcow2_files, stop_what_killed_runs_left, why_not_incremental,
};
use rewind_nbd::NbdError;
use shut_off::take_shut_off;

pub use shut_off::take_saved;

/// What can go wrong while taking a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// libvirt or the VM.
    #[error(transparent)]
    Libvirt(#[from] crate::Error),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM's UEFI variables or TPM state.
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    /// No room for the saved memory.
    #[error(transparent)]
    Staging(#[from] crate::staging::StagingError),
    /// Reading the frozen disks.
    #[error("could not read disk {target} of VM {vm:?} from the backup export: {source}")]
    Read {
        /// VM name.
        vm: String,
        /// Disk target.
        target: String,
        /// What the NBD client said.
        #[source]
        source: Box<NbdError>,
    },
    /// Reading a disk image file directly (a shut-off VM's).
    #[error("could not read disk {target} of VM {vm:?} from its image: {source}: {}", file.display())]
    ReadImage {
        /// VM name.
        vm: String,
        /// Disk target.
        target: String,
        /// The image.
        file: std::path::PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// Not possible in the VM's state.
    #[error("{0}")]
    Unsupported(String),
    /// A test asked for a failure here (`REWIND_FAULT`).
    #[error(transparent)]
    Injected(#[from] crate::fault::Injected),
}

impl CheckpointError {
    /// Whether taking the checkpoint again later can succeed without the user changing
    /// anything: libvirt's and the store's own answer, and a read of the backup export
    /// that broke off (the next job starts a new export).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Libvirt(e) => e.is_retryable(),
            Self::Store(e) => e.is_retryable(),
            Self::Read { .. } => true,
            Self::Firmware(_)
            | Self::Staging(_)
            | Self::ReadImage { .. }
            | Self::Unsupported(_)
            | Self::Injected(_) => false,
        }
    }
}

/// How to take a checkpoint, beyond the defaults.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches of one call
pub struct TakeOptions {
    /// Labels for the checkpoint, such as `safety`.
    pub labels: Vec<String>,
    /// For a shut-off VM: leave out disks whose file is gone instead of failing (a safety
    /// checkpoint before a restore keeps what is still there).
    pub skip_missing_disks: bool,
    /// The phase shown while data is copied ([`Phase::SafetyCheckpoint`] inside a restore).
    pub copy_phase: Phase,
    /// Freeze the guest's file systems through its agent when it has one (off: always
    /// crash-consistent, for guests whose applications dislike being frozen).
    pub quiesce: bool,
    /// Memory and device state too (a running VM only), so that restoring it resumes the
    /// VM where it was.
    pub full_state: bool,
    /// With `full_state`: the managed-save way (the VM paused for seconds) instead of the
    /// live way, as [`FULL_STATE_WAY_ENV`]`=save` also asks (to compare the two).
    pub managed_save: bool,
    /// The VM's checkpoints in the store as the caller has just read them
    /// ([`Store::vm_catalog`]), so that the job reads them once; `None`: read them here.
    pub known: Option<Vec<Manifest>>,
}

impl Default for TakeOptions {
    fn default() -> Self {
        Self {
            labels: Vec::new(),
            skip_missing_disks: false,
            copy_phase: Phase::Copying,
            quiesce: true,
            full_state: false,
            managed_save: false,
            known: None,
        }
    }
}

/// Takes a checkpoint of the VM `vm` (running or shut off) into `store`. `work_dir` is
/// where a folder for the NBD socket and the scratch files of the backup job is made (and
/// removed after): QEMU must be able to reach it (no private parent folders).
pub fn take(
    hv: &Hypervisor,
    store: &Store,
    vm: &str,
    work_dir: &Path,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    take_with(hv, store, vm, work_dir, &TakeOptions::default(), control)
}

/// After a process that died during a checkpoint of `vm` (name or UUID) on `uri`: stops
/// the backup job it left running in QEMU, merges back the overlays of a live snapshot it
/// left the VM running on, and thaws the guest if it left it frozen, at once rather than at
/// the VM's next checkpoint. Its libvirt checkpoint, which no manifest
/// refers to, goes at that next checkpoint (that needs the store). Returns whether there
/// was anything to stop; a VM that is gone or not running has nothing.
///
/// # Errors
/// libvirt could not be reached, or refused to stop the job.
pub fn stop_interrupted(uri: &str, vm: &str) -> Result<bool, CheckpointError> {
    let hv = Hypervisor::connect(uri)?;
    let Ok(info) = hv.vm(vm) else {
        return Ok(false);
    };
    if info.state != VmState::Running && info.state != VmState::Paused {
        return Ok(false);
    }
    let Ok(uuid) = Uuid::parse_str(&info.uuid) else {
        return Ok(false);
    };
    let stopped = stop_what_killed_runs_left(&hv, &info.name, &uuid)?;
    Ok(hv.commit_left_overlays(&info.name, &info)? || stopped)
}

/// [`take`], with options.
pub fn take_with(
    hv: &Hypervisor,
    store: &Store,
    vm: &str,
    work_dir: &Path,
    options: &TakeOptions,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let info = hv.vm(vm)?;
    if let Ok(uuid) = Uuid::parse_str(&info.uuid)
        && let Some((marker, running)) = crate::notes::RestoreMarker::left_for(&uuid)
    {
        return Err(CheckpointError::Unsupported(if running {
            format!(
                "VM {vm:?} is being restored (to checkpoint {}) by process {}; take the checkpoint when that is done",
                marker.checkpoint, marker.pid
            )
        } else {
            format!(
                "the restore of VM {vm:?} to checkpoint {} was cut short and left its disks half-written, so no checkpoint is taken of them: run that restore again, or `rewind undo-restore` to go back to how the VM was before",
                marker.checkpoint
            )
        }));
    }
    // Only read again when a killed run's leftovers changed the VM's state.
    let info = match Uuid::parse_str(&info.uuid) {
        Ok(uuid) if resume_after_killed_run(hv, vm, &uuid, &info)? => hv.vm(vm)?,
        _ => info,
    };
    if info.state == VmState::ShutOff && options.full_state {
        return Err(CheckpointError::Unsupported(format!(
            "VM {vm:?} is shut off, so it has no memory to save; take a disk checkpoint (without --full-state)"
        )));
    }
    if info.state == VmState::ShutOff {
        return take_shut_off(hv, store, &info, work_dir, options, None, control);
    }
    if info.state != VmState::Running {
        return Err(CheckpointError::Unsupported(format!(
            "VM {vm:?} is {}: a checkpoint needs it running or shut off; resume it or shut it down first",
            info.state.label()
        )));
    }
    let uuid = Uuid::parse_str(&info.uuid)
        .map_err(|e| CheckpointError::Unsupported(format!("VM {vm:?} has an odd UUID: {e}")))?;
    let disks = protected_disks(&info)?;

    let chained = chained(store, &uuid, options.known.as_deref())?;
    clean_up_after_killed_runs(hv, store, vm, &uuid, &chained)?;
    hv.remove_stale_bitmaps(vm, &qcow2_files(&disks), true)?;
    let prev = chained.last().cloned();
    let full_reason = match &prev {
        None => None,
        Some(p) => match store.unhealed_damage(p)?.len() {
            0 => why_not_incremental(hv, vm, p, &disks)?,
            n => Some(format!(
                "verify found {n} damaged chunk(s) in checkpoint {}; a full checkpoint writes them again",
                p.id
            )),
        },
    };
    let time = Utc::now();
    let new_name = format!(
        "{}-{}",
        chain_prefix(store),
        time.format("%Y%m%dT%H%M%S%3fZ")
    );
    let job_dir = job_dir(work_dir, &uuid, &hv.domain_xml(vm)?)?;
    let plan = LivePlan {
        vm,
        quiesce: options.quiesce,
        full_state: options.full_state,
        managed_save: options.managed_save
            || std::env::var(FULL_STATE_WAY_ENV).is_ok_and(|w| w == "save"),
        labels: options.labels.clone(),
        info: &info,
        uuid,
        new_name,
        time,
        prev,
        full_reason,
        disks: &disks,
    };
    let result = take_live(hv, store, &plan, &job_dir, control);
    crate::cleanup::remove_dir_all(&job_dir);
    result
}

/// Set to `save` to take full-state checkpoints the managed-save way instead of the live
/// way (for the benchmark that compares them, and tests).
pub const FULL_STATE_WAY_ENV: &str = "REWIND_FULL_STATE_WAY";

/// The blob holding a full-state checkpoint's memory and device state: a libvirt save
/// image (`virDomainSave` format), which `virDomainRestore` resumes the VM from.
pub const MEMORY_BLOB: &str = "memory";
