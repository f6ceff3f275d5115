//! What must be undone on every path: the guest's file systems frozen through its agent, and
//! the notes that let a later run undo it after a kill.

use std::path::Path;

use uuid::Uuid;

use crate::libvirt::Hypervisor;
use crate::libvirt::agent::AgentState;
use crate::notes::{FROZEN, ProcessNote};
use crate::store::Consistency;

use super::CheckpointError;

/// The error for a note that cannot be left (see [`crate::notes`]).
pub(super) fn unwritable_note(path: &Path, e: &std::io::Error) -> CheckpointError {
    CheckpointError::Unsupported(format!(
        "could not write the note {} (kept in case Rewind is stopped mid-way): {e}; check Rewind's runtime folder (/run/rewind for the service)",
        path.display()
    ))
}

/// [`crate::notes::ProcessNote::create`], with the error a checkpoint gives.
pub(super) fn leave_note(note: &ProcessNote, uuid: &Uuid) -> Result<(), CheckpointError> {
    note.create(uuid).map_err(|e| match note.path(uuid) {
        Ok(path) => unwritable_note(&path, &e),
        Err(_) => CheckpointError::Unsupported(format!(
            "could not write a note (kept in case Rewind is stopped mid-way): {e}"
        )),
    })
}

/// The guest's file systems, frozen by its agent; thawed when dropped, so on every path
/// (success, error, cancel, panic).
pub(super) struct Frozen<'a> {
    pub(super) hv: &'a Hypervisor,
    pub(super) vm: &'a str,
    pub(super) uuid: Uuid,
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
pub(super) fn freeze<'a>(
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
