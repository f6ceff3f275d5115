//! LZNT1, the compression of NTFS-compressed files, written from its public description
//! ([MS-XCA] 2.5, "LZNT1 Algorithm Details").
//!
//! A compression unit (16 clusters) is stored as a run of chunks. Each chunk starts with a
//! 16-bit little-endian header: 0 ends the data; otherwise its low 12 bits are the chunk's
//! size minus 3 (header included), and its top bit says whether the chunk is compressed.
//! A chunk stands for 4096 bytes of output. An uncompressed chunk holds them as they are; a
//! compressed one is a series of groups: a flag byte, then up to eight items, one per bit
//! from the lowest: a literal byte (bit clear) or a 16-bit back reference (bit set) whose
//! split between offset and length depends on how much of the chunk is already written.

/// The output one chunk stands for.
const CHUNK: usize = 4096;

/// Why compressed data could not be decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Corrupt(pub(super) &'static str);

/// Decompresses `input` (one compression unit as stored) into `out`, whose length is the
/// unit's size. Whatever the data does not cover is left zero, as NTFS reads it.
pub(super) fn decompress(input: &[u8], out: &mut [u8]) -> Result<(), Corrupt> {
    out.fill(0);
    let mut at = 0; // in `input`
    let mut chunk_start = 0; // in `out`
    while chunk_start < out.len() {
        let Some(header) = input.get(at..at + 2) else {
            break;
        };
        let header = u16::from_le_bytes([header[0], header[1]]);
        if header == 0 {
            break;
        }
        let size = usize::from(header & 0x0fff) + 1; // bytes after the header
        let data = input
            .get(at + 2..at + 2 + size)
            .ok_or(Corrupt("a chunk runs past the end of the compression unit"))?;
        at += 2 + size;
        let end = (chunk_start + CHUNK).min(out.len());
        let chunk = &mut out[chunk_start..end];
        if header & 0x8000 == 0 {
            // Stored as is.
            let n = data.len().min(chunk.len());
            chunk[..n].copy_from_slice(&data[..n]);
        } else {
            decompress_chunk(data, chunk)?;
        }
        chunk_start = end;
    }
    Ok(())
}

/// Decompresses one compressed chunk into `chunk` (at most 4096 bytes). Output past what
/// the chunk encodes stays as it is (zero).
fn decompress_chunk(data: &[u8], chunk: &mut [u8]) -> Result<(), Corrupt> {
    let mut i = 0;
    let mut pos = 0;
    while i < data.len() {
        let flags = data[i];
        i += 1;
        for bit in 0..8 {
            if i >= data.len() {
                return Ok(());
            }
            if flags & (1 << bit) == 0 {
                if pos >= chunk.len() {
                    return Err(Corrupt("a chunk decompresses to more than 4096 bytes"));
                }
                chunk[pos] = data[i];
                pos += 1;
                i += 1;
            } else {
                let token = data
                    .get(i..i + 2)
                    .ok_or(Corrupt("a back reference is cut short"))?;
                let token = u16::from_le_bytes([token[0], token[1]]);
                i += 2;
                if pos == 0 {
                    return Err(Corrupt("a back reference before any byte"));
                }
                // The more is written, the more bits the offset takes (4 at least, 12 at
                // most); the length has the rest.
                let mut length_bits = 12u32;
                let mut p = pos - 1;
                while p >= 0x10 {
                    length_bits -= 1;
                    p >>= 1;
                }
                let length = usize::from(token & ((1u16 << length_bits) - 1)) + 3;
                let offset = usize::from(token >> length_bits) + 1;
                if offset > pos {
                    return Err(Corrupt("a back reference before the start of its chunk"));
                }
                if pos + length > chunk.len() {
                    return Err(Corrupt("a chunk decompresses to more than 4096 bytes"));
                }
                // Byte by byte: a reference may overlap what it writes.
                for k in pos..pos + length {
                    chunk[k] = chunk[k - offset];
                }
                pos += length;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressed chunk's header for `data` bytes after it.
    fn header(data: usize) -> [u8; 2] {
        u16::try_from(0xb000 | (data - 1)).unwrap().to_le_bytes()
    }

    #[test]
    fn literals_and_an_overlapping_reference() {
        // "abc" then a reference to 3 bytes back, 9 long: "abcabcabcabc".
        // At pos 3, (pos - 1) = 2 < 16: 12 length bits, 4 offset bits.
        let token: u16 = (2 << 12) | (9 - 3);
        let mut data = vec![0b0000_1000, b'a', b'b', b'c'];
        data.extend_from_slice(&token.to_le_bytes());
        let mut input = header(data.len()).to_vec();
        input.extend_from_slice(&data);
        input.extend_from_slice(&[0, 0]);
        let mut out = vec![0xff; 8192];
        decompress(&input, &mut out).unwrap();
        assert_eq!(&out[..12], b"abcabcabcabc");
        assert!(out[12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_split_moves_with_the_position() {
        // 20 literals, then at pos 20 ((pos - 1) = 19 >= 16: 11 length bits, 5 offset
        // bits) a reference 20 back, 20 long.
        let literals: Vec<u8> = (b'A'..b'A' + 20).collect();
        let mut data = Vec::new();
        for group in literals.chunks(8) {
            data.push(0);
            data.extend_from_slice(group);
        }
        // The last group holds 4 literals; its flag byte's bit 4 marks the reference.
        let last_flags = data.len() - 5;
        data[last_flags] = 1 << 4;
        let token: u16 = (19 << 11) | (20 - 3);
        data.extend_from_slice(&token.to_le_bytes());
        let mut input = header(data.len()).to_vec();
        input.extend_from_slice(&data);
        let mut out = vec![0; 4096];
        decompress(&input, &mut out).unwrap();
        assert_eq!(&out[..20], &literals[..]);
        assert_eq!(&out[20..40], &literals[..]);
    }

    #[test]
    fn stored_chunks_and_two_chunks() {
        // An uncompressed chunk (4096 bytes), then a compressed one with one literal.
        let mut input = (0x3000u16 | 4095).to_le_bytes().to_vec();
        input.extend((0..4096).map(|i| u8::try_from(i % 251).unwrap()));
        input.extend_from_slice(&header(2));
        input.extend_from_slice(&[0, b'z']);
        let mut out = vec![0; 16 * 4096];
        decompress(&input, &mut out).unwrap();
        assert!((0..4096).all(|i| out[i] == u8::try_from(i % 251).unwrap()));
        assert_eq!(out[4096], b'z');
        assert!(out[4097..].iter().all(|&b| b == 0));
    }

    #[test]
    fn damaged_data_is_an_error() {
        // A reference before any byte.
        let mut input = header(3).to_vec();
        input.extend_from_slice(&[1, 0, 0]);
        assert!(decompress(&input, &mut [0; 4096]).is_err());
        // A chunk longer than what is there.
        assert!(decompress(&header(100), &mut [0; 4096]).is_err());
        // Random input: errors or output, never a panic.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut input = vec![0u8; 600];
            for byte in &mut input {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state.to_le_bytes()[0];
            }
            decompress(&input, &mut [0; 8192]).ok();
        }
    }
}
