//! Reading a disk image that nothing writes (a shut-off VM's, under `qemu-nbd`'s lock)
//! straight from its file, instead of through an NBD export: `qemu-img map` says where
//! each guest extent's data lies in the file, and the workers read those bytes themselves.
//! This spares the export's copies (QEMU reading into a fresh buffer, then into the socket,
//! then Rewind out of it): about a third of a full checkpoint's CPU.
//!
//! Only images whose data all lies in the file itself qualify: raw, and qcow2 without
//! encryption, an external data file, a backing file holding data, or compressed
//! clusters. Anything else is read through `qemu-nbd` as before.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use crate::progress::Control;
use crate::store::{CheckpointWriter, FinishedObject};

use super::CheckpointError;

/// Where a disk's data lies in its image file.
#[derive(Debug)]
pub(super) struct ImageMap {
    /// The image, open for reading.
    file: File,
    /// The guest disk's size in bytes.
    size_bytes: u64,
    /// Guest extents holding data, sorted, disjoint. The rest of the disk reads as zeros.
    data: Vec<DataExtent>,
}

/// A guest extent whose bytes lie, as they are, at `host` in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataExtent {
    guest: u64,
    len: u64,
    host: u64,
}

impl DataExtent {
    fn end(self) -> u64 {
        self.guest + self.len
    }
}

/// Whether an image of `format` may be read directly at all (before asking `qemu-img`).
fn format_qualifies(path: &Path, format: Option<&str>) -> bool {
    match format {
        Some("raw") => true,
        Some("qcow2") => crate::qcow2::read::data_in_file_only(path).unwrap_or(false),
        _ => false,
    }
}

/// The map of image `path` (format `format`), or `None` when it is not to be read
/// directly. The image must not change meanwhile (`qemu-nbd --read-only` holds it, or the
/// running VM's QEMU as the backing file of a live snapshot's overlay).
pub(super) fn map_image(path: &str, format: Option<&str>) -> Option<ImageMap> {
    let path = Path::new(path);
    let file = File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() || !format_qualifies(path, format) {
        return None;
    }
    // `-U`: `qemu-nbd` or QEMU holds the image's lock, which keeps writers out; sharing
    // it with another reader is safe.
    let output = std::process::Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f"])
        .arg(format?)
        .arg(path)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let (size_bytes, data) = parse_map(&output.stdout)?;
    Some(ImageMap {
        file,
        size_bytes,
        data,
    })
}

/// One extent of `qemu-img map --output=json`.
#[derive(serde::Deserialize)]
struct MapExtent {
    start: u64,
    length: u64,
    depth: u64,
    data: bool,
    offset: Option<u64>,
    /// Newer `qemu-img`s name compressed clusters (whose offset is not raw data).
    #[serde(default)]
    compressed: bool,
}

/// The disk size and the data extents of a `qemu-img map --output=json`, or `None` if any
/// data lies elsewhere than in the image's own file at a plain offset (a backing file, a
/// compressed cluster) or the map is not one of whole, ordered extents.
fn parse_map(json: &[u8]) -> Option<(u64, Vec<DataExtent>)> {
    let extents: Vec<MapExtent> = serde_json::from_slice(json).ok()?;
    let mut at = 0;
    let mut data: Vec<DataExtent> = Vec::new();
    for e in extents {
        if e.start != at || e.length == 0 {
            return None;
        }
        at = e.start.checked_add(e.length)?;
        if !e.data {
            continue;
        }
        if e.depth != 0 || e.compressed {
            return None;
        }
        let offset = e.offset?;
        offset.checked_add(e.length)?;
        match data.last_mut() {
            Some(last) if last.end() == e.start && last.host + last.len == offset => {
                last.len += e.length;
            }
            _ => data.push(DataExtent {
                guest: e.start,
                len: e.length,
                host: offset,
            }),
        }
    }
    Some((at, data))
}

impl ImageMap {
    /// The chunk slots (of `chunk` bytes) that hold data, ascending.
    fn slots(&self, chunk: u64) -> Vec<u64> {
        let mut slots: Vec<u64> = Vec::new();
        for e in &self.data {
            let (first, last) = (e.guest / chunk, (e.end() - 1) / chunk);
            let from = match slots.last() {
                Some(&l) if l >= first => l + 1,
                _ => first,
            };
            slots.extend(from..=last);
        }
        slots
    }

    /// Fills `buf` with the guest's bytes from `offset` on: data read from the file, zeros
    /// elsewhere. Returns the bytes read from the file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<u64> {
        let end = offset + buf.len() as u64;
        let first = self.data.partition_point(|e| e.end() <= offset);
        let mut filled = offset;
        let mut read = 0;
        for e in &self.data[first..] {
            if e.guest >= end {
                break;
            }
            let (from, to) = (e.guest.max(offset), e.end().min(end));
            let at = |x: u64| usize::try_from(x - offset).expect("inside the buffer");
            buf[at(filled)..at(from)].fill(0);
            self.file
                .read_exact_at(&mut buf[at(from)..at(to)], e.host + (from - e.guest))?;
            read += to - from;
            filled = to;
        }
        let at = usize::try_from(filled - offset).expect("inside the buffer");
        buf[at..].fill(0);
        Ok(read)
    }
}

/// Reads every data chunk of the image into a new object with every core. Returns the
/// object and the bytes read from the file.
pub(super) fn read_image(
    writer: &CheckpointWriter<'_>,
    map: &ImageMap,
    vm: &str,
    target: &str,
    path: &str,
    control: &Control,
) -> Result<(FinishedObject, u64), CheckpointError> {
    let mut object = writer.object_writer(map.size_bytes, None)?;
    let chunk = u64::from(writer.store().chunk_size_bytes());
    let slots = map.slots(chunk);
    control.add_total_bytes(slots.iter().map(|&i| object.chunk_len(i)).sum());
    let read_bytes = std::sync::atomic::AtomicU64::new(0);
    let read = |i: u64, buf: &mut [u8]| {
        let n = map
            .read_at(i * chunk, buf)
            .map_err(|source| CheckpointError::ReadImage {
                vm: vm.to_owned(),
                target: target.to_owned(),
                file: path.into(),
                source,
            })?;
        read_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, CheckpointError>(n > 0)
    };
    object.put_slots(&slots, control, vec![read; crate::store::reader_count()])?;
    Ok((object.finish()?, read_bytes.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_of_data_in_the_file_is_taken_merged() {
        let json = br#"[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 1114112, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 393216},
{ "start": 1179648, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
{ "start": 1245184, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 65536},
{ "start": 1310720, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        let (size, data) = parse_map(json).unwrap();
        assert_eq!(size, 1_376_256);
        let extent = |guest, len, host| DataExtent { guest, len, host };
        assert_eq!(
            data,
            vec![
                extent(1_048_576, 131_072, 327_680),
                extent(1_245_184, 65_536, 65_536)
            ]
        );
    }

    #[test]
    fn data_elsewhere_or_a_broken_map_is_refused() {
        let backing = br#"[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 0}]"#;
        let compressed = br#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true}]"#;
        let flagged = br#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": true, "offset": 5}]"#;
        let gap = br#"[{ "start": 0, "length": 4096, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 8192, "length": 4096, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        for json in [&backing[..], compressed, flagged, gap, b"not json", b"[{}]"] {
            assert!(
                parse_map(json).is_none(),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        // Zeros in a backing file are no data: fine.
        let zeros = br#"[{ "start": 0, "length": 4096, "depth": 1, "present": true, "zero": true, "data": false}]"#;
        assert_eq!(parse_map(zeros), Some((4096, vec![])));
    }

    fn run(cmd: &str, args: &[&str]) {
        let ok = std::process::Command::new(cmd)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd} {args:?}");
    }

    /// The guest's bytes of `image` as `qemu-img convert` reads them.
    fn guest_bytes(image: &Path, format: &str) -> Vec<u8> {
        let raw = image.with_extension("converted");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                format,
                "-O",
                "raw",
                image.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        std::fs::read(raw).unwrap()
    }

    /// Every byte of the disk through [`ImageMap::read_at`], in windows of `window` bytes.
    fn read_all(map: &ImageMap, window: usize) -> Vec<u8> {
        let mut out = vec![0xa5u8; usize::try_from(map.size_bytes).unwrap()];
        for (k, w) in out.chunks_mut(window).enumerate() {
            map.read_at((k * window) as u64, w).unwrap();
        }
        out
    }

    #[test]
    fn real_images_read_directly_as_qemu_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("disk.qcow2");
        let q = qcow2.to_str().unwrap();
        run("qemu-img", &["create", "-q", "-f", "qcow2", q, "8M"]);
        // Data, zeroed clusters, a write over data, and a partial cluster.
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 1M 3M",
                "-c",
                "write -P 0x22 6M 4k",
                "-c",
                "write -z 2M 64k",
                "-c",
                "write -P 0x33 0 100k",
                q,
            ],
        );
        let map = map_image(q, Some("qcow2")).expect("a plain qcow2 is read directly");
        assert_eq!(map.size_bytes, 8 << 20);
        let expected = guest_bytes(&qcow2, "qcow2");
        for window in [1 << 20, 300_000] {
            assert!(read_all(&map, window) == expected, "window {window}");
        }
        // Raw, sparse.
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, &expected).unwrap();
        let map = map_image(raw.to_str().unwrap(), Some("raw")).expect("raw is read directly");
        assert!(read_all(&map, 1 << 20) == expected);
        // Neither a format that is not named nor one Rewind does not read itself.
        assert!(map_image(raw.to_str().unwrap(), None).is_none());
        assert!(map_image(q, Some("vmdk")).is_none());
    }

    #[test]
    fn compressed_clusters_and_backing_data_are_left_to_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let b = base.to_str().unwrap();
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x44 0 1M", b]);
        let compressed = dir.path().join("compressed.qcow2");
        let c = compressed.to_str().unwrap();
        run(
            "qemu-img",
            &["convert", "-c", "-f", "qcow2", "-O", "qcow2", b, c],
        );
        assert!(map_image(c, Some("qcow2")).is_none());
        let top = dir.path().join("top.qcow2");
        let t = top.to_str().unwrap();
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
        );
        assert!(map_image(t, Some("qcow2")).is_none());
        // An overlay over a base without data is read directly.
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x55 1M 64k", t]);
        let map = map_image(t, Some("qcow2")).expect("all data in the overlay");
        assert!(read_all(&map, 1 << 20) == guest_bytes(&top, "qcow2"));
    }

    #[test]
    fn reads_fill_data_from_the_file_and_zeros_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let content: Vec<u8> = (0..=255u8).cycle().take(3 * 4096).collect();
        std::fs::write(&path, &content).unwrap();
        let map = ImageMap {
            file: File::open(&path).unwrap(),
            size_bytes: 64 << 10,
            // Guest 4096..8192 from the file's 8192.., guest 16384..24576 from 0...
            data: vec![
                DataExtent {
                    guest: 4096,
                    len: 4096,
                    host: 8192,
                },
                DataExtent {
                    guest: 16384,
                    len: 8192,
                    host: 0,
                },
            ],
        };
        assert_eq!(map.slots(8192), vec![0, 2]);
        assert_eq!(map.slots(4096), vec![1, 4, 5]);
        let mut buf = vec![7u8; 32768];
        assert_eq!(map.read_at(0, &mut buf).unwrap(), 12288);
        let mut expected = vec![0u8; 32768];
        expected[4096..8192].copy_from_slice(&content[8192..]);
        expected[16384..24576].copy_from_slice(&content[..8192]);
        assert_eq!(buf, expected);
        // A window starting inside an extent.
        let mut part = vec![7u8; 8192];
        assert_eq!(map.read_at(20480, &mut part).unwrap(), 4096);
        assert_eq!(part, expected[20480..28672]);
    }
}
