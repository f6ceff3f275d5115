//! Bringing a checkpoint back: in place (the VM stopped, a safety checkpoint of its current
//! state taken first so that the restore can be undone, only the chunks that differ
//! written, everything read back and checked before the VM starts again), as a new VM
//! beside the original, on another libvirt host, or as a standalone image (`rewind export`).
//!
//! Every chunk is checked against its hash as it is read from the store, and every chunk
//! written is read back from the disk and checked again, so a damaged store or a failing
//! drive gives an error, never a VM that runs on wrong data.
//!
//! A restore in place goes:
//!
//! 0. for a full-state checkpoint, while the VM still runs: check what resuming it needs and
//!    write its saved memory out beside the VM's disks, every chunk checked ([`resume`]);
//!    a resume that cannot work is an error here, before anything is changed;
//! 1. stop the VM (shutdown with a timeout — counted down on the job's [`Control`], which
//!    can also ask to turn it off at once — then force, as the caller chooses);
//! 2. take a safety checkpoint of what is there now, labelled `safety` (from a dirty bitmap
//!    when the store has a chain, so it reads little); its index says exactly what each
//!    chunk of the current disks holds;
//! 3. note on the host that the restore is writing ([`marker`]);
//! 4. per disk, write the chunks where the safety checkpoint and the restored one differ
//!    (disk files that are gone are created again, resized disks get their old size),
//!    flush, read them back and check them;
//! 5. UEFI variables, TPM state and the domain definition (defined anew if the VM was
//!    deleted);
//! 6. start the VM if it ran before, or resume it from the staged memory.
//!
//! A cancel or an error while writing rolls the disks back to the safety checkpoint. The
//! dirty bitmaps of every store's chain saw the writes (they go through QEMU's block layer),
//! so the next checkpoint into any store is still a true incremental.

pub mod clone;
pub mod confine;
mod disk;
pub mod domain_xml;
pub mod isolate;
mod new_image;
mod new_vm;
pub mod resume;
pub mod run;
mod vm;

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use disk::{ComparedBy, DiskRestore};
pub use new_vm::{DiskStorage, NewVm, restore_as_new};
pub use vm::restore_in_place;

use crate::checkpoint::CheckpointError;
use crate::libvirt::lifecycle::StopMode;
use crate::progress::Control;
use crate::store::LockMode;
use crate::store::{Manifest, Store, StoreError};

pub use crate::store::SAFETY_LABEL;

/// The format of an exported image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageFormat {
    /// A sparse raw file: holes stay holes.
    Raw,
    /// A qcow2 image: only the data is allocated.
    Qcow2,
}

impl ImageFormat {
    /// The name tools use (`raw`, `qcow2`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// What can go wrong while restoring or exporting.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// libvirt or the VM.
    #[error(transparent)]
    Libvirt(#[from] crate::Error),
    /// The checkpoint's UEFI variables or TPM state.
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    /// The safety checkpoint could not be taken: nothing was changed.
    #[error(
        "the safety checkpoint of the VM's current state could not be taken, so nothing was restored: {0}"
    )]
    Safety(#[source] Box<CheckpointError>),
    /// The checkpoint has no such disk.
    #[error("checkpoint {id} of VM {vm:?} has no disk {target:?}; it has: {available}")]
    NoSuchDisk {
        /// The checkpoint.
        id: String,
        /// The VM's name.
        vm: String,
        /// The disk asked for.
        target: String,
        /// The disks it has.
        available: String,
    },
    /// The output file is there already.
    #[error("{} already exists; choose another name or remove it first", .0.display())]
    Exists(PathBuf),
    /// Writing a disk or file.
    #[error("could not write {}: {detail}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// What was written did not read back as the checkpoint has it.
    #[error(
        "the restored disk {} failed verification: {detail}. The drive under it may be failing",
        path.display()
    )]
    Verify {
        /// The image.
        path: PathBuf,
        /// Which chunk.
        detail: String,
    },
    /// The restore cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    /// The checkpoint's domain definition cannot be rewritten for its new place.
    #[error("the checkpoint's domain definition cannot be used: {0}")]
    DomainXml(#[from] crate::libvirt::xml::XmlError),
    /// The restore failed or was cancelled part-way; what state the VM was left in.
    #[error("{cause}; {outcome}")]
    Stopped {
        /// What stopped it.
        #[source]
        cause: Box<RestoreError>,
        /// Where that leaves the VM, in words for the user.
        outcome: String,
    },
    /// A full-state checkpoint cannot resume the VM (see [`resume`]): nothing was changed.
    #[error(
        "checkpoint {id} of VM {vm:?} cannot resume the VM where it was: {reason}. Nothing was changed. To put back its disks, UEFI variables and TPM state and boot the VM from them instead, restore it disks-only (--disk-only; in the window: Restore disks only)"
    )]
    CannotResume {
        /// The checkpoint.
        id: String,
        /// The VM's name.
        vm: String,
        /// Why not.
        reason: String,
    },
    /// Cancelled before anything was changed.
    #[error("cancelled; nothing was changed")]
    Cancelled,
    /// The checkpoint would have the restore touch what is not the VM's (see [`confine`]):
    /// nothing was changed.
    #[error(
        "checkpoint {id} of VM {vm:?} was refused, and nothing was changed: {refusal}. {advice}"
    )]
    Refused {
        /// The checkpoint.
        id: String,
        /// The VM's name.
        vm: String,
        /// What was refused, and why.
        #[source]
        refusal: Box<confine::Refusal>,
        /// What the user can do.
        advice: String,
    },
}

impl RestoreError {
    /// Whether the same restore can succeed later without the user changing anything:
    /// the answer of what stopped it.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::Libvirt(e) => e.is_retryable(),
            Self::Safety(e) => e.is_retryable(),
            Self::Stopped { cause, .. } => cause.is_retryable(),
            Self::Firmware(_)
            | Self::NoSuchDisk { .. }
            | Self::Exists(_)
            | Self::Write { .. }
            | Self::Verify { .. }
            | Self::Invalid(_)
            | Self::DomainXml(_)
            | Self::CannotResume { .. }
            | Self::Refused { .. }
            | Self::Cancelled => false,
        }
    }

    /// Whether the restore was cancelled (rather than failing).
    #[must_use]
    pub fn is_cancel(&self) -> bool {
        match self {
            Self::Cancelled
            | Self::Store(StoreError::Cancelled)
            | Self::Libvirt(crate::Error::Cancelled) => true,
            Self::Stopped { cause, .. } => cause.is_cancel(),
            _ => false,
        }
    }
}

/// How to restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoreOptions {
    /// How to stop the VM if it runs.
    pub stop: StopMode,
    /// Take a safety checkpoint of the current state first (so that the restore can be
    /// undone). Without one, a restore cut short cannot be rolled back.
    pub safety_checkpoint: bool,
    /// Start the VM afterwards: `None` starts it if it was running before (in place) or
    /// always (a new VM).
    pub start: Option<bool>,
    /// Of a full-state checkpoint, put back only the disks, UEFI variables and TPM state,
    /// and boot the VM from them instead of resuming its saved memory.
    pub disk_only: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            stop: StopMode::default(),
            safety_checkpoint: true,
            start: None,
            disk_only: false,
        }
    }
}

/// What a restore did (`rewind restore --json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(clippy::struct_excessive_bools)] // a report: each is a yes-or-no fact about what was done
pub struct RestoreReport {
    /// The VM restored (its name now).
    pub vm: String,
    /// Its UUID.
    pub vm_uuid: String,
    /// The checkpoint restored.
    pub checkpoint: String,
    /// The instant it captured.
    pub checkpoint_time: chrono::DateTime<chrono::Utc>,
    /// The libvirt connection it was restored through.
    pub uri: String,
    /// `in_place`, `new_vm` (on this machine) or `other_host`.
    pub mode: String,
    /// How the VM was stopped: `was_off`, `shut_down`, `forced`, or null for a new VM.
    pub stopped: Option<String>,
    /// The safety checkpoint taken first (undo with `rewind undo-restore`).
    pub safety_checkpoint: Option<String>,
    /// Why there is no safety checkpoint.
    pub safety_note: Option<String>,
    /// Per disk: what was compared, written and verified.
    pub disks: Vec<DiskRestore>,
    /// UEFI variables written back.
    pub nvram: bool,
    /// TPM state written back.
    pub tpm: bool,
    /// The VM had to be defined anew (it had been deleted, or is new).
    pub defined: bool,
    /// The VM was started.
    pub started: bool,
    /// It resumed from the checkpoint's saved memory (a full-state checkpoint) instead of
    /// booting.
    pub resumed: bool,
    /// A copy resumed beside the original: its network cards start unplugged, as it runs
    /// with the original's MAC addresses until its next boot.
    pub network_unplugged: bool,
    /// What was changed in the checkpoint's definition to make it safe for this host
    /// (see [`confine`]), in words.
    #[serde(default)]
    pub made_safe: Vec<String>,
    /// Why starting it failed, if it did (the restore itself succeeded).
    pub start_error: Option<String>,
    /// Bytes written to disks.
    pub bytes_written: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// Writes disk `target` of checkpoint `m` to a new file `out` in `format`, reading every
/// written chunk back; returns the bytes of data written (holes are not written). Nothing
/// is left at `out` if it fails or is cancelled. The file is this process's user's; see
/// [`export_disk_for`].
///
/// # Errors
/// As [`export_disk_for`].
pub fn export_disk(
    store: &Store,
    m: &Manifest,
    target: &str,
    out: &Path,
    format: ImageFormat,
    control: &Control,
) -> Result<u64, RestoreError> {
    export_disk_for(store, m, target, out, format, None, control)
}

/// [`export_disk`] for the user `owner` (user and group), who gets the file: what a service
/// running as root does for a user who asked.
///
/// That user owns the folder written in and could swap it, or anything in it, for a link
/// while the export runs; so nothing is written or given away by path. `out`'s folder is
/// made if needed and opened once, as that user (when this process is root), never through
/// a link at its end, and only if they may write in it. The image is written into a new
/// file in a private folder made in that folder (`.rewind-export-…`, root's, 0700), given
/// to `owner` through its handle, and moved to `out`'s name from the private folder's
/// handle to the folder's, never replacing anything there; the private folder is then
/// removed through the handles, links never followed. qemu-img is given the file itself,
/// not a path.
///
/// # Errors
/// No such disk, `out` exists, its folder cannot be opened or written by the user, the
/// store, or writing or checking the image failed.
pub fn export_disk_for(
    store: &Store,
    m: &Manifest,
    target: &str,
    out: &Path,
    format: ImageFormat,
    owner: Option<(u32, u32)>,
    control: &Control,
) -> Result<u64, RestoreError> {
    let Some(disk) = m.disks.iter().find(|d| d.target == target) else {
        return Err(RestoreError::NoSuchDisk {
            id: m.id.clone(),
            vm: m.vm.name.clone(),
            target: target.to_owned(),
            available: m
                .disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    new_image::check_writable(format.name(), &disk.index)?;
    let Some(name) = out.file_name() else {
        return Err(RestoreError::Invalid(format!(
            "{} does not name a file: give the path of the image to create",
            out.display()
        )));
    };
    let folder_path = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // For this process's own user, a link to a folder is as good as the folder (as
    // before): it is resolved first. For another user it is refused (`open_target`).
    let resolved = match owner {
        None => Some(
            std::fs::create_dir_all(folder_path)
                .and_then(|()| folder_path.canonicalize())
                .map_err(|e| RestoreError::Write {
                    path: out.to_path_buf(),
                    detail: format!("could not create its folder: {e}"),
                })?,
        ),
        Some(_) => None,
    };
    let folder_path = resolved.as_deref().unwrap_or(folder_path);
    let folder = crate::files::restore::open_target(folder_path, owner, true, "to export into")
        .map_err(|e| RestoreError::Write {
            path: out.to_path_buf(),
            detail: if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    "you may not write in its folder {} ({e}): choose a folder of yours",
                    folder_path.display()
                )
            } else {
                format!("could not open its folder {}: {e}", folder_path.display())
            },
        })?;
    export_into(
        store,
        &disk.index,
        target,
        folder.as_fd(),
        name,
        out,
        format,
        owner,
        control,
    )
}

/// [`export_disk_for`] once `out`'s folder is held open as `folder`: the image is written
/// there as `name`.
#[allow(clippy::too_many_arguments)]
fn export_into(
    store: &Store,
    index: &crate::store::ObjectIndex,
    target: &str,
    folder: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    out: &Path,
    format: ImageFormat,
    owner: Option<(u32, u32)>,
    control: &Control,
) -> Result<u64, RestoreError> {
    use crate::files::restore::{Made, remove_made};
    use crate::files::staging::Staging;
    use rustix::fs::{AtFlags, Mode, OFlags};
    use rustix::io::Errno;

    let write_error = |detail: String| RestoreError::Write {
        path: out.to_path_buf(),
        detail,
    };
    if rustix::fs::statat(folder, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(RestoreError::Exists(out.to_path_buf()));
    }
    // Garbage collection must not remove what is being read.
    let _lock = store.lock(LockMode::Shared, "exporting a disk", Some(control))?;
    let in_folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = Staging::make(
        &crate::paths::state_dir(),
        folder,
        in_folder,
        ".rewind-export-",
        owner,
    )
    .map_err(|e| write_error(format!("could not make a temporary folder beside it: {e}")))?;
    let staging_name = staging.name().to_owned();
    let mut moved = None;
    let result = (|| {
        let file = rustix::fs::openat(
            staging.folder(),
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )
        .map_err(|e| write_error(format!("could not create it: {e}")))?;
        let file = std::fs::File::from(file);
        new_image::write_new_image_into(store, target, &file, out, format.name(), index, control)?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                &file,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| write_error(format!("could not give it to its user: {e}")))?;
        }
        let made = Made::of(&rustix::fs::fstat(&file).map_err(|e| write_error(e.to_string()))?);
        control.check().map_err(StoreError::from)?;
        move_in(staging.folder(), folder, name).map_err(|e| match e {
            Errno::EXIST => RestoreError::Exists(out.to_path_buf()),
            e => write_error(format!("could not move it in place: {e}")),
        })?;
        moved = Some(made);
        rustix::fs::fsync(folder)
            .map_err(|e| write_error(format!("could not flush its folder: {e}")))
    })();
    if result.is_err()
        && let Some(made) = moved
        && let Err(e) = remove_made(folder, name, made)
    {
        tracing::warn!("could not remove {}: {e}", out.display());
    }
    if let Err(e) = staging.remove(folder) {
        tracing::warn!(
            "could not remove the temporary folder {staging_name} beside {}: {e}",
            out.display()
        );
    }
    result.map(|()| index.data_bytes)
}

/// Moves `name` from the folder `from` to the folder `to`, never replacing anything there
/// (`EEXIST` if something is). Where the file system cannot rename without replacing (NFS,
/// some FUSE file systems), the name is looked up first: what a race could replace then is
/// only a name in the folder, never what a link there points to.
fn move_in(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> Result<(), rustix::io::Errno> {
    use rustix::fs::{AtFlags, RenameFlags};
    match rustix::fs::renameat_with(from, name, to, name, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if rustix::fs::statat(to, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                return Err(rustix::io::Errno::EXIST);
            }
            rustix::fs::renameat(from, name, to, name)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        CheckpointKind, Consistency, InitOptions, KdfCost, NewCheckpoint, ObjectIndex, VmRef,
    };
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    const CHUNK: usize = 64 << 10;

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A store holding one checkpoint of `content` (as a raw image) as disk `vda`.
    fn checkpointed(dir: &Path, content: &[u8]) -> (Store, ObjectIndex) {
        checkpointed_in_chunks(dir, content, CHUNK)
    }

    /// A disk-only checkpoint of test VM `t`, incremental from `parent` if given.
    fn new_checkpoint(parent: Option<&crate::store::Manifest>) -> NewCheckpoint {
        NewCheckpoint {
            vm: VmRef {
                name: "t".into(),
                uuid: uuid::Uuid::from_bytes([3; 16]),
            },
            time: parent.map_or_else(chrono::Utc::now, |p| p.time + chrono::Duration::seconds(1)),
            kind: CheckpointKind::Disk,
            consistency: Consistency::Crash,
            domain_xml: "<domain/>".into(),
            parent: parent.map(|p| p.id.clone()),
            full_reason: None,
            consistency_note: None,
            labels: vec![],
            libvirt_checkpoint: None,
        }
    }

    fn checkpointed_in_chunks(dir: &Path, content: &[u8], chunk: usize) -> (Store, ObjectIndex) {
        let options = InitOptions {
            chunk_size_bytes: u32::try_from(chunk).unwrap(),
            passphrase: None,
            kdf_cost: KdfCost::FAST_FOR_TESTS,
        };
        let store = Store::init(&dir.join("store"), &options).unwrap();
        let image = dir.join("original.raw");
        std::fs::write(&image, content).unwrap();
        let control = Control::new();
        let mut writer = store
            .begin_checkpoint(new_checkpoint(None), &control)
            .unwrap();
        let object = writer
            .ingest_file(
                &File::open(&image).unwrap(),
                content.len() as u64,
                None,
                &control,
            )
            .unwrap();
        writer.add_disk("vda", None, None, object).unwrap();
        let m = writer.commit(&control).unwrap();
        (store, m.disks[0].index.clone())
    }

    fn qcow2_bytes(image: &Path, dir: &Path) -> Vec<u8> {
        let raw = dir.join("back.raw");
        crate::cleanup::remove_file(&raw);
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(&raw));
        std::fs::read(&raw).unwrap()
    }

    #[test]
    fn a_disk_is_made_equal_writing_only_what_differs_and_verifying_it() {
        let dir = tempfile::tempdir().unwrap();
        // 64 chunks: noise, with chunks 20..24 zeros (a hole in the checkpoint).
        let mut content: Vec<u8> = (0..64 * CHUNK)
            .map(|i| u8::try_from(((i * 2_654_435_761usize) >> 13) % 251).unwrap())
            .collect();
        content[20 * CHUNK..24 * CHUNK].fill(0);
        let (store, index) = checkpointed(dir.path(), &content);
        let disk = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(dir.path().join("original.raw"))
            .arg(&disk));
        // The guest changed three chunks since: one overwritten, one by a single byte, and
        // data where the checkpoint has a hole.
        run(Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .args([
                "-c",
                &format!("write -P 0x77 {} {}", 3 * CHUNK, CHUNK),
                "-c",
                &format!("write -P 0x01 {} 1", 10 * CHUNK + 100),
                "-c",
                &format!("write -P 0x55 {} 4096", 21 * CHUNK),
            ])
            .arg(&disk));
        assert!(qcow2_bytes(&disk, dir.path()) != content);

        let control = Control::new();
        let work = dir.path();
        let restore = |disk: &Path, format: &str| {
            disk::make_equal(
                &store,
                "vda",
                disk,
                format,
                &index,
                disk::Current::Unknown,
                None,
                work,
                &control,
                &mut Vec::new(),
            )
        };
        let report = restore(&disk, "qcow2").unwrap();
        assert_eq!(report.chunks, 64);
        assert_eq!(report.compared_by, ComparedBy::Hashing);
        assert_eq!(report.chunks_written, 3, "{report:?}");
        assert_eq!(report.chunks_verified, 3, "{report:?}");
        assert_eq!(report.bytes_written, 3 * CHUNK as u64);
        assert!(
            qcow2_bytes(&disk, dir.path()) == content,
            "restored disk differs"
        );
        let again = restore(&disk, "qcow2").unwrap();
        assert_eq!(again.chunks_written, 0, "nothing differs any more");

        // Raw disks too.
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &content).unwrap();
        File::options()
            .write(true)
            .open(&raw)
            .unwrap()
            .write_all_at(&[9; 10], 5 * CHUNK as u64)
            .unwrap();
        let report = restore(&raw, "raw").unwrap();
        assert_eq!(report.chunks_written, 1);
        assert!(std::fs::read(&raw).unwrap() == content);

        // Told what is there (a safety checkpoint of it), nothing is read to compare: a
        // slot claimed to differ is written, one claimed equal is not.
        let mut claimed = disk::entries(&store, &index).unwrap();
        claimed[7] = crate::store::ChunkId([1; 32]);
        let mut written = Vec::new();
        let report = disk::make_equal(
            &store,
            "vda",
            &raw,
            "raw",
            &index,
            disk::Current::Known(claimed, ComparedBy::SafetyCheckpoint),
            None,
            work,
            &control,
            &mut written,
        )
        .unwrap();
        assert_eq!((report.chunks_written, written), (1, vec![7]));

        // A disk of another size is refused, untouched.
        run(Command::new("qemu-img")
            .args(["resize", "-f", "qcow2"])
            .arg(&disk)
            .arg("+1M"));
        let err = restore(&disk, "qcow2").unwrap_err();
        assert!(
            err.to_string().contains("bytes, the checkpoint's disk"),
            "{err}"
        );
    }

    #[test]
    fn with_a_dirty_bitmap_nothing_is_read_to_compare_and_only_dirty_extents_are_written() {
        const BIG: usize = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..16 * BIG)
            .map(|i| u8::try_from(((i * 2_654_435_761usize) >> 11) % 253).unwrap())
            .collect();
        let (store, index) = checkpointed_in_chunks(dir.path(), &content, BIG);
        let disk = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(dir.path().join("original.raw"))
            .arg(&disk));
        // The checkpoint's bitmap, then 4 KiB changed in chunk 2 and 300 KiB from chunk 5
        // into chunk 6 (through QEMU's block layer, which marks them in the bitmap).
        run(Command::new("qemu-img")
            .args(["bitmap", "--add", "-f", "qcow2"])
            .arg(&disk)
            .arg("rw-1"));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .args(["-c", &format!("write -P 0x33 {} 4096", 2 * BIG + 8192)])
            .args([
                "-c",
                &format!("write -P 0x44 {} {}", 5 * BIG + 100 * 1024, 300 * 1024),
            ])
            .arg(&disk));
        let control = Control::new();
        let since = disk::Since {
            bitmap: "rw-1",
            base: &index,
        };
        let report = disk::make_equal(
            &store,
            "vda",
            &disk,
            "qcow2",
            &index,
            disk::Current::Unknown,
            Some(since),
            dir.path(),
            &control,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(report.compared_by, ComparedBy::DirtyBitmap);
        assert_eq!(report.chunks_written, 3, "{report:?}");
        // 64 KiB granules: one in chunk 2; chunk 5 from 64 KiB on (192 KiB), chunk 6 up
        // to 192 KiB — not the three whole 256 KiB chunks.
        assert_eq!(report.bytes_written, (64 + 192 + 192) << 10, "{report:?}");
        assert!(
            qcow2_bytes(&disk, dir.path()) == content,
            "restored disk differs"
        );
        // Nothing was read to compare: only the 3 written chunks were touched (and read
        // back).
        let (done, _) = control.progress_bytes();
        assert_eq!(
            done,
            3 * BIG as u64,
            "3 chunks written, none hashed to compare"
        );
    }

    /// Where the image holds a patch over the chunk a restore wants (a safety checkpoint
    /// taken just after a small change says so), only the pieces the patch holds are
    /// written back (store format 3).
    #[test]
    fn over_a_known_patch_only_the_pieces_it_holds_are_written() {
        const BIG: usize = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..16 * BIG)
            .map(|i| u8::try_from(((i * 2_654_435_761usize) >> 11) % 253).unwrap())
            .collect();
        let (store, index) = checkpointed_in_chunks(dir.path(), &content, BIG);
        let first = store.catalog().unwrap().checkpoints.pop().unwrap();
        // 4 KiB changed in chunk 2, 100 bytes in chunk 9: an incremental of patches.
        let mut changed = content.clone();
        changed[2 * BIG + 8192..2 * BIG + 12288].fill(0x33);
        changed[9 * BIG + 70_000..9 * BIG + 70_100].fill(0x44);
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &changed).unwrap();
        let control = Control::new();
        let mut writer = store
            .begin_checkpoint(new_checkpoint(Some(&first)), &control)
            .unwrap();
        let object = writer
            .ingest_file(
                &File::open(&raw).unwrap(),
                changed.len() as u64,
                Some(&index),
                &control,
            )
            .unwrap();
        writer.add_disk("vda", None, None, object).unwrap();
        let second = writer.commit(&control).unwrap();
        let now = disk::entries(&store, &second.disks[0].index).unwrap();
        let report = disk::make_equal(
            &store,
            "vda",
            &raw,
            "raw",
            &index,
            disk::Current::Known(now, ComparedBy::SafetyCheckpoint),
            None,
            dir.path(),
            &control,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(report.chunks_written, 2, "{report:?}");
        assert_eq!(
            report.bytes_written,
            2 * (64 << 10),
            "one piece each: {report:?}"
        );
        assert!(
            std::fs::read(&raw).unwrap() == content,
            "restored disk differs"
        );
        // Compared by reading and hashing, a disk that holds the patches' content is equal
        // to them (their names are not their content's, the content they name is).
        std::fs::write(&raw, &changed).unwrap();
        let again = disk::make_equal(
            &store,
            "vda",
            &raw,
            "raw",
            &second.disks[0].index,
            disk::Current::Unknown,
            None,
            dir.path(),
            &control,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(again.compared_by, ComparedBy::Hashing);
        assert_eq!(again.chunks_written, 0, "{again:?}");
    }

    /// Copies of one chunk at several places are decoded once and written to each.
    #[test]
    fn an_export_writes_every_copy_of_a_repeated_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = |seed: u8| -> Vec<u8> {
            let mut out = vec![0; CHUNK];
            blake3::Hasher::new()
                .update(&[seed])
                .finalize_xof()
                .fill(&mut out);
            out
        };
        let (a, b, c) = (chunk(1), chunk(2), chunk(3));
        let mut content = Vec::new();
        for part in [&a, &b, &a, &vec![0; CHUNK], &b, &a, &c, &a, &b] {
            content.extend_from_slice(part);
        }
        content.extend_from_slice(&a[..CHUNK / 2]); // a shorter last slot
        let (store, _) = checkpointed(dir.path(), &content);
        for progress in exports_equal(&store, dir.path(), &content) {
            // Eight and a half chunks of data (the zeros are a hole), each counted once.
            let data_bytes = (8 * CHUNK + CHUNK / 2) as u64;
            assert_eq!(progress, (data_bytes, data_bytes));
        }
    }

    /// Exports disk `vda` of the store's checkpoint as qcow2 and as raw, and checks that
    /// each reads back as `content` (the qcow2 one through `qemu-img`); returns the progress
    /// each export reported.
    fn exports_equal(store: &Store, dir: &Path, content: &[u8]) -> Vec<(u64, u64)> {
        let m = store.catalog().unwrap().checkpoints.pop().unwrap();
        [ImageFormat::Qcow2, ImageFormat::Raw]
            .into_iter()
            .map(|format| {
                let out = dir.join(format!("export.{}", format.name()));
                let control = Control::new();
                let written = export_disk(store, &m, "vda", &out, format, &control).unwrap();
                assert_eq!(written, m.disks[0].index.data_bytes);
                let back = match format {
                    ImageFormat::Qcow2 => qcow2_bytes(&out, dir),
                    ImageFormat::Raw => std::fs::read(&out).unwrap(),
                };
                assert!(back == content, "{} export differs", format.name());
                control.progress_bytes()
            })
            .collect()
    }

    /// Chunks of several pieces with zero pieces between and at their ends: each run of
    /// pieces with data is written where it belongs, in both formats, and a disk whose
    /// size is no whole number of pieces keeps its short last piece.
    #[test]
    fn an_export_writes_runs_of_pieces_around_zero_pieces() {
        const CHUNK_4: usize = 4 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let mut content = vec![0; 6 * CHUNK_4 + 3 * CHUNK + 4096];
        blake3::Hasher::new()
            .update(b"runs")
            .finalize_xof()
            .fill(&mut content);
        // Zero pieces: a chunk's first, its last, two in the middle of one, a whole chunk.
        for piece in [0, 7, 9, 10, 12, 13, 14, 15, 25] {
            content[piece * CHUNK..(piece + 1) * CHUNK].fill(0);
        }
        let (store, _) = checkpointed_in_chunks(dir.path(), &content, CHUNK_4);
        exports_equal(&store, dir.path(), &content);
    }

    #[test]
    fn a_damaged_chunk_stops_the_write_and_names_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..8 * CHUNK)
            .map(|i| u8::try_from(i % 241).unwrap())
            .collect();
        let (store, index) = checkpointed(dir.path(), &content);
        let bad = disk::entries(&store, &index).unwrap()[2];
        let path = store.chunk_path(&bad);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let out = dir.path().join("export.qcow2");
        let m = store.catalog().unwrap().checkpoints.pop().unwrap();
        let err =
            export_disk(&store, &m, "vda", &out, ImageFormat::Qcow2, &Control::new()).unwrap_err();
        assert!(err.to_string().contains(&bad.to_hex()), "{err}");
        assert!(!out.exists(), "the half-written image is removed");
    }

    /// The names in `folder`.
    fn names_in(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// An export for a user, by root, goes only into a new file in the folder that user was
    /// checked for, whatever links they put in the way, before or while it runs.
    #[test]
    fn an_export_for_a_user_writes_only_into_the_folder_checked_whatever_links_they_make() {
        use std::os::unix::fs::{MetadataExt as _, symlink};
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let user = (65534, 65534); // nobody, nogroup
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..8 * CHUNK)
            .map(|i| u8::try_from(i % 239).unwrap())
            .collect();
        let (store, index) = checkpointed(dir.path(), &content);
        let m = store.catalog().unwrap().checkpoints.pop().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(user.0), Some(user.1)).unwrap();
        // Root's: where a link would have root write.
        let roots = dir.path().join("roots");
        std::fs::create_dir(&roots).unwrap();
        let victim = roots.join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        let export = |out: &Path| {
            export_disk_for(
                &store,
                &m,
                "vda",
                out,
                ImageFormat::Qcow2,
                Some(user),
                &Control::new(),
            )
        };

        // A link at `out`: refused, and not followed.
        symlink(&victim, theirs.join("link.qcow2")).unwrap();
        let err = export(&theirs.join("link.qcow2")).unwrap_err();
        assert!(matches!(err, RestoreError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's");
        assert_eq!(names_in(&theirs), ["link.qcow2"]);

        // `out`'s folder a link (to root's folder): refused, with what to do.
        symlink(&roots, theirs.join("up")).unwrap();
        let err = export(&theirs.join("up/new.qcow2")).unwrap_err();
        assert!(
            err.to_string().contains("choose the folder it points to"),
            "{err}"
        );
        // Through a link above it, root's folder is still root's: refused as the user.
        let err = export(&theirs.join("up/../roots/new.qcow2")).unwrap_err();
        assert!(
            err.to_string().contains("choose a folder of yours"),
            "{err}"
        );
        assert_eq!(names_in(&roots), ["victim"]);

        // The folder swapped for a link to root's folder once it is open: the image lands in
        // the folder opened (where the user moved it), as theirs, and nothing where the
        // link points.
        let folder = crate::files::restore::open_target(&theirs, Some(user), true, "").unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&theirs, &moved).unwrap();
        symlink(&roots, &theirs).unwrap();
        let out = theirs.join("swapped.qcow2");
        let written = export_into(
            &store,
            &index,
            "vda",
            folder.as_fd(),
            std::ffi::OsStr::new("swapped.qcow2"),
            &out,
            ImageFormat::Qcow2,
            Some(user),
            &Control::new(),
        )
        .unwrap();
        assert_eq!(written, index.data_bytes);
        assert_eq!(names_in(&roots), ["victim"]);
        assert_eq!(names_in(&moved), ["link.qcow2", "swapped.qcow2", "up"]);
        let meta = std::fs::metadata(moved.join("swapped.qcow2")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), user);
        assert!(qcow2_bytes(&moved.join("swapped.qcow2"), dir.path()) == content);

        // A cancelled export leaves nothing, not even its temporary folder.
        let cancelled = Control::new();
        cancelled.cancel();
        export_into(
            &store,
            &index,
            "vda",
            folder.as_fd(),
            std::ffi::OsStr::new("cancelled.qcow2"),
            &out,
            ImageFormat::Raw,
            Some(user),
            &cancelled,
        )
        .unwrap_err();
        assert_eq!(names_in(&moved), ["link.qcow2", "swapped.qcow2", "up"]);
    }

    /// Exporting as oneself (no service) through a link to a folder lands where it points,
    /// as before; nothing else is left there.
    #[test]
    fn an_export_as_oneself_goes_through_a_link_to_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..4 * CHUNK)
            .map(|i| u8::try_from(i % 233).unwrap())
            .collect();
        let (store, _) = checkpointed(dir.path(), &content);
        let m = store.catalog().unwrap().checkpoints.pop().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let out = dir.path().join("link/new/disk.raw");
        export_disk(&store, &m, "vda", &out, ImageFormat::Raw, &Control::new()).unwrap();
        assert_eq!(names_in(&real.join("new")), ["disk.raw"]);
        assert!(std::fs::read(real.join("new/disk.raw")).unwrap() == content);
    }
}
