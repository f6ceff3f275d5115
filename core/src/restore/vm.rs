//! Restoring a whole VM: in place (see the module documentation of [`super`]) or as a new
//! VM beside the original.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::confine::{self, Confined, Mode, Role, Rules};
use super::disk::{self, ComparedBy, Current, DiskRestore, Since};
use super::domain_xml::{self, Rewrite};
use super::resume::{self, Identity, Place, Staged};
use super::{RestoreError, RestoreOptions, RestoreReport, SAFETY_LABEL};
use crate::checkpoint::{self, TakeOptions};
use crate::cleanup::OrWarn as _;
use crate::firmware::SavedFirmware;
use crate::libvirt::Hypervisor;
use crate::libvirt::lifecycle::{StopMode, Stopped};
use crate::libvirt::xml::{DomainXml, parse_domain};
use crate::notes::RestoreMarker;
use crate::progress::{Control, Phase};
use crate::store::LockMode;
use crate::store::index::HOLE;
use crate::store::{DiskEntry, Manifest, Store};
use crate::vm::Firmware;

/// The error of a restore of checkpoint `m` as VM `vm` that `refusal` stopped.
pub(super) fn refused(
    m: &Manifest,
    vm: &str,
    mode: Mode,
    refusal: confine::Refusal,
) -> RestoreError {
    tracing::warn!(
        checkpoint = %m.id,
        vm,
        "restore refused before anything was changed: {refusal}"
    );
    RestoreError::Refused {
        id: m.id.clone(),
        vm: vm.to_owned(),
        advice: confine::advice(&refusal, mode),
        refusal: Box::new(refusal),
    }
}

/// Says in the log what was changed in a definition to make it safe.
pub(super) fn log_made_safe(m: &Manifest, vm: &str, changes: &[String]) {
    for change in changes {
        tracing::warn!(
            checkpoint = %m.id,
            vm,
            "the checkpoint's definition was made safe for this host: {change}"
        );
    }
}

pub(super) fn parsed(m: &Manifest) -> Result<DomainXml, RestoreError> {
    parse_domain(&m.domain_xml).map_err(|e| {
        RestoreError::Invalid(format!(
            "the domain definition in checkpoint {} of VM {:?} cannot be read ({e}); export its disks with `rewind export` instead",
            m.id, m.vm.name
        ))
    })
}

fn stopped_label(s: Stopped) -> &'static str {
    match s {
        Stopped::WasOff => "was_off",
        Stopped::ShutDown => "shut_down",
        Stopped::Forced => "forced",
        Stopped::Saved => "saved",
    }
}

/// One disk of the checkpoint, as far as the in-place restore got with it.
#[derive(Debug)]
struct DiskProgress {
    target: String,
    path: PathBuf,
    format: String,
    created: bool,
    resized: bool,
    written: Vec<u64>,
}

/// `qemu-img info`'s virtual size of an image.
fn image_size(path: &Path, format: &str) -> Result<u64, RestoreError> {
    // Read directly where that is simple (a restore in place asks for every disk, and
    // qemu-img costs a process each time); qemu-img for the rest and to explain a failure.
    let direct = match format {
        "qcow2" => crate::qcow2::read::virtual_size(path).ok(),
        // A block device's length is not in its metadata.
        "raw" => std::fs::metadata(path)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len()),
        _ => None,
    };
    if let Some(size_bytes) = direct {
        return Ok(size_bytes);
    }
    let cannot = |said: String| RestoreError::Write {
        path: path.to_path_buf(),
        detail: format!("qemu-img cannot read it as {format}: {said}"),
    };
    let out = disk::qemu_img(&["info", "--output=json", "-f", format], path, &[])?
        .map_err(|said| cannot(said.to_string()))?;
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|info| info["virtual-size"].as_u64())
        .ok_or_else(|| cannot("no virtual size in its report".into()))
}

/// Restores one disk of `m` in place. `known` is the safety checkpoint, whose disk (same
/// file, same size) says what the file holds now; `chain` the store's last checkpoint with
/// a libvirt checkpoint, whose dirty bitmap may be in the image.
fn restore_disk(
    store: &Store,
    d: &DiskEntry,
    known: Option<&Manifest>,
    chain: Option<&Manifest>,
    work_dir: &Path,
    control: &Control,
    progress: &mut DiskProgress,
) -> Result<DiskRestore, RestoreError> {
    let path = progress.path.clone();
    let n = usize::try_from(d.index.chunk_count()).unwrap_or(0);
    let current = if path.exists() {
        if image_size(&path, &progress.format)? == d.index.size_bytes {
            match known.and_then(|s| same_disk(s, d)) {
                Some(s) => Current::Known(
                    disk::entries(store, &s.index)?,
                    ComparedBy::SafetyCheckpoint,
                ),
                None => Current::Unknown,
            }
        } else {
            disk::resize_image(&path, &progress.format, d.index.size_bytes)?;
            progress.resized = true;
            Current::Unknown
        }
    } else if super::new_image::writes(&progress.format) {
        progress.created = true;
        return super::new_image::write_new_image(
            store,
            &d.target,
            &path,
            &progress.format,
            &d.index,
            control,
        );
    } else {
        disk::create_image(&path, &progress.format, d.index.size_bytes)?;
        progress.created = true;
        Current::Known(vec![HOLE; n], ComparedBy::NewFile)
    };
    disk::make_equal(
        store,
        &d.target,
        &path,
        &progress.format,
        &d.index,
        current,
        since(chain, d, &progress.format),
        work_dir,
        control,
        &mut progress.written,
    )
}

/// The dirty bitmap the store's last chained checkpoint left in disk `d`'s image, if any.
fn since<'a>(chain: Option<&'a Manifest>, d: &DiskEntry, format: &str) -> Option<Since<'a>> {
    let chain = chain?;
    (format == "qcow2").then_some(())?;
    Some(Since {
        bitmap: chain.libvirt_checkpoint.as_deref()?,
        base: &same_disk(chain, d)?.index,
    })
}

/// The disk of checkpoint `s` that is the same image file as `d`, with the same size.
fn same_disk<'a>(s: &'a Manifest, d: &DiskEntry) -> Option<&'a DiskEntry> {
    s.disks.iter().find(|x| {
        x.target == d.target && x.source == d.source && x.index.size_bytes == d.index.size_bytes
    })
}

/// Puts the disks touched so far back as the checkpoint `back` has them (without letting
/// a cancel interrupt that). `safety_is_current` says whether `back` was taken right
/// before this restore, so that each disk's content is known without hashing it.
fn roll_back(
    store: &Store,
    m: &Manifest,
    back: &Manifest,
    safety_is_current: bool,
    chain: Option<&Manifest>,
    touched: &[DiskProgress],
    work_dir: &Path,
) -> Result<(), RestoreError> {
    let control = Control::new();
    for p in touched.iter().rev() {
        if p.created {
            std::fs::remove_file(&p.path).map_err(|e| RestoreError::Write {
                path: p.path.clone(),
                detail: format!("could not remove the disk file the restore created: {e}"),
            })?;
            continue;
        }
        let Some(old) = back
            .disks
            .iter()
            .find(|x| x.target == p.target && x.source.as_deref() == p.path.to_str())
        else {
            return Err(RestoreError::Invalid(format!(
                "the safety checkpoint {} has no copy of disk {}",
                back.id, p.target
            )));
        };
        let current = match m.disks.iter().find(|d| d.target == p.target) {
            Some(d) if safety_is_current && !p.resized => {
                let mut ids = disk::entries(store, &old.index)?;
                let restored = disk::entries(store, &d.index)?;
                for &i in &p.written {
                    let i = usize::try_from(i).expect("slot fits");
                    ids[i] = restored[i];
                }
                Current::Known(ids, ComparedBy::SafetyCheckpoint)
            }
            _ => Current::Unknown,
        };
        if image_size(&p.path, &p.format)? != old.index.size_bytes {
            disk::resize_image(&p.path, &p.format, old.index.size_bytes)?;
        }
        disk::make_equal(
            store,
            &p.target,
            &p.path,
            &p.format,
            &old.index,
            current,
            since(chain, old, &p.format),
            work_dir,
            &control,
            &mut Vec::new(),
        )?;
    }
    Ok(())
}

/// Everything an in-place restore writes, checked before anything changes ([`confine`]).
struct Places {
    /// What this restore may touch on this host.
    rules: Rules,
    mode: Mode,
    /// Each disk's image.
    disks: Vec<Confined>,
    nvram: Option<Confined>,
    tpm: Option<Confined>,
    /// The definition to define, made safe.
    xml: String,
    /// What was changed in it to make it safe.
    made_safe: Vec<String>,
}

impl Places {
    /// Checks every place checkpoint `m` would have the restore of VM `name` (defined on
    /// this host if `defined`) write, and its definition `checkpoint`.
    fn check(
        hv: &Hypervisor,
        m: &Manifest,
        name: &str,
        defined: bool,
        checkpoint: &DomainXml,
    ) -> Result<Self, RestoreError> {
        let uuid = m.vm.uuid.to_string();
        let nvram =
            checkpoint
                .firmware
                .nvram_path()
                .cloned()
                .or_else(|| match checkpoint.firmware {
                    Firmware::Uefi { .. } => hv.default_nvram_path(name),
                    Firmware::Bios => None,
                });
        let tpm = checkpoint
            .tpm
            .as_ref()
            .and_then(|t| t.state_path.clone())
            .or_else(|| hv.tpm_state_dir(&uuid));
        let mode = if defined {
            Mode::InPlace
        } else {
            Mode::InPlaceUndefined
        };
        let rules = confine::rules_for(hv, name, &uuid, &uuid, false, None, checkpoint)?;
        let refused = |refusal| refused(m, name, mode, refusal);
        let mut disks = Vec::new();
        for d in &m.disks {
            let format = d.format.as_deref().unwrap_or("raw");
            Rules::check_format(&d.target, format).map_err(refused)?;
            let source = Path::new(d.source.as_deref().expect("checked in prepare"));
            let what = format!("disk {}'s image", d.target);
            disks.push(rules.confine(Role::Disk, source, &what).map_err(refused)?);
        }
        let nvram = nvram
            .map(|p| rules.confine(Role::Nvram, &p, "the UEFI variable store"))
            .transpose()
            .map_err(refused)?;
        let tpm = tpm
            .map(|p| rules.confine(Role::TpmState, &p, "the TPM state folder"))
            .transpose()
            .map_err(refused)?;
        let xml = if name == m.vm.name {
            m.domain_xml.clone()
        } else {
            domain_xml::rewrite(
                &m.domain_xml,
                &Rewrite {
                    name: Some(name.to_owned()),
                    ..Rewrite::default()
                },
            )?
        };
        let safe = rules.check_domain(&xml).map_err(refused)?;
        Ok(Self {
            rules,
            mode,
            disks,
            nvram,
            tpm,
            xml: safe.xml,
            made_safe: safe.changes,
        })
    }
}

/// What an in-place restore found out before changing anything.
struct InPlace<'a> {
    hv: &'a Hypervisor,
    store: &'a Store,
    m: &'a Manifest,
    work_dir: &'a Path,
    /// The VM's name now (it may have been renamed since the checkpoint).
    name: String,
    uuid: String,
    /// The VM as it is defined now, if it is.
    existing: Option<crate::vm::VmInfo>,
    was_running: bool,
    /// A restore of this VM that was cut short.
    interrupted: Option<RestoreMarker>,
    /// Where it writes, checked.
    places: Places,
    /// The checkpoint's UEFI variables and TPM state, read and checked.
    firmware: SavedFirmware,
    /// The store's last checkpoint of the VM with a libvirt checkpoint: its dirty bitmaps
    /// in the images say what was written since.
    chain: Option<Manifest>,
}

impl<'a> InPlace<'a> {
    fn prepare(
        hv: &'a Hypervisor,
        store: &'a Store,
        m: &'a Manifest,
        work_dir: &'a Path,
    ) -> Result<Self, RestoreError> {
        let uuid = m.vm.uuid.to_string();
        if !hv.is_local() {
            return Err(RestoreError::Invalid(format!(
                "restoring in place works on this machine's libvirt only; to bring VM {:?} back on {}, restore it as a new VM there (--as NAME)",
                m.vm.name,
                hv.uri()
            )));
        }
        let checkpoint_xml = parsed(m)?;
        let existing = if hv.has_vm(&uuid) {
            Some(hv.vm(&uuid)?)
        } else {
            None
        };
        if existing.is_none() && hv.has_vm(&m.vm.name) {
            return Err(RestoreError::Invalid(format!(
                "a different VM is called {:?} on this host now (not the one checkpoint {} was taken of); restore the checkpoint as a new VM with another name (--as NAME)",
                m.vm.name, m.id
            )));
        }
        let name = existing
            .as_ref()
            .map_or_else(|| m.vm.name.clone(), |v| v.name.clone());
        let interrupted = match RestoreMarker::left_for(&m.vm.uuid) {
            Some((marker, true)) => {
                return Err(RestoreError::Invalid(format!(
                    "VM {name:?} is being restored (to checkpoint {}) by process {}; wait for that to finish",
                    marker.checkpoint, marker.pid
                )));
            }
            Some((marker, false)) => Some(marker),
            None => None,
        };
        if let Some(d) = m.disks.iter().find(|d| d.source.is_none()) {
            return Err(RestoreError::Invalid(format!(
                "checkpoint {} does not say where disk {} of VM {name:?} was kept; restore it as a new VM (--as NAME) instead",
                m.id, d.target
            )));
        }
        // Before anything changes: every path the checkpoint names is checked against what
        // the VM is on this host and where libvirt keeps VMs.
        let places = Places::check(hv, m, &name, existing.is_some(), &checkpoint_xml)?;

        let chain = store
            .catalog()?
            .checkpoints
            .into_iter()
            .rfind(|c| c.vm.uuid == m.vm.uuid && c.libvirt_checkpoint.is_some());
        let firmware = SavedFirmware::load(store, m)?;
        Ok(Self {
            hv,
            store,
            m,
            work_dir,
            chain,
            was_running: existing.as_ref().is_some_and(|v| v.state.is_active()),
            name,
            uuid,
            existing,
            interrupted,
            places,
            firmware,
        })
    }

    /// Starts the VM again if it ran before (after a failure that changed nothing).
    fn restart(&self) {
        if self.was_running {
            self.hv
                .start_vm(&self.name)
                .or_warn(format_args!("start VM {:?} again", self.name));
        }
    }

    /// The safety checkpoint, or why there is none.
    fn safety(
        &self,
        options: &RestoreOptions,
        saved: Option<&std::fs::File>,
        control: &Control,
    ) -> Result<(Option<Manifest>, Option<String>), RestoreError> {
        let readable_disk = self.existing.as_ref().is_some_and(|v| {
            v.protected_disks()
                .any(|d| d.path().is_some_and(|p| p.exists()))
        });
        let skipped = |why: String| Ok((None, Some(why)));
        if !options.safety_checkpoint {
            return skipped("the restore was asked to take no safety checkpoint".into());
        }
        if let Some(marker) = &self.interrupted {
            return skipped(format!(
                "an earlier restore (to checkpoint {}) was cut short and left the disks half-written; {}",
                marker.checkpoint,
                marker.safety_checkpoint.as_ref().map_or_else(
                    || "it had no safety checkpoint".to_owned(),
                    |s| format!("its safety checkpoint {s} stays the way back")
                )
            ));
        }
        if self.existing.is_none() {
            return skipped("the VM was not defined on this host".into());
        }
        if !readable_disk {
            return skipped("none of the VM's disk files was there".into());
        }
        let take = TakeOptions {
            labels: vec![SAFETY_LABEL.to_owned()],
            skip_missing_disks: true,
            copy_phase: Phase::SafetyCheckpoint,
            quiesce: true,
            ..TakeOptions::default()
        };
        let taken = match saved {
            Some(memory) => checkpoint::take_saved(
                self.hv,
                self.store,
                &self.name,
                self.work_dir,
                &take,
                memory,
                control,
            ),
            None => checkpoint::take_with(
                self.hv,
                self.store,
                &self.name,
                self.work_dir,
                &take,
                control,
            ),
        };
        match taken {
            Ok(s) => Ok((Some(s), None)),
            Err(checkpoint::CheckpointError::Store(crate::store::StoreError::Cancelled)) => {
                Err(RestoreError::Cancelled)
            }
            Err(e) => Err(RestoreError::Safety(Box::new(e))),
        }
    }

    /// Disks, firmware state and definition; `touched` records how far it got.
    fn write(
        &self,
        safety: Option<&Manifest>,
        control: &Control,
        touched: &mut Vec<DiskProgress>,
        reports: &mut Vec<DiskRestore>,
    ) -> Result<(bool, bool), RestoreError> {
        let m = self.m;
        for (d, path) in m.disks.iter().zip(&self.places.disks) {
            touched.push(DiskProgress {
                target: d.target.clone(),
                path: path.to_path_buf(),
                format: d.format.clone().unwrap_or_else(|| "raw".into()),
                created: false,
                resized: false,
                written: Vec::new(),
            });
            let progress = touched.last_mut().expect("just pushed");
            reports.push(restore_disk(
                self.store,
                d,
                safety,
                self.chain.as_ref(),
                self.work_dir,
                control,
                progress,
            )?);
        }
        control.start_phase(Phase::Finishing);
        let firmware = self
            .firmware
            .write_local(self.places.nvram.as_ref(), self.places.tpm.as_ref())?;
        self.hv.define_vm(&self.places.xml)?;
        Ok(firmware)
    }

    /// After a cancel or an error while writing: back to `way_back` if there is one; the
    /// error to return says where that leaves the VM.
    fn after_failure(
        &self,
        cause: RestoreError,
        way_back: Option<&Manifest>,
        safety_is_current: bool,
        touched: &[DiskProgress],
        control: &Control,
    ) -> RestoreError {
        let name = &self.name;
        let cancelled = cause.is_cancel();
        let outcome = match way_back {
            None => format!(
                "VM {name:?} is shut off and its disks may be half-written; there is no safety checkpoint to go back to, so run the same restore again"
            ),
            Some(back) => {
                control.start_phase(Phase::RollingBack);
                let rolled = roll_back(
                    self.store,
                    self.m,
                    back,
                    safety_is_current,
                    self.chain.as_ref(),
                    touched,
                    self.work_dir,
                )
                .and_then(|()| {
                    SavedFirmware::load(self.store, back)?
                        .write_local(self.places.nvram.as_ref(), self.places.tpm.as_ref())?;
                    Ok(())
                });
                match rolled {
                    Ok(()) if cancelled => {
                        RestoreMarker::remove(&self.m.vm.uuid);
                        self.restart();
                        format!(
                            "VM {name:?} is as it was before the restore{}",
                            if self.was_running {
                                " and runs again"
                            } else {
                                ""
                            }
                        )
                    }
                    Ok(()) => {
                        RestoreMarker::remove(&self.m.vm.uuid);
                        format!(
                            "VM {name:?} was put back as it was before the restore (safety checkpoint {}) and left shut off",
                            back.id
                        )
                    }
                    Err(e) => format!(
                        "putting VM {name:?} back failed too ({e}); it is shut off with its disks half-written: run `rewind undo-restore` to go back to safety checkpoint {}",
                        back.id
                    ),
                }
            }
        };
        RestoreError::Stopped {
            cause: Box::new(cause),
            outcome,
        }
    }
}

impl<'a> InPlace<'a> {
    /// A full-state checkpoint's memory, checked and written out beside the VM's first
    /// disk for the resume (`None`: a disk-only checkpoint, or no resume asked for).
    fn staged_memory(
        &self,
        options: &RestoreOptions,
        control: &Control,
    ) -> Result<Option<Staged<'a>>, RestoreError> {
        if options.start == Some(false) || options.disk_only {
            return Ok(None);
        }
        // Beside the VM's first disk, whose place is checked.
        let Some(dir) = self.places.disks.first().and_then(|p| p.parent()) else {
            return Ok(None);
        };
        // The VM may have been renamed since: it resumes under its name now.
        let identity = (self.name != self.m.vm.name).then_some(Identity {
            name: &self.name,
            uuid: None,
        });
        // The definition saved with the memory comes from the store too.
        let check = |xml: &str| {
            self.places
                .rules
                .check_domain(xml)
                .map_err(|refusal| refused(self.m, &self.name, self.places.mode, refusal))
        };
        resume::stage(
            self.hv,
            self.store,
            self.m,
            &self.name,
            Place::Beside(dir),
            identity,
            &check,
            control,
        )
    }
}

/// Starts VM `name` if `wanted`, from `memory` if there is that: whether it started, why
/// not, and whether it resumed from the memory.
fn start_or_resume(
    hv: &Hypervisor,
    name: &str,
    wanted: bool,
    memory: Option<&Staged<'_>>,
    control: &Control,
) -> (bool, Option<String>, bool) {
    match memory {
        Some(saved) if wanted => {
            control.start_phase(Phase::Starting);
            match hv.restore_saved_state(&saved.path, saved.resume_xml.as_deref()) {
                Ok(()) => (true, None, true),
                Err(e) => (
                    false,
                    Some(format!(
                        "{e}; the disks are restored: start the VM to boot it from them"
                    )),
                    false,
                ),
            }
        }
        _ => {
            let (started, error) = start_if(hv, name, wanted, control);
            (started, error, false)
        }
    }
}

/// Starts VM `name` if `wanted`: whether it started, and why not.
pub(super) fn start_if(
    hv: &Hypervisor,
    name: &str,
    wanted: bool,
    control: &Control,
) -> (bool, Option<String>) {
    if !wanted {
        return (false, None);
    }
    control.start_phase(Phase::Starting);
    match hv.start_vm(name) {
        Ok(()) => (true, None),
        Err(e) => (false, Some(with_advice(e.to_string()))),
    }
}

/// Why a restored VM did not start, with what to do where libvirt does not say it: QEMU
/// runs as its own user, which cannot reach disks in a private folder (a home folder).
fn with_advice(error: String) -> String {
    if error.contains("Cannot access storage file") && error.contains("Permission denied") {
        format!(
            "{error}. QEMU runs as its own user and cannot reach that folder: restore into a \
             folder it can read, such as /var/lib/libvirt/images, or let it through each \
             folder above the disks (for example `setfacl -m u:libvirt-qemu:x FOLDER`), then \
             start the VM"
        )
    } else {
        error
    }
}

pub(super) fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Restores checkpoint `m` of its VM in place on the host of `hv` (see [`super`]).
pub fn restore_in_place(
    hv: &Hypervisor,
    store: &Store,
    m: &Manifest,
    options: &RestoreOptions,
    work_dir: &Path,
    control: &Control,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    // Garbage collection must not remove what is being read.
    let _lock = store.lock(LockMode::Shared, "restoring a checkpoint", Some(control))?;
    let t = InPlace::prepare(hv, store, m, work_dir)?;
    log_made_safe(m, &t.name, &t.places.made_safe);

    // 0. A full-state checkpoint's memory is checked and written out beside the VM's disks
    // while the VM still runs: a resume that cannot work is said before anything changes.
    let memory = t.staged_memory(options, control)?;

    // 1. Stop the VM.
    control.start_phase(Phase::Stopping);
    let mut saved = None;
    let stopped = match &t.existing {
        Some(_) if options.stop == StopMode::Save && t.was_running => {
            saved = Some(hv.managed_save(&t.name)?);
            Stopped::Saved
        }
        Some(_) => hv
            .stop_vm(&t.name, options.stop, control)
            .map_err(|e| match e {
                crate::Error::Cancelled => RestoreError::Cancelled,
                other => other.into(),
            })?,
        None => Stopped::WasOff,
    };

    // 2. The safety checkpoint. Until the first write, a failure leaves the VM as it was.
    control.start_phase(Phase::SafetyCheckpoint);
    let (safety, safety_note) = t
        .safety(options, saved.as_ref(), control)
        .inspect_err(|_| t.restart())?;
    // The saved state is in the safety checkpoint now (or unwanted): the disks are about
    // to change under it, so libvirt must not resume from it.
    if saved.take().is_some()
        && let Err(e) = hv.remove_managed_save(&t.name)
    {
        t.restart();
        return Err(e.into());
    }
    let way_back = match (&safety, &t.interrupted) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(marker)) => marker
            .safety_checkpoint
            .as_deref()
            .and_then(|id| store.manifest(&m.vm.uuid, id).ok()),
        (None, None) => None,
    };

    // 3. Note that the disks are being written.
    let marker = RestoreMarker {
        checkpoint: m.id.clone(),
        safety_checkpoint: way_back.as_ref().map(|s| s.id.clone()),
        store: store.root().to_path_buf(),
        pid: std::process::id(),
    };
    if let Err(e) = marker.write(&m.vm.uuid) {
        t.restart();
        return Err(RestoreError::Write {
            path: crate::notes::restoring_dir(),
            detail: format!("could not note the restore there: {e}"),
        });
    }

    // 4.-5. Disks, firmware state, definition. Without a way back, a cancel waits until
    // the restore is complete: a half-written VM with nothing to go back to is worse.
    control.start_phase(Phase::Writing);
    control.defer_cancel(way_back.is_none());
    let mut touched = Vec::new();
    let mut disks = Vec::new();
    let result = t.write(safety.as_ref(), control, &mut touched, &mut disks);
    control.defer_cancel(false);
    let (nvram, tpm) = result.map_err(|cause| {
        t.after_failure(
            cause,
            way_back.as_ref(),
            safety.is_some(),
            &touched,
            control,
        )
    })?;
    RestoreMarker::remove(&m.vm.uuid);

    // 6. Start it again: resumed from the saved memory of a full-state checkpoint (which
    // is restored to run, the way it was taken), booted otherwise.
    let start = options.start.unwrap_or(t.was_running || memory.is_some());
    let (started_vm, start_error, resumed) =
        start_or_resume(hv, &t.name, start, memory.as_ref(), control);
    let mut made_safe = t.places.made_safe.clone();
    for change in memory.iter().flat_map(|saved| &saved.made_safe) {
        if !made_safe.contains(change) {
            made_safe.push(change.clone());
        }
    }
    drop(memory);
    Ok(RestoreReport {
        vm: t.name.clone(),
        vm_uuid: t.uuid.clone(),
        checkpoint: m.id.clone(),
        checkpoint_time: m.time,
        uri: hv.uri().to_owned(),
        mode: "in_place".into(),
        stopped: Some(stopped_label(stopped).into()),
        safety_checkpoint: safety.map(|s| s.id),
        safety_note,
        bytes_written: disks.iter().map(|r| r.bytes_written).sum(),
        disks,
        nvram,
        tpm,
        defined: t.existing.is_none(),
        started: started_vm,
        resumed,
        network_unplugged: false,
        made_safe,
        start_error,
        duration_ms: elapsed_ms(started),
    })
}
