//! Running a VM straight from one of its checkpoints (instant recovery, issue 23): the VM
//! starts within seconds from the store, and its data is copied to its own disk files in
//! the background when the user keeps it.
//!
//! - **Start.** The VM must be shut off. It is started with its own definition (this
//!   host's, not the checkpoint's) as a *live* definition whose disks are qcow2 overlays
//!   over the checkpoint's read-only NBD export ([`crate::nbd_export`]): libvirt keeps the
//!   persistent definition as it is, so once the VM stops — or Rewind dies — it is the VM
//!   it was, with its own disks, which nothing opened.
//! - **Firmware state.** The run boots with the VM's own UEFI variables and TPM state
//!   (the VM's definition is kept), which the guest and its firmware write as they boot
//!   (boot entries, counters). They are kept in the run's folder when it starts.
//! - **Discard.** The VM is turned off, the export stops and the overlays go, and the UEFI
//!   variables and TPM state kept at the start are put back: the VM, its disks and its
//!   firmware state are byte for byte as before.
//! - **Keep.** Each disk is copied by QEMU (libvirt's block copy, the whole chain: the
//!   checkpoint's data and the writes since) into a new file beside the disk's own file
//!   (`<name>-run-<checkpoint>.qcow2`) while the VM runs, then switched over to it. Then the
//!   persistent definition names the new files. The old disk files are left as they were:
//!   the way back, for the user to delete.
//!
//! The process that starts the run serves the export until it is kept or discarded; when
//! the value is dropped without either, the run is discarded, so that no VM is left on an
//! export that is gone.
//!
//! **When that process dies** (the protection service killed, restarted or upgraded), the
//! VM runs on. Its overlay disks stop the VM on a failed read or write instead of failing in
//! the guest (`error_policy='stop'`), so a read from the lost export pauses it. The run's
//! folder holds a note (`run.json`: the VM, the checkpoint, the destination, whether it was
//! being kept); the next engine to start ([`adopt_left_runs`]) serves the export again on the
//! same sockets (QEMU's NBD client connects again on its next request), resumes the VM if it
//! paused, and serves the run from then on. A copy that was under way (keep) is abandoned, its
//! unfinished file removed, and the copy starts again from the beginning; disks already
//! switched over to their copy stay so. A run whose store cannot be opened then stays paused
//! until it can (the next start tries again) or the user turns the VM off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::RestoreError;
use super::domain_xml::{self, DiskPlace, Rewrite};
use super::isolate::{self, OverlayDisk};
use crate::firmware::FirmwareState;
use crate::libvirt::Hypervisor;
use crate::nbd_export::CheckpointExport;
use crate::progress::Control;
use crate::store::{Manifest, Store};

/// The start of a run's folder's name in the work folder (then the process id).
const PREFIX: &str = "rewind-run-";
/// The run's note in its folder.
const NOTE: &str = "run.json";
/// The process that serves a run adopted from a dead one (its id), in the run's folder.
const OWNER: &str = "owner";

/// What a run's folder says of it, for the process that adopts it ([`adopt_left_runs`]).
/// Written by Rewind into its own private work folder.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RunNote {
    /// The note's format.
    version: u32,
    vm_uuid: Uuid,
    vm: String,
    checkpoint: String,
    /// The destination as the engine names it; `None` for a run that no later process can
    /// serve again (started by a library caller).
    destination: Option<String>,
    persistent_xml: String,
    /// Target and the disk's own file.
    disks: Vec<(String, PathBuf)>,
    /// The user asked to keep the run, and it was not done.
    keep_asked: bool,
    /// The copies' files made by keeping (each removed unless its disk switched over).
    copies: Vec<PathBuf>,
    /// The VM's own UEFI variables and TPM state as they were before the run are kept in
    /// the folder, to be put back when the run ends without being kept.
    #[serde(default)]
    own_firmware: bool,
}

const NOTE_VERSION: u32 = 1;

/// Set while this process stops (its engine shuts down): a keep cancelled then is asked
/// again of the next process, which adopts the run.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that this process is stopping: a copy cancelled from now on is started again by the
/// process that adopts the run next.
pub fn process_stopping() {
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
}

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
    vm_uuid: Uuid,
    vm: String,
    checkpoint: String,
    destination: Option<String>,
    persistent_xml: String,
    folder: PathBuf,
    export: Option<CheckpointExport>,
    disks: Vec<RunDisk>,
    running: bool,
    keep_asked: bool,
    copies: Vec<PathBuf>,
    /// The VM's own firmware state is kept in the folder ([`RunNote::own_firmware`]).
    own_firmware: bool,
    /// Set to stop the thread that resumes the VM after failed reads (adopted runs).
    unwatch: Option<Arc<std::sync::atomic::AtomicBool>>,
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
        Self::start_from(hv, store, m, None)
    }

    /// [`RunFromBackup::start`], with the name of the destination that `store` is (as
    /// the engine's configuration names it), so that a process that adopts the run after
    /// this one died can serve it again.
    ///
    /// # Errors
    /// As [`RunFromBackup::start`].
    pub fn start_from(
        hv: Hypervisor,
        store: &Arc<Store>,
        m: &Manifest,
        destination: Option<&str>,
    ) -> Result<Self, RestoreError> {
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
        let disks = run_disks(m, &info)?;
        let persistent_xml = hv.persistent_xml(&uuid)?;
        let folder = new_folder(&hv)?;
        let mut run = Self {
            hv,
            vm_uuid: m.vm.uuid,
            vm: info.name.clone(),
            checkpoint: m.id.clone(),
            destination: destination.map(str::to_owned),
            persistent_xml,
            folder,
            export: None,
            disks,
            running: false,
            keep_asked: false,
            copies: Vec::new(),
            own_firmware: false,
            unwatch: None,
        };
        // The guest may write its UEFI variables and TPM state while it runs (firmware
        // counters, boot entries): a discarded run puts them back as they were.
        FirmwareState::read(&info)?
            .keep_in(&run.folder)
            .map_err(|e| RestoreError::Write {
                path: run.folder.clone(),
                detail: e.to_string(),
            })?;
        run.own_firmware = true;
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
        run.write_note()?;
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

    /// Writes the run's note (what a process that adopts it needs).
    fn write_note(&self) -> Result<(), RestoreError> {
        let note = RunNote {
            version: NOTE_VERSION,
            vm_uuid: self.vm_uuid,
            vm: self.vm.clone(),
            checkpoint: self.checkpoint.clone(),
            destination: self.destination.clone(),
            persistent_xml: self.persistent_xml.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| (d.target.clone(), d.original.clone()))
                .collect(),
            keep_asked: self.keep_asked,
            copies: self.copies.clone(),
            own_firmware: self.own_firmware,
        };
        let path = self.folder.join(NOTE);
        let bytes = serde_json::to_vec_pretty(&note).map_err(|e| RestoreError::Write {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        crate::atomic_file::write(&path, &bytes, 0o600).map_err(|e| RestoreError::Write {
            path,
            detail: e.to_string(),
        })
    }

    /// Whether the VM runs (or is paused) on the run's overlays.
    fn runs_on_its_disks(&self) -> bool {
        runs_in(&self.hv, &self.vm_uuid, &self.folder)
    }

    /// The disk files the VM runs on now, by target.
    fn live_sources(&self) -> Vec<(String, PathBuf)> {
        self.hv
            .vm(&self.vm)
            .map(|info| {
                info.disks
                    .iter()
                    .filter_map(|d| d.path().map(|p| (d.target.clone(), p.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Copies disk `target` into `dest` and switches it over. A copy that ends by itself
    /// (a read failed) is tried again, twice: the first read over an export served again by
    /// a new process fails while QEMU connects to it again.
    fn copy_disk(&self, target: &str, dest: &Path, control: &Control) -> Result<(), RestoreError> {
        let mut tries = 0;
        loop {
            match self
                .hv
                .copy_disk_and_switch(&self.vm, target, dest, "qcow2", control)
            {
                Ok(()) => return Ok(()),
                Err(e) if tries < 2 && control.check().is_ok() => {
                    tries += 1;
                    tracing::warn!("{e}; trying again");
                    crate::cleanup::remove_file(dest);
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Abandons copies under way and removes the files of those whose disk did not switch
    /// over to them; the note then lists only the copies in use.
    fn drop_unfinished_copies(&mut self) {
        let live = self.live_sources();
        let mut kept = Vec::new();
        for copy in std::mem::take(&mut self.copies) {
            if live.iter().any(|(_, p)| *p == copy) {
                kept.push(copy);
                continue;
            }
            if let Some(disk) = self
                .disks
                .iter()
                .find(|d| copy_file(d, &self.checkpoint) == copy)
                && let Err(e) = self.hv.abandon_block_job(&self.vm, &disk.target)
            {
                tracing::warn!("{e}");
            }
            crate::cleanup::remove_file(&copy);
        }
        self.copies = kept;
    }

    /// Turns the VM off and removes the run: the VM is as it was before.
    ///
    /// # Errors
    /// The VM could not be turned off, or the run's folder not removed.
    pub fn discard(mut self) -> Result<(), RestoreError> {
        self.stop_and_clean()
    }

    fn stop_and_clean(&mut self) -> Result<(), RestoreError> {
        // Only the instance on the run's disks: a VM that stopped by itself and was
        // started again on its own disks is not the run's.
        if std::mem::take(&mut self.running) && self.runs_on_its_disks() {
            self.hv.destroy_vm(&self.vm)?;
        }
        if self.own_firmware {
            let info = self.hv.vm(&self.vm_uuid.to_string())?;
            put_back_firmware(&self.folder, &info)?;
            self.own_firmware = false;
        }
        self.clean()
    }

    /// Stops the export, removes the overlays.
    fn clean(&mut self) -> Result<(), RestoreError> {
        if let Some(unwatch) = self.unwatch.take() {
            unwatch.store(true, std::sync::atomic::Ordering::SeqCst);
        }
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
        self.keep_asked = true;
        self.write_note()?;
        match self.copy_all(control) {
            Ok(made) => Ok(made),
            Err(e) => {
                self.drop_unfinished_copies();
                if !STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
                    // Asked again by the user, not by the next process.
                    self.keep_asked = false;
                }
                if let Err(e) = self.write_note() {
                    tracing::warn!("{e}");
                }
                Err(e)
            }
        }
    }

    fn copy_all(&mut self, control: &Control) -> Result<Vec<PathBuf>, RestoreError> {
        let mut made = Vec::new();
        let mut places = Vec::new();
        let live = self.live_sources();
        for disk in self.disks.clone() {
            let dest = copy_file(&disk, &self.checkpoint);
            // Switched over already (by a process that died before it was done).
            let switched = live.iter().any(|(t, p)| *t == disk.target && *p == dest);
            if !switched {
                if dest.exists() {
                    return Err(RestoreError::Exists(dest));
                }
                self.copies.push(dest.clone());
                self.write_note()?;
                self.copy_disk(&disk.target, &dest, control)?;
            }
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
        // The VM runs on its new files: the export and overlays are not used any more, and
        // its firmware state is the run's from now on.
        self.running = false;
        self.own_firmware = false;
        if let Err(e) = self.clean() {
            tracing::warn!("after keeping the run of {}: {e}", self.vm);
        }
        Ok(made)
    }
}

impl Drop for RunFromBackup {
    fn drop(&mut self) {
        // Also a run whose start failed before its export served: its folder goes too.
        if (self.running || self.export.is_some() || self.folder.exists())
            && let Err(e) = self.stop_and_clean()
        {
            tracing::warn!("ending the run of {} from its checkpoint: {e}", self.vm);
        }
    }
}

/// The disks of checkpoint `m` that a run of VM `info` swaps: each one's own file.
fn run_disks(m: &Manifest, info: &crate::vm::VmInfo) -> Result<Vec<RunDisk>, RestoreError> {
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
    Ok(disks)
}

/// The file that keeping makes for `disk`: beside its own file.
fn copy_file(disk: &RunDisk, checkpoint: &str) -> PathBuf {
    let stem = disk
        .original
        .file_stem()
        .map_or_else(|| disk.target.clone(), |s| s.to_string_lossy().into_owned());
    disk.original
        .with_file_name(format!("{stem}-run-{checkpoint}.qcow2"))
}

/// The runs' folders in the work folder `base` whose process is gone: the folder and its
/// note, if it reads.
fn left_runs(base: &Path) -> Vec<(PathBuf, Option<RunNote>)> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut left = Vec::new();
    for entry in entries.flatten() {
        let Some(named_pid) = crate::workdir::pid_in_name(&entry.file_name(), PREFIX) else {
            continue;
        };
        let folder = entry.path();
        let pid = std::fs::read_to_string(folder.join(OWNER))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(named_pid);
        if crate::workdir::is_alive(pid) {
            continue;
        }
        let note = std::fs::read(folder.join(NOTE))
            .ok()
            .and_then(|b| serde_json::from_slice::<RunNote>(&b).ok())
            .filter(|n| n.version == NOTE_VERSION);
        left.push((folder, note));
    }
    left
}

/// Puts back the VM's own UEFI variables and TPM state that a run kept in its `folder`
/// ([`RunNote::own_firmware`]), unless the VM runs (on its own disks, started by someone
/// else since: its state is then in use, and left as it is).
fn put_back_firmware(folder: &Path, info: &crate::vm::VmInfo) -> Result<(), RestoreError> {
    if info.state.is_active() {
        tracing::warn!(
            "VM {:?} was started again before its UEFI variables and TPM state could be put back as they were before its run from a checkpoint; they are left as the run left them",
            info.name
        );
        return Ok(());
    }
    FirmwareState::kept_in(folder)
        .map_err(|e| RestoreError::Write {
            path: folder.to_path_buf(),
            detail: format!("the VM's own UEFI variables and TPM state kept there: {e}"),
        })?
        .put_back(info)?;
    Ok(())
}

/// Ends the run a dead process left in `folder`, whose VM does not run on it any more: the
/// VM's own firmware state is put back (unless the run was kept), then the folder goes. A
/// folder whose state could not be put back stays, to be tried again by the next process.
fn end_left_run(hv: &Hypervisor, folder: &Path, note: Option<&RunNote>) {
    if let Some(note) = note
        && note.own_firmware
        // Not a run being kept (whose disks may have switched over to their copies).
        && (!note.keep_asked || note.copies.is_empty())
        && let Ok(info) = hv.vm(&note.vm_uuid.to_string())
        && let Err(e) = put_back_firmware(folder, &info)
    {
        tracing::warn!(
            "the run of VM {:?} from checkpoint {}: {e}; its folder {} is left, and tried again when Rewind next starts",
            note.vm,
            note.checkpoint,
            folder.display()
        );
        return;
    }
    crate::cleanup::remove_dir_all(folder);
}

/// Whether a VM runs (or is paused) on a disk in `folder`.
fn vm_runs_in(hv: &Hypervisor, folder: &Path, note: Option<&RunNote>) -> bool {
    note.is_some_and(|note| runs_in(hv, &note.vm_uuid, folder))
}

/// Whether VM `vm_uuid` runs (or is paused) on a disk in `folder`.
fn runs_in(hv: &Hypervisor, vm_uuid: &Uuid, folder: &Path) -> bool {
    hv.vm(&vm_uuid.to_string()).is_ok_and(|info| {
        info.state.is_active()
            && info
                .disks
                .iter()
                .any(|d| d.path().is_some_and(|p| p.starts_with(folder)))
    })
}

/// A new folder for a run in the work folder (0711), first removing those of dead runs
/// whose VM does not run on them any more.
fn new_folder(hv: &Hypervisor) -> Result<PathBuf, RestoreError> {
    let failed = |path: &Path, e: std::io::Error| RestoreError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let base = crate::paths::work_dir().map_err(|e| failed(Path::new("work folder"), e))?;
    for (folder, note) in left_runs(&base) {
        if !vm_runs_in(hv, &folder, note.as_ref()) {
            end_left_run(hv, &folder, note.as_ref());
        }
    }
    crate::workdir::new_folder_in(&base, PREFIX, 8).map_err(|e| failed(&base, e))
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

/// The runs of this process being kept now: VM → its name and the checkpoint.
static KEEPING: std::sync::Mutex<std::collections::BTreeMap<Uuid, (String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn keeping() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<Uuid, (String, String)>> {
    KEEPING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn not_running(vm: &Uuid) -> RestoreError {
    if let Some((name, _)) = keeping().get(vm) {
        return RestoreError::Invalid(format!(
            "VM {name:?} is being kept: its disks are being copied; wait until that is done"
        ));
    }
    RestoreError::Invalid(format!(
        "VM {vm} is not running from a checkpoint here; start one with `rewind run VM CHECKPOINT --from DEST`"
    ))
}

/// Starts VM `m.vm` from checkpoint `m` ([`RunFromBackup::start`]) and keeps serving it in
/// this process until [`keep_served`] or [`discard_served`].
///
/// # Errors
/// As [`RunFromBackup::start`]; or the VM runs from a checkpoint already.
pub fn start_served(
    hv: Hypervisor,
    store: &Arc<Store>,
    m: &Manifest,
    destination: &str,
) -> Result<(), RestoreError> {
    if served_runs().contains_key(&m.vm.uuid) {
        return Err(RestoreError::Invalid(format!(
            "VM {:?} runs from a checkpoint already: keep it or discard it first",
            m.vm.name
        )));
    }
    let run = RunFromBackup::start_from(hv, store, m, Some(destination))?;
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
    // Listed as served while it is copied (the registry is not held for the copy).
    keeping().insert(*vm, (run.vm.clone(), run.checkpoint.clone()));
    let kept = run.keep(control);
    keeping().remove(vm);
    match kept {
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

/// The runs this process serves (those being kept included): VM, its name, the checkpoint.
#[must_use]
pub fn served() -> Vec<(Uuid, String, String)> {
    let mut all: Vec<_> = served_runs()
        .iter()
        .map(|(uuid, run)| (*uuid, run.vm.clone(), run.checkpoint.clone()))
        .collect();
    all.extend(
        keeping()
            .iter()
            .map(|(uuid, (vm, checkpoint))| (*uuid, vm.clone(), checkpoint.clone())),
    );
    all.sort_by_key(|(uuid, ..)| *uuid);
    all
}

/// A run that a dead process left and this one serves now ([`adopt_left_runs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The VM.
    pub vm_uuid: Uuid,
    /// Its name.
    pub vm: String,
    /// The checkpoint it runs from.
    pub checkpoint: String,
    /// The user had asked to keep it and the copy was not done: it must be started again.
    pub keep_asked: bool,
}

/// Serves again the runs whose process died (see the module documentation): for each
/// folder of a dead run whose VM still runs on it, the export is served again from the
/// store that `open_store` opens for the note's destination, the VM resumed if a failed
/// read paused it, unfinished copies abandoned and removed, and the run served by this
/// process ([`keep_served`], [`discard_served`]). Folders whose VM does not run on them any
/// more are removed (copies that a disk may have switched to are left). Returns the runs
/// adopted, and for each run that could not be, what is wrong and what to do.
pub fn adopt_left_runs(
    uri: &str,
    open_store: &dyn Fn(&str) -> Result<Arc<Store>, String>,
) -> (Vec<Adopted>, Vec<String>) {
    let mut adopted = Vec::new();
    let mut problems = Vec::new();
    let Ok(base) = crate::paths::work_dir() else {
        return (adopted, problems);
    };
    let left = left_runs(&base);
    if left.is_empty() {
        return (adopted, problems);
    }
    let hv = match Hypervisor::connect(uri) {
        Ok(hv) => hv,
        Err(e) => {
            problems.push(format!(
                "runs from checkpoints that a stopped Rewind served could not be looked at ({e}); they are looked at again when Rewind's service starts"
            ));
            return (adopted, problems);
        }
    };
    for (folder, note) in left {
        if !vm_runs_in(&hv, &folder, note.as_ref()) {
            if let Some(note) = &note
                && !note.copies.is_empty()
            {
                tracing::warn!(
                    "VM {:?} stopped while its run from checkpoint {} was being kept; the copies {:?} are left as they are (a disk may have switched to one)",
                    note.vm,
                    note.checkpoint,
                    note.copies
                );
            }
            end_left_run(&hv, &folder, note.as_ref());
            continue;
        }
        let Some(note) = note else { continue };
        match adopt(uri, &folder, &note, open_store) {
            Ok(run) => {
                adopted.push(Adopted {
                    vm_uuid: note.vm_uuid,
                    vm: note.vm.clone(),
                    checkpoint: note.checkpoint.clone(),
                    keep_asked: run.keep_asked,
                });
                served_runs().insert(note.vm_uuid, run);
            }
            Err(e) => problems.push(format!(
                "VM {:?} runs from checkpoint {} of {}, which cannot be served again: {e}. It is paused when it reads from it; once the store can be read, restart Rewind's service, or turn the VM off (its own disks are as they were)",
                note.vm,
                note.checkpoint,
                note.destination.as_deref().unwrap_or("a store no longer named")
            )),
        }
    }
    (adopted, problems)
}

/// Serves the run of `note` in `folder` again, from this process.
fn adopt(
    uri: &str,
    folder: &Path,
    note: &RunNote,
    open_store: &dyn Fn(&str) -> Result<Arc<Store>, String>,
) -> Result<RunFromBackup, String> {
    let destination = note
        .destination
        .as_deref()
        .ok_or("the process that started it was the only one that could serve it")?;
    let store = open_store(destination)?;
    let m = store
        .manifest(&note.vm_uuid, &note.checkpoint)
        .map_err(|e| e.to_string())?;
    for disk in &m.disks {
        crate::cleanup::remove_file(&folder.join(format!("{}.sock", disk.target)));
    }
    let export = CheckpointExport::start(&store, &m, folder, crate::firmware::qemu_owner())
        .map_err(|e| e.to_string())?;
    crate::atomic_file::write(
        &folder.join(OWNER),
        std::process::id().to_string().as_bytes(),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    let hv = Hypervisor::connect(uri).map_err(|e| e.to_string())?;
    let mut run = RunFromBackup {
        hv,
        vm_uuid: note.vm_uuid,
        vm: note.vm.clone(),
        checkpoint: note.checkpoint.clone(),
        destination: note.destination.clone(),
        persistent_xml: note.persistent_xml.clone(),
        folder: folder.to_path_buf(),
        export: Some(export),
        disks: note
            .disks
            .iter()
            .map(|(target, original)| RunDisk {
                target: target.clone(),
                original: original.clone(),
            })
            .collect(),
        running: true,
        keep_asked: note.keep_asked,
        copies: note.copies.clone(),
        own_firmware: note.own_firmware,
        unwatch: None,
    };
    run.drop_unfinished_copies();
    if let Err(e) = run.write_note() {
        tracing::warn!("{e}");
    }
    run.unwatch = Some(watch_for_failed_reads(uri, note.vm_uuid));
    tracing::info!(vm = %run.vm, checkpoint = %run.checkpoint, "serving again the run that a stopped Rewind left");
    Ok(run)
}

/// Until the returned flag is set (the run ends), resumes VM `vm_uuid` of an adopted run
/// whenever a failed read paused it. QEMU's NBD client fails the first request after it lost
/// its server, and connects again meanwhile; that request may come from the guest long
/// after the export is served again (the first read of a block it never read), and would
/// leave the VM paused. A VM that pauses again at once is left paused, and said so.
fn watch_for_failed_reads(uri: &str, vm_uuid: Uuid) -> Arc<std::sync::atomic::AtomicBool> {
    let unwatch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (uri, stop) = (uri.to_owned(), unwatch.clone());
    let watching = move || {
        let Ok(hv) = Hypervisor::connect(&uri) else {
            return;
        };
        let vm = vm_uuid.to_string();
        let mut last_resume: Option<std::time::Instant> = None;
        let mut quick_repeats = 0;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if stop.load(std::sync::atomic::Ordering::SeqCst) || !hv.is_running(&vm) {
                return;
            }
            if !hv.paused_by_disk_error(&vm) {
                continue;
            }
            if last_resume.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2)) {
                quick_repeats += 1;
                if quick_repeats >= 5 {
                    tracing::error!(
                        "VM {vm} pauses on a disk error each time it is resumed: it stays paused; discard the run, or look at the store it runs from"
                    );
                    return;
                }
            } else {
                quick_repeats = 0;
            }
            match hv.resume_vm(&vm) {
                Ok(()) => tracing::info!("resumed VM {vm}, paused by a read from its export"),
                Err(e) => tracing::warn!("{e}"),
            }
            last_resume = Some(std::time::Instant::now());
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("rewind-run-watch".into())
        .spawn(watching)
    {
        tracing::warn!("could not watch the adopted run of VM {vm_uuid}: {e}");
    }
    unwatch
}
