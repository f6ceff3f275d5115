//! Random access to a disk (or blob) of a checkpoint straight from the store: any byte
//! range, in any order, through a cache of whole chunks. What reads a file system inside a
//! checkpoint without restoring it (file-level restore) reads through this.
//!
//! Each chunk is fetched from the store (read, decrypted, decompressed, patches applied)
//! at most once while it stays in the cache; holes are zeros and cost nothing.
//! [`ObjectCursor::chunks_fetched`] counts the fetches, so that callers can show that they
//! read no more of the store than the data they need.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Store;
use super::error::StoreError;
use super::index::{HOLE, ObjectIndex};
use super::reader::{ObjectReader, StoreRef};

/// The cache's size when the caller does not say: 64 MiB (16 chunks of 4 MiB).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// How far ahead of a sequential read the kernel is asked to fetch chunk files, at most,
/// when the caller does not say: 64 MiB. The window starts at two chunks and doubles with
/// each chunk the read goes on to, so that a short read (a small file) asks for little.
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 64 << 20;

/// A chunk in the cache, and when it was last used.
#[derive(Debug)]
struct Cached {
    slot: u64,
    data: Arc<Vec<u8>>,
    used: u64,
}

/// A reader of one object of the store at any offset ([`Read`] + [`Seek`], or
/// [`ObjectCursor::read_at`]).
#[derive(Debug)]
pub struct ObjectCursor<'s> {
    reader: ObjectReader<'s>,
    size: u64,
    chunk_size: u64,
    position: u64,
    cache: Vec<Cached>,
    capacity: usize,
    clock: u64,
    fetched: u64,
    /// Also counts fetches, shared with whoever reads through several cursors.
    shared_count: Option<Arc<AtomicU64>>,
    /// Chunks to hint ahead of a sequential read, at most (0: none).
    read_ahead: u64,
    /// Chunks hinted ahead now: grows while the read stays sequential.
    window: u64,
    /// The slot fetched last, to tell a sequential read.
    last_fetched: Option<u64>,
    /// Slots below this were already hinted.
    hinted_to: u64,
}

impl Store {
    /// A random-access reader of `index` (which must belong to this store), keeping up to
    /// `cache_bytes` of chunks (at least one chunk).
    pub fn object_cursor(
        &self,
        index: &ObjectIndex,
        cache_bytes: u64,
    ) -> Result<ObjectCursor<'_>, StoreError> {
        ObjectCursor::new(StoreRef::Borrowed(self), index, cache_bytes)
    }

    /// [`Store::object_cursor`] on a shared store: a reader that owns its share, so that it
    /// can be kept (`'static`) by what reads a file system on the disk.
    pub fn object_cursor_shared(
        self: &Arc<Self>,
        index: &ObjectIndex,
        cache_bytes: u64,
    ) -> Result<ObjectCursor<'static>, StoreError> {
        ObjectCursor::new(StoreRef::Shared(self.clone()), index, cache_bytes)
    }
}

impl<'s> ObjectCursor<'s> {
    fn new(store: StoreRef<'s>, index: &ObjectIndex, cache_bytes: u64) -> Result<Self, StoreError> {
        let reader = ObjectReader::new(store, index)?;
        let chunk_size = u64::from(index.chunk_size_bytes).max(1);
        let capacity = usize::try_from((cache_bytes / chunk_size).max(1)).unwrap_or(usize::MAX);
        Ok(ObjectCursor {
            reader,
            size: index.size_bytes,
            chunk_size,
            position: 0,
            cache: Vec::new(),
            capacity,
            clock: 0,
            fetched: 0,
            shared_count: None,
            read_ahead: DEFAULT_READ_AHEAD_BYTES.div_ceil(chunk_size),
            window: 0,
            last_fetched: None,
            hinted_to: 0,
        })
    }
}

impl ObjectCursor<'_> {
    /// The object's length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the object is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Adds each chunk fetched from now on to `counter` too (for a count over several
    /// cursors, as a file-system browser has one per volume).
    #[must_use]
    pub fn counting_into(mut self, counter: Arc<AtomicU64>) -> Self {
        self.shared_count = Some(counter);
        self
    }

    /// Asks the kernel for the chunk files up to `bytes` ahead of a sequential read (0:
    /// never), so that reading them from the drive overlaps with decrypting, checking and
    /// using the chunks before them. Only a hint, for a store on a local or mounted
    /// folder; nothing more is fetched or counted.
    #[must_use]
    pub fn with_read_ahead(mut self, bytes: u64) -> Self {
        self.read_ahead = bytes.div_ceil(self.chunk_size);
        self
    }

    /// How many chunks were fetched from the store so far (holes and cache hits not
    /// counted).
    #[must_use]
    pub fn chunks_fetched(&self) -> u64 {
        self.fetched
    }

    /// Reads into `buf` from `offset`, as much as fits and the object holds; the number of
    /// bytes read (0 at or past the end).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let mut done = 0;
        while done < buf.len() {
            // Offsets come from what a disk holds (a file system's own records): one past
            // the end of the disk, or of u64, reads nothing.
            let at = match offset.checked_add(done as u64) {
                Some(at) if at < self.size => at,
                _ => break,
            };
            let slot = at / self.chunk_size;
            let within = usize::try_from(at % self.chunk_size).expect("below the chunk size");
            let want = (buf.len() - done).min(
                usize::try_from((self.size - at).min(self.chunk_size - at % self.chunk_size))
                    .expect("below the chunk size"),
            );
            let target = &mut buf[done..done + want];
            match self.chunk(slot)? {
                None => target.fill(0),
                Some(data) => {
                    let available = data.len().saturating_sub(within).min(want);
                    target[..available].copy_from_slice(&data[within..within + available]);
                    // A short last chunk is validated by the reader; zeros past it.
                    target[available..].fill(0);
                }
            }
            done += want;
        }
        Ok(done)
    }

    /// Whether the bytes from `offset` on are a hole (zeros the store never wrote, which
    /// cost nothing to read), and how far that goes: at least 1 byte and at most `len`
    /// (`offset` must lie inside the object, `len` be at least 1). Looks only at the index.
    pub fn run_at(&mut self, offset: u64, len: u64) -> Result<(bool, u64), StoreError> {
        let end = offset.saturating_add(len.max(1)).min(self.size);
        let mut slot = offset / self.chunk_size;
        let hole = self.reader.entry(slot)? == HOLE;
        loop {
            let slot_end = (slot + 1).saturating_mul(self.chunk_size);
            if slot_end >= end {
                return Ok((hole, end.saturating_sub(offset).max(1)));
            }
            slot += 1;
            if (self.reader.entry(slot)? == HOLE) != hole {
                return Ok((hole, slot_end - offset));
            }
        }
    }

    /// The content of chunk `slot`: `None` for a hole.
    fn chunk(&mut self, slot: u64) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        self.clock += 1;
        if let Some(hit) = self.cache.iter_mut().find(|c| c.slot == slot) {
            hit.used = self.clock;
            return Ok(Some(hit.data.clone()));
        }
        if self.reader.entry(slot)? == HOLE {
            return Ok(None);
        }
        if self.read_ahead > 0 && slot > 0 && self.last_fetched == Some(slot - 1) {
            self.window = self.window.saturating_mul(2).max(2).min(self.read_ahead);
            self.hint_after(slot);
        } else {
            self.window = 0;
        }
        self.last_fetched = Some(slot);
        let data = Arc::new(self.reader.read(slot)?);
        self.fetched += 1;
        if let Some(count) = &self.shared_count {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if self.cache.len() >= self.capacity
            && let Some(oldest) = self
                .cache
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.used)
                .map(|(i, _)| i)
        {
            self.cache.swap_remove(oldest);
        }
        self.cache.push(Cached {
            slot,
            data: data.clone(),
            used: self.clock,
        });
        Ok(Some(data))
    }
}

impl ObjectCursor<'_> {
    /// Hints the chunks after `slot` that a sequential read will want next (each once).
    fn hint_after(&mut self, slot: u64) {
        let end = slot
            .saturating_add(1)
            .saturating_add(self.window)
            .min(self.reader.chunk_count());
        // Going on from what was hinted, unless the read jumped away from it.
        let start = if (slot + 1..=end).contains(&self.hinted_to) {
            self.hinted_to
        } else {
            slot + 1
        };
        for next in start..end {
            if !self.cache.iter().any(|c| c.slot == next) {
                self.reader.prefetch(next);
            }
        }
        self.hinted_to = end;
    }
}

impl Read for ObjectCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.position, buf).map_err(io::Error::other)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for ObjectCursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.size.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        let Some(target) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to before the start of the disk",
            ));
        };
        self.position = target;
        Ok(target)
    }
}
