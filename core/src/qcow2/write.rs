//! The metadata of a new qcow2 image (version 3, `compat` 1.1, 64 KiB clusters, 16-bit
//! refcounts, no backing file), for images Rewind writes itself: a full restore into a new
//! file and `rewind export` write the data clusters directly from several threads and then
//! this metadata, instead of pushing every byte through a single-threaded `qemu-nbd` (which
//! made a full restore 1.5–1.8× slower than `qemu-img convert`; see `core/BENCHMARKS.md`).
//!
//! Layout (QEMU's `docs/interop/qcow2.txt`, all integers big-endian): cluster 0 holds the
//! header; data clusters follow from cluster 1 (reserved 16 per 1 MiB chunk, in the
//! chunks' order, so the file is laid out as the disk is, whatever order they are written
//! in; a reserved cluster that only had zeros stays a free hole); after them come the L2
//! tables that map any data, the L1 table, the refcount table and the refcount blocks,
//! which give the header, every written data cluster and the metadata a refcount of 1. A guest cluster without
//! mapping reads as zeros (there is no backing file), so zeros take no room. `qemu-img check`
//! accepts the result, and QEMU reads, writes and adds dirty bitmaps to it like any image
//! it made itself (tested below and in the restore tests).

use std::collections::BTreeMap;

use super::MAGIC;

/// Bytes of one cluster.
pub const CLUSTER_BYTES: u64 = 1 << CLUSTER_BITS;
const CLUSTER_BITS: u32 = 16;
/// L2 and L1 entries: the cluster is used exactly once (refcount 1).
const COPIED: u64 = 1 << 63;
/// 8-byte entries per L2 table (one cluster).
const L2_ENTRIES: u64 = CLUSTER_BYTES / 8;
/// 16-bit refcounts per refcount block (one cluster).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER_BYTES / 2;
/// Version 3 header without optional fields; the header extensions follow it.
const HEADER_BYTES: usize = 104;

/// The writes that finish a new image: `(byte offset, bytes)`, header last.
///
/// `size_bytes` is the guest-visible size (rounded up to 512 bytes); data clusters
/// `1..=data_clusters` of the file are reserved for data; `mapping` maps guest cluster
/// numbers to those of them that were written (the others stay free, holes in the file).
#[must_use]
pub fn metadata(
    size_bytes: u64,
    data_clusters: u64,
    mapping: &BTreeMap<u64, u64>,
) -> Vec<(u64, Vec<u8>)> {
    let guest_clusters = size_bytes.div_ceil(CLUSTER_BYTES);
    let l1_size = guest_clusters.div_ceil(L2_ENTRIES).max(1);
    let mut next = 1 + data_clusters;
    // One L2 table per 512 MiB of guest space that holds any data.
    let mut l2_tables: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
    for (&guest, &host) in mapping {
        let (table, entry) = (guest / L2_ENTRIES, guest % L2_ENTRIES);
        let (_, bytes) = l2_tables.entry(table).or_insert_with(|| {
            let at = next;
            next += 1;
            (at, vec![0; to_usize(CLUSTER_BYTES)])
        });
        put_be64(bytes, to_usize(entry * 8), (host * CLUSTER_BYTES) | COPIED);
    }
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER_BYTES);
    let l1_at = next;
    next += l1_clusters;
    let mut l1 = vec![0; to_usize(l1_clusters * CLUSTER_BYTES)];
    for (&table, (at, _)) in &l2_tables {
        put_be64(&mut l1, to_usize(table * 8), (at * CLUSTER_BYTES) | COPIED);
    }
    // The refcount structures count themselves too: grow them until they cover the end.
    let (mut table_clusters, mut blocks) = (1, 1);
    loop {
        let end = next + table_clusters + blocks;
        let need_blocks = end.div_ceil(REFCOUNTS_PER_BLOCK);
        let need_table = (need_blocks * 8).div_ceil(CLUSTER_BYTES);
        if need_blocks <= blocks && need_table <= table_clusters {
            break;
        }
        (blocks, table_clusters) = (need_blocks.max(blocks), need_table.max(table_clusters));
    }
    let table_at = next;
    let blocks_at = table_at + table_clusters;
    let end = blocks_at + blocks;
    let mut refcount_table = vec![0; to_usize(table_clusters * CLUSTER_BYTES)];
    for b in 0..blocks {
        put_be64(
            &mut refcount_table,
            to_usize(b * 8),
            (blocks_at + b) * CLUSTER_BYTES,
        );
    }
    let mut refcount_blocks = vec![0; to_usize(blocks * CLUSTER_BYTES)];
    // The header, the data clusters that hold data, and the metadata; a data cluster
    // reserved but never written stays free.
    let metadata_clusters = 1 + data_clusters..end;
    for cluster in std::iter::once(0)
        .chain(mapping.values().copied())
        .chain(metadata_clusters)
    {
        let at = to_usize(cluster * 2);
        refcount_blocks[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }

    let mut header = vec![0; HEADER_BYTES + 8]; // + the end-of-extensions marker
    put_be32(&mut header, 0, MAGIC);
    put_be32(&mut header, 4, 3);
    put_be32(&mut header, 20, CLUSTER_BITS);
    // QEMU counts images in 512-byte sectors and drops a partial one: round up, as
    // `qemu-img create` does.
    put_be64(&mut header, 24, size_bytes.next_multiple_of(512));
    put_be32(
        &mut header,
        36,
        u32::try_from(l1_size).expect("a 256 TiB disk has 2^19 L1 entries"),
    );
    put_be64(&mut header, 40, l1_at * CLUSTER_BYTES);
    put_be64(&mut header, 48, table_at * CLUSTER_BYTES);
    put_be32(
        &mut header,
        56,
        u32::try_from(table_clusters).expect("small"),
    );
    put_be32(&mut header, 96, 4); // refcount_order: 16-bit refcounts
    put_be32(
        &mut header,
        100,
        u32::try_from(HEADER_BYTES).expect("small"),
    );

    let mut writes: Vec<(u64, Vec<u8>)> = l2_tables
        .into_values()
        .map(|(at, bytes)| (at * CLUSTER_BYTES, bytes))
        .collect();
    writes.push((l1_at * CLUSTER_BYTES, l1));
    writes.push((table_at * CLUSTER_BYTES, refcount_table));
    writes.push((blocks_at * CLUSTER_BYTES, refcount_blocks));
    writes.push((0, header));
    writes
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("metadata of a disk Rewind can hold fits in memory")
}

fn put_be64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

fn put_be32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes an image of `size` whose guest clusters `data` hold a pattern, in the given
    /// (shuffled) host order, every `stride`th reserved data cluster used; returns the guest
    /// bytes QEMU should see.
    fn image(path: &std::path::Path, size: u64, data: &[u64], stride: u64) -> Vec<u8> {
        let file = std::fs::File::create(path).unwrap();
        let mut expected = vec![0u8; usize::try_from(size).unwrap()];
        let mut mapping = BTreeMap::new();
        for (n, &guest) in data.iter().enumerate() {
            let host = n as u64 * stride + 1;
            let pattern = u8::try_from(guest % 251).unwrap() | 1;
            let cluster = vec![pattern; usize::try_from(CLUSTER_BYTES).unwrap()];
            file.write_all_at(&cluster, host * CLUSTER_BYTES).unwrap();
            let start = usize::try_from(guest * CLUSTER_BYTES).unwrap();
            let end = (start + cluster.len()).min(expected.len());
            expected[start..end].fill(pattern);
            mapping.insert(guest, host);
        }
        for (at, bytes) in metadata(size, data.len() as u64 * stride, &mapping) {
            file.write_all_at(&bytes, at).unwrap();
        }
        expected
    }

    fn guest_bytes(path: &std::path::Path) -> Vec<u8> {
        let raw = path.with_extension("raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(path)
            .arg(&raw));
        std::fs::read(raw).unwrap()
    }

    #[test]
    fn qemu_reads_checks_writes_and_adds_bitmaps_to_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        // 1.25 GiB and a bit (three L2 tables, the last partial), data out of order,
        // a partial last cluster.
        let size = (5 << 28) + 12_288;
        let last = size / CLUSTER_BYTES;
        let expected = image(&path, size, &[17, 3, 9000, 8191, 8192, last, 20_000], 1);
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path));
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&path));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert!(guest_bytes(&path) == expected, "QEMU reads other bytes");
        // QEMU can go on with it: a bitmap (as libvirt's checkpoints add) and new writes.
        run(Command::new("qemu-img")
            .args(["bitmap", "--add", "-f", "qcow2"])
            .arg(&path)
            .arg("b1"));
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x77 1M 64k"])
            .arg(&path));
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path));
        let mut expected = expected;
        expected[1 << 20..(1 << 20) + (64 << 10)].fill(0x77);
        assert!(guest_bytes(&path) == expected);
    }

    /// A full restore reserves 16 clusters per chunk and leaves those of zero pieces
    /// unwritten: they are free, not leaked, and QEMU allocates from them.
    #[test]
    fn reserved_clusters_left_unwritten_stay_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gaps.qcow2");
        let mut expected = image(&path, 64 << 20, &[40, 2, 300, 7], 3);
        let check = run(Command::new("qemu-img")
            .args(["check", "--output=json", "-f", "qcow2"])
            .arg(&path));
        let check: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(check["leaks"], serde_json::Value::Null, "{check}");
        assert_eq!(check["allocated-clusters"], 4, "{check}");
        let file_len = std::fs::metadata(&path).unwrap().len();
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x55 0 128k"])
            .arg(&path));
        expected[..128 << 10].fill(0x55);
        assert!(guest_bytes(&path) == expected);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            file_len,
            "QEMU put the new clusters into the free ones"
        );
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path));
    }

    #[test]
    fn an_empty_image_and_one_needing_two_refcount_blocks_are_sound() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.qcow2");
        image(&empty, 1 << 30, &[], 1);
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&empty));
        // More than 32768 clusters in the file: a second refcount block. (The data
        // clusters are left as holes of a sparse file; they read as zeros.)
        let mapping: BTreeMap<u64, u64> = (0..40_000).map(|g| (g, g + 1)).collect();
        let writes = metadata(4 << 30, 40_000, &mapping);
        let big = dir.path().join("big.qcow2");
        let file = std::fs::File::create(&big).unwrap();
        for (at, bytes) in &writes {
            file.write_all_at(bytes, *at).unwrap();
        }
        run(Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&big));
        let (_, header) = writes.last().unwrap();
        let table_at = u64::from_be_bytes(header[48..56].try_into().unwrap());
        let (_, table) = writes.iter().find(|(at, _)| *at == table_at).unwrap();
        let second = u64::from_be_bytes(table[8..16].try_into().unwrap());
        assert_ne!(second, 0, "the second refcount block is in the table");
    }
}
