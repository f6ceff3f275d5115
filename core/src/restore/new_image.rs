//! Writing a checkpoint's disk into a new image file (a full restore into a file that is not
//! there, `rewind export`): the worker threads decode chunks and write them straight into
//! the file — a sparse raw file at their place, or qcow2 data clusters in the order they
//! come ([`crate::qcow2::write`] writes the metadata at the end) — skipping 64 KiB pieces that
//! are all zeros. Each piece is read back from the file at once and compared with what was
//! meant; the file is flushed to the drive, and `qemu-img check` confirms the structure of a
//! qcow2 image. No `qemu-nbd` is in the way, so both cores work (QEMU's reading of these
//! images is what the tests check, byte for byte).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::RestoreError;
use super::disk::{ComparedBy, DiskRestore, entries_and_chains};
use crate::progress::Control;
use crate::qcow2::write::{self as qcow2_write, CLUSTER_BYTES};
use crate::store::index::HOLE;
use crate::store::{ChunkId, ObjectIndex, Store, StoreError, for_each_slot};

/// How many chunk files ahead of the workers the kernel is asked to read.
const PREFETCH_CHUNKS: u64 = 32;

/// Whether Rewind writes new images of this format itself.
#[must_use]
pub(crate) fn writes(format: &str) -> bool {
    matches!(format, "raw" | "qcow2")
}

fn write_error(path: &Path, e: &std::io::Error) -> RestoreError {
    RestoreError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Whether `format` is qcow2 (else raw); an error for a format Rewind does not write.
fn is_qcow2(format: &str) -> Result<bool, RestoreError> {
    match format {
        "qcow2" => Ok(true),
        "raw" => Ok(false),
        other => Err(RestoreError::Invalid(format!(
            "Rewind writes new images as raw or qcow2, not {other}"
        ))),
    }
}

/// A new image being written.
struct NewImage<'a> {
    file: &'a File,
    /// Its path, for messages.
    path: &'a Path,
    qcow2: bool,
    /// qcow2: host clusters reserved per chunk slot (the slot of rank `r` among those
    /// with data gets clusters `1 + r × this` onwards; cluster 0 is the header).
    clusters_per_chunk: u64,
}

impl<'a> NewImage<'a> {
    /// The image `file` (new and empty, open for reading and writing) becomes.
    fn new(
        file: &'a File,
        path: &'a Path,
        format: &str,
        size_bytes: u64,
        chunk_bytes: u64,
    ) -> Result<Self, RestoreError> {
        let qcow2 = is_qcow2(format)?;
        if !qcow2 {
            file.set_len(size_bytes)
                .map_err(|e| write_error(path, &e))?;
        }
        Ok(Self {
            file,
            path,
            qcow2,
            clusters_per_chunk: chunk_bytes.div_ceil(CLUSTER_BYTES),
        })
    }

    /// Writes the 64 KiB pieces of the slot of rank `rank` among those with data (at
    /// `offset` in the disk) that are not all zeros, reading them back into `back` to
    /// compare; returns the bytes written and, for qcow2, the guest-to-host cluster mapping
    /// of the pieces. Pieces next to each other are next to each other in the file too
    /// (qcow2: the slot's clusters are reserved in a row), so each run of them is one
    /// write, one read and one writeback request (per 64 KiB piece, the small writeback
    /// requests and the file's lock cost a profiled restore a fifth of its CPU time).
    fn write_chunk(
        &self,
        rank: u64,
        offset: u64,
        data: &[u8],
        back: &mut Vec<u8>,
    ) -> Result<(u64, Vec<(u64, u64)>), RestoreError> {
        let cluster = usize::try_from(CLUSTER_BYTES).expect("64 KiB");
        let first_host = 1 + rank * self.clusters_per_chunk;
        let with_data: Vec<bool> = data
            .chunks(cluster)
            .map(|p| p.iter().any(|&b| b != 0))
            .collect();
        let mut mapped = Vec::new();
        let mut bytes = 0;
        let mut n = 0;
        while n < with_data.len() {
            if !with_data[n] {
                n += 1;
                continue;
            }
            let run_end = (n..with_data.len())
                .find(|&k| !with_data[k])
                .unwrap_or(with_data.len());
            let run = &data[n * cluster..(run_end * cluster).min(data.len())];
            let guest_at = offset + n as u64 * CLUSTER_BYTES;
            let at = if self.qcow2 {
                for k in n..run_end {
                    let k = k as u64;
                    mapped.push((offset / CLUSTER_BYTES + k, first_host + k));
                }
                (first_host + n as u64) * CLUSTER_BYTES
            } else {
                guest_at
            };
            self.file
                .write_all_at(run, at)
                .map_err(|e| write_error(self.path, &e))?;
            back.resize(run.len(), 0);
            self.file
                .read_exact_at(back, at)
                .map_err(|e| write_error(self.path, &e))?;
            // Start writing it to the drive now (only a hint): the final flush then has
            // little left to do, and the page cache does not fill with the whole disk.
            if let Err(e) = rustix::fs::fadvise(
                self.file,
                at,
                std::num::NonZeroU64::new(run.len() as u64),
                rustix::fs::Advice::DontNeed,
            ) {
                tracing::debug!("fadvise(DONTNEED) on the new image: {e}");
            }
            if back.as_slice() != run {
                return Err(RestoreError::Verify {
                    path: self.path.to_path_buf(),
                    detail: format!(
                        "bytes {guest_at} to {} of the disk do not read back as written",
                        guest_at + run.len() as u64
                    ),
                });
            }
            bytes += run.len() as u64;
            n = run_end;
        }
        Ok((bytes, mapped))
    }

    /// The qcow2 metadata, then the file durable; `qemu-img check` of a qcow2 image. (Its
    /// folder is the caller's to make durable.)
    fn finish(
        self,
        size_bytes: u64,
        chunks_with_data: u64,
        mapping: &BTreeMap<u64, u64>,
    ) -> Result<(), RestoreError> {
        if self.qcow2 {
            let data_clusters = chunks_with_data * self.clusters_per_chunk;
            for (at, bytes) in qcow2_write::metadata(size_bytes, data_clusters, mapping) {
                self.file
                    .write_all_at(&bytes, at)
                    .map_err(|e| write_error(self.path, &e))?;
            }
        }
        self.file
            .sync_all()
            .map_err(|e| write_error(self.path, &e))?;
        if self.qcow2 {
            check_qcow2(self.file, self.path)?;
        }
        Ok(())
    }
}

/// Has the kernel fetch the files a read of slot `i` opens: its chunk file, and, for a
/// patch, its flat copy or else those of its chain of bases.
fn prefetch_slot(store: &Store, wanted: &[ChunkId], chains: &[Vec<ChunkId>], i: u64) {
    let i = usize::try_from(i).expect("slot fits");
    store.prefetch_entry(&wanted[i], &chains[i]);
}

/// Whether disk `index` can be written as a new image of `format`: an error saying why not.
pub(crate) fn check_writable(format: &str, index: &ObjectIndex) -> Result<(), RestoreError> {
    is_qcow2(format)?;
    if !u64::from(index.chunk_size_bytes).is_multiple_of(CLUSTER_BYTES) {
        return Err(RestoreError::Invalid(format!(
            "chunks of {} bytes are not whole 64 KiB pieces",
            index.chunk_size_bytes
        )));
    }
    Ok(())
}

/// Writes disk `target` (`index`) into a new file `path` of `format` (`raw` or `qcow2`),
/// making its folder if needed; the file must not exist. On failure the caller removes it.
pub(crate) fn write_new_image(
    store: &Store,
    target: &str,
    path: &Path,
    format: &str,
    index: &ObjectIndex,
    control: &Control,
) -> Result<DiskRestore, RestoreError> {
    check_writable(format, index)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| RestoreError::Write {
            path: path.to_path_buf(),
            detail: format!("could not create its folder: {e}"),
        })?;
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RestoreError::Exists(path.to_path_buf())
            } else {
                write_error(path, &e)
            }
        })?;
    let report = write_new_image_into(store, target, &file, path, format, index, control)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| write_error(dir, &e))?;
    }
    Ok(report)
}

/// Writes disk `target` (`index`) into `file`, new and empty and open for reading and
/// writing, as an image of `format` (`raw` or `qcow2`); `path` names it in messages and
/// the report. The file is durable when this returns; its folder is the caller's to make
/// durable.
pub(crate) fn write_new_image_into(
    store: &Store,
    target: &str,
    file: &File,
    path: &Path,
    format: &str,
    index: &ObjectIndex,
    control: &Control,
) -> Result<DiskRestore, RestoreError> {
    check_writable(format, index)?;
    let chunk = u64::from(index.chunk_size_bytes);
    let image = NewImage::new(file, path, format, index.size_bytes, chunk)?;
    let (wanted, chains) = entries_and_chains(store, index)?;
    let slots: Vec<u64> = (0..index.chunk_count())
        .filter(|&i| wanted[usize::try_from(i).expect("slot fits")] != HOLE)
        .collect();
    // Each chunk is read, decoded and checked once, and written to every slot that holds
    // it (copies of the same data in a disk are stored once, and restored from one
    // decoding). The workers are handed each chunk's first slot.
    let mut slots_of: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    for &i in &slots {
        slots_of
            .entry(wanted[usize::try_from(i).expect("slot fits")])
            .or_default()
            .push(i);
    }
    let mut firsts: Vec<u64> = slots_of.values().map(|s| s[0]).collect();
    firsts.sort_unstable();
    let order = two_cursors(&firsts);
    control.add_total_bytes(slots.iter().map(|&i| index.chunk_len(i)).sum());
    let workers: Vec<_> = (0..crate::store::reader_count())
        .map(|_| {
            let (image, wanted, chains) = (&image, &wanted, &chains);
            let (slots, slots_of) = (&slots, &slots_of);
            let mut back = Vec::new();
            move |first: u64, _: &mut Vec<u8>| -> Result<(u64, Vec<(u64, u64)>), RestoreError> {
                let slot = usize::try_from(first).expect("slot fits");
                let id = wanted[slot];
                let data = store.read_entry(&id, &chains[slot])?;
                let (mut bytes, mut mapped) = (0, Vec::new());
                // Progress is counted here, slot by slot, and a cancel is seen between the
                // slots of a chunk held by many.
                for &i in &slots_of[&id] {
                    control.check().map_err(StoreError::from)?;
                    if data.len() as u64 != index.chunk_len(i) {
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
                    let rank = slots.binary_search(&i).expect("a slot of the list") as u64;
                    let (b, m) = image.write_chunk(rank, i * chunk, &data, &mut back)?;
                    bytes += b;
                    mapped.extend(m);
                    control.add_done_bytes(index.chunk_len(i));
                }
                Ok((bytes, mapped))
            }
        })
        .collect();
    let mut mapping = BTreeMap::new();
    let mut bytes_written = 0;
    // A reader ahead of the workers has the kernel fetch the next chunk files.
    let applied = AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for (n, &i) in (0u64..).zip(&order) {
                while n >= applied.load(Ordering::Relaxed) + PREFETCH_CHUNKS {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                prefetch_slot(store, &wanted, &chains, i);
            }
        });
        // The workers count progress themselves (a chunk may fill many slots), and take no
        // buffer from the pipeline (they decode into their own).
        let no_buffers = vec![0; order.len()];
        let result = for_each_slot(
            &order,
            &no_buffers,
            control,
            workers,
            |_, (bytes, mapped)| {
                bytes_written += bytes;
                mapping.extend(mapped);
                applied.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        );
        done.store(true, Ordering::Relaxed);
        result
    })?;
    image.finish(index.size_bytes, slots.len() as u64, &mapping)?;
    Ok(DiskRestore {
        target: target.to_owned(),
        path: path.to_path_buf(),
        format: format.to_owned(),
        compared_by: ComparedBy::NewFile,
        chunks: index.chunk_count(),
        chunks_written: slots.len() as u64,
        bytes_written,
        chunks_verified: slots.len() as u64,
    })
}

/// The order to restore `slots` (ascending) in: alternately one from the first half and
/// one from the second. A disk's content comes in regions — incompressible data whose
/// restore waits on reading the store, text or binaries whose restore waits on the cores
/// decompressing it — and two cursors far apart keep both the drive and the cores busy.
/// (With 2 GiB of mixed data from a cold cache, restoring in disk order left the cores
/// half idle while the 1 GiB of random data was read, then the drive idle while the text
/// was decompressed.)
fn two_cursors(slots: &[u64]) -> Vec<u64> {
    let (first, second) = slots.split_at(slots.len().div_ceil(2));
    let mut order = Vec::with_capacity(slots.len());
    for (n, &slot) in first.iter().enumerate() {
        order.push(slot);
        order.extend(second.get(n));
    }
    order
}

/// `qemu-img check`: QEMU agrees with the structure of the image `file` (`path`, for
/// messages). qemu-img is given the file itself, as its standard input, and opens it as
/// `/dev/stdin`: it reads the file held open, whatever has been put at `path` meanwhile.
fn check_qcow2(file: &File, path: &Path) -> Result<(), RestoreError> {
    let run_error = |e: std::io::Error| RestoreError::Write {
        path: path.to_path_buf(),
        detail: format!("could not run qemu-img: {e}; install qemu-utils"),
    };
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2", "/dev/stdin"])
        .stdin(file.try_clone().map_err(run_error)?)
        .output()
        .map_err(run_error)?;
    if out.status.success() {
        return Ok(());
    }
    let said = if out.stderr.is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    Err(RestoreError::Verify {
        path: path.to_path_buf(),
        detail: format!(
            "qemu-img check finds it unsound: {}",
            String::from_utf8_lossy(said).trim()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::two_cursors;

    #[test]
    fn two_cursors_alternate_between_the_halves_and_keep_every_slot_once() {
        assert_eq!(two_cursors(&[]), Vec::<u64>::new());
        assert_eq!(two_cursors(&[4]), vec![4]);
        assert_eq!(two_cursors(&[1, 2, 3, 4, 5]), vec![1, 4, 2, 5, 3]);
        assert_eq!(two_cursors(&[0, 7, 8, 9]), vec![0, 8, 7, 9]);
    }
}
