//! Writing a checkpoint's disk into an image file that no VM has open, through a writable
//! `qemu-nbd` (QEMU's own code handles qcow2, raw and backing files, and records the writes
//! in the image's persistent dirty bitmaps, so every store's chain of incrementals stays
//! true).
//!
//! A restore compares before it writes: it knows, chunk by chunk, what the file holds now
//! (from a checkpoint just taken of it; from the image's persistent dirty bitmap of an
//! earlier checkpoint — outside the extents it marks, the image still holds that
//! checkpoint's chunks, so nothing needs reading; by hashing everything; or because the file
//! is new) and writes only the chunks that differ. Where the restored chunk is the bitmap's
//! checkpoint's, only the dirty extents inside it are written (the rest of the chunk already
//! holds those bytes, as every incremental of that chain trusts) — and only the 64 KiB
//! pieces of the stored chunk that those extents touch are read from the store and checked
//! against the chunk's piece tree, where it has one (`FORMAT.md`, "Piece trees").
//! Everything written is read back at once and compared with the checkpoint's bytes (whose
//! hash was checked as they came out of the store); the chunks not written are equal by
//! the comparison.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::RestoreError;
use crate::progress::Control;
use crate::qemu_nbd::{Access, QemuNbd};
use crate::store::index::HOLE;
use crate::store::{ChunkId, ObjectIndex, Store, StoreError, for_each_slot};
use rewind_nbd::{BASE_ALLOCATION, NbdClient, NbdError, STATE_HOLE, STATE_ZERO};

/// How the current content of a disk was known before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComparedBy {
    /// A checkpoint of the disk taken just before (the safety checkpoint).
    SafetyCheckpoint,
    /// The dirty bitmap of an earlier checkpoint in the image: nothing was read to
    /// compare; the chunks it marks were written (their dirty extents), and the others
    /// where that checkpoint differs from the restored one.
    DirtyBitmap,
    /// Every allocated chunk read and hashed.
    Hashing,
    /// The file was created by the restore: it held only zeros.
    NewFile,
}

/// What restoring one disk did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

/// What an image is known to hold before anything of it is read.
#[derive(Debug)]
pub(crate) enum Current {
    /// Exactly these chunks: a checkpoint of the image just taken, or a new, empty file.
    Known(Vec<ChunkId>, ComparedBy),
    /// Not known: found by reading (from the dirty bitmap if there is one, else all).
    Unknown,
}

/// A persistent dirty bitmap in the image, created with the libvirt checkpoint of `base`:
/// outside the extents it marks, the image holds exactly `base`'s chunks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Since<'a> {
    /// The bitmap's name.
    pub bitmap: &'a str,
    /// The disk's index in the checkpoint the bitmap counts from.
    pub base: &'a ObjectIndex,
}

/// Every slot's chunk id of `index`.
pub(crate) fn entries(store: &Store, index: &ObjectIndex) -> Result<Vec<ChunkId>, StoreError> {
    let mut out = Vec::with_capacity(usize::try_from(index.chunk_count()).unwrap_or(0));
    for page in 0..index.page_count() {
        out.extend(store.read_page(index, page)?);
    }
    Ok(out)
}

/// Every slot's chunk id of `index`, and its chain of bases (empty but for patches, see
/// `FORMAT.md`).
pub(crate) fn entries_and_chains(
    store: &Store,
    index: &ObjectIndex,
) -> Result<(Vec<ChunkId>, Vec<Vec<ChunkId>>), StoreError> {
    let slots = usize::try_from(index.chunk_count()).unwrap_or(0);
    let (mut ids, mut chains) = (Vec::with_capacity(slots), Vec::with_capacity(slots));
    for page in 0..index.page_count() {
        let page = store.read_page_with_bases(index, page)?;
        ids.extend(page.ids);
        chains.extend(page.chains);
    }
    Ok((ids, chains))
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
        crate::cleanup::remove_dir_all(&self.dir);
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
    pub(crate) fn open(
        file: &Path,
        format: &str,
        access: Access<'_>,
        work_dir: &Path,
    ) -> Result<Self, RestoreError> {
        let (Access::ReadOnly { bitmap } | Access::Writable { bitmap }) = access;
        let write_err = |detail: String| RestoreError::Write {
            path: file.to_path_buf(),
            detail,
        };
        // Short: the socket's whole path must fit the 107 bytes a Unix socket address
        // allows, and `work_dir` is this process's own already.
        let dir = work_dir.join(format!(
            "nbd-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir(&dir).map_err(|e| write_err(e.to_string()))?;
        let opened = (|| {
            let socket = dir.join("nbd.sock");
            let file_str = file
                .to_str()
                .ok_or_else(|| write_err("the path is not UTF-8".into()))?;
            let server = QemuNbd::serve(file_str, Some(format), "disk", &socket, access)
                .map_err(|e| write_err(e.to_string()))?;
            let context = bitmap.map(rewind_nbd::dirty_bitmap_context);
            let mut contexts = vec![BASE_ALLOCATION];
            contexts.extend(context.as_deref());
            let mut clients = Vec::new();
            for _ in 0..crate::store::reader_count() {
                clients.push(
                    NbdClient::connect(&socket, "disk", &contexts)
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
                crate::cleanup::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The image's guest-visible size.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The extents of the image's dirty bitmap `bitmap` (written since it was created).
    pub(crate) fn dirty_extents(&mut self, bitmap: &str) -> Result<Vec<(u64, u64)>, RestoreError> {
        let context = rewind_nbd::dirty_bitmap_context(bitmap);
        let extents = self.clients[0]
            .block_status(&context, 0, self.size_bytes)
            .map_err(|e| nbd_failed(&self.path, &e))?;
        Ok(extents
            .into_iter()
            .filter(|e| e.flags & rewind_nbd::STATE_DIRTY != 0 && e.length > 0)
            .map(|e| (e.offset, e.end()))
            .collect())
    }

    /// The slots the allocated (non-hole, non-zero) extents of the image touch.
    fn allocated_slots(&mut self, chunk: u64) -> Result<Vec<u64>, RestoreError> {
        let extents = self.clients[0]
            .block_status(BASE_ALLOCATION, 0, self.size_bytes)
            .map_err(|e| nbd_failed(&self.path, &e))?;
        Ok(slots_of(
            extents
                .into_iter()
                .filter(|e| e.length > 0 && e.flags & (STATE_HOLE | STATE_ZERO) == 0)
                .map(|e| (e.offset, e.end())),
            chunk,
        ))
    }

    /// Reads and hashes every allocated chunk slot: the content's chunk id of each slot
    /// (holes for the others), as [`DiskSession::hash_slots`].
    fn hash_allocated(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        control: &Control,
    ) -> Result<Vec<ChunkId>, RestoreError> {
        let mut ids = vec![HOLE; usize::try_from(index.chunk_count()).expect("slots fit memory")];
        let allocated = self.allocated_slots(u64::from(index.chunk_size_bytes))?;
        self.hash_slots(store, index, &allocated, &mut ids, control)?;
        Ok(ids)
    }

    /// Reads and hashes the chunks in `slots` (all-zero ones count as holes, as in the
    /// store), setting them in `ids`.
    fn hash_slots(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        slots: &[u64],
        ids: &mut [ChunkId],
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
        for_each_slot(slots, &lens, control, workers, |i, id| {
            ids[usize::try_from(i).expect("slot fits")] = id;
            Ok(())
        })
    }

    /// Writes the checkpoint's content of every slot in `slots` (zeros for holes, which
    /// become holes in the image) — only the byte ranges `partial` names for a slot, the
    /// whole chunk for the others — and reads what it wrote straight back, comparing it
    /// with the checkpoint's bytes (the rest of a partly written chunk is the bitmap's
    /// checkpoint's, as every incremental of that chain trusts). Each slot done is pushed to `written`, so that a caller can
    /// undo a write cut short. Flushes at the end, also after an error.
    pub(crate) fn write(
        &mut self,
        store: &Store,
        index: &ObjectIndex,
        plan: &WritePlan<'_>,
        control: &Control,
        written: &mut Vec<u64>,
    ) -> Result<u64, RestoreError> {
        let WritePlan {
            wanted,
            chains,
            slots,
            partial,
        } = *plan;
        if slots.is_empty() {
            return Ok(0);
        }
        let chunk = u64::from(index.chunk_size_bytes);
        let path = self.path.clone();
        let lens = lens(index, slots);
        control.add_total_bytes(lens.iter().map(|&l| l as u64).sum());
        let workers: Vec<_> = self
            .clients
            .iter_mut()
            .map(|client| {
                let path = &path;
                let mut back = Vec::new();
                move |i: u64, buf: &mut Vec<u8>| -> Result<u64, RestoreError> {
                    let slot = usize::try_from(i).expect("slot fits");
                    let (id, chain) = (wanted[slot], &chains[slot]);
                    let len = usize::try_from(index.chunk_len(i)).expect("fits");
                    let ranges = partial.get(&i);
                    // A hole is written as zeros (`buf` holds whatever its previous slot
                    // left). Where only some ranges are written, only the pieces of the
                    // chunk they touch are read and checked, into `buf`.
                    let data = match ranges {
                        _ if id == HOLE => {
                            buf.fill(0);
                            std::mem::take(buf)
                        }
                        Some(ranges) => {
                            store.read_entry_ranges(&id, chain, ranges, buf)?;
                            std::mem::take(buf)
                        }
                        None => store.read_entry(&id, chain)?,
                    };
                    if data.len() != len {
                        return Err(StoreError::Damaged {
                            path: store.chunk_path(&id),
                            detail: format!("{} bytes where slot {i} needs {len}", data.len()),
                            store: store.root().to_path_buf(),
                        }
                        .into());
                    }
                    let whole = [(0, len as u64)];
                    let ranges = ranges.map_or(&whole[..], Vec::as_slice);
                    let mut bytes = 0;
                    for &(from, to) in ranges {
                        let from = usize::try_from(from).expect("within a chunk");
                        let to = usize::try_from(to).expect("within a chunk");
                        let at = i * chunk + from as u64;
                        client
                            .write_at(at, &data[from..to])
                            .map_err(|e| nbd_failed(path, &e))?;
                        back.resize(to - from, 0);
                        client
                            .read_at(at, &mut back)
                            .map_err(|e| nbd_failed(path, &e))?;
                        if back != data[from..to] {
                            return Err(RestoreError::Verify {
                                path: path.clone(),
                                detail: format!(
                                    "bytes {at} to {} do not read back as written",
                                    at + (to - from) as u64
                                ),
                            });
                        }
                        bytes += (to - from) as u64;
                    }
                    if id == HOLE || partial.contains_key(&i) {
                        *buf = data;
                    }
                    Ok(bytes)
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
}

/// What [`DiskSession::write`] writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WritePlan<'a> {
    /// The checkpoint's chunk of every slot.
    pub wanted: &'a [ChunkId],
    /// Their chains of bases (empty but for patches).
    pub chains: &'a [Vec<ChunkId>],
    /// The slots to write, ascending.
    pub slots: &'a [u64],
    /// For some slots, the only byte ranges (inside the slot) to write.
    pub partial: &'a BTreeMap<u64, Vec<(u64, u64)>>,
}

/// The slots that byte ranges `[start, end)` touch, ascending, each once.
fn slots_of(ranges: impl IntoIterator<Item = (u64, u64)>, chunk: u64) -> Vec<u64> {
    let mut slots: Vec<u64> = Vec::new();
    for (start, end) in ranges {
        let (first, last) = (start / chunk, (end - 1) / chunk);
        let from = if slots.last().is_some_and(|&l| l >= first) {
            slots.last().expect("checked") + 1
        } else {
            first
        };
        slots.extend(from..=last);
    }
    slots
}

/// For each slot the dirty `extents` touch, the byte ranges inside it (relative to its
/// start).
fn ranges_in_slots(extents: &[(u64, u64)], index: &ObjectIndex) -> BTreeMap<u64, Vec<(u64, u64)>> {
    let chunk = u64::from(index.chunk_size_bytes);
    let mut map: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for &(start, end) in extents {
        let end = end.min(index.size_bytes);
        let mut at = start;
        while at < end {
            let slot = at / chunk;
            let slot_end = ((slot + 1) * chunk).min(end);
            map.entry(slot)
                .or_default()
                .push((at - slot * chunk, slot_end - slot * chunk));
            at = slot_end;
        }
    }
    map
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

/// Byte ranges inside chunk slots, by slot.
type SlotRanges = BTreeMap<u64, Vec<(u64, u64)>>;

/// For each slot in `slots` that need not be written whole, the byte ranges that can
/// differ from `wanted` (sorted, apart). What the image holds is known as `known` (each
/// slot's entry), or as `dirty`: the entries of the checkpoint a dirty bitmap counts from,
/// and the ranges the bitmap marks since. Where the image's entry is a patch whose chain
/// of bases leads to the wanted one, only the pieces those patches hold can differ (plus
/// what the bitmap marks); where it is the wanted one, only what the bitmap marks.
fn partial_writes(
    store: &Store,
    slots: &[u64],
    wanted: &[ChunkId],
    known: Option<&[ChunkId]>,
    dirty: Option<(&[ChunkId], &SlotRanges)>,
) -> Result<SlotRanges, StoreError> {
    let piece = crate::store::PIECE_BYTES as u64;
    let mut out = BTreeMap::new();
    for &i in slots {
        let s = usize::try_from(i).expect("slot fits");
        let (current, since) = match (known, dirty) {
            (Some(ids), _) => (ids[s], None),
            (None, Some((base, ranges))) => (base[s], ranges.get(&i)),
            (None, None) => break,
        };
        if wanted[s] == HOLE || current == HOLE {
            continue;
        }
        let mut ranges: Vec<(u64, u64)> = since.cloned().unwrap_or_default();
        if current != wanted[s] {
            let Some(pieces) = store.pieces_above(&current, &wanted[s])? else {
                continue;
            };
            ranges.extend(
                pieces
                    .iter()
                    .map(|&k| (k as u64 * piece, (k as u64 + 1) * piece)),
            );
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (from, to) in ranges {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        if !merged.is_empty() {
            out.insert(i, merged);
        }
    }
    Ok(out)
}

/// Makes `file` (format `format`, the checkpoint's size) hold exactly `index`: works out
/// what differs from `current` (reading what it must, with `since`'s dirty bitmap if the
/// image has it), writes that and reads it back. `written` collects the slots written, for
/// an undo.
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_equal(
    store: &Store,
    target: &str,
    file: &Path,
    format: &str,
    index: &ObjectIndex,
    current: Current,
    since: Option<Since<'_>>,
    work_dir: &Path,
    control: &Control,
    written: &mut Vec<u64>,
) -> Result<DiskRestore, RestoreError> {
    let (wanted, chains) = entries_and_chains(store, index)?;
    // Known to be equal already (a disk the safety checkpoint shows unchanged): nothing to
    // open or write.
    if let Current::Known(ids, how) = &current
        && *ids == wanted
    {
        return Ok(DiskRestore {
            target: target.to_owned(),
            path: file.to_path_buf(),
            format: format.to_owned(),
            compared_by: *how,
            chunks: index.chunk_count(),
            chunks_written: 0,
            bytes_written: 0,
            chunks_verified: 0,
        });
    }
    let since = since.filter(|s| s.base.size_bytes == index.size_bytes);
    // A bitmap QEMU could not store when it stopped (it was killed) is inconsistent, and
    // qemu-nbd refuses it: then without.
    let (mut session, since) = match since {
        Some(s) => {
            let access = Access::Writable {
                bitmap: Some(s.bitmap),
            };
            match DiskSession::open(file, format, access, work_dir) {
                Ok(session) => (session, Some(s)),
                Err(_) => (DiskSession::open(file, format, WRITABLE, work_dir)?, None),
            }
        }
        None => (DiskSession::open(file, format, WRITABLE, work_dir)?, None),
    };
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
    let chunk = u64::from(index.chunk_size_bytes);
    let mut dirty = None;
    if let Some(s) = since {
        let extents = session.dirty_extents(s.bitmap)?;
        dirty = Some((
            entries(store, s.base)?,
            ranges_in_slots(&extents, index),
            extents,
        ));
    }
    let mut known = None;
    let (slots, compared_by) = match (current, &dirty) {
        (Current::Known(ids, how), _) => {
            if ids.len() != wanted.len() {
                return Err(RestoreError::Invalid(format!(
                    "disk {target}: the current content is known for {} chunks, the checkpoint has {}",
                    ids.len(),
                    wanted.len()
                )));
            }
            let slots = differing(&ids, &wanted);
            known = Some(ids);
            (slots, how)
        }
        // Nothing needs reading: a chunk the bitmap does not mark holds the bitmap's
        // checkpoint's content, so it is written if that differs from the restored one; a
        // marked chunk is written anyway (only its dirty extents, where it can).
        (Current::Unknown, Some((base, _, extents))) => {
            let mut slots = slots_of(extents.iter().copied(), chunk);
            slots.extend(differing(base, &wanted));
            slots.sort_unstable();
            slots.dedup();
            (slots, ComparedBy::DirtyBitmap)
        }
        (Current::Unknown, None) => {
            let ids = session.hash_allocated(store, index, control)?;
            let contents = store.content_ids(&wanted, &chains); // patches are named otherwise
            (differing(&ids, &contents), ComparedBy::Hashing)
        }
    };
    let dirty = dirty
        .as_ref()
        .map(|(base, ranges, _)| (base.as_slice(), ranges));
    let partial = partial_writes(store, &slots, &wanted, known.as_deref(), dirty)?;
    let plan = WritePlan {
        wanted: &wanted,
        chains: &chains,
        slots: &slots,
        partial: &partial,
    };
    let bytes_written = session.write(store, index, &plan, control, written)?;
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

const WRITABLE: Access<'static> = Access::Writable { bitmap: None };

/// Reads image `file` back and checks every chunk against `index` — after a write that
/// could not check as it went (an upload into a storage pool); returns the number of data
/// chunks checked.
pub(crate) fn verify_image(
    store: &Store,
    file: &Path,
    format: &str,
    index: &ObjectIndex,
    work_dir: &Path,
    control: &Control,
) -> Result<u64, RestoreError> {
    // Compared with what is read and hashed: patches by the content they name.
    let (ids, chains) = entries_and_chains(store, index)?;
    let wanted = store.content_ids(&ids, &chains);
    let access = Access::ReadOnly { bitmap: None };
    let mut session = DiskSession::open(file, format, access, work_dir)?;
    let chunk = u64::from(index.chunk_size_bytes);
    let mut ids = vec![HOLE; wanted.len()];
    if session.size_bytes() == index.size_bytes {
        let slots = session.allocated_slots(chunk)?;
        session.hash_slots(store, index, &slots, &mut ids, control)?;
    }
    match differing(&ids, &wanted).first() {
        _ if session.size_bytes() != index.size_bytes => Err(RestoreError::Verify {
            path: file.to_path_buf(),
            detail: format!(
                "it is {} bytes, the checkpoint's disk {} bytes",
                session.size_bytes(),
                index.size_bytes
            ),
        }),
        Some(i) => Err(RestoreError::Verify {
            path: file.to_path_buf(),
            detail: format!(
                "chunk {i} (bytes {} to {}) is not as the checkpoint has it",
                i * chunk,
                i * chunk + index.chunk_len(*i)
            ),
        }),
        None => Ok(wanted.iter().filter(|&&id| id != HOLE).count() as u64),
    }
}

/// Runs `qemu-img ARGS... PATH EXTRA...` on the image `path`: its output if it succeeded,
/// else what it said on stderr (stdout for `check`, which reports there).
pub(crate) fn qemu_img(
    args: &[&str],
    path: &Path,
    extra: &[&str],
) -> Result<Result<std::process::Output, QemuImgFailed>, RestoreError> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .arg(path)
        .args(extra)
        .output()
        .map_err(|e| RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!("could not run qemu-img: {e}; install qemu-utils"),
        })?;
    if out.status.success() {
        Ok(Ok(out))
    } else {
        let said = if out.stderr.is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        Ok(Err(QemuImgFailed(
            String::from_utf8_lossy(said).trim().to_owned(),
        )))
    }
}

/// `qemu-img` ran and failed: what it said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct QemuImgFailed(String);

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
    qemu_img(
        &["create", "-q", "-f", format],
        path,
        &[&size_bytes.to_string()],
    )?
    .map(drop)
    .map_err(|said| write_err(said.to_string()))
}

/// Sets the guest-visible size of the image `path` (the VM is off; shrinking drops what is
/// beyond the new end, which a safety checkpoint holds).
pub(crate) fn resize_image(path: &Path, format: &str, size_bytes: u64) -> Result<(), RestoreError> {
    let size = size_bytes.to_string();
    qemu_img(&["resize", "-q", "--shrink", "-f", format], path, &[&size])?
        .map(drop)
        .map_err(|said| RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!("could not give it the checkpoint's size: {said}"),
        })
}
