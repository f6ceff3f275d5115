//! Getting data back out of a store. So far: exporting one disk of a checkpoint as a
//! standalone image (`rewind export`), for users who want to open it with other tools.
//! Every chunk is checked against its hash as it is read, so a damaged store gives an
//! error, never a silently wrong image.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::nbd::{NbdClient, NbdError};
use crate::progress::Control;
use crate::qemu_nbd::QemuNbd;
use crate::store::{Manifest, Store, StoreError};

/// The format of an exported image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What can go wrong while exporting.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// Writing the output.
    #[error("could not write {}: {detail}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// Writes disk `target` of checkpoint `m` to a new file `out` in `format`; returns the bytes
/// of data written (holes are not written). Nothing is left at `out` if it fails or is
/// cancelled.
pub fn export_disk(
    store: &Store,
    m: &Manifest,
    target: &str,
    out: &Path,
    format: ImageFormat,
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
    if out.exists() {
        return Err(RestoreError::Exists(out.to_path_buf()));
    }
    let write_err = |detail: String| RestoreError::Write {
        path: out.to_path_buf(),
        detail,
    };
    let result = match format {
        ImageFormat::Raw => export_raw(store, &disk.index, out, control, &write_err),
        ImageFormat::Qcow2 => export_qcow2(store, &disk.index, out, control, &write_err),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

fn export_raw(
    store: &Store,
    index: &crate::store::ObjectIndex,
    out: &Path,
    control: &Control,
    write_err: &dyn Fn(String) -> RestoreError,
) -> Result<u64, RestoreError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| write_err(e.to_string()))?;
    store.object_reader(index)?.write_to_file(&file, control)?;
    file.sync_all().map_err(|e| write_err(e.to_string()))?;
    Ok(index.data_bytes)
}

fn export_qcow2(
    store: &Store,
    index: &crate::store::ObjectIndex,
    out: &Path,
    control: &Control,
    write_err: &dyn Fn(String) -> RestoreError,
) -> Result<u64, RestoreError> {
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(out)
        .arg(index.size_bytes.to_string())
        .output()
        .map_err(|e| write_err(format!("could not run qemu-img: {e}; install qemu-utils")))?;
    if !created.status.success() {
        return Err(write_err(
            String::from_utf8_lossy(&created.stderr).trim().to_owned(),
        ));
    }
    // qemu-nbd writes the qcow2: QEMU's own code for the format.
    with_writable_export(out, ImageFormat::Qcow2, write_err, |nbd| {
        let nbd_err = |e: NbdError| write_err(e.to_string());
        let mut reader = store.object_reader(index)?;
        let chunk = u64::from(index.chunk_size_bytes);
        control.add_total_bytes(index.size_bytes);
        for i in 0..reader.chunk_count() {
            control.check().map_err(StoreError::from)?;
            if reader.entry(i)? != crate::store::index::HOLE {
                let data = reader.read(i)?;
                nbd.write_at(i * chunk, &data).map_err(nbd_err)?;
            }
            control.add_done_bytes(index.chunk_len(i));
        }
        nbd.flush().map_err(nbd_err)?;
        Ok(index.data_bytes)
    })
}

/// Serves `file` with a writable `qemu-nbd` on a socket in a private folder of this process
/// and runs `f` with a client connected to it; the server and folder go afterwards.
fn with_writable_export<T>(
    file: &Path,
    format: ImageFormat,
    write_err: &dyn Fn(String) -> RestoreError,
    f: impl FnOnce(&mut NbdClient) -> Result<T, RestoreError>,
) -> Result<T, RestoreError> {
    let dir = std::env::temp_dir().join(format!(
        "rewind-nbd-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir(&dir).map_err(|e| write_err(e.to_string()))?;
    let result = (|| {
        let socket = dir.join("nbd.sock");
        let file_str = file
            .to_str()
            .ok_or_else(|| write_err("the path is not UTF-8".into()))?;
        let _server = QemuNbd::serve(file_str, Some(format.name()), "disk", &socket, true)
            .map_err(write_err)?;
        let mut nbd =
            NbdClient::connect(&socket, "disk", &[]).map_err(|e| write_err(e.to_string()))?;
        let value = f(&mut nbd)?;
        nbd.close().map_err(|e| write_err(e.to_string()))?;
        Ok(value)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What writing a disk back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskRestore {
    /// Chunk slots compared.
    pub chunks_checked: u64,
    /// Chunk slots that differed and were written.
    pub chunks_written: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
}

/// Delta restore of one disk file that no VM has open: makes `file` (format `format`) hold
/// exactly the object `index`, comparing chunk by chunk (hashing what is there) and writing
/// only the chunks that differ, then reads everything back and checks it against the
/// checkpoint before returning. The disk must have the checkpoint's size.
pub fn restore_disk_in_place(
    store: &Store,
    index: &crate::store::ObjectIndex,
    file: &Path,
    format: ImageFormat,
    control: &Control,
) -> Result<DiskRestore, RestoreError> {
    let write_err = |detail: String| RestoreError::Write {
        path: file.to_path_buf(),
        detail,
    };
    with_writable_export(file, format, &write_err, |nbd| {
        let nbd_err = |e: NbdError| write_err(e.to_string());
        if nbd.size_bytes() != index.size_bytes {
            return Err(write_err(format!(
                "it is {} bytes, the checkpoint's disk {} bytes; restore it as a new VM instead",
                nbd.size_bytes(),
                index.size_bytes
            )));
        }
        let mut reader = store.object_reader(index)?;
        let chunk = u64::from(index.chunk_size_bytes);
        let mut report = DiskRestore::default();
        let mut current = vec![0u8; index.chunk_size_bytes as usize];
        control.add_total_bytes(2 * index.size_bytes);
        // Pass 1 writes what differs; pass 2 checks every chunk against the checkpoint.
        for verify in [false, true] {
            for i in 0..reader.chunk_count() {
                control.check().map_err(StoreError::from)?;
                let len = usize::try_from(index.chunk_len(i)).expect("chunk fits memory");
                let here = &mut current[..len];
                nbd.read_at(i * chunk, here).map_err(nbd_err)?;
                let wanted = reader.entry(i)?;
                let same = if wanted == crate::store::index::HOLE {
                    here.iter().all(|&b| b == 0)
                } else {
                    store.chunk_id(here) == wanted
                };
                control.add_done_bytes(len as u64);
                match (same, verify) {
                    (true, _) => {}
                    (false, true) => {
                        return Err(write_err(format!(
                            "chunk {i} (at byte {}) does not read back as the checkpoint has it",
                            i * chunk
                        )));
                    }
                    (false, false) => {
                        let data = if wanted == crate::store::index::HOLE {
                            vec![0; len]
                        } else {
                            reader.read(i)?
                        };
                        nbd.write_at(i * chunk, &data).map_err(nbd_err)?;
                        report.chunks_written += 1;
                        report.bytes_written += len as u64;
                    }
                }
                if !verify {
                    report.chunks_checked += 1;
                }
            }
            if !verify {
                nbd.flush().map_err(nbd_err)?;
            }
        }
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        CheckpointKind, Consistency, InitOptions, KdfCost, NewCheckpoint, ObjectIndex, VmRef,
    };
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
        let options = InitOptions {
            chunk_size_bytes: u32::try_from(CHUNK).unwrap(),
            passphrase: None,
            kdf_cost: KdfCost::FAST_FOR_TESTS,
        };
        let store = Store::init(&dir.join("store"), &options).unwrap();
        let image = dir.join("original.raw");
        std::fs::write(&image, content).unwrap();
        let control = Control::new();
        let new = NewCheckpoint {
            vm: VmRef {
                name: "t".into(),
                uuid: uuid::Uuid::from_bytes([3; 16]),
            },
            time: chrono::Utc::now(),
            kind: CheckpointKind::Disk,
            consistency: Consistency::Crash,
            domain_xml: "<domain/>".into(),
            parent: None,
            full_reason: None,
            consistency_note: None,
            labels: vec![],
            libvirt_checkpoint: None,
        };
        let mut writer = store.begin_checkpoint(new, &control).unwrap();
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
        let _ = std::fs::remove_file(&raw);
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(&raw));
        std::fs::read(&raw).unwrap()
    }

    #[test]
    fn delta_restore_writes_only_what_differs_and_verifies_it() {
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
        let report =
            restore_disk_in_place(&store, &index, &disk, ImageFormat::Qcow2, &control).unwrap();
        assert_eq!(report.chunks_checked, 64);
        assert_eq!(report.chunks_written, 3, "{report:?}");
        assert_eq!(report.bytes_written, 3 * CHUNK as u64);
        assert!(
            qcow2_bytes(&disk, dir.path()) == content,
            "restored disk differs"
        );
        let again =
            restore_disk_in_place(&store, &index, &disk, ImageFormat::Qcow2, &control).unwrap();
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
        let report =
            restore_disk_in_place(&store, &index, &raw, ImageFormat::Raw, &control).unwrap();
        assert_eq!(report.chunks_written, 1);
        assert!(std::fs::read(&raw).unwrap() == content);

        // A disk of another size is refused, untouched.
        run(Command::new("qemu-img")
            .args(["resize", "-f", "qcow2"])
            .arg(&disk)
            .arg("+1M"));
        let err =
            restore_disk_in_place(&store, &index, &disk, ImageFormat::Qcow2, &control).unwrap_err();
        assert!(err.to_string().contains("as a new VM"), "{err}");
    }
}
