//! Just enough of the qcow2 header to follow a backing chain.
//!
//! libvirt describes backing chains only for running VMs. For shut-off VMs Rewind reads the
//! image headers itself (when it may read the files). Layout per QEMU's `docs/interop/qcow2.txt`:
//! big-endian fields, backing file name at `backing_file_offset` (at most 1023 bytes),
//! optional header extensions after the header, one of which names the backing format.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::MAGIC;
use crate::vm::BackingImage;

/// Header extension type naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// The spec limits backing file names to 1023 bytes.
const MAX_BACKING_NAME: u32 = 1023;
/// Chains deeper than this are treated as broken (and cycles end here too).
const MAX_CHAIN_DEPTH: usize = 64;
/// How much of the header area is read: header plus extensions fit comfortably.
const HEADER_READ: usize = 64 * 1024;

/// The backing reference stored in one qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The backing file name as stored (may be relative to the image's folder).
    pub name: String,
    /// The backing format from the header extension, if present.
    pub format: Option<String>,
}

/// Reads the backing reference from a qcow2 header.
///
/// Returns `Ok(None)` when the image has no backing file, and an error of kind
/// `InvalidData` when the bytes are not a sane qcow2 header.
pub fn parse_header(header: &[u8]) -> std::io::Result<Option<BackingRef>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    // Every field access goes through here or `be_field`: no offset taken from the file can overflow or
    // index out of bounds.
    let bytes = |at: usize, len: usize, what: &str| -> std::io::Result<&[u8]> {
        at.checked_add(len)
            .and_then(|end| header.get(at..end))
            .ok_or_else(|| bad(what))
    };
    let be32 = |at: usize| be_field(header, at, 4).map(|v| u32::try_from(v).expect("4 bytes"));
    let be64 = |at: usize| be_field(header, at, 8);
    check_start(header)?;
    let version = be32(4)?;
    let name_offset = be64(8)?;
    let name_len = be32(16)?;
    if name_offset == 0 || name_len == 0 {
        return Ok(None);
    }
    if name_len > MAX_BACKING_NAME {
        return Err(bad("qcow2 backing file name is longer than 1023 bytes"));
    }
    let start = usize::try_from(name_offset).map_err(|_| bad("backing name offset too large"))?;
    let name = bytes(
        start,
        name_len as usize,
        "qcow2 backing file name lies outside the header area",
    )?;
    let name = String::from_utf8(name.to_vec())
        .map_err(|_| bad("qcow2 backing file name is not UTF-8"))?;

    let mut format = None;
    let mut at = if version >= 3 {
        be32(100)? as usize
    } else {
        72
    };
    // Extensions end at a zero type, or at the backing name (they never overlap it).
    while at.saturating_add(8) <= start.min(header.len()) {
        let kind = be32(at)?;
        let len = be32(at + 4)? as usize;
        if kind == 0 {
            break;
        }
        let data = bytes(at + 8, len, "qcow2 header extension is truncated")?;
        if kind == EXT_BACKING_FORMAT {
            format = Some(
                String::from_utf8(data.to_vec())
                    .map_err(|_| bad("qcow2 backing format is not UTF-8"))?,
            );
        }
        at = at + 8 + len.div_ceil(8) * 8;
    }
    Ok(Some(BackingRef { name, format }))
}

/// Follows the backing chain starting at the qcow2 image `path`, top first (excluding `path`).
pub fn backing_chain(path: &Path) -> std::io::Result<Vec<BackingImage>> {
    let mut chain: Vec<BackingImage> = Vec::new();
    let mut current = path.to_path_buf();
    let mut format = Some("qcow2".to_owned());
    while format.as_deref() == Some("qcow2") || format.is_none() && is_qcow2(&current) {
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "qcow2 backing chain is deeper than 64 images or loops",
            ));
        }
        let Some(backing) = parse_header(&read_header(&current)?)? else {
            break;
        };
        let next = resolve(&current, &backing.name);
        format.clone_from(&backing.format);
        chain.push(BackingImage {
            path: next.clone(),
            format: backing.format,
        });
        current = next;
    }
    Ok(chain)
}

/// The guest-visible size of the qcow2 image `path`, from its header (`size`, bytes 24–31);
/// an error of kind `InvalidData` if the file does not start with a qcow2 v2/v3 header.
pub fn virtual_size(path: &Path) -> std::io::Result<u64> {
    let mut header = Vec::with_capacity(32);
    File::open(path)?.take(32).read_to_end(&mut header)?;
    check_start(&header)?;
    be_field(&header, 24, 8)
}

/// Incompatible feature bits (v3 header, bytes 72–79) under which an image's data clusters
/// are not plain guest data in the image's own file: bit 1, the image is marked corrupt;
/// bit 2, the data lives in an external data file.
const INCOMPATIBLE_CORRUPT_OR_EXTERNAL: u64 = 0b110;

/// Whether the data clusters of the qcow2 image `path` hold the guest's bytes as they are,
/// in the image's own file: no encryption (`crypt_method`, bytes 32–35, is 0), no external
/// data file, not marked corrupt. Compressed clusters are told apart per cluster
/// (`qemu-img map` gives them no plain offset). An error of kind `InvalidData` if the file
/// does not start with a qcow2 v2/v3 header.
pub fn data_in_file_only(path: &Path) -> std::io::Result<bool> {
    let mut header = Vec::with_capacity(80);
    File::open(path)?.take(80).read_to_end(&mut header)?;
    check_start(&header)?;
    let incompatible = if be_field(&header, 4, 4)? >= 3 {
        be_field(&header, 72, 8)?
    } else {
        0
    };
    Ok(be_field(&header, 32, 4)? == 0 && incompatible & INCOMPATIBLE_CORRUPT_OR_EXTERNAL == 0)
}

/// Checks the magic and version a qcow2 header starts with.
fn check_start(header: &[u8]) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    if be_field(header, 0, 4)? != u64::from(MAGIC) {
        return Err(bad("not a qcow2 image (bad magic)"));
    }
    if !(2..=3).contains(&be_field(header, 4, 4)?) {
        return Err(bad("unsupported qcow2 version"));
    }
    Ok(())
}

/// The big-endian field of `len` (at most 8) bytes at `at`; `InvalidData` if the header
/// ends before it.
fn be_field(header: &[u8], at: usize, len: usize) -> std::io::Result<u64> {
    at.checked_add(len)
        .and_then(|end| header.get(at..end))
        .map(|b| b.iter().fold(0u64, |v, &b| v << 8 | u64::from(b)))
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "qcow2 header is truncated")
        })
}

fn is_qcow2(path: &Path) -> bool {
    read_header(path).is_ok_and(|h| h.get(..4) == Some(&MAGIC.to_be_bytes()))
}

fn read_header(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(0))?;
    let mut buf = Vec::with_capacity(HEADER_READ);
    file.take(HEADER_READ as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Relative backing names are relative to the folder of the image that names them.
fn resolve(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a v3 header with an optional backing name and backing-format extension.
    fn header(backing: Option<(&str, Option<&str>)>) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut at = 104;
        if let Some((name, fmt)) = backing {
            if let Some(fmt) = fmt {
                h[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
                h[at + 4..at + 8].copy_from_slice(&u32::try_from(fmt.len()).unwrap().to_be_bytes());
                h[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
                at += 8 + fmt.len().div_ceil(8) * 8;
            }
            at += 8; // end-of-extensions marker (zeros)
            h[8..16].copy_from_slice(&(at as u64).to_be_bytes());
            h[16..20].copy_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            h[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        h
    }

    #[test]
    fn no_backing() {
        assert_eq!(parse_header(&header(None)).unwrap(), None);
    }

    #[test]
    fn backing_with_format() {
        let r = parse_header(&header(Some(("base.qcow2", Some("qcow2")))))
            .unwrap()
            .unwrap();
        assert_eq!(r.name, "base.qcow2");
        assert_eq!(r.format.as_deref(), Some("qcow2"));
        let r = parse_header(&header(Some(("/abs/base.raw", None))))
            .unwrap()
            .unwrap();
        assert_eq!((r.name.as_str(), r.format), ("/abs/base.raw", None));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_header(b"").is_err());
        assert!(parse_header(b"QFI").is_err());
        assert!(parse_header(&[0u8; 512]).is_err());
        let mut h = header(Some(("base", None)));
        h[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_header(&h).is_err(), "over-long name");
        let mut h = header(Some(("base", None)));
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(parse_header(&h).is_err(), "offset out of range");
        let mut h = header(Some(("base", Some("raw"))));
        h[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_header(&h).is_err(), "extension longer than header");
        // Every truncation of a valid header is an error or a clean answer, never a panic.
        let h = header(Some(("base.qcow2", Some("qcow2"))));
        for n in 0..h.len() {
            drop(parse_header(&h[..n]));
        }
    }

    #[test]
    fn virtual_size_of_real_images_matches_qemu_img() {
        let dir = std::env::temp_dir().join(format!("rewind-qcow2-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.qcow2");
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("3221291008") // 3 GiB + 64 KiB
            .status();
        let size = virtual_size(&image);
        let mut not_qcow2 = header(None);
        not_qcow2[4..8].copy_from_slice(&9u32.to_be_bytes());
        std::fs::write(dir.join("v9.qcow2"), &not_qcow2).unwrap();
        std::fs::write(dir.join("short.qcow2"), &not_qcow2[..20]).unwrap();
        let v9 = virtual_size(&dir.join("v9.qcow2"));
        let short = virtual_size(&dir.join("short.qcow2"));
        let missing = virtual_size(&dir.join("missing.qcow2"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(created.unwrap().success(), "qemu-img create");
        assert_eq!(size.unwrap(), 3_221_291_008);
        assert_eq!(v9.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(short.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn data_in_file_only_of_real_images() {
        let dir = tempfile::tempdir().unwrap();
        let create = |name: &str, args: &[&str]| {
            let path = dir.path().join(name);
            let ok = std::process::Command::new("qemu-img")
                .args(["create", "-q"])
                .args(args)
                .arg(&path)
                .arg("1M")
                .status()
                .unwrap()
                .success();
            assert!(ok, "qemu-img create {args:?}");
            path
        };
        let plain = create("plain.qcow2", &["-f", "qcow2"]);
        let v2 = create("v2.qcow2", &["-f", "qcow2", "-o", "compat=0.10"]);
        let external = dir.path().join("data.raw");
        let with_data_file = create(
            "external.qcow2",
            &[
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={}", external.display()),
            ],
        );
        // An encrypted image's header, as QEMU writes it (`crypt_method` 2, LUKS): creating
        // one with qemu-img times its key derivation, which fails on a busy machine.
        let encrypted = dir.path().join("luks.qcow2");
        let mut bytes = std::fs::read(&plain).unwrap();
        bytes[32..36].copy_from_slice(&2u32.to_be_bytes());
        std::fs::write(&encrypted, bytes).unwrap();
        let raw = create("disk.raw", &["-f", "raw"]);
        assert!(data_in_file_only(&plain).unwrap());
        assert!(data_in_file_only(&v2).unwrap());
        assert!(!data_in_file_only(&with_data_file).unwrap());
        assert!(!data_in_file_only(&encrypted).unwrap());
        assert_eq!(
            data_in_file_only(&raw).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn chain_of_real_files_with_relative_names() {
        let dir = std::env::temp_dir().join(format!("rewind-qcow2-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base.raw"), [0u8; 16]).unwrap();
        std::fs::write(
            dir.join("mid.qcow2"),
            header(Some(("base.raw", Some("raw")))),
        )
        .unwrap();
        std::fs::write(
            dir.join("top.qcow2"),
            header(Some(("mid.qcow2", Some("qcow2")))),
        )
        .unwrap();
        let chain = backing_chain(&dir.join("top.qcow2"));
        let loops = {
            std::fs::write(dir.join("loop.qcow2"), header(Some(("loop.qcow2", None)))).unwrap();
            backing_chain(&dir.join("loop.qcow2"))
        };
        std::fs::remove_dir_all(&dir).unwrap();
        let chain = chain.unwrap();
        assert_eq!(
            chain,
            [
                BackingImage {
                    path: dir.join("mid.qcow2"),
                    format: Some("qcow2".into())
                },
                BackingImage {
                    path: dir.join("base.raw"),
                    format: Some("raw".into())
                },
            ]
        );
        assert!(
            loops.is_err(),
            "a self-referencing image is reported, not followed forever"
        );
    }
}
