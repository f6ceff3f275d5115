//! Store format 3: incrementals keep only the pieces that changed, as patches over whole
//! chunks, and everything reads back exactly however long the chain (issue 20).

use super::*;

pub(super) const MIB: usize = 1 << 20;
const PIECE: usize = chunk::PIECE_BYTES;

fn mib_options() -> InitOptions {
    InitOptions {
        chunk_size_bytes: MIB as u32,
        ..options()
    }
}

/// A new store with 1 MiB chunks, encrypted or not.
pub(super) fn mib_store(dir: &Path, encrypted: bool) -> Store {
    let options = if encrypted {
        InitOptions {
            chunk_size_bytes: MIB as u32,
            ..encrypted_options("patches")
        }
    } else {
        mib_options()
    };
    Store::init(&dir.join("s"), &options).unwrap()
}

/// Writes the image and checkpoints it over `parent` (reading it whole, as a shut-off VM's
/// capture does).
pub(super) fn checkpoint_content(
    store: &Store,
    dir: &Path,
    minute: u32,
    content: &[u8],
    parent: Option<&Manifest>,
) -> Manifest {
    let image = dir.join(format!("image-{minute}"));
    write_sparse_by(&image, content, MIB);
    checkpoint_file(store, vm("a", 1), minute, &image, parent)
}

/// Every chunk file of the store: (name, kind byte, the base a patch names).
pub(super) fn kinds(store: &Store) -> Vec<(ChunkId, u8, Option<ChunkId>)> {
    chunk_files(store)
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).unwrap();
            let name = ChunkId::from_hex(path.file_name().unwrap().to_str().unwrap()).unwrap();
            let base = (bytes[4] == 3).then(|| ChunkId(bytes[48..80].try_into().unwrap()));
            (name, bytes[4], base)
        })
        .collect()
}

/// `content` stored through a handle that has not upgraded its store yet (no checkpoint
/// begun), as the older format wrote it; its chunks made durable.
fn written_before_upgrade(store: &Store, content: &[u8]) -> FinishedObject {
    let mut writer = store.object_writer(content.len() as u64, None).unwrap();
    for (i, piece) in content.chunks(MIB).enumerate() {
        writer.put(i as u64, piece).unwrap();
    }
    let object = writer.finish().unwrap();
    store.publish_chunks(&Control::new()).unwrap();
    object
}

/// An image of 8 chunks: noise, text and a hole.
pub(super) fn first_content() -> Vec<u8> {
    let mut content = noise(1, 8 * MIB);
    let text = b"Rewind keeps checkpoints of virtual machines. ".repeat(2 * MIB / 46 + 1);
    content[4 * MIB..6 * MIB].copy_from_slice(&text[..2 * MIB]);
    content[6 * MIB..7 * MIB].fill(0);
    content
}

/// A 4 KiB write at `at`, of a repeated value.
pub(super) fn write_at(content: &mut [u8], at: usize, value: u8) {
    content[at..at + 4096].fill(value);
}

#[test]
fn an_incremental_stores_only_the_changed_pieces_and_everything_reads_back() {
    only_the_changed_pieces(false);
}

#[test]
fn an_encrypted_incremental_stores_only_the_changed_pieces_too() {
    only_the_changed_pieces(true);
}

fn only_the_changed_pieces(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = mib_store(tmp.path(), encrypted);
    let mut content = first_content();
    let first = checkpoint_content(&store, tmp.path(), 0, &content, None);
    // Three slots changed in one piece each, one in two pieces, and one hole filled.
    write_at(&mut content, 100_000, 1);
    write_at(&mut content, MIB + 5 * PIECE + 10, 2);
    write_at(&mut content, 4 * MIB + 3, 3);
    write_at(&mut content, 5 * MIB + 2 * PIECE, 4);
    write_at(&mut content, 5 * MIB + 9 * PIECE, 4);
    write_at(&mut content, 6 * MIB + 4096, 5);
    let second = checkpoint_content(&store, tmp.path(), 1, &content, Some(&first));
    // 5 pieces of patches (the text ones compress) and the new slot's chunk (mostly
    // zeros, compressed), two pages and the manifest: far less than the 5 MiB of the
    // chunks the writes touched.
    assert!(
        second.new_bytes < 5 * PIECE as u64 + 64 * 1024,
        "{} bytes added",
        second.new_bytes
    );
    let patches: Vec<_> = kinds(&store).into_iter().filter(|k| k.1 == 3).collect();
    assert_eq!(patches.len(), 4, "{patches:?}");
    assert_eq!(
        read_back(&store, &second.disks[0].index, tmp.path()),
        content
    );
    assert_eq!(
        read_back(&store, &first.disks[0].index, tmp.path()),
        first_content()
    );
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    // Without the first checkpoint, the bases its chunks were stay as long as the patches.
    store.delete_checkpoint(&first.vm.uuid, &first.id).unwrap();
    store.gc(&Control::new()).unwrap();
    assert_eq!(
        read_back(&store, &second.disks[0].index, tmp.path()),
        content
    );
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
}

#[test]
fn a_long_chain_keeps_every_patch_a_few_steps_from_a_whole_chunk() {
    long_chain(false);
}

#[test]
fn a_long_chain_in_an_encrypted_store_too() {
    long_chain(true);
}

/// A full checkpoint of [`first_content`] and `rounds` incrementals, each after six 4 KiB
/// writes at pseudo-random places: each checkpoint with its content.
pub(super) fn chain_of(store: &Store, dir: &Path, rounds: u32) -> Vec<(Manifest, Vec<u8>)> {
    let mut content = first_content();
    let mut chain = vec![(
        checkpoint_content(store, dir, 0, &content, None),
        content.clone(),
    )];
    let mut x = 7u64;
    for n in 1..=rounds {
        for _ in 0..6 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let at = (x >> 20) as usize % (8 * MIB - 4096);
            write_at(&mut content, at, n as u8);
        }
        let parent = &chain.last().unwrap().0;
        let m = checkpoint_content(store, dir, n, &content, Some(parent));
        chain.push((m, content.clone()));
    }
    chain
}

fn long_chain(encrypted: bool) {
    // Fewer in an encrypted store: sealing is slow in a debug build.
    let rounds = if encrypted { 12 } else { 30 };
    let tmp = tempfile::tempdir().unwrap();
    let store = mib_store(tmp.path(), encrypted);
    let chain = chain_of(&store, tmp.path(), rounds);
    // Every patch is over a chain of at most WRITE_CHAIN patches ending in a whole chunk.
    let files = kinds(&store);
    let by_name: std::collections::HashMap<ChunkId, (u8, Option<ChunkId>)> =
        files.iter().map(|(n, k, b)| (*n, (*k, *b))).collect();
    let mut deepest = 0;
    for (name, _, _) in files.iter().filter(|k| k.1 == 3) {
        let (mut at, mut depth) = (*name, 0);
        while let Some((3, Some(base))) = by_name.get(&at).copied() {
            at = base;
            depth += 1;
        }
        assert_eq!(
            by_name[&at].0, 1,
            "the chain of {name:?} ends in a whole chunk"
        );
        assert!(
            depth <= super::super::pieces::WRITE_CHAIN,
            "{depth} patches"
        );
        deepest = deepest.max(depth);
    }
    assert!(deepest > 1, "patches over patches");
    for (m, content) in &chain {
        assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), content);
    }
    // Keep every fifth; what is left reads back after garbage collection.
    for (n, (m, _)) in chain.iter().enumerate() {
        if n % 5 != 0 {
            store.delete_checkpoint(&m.vm.uuid, &m.id).unwrap();
        }
    }
    store.gc(&Control::new()).unwrap();
    for (m, content) in chain.iter().step_by(5) {
        assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), content);
    }
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
}

#[test]
fn changed_pieces_alone_are_read_and_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &mib_options()).unwrap();
    let mut content = first_content();
    let first = checkpoint_content(&store, tmp.path(), 0, &content, None);
    write_at(&mut content, 2 * MIB + 3 * PIECE, 9);
    write_at(&mut content, 2 * MIB + 4 * PIECE, 9);
    write_at(&mut content, 6 * MIB + 7 * PIECE, 9); // in the hole
    let changes = vec![(2, vec![3, 4]), (6, vec![7])];
    let control = Control::new();
    let mut new = new_checkpoint(vm("a", 1), 1);
    new.parent = Some(first.id.clone());
    let mut writer = store.begin_checkpoint(new, &control).unwrap();
    let mut object = writer
        .object_writer(content.len() as u64, Some(&first.disks[0].index))
        .unwrap();
    let reads = std::sync::Mutex::new(Vec::new());
    let readers: Vec<_> = (0..2)
        .map(|_| {
            |offset: u64, buf: &mut [u8]| -> Result<(), StoreError> {
                reads.lock().unwrap().push((offset, buf.len()));
                let at = offset as usize;
                buf.copy_from_slice(&content[at..at + buf.len()]);
                Ok(())
            }
        })
        .collect();
    object.put_changed(&changes, &control, readers).unwrap();
    let mut reads = reads.into_inner().unwrap();
    reads.sort_unstable();
    assert_eq!(
        reads,
        vec![
            ((2 * MIB + 3 * PIECE) as u64, 2 * PIECE),
            ((6 * MIB + 7 * PIECE) as u64, PIECE)
        ],
        "two adjacent pieces in one read; of the slot that was a hole, the written piece"
    );
    let object = object.finish().unwrap();
    writer.add_disk("vda", None, None, object).unwrap();
    let second = writer.commit(&control).unwrap();
    assert_eq!(second.format_version, 3);
    assert_eq!(
        read_back(&store, &second.disks[0].index, tmp.path()),
        content
    );
    // Pieces rewritten with what they held are no change at all.
    let mut new = new_checkpoint(vm("a", 1), 2);
    new.parent = Some(second.id.clone());
    let writer = store.begin_checkpoint(new, &control).unwrap();
    let mut object = writer
        .object_writer(content.len() as u64, Some(&second.disks[0].index))
        .unwrap();
    let same = |offset: u64, buf: &mut [u8]| -> Result<(), StoreError> {
        let at = offset as usize;
        buf.copy_from_slice(&content[at..at + buf.len()]);
        Ok(())
    };
    object
        .put_changed(&[(0, vec![0, 1]), (2, vec![3])], &control, vec![same])
        .unwrap();
    let object = object.finish().unwrap();
    assert_eq!(object.new_chunks, 0);
    assert_eq!(object.index, second.disks[0].index);
}

#[test]
fn a_format_2_store_is_upgraded_when_first_written_and_its_checkpoints_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    Store::init(&root, &mib_options()).unwrap();
    set_version(&root, 2);
    let path = root.join(config::CONFIG_FILE);
    let store = Store::open(&root, None).unwrap();
    assert_eq!(store.format_version(), 2);
    let mut content = first_content();
    // Written as format 2 would (no patches: the handle writes format 2 until it upgrades).
    let first = written_before_upgrade(&store, &content);
    assert!(kinds(&store).iter().all(|k| k.1 != 3));
    let mut m = checkpoint_content(&store, tmp.path(), 0, &content, None);
    assert_eq!(store.format_version(), 3);
    assert_eq!(m.format_version, 3);
    assert!(
        fs::read_to_string(&path)
            .unwrap()
            .contains("\"version\": 3")
    );
    assert_eq!(read_back(&store, &first.index, tmp.path()), content);
    write_at(&mut content, 7 * MIB + 5, 1);
    m = checkpoint_content(&store, tmp.path(), 1, &content, Some(&m));
    assert_eq!(read_back(&store, &m.disks[0].index, tmp.path()), content);
    assert!(kinds(&store).iter().any(|k| k.1 == 3));
    // A Rewind that knows only format 2 refuses the store now, with its message.
    let probe = Store::probe(&root).unwrap();
    assert_eq!(probe.version, 3);
}

#[test]
fn damage_to_a_base_or_a_patch_is_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &mib_options()).unwrap();
    let mut content = first_content();
    let first = checkpoint_content(&store, tmp.path(), 0, &content, None);
    write_at(&mut content, 3 * MIB + 1000, 1);
    let second = checkpoint_content(&store, tmp.path(), 1, &content, Some(&first));
    let (patch, _, base) = kinds(&store)
        .into_iter()
        .find(|k| k.1 == 3)
        .expect("one patch");
    let base = base.unwrap();
    // A flipped bit in the base, in a piece the patch does not hold.
    let base_path = store.chunk_path(&base);
    let good_base = fs::read(&base_path).unwrap();
    let mut bad = good_base.clone();
    let at = bad.len() - 10;
    bad[at] ^= 1;
    fs::write(&base_path, &bad).unwrap();
    let out = tmp.path().join("out");
    let err = store
        .object_reader(&second.disks[0].index)
        .unwrap()
        .write_to_file(&File::create(&out).unwrap(), &Control::new())
        .unwrap_err();
    assert!(err.to_string().contains(&base.to_hex()), "{err}");
    let report = store.verify(false, &Control::new()).unwrap();
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    assert_eq!(report.damaged[0].chunk, base.to_hex());
    assert_eq!(
        report.damaged[0].checkpoints.len(),
        2,
        "both checkpoints need the base"
    );
    fs::write(&base_path, &good_base).unwrap();
    // A flipped bit in the patch: the patch is named, and only the second checkpoint.
    let patch_path = store.chunk_path(&patch);
    let mut bad = fs::read(&patch_path).unwrap();
    let at = bad.len() - 10;
    bad[at] ^= 1;
    fs::write(&patch_path, &bad).unwrap();
    let report = store.verify(false, &Control::new()).unwrap();
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    assert_eq!(report.damaged[0].chunk, patch.to_hex());
    assert_eq!(report.damaged[0].checkpoints.len(), 1);
    assert_eq!(report.damaged[0].checkpoints[0].id, second.id);
    assert_eq!(
        read_back(&store, &first.disks[0].index, tmp.path()),
        first_content()
    );
}

/// An encrypted store of format 2 (no trees) is upgraded when first written, keeps a header
/// that passes its MAC, and reads its old chunks as they are.
#[test]
fn an_encrypted_format_2_store_is_upgraded_with_its_mac() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let options = InitOptions {
        chunk_size_bytes: MIB as u32,
        ..encrypted_options("patches")
    };
    let store = Store::init(&root, &options).unwrap();
    // Made as a format 2 store was: version 2, its MAC over that.
    let keys = store.keys.as_ref().unwrap();
    let mut config = store.config().clone();
    config.version = 2;
    config.mac_hex = Some(hex::encode(keys.header_mac(&config.authenticated_bytes())));
    fs::write(root.join(config::CONFIG_FILE), config.to_json()).unwrap();
    drop(store);
    let store = Store::open(&root, Some(b"patches")).unwrap();
    assert_eq!(store.format_version(), 2);
    let mut content = first_content();
    let old = written_before_upgrade(&store, &content);
    assert!(
        kinds(&store).iter().all(|k| k.1 != 3),
        "no patches in format 2"
    );
    let first = checkpoint_content(&store, tmp.path(), 0, &content, None);
    assert_eq!((store.format_version(), first.format_version), (3, 3));
    // The chunks format 2 wrote have no tree: a slot changed over one is stored whole (with
    // a tree), and changes over that are patches.
    write_at(&mut content, 7 * MIB + 5, 1);
    let between = checkpoint_content(&store, tmp.path(), 1, &content, Some(&first));
    assert!(kinds(&store).iter().all(|k| k.1 != 3));
    write_at(&mut content, 7 * MIB + 5, 2);
    let second = checkpoint_content(&store, tmp.path(), 2, &content, Some(&between));
    assert!(
        kinds(&store).iter().any(|k| k.1 == 3),
        "patches from then on"
    );
    drop(store);
    let store = Store::open(&root, Some(b"patches")).unwrap();
    assert_eq!(store.config().version, 3, "the header passes its MAC");
    assert_eq!(read_back(&store, &old.index, tmp.path()), first_content());
    assert_eq!(
        read_back(&store, &second.disks[0].index, tmp.path()),
        content
    );
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
}
