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
    // qemu-nbd writes the qcow2 (QEMU's own code for the format); its socket lives in a
    // private folder of this process.
    let dir = std::env::temp_dir().join(format!(
        "rewind-export-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir(&dir).map_err(|e| write_err(e.to_string()))?;
    let result = (|| {
        let socket = dir.join("nbd.sock");
        let out_str = out
            .to_str()
            .ok_or_else(|| write_err("the path is not UTF-8".into()))?;
        let _server =
            QemuNbd::serve(out_str, Some("qcow2"), "disk", &socket, true).map_err(write_err)?;
        let nbd_err = |e: NbdError| write_err(e.to_string());
        let mut nbd = NbdClient::connect(&socket, "disk", &[]).map_err(nbd_err)?;
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
        nbd.close().map_err(nbd_err)?;
        Ok(index.data_bytes)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
