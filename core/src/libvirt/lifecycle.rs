//! Stopping, starting and (re)defining VMs, as a restore needs to.

use std::time::{Duration, Instant};

use super::Hypervisor;
use crate::error::{Error, Result};
use crate::progress::Control;
use crate::vm::VmState;

/// How to stop a VM that runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopMode {
    /// Ask the guest to shut down (ACPI power button, or the guest agent), wait up to
    /// `timeout_secs`, then pull the plug if `force_after` (otherwise fail).
    Graceful {
        /// How long the guest gets to shut down.
        timeout_secs: u64,
        /// Pull the plug when it has not shut down by then.
        force_after: bool,
    },
    /// Pull the plug at once (what `virsh destroy` does): the guest's unsaved data is lost.
    Force,
    /// Save the running VM's memory and device state (libvirt managed save): nothing of the
    /// running session is lost. A restore keeps that state in its safety checkpoint, so
    /// undoing the restore resumes the VM where it was. [`Hypervisor::stop_vm`] leaves it
    /// in libvirt's care (the next start resumes it).
    Save,
}

impl Default for StopMode {
    fn default() -> Self {
        Self::Graceful {
            timeout_secs: 120,
            force_after: true,
        }
    }
}

/// How a VM was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    WasOff,
    /// The guest shut itself down.
    ShutDown,
    /// It was forced off.
    Forced,
    /// Its running state was saved (managed save).
    Saved,
}

impl Hypervisor {
    /// Stops VM `vm` as `mode` says and waits until libvirt reports it shut off. Cancellable
    /// while waiting for the guest (the VM is then left running).
    pub fn stop_vm(&self, vm: &str, mode: StopMode, control: &Control) -> Result<Stopped> {
        let dom = self.lookup(vm)?;
        if self.vm(vm)?.state == VmState::ShutOff {
            return Ok(Stopped::WasOff);
        }
        let force = || {
            dom.destroy()
                .or_else(|e| {
                    // It may have gone off by itself in between.
                    if dom.is_active().unwrap_or(true) {
                        Err(e)
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| self.libvirt_error(&format!("force VM {vm:?} off"), &e))
        };
        match mode {
            StopMode::Save => {
                drop(self.managed_save(vm)?);
                Ok(Stopped::Saved)
            }
            StopMode::Force => {
                force()?;
                self.wait_shut_off(vm, Duration::from_secs(30))?;
                Ok(Stopped::Forced)
            }
            StopMode::Graceful {
                timeout_secs,
                force_after,
            } => {
                // A paused guest cannot react to the power button.
                if self.vm(vm)?.state != VmState::Paused
                    && let Err(e) = dom.shutdown()
                    && dom.is_active().unwrap_or(true)
                {
                    if !force_after {
                        return Err(self.libvirt_error(&format!("shut VM {vm:?} down"), &e));
                    }
                } else {
                    let waited = self.wait_for_shutdown(&dom, timeout_secs, control);
                    control.set_force_off_at(None);
                    if let Some(result) = waited {
                        return result;
                    }
                }
                if !dom.is_active().unwrap_or(true) {
                    return Ok(Stopped::ShutDown);
                }
                if !force_after {
                    return Err(Error::Invalid(format!(
                        "VM {vm:?} did not shut down within {timeout_secs} s; shut it down from inside the guest, or allow forcing it off"
                    )));
                }
                force()?;
                self.wait_shut_off(vm, Duration::from_secs(30))?;
                Ok(Stopped::Forced)
            }
        }
    }

    /// Waits up to `timeout_secs` for the guest to shut down, showing the countdown on
    /// `control`: `Some` when it did or the wait was cancelled, `None` when it is time to
    /// turn it off (the time is up, or [`Control::force_off_now`] was asked).
    #[allow(clippy::unused_self)] // one of the lifecycle steps, beside the others
    fn wait_for_shutdown(
        &self,
        dom: &virt::domain::Domain,
        timeout_secs: u64,
        control: &Control,
    ) -> Option<Result<Stopped>> {
        let timeout = Duration::from_secs(timeout_secs);
        let deadline = Instant::now() + timeout;
        control.set_force_off_at(Some(std::time::SystemTime::now() + timeout));
        while Instant::now() < deadline && !control.force_off_asked() {
            if control.is_cancelled() {
                return Some(Err(Error::Cancelled));
            }
            if !dom.is_active().unwrap_or(true) {
                return Some(Ok(Stopped::ShutDown));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn wait_shut_off(&self, vm: &str, limit: Duration) -> Result<()> {
        let dom = self.lookup(vm)?;
        let deadline = Instant::now() + limit;
        while dom.is_active().unwrap_or(false) {
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "VM {vm:?} was still running {} s after being forced off; look at libvirtd's log",
                    limit.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts the shut-off VM `vm`.
    pub fn start_vm(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.create()
            .map(drop)
            .map_err(|e| self.libvirt_error(&format!("start VM {vm:?}"), &e))
    }

    /// Defines (or redefines, when one with the same name and UUID exists) a VM from `xml`;
    /// returns its name.
    pub fn define_vm(&self, xml: &str) -> Result<String> {
        let dom = self
            .conn
            .define_domain_xml_flags(xml, virt::sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map_err(|e| self.libvirt_error("define the VM", &e))?;
        dom.name()
            .map_err(|e| self.libvirt_error("read the name of the VM just defined", &e))
    }

    /// Removes the definition of the shut-off VM `vm`, with libvirt's records of its
    /// checkpoints and snapshots and its UEFI variables (the disks stay).
    pub fn undefine_vm(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.undefine_flags(
            virt::sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM
                | virt::sys::VIR_DOMAIN_UNDEFINE_TPM,
        )
        .map_err(|e| self.libvirt_error(&format!("remove the definition of VM {vm:?}"), &e))
    }

    /// Whether a VM with this UUID (or name) is defined.
    #[must_use]
    pub fn has_vm(&self, name_or_uuid: &str) -> bool {
        self.lookup(name_or_uuid).is_ok()
    }

    /// The inactive (persistent) definition of VM `vm`, with secure details: what defining
    /// it again needs.
    pub fn persistent_xml(&self, vm: &str) -> Result<String> {
        let dom = self.lookup(vm)?;
        dom.xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE | virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| self.libvirt_error(&format!("read the definition of VM {vm:?}"), &e))
    }
}

impl Hypervisor {
    /// Bytes the running VM `vm` has written to its protected disks since QEMU started
    /// (libvirt's block statistics); `None` when the VM is not running.
    pub fn written_bytes(&self, vm: &str) -> Result<Option<u64>> {
        let info = self.vm(vm)?;
        if info.state != VmState::Running {
            return Ok(None);
        }
        let dom = self.lookup(vm)?;
        let mut total = 0u64;
        for disk in info.protected_disks() {
            let stats = dom.block_stats(&disk.target).map_err(|e| {
                self.libvirt_error(&format!("read the disk statistics of VM {vm:?}"), &e)
            })?;
            total = total.saturating_add(u64::try_from(stats.wr_bytes).unwrap_or(0));
        }
        Ok(Some(total))
    }
}
