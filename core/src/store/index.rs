//! Indexes: which chunk holds each chunk-sized piece of a disk (or blob).
//!
//! An index is itself chunked: its entries (32-byte chunk ids, all zeros for a hole) are
//! grouped into pages of [`ENTRIES_PER_PAGE`], each page stored as an [`ChunkKind::IndexPage`]
//! chunk. A manifest lists only the page ids. An incremental checkpoint rewrites only the
//! pages whose entries changed and shares the others with its parent, so a small change to a
//! large disk adds little metadata (FORMAT.md, "Indexes").
//!
//! [`ChunkKind::IndexPage`]: super::chunk::ChunkKind::IndexPage

use serde::{Deserialize, Serialize};

use super::chunk::ChunkId;

/// Entries per index page: 128 × 32 bytes = a 4 KiB page, 128 MiB of disk at 1 MiB chunks.
///
/// Small pages bound the metadata of an incremental even when the changes are scattered:
/// 10 MiB written in 64 KiB pieces all over a 100 GiB disk dirties at most 160 chunks, so
/// at most 160 pages (640 KiB) are rewritten, and the manifest lists 800 page ids (about
/// 54 KB): under 1 MiB in all.
pub const ENTRIES_PER_PAGE: u64 = 128;
/// The largest disk or blob a store accepts (256 TiB).
pub const MAX_OBJECT_BYTES: u64 = 256 << 40;
/// Entry value meaning "all zeros / unallocated: no chunk".
pub const HOLE: ChunkId = ChunkId([0; 32]);

/// The index of one disk or blob, as kept in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectIndex {
    /// Length of the disk (its virtual size) or blob.
    pub size_bytes: u64,
    /// Chunk size it was cut with (the store's).
    pub chunk_size_bytes: u32,
    /// Bytes in chunks that are not holes.
    pub data_bytes: u64,
    /// One id per page; `null` for a page with only holes.
    pub pages: Vec<Option<ChunkId>>,
}

impl ObjectIndex {
    /// An index with only holes.
    #[must_use]
    pub fn empty(size_bytes: u64, chunk_size_bytes: u32) -> Self {
        let mut index = Self {
            size_bytes,
            chunk_size_bytes,
            data_bytes: 0,
            pages: Vec::new(),
        };
        index.pages = vec![None; usize::try_from(index.page_count()).unwrap_or(0)];
        index
    }

    /// Number of chunk slots.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.size_bytes
            .div_ceil(u64::from(self.chunk_size_bytes.max(1)))
    }

    /// Number of pages.
    #[must_use]
    pub fn page_count(&self) -> u64 {
        self.chunk_count().div_ceil(ENTRIES_PER_PAGE)
    }

    /// Number of entries in page `page` (the last may be short).
    #[must_use]
    pub fn entries_in_page(&self, page: u64) -> u64 {
        let start = page * ENTRIES_PER_PAGE;
        self.chunk_count()
            .saturating_sub(start)
            .min(ENTRIES_PER_PAGE)
    }

    /// Length of chunk slot `index` (the last may be short).
    #[must_use]
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index * u64::from(self.chunk_size_bytes);
        self.size_bytes
            .saturating_sub(start)
            .min(u64::from(self.chunk_size_bytes))
    }

    /// Checks the index's own consistency; `Err` says what is wrong.
    pub fn validate(&self, store_chunk_size_bytes: u32) -> Result<(), IndexError> {
        if self.chunk_size_bytes != store_chunk_size_bytes {
            return Err(IndexError::ChunkSize {
                found: self.chunk_size_bytes,
                store: store_chunk_size_bytes,
            });
        }
        if self.size_bytes > MAX_OBJECT_BYTES {
            return Err(IndexError::TooBig(self.size_bytes));
        }
        if self.pages.len() as u64 != self.page_count() {
            return Err(IndexError::PageCount {
                pages: self.pages.len(),
                size: self.size_bytes,
                needs: self.page_count(),
            });
        }
        if self.data_bytes > self.size_bytes {
            return Err(IndexError::DataBytes {
                data: self.data_bytes,
                size: self.size_bytes,
            });
        }
        Ok(())
    }
}

/// What is inconsistent in an object's index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Made for chunks of another size.
    #[error("chunk size {found} differs from the store's {store}")]
    ChunkSize {
        /// The index's.
        found: u32,
        /// The store's.
        store: u32,
    },
    /// Bigger than any object may be.
    #[error("size {0} is beyond the 256 TiB limit")]
    TooBig(u64),
    /// The wrong number of index pages for its size.
    #[error("{pages} index pages where a size of {size} needs {needs}")]
    PageCount {
        /// Pages it has.
        pages: usize,
        /// Its size in bytes.
        size: u64,
        /// Pages that size needs.
        needs: u64,
    },
    /// An index page of the wrong length.
    #[error("index page of {bytes} bytes where {entries} entries take {}", entries * 32)]
    PageBytes {
        /// Its length.
        bytes: usize,
        /// The entries it must hold.
        entries: u64,
    },
    /// Bases given for a hole, or a chunk in a chain twice.
    #[error("a page names bases for a hole, or a chunk twice in a chain of bases")]
    BadBase,
    /// More data bytes than bytes.
    #[error("{data} data bytes in an object of {size}")]
    DataBytes {
        /// Data bytes it claims.
        data: u64,
        /// Its size.
        size: u64,
    },
}

/// The longest chain of patches a page may give an entry: a patch over a patch over …
/// over a whole chunk, at most this many patches (`FORMAT.md`, "Patches").
pub const MAX_CHAIN: usize = 16;

/// One page's entries, and for each its chain of bases: for a patch, the chunk it is over,
/// then that one's base, and so on to the whole chunk at the end (empty for a whole chunk
/// and for a hole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The chunk ids.
    pub ids: Vec<ChunkId>,
    /// The chains of bases, one per entry, nearest first.
    pub chains: Vec<Vec<ChunkId>>,
}

impl Page {
    /// A page of `entries` holes.
    #[must_use]
    pub fn holes(entries: usize) -> Self {
        Self {
            ids: vec![HOLE; entries],
            chains: vec![Vec::new(); entries],
        }
    }
}

/// Encodes a page's entries.
#[must_use]
pub fn encode_page(entries: &[ChunkId]) -> Vec<u8> {
    entries.iter().flat_map(|id| id.0).collect()
}

/// Encodes a page: its ids and, if any entry is a patch (store format 3), the length of
/// each entry's chain of bases (one byte each), then the chains' ids in entry order.
#[must_use]
pub fn encode_page_with_bases(page: &Page) -> Vec<u8> {
    let mut bytes = encode_page(&page.ids);
    if page.chains.iter().any(|c| !c.is_empty()) {
        bytes.extend(
            page.chains
                .iter()
                .map(|c| u8::try_from(c.len()).expect("chains are short")),
        );
        bytes.extend(page.chains.iter().flatten().flat_map(|b| b.0));
    }
    bytes
}

/// Decodes a page that must hold exactly `expected_entries`: its ids.
pub fn decode_page(bytes: &[u8], expected_entries: u64) -> Result<Vec<ChunkId>, IndexError> {
    decode_page_with_bases(bytes, expected_entries).map(|page| page.ids)
}

/// Decodes a page that must hold exactly `expected_entries`: ids, then (store format 3,
/// when any entry is a patch) each entry's chain of bases. A hole has none, a chain is at
/// most [`MAX_CHAIN`] long, and no chunk is in a chain twice or in its own.
pub fn decode_page_with_bases(bytes: &[u8], expected_entries: u64) -> Result<Page, IndexError> {
    let bad = || IndexError::PageBytes {
        bytes: bytes.len(),
        entries: expected_entries,
    };
    let n = usize::try_from(expected_entries).map_err(|_| bad())?;
    let ids_len = n.checked_mul(32).ok_or_else(bad)?;
    if bytes.len() < ids_len {
        return Err(bad());
    }
    let decode = |part: &[u8]| -> Vec<ChunkId> {
        part.chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect()
    };
    let ids = decode(&bytes[..ids_len]);
    let rest = &bytes[ids_len..];
    if rest.is_empty() {
        return Ok(Page {
            ids,
            chains: vec![Vec::new(); n],
        });
    }
    if rest.len() < n || n == 0 {
        return Err(bad());
    }
    let (lens, mut links) = rest.split_at(n);
    if lens.iter().any(|&l| usize::from(l) > MAX_CHAIN)
        || links.len() != lens.iter().map(|&l| usize::from(l) * 32).sum::<usize>()
    {
        return Err(bad());
    }
    let mut chains = Vec::with_capacity(n);
    for (&len, id) in lens.iter().zip(&ids) {
        let (chain, more) = links.split_at(usize::from(len) * 32);
        links = more;
        let chain = decode(chain);
        let mut seen: Vec<&ChunkId> = chain.iter().chain([id]).collect();
        seen.sort();
        seen.dedup();
        if !chain.is_empty()
            && (*id == HOLE || seen.len() != chain.len() + 1 || chain.contains(&HOLE))
        {
            return Err(IndexError::BadBase);
        }
        chains.push(chain);
    }
    Ok(Page { ids, chains })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let i = ObjectIndex::empty(3 * (1 << 30) + 5, 1 << 20);
        assert_eq!(i.chunk_count(), 3 * 1024 + 1);
        assert_eq!(i.page_count(), 3 * 8 + 1);
        assert_eq!(i.entries_in_page(24), 1);
        assert_eq!(i.entries_in_page(23), 128);
        assert_eq!(i.chunk_len(3 * 1024), 5);
        assert_eq!(i.chunk_len(0), 1 << 20);
        assert!(i.validate(1 << 20).is_ok());
        assert!(i.validate(1 << 16).is_err());
        let empty = ObjectIndex::empty(0, 1 << 20);
        assert_eq!((empty.chunk_count(), empty.page_count()), (0, 0));
    }

    #[test]
    fn absurd_indexes_are_rejected() {
        let mut i = ObjectIndex::empty(1 << 30, 1 << 20);
        i.pages.push(None);
        assert!(matches!(
            i.validate(1 << 20).unwrap_err(),
            IndexError::PageCount { .. }
        ));
        let huge = ObjectIndex {
            size_bytes: u64::MAX,
            chunk_size_bytes: 1 << 20,
            data_bytes: 0,
            pages: vec![],
        };
        assert!(huge.validate(1 << 20).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_pages_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), entries in 0u64..200) {
            if let Ok(ids) = decode_page(&bytes, entries) {
                proptest::prop_assert_eq!(ids.len() as u64, entries);
            }
        }
    }

    #[test]
    fn pages_round_trip_and_check_length() {
        let ids = vec![HOLE, ChunkId([7; 32])];
        let bytes = encode_page(&ids);
        assert_eq!(decode_page(&bytes, 2).unwrap(), ids);
        assert!(decode_page(&bytes, 3).is_err());
        assert!(decode_page(&bytes[..40], 2).is_err());
    }

    #[test]
    fn pages_with_chains_round_trip_and_reject_chains_of_holes_and_loops() {
        let page = Page {
            ids: vec![HOLE, ChunkId([7; 32]), ChunkId([8; 32])],
            chains: vec![vec![], vec![ChunkId([9; 32]), ChunkId([10; 32])], vec![]],
        };
        let bytes = encode_page_with_bases(&page);
        assert_eq!(bytes.len(), 3 * 32 + 3 + 2 * 32);
        assert_eq!(decode_page_with_bases(&bytes, 3).unwrap(), page);
        assert_eq!(decode_page(&bytes, 3).unwrap(), page.ids);
        assert!(decode_page_with_bases(&bytes[..bytes.len() - 1], 3).is_err());
        // Without any patch, a page is what format 2 wrote.
        let plain = Page::holes(3);
        assert_eq!(encode_page_with_bases(&plain), encode_page(&plain.ids));
        let mut bad = page.clone();
        bad.chains[0] = vec![ChunkId([1; 32])];
        assert_eq!(
            decode_page_with_bases(&encode_page_with_bases(&bad), 3),
            Err(IndexError::BadBase)
        );
        let mut own = page.clone();
        own.chains[1][1] = own.ids[1];
        assert_eq!(
            decode_page_with_bases(&encode_page_with_bases(&own), 3),
            Err(IndexError::BadBase)
        );
        let mut long = page;
        long.chains[1] = (0..=u8::try_from(MAX_CHAIN).unwrap())
            .map(|b| ChunkId([b + 20; 32]))
            .collect();
        assert!(decode_page_with_bases(&encode_page_with_bases(&long), 3).is_err());
    }
}
