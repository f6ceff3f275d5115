//! Writing a checkpoint's disk into an image file that no VM has open, through a writable
//! `qemu-nbd` (QEMU's own code handles qcow2, raw and backing files, and records the writes
//! in the image's persistent dirty bitmaps, so every store's chain of incrementals stays
//! true).
//!
//! A restore compares before it writes: it knows, chunk by chunk, what the file holds now
//! (from a checkpoint just taken of it, or by hashing what is there, or because the file is
//! new) and writes only the chunks that differ. Then it reads every written chunk back and
//! checks it against the checkpoint's hash; the others are equal by that comparison.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::RestoreError;
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdError, STATE_HOLE, STATE_ZERO};
use crate::progress::Control;
use crate::qemu_nbd::{Access, QemuNbd};
use crate::store::index::HOLE;
use crate::store::{ChunkId, ChunkKind, ObjectIndex, Store, StoreError, for_each_slot};

/// How the current content of a disk was known before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComparedBy {
    /// A checkpoint of the disk taken just before (the safety checkpoint).
    SafetyCheckpoint,
    /// Every allocated chunk read and hashed.
    Hashing,
    /// The file was created by the restore: it held only zeros.
    NewFile,
}

/// What restoring one disk did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskRestore {
    /// Guest target (`vda`).
    pub target: String,
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: String,
    /// How the current content was known.
    pub compared_by: ComparedBy,
    /// Chunk slots of the disk.
    pub chunks: u64,
    /// Chunk slots that differed and were written.
    pub chunks_written: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Chunk slots read back and found as the checkpoint has them.
    pub chunks_verified: u64,
}

/// Every slot's chunk id of `index`.
pub(crate) fn entries(store: &Store, index: &ObjectIndex) -> Result<Vec<ChunkId>, StoreError> {
    let mut out = Vec::with_capacity(usize::try_from(index.chunk_count()).unwrap_or(0));
    for page in 0..index.page_count() {
        out.extend(store.read_page(index, page)?);
    }
    Ok(out)
}

/// An image file served by a writable `qemu-nbd`, with one connection per worker.
pub(crate) struct DiskSession {
    path: PathBuf,
    clients: Vec<NbdClient>,
    size_bytes: u64,
    // Dropped after the clients: the server goes last, then its folder.
    _server: QemuNbd,
    dir: PathBuf,
}

impl Drop for DiskSession {
    fn drop(&mut self) {
        self.clients.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nbd_failed(path: &Path, e: &NbdError) -> RestoreError {
    RestoreError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

impl DiskSession {
    /// Serves `file` (format `format`) for writing; the socket goes in a private folder of
    /// this process under `work_dir`.
    pub(crate) fn open(file: &Path, format: &str, work_dir: &Path) -> Result<Self, RestoreError> {
        let write_err = |detail: String| RestoreError::Write {
            path: file.to_path_buf(),
            detail,
        };
        let dir = work_dir.join(format!(
            "rewind-nbd-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir(&dir).map_err(|e| write_err(e.to_string()))?;
        let opened = (|| {
            let socket = dir.join("nbd.sock");
            let file_str = file
                .to_str()
                .ok_or_else(|| write_err("the path is not UTF-8".into()))?;
            let server = QemuNbd::serve(file_str, Some(format), "disk", &socket, Access::Writable)
                .map_err(write_err)?;
            let mut clients = Vec::new();
            for _ in 0..crate::store::reader_count() {
                clients.push(
                    NbdClient::connect(&socket, "disk", &[BASE_ALLOCATION])
                        .map_err(|e| nbd_failed(file, &e))?,
                );
            }
            let size_bytes = clients[0].size_bytes();
            Ok((server, clients, size_bytes))
        })();
        match opened {
            Ok((server, clients, size_bytes)) => Ok(Self {
                path: file.to_path_buf(),
                clients,
                size_bytes,
                _server: server,
                dir,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The image's guest-visible size.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// What the image holds now, chunk by chunk: unallocated slots are holes without being
    /// read; the others are read and hashed (all-zero slots count as holes, as in the store).
    pub(crate) fn scan(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        control: &Control,
    ) -> Result<Vec<ChunkId>, RestoreError> {
        let chunk = u64::from(index.chunk_size_bytes);
        let path = self.path.clone();
        let mut ids = vec![HOLE; usize::try_from(index.chunk_count()).unwrap_or(0)];
        let mut slots: Vec<u64> = Vec::new();
        let extents = self.clients[0]
            .block_status(BASE_ALLOCATION, 0, self.size_bytes)
            .map_err(|e| nbd_failed(&path, &e))?;
        for e in extents {
            if e.length > 0 && e.flags & (STATE_HOLE | STATE_ZERO) == 0 {
                let (first, last) = (e.offset / chunk, (e.end() - 1) / chunk);
                let from = if slots.last() == Some(&first) {
                    first + 1
                } else {
                    first
                };
                slots.extend(from..=last);
            }
        }
        let lens = lens(index, &slots);
        control.add_total_bytes(lens.iter().map(|&l| l as u64).sum());
        let workers: Vec<_> = self
            .clients
            .iter_mut()
            .map(|client| {
                let path = &path;
                move |i: u64, buf: &mut Vec<u8>| -> Result<ChunkId, RestoreError> {
                    client
                        .read_at(i * chunk, buf)
                        .map_err(|e| nbd_failed(path, &e))?;
                    Ok(if buf.iter().all(|&b| b == 0) {
                        HOLE
                    } else {
                        store.chunk_id(buf)
                    })
                }
            })
            .collect();
        for_each_slot(&slots, &lens, control, workers, |i, id| {
            ids[usize::try_from(i).expect("slot fits")] = id;
            Ok(())
        })?;
        Ok(ids)
    }

    /// Writes the checkpoint's content of every slot in `slots` (zeros for holes, which
    /// become holes in the image). Each slot written is pushed to `written` as it
    /// completes, so that a caller can undo a write cut short.
    pub(crate) fn write(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        wanted: &[ChunkId],
        slots: &[u64],
        control: &Control,
        written: &mut Vec<u64>,
    ) -> Result<u64, RestoreError> {
        let chunk = u64::from(index.chunk_size_bytes);
        let path = self.path.clone();
        let lens = lens(index, slots);
        control.add_total_bytes(lens.iter().map(|&l| l as u64).sum());
        let workers: Vec<_> = self
            .clients
            .iter_mut()
            .map(|client| {
                let path = &path;
                move |i: u64, buf: &mut Vec<u8>| -> Result<u64, RestoreError> {
                    let id = wanted[usize::try_from(i).expect("slot fits")];
                    // `buf` comes zeroed: a hole is written as zeros.
                    let data = if id == HOLE {
                        std::mem::take(buf)
                    } else {
                        store.read_chunk(&id, ChunkKind::Data)?
                    };
                    if data.len() != usize::try_from(index.chunk_len(i)).expect("fits") {
                        return Err(StoreError::Damaged {
                            path: store.chunk_path(&id),
                            detail: format!(
                                "{} bytes where slot {i} needs {}",
                                data.len(),
                                index.chunk_len(i)
                            ),
                            store: store.root().to_path_buf(),
                        }
                        .into());
                    }
                    client
                        .write_at(i * chunk, &data)
                        .map_err(|e| nbd_failed(path, &e))?;
                    if id == HOLE {
                        *buf = data;
                    }
                    Ok(index.chunk_len(i))
                }
            })
            .collect();
        let mut bytes = 0;
        let result = for_each_slot(slots, &lens, control, workers, |i, len| {
            written.push(i);
            bytes += len;
            Ok(())
        });
        // Whatever was written, it is made durable before anything else happens.
        let flushed = self.flush();
        result?;
        flushed?;
        Ok(bytes)
    }

    fn flush(&mut self) -> Result<(), RestoreError> {
        for client in &mut self.clients {
            client.flush().map_err(|e| nbd_failed(&self.path, &e))?;
        }
        Ok(())
    }

    /// Reads every slot in `slots` back and checks it against `wanted`.
    pub(crate) fn verify(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        wanted: &[ChunkId],
        slots: &[u64],
        control: &Control,
    ) -> Result<(), RestoreError> {
        let chunk = u64::from(index.chunk_size_bytes);
        let path = self.path.clone();
        let lens = lens(index, slots);
        control.add_total_bytes(lens.iter().map(|&l| l as u64).sum());
        let workers: Vec<_> = self
            .clients
            .iter_mut()
            .map(|client| {
                let path = &path;
                move |i: u64, buf: &mut Vec<u8>| -> Result<(), RestoreError> {
                    client
                        .read_at(i * chunk, buf)
                        .map_err(|e| nbd_failed(path, &e))?;
                    let id = wanted[usize::try_from(i).expect("slot fits")];
                    let same = if id == HOLE {
                        buf.iter().all(|&b| b == 0)
                    } else {
                        store.chunk_id(buf) == id
                    };
                    if same {
                        Ok(())
                    } else {
                        Err(RestoreError::Verify {
                            path: path.clone(),
                            detail: format!(
                                "chunk {i} (bytes {} to {}) does not read back as the checkpoint has it",
                                i * chunk,
                                i * chunk + buf.len() as u64
                            ),
                        })
                    }
                }
            })
            .collect();
        for_each_slot(slots, &lens, control, workers, |_, ()| Ok(()))
    }
}

fn lens(index: &ObjectIndex, slots: &[u64]) -> Vec<usize> {
    slots
        .iter()
        .map(|&i| usize::try_from(index.chunk_len(i)).expect("chunk fits memory"))
        .collect()
}

/// The slots where `current` and `wanted` differ.
pub(crate) fn differing(current: &[ChunkId], wanted: &[ChunkId]) -> Vec<u64> {
    wanted
        .iter()
        .zip(current)
        .enumerate()
        .filter(|(_, (w, c))| w != c)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Makes `file` (format `format`, the checkpoint's size) hold exactly `index`: compares with
/// `current` (what the file holds, chunk by chunk, or `None` to hash it), writes what
/// differs, reads it back. `written` collects the slots written, for an undo.
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_equal(
    store: &Store,
    target: &str,
    file: &Path,
    format: &str,
    index: &ObjectIndex,
    current: Option<(Vec<ChunkId>, ComparedBy)>,
    work_dir: &Path,
    control: &Control,
    written: &mut Vec<u64>,
) -> Result<DiskRestore, RestoreError> {
    let wanted = entries(store, index)?;
    let mut session = DiskSession::open(file, format, work_dir)?;
    if session.size_bytes() != index.size_bytes {
        return Err(RestoreError::Write {
            path: file.to_path_buf(),
            detail: format!(
                "it is {} bytes, the checkpoint's disk {} bytes",
                session.size_bytes(),
                index.size_bytes
            ),
        });
    }
    let (current, compared_by) = match current {
        Some(known) => known,
        None => (session.scan(store, index, control)?, ComparedBy::Hashing),
    };
    if current.len() != wanted.len() {
        return Err(RestoreError::Invalid(format!(
            "disk {target}: the current content is known for {} chunks, the checkpoint has {}",
            current.len(),
            wanted.len()
        )));
    }
    let slots = differing(&current, &wanted);
    let bytes_written = session.write(store, index, &wanted, &slots, control, written)?;
    session.verify(store, index, &wanted, &slots, control)?;
    Ok(DiskRestore {
        target: target.to_owned(),
        path: file.to_path_buf(),
        format: format.to_owned(),
        compared_by,
        chunks: index.chunk_count(),
        chunks_written: slots.len() as u64,
        bytes_written,
        chunks_verified: slots.len() as u64,
    })
}

/// Creates an empty image of `size_bytes` at `path` (format `qcow2` or `raw`), with its
/// folder; refuses to replace a file.
pub(crate) fn create_image(path: &Path, format: &str, size_bytes: u64) -> Result<(), RestoreError> {
    let write_err = |detail: String| RestoreError::Write {
        path: path.to_path_buf(),
        detail,
    };
    if path.exists() {
        return Err(RestoreError::Exists(path.to_path_buf()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| write_err(format!("could not create its folder: {e}")))?;
    }
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size_bytes.to_string())
        .output()
        .map_err(|e| write_err(format!("could not run qemu-img: {e}; install qemu-utils")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(write_err(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Sets the guest-visible size of the image `path` (the VM is off; shrinking drops what is
/// beyond the new end, which a safety checkpoint holds).
pub(crate) fn resize_image(path: &Path, format: &str, size_bytes: u64) -> Result<(), RestoreError> {
    let out = std::process::Command::new("qemu-img")
        .args(["resize", "-q", "--shrink", "-f", format])
        .arg(path)
        .arg(size_bytes.to_string())
        .output()
        .map_err(|e| RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!("could not run qemu-img: {e}; install qemu-utils"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!(
                "could not give it the checkpoint's size: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}
