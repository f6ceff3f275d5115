//! Store benchmark (issue 3): ingest a deterministic 2 GiB image into an empty local store,
//! again unchanged, then after a 1 % change; read it back; compare with `qemu-img convert`
//! of the same image. Run with
//!
//! ```sh
//! taskset -c 0 cargo bench -p rewind-core --bench store
//! ```
//!
//! `REWIND_BENCH_DIR` chooses where the ~8 GiB of scratch files go (default: target/bench).
//! `REWIND_BENCH_CHAIN=100` first takes a chain of 100 incrementals (a new 1 % change
//! each) and restores the latest against a full checkpoint of the same image, before and
//! after a compaction (`REWIND_BENCH_COMPACT_DEPTH=N`: flat copies of patches N or more
//! deep only; `REWIND_BENCH_COMPACT_EACH=1`: a compaction after each incremental too, as the
//! scheduler does, and what each wrote).
//! `REWIND_BENCH_CHUNK_KIB=1024` limits the chunk sizes tried (`none`: none); `REWIND_BENCH_NO_ENCRYPTED`
//! skips the encrypted store.
//! Results go to stdout as a Markdown table; `core/BENCHMARKS.md` keeps them with the
//! conditions. This is a benchmark, not a test: nothing here passes or fails on timing.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chrono::Utc;
use rewind_core::progress::Control;
use rewind_core::store::{
    CheckpointKind, Consistency, InitOptions, KdfCost, Manifest, NewCheckpoint, ObjectIndex, Store,
    VmRef,
};
use uuid::Uuid;
use zeroize::Zeroizing;

mod data;
use data::{
    DATA_BYTES, MIB, MIN_IMAGE_BYTES, RANDOM, TEXT, make_image, one_percent_change,
    one_percent_change_seeded,
};

const IMAGE_BYTES: u64 = MIN_IMAGE_BYTES;

/// Applies the 1 % change to the image file; returns the changed byte offsets.
fn change_one_percent(path: &Path) -> Vec<u64> {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    let change = one_percent_change();
    for (off, piece) in &change {
        file.write_all_at(piece, *off).unwrap();
    }
    file.sync_all().unwrap();
    change.into_iter().map(|(off, _)| off).collect()
}

fn du_bytes(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-sb", path.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn reset_peak_rss() {
    drop(fs::write("/proc/self/clear_refs", "5"));
}

fn peak_rss_mib() -> f64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024.0
}

fn drop_caches() -> bool {
    Command::new("sync").status().is_ok() && fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

struct Row {
    what: String,
    secs: f64,
    logical_bytes: u64,
    store_bytes_added: u64,
    peak_rss_mib: f64,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    reset_peak_rss();
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64())
}

fn checkpoint(store: &Store, n: u32, parent: Option<&Manifest>) -> NewCheckpoint {
    NewCheckpoint {
        vm: VmRef {
            name: "bench".into(),
            uuid: Uuid::from_bytes([7; 16]),
        },
        time: Utc::now() + chrono::Duration::seconds(i64::from(n)),
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: format!(
            "<domain><name>bench</name><!-- store {} --></domain>",
            store.config().id
        ),
        parent: parent.map(|p| p.id.clone()),
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    }
}

/// Ingests the whole file (every chunk read and hashed; unchanged chunks dedup).
fn ingest(store: &Store, image: &Path, parent: Option<&Manifest>, n: u32) -> Manifest {
    let control = Control::new();
    let mut w = store
        .begin_checkpoint(checkpoint(store, n, parent), &control)
        .unwrap();
    let base = parent.map(|p| &p.disks[0].index);
    let object = w
        .ingest_file(&File::open(image).unwrap(), IMAGE_BYTES, base, &control)
        .unwrap();
    w.add_disk("vda", None, Some("raw".into()), object).unwrap();
    w.commit(&control).unwrap()
}

/// Incremental as issue 4 does it: only the chunks a dirty bitmap names are read.
fn ingest_changed(store: &Store, image: &Path, parent: &Manifest, changed: &[u64], n: u32) -> u64 {
    let control = Control::new();
    let chunk = u64::from(store.chunk_size_bytes());
    let mut chunks: Vec<u64> = changed.iter().map(|o| o / chunk).collect();
    chunks.sort_unstable();
    chunks.dedup();
    let file = File::open(image).unwrap();
    let mut w = store
        .begin_checkpoint(checkpoint(store, n, Some(parent)), &control)
        .unwrap();
    let mut object = w
        .object_writer(IMAGE_BYTES, Some(&parent.disks[0].index))
        .unwrap();
    let mut buf = vec![0u8; chunk as usize];
    for &i in &chunks {
        let len = object.chunk_len(i) as usize;
        file.read_exact_at(&mut buf[..len], i * chunk).unwrap();
        object.put(i, &buf[..len]).unwrap();
    }
    w.add_disk("vda", None, Some("raw".into()), object.finish().unwrap())
        .unwrap();
    w.commit(&control).unwrap();
    chunks.len() as u64 * chunk
}

fn run_variant(dir: &Path, image: &Path, chunk_size: u32, encrypted: bool, rows: &mut Vec<Row>) {
    let label = format!(
        "{} KiB chunks{}",
        chunk_size >> 10,
        if encrypted { ", encrypted" } else { "" }
    );
    let root = dir.join(format!("store-{chunk_size}-{encrypted}"));
    drop(fs::remove_dir_all(&root));
    let options = InitOptions {
        chunk_size_bytes: chunk_size,
        passphrase: encrypted.then(|| Zeroizing::new(b"benchmark".to_vec())),
        kdf_cost: KdfCost::DEFAULT,
    };
    let store = Store::init(&root, &options).unwrap();
    let pristine = dir.join("pristine.img");

    let cached = drop_caches();
    let before = du_bytes(&root);
    let (first, secs) = timed(|| ingest(&store, image, None, 0));
    rows.push(Row {
        what: format!(
            "{label}: ingest into empty store{}",
            if cached { " (cold cache)" } else { "" }
        ),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: du_bytes(&root) - before,
        peak_rss_mib: peak_rss_mib(),
    });

    // The same into a second, empty store, with the image now in the page cache: what the
    // store itself costs when reading the source is not the limit.
    let warm_root = dir.join(format!("store-warm-{chunk_size}-{encrypted}"));
    drop(fs::remove_dir_all(&warm_root));
    let warm = Store::init(&warm_root, &options).unwrap();
    let (_, secs) = timed(|| ingest(&warm, image, None, 0));
    rows.push(Row {
        what: format!("{label}: ingest into empty store (image in page cache)"),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: du_bytes(&warm_root),
        peak_rss_mib: peak_rss_mib(),
    });
    drop(warm);
    fs::remove_dir_all(&warm_root).unwrap();

    let before = du_bytes(&root);
    let (second, secs) = timed(|| ingest(&store, image, Some(&first), 1));
    rows.push(Row {
        what: format!("{label}: unchanged, whole image re-read"),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: du_bytes(&root) - before,
        peak_rss_mib: peak_rss_mib(),
    });

    let changed_image = dir.join("changed.img");
    fs::copy(&pristine, &changed_image).unwrap();
    let changed = change_one_percent(&changed_image);
    let before = du_bytes(&root);
    let (read, secs) = timed(|| ingest_changed(&store, &changed_image, &second, &changed, 2));
    rows.push(Row {
        what: format!("{label}: 1 % changed, dirty chunks only"),
        secs,
        logical_bytes: read,
        store_bytes_added: du_bytes(&root) - before,
        peak_rss_mib: peak_rss_mib(),
    });
    // Remove that checkpoint's new chunks again, so the whole-image run has to store them.
    let latest = store.catalog().unwrap().checkpoints.pop().unwrap();
    store
        .delete_checkpoint(&latest.vm.uuid, &latest.id)
        .unwrap();
    store.gc(&Control::new()).unwrap();
    let before = du_bytes(&root);
    let (_, secs) = timed(|| ingest(&store, &changed_image, Some(&second), 3));
    rows.push(Row {
        what: format!("{label}: 1 % changed, whole image re-read"),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: du_bytes(&root) - before,
        peak_rss_mib: peak_rss_mib(),
    });
    fs::remove_file(&changed_image).unwrap();

    restore(&store, &first.disks[0].index, dir, &label, rows);
    fs::remove_dir_all(&root).unwrap();
}

/// A chain of `rounds` incrementals, each after another 1 % change (dirty chunks only),
/// into a store with 1 MiB chunks; then the latest restored, against the same image's full
/// checkpoint in a new store restored the same way (issue 20: a long chain of patches must
/// not make a restore slower).
fn chain(dir: &Path, image: &Path, rounds: u32, rows: &mut Vec<Row>) {
    let options = InitOptions {
        chunk_size_bytes: 1 << 20,
        passphrase: None,
        kdf_cost: KdfCost::DEFAULT,
    };
    let root = dir.join("store-chain");
    drop(fs::remove_dir_all(&root));
    let store = Store::init(&root, &options).unwrap();
    let changing = dir.join("chain.img");
    fs::copy(image, &changing).unwrap();
    let mut latest = ingest(&store, &changing, None, 0);
    let full_bytes = du_bytes(&root);
    let (mut added, mut secs_sum) = (Vec::new(), 0.0);
    // As the scheduler does: a compaction after each incremental (what each writes).
    let compact_each = std::env::var_os("REWIND_BENCH_COMPACT_EACH").is_some();
    let mut compactions: Vec<(u64, u64, f64)> = Vec::new();
    for n in 1..=rounds {
        let offsets = apply_change(&changing, n);
        let before = du_bytes(&root);
        let ((), secs) = timed(|| {
            ingest_changed(&store, &changing, &latest, &offsets, n);
        });
        secs_sum += secs;
        latest = store.catalog().unwrap().checkpoints.pop().unwrap();
        added.push(du_bytes(&root) - before);
        if compact_each {
            let (report, secs) = timed(|| store.compact(&Control::new()).unwrap());
            compactions.push((report.written, report.bytes_written, secs));
        }
    }
    report_compactions(&compactions, &root);
    added.sort_unstable();
    eprintln!(
        "chain: full {full_bytes} bytes; {rounds} incrementals added {} bytes in all, median {}, \
         min {}, max {}; {:.2} s per incremental; store {} bytes",
        added.iter().sum::<u64>(),
        added[added.len() / 2],
        added[0],
        added[added.len() - 1],
        secs_sum / f64::from(rounds),
        du_bytes(&root)
    );
    let fresh_root = dir.join("store-chain-full");
    drop(fs::remove_dir_all(&fresh_root));
    let fresh = Store::init(&fresh_root, &options).unwrap();
    let full = ingest(&fresh, &changing, None, 0);
    let compacted_root = dir.join("store-chain-compacted");
    let compacted = compacted_copy(&root, &compacted_root);
    for round in 1..=3 {
        for (what, store, m) in [
            (format!("latest of a chain of {rounds}"), &store, &latest),
            (
                format!("latest of a chain of {rounds}, compacted"),
                &compacted,
                &latest,
            ),
            (
                "full checkpoint of the same image".to_owned(),
                &fresh,
                &full,
            ),
        ] {
            // As a restore writes a new disk: every core, chunk files fetched ahead.
            let out = dir.join("exported.qcow2");
            let cached = drop_caches();
            let ((), secs) = timed(|| {
                rewind_core::restore::export_disk(
                    store,
                    m,
                    "vda",
                    &out,
                    rewind_core::restore::ImageFormat::Qcow2,
                    &Control::new(),
                )
                .unwrap();
                File::open(&out).unwrap().sync_all().unwrap();
            });
            rows.push(Row {
                what: format!(
                    "round {round}: {what}: export as a new qcow2 image, synced{}",
                    if cached { " (cold cache)" } else { "" }
                ),
                secs,
                logical_bytes: DATA_BYTES,
                store_bytes_added: 0,
                peak_rss_mib: peak_rss_mib(),
            });
            fs::remove_file(&out).unwrap();
            restore_to_file(
                store,
                &m.disks[0].index,
                dir,
                &changing,
                &format!("round {round}: {what}"),
                rows,
            );
        }
    }
    fs::remove_file(&changing).unwrap();
    fs::remove_dir_all(&root).unwrap();
    fs::remove_dir_all(&fresh_root).unwrap();
    fs::remove_dir_all(&compacted_root).unwrap();
}

/// The `n`th new 1 % change of the chain, written into `image`: where it wrote.
fn apply_change(image: &Path, n: u32) -> Vec<u64> {
    let file = OpenOptions::new().write(true).open(image).unwrap();
    let change = one_percent_change_seeded(0x5EED_0000 + u64::from(n));
    for (off, piece) in &change {
        file.write_all_at(piece, *off).unwrap();
    }
    change.iter().map(|(o, _)| *o).collect()
}

/// What the compactions after each incremental (flat copies written, bytes, seconds)
/// wrote, and the store (at `root`) with its flat copies.
fn report_compactions(compactions: &[(u64, u64, f64)], root: &Path) {
    if compactions.is_empty() {
        return;
    }
    let mut bytes: Vec<u64> = compactions.iter().map(|c| c.1).collect();
    let mut secs: Vec<f64> = compactions.iter().map(|c| c.2).collect();
    bytes.sort_unstable();
    secs.sort_by(f64::total_cmp);
    eprintln!(
        "chain: a compaction after each incremental wrote {} flat copies, {} bytes in all; \
         per compaction median {} bytes (min {}, max {}), {:.2} s (max {:.2} s); store {} \
         bytes with its flat copies",
        compactions.iter().map(|c| c.0).sum::<u64>(),
        bytes.iter().sum::<u64>(),
        bytes[bytes.len() / 2],
        bytes[0],
        bytes[bytes.len() - 1],
        secs[secs.len() / 2],
        secs[secs.len() - 1],
        du_bytes(root)
    );
}

/// A copy of the store at `root` at `to`, compacted (flat copies, at the depth
/// `REWIND_BENCH_COMPACT_DEPTH` says), so that the chain is measured with and without in
/// the same rounds.
fn compacted_copy(root: &Path, to: &Path) -> Store {
    drop(fs::remove_dir_all(to));
    let copied = Command::new("cp")
        .arg("-a")
        .arg(root)
        .arg(to)
        .status()
        .unwrap();
    assert!(copied.success());
    let compacted = Store::open(to, None).unwrap();
    let depth: usize = std::env::var("REWIND_BENCH_COMPACT_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(rewind_core::store::flat::FLAT_FROM_DEPTH);
    let before = du_bytes(to);
    drop_caches();
    let (report, secs) = timed(|| {
        compacted
            .compact_from_depth(depth, &Control::new())
            .unwrap()
    });
    eprintln!(
        "chain: compaction (patches {depth} or more deep) took {secs:.2} s (cold cache): \
         {} flat copies, {} bytes written; store {before} -> {} bytes",
        report.written,
        report.bytes_written,
        du_bytes(to)
    );
    compacted
}

/// Restores an index to a new file (cold cache, synced), checks it against `expected`,
/// then reads it back without writing.
fn restore_to_file(
    store: &Store,
    index: &ObjectIndex,
    dir: &Path,
    expected: &Path,
    label: &str,
    rows: &mut Vec<Row>,
) {
    let out = dir.join("restored.img");
    let cached = drop_caches();
    let ((), secs) = timed(|| {
        let file = File::create(&out).unwrap();
        store
            .object_reader(index)
            .unwrap()
            .write_to_file(&file, &Control::new())
            .unwrap();
        file.sync_all().unwrap();
    });
    rows.push(Row {
        what: format!(
            "{label}: restore to a new file{}",
            if cached { " (cold cache)" } else { "" }
        ),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: 0,
        peak_rss_mib: peak_rss_mib(),
    });
    assert_eq!(
        blake3_file(&out),
        blake3_file(expected),
        "restored image differs"
    );
    fs::remove_file(&out).unwrap();
    let ((), secs) = timed(|| {
        let mut reader = store.object_reader(index).unwrap();
        for i in 0..reader.chunk_count() {
            std::hint::black_box(reader.read(i).unwrap());
        }
    });
    rows.push(Row {
        what: format!("{label}: restore-read only (decode + verify hash)"),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: 0,
        peak_rss_mib: peak_rss_mib(),
    });
}

/// Restores the first checkpoint to a new file (checked against the image), then reads it
/// back without writing.
fn restore(store: &Store, first: &ObjectIndex, dir: &Path, label: &str, rows: &mut Vec<Row>) {
    restore_to_file(store, first, dir, &dir.join("pristine.img"), label, rows);
}

fn blake3_file(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path).unwrap()).unwrap();
    hasher.finalize().to_hex().to_string()
}

fn zstd_levels(image: &Path) {
    let file = File::open(image).unwrap();
    let mut text = vec![0u8; 64 * MIB as usize];
    file.read_exact_at(&mut text, TEXT.0).unwrap();
    let mut random = vec![0u8; 64 * MIB as usize];
    file.read_exact_at(&mut random, RANDOM.0).unwrap();
    println!("\n| zstd level | text MB/s | text ratio | random MB/s |\n|---|---|---|---|");
    for level in [-3, -1, 1, 3, 6] {
        let t = Instant::now();
        let mut out = 0;
        for c in text.chunks(MIB as usize) {
            out += zstd::bulk::compress(c, level).unwrap().len();
        }
        let text_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for c in random.chunks(MIB as usize) {
            std::hint::black_box(zstd::bulk::compress(c, level).unwrap());
        }
        let random_secs = t.elapsed().as_secs_f64();
        println!(
            "| {level} | {:.0} | {:.2} | {:.0} |",
            64.0 * 1.048_576 / text_secs,
            text.len() as f64 / out as f64,
            64.0 * 1.048_576 / random_secs
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes benches this way; run nothing.
    }
    let dir = std::env::var_os("REWIND_BENCH_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    );
    fs::create_dir_all(&dir).unwrap();
    let image = dir.join("pristine.img");
    eprintln!("generating {} …", image.display());
    make_image(&image, IMAGE_BYTES);

    let mut rows = Vec::new();
    let ((), secs) = timed(|| {
        let out = dir.join("baseline.qcow2");
        let status = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&image)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let f = File::open(&out).unwrap();
        f.sync_all().unwrap();
        fs::remove_file(out).unwrap();
    });
    rows.push(Row {
        what: "baseline: qemu-img convert -O qcow2 (plus fsync)".into(),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: 0,
        peak_rss_mib: 0.0,
    });
    let ((), secs) = timed(|| {
        let out = dir.join("baseline.raw");
        let status = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&image)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        File::open(&out).unwrap().sync_all().unwrap();
        fs::remove_file(out).unwrap();
    });
    rows.push(Row {
        what: "baseline: qemu-img convert -O raw (plus fsync)".into(),
        secs,
        logical_bytes: DATA_BYTES,
        store_bytes_added: 0,
        peak_rss_mib: 0.0,
    });

    let sizes: Vec<u32> = std::env::var("REWIND_BENCH_CHUNK_KIB").map_or_else(
        |_| vec![256, 1024, 4096],
        |v| {
            v.split(',')
                .filter(|s| !s.trim().is_empty() && s.trim() != "none")
                .map(|s| s.trim().parse::<u32>().unwrap())
                .collect()
        },
    );
    let chain_rounds: u32 = std::env::var("REWIND_BENCH_CHAIN")
        .ok()
        .map_or(0, |v| v.parse().unwrap());
    if chain_rounds > 0 {
        chain(&dir, &image, chain_rounds, &mut rows);
    }
    for kib in sizes {
        run_variant(&dir, &image, kib << 10, false, &mut rows);
    }
    if std::env::var_os("REWIND_BENCH_NO_ENCRYPTED").is_none() {
        run_variant(&dir, &image, 1 << 20, true, &mut rows);
    }

    println!(
        "| run | seconds | logical MB/s | store bytes added | peak RSS MiB |\n|---|---|---|---|---|"
    );
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.0} | {} | {:.0} |",
            r.what,
            r.secs,
            r.logical_bytes as f64 / 1e6 / r.secs,
            r.store_bytes_added,
            r.peak_rss_mib
        );
    }
    zstd_levels(&image);
    fs::remove_file(&image).unwrap();
}
