//! A VM's memory and device state saved to a file and brought back: what a full-state
//! checkpoint captures and what restoring one resumes.
//!
//! The managed-save way of a full-state checkpoint (the fallback of the live way in
//! `live_snapshot`, and a restore's `--save-state`) uses libvirt's *managed save*
//! (`virDomainManagedSave`): the VM stops with its
//! state in the daemon's save folder, and starting it again resumes it there. Rewind opens
//! that image before starting the VM, so after libvirt removes the file on start the open
//! descriptor still reads it. Should Rewind die in between, nothing is lost: the image
//! stays in libvirt's care, the next start of the VM (by Rewind's clean-up, virt-manager
//! or `virsh start`) resumes it.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{Hypervisor, daemon_dir};
use crate::error::{Error, Result};
use crate::vm::VmState;

impl Hypervisor {
    /// Where the daemon keeps the managed save image of VM `name`, when it runs on this
    /// machine (`<save dir>/<name>.save`).
    #[must_use]
    pub fn managed_save_path(&self, name: &str) -> Option<PathBuf> {
        if !self.is_local() {
            return None;
        }
        daemon_dir(&self.uri, "qemu/save").map(|dir| dir.join(format!("{name}.save")))
    }

    /// Whether VM `vm` has a managed save image (it resumes from it when started).
    pub fn has_managed_save(&self, vm: &str) -> Result<bool> {
        let dom = self.lookup(vm)?;
        dom.has_managed_save(0)
            .map_err(|e| self.libvirt_error(&format!("look for saved state of VM {vm:?}"), &e))
    }

    /// Saves the running VM `vm`'s memory and device state (managed save: the VM stops),
    /// then opens the image, which [`Hypervisor::start_vm_paused`] resumes from.
    pub fn managed_save(&self, vm: &str) -> Result<File> {
        let dom = self.lookup(vm)?;
        let name = dom
            .name()
            .map_err(|e| self.libvirt_error(&format!("read the name of VM {vm:?}"), &e))?;
        let path = self.managed_save_path(&name).ok_or_else(|| {
            Error::Invalid(format!(
                "full-state checkpoints need the libvirt daemon on this machine (qemu:///system or qemu:///session), not {}",
                self.uri
            ))
        })?;
        dom.managed_save(0)
            .map_err(|e| self.libvirt_error(&format!("save the memory of VM {vm:?}"), &e))?;
        File::open(&path).map_err(|e| {
            Error::Invalid(format!(
                "VM {vm:?} was saved, but its saved state at {} cannot be read ({e}); run Rewind as a user who can read libvirt's save folder (root, for qemu:///system). Starting the VM resumes it",
                path.display()
            ))
        })
    }

    /// Discards VM `vm`'s managed save image: its next start boots it.
    pub fn remove_managed_save(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.managed_save_remove(0)
            .map_err(|e| self.libvirt_error(&format!("remove the saved state of VM {vm:?}"), &e))
    }

    /// Starts the shut-off VM `vm` paused (resuming its managed save image if it has one).
    pub fn start_vm_paused(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.create_with_flags(virt::sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| self.libvirt_error(&format!("start VM {vm:?}"), &e))
    }

    /// Lets the paused VM `vm` run on.
    pub fn resume_vm(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.resume()
            .map_err(|e| self.libvirt_error(&format!("resume VM {vm:?}"), &e))
    }

    /// Puts VM `vm` back to running after a capture was cut short: started from its managed
    /// save image if it is off with one, resumed if it is paused. Does nothing otherwise.
    pub fn resume_saved(&self, vm: &str) -> Result<()> {
        match self.vm(vm)?.state {
            VmState::ShutOff if self.has_managed_save(vm)? => self.start_vm(vm),
            VmState::Paused => self.resume_vm(vm),
            _ => Ok(()),
        }
    }

    /// The domain XML inside a saved state file: reading it checks that libvirt takes the
    /// file for a save image.
    pub fn saved_state_xml(&self, path: &Path) -> Result<String> {
        let file = path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("the path {} is not UTF-8", path.display())))?;
        self.conn.save_image_xml_desc(file, 0).map_err(|e| {
            self.libvirt_error(
                &format!("read the saved VM state in {}", path.display()),
                &e,
            )
        })
    }

    /// Resumes a VM from the saved state file `path` (its disks as they were when the state
    /// was saved), running; `xml`, when given, is the definition to run it with (libvirt
    /// checks that the guest cannot tell the difference). The VM may be defined and shut
    /// off, or not defined at all.
    pub fn restore_saved_state(&self, path: &Path, xml: Option<&str>) -> Result<()> {
        let file = path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("the path {} is not UTF-8", path.display())))?;
        self.conn
            .restore_domain_flags(file, xml, virt::sys::VIR_DOMAIN_SAVE_RUNNING)
            .map_err(|e| {
                self.libvirt_error(
                    &format!("resume the VM from its saved state in {}", path.display()),
                    &e,
                )
            })
    }
}

impl Hypervisor {
    /// Whether the daemon has the secret with this UUID (an emulated TPM's state can be
    /// encrypted with one).
    #[must_use]
    pub fn has_secret(&self, uuid: &str) -> bool {
        self.conn.lookup_secret_by_uuid_string(uuid).is_ok()
    }

    /// Why the daemon cannot run a guest of this architecture, machine type and domain type
    /// (`kvm`, `qemu`), if it cannot: its QEMU does not offer them.
    #[must_use]
    pub fn cannot_run(&self, arch: &str, machine: &str, virt_type: &str) -> Option<String> {
        self.conn
            .domain_capabilities(None, Some(arch), Some(machine), Some(virt_type), 0)
            .err()
            .map(|e| {
                format!(
                    "the libvirt daemon at {} cannot run machine type {machine} ({arch}, {virt_type}): {}",
                    self.uri,
                    e.message()
                )
            })
    }
}
