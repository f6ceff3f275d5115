//! A running VM's disks captured at one instant (a pull backup's export, or the images under
//! a live snapshot's overlays), read over NBD or from the image files, and streamed into the
//! store.

use std::fmt::Write as _;
use std::path::Path;

use crate::cleanup::OrWarn as _;
use crate::firmware::FirmwareState;
use crate::libvirt::Hypervisor;
use crate::progress::{Control, Phase};
use crate::qemu_nbd::{Access, QemuNbd};
use crate::store::{
    CheckpointKind, CheckpointWriter, Consistency, Manifest, NewCheckpoint, Store, VmRef,
};
use rewind_nbd::{BASE_ALLOCATION, NbdClient, NbdError, STATE_DIRTY, STATE_HOLE, STATE_ZERO};

use super::full_state::{capture_full_state, capture_full_state_live};
use super::guards::freeze;
use super::overlays::{NoLiveSnapshot, abandon, overlay_files, snapshot_onto};
use super::plan::LivePlan;
use super::{CheckpointError, MEMORY_BLOB};

/// The live capture, with the job folder made.
pub(super) fn take_live(
    hv: &Hypervisor,
    store: &Store,
    plan: &LivePlan<'_>,
    job_dir: &Path,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let targets: Vec<String> = plan.disks.iter().map(|d| d.0.clone()).collect();
    let socket = job_dir.join("rewind-nbd.sock");
    control.set_phase(Phase::Capturing);
    let captured = if plan.full_state {
        // The live way first (a pause of a fraction of a second, see
        // `capture_full_state_live`); the managed save where libvirt refuses it.
        let live = if plan.managed_save {
            Err(NoLiveSnapshot::ManagedSaveAsked)
        } else {
            capture_full_state_live(hv, plan)?
        };
        match live {
            Ok(captured) => captured,
            Err(live_error) => {
                let mut captured = capture_full_state(hv, plan, &socket, &targets)?;
                if !plan.managed_save {
                    write!(
                        captured.consistency_note,
                        "; saved with the VM paused because the live snapshot failed: {live_error}"
                    )
                    .expect("writing to a String cannot fail");
                }
                captured
            }
        }
    } else {
        capture_disks(hv, plan, &socket, &targets)?
    };
    copy_captured(hv, store, plan, captured, job_dir, control)
}

/// The disks as they were at the capture instant.
pub(super) enum FrozenDisks {
    /// libvirt's pull-backup export (NBD).
    Export(crate::libvirt::backup::PullBackup),
    /// The images under a live snapshot's overlays (target, overlay file), which the VM
    /// writes to until they are merged back.
    Overlays(Vec<(String, std::path::PathBuf)>),
}

impl FrozenDisks {
    /// Ends the export, or merges the overlays back (every one is tried).
    pub(super) fn end(self, hv: &Hypervisor, vm: &str) -> Result<(), CheckpointError> {
        match self {
            Self::Export(backup) => Ok(backup.finish()?),
            Self::Overlays(overlays) => {
                let mut first_error = None;
                for (target, file) in &overlays {
                    if let Err(e) = hv.commit_overlay(vm, target, file) {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), |e| Err(e.into()))
            }
        }
    }
}

/// The capture instant, and what was captured at it.
pub(super) struct Captured {
    /// Where the frozen disks are read from.
    pub(super) source: FrozenDisks,
    /// The libvirt checkpoint the export's dirty bitmaps are relative to, if incremental.
    pub(super) incremental_from: Option<String>,
    pub(super) full_reason: Option<String>,
    pub(super) kind: CheckpointKind,
    pub(super) consistency: Consistency,
    pub(super) consistency_note: String,
    /// The VM's saved memory and device state (full state only).
    pub(super) memory: Option<std::fs::File>,
    /// The domain XML at the instant (before a live snapshot put the disks on overlays).
    pub(super) domain_xml: String,
    /// The UEFI variables and TPM state at the instant.
    pub(super) firmware: FirmwareState,
}

/// Disks only: freeze (when an agent answers), mark the instant, thaw at once.
///
/// A full capture marks it with a live snapshot where it can (every protected disk a file
/// on this machine): the disks switch to short-lived overlays, and the images under them
/// are read straight from their files (see [`read_disk_file`]) instead of through QEMU's
/// NBD export, which copies every byte twice inside QEMU: QEMU's CPU for a 2 GiB full fell
/// from 1.3–1.9 to 0.4 CPU-seconds, and the wall time by a fifth to a quarter
/// (`BENCHMARKS.md`, "Running VMs: the image under a short-lived overlay"). The price is
/// the guest's writes meanwhile, which go to the overlays and are merged back after. An incremental reads little, so it keeps the pull backup's
/// export (no overlay to merge); so does a full that cannot have overlays, or whose
/// snapshot libvirt refuses. The guest is frozen only for as long as starting the backup
/// job or taking the snapshot takes.
pub(super) fn capture_disks(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    socket: &Path,
    targets: &[String],
) -> Result<Captured, CheckpointError> {
    let vm = plan.vm;
    let domain_xml = hv.domain_xml(vm)?;
    let full = match (&plan.prev, &plan.full_reason) {
        (Some(p), None) => p.libvirt_checkpoint.is_none(),
        _ => true,
    };
    let overlays = if full {
        overlay_files(hv, plan)
            .inspect_err(|why| {
                tracing::info!(vm, "full checkpoint through the backup export: {why}");
            })
            .ok()
    } else {
        None
    };
    let (frozen, consistency, consistency_note) = if plan.quiesce {
        freeze(hv, vm, &plan.uuid)?
    } else {
        (
            None,
            Consistency::Crash,
            "freezing the guest's file systems is turned off in this VM's policy (quiesce)".into(),
        )
    };
    crate::fault::point("after-freeze")?;
    let overlays = overlays.and_then(|o| match snapshot_onto(hv, plan, &o, None) {
        Ok(()) => Some(o),
        Err(why) => {
            tracing::info!(vm, "full checkpoint through the backup export: {why}");
            None
        }
    });
    let (source, incremental_from, full_reason) = if let Some(o) = overlays {
        drop(frozen);
        tracing::info!(vm, "full checkpoint read from the images under overlays");
        (FrozenDisks::Overlays(o), None, plan.full_reason.clone())
    } else {
        let begun = begin_backup(hv, plan, socket, targets);
        drop(frozen);
        let (backup, incremental_from, full_reason) = begun?;
        (FrozenDisks::Export(backup), incremental_from, full_reason)
    };
    let firmware = FirmwareState::read(plan.info)
        .map_err(CheckpointError::from)
        .and_then(|f| match source {
            FrozenDisks::Overlays(_) => Ok(crate::fault::point("after-live-snapshot").map(|()| f)?),
            FrozenDisks::Export(_) => Ok(f),
        });
    let firmware = match firmware {
        Ok(f) => f,
        Err(e) => {
            // No manifest will refer to the new libvirt checkpoint.
            abandon(hv, plan, source);
            return Err(e);
        }
    };
    Ok(Captured {
        source,
        incremental_from,
        full_reason,
        kind: CheckpointKind::Disk,
        consistency,
        consistency_note,
        memory: None,
        domain_xml,
        firmware,
    })
}

/// Streams what was captured into a new checkpoint and commits it.
pub(super) fn copy_captured(
    hv: &Hypervisor,
    store: &Store,
    plan: &LivePlan<'_>,
    captured: Captured,
    job_dir: &Path,
    control: &Control,
) -> Result<Manifest, CheckpointError> {
    let vm = plan.vm;
    let Captured {
        source,
        incremental_from,
        full_reason,
        kind,
        consistency,
        consistency_note,
        memory,
        domain_xml,
        firmware,
    } = captured;
    let parent = incremental_from.as_ref().and_then(|_| plan.prev.clone());
    let result = (|| {
        let new = NewCheckpoint {
            vm: VmRef {
                name: plan.info.name.clone(),
                uuid: plan.uuid,
            },
            time: plan.time,
            kind,
            consistency,
            consistency_note: Some(consistency_note.clone()),
            domain_xml: domain_xml.clone(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            full_reason: full_reason.clone(),
            labels: plan.labels.clone(),
            libvirt_checkpoint: Some(plan.new_name.clone()),
        };
        let mut writer = store.begin_checkpoint(new, control)?;
        control.set_phase(Phase::Copying);
        if let Some(file) = &memory {
            add_memory(&mut writer, vm, file, control)?;
        }
        for (target, _, disk_source, format) in plan.disks {
            let (object, read) = match &source {
                FrozenDisks::Export(backup) => read_disk(
                    &writer,
                    vm,
                    &job_dir.join("rewind-nbd.sock"),
                    target,
                    backup.dirty_context(target).as_deref(),
                    parent.as_ref(),
                    control,
                )?,
                FrozenDisks::Overlays(_) => {
                    let bitmap = incremental_from
                        .as_deref()
                        .filter(|_| format.as_deref() == Some("qcow2"));
                    read_disk_file(
                        &writer,
                        &DiskFile {
                            vm,
                            target,
                            file: disk_source.as_deref().unwrap_or_default(),
                            format: format.as_deref(),
                            bitmap,
                            under_overlay: true,
                        },
                        parent.as_ref(),
                        job_dir,
                        control,
                    )?
                }
            };
            writer.add_read_bytes(read);
            writer.add_disk(target, disk_source.clone(), format.clone(), object)?;
        }
        firmware.add_to(&mut writer)?;
        control.set_phase(Phase::Finishing);
        Ok::<_, CheckpointError>(writer.commit(control)?)
    })();
    let finished = source.end(hv, vm);
    match result {
        Ok(manifest) => {
            finished?;
            // The previous libvirt checkpoint of this store is no longer needed.
            if let Some(old) = plan
                .prev
                .as_ref()
                .and_then(|p| p.libvirt_checkpoint.as_deref())
            {
                hv.delete_checkpoint(vm, old).or_warn(format_args!(
                    "delete the previous libvirt checkpoint {old} of VM {vm:?}"
                ));
            }
            Ok(manifest)
        }
        Err(e) => {
            // No manifest refers to the new libvirt checkpoint: it must not become a base.
            hv.delete_checkpoint(vm, &plan.new_name)
                .or_warn(format_args!(
                    "delete libvirt checkpoint {} of VM {vm:?}",
                    plan.new_name
                ));
            Err(e)
        }
    }
}

/// A disk image file to read into a checkpoint.
pub(super) struct DiskFile<'a> {
    pub(super) vm: &'a str,
    pub(super) target: &'a str,
    pub(super) file: &'a str,
    pub(super) format: Option<&'a str>,
    /// The persistent bitmap in the image whose dirty blocks are read (an incremental).
    pub(super) bitmap: Option<&'a str>,
    /// The image lies under a live snapshot's overlay: the running VM's QEMU holds it as a
    /// read-only backing file, and nothing writes it until Rewind merges the overlay back.
    pub(super) under_overlay: bool,
}

/// Reads a disk image (not written meanwhile) through `qemu-nbd --read-only`: the chunks
/// its bitmap names, on top of `parent`'s index, or all its data when there is no bitmap
/// or qemu-nbd refuses it (a bitmap QEMU could not store when it was killed is
/// inconsistent). A full read takes the data straight from the file when it lies there as
/// it is (see [`super::direct`]); `qemu-nbd` then only holds the image's lock.
pub(super) fn read_disk_file(
    writer: &CheckpointWriter<'_>,
    disk: &DiskFile<'_>,
    parent: Option<&Manifest>,
    work_dir: &Path,
    control: &Control,
) -> Result<(crate::store::FinishedObject, u64), CheckpointError> {
    // Under an overlay, QEMU's hold on the image keeps writers out: a full read needs no
    // `qemu-nbd` at all, which a Rewind killed mid-way could leave holding the image (and
    // the overlay from being merged back).
    if disk.under_overlay
        && disk.bitmap.is_none()
        && let Some(map) = super::direct::map_image(disk.file, disk.format)
    {
        return super::direct::read_image(writer, &map, disk.vm, disk.target, disk.file, control);
    }
    let socket = work_dir.join(format!("rewind-{}.sock", disk.target));
    crate::cleanup::remove_file(&socket);
    let serve = |bitmap| {
        QemuNbd::serve(
            disk.file,
            disk.format,
            disk.target,
            &socket,
            Access::ReadOnly { bitmap },
        )
    };
    let (server, bitmap) = match serve(disk.bitmap) {
        Ok(server) => (server, disk.bitmap),
        Err(_) if disk.bitmap.is_some() => (
            serve(None).map_err(|e| CheckpointError::Unsupported(e.to_string()))?,
            None,
        ),
        Err(e) => return Err(CheckpointError::Unsupported(e.to_string())),
    };
    // A full read of an image whose data lies in its own file: straight from the file,
    // while qemu-nbd's lock keeps the VM from starting on it. One client stays connected
    // meanwhile: qemu-nbd ends when its last client goes, so a Rewind killed during the
    // read does not leave it holding the lock, which would keep the VM from starting.
    if bitmap.is_none()
        && let Some(map) = super::direct::map_image(disk.file, disk.format)
        && let Ok(holder) = NbdClient::connect(&socket, disk.target, &[])
    {
        let read =
            super::direct::read_image(writer, &map, disk.vm, disk.target, disk.file, control);
        drop(holder);
        server.stop();
        return read;
    }
    let context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
    let read = read_disk(
        writer,
        disk.vm,
        &socket,
        disk.target,
        context.as_deref(),
        parent,
        control,
    );
    drop(server);
    read
}

/// Adds the saved memory and device state as blob `memory`, chunked like a disk (pages
/// that did not change since the last full-state checkpoint cost nothing new where they
/// line up in the image).
pub(super) fn add_memory(
    writer: &mut CheckpointWriter<'_>,
    vm: &str,
    file: &std::fs::File,
    control: &Control,
) -> Result<(), CheckpointError> {
    let size = file
        .metadata()
        .map_err(|e| {
            CheckpointError::Unsupported(format!(
                "could not read the size of the saved state of VM {vm:?}: {e}"
            ))
        })?
        .len();
    control.add_total_bytes(size);
    let object = writer.ingest_file(file, size, None, control)?;
    writer.add_read_bytes(size);
    writer.add_blob(MEMORY_BLOB, object)?;
    Ok(())
}

/// Starts the pull backup, incremental from the plan's `prev` unless it has a
/// `full_reason`; falls back to a full one (saying why) when libvirt refuses the incremental.
pub(super) fn begin_backup(
    hv: &Hypervisor,
    plan: &LivePlan<'_>,
    socket: &Path,
    targets: &[String],
) -> Result<
    (
        crate::libvirt::backup::PullBackup,
        Option<String>,
        Option<String>,
    ),
    CheckpointError,
> {
    let (vm, new_name) = (plan.vm, plan.new_name.as_str());
    let mut full_reason = plan.full_reason.clone();
    let mut incremental_from = match (&plan.prev, &full_reason) {
        (Some(p), None) => p.libvirt_checkpoint.clone(),
        _ => None,
    };
    let backup = match hv.begin_pull_backup(
        vm,
        socket,
        targets,
        incremental_from.as_deref(),
        Some(new_name),
    ) {
        Ok(b) => b,
        Err(e) if incremental_from.is_some() => {
            // A bitmap missing or inconsistent inside the qcow2 shows only here.
            full_reason = Some(format!("libvirt refused the incremental ({e})"));
            incremental_from = None;
            hv.begin_pull_backup(vm, socket, targets, None, Some(new_name))?
        }
        Err(e) => return Err(e.into()),
    };
    Ok((backup, incremental_from, full_reason))
}

/// The most one NBD read asks for. QEMU's NBD server (libvirt's backup export and
/// `qemu-nbd` alike) allocates a buffer for every request and frees it after the reply.
/// With QEMU 7.2 and glibc 2.36 a 1 MiB buffer (a chunk in one request) came fresh from the
/// kernel every time: ~250 000 page faults, each page zeroed, per 2 GiB read. Buffers of
/// 512 KiB were reused (~150 faults), which saved QEMU about 1 CPU-second per 2 GiB;
/// smaller requests cost it more in request handling than that (`BENCHMARKS.md`, "Full
/// checkpoint CPU").
const READ_REQUEST_BYTES: usize = 512 << 10;

/// For each chunk slot that the byte ranges `extents` (sorted) touch, the pieces
/// ([`crate::store::PIECE_BYTES`]) of it they touch, sorted.
fn changed_pieces(extents: &[(u64, u64)], chunk: u64, size: u64) -> Vec<(u64, Vec<usize>)> {
    let piece = crate::store::PIECE_BYTES as u64;
    let mut out: Vec<(u64, Vec<usize>)> = Vec::new();
    for &(start, end) in extents {
        let end = end.min(size);
        let mut at = start - start % piece;
        while at < end {
            let (slot, k) = (
                at / chunk,
                usize::try_from(at % chunk / piece).expect("small"),
            );
            match out.last_mut() {
                Some((i, pieces)) if *i == slot => {
                    if pieces.last() != Some(&k) {
                        pieces.push(k);
                    }
                }
                _ => out.push((slot, vec![k])),
            }
            at += piece;
        }
    }
    out
}

/// Reads one frozen disk from the export into the store: the chunks a dirty bitmap names
/// (incremental, on top of the parent's index) or every allocated chunk (full).
pub(super) fn read_disk(
    writer: &CheckpointWriter<'_>,
    vm: &str,
    socket: &Path,
    target: &str,
    dirty_context: Option<&str>,
    parent: Option<&Manifest>,
    control: &Control,
) -> Result<(crate::store::FinishedObject, u64), CheckpointError> {
    let read_err = |source: NbdError| CheckpointError::Read {
        vm: vm.to_owned(),
        target: target.to_owned(),
        source: Box::new(source),
    };
    let mut contexts = vec![BASE_ALLOCATION];
    if let Some(c) = dirty_context {
        contexts.push(c);
    }
    let mut nbd = NbdClient::connect(socket, target, &contexts).map_err(read_err)?;
    let size = nbd.size_bytes();
    let base = match (dirty_context, parent) {
        (Some(_), Some(p)) => p
            .disks
            .iter()
            .find(|d| d.target == target)
            .map(|d| &d.index),
        _ => None,
    };
    let mut object = writer.object_writer(size, base)?;
    let chunk = u64::from(writer.store().chunk_size_bytes());
    let (context, wanted): (&str, fn(u32) -> bool) = match (dirty_context, base) {
        (Some(c), Some(_)) => (c, |flags| flags & STATE_DIRTY != 0),
        _ => (BASE_ALLOCATION, |flags| {
            flags & (STATE_HOLE | STATE_ZERO) == 0
        }),
    };
    let extents: Vec<(u64, u64)> = nbd
        .block_status(context, 0, size)
        .map_err(read_err)?
        .into_iter()
        .filter(|e| wanted(e.flags) && e.length > 0)
        .map(|e| (e.offset, e.end()))
        .collect();
    // One connection per reader: several reads in flight keep QEMU and the drive busy.
    let mut readers = Vec::new();
    for _ in 1..crate::store::reader_count() {
        readers.push(NbdClient::connect(socket, target, &[]).map_err(read_err)?);
    }
    readers.push(nbd);
    for reader in &mut readers {
        reader.limit_request_bytes(READ_REQUEST_BYTES);
    }
    let read_bytes = std::sync::atomic::AtomicU64::new(0);
    let read_fns: Vec<_> = readers
        .iter_mut()
        .map(|client| {
            let read_bytes = &read_bytes;
            move |offset: u64, buf: &mut [u8]| {
                client.read_at(offset, buf).map_err(read_err)?;
                read_bytes.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, CheckpointError>(())
            }
        })
        .collect();
    if base.is_some() {
        // An incremental: only the pieces the dirty bitmap marks are read, and a slot
        // little changed is stored as a patch over what its parent held.
        let changes = changed_pieces(&extents, chunk, size);
        control.add_total_bytes(
            changes
                .iter()
                .map(|(i, pieces)| {
                    ((pieces.len() * crate::store::PIECE_BYTES) as u64).min(object.chunk_len(*i))
                })
                .sum(),
        );
        object.put_changed(&changes, control, read_fns)?;
    } else {
        let mut chunks: Vec<u64> = Vec::new();
        for &(start, end) in &extents {
            let (first, last) = (start / chunk, (end - 1) / chunk);
            if chunks.last() == Some(&first) {
                chunks.extend(first + 1..=last);
            } else {
                chunks.extend(first..=last);
            }
        }
        chunks.dedup();
        control.add_total_bytes(chunks.iter().map(|&i| object.chunk_len(i)).sum());
        let read_fns: Vec<_> = read_fns
            .into_iter()
            .map(|mut read| {
                move |i: u64, buf: &mut [u8]| {
                    read(i * chunk, buf)?;
                    Ok::<_, CheckpointError>(true)
                }
            })
            .collect();
        object.put_slots(&chunks, control, read_fns)?;
    }
    let read = read_bytes.into_inner();
    for client in readers {
        client.close().map_err(read_err)?;
    }
    Ok((object.finish()?, read))
}
