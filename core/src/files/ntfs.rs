//! Reading NTFS volumes (Windows), with the `ntfs` crate for the boot sector, the MFT's
//! records and their attributes.
//!
//! What this module does itself, because the crate does not or because hostile input could
//! make it loop:
//! - Folders are read from their `$I30` index by reading its root and every index record in
//!   use, one after the other, instead of walking the B-tree (a damaged tree could send a
//!   walk round in circles). Names are then sorted by the volume's upcase table, which is
//!   the tree's own order.
//! - File content is read from the attribute's data runs, so that the reads are bounded,
//!   large, and checked against the volume; NTFS-compressed content (LZNT1, which the crate
//!   does not read) is decompressed one compression unit at a time (`lznt1`). What
//!   lies past an attribute's initialized size reads as zeros.
//! - Names are looked up by a binary search of the sorted names of the folder, and the
//!   last few folders' names are kept, so that restoring a large folder file by file does
//!   not read its index again for each file.
//!
//! Not read: EFS-encrypted files ([`TreeError::Unsupported`]), and files behind reparse
//! points other than links (Windows' `CompactOS` compression, cloud placeholders), which are
//! listed as [`EntryKind::Other`]. Links and junctions are listed as
//! [`EntryKind::Symlink`], their targets as Windows wrote them (`C:\Users`, `..\x`).
//!
//! Every call into the crate runs under [`std::panic::catch_unwind`]: a panic on a damaged
//! record becomes [`TreeError::Damaged`].

mod lznt1;

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ::ntfs::attribute_value::{NtfsAttributeValue, NtfsDataRun};
use ::ntfs::structured_values::{
    NtfsAttributeList, NtfsFileAttributeFlags, NtfsStandardInformation,
};
use ::ntfs::{
    NtfsAttribute, NtfsAttributeFlags, NtfsAttributeType, NtfsError, NtfsFile, NtfsFileFlags,
    NtfsReadSeek,
};

use super::{Entry, EntryKind, FileTree, Stream, Timestamp, TreeError, VolumeDisk};
use crate::progress::Control;

/// The MFT record of the root folder.
const ROOT: u64 = 5;
/// Records below this one are the volume's own (`$MFT` … `$Extend` and reserved ones).
const FIRST_USER_RECORD: u64 = 24;
/// How much is read or written at once.
const BLOCK: usize = 1 << 20;
/// At most this many attributes in one file (attribute lists included).
const MAX_ATTRIBUTES: usize = 65_536;
/// At most this many data runs in one attribute.
const MAX_RUNS: usize = 1 << 20;
/// At most this many names in one folder.
const MAX_CHILDREN: usize = 4 << 20;
/// The largest index record read (Windows uses 4 KiB).
const MAX_INDEX_RECORD: usize = 64 << 10;
/// The largest reparse point (Windows allows 16 KiB).
const MAX_REPARSE: usize = 16 << 10;
/// How many folders' listings are kept.
const CACHED_FOLDERS: usize = 8;
/// Seconds from 1601-01-01 (NT time) to 1970-01-01 (Unix time).
const NT_TO_UNIX_SECONDS: i64 = 11_644_473_600;
/// The reparse tags of a symbolic link and of a junction (mount point).
const TAG_SYMLINK: u32 = 0xa000_000c;
/// See [`TAG_SYMLINK`].
const TAG_MOUNT_POINT: u32 = 0xa000_0003;
/// The unnamed `$DATA` attribute, as this module names it.
const CONTENT: &str = "";

/// Opens the NTFS file system on `disk`.
///
/// # Errors
/// The boot sector or the records every file needs (the MFT's own, `$UpCase`, the root
/// folder) are damaged, or reading failed.
pub fn open(disk: VolumeDisk) -> Result<Box<dyn FileTree>, TreeError> {
    Ok(Box::new(open_volume(disk)?))
}

/// The volume's label (its name in Windows' Explorer), if it has one and it can be read.
pub(crate) fn label(disk: &mut dyn super::Disk, start: u64, length: u64) -> Option<String> {
    let mut volume = super::Slice::new(disk, start, length);
    let ntfs = guarded(|| ::ntfs::Ntfs::new(&mut volume)).ok()?;
    let name = guarded(|| ntfs.volume_name(&mut volume).transpose()).ok()??;
    let name = name.name().to_string_lossy();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Opens the NTFS file system on `disk`, as this module's own type.
fn open_volume(disk: VolumeDisk) -> Result<NtfsTree, TreeError> {
    let mut disk = disk;
    let ntfs = guarded(|| ::ntfs::Ntfs::new(&mut disk))?;
    let mut tree = NtfsTree {
        disk,
        ntfs,
        upcase: Vec::new(),
        folders: Vec::new(),
    };
    tree.upcase = tree.read_upcase()?;
    let root = tree.record(ROOT)?;
    if !root.directory {
        return Err(damaged("the root folder's record is not a folder"));
    }
    Ok(tree)
}

/// An NTFS volume being read.
struct NtfsTree {
    disk: VolumeDisk,
    ntfs: ::ntfs::Ntfs,
    /// The volume's upcase table (65 536 entries), for comparing names.
    upcase: Vec<u16>,
    /// The last folders listed (record number, children), newest last.
    folders: Vec<(u64, Arc<[Child]>)>,
}

impl std::fmt::Debug for NtfsTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtfsTree")
            .field("volume_bytes", &self.disk.len())
            .finish_non_exhaustive()
    }
}

/// One name in a folder's index.
#[derive(Debug, Clone)]
struct Child {
    name: String,
    /// The name through the upcase table: what names are compared by.
    key: Vec<u16>,
    record: u64,
    /// A DOS 8.3 name, beside the long one: found, but not listed.
    dos: bool,
}

/// What this module needs of one MFT record.
#[derive(Debug, Clone)]
struct Record {
    directory: bool,
    modified: Option<Timestamp>,
    attributes: NtfsFileAttributeFlags,
    /// `$DATA` attributes: the content (name "") and the named streams.
    data: Vec<DataInfo>,
    /// The reparse point's data, if it has one.
    reparse: Option<Vec<u8>>,
}

/// One `$DATA` attribute.
#[derive(Debug, Clone)]
struct DataInfo {
    name: String,
    size: u64,
    flags: NtfsAttributeFlags,
}

/// Where an attribute's content lies.
enum Content {
    /// In the record itself.
    Resident(Vec<u8>),
    /// In clusters: runs of `(volume offset or a hole, bytes)`, in order.
    Runs {
        runs: Vec<(Option<u64>, u64)>,
        size: u64,
        /// What was written: past it, the content reads as zeros.
        initialized: u64,
        compressed: bool,
    },
}

/// A damaged file system, with what is wrong.
fn damaged(detail: impl Into<String>) -> TreeError {
    TreeError::Damaged {
        detail: detail.into(),
    }
}

/// An error of the crate as a [`TreeError`]: a failed read stays one, but a read past the
/// end of the volume is a damaged record that points there.
fn from_ntfs(error: NtfsError) -> TreeError {
    match error {
        NtfsError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            damaged(format!("a record points past the end of the volume ({io})"))
        }
        NtfsError::Io(io) => TreeError::Read(io),
        other => damaged(format!("NTFS: {other}")),
    }
}

/// Runs `parse`, which calls into the `ntfs` crate, turning a panic on a damaged record into
/// an error.
fn guarded<T>(parse: impl FnOnce() -> Result<T, NtfsError>) -> Result<T, TreeError> {
    catch(|| parse().map_err(from_ntfs))
}

/// Runs `work`, turning a panic into [`TreeError::Damaged`].
fn catch<T>(work: impl FnOnce() -> Result<T, TreeError>) -> Result<T, TreeError> {
    std::panic::catch_unwind(AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(damaged("an MFT record could not be parsed")))
}

/// The UTF-16 code units of a little-endian byte string.
fn units(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect()
}

/// An NT time (100 ns since 1601) as a Unix [`Timestamp`]; 0 is no time.
fn timestamp(nt: u64) -> Option<Timestamp> {
    if nt == 0 {
        return None;
    }
    let seconds = i64::try_from(nt / 10_000_000).ok()? - NT_TO_UNIX_SECONDS;
    let nanos = u32::try_from(nt % 10_000_000).ok()? * 100;
    Some(Timestamp { seconds, nanos })
}

/// Reads an attribute's value whole, refusing one longer than `cap`.
fn read_value<T: std::io::Read + std::io::Seek>(
    attribute: &NtfsAttribute<'_, '_>,
    disk: &mut T,
    cap: usize,
) -> Result<Vec<u8>, TreeError> {
    let length = attribute.value_length();
    let length = usize::try_from(length)
        .ok()
        .filter(|&length| length <= cap)
        .ok_or_else(|| damaged(format!("an attribute of {length} bytes is too large")))?;
    let mut value = attribute.value(disk).map_err(from_ntfs)?;
    let mut bytes = vec![0; length];
    let mut done = 0;
    while done < length {
        let n = value.read(disk, &mut bytes[done..]).map_err(from_ntfs)?;
        if n == 0 {
            return Err(damaged("an attribute's value is cut short"));
        }
        done += n;
    }
    Ok(bytes)
}

/// Parses the entries of one index node (`node`: the node header and what follows),
/// adding the names it holds to `children`.
fn parse_node(
    node: &[u8],
    folder: u64,
    children: &mut Vec<(Vec<u16>, u64, bool)>,
) -> Result<(), TreeError> {
    let field = |at: usize| -> Option<u32> {
        node.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let bad = || damaged(format!("the index of folder record {folder} is damaged"));
    let start = usize::try_from(field(0).ok_or_else(bad)?).map_err(|_| bad())?;
    let end = usize::try_from(field(4).ok_or_else(bad)?).map_err(|_| bad())?;
    let entries = node.get(start..end.min(node.len())).ok_or_else(bad)?;
    let mut at = 0;
    while at + 16 <= entries.len() {
        let entry = &entries[at..];
        let reference = u64::from_le_bytes(entry[0..8].try_into().map_err(|_| bad())?);
        let length = usize::from(u16::from_le_bytes([entry[8], entry[9]]));
        let key_length = usize::from(u16::from_le_bytes([entry[10], entry[11]]));
        let flags = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
        if flags & 2 != 0 {
            return Ok(()); // the last entry: no key
        }
        if length < 16 || length > entry.len() || 16 + key_length > length {
            return Err(bad());
        }
        let key = &entry[16..16 + key_length];
        // A $FILE_NAME: its name's length (in UTF-16 units) at 64, its namespace at 65.
        if key.len() < 66 {
            return Err(bad());
        }
        let name_units = usize::from(key[64]);
        let namespace = key[65];
        let name = key.get(66..66 + 2 * name_units).ok_or_else(bad)?;
        let record = reference & 0x0000_ffff_ffff_ffff;
        if record != folder {
            if children.len() >= MAX_CHILDREN {
                return Err(damaged(format!(
                    "folder record {folder} holds more than {MAX_CHILDREN} names"
                )));
            }
            // Namespace 2: a DOS 8.3 name, which duplicates a long one.
            children.push((units(name), record, namespace == 2));
        }
        at += length;
    }
    Ok(())
}

/// Checks a record's `signature` (`FILE`, `INDX`) and applies its update sequence (the
/// last two bytes of each 512-byte sector were saved in its header and replaced by a check
/// value).
fn fixup(record: &mut [u8], signature: [u8; 4]) -> Result<(), TreeError> {
    let bad = || damaged("a record's update sequence is damaged");
    if record.len() < 8 || record[0..4] != signature[..] {
        return Err(damaged(format!(
            "a record in use has no {} signature",
            String::from_utf8_lossy(&signature)
        )));
    }
    let offset = usize::from(u16::from_le_bytes([record[4], record[5]]));
    let count = usize::from(u16::from_le_bytes([record[6], record[7]]));
    if count == 0 || (count - 1) * 512 > record.len() {
        return Err(bad());
    }
    let array = record
        .get(offset..offset + 2 * count)
        .ok_or_else(bad)?
        .to_vec();
    for sector in 1..count {
        let end = sector * 512;
        if record[end - 2..end] != array[0..2] {
            return Err(bad());
        }
        record[end - 2..end].copy_from_slice(&array[2 * sector..2 * sector + 2]);
    }
    Ok(())
}

/// Where a symbolic link or junction points, from its reparse data.
fn link_target(reparse: &[u8]) -> Option<String> {
    let tag = u32::from_le_bytes(reparse.get(0..4)?.try_into().ok()?);
    let u16_at = |at: usize| -> Option<usize> {
        Some(usize::from(u16::from_le_bytes(
            reparse.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    // The path buffer starts after the 8-byte header, 8 bytes of offsets and lengths, and
    // for a symbolic link 4 bytes of flags.
    let buffer = match tag {
        TAG_SYMLINK => 20,
        TAG_MOUNT_POINT => 16,
        _ => return None,
    };
    let name = |offset: usize, length: usize| -> Option<String> {
        let start = buffer + offset;
        Some(String::from_utf16_lossy(&units(
            reparse.get(start..start + length)?,
        )))
    };
    let print = name(u16_at(12)?, u16_at(14)?).filter(|p| !p.is_empty());
    if let Some(print) = print {
        return Some(print);
    }
    let substitute = name(u16_at(8)?, u16_at(10)?)?;
    Some(
        substitute
            .strip_prefix(r"\??\")
            .map_or(substitute.clone(), str::to_owned),
    )
}

impl NtfsTree {
    /// Reads the upcase table from `$UpCase`; without one, names are compared through
    /// Rust's own upper case.
    fn read_upcase(&mut self) -> Result<Vec<u16>, TreeError> {
        let bytes = self.with_file(10, |_, disk, file| {
            let mut attributes = file.attributes();
            let mut seen = 0;
            while let Some(item) = attributes.next(disk) {
                seen += 1;
                if seen > MAX_ATTRIBUTES {
                    break;
                }
                let item = item.map_err(from_ntfs)?;
                let attribute = item.to_attribute().map_err(from_ntfs)?;
                if attribute.ty().ok() == Some(NtfsAttributeType::Data)
                    && attribute.name().map_err(from_ntfs)?.0.is_empty()
                {
                    return read_value(&attribute, disk, 2 << 16).map(Some);
                }
            }
            Ok(None)
        })?;
        Ok(match bytes {
            Some(bytes) if bytes.len() == 2 << 16 => units(&bytes),
            _ => Vec::new(),
        })
    }

    /// A name through the upcase table.
    fn key(&self, name: &[u16]) -> Vec<u16> {
        if self.upcase.is_empty() {
            return String::from_utf16_lossy(name)
                .to_uppercase()
                .encode_utf16()
                .collect();
        }
        name.iter()
            .map(|&unit| self.upcase.get(usize::from(unit)).copied().unwrap_or(unit))
            .collect()
    }

    /// Runs `work` on MFT record `number`, under [`catch`].
    fn with_file<T>(
        &mut self,
        number: u64,
        work: impl FnOnce(&::ntfs::Ntfs, &mut VolumeDisk, &NtfsFile<'_>) -> Result<T, TreeError>,
    ) -> Result<T, TreeError> {
        let ntfs = &self.ntfs;
        let disk = &mut self.disk;
        catch(|| {
            let file = ntfs.file(disk, number).map_err(from_ntfs)?;
            if !file.flags().contains(NtfsFileFlags::IN_USE) {
                return Err(damaged(format!("MFT record {number} is not in use")));
            }
            work(ntfs, disk, &file)
        })
    }

    /// What is in MFT record `number`.
    fn record(&mut self, number: u64) -> Result<Record, TreeError> {
        self.with_file(number, |_, disk, file| {
            let mut record = Record {
                directory: file.is_directory(),
                modified: None,
                attributes: NtfsFileAttributeFlags::empty(),
                data: Vec::new(),
                reparse: None,
            };
            let mut attributes = file.attributes();
            let mut seen = 0;
            while let Some(item) = attributes.next(disk) {
                seen += 1;
                if seen > MAX_ATTRIBUTES {
                    return Err(damaged(format!(
                        "MFT record {number} has too many attributes"
                    )));
                }
                let item = item.map_err(from_ntfs)?;
                let attribute = item.to_attribute().map_err(from_ntfs)?;
                let Ok(ty) = attribute.ty() else {
                    continue;
                };
                match ty {
                    NtfsAttributeType::StandardInformation => {
                        let info = attribute
                            .resident_structured_value::<NtfsStandardInformation>()
                            .map_err(from_ntfs)?;
                        record.modified = timestamp(info.modification_time().nt_timestamp());
                        record.attributes = info.file_attributes();
                    }
                    NtfsAttributeType::Data => {
                        let name = String::from_utf16_lossy(&units(
                            attribute.name().map_err(from_ntfs)?.0,
                        ));
                        // With an attribute list, the extents after the first come
                        // separately, and only the first holds the size.
                        let size = attribute.value_length();
                        let flags = attribute.flags();
                        match record.data.iter_mut().find(|d| d.name == name) {
                            Some(known) => {
                                known.size = known.size.max(size);
                                known.flags |= flags;
                            }
                            None => record.data.push(DataInfo { name, size, flags }),
                        }
                    }
                    NtfsAttributeType::ReparsePoint if record.reparse.is_none() => {
                        record.reparse = Some(read_value(&attribute, disk, MAX_REPARSE)?);
                    }
                    _ => {}
                }
            }
            Ok(record)
        })
    }

    /// The names in folder record `number`, sorted as the folder's index sorts them.
    fn children(&mut self, number: u64) -> Result<Arc<[Child]>, TreeError> {
        if let Some(at) = self.folders.iter().position(|(n, _)| *n == number) {
            let cached = self.folders.remove(at);
            let children = Arc::clone(&cached.1);
            self.folders.push(cached);
            return Ok(children);
        }
        let volume = self.disk.len();
        let names = self.with_file(number, |_, disk, file| {
            if !file.is_directory() {
                return Err(TreeError::NotAFolder {
                    path: String::new(),
                });
            }
            let mut root = None;
            let mut allocation = 0;
            let mut bitmap = None;
            let mut attributes = file.attributes();
            let mut seen = 0;
            while let Some(item) = attributes.next(disk) {
                seen += 1;
                if seen > MAX_ATTRIBUTES {
                    return Err(damaged(format!(
                        "MFT record {number} has too many attributes"
                    )));
                }
                let item = item.map_err(from_ntfs)?;
                let attribute = item.to_attribute().map_err(from_ntfs)?;
                let Ok(ty) = attribute.ty() else {
                    continue;
                };
                // A link or junction is not followed: what it holds is elsewhere.
                if ty == NtfsAttributeType::ReparsePoint {
                    let reparse = read_value(&attribute, disk, MAX_REPARSE)?;
                    if link_target(&reparse).is_some() {
                        return Err(TreeError::NotAFolder {
                            path: String::new(),
                        });
                    }
                }
                if attribute.name().map_err(from_ntfs)? != "$I30" {
                    continue;
                }
                match ty {
                    NtfsAttributeType::IndexRoot if root.is_none() => {
                        root = Some(read_value(&attribute, disk, MAX_INDEX_RECORD)?);
                    }
                    NtfsAttributeType::Bitmap if bitmap.is_none() => {
                        // One bit per index record of at least 512 bytes in the volume.
                        let cap = usize::try_from(volume / 512 / 8 + 8).unwrap_or(usize::MAX);
                        bitmap = Some(read_value(&attribute, disk, cap)?);
                    }
                    NtfsAttributeType::IndexAllocation => {
                        // Only the first extent holds the size.
                        allocation = attribute.value_length().max(allocation);
                    }
                    _ => {}
                }
            }
            let root =
                root.ok_or_else(|| damaged(format!("folder record {number} has no index root")))?;
            let record_size = root
                .get(8..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .and_then(|size| usize::try_from(size).ok())
                .ok_or_else(|| damaged(format!("folder record {number} has a short index root")))?;
            Ok((root, record_size, allocation, bitmap.unwrap_or_default()))
        })?;
        let (root, record_size, allocation, bitmap) = names;
        let mut names = Vec::new();
        parse_node(root.get(16..).unwrap_or_default(), number, &mut names)?;
        if allocation > 0 {
            self.index_records(number, record_size, allocation, &bitmap, &mut names)?;
        }
        let mut children: Vec<Child> = names
            .into_iter()
            .map(|(name, record, dos)| Child {
                key: self.key(&name),
                name: String::from_utf16_lossy(&name),
                record,
                dos,
            })
            .collect();
        children.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.name.cmp(&b.name)));
        children.dedup_by(|a, b| a.record == b.record && a.name == b.name);
        let children: Arc<[Child]> = children.into();
        if self.folders.len() >= CACHED_FOLDERS {
            self.folders.remove(0);
        }
        self.folders.push((number, Arc::clone(&children)));
        Ok(children)
    }

    /// Parses the index records in use (by `bitmap`) of the index allocation of folder
    /// record `number` (`allocation` bytes), adding the names they hold to `names`.
    fn index_records(
        &mut self,
        number: u64,
        record_size: usize,
        allocation: u64,
        bitmap: &[u8],
        names: &mut Vec<(Vec<u16>, u64, bool)>,
    ) -> Result<(), TreeError> {
        if !(512..=MAX_INDEX_RECORD).contains(&record_size) || !record_size.is_power_of_two() {
            return Err(damaged(format!(
                "folder record {number} has index records of {record_size} bytes"
            )));
        }
        if allocation > self.disk.len() {
            return Err(damaged(format!(
                "the index of folder record {number} is larger than the volume"
            )));
        }
        let info = DataInfo {
            name: "$I30".into(),
            size: allocation,
            flags: NtfsAttributeFlags::empty(),
        };
        let Content::Runs { runs, .. } =
            self.content(number, NtfsAttributeType::IndexAllocation, &info)?
        else {
            return Err(damaged(format!(
                "the index allocation of folder record {number} is resident"
            )));
        };
        let mut buffer = vec![0; record_size];
        // Records past the bitmap are not in use.
        let count = (allocation / record_size as u64).min(bitmap.len() as u64 * 8);
        for index in 0..count {
            let in_use = usize::try_from(index / 8)
                .ok()
                .and_then(|byte| bitmap.get(byte))
                .is_some_and(|byte| byte & (1 << (index % 8)) != 0);
            if !in_use {
                continue;
            }
            self.read_runs_at(&runs, index * record_size as u64, &mut buffer)?;
            fixup(&mut buffer, *b"INDX")?;
            parse_node(&buffer[24..], number, names)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of content in `runs`.
    fn read_runs_at(
        &mut self,
        runs: &[(Option<u64>, u64)],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), TreeError> {
        let mut run_start = 0u64;
        let mut done = 0;
        for &(start, len) in runs {
            let at = offset + done as u64;
            let run_end = run_start.saturating_add(len);
            if at < run_end {
                let within = at - run_start;
                let n = usize::try_from((run_end - at).min((buf.len() - done) as u64))
                    .unwrap_or(buf.len() - done);
                let part = &mut buf[done..done + n];
                match start {
                    Some(start) => self
                        .disk
                        .read_exact_at(start + within, part)
                        .map_err(TreeError::Read)?,
                    None => part.fill(0),
                }
                done += n;
                if done == buf.len() {
                    return Ok(());
                }
            }
            run_start = run_end;
        }
        Err(damaged(
            "an index record lies past its attribute's data runs",
        ))
    }

    /// The MFT record at `path`.
    fn resolve(&mut self, path: &[String]) -> Result<u64, TreeError> {
        let mut number = ROOT;
        for (depth, name) in path.iter().enumerate() {
            let children = self.children(number).map_err(|e| match e {
                TreeError::NotAFolder { .. } => TreeError::NotAFolder {
                    path: path[..depth].join("/"),
                },
                other => other,
            })?;
            number = self
                .find_child(number, &children, name)
                .ok_or_else(|| TreeError::NotFound {
                    path: path[..=depth].join("/"),
                })?
                .record;
        }
        Ok(number)
    }

    /// The child of folder record `folder` named `name` (without case), by a binary search
    /// of `children` (sorted by key). A DOS 8.3 name finds its file by its long name.
    fn find_child<'c>(&self, folder: u64, children: &'c [Child], name: &str) -> Option<&'c Child> {
        let key = self.key(&name.encode_utf16().collect::<Vec<_>>());
        let first = children.partition_point(|child| child.key < key);
        let mut found = children[first..]
            .iter()
            .take_while(|child| child.key == key)
            .filter(|child| folder != ROOT || child.record >= FIRST_USER_RECORD);
        let child = found
            .clone()
            .find(|child| !child.dos)
            .or_else(|| found.next())?;
        if !child.dos {
            return Some(child);
        }
        children
            .iter()
            .find(|long| long.record == child.record && !long.dos)
            .or(Some(child))
    }

    /// The entry for `record`, named `name`.
    fn entry_of(name: String, number: u64, record: &Record) -> Entry {
        let tag = record
            .reparse
            .as_ref()
            .and_then(|r| r.get(0..4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let kind = match tag {
            Some(TAG_SYMLINK | TAG_MOUNT_POINT) => EntryKind::Symlink,
            _ if record.directory => EntryKind::Folder,
            Some(_) => EntryKind::Other,
            None => EntryKind::File,
        };
        let size_bytes = if kind == EntryKind::File {
            record
                .data
                .iter()
                .find(|d| d.name == CONTENT)
                .map_or(0, |d| d.size)
        } else {
            0
        };
        Entry {
            name,
            kind,
            size_bytes,
            modified: record.modified,
            id: Some(number),
            streams: record
                .data
                .iter()
                .filter(|d| d.name != CONTENT)
                .map(|d| Stream {
                    name: d.name.clone(),
                    size_bytes: d.size,
                })
                .collect(),
        }
    }

    /// Where the content of `$DATA` attribute `name` of record `number` lies.
    fn content(
        &mut self,
        number: u64,
        ty: NtfsAttributeType,
        info: &DataInfo,
    ) -> Result<Content, TreeError> {
        let volume = self.disk.len();
        let name = info.name.as_str();
        let size = info.size;
        let compressed = info.flags.contains(NtfsAttributeFlags::COMPRESSED);
        self.with_file(number, |ntfs, disk, file| {
            let listed = has_attribute_list(file)?;
            let mut attributes = file.attributes();
            let mut seen = 0;
            while let Some(item) = attributes.next(disk) {
                seen += 1;
                if seen > MAX_ATTRIBUTES {
                    return Err(damaged(format!(
                        "MFT record {number} has too many attributes"
                    )));
                }
                let item = item.map_err(from_ntfs)?;
                let attribute = item.to_attribute().map_err(from_ntfs)?;
                if attribute.ty().ok() != Some(ty)
                    || String::from_utf16_lossy(&units(attribute.name().map_err(from_ntfs)?.0))
                        != name
                {
                    continue;
                }
                let value = attribute.value(disk).map_err(from_ntfs)?;
                let mut runs = Vec::new();
                let initialized = match value {
                    NtfsAttributeValue::Resident(value) => {
                        return Ok(Content::Resident(value.data().to_vec()));
                    }
                    NtfsAttributeValue::NonResident(value) if !listed => {
                        for run in value.data_runs() {
                            push_run(&mut runs, &run.map_err(from_ntfs)?, volume)?;
                        }
                        initialized_size(ntfs, disk, file, &attribute)
                    }
                    // In extents, maybe in several records: read them all from the list.
                    _ => extents(ntfs, disk, file, ty, name, &mut runs, volume)?,
                };
                return Ok(Content::Runs {
                    runs,
                    size,
                    initialized: initialized.unwrap_or(size).min(size),
                    compressed,
                });
            }
            Err(TreeError::NotFound {
                path: String::new(),
            })
        })
    }

    /// Writes `content` (`size` bytes) to `out`.
    fn copy(
        &mut self,
        content: Content,
        path: &str,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let write = |out: &mut dyn Write, bytes: &[u8]| {
            out.write_all(bytes).map_err(|source| TreeError::Write {
                path: path.to_owned(),
                source,
            })
        };
        let (runs, size, initialized, compressed) = match content {
            Content::Resident(bytes) => {
                control.check()?;
                write(out, &bytes)?;
                control.add_done_bytes(bytes.len() as u64);
                return Ok(bytes.len() as u64);
            }
            Content::Runs {
                runs,
                size,
                initialized,
                compressed,
            } => (runs, size, initialized, compressed),
        };
        let allocated: u64 = runs.iter().map(|(_, len)| len).sum();
        if allocated < size {
            return Err(damaged(format!(
                "{path}: its data runs hold {allocated} bytes of its {size}"
            )));
        }
        if compressed {
            return self.copy_compressed(&runs, (size, initialized), path, out, control);
        }
        let mut buffer = vec![0; BLOCK];
        let mut left = size;
        for (start, len) in runs {
            let mut at = 0;
            while at < len && left > 0 {
                control.check()?;
                let n = (len - at).min(left).min(BLOCK as u64);
                let chunk = &mut buffer[..usize::try_from(n).unwrap_or(BLOCK)];
                // What lies past the initialized size was never written: zeros.
                let written = usize::try_from(initialized.saturating_sub(size - left))
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk[written..].fill(0);
                match start {
                    Some(start) => self
                        .disk
                        .read_exact_at(start + at, &mut chunk[..written])
                        .map_err(TreeError::Read)?,
                    None => chunk[..written].fill(0),
                }
                write(out, chunk)?;
                control.add_done_bytes(n);
                at += n;
                left -= n;
            }
        }
        Ok(size)
    }

    /// Writes compressed content to `out`, one compression unit (16 clusters) at a time.
    fn copy_compressed(
        &mut self,
        runs: &[(Option<u64>, u64)],
        (size, initialized): (u64, u64),
        path: &str,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let cluster = u64::from(self.ntfs.cluster_size());
        if cluster > 4096 {
            return Err(TreeError::Unsupported {
                path: path.to_owned(),
                detail: format!("NTFS compression with clusters of {cluster} bytes"),
            });
        }
        let unit = 16 * cluster;
        let unit_len = usize::try_from(unit).unwrap_or(65536);
        let mut stored = Vec::with_capacity(unit_len);
        let mut plain = vec![0; unit_len];
        let mut pending = Vec::with_capacity(BLOCK);
        let mut runs = runs.iter().copied();
        let mut current: Option<(Option<u64>, u64)> = None;
        let mut left = size;
        while left > 0 {
            control.check()?;
            // The unit's clusters: those stored, in order, and how many are holes.
            stored.clear();
            let mut need = unit;
            let mut holes = 0;
            while need > 0 {
                let Some((start, len)) = current.take().or_else(|| runs.next()) else {
                    // Past the runs: holes.
                    holes += need;
                    break;
                };
                let take = len.min(need);
                if let Some(start) = start {
                    let at = stored.len();
                    stored.resize(at + usize::try_from(take).unwrap_or(0), 0);
                    self.disk
                        .read_exact_at(start, &mut stored[at..])
                        .map_err(TreeError::Read)?;
                } else {
                    holes += take;
                }
                if take < len {
                    current = Some((start.map(|start| start + take), len - take));
                }
                need -= take;
            }
            if holes == 0 {
                plain.copy_from_slice(&stored);
            } else if stored.is_empty() {
                plain.fill(0);
            } else {
                lznt1::decompress(&stored, &mut plain).map_err(|lznt1::Corrupt(why)| {
                    damaged(format!("{path}: its compressed data is damaged ({why})"))
                })?;
            }
            let written = usize::try_from(initialized.saturating_sub(size - left))
                .unwrap_or(usize::MAX)
                .min(plain.len());
            plain[written..].fill(0);
            let n = left.min(unit);
            pending.extend_from_slice(&plain[..usize::try_from(n).unwrap_or(unit_len)]);
            left -= n;
            if pending.len() >= BLOCK || left == 0 {
                out.write_all(&pending).map_err(|source| TreeError::Write {
                    path: path.to_owned(),
                    source,
                })?;
                control.add_done_bytes(pending.len() as u64);
                pending.clear();
            }
        }
        Ok(size)
    }
}

/// The initialized size of non-resident `attribute` of `file` (past it, the content reads
/// as zeros), which the crate does not give: read from the record as stored. `None` if it
/// cannot be read.
fn initialized_size(
    ntfs: &::ntfs::Ntfs,
    disk: &mut VolumeDisk,
    file: &NtfsFile<'_>,
    attribute: &NtfsAttribute<'_, '_>,
) -> Option<u64> {
    let record_at = file.position().value()?.get();
    let offset = attribute.position().value()?.get().checked_sub(record_at)?;
    let offset = usize::try_from(offset).ok()?;
    let mut raw = vec![0; usize::try_from(ntfs.file_record_size()).ok()?];
    disk.read_exact_at(record_at, &mut raw).ok()?;
    fixup(&mut raw, *b"FILE").ok()?;
    // In a non-resident attribute's header: allocated, data, then initialized size.
    let bytes = raw.get(offset.checked_add(0x38)?..offset.checked_add(0x40)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Whether `file` has an attribute list (its attributes did not fit in its record).
fn has_attribute_list(file: &NtfsFile<'_>) -> Result<bool, TreeError> {
    // The crate's iterator yields the same error again and again: stop at the first.
    for attribute in file.attributes_raw() {
        if attribute.map_err(from_ntfs)?.ty().ok() == Some(NtfsAttributeType::AttributeList) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Adds a data run to `runs`, checking it against the volume.
fn push_run(
    runs: &mut Vec<(Option<u64>, u64)>,
    run: &NtfsDataRun,
    volume: u64,
) -> Result<(), TreeError> {
    if runs.len() >= MAX_RUNS {
        return Err(damaged("an attribute has too many data runs"));
    }
    let len = run.allocated_size();
    let start = run.data_position().value().map(std::num::NonZeroU64::get);
    if let Some(start) = start
        && start.checked_add(len).is_none_or(|end| end > volume)
    {
        return Err(damaged(format!(
            "a data run of {len} bytes at {start} lies outside the volume"
        )));
    }
    runs.push((start, len));
    Ok(())
}

/// Gathers the data runs of `$DATA` attribute `name` of `file` from every record its
/// attribute list names (a file too fragmented for one record).
fn extents(
    ntfs: &::ntfs::Ntfs,
    disk: &mut VolumeDisk,
    file: &NtfsFile<'_>,
    ty: NtfsAttributeType,
    name: &str,
    runs: &mut Vec<(Option<u64>, u64)>,
    volume: u64,
) -> Result<Option<u64>, TreeError> {
    let cluster = u64::from(ntfs.cluster_size());
    for attribute in file.attributes_raw() {
        let attribute = attribute.map_err(from_ntfs)?;
        if attribute.ty().ok() != Some(NtfsAttributeType::AttributeList) {
            continue;
        }
        let list = attribute
            .structured_value::<_, NtfsAttributeList>(disk)
            .map_err(from_ntfs)?;
        let mut entries = list.entries();
        let mut seen = 0;
        let mut vcn = 0u64;
        let mut initialized = None;
        while let Some(entry) = entries.next(disk) {
            seen += 1;
            if seen > MAX_ATTRIBUTES {
                return Err(damaged("an attribute list has too many entries"));
            }
            let entry = entry.map_err(from_ntfs)?;
            if entry.ty().ok() != Some(ty)
                || String::from_utf16_lossy(&units(entry.name().0)) != name
            {
                continue;
            }
            if u64::try_from(entry.lowest_vcn().value()).ok() != Some(vcn) {
                return Err(damaged(format!(
                    "an extent of a file's data starts at cluster {}, not {vcn}",
                    entry.lowest_vcn().value()
                )));
            }
            let record = entry.to_file(ntfs, disk).map_err(from_ntfs)?;
            let extent = entry.to_attribute(&record).map_err(from_ntfs)?;
            let NtfsAttributeValue::NonResident(value) = extent.value(disk).map_err(from_ntfs)?
            else {
                return Err(damaged("an extent of a file's data is not a run list"));
            };
            if vcn == 0 {
                initialized = initialized_size(ntfs, disk, &record, &extent);
            }
            for run in value.data_runs() {
                let run = run.map_err(from_ntfs)?;
                vcn += run.allocated_size() / cluster;
                push_run(runs, &run, volume)?;
            }
        }
        return Ok(initialized);
    }
    Err(damaged(
        "a file's data lies in extents, and it has no attribute list",
    ))
}

impl FileTree for NtfsTree {
    fn list(&mut self, folder: &[String]) -> Result<Vec<Entry>, TreeError> {
        let number = self.resolve(folder)?;
        let children = self.children(number).map_err(|e| match e {
            TreeError::NotAFolder { .. } => TreeError::NotAFolder {
                path: folder.join("/"),
            },
            other => other,
        })?;
        let mut entries = Vec::with_capacity(children.len());
        for child in children.iter().cloned() {
            if child.dos || child.name == "." || child.name == ".." {
                continue;
            }
            if number == ROOT && child.record < FIRST_USER_RECORD {
                continue; // $MFT, $Bitmap, …
            }
            match self.record(child.record) {
                Ok(record) => entries.push(Self::entry_of(child.name, child.record, &record)),
                // A stale or damaged record: shown, but not read.
                Err(TreeError::Damaged { detail }) => {
                    tracing::warn!(record = child.record, "NTFS: {detail}");
                    entries.push(Entry {
                        name: child.name,
                        kind: EntryKind::Other,
                        size_bytes: 0,
                        modified: None,
                        id: Some(child.record),
                        streams: Vec::new(),
                    });
                }
                Err(other) => return Err(other),
            }
        }
        Ok(entries)
    }

    fn entry(&mut self, path: &[String]) -> Result<Entry, TreeError> {
        let number = self.resolve(path)?;
        let record = self.record(number)?;
        let name = if path.is_empty() {
            String::new()
        } else {
            // The name as the folder spells it.
            let parent = self.resolve(&path[..path.len() - 1])?;
            let children = self.children(parent)?;
            let name = &path[path.len() - 1];
            self.find_child(parent, &children, name)
                .map_or_else(|| name.clone(), |child| child.name.clone())
        };
        let mut entry = Self::entry_of(name, number, &record);
        if path.is_empty() {
            entry.kind = EntryKind::Folder;
        }
        Ok(entry)
    }

    fn read(
        &mut self,
        path: &[String],
        stream: Option<&str>,
        out: &mut dyn Write,
        control: &Control,
    ) -> Result<u64, TreeError> {
        let shown = match stream {
            Some(stream) => format!("{}:{stream}", path.join("/")),
            None => path.join("/"),
        };
        let number = self.resolve(path)?;
        let record = self.record(number)?;
        let entry = Self::entry_of(String::new(), number, &record);
        if stream.is_none() && entry.kind != EntryKind::File {
            if entry.kind == EntryKind::Other {
                let tag = record
                    .reparse
                    .as_ref()
                    .and_then(|r| r.get(0..4))
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                return Err(TreeError::Unsupported {
                    path: shown,
                    detail: format!(
                        "it is an NTFS reparse point (tag {tag:#010x}), such as a file Windows \
                         compressed with CompactOS or a cloud placeholder"
                    ),
                });
            }
            return Err(TreeError::NotAFile { path: shown });
        }
        let name = match stream {
            None => CONTENT.to_owned(),
            Some(stream) => {
                let key = self.key(&stream.encode_utf16().collect::<Vec<_>>());
                record
                    .data
                    .iter()
                    .find(|d| {
                        d.name != CONTENT
                            && self.key(&d.name.encode_utf16().collect::<Vec<_>>()) == key
                    })
                    .ok_or_else(|| TreeError::NotFound {
                        path: shown.clone(),
                    })?
                    .name
                    .clone()
            }
        };
        let info = record.data.iter().find(|d| d.name == name);
        if record
            .attributes
            .contains(NtfsFileAttributeFlags::ENCRYPTED)
            || info.is_some_and(|d| d.flags.contains(NtfsAttributeFlags::ENCRYPTED))
        {
            return Err(TreeError::Unsupported {
                path: shown,
                detail: "it is encrypted with EFS, and only its owner's Windows account can \
                         decrypt it"
                    .into(),
            });
        }
        let Some(info) = info.cloned() else {
            // A file without content (Windows always gives one; be lenient).
            return Ok(0);
        };
        let content = self
            .content(number, NtfsAttributeType::Data, &info)
            .map_err(|e| match e {
                TreeError::NotFound { .. } => TreeError::NotFound {
                    path: shown.clone(),
                },
                other => other,
            })?;
        self.copy(content, &shown, out, control)
    }

    fn read_link(&mut self, path: &[String]) -> Result<String, TreeError> {
        let number = self.resolve(path)?;
        let record = self.record(number)?;
        record
            .reparse
            .as_deref()
            .and_then(link_target)
            .ok_or_else(|| TreeError::NotFound {
                path: path.join("/"),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};
    use std::path::{Path, PathBuf};
    use std::process::{Child as Process, Command, Stdio};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::files::{Disk, Slice};

    /// Where `name` is installed, if it is.
    fn tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var("PATH").unwrap_or_default();
        path.split(':')
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| candidate.is_file())
    }

    /// The ntfs-3g tools, or a message saying the test is skipped.
    fn tools() -> Option<(PathBuf, PathBuf)> {
        let found = tool("mkntfs").zip(tool("ntfscp"));
        if found.is_none() {
            eprintln!("skipped: mkntfs and ntfscp (ntfs-3g) are not installed");
        }
        found
    }

    /// Runs `command`, failing the test with its output if it fails.
    fn run(command: &mut Command) {
        let output = command
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("the tool runs");
        assert!(
            output.status.success(),
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A fresh NTFS image of `mib` MiB in `dir`, labelled "Windows".
    fn image(mkntfs: &Path, dir: &Path, mib: u64) -> PathBuf {
        let image = dir.join("ntfs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run(Command::new(mkntfs)
            .args(["-F", "-Q", "-L", "Windows"])
            .arg(&image));
        image
    }

    /// Copies `content` to `dest` (a path in the image, with `:stream` for a stream) with
    /// ntfscp, and `modified` as its time.
    fn ntfscp(
        ntfscp: &Path,
        image: &Path,
        dir: &Path,
        dest: &str,
        content: &[u8],
        modified: Option<SystemTime>,
    ) {
        let source = dir.join("source");
        std::fs::write(&source, content).unwrap();
        if let Some(modified) = modified {
            std::fs::File::options()
                .write(true)
                .open(&source)
                .unwrap()
                .set_modified(modified)
                .unwrap();
        }
        let mut command = Command::new(ntfscp);
        if modified.is_some() {
            command.arg("-t");
        }
        match dest.split_once(':') {
            Some((file, stream)) => command
                .args(["-N", stream])
                .arg(image)
                .arg(&source)
                .arg(file),
            None => command.arg(image).arg(&source).arg(dest),
        };
        run(&mut command);
    }

    fn open_image(image: &Path) -> NtfsTree {
        let file = std::fs::File::open(image).unwrap();
        let len = file.metadata().unwrap().len();
        let disk: Box<dyn Disk + Send> = Box::new(file);
        open_volume(Slice::new(disk, 0, len)).unwrap()
    }

    fn open_bytes(bytes: Vec<u8>) -> Result<NtfsTree, TreeError> {
        let len = bytes.len() as u64;
        let disk: Box<dyn Disk + Send> = Box::new(Cursor::new(bytes));
        open_volume(Slice::new(disk, 0, len))
    }

    fn path(text: &str) -> Vec<String> {
        text.split('/')
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn read(tree: &mut NtfsTree, at: &str, stream: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        let control = Control::new();
        let n = tree.read(&path(at), stream, &mut out, &control).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(control.progress_bytes().0, n);
        out
    }

    /// Bytes that do not compress (xorshift).
    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[3]
            })
            .collect()
    }

    /// A 200-character name that is not ASCII.
    fn long_name() -> String {
        let name: String = "Übergrößenträger – ünïcødé … "
            .chars()
            .cycle()
            .take(200)
            .collect();
        name.trim_end().to_owned()
    }

    fn names(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.name.as_str()).collect()
    }

    fn time(seconds: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    #[test]
    fn files_copied_in_with_ntfscp() {
        let Some((mkntfs, cp)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 64);
        let content = random(7, 3_000_000);
        // 2021-03-04 05:06:07.1234567 (ntfscp -t keeps whole seconds).
        let modified = time(1_614_834_367, 123_456_700);
        let long = long_name();
        ntfscp(
            &cp,
            &image,
            dir.path(),
            "random.bin",
            &content,
            Some(modified),
        );
        ntfscp(
            &cp,
            &image,
            dir.path(),
            "random.bin:Zone.Identifier",
            b"[ZoneTransfer]",
            None,
        );
        ntfscp(&cp, &image, dir.path(), &long, b"a long name", None);
        ntfscp(&cp, &image, dir.path(), "small.txt", b"hello", None);

        let mut tree = open_image(&image);
        let root = tree.list(&[]).unwrap();
        let mut listed = names(&root);
        listed.sort_unstable();
        let mut expected = vec!["random.bin", "small.txt", long.as_str()];
        expected.sort_unstable();
        assert_eq!(listed, expected, "no $MFT, no ., no DOS names");

        let random_entry = root.iter().find(|e| e.name == "random.bin").unwrap();
        assert_eq!(random_entry.kind, EntryKind::File);
        assert_eq!(random_entry.size_bytes, 3_000_000);
        assert!(random_entry.id.unwrap() >= FIRST_USER_RECORD);
        assert_eq!(
            random_entry.modified,
            Some(Timestamp {
                seconds: 1_614_834_367,
                nanos: 0
            })
        );
        assert_eq!(
            random_entry.streams,
            vec![Stream {
                name: "Zone.Identifier".into(),
                size_bytes: 14
            }]
        );
        assert_eq!(read(&mut tree, "random.bin", None), content);
        assert_eq!(
            read(&mut tree, "random.bin", Some("zone.identifier")),
            b"[ZoneTransfer]"
        );
        assert_eq!(read(&mut tree, "small.txt", None), b"hello");
        assert_eq!(read(&mut tree, &long, None), b"a long name");

        // Names are compared as Windows does: without case.
        let upper: String = long
            .chars()
            .map(|c| {
                let mut upper = c.to_uppercase();
                match (upper.next(), upper.next()) {
                    (Some(u), None) => u,
                    _ => c,
                }
            })
            .collect();
        assert_ne!(upper, long);
        let entry = tree.entry(&path(&upper)).unwrap();
        assert_eq!(entry.name, long, "the name as the folder spells it");
        assert_eq!(entry.size_bytes, 11);
        assert_eq!(tree.entry(&path("RANDOM.BIN")).unwrap().name, "random.bin");
        let root_entry = tree.entry(&[]).unwrap();
        assert_eq!(
            (root_entry.kind, root_entry.id),
            (EntryKind::Folder, Some(ROOT))
        );

        refusals(&mut tree);
    }

    /// What is not there, or not what was asked for, is refused.
    fn refusals(tree: &mut NtfsTree) {
        let control = Control::new();
        assert!(matches!(
            tree.entry(&path("$MFT")),
            Err(TreeError::NotFound { .. })
        ));
        assert!(matches!(
            tree.entry(&path("missing")),
            Err(TreeError::NotFound { .. })
        ));
        assert!(matches!(
            tree.list(&path("small.txt")),
            Err(TreeError::NotAFolder { .. })
        ));
        assert!(matches!(
            tree.list(&path("small.txt/x")),
            Err(TreeError::NotAFolder { .. })
        ));
        assert!(matches!(
            tree.read(&[], None, &mut Vec::new(), &control),
            Err(TreeError::NotAFile { .. })
        ));
        assert!(matches!(
            tree.read(&path("small.txt"), Some("nope"), &mut Vec::new(), &control),
            Err(TreeError::NotFound { .. })
        ));

        // Cancelling stops a read.
        control.cancel();
        assert!(matches!(
            tree.read(&path("random.bin"), None, &mut Vec::new(), &control),
            Err(TreeError::Cancelled(_))
        ));
    }

    #[test]
    fn what_was_never_written_reads_as_zeros() {
        let Some((mkntfs, cp)) = tools() else { return };
        let Some(fallocate) = tool("ntfsfallocate") else {
            eprintln!("skipped: ntfsfallocate is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 16);
        let content = random(9, 10_000);
        ntfscp(&cp, &image, dir.path(), "prealloc.bin", &content, None);
        // 1 000 000 bytes long, of which only the first 10 000 are initialized.
        run(Command::new(fallocate)
            .args(["-l", "1000000", "-o", "0"])
            .arg(&image)
            .arg("/prealloc.bin"));
        let mut tree = open_image(&image);
        let number = tree.resolve(&path("prealloc.bin")).unwrap();
        let info = tree.record(number).unwrap().data[0].clone();
        let Content::Runs {
            runs, initialized, ..
        } = tree
            .content(number, NtfsAttributeType::Data, &info)
            .unwrap()
        else {
            panic!("prealloc.bin is not resident");
        };
        assert_eq!((info.size, initialized), (1_000_000, 10_000));
        // Old data in the clusters past what was written must not show.
        let mut disk = std::fs::File::options().write(true).open(&image).unwrap();
        let mut logical = 0;
        for (start, len) in runs {
            if let Some(start) = start {
                let skip = 12_288u64.saturating_sub(logical).min(len);
                std::io::Seek::seek(&mut disk, std::io::SeekFrom::Start(start + skip)).unwrap();
                disk.write_all(&vec![0xaa; usize::try_from(len - skip).unwrap()])
                    .unwrap();
            }
            logical += len;
        }
        drop(disk);
        let mut tree = open_image(&image);
        let read = read(&mut tree, "prealloc.bin", None);
        assert_eq!(read.len(), 1_000_000);
        assert_eq!(&read[..10_000], &content[..]);
        assert!(read[10_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_volume_in_the_middle_of_a_disk() {
        let Some((mkntfs, cp)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 8);
        ntfscp(&cp, &image, dir.path(), "file.txt", b"inside", None);
        // 1 MiB of something else before the volume, and after it.
        let mut disk = random(1, 1 << 20);
        disk.extend(std::fs::read(&image).unwrap());
        let volume = disk.len() as u64 - (1 << 20);
        disk.extend(random(2, 1 << 20));
        let disk: Box<dyn Disk + Send> = Box::new(Cursor::new(disk));
        let mut tree = open(Slice::new(disk, 1 << 20, volume)).unwrap();
        assert_eq!(names(&tree.list(&[]).unwrap()), ["file.txt"]);
        let mut out = Vec::new();
        tree.read(&path("FILE.TXT"), None, &mut out, &Control::new())
            .unwrap();
        assert_eq!(out, b"inside");
        // Not a volume at all.
        let disk: Box<dyn Disk + Send> = Box::new(Cursor::new(random(3, 1 << 20)));
        assert!(matches!(
            open(Slice::new(disk, 0, 1 << 20)),
            Err(TreeError::Damaged { .. })
        ));
    }

    /// A disk whose reads fail from `from` on (a store with a missing chunk).
    struct Failing {
        inner: Cursor<Vec<u8>>,
        from: u64,
    }

    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.inner.position() + buf.len() as u64 > self.from {
                return Err(std::io::Error::other("chunk missing"));
            }
            self.inner.read(buf)
        }
    }

    impl std::io::Seek for Failing {
        fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn read_errors_are_read_errors() {
        let Some((mkntfs, cp)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 8);
        ntfscp(
            &cp,
            &image,
            dir.path(),
            "file.bin",
            &random(4, 100_000),
            None,
        );
        let bytes = std::fs::read(&image).unwrap();
        let mut tree = open_bytes(bytes.clone()).unwrap();
        let number = tree.resolve(&path("file.bin")).unwrap();
        let info = tree.record(number).unwrap().data[0].clone();
        let Ok(Content::Runs { runs, .. }) = tree.content(number, NtfsAttributeType::Data, &info)
        else {
            panic!("file.bin is in clusters");
        };
        let from = runs[0].0.unwrap() + 50_000;
        let len = bytes.len() as u64;
        let disk: Box<dyn Disk + Send> = Box::new(Failing {
            inner: Cursor::new(bytes),
            from,
        });
        let mut tree = open(Slice::new(disk, 0, len)).unwrap();
        let error = tree
            .read(&path("file.bin"), None, &mut Vec::new(), &Control::new())
            .unwrap_err();
        assert!(matches!(error, TreeError::Read(_)), "{error:?}");
    }

    #[test]
    fn efs_encrypted_files_are_refused() {
        let Some((mkntfs, cp)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 8);
        ntfscp(&cp, &image, dir.path(), "secret.txt", b"ciphertext", None);
        // No tool here encrypts: mark the file as Windows does, in its
        // $STANDARD_INFORMATION (in the record's first sector, clear of the fixups).
        let mut tree = open_image(&image);
        let number = tree.resolve(&path("secret.txt")).unwrap();
        let record = tree
            .with_file(number, |_, _, file| {
                Ok(file.position().value().unwrap().get())
            })
            .unwrap();
        let mut bytes = std::fs::read(&image).unwrap();
        let record = usize::try_from(record).unwrap();
        let u16_at = |at: usize| usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
        let attribute = record + u16_at(record + 0x14);
        assert_eq!(bytes[attribute], 0x10, "$STANDARD_INFORMATION comes first");
        let flags = attribute + u16_at(attribute + 0x14) + 0x20;
        assert!(flags < record + 510);
        bytes[flags + 1] |= 0x40; // FILE_ATTRIBUTE_ENCRYPTED, 0x4000
        let mut tree = open_bytes(bytes).unwrap();
        let entry = tree.entry(&path("secret.txt")).unwrap();
        assert_eq!((entry.kind, entry.size_bytes), (EntryKind::File, 10));
        let error = tree
            .read(&path("secret.txt"), None, &mut Vec::new(), &Control::new())
            .unwrap_err();
        assert!(
            matches!(&error, TreeError::Unsupported { detail, .. } if detail.contains("EFS")),
            "{error:?}"
        );
    }

    /// An ntfs-3g mount of an image, unmounted when dropped.
    struct Mount {
        point: PathBuf,
        process: Process,
        /// Tests that must see no change in the mount table wait while this one is there.
        _quiet: std::sync::MutexGuard<'static, ()>,
    }

    impl Mount {
        /// Mounts `image` on `point`, or says why not.
        fn new(image: &Path, point: &Path) -> Result<Self, String> {
            let ntfs_3g = tool("ntfs-3g").ok_or("ntfs-3g is not installed")?;
            if !Path::new("/dev/fuse").exists() {
                return Err("there is no /dev/fuse".into());
            }
            std::fs::create_dir_all(point).unwrap();
            let quiet = crate::mounts::MOUNT_TABLE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let process = Command::new(ntfs_3g)
                .args(["-o", "compression,no_detach,streams_interface=xattr"])
                .arg(image)
                .arg(point)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("ntfs-3g: {e}"))?;
            let mut mount = Self {
                point: point.to_owned(),
                process,
                _quiet: quiet,
            };
            let wanted = format!(" {} ", point.display());
            for _ in 0..200 {
                let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                if mounts.lines().any(|line| line.contains(&wanted)) {
                    return Ok(mount);
                }
                if let Ok(Some(status)) = mount.process.try_wait() {
                    return Err(format!("ntfs-3g exited ({status})"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err("ntfs-3g did not mount the image in 10 s".into())
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let unmounted = tool("fusermount3")
                .or_else(|| tool("fusermount"))
                .and_then(|fusermount| {
                    Command::new(fusermount)
                        .arg("-u")
                        .arg(&self.point)
                        .status()
                        .ok()
                })
                .is_some_and(|status| status.success());
            if !unmounted {
                Command::new("umount").arg(&self.point).status().ok();
            }
            // ntfs-3g writes everything back before it exits.
            for _ in 0..200 {
                if matches!(self.process.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.process.kill().ok();
            self.process.wait().ok();
        }
    }

    /// A reparse point's data: a link to `substitute`, shown as `print`, with `flags` for
    /// a symbolic link.
    fn reparse(tag: u32, substitute: &str, print: &str, flags: Option<u32>) -> Vec<u8> {
        let utf16 =
            |text: &str| -> Vec<u8> { text.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let (substitute, print) = (utf16(substitute), utf16(print));
        let u16_of = |n: usize| u16::try_from(n).unwrap().to_le_bytes();
        let mut body = Vec::new();
        body.extend_from_slice(&u16_of(0));
        body.extend_from_slice(&u16_of(substitute.len()));
        body.extend_from_slice(&u16_of(substitute.len()));
        body.extend_from_slice(&u16_of(print.len()));
        if let Some(flags) = flags {
            body.extend_from_slice(&flags.to_le_bytes());
        }
        body.extend_from_slice(&substitute);
        body.extend_from_slice(&print);
        let mut data = tag.to_le_bytes().to_vec();
        data.extend_from_slice(&u16_of(body.len()));
        data.extend_from_slice(&[0, 0]);
        data.extend_from_slice(&body);
        data
    }

    fn setxattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty())
            .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
    }

    /// Fills the mounted volume at `root`.
    fn populate(root: &Path, text: &[u8], noise: &[u8], deep_time: SystemTime) {
        let deep = root.join("Users/Me/Documents/Ünïcødé");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("thesis.txt"), b"chapter one").unwrap();
        std::fs::File::options()
            .write(true)
            .open(deep.join("thesis.txt"))
            .unwrap()
            .set_modified(deep_time)
            .unwrap();
        setxattr(&deep.join("thesis.txt"), "user.notes", b"written late");
        // A DOS 8.3 name besides the long one.
        std::fs::write(root.join("A long file name.txt"), b"long").unwrap();
        setxattr(
            &root.join("A long file name.txt"),
            "system.ntfs_dos_name",
            b"ALONGF~1.TXT",
        );
        // Enough names for index records besides the index root.
        let many = root.join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..400 {
            std::fs::write(many.join(format!("file-{i:03}.txt")), i.to_string()).unwrap();
        }
        // New files in a folder marked compressed are compressed.
        let packed = root.join("packed");
        std::fs::create_dir(&packed).unwrap();
        setxattr(
            &packed,
            "system.ntfs_attrib_be",
            &0x0000_0800u32.to_be_bytes(),
        );
        std::fs::write(packed.join("text.txt"), text).unwrap();
        std::fs::write(packed.join("noise.bin"), noise).unwrap();
        let mut sparse = std::fs::File::create(packed.join("sparse.bin")).unwrap();
        sparse.write_all(b"start").unwrap();
        std::io::Seek::seek(&mut sparse, std::io::SeekFrom::Start(700_000)).unwrap();
        sparse.write_all(b"end").unwrap();
        drop(sparse);
        // Windows' own links, as reparse points (ntfs-3g's `symlink` makes Interix
        // links, which Windows does not follow).
        std::fs::write(root.join("link"), b"").unwrap();
        setxattr(
            &root.join("link"),
            "system.ntfs_reparse_data",
            &reparse(TAG_SYMLINK, r"Users\Me", r"Users\Me", Some(1)),
        );
        std::fs::create_dir(root.join("junction")).unwrap();
        setxattr(
            &root.join("junction"),
            "system.ntfs_reparse_data",
            &reparse(TAG_MOUNT_POINT, r"\??\C:\Users", r"C:\Users", None),
        );
    }

    #[test]
    fn folders_compression_and_links_made_through_ntfs_3g() {
        let Some((mkntfs, _)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 64);
        let point = dir.path().join("mnt");
        let text: Vec<u8> = (0..60_000)
            .flat_map(|i| format!("line {i} of a text that compresses well\n").into_bytes())
            .collect();
        let noise = random(11, 300_000);
        let deep_time = time(1_000_000_000, 123_456_700);
        {
            let mount = match Mount::new(&image, &point) {
                Ok(mount) => mount,
                Err(why) => {
                    eprintln!("skipped: the image could not be mounted ({why})");
                    return;
                }
            };
            populate(&mount.point, &text, &noise, deep_time);
            drop(mount);
        }

        let mut tree = open_image(&image);
        let mut root = names(&tree.list(&[]).unwrap())
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        root.sort_unstable();
        assert_eq!(
            root,
            [
                "A long file name.txt",
                "Users",
                "junction",
                "link",
                "many",
                "packed"
            ],
            "each file once, without its DOS name"
        );

        let documents = tree.list(&path("users/me/documents")).unwrap();
        assert_eq!(names(&documents), ["Ünïcødé"]);
        assert_eq!(documents[0].kind, EntryKind::Folder);
        let thesis = tree.list(&path("Users/Me/Documents/ÜNÏCØDÉ")).unwrap();
        assert_eq!(thesis.len(), 1);
        assert_eq!(thesis[0].name, "thesis.txt");
        assert_eq!(thesis[0].size_bytes, 11);
        assert_eq!(
            thesis[0].modified,
            Some(Timestamp {
                seconds: 1_000_000_000,
                nanos: 123_456_700
            })
        );
        assert_eq!(
            thesis[0].streams,
            vec![Stream {
                name: "notes".into(),
                size_bytes: 12
            }]
        );
        assert_eq!(
            read(&mut tree, "Users/Me/Documents/Ünïcødé/thesis.txt", None),
            b"chapter one"
        );
        assert_eq!(
            read(
                &mut tree,
                "Users/Me/Documents/Ünïcødé/thesis.txt",
                Some("notes")
            ),
            b"written late"
        );

        let many = tree.list(&path("many")).unwrap();
        let expected: Vec<String> = (0..400).map(|i| format!("file-{i:03}.txt")).collect();
        assert_eq!(names(&many), expected, "every name, in the index's order");
        assert_eq!(read(&mut tree, "many/FILE-399.TXT", None), b"399");

        // The compressed files are compressed, and read as they were written.
        for (name, content) in [("text.txt", &text), ("noise.bin", &noise)] {
            let number = tree.resolve(&path(&format!("packed/{name}"))).unwrap();
            let record = tree.record(number).unwrap();
            assert!(
                record.data[0]
                    .flags
                    .contains(NtfsAttributeFlags::COMPRESSED),
                "{name} is compressed"
            );
            assert_eq!(&read(&mut tree, &format!("packed/{name}"), None), content);
        }
        let mut sparse = vec![0; 700_003];
        sparse[..5].copy_from_slice(b"start");
        sparse[700_000..].copy_from_slice(b"end");
        assert_eq!(read(&mut tree, "packed/sparse.bin", None), sparse);

        links(&mut tree);
        // A DOS name finds its file, by its long name.
        assert_eq!(
            tree.entry(&path("alongf~1.txt")).unwrap().name,
            "A long file name.txt"
        );
        assert_eq!(read(&mut tree, "ALONGF~1.TXT", None), b"long");
    }

    /// Links and junctions are listed, not followed.
    fn links(tree: &mut NtfsTree) {
        let link = tree.entry(&path("link")).unwrap();
        assert_eq!(link.kind, EntryKind::Symlink, "{link:?}");
        assert_eq!(tree.read_link(&path("link")).unwrap(), "Users\\Me");
        assert_eq!(
            tree.entry(&path("junction")).unwrap().kind,
            EntryKind::Symlink
        );
        assert_eq!(tree.read_link(&path("junction")).unwrap(), "C:\\Users");
        assert!(matches!(
            tree.list(&path("junction")),
            Err(TreeError::NotAFolder { .. })
        ));
        assert!(matches!(
            tree.entry(&path("junction/x")),
            Err(TreeError::NotAFolder { .. })
        ));
        assert!(matches!(
            tree.read_link(&path("packed/text.txt")),
            Err(TreeError::NotFound { .. })
        ));
        assert!(matches!(
            tree.read(&path("link"), None, &mut Vec::new(), &Control::new()),
            Err(TreeError::NotAFile { .. })
        ));
    }

    /// Whether record `number` has an attribute list (its attributes do not fit in it).
    fn has_attribute_list(tree: &mut NtfsTree, number: u64) -> bool {
        tree.with_file(number, |_, _, file| super::has_attribute_list(file))
            .unwrap()
    }

    #[test]
    fn fragmented_files_through_ntfs_3g() {
        let Some((mkntfs, _)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 64);
        let point = dir.path().join("mnt");
        let big = random(5, 20 << 20);
        let kept;
        let mut text = Vec::new();
        for i in 0..200 {
            text.extend(format!("paragraph {i}: ").bytes().cycle().take(20_000));
            text.extend_from_slice(&random(i, 20_000));
        }
        {
            let mount = match Mount::new(&image, &point) {
                Ok(mount) => mount,
                Err(why) => {
                    eprintln!("skipped: the image could not be mounted ({why})");
                    return;
                }
            };
            // Compressed, in runs of data and holes.
            let packed = mount.point.join("packed");
            std::fs::create_dir(&packed).unwrap();
            setxattr(
                &packed,
                "system.ntfs_attrib_be",
                &0x0000_0800u32.to_be_bytes(),
            );
            std::fs::write(packed.join("text.txt"), &text).unwrap();
            // Free space in small pieces only, so that the next files have many runs: fill
            // the volume, then free every other file.
            let fill = mount.point.join("fill");
            std::fs::create_dir(&fill).unwrap();
            let mut written = 0;
            while written < 4000
                && std::fs::write(fill.join(written.to_string()), random(written, 20_000)).is_ok()
            {
                written += 1;
            }
            std::fs::remove_file(fill.join(written.to_string())).ok();
            // New records may run out before the clusters do: fill those too.
            let mut rest = std::fs::File::create(fill.join("rest")).unwrap();
            while rest.write_all(&random(1, 64 << 10)).is_ok() {}
            drop(rest);
            for i in (0..written).step_by(2) {
                std::fs::remove_file(fill.join(i.to_string())).unwrap();
            }
            kept = written / 2;
            std::fs::write(mount.point.join("big.bin"), &big).unwrap();
            drop(mount);
        }
        let mut tree = open_image(&image);
        for (at, content) in [("big.bin", &big), ("packed/text.txt", &text)] {
            let number = tree.resolve(&path(at)).unwrap();
            assert!(has_attribute_list(&mut tree, number), "{at} has extents");
            let entry = tree.entry(&path(at)).unwrap();
            assert_eq!(entry.size_bytes, content.len() as u64, "{at}");
            assert!(read(&mut tree, at, None) == *content, "{at} reads back");
        }
        assert_eq!(
            tree.list(&path("fill")).unwrap().len(),
            usize::try_from(kept).unwrap() + 1
        );
        damaged_extents(&mut tree, &image);
    }

    /// An image with a few bytes changed, without a copy of it.
    struct Patched {
        base: Arc<[u8]>,
        patches: Vec<(usize, u8)>,
        position: usize,
    }

    impl std::io::Read for Patched {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let start = self.position.min(self.base.len());
            let n = buf.len().min(self.base.len() - start);
            buf[..n].copy_from_slice(&self.base[start..start + n]);
            for &(at, byte) in &self.patches {
                if (start..start + n).contains(&at) {
                    buf[at - start] = byte;
                }
            }
            self.position = start + n;
            Ok(n)
        }
    }

    impl std::io::Seek for Patched {
        fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
            let std::io::SeekFrom::Start(at) = to else {
                return Err(std::io::Error::other("only seeks from the start"));
            };
            self.position = usize::try_from(at).unwrap();
            Ok(at)
        }
    }

    /// Damages the records of the fragmented files of the image (their extents and
    /// attribute lists) and of the folder with index records: errors, never panics.
    fn damaged_extents(tree: &mut NtfsTree, image: &Path) {
        let mut records = Vec::new();
        for at in ["big.bin", "packed/text.txt", "fill"] {
            let number = tree.resolve(&path(at)).unwrap();
            // The base record and the next ones, where its extents went.
            for number in number..number + 4 {
                if let Ok(position) = tree.with_file(number, |_, _, file| Ok(file.position())) {
                    records.push(usize::try_from(position.value().unwrap().get()).unwrap());
                }
            }
        }
        let pristine: Arc<[u8]> = std::fs::read(image).unwrap().into();
        let mut errors = 0;
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % (1 << 32)).unwrap()
        };
        for _ in 0..100 {
            let record = records[next() % records.len()];
            let patches = (0..=next() % 8)
                .map(|_| (record + next() % 1024, next().to_le_bytes()[0]))
                .collect();
            let disk: Box<dyn Disk + Send> = Box::new(Patched {
                base: Arc::clone(&pristine),
                patches,
                position: 0,
            });
            let Ok(mut tree) = open_volume(Slice::new(disk, 0, pristine.len() as u64)) else {
                continue;
            };
            let control = Control::new();
            for at in ["big.bin", "packed/text.txt"] {
                let read = tree.read(&path(at), None, &mut Budget(1 << 20), &control);
                // Past the budget is a write error: not one of the damage.
                errors += usize::from(read.is_err_and(|e| !matches!(e, TreeError::Write { .. })));
            }
            errors += usize::from(tree.list(&path("fill")).is_err());
        }
        eprintln!("{errors} errors in 100 volumes with damaged extents");
    }

    /// Lists and reads everything under `folder`, counting the errors: what a damaged
    /// volume must survive.
    fn walk(tree: &mut NtfsTree, folder: &[String], depth: usize) -> usize {
        let Ok(entries) = tree.list(folder) else {
            return 1;
        };
        let mut errors = 0;
        for entry in entries.into_iter().take(500) {
            let mut at = folder.to_vec();
            at.push(entry.name.clone());
            errors += usize::from(tree.entry(&at).is_err());
            let control = Control::new();
            errors += match entry.kind {
                EntryKind::Folder if depth < 6 => walk(tree, &at, depth + 1),
                EntryKind::Symlink => usize::from(tree.read_link(&at).is_err()),
                _ => usize::from(
                    tree.read(&at, None, &mut Budget(8 << 20), &control)
                        .is_err(),
                ),
            };
            for stream in &entry.streams {
                errors += usize::from(
                    tree.read(&at, Some(&stream.name), &mut Budget(1 << 20), &control)
                        .is_err(),
                );
            }
        }
        errors
    }

    /// A sink that refuses more than its budget (a damaged size must not run the test
    /// for ever).
    struct Budget(usize);

    impl Write for Budget {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() > self.0 {
                return Err(std::io::Error::other("over budget"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn damaged_volumes_give_errors_not_panics() {
        let Some((mkntfs, cp)) = tools() else { return };
        let dir = tempfile::tempdir().unwrap();
        let image = image(&mkntfs, dir.path(), 16);
        ntfscp(
            &cp,
            &image,
            dir.path(),
            "random.bin",
            &random(3, 1 << 20),
            None,
        );
        ntfscp(&cp, &image, dir.path(), "random.bin:ads", b"stream", None);
        ntfscp(&cp, &image, dir.path(), &long_name(), b"long", None);
        for i in 0..40 {
            ntfscp(
                &cp,
                &image,
                dir.path(),
                &format!("f{i}"),
                &random(i, 3000),
                None,
            );
        }
        let pristine = std::fs::read(&image).unwrap();
        assert_eq!(walk(&mut open_bytes(pristine.clone()).unwrap(), &[], 0), 0);

        let sector = u64::from(u16::from_le_bytes([pristine[0x0b], pristine[0x0c]]));
        let cluster = sector * u64::from(pristine[0x0d]);
        let mft_lcn = u64::from_le_bytes(pristine[0x30..0x38].try_into().unwrap());
        let mft = usize::try_from(mft_lcn * cluster).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // The folders' index records.
        let indexes: Vec<usize> = (0..pristine.len())
            .step_by(512)
            .filter(|&at| pristine[at..].starts_with(b"INDX"))
            .collect();
        assert!(!indexes.is_empty(), "the root folder has index records");
        let (mut opened, mut errors) = (0, 0);
        for round in 0..300 {
            let mut bytes = pristine.clone();
            // The boot sector, the first records of the MFT (the volume's own, the root
            // folder, the files above), or an index record.
            let flips = 1 + next() % 12;
            let index = indexes[usize::try_from(next()).unwrap() % indexes.len()];
            for _ in 0..flips {
                let at = match round % 5 {
                    0 => usize::try_from(next() % 512).unwrap(),
                    1 => index + usize::try_from(next() % 4096).unwrap(),
                    _ => mft + usize::try_from(next() % (90 * 1024)).unwrap(),
                };
                bytes[at] = next().to_le_bytes()[0];
            }
            if let Ok(mut tree) = open_bytes(bytes) {
                opened += 1;
                errors += walk(&mut tree, &[], 0);
            }
        }
        eprintln!("{opened} of 300 damaged volumes opened; {errors} errors in them");
    }
}
