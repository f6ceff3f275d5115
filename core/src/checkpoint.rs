//! Taking a checkpoint of a running VM into a store: a pull-mode backup frozen at one
//! instant, read over NBD and streamed into the store — full the first time, then
//! incremental from the dirty bitmaps of the libvirt checkpoint made by the previous
//! checkpoint *into the same store*. A full-state checkpoint also holds the VM's memory and
//! device state, taken live (see `capture_full_state_live`) or by managed save.
//!
//! The chain cannot lie: the previous checkpoint's libvirt checkpoint must still exist,
//! cover every disk with a bitmap, and the disks must have kept their size; otherwise a
//! full capture is taken and the manifest says why. A libvirt checkpoint whose Rewind
//! checkpoint was not committed is deleted again, and the previous one of this store is
//! deleted once the new one is committed, so bitmaps do not pile up in the qcow2 files.

use std::fmt::Write as _;
use std::path::Path;

use chrono::Utc;
use uuid::Uuid;

use crate::cleanup::OrWarn as _;
use crate::firmware::FirmwareState;
use crate::libvirt::Hypervisor;
use crate::libvirt::agent::AgentState;
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdError, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use crate::notes::{FROZEN, ProcessNote, SAVED};
use crate::progress::{Control, Phase};
use crate::qemu_nbd::{Access, QemuNbd};
use crate::staging::Staging;
use crate::store::{
    CheckpointKind, CheckpointWriter, Consistency, Manifest, NewCheckpoint, Store, StoreError,
    VmRef,
};
use crate::vm::VmState;

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
    /// Not possible in the VM's state.
    #[error("{0}")]
    Unsupported(String),
}

/// The libvirt checkpoint name prefix of a store: each store keeps its own chain.
fn chain_prefix(store: &Store) -> String {
    format!("rewind-{}", &store.config().id.simple().to_string()[..12])
}

/// This VM's checkpoints in `store` that left a libvirt checkpoint behind, oldest first
/// (the catalog is read once per checkpoint taken: it reads every manifest).
fn chained(store: &Store, vm_uuid: &Uuid) -> Result<Vec<Manifest>, StoreError> {
    Ok(store
        .catalog()?
        .checkpoints
        .into_iter()
        .filter(|m| m.vm.uuid == *vm_uuid && m.libvirt_checkpoint.is_some())
        .collect())
}

/// Why `prev` cannot be the base of an incremental, or `None` if it can.
fn why_not_incremental(
    hv: &Hypervisor,
    vm: &str,
    prev: &Manifest,
    disks: &[DiskPlan],
) -> Result<Option<String>, crate::Error> {
    let Some(name) = prev.libvirt_checkpoint.as_deref() else {
        return Ok(Some(
            "the previous checkpoint has no libvirt checkpoint".into(),
        ));
    };
    if !hv.checkpoint_names(vm)?.iter().any(|n| n == name) {
        return Ok(Some(format!(
            "libvirt no longer has checkpoint {name} (VM redefined, host reinstalled, or metadata lost)"
        )));
    }
    let xml = hv.checkpoint_xml(vm, name)?;
    let doc = roxmltree::Document::parse(&xml)
        .map_err(|e| crate::Error::Invalid(format!("checkpoint {name} has unreadable XML: {e}")))?;
    for (target, size, _, format) in disks {
        let has_bitmap = doc.descendants().any(|n| {
            n.has_tag_name("disk")
                && n.attribute("name") == Some(target)
                && n.attribute("checkpoint") == Some("bitmap")
        });
        // Raw images cannot hold bitmaps: they are read whole every time.
        if !has_bitmap && format.as_deref() == Some("qcow2") {
            return Ok(Some(format!(
                "libvirt checkpoint {name} has no bitmap for disk {target}"
            )));
        }
        match prev.disks.iter().find(|d| d.target == *target) {
            None => {
                return Ok(Some(format!(
                    "disk {target} is new since the previous checkpoint"
                )));
            }
            Some(d) if d.index.size_bytes != *size => {
                return Ok(Some(format!(
                    "disk {target} was resized ({} -> {size} bytes)",
                    d.index.size_bytes
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// A disk to capture: target, virtual size, host path, format.
type DiskPlan = (String, u64, Option<String>, Option<String>);

fn protected_disks(info: &crate::vm::VmInfo) -> Result<Vec<DiskPlan>, CheckpointError> {
    let disks: Vec<DiskPlan> = info
        .protected_disks()
        .map(|d| {
            (
                d.target.clone(),
                d.virtual_size_bytes.unwrap_or(0),
                d.path().map(|p| p.display().to_string()),
                d.format.clone(),
            )
        })
        .collect();
    if disks.is_empty() {
        return Err(CheckpointError::Unsupported(format!(
            "VM {:?} has no disk Rewind can protect",
            info.name
        )));
    }
    Ok(disks)
}

/// What a Rewind killed in the middle of a checkpoint leaves behind: a pull-backup job that
/// still runs (it would refuse the next one), and a libvirt checkpoint of this store that no
/// manifest refers to (it must never become a base, and its bitmaps would pile up).
fn clean_up_after_killed_runs(
    hv: &Hypervisor,
    store: &Store,
    vm: &str,
    uuid: &Uuid,
    chained: &[Manifest],
) -> Result<(), CheckpointError> {
    if let Some(job) = hv.backup_job_xml(vm)?
        && job.contains("rewind-nbd.sock")
    {
        hv.abort_job(vm)?;
    }
    if FROZEN.left_by_dead_process(uuid) {
        // A Rewind killed while the guest was frozen: thaw it (harmless if not frozen).
        hv.thaw_filesystems(vm)?;
        FROZEN.remove(uuid);
    }
    let prefix = chain_prefix(store);
    for name in hv.checkpoint_names(vm)? {
        if name.starts_with(&prefix)
            && !chained
                .iter()
                .any(|m| m.libvirt_checkpoint.as_deref() == Some(name.as_str()))
        {
            hv.delete_checkpoint(vm, &name)?;
        }
    }
    Ok(())
}

/// The qcow2 disks among `disks`, with their image files.
fn qcow2_files(disks: &[DiskPlan]) -> Vec<(String, &Path)> {
    disks
        .iter()
        .filter(|d| d.3.as_deref() == Some("qcow2"))
        .filter_map(|d| d.2.as_deref().map(|p| (d.0.clone(), Path::new(p))))
        .collect()
}

/// The user and group QEMU runs VM as, from the DAC label of its live XML (`+64055:+64055`).
fn qemu_owner(live_xml: &str) -> Option<(u32, u32)> {
    let doc = roxmltree::Document::parse(live_xml).ok()?;
    let label = doc
        .descendants()
        .find(|n| n.has_tag_name("seclabel") && n.attribute("model") == Some("dac"))?
        .children()
        .find(|n| n.has_tag_name("label"))?
        .text()?;
    let (user, group) = label.trim().split_once(':')?;
    Some((
        user.strip_prefix('+')?.parse().ok()?,
        group.strip_prefix('+')?.parse().ok()?,
    ))
}

/// The owner to give a folder that the VM's QEMU (or libvirt on its behalf) writes into:
/// QEMU's user when Rewind runs as root and QEMU as someone else.
fn hand_to_qemu(live_xml: &str) -> Option<(u32, u32)> {
    let me = rustix::process::geteuid().as_raw();
    qemu_owner(live_xml).filter(|&(uid, _)| me == 0 && uid != me)
}

/// What a saved memory image holds besides the RAM (device state, the header), at most.
const DEVICE_STATE_MARGIN_BYTES: u64 = 64 << 20;

/// A folder for one VM's backup job inside `work_dir`, writable by that VM's QEMU and by
/// nobody else: owned by QEMU's user when Rewind runs as root (`qemu:///system`), private
/// when QEMU runs as Rewind's own user (`qemu:///session`). Only when neither holds (a
/// desktop user driving `qemu:///system`) is it open to all, under an unguessable name.
fn job_dir(
    work_dir: &Path,
    vm_uuid: &Uuid,
    live_xml: &str,
) -> Result<std::path::PathBuf, CheckpointError> {
    use std::os::unix::fs::PermissionsExt as _;
    // Short: the socket's whole path must fit the 107 bytes a Unix socket address allows.
    let dir = work_dir.join(format!(
        "{}-{}",
        &vm_uuid.simple().to_string()[..8],
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    if dir.join("rewind-nbd.sock").as_os_str().len() > 107 {
        return Err(CheckpointError::Unsupported(format!(
            "the work folder {} has too long a path for the backup's socket; use a shorter one (TMPDIR)",
            work_dir.display()
        )));
    }
    let failed = |what: &str, e: std::io::Error| {
        CheckpointError::Unsupported(format!(
            "could not {what} the backup folder {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir(&dir).map_err(|e| failed("create", e))?;
    // A new folder belongs to the effective user: that is who Rewind runs as.
    let me = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&dir).map_err(|e| failed("look at", e))?,
    );
    let mode = match qemu_owner(live_xml) {
        Some((uid, _)) if uid == me => 0o700,
        Some((uid, gid)) if me == 0 => {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| failed("hand QEMU", e))?;
            0o700
        }
        _ => 0o777,
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| failed("set the permissions of", e))?;
    Ok(dir)
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

    let chained = chained(store, &uuid)?;
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

/// What was decided before a live capture.
struct LivePlan<'a> {
    vm: &'a str,
    quiesce: bool,
    /// Memory and device state too.
    full_state: bool,
    /// ... the managed-save way.
    managed_save: bool,
    labels: Vec<String>,
    info: &'a crate::vm::VmInfo,
    uuid: Uuid,
    /// The libvirt checkpoint to create.
    new_name: String,
    time: chrono::DateTime<Utc>,
    /// The last checkpoint of this VM in this store with a libvirt checkpoint.
    prev: Option<Manifest>,
    /// Why not incremental from `prev`, if so.
    full_reason: Option<String>,
    disks: &'a [DiskPlan],
}

/// The live capture, with the job folder made.
fn take_live(
    hv: &Hypervisor,
    store: &Store,
    plan: &LivePlan<'_>,
    job_dir: &Path,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let targets: Vec<String> = plan.disks.iter().map(|d| d.0.clone()).collect();
    let socket = job_dir.join("rewind-nbd.sock");
    control.set_phase(Phase::Capturing);
    let captured = if plan.full_state {
        // The live way first (a pause of a fraction of a second, see
        // `capture_full_state_live`); the managed save where libvirt refuses it.
        let live = if plan.managed_save {
            Err("the managed save was asked for".to_owned())
        } else {
            capture_full_state_live(hv, plan)?
        };
        match live {
            Ok(captured) => captured,
            Err(live_error) => {
                let mut captured = capture_full_state(hv, plan, &socket, &targets)?;
                if !plan.managed_save {
                    let _ = write!(
                        captured.consistency_note,
                        "; saved with the VM paused because the live snapshot failed: {live_error}"
                    );
                }
                captured
            }
        }
    } else {
        capture_disks(hv, plan, &socket, &targets)?
    };
    copy_captured(hv, store, plan, captured, job_dir, control)
}

/// Set to `save` to take full-state checkpoints the managed-save way instead of the live
/// way (for the benchmark that compares them, and tests).
pub const FULL_STATE_WAY_ENV: &str = "REWIND_FULL_STATE_WAY";

/// Memory, device state and disks of one instant, the live way: libvirt saves the memory
/// while the guest runs and, at the end, pauses it only to put every protected disk on a
/// new overlay (a live external snapshot). The images under the overlays then hold that
/// instant; they are read through `qemu-nbd --read-only` (with the previous checkpoint's
/// persistent bitmap, which the images keep, for an incremental), then the overlays are
/// merged back (active block commit and pivot).
///
/// Measured against the managed save (`tests/benches/fullstate.rs`, `core/BENCHMARKS.md`):
/// the guest pauses for a fraction of a second instead of seconds, because QEMU neither
/// stops nor restarts; the cost is that the guest's writes during the copy go to overlays
/// beside its disks (disk space for what it writes meanwhile) and are merged back after.
/// The new libvirt checkpoint is made just before the snapshot, so its bitmaps cover the
/// snapshot's instant with a little to spare (an incremental from it reads those blocks
/// again: never too little).
///
/// `Ok(Err(why))` when the live snapshot cannot be taken (nothing was changed: the caller
/// falls back to the managed save); `Err` for a failure after it.
fn capture_full_state_live(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
) -> Result<Result<Captured, String>, CheckpointError> {
    use crate::libvirt::live_snapshot::OVERLAY_MARK;
    let vm = plan.vm;
    if !hv.is_local() {
        return Ok(Err("the daemon is not on this machine".into()));
    }
    let mut overlays = Vec::new();
    for (target, _, source, _) in plan.disks {
        let Some(path) = source else {
            return Ok(Err(format!("disk {target} is not a file")));
        };
        let short = &Uuid::new_v4().simple().to_string()[..8];
        overlays.push((
            target.clone(),
            std::path::PathBuf::from(format!("{path}{OVERLAY_MARK}{short}.qcow2")),
        ));
    }
    let targets: Vec<String> = plan.disks.iter().map(|d| d.0.clone()).collect();
    let domain_xml = hv.domain_xml(vm)?;
    // The memory goes beside the first disk, never into a shared /tmp (see `staging`).
    let beside = overlays[0].1.parent().unwrap_or(Path::new("/"));
    let staging = match Staging::new(
        beside,
        plan.info
            .memory_bytes
            .saturating_add(DEVICE_STATE_MARGIN_BYTES),
        &format!("save the memory of VM {vm:?}"),
        hand_to_qemu(&domain_xml),
    ) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if let Err(e) = hv.create_checkpoint(vm, &plan.new_name, &targets) {
        return Ok(Err(e.to_string()));
    }
    let memory_path = staging.path().join("memory.save");
    let started = std::time::Instant::now();
    let drop_checkpoint = || {
        hv.delete_checkpoint(vm, &plan.new_name)
            .or_warn(format_args!(
                "delete libvirt checkpoint {} of VM {vm:?}",
                plan.new_name
            ));
    };
    if let Err(e) = hv.live_external_snapshot(vm, &memory_path, &overlays) {
        drop_checkpoint();
        for (_, file) in &overlays {
            crate::cleanup::remove_file(file);
        }
        return Ok(Err(e.to_string()));
    }
    let snapshot_ms = started.elapsed().as_millis();
    // Undoes the snapshot after a failure: the overlays merged back, the checkpoint gone.
    let abandon = |frozen: FrozenDisks| {
        frozen
            .end(hv, vm)
            .or_warn(format_args!("merge the overlays of VM {vm:?} back"));
        drop_checkpoint();
    };
    let frozen = FrozenDisks::Overlays(overlays);
    // As close to the saved instant as can be: the memory's TPM blobs are of its end.
    let firmware = FirmwareState::read(plan.info);
    if let Err(e) = crate::fault::point("after-live-snapshot") {
        abandon(frozen);
        return Err(CheckpointError::Unsupported(e));
    }
    let firmware = match firmware {
        Ok(f) => f,
        Err(e) => {
            abandon(frozen);
            return Err(e.into());
        }
    };
    let memory = std::fs::File::open(&memory_path).map_err(|e| {
        CheckpointError::Unsupported(format!(
            "could not read the saved memory of VM {vm:?} at {}: {e}",
            memory_path.display()
        ))
    });
    // Read through the open file from here on: nothing is left behind whatever happens.
    drop(staging);
    let memory = match memory {
        Ok(m) => m,
        Err(e) => {
            abandon(frozen);
            return Err(e);
        }
    };
    let incremental_from = match (&plan.prev, &plan.full_reason) {
        (Some(p), None) => p.libvirt_checkpoint.clone(),
        _ => None,
    };
    Ok(Ok(Captured {
        source: frozen,
        incremental_from,
        full_reason: plan.full_reason.clone(),
        kind: CheckpointKind::Full,
        consistency: Consistency::Crash,
        consistency_note: format!(
            "memory, devices and disks of one instant, saved while the VM ran (a live snapshot of {snapshot_ms} ms; the guest paused only to switch its disks): restoring it resumes the VM where it was; its disks alone are crash-consistent"
        ),
        memory: Some(memory),
        domain_xml,
        firmware,
    }))
}

/// The disks as they were at the capture instant.
enum FrozenDisks {
    /// libvirt's pull-backup export (NBD).
    Export(crate::libvirt::backup::PullBackup),
    /// The images under a live snapshot's overlays (target, overlay file), which the VM
    /// writes to until they are merged back.
    Overlays(Vec<(String, std::path::PathBuf)>),
}

impl FrozenDisks {
    /// Ends the export, or merges the overlays back (every one is tried).
    fn end(self, hv: &Hypervisor, vm: &str) -> Result<(), CheckpointError> {
        match self {
            Self::Export(backup) => Ok(backup.finish()?),
            Self::Overlays(overlays) => {
                let mut first_error = None;
                for (target, file) in &overlays {
                    if let Err(e) = hv.commit_overlay(vm, target, file) {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), |e| Err(e.into()))
            }
        }
    }
}

/// The capture instant, and what was captured at it.
struct Captured {
    /// Where the frozen disks are read from.
    source: FrozenDisks,
    /// The libvirt checkpoint the export's dirty bitmaps are relative to, if incremental.
    incremental_from: Option<String>,
    full_reason: Option<String>,
    kind: CheckpointKind,
    consistency: Consistency,
    consistency_note: String,
    /// The VM's saved memory and device state (full state only).
    memory: Option<std::fs::File>,
    /// The domain XML at the instant (before a live snapshot put the disks on overlays).
    domain_xml: String,
    /// The UEFI variables and TPM state at the instant.
    firmware: FirmwareState,
}

/// Disks only: freeze (when an agent answers), mark the instant, thaw at once. The export
/// is point-in-time, so the guest is frozen only for as long as starting the job takes.
fn capture_disks(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    socket: &Path,
    targets: &[String],
) -> Result<Captured, CheckpointError> {
    let domain_xml = hv.domain_xml(plan.vm)?;
    let (frozen, consistency, consistency_note) = if plan.quiesce {
        freeze(hv, plan.vm, &plan.uuid)?
    } else {
        (
            None,
            Consistency::Crash,
            "freezing the guest's file systems is turned off in this VM's policy (quiesce)".into(),
        )
    };
    crate::fault::point("after-freeze").map_err(CheckpointError::Unsupported)?;
    let begun = begin_backup(hv, plan, socket, targets);
    drop(frozen);
    let (backup, incremental_from, full_reason) = begun?;
    let firmware = match FirmwareState::read(plan.info) {
        Ok(f) => f,
        Err(e) => {
            backup
                .finish()
                .or_warn(format_args!("end the backup job of VM {:?}", plan.vm));
            return Err(e.into());
        }
    };
    Ok(Captured {
        source: FrozenDisks::Export(backup),
        incremental_from,
        full_reason,
        kind: CheckpointKind::Disk,
        consistency,
        consistency_note,
        memory: None,
        domain_xml,
        firmware,
    })
}

/// Memory, device state and disks of one instant, the straightforward way: libvirt's
/// managed save stops the VM with its state in a file; the VM is started again from that
/// file, paused; the disk export begins (its instant is the saved one, as the paused VM
/// writes nothing); the VM runs on. The guest is paused for the save, QEMU's start and the
/// resume; the image is copied afterwards from a descriptor opened before the start (libvirt
/// removes the file once the VM resumed from it).
///
/// The guest's file systems are not frozen: the memory holds everything in flight, and a
/// guest frozen in its saved state would wake up frozen.
fn capture_full_state(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    socket: &Path,
    targets: &[String],
) -> Result<Captured, CheckpointError> {
    let vm = plan.vm;
    let Some(save_path) = hv.managed_save_path(&plan.info.name) else {
        return Err(CheckpointError::Unsupported(format!(
            "full-state checkpoints need the libvirt daemon on this machine (qemu:///system or qemu:///session), not {}; take a disk checkpoint instead",
            hv.uri()
        )));
    };
    crate::staging::check_room(
        save_path.parent().unwrap_or(Path::new("/")),
        plan.info
            .memory_bytes
            .saturating_add(DEVICE_STATE_MARGIN_BYTES),
        &format!("save the memory of VM {vm:?}"),
    )?;
    if hv.has_managed_save(vm)? {
        return Err(CheckpointError::Unsupported(format!(
            "VM {vm:?} already has saved state (libvirt managed save) that a start would resume; start it or remove that state (virsh managedsave-remove) first"
        )));
    }
    let domain_xml = hv.domain_xml(vm)?;
    leave_note(&SAVED, &plan.uuid)?;
    let paused_at = std::time::Instant::now();
    // From here until the guard is dropped, the VM is saved or paused: the guard lets it
    // run again on every path (a killed Rewind leaves the SAVED marker for the next run).
    let resume = Resume {
        hv,
        vm,
        uuid: plan.uuid,
    };
    let memory = hv.managed_save(vm)?;
    crate::fault::point("after-save").map_err(CheckpointError::Unsupported)?;
    // The VM is off: its firmware state is the saved instant's.
    let firmware = FirmwareState::read(plan.info)?;
    hv.start_vm_paused(vm)?;
    let begun = begin_backup(hv, plan, socket, targets);
    drop(resume);
    let pause_ms = paused_at.elapsed().as_millis();
    let (backup, incremental_from, full_reason) = begun?;
    Ok(Captured {
        source: FrozenDisks::Export(backup),
        incremental_from,
        full_reason,
        kind: CheckpointKind::Full,
        consistency: Consistency::Crash,
        consistency_note: format!(
            "memory, devices and disks of one instant (the VM was paused for {pause_ms} ms to save them): restoring it resumes the VM where it was; its disks alone are crash-consistent"
        ),
        memory: Some(memory),
        domain_xml,
        firmware,
    })
}

/// The saved or paused VM of a full-state capture, let run again when dropped.
struct Resume<'a> {
    hv: &'a Hypervisor,
    vm: &'a str,
    uuid: Uuid,
}

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        // A failure leaves the marker, so the next run tries again.
        if self.hv.resume_saved(self.vm).is_ok() {
            SAVED.remove(&self.uuid);
        }
    }
}

/// A run killed during a full-state capture may have left the VM saved or paused: let it
/// run again.
/// Whether it changed anything.
fn resume_after_killed_run(
    hv: &Hypervisor,
    vm: &str,
    uuid: &Uuid,
    info: &crate::vm::VmInfo,
) -> Result<bool, CheckpointError> {
    let mut changed = false;
    if SAVED.left_by_dead_process(uuid) {
        hv.resume_saved(vm)?;
        SAVED.remove(uuid);
        changed = true;
    }
    // Overlays of a live snapshot that was never merged back (the VM runs on them).
    changed |= hv.commit_left_overlays(vm, info)?;
    Ok(changed)
}

/// Streams what was captured into a new checkpoint and commits it.
fn copy_captured(
    hv: &Hypervisor,
    store: &Store,
    plan: &LivePlan<'_>,
    captured: Captured,
    job_dir: &Path,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let vm = plan.vm;
    let Captured {
        source,
        incremental_from,
        full_reason,
        kind,
        consistency,
        consistency_note,
        memory,
        domain_xml,
        firmware,
    } = captured;
    let parent = incremental_from.as_ref().and_then(|_| plan.prev.clone());
    let result = (|| {
        let new = NewCheckpoint {
            vm: VmRef {
                name: plan.info.name.clone(),
                uuid: plan.uuid,
            },
            time: plan.time,
            kind,
            consistency,
            consistency_note: Some(consistency_note.clone()),
            domain_xml: domain_xml.clone(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            full_reason: full_reason.clone(),
            labels: plan.labels.clone(),
            libvirt_checkpoint: Some(plan.new_name.clone()),
        };
        let mut writer = store.begin_checkpoint(new, control)?;
        control.set_phase(Phase::Copying);
        if let Some(file) = &memory {
            add_memory(&mut writer, vm, file, control)?;
        }
        for (target, _, disk_source, format) in plan.disks {
            let (object, read) = match &source {
                FrozenDisks::Export(backup) => read_disk(
                    &writer,
                    vm,
                    &job_dir.join("rewind-nbd.sock"),
                    target,
                    backup.dirty_context(target).as_deref(),
                    parent.as_ref(),
                    control,
                )?,
                FrozenDisks::Overlays(_) => {
                    let bitmap = incremental_from
                        .as_deref()
                        .filter(|_| format.as_deref() == Some("qcow2"));
                    read_disk_file(
                        &writer,
                        &DiskFile {
                            vm,
                            target,
                            file: disk_source.as_deref().unwrap_or_default(),
                            format: format.as_deref(),
                            bitmap,
                        },
                        parent.as_ref(),
                        job_dir,
                        control,
                    )?
                }
            };
            writer.add_read_bytes(read);
            writer.add_disk(target, disk_source.clone(), format.clone(), object)?;
        }
        firmware.add_to(&mut writer)?;
        control.set_phase(Phase::Finishing);
        Ok::<_, CheckpointError>(writer.commit(control)?)
    })();
    let finished = source.end(hv, vm);
    match result {
        Ok(manifest) => {
            finished?;
            // The previous libvirt checkpoint of this store is no longer needed.
            if let Some(old) = plan
                .prev
                .as_ref()
                .and_then(|p| p.libvirt_checkpoint.as_deref())
            {
                hv.delete_checkpoint(vm, old).or_warn(format_args!(
                    "delete the previous libvirt checkpoint {old} of VM {vm:?}"
                ));
            }
            Ok(manifest)
        }
        Err(e) => {
            // No manifest refers to the new libvirt checkpoint: it must not become a base.
            hv.delete_checkpoint(vm, &plan.new_name)
                .or_warn(format_args!(
                    "delete libvirt checkpoint {} of VM {vm:?}",
                    plan.new_name
                ));
            Err(e)
        }
    }
}

/// A disk image file to read into a checkpoint.
struct DiskFile<'a> {
    vm: &'a str,
    target: &'a str,
    file: &'a str,
    format: Option<&'a str>,
    /// The persistent bitmap in the image whose dirty blocks are read (an incremental).
    bitmap: Option<&'a str>,
}

/// Reads a disk image (not written meanwhile) through `qemu-nbd --read-only`: the chunks
/// its bitmap names, on top of `parent`'s index, or all its data when there is no bitmap
/// or qemu-nbd refuses it (a bitmap QEMU could not store when it was killed is
/// inconsistent).
fn read_disk_file(
    writer: &CheckpointWriter<'_>,
    disk: &DiskFile<'_>,
    parent: Option<&Manifest>,
    work_dir: &Path,
    control: &Control,
) -> Result<(crate::store::FinishedObject, u64), CheckpointError> {
    let socket = work_dir.join(format!("rewind-{}.sock", disk.target));
    crate::cleanup::remove_file(&socket);
    let serve = |bitmap| {
        QemuNbd::serve(
            disk.file,
            disk.format,
            disk.target,
            &socket,
            Access::ReadOnly { bitmap },
        )
    };
    let (server, bitmap) = match serve(disk.bitmap) {
        Ok(server) => (server, disk.bitmap),
        Err(_) if disk.bitmap.is_some() => {
            (serve(None).map_err(CheckpointError::Unsupported)?, None)
        }
        Err(e) => return Err(CheckpointError::Unsupported(e)),
    };
    let context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
    let read = read_disk(
        writer,
        disk.vm,
        &socket,
        disk.target,
        context.as_deref(),
        parent,
        control,
    );
    drop(server);
    read
}

/// Adds the saved memory and device state as blob `memory`, chunked like a disk (pages
/// that did not change since the last full-state checkpoint cost nothing new where they
/// line up in the image).
fn add_memory(
    writer: &mut CheckpointWriter<'_>,
    vm: &str,
    file: &std::fs::File,
    control: &Control,
) -> Result<(), CheckpointError> {
    let size = file
        .metadata()
        .map_err(|e| {
            CheckpointError::Unsupported(format!(
                "could not read the size of the saved state of VM {vm:?}: {e}"
            ))
        })?
        .len();
    control.add_total_bytes(size);
    let object = writer.ingest_file(file, size, None, control)?;
    writer.add_read_bytes(size);
    writer.add_blob(MEMORY_BLOB, object)?;
    Ok(())
}

/// The blob holding a full-state checkpoint's memory and device state: a libvirt save
/// image (`virDomainSave` format), which `virDomainRestore` resumes the VM from.
pub const MEMORY_BLOB: &str = "memory";

/// The error for a note that cannot be left (see [`crate::notes`]).
fn unwritable_note(path: &Path, e: &std::io::Error) -> CheckpointError {
    CheckpointError::Unsupported(format!(
        "could not write the note {} (kept in case Rewind is stopped mid-way): {e}; check the temporary folder (TMPDIR)",
        path.display()
    ))
}

/// [`crate::notes::ProcessNote::create`], with the error a checkpoint gives.
fn leave_note(note: &ProcessNote, uuid: &Uuid) -> Result<(), CheckpointError> {
    note.create(uuid)
        .map_err(|e| unwritable_note(&note.path(uuid), &e))
}

/// The guest's file systems, frozen by its agent; thawed when dropped, so on every path
/// (success, error, cancel, panic).
struct Frozen<'a> {
    hv: &'a Hypervisor,
    vm: &'a str,
    uuid: Uuid,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        // A failed thaw leaves the marker, so the next run tries again.
        if self.hv.thaw_filesystems(self.vm).is_ok() {
            FROZEN.remove(&self.uuid);
        }
    }
}

/// Freezes the guest's file systems if a guest agent answers: the guard that thaws them,
/// the consistency the checkpoint will have, and a note saying why.
fn freeze<'a>(
    hv: &'a Hypervisor,
    vm: &'a str,
    uuid: &Uuid,
) -> Result<(Option<Frozen<'a>>, Consistency, String), CheckpointError> {
    match hv.agent_state(vm)? {
        AgentState::NotConfigured => {
            return Ok((
                None,
                Consistency::Crash,
                "the VM has no guest agent channel: add one (virt-manager: Add Hardware > Channel > org.qemu.guest_agent.0) and install the QEMU guest agent in the guest for application-consistent checkpoints".into(),
            ));
        }
        AgentState::NotConnected => {
            return Ok((
                None,
                Consistency::Crash,
                "the guest agent is not running in the guest: install and start the QEMU guest agent (qemu-guest-agent) for application-consistent checkpoints".into(),
            ));
        }
        AgentState::Connected => {}
    }
    leave_note(&FROZEN, uuid)?;
    let guard = Frozen {
        hv,
        vm,
        uuid: *uuid,
    };
    match hv.freeze_filesystems(vm) {
        Ok(0) => Ok((
            Some(guard),
            Consistency::Crash,
            "the guest agent found no file system to freeze".into(),
        )),
        Ok(n) => Ok((
            Some(guard),
            Consistency::Application,
            format!("the guest agent froze {n} file system(s)"),
        )),
        // A freeze that failed half-way is thawed by the guard.
        Err(e) => Ok((
            Some(guard),
            Consistency::Crash,
            format!(
                "the guest agent could not freeze the file systems, so the checkpoint is crash-consistent: {e}"
            ),
        )),
    }
}

/// Starts the pull backup, incremental from the plan's `prev` unless it has a
/// `full_reason`; falls back to a full one (saying why) when libvirt refuses the incremental.
fn begin_backup(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    socket: &Path,
    targets: &[String],
) -> Result<
    (
        crate::libvirt::backup::PullBackup,
        Option<String>,
        Option<String>,
    ),
    CheckpointError,
> {
    let (vm, new_name) = (plan.vm, plan.new_name.as_str());
    let mut full_reason = plan.full_reason.clone();
    let mut incremental_from = match (&plan.prev, &full_reason) {
        (Some(p), None) => p.libvirt_checkpoint.clone(),
        _ => None,
    };
    let backup = match hv.begin_pull_backup(
        vm,
        socket,
        targets,
        incremental_from.as_deref(),
        Some(new_name),
    ) {
        Ok(b) => b,
        Err(e) if incremental_from.is_some() => {
            // A bitmap missing or inconsistent inside the qcow2 shows only here.
            full_reason = Some(format!("libvirt refused the incremental ({e})"));
            incremental_from = None;
            hv.begin_pull_backup(vm, socket, targets, None, Some(new_name))?
        }
        Err(e) => return Err(e.into()),
    };
    Ok((backup, incremental_from, full_reason))
}

/// Reads one frozen disk from the export into the store: the chunks a dirty bitmap names
/// (incremental, on top of the parent's index) or every allocated chunk (full).
fn read_disk(
    writer: &CheckpointWriter<'_>,
    vm: &str,
    socket: &Path,
    target: &str,
    dirty_context: Option<&str>,
    parent: Option<&Manifest>,
    control: &Control,
) -> Result<(crate::store::FinishedObject, u64), CheckpointError> {
    let read_err = |source: NbdError| CheckpointError::Read {
        vm: vm.to_owned(),
        target: target.to_owned(),
        source: Box::new(source),
    };
    let mut contexts = vec![BASE_ALLOCATION];
    if let Some(c) = dirty_context {
        contexts.push(c);
    }
    let mut nbd = NbdClient::connect(socket, target, &contexts).map_err(read_err)?;
    let size = nbd.size_bytes();
    let base = match (dirty_context, parent) {
        (Some(_), Some(p)) => p
            .disks
            .iter()
            .find(|d| d.target == target)
            .map(|d| &d.index),
        _ => None,
    };
    let mut object = writer.object_writer(size, base)?;
    let chunk = u64::from(writer.store().chunk_size_bytes());
    let (context, wanted): (&str, fn(u32) -> bool) = match (dirty_context, base) {
        (Some(c), Some(_)) => (c, |flags| flags & STATE_DIRTY != 0),
        _ => (BASE_ALLOCATION, |flags| {
            flags & (STATE_HOLE | STATE_ZERO) == 0
        }),
    };
    let mut chunks: Vec<u64> = Vec::new();
    for e in nbd.block_status(context, 0, size).map_err(read_err)? {
        if wanted(e.flags) && e.length > 0 {
            let (first, last) = (e.offset / chunk, (e.end() - 1) / chunk);
            if chunks.last() == Some(&first) {
                chunks.extend(first + 1..=last);
            } else {
                chunks.extend(first..=last);
            }
        }
    }
    chunks.dedup();
    control.add_total_bytes(chunks.iter().map(|&i| object.chunk_len(i)).sum());
    // One connection per reader: several reads in flight keep QEMU and the drive busy.
    let mut readers = Vec::new();
    for _ in 1..crate::store::reader_count() {
        readers.push(NbdClient::connect(socket, target, &[]).map_err(read_err)?);
    }
    readers.push(nbd);
    let read_bytes = std::sync::atomic::AtomicU64::new(0);
    let read_fns: Vec<_> = readers
        .iter_mut()
        .map(|client| {
            let read_bytes = &read_bytes;
            move |i: u64, buf: &mut [u8]| {
                client.read_at(i * chunk, buf).map_err(read_err)?;
                read_bytes.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, CheckpointError>(true)
            }
        })
        .collect();
    object.put_slots(&chunks, control, read_fns)?;
    let read = read_bytes.into_inner();
    for client in readers {
        client.close().map_err(read_err)?;
    }
    Ok((object.finish()?, read))
}

/// The disks of a shut-off VM whose image holds the bitmap of `prev`'s libvirt checkpoint
/// and kept their size since, and why the others must be read whole.
fn shut_off_bitmaps(
    store: &Store,
    prev: &Manifest,
    disks: &[DiskPlan],
) -> Result<(Vec<String>, Option<String>), CheckpointError> {
    let name = prev.libvirt_checkpoint.as_deref().unwrap_or_default();
    let damaged = store.unhealed_damage(prev)?.len();
    let mut with_bitmap = Vec::new();
    let mut full_reason = None;
    for (target, size, path, format) in disks {
        let same_size = prev
            .disks
            .iter()
            .any(|d| d.target == *target && d.index.size_bytes == *size);
        let has_bitmap = format.as_deref() == Some("qcow2")
            && path.as_deref().is_some_and(|path| {
                crate::libvirt::bitmaps::qcow2_bitmaps(Path::new(path))
                    .is_ok_and(|b| b.iter().any(|b| b == name))
            });
        if damaged == 0 && same_size && has_bitmap {
            with_bitmap.push(target.clone());
        } else if format.as_deref() == Some("qcow2") && full_reason.is_none() {
            full_reason = Some(if damaged > 0 {
                format!(
                    "verify found {damaged} damaged chunk(s) in checkpoint {}; a full checkpoint writes them again",
                    prev.id
                )
            } else if same_size {
                format!(
                    "the VM is shut off and disk {target} holds no bitmap of libvirt checkpoint {name}"
                )
            } else {
                format!(
                    "disk {target} is new or was resized since checkpoint {}",
                    prev.id
                )
            });
        }
    }
    Ok((with_bitmap, full_reason))
}

/// A checkpoint of VM `vm`, which [`Hypervisor::managed_save`] just stopped with its state
/// in `memory`: a full-state checkpoint of its disk files and that state. The VM stays off
/// (its managed save image is left to the caller).
pub fn take_saved(
    hv: &Hypervisor,
    store: &Store,
    vm: &str,
    work_dir: &Path,
    options: &TakeOptions,
    memory: &std::fs::File,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let info = hv.vm(vm)?;
    if info.state != VmState::ShutOff {
        return Err(CheckpointError::Unsupported(format!(
            "VM {vm:?} is {}, not saved and shut off",
            info.state.label()
        )));
    }
    take_shut_off(hv, store, &info, work_dir, options, Some(memory), control)
}

/// A shut-off VM: every disk file is read through `qemu-nbd --read-only` (which follows
/// backing chains and holds the VM against a start). When the store's last checkpoint with a
/// libvirt checkpoint left its persistent dirty bitmap in a qcow2 disk, `qemu-nbd` exports
/// that bitmap and only the chunks written since are read (QEMU records every write through
/// its block layer in the bitmap, also after the VM stopped: by `qemu-nbd`, `qemu-io`, a
/// restore); otherwise all allocated data is read, and unchanged chunks cost nothing new in
/// the store. The chain of libvirt checkpoints is left alone: the next live checkpoint is
/// still incremental from the same one.
fn take_shut_off(
    hv: &Hypervisor,
    store: &Store,
    info: &crate::vm::VmInfo,
    work_dir: &Path,
    options: &TakeOptions,
    memory: Option<&std::fs::File>,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let uuid = Uuid::parse_str(&info.uuid).map_err(|e| {
        CheckpointError::Unsupported(format!("VM {:?} has an odd UUID: {e}", info.name))
    })?;
    let mut disks = protected_disks(info)?;
    if options.skip_missing_disks {
        disks.retain(|d| d.2.as_deref().is_some_and(|p| Path::new(p).exists()));
        if disks.is_empty() {
            return Err(CheckpointError::Unsupported(format!(
                "none of the disk files of VM {:?} is there",
                info.name
            )));
        }
    }
    hv.remove_stale_bitmaps(&info.name, &qcow2_files(&disks), false)?;
    let prev = chained(store, &uuid)?.pop();
    let (with_bitmap, full_reason) = match &prev {
        Some(p) => shut_off_bitmaps(store, p, &disks)?,
        None => (Vec::new(), None),
    };
    let parent = prev.filter(|_| !with_bitmap.is_empty());
    let new = NewCheckpoint {
        vm: VmRef {
            name: info.name.clone(),
            uuid,
        },
        time: Utc::now(),
        kind: if memory.is_some() {
            CheckpointKind::Full
        } else {
            CheckpointKind::Disk
        },
        consistency: Consistency::Crash,
        domain_xml: hv.domain_xml(&info.name)?,
        parent: parent.as_ref().map(|p| p.id.clone()),
        full_reason,
        consistency_note: Some(if memory.is_some() {
            "the VM's running state was saved (managed save) with its disks: restoring it resumes the VM where it was".into()
        } else {
            "the VM was shut off: its disks are as it left them".into()
        }),
        labels: options.labels.clone(),
        libvirt_checkpoint: None,
    };
    let mut writer = store.begin_checkpoint(new, control)?;
    control.set_phase(options.copy_phase);
    if let Some(file) = memory {
        add_memory(&mut writer, &info.name, file, control)?;
    }
    for (target, _, source, format) in &disks {
        let Some(file) = source else {
            return Err(CheckpointError::Unsupported(format!(
                "disk {target} of VM {:?} has no file",
                info.name
            )));
        };
        let bitmap = parent
            .as_ref()
            .filter(|_| with_bitmap.contains(target))
            .and_then(|p| p.libvirt_checkpoint.as_deref());
        let (object, read) = read_disk_file(
            &writer,
            &DiskFile {
                vm: &info.name,
                target,
                file,
                format: format.as_deref(),
                bitmap,
            },
            parent.as_ref(),
            work_dir,
            control,
        )?;
        writer.add_read_bytes(read);
        writer.add_disk(target, source.clone(), format.clone(), object)?;
    }
    FirmwareState::read(info)?.add_to(&mut writer)?;
    // Started meanwhile after all (a disk without locking)? Then what was read may be torn.
    if hv.vm(&info.name)?.state != VmState::ShutOff {
        return Err(CheckpointError::Unsupported(format!(
            "VM {:?} was started while its disks were being read; the checkpoint was discarded, take it again",
            info.name
        )));
    }
    control.set_phase(Phase::Finishing);
    Ok(writer.commit(control)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_owner_comes_from_the_dac_label() {
        let xml = "<domain><seclabel type='dynamic' model='apparmor'><label>libvirt-x</label></seclabel>\
                   <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label></seclabel></domain>";
        assert_eq!(qemu_owner(xml), Some((64055, 108)));
        assert_eq!(qemu_owner("<domain/>"), None);
        let by_name = "<domain><seclabel model='dac'><label>qemu:kvm</label></seclabel></domain>";
        assert_eq!(qemu_owner(by_name), None);
    }
}
