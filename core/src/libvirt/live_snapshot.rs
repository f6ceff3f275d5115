//! A live external snapshot, and merging its overlays back: the live way of taking a
//! full-state checkpoint (see `checkpoint::capture_full_state_live`), and the way a running
//! VM's full disk checkpoint reads its images directly (`checkpoint::live`).
//!
//! With memory, libvirt saves it while the guest runs, pauses the guest only to switch every
//! protected disk to a new overlay, and lets it run on; without, only the disks switch. The
//! disk images under the overlays then hold the snapshot's instant, and an active block
//! commit later merges the overlays back. The
//! overlays live next to their disks, named with [`OVERLAY_MARK`], never in a work folder:
//! while they exist the VM runs on them, and a Rewind killed meanwhile leaves them for the
//! next run to merge ([`Hypervisor::commit_left_overlays`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::backup::{checkpoint_disks, checkpoint_xml, xml_escape};
use super::{Hypervisor, ffi};
use crate::error::{Error, Result};

/// Part of every overlay's file name.
pub const OVERLAY_MARK: &str = ".rewind-live-";

impl Hypervisor {
    /// Creates libvirt checkpoint `name` of VM `vm`, with a bitmap in each qcow2 image of
    /// `targets` (none on the VM's other disks).
    pub fn create_checkpoint(&self, vm: &str, name: &str, targets: &[String]) -> Result<()> {
        let info = self.vm(vm)?;
        let dom = self.lookup(vm)?;
        let (all, bitmaps) = checkpoint_disks(&info, targets);
        ffi::checkpoint_create(&dom, &checkpoint_xml(name, &bitmaps, &all))
            .map_err(|e| self.libvirt_error(&format!("create a checkpoint of VM {vm:?}"), &e))
    }

    /// Puts each disk of `overlays` (target, new overlay file) of running VM `vm` on a new
    /// qcow2 overlay at one instant; the VM's other disks are left as they are. With
    /// `memory`, libvirt first saves the VM's memory there while it runs, and the overlays
    /// come at the end of the save; without, only the disks switch (the guest runs on
    /// throughout). No snapshot metadata is kept: only the files.
    pub fn live_external_snapshot(
        &self,
        vm: &str,
        memory: Option<&Path>,
        overlays: &[(String, PathBuf)],
    ) -> Result<()> {
        let info = self.vm(vm)?;
        let dom = self.lookup(vm)?;
        let mut xml = match memory {
            Some(memory) => format!(
                "<domainsnapshot><memory snapshot='external' file='{}'/><disks>",
                xml_escape(&memory.to_string_lossy())
            ),
            None => "<domainsnapshot><memory snapshot='no'/><disks>".to_owned(),
        };
        for d in &info.disks {
            match overlays.iter().find(|(t, _)| *t == d.target) {
                Some((t, file)) => {
                    write!(
                        xml,
                        "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                        xml_escape(t),
                        xml_escape(&file.to_string_lossy())
                    ).expect("writing to a String cannot fail");
                }
                None => {
                    write!(
                        xml,
                        "<disk name='{}' snapshot='no'/>",
                        xml_escape(&d.target)
                    )
                    .expect("writing to a String cannot fail");
                }
            }
        }
        xml.push_str("</disks></domainsnapshot>");
        let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | if memory.is_some() {
                virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
            } else {
                virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            };
        dom.create_snapshot_xml(&xml, flags)
            .map(drop)
            .map_err(|e| self.libvirt_error(&format!("take a live snapshot of VM {vm:?}"), &e))
    }

    /// Merges disk `target`'s active overlay back into its base image (active block
    /// commit), switches the disk back to the base and removes the overlay file `overlay`.
    pub fn commit_overlay(&self, vm: &str, target: &str, overlay: &Path) -> Result<()> {
        let dom = self.lookup(vm)?;
        let failed = |what: &str, e: &virt::error::Error| {
            self.libvirt_error(&format!("{what} disk {target} of VM {vm:?}"), e)
        };
        ffi::block_commit_active(&dom, target)
            .map_err(|e| failed("merge the live snapshot's overlay back into", &e))?;
        // Ready once everything is copied: then libvirt can pivot to the base. libvirt shows
        // cur == end only then (an empty overlay is reported as 1 of 1); a pivot tried a
        // moment too early is refused and tried again.
        let deadline = Instant::now() + Duration::from_mins(10);
        loop {
            match ffi::block_job_progress(&dom, target)
                .map_err(|e| failed("follow the merge of", &e))?
            {
                Some((cur, end)) if cur == end => {
                    match ffi::block_job_abort(&dom, target, true) {
                        Ok(()) => break,
                        // Not ready after all: a little longer.
                        Err(_) if Instant::now() < deadline => {}
                        Err(e) => return Err(failed("switch back to the base image of", &e)),
                    }
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "the merge of disk {target} of VM {vm:?} ended before it could be switched back; look at libvirtd's log"
                    )));
                }
                Some(_) => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "the merge of disk {target} of VM {vm:?} took over 10 minutes; it goes on, look at `virsh blockjob`"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The pivot is done once the disk no longer names the overlay.
        while self
            .vm(vm)?
            .disks
            .iter()
            .any(|d| d.target == target && d.path().is_some_and(|p| p.as_path() == overlay))
        {
            if Instant::now() > deadline {
                return Err(Error::Invalid(format!(
                    "disk {target} of VM {vm:?} still uses {} after the merge",
                    overlay.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_file(overlay).map_err(|e| {
            Error::Invalid(format!(
                "could not remove the merged overlay {}: {e}",
                overlay.display()
            ))
        })
    }

    /// Merges back the overlays of a live snapshot that a killed Rewind left VM `vm` on
    /// (`info`, as read just before); whether there were any.
    pub fn commit_left_overlays(&self, vm: &str, info: &crate::vm::VmInfo) -> Result<bool> {
        if !info.state.is_active() {
            return Ok(false);
        }
        let mut found = false;
        for d in &info.disks {
            if let Some(path) = d.path()
                && path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(OVERLAY_MARK))
            {
                self.commit_overlay(vm, &d.target, path)?;
                found = true;
            }
        }
        Ok(found)
    }
}
