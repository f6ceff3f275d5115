//! Patches (store format 3): a data chunk kept as only the pieces in which it differs from
//! another data chunk of the store, its *base*. See `FORMAT.md`, "Patches".
//!
//! A patch holds the content's whole piece tree, so the content's name (the plain BLAKE3
//! of all of it) is known without its base; the pieces it does not hold are the base's,
//! checked against the base's own tree. A base is always a whole chunk with a tree, never
//! a patch, so a read touches at most two files however long a chain of incrementals grew.
//!
//! File: the 16-byte chunk header (kind [`ChunkKind::Patch`], tree flag set, `plain_len`
//! the content's length), then the content's id (32 bytes), the base's id (32), the tree
//! (one chaining value per piece), a bitmap of the pieces held (bit `k % 8` of byte
//! `k / 8`), and the pieces held in order: as they are, or (compressed) a `u32` frame length
//! per piece held followed by one zstd frame per piece.

use std::sync::LazyLock;

use super::chunk::{
    self, CV_BYTES, ChunkId, ChunkKind, ChunkProblem, Cv, FRAME_LEN_BYTES, HEADER_BYTES, Header,
    PIECE_BYTES,
};
use super::error::StoreError;

/// Bytes after the header before the tree: the content's id and the base's.
const NAMES_BYTES: usize = 64;

/// The key of patch names: a patch's name is not the plain BLAKE3 of any content, so it
/// cannot be taken for (or deduplicated with) a whole chunk.
static NAME_KEY: LazyLock<[u8; 32]> =
    LazyLock::new(|| blake3::derive_key("rewind-store 2026-12 patch name", b""));

/// The name of the patch that holds content `content` over base `base`. One content over
/// one base always has the same name, so two writers that store it store the same thing.
#[must_use]
pub fn name(content: &ChunkId, base: &ChunkId) -> ChunkId {
    let mut h = blake3::Hasher::new_keyed(&NAME_KEY);
    h.update(&content.0);
    h.update(&base.0);
    ChunkId(*h.finalize().as_bytes())
}

/// The pieces in which a content (tree `tree`) differs from a base (tree `base`).
#[must_use]
pub fn differing(tree: &[Cv], base: &[Cv]) -> Vec<usize> {
    tree.iter()
        .zip(base)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(k, _)| k)
        .collect()
}

/// Whether a content differing from a base in `differ` of `pieces` pieces is better kept
/// as a patch than whole: at most half of it differs (a patch then costs at most half a
/// chunk, and a read of it at most the base and half a chunk).
#[must_use]
pub fn worth_it(differ: usize, pieces: usize) -> bool {
    differ > 0 && differ * 2 <= pieces
}

fn bitmap_bytes(pieces: usize) -> usize {
    pieces.div_ceil(8)
}

/// Encodes the patch `name(content, base)`: `tree` is the content's, `held` the pieces in
/// which it differs from the base, in order, each with its [`PIECE_BYTES`] of content.
pub fn encode(
    content: &ChunkId,
    base: &ChunkId,
    tree: &[Cv],
    held: &[(usize, &[u8])],
) -> Result<Vec<u8>, StoreError> {
    let pieces = tree.len();
    let plain_len = pieces * PIECE_BYTES;
    if !chunk::takes_tree(plain_len)
        || held.is_empty()
        || held.windows(2).any(|w| w[0].0 >= w[1].0)
        || held
            .iter()
            .any(|(k, piece)| *k >= pieces || piece.len() != PIECE_BYTES)
    {
        return Err(StoreError::Invalid(
            "a patch holds whole pieces, in order, of a chunk with a tree".into(),
        ));
    }
    let mut bitmap = vec![0u8; bitmap_bytes(pieces)];
    for (k, _) in held {
        bitmap[k / 8] |= 1 << (k % 8);
    }
    let raw_len = held.len() * PIECE_BYTES;
    let frames: Option<Vec<Vec<u8>>> = chunk::with_compressor(|zstd| {
        let mut frames = Vec::with_capacity(held.len());
        let mut total = held.len() * FRAME_LEN_BYTES;
        for (_, piece) in held {
            let frame = zstd.compress(piece).ok()?;
            total += frame.len();
            if total >= raw_len {
                return None;
            }
            frames.push(frame);
        }
        Some(frames)
    });
    let mut body = Vec::with_capacity(raw_len);
    match &frames {
        Some(frames) => {
            for frame in frames {
                let len = u32::try_from(frame.len()).expect("a frame of a 64 KiB piece");
                body.extend_from_slice(&len.to_le_bytes());
            }
            for frame in frames {
                body.extend_from_slice(frame);
            }
        }
        None => {
            for (_, piece) in held {
                body.extend_from_slice(piece);
            }
        }
    }
    let payload_len = NAMES_BYTES + pieces * CV_BYTES + bitmap.len() + body.len();
    let header = Header {
        kind: ChunkKind::Patch,
        compressed: frames.is_some(),
        encrypted: false,
        tree: true,
        plain_len: u32::try_from(plain_len).expect("a chunk's length"),
        payload_len: u32::try_from(payload_len).expect("bounded by the chunk's length"),
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + payload_len);
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&content.0);
    out.extend_from_slice(&base.0);
    for cv in tree {
        out.extend_from_slice(cv);
    }
    out.extend_from_slice(&bitmap);
    out.extend_from_slice(&body);
    Ok(out)
}

/// What a patch file says of itself, checked: its name, its content's tree, its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    header: Header,
    /// The content's name (the plain BLAKE3 of the whole content).
    pub content: ChunkId,
    /// The base: a whole data chunk with a tree.
    pub base: ChunkId,
    /// The content's piece tree.
    pub tree: Vec<Cv>,
    /// The pieces the patch holds (those in which it differs from its base), in order.
    pub held: Vec<usize>,
    /// Where the body starts in the file.
    body_at: usize,
}

impl Patch {
    /// Parses a patch file (whole, in memory) named `id`: its header, that `id` is the
    /// name of its content over its base, that its tree adds up to its content's name, and
    /// its bitmap. Pieces are checked only as they are read ([`Patch::read_pieces`]).
    pub fn parse(file: &[u8], id: &ChunkId) -> Result<Self, ChunkProblem> {
        let header = Header::parse(file, file.len() as u64)?;
        if header.kind != ChunkKind::Patch {
            return Err(ChunkProblem::BadHeader(format!(
                "it holds {:?} where a patch was expected",
                header.kind
            )));
        }
        let pieces = header.plain_len as usize / PIECE_BYTES;
        let at_tree = HEADER_BYTES + NAMES_BYTES;
        let at_bitmap = at_tree + pieces * CV_BYTES;
        let body_at = at_bitmap + bitmap_bytes(pieces);
        if file.len() < body_at {
            return Err(ChunkProblem::BadHeader(
                "its payload is shorter than its tree".into(),
            ));
        }
        let content = ChunkId(
            file[HEADER_BYTES..HEADER_BYTES + 32]
                .try_into()
                .expect("32"),
        );
        let base = ChunkId(file[HEADER_BYTES + 32..at_tree].try_into().expect("32"));
        if name(&content, &base) != *id {
            return Err(ChunkProblem::HashMismatch);
        }
        if base == content || base == super::index::HOLE {
            return Err(ChunkProblem::BadHeader(
                "it names itself or nothing as its base".into(),
            ));
        }
        let tree = chunk::stored_tree(&file[at_tree..at_bitmap], &content)?;
        let bitmap = &file[at_bitmap..body_at];
        let held: Vec<usize> = (0..pieces)
            .filter(|k| bitmap[k / 8] & (1 << (k % 8)) != 0)
            .collect();
        if bitmap_bytes(pieces) * 8 > pieces
            && (pieces..bitmap_bytes(pieces) * 8).any(|k| bitmap[k / 8] & (1 << (k % 8)) != 0)
            || held.is_empty()
        {
            return Err(ChunkProblem::BadHeader(
                "its bitmap of pieces is not one of this chunk".into(),
            ));
        }
        Ok(Self {
            header,
            content,
            base,
            tree,
            held,
            body_at,
        })
    }

    /// The content's length.
    #[must_use]
    pub fn content_len(&self) -> usize {
        self.header.plain_len as usize
    }

    /// Decompresses the pieces in `wanted` (sorted) that the patch holds into `out` (the
    /// content's length), each checked against the tree. Returns the pieces of `wanted` it
    /// does not hold: those are the base's.
    pub fn read_pieces(
        &self,
        file: &[u8],
        wanted: &[usize],
        out: &mut [u8],
    ) -> Result<Vec<usize>, ChunkProblem> {
        let body = &file[self.body_at..];
        let count = self.held.len();
        let ranges: Vec<(usize, usize)> = if self.header.compressed {
            let table_len = count * FRAME_LEN_BYTES;
            let table = body
                .get(..table_len)
                .ok_or_else(|| ChunkProblem::BadHeader("its frame table is cut short".into()))?;
            chunk::frame_ranges(table, body.len())?
        } else {
            if body.len() != count * PIECE_BYTES {
                return Err(ChunkProblem::BadHeader(
                    "stored length does not match".into(),
                ));
            }
            (0..count)
                .map(|n| (n * PIECE_BYTES, (n + 1) * PIECE_BYTES))
                .collect()
        };
        let mut missing = Vec::new();
        for &k in wanted {
            let Ok(n) = self.held.binary_search(&k) else {
                missing.push(k);
                continue;
            };
            let (from, to) = ranges[n];
            let piece = &mut out[k * PIECE_BYTES..(k + 1) * PIECE_BYTES];
            if self.header.compressed {
                chunk::decompress_into(&body[from..to], piece)?;
            } else {
                piece.copy_from_slice(&body[from..to]);
            }
            if chunk::piece_cv(k, piece) != self.tree[k] {
                return Err(ChunkProblem::HashMismatch);
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;

    fn content() -> Vec<u8> {
        // 16 pieces: text-like ones and noise-like ones.
        (0..16 * PIECE_BYTES)
            .map(|i| {
                if (i / PIECE_BYTES).is_multiple_of(2) {
                    b"patch me "[i % 9]
                } else {
                    (i.wrapping_mul(2_654_435_761) >> 13) as u8
                }
            })
            .collect()
    }

    #[test]
    fn a_patch_holds_what_differs_and_names_its_content() {
        let base = content();
        let base_tree = chunk::piece_tree(&base);
        let base_id = chunk::tree_root(&base_tree);
        let mut new = base.clone();
        new[3 * PIECE_BYTES + 17] ^= 1;
        new[10 * PIECE_BYTES..11 * PIECE_BYTES].fill(0x5a);
        let tree = chunk::piece_tree(&new);
        let id = chunk::tree_root(&tree);
        assert_eq!(id, ChunkId(*blake3::hash(&new).as_bytes()));
        let differ = differing(&tree, &base_tree);
        assert_eq!(differ, vec![3, 10]);
        assert!(worth_it(differ.len(), 16));
        let held: Vec<(usize, &[u8])> = differ
            .iter()
            .map(|&k| (k, &new[k * PIECE_BYTES..(k + 1) * PIECE_BYTES]))
            .collect();
        let file = encode(&id, &base_id, &tree, &held).unwrap();
        assert!(file.len() < 2 * PIECE_BYTES + 1024, "{} bytes", file.len());
        let patch_id = name(&id, &base_id);
        assert_ne!(patch_id, id);
        let patch = Patch::parse(&file, &patch_id).unwrap();
        assert_eq!(
            (patch.content, patch.base, patch.held.clone()),
            (id, base_id, differ)
        );
        let mut out = base.clone();
        let all: Vec<usize> = (0..16).collect();
        let missing = patch.read_pieces(&file, &all, &mut out).unwrap();
        assert_eq!(missing.len(), 14);
        assert_eq!(out, new, "the held pieces over the base make the content");

        // Another name, a flipped bit anywhere, or a cut file is found.
        assert_eq!(
            Patch::parse(&file, &id).unwrap_err(),
            ChunkProblem::HashMismatch
        );
        for at in [HEADER_BYTES + 3, HEADER_BYTES + 40, HEADER_BYTES + 70] {
            let mut bad = file.clone();
            bad[at] ^= 4;
            assert!(Patch::parse(&bad, &patch_id).is_err(), "flip at {at}");
        }
        let mut bad = file.clone();
        let last = bad.len() - 9;
        bad[last] ^= 1;
        let parsed = Patch::parse(&bad, &patch_id).unwrap();
        assert!(parsed.read_pieces(&bad, &all, &mut out).is_err());
        assert!(Patch::parse(&file[..file.len() - 1], &patch_id).is_err());
    }

    proptest::proptest! {
        /// Whatever a patch file holds, reading it is an answer, never a panic; and a
        /// flipped bit anywhere in a real one never yields other content.
        #[test]
        fn any_patch_file_is_read_without_panic_and_every_flip_is_found(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            pos in proptest::prelude::any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let base = content();
            let base_id = chunk::tree_root(&chunk::piece_tree(&base));
            let mut new = base.clone();
            new[5 * PIECE_BYTES..5 * PIECE_BYTES + 100].copy_from_slice(&[7; 100]);
            let tree = chunk::piece_tree(&new);
            let id = chunk::tree_root(&tree);
            let held = [(5, &new[5 * PIECE_BYTES..6 * PIECE_BYTES])];
            let file = encode(&id, &base_id, &tree, &held).unwrap();
            let patch_id = name(&id, &base_id);
            // Arbitrary bytes after a real header and names.
            let mut odd = file[..HEADER_BYTES + NAMES_BYTES].to_vec();
            odd.extend_from_slice(&tail);
            if let Ok(p) = Patch::parse(&odd, &patch_id) {
                let mut out = vec![0; p.content_len()];
                let all: Vec<usize> = (0..p.tree.len()).collect();
                drop(p.read_pieces(&odd, &all, &mut out));
            }
            // A flipped bit anywhere is found, or (a bit zstd does not need, such as one of
            // a frame's window size) the content read is still exactly the original.
            let mut bad = file.clone();
            bad[pos.index(file.len())] ^= 1 << bit;
            let read = Patch::parse(&bad, &patch_id).and_then(|p| {
                let mut out = base.clone();
                p.read_pieces(&bad, &p.held, &mut out).map(|_| out)
            });
            if let Ok(out) = read {
                proptest::prop_assert!(out == new, "a flip changed what was read");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let id = ChunkId([3; 32]);
        for len in [0, 15, 16, 80, 600, 5000] {
            let mut bytes = vec![0u8; len];
            if len >= HEADER_BYTES {
                bytes[..4].copy_from_slice(b"RWCK");
                bytes[4] = 3;
                bytes[7] = 1;
                bytes[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
                bytes[12..16].copy_from_slice(&((len - HEADER_BYTES) as u32).to_le_bytes());
            }
            assert!(Patch::parse(&bytes, &id).is_err());
        }
    }
}
