//! Tests of the store against real files in a temporary folder.

#![allow(clippy::cast_possible_truncation, clippy::type_complexity)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::*;
use crate::progress::Control;

const CHUNK: u32 = 64 << 10;

pub(crate) fn options() -> InitOptions {
    InitOptions {
        chunk_size_bytes: CHUNK,
        passphrase: None,
        kdf_cost: KdfCost::FAST_FOR_TESTS,
    }
}

fn encrypted_options(pass: &str) -> InitOptions {
    InitOptions {
        passphrase: Some(Zeroizing::new(pass.as_bytes().to_vec())),
        ..options()
    }
}

pub(crate) fn vm(name: &str, n: u8) -> VmRef {
    VmRef {
        name: name.into(),
        uuid: Uuid::from_bytes([n; 16]),
    }
}

fn new_checkpoint(vm: VmRef, minute: u32) -> NewCheckpoint {
    NewCheckpoint {
        vm,
        time: Utc.with_ymd_and_hms(2026, 11, 25, 7, minute, 0).unwrap(),
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: "<domain type='qemu'><name>t</name></domain>".into(),
        parent: None,
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    }
}

/// Deterministic bytes that do not compress.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A sparse image: noise, a hole, text, a repeat of the first chunk, and a short tail.
fn make_image(dir: &Path, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let c = CHUNK as usize;
    let mut content = vec![0u8; 10 * c + 1000];
    content[..3 * c].copy_from_slice(&noise(seed, 3 * c));
    let text = b"Rewind keeps checkpoints of virtual machines. ".repeat(c * 2 / 46 + 1);
    content[5 * c..7 * c].copy_from_slice(&text[..2 * c]);
    let first = content[..c].to_vec();
    content[8 * c..9 * c].copy_from_slice(&first);
    content[10 * c..].copy_from_slice(&noise(seed + 1, 1000));
    let path = dir.join(name);
    write_sparse(&path, &content);
    (path, content)
}

/// Edits the format version in the header of the (unencrypted) store at `root`.
fn set_version(root: &Path, version: u32) {
    let path = root.join(config::CONFIG_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace(
            &format!("\"version\": {}", config::FORMAT_VERSION),
            &format!("\"version\": {version}"),
        ),
    )
    .unwrap();
}

/// Writes `content` leaving all-zero chunks as holes.
fn write_sparse(path: &Path, content: &[u8]) {
    write_sparse_by(path, content, CHUNK as usize);
}

/// Writes `content` leaving all-zero pieces of `chunk` bytes as holes.
fn write_sparse_by(path: &Path, content: &[u8], chunk: usize) {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    file.set_len(content.len() as u64).unwrap();
    for (i, piece) in content.chunks(chunk).enumerate() {
        if piece.iter().any(|&b| b != 0) {
            file.write_all_at(piece, (i * chunk) as u64).unwrap();
        }
    }
}

pub(crate) fn checkpoint_file(
    store: &Store,
    vm: VmRef,
    minute: u32,
    image: &Path,
    parent: Option<&Manifest>,
) -> Manifest {
    let control = Control::new();
    let mut new = new_checkpoint(vm, minute);
    new.parent = parent.map(|p| p.id.clone());
    let mut writer = store.begin_checkpoint(new, &control).unwrap();
    let file = File::open(image).unwrap();
    let size = file.metadata().unwrap().len();
    let base = parent.map(|p| &p.disks[0].index);
    let object = writer.ingest_file(&file, size, base, &control).unwrap();
    writer
        .add_disk(
            "vda",
            Some(image.display().to_string()),
            Some("raw".into()),
            object,
        )
        .unwrap();
    writer.add_blob_bytes("nvram", b"EFI variables").unwrap();
    writer.commit(&control).unwrap()
}

fn read_back(store: &Store, index: &ObjectIndex, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("restored-{}", Uuid::new_v4()));
    let file = File::create(&out).unwrap();
    store
        .object_reader(index)
        .unwrap()
        .write_to_file(&file, &Control::new())
        .unwrap();
    fs::read(out).unwrap()
}

fn chunk_files(store: &Store) -> Vec<PathBuf> {
    let listed = |dir: &Path| -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        out.sort();
        out
    };
    listed(&store.root().join("chunks"))
        .iter()
        .flat_map(|d| listed(d))
        .collect()
}

#[test]
fn init_open_and_the_errors_around_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::init(&root, &options()).unwrap();
    assert_eq!(store.chunk_size_bytes(), CHUNK);
    assert!(!store.is_encrypted());
    let again = Store::open(&root, None).unwrap();
    assert_eq!(again.config().id, store.config().id);

    assert!(matches!(
        Store::init(&root, &options()),
        Err(StoreError::AlreadyExists { .. })
    ));
    let err = Store::open(&tmp.path().join("absent"), None).unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }));
    assert!(err.to_string().contains("plugged in"), "{err}");
    fs::create_dir(tmp.path().join("other")).unwrap();
    fs::write(tmp.path().join("other/file.txt"), "x").unwrap();
    let err = Store::open(&tmp.path().join("other"), None).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    let err = Store::init(&tmp.path().join("other"), &options()).unwrap_err();
    assert!(err.to_string().contains("other/rewind"), "{err}");
    let bad = InitOptions {
        chunk_size_bytes: 1000,
        ..options()
    };
    assert!(
        Store::init(&tmp.path().join("bad"), &bad)
            .unwrap_err()
            .to_string()
            .contains("power of two")
    );
}

#[test]
fn newer_or_damaged_config_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    Store::init(&root, &options()).unwrap();
    let path = root.join(config::CONFIG_FILE);
    let text = fs::read_to_string(&path).unwrap();
    set_version(&root, 7);
    let err = Store::open(&root, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerFormat {
                found: 7,
                supported: config::FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("update Rewind"));
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = Store::open(&root, None).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    fs::write(&path, text.replace(&CHUNK.to_string(), "12345")).unwrap();
    assert!(
        Store::open(&root, None)
            .unwrap_err()
            .to_string()
            .contains("chunk size")
    );
}

#[test]
fn checkpoint_reads_back_byte_exact_and_holes_cost_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, content) = make_image(tmp.path(), "disk.img", 1);
    let m = checkpoint_file(&store, vm("win11", 1), 0, &image, None);

    let disk = &m.disks[0];
    assert_eq!(disk.index.size_bytes, content.len() as u64);
    // Chunks 0-2 noise, 5-6 text, 8 (a repeat of 0), 10 the tail: 7 non-hole slots.
    assert_eq!(disk.index.data_bytes, 6 * u64::from(CHUNK) + 1000);
    assert_eq!(m.logical_bytes, disk.index.data_bytes + 13);
    assert_eq!(read_back(&store, &disk.index, tmp.path()), content);
    let nvram = store
        .object_reader(&m.blobs[0].index)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(nvram, b"EFI variables");
    // Distinct data chunks: 3 noise + 2 text + tail + nvram; plus 1 index page each for disk and nvram.
    assert_eq!(chunk_files(&store).len(), 9);

    let catalog = Store::open(store.root(), None).unwrap().catalog().unwrap();
    assert_eq!(catalog.checkpoints, vec![m.clone()]);
    assert!(catalog.unreadable.is_empty());
    assert_eq!(store.manifest(&m.vm.uuid, &m.id).unwrap(), m);
    assert!(matches!(
        store.manifest(&m.vm.uuid, "20200101T000000.000Z"),
        Err(StoreError::NoSuchCheckpoint { .. })
    ));
}

#[test]
fn random_access_reads_any_range_and_fetches_each_chunk_once_while_cached() {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, content) = make_image(tmp.path(), "disk.img", 7);
    let first = checkpoint_file(&store, vm("win11", 1), 0, &image, None);
    // An incremental whose changed chunk is stored as a patch over its parent's.
    let mut changed = content.clone();
    changed[CHUNK as usize + 100..CHUNK as usize + 140].copy_from_slice(&[0xab; 40]);
    write_sparse(&image, &changed);
    let m = checkpoint_file(&store, vm("win11", 1), 1, &image, Some(&first));
    let index = &m.disks[0].index;

    let c = u64::from(CHUNK);
    let mut cursor = store.object_cursor(index, 4 * c).unwrap();
    assert_eq!(cursor.len(), changed.len() as u64);
    // Ranges within a chunk, across chunk borders, in a hole, over the short tail, past
    // the end; in no order.
    for (at, len) in [
        (c + 90, 60),
        (c - 10, 30),
        (3 * c + 5, 2 * c),
        (9 * c + 17, c + 500),
        (0, 10),
        (10 * c + 990, 100),
        (11 * c, 10),
        (u64::MAX - 3, 10),
    ] {
        let mut buf = vec![0x55; len as usize];
        let n = cursor.read_at(at, &mut buf).unwrap();
        let from = usize::try_from(at).unwrap_or(usize::MAX).min(changed.len());
        let to = from.saturating_add(len as usize).min(changed.len());
        assert_eq!(n, to - from, "read at {at}");
        assert_eq!(&buf[..n], &changed[from..to], "bytes at {at}");
    }
    // Chunks 0, 1 (the patch), 5 and 10 are fetched once each; 3, 4 and 9 are holes and
    // are not fetched at all.
    assert_eq!(cursor.chunks_fetched(), 4);
    let mut again = vec![0; 60];
    cursor.read_at(c + 90, &mut again).unwrap();
    assert_eq!(
        cursor.chunks_fetched(),
        4,
        "a cached chunk is not fetched again"
    );

    // Read + Seek as a file: the whole disk, byte exact.
    let mut whole = Vec::new();
    cursor.seek(SeekFrom::Start(0)).unwrap();
    cursor.read_to_end(&mut whole).unwrap();
    assert_eq!(whole, changed);
    assert_eq!(
        cursor.seek(SeekFrom::End(-1000)).unwrap(),
        changed.len() as u64 - 1000
    );
    let mut tail = Vec::new();
    cursor.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, changed[changed.len() - 1000..]);
    assert!(
        cursor
            .seek(SeekFrom::Current(
                -i64::try_from(changed.len()).unwrap() - 1
            ))
            .is_err()
    );
}

#[test]
fn unchanged_second_checkpoint_adds_only_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp.path(), "disk.img", 2);
    let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    let files = chunk_files(&store).len();
    let second = checkpoint_file(&store, vm("a", 1), 1, &image, Some(&first));
    assert_eq!(chunk_files(&store).len(), files);
    let manifest_len = fs::metadata(store.manifest_path(&second.vm.uuid, &second.id))
        .unwrap()
        .len();
    assert!(
        second.new_bytes.abs_diff(manifest_len) < 16,
        "{} vs {manifest_len}",
        second.new_bytes
    );
    assert_eq!(second.disks[0].index, first.disks[0].index);
}

#[test]
fn incremental_rewrites_only_the_changed_page() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let c = CHUNK as usize;
    let chunks = 3 * index::ENTRIES_PER_PAGE as usize + 5;
    let mut content = noise(3, chunks * c);
    let image = tmp.path().join("big.img");
    write_sparse(&image, &content);
    let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    assert_eq!(first.disks[0].index.pages.len(), 4);

    content[200 * c + 7] ^= 0xff; // one byte in chunk 200, page 1
    write_sparse(&image, &content);
    let before = chunk_files(&store).len();
    let second = checkpoint_file(&store, vm("a", 1), 1, &image, Some(&first));
    assert_eq!(
        chunk_files(&store).len(),
        before + 2,
        "one data chunk and one index page"
    );
    let (a, b) = (&first.disks[0].index.pages, &second.disks[0].index.pages);
    assert_eq!((a[0], a[2], a[3]), (b[0], b[2], b[3]));
    assert_ne!(a[1], b[1]);
    assert_eq!(
        read_back(&store, &second.disks[0].index, tmp.path()),
        content
    );
    // The first checkpoint is still complete on its own.
    content[200 * c + 7] ^= 0xff;
    assert_eq!(
        read_back(&store, &first.disks[0].index, tmp.path()),
        content
    );
}

/// Issue 3: an incremental of a 100 GiB disk with 10 MiB changed adds < 1 MiB of
/// metadata, even with the changes scattered in 64 KiB pieces all over the disk.
#[test]
fn incremental_metadata_of_a_100_gib_disk_stays_under_1_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        chunk_size_bytes: 1 << 20,
        ..options()
    };
    let store = Store::init(&tmp.path().join("s"), &opts).unwrap();
    let size = 100u64 << 30;
    // A base index whose every slot names a distinct chunk (as a full disk would), built
    // from synthetic ids: writing 100 GiB of real data would add nothing to the test.
    let mut base = ObjectIndex::empty(size, 1 << 20);
    for p in 0..base.page_count() {
        let entries: Vec<ChunkId> = (0..base.entries_in_page(p))
            .map(|e| ChunkId(*blake3::hash(&(p * 1000 + e).to_le_bytes()).as_bytes()))
            .collect();
        let (id, _) = store
            .put_chunk(ChunkKind::IndexPage, &index::encode_page(&entries))
            .unwrap();
        base.pages[p as usize] = Some(id);
    }
    base.data_bytes = size;
    // 160 changed chunks (10 MiB in 64 KiB pieces), spread evenly; their new content is
    // already in the store, so everything the checkpoint adds is metadata.
    let changed = vec![7u8; 1 << 20];
    store.put_chunk(ChunkKind::Data, &changed).unwrap();
    // As if a checkpoint had been committed with them.
    store.publish_chunks(&Control::new()).unwrap();
    let control = Control::new();
    let mut writer = store
        .begin_checkpoint(new_checkpoint(vm("big", 9), 0), &control)
        .unwrap();
    let mut object = store.object_writer(size, Some(&base)).unwrap();
    let count = object.chunk_count();
    for k in 0..160 {
        object.put(k * count / 160, &changed).unwrap();
    }
    let finished = object.finish().unwrap();
    assert_eq!(
        finished.new_chunks, 160,
        "each change lands in its own page"
    );
    writer
        .add_disk("vda", None, Some("qcow2".into()), finished)
        .unwrap();
    let m = writer.commit(&control).unwrap();
    assert!(
        m.new_bytes < 1 << 20,
        "metadata added: {} bytes",
        m.new_bytes
    );
}

#[test]
fn uncommitted_checkpoint_is_invisible_and_its_chunks_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp.path(), "d.img", 4);
    let kept = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    let kept_files = chunk_files(&store).len();
    {
        let control = Control::new();
        let mut writer = store
            .begin_checkpoint(new_checkpoint(vm("a", 1), 1), &control)
            .unwrap();
        writer.add_blob_bytes("nvram", &noise(99, 100_000)).unwrap();
        // Dropped without commit, as if the process had died here.
    }
    fs::write(store.root().join("tmp/chunk-1-1.tmp"), "half a chunk").unwrap();
    assert_eq!(store.catalog().unwrap().checkpoints.len(), 1);
    let report = store.gc(&Control::new()).unwrap();
    assert_eq!(
        report.leftovers_removed, 4,
        "the half chunk, and the 2 data chunks and the index page of the dropped blob: \
         chunks get their names only at the commit"
    );
    assert_eq!(report.chunks_removed, 0);
    assert_eq!(chunk_files(&store).len(), kept_files);
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
    let _ = kept;
}

#[test]
fn gc_frees_what_only_deleted_checkpoints_used() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (a, a_content) = make_image(tmp.path(), "a.img", 5);
    let (b, _) = make_image(tmp.path(), "b.img", 6);
    let ma = checkpoint_file(&store, vm("a", 1), 0, &a, None);
    let mb = checkpoint_file(&store, vm("b", 2), 0, &b, None);
    assert_eq!(store.gc(&Control::new()).unwrap().chunks_removed, 0);
    store.delete_checkpoint(&mb.vm.uuid, &mb.id).unwrap();
    let report = store.gc(&Control::new()).unwrap();
    // b's noise (3), tail (1) and disk page (1) go; the text and the nvram blob are shared with a.
    assert_eq!(report.chunks_removed, 5, "{report:?}");
    assert_eq!(read_back(&store, &ma.disks[0].index, tmp.path()), a_content);
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
}

#[test]
fn gc_refuses_to_delete_anything_when_a_manifest_is_unreadable() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (a, _) = make_image(tmp.path(), "a.img", 7);
    let m = checkpoint_file(&store, vm("a", 1), 0, &a, None);
    let path = store.manifest_path(&m.vm.uuid, &m.id);
    let text = fs::read(&path).unwrap();
    fs::write(&path, &text[..text.len() - 20]).unwrap();
    let files = chunk_files(&store).len();
    let err = store.gc(&Control::new()).unwrap_err();
    assert!(matches!(err, StoreError::GcUnsafe { .. }), "{err}");
    assert!(err.to_string().contains("without deleting anything"));
    assert_eq!(chunk_files(&store).len(), files);
}

#[test]
fn gc_waits_for_a_writer_and_writers_wait_for_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let control = Control::new();
    let writer = store
        .begin_checkpoint(new_checkpoint(vm("a", 1), 0), &control)
        .unwrap();
    let err = StoreLock::acquire(store.root(), LockMode::Exclusive, "gc", None).unwrap_err();
    assert!(
        err.to_string().contains("writing a checkpoint of a"),
        "{err}"
    );
    // A waiting GC can be cancelled.
    let waiting = Control::new();
    waiting.cancel();
    assert!(matches!(store.gc(&waiting), Err(StoreError::Cancelled)));
    drop(writer);
    let gc_lock = StoreLock::acquire(store.root(), LockMode::Exclusive, "gc", None).unwrap();
    let blocked = Control::new();
    blocked.cancel();
    assert!(matches!(
        store.begin_checkpoint(new_checkpoint(vm("a", 1), 0), &blocked),
        Err(StoreError::Cancelled)
    ));
    // A job that would rather fail than wait says the store is busy, and by whom.
    let impatient = Control::new();
    impatient.fail_when_busy();
    match store.begin_checkpoint(new_checkpoint(vm("a", 1), 0), &impatient) {
        Err(StoreError::Busy { holder, .. }) => assert!(holder.contains("gc"), "{holder}"),
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(matches!(
        store.verify(false, &impatient),
        Err(StoreError::Busy { .. })
    ));
    drop(gc_lock);
    store
        .begin_checkpoint(new_checkpoint(vm("a", 1), 0), &impatient)
        .unwrap();
}

type Written = std::sync::Mutex<Vec<(Manifest, Vec<u8>)>>;

/// Writes 12 incremental checkpoints of VM `v`, each changing a little of its disk; falls
/// back to a full capture when the parent was removed meanwhile.
fn write_history(
    root: &Path,
    dir: &Path,
    v: u8,
    written: &Written,
    parent_gone: &std::sync::atomic::AtomicU32,
) {
    use std::sync::atomic::Ordering;
    let store = Store::open(root, None).unwrap();
    let image = dir.join(format!("vm{v}.img"));
    let mut content = noise(u64::from(v), 12 * CHUNK as usize);
    let mut parent: Option<Manifest> = None;
    for n in 0..12u32 {
        let at = (n as usize * 5 + usize::from(v)) % 12 * CHUNK as usize;
        content[at..at + 1000].copy_from_slice(&noise(u64::from(n) + 100, 1000));
        write_sparse(&image, &content);
        let control = Control::new();
        let mut new = new_checkpoint(vm(&format!("vm{v}"), v), n);
        new.parent = parent.as_ref().map(|p| p.id.clone());
        let mut writer = match store.begin_checkpoint(new.clone(), &control) {
            Err(StoreError::ParentGone { .. }) => {
                parent_gone.fetch_add(1, Ordering::Relaxed);
                parent = None;
                store
                    .begin_checkpoint(
                        NewCheckpoint {
                            parent: None,
                            ..new
                        },
                        &control,
                    )
                    .unwrap()
            }
            other => other.unwrap(),
        };
        let file = File::open(&image).unwrap();
        let base = parent.as_ref().map(|p| &p.disks[0].index);
        let object = writer
            .ingest_file(&file, content.len() as u64, base, &control)
            .unwrap();
        writer.add_disk("vda", None, None, object).unwrap();
        let m = writer.commit(&control).unwrap();
        written.lock().unwrap().push((m.clone(), content.clone()));
        parent = Some(m);
    }
}

/// Garbage collection and pruning running again and again while two VMs' checkpoints are
/// written (each thread with its own handle, so its own lock): GC never removes what a
/// finished or in-flight checkpoint needs, and an incremental whose parent was pruned in
/// the meantime is refused rather than written against a base that is going away.
#[test]
fn gc_and_prune_alongside_writers_never_break_a_checkpoint() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    Store::init(&root, &options()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Written::default());
    let parent_gone = Arc::new(AtomicU32::new(0));
    let writers: Vec<_> = (1..=2u8)
        .map(|v| {
            let (root, dir, written, parent_gone) = (
                root.clone(),
                tmp.path().to_path_buf(),
                written.clone(),
                parent_gone.clone(),
            );
            std::thread::spawn(move || write_history(&root, &dir, v, &written, &parent_gone))
        })
        .collect();
    let collector = {
        let (root, done) = (root.clone(), done.clone());
        std::thread::spawn(move || {
            let store = Store::open(&root, None).unwrap();
            let mut runs = 0;
            while !done.load(Ordering::Relaxed) {
                let rules = retention::KeepRules {
                    last: 2,
                    ..Default::default()
                };
                store.prune(&rules, None, false, &Control::new()).unwrap();
                if runs % 3 == 0 {
                    // As a user deleting the newest checkpoint from the timeline.
                    let newest = store
                        .catalog()
                        .unwrap()
                        .checkpoints
                        .into_iter()
                        .rev()
                        .find(|m| m.vm.name == "vm1");
                    if let Some(m) = newest {
                        match store.delete_checkpoint(&m.vm.uuid, &m.id) {
                            Ok(()) | Err(StoreError::NoSuchCheckpoint { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                store.gc(&Control::new()).unwrap();
                runs += 1;
            }
            runs
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let gc_runs = collector.join().unwrap();
    assert!(gc_runs > 0);

    let store = Store::open(&root, None).unwrap();
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let catalog = store.catalog().unwrap();
    assert!(!catalog.checkpoints.is_empty());
    let written = written.lock().unwrap();
    for m in &catalog.checkpoints {
        let (_, content) = written
            .iter()
            .find(|(w, _)| w == m)
            .expect("listed checkpoints were written");
        assert_eq!(
            &read_back(&store, &m.disks[0].index, tmp.path()),
            content,
            "{} of {}",
            m.id,
            m.vm.name
        );
    }
    eprintln!(
        "{gc_runs} GC runs; {} incrementals refused because their parent was pruned",
        parent_gone.load(Ordering::Relaxed)
    );
}

#[test]
fn an_incremental_needs_its_parent_to_still_be_there() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp.path(), "d.img", 21);
    let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    let (other_image, _) = make_image(tmp.path(), "e.img", 22);
    let other = checkpoint_file(&store, vm("b", 2), 0, &other_image, None);
    let control = Control::new();
    let mut new = new_checkpoint(vm("a", 1), 1);
    new.parent = Some(first.id.clone());
    {
        let writer = store.begin_checkpoint(new.clone(), &control).unwrap();
        assert_eq!(writer.parent(), Some(&first));
        // A base that is not the parent's cannot be used: nothing keeps its chunks alive.
        let size = first.disks[0].index.size_bytes;
        let err = writer
            .object_writer(size, Some(&other.disks[0].index))
            .unwrap_err();
        assert!(err.to_string().contains("not one of checkpoint"), "{err}");
    }
    store.delete_checkpoint(&first.vm.uuid, &first.id).unwrap();
    let err = store.begin_checkpoint(new, &control).unwrap_err();
    assert!(matches!(err, StoreError::ParentGone { .. }), "{err}");
    assert!(err.to_string().contains("take a full checkpoint"), "{err}");
}

#[test]
fn verify_names_the_checkpoints_a_flipped_bit_breaks_and_a_later_checkpoint_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (a, content) = make_image(tmp.path(), "a.img", 8);
    let m1 = checkpoint_file(&store, vm("win", 1), 0, &a, None);
    let m2 = checkpoint_file(&store, vm("win", 1), 1, &a, None);
    let (b, _) = make_image(tmp.path(), "b.img", 9);
    let other = checkpoint_file(&store, vm("other", 2), 0, &b, None);
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());

    // Flip one bit in the chunk holding the first 64 KiB of a.img.
    let first_chunk = store.chunk_id(&content[..CHUNK as usize]);
    let path = store.chunk_path(&first_chunk);
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0x10;
    fs::write(&path, bytes).unwrap();

    assert!(
        store.verify(true, &Control::new()).unwrap().is_clean(),
        "quick mode checks presence only"
    );
    let report = store.verify(false, &Control::new()).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let damage = &report.damaged[0];
    assert_eq!(damage.chunk, first_chunk.to_hex());
    let names: Vec<_> = damage
        .checkpoints
        .iter()
        .map(|c| (c.vm.as_str(), c.id.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![("win", m1.id.as_str()), ("win", m2.id.as_str())]
    );
    assert!(
        !names.iter().any(|(vm, _)| *vm == other.vm.name),
        "the other VM is not affected"
    );
    let moved = damage.moved_to.as_ref().unwrap();
    assert!(moved.starts_with(store.root().join("damaged")) && moved.exists() && !path.exists());
    let err = store
        .object_reader(&m1.disks[0].index)
        .unwrap()
        .read(0)
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // Now missing: quick mode sees that too.
    assert_eq!(
        store.verify(true, &Control::new()).unwrap().damaged.len(),
        1
    );
    // A new checkpoint of the same data writes the chunk again; both old ones are whole.
    checkpoint_file(&store, vm("win", 1), 2, &a, None);
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
    assert_eq!(read_back(&store, &m1.disks[0].index, tmp.path()), content);
}

#[test]
fn truncated_chunk_is_rewritten_by_the_next_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (a, content) = make_image(tmp.path(), "a.img", 10);
    let m1 = checkpoint_file(&store, vm("a", 1), 0, &a, None);
    // As a power cut can leave a renamed but unflushed file: shorter than its header says.
    let path = store.chunk_path(&store.chunk_id(&content[..CHUNK as usize]));
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    checkpoint_file(&store, vm("a", 1), 1, &a, None);
    assert_eq!(fs::metadata(&path).unwrap().len(), len);
    assert_eq!(read_back(&store, &m1.disks[0].index, tmp.path()), content);
}

#[test]
fn encrypted_store_round_trip_and_passphrase_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let store = Store::init(&root, &encrypted_options("correct horse")).unwrap();
    assert!(store.is_encrypted());
    let (a, content) = make_image(tmp.path(), "a.img", 11);
    let m = checkpoint_file(&store, vm("Secret VM", 1), 0, &a, None);

    assert!(matches!(
        Store::open(&root, None),
        Err(StoreError::PassphraseRequired { .. })
    ));
    let err = Store::open(&root, Some(b"wrong")).unwrap_err();
    assert!(matches!(err, StoreError::WrongPassphrase { .. }));
    assert!(err.to_string().contains("wrong passphrase"));
    let store = Store::open(&root, Some(b"correct horse")).unwrap();
    assert_eq!(store.catalog().unwrap().checkpoints, vec![m.clone()]);
    assert_eq!(read_back(&store, &m.disks[0].index, tmp.path()), content);

    // Chunk names are keyed: the plain hash of the content names no file.
    let plain = ChunkId(*blake3::hash(&content[..CHUNK as usize]).as_bytes());
    assert!(!store.chunk_path(&plain).exists());
    // Neither the manifest nor any chunk shows the VM's name or the text in the image.
    let manifest = fs::read(store.manifest_path(&m.vm.uuid, &m.id)).unwrap();
    assert!(!manifest.windows(9).any(|w| w == b"Secret VM"));
    for f in chunk_files(&store) {
        assert!(
            !fs::read(f)
                .unwrap()
                .windows(12)
                .any(|w| w == b"Rewind keeps")
        );
    }
    // Tampering is detected, not decrypted into garbage.
    let path = store.manifest_path(&m.vm.uuid, &m.id);
    let mut bytes = manifest.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&path, bytes).unwrap();
    let catalog = store.catalog().unwrap();
    assert!(catalog.checkpoints.is_empty());
    assert!(
        catalog.unreadable[0]
            .1
            .to_string()
            .contains("authentication"),
        "{}",
        catalog.unreadable[0].1
    );
    fs::write(&path, &manifest).unwrap();
    let page = m.disks[0].index.pages[0].unwrap();
    let mut bytes = fs::read(store.chunk_path(&page)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(store.chunk_path(&page), bytes).unwrap();
    let report = store.verify(false, &Control::new()).unwrap();
    assert_eq!(report.damaged[0].kind, "index_page");
    assert!(
        report.damaged[0].problem.contains("authentication"),
        "{}",
        report.damaged[0].problem
    );
}

#[test]
fn hostile_manifests_are_reported_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (a, _) = make_image(tmp.path(), "a.img", 12);
    let m = checkpoint_file(&store, vm("a", 1), 0, &a, None);
    let good = serde_json::to_value(&m).unwrap();
    let dir = store.manifest_dir(&m.vm.uuid);
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>)> = vec![
        (
            "traversal",
            Box::new(|v| v["disks"][0]["target"] = "../../etc/passwd".into()),
        ),
        (
            "absurd size",
            Box::new(|v| v["disks"][0]["index"]["size_bytes"] = u64::MAX.into()),
        ),
        (
            "page count",
            Box::new(|v| v["disks"][0]["index"]["pages"] = serde_json::json!([])),
        ),
        (
            "bad chunk id",
            Box::new(|v| v["disks"][0]["index"]["pages"][0] = "../x".into()),
        ),
        ("newer", Box::new(|v| v["format_version"] = 99.into())),
    ];
    for (n, (what, edit)) in cases.iter().enumerate() {
        let mut v = good.clone();
        edit(&mut v);
        let id = format!("20200101T00000{n}.000Z");
        v["id"] = id.clone().into();
        fs::write(
            dir.join(format!("{id}.manifest")),
            serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
        let catalog = store.catalog().unwrap();
        assert_eq!(catalog.checkpoints.len(), 1, "{what}");
        let (path, err) = catalog.unreadable.last().unwrap();
        assert!(path.ends_with(format!("{id}.manifest")), "{what}");
        assert!(matches!(err, StoreError::Damaged { .. }), "{what}: {err}");
        fs::remove_file(path).unwrap();
    }
    // A manifest copied under another checkpoint's name is caught too.
    fs::copy(
        store.manifest_path(&m.vm.uuid, &m.id),
        dir.join("20200101T000000.000Z.manifest"),
    )
    .unwrap();
    assert!(
        store.catalog().unwrap().unreadable[0]
            .1
            .to_string()
            .contains("not what its file name says")
    );
}

#[test]
fn a_full_drive_is_named_as_such() {
    // /dev/full fails every write with ENOSPC, as a full drive does.
    let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let e = full
        .write_all(&[0; 4096])
        .and_then(|()| full.flush())
        .unwrap_err();
    let mapped = error::io_error("write", "/dev/full", e);
    assert!(matches!(mapped, StoreError::NoSpace { .. }));
    assert!(
        mapped.to_string().contains("drive of the store is full"),
        "{mapped}"
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Whatever bytes a manifest file holds, listing the store never panics and never
        /// lists it unless it is a valid manifest.
        #[test]
        fn arbitrary_manifest_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
            let dir = store.manifest_dir(&Uuid::from_bytes([1; 16]));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("20200101T000000.000Z.manifest"), &bytes).unwrap();
            let catalog = store.catalog().unwrap();
            prop_assert!(catalog.checkpoints.is_empty());
            prop_assert_eq!(catalog.unreadable.len(), 1);
        }

        /// Random writes into a disk between checkpoints: every checkpoint reads back the
        /// content it had, whatever came after.
        #[test]
        fn every_checkpoint_reads_back_its_own_content(writes in proptest::collection::vec((0usize..40, any::<u8>(), 1usize..3000), 1..6)) {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::init(&tmp.path().join("s"), &InitOptions { chunk_size_bytes: 64 << 10, ..options() }).unwrap();
            let image = tmp.path().join("d.img");
            let mut content = vec![0u8; 40 * 4096 + 17];
            let mut taken = Vec::new();
            let mut parent: Option<Manifest> = None;
            for (n, (block, value, len)) in writes.iter().enumerate() {
                let start = block * 4096;
                let end = (start + len).min(content.len());
                content[start..end].fill(*value);
                write_sparse(&image, &content);
                let m = checkpoint_file(&store, vm("p", 1), u32::try_from(n).unwrap(), &image, parent.as_ref());
                parent = Some(m.clone());
                taken.push((m, content.clone()));
            }
            for (m, expected) in &taken {
                prop_assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), expected);
            }
        }
    }
}

/// The parallel pipeline builds the very index the sequential `put` builds, holes and
/// out-of-order completions included; a read error or a cancel stops it cleanly.
#[test]
fn parallel_put_matches_sequential_put_and_stops_on_error_or_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let c = CHUNK as usize;
    let chunks = 2 * index::ENTRIES_PER_PAGE + 17;
    let size = chunks * u64::from(CHUNK) - 1000;
    let content = |i: u64| -> Option<Vec<u8>> {
        // Every fifth chunk a hole, every seventh all zeros (read, but stored as a hole),
        // the others noise, some repeated.
        let len = if i == chunks - 1 { c - 1000 } else { c };
        match i {
            _ if i.is_multiple_of(5) => None,
            _ if i.is_multiple_of(7) => Some(vec![0; len]),
            _ => Some(noise(i % 40, len)),
        }
    };
    let control = Control::new();
    let mut sequential = store.object_writer(size, None).unwrap();
    for i in 0..chunks {
        match content(i) {
            Some(data) => sequential.put(i, &data).unwrap(),
            None => sequential.put_hole(i).unwrap(),
        }
    }
    let sequential = sequential.finish().unwrap();

    let slots: Vec<u64> = (0..chunks).collect();
    let mut parallel = store.object_writer(size, None).unwrap();
    let read = |i: u64, buf: &mut [u8]| match content(i) {
        Some(data) => {
            buf.copy_from_slice(&data);
            Ok::<_, StoreError>(true)
        }
        None => Ok(false),
    };
    parallel.put_slots(&slots, &control, vec![read; 3]).unwrap();
    let parallel = parallel.finish().unwrap();
    assert_eq!(parallel.index, sequential.index);
    assert_eq!(control.progress_bytes().0, size);

    let mut failing = store.object_writer(size, None).unwrap();
    let fail_at_150 = |i: u64, buf: &mut [u8]| {
        if i == 150 {
            return Err(StoreError::Invalid("the disk went away".into()));
        }
        buf.fill(1);
        Ok(true)
    };
    let err = failing
        .put_slots(&slots, &Control::new(), vec![fail_at_150; 2])
        .unwrap_err();
    assert!(err.to_string().contains("the disk went away"), "{err}");

    let control = Control::new();
    let mut cancelled = store.object_writer(size, None).unwrap();
    let reads = std::sync::atomic::AtomicU64::new(0);
    let late_reads = std::sync::atomic::AtomicU64::new(0);
    let cancel_at_10 = |i: u64, buf: &mut [u8]| {
        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if control.is_cancelled() {
            late_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if i == 10 {
            control.cancel();
        }
        buf.fill(2);
        Ok::<_, StoreError>(true)
    };
    let err = cancelled
        .put_slots(&slots, &control, vec![cancel_at_10; 2])
        .unwrap_err();
    assert!(matches!(err, StoreError::Cancelled), "{err:?}");
    // How far the other reader got before the cancel depends on the machine's load (it
    // may run ahead of slot 10 by the pipeline's look-ahead), but once the cancel is seen
    // no read starts: at most the other reader's one read under way may begin after it.
    let reads = reads.into_inner();
    let late_reads = late_reads.into_inner();
    assert!(
        late_reads <= 1,
        "{late_reads} reads began after the cancel ({reads} in all)"
    );
    let look_ahead = u64::try_from(2 * pipeline::AHEAD_PER_WORKER).unwrap();
    assert!(
        (10..=11 + look_ahead).contains(&reads),
        "{reads} reads: reading went on after the cancel"
    );
}

/// After verify finds damage in a checkpoint, `unhealed_damage` names it (so no incremental
/// is taken from it), and a checkpoint that writes the same data again heals it.
#[test]
fn damage_found_by_verify_is_reported_until_a_later_checkpoint_heals_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp.path(), "disk.img", 7);
    let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    assert!(store.unhealed_damage(&first).unwrap().is_empty());
    // One data chunk of the first checkpoint gets lost, another one corrupted.
    let ids: Vec<ChunkId> = store.read_page(&first.disks[0].index, 0).unwrap();
    let data: Vec<&ChunkId> = ids.iter().filter(|id| **id != index::HOLE).collect();
    fs::remove_file(store.chunk_path(data[0])).unwrap();
    let path = store.chunk_path(data[1]);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    let report = store.verify(false, &Control::new()).unwrap();
    assert_eq!(report.damaged.len(), 2);
    let mut damaged = store.unhealed_damage(&first).unwrap();
    damaged.sort();
    let mut expected = vec![*data[0], *data[1]];
    expected.sort();
    assert_eq!(damaged, expected);
    // A full checkpoint of the same data writes both chunks again.
    let second = checkpoint_file(&store, vm("a", 1), 1, &image, None);
    assert!(store.unhealed_damage(&first).unwrap().is_empty());
    assert!(store.unhealed_damage(&second).unwrap().is_empty());
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
}

#[test]
fn prune_keeps_the_newest_safety_checkpoint_whatever_the_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let control = Control::new();
    let take = |minute: u32, safety: bool| {
        let mut new = new_checkpoint(vm("win11", 1), minute);
        if safety {
            new.labels = vec![super::SAFETY_LABEL.to_owned()];
        }
        let mut writer = store.begin_checkpoint(new, &control).unwrap();
        writer
            .add_blob_bytes("nvram", &[u8::try_from(minute).unwrap(); 100])
            .unwrap();
        writer.commit(&control).unwrap().id
    };
    let old_safety = take(1, true);
    let safety = take(2, true);
    let plain: Vec<String> = (3..6).map(|m| take(m, false)).collect();
    let rules = crate::store::retention::KeepRules {
        last: 1,
        ..Default::default()
    };
    let decisions = store.prune(&rules, None, false, &control).unwrap();
    let kept: Vec<&str> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        kept,
        vec![plain[2].as_str(), safety.as_str()],
        "{decisions:?}"
    );
    let why = decisions.iter().find(|d| d.id == safety).unwrap();
    assert_eq!(
        why.reasons,
        vec![crate::store::retention::KeepReason::Safety]
    );
    assert!(decisions.iter().any(|d| d.id == old_safety && !d.keep));
    assert_eq!(store.catalog().unwrap().checkpoints.len(), 2);
}

/// Format 2 gives each data chunk of a plain store a tree of its 64 KiB pieces, so that a
/// restore can read and check only the pieces it writes; a store made with format 1 keeps
/// being written without trees (the Rewind that made it can still read it), and both read
/// back the same.
#[test]
fn chunks_get_piece_trees_from_format_2_and_format_1_stores_stay_readable_as_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        chunk_size_bytes: 1 << 20,
        ..options()
    };
    let data = noise(5, 1 << 20);
    let ranges = [(3 << 16, (3 << 16) + 99)];
    for version in [1, config::FORMAT_VERSION] {
        let root = tmp.path().join(format!("v{version}"));
        Store::init(&root, &opts).unwrap();
        let path = root.join(config::CONFIG_FILE);
        let text = fs::read_to_string(&path).unwrap();
        let current = format!("\"version\": {}", config::FORMAT_VERSION);
        fs::write(
            &path,
            text.replace(&current, &format!("\"version\": {version}")),
        )
        .unwrap();
        let store = Store::open(&root, None).unwrap();
        assert_eq!(store.config().version, version);
        let (id, added) = store.put_chunk(ChunkKind::Data, &data).unwrap();
        store.publish_chunks(&Control::new()).unwrap();
        assert_eq!(
            id,
            ChunkId(*blake3::hash(&data).as_bytes()),
            "the same name either way"
        );
        let file = fs::read(store.chunk_path(&id)).unwrap();
        let has_tree = file[7] == 1;
        assert_eq!(has_tree, version >= 2, "format {version}");
        assert_eq!(
            added as usize,
            16 + (1 << 20) + if has_tree { 16 * 32 } else { 0 }
        );
        assert_eq!(store.read_chunk(&id, ChunkKind::Data).unwrap(), data);
        let mut out = Vec::new();
        store.read_chunk_ranges(&id, &ranges, &mut out).unwrap();
        assert_eq!(out[3 << 16..4 << 16], data[3 << 16..4 << 16]);
        // A flipped bit in the piece read is an error naming the chunk.
        let mut bad = file.clone();
        let at = file.len() - (1 << 20) + (3 << 16) + 7;
        bad[at] ^= 1;
        fs::write(store.chunk_path(&id), &bad).unwrap();
        let err = store.read_chunk_ranges(&id, &ranges, &mut out).unwrap_err();
        assert!(err.to_string().contains(&id.to_hex()), "{err}");
        fs::remove_file(store.chunk_path(&id)).unwrap();
        let err = store.read_chunk_ranges(&id, &ranges, &mut out).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}

/// A VM's catalog reads that VM's manifests only; pruning what was read already reads
/// none, and leaves alone a checkpoint added meanwhile by another writer.
#[test]
fn a_vm_catalog_reads_one_vm_and_prune_known_reads_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s"), &options()).unwrap();
    let control = Control::new();
    let take = |vm: VmRef, minute: u32| {
        let mut writer = store
            .begin_checkpoint(new_checkpoint(vm, minute), &control)
            .unwrap();
        writer.add_blob_bytes("nvram", &[1; 10]).unwrap();
        writer.commit(&control).unwrap()
    };
    for minute in 0..3 {
        take(vm("a", 1), minute);
        take(vm("b", 2), 10 + minute);
    }
    let before = store.manifests_read();
    let a = store.vm_catalog(&vm("a", 1).uuid).unwrap();
    assert_eq!(a.checkpoints.len(), 3);
    assert!(a.checkpoints.iter().all(|m| m.vm.name == "a"));
    assert!(a.checkpoints.windows(2).all(|w| w[0].time <= w[1].time));
    assert_eq!(
        store.manifests_read() - before,
        3,
        "only VM a's manifests are read"
    );
    let all = store.manifests_read();
    assert_eq!(store.catalog().unwrap().checkpoints.len(), 6);
    assert_eq!(store.manifests_read() - all, 6);
    assert!(
        store
            .vm_catalog(&vm("c", 3).uuid)
            .unwrap()
            .checkpoints
            .is_empty()
    );

    // Another writer adds one for VM a after the job read its catalog.
    let added_meanwhile = take(vm("a", 1), 30);
    let rules = crate::store::retention::KeepRules {
        last: 1,
        ..Default::default()
    };
    let read = store.manifests_read();
    let decisions = store
        .prune_known(&a, &rules, Some(vm("a", 1).uuid), &control)
        .unwrap();
    assert_eq!(
        store.manifests_read(),
        read,
        "pruning what was read reads nothing"
    );
    assert_eq!(decisions.iter().filter(|d| !d.keep).count(), 2);
    let left: Vec<String> = store
        .vm_catalog(&vm("a", 1).uuid)
        .unwrap()
        .checkpoints
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec![a.checkpoints[2].id.clone(), added_meanwhile.id]);
    // Pruning again with the same stale view: the ones deleted already are no error.
    store
        .prune_known(&a, &rules, Some(vm("a", 1).uuid), &control)
        .unwrap();
}

mod flat;
mod hostile;
mod patches;

#[test]
fn read_ahead_reads_the_same_bytes_and_fetches_no_chunk_more() {
    use std::io::Read as _;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    // 200 chunks: more than one index page (128 entries), with holes between data.
    let c = CHUNK as usize;
    let mut content = noise(11, 200 * c);
    for hole in [3, 4, 127, 128, 190] {
        content[hole * c..(hole + 1) * c].fill(0);
    }
    let image = tmp.path().join("disk.img");
    write_sparse(&image, &content);
    let m = checkpoint_file(&store, vm("win11", 1), 0, &image, None);
    let index = &m.disks[0].index;

    let mut fetched = Vec::new();
    for read_ahead in [0, 16 * u64::from(CHUNK), u64::MAX] {
        let mut cursor = store
            .object_cursor(index, 4 * u64::from(CHUNK))
            .unwrap()
            .with_read_ahead(read_ahead);
        // Sequential, in pieces that straddle chunks; then a jump back and on again.
        let mut whole = Vec::new();
        let mut piece = vec![0; 100_000];
        loop {
            let n = cursor.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            whole.extend_from_slice(&piece[..n]);
        }
        assert!(whole == content, "read-ahead {read_ahead}: bytes differ");
        let mut again = vec![0; 3 * c];
        assert_eq!(cursor.read_at(120 * c as u64, &mut again).unwrap(), 3 * c);
        assert!(again == content[120 * c..123 * c]);
        fetched.push(cursor.chunks_fetched());
    }
    // The 195 data chunks once, and chunks 120, 121 and 122 again (long evicted from the
    // 4-chunk cache): the same with read-ahead as without.
    assert_eq!(fetched, vec![195 + 3, 195 + 3, 195 + 3]);
}
