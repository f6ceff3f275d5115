//! A throwaway clone of a checkpoint, running straight from the store (a boot-check).
//!
//! The clone is a **transient** domain with its own name (`<vm> (boot-check …)`) and UUID,
//! started with `VIR_DOMAIN_START_AUTODESTROY`, so that libvirt destroys it when Rewind's
//! connection closes — also when Rewind is killed. Everything it uses is in one private
//! folder of Rewind's work folder, removed when the clone is finished or dropped (and, after
//! a crash, by the next clone, as the work folder's other runs are):
//!
//! - one NBD socket per disk, serving the checkpoint's disk from the store read-only
//!   ([`crate::nbd_export`]), given to QEMU's user;
//! - one qcow2 overlay per disk over that export, which takes every write;
//! - a copy of the checkpoint's UEFI variables, and the serial and console logs.
//!
//! A TPM's state is copied to libvirt's TPM folder for the clone's own UUID (the only place
//! libvirt 9 lets swtpm keep it), and removed with the clone.
//!
//! The checkpoint's definition is input anyone may have written: it is made safe as for a
//! restore as a new VM ([`super::confine`]) and then cut off from the network and the host
//! ([`super::isolate`]). The original VM, its disks and its files are never touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use uuid::Uuid;

use super::RestoreError;
use super::confine::Mode;
use super::confine::{self, Role};
use super::domain_xml::{self, DiskPlace, Rewrite};
use super::isolate::{self, Isolation, OverlayDisk};
use super::vm::{parsed, refused};
use crate::firmware::SavedFirmware;
use crate::libvirt::Hypervisor;
use crate::nbd_export::CheckpointExport;
use crate::store::{Manifest, Store};

/// The start of a clone folder's name in the work folder (then the process id).
const PREFIX: &str = "rewind-clone-";

/// A running throwaway clone; finished (turned off, every trace removed) by
/// [`ThrowawayClone::finish`] or when dropped.
pub struct ThrowawayClone<'h> {
    hv: &'h Hypervisor,
    name: String,
    uuid: String,
    folder: PathBuf,
    export: Option<CheckpointExport>,
    tpm_dir: Option<PathBuf>,
    console_log: Option<PathBuf>,
    started: bool,
}

impl std::fmt::Debug for ThrowawayClone<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayClone")
            .field("name", &self.name)
            .field("folder", &self.folder)
            .finish_non_exhaustive()
    }
}

impl<'h> ThrowawayClone<'h> {
    /// Starts a clone of checkpoint `m` of `store` on `hv` (which must be this machine's
    /// libvirt: the export's sockets are local). The clone lives while `hv`'s connection
    /// does.
    ///
    /// # Errors
    /// The checkpoint's definition is refused or damaged, its firmware state cannot be
    /// read, the export or the overlays cannot be made, or libvirt does not start it. What
    /// was made is removed.
    pub fn start(
        hv: &'h Hypervisor,
        store: &Arc<Store>,
        m: &Manifest,
    ) -> Result<Self, RestoreError> {
        if !hv.is_local() {
            return Err(RestoreError::Invalid(format!(
                "a boot-check runs the checkpoint on this machine's libvirt, not on {}",
                hv.uri()
            )));
        }
        let checkpoint_xml = parsed(m)?;
        let short = &Uuid::new_v4().simple().to_string()[..8];
        let name = format!("{} (boot-check {short})", m.vm.name);
        let uuid = Uuid::new_v4().to_string();
        let folder = new_folder(hv, &uuid)?;
        let mut clone = Self {
            hv,
            name,
            uuid,
            folder,
            export: None,
            tpm_dir: None,
            console_log: None,
            started: false,
        };

        let mut rules = confine::rules_for(
            hv,
            &clone.name,
            &clone.uuid,
            &m.vm.uuid.to_string(),
            true,
            Some(&clone.folder),
            &checkpoint_xml,
        )?;
        let refused = |refusal| refused(m, &clone.name, Mode::NewVm, refusal);
        let places: Vec<DiskPlace> = m
            .disks
            .iter()
            .map(|d| DiskPlace {
                target: d.target.clone(),
                path: clone.folder.join(format!("{}.qcow2", d.target)),
                format: "qcow2".into(),
            })
            .collect();
        rules.own_new.extend(places.iter().map(|p| p.path.clone()));
        let xml = domain_xml::rewrite(
            &m.domain_xml,
            &Rewrite {
                name: Some(clone.name.clone()),
                uuid: Some(clone.uuid.clone()),
                new_macs: true,
                disks: places.clone(),
                rename_logs: Some((m.vm.name.clone(), clone.name.clone())),
                logs_dir: Some(clone.folder.clone()),
                eject_removable: true,
                // Where a VM of the clone's name would keep them: checked here as any new
                // VM's, then moved into the clone's folder (isolate).
                nvram: match checkpoint_xml.firmware {
                    crate::vm::Firmware::Uefi { .. } => hv.default_nvram_path(&clone.name),
                    crate::vm::Firmware::Bios => None,
                },
                ..Rewrite::default()
            },
        )?;
        let safe = rules.check_domain(&xml).map_err(refused)?;
        let tpm_dir = checkpoint_xml
            .tpm
            .as_ref()
            .and_then(|_| hv.tpm_state_dir(&clone.uuid))
            .map(|p| rules.confine(Role::TpmState, &p, "the clone's TPM state folder"))
            .transpose()
            .map_err(refused)?;

        let overlays = clone.serve_disks(store, m)?;
        let nvram = clone.write_firmware(store, m, tpm_dir.as_ref())?;
        let xml = isolate::isolate(
            &safe.xml,
            &Isolation {
                disks: overlays,
                nvram,
            },
        )?;
        clone.console_log = console_log(&xml);
        tracing::info!(clone = %clone.name, checkpoint = %m.id, "starting a throwaway clone");
        clone.started = true;
        if let Err(e) = hv.start_transient(&xml) {
            clone.started = false;
            return Err(e.into());
        }
        Ok(clone)
    }

    /// Serves the checkpoint's disks and makes an overlay over each.
    fn serve_disks(
        &mut self,
        store: &Arc<Store>,
        m: &Manifest,
    ) -> Result<Vec<OverlayDisk>, RestoreError> {
        let export = CheckpointExport::start(store, m, &self.folder, crate::firmware::qemu_owner())
            .map_err(|e| RestoreError::Invalid(e.to_string()))?;
        let mut overlays = Vec::new();
        for disk in export.disks() {
            let overlay = self.folder.join(format!("{}.qcow2", disk.target()));
            make_overlay(&overlay, &disk.uri(), disk.size_bytes())?;
            overlays.push(OverlayDisk {
                target: disk.target().to_owned(),
                socket: disk.socket().to_path_buf(),
                export: disk.target().to_owned(),
            });
        }
        self.export = Some(export);
        Ok(overlays)
    }

    /// The checkpoint's UEFI variables into the clone's folder (their path returned), its
    /// TPM state where libvirt keeps the clone's (`tpm_dir`, confined).
    fn write_firmware(
        &mut self,
        store: &Store,
        m: &Manifest,
        tpm_dir: Option<&confine::Confined>,
    ) -> Result<Option<PathBuf>, RestoreError> {
        let mut firmware = SavedFirmware::load(store, m)?;
        let nvram = match firmware.nvram.take() {
            Some(bytes) => {
                let path = self.folder.join("VARS.fd");
                crate::atomic_file::write(&path, &bytes, 0o600).map_err(|e| {
                    RestoreError::Write {
                        path: path.clone(),
                        detail: e.to_string(),
                    }
                })?;
                Some(path)
            }
            None => None,
        };
        if firmware.tpm.is_some() {
            // Remembered first, so that a failure half way is cleaned up too.
            self.tpm_dir = tpm_dir.map(|d| d.path().to_path_buf());
            firmware.write_local(None, tpm_dir)?;
        }
        Ok(nvram)
    }

    /// The clone's (transient) VM name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The clone's private folder.
    #[must_use]
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// The file its serial console writes to, if the checkpoint's VM has one.
    #[must_use]
    pub fn console_log(&self) -> Option<&Path> {
        self.console_log.as_deref()
    }

    /// Turns the clone off and removes every trace of it: the transient VM, the export's
    /// sockets, the overlays, the firmware state.
    ///
    /// # Errors
    /// Something could not be removed (what is said; the rest is removed anyway).
    pub fn finish(mut self) -> Result<(), RestoreError> {
        self.clean_up()
    }

    fn clean_up(&mut self) -> Result<(), RestoreError> {
        let mut first: Option<RestoreError> = None;
        if std::mem::take(&mut self.started)
            && self.hv.is_running(&self.name)
            && let Err(e) = self.hv.destroy_vm(&self.name)
            && self.hv.is_running(&self.name)
        {
            first.get_or_insert(e.into());
        }
        if let Some(export) = self.export.take()
            && let Err(e) = export.stop()
        {
            tracing::warn!("the clone's export: {e}");
        }
        if let Some(dir) = self.tpm_dir.take()
            && dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            first.get_or_insert(RestoreError::Write {
                path: dir,
                detail: format!("could not remove the clone's TPM state: {e}"),
            });
        }
        if self.folder.exists() {
            crate::cleanup::remove_dir_all(&self.folder);
            if self.folder.exists() {
                first.get_or_insert(RestoreError::Write {
                    path: self.folder.clone(),
                    detail: "could not remove the clone's folder".into(),
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for ThrowawayClone<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.clean_up() {
            tracing::warn!("removing the throwaway clone {}: {e}", self.name);
        }
    }
}

/// A new private folder for the clone `uuid` in the work folder (0711: QEMU passes through
/// it to the files libvirt gives it), holding the clone's UUID (`clone.uuid`), so that a
/// later run can remove what a killed one left: the folders of dead runs, and the TPM
/// state libvirt kept for their clones.
fn new_folder(hv: &Hypervisor, uuid: &str) -> Result<PathBuf, RestoreError> {
    let failed = |path: &Path, e: std::io::Error| RestoreError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let base = crate::paths::work_dir().map_err(|e| failed(Path::new("work folder"), e))?;
    remove_dead_clones(hv, &base);
    let folder = crate::workdir::new_folder_in(&base, PREFIX, 8).map_err(|e| failed(&base, e))?;
    let note = folder.join(UUID_NOTE);
    std::fs::write(&note, uuid).map_err(|e| failed(&note, e))?;
    Ok(folder)
}

/// The file in a clone's folder that holds the clone's UUID.
const UUID_NOTE: &str = "clone.uuid";

/// Removes what clones of runs that no longer run left in `base`: the TPM state libvirt
/// keeps under their UUIDs (unless a VM with that UUID exists), then their folders.
fn remove_dead_clones(hv: &Hypervisor, base: &Path) {
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let Some(uuid) = std::fs::read_to_string(entry.path().join(UUID_NOTE))
                .ok()
                .and_then(|u| Uuid::parse_str(u.trim()).ok())
                .map(|u| u.to_string())
            else {
                continue;
            };
            if let Some(dir) = hv.tpm_state_dir(&uuid).filter(|d| d.exists())
                && !hv.has_vm(&uuid)
            {
                tracing::info!("removing the TPM state of a killed boot-check's copy");
                crate::cleanup::remove_dir_all(&dir);
            }
        }
    }
    crate::workdir::remove_dead_runs(base, PREFIX);
}

/// A qcow2 file over the NBD export `uri` of `size` bytes (`qemu-img create -u`: the export
/// is not opened now).
pub(super) fn make_overlay(path: &Path, uri: &str, size: u64) -> Result<(), RestoreError> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b", uri])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!("could not run qemu-img ({e}); install it (package qemu-utils)"),
        })?;
    if !out.status.success() {
        return Err(RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!(
                "qemu-img could not make the overlay: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The file the first serial port of `xml` writes to.
fn console_log(xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let serial = doc
        .descendants()
        .find(|n| n.has_tag_name("serial") && n.attribute("type") == Some("file"))?;
    serial
        .children()
        .find(|n| n.has_tag_name("source"))?
        .attribute("path")
        .map(PathBuf::from)
}
