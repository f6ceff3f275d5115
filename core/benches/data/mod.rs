//! The benchmarks' disk contents (shared by `core/benches/store.rs` and
//! `tests/benches/checkpoint.rs`): 2 GiB of mixed data generated deterministically —
//! 1 GiB random, 0.5 GiB hole, 0.5 GiB English-like text (zstd ratio about 4.2),
//! 0.5 GiB hole, 0.5 GiB of 4 MiB-aligned copies of earlier blocks — then holes up to the
//! image size. The 1 % change is 320 pieces of 64 KiB of new random data at random
//! 64 KiB-aligned places in the data regions, the granularity of libvirt dirty bitmaps.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
/// Layout: 1 GiB random, 0.5 GiB hole, 0.5 GiB text, 0.5 GiB hole, 0.5 GiB repeats.
pub(crate) const RANDOM: (u64, u64) = (0, GIB);
pub(crate) const TEXT: (u64, u64) = (GIB + GIB / 2, GIB / 2);
pub(crate) const REPEATS: (u64, u64) = (2 * GIB + GIB / 2, GIB / 2);
/// Bytes of data (not holes) in an image.
pub(crate) const DATA_BYTES: u64 = 2 * GIB;
/// The smallest image that holds the layout.
pub(crate) const MIN_IMAGE_BYTES: u64 = 3 * GIB;

#[derive(Debug)]
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: [&str; 32] = [
    "the",
    "virtual",
    "machine",
    "checkpoint",
    "restore",
    "disk",
    "memory",
    "window",
    "store",
    "chunk",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "Rewind",
    "backup",
    "drive",
    "file",
    "system",
    "user",
    "data",
    "time",
    "every",
    "minute",
    "while",
    "running",
    "guest",
    "host",
    "kernel",
    "driver",
];

/// Writes a sparse image of `image_bytes` (at least [`MIN_IMAGE_BYTES`]).
pub(crate) fn make_image(path: &Path, image_bytes: u64) {
    assert!(image_bytes >= MIN_IMAGE_BYTES);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    file.set_len(image_bytes).unwrap();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut buf = vec![0u8; 4 * MIB as usize];
    for off in (RANDOM.0..RANDOM.0 + RANDOM.1).step_by(buf.len()) {
        rng.fill(&mut buf);
        file.write_all_at(&buf, off).unwrap();
    }
    let mut text = Vec::with_capacity(TEXT.1 as usize + 64);
    while (text.len() as u64) < TEXT.1 {
        let w = WORDS[(rng.next() % 32) as usize];
        text.extend_from_slice(w.as_bytes());
        text.push(if rng.next().is_multiple_of(12) {
            b'\n'
        } else {
            b' '
        });
    }
    file.write_all_at(&text[..TEXT.1 as usize], TEXT.0).unwrap();
    // Repeats: 4 MiB-aligned copies of earlier 4 MiB blocks (aligned for every chunk size).
    for off in (REPEATS.0..REPEATS.0 + REPEATS.1).step_by(buf.len()) {
        let src_block = rng.next() % ((TEXT.0 + TEXT.1) / buf.len() as u64);
        let src = src_block * buf.len() as u64;
        let src = if (RANDOM.1..TEXT.0).contains(&src) {
            src - RANDOM.1 / 2
        } else {
            src
        }; // skip the hole
        file.read_exact_at(&mut buf, src).unwrap();
        file.write_all_at(&buf, off).unwrap();
    }
    file.sync_all().unwrap();
}

/// The 1 % change: (offset, 64 KiB of new random data), 320 of them.
pub(crate) fn one_percent_change() -> Vec<(u64, Vec<u8>)> {
    one_percent_change_seeded(0xC4A_4E5)
}

/// A 1 % change like [`one_percent_change`], at places and with data that `seed` picks.
pub(crate) fn one_percent_change_seeded(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng(seed);
    let piece_bytes = 64usize << 10;
    let regions = [RANDOM, TEXT, REPEATS];
    (0..(DATA_BYTES / 100) / piece_bytes as u64)
        .map(|_| {
            let (start, len) = regions[(rng.next() % 3) as usize];
            let off = start + (rng.next() % (len / piece_bytes as u64)) * piece_bytes as u64;
            let mut piece = vec![0u8; piece_bytes];
            rng.fill(&mut piece);
            (off, piece)
        })
        .collect()
}
