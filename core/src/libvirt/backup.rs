//! Pull-mode backups: libvirt freezes a point-in-time view of a running VM's disks and QEMU
//! exports it over NBD on a Unix socket, while the VM keeps running (copy-before-write keeps
//! the old content of blocks the guest overwrites meanwhile). Rewind reads only what it
//! needs from that export with [`rewind_nbd::NbdClient`] and ends the job.
//!
//! A backup can also create a libvirt checkpoint (persistent dirty bitmaps in the qcow2
//! images) at the same instant, and can be incremental from an earlier checkpoint: the
//! export then offers the context `qemu:dirty-bitmap:backup-<target>`, which names the
//! blocks written since.
//!
//! Pull mode was chosen over push mode because push mode makes QEMU write a full copy of
//! every disk to a file first (twice the I/O and a scratch copy as large as the disk),
//! while pull mode lets Rewind stream the needed extents straight into the store.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use virt::domain::Domain;

use super::{Hypervisor, ffi};
use crate::cleanup::OrWarn as _;
use crate::error::{Error, Result};

/// A running pull-mode backup job. Ends the job when dropped.
#[derive(Debug)]
pub struct PullBackup {
    dom: Domain,
    vm: String,
    socket: PathBuf,
    targets: Vec<String>,
    /// The disks exported with a dirty bitmap (incremental).
    incremental_targets: Vec<String>,
    active: bool,
}

/// Escapes text for an XML attribute or element.
pub(crate) fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::Invalid(format!(
            "{what} {name:?} must be 1-64 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(())
}

/// The backup XML for a pull-mode job over `socket` of `targets` (other disks are skipped).
/// With `incremental_from`, the disks in `bitmap_targets` are incremental from that
/// checkpoint and the other targets (raw images, which cannot hold bitmaps) are full.
#[must_use]
pub fn pull_backup_xml(
    socket: &Path,
    targets: &[String],
    all_disks: &[String],
    incremental_from: Option<&str>,
    bitmap_targets: &[String],
) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>\n");
    writeln!(
        xml,
        "  <server transport='unix' socket='{}'/>\n  <disks>",
        xml_escape(&socket.display().to_string())
    )
    .expect("writing to a String cannot fail");
    for disk in all_disks {
        if targets.contains(disk) {
            let mode = match incremental_from {
                Some(from) if bitmap_targets.contains(disk) => format!(
                    " backupmode='incremental' incremental='{}'",
                    xml_escape(from)
                ),
                Some(_) => " backupmode='full'".to_owned(),
                None => String::new(),
            };
            // Copy-before-write keeps the old content of blocks the guest overwrites during
            // the backup in a scratch file next to the socket (libvirt 9 does not pick one).
            let scratch = socket.with_file_name(format!("scratch-{disk}.qcow2"));
            writeln!(
                xml,
                "    <disk name='{}' backup='yes' type='file'{mode}>\n      <scratch file='{}'/>\n    </disk>",
                xml_escape(disk),
                xml_escape(&scratch.display().to_string())
            ).expect("writing to a String cannot fail");
        } else {
            writeln!(xml, "    <disk name='{}' backup='no'/>", xml_escape(disk))
                .expect("writing to a String cannot fail");
        }
    }
    xml.push_str("  </disks>\n</domainbackup>\n");
    xml
}

/// The VM's disks (not CD-ROMs), and those of `targets` that can hold a checkpoint's
/// bitmap: only qcow2 images can hold persistent bitmaps.
pub(super) fn checkpoint_disks(
    info: &crate::vm::VmInfo,
    targets: &[String],
) -> (Vec<String>, Vec<String>) {
    let all = info
        .disks
        .iter()
        .filter(|d| d.device == crate::vm::DiskDevice::Disk)
        .map(|d| d.target.clone())
        .collect();
    let bitmaps = targets
        .iter()
        .filter(|t| {
            info.disks
                .iter()
                .any(|d| &d.target == *t && d.format.as_deref() == Some("qcow2"))
        })
        .cloned()
        .collect();
    (all, bitmaps)
}

/// The checkpoint XML: a bitmap on each of `targets`, none on the others.
#[must_use]
pub fn checkpoint_xml(name: &str, targets: &[String], all_disks: &[String]) -> String {
    let mut xml = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        xml_escape(name)
    );
    for disk in all_disks {
        let kind = if targets.contains(disk) {
            "bitmap"
        } else {
            "no"
        };
        writeln!(
            xml,
            "    <disk name='{}' checkpoint='{kind}'/>",
            xml_escape(disk)
        )
        .expect("writing to a String cannot fail");
    }
    xml.push_str("  </disks>\n</domaincheckpoint>\n");
    xml
}

impl Hypervisor {
    /// Starts a pull-mode backup of VM `vm`'s disks `targets` (guest target names such as
    /// `vda`), exported on `socket`; scratch files `scratch-<target>.qcow2` go next to it,
    /// so its folder must be writable by QEMU. With `incremental_from`, the export also offers each
    /// disk's blocks dirtied since that libvirt checkpoint; with `new_checkpoint`, a
    /// checkpoint of that name is created at the backup's instant.
    pub fn begin_pull_backup(
        &self,
        vm: &str,
        socket: &Path,
        targets: &[String],
        incremental_from: Option<&str>,
        new_checkpoint: Option<&str>,
    ) -> Result<PullBackup> {
        for t in targets {
            check_name("disk target", t)?;
        }
        if let Some(n) = incremental_from {
            check_name("checkpoint", n)?;
        }
        if let Some(n) = new_checkpoint {
            check_name("checkpoint", n)?;
        }
        let info = self.vm(vm)?;
        let dom = self.lookup(vm)?;
        let (all_disks, bitmap_targets) = checkpoint_disks(&info, targets);
        if let Some(missing) = targets.iter().find(|t| !all_disks.contains(t)) {
            return Err(Error::Invalid(format!("VM {vm:?} has no disk {missing:?}")));
        }
        let backup = pull_backup_xml(
            socket,
            targets,
            &all_disks,
            incremental_from,
            &bitmap_targets,
        );
        let checkpoint = new_checkpoint.map(|n| checkpoint_xml(n, &bitmap_targets, &all_disks));
        ffi::backup_begin(&dom, &backup, checkpoint.as_deref())
            .map_err(|e| self.libvirt_error(&format!("start a backup of VM {vm:?}"), &e))?;
        Ok(PullBackup {
            dom,
            vm: vm.to_owned(),
            socket: socket.to_path_buf(),
            targets: targets.to_vec(),
            incremental_targets: if incremental_from.is_some() {
                bitmap_targets
            } else {
                Vec::new()
            },
            active: true,
        })
    }

    /// The XML of VM `vm`'s running backup job, if it has one.
    pub fn backup_job_xml(&self, vm: &str) -> Result<Option<String>> {
        let dom = self.lookup(vm)?;
        Ok(ffi::backup_xml(&dom).ok())
    }

    /// Ends VM `vm`'s running job (such as a backup left by a killed process).
    pub fn abort_job(&self, vm: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        end_job(&dom, &format!("end the job of VM {vm:?}"), &|| {
            !self.is_alive()
        })
    }

    /// Names of VM `vm`'s libvirt checkpoints.
    pub fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>> {
        let dom = self.lookup(vm)?;
        ffi::checkpoint_names(&dom)
            .map_err(|e| self.libvirt_error(&format!("list the checkpoints of VM {vm:?}"), &e))
    }

    /// The XML of checkpoint `name` of VM `vm`.
    pub fn checkpoint_xml(&self, vm: &str, name: &str) -> Result<String> {
        let dom = self.lookup(vm)?;
        ffi::checkpoint_xml(&dom, name)
            .map_err(|e| self.libvirt_error(&format!("read checkpoint {name:?} of VM {vm:?}"), &e))
    }

    /// Deletes checkpoint `name` of VM `vm` with its bitmaps. When the bitmaps cannot be
    /// deleted (they are already gone: the disk was replaced), libvirt's record of the
    /// checkpoint is deleted all the same, so that it does not linger.
    pub fn delete_checkpoint(&self, vm: &str, name: &str) -> Result<()> {
        let dom = self.lookup(vm)?;
        ffi::checkpoint_delete(&dom, name, false)
            .or_else(|_| ffi::checkpoint_delete(&dom, name, true))
            .map_err(|e| {
                self.libvirt_error(&format!("delete checkpoint {name:?} of VM {vm:?}"), &e)
            })
    }
}

impl PullBackup {
    /// The Unix socket the disks are exported on (export names are the targets).
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The disks being exported.
    #[must_use]
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// The NBD metadata context naming the blocks of `target` dirtied since the checkpoint the
    /// backup is incremental from (`None` for a full backup).
    #[must_use]
    pub fn dirty_context(&self, target: &str) -> Option<String> {
        self.incremental_targets
            .iter()
            .any(|t| t == target)
            .then(|| format!("qemu:dirty-bitmap:backup-{target}"))
    }

    /// The job's XML as libvirt reports it.
    pub fn job_xml(&self) -> Result<String> {
        ffi::backup_xml(&self.dom).map_err(|e| Error::Libvirt {
            action: format!("read the backup job of VM {:?}", self.vm),
            detail: e.message().to_owned(),
            connection_lost: false,
        })
    }

    /// Ends the job: the export goes away and the scratch data is released.
    pub fn finish(mut self) -> Result<()> {
        self.active = false;
        end_job(
            &self.dom,
            &format!("end the backup job of VM {:?}", self.vm),
            &|| false,
        )
    }
}

/// Aborts the domain's job and waits until libvirt no longer reports it: the abort returns
/// before QEMU has torn the job down, and a backup begun meanwhile would be refused.
///
/// That can take libvirt half a minute. libvirt 9.0 handles QEMU's events on one worker
/// thread, and when the guest agent's port opens or closes during a backup (the agent
/// starts or stops in the guest; always when a VM saved by a managed save runs again), the
/// handler of that event waits up to 30 s for the domain's job lock, which the backup
/// holds, before it gives up; the end of the backup is queued behind it. Seen here: an
/// abort took 28 s after the guest's agent was stopped mid-backup. So the wait is long
/// enough for that to pass, twice.
///
/// `action` names what was being done in the error, and `connection_lost` says whether the
/// connection went with it.
fn end_job(dom: &Domain, action: &str, connection_lost: &dyn Fn() -> bool) -> Result<()> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(75);
    let failed = |detail: String| Error::Libvirt {
        action: action.to_owned(),
        detail,
        connection_lost: connection_lost(),
    };
    ffi::abort_job(dom).map_err(|e| failed(e.message().to_owned()))?;
    let deadline = std::time::Instant::now() + PATIENCE;
    while ffi::backup_xml(dom).is_ok() {
        if std::time::Instant::now() > deadline {
            return Err(failed(format!(
                "the job was still there {} s after it was aborted; look at libvirtd's log",
                PATIENCE.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

impl Drop for PullBackup {
    fn drop(&mut self) {
        if self.active {
            // Dropped mid-way (an error or a panic unwinding): end the job, or say why not.
            let action = format!("end the backup job of VM {:?}", self.vm);
            end_job(&self.dom, &action, &|| false).or_warn("clean up after the backup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_of_an_incremental_pull_backup() {
        let disks = vec!["vda".to_owned(), "vdb".to_owned(), "vdc".to_owned()];
        // vda (qcow2) incremental, vdb (raw) full, vdc not backed up.
        let xml = pull_backup_xml(
            Path::new("/run/r&d/nbd.sock"),
            &disks[..2],
            &disks,
            Some("rw-1"),
            &disks[..1],
        );
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("mode"), Some("pull"));
        let server = root
            .descendants()
            .find(|n| n.has_tag_name("server"))
            .unwrap();
        assert_eq!(server.attribute("socket"), Some("/run/r&d/nbd.sock"));
        let backed: Vec<_> = root
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .map(|n| {
                (
                    n.attribute("name").unwrap(),
                    n.attribute("backup").unwrap(),
                    n.attribute("backupmode"),
                    n.attribute("incremental"),
                )
            })
            .collect();
        assert_eq!(
            backed,
            vec![
                ("vda", "yes", Some("incremental"), Some("rw-1")),
                ("vdb", "yes", Some("full"), None),
                ("vdc", "no", None, None)
            ]
        );
        let full = pull_backup_xml(Path::new("/s"), &disks[..1], &disks, None, &disks[..1]);
        assert!(!full.contains("backupmode"), "{full}");
        let cp = checkpoint_xml("rw-2", &disks[..1], &disks);
        assert!(roxmltree::Document::parse(&cp).is_ok());
        assert!(cp.contains("name='vdb' checkpoint='no'"));
        assert!(check_name("checkpoint", "a'b").is_err());
    }
}
