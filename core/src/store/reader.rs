//! Reading a disk or blob back out of the store.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Store;
use super::chunk::ChunkId;
use super::error::{StoreError, io_error};
use super::index::{self, ENTRIES_PER_PAGE, HOLE, ObjectIndex};
use crate::progress::Control;

/// The store a reader reads from: borrowed, or shared so that the reader can outlive the
/// caller's borrow (a file system reader that keeps its disk, see
/// [`Store::object_cursor_shared`](super::Store::object_cursor_shared)).
#[derive(Debug, Clone)]
pub(crate) enum StoreRef<'s> {
    Borrowed(&'s Store),
    Shared(std::sync::Arc<Store>),
}

impl std::ops::Deref for StoreRef<'_> {
    type Target = Store;

    fn deref(&self) -> &Store {
        match self {
            Self::Borrowed(store) => store,
            Self::Shared(store) => store,
        }
    }
}

/// Reads one object chunk by chunk. Keeps two index pages in memory: the one in use, and
/// the one before it (a read-ahead that looks into the next page does not make the reader
/// load its own page again).
#[derive(Debug)]
pub struct ObjectReader<'s> {
    store: StoreRef<'s>,
    index: ObjectIndex,
    page: Option<(u64, index::Page)>,
    previous: Option<(u64, index::Page)>,
}

impl Store {
    /// A reader for `index`, which must belong to this store.
    pub fn object_reader(&self, index: &ObjectIndex) -> Result<ObjectReader<'_>, StoreError> {
        ObjectReader::new(StoreRef::Borrowed(self), index)
    }
}

impl<'s> ObjectReader<'s> {
    pub(crate) fn new(store: StoreRef<'s>, index: &ObjectIndex) -> Result<Self, StoreError> {
        index.validate(store.chunk_size_bytes())?;
        Ok(ObjectReader {
            store,
            index: index.clone(),
            page: None,
            previous: None,
        })
    }
}

impl ObjectReader<'_> {
    /// Number of chunk slots.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.index.chunk_count()
    }

    /// The chunk id in slot `i` ([`HOLE`] for zeros).
    pub fn entry(&mut self, i: u64) -> Result<ChunkId, StoreError> {
        self.entry_and_chain(i).map(|(id, _)| id)
    }

    /// The entry of slot `i` and its chain of bases (empty but for a patch).
    fn entry_and_chain(&mut self, i: u64) -> Result<(ChunkId, Vec<ChunkId>), StoreError> {
        let page_no = i / ENTRIES_PER_PAGE;
        if self.page.as_ref().is_none_or(|(p, _)| *p != page_no) {
            if self.previous.as_ref().is_some_and(|(p, _)| *p == page_no) {
                std::mem::swap(&mut self.page, &mut self.previous);
            } else {
                let entries = self.store.read_page_with_bases(&self.index, page_no)?;
                self.previous = self.page.replace((page_no, entries));
            }
        }
        let (_, page) = self.page.as_ref().expect("loaded above");
        let k = usize::try_from(i % ENTRIES_PER_PAGE).expect("small");
        match (page.ids.get(k), page.chains.get(k)) {
            (Some(id), Some(chain)) => Ok((*id, chain.clone())),
            _ => Err(StoreError::Invalid(format!(
                "chunk {i} is beyond the end of the object"
            ))),
        }
    }

    /// Asks the kernel to fetch the files that reading slot `i` will open (only a hint;
    /// nothing for a hole, or a slot that cannot be looked up).
    pub(crate) fn prefetch(&mut self, i: u64) {
        if let Ok((id, chain)) = self.entry_and_chain(i)
            && id != HOLE
        {
            self.store.prefetch_entry(&id, &chain);
        }
    }

    /// The content of slot `i`, zeros for a hole.
    pub fn read(&mut self, i: u64) -> Result<Vec<u8>, StoreError> {
        let (id, chain) = self.entry_and_chain(i)?;
        let len = usize::try_from(self.index.chunk_len(i)).expect("chunk fits memory");
        if id == HOLE {
            return Ok(vec![0; len]);
        }
        let data = self.store.read_entry(&id, &chain)?;
        if data.len() != len {
            return Err(StoreError::Damaged {
                path: self.store.chunk_path(&id),
                detail: format!("{} bytes where slot {i} needs {len}", data.len()),
                store: self.store.root().to_path_buf(),
            });
        }
        Ok(data)
    }

    /// Reads the whole object into memory (for small blobs such as NVRAM).
    pub fn read_all(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(usize::try_from(self.index.size_bytes).unwrap_or(0));
        for i in 0..self.chunk_count() {
            out.extend_from_slice(&self.read(i)?);
        }
        Ok(out)
    }

    /// Writes the object into `file`, which is set to the object's length; holes are left
    /// unwritten (sparse), so `file` must be new or already zero there.
    pub fn write_to_file(&mut self, file: &File, control: &Control) -> Result<(), StoreError> {
        let chunk = u64::from(self.index.chunk_size_bytes);
        control.add_total_bytes(self.index.size_bytes);
        file.set_len(self.index.size_bytes)
            .map_err(|e| io_error("resize", "the output file", e))?;
        for i in 0..self.chunk_count() {
            control.check()?;
            let len = self.index.chunk_len(i);
            if self.entry(i)? != HOLE {
                let data = self.read(i)?;
                file.write_all_at(&data, i * chunk)
                    .map_err(|e| io_error("write", "the output file", e))?;
            }
            control.add_done_bytes(len);
        }
        Ok(())
    }
}
