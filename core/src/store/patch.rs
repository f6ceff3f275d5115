//! Patches (store format 3): a data chunk kept as only the pieces in which it differs from
//! another data chunk of the store, its *base*. See `FORMAT.md`, "Patches".
//!
//! A patch holds the content's whole piece tree, so the content's name (the BLAKE3 of all
//! of it, keyed in an encrypted store) is known without its base; the pieces it does not
//! hold are the base's (a patch in turn, or a whole chunk), checked against the tree.
//!
//! File: the 16-byte chunk header (kind [`ChunkKind::Patch`], tree flag set, `plain_len`
//! the content's length), then the content's id (32 bytes), the base's id (32), then the
//! *rest*: the tree (one chaining value per piece), a bitmap of the pieces held (bit
//! `k % 8` of byte `k / 8`), and the pieces held in order: as they are, or (compressed) a
//! `u32` frame length per piece held followed by one zstd frame per piece. In an encrypted
//! store the rest is sealed, with the header, the patch's name and both ids as associated
//! data.

use std::sync::LazyLock;

use super::chunk::{
    self, CV_BYTES, ChunkId, ChunkKind, ChunkProblem, Cv, FRAME_LEN_BYTES, HEADER_BYTES, Header,
    PIECE_BYTES,
};
use super::crypto::{Keys, SEAL_OVERHEAD_BYTES};
use super::error::StoreError;

/// Bytes after the header before the tree: the content's id and the base's.
const NAMES_BYTES: usize = 64;

/// Context of the key of patch names.
const NAME_CONTEXT: &str = "rewind-store 2026-12 patch name";

/// The key of patch names in an unencrypted store: a patch's name is not the plain BLAKE3
/// of any content, so it cannot be taken for (or deduplicated with) a whole chunk.
static NAME_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(NAME_CONTEXT, b""));

/// The name of the patch that holds content `content` over base `base`, in a store with
/// `keys` (in an encrypted one the key comes from the store's chunk-id key). One content
/// over one base always has the same name, so two writers that store it store the same
/// thing.
#[must_use]
pub fn name(content: &ChunkId, base: &ChunkId, keys: Option<&Keys>) -> ChunkId {
    let key = keys.map_or(*NAME_KEY, |k| {
        blake3::derive_key(NAME_CONTEXT, k.chunk_id_key())
    });
    let mut h = blake3::Hasher::new_keyed(&key);
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
/// as a patch than whole: at most half of it differs.
#[must_use]
pub fn worth_it(differ: usize, pieces: usize) -> bool {
    differ > 0 && differ * 2 <= pieces
}

fn bitmap_bytes(pieces: usize) -> usize {
    pieces.div_ceil(8)
}

/// The associated data of a sealed patch.
fn aad(header: &[u8; HEADER_BYTES], name: &ChunkId, names: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(HEADER_BYTES + 32 + NAMES_BYTES);
    a.extend_from_slice(header);
    a.extend_from_slice(&name.0);
    a.extend_from_slice(names);
    a
}

/// Encodes the patch `name(content, base)`: `tree` is the content's, `held` the pieces in
/// which it differs from the base, in order, each with its [`PIECE_BYTES`] of content.
pub fn encode(
    content: &ChunkId,
    base: &ChunkId,
    tree: &[Cv],
    held: &[(usize, &[u8])],
    keys: Option<&Keys>,
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
    let mut rest = Vec::with_capacity(pieces * CV_BYTES + bitmap.len() + raw_len);
    for cv in tree {
        rest.extend_from_slice(cv);
    }
    rest.extend_from_slice(&bitmap);
    match &frames {
        Some(frames) => {
            for frame in frames {
                let len = u32::try_from(frame.len()).expect("a frame of a 64 KiB piece");
                rest.extend_from_slice(&len.to_le_bytes());
            }
            for frame in frames {
                rest.extend_from_slice(frame);
            }
        }
        None => {
            for (_, piece) in held {
                rest.extend_from_slice(piece);
            }
        }
    }
    let sealed_len = rest.len() + keys.map_or(0, |_| SEAL_OVERHEAD_BYTES);
    let header = Header {
        kind: ChunkKind::Patch,
        compressed: frames.is_some(),
        encrypted: keys.is_some(),
        tree: true,
        plain_len: u32::try_from(plain_len).expect("a chunk's length"),
        payload_len: u32::try_from(NAMES_BYTES + sealed_len)
            .expect("bounded by the chunk's length"),
    }
    .to_bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + NAMES_BYTES + sealed_len);
    out.extend_from_slice(&header);
    out.extend_from_slice(&content.0);
    out.extend_from_slice(&base.0);
    match keys {
        Some(keys) => {
            let patch_name = name(content, base, Some(keys));
            let sealed = keys
                .seal(&rest, &aad(&header, &patch_name, &out[HEADER_BYTES..]))
                .map_err(|e| StoreError::Random(e.to_string()))?;
            out.extend_from_slice(&sealed);
        }
        None => out.extend_from_slice(&rest),
    }
    Ok(out)
}

/// What a patch file says of itself, checked: its name, its content's tree, its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    header: Header,
    /// The content's name.
    pub content: ChunkId,
    /// The base: a whole data chunk with a tree, or a patch.
    pub base: ChunkId,
    /// The content's piece tree.
    pub tree: Vec<Cv>,
    /// The pieces the patch holds (those in which it differs from its base), in order.
    pub held: Vec<usize>,
    /// The held pieces as stored (opened, in an encrypted store).
    body: Vec<u8>,
    /// The tree key of the store.
    key: Option<[u8; 32]>,
}

impl Patch {
    /// Parses a patch file (whole, in memory) named `id` of a store with `keys`: its
    /// header, that `id` is the name of its content over its base, that it opens (in an
    /// encrypted store), that its tree adds up to its content's name, and its bitmap.
    /// Pieces are checked only as they are read ([`Patch::read_pieces`]).
    pub fn parse(file: &[u8], id: &ChunkId, keys: Option<&Keys>) -> Result<Self, ChunkProblem> {
        let header = Header::parse(file, file.len() as u64)?;
        chunk::check_header(header, ChunkKind::Patch, keys)?;
        let pieces = header.plain_len as usize / PIECE_BYTES;
        let at_rest = HEADER_BYTES + NAMES_BYTES;
        if file.len() < at_rest {
            return Err(ChunkProblem::BadHeader(
                "its payload is shorter than its names".into(),
            ));
        }
        let content = ChunkId(
            file[HEADER_BYTES..HEADER_BYTES + 32]
                .try_into()
                .expect("32"),
        );
        let base = ChunkId(file[HEADER_BYTES + 32..at_rest].try_into().expect("32"));
        if name(&content, &base, keys) != *id {
            return Err(ChunkProblem::HashMismatch);
        }
        if base == content || base == super::index::HOLE {
            return Err(ChunkProblem::BadHeader(
                "it names itself or nothing as its base".into(),
            ));
        }
        let mut rest = match keys {
            Some(keys) => {
                let head: [u8; HEADER_BYTES] = file[..HEADER_BYTES].try_into().expect("16");
                keys.open(
                    &file[at_rest..],
                    &aad(&head, id, &file[HEADER_BYTES..at_rest]),
                )
                .map_err(|_| ChunkProblem::Tampered)?
            }
            None => file[at_rest..].to_vec(),
        };
        let at_bitmap = pieces * CV_BYTES;
        let body_at = at_bitmap + bitmap_bytes(pieces);
        if rest.len() < body_at {
            return Err(ChunkProblem::BadHeader(
                "its payload is shorter than its tree".into(),
            ));
        }
        let key = chunk::tree_key(keys).copied();
        let tree = chunk::stored_tree(&rest[..at_bitmap], &content, key.as_ref())?;
        let bitmap = &rest[at_bitmap..body_at];
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
        let body = rest.split_off(body_at);
        Ok(Self {
            header,
            content,
            base,
            tree,
            held,
            body,
            key,
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
        wanted: &[usize],
        out: &mut [u8],
    ) -> Result<Vec<usize>, ChunkProblem> {
        let body = &self.body;
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
            if chunk::piece_cv(k, piece, self.key.as_ref()) != self.tree[k] {
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
        let base_tree = chunk::piece_tree(&base, None);
        let base_id = chunk::tree_root(&base_tree, None);
        let mut new = base.clone();
        new[3 * PIECE_BYTES + 17] ^= 1;
        new[10 * PIECE_BYTES..11 * PIECE_BYTES].fill(0x5a);
        let tree = chunk::piece_tree(&new, None);
        let id = chunk::tree_root(&tree, None);
        assert_eq!(id, ChunkId(*blake3::hash(&new).as_bytes()));
        let differ = differing(&tree, &base_tree);
        assert_eq!(differ, vec![3, 10]);
        assert!(worth_it(differ.len(), 16));
        let held: Vec<(usize, &[u8])> = differ
            .iter()
            .map(|&k| (k, &new[k * PIECE_BYTES..(k + 1) * PIECE_BYTES]))
            .collect();
        let file = encode(&id, &base_id, &tree, &held, None).unwrap();
        assert!(file.len() < 2 * PIECE_BYTES + 1024, "{} bytes", file.len());
        let patch_id = name(&id, &base_id, None);
        assert_ne!(patch_id, id);
        let patch = Patch::parse(&file, &patch_id, None).unwrap();
        assert_eq!(
            (patch.content, patch.base, patch.held.clone()),
            (id, base_id, differ)
        );
        let mut out = base.clone();
        let all: Vec<usize> = (0..16).collect();
        let missing = patch.read_pieces(&all, &mut out).unwrap();
        assert_eq!(missing.len(), 14);
        assert_eq!(out, new, "the held pieces over the base make the content");

        // Another name, a flipped bit anywhere, or a cut file is found.
        assert_eq!(
            Patch::parse(&file, &id, None).unwrap_err(),
            ChunkProblem::HashMismatch
        );
        for at in [HEADER_BYTES + 3, HEADER_BYTES + 40, HEADER_BYTES + 70] {
            let mut bad = file.clone();
            bad[at] ^= 4;
            assert!(Patch::parse(&bad, &patch_id, None).is_err(), "flip at {at}");
        }
        let mut bad = file.clone();
        let last = bad.len() - 9;
        bad[last] ^= 1;
        let parsed = Patch::parse(&bad, &patch_id, None).unwrap();
        assert!(parsed.read_pieces(&all, &mut out).is_err());
        assert!(Patch::parse(&file[..file.len() - 1], &patch_id, None).is_err());
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
            let base_id = chunk::tree_root(&chunk::piece_tree(&base, None), None);
            let mut new = base.clone();
            new[5 * PIECE_BYTES..5 * PIECE_BYTES + 100].copy_from_slice(&[7; 100]);
            let tree = chunk::piece_tree(&new, None);
            let id = chunk::tree_root(&tree, None);
            let held = [(5, &new[5 * PIECE_BYTES..6 * PIECE_BYTES])];
            let file = encode(&id, &base_id, &tree, &held, None).unwrap();
            let patch_id = name(&id, &base_id, None);
            // Arbitrary bytes after a real header and names.
            let mut odd = file[..HEADER_BYTES + NAMES_BYTES].to_vec();
            odd.extend_from_slice(&tail);
            if let Ok(p) = Patch::parse(&odd, &patch_id, None) {
                let mut out = vec![0; p.content_len()];
                let all: Vec<usize> = (0..p.tree.len()).collect();
                drop(p.read_pieces(&all, &mut out));
            }
            // A flipped bit anywhere is found, or (a bit zstd does not need, such as one of
            // a frame's window size) the content read is still exactly the original.
            let mut bad = file.clone();
            bad[pos.index(file.len())] ^= 1 << bit;
            let read = Patch::parse(&bad, &patch_id, None).and_then(|p| {
                let mut out = base.clone();
                p.read_pieces(&p.held, &mut out).map(|_| out)
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
            assert!(Patch::parse(&bytes, &id, None).is_err());
        }
    }
}
