//! Full-state checkpoints: memory and device state with the disks, the live way (a live
//! external snapshot) or the managed-save way; and putting back a VM a killed run left saved.

use std::path::Path;

use uuid::Uuid;

use crate::firmware::FirmwareState;
use crate::libvirt::Hypervisor;
use crate::notes::SAVED;
use crate::staging::Staging;
use crate::store::{CheckpointKind, Consistency};

use super::CheckpointError;
use super::guards::leave_note;
use super::live::{Captured, FrozenDisks, begin_backup};
use super::overlays::{NoLiveSnapshot, abandon, overlay_files, snapshot_onto};
use super::plan::{LivePlan, hand_to_qemu};

/// What a saved memory image holds besides the RAM (device state, the header), at most.
pub(super) const DEVICE_STATE_MARGIN_BYTES: u64 = 64 << 20;

/// Memory, device state and disks of one instant, the live way: libvirt saves the memory
/// while the guest runs and, at the end, pauses it only to put every protected disk on a
/// new overlay (a live external snapshot). The images under the overlays then hold that
/// instant; they are read from their files (a full) or through `qemu-nbd --read-only` with
/// the previous checkpoint's persistent bitmap, which the images keep (an incremental), then
/// the overlays are merged back (active block commit and pivot; see `overlays`).
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
pub(super) fn capture_full_state_live(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
) -> Result<Result<Captured, NoLiveSnapshot>, CheckpointError> {
    let vm = plan.vm;
    let overlays = match overlay_files(hv, plan) {
        Ok(o) => o,
        Err(why) => return Ok(Err(why)),
    };
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
        Err(e) => return Ok(Err(NoLiveSnapshot::Staging(e))),
    };
    let memory_path = staging.path().join("memory.save");
    let started = std::time::Instant::now();
    if let Err(why) = snapshot_onto(hv, plan, &overlays, Some(&memory_path)) {
        return Ok(Err(why));
    }
    let snapshot_ms = started.elapsed().as_millis();
    let abandon = |frozen| abandon(hv, plan, frozen);
    let frozen = FrozenDisks::Overlays(overlays);
    // As close to the saved instant as can be: the memory's TPM blobs are of its end.
    let firmware = FirmwareState::read(plan.info);
    if let Err(e) = crate::fault::point("after-live-snapshot") {
        abandon(frozen);
        return Err(e.into());
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

/// Memory, device state and disks of one instant, the straightforward way: libvirt's
/// managed save stops the VM with its state in a file; the VM is started again from that
/// file, paused; the disk export begins (its instant is the saved one, as the paused VM
/// writes nothing); the VM runs on. The guest is paused for the save, QEMU's start and the
/// resume; the image is copied afterwards from a descriptor opened before the start (libvirt
/// removes the file once the VM resumed from it).
///
/// The guest's file systems are not frozen: the memory holds everything in flight, and a
/// guest frozen in its saved state would wake up frozen.
pub(super) fn capture_full_state(
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
    crate::fault::point("after-save")?;
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
pub(super) struct Resume<'a> {
    pub(super) hv: &'a Hypervisor,
    pub(super) vm: &'a str,
    pub(super) uuid: Uuid,
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
pub(super) fn resume_after_killed_run(
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
