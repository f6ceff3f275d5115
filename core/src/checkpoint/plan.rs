//! Deciding a checkpoint before anything is captured: the store's chain (the previous
//! checkpoint with a libvirt checkpoint, and whether it can be the base of an incremental),
//! the disks to capture, what killed runs left behind, and the job's private folder.

use std::path::Path;

use chrono::Utc;
use uuid::Uuid;

use crate::libvirt::Hypervisor;
use crate::notes::FROZEN;
use crate::store::{Manifest, Store, StoreError};

use super::CheckpointError;

/// The libvirt checkpoint name prefix of a store: each store keeps its own chain.
pub(super) fn chain_prefix(store: &Store) -> String {
    format!("rewind-{}", &store.config().id.simple().to_string()[..12])
}

/// This VM's checkpoints in `store` that left a libvirt checkpoint behind, oldest first:
/// from `known` (what the caller read) or, without it, from the VM's manifests.
pub(super) fn chained(
    store: &Store,
    vm_uuid: &Uuid,
    known: Option<&[Manifest]>,
) -> Result<Vec<Manifest>, StoreError> {
    let read;
    let all = if let Some(known) = known {
        known
    } else {
        read = store.vm_catalog(vm_uuid)?.checkpoints;
        &read[..]
    };
    Ok(all
        .iter()
        .filter(|m| m.vm.uuid == *vm_uuid && m.libvirt_checkpoint.is_some())
        .cloned()
        .collect())
}

/// Why `prev` cannot be the base of an incremental, or `None` if it can.
pub(super) fn why_not_incremental(
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
pub(super) type DiskPlan = (String, u64, Option<String>, Option<String>);

pub(super) fn protected_disks(info: &crate::vm::VmInfo) -> Result<Vec<DiskPlan>, CheckpointError> {
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
pub(super) fn clean_up_after_killed_runs(
    hv: &Hypervisor,
    store: &Store,
    vm: &str,
    uuid: &Uuid,
    chained: &[Manifest],
) -> Result<(), CheckpointError> {
    stop_what_killed_runs_left(hv, vm, uuid)?;
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

/// What a killed run leaves running in the VM: its pull-backup job (QEMU goes on exporting
/// the disks and filling the scratch file) and, if it died during the freeze, frozen file
/// systems. Returns whether there was anything to stop.
pub(super) fn stop_what_killed_runs_left(
    hv: &Hypervisor,
    vm: &str,
    uuid: &Uuid,
) -> Result<bool, CheckpointError> {
    let mut stopped = false;
    if let Some(job) = hv.backup_job_xml(vm)?
        && job.contains("rewind-nbd.sock")
    {
        hv.abort_job(vm)?;
        stopped = true;
    }
    if FROZEN.left_by_dead_process(uuid) {
        // A Rewind killed while the guest was frozen: thaw it (harmless if not frozen).
        hv.thaw_filesystems(vm)?;
        FROZEN.remove(uuid);
        stopped = true;
    }
    Ok(stopped)
}

/// The qcow2 disks among `disks`, with their image files.
pub(super) fn qcow2_files(disks: &[DiskPlan]) -> Vec<(String, &Path)> {
    disks
        .iter()
        .filter(|d| d.3.as_deref() == Some("qcow2"))
        .filter_map(|d| d.2.as_deref().map(|p| (d.0.clone(), Path::new(p))))
        .collect()
}

/// The user and group QEMU runs VM as, from the DAC label of its live XML (`+64055:+64055`).
pub(super) fn qemu_owner(live_xml: &str) -> Option<(u32, u32)> {
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
pub(super) fn hand_to_qemu(live_xml: &str) -> Option<(u32, u32)> {
    let me = rustix::process::geteuid().as_raw();
    qemu_owner(live_xml).filter(|&(uid, _)| me == 0 && uid != me)
}

/// A folder for one VM's backup job inside `work_dir`, writable by that VM's QEMU and by
/// nobody else: owned by QEMU's user when Rewind runs as root (`qemu:///system`), private
/// when QEMU runs as Rewind's own user (`qemu:///session`). Only when neither holds (a
/// desktop user driving `qemu:///system`) is it open to all, under an unguessable name.
pub(super) fn job_dir(
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
            "the work folder {} has too long a path for the backup's socket; use a shorter one (REWIND_WORK_DIR)",
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

/// What was decided before a live capture.
pub(super) struct LivePlan<'a> {
    pub(super) vm: &'a str,
    pub(super) quiesce: bool,
    /// Memory and device state too.
    pub(super) full_state: bool,
    /// ... the managed-save way.
    pub(super) managed_save: bool,
    pub(super) labels: Vec<String>,
    pub(super) info: &'a crate::vm::VmInfo,
    pub(super) uuid: Uuid,
    /// The libvirt checkpoint to create.
    pub(super) new_name: String,
    pub(super) time: chrono::DateTime<Utc>,
    /// The last checkpoint of this VM in this store with a libvirt checkpoint.
    pub(super) prev: Option<Manifest>,
    /// Why not incremental from `prev`, if so.
    pub(super) full_reason: Option<String>,
    pub(super) disks: &'a [DiskPlan],
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
