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
}

impl ChunkKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Data),
            2 => Some(Self::IndexPage),
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
    compressed: bool,
    encrypted: bool,
    /// Length of the content once decoded.
    pub plain_len: u32,
    payload_len: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..4].copy_from_slice(MAGIC);
        h[4] = self.kind as u8;
        h[5] = u8::from(self.compressed);
        h[6] = u8::from(self.encrypted);
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
        if bytes[7] != 0 {
            return Err(ChunkProblem::BadHeader("reserved byte is not zero".into()));
        }
        let plain_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let payload_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if plain_len as usize > MAX_CHUNK_BYTES {
            return Err(ChunkProblem::BadHeader(format!(
                "claims {plain_len} bytes, more than any chunk"
            )));
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
            plain_len,
            payload_len,
        })
    }
}

/// Compresses with zstd, reusing one compression context per thread (creating one per
/// chunk cost allocations and table set-up for every megabyte).
fn compress(data: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        cell.as_mut()?.compress(data).ok()
    })
}

/// Decompresses zstd data of at most `capacity` bytes, reusing one decompression context
/// per thread (a restore decodes chunk after chunk on each of its threads).
fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new()?);
        }
        cell.as_mut().expect("just set").decompress(data, capacity)
    })
}

/// Encodes a chunk file: header, then the (compressed, then sealed) content. Content that
/// does not shrink is stored as it is, which also makes reading it back cheaper.
pub fn encode(
    kind: ChunkKind,
    id: &ChunkId,
    data: &[u8],
    keys: Option<&Keys>,
) -> Result<Vec<u8>, super::StoreError> {
    let plain_len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n as usize <= MAX_CHUNK_BYTES)
        .ok_or_else(|| {
            super::StoreError::Invalid(format!("a chunk of {} bytes is too large", data.len()))
        })?;
    let compressed = compress(data).filter(|c| c.len() < data.len());
    let (body, is_compressed) = match &compressed {
        Some(c) => (c.as_slice(), true),
        None => (data, false),
    };
    let payload_len = body.len()
        + if keys.is_some() {
            SEAL_OVERHEAD_BYTES
        } else {
            0
        };
    let header = Header {
        kind,
        compressed: is_compressed,
        encrypted: keys.is_some(),
        plain_len,
        payload_len: u32::try_from(payload_len).expect("bounded by MAX_CHUNK_BYTES"),
    }
    .to_bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload_len);
    out.extend_from_slice(&header);
    match keys {
        Some(keys) => {
            let sealed = keys
                .seal(body, &aad(&header, id))
                .map_err(|e| super::StoreError::Random(e.to_string()))?;
            debug_assert_eq!(sealed.len(), payload_len);
            out.extend_from_slice(&sealed);
        }
        None => out.extend_from_slice(body),
    }
    Ok(out)
}

/// The associated data of a sealed chunk: its header and its name, so that a chunk cannot
/// be swapped for another or have its header edited without detection.
fn aad(header: &[u8; HEADER_BYTES], id: &ChunkId) -> Vec<u8> {
    let mut a = Vec::with_capacity(HEADER_BYTES + 32);
    a.extend_from_slice(header);
    a.extend_from_slice(&id.0);
    a
}

/// Decodes a whole chunk file and checks it against its name. `keys` must be the store's
/// (a plain chunk in an encrypted store is rejected: it could have been planted). Takes the
/// file's bytes so that content stored as it is comes back without another copy.
pub fn decode(
    mut file: Vec<u8>,
    expected_kind: ChunkKind,
    id: &ChunkId,
    keys: Option<&Keys>,
) -> Result<Vec<u8>, ChunkProblem> {
    let header = Header::parse(&file, file.len() as u64)?;
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
    let opened = match keys {
        Some(keys) => {
            let header_bytes: &[u8; HEADER_BYTES] =
                file[..HEADER_BYTES].try_into().expect("parsed");
            Some(
                keys.open(&file[HEADER_BYTES..], &aad(header_bytes, id))
                    .map_err(|_| ChunkProblem::Tampered)?,
            )
        }
        None => None,
    };
    let body = opened.as_deref().unwrap_or(&file[HEADER_BYTES..]);
    let decompressed = if header.compressed {
        let out = decompress(body, header.plain_len as usize)
            .map_err(|e| ChunkProblem::Undecodable(e.to_string()))?;
        if out.len() != header.plain_len as usize {
            return Err(ChunkProblem::Undecodable(format!(
                "{} bytes where the header says {}",
                out.len(),
                header.plain_len
            )));
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
    let actual = match keys {
        Some(keys) => ChunkId(keys.chunk_id(plain)),
        None => ChunkId(*blake3::hash(plain).as_bytes()),
    };
    if actual != *id {
        return Err(ChunkProblem::HashMismatch);
    }
    Ok(match (decompressed, opened) {
        (Some(plain), _) | (None, Some(plain)) => plain,
        (None, None) => {
            file.drain(..HEADER_BYTES);
            file
        }
    })
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
        let file = encode(ChunkKind::Data, &id, &text, None).unwrap();
        assert!(file.len() < text.len() / 10, "text compresses");
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), text);

        let random: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let id = plain_id(&random);
        let file = encode(ChunkKind::Data, &id, &random, None).unwrap();
        assert_eq!(decode(file, ChunkKind::Data, &id, None).unwrap(), random);
    }

    #[test]
    fn wrong_kind_name_or_truncation_is_detected() {
        let data = b"hello hello hello hello".repeat(10);
        let id = plain_id(&data);
        let file = encode(ChunkKind::Data, &id, &data, None).unwrap();
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
            let _ = decode(bytes, ChunkKind::Data, &id, None);
        }

        /// Any single flipped bit in a plain chunk file is detected.
        #[test]
        fn every_bit_flip_is_detected(data in proptest::collection::vec(any::<u8>(), 1..2000), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let id = plain_id(&data);
            let mut file = encode(ChunkKind::Data, &id, &data, None).unwrap();
            let i = pos.index(file.len());
            file[i] ^= 1 << bit;
            prop_assert!(decode(file, ChunkKind::Data, &id, None).is_err());
        }
    }
}
