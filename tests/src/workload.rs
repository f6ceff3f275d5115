//! Host-side checks of what the guest's `sequence` workload wrote (see `guest.rs`).
//!
//! The guest writes record `i` (1, 2, 3, ...) to 4096-byte block `i` of its disk, in order,
//! flushing each one before it writes the next and before it prints `RWSEQ <i> flushed`.
//! Block 0 is never written. A record is one ASCII line padded with NUL bytes to the block:
//!
//! ```text
//! RWSEQ <i: 10 digits> <guest uptime in centiseconds: 12 digits> <checksum: 10 digits>\n
//! ```
//!
//! with the checksum of [`checksum`]. A consistent image (a crash-consistent copy, a restored
//! backup, a reverted snapshot) therefore holds records `1..=k` and nothing after them.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Size of one record's block.
pub const BLOCK_SIZE: usize = 4096;
/// Length of a record line, newline included.
pub const RECORD_LEN: usize = 41;
/// At most this many problems are listed one by one; the rest are counted.
const MAX_LISTED_PROBLEMS: usize = 100;

/// One valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRecord {
    /// The record's number `i`, also its block number.
    pub index: u64,
    /// The guest's uptime when it made the record, in centiseconds.
    pub uptime_cs: u64,
}

/// What a disk image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceScan {
    /// The valid prefix: records `1..=last_valid`, in order.
    pub records: Vec<SeqRecord>,
    /// `k`, the last record of the valid prefix; 0 if block 1 holds no valid record.
    pub last_valid: u64,
    /// Everything wrong: an invalid record (bad checksum, torn, wrong index), garbage, a
    /// record after a gap or otherwise beyond `last_valid`. Empty if all is well.
    pub problems: Vec<String>,
    /// How many boots of the guest wrote the prefix (its uptime went back that often,
    /// plus one); 0 for an empty disk.
    pub boots: u32,
}

impl SequenceScan {
    /// Whether the image is exactly records `1..=last_valid` followed by empty blocks
    /// (`last_valid` may be 0).
    #[must_use]
    pub fn is_consistent_prefix(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The checksum of a record, as the guest's ash computes it:
/// `(i*2654435761 ^ cs*40503 ^ 1515870810) & 4294967295` (1515870810 = `0x5A5A_5A5A`).
#[must_use]
pub fn checksum(index: u64, uptime_cs: u64) -> u64 {
    (index.wrapping_mul(2_654_435_761) ^ uptime_cs.wrapping_mul(40_503) ^ 0x5A5A_5A5A) & 0xFFFF_FFFF
}

/// Scans raw disk bytes.
#[must_use]
pub fn scan_sequence(disk: &[u8]) -> SequenceScan {
    let mut scanner = Scanner::default();
    for (n, block) in (0u64..).zip(disk.chunks(BLOCK_SIZE)) {
        scanner.block(n, block);
    }
    scanner.finish()
}

/// Scans a disk image file. `format` is `"raw"` (read directly) or `"qcow2"` (converted to a
/// temporary raw file with `qemu-img convert -U`, so the image may be in use by a running VM).
pub fn scan_sequence_file(path: &Path, format: &str) -> io::Result<SequenceScan> {
    match format {
        "raw" => scan_reader(File::open(path).map_err(|e| with_path(&e, "open", path))?),
        "qcow2" => {
            let tmp = TempFile::new()?;
            let out = Command::new("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(&tmp.0)
                .output()
                .map_err(|e| io::Error::new(e.kind(), format!("cannot run qemu-img: {e}")))?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "qemu-img convert of {} failed ({}): {}",
                    path.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            scan_reader(File::open(&tmp.0).map_err(|e| with_path(&e, "open", &tmp.0))?)
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported disk format {other:?} (expected \"raw\" or \"qcow2\")"),
        )),
    }
}

fn with_path(e: &io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {action} {}: {e}", path.display()))
}

fn scan_reader(file: File) -> io::Result<SequenceScan> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for n in 0u64.. {
        let len = read_full(&mut reader, &mut buf)?;
        if len == 0 {
            break;
        }
        scanner.block(n, &buf[..len]);
        if len < BLOCK_SIZE {
            break;
        }
    }
    Ok(scanner.finish())
}

/// Reads until `buf` is full or the end of the input; returns how much it read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A temporary file path, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new() -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("rewind-seqscan-{}-{n}.raw", std::process::id()));
        // qemu-img would overwrite it, but a leftover of a dead run with this pid is not ours.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(with_path(&e, "remove", &path));
            }
            _ => {}
        }
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(std::fs::remove_file(&self.0));
    }
}

enum Block {
    Empty,
    Record(SeqRecord),
    Bad(String),
}

/// Classifies block `n` (never 0).
fn parse_block(n: u64, data: &[u8]) -> Block {
    if data.iter().all(|&b| b == 0) {
        return Block::Empty;
    }
    if data.len() < BLOCK_SIZE {
        return Block::Bad(format!(
            "non-zero bytes in a partial block of {} bytes",
            data.len()
        ));
    }
    let (line, rest) = data.split_at(RECORD_LEN);
    let Some(fields) = parse_line(line) else {
        let shown: String = data[..RECORD_LEN]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        return Block::Bad(format!("not a record: {shown:?}"));
    };
    let (index, uptime_cs, sum) = fields;
    if let Some(pos) = rest.iter().position(|&b| b != 0) {
        return Block::Bad(format!(
            "record {index} is followed by non-zero bytes at offset {}",
            RECORD_LEN + pos
        ));
    }
    if sum != checksum(index, uptime_cs) {
        return Block::Bad(format!(
            "record {index} (uptime {uptime_cs} cs) has an invalid checksum {sum}, expected {}",
            checksum(index, uptime_cs)
        ));
    }
    if index != n {
        return Block::Bad(format!(
            "holds record {index}, which belongs in block {index}"
        ));
    }
    Block::Record(SeqRecord { index, uptime_cs })
}

/// `RWSEQ dddddddddd dddddddddddd dddddddddd\n` → (index, uptime, checksum).
fn parse_line(line: &[u8]) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix(b"RWSEQ ")?;
    let (index, rest) = digits(rest, 10)?;
    let rest = rest.strip_prefix(b" ")?;
    let (uptime, rest) = digits(rest, 12)?;
    let rest = rest.strip_prefix(b" ")?;
    let (sum, rest) = digits(rest, 10)?;
    (rest == b"\n").then_some((index, uptime, sum))
}

fn digits(s: &[u8], n: usize) -> Option<(u64, &[u8])> {
    if s.len() < n || !s[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = s[..n]
        .iter()
        .fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    Some((value, &s[n..]))
}

#[derive(Default)]
struct Scanner {
    records: Vec<SeqRecord>,
    boots: u32,
    /// Why the prefix ended, once it has.
    prefix_end: Option<String>,
    problems: Vec<String>,
    unlisted_problems: usize,
}

impl Scanner {
    fn block(&mut self, n: u64, data: &[u8]) {
        if n == 0 {
            return; // never written by the workload
        }
        match parse_block(n, data) {
            Block::Empty => {
                if self.prefix_end.is_none() {
                    self.prefix_end = Some(format!("block {n} is empty"));
                }
            }
            Block::Record(record) => {
                if let Some(end) = &self.prefix_end {
                    let msg = format!(
                        "record {} after the valid prefix 1..={} ended ({end})",
                        record.index,
                        self.last_valid()
                    );
                    self.problem(msg);
                } else {
                    // The guest carries on after the records on its disk when it boots
                    // again, so an uptime lower than the last record's starts a new boot.
                    if self
                        .records
                        .last()
                        .is_none_or(|prev| record.uptime_cs < prev.uptime_cs)
                    {
                        self.boots += 1;
                    }
                    self.records.push(record);
                }
            }
            Block::Bad(why) => {
                self.problem(format!("block {n}: {why}"));
                if self.prefix_end.is_none() {
                    self.prefix_end = Some(format!("block {n} is invalid"));
                }
            }
        }
    }

    fn last_valid(&self) -> u64 {
        self.records.last().map_or(0, |r| r.index)
    }

    fn problem(&mut self, msg: String) {
        if self.problems.len() < MAX_LISTED_PROBLEMS {
            self.problems.push(msg);
        } else {
            self.unlisted_problems += 1;
        }
    }

    fn finish(mut self) -> SequenceScan {
        if self.unlisted_problems > 0 {
            self.problems
                .push(format!("... and {} more problems", self.unlisted_problems));
        }
        SequenceScan {
            last_valid: self.last_valid(),
            records: self.records,
            problems: self.problems,
            boots: self.boots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_block(index: u64, uptime_cs: u64, sum: u64) -> Vec<u8> {
        let mut block = format!("RWSEQ {index:010} {uptime_cs:012} {sum:010}\n").into_bytes();
        assert_eq!(block.len(), RECORD_LEN);
        block.resize(BLOCK_SIZE, 0);
        block
    }

    /// A disk of `blocks` blocks with valid records at the given indices.
    fn disk(blocks: usize, records: &[u64]) -> Vec<u8> {
        let mut d = vec![0u8; blocks * BLOCK_SIZE];
        for &i in records {
            let up = 1000 + i * 10;
            put(&mut d, i, &record_block(i, up, checksum(i, up)));
        }
        d
    }

    fn put(d: &mut [u8], block: u64, data: &[u8]) {
        let at = usize::try_from(block).unwrap() * BLOCK_SIZE;
        d[at..at + data.len()].copy_from_slice(data);
    }

    #[test]
    fn checksum_matches_busybox_ash() {
        // Printed by the guest's loop run under the busybox-static 1.35 ash.
        assert_eq!(checksum(1, 723_048), 367_254_963);
        assert_eq!(checksum(2, 723_069), 3_081_720_291);
        assert_eq!(checksum(3, 723_090), 1_364_509_719);
    }

    #[test]
    fn valid_prefix() {
        let scan = scan_sequence(&disk(16, &[1, 2, 3, 4, 5]));
        assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
        assert_eq!(scan.last_valid, 5);
        assert_eq!(scan.records.len(), 5);
        assert_eq!(
            scan.records[4],
            SeqRecord {
                index: 5,
                uptime_cs: 1050
            }
        );
    }

    #[test]
    fn all_zero() {
        let scan = scan_sequence(&vec![0u8; 64 * BLOCK_SIZE]);
        assert!(scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 0);
        assert!(scan.records.is_empty());
        assert!(scan_sequence(&[]).is_consistent_prefix());
    }

    #[test]
    fn block_zero_is_ignored() {
        let mut d = disk(8, &[1, 2]);
        d[..5].copy_from_slice(b"MBR!!");
        let scan = scan_sequence(&d);
        assert!(scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 2);
    }

    #[test]
    fn invalid_checksum_ends_prefix() {
        let mut d = disk(16, &[1, 2, 3]);
        put(&mut d, 4, &record_block(4, 1040, checksum(4, 1040) ^ 1));
        let scan = scan_sequence(&d);
        assert!(!scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 3);
        assert_eq!(scan.problems.len(), 1);
        assert!(
            scan.problems[0].contains("invalid checksum"),
            "{:?}",
            scan.problems
        );
    }

    #[test]
    fn torn_record() {
        let mut d = disk(16, &[1, 2, 3, 4]);
        // Only the first 20 bytes of record 4 made it.
        let at = 4 * BLOCK_SIZE;
        d[at + 20..at + BLOCK_SIZE].fill(0);
        let scan = scan_sequence(&d);
        assert!(!scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 3);
        assert!(
            scan.problems[0].starts_with("block 4: not a record"),
            "{:?}",
            scan.problems
        );
    }

    #[test]
    fn gap_then_record() {
        let scan = scan_sequence(&disk(16, &[1, 2, 3, 5]));
        assert!(!scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 3);
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.problems.len(), 1);
        assert!(
            scan.problems[0].contains("record 5 after"),
            "{:?}",
            scan.problems
        );
        assert!(
            scan.problems[0].contains("block 4 is empty"),
            "{:?}",
            scan.problems
        );
    }

    #[test]
    fn record_beyond_invalid_one() {
        let mut d = disk(16, &[1, 2, 4]);
        put(&mut d, 3, b"garbage");
        let scan = scan_sequence(&d);
        assert_eq!(scan.last_valid, 2);
        assert_eq!(scan.problems.len(), 2, "{:?}", scan.problems);
        assert!(scan.problems[1].contains("record 4 after"));
    }

    #[test]
    fn record_in_wrong_block() {
        let mut d = disk(16, &[1, 2]);
        put(&mut d, 3, &record_block(7, 1070, checksum(7, 1070)));
        let scan = scan_sequence(&d);
        assert_eq!(scan.last_valid, 2);
        assert!(
            scan.problems[0].contains("belongs in block 7"),
            "{:?}",
            scan.problems
        );
    }

    #[test]
    fn bytes_after_record() {
        let mut d = disk(16, &[1, 2]);
        d[2 * BLOCK_SIZE + 100] = b'x';
        let scan = scan_sequence(&d);
        assert_eq!(scan.last_valid, 1);
        assert!(
            scan.problems[0].contains("offset 100"),
            "{:?}",
            scan.problems
        );
    }

    #[test]
    fn uptime_going_backwards_is_a_second_boot() {
        let mut d = disk(16, &[1, 2]);
        assert_eq!(scan_sequence(&d).boots, 1);
        put(&mut d, 3, &record_block(3, 5, checksum(3, 5)));
        let scan = scan_sequence(&d);
        assert_eq!(scan.last_valid, 3);
        assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
        assert_eq!(scan.boots, 2);
        assert_eq!(scan_sequence(&disk(16, &[])).boots, 0);
    }

    #[test]
    fn many_problems_are_capped() {
        let mut d = vec![0xffu8; 1000 * BLOCK_SIZE];
        d[..BLOCK_SIZE].fill(0);
        let scan = scan_sequence(&d);
        assert_eq!(scan.problems.len(), MAX_LISTED_PROBLEMS + 1);
        assert!(scan.problems.last().unwrap().contains("899 more"));
    }

    #[test]
    fn raw_file_and_partial_last_block() {
        let path =
            std::env::temp_dir().join(format!("rewind-seqscan-test-{}.raw", std::process::id()));
        let mut d = disk(8, &[1, 2, 3]);
        std::fs::write(&path, &d).unwrap();
        let scan = scan_sequence_file(&path, "raw").unwrap();
        assert!(scan.is_consistent_prefix());
        assert_eq!(scan.last_valid, 3);
        d.extend_from_slice(b"tail");
        std::fs::write(&path, &d).unwrap();
        let scan = scan_sequence_file(&path, "raw").unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(scan.last_valid, 3);
        assert!(
            scan.problems[0].contains("partial block"),
            "{:?}",
            scan.problems
        );
        assert!(scan_sequence_file(&path, "vmdk").is_err());
    }

    #[test]
    fn qcow2_file() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("qemu-img is not installed: qcow2 scanning not tested");
            return;
        }
        let dir = std::env::temp_dir();
        let raw = dir.join(format!("rewind-seqscan-q-{}.raw", std::process::id()));
        let qcow2 = raw.with_extension("qcow2");
        std::fs::write(&raw, disk(32, &[1, 2, 3, 4])).unwrap();
        let status = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2)
            .status()
            .unwrap();
        assert!(status.success());
        let scan = scan_sequence_file(&qcow2, "qcow2");
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&qcow2).unwrap();
        let scan = scan.unwrap();
        assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
        assert_eq!(scan.last_valid, 4);
    }
}
