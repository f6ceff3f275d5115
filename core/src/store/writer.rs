//! Writing a checkpoint: chunks first, the manifest last, visible only once all is durable.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::chunk::{ChunkId, ChunkKind};
use super::error::{StoreError, io_error};
use super::index::{self, ENTRIES_PER_PAGE, HOLE, ObjectIndex, Page};
use super::manifest::{self, BlobEntry, CheckpointKind, Consistency, DiskEntry, Manifest, VmRef};
use super::{Store, StoreLock};
use crate::progress::Control;

/// What the caller knows about a checkpoint before writing its data.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    /// The VM.
    pub vm: VmRef,
    /// The instant captured.
    pub time: DateTime<Utc>,
    /// Disk-only or full state.
    pub kind: CheckpointKind,
    /// Crash- or application-consistent.
    pub consistency: Consistency,
    /// The domain XML at that instant.
    pub domain_xml: String,
    /// The checkpoint this one is incremental from.
    pub parent: Option<String>,
    /// Why it is a full capture, when an incremental was expected.
    pub full_reason: Option<String>,
    /// Why it is only crash-consistent, or what the guest agent froze.
    pub consistency_note: Option<String>,
    /// Labels such as `safety`.
    pub labels: Vec<String>,
    /// The libvirt checkpoint created at the same instant, if any.
    pub libvirt_checkpoint: Option<String>,
}

/// A finished disk or blob index and what writing it added to the store.
#[derive(Debug, Clone)]
pub struct FinishedObject {
    /// The index.
    pub index: ObjectIndex,
    /// Bytes of new chunk files (data and index pages).
    pub new_bytes: u64,
    /// Number of new chunk files.
    pub new_chunks: u64,
}

/// A checkpoint being written. Dropping it without [`CheckpointWriter::commit`] leaves no
/// checkpoint (its chunks are collected by the next garbage collection).
#[derive(Debug)]
pub struct CheckpointWriter<'s> {
    store: &'s Store,
    lock: StoreLock,
    new: NewCheckpoint,
    parent: Option<Manifest>,
    id: String,
    disks: Vec<DiskEntry>,
    blobs: Vec<BlobEntry>,
    new_bytes: u64,
    read_bytes: u64,
    started: Instant,
}

impl Store {
    /// Starts writing a checkpoint. Waits (cancellably) while garbage collection runs.
    pub fn begin_checkpoint(
        &self,
        new: NewCheckpoint,
        control: &Control,
    ) -> Result<CheckpointWriter<'_>, StoreError> {
        for label in &new.labels {
            manifest::check_name("label", label)?;
        }
        // An encrypted store's lock files do not name the VM (anyone may read them).
        let purpose = if self.is_encrypted() {
            "writing a checkpoint".to_owned()
        } else {
            format!("writing a checkpoint of {}", new.vm.name)
        };
        let lock = self.lock_for_writing(&purpose, control)?;
        let mut new = new;
        // Ids are the capture time in milliseconds; two captures of one VM in the same
        // millisecond get the next free one.
        while {
            let rel = Self::manifest_rel(&new.vm.uuid, &manifest::checkpoint_id(new.time));
            self.fs
                .exists(&rel)
                .map_err(|e| io_error("look at", self.root().join(&rel), e))?
        } {
            new.time += chrono::Duration::milliseconds(1);
        }
        let id = manifest::checkpoint_id(new.time);
        // The parent is read under the lock: as long as this writer holds it, garbage
        // collection cannot remove what the parent references, so the chunks and pages an
        // incremental shares with it stay in the store.
        let parent = match &new.parent {
            None => None,
            Some(parent_id) => match self.manifest(&new.vm.uuid, parent_id) {
                Ok(m) => Some(m),
                Err(StoreError::NoSuchCheckpoint { .. }) => {
                    return Err(StoreError::ParentGone {
                        id: parent_id.clone(),
                        store: self.root().to_path_buf(),
                    });
                }
                Err(e) => return Err(e),
            },
        };
        Ok(CheckpointWriter {
            store: self,
            lock,
            new,
            parent,
            id,
            disks: Vec::new(),
            blobs: Vec::new(),
            new_bytes: 0,
            read_bytes: 0,
            started: Instant::now(),
        })
    }

    /// Starts an index for an object of `size_bytes` (see [`CheckpointWriter::object_writer`]).
    pub(crate) fn object_writer(
        &self,
        size_bytes: u64,
        base: Option<&ObjectIndex>,
    ) -> Result<ObjectWriter<'_>, StoreError> {
        let index = if let Some(base) = base {
            base.validate(self.chunk_size_bytes())?;
            if base.size_bytes != size_bytes {
                return Err(StoreError::Invalid(format!(
                    "the base index is for {} bytes, not {size_bytes}: take a full capture after a resize",
                    base.size_bytes
                )));
            }
            base.clone()
        } else {
            if size_bytes > index::MAX_OBJECT_BYTES {
                return Err(StoreError::Invalid(format!(
                    "{size_bytes} bytes is beyond the 256 TiB limit"
                )));
            }
            ObjectIndex::empty(size_bytes, self.chunk_size_bytes())
        };
        Ok(ObjectWriter {
            store: self,
            base: base.cloned(),
            index,
            page: None,
            new_bytes: 0,
            new_chunks: 0,
        })
    }

    /// Reads a whole file into a new object (see [`CheckpointWriter::ingest_file`]).
    pub(crate) fn ingest_file(
        &self,
        file: &File,
        size_bytes: u64,
        base: Option<&ObjectIndex>,
        control: &Control,
    ) -> Result<FinishedObject, StoreError> {
        let mut writer = self.object_writer(size_bytes, base)?;
        let chunk = u64::from(self.chunk_size_bytes());
        control.add_total_bytes(size_bytes);
        let slots: Vec<u64> = (0..writer.chunk_count()).collect();
        let read = |i: u64, buf: &mut [u8]| {
            let offset = i * chunk;
            // Holes of sparse files are not read: SEEK_DATA finds the next allocated byte.
            let next_data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
                Ok(pos) => pos,
                Err(rustix::io::Errno::NXIO) => size_bytes,
                Err(_) => offset, // file system without SEEK_DATA: read everything
            };
            if next_data >= offset + buf.len() as u64 {
                return Ok(false);
            }
            file.read_exact_at(buf, offset)
                .map_err(|e| io_error("read", "the image file", e))?;
            Ok::<_, StoreError>(true)
        };
        writer.put_slots(&slots, control, vec![read; super::pipeline::reader_count()])?;
        writer.finish()
    }
}

/// Builds one object's index chunk by chunk. Keeps one index page in memory.
#[derive(Debug)]
pub struct ObjectWriter<'s> {
    pub(super) store: &'s Store,
    index: ObjectIndex,
    /// The page being edited: number, entries, whether they changed.
    page: Option<(u64, Page, bool)>,
    /// The index this one started from (the parent's), to store slots over.
    base: Option<ObjectIndex>,
    new_bytes: u64,
    new_chunks: u64,
}

impl ObjectWriter<'_> {
    /// Number of chunk slots.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.index.chunk_count()
    }

    /// Length of chunk slot `i`.
    #[must_use]
    pub fn chunk_len(&self, i: u64) -> u64 {
        self.index.chunk_len(i)
    }

    /// Sets chunk slot `i` to `data` (exactly [`ObjectWriter::chunk_len`] bytes). All-zero
    /// data costs no chunk.
    pub fn put(&mut self, i: u64, data: &[u8]) -> Result<(), StoreError> {
        if i >= self.chunk_count() || data.len() as u64 != self.chunk_len(i) {
            return Err(StoreError::Invalid(format!(
                "chunk {i} of {} bytes does not fit an object of {} bytes",
                data.len(),
                self.index.size_bytes
            )));
        }
        if data.iter().all(|&b| b == 0) {
            return self.set_entry(i, HOLE, Vec::new());
        }
        // Over what the slot held in the index this one started from, as a patch where
        // little changed.
        let (parent, chain) = self.parent_entries(&[i])?.remove(0);
        let known = self.store.known(&parent, &chain)?;
        let stored = self.store.put_data_over(known.as_ref(), data)?;
        self.put_stored(i, stored.id, stored.chain, stored.added)
    }

    /// Sets chunk slot `i` to a chunk already in the store (a patch over the chain of
    /// bases `chain`, nearest first, or whole when `chain` is empty); `added` is what
    /// storing it added (0 when it was there before).
    pub(crate) fn put_stored(
        &mut self,
        i: u64,
        id: ChunkId,
        chain: Vec<ChunkId>,
        added: u64,
    ) -> Result<(), StoreError> {
        if added > 0 {
            self.new_bytes += added;
            self.new_chunks += 1;
        }
        self.set_entry(i, id, chain)
    }

    /// The entries (and their chains of bases) of the index this one started from at
    /// `slots` (ascending), holes where it has none: what each slot's new content is
    /// stored over.
    pub(crate) fn parent_entries(
        &self,
        slots: &[u64],
    ) -> Result<Vec<(ChunkId, Vec<ChunkId>)>, StoreError> {
        let Some(base) = &self.base else {
            return Ok(vec![(HOLE, Vec::new()); slots.len()]);
        };
        let mut page: Option<(u64, Page)> = None;
        let mut out = Vec::with_capacity(slots.len());
        for &i in slots {
            let page_no = i / ENTRIES_PER_PAGE;
            if page.as_ref().is_none_or(|(p, _)| *p != page_no) {
                page = Some((page_no, self.store.read_page_with_bases(base, page_no)?));
            }
            let (_, entries) = page.as_ref().expect("loaded above");
            let e = usize::try_from(i % ENTRIES_PER_PAGE).expect("small");
            out.push((entries.ids[e], entries.chains[e].clone()));
        }
        Ok(out)
    }

    /// Marks chunk slot `i` as zeros / unallocated.
    pub fn put_hole(&mut self, i: u64) -> Result<(), StoreError> {
        if i >= self.chunk_count() {
            return Err(StoreError::Invalid(format!(
                "chunk {i} is beyond the end of the object"
            )));
        }
        self.set_entry(i, HOLE, Vec::new())
    }

    fn set_entry(&mut self, i: u64, id: ChunkId, chain: Vec<ChunkId>) -> Result<(), StoreError> {
        let page_no = i / ENTRIES_PER_PAGE;
        if self.page.as_ref().is_none_or(|(p, _, _)| *p != page_no) {
            self.flush_page()?;
            let entries = self.store.read_page_with_bases(&self.index, page_no)?;
            self.page = Some((page_no, entries, false));
        }
        let len = self.index.chunk_len(i);
        let (_, entries, dirty) = self.page.as_mut().expect("loaded above");
        let e = usize::try_from(i % ENTRIES_PER_PAGE).expect("small");
        let slot = &mut entries.ids[e];
        if *slot != id {
            if *slot == HOLE {
                self.index.data_bytes += len;
            } else if id == HOLE {
                self.index.data_bytes -= len;
            }
            *slot = id;
            *dirty = true;
        }
        if entries.chains[e] != chain {
            entries.chains[e] = chain;
            *dirty = true;
        }
        Ok(())
    }

    fn flush_page(&mut self) -> Result<(), StoreError> {
        let Some((page_no, entries, dirty)) = self.page.take() else {
            return Ok(());
        };
        if !dirty {
            return Ok(());
        }
        let id = if entries.ids.iter().all(|e| *e == HOLE) {
            None
        } else {
            let (id, added) = self.store.put_chunk(
                ChunkKind::IndexPage,
                &index::encode_page_with_bases(&entries),
            )?;
            if added > 0 {
                self.new_bytes += added;
                self.new_chunks += 1;
            }
            Some(id)
        };
        self.index.pages[usize::try_from(page_no).expect("validated")] = id;
        Ok(())
    }

    /// Writes the last changed index page and returns the index.
    pub fn finish(mut self) -> Result<FinishedObject, StoreError> {
        self.flush_page()?;
        Ok(FinishedObject {
            index: self.index,
            new_bytes: self.new_bytes,
            new_chunks: self.new_chunks,
        })
    }
}

impl<'s> CheckpointWriter<'s> {
    /// The id the checkpoint will have.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The store being written.
    #[must_use]
    pub fn store(&self) -> &Store {
        self.store
    }

    /// The parent checkpoint, read when writing began.
    #[must_use]
    pub fn parent(&self) -> Option<&Manifest> {
        self.parent.as_ref()
    }

    /// `base` must be one of the parent checkpoint's indexes: only then is it certain that
    /// everything it references is in the store until this checkpoint is committed.
    fn check_base(&self, base: Option<&ObjectIndex>) -> Result<(), StoreError> {
        match (base, &self.parent) {
            (None, _) => Ok(()),
            (Some(base), Some(parent)) if parent.indexes().any(|i| i == base) => Ok(()),
            (Some(_), Some(parent)) => Err(StoreError::Invalid(format!(
                "the base index is not one of checkpoint {}'s",
                parent.id
            ))),
            (Some(_), None) => Err(StoreError::Invalid(
                "an incremental needs its parent checkpoint named in NewCheckpoint::parent".into(),
            )),
        }
    }

    /// Starts an index for an object of `size_bytes`. With `base` (the same disk in the
    /// parent checkpoint, of the same size), untouched chunks keep the base's entries and
    /// untouched index pages are shared, not rewritten.
    pub fn object_writer(
        &self,
        size_bytes: u64,
        base: Option<&ObjectIndex>,
    ) -> Result<ObjectWriter<'s>, StoreError> {
        self.check_base(base)?;
        self.store.object_writer(size_bytes, base)
    }

    /// Reads a whole file (disk image, NVRAM) into a new object, skipping holes of sparse
    /// files without reading them. With `base` (from the parent), only changed pages of the
    /// index are written.
    pub fn ingest_file(
        &self,
        file: &File,
        size_bytes: u64,
        base: Option<&ObjectIndex>,
        control: &Control,
    ) -> Result<FinishedObject, StoreError> {
        self.check_base(base)?;
        self.store.ingest_file(file, size_bytes, base, control)
    }

    /// Adds a finished disk.
    pub fn add_disk(
        &mut self,
        target: &str,
        source: Option<String>,
        format: Option<String>,
        object: FinishedObject,
    ) -> Result<(), StoreError> {
        manifest::check_name("disk target", target)?;
        if self.disks.iter().any(|d| d.target == target) {
            return Err(StoreError::Invalid(format!(
                "disk {target} was added twice"
            )));
        }
        self.new_bytes += object.new_bytes;
        self.disks.push(DiskEntry {
            target: target.to_owned(),
            source,
            format,
            index: object.index,
        });
        Ok(())
    }

    /// Records that `bytes` more were read from the VM to take this checkpoint.
    pub fn add_read_bytes(&mut self, bytes: u64) {
        self.read_bytes += bytes;
    }

    /// Adds a finished blob (NVRAM, TPM state, memory).
    pub fn add_blob(&mut self, name: &str, object: FinishedObject) -> Result<(), StoreError> {
        manifest::check_name("blob name", name)?;
        if self.blobs.iter().any(|b| b.name == name) {
            return Err(StoreError::Invalid(format!("blob {name} was added twice")));
        }
        self.new_bytes += object.new_bytes;
        self.blobs.push(BlobEntry {
            name: name.to_owned(),
            index: object.index,
        });
        Ok(())
    }

    /// Adds a small blob from memory.
    pub fn add_blob_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut writer = self.store.object_writer(bytes.len() as u64, None)?;
        let chunk = self.store.chunk_size_bytes() as usize;
        for (i, piece) in bytes.chunks(chunk).enumerate() {
            writer.put(i as u64, piece)?;
        }
        let object = writer.finish()?;
        self.add_blob(name, object)
    }

    /// Makes the checkpoint durable and visible: flushes every chunk to the drive, then
    /// writes the manifest atomically. Until this returns, no trace of it is visible.
    pub fn commit(self, control: &Control) -> Result<Manifest, StoreError> {
        control.check()?;
        let store = self.store;
        let logical_bytes = self
            .disks
            .iter()
            .map(|d| d.index.data_bytes)
            .chain(self.blobs.iter().map(|b| b.index.data_bytes))
            .sum();
        let mut manifest = Manifest {
            // The store's own version: a manifest never needs more than its store.
            format_version: store.format_version(),
            id: self.id.clone(),
            vm: self.new.vm.clone(),
            time: self.new.time,
            kind: self.new.kind,
            consistency: self.new.consistency,
            domain_xml: self.new.domain_xml.clone(),
            disks: self.disks,
            blobs: self.blobs,
            logical_bytes,
            new_bytes: self.new_bytes,
            parent: self.new.parent.clone(),
            full_reason: self.new.full_reason.clone(),
            consistency_note: self.new.consistency_note.clone(),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            read_bytes: self.read_bytes,
            labels: self.new.labels.clone(),
            libvirt_checkpoint: self.new.libvirt_checkpoint.clone(),
            program_version: crate::VERSION.to_owned(),
        };
        manifest.validate(store.chunk_size_bytes())?;
        // Count the manifest itself (its size barely depends on this number).
        let estimate = store.encode_manifest(&manifest)?.len() as u64;
        manifest.new_bytes += estimate;
        let bytes = store.encode_manifest(&manifest)?;
        // 1. every chunk durable, 2. the manifest durable under a temporary name, renamed
        // into place, 3. its directory durable.
        store.publish_chunks(control)?;
        let dir = Store::manifest_dir_rel(&manifest.vm.uuid);
        store.fs.create_dir_durable(&dir)?;
        // On another host the lock is a lock file: if another process took it as stale
        // (this one was cut off for long), garbage collection may have run meanwhile.
        self.lock.check_held()?;
        store.fs.write_atomic(
            Store::tmp_dir(),
            &Store::manifest_rel(&manifest.vm.uuid, &manifest.id),
            &bytes,
        )?;
        Ok(manifest)
    }
}
