//! A shut-off VM's disks read from their files, incrementally where a bitmap allows, and the
//! checkpoint a restore takes of a VM it just saved.

use std::path::Path;

use chrono::Utc;
use uuid::Uuid;

use crate::firmware::FirmwareState;
use crate::libvirt::Hypervisor;
use crate::progress::{Control, Phase};
use crate::store::{CheckpointKind, Consistency, Manifest, NewCheckpoint, Store, VmRef};
use crate::vm::VmState;

use super::live::{DiskFile, add_memory, read_disk_file};
use super::plan::{DiskPlan, chained, protected_disks, qcow2_files};
use super::{CheckpointError, TakeOptions};

/// The disks of a shut-off VM whose image holds the bitmap of `prev`'s libvirt checkpoint
/// and kept their size since, and why the others must be read whole.
pub(super) fn shut_off_bitmaps(
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
pub(super) fn take_shut_off(
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
    let prev = chained(store, &uuid, options.known.as_deref())?.pop();
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
                under_overlay: false,
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
