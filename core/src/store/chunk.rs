//! Chunks: the content-addressed, compressed (and optionally encrypted) files that hold all
//! data of a store. See `FORMAT.md`, "Chunk files".

use std::fmt;

use super::crypto::{Keys, SEAL_OVERHEAD_BYTES};

/// Length of a chunk file's header.
pub const HEADER_BYTES: usize = 16;
/// The largest chunk (uncompressed) any store may hold.
pub const MAX_CHUNK_BYTES: usize = 16 << 20;
const MAGIC: &[u8; 4] = b"RWCK";
/// zstd level: measured in `benches/store.rs` (level 1 keeps ingest above 400 MB/s on one core).
const ZSTD_LEVEL: i32 = 1;
/// The pieces a chunk's tree names: QEMU's default dirty-bitmap granularity, so that a
/// restore writing back a few dirty extents of a chunk reads and checks only those.
pub const PIECE_BYTES: usize = 64 << 10;
/// Length of a BLAKE3 chaining value, one per piece in a tree.
pub const CV_BYTES: usize = 32;
/// Length of each entry of the frame table of a compressed chunk with a tree.
pub(super) const FRAME_LEN_BYTES: usize = 4;
/// A piece's BLAKE3 chaining value.
pub type Cv = [u8; CV_BYTES];

/// Whether a data chunk of `plain_len` bytes in an unencrypted store of format 2 or later
/// carries a tree: its length is a power of two of at least two pieces, so every piece is
/// a whole subtree of BLAKE3's tree over it.
#[must_use]
pub fn takes_tree(plain_len: usize) -> bool {
    plain_len.is_power_of_two() && plain_len >= 2 * PIECE_BYTES
}

/// The key of a store's chunk names, and so of its piece trees: `None` in an unencrypted
/// store (plain BLAKE3), the chunk-id key in an encrypted one (keyed BLAKE3).
pub type TreeKey<'a> = Option<&'a [u8; 32]>;

/// The tree key of a store with `keys`.
#[must_use]
pub fn tree_key(keys: Option<&Keys>) -> TreeKey<'_> {
    keys.map(Keys::chunk_id_key)
}

/// The BLAKE3 chaining value of every [`PIECE_BYTES`] piece of `data` (whose length passes
/// [`takes_tree`]), keyed with `key` in an encrypted store.
#[must_use]
pub fn piece_tree(data: &[u8], key: TreeKey<'_>) -> Vec<[u8; CV_BYTES]> {
    debug_assert!(takes_tree(data.len()));
    data.chunks(PIECE_BYTES)
        .enumerate()
        .map(|(k, piece)| piece_cv(k, piece, key))
        .collect()
}

/// The BLAKE3 chaining value of piece number `k` of a chunk (keyed with `key`).
#[must_use]
pub fn piece_cv(k: usize, piece: &[u8], key: TreeKey<'_>) -> [u8; CV_BYTES] {
    use blake3::hazmat::HasherExt;
    key.map_or_else(blake3::Hasher::new, blake3::Hasher::new_keyed)
        .set_input_offset((k * PIECE_BYTES) as u64)
        .update(piece)
        .finalize_non_root()
}

/// The chunk id (BLAKE3 of the whole content, keyed with `key`) that a tree of two or more
/// pieces, a power of two of them, adds up to.
#[must_use]
pub fn tree_root(tree: &[[u8; CV_BYTES]], key: TreeKey<'_>) -> ChunkId {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    debug_assert!(tree.len() >= 2 && tree.len().is_power_of_two());
    let mode = key.map_or(Mode::Hash, Mode::KeyedHash);
    let mut level = tree.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|pair| merge_subtrees_non_root(&pair[0], &pair[1], mode))
            .collect();
    }
    ChunkId(*merge_subtrees_root(&level[0], &level[1], mode).as_bytes())
}

/// The name of a chunk: BLAKE3 of its content (keyed in encrypted stores).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Parses 64 lowercase hex digits.
    #[must_use]
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut bytes = [0; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// 64 lowercase hex digits.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkId::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("a chunk id is 64 lowercase hex digits"))
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Disk, NVRAM, TPM or memory data.
    Data = 1,
    /// A page of an index: the chunk ids of up to 128 data chunks.
    IndexPage = 2,
    /// Data as the pieces in which it differs from another data chunk, its base (store
    /// format 3; see `patch.rs`). Read where data is expected.
    Patch = 3,
}

impl ChunkKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Data),
            2 => Some(Self::IndexPage),
            3 => Some(Self::Patch),
            _ => None,
        }
    }
}

/// What is wrong with a chunk that was read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkProblem {
    /// No file.
    #[error("missing")]
    Missing,
    /// The file is shorter than its header says.
    #[error("truncated ({0})")]
    Truncated(String),
    /// The header is not a chunk header, or does not fit this store.
    #[error("damaged: {0}")]
    BadHeader(String),
    /// Authentication of the encrypted content failed.
    #[error("damaged: it fails authentication (modified or corrupted)")]
    Tampered,
    /// The compressed content does not decompress.
    #[error("damaged: it does not decompress ({0})")]
    Undecodable(String),
    /// The content does not hash to the chunk's name.
    #[error("damaged: its content does not match its name")]
    HashMismatch,
    /// The file could not be read.
    #[error("unreadable: {0}")]
    Unreadable(String),
}

/// Parsed chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the chunk holds.
    pub kind: ChunkKind,
    pub(super) compressed: bool,
    pub(crate) encrypted: bool,
    /// The payload starts with the chaining values of the content's pieces.
    pub(super) tree: bool,
    /// Length of the content once decoded.
    pub plain_len: u32,
    pub(super) payload_len: u32,
}

impl Header {
    pub(super) fn to_bytes(self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..4].copy_from_slice(MAGIC);
        h[4] = self.kind as u8;
        h[5] = u8::from(self.compressed);
        h[6] = u8::from(self.encrypted);
        h[7] = u8::from(self.tree);
        h[8..12].copy_from_slice(&self.plain_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h
    }

    /// Parses and checks a header; `file_len` is the whole file's length.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Self, ChunkProblem> {
        if bytes.len() < HEADER_BYTES {
            return Err(ChunkProblem::Truncated(format!(
                "{} bytes, no complete header",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(ChunkProblem::BadHeader(
                "it does not start with RWCK".into(),
            ));
        }
        let kind = ChunkKind::from_byte(bytes[4])
            .ok_or_else(|| ChunkProblem::BadHeader(format!("unknown kind {}", bytes[4])))?;
        let flag = |i: usize, what: &str| match bytes[i] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(ChunkProblem::BadHeader(format!("unknown {what} {other}"))),
        };
        let compressed = flag(5, "compression")?;
        let encrypted = flag(6, "encryption")?;
        let tree = flag(7, "tree flag")?;
        let plain_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let payload_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if plain_len as usize > MAX_CHUNK_BYTES {
            return Err(ChunkProblem::BadHeader(format!(
                "claims {plain_len} bytes, more than any chunk"
            )));
        }
        if kind == ChunkKind::Patch && !tree {
            return Err(ChunkProblem::BadHeader(
                "a patch without a tree is not of this format".into(),
            ));
        }
        if tree {
            if kind == ChunkKind::IndexPage || !takes_tree(plain_len as usize) {
                return Err(ChunkProblem::BadHeader(
                    "it has a tree where none can be".into(),
                ));
            }
            let sealed = if encrypted { SEAL_OVERHEAD_BYTES } else { 0 };
            if (payload_len as usize) < plain_len as usize / PIECE_BYTES * CV_BYTES + sealed {
                return Err(ChunkProblem::BadHeader(
                    "its payload is shorter than its tree".into(),
                ));
            }
        }
        let expected = HEADER_BYTES as u64 + u64::from(payload_len);
        if file_len < expected {
            return Err(ChunkProblem::Truncated(format!(
                "{file_len} of {expected} bytes"
            )));
        }
        if file_len > expected {
            return Err(ChunkProblem::BadHeader(format!(
                "{file_len} bytes where {expected} were written"
            )));
        }
        Ok(Self {
            kind,
            compressed,
            encrypted,
            tree,
            plain_len,
            payload_len,
        })
    }

    /// Bytes of the tree at the start of the payload (sealed apart in an encrypted chunk).
    pub(super) fn tree_bytes(self) -> usize {
        match (self.tree, self.encrypted) {
            (false, _) => 0,
            (true, false) => self.plain_len as usize / PIECE_BYTES * CV_BYTES,
            (true, true) => self.plain_len as usize / PIECE_BYTES * CV_BYTES + SEAL_OVERHEAD_BYTES,
        }
    }
}

/// Runs `f` with this thread's zstd compression context (creating one per chunk cost
/// allocations and table set-up for every megabyte).
pub(super) fn with_compressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> Option<T>,
) -> Option<T> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        f(cell.as_mut()?)
    })
}

/// Runs `f` with this thread's zstd decompression context (a restore decodes chunk after
/// chunk on each of its threads).
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new()?);
        }
        f(cell.as_mut().expect("just set"))
    })
}

/// Appends `data` compressed to `out`, if that takes fewer bytes than `data`: one zstd
/// frame, or — for a chunk with a tree (`pieces`) — each piece as a frame of its own after
/// a table of their lengths (`u32` each), so that one piece can be decompressed without the
/// others (text stores ~6 % larger this way, and a restore of a few dirty pieces
/// decompresses a sixteenth of a 1 MiB chunk instead of all of it). The frames are written
/// straight into `out`'s spare room, which bounds them: no buffer per frame, no copy.
/// Returns whether it appended; if not, `out` is as it was.
fn compress_into(data: &[u8], pieces: bool, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    if data.is_empty() {
        return false;
    }
    // Room for a body as long as the content, which is one byte too long to be kept.
    out.reserve_exact(data.len());
    let done = with_compressor(|zstd| {
        let mut append = |out: &mut Vec<u8>, src: &[u8]| {
            let at = out.len() as u64;
            let mut cursor = std::io::Cursor::new(out);
            cursor.set_position(at);
            zstd.compress_to_buffer(src, &mut cursor).ok()
        };
        if !pieces {
            return append(out, data).map(drop);
        }
        let count = data.len() / PIECE_BYTES;
        out.resize(start + count * FRAME_LEN_BYTES, 0);
        for (k, piece) in data.chunks(PIECE_BYTES).enumerate() {
            let len = u32::try_from(append(out, piece)?).ok()?;
            let entry = start + k * FRAME_LEN_BYTES;
            out[entry..entry + FRAME_LEN_BYTES].copy_from_slice(&len.to_le_bytes());
            if out.len() - start >= data.len() {
                return None;
            }
        }
        Some(())
    });
    let kept = done.is_some() && out.len() - start < data.len();
    if !kept {
        out.truncate(start);
    }
    kept
}

/// Decompresses one zstd frame of exactly `out.len()` bytes into `out`.
pub(super) fn decompress_into(frame: &[u8], out: &mut [u8]) -> Result<(), ChunkProblem> {
    let got = with_decompressor(|zstd| zstd.decompress_to_buffer(frame, out))
        .map_err(|e| ChunkProblem::Undecodable(e.to_string()))?;
    if got == out.len() {
        Ok(())
    } else {
        Err(ChunkProblem::Undecodable(format!(
            "{got} bytes where {} were expected",
            out.len()
        )))
    }
}

/// The byte ranges (inside the body) of the frames of a compressed body with a tree, from
/// its table of frame lengths (`table`, one `u32` per piece); `body_len` is the whole
/// body's length, table included.
pub(super) fn frame_ranges(
    table: &[u8],
    body_len: usize,
) -> Result<Vec<(usize, usize)>, ChunkProblem> {
    let mut at = table.len();
    let ranges: Vec<(usize, usize)> = table
        .chunks_exact(FRAME_LEN_BYTES)
        .map(|len| {
            let len = u32::from_le_bytes(len.try_into().expect("exact chunks")) as usize;
            let range = (at, at.saturating_add(len));
            at = range.1;
            range
        })
        .collect();
    if at == body_len {
        Ok(ranges)
    } else {
        Err(ChunkProblem::BadHeader(format!(
            "its pieces' frames add up to {at} bytes, its body has {body_len}"
        )))
    }
}

/// Encodes a chunk file: header, then `tree` (the content's [`piece_tree`], for a data
/// chunk of an unencrypted store that takes one), then the (compressed, then sealed)
/// content. Content that does not shrink is stored as it is, which also makes reading it
/// back cheaper.
pub fn encode(
    kind: ChunkKind,
    id: &ChunkId,
    data: &[u8],
    keys: Option<&Keys>,
    tree: Option<&[[u8; CV_BYTES]]>,
) -> Result<Vec<u8>, super::StoreError> {
    let plain_len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n as usize <= MAX_CHUNK_BYTES)
        .ok_or_else(|| {
            super::StoreError::Invalid(format!("a chunk of {} bytes is too large", data.len()))
        })?;
    if tree.is_some_and(|t| {
        kind != ChunkKind::Data || !takes_tree(data.len()) || t.len() * PIECE_BYTES != data.len()
    }) {
        return Err(super::StoreError::Invalid(
            "a tree only goes with a data chunk of whole pieces".into(),
        ));
    }
    // In an encrypted chunk the tree is sealed by itself, so that it can be read without
    // the body.
    let tree_bytes = tree.map_or(0, |t| {
        t.len() * CV_BYTES
            + if keys.is_some() {
                SEAL_OVERHEAD_BYTES
            } else {
                0
            }
    });
    let pieces = tree.is_some();
    let tree_plain: Vec<u8> = tree.unwrap_or_default().concat();
    let Some(keys) = keys else {
        // Header, tree and body built in one buffer: the body is compressed straight into
        // it, or (content that does not shrink) copied once.
        let mut out = Vec::with_capacity(HEADER_BYTES + tree_bytes + data.len());
        out.extend_from_slice(&[0; HEADER_BYTES]);
        out.extend_from_slice(&tree_plain);
        let compressed = compress_into(data, pieces, &mut out);
        if !compressed {
            out.extend_from_slice(data);
        }
        let header = Header {
            kind,
            compressed,
            encrypted: false,
            tree: pieces,
            plain_len,
            payload_len: u32::try_from(out.len() - HEADER_BYTES)
                .expect("bounded by MAX_CHUNK_BYTES"),
        };
        out[..HEADER_BYTES].copy_from_slice(&header.to_bytes());
        return Ok(out);
    };
    let mut compressed = Vec::new();
    let is_compressed = compress_into(data, pieces, &mut compressed);
    let body = if is_compressed { &compressed[..] } else { data };
    let payload_len = tree_bytes + body.len() + SEAL_OVERHEAD_BYTES;
    let header = Header {
        kind,
        compressed: is_compressed,
        encrypted: true,
        tree: pieces,
        plain_len,
        payload_len: u32::try_from(payload_len).expect("bounded by MAX_CHUNK_BYTES"),
    }
    .to_bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload_len);
    out.extend_from_slice(&header);
    if pieces {
        // In an encrypted chunk the tree is sealed by itself, so that it can be read
        // without the body.
        out.extend_from_slice(
            &keys
                .seal(&tree_plain, &tree_aad(&header, id))
                .map_err(|e| super::StoreError::Random(e.to_string()))?,
        );
    }
    let sealed = keys
        .seal(body, &aad(&header, id))
        .map_err(|e| super::StoreError::Random(e.to_string()))?;
    debug_assert_eq!(sealed.len() + tree_bytes, payload_len);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The associated data of the sealed tree of an encrypted chunk: as [`aad`], and a mark
/// that it is the tree (a tree cannot pass for a body, or the reverse).
fn tree_aad(header: &[u8; HEADER_BYTES], id: &ChunkId) -> Vec<u8> {
    let mut a = aad(header, id);
    a.extend_from_slice(b" tree");
    a
}

/// The associated data of a sealed chunk: its header and its name, so that a chunk cannot
/// be swapped for another or have its header edited without detection.
fn aad(header: &[u8; HEADER_BYTES], id: &ChunkId) -> Vec<u8> {
    let mut a = Vec::with_capacity(HEADER_BYTES + 32);
    a.extend_from_slice(header);
    a.extend_from_slice(&id.0);
    a
}

/// Checks what `header` says against what the caller expects of the chunk.
pub(super) fn check_header(
    header: Header,
    expected_kind: ChunkKind,
    keys: Option<&Keys>,
) -> Result<(), ChunkProblem> {
    if header.kind != expected_kind {
        return Err(ChunkProblem::BadHeader(format!(
            "it holds {:?} where {expected_kind:?} was expected",
            header.kind
        )));
    }
    if header.encrypted != keys.is_some() {
        return Err(ChunkProblem::BadHeader(if header.encrypted {
            "it is encrypted but the store is not".into()
        } else {
            "it is not encrypted but the store is".into()
        }));
    }
    Ok(())
}

/// The tree stored at the start of a payload, checked against the chunk's name.
pub(super) fn stored_tree(
    bytes: &[u8],
    id: &ChunkId,
    key: TreeKey<'_>,
) -> Result<Vec<[u8; CV_BYTES]>, ChunkProblem> {
    let tree: Vec<[u8; CV_BYTES]> = bytes
        .chunks_exact(CV_BYTES)
        .map(|cv| cv.try_into().expect("exact chunks"))
        .collect();
    if !bytes.len().is_multiple_of(CV_BYTES) || tree.len() < 2 || !tree.len().is_power_of_two() {
        return Err(ChunkProblem::BadHeader(
            "its tree is not one of whole pieces".into(),
        ));
    }
    if tree_root(&tree, key) != *id {
        return Err(ChunkProblem::HashMismatch);
    }
    Ok(tree)
}

/// Decodes a whole chunk file and checks it against its name (and its tree, if it has
/// one). `keys` must be the store's (a plain chunk in an encrypted store is rejected: it
/// could have been planted). Takes the file's bytes so that content stored as it is comes
/// back without another copy.
pub fn decode(
    mut file: Vec<u8>,
    expected_kind: ChunkKind,
    id: &ChunkId,
    keys: Option<&Keys>,
) -> Result<Vec<u8>, ChunkProblem> {
    let header = Header::parse(&file, file.len() as u64)?;
    check_header(header, expected_kind, keys)?;
    let body_at = HEADER_BYTES + header.tree_bytes();
    let header_bytes: [u8; HEADER_BYTES] = file[..HEADER_BYTES].try_into().expect("parsed");
    let opened = match keys {
        Some(keys) => Some(
            keys.open(&file[body_at..], &aad(&header_bytes, id))
                .map_err(|_| ChunkProblem::Tampered)?,
        ),
        None => None,
    };
    let tree = if header.tree {
        Some(open_tree(
            &file[HEADER_BYTES..body_at],
            &header_bytes,
            id,
            keys,
        )?)
    } else {
        None
    };
    let body = opened.as_deref().unwrap_or(&file[body_at..]);
    let decompressed = if header.compressed {
        let mut out = vec![0; header.plain_len as usize];
        if header.tree {
            let table = body
                .get(..header.plain_len as usize / PIECE_BYTES * FRAME_LEN_BYTES)
                .ok_or_else(|| ChunkProblem::BadHeader("its frame table is cut short".into()))?;
            for (k, (from, to)) in frame_ranges(table, body.len())?.into_iter().enumerate() {
                decompress_into(
                    &body[from..to],
                    &mut out[k * PIECE_BYTES..(k + 1) * PIECE_BYTES],
                )?;
            }
        } else {
            decompress_into(body, &mut out)?;
        }
        Some(out)
    } else {
        if body.len() != header.plain_len as usize {
            return Err(ChunkProblem::BadHeader(
                "stored length does not match".into(),
            ));
        }
        None
    };
    let plain = decompressed.as_deref().unwrap_or(body);
    if let Some(tree) = tree {
        // The content must match its tree piece by piece, and the tree the name: a damaged
        // tree is found now, not only by a later partial read.
        if piece_tree(plain, tree_key(keys)) != tree {
            return Err(ChunkProblem::HashMismatch);
        }
    } else {
        let actual = match keys {
            Some(keys) => ChunkId(keys.chunk_id(plain)),
            None => ChunkId(*blake3::hash(plain).as_bytes()),
        };
        if actual != *id {
            return Err(ChunkProblem::HashMismatch);
        }
    }
    Ok(match (decompressed, opened) {
        (Some(plain), _) | (None, Some(plain)) => plain,
        (None, None) => {
            file.drain(..body_at);
            file
        }
    })
}

/// Whether a chunk file (its first bytes at least) is a patch.
#[must_use]
pub fn is_patch(file: &[u8]) -> bool {
    file.len() > 4 && &file[..4] == MAGIC && file[4] == ChunkKind::Patch as u8
}

/// The pieces (sorted, each once) that byte ranges of a chunk's content touch.
#[must_use]
pub fn pieces_of(ranges: &[(u64, u64)]) -> Vec<usize> {
    let mut pieces: Vec<usize> = ranges
        .iter()
        .filter(|&&(from, to)| from < to)
        .flat_map(|&(from, to)| {
            let first = usize::try_from(from).unwrap_or(usize::MAX) / PIECE_BYTES;
            let last = usize::try_from(to - 1).unwrap_or(usize::MAX) / PIECE_BYTES;
            first..=last
        })
        .collect();
    pieces.sort_unstable();
    pieces.dedup();
    pieces
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(unreadable)`
fn unreadable(e: std::io::Error) -> ChunkProblem {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ChunkProblem::Truncated(e.to_string()),
        _ => ChunkProblem::Unreadable(e.to_string()),
    }
}

/// Reads the tree of a data chunk file that has one (`header`, already parsed from it),
/// checked against the chunk's name.
pub(super) fn read_tree<F: ReadAt + ?Sized>(
    file: &F,
    header: Header,
    id: &ChunkId,
    keys: Option<&Keys>,
) -> Result<Vec<Cv>, ChunkProblem> {
    if !header.tree || header.kind != ChunkKind::Data {
        return Err(ChunkProblem::BadHeader("it has no tree".into()));
    }
    check_header(header, ChunkKind::Data, keys)?;
    let mut tree_bytes = vec![0; header.tree_bytes()];
    file.read_exact_at(&mut tree_bytes, HEADER_BYTES as u64)
        .map_err(unreadable)?;
    open_tree(&tree_bytes, &header.to_bytes(), id, keys)
}

/// The tree as stored after the header (`stored`: sealed in an encrypted chunk), opened
/// and checked against the chunk's name.
fn open_tree(
    stored: &[u8],
    header: &[u8; HEADER_BYTES],
    id: &ChunkId,
    keys: Option<&Keys>,
) -> Result<Vec<Cv>, ChunkProblem> {
    match keys {
        Some(keys) => {
            let plain = keys
                .open(stored, &tree_aad(header, id))
                .map_err(|_| ChunkProblem::Tampered)?;
            stored_tree(&plain, id, Some(keys.chunk_id_key()))
        }
        None => stored_tree(stored, id, None),
    }
}

/// For a data chunk file with a tree (`header`, already parsed from it): reads its tree,
/// checked against the chunk's name, then reads (decompressing each piece's own frame)
/// pieces `pieces` (sorted, each once, each < the chunk's piece count) into `out` (set to
/// the content's length), each checked against the tree. The rest of `out` is left as it
/// was. Returns the tree.
pub(super) fn read_tree_pieces<F: ReadAt + ?Sized>(
    file: &F,
    header: Header,
    id: &ChunkId,
    keys: Option<&Keys>,
    pieces: &[usize],
    out: &mut Vec<u8>,
) -> Result<Vec<Cv>, ChunkProblem> {
    let tree = read_tree(file, header, id, keys)?;
    let plain_len = header.plain_len as usize;
    if pieces.iter().any(|&k| k >= tree.len()) {
        return Err(ChunkProblem::BadHeader(format!(
            "it holds {plain_len} bytes, fewer than the pieces to read need"
        )));
    }
    out.resize(plain_len, 0);
    let tree_len = header.tree_bytes();
    let body_at = (HEADER_BYTES + tree_len) as u64;
    let body_len = header.payload_len as usize - tree_len;
    // Many pieces (a patch's base, read for all the pieces its patches do not hold): one
    // read of the whole body instead of one per piece. An encrypted body is opened whole.
    let (body, body_len) = if pieces.len() * 4 > tree.len() || keys.is_some() {
        let mut body = vec![0; body_len];
        file.read_exact_at(&mut body, body_at).map_err(unreadable)?;
        if let Some(keys) = keys {
            body = keys
                .open(&body, &aad(&header.to_bytes(), id))
                .map_err(|_| ChunkProblem::Tampered)?;
        }
        let len = body.len();
        (Some(body), len)
    } else {
        (None, body_len)
    };
    let read = |buf: &mut [u8], at: usize| -> Result<(), ChunkProblem> {
        match &body {
            Some(body) => {
                buf.copy_from_slice(&body[at..at + buf.len()]);
                Ok(())
            }
            None => file
                .read_exact_at(buf, body_at + at as u64)
                .map_err(unreadable),
        }
    };
    if header.compressed {
        let mut table = vec![0; plain_len / PIECE_BYTES * FRAME_LEN_BYTES];
        if table.len() > body_len {
            return Err(ChunkProblem::BadHeader(
                "its frame table is cut short".into(),
            ));
        }
        read(&mut table, 0)?;
        let frames = frame_ranges(&table, body_len)?;
        let mut frame = Vec::new();
        for &k in pieces {
            let (from, to) = frames[k];
            frame.resize(to - from, 0);
            read(&mut frame, from)?;
            decompress_into(&frame, &mut out[k * PIECE_BYTES..(k + 1) * PIECE_BYTES])?;
        }
    } else {
        if body_len != plain_len {
            return Err(ChunkProblem::BadHeader(
                "stored length does not match".into(),
            ));
        }
        for &k in pieces {
            read(
                &mut out[k * PIECE_BYTES..(k + 1) * PIECE_BYTES],
                k * PIECE_BYTES,
            )?;
        }
    }
    for &k in pieces {
        if piece_cv(
            k,
            &out[k * PIECE_BYTES..(k + 1) * PIECE_BYTES],
            tree_key(keys),
        ) != tree[k]
        {
            return Err(ChunkProblem::HashMismatch);
        }
    }
    Ok(tree)
}

/// A chunk file to read parts of: an open file, or its bytes already in memory.
pub trait ReadAt {
    /// Fills `buf` from `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let part = from
            .checked_add(buf.len())
            .and_then(|to| self.get(from..to))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(part);
        Ok(())
    }
}

/// Decodes only what `ranges` (byte ranges of the content) need of a data chunk file
/// `file` of `file_len` bytes into `out`, which is set to the content's length: with a
/// tree, only the pieces the ranges touch are read (and decompressed: each piece is a
/// frame of its own) and each is checked against the tree, and the tree against the
/// chunk's name; the rest of `out` is left as it was. Without a tree (or encrypted), the
/// whole chunk is decoded and checked. Returns whether only part was decoded.
pub fn decode_ranges<F: ReadAt + ?Sized>(
    file: &F,
    file_len: u64,
    id: &ChunkId,
    keys: Option<&Keys>,
    ranges: &[(u64, u64)],
    out: &mut Vec<u8>,
) -> Result<bool, ChunkProblem> {
    let whole = |out: &mut Vec<u8>| -> Result<bool, ChunkProblem> {
        let len = usize::try_from(file_len)
            .ok()
            .filter(|&n| n <= HEADER_BYTES + 2 * MAX_CHUNK_BYTES)
            .ok_or_else(|| ChunkProblem::BadHeader(format!("{file_len} bytes is too long")))?;
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, 0).map_err(unreadable)?;
        *out = decode(bytes, ChunkKind::Data, id, keys)?;
        Ok(false)
    };
    let mut head = [0; HEADER_BYTES];
    file.read_exact_at(&mut head, 0).map_err(unreadable)?;
    let header = Header::parse(&head, file_len)?;
    check_header(header, ChunkKind::Data, keys)?;
    let plain_len = header.plain_len as usize;
    if ranges
        .iter()
        .any(|&(from, to)| from >= to || to > plain_len as u64)
    {
        return Err(ChunkProblem::BadHeader(format!(
            "it holds {plain_len} bytes, fewer than the ranges to read need"
        )));
    }
    if !header.tree || ranges.is_empty() {
        return whole(out);
    }
    let pieces = pieces_of(ranges);
    read_tree_pieces(file, header, id, keys, &pieces, out)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    fn plain_id(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let text = b"the quick brown fox ".repeat(3000);
        let id = plain_id(&text);
        let file = encode(ChunkKind::Data, &id, &text, None, None).unwrap();
        assert!(file.len() < text.len() / 10, "text compresses");
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), text);

        let random: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let id = plain_id(&random);
        let file = encode(ChunkKind::Data, &id, &random, None, None).unwrap();
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), random);
    }

    /// `n` bytes that zstd cannot shrink.
    fn noise(seed: u32, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn pieces_are_framed_as_a_table_of_lengths_then_one_frame_each() {
        // Text, noise and zeros in turn: every piece its own zstd level-1 frame, as
        // `FORMAT.md` describes, whatever buffer they are compressed into.
        let mut data = Vec::new();
        for k in 0..16u32 {
            data.extend(match k % 3 {
                0 => b"the virtual machine checkpoint ".repeat(PIECE_BYTES / 31 + 1)[..PIECE_BYTES]
                    .to_vec(),
                1 => noise(k, PIECE_BYTES),
                _ => vec![0; PIECE_BYTES],
            });
        }
        let tree = piece_tree(&data, None);
        let id = tree_root(&tree, None);
        let file = encode(ChunkKind::Data, &id, &data, None, Some(&tree)).unwrap();
        let mut expected = tree.concat();
        let frames: Vec<Vec<u8>> = data
            .chunks(PIECE_BYTES)
            .map(|p| zstd::bulk::compress(p, ZSTD_LEVEL).unwrap())
            .collect();
        for f in &frames {
            expected.extend_from_slice(&(f.len() as u32).to_le_bytes());
        }
        expected.extend(frames.concat());
        assert_eq!(file[HEADER_BYTES..], expected[..]);
        let header = Header::parse(&file[..HEADER_BYTES], file.len() as u64).unwrap();
        assert!(header.compressed && header.tree);
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), data);
    }

    #[test]
    fn content_that_does_not_shrink_is_stored_as_it_is() {
        let data = noise(7, 16 * PIECE_BYTES);
        let tree = piece_tree(&data, None);
        let id = tree_root(&tree, None);
        let file = encode(ChunkKind::Data, &id, &data, None, Some(&tree)).unwrap();
        let header = Header::parse(&file[..HEADER_BYTES], file.len() as u64).unwrap();
        assert!(!header.compressed);
        assert_eq!(file[HEADER_BYTES + tree.len() * CV_BYTES..], data[..]);
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), data);
        // Without a tree, and with nothing at all.
        for data in [noise(8, 3000), Vec::new()] {
            let id = plain_id(&data);
            let file = encode(ChunkKind::Data, &id, &data, None, None).unwrap();
            assert_eq!(file.len(), HEADER_BYTES + data.len());
            assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), data);
        }
    }

    #[test]
    fn wrong_kind_name_or_truncation_is_detected() {
        let data = b"hello hello hello hello".repeat(10);
        let id = plain_id(&data);
        let file = encode(ChunkKind::Data, &id, &data, None, None).unwrap();
        assert!(matches!(
            decode(file.clone(), ChunkKind::IndexPage, &id, None),
            Err(ChunkProblem::BadHeader(_))
        ));
        assert_eq!(
            decode(file.clone(), ChunkKind::Data, &plain_id(b"other"), None),
            Err(ChunkProblem::HashMismatch)
        );
        assert!(matches!(
            decode(file[..file.len() - 1].to_vec(), ChunkKind::Data, &id, None),
            Err(ChunkProblem::Truncated(_))
        ));
        assert!(matches!(
            decode(file[..5].to_vec(), ChunkKind::Data, &id, None),
            Err(ChunkProblem::Truncated(_))
        ));
    }

    /// Random-looking bytes (incompressible) and text (compressible), `len` of each.
    fn samples(len: usize) -> [Vec<u8>; 2] {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let random = (0..len)
            .map(|_| {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let text = b"every piece of this chunk is text, "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect();
        [random, text]
    }

    fn with_tree(data: &[u8]) -> (ChunkId, Vec<u8>) {
        let tree = piece_tree(data, None);
        let id = tree_root(&tree, None);
        (
            id,
            encode(ChunkKind::Data, &id, data, None, Some(&tree)).unwrap(),
        )
    }

    #[test]
    fn a_keyed_tree_adds_up_to_the_keyed_blake3_and_an_encrypted_chunk_reads_in_pieces() {
        let keys = Keys::generate().unwrap();
        let key = Some(keys.chunk_id_key());
        for data in samples(1 << 20) {
            let tree = piece_tree(&data, key);
            let id = tree_root(&tree, key);
            assert_eq!(id.0, keys.chunk_id(&data));
            assert_ne!(tree, piece_tree(&data, None), "keyed differs from plain");
            let file = encode(ChunkKind::Data, &id, &data, Some(&keys), Some(&tree)).unwrap();
            assert_eq!(file[7], 1, "it has a tree");
            assert_eq!(
                decode(file.clone(), ChunkKind::Data, &id, Some(&keys)).unwrap(),
                data
            );
            let mut out = Vec::new();
            let ranges = [(70_000, 70_100), (900_000, 900_020)];
            decode_ranges(
                &file[..],
                file.len() as u64,
                &id,
                Some(&keys),
                &ranges,
                &mut out,
            )
            .unwrap();
            assert_eq!(out[70_000..70_100], data[70_000..70_100]);
            let header = Header::parse(&file, file.len() as u64).unwrap();
            assert_eq!(
                read_tree(&file[..], header, &id, Some(&keys)).unwrap(),
                tree
            );
            // Without the keys, or with a flipped bit in the sealed tree: refused.
            assert!(decode(file.clone(), ChunkKind::Data, &id, None).is_err());
            let mut bad = file.clone();
            bad[HEADER_BYTES + 30] ^= 1;
            assert_eq!(
                read_tree(&bad[..], header, &id, Some(&keys)).unwrap_err(),
                ChunkProblem::Tampered
            );
            assert!(decode(bad, ChunkKind::Data, &id, Some(&keys)).is_err());
        }
    }

    #[test]
    fn an_encrypted_chunk_with_a_payload_shorter_than_its_sealed_tree_is_refused() {
        let keys = Keys::generate().unwrap();
        let id = ChunkId([5; 32]);
        for payload in [16 * 32, 16 * 32 + 10, 16 * 32 + SEAL_OVERHEAD_BYTES - 1] {
            let header = Header {
                kind: ChunkKind::Data,
                compressed: true,
                encrypted: true,
                tree: true,
                plain_len: 1 << 20,
                payload_len: payload as u32,
            };
            let mut file = header.to_bytes().to_vec();
            file.resize(HEADER_BYTES + payload, 7);
            assert!(decode(file.clone(), ChunkKind::Data, &id, Some(&keys)).is_err());
            let mut out = Vec::new();
            let ranges = [(0, 10)];
            let len = file.len() as u64;
            assert!(decode_ranges(&file[..], len, &id, Some(&keys), &ranges, &mut out).is_err());
        }
    }

    #[test]
    fn a_tree_adds_up_to_the_plain_blake3_of_the_whole_chunk() {
        assert!(!takes_tree(PIECE_BYTES));
        assert!(!takes_tree(3 * PIECE_BYTES));
        for len in [2 * PIECE_BYTES, 1 << 20, 4 << 20] {
            assert!(takes_tree(len));
            for data in samples(len) {
                assert_eq!(
                    tree_root(&piece_tree(&data, None), None),
                    plain_id(&data),
                    "{len} bytes"
                );
            }
        }
    }

    #[test]
    fn a_chunk_with_a_tree_decodes_whole_and_in_checked_pieces() {
        for data in samples(1 << 20) {
            let (id, file) = with_tree(&data);
            assert_eq!(
                decode(file.clone(), ChunkKind::Data, &id, None).unwrap(),
                data
            );
            // Two ranges in pieces 3 and 7..=8, one unaligned.
            let ranges = [
                (3 * 65536 + 100, 3 * 65536 + 200),
                (7 * 65536 + 5, 9 * 65536),
            ];
            let mut out = vec![0xAA; 10];
            let partial = decode_ranges(&file[..], file.len() as u64, &id, None, &ranges, &mut out);
            assert_eq!(partial, Ok(true));
            assert_eq!(out.len(), data.len());
            for k in [3, 7, 8] {
                let piece = k * PIECE_BYTES..(k + 1) * PIECE_BYTES;
                assert_eq!(out[piece.clone()], data[piece], "piece {k}");
            }
            // No ranges, or a chunk without a tree: decoded whole.
            let mut out = Vec::new();
            assert_eq!(
                decode_ranges(&file[..], file.len() as u64, &id, None, &[], &mut out),
                Ok(false)
            );
            assert_eq!(out, data);
            let id = plain_id(&data);
            let file = encode(ChunkKind::Data, &id, &data, None, None).unwrap();
            let mut out = Vec::new();
            assert_eq!(
                decode_ranges(&file[..], file.len() as u64, &id, None, &ranges, &mut out),
                Ok(false)
            );
            assert_eq!(out, data);
        }
    }

    #[test]
    fn damage_to_a_piece_read_or_to_the_tree_is_found_by_a_partial_read() {
        let [random, text] = samples(1 << 20);
        let (id, file) = with_tree(&random);
        assert!(file[5] == 0, "random bytes are stored as they are");
        let tree_bytes = 16 * CV_BYTES;
        let read = |file: &[u8], ranges: &[(u64, u64)]| {
            decode_ranges(file, file.len() as u64, &id, None, ranges, &mut Vec::new())
        };
        let piece_2 = [(2 * 65536, 2 * 65536 + 10)];
        // A flipped bit in piece 2 of the content.
        let mut bad = file.clone();
        bad[HEADER_BYTES + tree_bytes + 2 * PIECE_BYTES + 17] ^= 4;
        assert_eq!(read(&bad, &piece_2), Err(ChunkProblem::HashMismatch));
        // A partial read of another piece does not see it; reading the whole chunk does.
        assert_eq!(read(&bad, &[(0, 10)]), Ok(true));
        assert_eq!(
            decode(bad, ChunkKind::Data, &id, None),
            Err(ChunkProblem::HashMismatch)
        );
        // A flipped bit in the tree fails both ways.
        let mut bad = file.clone();
        bad[HEADER_BYTES + 5 * CV_BYTES + 1] ^= 1;
        assert_eq!(read(&bad, &[(0, 10)]), Err(ChunkProblem::HashMismatch));
        assert_eq!(
            decode(bad, ChunkKind::Data, &id, None),
            Err(ChunkProblem::HashMismatch)
        );
        // Ranges beyond the chunk, and a wrong name.
        assert!(matches!(
            read(&file, &[(0, (1 << 20) + 1)]),
            Err(ChunkProblem::BadHeader(_))
        ));
        assert!(matches!(
            read(&file, &[(5, 5)]),
            Err(ChunkProblem::BadHeader(_))
        ));
        let other = plain_id(b"other");
        assert_eq!(
            decode_ranges(
                &file[..],
                file.len() as u64,
                &other,
                None,
                &piece_2,
                &mut Vec::new()
            ),
            Err(ChunkProblem::HashMismatch)
        );
        // A compressed chunk cut short, or damaged before a piece read.
        let (id, file) = with_tree(&text);
        assert!(file[5] == 1, "text is stored compressed");
        let cut = &file[..file.len() - 3];
        assert!(matches!(
            decode_ranges(
                cut,
                cut.len() as u64,
                &id,
                None,
                &[(0, 10)],
                &mut Vec::new()
            ),
            Err(ChunkProblem::Truncated(_))
        ));
        let mut bad = file.clone();
        let n = bad.len();
        bad[n - 40] ^= 0x10;
        assert!(
            decode_ranges(
                &bad[..],
                n as u64,
                &id,
                None,
                &[(15 << 16, 1 << 20)],
                &mut Vec::new()
            )
            .is_err()
        );
        // A tree where none may be: on an index page, or on a chunk of one piece.
        let mut bad = file;
        bad[4] = ChunkKind::IndexPage as u8;
        assert!(matches!(
            Header::parse(&bad, bad.len() as u64),
            Err(ChunkProblem::BadHeader(_))
        ));
        let small = &random[..PIECE_BYTES];
        let tree = [piece_cv(0, small, None)];
        assert!(encode(ChunkKind::Data, &plain_id(small), small, None, Some(&tree)).is_err());
    }

    #[test]
    fn hex_names() {
        let id = plain_id(b"x");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
        assert_eq!(ChunkId::from_hex("../../etc/passwd"), None);
        assert_eq!(ChunkId::from_hex(&"g".repeat(64)), None);
    }

    proptest! {
        /// Whatever bytes a chunk file holds, decoding answers Ok only for the true content.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let id = plain_id(b"content");
            drop(decode(bytes, ChunkKind::Data, &id, None));
        }

        /// Whatever bytes a chunk file holds, a partial read answers Ok only with the true
        /// pieces.
        #[test]
        fn partial_reads_of_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), from in 0u64..300_000, len in 1u64..300_000) {
            let [data, _] = samples(2 * PIECE_BYTES);
            let (id, mut file) = with_tree(&data);
            file.truncate(16 + 64);
            file.extend_from_slice(&bytes);
            let mut out = Vec::new();
            if decode_ranges(&file[..], file.len() as u64, &id, None, &[(from, from + len)], &mut out).is_ok() {
                prop_assert_eq!(&out[from as usize..(from + len) as usize], &data[from as usize..(from + len) as usize]);
            }
        }

        /// Any single flipped bit in a plain chunk file is detected.
        #[test]
        fn every_bit_flip_is_detected(data in proptest::collection::vec(any::<u8>(), 1..2000), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let id = plain_id(&data);
            let mut file = encode(ChunkKind::Data, &id, &data, None, None).unwrap();
            let i = pos.index(file.len());
            file[i] ^= 1 << bit;
            prop_assert!(decode(file, ChunkKind::Data, &id, None).is_err());
        }
    }
}
