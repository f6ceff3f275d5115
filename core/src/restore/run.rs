//! Running a VM straight from one of its checkpoints (instant recovery, issue 23): the VM
//! starts within seconds from the store, and its data is copied to its own disk files in
//! the background when the user keeps it.
//!
//! - **Start.** The VM must be shut off. It is started with its own definition (this
//!   host's, not the checkpoint's) as a *live* definition whose disks are qcow2 overlays
//!   over the checkpoint's read-only NBD export ([`crate::nbd_export`]): libvirt keeps the
//!   persistent definition as it is, so once the VM stops — or Rewind dies — it is the VM
//!   it was, with its own disks, which nothing opened.
//! - **Discard.** The VM is turned off, the export stops and the overlays go: the VM and its
//!   disks are byte for byte as before.
//! - **Keep.** Each disk is copied by QEMU (libvirt's block copy, the whole chain: the
//!   checkpoint's data and the writes since) into a new file beside the disk's own file
//!   (`<name>-run-<checkpoint>.qcow2`) while the VM runs, then switched over to it. Then the
//!   persistent definition names the new files. The old disk files are left as they were:
//!   the way back, for the user to delete.
//!
//! The process that starts the run serves the export until it is kept or discarded; when
//! the value is dropped without either, the run is discarded, so that no VM is left on an
//! export that is gone. (Serving it from the protection service, so that `rewind run`
//! returns at once, is the next step.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::RestoreError;
use super::domain_xml::{self, DiskPlace, Rewrite};
use super::isolate::{self, OverlayDisk};
use crate::libvirt::Hypervisor;
use crate::nbd_export::CheckpointExport;
use crate::progress::Control;
use crate::store::{Manifest, Store};

/// The start of a run's folder's name in the work folder (then the process id).
const PREFIX: &str = "rewind-run-";

/// One disk of a run.
#[derive(Debug, Clone)]
struct RunDisk {
    target: String,
    /// The disk's own file, which the run never opens.
    original: PathBuf,
}

/// A VM running from a checkpoint; see the module documentation.
pub struct RunFromBackup {
    hv: Hypervisor,
    vm: String,
    checkpoint: String,
    persistent_xml: String,
    folder: PathBuf,
    export: Option<CheckpointExport>,
    disks: Vec<RunDisk>,
    running: bool,
}

impl std::fmt::Debug for RunFromBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFromBackup")
            .field("vm", &self.vm)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl RunFromBackup {
    /// Starts VM `m.vm` (defined on `hv`, this machine's libvirt, and shut off) from
    /// checkpoint `m` of `store`.
    ///
    /// # Errors
    /// The VM is not here or runs, a disk of the checkpoint is not one of its file disks,
    /// the export or the overlays cannot be made, or libvirt does not start it. Nothing of
    /// the VM was changed.
    pub fn start(hv: Hypervisor, store: &Arc<Store>, m: &Manifest) -> Result<Self, RestoreError> {
        if !hv.is_local() {
            return Err(RestoreError::Invalid(format!(
                "a VM runs from its checkpoint on this machine's libvirt, not on {}",
                hv.uri()
            )));
        }
        let uuid = m.vm.uuid.to_string();
        let info = hv.vm(&uuid).map_err(|_| {
            RestoreError::Invalid(format!(
                "VM {:?} is not defined on this machine; restore it as a new VM instead",
                m.vm.name
            ))
        })?;
        if info.state.is_active() {
            return Err(RestoreError::Invalid(format!(
                "VM {:?} is running; shut it down first (its own disks are not touched by a run from a checkpoint)",
                info.name
            )));
        }
        let mut disks = Vec::new();
        for d in &m.disks {
            let original = info
                .disks
                .iter()
                .find(|x| x.target == d.target)
                .and_then(|x| x.path())
                .cloned()
                .ok_or_else(|| RestoreError::NoSuchDisk {
                    id: m.id.clone(),
                    vm: info.name.clone(),
                    target: d.target.clone(),
                    available: info
                        .disks
                        .iter()
                        .filter(|x| x.path().is_some())
                        .map(|x| x.target.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            disks.push(RunDisk {
                target: d.target.clone(),
                original,
            });
        }
        let persistent_xml = hv.persistent_xml(&uuid)?;
        let folder = new_folder()?;
        let mut run = Self {
            hv,
            vm: info.name.clone(),
            checkpoint: m.id.clone(),
            persistent_xml,
            folder,
            export: None,
            disks,
            running: false,
        };
        let export = CheckpointExport::start(store, m, &run.folder, crate::firmware::qemu_owner())
            .map_err(|e| RestoreError::Invalid(e.to_string()))?;
        let mut places = Vec::new();
        let mut overlays = Vec::new();
        for disk in export.disks() {
            let overlay = run.folder.join(format!("{}.qcow2", disk.target()));
            super::clone::make_overlay(&overlay, &disk.uri(), disk.size_bytes())?;
            places.push(DiskPlace {
                target: disk.target().to_owned(),
                path: overlay,
                format: "qcow2".into(),
            });
            overlays.push(OverlayDisk {
                target: disk.target().to_owned(),
                socket: disk.socket().to_path_buf(),
                export: disk.target().to_owned(),
            });
        }
        run.export = Some(export);
        let xml = domain_xml::rewrite(
            &run.persistent_xml,
            &Rewrite {
                disks: places,
                ..Rewrite::default()
            },
        )?;
        let xml = isolate::back_overlays(&xml, &overlays)?;
        tracing::info!(vm = %run.vm, checkpoint = %m.id, "running the VM from its checkpoint");
        run.hv.start_with_live_xml(&xml)?;
        run.running = true;
        Ok(run)
    }

    /// The VM's name.
    #[must_use]
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Turns the VM off and removes the run: the VM is as it was before.
    ///
    /// # Errors
    /// The VM could not be turned off, or the run's folder not removed.
    pub fn discard(mut self) -> Result<(), RestoreError> {
        self.stop_and_clean()
    }

    fn stop_and_clean(&mut self) -> Result<(), RestoreError> {
        if std::mem::take(&mut self.running) && self.hv.is_running(&self.vm) {
            self.hv.destroy_vm(&self.vm)?;
        }
        self.clean()
    }

    /// Stops the export, removes the overlays.
    fn clean(&mut self) -> Result<(), RestoreError> {
        if let Some(export) = self.export.take()
            && let Err(e) = export.stop()
        {
            tracing::warn!("the run's export: {e}");
        }
        crate::cleanup::remove_dir_all(&self.folder);
        if self.folder.exists() {
            return Err(RestoreError::Write {
                path: self.folder.clone(),
                detail: "could not remove the run's folder".into(),
            });
        }
        Ok(())
    }

    /// Copies each disk into a new file beside its own while the VM runs, switches over,
    /// and makes the VM's definition name the new files; returns them. The VM's old disk
    /// files are left as they were. The run is then over (dropping it changes nothing).
    /// `control` shows progress and cancels: on an error the VM still runs from its
    /// checkpoint, and [`RunFromBackup::discard`] is still possible.
    ///
    /// # Errors
    /// A copy failed or was cancelled, or the definition could not be saved.
    pub fn keep(&mut self, control: &Control) -> Result<Vec<PathBuf>, RestoreError> {
        let mut made = Vec::new();
        let mut places = Vec::new();
        for disk in self.disks.clone() {
            let stem = disk
                .original
                .file_stem()
                .map_or_else(|| disk.target.clone(), |s| s.to_string_lossy().into_owned());
            let dest = disk
                .original
                .with_file_name(format!("{stem}-run-{}.qcow2", self.checkpoint));
            if dest.exists() {
                return Err(RestoreError::Exists(dest));
            }
            self.hv
                .copy_disk_and_switch(&self.vm, &disk.target, &dest, "qcow2", control)?;
            made.push(dest.clone());
            places.push(DiskPlace {
                target: disk.target,
                path: dest,
                format: "qcow2".into(),
            });
        }
        let kept = domain_xml::rewrite(
            &self.persistent_xml,
            &Rewrite {
                disks: places,
                ..Rewrite::default()
            },
        )?;
        self.hv.define_vm(&kept)?;
        // The VM runs on its new files: the export and overlays are not used any more.
        self.running = false;
        if let Err(e) = self.clean() {
            tracing::warn!("after keeping the run of {}: {e}", self.vm);
        }
        Ok(made)
    }
}

impl Drop for RunFromBackup {
    fn drop(&mut self) {
        if (self.running || self.export.is_some())
            && let Err(e) = self.stop_and_clean()
        {
            tracing::warn!("ending the run of {} from its checkpoint: {e}", self.vm);
        }
    }
}

/// A new folder for a run in the work folder (0711), first removing those of dead runs.
fn new_folder() -> Result<PathBuf, RestoreError> {
    let failed = |path: &Path, e: std::io::Error| RestoreError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let base = crate::paths::work_dir().map_err(|e| failed(Path::new("work folder"), e))?;
    crate::workdir::remove_dead_runs(&base, PREFIX);
    let folder = base.join(format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir(&folder).map_err(|e| failed(&folder, e))?;
    std::fs::set_permissions(&folder, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .map_err(|e| failed(&folder, e))?;
    Ok(folder)
}

/// The runs this process serves, by VM: the protection service's (or a window's engine's)
/// own, kept while the process lives.
static SERVED: std::sync::Mutex<std::collections::BTreeMap<Uuid, RunFromBackup>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn served_runs() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<Uuid, RunFromBackup>>
{
    SERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn not_running(vm: &Uuid) -> RestoreError {
    RestoreError::Invalid(format!(
        "VM {vm} is not running from a checkpoint here; start one with `rewind run VM CHECKPOINT --from DEST`"
    ))
}

/// Starts VM `m.vm` from checkpoint `m` ([`RunFromBackup::start`]) and keeps serving it in
/// this process until [`keep_served`] or [`discard_served`].
///
/// # Errors
/// As [`RunFromBackup::start`]; or the VM runs from a checkpoint already.
pub fn start_served(hv: Hypervisor, store: &Arc<Store>, m: &Manifest) -> Result<(), RestoreError> {
    if served_runs().contains_key(&m.vm.uuid) {
        return Err(RestoreError::Invalid(format!(
            "VM {:?} runs from a checkpoint already: keep it or discard it first",
            m.vm.name
        )));
    }
    let run = RunFromBackup::start(hv, store, m)?;
    served_runs().insert(m.vm.uuid, run);
    Ok(())
}

/// [`RunFromBackup::keep`] of the run of VM `vm` that this process serves: the new disk
/// files. On an error the run goes on.
///
/// # Errors
/// No such run here, or as [`RunFromBackup::keep`].
pub fn keep_served(vm: &Uuid, control: &Control) -> Result<Vec<PathBuf>, RestoreError> {
    let mut run = served_runs().remove(vm).ok_or_else(|| not_running(vm))?;
    match run.keep(control) {
        Ok(files) => Ok(files),
        Err(e) => {
            served_runs().insert(*vm, run);
            Err(e)
        }
    }
}

/// [`RunFromBackup::discard`] of the run of VM `vm` that this process serves.
///
/// # Errors
/// No such run here, or as [`RunFromBackup::discard`].
pub fn discard_served(vm: &Uuid) -> Result<(), RestoreError> {
    let run = served_runs().remove(vm).ok_or_else(|| not_running(vm))?;
    run.discard()
}

/// The runs this process serves: VM, its name, the checkpoint.
#[must_use]
pub fn served() -> Vec<(Uuid, String, String)> {
    served_runs()
        .iter()
        .map(|(uuid, run)| (*uuid, run.vm.clone(), run.checkpoint.clone()))
        .collect()
}
