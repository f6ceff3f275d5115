//! Reading exFAT volumes (USB sticks' and SD cards' images), read-only, by a small parser
//! written from Microsoft's public exFAT specification.
//!
//! The exFAT crates on crates.io (`exfat` 0.1, `exfat-fs` 0.1) were not fit for a volume
//! anyone may have written: both load the whole FAT into memory by a size the boot sector
//! claims, follow cluster chains without a bound (a loop never ends), and `exfat` has no
//! times and rejects the volume GUID entry Windows writes.
//!
//! What is read: the boot sector, the active FAT, the up-case table (for names compared as
//! Windows does, ignoring case), and the directory entry sets of folders: a file entry
//! (0x85), its stream extension (0xC0) and its file names (0xC1); other entries are
//! skipped. Entry sets whose checksum is wrong are skipped, as Windows does. Files stored
//! without a FAT chain (`NoFatChain`) are read as one run of clusters; bytes past a file's
//! valid data length are read as zeros.
//!
//! Times are the last-modified timestamp with its 10 ms increment, turned to UTC by its
//! UTC offset when that is marked valid, and read as UTC when it is not.
//!
//! Every loop is bounded: a cluster chain by the number of clusters of the volume (a
//! longer chain loops), a folder by the 256 MiB exFAT allows.

use std::io::Write;
use std::panic::AssertUnwindSafe;

use super::{Entry, EntryKind, FileTree, Timestamp, TreeError, VolumeDisk};
use crate::progress::Control;

/// The largest folder exFAT allows.
const MAX_FOLDER_BYTES: u64 = 256 << 20;

/// How much of a file is written at a time (and how often cancelling is checked).
const BLOCK: usize = 1 << 20;

/// How much of the FAT is read at once.
const FAT_CACHE: u64 = 64 << 10;

/// The largest up-case table read: one that maps all 65 536 UTF-16 units, uncompressed.
const MAX_UPCASE_BYTES: u64 = 128 << 10;

/// Opens the exFAT file system on `disk`.
///
/// # Errors
/// The boot sector is not an exFAT one, the root folder cannot be read, or reading failed.
pub fn open(disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    let volume = guarded(|| Volume::open(disk))?;
    Ok(Box::new(ExfatTree { volume }))
}

/// Runs `parse`, turning a panic (a bug on input nobody foresaw) into an error.
fn guarded<T>(parse: impl FnOnce() -> Result<T, TreeError>) -> Result<T, TreeError> {
    std::panic::catch_unwind(AssertUnwindSafe(parse))
        .unwrap_or_else(|_| Err(damaged("the exFAT records could not be parsed".to_owned())))
}

fn damaged(detail: String) -> TreeError {
    TreeError::Damaged { detail }
}

/// An exFAT volume.
struct ExfatTree {
    volume: Volume,
}

impl std::fmt::Debug for ExfatTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExfatTree")
            .field("cluster_count", &self.volume.cluster_count)
            .finish_non_exhaustive()
    }
}

/// Where some data lies in the cluster heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Data {
    /// Its first cluster (0: none).
    first: u32,
    /// Whether its clusters follow each other, with no FAT chain (`NoFatChain`).
    contiguous: bool,
    /// Its length in bytes; `None` for the root folder, which runs to the end of its chain.
    length: Option<u64>,
}

/// One file or folder of a folder, from its directory entry set.
#[derive(Debug, Clone)]
struct Item {
    name: String,
    folder: bool,
    modified: Option<Timestamp>,
    data: Data,
    /// The bytes of it that were written (the rest reads as zeros).
    valid: u64,
}

impl Item {
    fn entry(&self) -> Entry {
        Entry {
            name: self.name.clone(),
            kind: if self.folder {
                EntryKind::Folder
            } else {
                EntryKind::File
            },
            size_bytes: if self.folder {
                0
            } else {
                self.data.length.unwrap_or(0)
            },
            modified: self.modified,
            id: (self.data.first != 0).then_some(u64::from(self.data.first)),
            streams: Vec::new(),
        }
    }
}

/// The geometry of a volume, its FAT (cached in part) and its up-case table.
struct Volume {
    disk: VolumeDisk,
    cluster_shift: u32,
    fat_start: u64,
    fat_len: u64,
    heap_start: u64,
    cluster_count: u32,
    root: u32,
    /// The up-case table: what each UTF-16 unit is in upper case (`None`: Unicode's).
    upcase: Option<Vec<u16>>,
    fat_cache: Vec<u8>,
    fat_cache_start: u64,
}

/// Little-endian numbers in a record.
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

impl Volume {
    fn open(mut disk: VolumeDisk) -> Result<Self, TreeError> {
        let mut boot = [0u8; 512];
        if disk.len() < 512 {
            return Err(damaged("the volume is smaller than a boot sector".into()));
        }
        disk.read_exact_at(0, &mut boot).map_err(TreeError::Read)?;
        if &boot[3..11] != b"EXFAT   " || boot[510..512] != [0x55, 0xaa] {
            return Err(damaged("the boot sector is not an exFAT one".into()));
        }
        let sector_shift = u32::from(boot[108]);
        let cluster_shift = u32::from(boot[109]);
        if !(9..=12).contains(&sector_shift) || cluster_shift > 25 - sector_shift {
            return Err(damaged(format!(
                "the boot sector claims sectors of 2^{sector_shift} bytes and clusters of \
                 2^{cluster_shift} sectors"
            )));
        }
        let fats = boot[110];
        let active = u64::from(le16(&boot, 106) & 1);
        if !(1..=2).contains(&fats) || active >= u64::from(fats) {
            return Err(damaged(format!(
                "the boot sector claims {fats} FATs, the active one number {active}"
            )));
        }
        let fat_len = u64::from(le32(&boot, 84)) << sector_shift;
        let fat_start = (u64::from(le32(&boot, 80)) << sector_shift) + active * fat_len;
        let heap_start = u64::from(le32(&boot, 88)) << sector_shift;
        let cluster_count = le32(&boot, 92);
        let root = le32(&boot, 96);
        if cluster_count == 0 || cluster_count > 0xffff_fff5 {
            return Err(damaged(format!(
                "the boot sector claims {cluster_count} clusters"
            )));
        }
        if fat_start + fat_len > disk.len() || (u64::from(cluster_count) + 2) * 4 > fat_len {
            return Err(damaged(
                "the FAT lies outside the volume or is too small for its clusters".into(),
            ));
        }
        let mut volume = Self {
            disk,
            cluster_shift: sector_shift + cluster_shift,
            fat_start,
            fat_len,
            heap_start,
            cluster_count,
            root,
            upcase: None,
            fat_cache: Vec::new(),
            fat_cache_start: 0,
        };
        volume.check_cluster(root)?;
        let (_, upcase) = volume.folder(volume.root_data())?;
        if let Some(table) = upcase {
            // A damaged table only makes names compare as Unicode does.
            volume.upcase = volume.upcase_table(table).ok();
        }
        Ok(volume)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_shift
    }

    fn root_data(&self) -> Data {
        Data {
            first: self.root,
            contiguous: false,
            length: None,
        }
    }

    /// Checks that `cluster` is one of the heap's, inside the volume.
    fn check_cluster(&self, cluster: u32) -> Result<(), TreeError> {
        let inside = (2..=self.cluster_count.saturating_add(1)).contains(&cluster)
            && self
                .cluster_offset(cluster)
                .checked_add(self.cluster_size())
                .is_some_and(|end| end <= self.disk.len());
        if inside {
            Ok(())
        } else {
            Err(damaged(format!(
                "cluster {cluster} is not in the volume's {} clusters",
                self.cluster_count
            )))
        }
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.heap_start + (u64::from(cluster.saturating_sub(2)) << self.cluster_shift)
    }

    /// The cluster after `cluster` in the FAT; `None` at the end of the chain.
    fn fat_next(&mut self, cluster: u32) -> Result<Option<u32>, TreeError> {
        let at = self.fat_start + u64::from(cluster) * 4;
        let cached = at >= self.fat_cache_start
            && at + 4 <= self.fat_cache_start + self.fat_cache.len() as u64;
        if !cached {
            let start = at - (at - self.fat_start) % FAT_CACHE;
            let end = (start + FAT_CACHE).min(self.fat_start + self.fat_len);
            if at + 4 > end {
                return Err(damaged(format!(
                    "cluster {cluster} has no entry in the FAT"
                )));
            }
            let mut block = vec![0; usize::try_from(end - start).unwrap_or(0)];
            self.disk
                .read_exact_at(start, &mut block)
                .map_err(TreeError::Read)?;
            self.fat_cache = block;
            self.fat_cache_start = start;
        }
        let from = usize::try_from(at - self.fat_cache_start).unwrap_or(0);
        let next = le32(&self.fat_cache, from);
        if next == 0xffff_ffff {
            return Ok(None);
        }
        if (2..=self.cluster_count.saturating_add(1)).contains(&next) {
            return Ok(Some(next));
        }
        Err(damaged(format!(
            "the FAT entry of cluster {cluster} is {next:#x}, neither a cluster nor the end"
        )))
    }

    /// The next run of contiguous clusters of `chain`: its offset on the volume and length
    /// in bytes.
    fn next_run(&mut self, chain: &mut Chain) -> Result<Option<(u64, u64)>, TreeError> {
        if chain.left == 0 {
            return Ok(None);
        }
        let Some(first) = chain.cluster else {
            return if chain.until_end {
                Ok(None)
            } else {
                Err(damaged(
                    "a cluster chain ends before the size of its file or folder".into(),
                ))
            };
        };
        self.check_cluster(first)?;
        let size = self.cluster_size();
        let mut count = 1u64;
        let mut last = first;
        let covered = loop {
            let covered = count * size;
            if covered >= chain.left {
                if chain.until_end {
                    return Err(damaged(format!(
                        "a folder is larger than the {} MiB exFAT allows, or its cluster \
                         chain loops",
                        MAX_FOLDER_BYTES >> 20
                    )));
                }
                chain.cluster = None;
                break chain.left;
            }
            chain.steps += 1;
            if chain.steps > u64::from(self.cluster_count) {
                return Err(damaged(
                    "a cluster chain is longer than the volume: it loops".into(),
                ));
            }
            let next = if chain.contiguous {
                Some(last.saturating_add(1))
            } else {
                self.fat_next(last)?
            };
            if let Some(next) = next {
                chain.watch(next)?;
            }
            match next {
                None => {
                    chain.cluster = None;
                    break covered;
                }
                Some(next) if next == last.wrapping_add(1) && chain.contiguous => {
                    self.check_cluster(next)?;
                    count += 1;
                    last = next;
                }
                Some(next) if next == last.wrapping_add(1) => {
                    count += 1;
                    last = next;
                }
                Some(next) => {
                    chain.cluster = Some(next);
                    break covered;
                }
            }
        };
        chain.left -= covered;
        Ok(Some((self.cluster_offset(first), covered)))
    }

    /// Reads the next bytes of `reader` into `buf`: how many, 0 at its end.
    fn read_some(&mut self, reader: &mut Reader, buf: &mut [u8]) -> Result<usize, TreeError> {
        while reader.run_left == 0 {
            match self.next_run(&mut reader.chain)? {
                Some((at, len)) => (reader.run_at, reader.run_left) = (at, len),
                None => return Ok(0),
            }
        }
        let n = usize::try_from(reader.run_left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let end = reader.run_at + n as u64;
        if end > self.disk.len() {
            return Err(damaged(
                "a file's or folder's clusters lie outside the volume".into(),
            ));
        }
        self.disk
            .read_exact_at(reader.run_at, &mut buf[..n])
            .map_err(TreeError::Read)?;
        reader.run_at = end;
        reader.run_left -= n as u64;
        Ok(n)
    }

    /// The files and folders of the folder at `data`, and the up-case table if it lists
    /// one (the root folder).
    fn folder(&mut self, data: Data) -> Result<(Vec<Item>, Option<Data>), TreeError> {
        let length = match data.length {
            Some(length) if length > MAX_FOLDER_BYTES => {
                return Err(damaged(format!(
                    "a folder claims {length} bytes, more than the {} MiB exFAT allows",
                    MAX_FOLDER_BYTES >> 20
                )));
            }
            Some(length) => length,
            None => MAX_FOLDER_BYTES,
        };
        if data.first == 0 {
            return Ok((Vec::new(), None));
        }
        let mut entries = Entries {
            reader: Reader::new(data, length),
            buf: vec![0; 64 << 10],
            at: 0,
            filled: 0,
            back: None,
        };
        let mut items = Vec::new();
        let mut upcase = None;
        while let Some(primary) = entries.next(self)? {
            let kind = primary[0];
            if kind == 0x85 {
                if let Some(item) = self.entry_set(&primary, &mut entries)? {
                    items.push(item);
                }
            } else if kind == 0x82 && data.length.is_none() {
                upcase = Some(Data {
                    first: le32(&primary, 20),
                    contiguous: false,
                    length: Some(le64(&primary, 24)),
                });
            } else if kind & 0xe0 == 0xa0 {
                // A benign primary entry (volume GUID, padding, vendor's): skip its
                // secondaries.
                for _ in 0..primary[1] {
                    match entries.next(self)? {
                        Some(next) if next[0] & 0xc0 == 0xc0 => {}
                        Some(next) => {
                            entries.back = Some(next);
                            break;
                        }
                        None => break,
                    }
                }
            }
            // Anything else (deleted entries, the allocation bitmap, the volume label, a
            // stray secondary) is not a file.
        }
        Ok((items, upcase))
    }

    /// The file or folder of the file entry `primary` and the secondaries that follow it;
    /// `None` if the set is damaged (skipped).
    fn entry_set(
        &mut self,
        primary: &[u8; 32],
        entries: &mut Entries,
    ) -> Result<Option<Item>, TreeError> {
        let count = usize::from(primary[1]);
        let mut secondaries = Vec::with_capacity(count);
        for _ in 0..count {
            match entries.next(self)? {
                Some(next) if next[0] & 0xc0 == 0xc0 => secondaries.push(next),
                Some(next) => {
                    entries.back = Some(next);
                    return Ok(None);
                }
                None => return Ok(None),
            }
        }
        if secondaries.len() < 2 || secondaries[0][0] != 0xc0 {
            return Ok(None);
        }
        if set_checksum(primary, &secondaries) != le16(primary, 2) {
            return Ok(None);
        }
        let stream = &secondaries[0];
        let name_len = usize::from(stream[3]);
        let mut name = Vec::with_capacity(name_len);
        for part in secondaries[1..].iter().take_while(|s| s[0] == 0xc1) {
            name.extend((0..15).map(|i| le16(part, 2 + 2 * i)));
        }
        if name_len == 0 || name.len() < name_len {
            return Ok(None);
        }
        name.truncate(name_len);
        let allocated = stream[1] & 1 != 0;
        let length = le64(stream, 24);
        Ok(Some(Item {
            name: String::from_utf16_lossy(&name),
            folder: le16(primary, 4) & 0x10 != 0,
            modified: timestamp(le32(primary, 12), primary[21], primary[23]),
            data: Data {
                first: if allocated { le32(stream, 20) } else { 0 },
                contiguous: stream[1] & 2 != 0,
                length: Some(if allocated { length } else { 0 }),
            },
            valid: le64(stream, 8),
        }))
    }

    /// The up-case table at `data` (compressed as the specification allows: `0xFFFF`
    /// and a count stand for that many units that are their own upper case).
    fn upcase_table(&mut self, data: Data) -> Result<Vec<u16>, TreeError> {
        let length = data.length.unwrap_or(0);
        if !(2..=MAX_UPCASE_BYTES).contains(&length) {
            return Err(damaged("the up-case table has no usable size".into()));
        }
        let mut raw = vec![0; usize::try_from(length).unwrap_or(0)];
        let mut reader = Reader::new(data, length);
        let mut filled = 0;
        while filled < raw.len() {
            let n = self.read_some(&mut reader, &mut raw[filled..])?;
            if n == 0 {
                return Err(damaged("the up-case table is cut short".into()));
            }
            filled += n;
        }
        let mut table: Vec<u16> = (0..=u16::MAX).collect();
        let mut units = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        let mut at = 0usize;
        while at < table.len() {
            let Some(unit) = units.next() else { break };
            if unit == 0xffff {
                let Some(same) = units.next() else { break };
                at += usize::from(same);
            } else {
                table[at] = unit;
                at += 1;
            }
        }
        Ok(table)
    }

    /// `name` in upper case, as this volume compares names.
    fn key(&self, name: &str) -> Vec<u16> {
        name.encode_utf16()
            .map(|unit| match &self.upcase {
                Some(table) => table[usize::from(unit)],
                None => char::from_u32(u32::from(unit))
                    .and_then(|c| {
                        let mut upper = c.to_uppercase();
                        match (upper.next(), upper.next()) {
                            (Some(one), None) => u16::try_from(u32::from(one)).ok(),
                            _ => None,
                        }
                    })
                    .unwrap_or(unit),
            })
            .collect()
    }

    /// The item at `path`; `None` for the root.
    fn find(&mut self, path: &[String]) -> Result<Option<Item>, TreeError> {
        let mut found: Option<Item> = None;
        for (depth, name) in path.iter().enumerate() {
            let data = match &found {
                None => self.root_data(),
                Some(item) if item.folder => item.data,
                Some(_) => {
                    return Err(TreeError::NotAFolder {
                        path: path[..depth].join("/"),
                    });
                }
            };
            let (items, _) = self.folder(data)?;
            let key = self.key(name);
            let item = items.into_iter().find(|item| self.key(&item.name) == key);
            found = Some(item.ok_or_else(|| TreeError::NotFound {
                path: path.join("/"),
            })?);
        }
        Ok(found)
    }

    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError> {
        let data = match self.find(folder)? {
            None => self.root_data(),
            Some(item) if item.folder => item.data,
            Some(_) => {
                return Err(TreeError::NotAFolder {
                    path: folder.join("/"),
                });
            }
        };
        let (items, _) = self.folder(data)?;
        Ok(items
            .iter()
            .filter(|item| super::usable_name(&item.name))
            .map(Item::entry)
            .collect())
    }

    fn read(
        &mut self,
        path: &[String],
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let shown = path.join("/");
        let item = match self.find(path)? {
            Some(item) if !item.folder => item,
            _ => return Err(TreeError::NotAFile { path: shown }),
        };
        let size = item.data.length.unwrap_or(0);
        let heap = u64::from(self.cluster_count) << self.cluster_shift;
        if size > heap {
            return Err(damaged(format!(
                "{shown} claims {size} bytes, more than the volume holds"
            )));
        }
        let valid = item.valid.min(size);
        let mut reader = Reader::new(item.data, valid);
        let mut buf = vec![0; BLOCK];
        let mut done = 0u64;
        while done < size {
            control.check()?;
            let want = usize::try_from(size - done).unwrap_or(BLOCK).min(BLOCK);
            let written = usize::try_from(valid.saturating_sub(done))
                .unwrap_or(BLOCK)
                .min(want);
            let mut filled = 0;
            while filled < written {
                let n = self.read_some(&mut reader, &mut buf[filled..written])?;
                if n == 0 {
                    return Err(damaged(format!(
                        "the clusters of {shown} end before its size"
                    )));
                }
                filled += n;
            }
            buf[written..want].fill(0);
            done += super::deliver(out, &buf[..want], &shown, control)?;
        }
        Ok(done)
    }
}

/// The checksum of an entry set: every byte of its entries but the checksum's own.
fn set_checksum(primary: &[u8; 32], secondaries: &[[u8; 32]]) -> u16 {
    let mut sum = 0u16;
    let bytes = primary
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2 && *i != 3)
        .map(|(_, b)| *b)
        .chain(secondaries.iter().flatten().copied());
    for byte in bytes {
        sum = sum.rotate_right(1).wrapping_add(u16::from(byte));
    }
    sum
}

/// An exFAT timestamp (local, in 2-second steps), its 10 ms increment and its UTC offset
/// (valid if its top bit is set: 15-minute steps, signed in 7 bits), as UTC.
fn timestamp(raw: u32, ten_ms: u8, utc_offset: u8) -> Option<Timestamp> {
    let field = |shift: u32, bits: u32| (raw >> shift) & ((1 << bits) - 1);
    let (seconds, minute, hour) = (field(0, 5) * 2, field(5, 6), field(11, 5));
    let (day, month, year) = (field(16, 5), field(21, 4), 1980 + field(25, 7));
    if ten_ms > 199 {
        return None;
    }
    let local = chrono::NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?
        .and_hms_opt(hour, minute, seconds)?;
    let mut seconds = local.and_utc().timestamp() + i64::from(ten_ms / 100);
    if utc_offset & 0x80 != 0 {
        let quarters = i8::from_le_bytes([utc_offset << 1]) >> 1;
        seconds -= i64::from(quarters) * 15 * 60;
    }
    Some(Timestamp {
        seconds,
        nanos: u32::from(ten_ms % 100) * 10_000_000,
    })
}

/// A cluster chain being followed.
#[derive(Debug)]
struct Chain {
    /// The next cluster to read (`None`: the chain ended).
    cluster: Option<u32>,
    contiguous: bool,
    /// The bytes still to read.
    left: u64,
    /// Whether the chain ends by its FAT entries, not by a size (the root folder).
    until_end: bool,
    /// The FAT entries followed so far.
    steps: u64,
    /// Brent's detection of loops: a cluster saved, and the steps since it was and
    /// until the next is.
    saved: u32,
    since: u64,
    period: u64,
}

impl Chain {
    /// Notes that the chain goes on to `next`: an error if it is a loop (found within
    /// twice the loop's start and length).
    fn watch(&mut self, next: u32) -> Result<(), TreeError> {
        if next == self.saved {
            return Err(damaged(
                "a cluster chain comes back to a cluster it holds: it loops".into(),
            ));
        }
        self.since += 1;
        if self.since == self.period {
            self.saved = next;
            self.since = 0;
            self.period = self.period.saturating_mul(2);
        }
        Ok(())
    }
}

/// Reads data from its clusters, one run of contiguous clusters at a time.
#[derive(Debug)]
struct Reader {
    chain: Chain,
    run_at: u64,
    run_left: u64,
}

impl Reader {
    /// Reads the first `length` bytes of `data` (or up to `length`, for the root folder).
    fn new(data: Data, length: u64) -> Self {
        Self {
            chain: Chain {
                cluster: (data.first != 0).then_some(data.first),
                contiguous: data.contiguous,
                left: length,
                until_end: data.length.is_none(),
                steps: 0,
                saved: data.first,
                since: 0,
                period: 1,
            },
            run_at: 0,
            run_left: 0,
        }
    }
}

/// The 32-byte entries of a folder, in order.
struct Entries {
    reader: Reader,
    buf: Vec<u8>,
    at: usize,
    filled: usize,
    /// An entry read too far, to be read again.
    back: Option<[u8; 32]>,
}

impl Entries {
    /// The next entry in use, or any other but the end marker; `None` at the end.
    fn next(&mut self, volume: &mut Volume) -> Result<Option<[u8; 32]>, TreeError> {
        if let Some(entry) = self.back.take() {
            return Ok(Some(entry));
        }
        loop {
            if self.filled - self.at < 32 {
                let rest = self.filled - self.at;
                self.buf.copy_within(self.at..self.filled, 0);
                self.at = 0;
                self.filled = rest;
                let n = volume.read_some(&mut self.reader, &mut self.buf[rest..])?;
                self.filled += n;
                if n == 0 {
                    return Ok(None);
                }
                continue;
            }
            let mut entry = [0; 32];
            entry.copy_from_slice(&self.buf[self.at..self.at + 32]);
            self.at += 32;
            match entry[0] {
                0x00 => return Ok(None),
                kind if kind & 0x80 == 0 => {}
                _ => return Ok(Some(entry)),
            }
        }
    }
}

impl FileTree for ExfatTree {
    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError> {
        guarded(|| self.volume.list(folder))
    }

    fn entry(&mut self, path: &[String]) -> Result<Entry, TreeError> {
        guarded(|| {
            Ok(match self.volume.find(path)? {
                None => Entry {
                    name: String::new(),
                    kind: EntryKind::Folder,
                    size_bytes: 0,
                    modified: None,
                    id: None,
                    streams: Vec::new(),
                },
                Some(item) => item.entry(),
            })
        })
    }

    fn read(
        &mut self,
        path: &[String],
        stream: Option<&str>,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        if let Some(stream) = stream {
            return Err(TreeError::NotFound {
                path: format!("{}:{stream}", path.join("/")),
            });
        }
        guarded(|| self.volume.read(path, out, control))
    }
}

#[cfg(test)]
mod tests;
