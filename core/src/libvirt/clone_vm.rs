//! What a boot-check asks of libvirt about a throwaway clone: start it as a transient
//! domain that dies with Rewind's connection, ask its guest agent whether it answers, take
//! a screenshot of its screen, and stop it.

use std::time::Duration;

use virt::stream::Stream;

use super::{Hypervisor, ffi};
use crate::error::Result;

/// Largest screenshot accepted: a 4K screen in PPM is 24 MiB.
const MAX_SCREENSHOT_BYTES: usize = 64 << 20;

/// A picture of a VM's screen as libvirt gives it.
#[derive(Debug, Clone)]
pub struct Screenshot {
    /// Its MIME type (`image/x-portable-pixmap` from QEMU).
    pub mime: String,
    /// The image file's bytes.
    pub bytes: Vec<u8>,
}

impl Hypervisor {
    /// Starts a transient VM from `xml`, destroyed by libvirt when this connection closes
    /// (also if this process is killed); returns its name.
    pub fn start_transient(&self, xml: &str) -> Result<String> {
        let dom = ffi::create_transient_autodestroy(&self.conn, xml)
            .map_err(|e| self.libvirt_error("start the throwaway copy of the VM", &e))?;
        dom.name()
            .map_err(|e| self.libvirt_error("read the name of the VM just started", &e))
    }

    /// Starts the shut-off VM defined with `xml`'s name and UUID with `xml` as its live
    /// definition; its persistent definition stays as it is (and is what it has again once
    /// it stops).
    pub fn start_with_live_xml(&self, xml: &str) -> Result<String> {
        let dom = ffi::create_live(&self.conn, xml)
            .map_err(|e| self.libvirt_error("start the VM from its checkpoint", &e))?;
        dom.name()
            .map_err(|e| self.libvirt_error("read the name of the VM just started", &e))
    }

    /// Copies disk `target` of running VM `vm` (its whole chain) into the new image file
    /// `dest` (`format`), then switches the disk over to it (pivot); `control` cancels
    /// (the copy is abandoned and `dest` removed) and gets the progress in bytes.
    pub fn copy_disk_and_switch(
        &self,
        vm: &str,
        target: &str,
        dest: &std::path::Path,
        format: &str,
        control: &crate::progress::Control,
    ) -> Result<()> {
        let dom = self.lookup(vm)?;
        let failed = |what: &str, e: &virt::error::Error| {
            self.libvirt_error(&format!("{what} disk {target} of VM {vm:?}"), e)
        };
        let xml = format!(
            "<disk type='file'><source file='{}'/><driver type='{}'/></disk>",
            crate::libvirt::backup::xml_escape(&dest.display().to_string()),
            crate::libvirt::backup::xml_escape(format)
        );
        ffi::block_copy(&dom, target, &xml).map_err(|e| failed("start copying", &e))?;
        let mut last = 0;
        loop {
            if control.check().is_err() {
                drop(ffi::block_job_abort(&dom, target, false));
                crate::cleanup::remove_file(dest);
                return Err(crate::error::Error::Invalid(format!(
                    "the copy of disk {target} of VM {vm:?} was cancelled; the VM still runs from its checkpoint"
                )));
            }
            match ffi::block_job_progress(&dom, target)
                .map_err(|e| failed("follow the copy of", &e))?
            {
                Some((cur, end)) => {
                    if last == 0 {
                        control.add_total_bytes(end);
                    }
                    control.add_done_bytes(cur.saturating_sub(last));
                    last = cur;
                    if cur == end && end > 0 && ffi::block_job_abort(&dom, target, true).is_ok() {
                        break;
                    }
                }
                None => {
                    return Err(crate::error::Error::Invalid(format!(
                        "the copy of disk {target} of VM {vm:?} ended before it could be switched over; look at libvirtd's log"
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Switched once the disk names the copy.
        let deadline = std::time::Instant::now() + Duration::from_mins(1);
        while !self
            .vm(vm)?
            .disks
            .iter()
            .any(|d| d.target == target && d.path().is_some_and(|p| p.as_path() == dest))
        {
            if std::time::Instant::now() > deadline {
                return Err(crate::error::Error::Invalid(format!(
                    "disk {target} of VM {vm:?} did not switch over to {}",
                    dest.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Turns VM `vm` off at once (a transient one is then gone).
    pub fn destroy_vm(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        dom.destroy()
            .map_err(|e| self.libvirt_error(&format!("turn off VM {vm:?}"), &e))
    }

    /// Whether VM `vm` runs (or is paused); false once it has stopped or is gone.
    #[must_use]
    pub fn is_running(&self, vm: &str) -> bool {
        self.lookup(vm)
            .and_then(|d| {
                d.is_active()
                    .map_err(|e| self.libvirt_error("look at the VM", &e))
            })
            .unwrap_or(false)
    }

    /// Whether VM `vm` is paused because a disk read or write failed (a disk whose policy
    /// is to stop on errors, as a run's disks over a lost export are).
    #[must_use]
    pub fn paused_by_disk_error(&self, vm: &str) -> bool {
        use virt::domain::{DomainPausedReason, DomainStateReason};
        use virt::enumutil::Enum;
        self.lookup(vm)
            .ok()
            .and_then(|d| d.state().ok())
            .is_some_and(|(_, reason)| {
                matches!(
                    reason,
                    Enum::Known(DomainStateReason::Paused(Enum::Known(
                        DomainPausedReason::IOError
                    )))
                )
            })
    }

    /// Whether a block job (a copy) runs on disk `target` of VM `vm`.
    #[must_use]
    pub fn has_block_job(&self, vm: &str, target: &str) -> bool {
        self.lookup(vm)
            .ok()
            .and_then(|d| ffi::block_job_progress(&d, target).ok())
            .is_some_and(|p| p.is_some())
    }

    /// Abandons the block job on disk `target` of VM `vm`, if there is one (the disk stays
    /// as it is; the copy's file is the caller's to remove).
    pub fn abandon_block_job(&self, vm: &str, target: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        if matches!(ffi::block_job_progress(&dom, target), Ok(Some(_))) {
            ffi::block_job_abort(&dom, target, false).map_err(|e| {
                self.libvirt_error(&format!("stop the copy of disk {target} of VM {vm:?}"), &e)
            })?;
        }
        Ok(())
    }

    /// Whether VM `vm`'s guest agent answers a `guest-ping` within `timeout`.
    #[must_use]
    pub fn agent_answers(&self, vm: &str, timeout: Duration) -> bool {
        let Ok(dom) = self.lookup(vm) else {
            return false;
        };
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        dom.qemu_agent_command(r#"{"execute":"guest-ping"}"#, seconds, 0)
            .is_ok_and(|answer| answer.contains("\"return\""))
    }

    /// A screenshot of VM `vm`'s first screen.
    pub fn screenshot(&self, vm: &str) -> Result<Screenshot> {
        let dom = self.lookup(vm)?;
        let failed = |e: &virt::error::Error| {
            self.libvirt_error(&format!("take a screenshot of VM {vm:?}"), e)
        };
        let stream = Stream::new(&self.conn, 0).map_err(|e| failed(&e))?;
        let mime = dom.screenshot(&stream, 0, 0).map_err(|e| failed(&e))?;
        let mut bytes = Vec::new();
        let mut buf = vec![0; 256 << 10];
        loop {
            match stream.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) if n > 0 => {
                    bytes.extend_from_slice(&buf[..n.cast_unsigned()]);
                    if bytes.len() > MAX_SCREENSHOT_BYTES {
                        drop(stream.abort());
                        return Err(crate::error::Error::Libvirt {
                            action: format!("take a screenshot of VM {vm:?}"),
                            detail: format!(
                                "the picture is larger than {MAX_SCREENSHOT_BYTES} bytes"
                            ),
                            connection_lost: false,
                        });
                    }
                }
                Ok(_) => {
                    let e = virt::error::Error::last_error();
                    drop(stream.abort());
                    return Err(failed(&e));
                }
                Err(e) => {
                    drop(stream.abort());
                    return Err(failed(&e));
                }
            }
        }
        drop(stream.finish());
        Ok(Screenshot { mime, bytes })
    }
}
