//! A live external snapshot for a checkpoint: the running VM's protected disks switch to
//! short-lived overlays beside them at one instant, so that the images under the overlays
//! hold that instant and are read directly (like a shut-off VM's), then merged back
//! ([`FrozenDisks::end`](super::live::FrozenDisks::end)). Used with memory for a live
//! full-state checkpoint, and without for a running VM's full disk checkpoint.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::cleanup::OrWarn as _;
use crate::libvirt::Hypervisor;
use crate::libvirt::live_snapshot::OVERLAY_MARK;

use super::live::FrozenDisks;
use super::plan::LivePlan;

/// Why a checkpoint is not taken through a live snapshot (nothing was changed: the caller
/// takes it another way).
#[derive(Debug, thiserror::Error)]
pub(super) enum NoLiveSnapshot {
    /// Asked for.
    #[error("the managed save was asked for")]
    ManagedSaveAsked,
    /// The overlays would be on another host.
    #[error("the daemon is not on this machine")]
    Remote,
    /// A disk that is not a file cannot get an overlay beside it.
    #[error("disk {0} is not a file")]
    NotAFile(String),
    /// No room for the memory, or for an overlay, beside the disks.
    #[error(transparent)]
    Staging(crate::staging::StagingError),
    /// libvirt refused the checkpoint or the snapshot.
    #[error(transparent)]
    Libvirt(crate::Error),
}

/// The share of a disk's size that must be free beside it for its overlay: what the guest
/// writes while the images under the overlays are read lands there, and a guest whose
/// writes find no room stops.
const OVERLAY_ROOM_DIVISOR: u64 = 20;

/// The overlay file each of `plan`'s disks would get (target, file): beside the disk, named
/// with [`OVERLAY_MARK`] so that a run killed meanwhile leaves them for the next one to
/// merge back. Each disk must be a regular file with room beside it for a twentieth of its
/// size (plus [`crate::staging::RESERVE_BYTES`]).
pub(super) fn overlay_files(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
) -> Result<Vec<(String, PathBuf)>, NoLiveSnapshot> {
    if !hv.is_local() {
        return Err(NoLiveSnapshot::Remote);
    }
    plan.disks
        .iter()
        .map(|(target, size_bytes, source, _)| {
            let Some(path) = source.as_deref().map(Path::new).filter(|p| p.is_file()) else {
                return Err(NoLiveSnapshot::NotAFile(target.clone()));
            };
            crate::staging::check_room(
                path.parent().unwrap_or(Path::new("/")),
                size_bytes / OVERLAY_ROOM_DIVISOR,
                &format!(
                    "keep what VM {:?} writes to disk {target} meanwhile",
                    plan.vm
                ),
            )
            .map_err(NoLiveSnapshot::Staging)?;
            let short = &Uuid::new_v4().simple().to_string()[..8];
            let mut file = path.as_os_str().to_owned();
            file.push(format!("{OVERLAY_MARK}{short}.qcow2"));
            Ok((target.clone(), PathBuf::from(file)))
        })
        .collect()
}

/// Creates the plan's libvirt checkpoint (its bitmaps cover the snapshot's instant, with a
/// little to spare), then puts the disks on `overlays` (saving the memory to `memory`
/// first, if given). On failure both are undone and nothing is left.
pub(super) fn snapshot_onto(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    overlays: &[(String, PathBuf)],
    memory: Option<&Path>,
) -> Result<(), NoLiveSnapshot> {
    let targets: Vec<String> = plan.disks.iter().map(|d| d.0.clone()).collect();
    hv.create_checkpoint(plan.vm, &plan.new_name, &targets)
        .map_err(NoLiveSnapshot::Libvirt)?;
    if let Err(e) = hv.live_external_snapshot(plan.vm, memory, overlays) {
        drop_checkpoint(hv, plan);
        for (_, file) in overlays {
            crate::cleanup::remove_file(file);
        }
        return Err(NoLiveSnapshot::Libvirt(e));
    }
    Ok(())
}

/// Undoes a capture after a failure: the overlays merged back (or the backup job ended),
/// the new libvirt checkpoint gone.
pub(super) fn abandon(hv: &Hypervisor, plan: &LivePlan<'_>, frozen: FrozenDisks) {
    frozen
        .end(hv, plan.vm)
        .or_warn(format_args!("merge the overlays of VM {:?} back", plan.vm));
    drop_checkpoint(hv, plan);
}

fn drop_checkpoint(hv: &Hypervisor, plan: &LivePlan<'_>) {
    hv.delete_checkpoint(plan.vm, &plan.new_name)
        .or_warn(format_args!(
            "delete libvirt checkpoint {} of VM {:?}",
            plan.new_name, plan.vm
        ));
}
