//! File-level restore benchmark (issue 22): listing a folder of 10,000 files and restoring
//! one 1 GiB file from checkpoints in a local store, read in place through
//! [`rewind_core::files::browse::Browser`]. Run with
//!
//! ```sh
//! cargo bench -p rewind-core --bench files
//! ```
//!
//! The images are made with the real tools, without mounting: `mkfs.ext4 -d` of a folder of
//! 10,000 small files (a whole-disk ext4, volume `vda`), and a GPT disk (`sgdisk`) whose
//! partition 1 holds an ext4 (`mkfs.ext4 -E offset=1048576 -d`) with one 1 GiB file of
//! random (incompressible) data. Each is checkpointed into a local store with the default
//! chunk size (1 MiB), unencrypted and encrypted. Each figure uses a new `Browser` (cold
//! chunk cache) after the page cache is dropped (`/proc/sys/vm/drop_caches`, as root).
//!
//! The chunks the 1 GiB file covers are counted from `debugfs -R "blocks /big.bin"`: the
//! distinct store chunks (disk offset / chunk size) that hold its data blocks.
//! Baselines from the same run: `debugfs -R "dump"` of the file out of the raw image, and
//! the store's whole-disk restore (`ObjectReader::write_to_file`) of the same checkpoint.
//!
//! `REWIND_BENCH_DIR` chooses the scratch folder (default: target/bench-files; about 4 GiB).
//! `REWIND_BENCH_NO_ENCRYPTED` skips the encrypted store; `REWIND_BENCH_ONLY=list` or
//! `=restore` runs only those figures; `REWIND_BENCH_WARM` keeps the page cache;
//! `REWIND_BENCH_CACHE_MIB` sets the browser's chunk cache (default: the browser's own);
//! `REWIND_BENCH_NO_PLAIN` skips the unencrypted store; `REWIND_BENCH_RESTORES=N` sets
//! the restore tries (default 4), with and without read-ahead in turns;
//! `REWIND_BENCH_READ_AHEAD_MIB` the read-ahead of those with it (default: the browser's).
//! Results go to stdout as a Markdown table; `core/BENCHMARKS.md` keeps them with the conditions. This is a
//! benchmark, not a test: nothing here passes or fails on timing.

#![allow(clippy::unwrap_used)] // bench code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use rewind_core::files::browse::Browser;
use rewind_core::progress::Control;
use rewind_core::store::random::DEFAULT_READ_AHEAD_BYTES;
use rewind_core::store::{
    CheckpointKind, Consistency, InitOptions, KdfCost, Manifest, NewCheckpoint, Store, VmRef,
};
use uuid::Uuid;
use zeroize::Zeroizing;

mod data;
use data::{MIB, Rng};

/// Files in the listed folder.
const FILES: usize = 10_000;
/// The big file's size.
const BIG_BYTES: u64 = 1 << 30;
/// The GPT disk that holds it, and its partition's start.
const BIG_DISK_BYTES: u64 = 1280 * MIB;
const PART_START: u64 = MIB;
/// The ext4 in the partition (leaves room for the backup GPT at the disk's end).
const PART_BYTES: u64 = 1270 * MIB;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drop_caches() -> bool {
    if std::env::var_os("REWIND_BENCH_WARM").is_some() {
        return false;
    }
    Command::new("sync").status().is_ok() && fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// A name of 4 to ~40 characters, different for each `i`, of varied shapes.
fn name(i: usize, rng: &mut Rng) -> String {
    const STEMS: [&str; 8] = [
        "report",
        "IMG_",
        "notes",
        "Invoice ",
        "data-",
        "résumé",
        "x",
        "backup.old.",
    ];
    const EXTS: [&str; 6] = [".txt", ".jpg", ".pdf", "", ".tar.gz", ".docx"];
    let stem = STEMS[i % STEMS.len()];
    let pad = "abcdefghijklmnopqrstuvwxyz";
    let extra = (rng.next() % 20) as usize;
    format!(
        "{stem}{i:05}{}{}",
        &pad[..extra],
        EXTS[(i / 8) % EXTS.len()]
    )
}

/// A whole-disk ext4 image with `/many/` holding [`FILES`] small files.
fn make_many(dir: &Path) -> PathBuf {
    let image = dir.join("many.img");
    if image.exists() {
        return image;
    }
    let src = dir.join("many-src");
    drop(fs::remove_dir_all(&src));
    fs::create_dir_all(src.join("many")).unwrap();
    fs::create_dir_all(src.join("other/deeper")).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut buf = vec![0u8; 8192];
    for i in 0..FILES {
        let len = (rng.next() % 6000) as usize;
        rng.fill(&mut buf[..len]);
        fs::write(src.join("many").join(name(i, &mut rng)), &buf[..len]).unwrap();
    }
    fs::write(src.join("other/deeper/readme"), b"not listed").unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "many", "-d"])
        .arg(&src)
        .arg(&image)
        .arg("256M"));
    fs::remove_dir_all(&src).unwrap();
    image
}

/// A GPT disk whose partition 1 is an ext4 with `/big.bin`, 1 GiB of random data.
fn make_big(dir: &Path) -> PathBuf {
    let image = dir.join("big.img");
    if image.exists() {
        return image;
    }
    let src = dir.join("big-src");
    drop(fs::remove_dir_all(&src));
    fs::create_dir_all(src.join("home/me")).unwrap();
    let mut rng = Rng(0xfeed_f00d_1234_5677);
    let mut out = std::io::BufWriter::new(File::create(src.join("big.bin")).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..BIG_BYTES / MIB {
        rng.fill(&mut buf);
        out.write_all(&buf).unwrap();
    }
    out.into_inner().unwrap().sync_all().unwrap();
    fs::write(src.join("home/me/notes.txt"), b"small").unwrap();
    let partial = dir.join("big.img.part");
    File::create(&partial)
        .unwrap()
        .set_len(BIG_DISK_BYTES)
        .unwrap();
    let first = PART_START / 512;
    let last = first + PART_BYTES / 512 - 1;
    run(Command::new("sgdisk")
        .arg(format!("--new=1:{first}:{last}"))
        .args(["--typecode=1:8300", "--change-name=1:root"])
        .arg(&partial));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root"])
        .arg(format!("-Eoffset={PART_START}"))
        .arg("-d")
        .arg(&src)
        .arg(&partial)
        .arg(format!("{}k", PART_BYTES >> 10)));
    fs::rename(&partial, &image).unwrap();
    fs::remove_dir_all(&src).unwrap();
    image
}

/// The image as debugfs opens the file system in it.
fn debugfs_target(image: &Path, offset: u64) -> String {
    if offset == 0 {
        image.display().to_string()
    } else {
        format!("{}?offset={offset}", image.display())
    }
}

/// The distinct store chunks that hold the data blocks of `path`, and its block count.
fn covered_chunks(image: &Path, offset: u64, path: &str, chunk: u64) -> (u64, u64) {
    let target = debugfs_target(image, offset);
    let stats = run(Command::new("debugfs")
        .args(["-R", "stats -h"])
        .arg(&target));
    let block_size: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let blocks = run(Command::new("debugfs")
        .args(["-R", &format!("blocks {path}")])
        .arg(&target));
    let mut chunks = BTreeSet::new();
    let mut count = 0;
    for b in blocks.split_whitespace() {
        let b: u64 = b.parse().unwrap();
        chunks.insert((offset + b * block_size) / chunk);
        count += 1;
    }
    (chunks.len() as u64, count)
}

fn new_checkpoint(store: &Store, n: i64) -> NewCheckpoint {
    NewCheckpoint {
        vm: VmRef {
            name: "bench".into(),
            uuid: Uuid::from_bytes([9; 16]),
        },
        time: Utc::now() + chrono::Duration::seconds(n),
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: format!(
            "<domain><name>bench</name><!-- store {} --></domain>",
            store.config().id
        ),
        parent: None,
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    }
}

fn checkpoint(store: &Store, image: &Path, n: i64) -> Manifest {
    let control = Control::new();
    let file = File::open(image).unwrap();
    let len = file.metadata().unwrap().len();
    let mut w = store
        .begin_checkpoint(new_checkpoint(store, n), &control)
        .unwrap();
    let object = w.ingest_file(&file, len, None, &control).unwrap();
    w.add_disk("vda", None, Some("raw".into()), object).unwrap();
    w.commit(&control).unwrap()
}

struct Row {
    what: String,
    secs: f64,
    mb_per_s: Option<f64>,
    chunks: Option<u64>,
    note: String,
}

fn mbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn browser(store: &Arc<Store>, manifest: &Manifest, cache: Option<u64>) -> Browser {
    match cache {
        Some(bytes) => Browser::with_cache(store.clone(), manifest.clone(), bytes).unwrap(),
        None => Browser::open(store.clone(), manifest.clone()).unwrap(),
    }
}

#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
fn run_store(
    dir: &Path,
    many: &Path,
    big: &Path,
    encrypted: bool,
    cache: Option<u64>,
    covered: u64,
    rows: &mut Vec<Row>,
) {
    let label = if encrypted { "encrypted" } else { "plain" };
    let root = dir.join(format!("store-{label}"));
    drop(fs::remove_dir_all(&root));
    let options = InitOptions {
        passphrase: encrypted.then(|| Zeroizing::new(b"benchmark".to_vec())),
        kdf_cost: KdfCost::DEFAULT,
        ..InitOptions::default()
    };
    let store = Store::init(&root, &options).unwrap();
    let chunk = u64::from(store.chunk_size_bytes());
    let many_cp = checkpoint(&store, many, 0);
    let big_cp = checkpoint(&store, big, 1);
    let store = Arc::new(store);

    let only = std::env::var("REWIND_BENCH_ONLY").unwrap_or_default();
    // Listing the folder of 10,000 files.
    for attempt in (1..=3).filter(|_| only.is_empty() || only == "list") {
        let cold = drop_caches();
        let t = Instant::now();
        let mut b = browser(&store, &many_cp, cache);
        let opened = t.elapsed().as_secs_f64();
        let path = b.resolve("vda/many").unwrap();
        let entries = b.list(&path).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(entries.len(), FILES);
        rows.push(Row {
            what: format!("{label}: list 10,000-file folder, new browser (try {attempt})"),
            secs,
            mb_per_s: None,
            chunks: Some(b.chunks_fetched()),
            note: format!(
                "{}open {opened:.3} s (partition table)",
                if cold { "page cache dropped; " } else { "" }
            ),
        });
        if attempt == 1 {
            let t = Instant::now();
            let again = b.list(&path).unwrap();
            assert_eq!(again.len(), FILES);
            rows.push(Row {
                what: format!("{label}: list it again, same browser (warm chunk cache)"),
                secs: t.elapsed().as_secs_f64(),
                mb_per_s: None,
                chunks: Some(b.chunks_fetched()),
                note: "chunks: total since open".into(),
            });
        }
    }

    if only == "list" {
        return;
    }
    // Reading the 1 GiB file with no output (what the reader costs alone).
    let cold = drop_caches();
    let mut b = browser(&store, &big_cp, cache);
    let path = b.resolve("p1/big.bin").unwrap();
    let control = Control::new();
    let t = Instant::now();
    let n = b
        .tree(path.volume)
        .unwrap()
        .read(&path.names, None, &mut std::io::sink(), &control)
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(n, BIG_BYTES);
    rows.push(Row {
        what: format!("{label}: read 1 GiB file, no output"),
        secs,
        mb_per_s: Some(mbs(BIG_BYTES, secs)),
        chunks: Some(b.chunks_fetched()),
        note: format!(
            "{}covers {covered} chunks: {:.3}×",
            if cold { "page cache dropped; " } else { "" },
            b.chunks_fetched() as f64 / covered as f64
        ),
    });
    drop(b);

    // Restoring it into a new folder: with the default read-ahead and without it, in
    // turns (`REWIND_BENCH_RESTORES` tries in all, default 4), so that both see the same
    // disk at about the same time.
    let tries: usize = std::env::var("REWIND_BENCH_RESTORES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(4);
    let read_ahead_mib: u64 = std::env::var("REWIND_BENCH_READ_AHEAD_MIB")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_READ_AHEAD_BYTES >> 20);
    for attempt in 1..=tries {
        let read_ahead = attempt % 2 == 1;
        let out = dir.join("restored");
        drop(fs::remove_dir_all(&out));
        fs::create_dir_all(&out).unwrap();
        let cold = drop_caches();
        let t = Instant::now();
        let mut b = browser(&store, &big_cp, cache);
        b.set_read_ahead(if read_ahead { read_ahead_mib << 20 } else { 0 });
        let path = b.resolve("p1/big.bin").unwrap();
        let restored = b.restore(&[path], &out, &Control::new()).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(restored.bytes, BIG_BYTES);
        let synced = Instant::now();
        run(&mut Command::new("sync"));
        let sync_secs = synced.elapsed().as_secs_f64();
        rows.push(Row {
            what: format!(
                "{label}: restore 1 GiB file to a new folder (try {attempt}, {})",
                if read_ahead {
                    format!("read-ahead {read_ahead_mib} MiB")
                } else {
                    "no read-ahead".to_owned()
                }
            ),
            secs,
            mb_per_s: Some(mbs(BIG_BYTES, secs)),
            chunks: Some(b.chunks_fetched()),
            note: format!(
                "{}covers {covered} chunks: {:.3}×; then `sync` {sync_secs:.2} s",
                if cold { "page cache dropped; " } else { "" },
                b.chunks_fetched() as f64 / covered as f64,
            ),
        });
        if attempt == 1 {
            let restored_file = out.join("big.bin");
            assert_eq!(fs::metadata(&restored_file).unwrap().len(), BIG_BYTES);
        }
        fs::remove_dir_all(&out).unwrap();
    }

    // Baseline: the whole disk out of the store, as a disk restore does it.
    let out = dir.join("disk.raw");
    drop(fs::remove_file(&out));
    let cold = drop_caches();
    let t = Instant::now();
    let file = File::create(&out).unwrap();
    store
        .object_reader(&big_cp.disks[0].index)
        .unwrap()
        .write_to_file(&file, &Control::new())
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let disk_chunks = BIG_DISK_BYTES / chunk;
    rows.push(Row {
        what: format!("{label}: baseline: whole-disk restore (ObjectReader::write_to_file)"),
        secs,
        mb_per_s: Some(mbs(BIG_DISK_BYTES, secs)),
        chunks: None,
        note: format!(
            "{}{} MiB disk ({disk_chunks} chunk slots), no fsync",
            if cold { "page cache dropped; " } else { "" },
            BIG_DISK_BYTES >> 20
        ),
    });
    drop(file);
    fs::remove_file(&out).unwrap();
}

fn main() {
    let dir = std::env::var_os("REWIND_BENCH_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-files"),
        PathBuf::from,
    );
    fs::create_dir_all(&dir).unwrap();
    let cache = std::env::var("REWIND_BENCH_CACHE_MIB")
        .ok()
        .map(|m| m.parse::<u64>().unwrap() << 20);
    let t = Instant::now();
    let many = make_many(&dir);
    let big = make_big(&dir);
    eprintln!("images ready in {:.1} s", t.elapsed().as_secs_f64());

    let chunk = u64::from(InitOptions::default().chunk_size_bytes);
    let (covered, blocks) = covered_chunks(&big, PART_START, "/big.bin", chunk);
    let mut rows = Vec::new();

    // Baseline: the file dumped out of the raw image by e2fsprogs.
    let out = dir.join("dumped.bin");
    drop(fs::remove_file(&out));
    let cold = drop_caches();
    let t = Instant::now();
    run(Command::new("debugfs")
        .args(["-R", &format!("dump /big.bin {}", out.display())])
        .arg(debugfs_target(&big, PART_START)));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(fs::metadata(&out).unwrap().len(), BIG_BYTES);
    fs::remove_file(&out).unwrap();
    rows.push(Row {
        what: "baseline: `debugfs -R dump` of the 1 GiB file from the raw image".into(),
        secs,
        mb_per_s: Some(mbs(BIG_BYTES, secs)),
        chunks: None,
        note: format!(
            "{}{blocks} blocks in {covered} chunks of {} KiB",
            if cold { "page cache dropped; " } else { "" },
            chunk >> 10
        ),
    });

    if std::env::var_os("REWIND_BENCH_NO_PLAIN").is_none() {
        run_store(&dir, &many, &big, false, cache, covered, &mut rows);
    }
    if std::env::var_os("REWIND_BENCH_NO_ENCRYPTED").is_none() {
        run_store(&dir, &many, &big, true, cache, covered, &mut rows);
    }

    println!(
        "chunk size {} KiB, browser chunk cache {}",
        chunk >> 10,
        cache.map_or_else(
            || format!(
                "{} MiB (default)",
                rewind_core::store::random::DEFAULT_CACHE_BYTES >> 20
            ),
            |c| format!("{} MiB", c >> 20)
        )
    );
    println!();
    println!("| run | seconds | MB/s | chunks fetched | notes |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3} | {} | {} | {} |",
            r.what,
            r.secs,
            r.mb_per_s.map_or_else(|| "–".into(), |v| format!("{v:.0}")),
            r.chunks.map_or_else(|| "–".into(), |c| c.to_string()),
            r.note
        );
    }
}
