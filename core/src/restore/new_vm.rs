//! Restoring a checkpoint as a VM that is not there: a new VM beside the original (another
//! name, a new UUID and MAC addresses), or the VM itself on another libvirt host when the
//! workstation is gone (the disaster-recovery case).
//!
//! On this machine, disks are image files in a folder (or volumes in a storage pool), written
//! through `qemu-nbd` and read back like an in-place restore's. On another host, Rewind has
//! only the libvirt connection (`qemu+ssh://user@host/system`): disks are uploaded into
//! volumes of a storage pool there ([`crate::libvirt::volumes`]), holes as holes, each chunk
//! checked against its hash as it leaves the store; the UEFI variables and TPM state are
//! written through libvirt too. The definition there uses that host's QEMU (no `<emulator>`),
//! has its CD-ROMs ejected (their images are files of the lost host) and keeps its serial
//! logs beside its disks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use uuid::Uuid;

use super::confine::{self, Confined, Mode, Role, Rules};
use super::disk::{self, ComparedBy, Current, DiskRestore};
use super::domain_xml::{self, DiskPlace, Rewrite};
use super::resume::{self, Identity, Place};
use super::vm::{elapsed_ms, log_made_safe, parsed, refused, start_if};
use super::{RestoreError, RestoreOptions, RestoreReport};
use crate::cleanup::OrWarn as _;
use crate::firmware::SavedFirmware;
use crate::libvirt::Hypervisor;
use crate::progress::{Control, Phase};
use crate::store::LockMode;
use crate::store::index::HOLE;
use crate::store::{DiskEntry, Manifest, Store, for_each_slot};
use crate::vm::Firmware;

/// Where a restored VM's disks go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskStorage {
    /// Image files in a folder of this machine.
    Folder(PathBuf),
    /// Volumes in a storage pool of the libvirt host (this machine or another).
    Pool(String),
}

/// The VM a checkpoint is restored as.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewVm {
    /// Its name; `None` keeps the checkpoint's name, UUID and MAC addresses (the VM itself,
    /// brought back on a host that does not have it).
    pub name: Option<String>,
    /// Where its disks go.
    pub storage: DiskStorage,
}

/// A file name part made from a VM name: no `/`, no control characters.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect()
}

/// What was made so far, to be removed if the restore fails.
#[derive(Debug, Default)]
struct Made {
    files: Vec<PathBuf>,
    volumes: Vec<(String, String)>,
    defined: Option<String>,
}

impl Made {
    fn remove(&self, hv: &Hypervisor) {
        // Undefining takes the VM's NVRAM and TPM state with it.
        if let Some(name) = &self.defined {
            hv.undefine_vm(name)
                .or_warn(format_args!("undefine the half-restored VM {name:?}"));
        }
        for (pool, volume) in &self.volumes {
            hv.delete_volume(pool, volume).or_warn(format_args!(
                "delete the half-written volume {volume:?} in pool {pool:?}"
            ));
        }
        for path in self.files.iter().rev() {
            if path.is_dir() {
                crate::cleanup::remove_dir_all(path);
            } else {
                crate::cleanup::remove_file(path);
            }
        }
    }
}

/// Restores checkpoint `m` as the VM `new` on the host of `hv` (see the module doc). The
/// original VM, if it is there, is not touched.
pub fn restore_as_new(
    hv: &Hypervisor,
    store: &Store,
    m: &Manifest,
    new: &NewVm,
    options: &RestoreOptions,
    work_dir: &Path,
    control: &Control,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    // Garbage collection must not remove what is being read.
    let _lock = store.lock(LockMode::Shared, "restoring a checkpoint", Some(control))?;
    let plan = Plan::make(hv, store, m, new)?;
    // A full-state checkpoint's memory is checked and written out first: a resume that
    // cannot work is said before anything is made.
    let memory = if options.start == Some(false) || options.disk_only {
        None
    } else {
        let place = match &plan.storage {
            DiskStorage::Folder(dir) => Place::Beside(dir),
            DiskStorage::Pool(pool) => Place::Pool(pool),
        };
        let identity = plan.fresh.then_some(Identity {
            name: &plan.name,
            uuid: Some(&plan.uuid),
        });
        // The definition saved with the memory, as the copy would run with it.
        let check = |saved: &str| plan.checked(m, saved, &plan.predicted, true);
        resume::stage(hv, store, m, &plan.name, place, identity, &check, control)?
    };
    let mut made = Made::default();
    let written = plan
        .write(hv, store, m, work_dir, control, &mut made)
        .inspect_err(|_| made.remove(hv))?;
    let (disks, nvram, tpm, mut made_safe) = written;
    let (started_vm, start_error, resumed) = if let Some(saved) = &memory {
        control.start_phase(Phase::Starting);
        match plan.running_xml(&saved.xml, m, &disks).and_then(|safe| {
            log_made_safe(m, &plan.name, &safe.changes);
            for change in safe.changes {
                if !made_safe.contains(&change) {
                    made_safe.push(change);
                }
            }
            Ok(hv.restore_saved_state(&saved.path, Some(&safe.xml))?)
        }) {
            Ok(()) => (true, None, true),
            Err(e) => (
                false,
                Some(format!(
                    "it could not be resumed from its saved memory ({e}); it is defined with its disks restored: start it to boot it from them"
                )),
                false,
            ),
        }
    } else {
        let (started_vm, start_error) =
            start_if(hv, &plan.name, options.start.unwrap_or(true), control);
        (started_vm, start_error, false)
    };
    drop(memory);
    Ok(RestoreReport {
        vm: plan.name.clone(),
        vm_uuid: plan.uuid.clone(),
        checkpoint: m.id.clone(),
        checkpoint_time: m.time,
        uri: hv.uri().to_owned(),
        mode: if plan.local { "new_vm" } else { "other_host" }.into(),
        stopped: None,
        safety_checkpoint: None,
        safety_note: None,
        bytes_written: disks.iter().map(|r| r.bytes_written).sum(),
        disks,
        nvram,
        tpm,
        defined: true,
        started: started_vm,
        resumed,
        network_unplugged: resumed && plan.fresh,
        made_safe,
        start_error,
        duration_ms: elapsed_ms(started),
    })
}

/// Where everything of the new VM goes, checked before anything is written.
struct Plan {
    name: String,
    uuid: String,
    /// A new identity (name, UUID, MAC addresses), or the checkpoint's own.
    fresh: bool,
    local: bool,
    storage: DiskStorage,
    /// Per disk of the checkpoint: file name (folder: the path).
    files: Vec<DiskFile>,
    /// Where the disks will be, as far as known before they are written.
    predicted: Vec<DiskPlace>,
    /// Where the serial and console logs go: beside the disks.
    logs_dir: Option<PathBuf>,
    nvram_path: Option<Confined>,
    tpm_dir: Option<Confined>,
    /// What this restore may touch on the host.
    rules: Rules,
    /// The checkpoint's UEFI variables and TPM state, read and checked.
    firmware: SavedFirmware,
}

impl Plan {
    fn make(
        hv: &Hypervisor,
        store: &Store,
        m: &Manifest,
        new: &NewVm,
    ) -> Result<Self, RestoreError> {
        let checkpoint_xml = parsed(m)?;
        let local = hv.is_local();
        let uri = hv.uri();
        let fresh = new.name.is_some();
        let name = new.name.clone().unwrap_or_else(|| m.vm.name.clone());
        if name.trim().is_empty() {
            return Err(RestoreError::Invalid("the new VM needs a name".into()));
        }
        let uuid = if fresh {
            Uuid::new_v4().to_string()
        } else {
            m.vm.uuid.to_string()
        };
        if !fresh && hv.has_vm(&uuid) {
            return Err(RestoreError::Invalid(format!(
                "VM {:?} (UUID {uuid}) is defined on {uri} already; restore it in place on that host, or as a new VM with --as NAME",
                m.vm.name
            )));
        }
        if hv.has_vm(&name) {
            return Err(RestoreError::Invalid(format!(
                "a VM called {name:?} exists already on {uri}; choose another name (--as NAME)"
            )));
        }
        if matches!(new.storage, DiskStorage::Folder(_)) && !local {
            return Err(RestoreError::Invalid(format!(
                "on another host ({uri}) Rewind can write disks only into a storage pool: give --pool NAME (`virsh -c {uri} pool-list` lists them)"
            )));
        }
        // The new VM's own folder: the one the user chose, or its pool's.
        let storage = match &new.storage {
            DiskStorage::Folder(dir) => {
                DiskStorage::Folder(std::path::absolute(dir).map_err(|e| RestoreError::Write {
                    path: dir.clone(),
                    detail: e.to_string(),
                })?)
            }
            DiskStorage::Pool(pool) => DiskStorage::Pool(pool.clone()),
        };
        let folder = match &storage {
            DiskStorage::Folder(dir) => Some(dir.clone()),
            DiskStorage::Pool(pool) => hv.pool_folder(pool)?,
        };
        let mut rules = confine::rules_for(
            hv,
            &name,
            &uuid,
            &m.vm.uuid.to_string(),
            true,
            folder.as_deref(),
            &checkpoint_xml,
        )?;
        let refused = |refusal| refused(m, &name, Mode::NewVm, refusal);
        let (files, predicted) = disk_files(hv, m, &name, &storage, folder.as_deref(), &mut rules)?;
        let nvram_path = match checkpoint_xml.firmware {
            Firmware::Uefi { .. } => Some(hv.default_nvram_path(&name).ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "it is not known where libvirt keeps UEFI variables on {uri}"
                ))
            })?),
            Firmware::Bios => None,
        };
        if let Some(path) = nvram_path.as_ref().filter(|p| local && p.exists()) {
            return Err(RestoreError::Exists(path.clone()));
        }
        let tpm_dir = checkpoint_xml
            .tpm
            .as_ref()
            .and_then(|_| hv.tpm_state_dir(&uuid));
        let nvram_path = nvram_path
            .map(|p| rules.confine(Role::Nvram, &p, "the new VM's UEFI variable store"))
            .transpose()
            .map_err(refused)?;
        let tpm_dir = tpm_dir
            .map(|p| rules.confine(Role::TpmState, &p, "the new VM's TPM state folder"))
            .transpose()
            .map_err(refused)?;
        let firmware = SavedFirmware::load(store, m)?;
        let plan = Self {
            name,
            uuid,
            fresh,
            local,
            storage,
            files,
            predicted,
            logs_dir: folder,
            nvram_path,
            tpm_dir,
            rules,
            firmware,
        };
        // The definition as it will be, checked before anything is written.
        plan.checked(m, &m.domain_xml, &plan.predicted, false)?;
        Ok(plan)
    }

    /// Definition `xml` (the checkpoint's, or the one saved with its memory when
    /// `running`) rewritten for the new VM with its disks at `places`, checked and made
    /// safe ([`confine`]).
    fn checked(
        &self,
        m: &Manifest,
        xml: &str,
        places: &[DiskPlace],
        running: bool,
    ) -> Result<confine::domain::Safe, RestoreError> {
        let xml = domain_xml::rewrite(
            xml,
            &Rewrite {
                name: self.fresh.then(|| self.name.clone()),
                uuid: self.fresh.then(|| self.uuid.clone()),
                new_macs: self.fresh && !running,
                links_down: self.fresh && running,
                ..self.placed(m, places.to_vec())
            },
        )?;
        let mut rules = self.rules.clone();
        rules.own_new.extend(places.iter().map(|p| p.path.clone()));
        rules
            .placed_disks
            .retain(|t| !places.iter().any(|p| &p.target == t));
        rules
            .check_domain(&xml)
            .map_err(|refusal| refused(m, &self.name, Mode::NewVm, refusal))
    }

    /// Disks, definition, firmware state; everything made goes into `made`.
    fn write(
        &self,
        hv: &Hypervisor,
        store: &Store,
        m: &Manifest,
        work_dir: &Path,
        control: &Control,
        made: &mut Made,
    ) -> Result<(Vec<DiskRestore>, bool, bool, Vec<String>), RestoreError> {
        control.start_phase(Phase::Writing);
        let mut reports = Vec::new();
        let mut places = Vec::new();
        for (d, (file, format)) in m.disks.iter().zip(&self.files) {
            let (path, report) = match &self.storage {
                DiskStorage::Folder(_) if super::new_image::writes(format) => {
                    made.files.push(file.clone());
                    let report = super::new_image::write_new_image(
                        store, &d.target, file, format, &d.index, control,
                    )?;
                    (file.clone(), report)
                }
                DiskStorage::Folder(_) => {
                    disk::create_image(file, format, d.index.size_bytes)?;
                    made.files.push(file.clone());
                    let empty = vec![HOLE; usize::try_from(d.index.chunk_count()).unwrap_or(0)];
                    let report = disk::make_equal(
                        store,
                        &d.target,
                        file,
                        format,
                        &d.index,
                        Current::Known(empty, ComparedBy::NewFile),
                        None,
                        work_dir,
                        control,
                        &mut Vec::new(),
                    )?;
                    (file.clone(), report)
                }
                DiskStorage::Pool(pool) => {
                    let volume = file.display().to_string();
                    let path = upload(hv, store, d, pool, &volume, format, control)?;
                    made.volumes.push((pool.clone(), volume));
                    // On this machine the volume can be read back; on another host only
                    // the store side was checked (each chunk against its hash).
                    let verified = if self.local {
                        disk::verify_image(store, &path, format, &d.index, work_dir, control)?
                    } else {
                        0
                    };
                    let report = DiskRestore {
                        target: d.target.clone(),
                        path: path.clone(),
                        format: format.clone(),
                        compared_by: ComparedBy::NewFile,
                        chunks: d.index.chunk_count(),
                        chunks_written: d.index.chunk_count(),
                        bytes_written: d.index.data_bytes,
                        chunks_verified: verified,
                    };
                    (path, report)
                }
            };
            places.push(DiskPlace {
                target: d.target.clone(),
                path,
                format: format.clone(),
            });
            reports.push(report);
        }
        control.start_phase(Phase::Finishing);
        // Checked again where the disks really are (a pool names its volumes itself).
        let safe = self.checked(m, &m.domain_xml, &places, false)?;
        log_made_safe(m, &self.name, &safe.changes);
        if self.local {
            made.files
                .extend(self.nvram_path.iter().map(|p| p.to_path_buf()));
            made.files
                .extend(self.tpm_dir.iter().map(|p| p.to_path_buf()));
            let firmware = self
                .firmware
                .write_local(self.nvram_path.as_ref(), self.tpm_dir.as_ref())?;
            hv.define_vm(&safe.xml)?;
            made.defined = Some(self.name.clone());
            Ok((reports, firmware.0, firmware.1, safe.changes))
        } else {
            // Defined first: undefining it takes the NVRAM and TPM state written after.
            hv.define_vm(&safe.xml)?;
            made.defined = Some(self.name.clone());
            let firmware = self.write_firmware_there(hv)?;
            Ok((reports, firmware.0, firmware.1, safe.changes))
        }
    }

    /// Where the new VM's parts are: disks at `places`, its UEFI variables, its logs beside
    /// its disks (its own folder, not the original's); on another host with that host's
    /// QEMU and no CD-ROM images.
    fn placed(&self, m: &Manifest, places: Vec<DiskPlace>) -> Rewrite {
        Rewrite {
            nvram: self.nvram_path.as_ref().map(|p| p.to_path_buf()),
            rename_logs: Some((m.vm.name.clone(), self.name.clone())),
            logs_dir: self.logs_dir.clone().or_else(|| {
                places
                    .first()
                    .and_then(|p| p.path.parent())
                    .map(Path::to_path_buf)
            }),
            drop_emulator: !self.local,
            eject_removable: !self.local,
            disks: places,
            ..Rewrite::default()
        }
    }

    /// The definition the VM resumes with: the one saved with its memory (`saved`, already
    /// carrying the new name and UUID), with its parts where they are now and, for a copy
    /// beside the original, its network cards unplugged (see [`resume`]).
    fn running_xml(
        &self,
        saved: &str,
        m: &Manifest,
        disks: &[DiskRestore],
    ) -> Result<confine::domain::Safe, RestoreError> {
        let places: Vec<DiskPlace> = disks
            .iter()
            .map(|d| DiskPlace {
                target: d.target.clone(),
                path: d.path.clone(),
                format: d.format.clone(),
            })
            .collect();
        self.checked(m, saved, &places, true)
    }

    /// UEFI variables and TPM state onto another host, through libvirt.
    fn write_firmware_there(&self, hv: &Hypervisor) -> Result<(bool, bool), RestoreError> {
        let mut nvram = false;
        if let (Some(bytes), Some(path)) = (&self.firmware.nvram, &self.nvram_path) {
            hv.write_host_file(path, bytes, 0o600)?;
            nvram = true;
        }
        let mut tpm = false;
        if let (Some(files), Some(dir)) = (&self.firmware.tpm, &self.tpm_dir) {
            for f in files {
                hv.write_host_file(&dir.join(&f.path), &f.content, f.mode & 0o640)?;
            }
            tpm = true;
        }
        Ok((nvram, tpm))
    }
}

/// A new disk's file (for a pool: the volume's name) and its format.
type DiskFile = (PathBuf, String);

/// Per disk of checkpoint `m`, the new VM `name`'s file (for a pool: the volume's name),
/// checked, and where it will be if that is known before it is written (`folder`: the
/// pool's); what is not known is left to `rules` as a disk the restore places itself.
fn disk_files(
    hv: &Hypervisor,
    m: &Manifest,
    name: &str,
    storage: &DiskStorage,
    folder: Option<&Path>,
    rules: &mut Rules,
) -> Result<(Vec<DiskFile>, Vec<DiskPlace>), RestoreError> {
    let uri = hv.uri();
    let refused = |refusal| refused(m, name, Mode::NewVm, refusal);
    let mut files = Vec::new();
    let mut predicted = Vec::new();
    for d in &m.disks {
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        Rules::check_disk(&d.target, &format).map_err(refused)?;
        let ext = if format == "qcow2" { "qcow2" } else { "img" };
        let file = format!("{}-{}.{ext}", file_safe(name), d.target);
        let path = match storage {
            DiskStorage::Folder(dir) => {
                let path = dir.join(&file);
                if path.exists() {
                    return Err(RestoreError::Exists(path));
                }
                files.push((path.clone(), format.clone()));
                Some(path)
            }
            DiskStorage::Pool(pool) => {
                if hv.volume_exists(pool, &file)? {
                    return Err(RestoreError::Invalid(format!(
                        "a volume {file:?} exists already in pool {pool:?} on {uri}; remove it, or restore under another name (--as NAME)"
                    )));
                }
                files.push((PathBuf::from(&file), format.clone()));
                folder.as_ref().map(|f| f.join(&file))
            }
        };
        match path {
            Some(path) => {
                let what = format!("disk {}'s new image", d.target);
                rules.confine(Role::Disk, &path, &what).map_err(refused)?;
                rules.own_new.push(path.clone());
                predicted.push(DiskPlace {
                    target: d.target.clone(),
                    path,
                    format,
                });
            }
            // A pool that is no folder: libvirt names its volumes.
            None => rules.placed_disks.push(d.target.clone()),
        }
    }
    Ok((files, predicted))
}

/// Uploads disk `d` of a checkpoint into a new volume `volume` of `pool` on the host of
/// `hv`: chunks are read and checked in parallel and streamed in order, holes as holes.
fn upload(
    hv: &Hypervisor,
    store: &Store,
    d: &DiskEntry,
    pool: &str,
    volume: &str,
    format: &str,
    control: &Control,
) -> Result<PathBuf, RestoreError> {
    let (wanted, chains) = disk::entries_and_chains(store, &d.index)?;
    let slots: Vec<u64> = (0..d.index.chunk_count()).collect();
    let lens: Vec<usize> = slots
        .iter()
        .map(|&i| usize::try_from(d.index.chunk_len(i)).expect("chunk fits memory"))
        .collect();
    control.add_total_bytes(d.index.size_bytes);
    // The volume writer counts progress and checks for a cancel on `control`.
    let quiet = Control::new();
    let mut failure = None;
    let uploaded = hv.create_volume_with(
        pool,
        volume,
        format,
        d.index.size_bytes,
        control,
        &mut |writer| {
            let workers: Vec<_> = (0..crate::store::reader_count())
                .map(|_| {
                    |i: u64, _: &mut Vec<u8>| -> Result<Option<Vec<u8>>, RestoreError> {
                        let slot = usize::try_from(i).expect("slot fits");
                        match wanted[slot] {
                            HOLE => Ok(None),
                            id => Ok(Some(store.read_entry(&id, &chains[slot])?)),
                        }
                    }
                })
                .collect();
            let streamed = for_each_slot(&slots, &lens, &quiet, workers, |i, data| {
                match data {
                    Some(bytes) => writer.write(&bytes),
                    None => writer.hole(d.index.chunk_len(i)),
                }
                .map_err(RestoreError::Libvirt)
            });
            match streamed {
                Ok(()) => Ok(()),
                Err(RestoreError::Libvirt(e)) => Err(e),
                Err(other) => {
                    let message = other.to_string();
                    failure = Some(other);
                    Err(crate::Error::Invalid(message))
                }
            }
        },
    );
    uploaded.map_err(|e| failure.take().unwrap_or(RestoreError::Libvirt(e)))
}
