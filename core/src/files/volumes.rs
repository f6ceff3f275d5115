//! The volumes of a disk: its GPT or MBR partition table (or a file system on the whole
//! disk), and for each volume the file system found in its first sectors, with its label.

use std::io::SeekFrom;
use std::panic::AssertUnwindSafe;

use super::{Disk, FilesError};

/// How the disk is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionTable {
    /// A GUID partition table (UEFI systems: Windows 11, most Linux installs).
    Gpt,
    /// A master boot record, with its extended partitions.
    Mbr,
    /// No partition table: a file system on the whole disk, or nothing Rewind knows.
    None,
}

/// The file system found at the start of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSystem {
    /// Windows' NTFS.
    Ntfs,
    /// A BitLocker-encrypted volume: its files can be read only after it is unlocked.
    Bitlocker,
    /// FAT12 or FAT16.
    Fat,
    /// FAT32 (an EFI system partition, a USB stick's image).
    Fat32,
    /// exFAT.
    Exfat,
    /// Linux's ext2, ext3 or ext4.
    Ext,
    /// Nothing Rewind recognises (swap, LVM, encrypted, empty, or damaged).
    Unknown,
}

impl FileSystem {
    /// Its usual name, for people.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Ntfs => "NTFS",
            Self::Bitlocker => "BitLocker",
            Self::Fat => "FAT",
            Self::Fat32 => "FAT32",
            Self::Exfat => "exFAT",
            Self::Ext => "ext4",
            Self::Unknown => "unknown",
        }
    }
}

/// One volume of a disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    /// The partition's number as the guest's tools count it (from 1; 5 and up are MBR
    /// logical partitions), 0 for a file system on the whole disk.
    pub number: u32,
    /// Where it starts on the disk, in bytes.
    pub start_bytes: u64,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The partition's type: "EFI system", "Microsoft basic data", … or its GUID or MBR
    /// type number when Rewind does not know it.
    pub partition_type: String,
    /// The GPT partition's own name, if it has one.
    pub partition_name: Option<String>,
    /// The file system in it.
    pub file_system: FileSystem,
    /// The file system's label, if it has one.
    pub label: Option<String>,
}

/// At most this many GPT entries are read: tables are made with 128.
const MAX_GPT_ENTRIES: u32 = 1024;

/// The partition table of `disk` (`size` bytes; named `target` in errors) and its volumes,
/// in the order of the table.
///
/// # Errors
/// The disk could not be read, or its partition table is damaged.
pub fn volumes(
    disk: &mut dyn Disk,
    size: u64,
    target: &str,
) -> Result<(PartitionTable, Vec<Volume>), FilesError> {
    let read_failed = |source| FilesError::Read {
        disk: target.to_owned(),
        source,
    };
    let bad = |detail: String| FilesError::BadTable {
        disk: target.to_owned(),
        detail,
    };
    let first = read_exact_at(disk, 0, 512, size).map_err(read_failed)?;
    let boot_signature = first.len() == 512 && first[510..512] == [0x55, 0xaa];
    let protective = boot_signature
        && (0..4).any(|i| first[446 + 16 * i + 4] == 0xee)
        && gpt_header_sector(disk, size)
            .map_err(read_failed)?
            .is_some();
    if protective {
        let sector = gpt_header_sector(disk, size)
            .map_err(read_failed)?
            .expect("checked above");
        check_gpt_header(disk, sector, size)
            .map_err(read_failed)?
            .map_err(&bad)?;
        let gpt = guarded(|| {
            disk.seek(SeekFrom::Start(0))?;
            gptman::GPT::find_from(&mut *disk).map_err(std::io::Error::other)
        })
        .map_err(|e| bad(e.to_string()))?;
        let mut found = Vec::new();
        for (number, entry) in gpt.iter().filter(|(_, e)| e.is_used()) {
            let (start, length) = extent(
                entry.starting_lba,
                entry
                    .ending_lba
                    .checked_add(1)
                    .and_then(|end| end.checked_sub(entry.starting_lba)),
                gpt.sector_size,
                size,
            )
            .ok_or_else(|| bad(format!("partition {number} lies outside the disk")))?;
            let (file_system, label) = probe(disk, start, length).map_err(read_failed)?;
            let name = entry.partition_name.as_str().trim().to_owned();
            found.push(Volume {
                number,
                start_bytes: start,
                size_bytes: length,
                partition_type: gpt_type_name(entry.partition_type_guid),
                partition_name: (!name.is_empty()).then_some(name),
                file_system,
                label,
            });
        }
        return Ok((PartitionTable::Gpt, found));
    }
    let (whole, label) = probe(disk, 0, size).map_err(read_failed)?;
    if whole != FileSystem::Unknown || !boot_signature {
        let found = (whole != FileSystem::Unknown).then(|| Volume {
            number: 0,
            start_bytes: 0,
            size_bytes: size,
            partition_type: "whole disk".into(),
            partition_name: None,
            file_system: whole,
            label,
        });
        return Ok((PartitionTable::None, found.into_iter().collect()));
    }
    let mbr = guarded(|| {
        disk.seek(SeekFrom::Start(0))?;
        mbrman::MBR::read_from(&mut *disk, 512).map_err(std::io::Error::other)
    })
    .map_err(|e| bad(e.to_string()))?;
    let mut found = Vec::new();
    for (number, entry) in mbr.iter() {
        if !entry.is_used() || entry.is_extended() {
            continue;
        }
        let number = u32::try_from(number).map_err(|_| bad("too many partitions".into()))?;
        let (start, length) = extent(
            u64::from(entry.starting_lba),
            Some(u64::from(entry.sectors)),
            512,
            size,
        )
        .ok_or_else(|| bad(format!("partition {number} lies outside the disk")))?;
        let (file_system, label) = probe(disk, start, length).map_err(read_failed)?;
        found.push(Volume {
            number,
            start_bytes: start,
            size_bytes: length,
            partition_type: mbr_type_name(entry.sys),
            partition_name: None,
            file_system,
            label,
        });
    }
    Ok((PartitionTable::Mbr, found))
}

/// Runs a parser of the partition-table crates, turning a panic on hostile input into an
/// error.
fn guarded<T>(parse: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the partition table could not be parsed",
        ))
    })
}

/// `(start, length)` in bytes of `sectors` sectors of `sector_size` from `lba`, if all of it
/// is on the disk.
fn extent(lba: u64, sectors: Option<u64>, sector_size: u64, disk: u64) -> Option<(u64, u64)> {
    let start = lba.checked_mul(sector_size)?;
    let length = sectors?.checked_mul(sector_size)?;
    (length > 0 && start.checked_add(length)? <= disk).then_some((start, length))
}

/// Up to `len` bytes at `offset`, fewer at the end of the disk.
fn read_exact_at(
    disk: &mut dyn Disk,
    offset: u64,
    len: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    let len = len.min(size.saturating_sub(offset));
    let mut buf = vec![0; usize::try_from(len).unwrap_or(0)];
    disk.seek(SeekFrom::Start(offset))?;
    disk.read_exact(&mut buf)?;
    Ok(buf)
}

/// The sector size whose LBA 1 holds a GPT header ("EFI PART"): 512 or 4096.
fn gpt_header_sector(disk: &mut dyn Disk, size: u64) -> std::io::Result<Option<u64>> {
    for sector in [512, 4096] {
        if read_exact_at(disk, sector, 8, size)? == b"EFI PART" {
            return Ok(Some(sector));
        }
    }
    Ok(None)
}

/// Checks the counts of the GPT header at LBA 1 before a parser allocates by them.
fn check_gpt_header(
    disk: &mut dyn Disk,
    sector: u64,
    size: u64,
) -> std::io::Result<Result<(), String>> {
    let header = read_exact_at(disk, sector, 92, size)?;
    if header.len() < 92 {
        return Ok(Err("the GPT header is cut short".into()));
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let (entries, entry_size) = (word(80), word(84));
    if entries > MAX_GPT_ENTRIES {
        return Ok(Err(format!(
            "the GPT header claims {entries} partition entries (at most {MAX_GPT_ENTRIES} are read)"
        )));
    }
    if !(128..=4096).contains(&entry_size) || entry_size % 128 != 0 {
        return Ok(Err(format!(
            "the GPT header claims entries of {entry_size} bytes"
        )));
    }
    Ok(Ok(()))
}

/// The file system at `start` (of a volume of `length` bytes), and its label.
fn probe(
    disk: &mut dyn Disk,
    start: u64,
    length: u64,
) -> std::io::Result<(FileSystem, Option<String>)> {
    let end = start.saturating_add(length);
    let head = read_exact_at(disk, start, 2048.min(length), end)?;
    let at = |from: usize, to: usize| head.get(from..to);
    let label = |from: usize, to: usize| {
        at(from, to)
            .map(|b| {
                String::from_utf8_lossy(b)
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_owned()
            })
            .filter(|l| !l.is_empty() && l != "NO NAME")
    };
    let found = match at(3, 11) {
        Some(b"NTFS    ") => Some((FileSystem::Ntfs, super::ntfs::label(disk, start, length))),
        Some(b"-FVE-FS-") => Some((FileSystem::Bitlocker, None)),
        Some(b"EXFAT   ") => Some((FileSystem::Exfat, None)),
        _ => None,
    };
    if let Some(found) = found {
        return Ok(found);
    }
    if at(510, 512) == Some(&[0x55, 0xaa]) {
        if at(82, 87) == Some(b"FAT32") {
            return Ok((FileSystem::Fat32, label(71, 82)));
        }
        if matches!(at(54, 59), Some(b"FAT12" | b"FAT16")) {
            return Ok((FileSystem::Fat, label(43, 54)));
        }
    }
    // ext2/3/4: the superblock 1 KiB in, its magic 56 bytes into it.
    if at(1024 + 56, 1024 + 58) == Some(&[0x53, 0xef]) {
        return Ok((FileSystem::Ext, label(1024 + 120, 1024 + 136)));
    }
    Ok((FileSystem::Unknown, None))
}

/// A GPT partition type's name (the GUID as stored: mixed-endian).
fn gpt_type_name(raw: [u8; 16]) -> String {
    let guid = uuid::Uuid::from_bytes_le(raw).to_string().to_uppercase();
    let name = match guid.as_str() {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        _ => return guid,
    };
    name.to_owned()
}

/// An MBR partition type's name.
fn mbr_type_name(sys: u8) -> String {
    match sys {
        0x01 | 0x04 | 0x06 | 0x0e => "FAT".into(),
        0x07 => "NTFS/exFAT".into(),
        0x0b | 0x0c => "FAT32".into(),
        0x27 => "Windows recovery".into(),
        0x82 => "Linux swap".into(),
        0x83 => "Linux".into(),
        0x8e => "Linux LVM".into(),
        0xef => "EFI system".into(),
        other => format!("type 0x{other:02x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    /// An empty disk of `mib` MiB.
    fn disk(mib: u64) -> Vec<u8> {
        vec![0; usize::try_from(mib * MIB).unwrap()]
    }

    fn put(disk: &mut [u8], at: u64, bytes: &[u8]) {
        let at = usize::try_from(at).unwrap();
        disk[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A FAT32 boot sector with `label`, at `at`.
    fn fat32(disk: &mut [u8], at: u64, label: &[u8; 11]) {
        put(disk, at + 3, b"MSDOS5.0");
        put(disk, at + 71, label);
        put(disk, at + 82, b"FAT32   ");
        put(disk, at + 510, &[0x55, 0xaa]);
    }

    fn ext4(disk: &mut [u8], at: u64, label: &[u8]) {
        put(disk, at + 1024 + 56, &[0x53, 0xef]);
        put(disk, at + 1024 + 120, label);
    }

    #[test]
    fn an_mbr_disk_lists_its_partitions_and_their_file_systems() {
        let mut d = disk(8);
        let mut cursor = Cursor::new(&mut d);
        let mut mbr = mbrman::MBR::new_from(&mut cursor, 512, [1, 2, 3, 4]).unwrap();
        mbr[1] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_ACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: 0x0c,
            last_chs: mbrman::CHS::empty(),
            starting_lba: 2048,
            sectors: 4096,
        };
        mbr[2] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: 0x83,
            last_chs: mbrman::CHS::empty(),
            starting_lba: 6144,
            sectors: 8192,
        };
        mbr.write_into(&mut cursor).unwrap();
        fat32(&mut d, 2048 * 512, b"USBSTICK   ");
        ext4(&mut d, 6144 * 512, b"home");
        let size = d.len() as u64;
        let (table, found) = volumes(&mut Cursor::new(&d), size, "vda").unwrap();
        assert_eq!(table, PartitionTable::Mbr);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            (
                found[0].number,
                found[0].file_system,
                found[0].label.as_deref()
            ),
            (1, FileSystem::Fat32, Some("USBSTICK"))
        );
        assert_eq!(found[0].start_bytes, 2048 * 512);
        assert_eq!(found[0].size_bytes, 4096 * 512);
        assert_eq!(found[0].partition_type, "FAT32");
        assert_eq!(
            (
                found[1].number,
                found[1].file_system,
                found[1].label.as_deref()
            ),
            (2, FileSystem::Ext, Some("home"))
        );
    }

    #[test]
    fn a_file_system_on_the_whole_disk_is_one_volume_and_an_empty_disk_none() {
        let mut d = disk(2);
        ext4(&mut d, 0, b"data");
        let (table, found) = volumes(&mut Cursor::new(&d), d.len() as u64, "vdb").unwrap();
        assert_eq!(table, PartitionTable::None);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].number, found[0].file_system),
            (0, FileSystem::Ext)
        );

        let empty = disk(1);
        let (table, found) = volumes(&mut Cursor::new(&empty), empty.len() as u64, "vdc").unwrap();
        assert_eq!((table, found.len()), (PartitionTable::None, 0));
    }

    #[test]
    fn bitlocker_is_named_as_such() {
        let mut d = disk(1);
        put(&mut d, 3, b"-FVE-FS-");
        put(&mut d, 510, &[0x55, 0xaa]);
        let (_, found) = volumes(&mut Cursor::new(&d), d.len() as u64, "vda").unwrap();
        assert_eq!(found[0].file_system, FileSystem::Bitlocker);
    }

    #[test]
    fn hostile_tables_are_reported_not_followed() {
        // A protective MBR and a GPT header claiming four billion entries.
        let mut d = disk(1);
        put(&mut d, 446 + 4, &[0xee]);
        put(&mut d, 510, &[0x55, 0xaa]);
        put(&mut d, 512, b"EFI PART");
        put(&mut d, 512 + 80, &u32::MAX.to_le_bytes());
        put(&mut d, 512 + 84, &128u32.to_le_bytes());
        let err = volumes(&mut Cursor::new(&d), d.len() as u64, "vda").unwrap_err();
        assert!(
            err.to_string().contains("4294967295 partition entries"),
            "{err}"
        );

        // An MBR partition past the end of the disk.
        let mut d = disk(1);
        put(&mut d, 446 + 4, &[0x83]);
        put(&mut d, 446 + 8, &100u32.to_le_bytes());
        put(&mut d, 446 + 12, &u32::MAX.to_le_bytes());
        put(&mut d, 510, &[0x55, 0xaa]);
        let err = volumes(&mut Cursor::new(&d), d.len() as u64, "vda").unwrap_err();
        assert!(
            matches!(err, FilesError::BadTable { .. }) && err.to_string().contains("outside"),
            "{err}"
        );

        // Random bytes: no panic, whatever they say.
        for seed in 0..64u64 {
            let mut d = crate::store::tests::noise(seed, 64 << 10);
            put(&mut d, 510, &[0x55, 0xaa]);
            if seed % 2 == 0 {
                put(&mut d, 446 + 4, &[0xee]);
                put(&mut d, 512, b"EFI PART");
            }
            drop(volumes(&mut Cursor::new(&d), d.len() as u64, "vda"));
        }
    }
}
