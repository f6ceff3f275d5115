//! Flat copies: after a compaction the newest checkpoint of a VM reads one file per slot,
//! and a flat copy that is missing, stale, damaged or hostile costs only time (issue 20).

use super::patches::{MIB, chain_of, kinds, mib_store};
use super::*;

/// The flat copies in the store, by the name of their patch.
fn flat_names(store: &Store) -> Vec<ChunkId> {
    let dir = store.root().join("flat");
    let Ok(prefixes) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<ChunkId> = prefixes
        .flat_map(|p| fs::read_dir(p.unwrap().path()).unwrap())
        .map(|e| ChunkId::from_hex(e.unwrap().file_name().to_str().unwrap()).unwrap())
        .collect();
    out.sort();
    out
}

/// The patches (entries with a chain) of checkpoint `m`'s first disk, sorted.
fn patches_of(store: &Store, m: &Manifest) -> Vec<ChunkId> {
    let index = &m.disks[0].index;
    let mut out = Vec::new();
    for page in 0..index.page_count() {
        let page = store.read_page_with_bases(index, page).unwrap();
        for (id, chain) in page.ids.iter().zip(&page.chains) {
            if !chain.is_empty() {
                out.push(*id);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Moves every patch file of the store aside (into `aside`), so that only whole chunks
/// and flat copies can be read; `put_back` undoes it.
fn move_patches(store: &Store, aside: &Path) -> Vec<(PathBuf, PathBuf)> {
    fs::create_dir_all(aside).unwrap();
    let moved: Vec<(PathBuf, PathBuf)> = kinds(store)
        .into_iter()
        .filter(|k| k.1 == 3)
        .map(|(id, _, _)| (store.chunk_path(&id), aside.join(id.to_hex())))
        .collect();
    for (from, to) in &moved {
        fs::rename(from, to).unwrap();
    }
    moved
}

fn put_back(moved: &[(PathBuf, PathBuf)]) {
    for (from, to) in moved {
        fs::rename(to, from).unwrap();
    }
}

#[test]
fn after_a_compaction_the_newest_checkpoint_reads_without_its_chains() {
    newest_reads_without_chains(false);
}

#[test]
fn an_encrypted_store_is_compacted_too() {
    newest_reads_without_chains(true);
}

fn newest_reads_without_chains(encrypted: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = mib_store(tmp.path(), encrypted);
    let chain = chain_of(&store, tmp.path(), if encrypted { 4 } else { 8 });
    let (newest, content) = chain.last().unwrap();
    let patches = patches_of(&store, newest);
    assert!(patches.len() >= 3, "{} patches", patches.len());
    let report = store.compact(&Control::new()).unwrap();
    assert_eq!(report.copies, patches.len() as u64, "{report:?}");
    assert_eq!(report.written, report.copies, "{report:?}");
    assert_eq!(report.unreadable, 0, "{report:?}");
    assert_eq!(flat_names(&store), patches);
    // Each flat copy holds a whole chunk's worth of content, compressed like a chunk.
    assert!(report.bytes_written > 0);

    // With every patch file gone, the newest checkpoint still reads back exactly (through
    // the object reader, and as a restore writes a new image), an older one no longer.
    let moved = move_patches(&store, &tmp.path().join("aside"));
    assert_eq!(
        &read_back(&store, &newest.disks[0].index, tmp.path()),
        content
    );
    let exported = tmp.path().join("exported.raw");
    crate::restore::export_disk(
        &store,
        newest,
        "vda",
        &exported,
        crate::restore::ImageFormat::Raw,
        &Control::new(),
    )
    .unwrap();
    assert_eq!(&fs::read(&exported).unwrap(), content);
    let older = &chain[chain.len() - 2].0;
    assert!(
        store
            .object_reader(&older.disks[0].index)
            .unwrap()
            .write_to_file(
                &File::create(tmp.path().join("older")).unwrap(),
                &Control::new()
            )
            .is_err(),
        "the older checkpoint needs its patches"
    );
    put_back(&moved);
    for (m, content) in &chain {
        assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), content);
    }
    // Compacting again has nothing to do.
    let again = store.compact(&Control::new()).unwrap();
    assert_eq!((again.written, again.removed), (0, 0), "{again:?}");
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.is_clean(), "{:?}", report.damaged);
}

#[test]
fn compaction_follows_the_newest_checkpoint_and_gc_drops_what_none_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = mib_store(tmp.path(), false);
    let mut chain = chain_of(&store, tmp.path(), 4);
    store.compact(&Control::new()).unwrap();
    let before = flat_names(&store);
    // One more incremental, over the same slots and others.
    let (last, mut content) = chain.last().cloned().unwrap();
    for at in [100_000, 3 * MIB + 7, 5 * MIB + 70_000] {
        content[at..at + 4096].fill(0xEE);
    }
    let newest = super::patches::checkpoint_content(&store, tmp.path(), 9, &content, Some(&last));
    chain.push((newest.clone(), content));
    let report = store.compact(&Control::new()).unwrap();
    let now = flat_names(&store);
    assert_eq!(now, patches_of(&store, &newest));
    assert!(report.written > 0, "{report:?}");
    let gone = before.iter().filter(|id| !now.contains(id)).count() as u64;
    assert!(
        gone > 0,
        "the slots changed again lost their old flat copies"
    );
    assert_eq!(report.removed, gone, "{report:?}");
    for (m, content) in &chain {
        assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), content);
    }
    // Without the newest checkpoint, garbage collection removes the flat copies of the
    // patches only it held; the rest read back.
    store
        .delete_checkpoint(&newest.vm.uuid, &newest.id)
        .unwrap();
    chain.pop();
    let gc = store.gc(&Control::new()).unwrap();
    let held: Vec<ChunkId> = chain
        .iter()
        .flat_map(|(m, _)| patches_of(&store, m))
        .collect();
    let left = flat_names(&store);
    assert!(left.iter().all(|id| held.contains(id)), "{left:?}");
    assert!(gc.flat_copies_removed > 0, "{gc:?}");
    for (m, content) in &chain {
        assert_eq!(&read_back(&store, &m.disks[0].index, tmp.path()), content);
    }
    // The next compaction follows the checkpoint that is now the newest.
    store.compact(&Control::new()).unwrap();
    assert_eq!(
        flat_names(&store),
        patches_of(&store, &chain.last().unwrap().0)
    );
}

#[test]
fn a_damaged_wrong_or_hostile_flat_copy_is_passed_over_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let store = mib_store(tmp.path(), false);
    let chain = chain_of(&store, tmp.path(), 6);
    let (newest, content) = chain.last().unwrap();
    store.compact(&Control::new()).unwrap();
    let names = flat_names(&store);
    assert!(names.len() >= 5, "{names:?}");
    let path = |id: &ChunkId| {
        let hex = id.to_hex();
        store.root().join("flat").join(&hex[..4]).join(hex)
    };
    // A flipped bit in one, another's bytes in a second, garbage in a third, and a link
    // to a file outside the store in place of a fourth.
    let mut bad = fs::read(path(&names[0])).unwrap();
    let at = bad.len() - 10;
    bad[at] ^= 1;
    fs::write(path(&names[0]), &bad).unwrap();
    fs::copy(path(&names[2]), path(&names[1])).unwrap();
    fs::write(path(&names[2]), b"not a flat copy").unwrap();
    let canary = tmp.path().join("canary");
    fs::write(&canary, b"thesis").unwrap();
    fs::remove_file(path(&names[3])).unwrap();
    std::os::unix::fs::symlink(&canary, path(&names[3])).unwrap();

    assert_eq!(
        &read_back(&store, &newest.disks[0].index, tmp.path()),
        content
    );
    // The next compaction writes anew those it can tell are wrong without reading them
    // whole; the link is replaced, not followed.
    let report = store.compact(&Control::new()).unwrap();
    assert_eq!(report.written, 3, "{report:?}");
    assert_eq!(fs::read(&canary).unwrap(), b"thesis");
    assert!(!path(&names[3]).is_symlink());
    assert_eq!(
        &read_back(&store, &newest.disks[0].index, tmp.path()),
        content
    );
    // The flipped bit is found by verification, which removes that flat copy (the store's
    // checkpoints are sound), and the next compaction writes it again.
    let verified = store.verify(false, &Control::new()).unwrap();
    assert!(verified.is_clean(), "{:?}", verified.damaged);
    assert_eq!(verified.flat_copies_removed, 1, "{verified:?}");
    assert!(!path(&names[0]).exists());
    assert_eq!(store.compact(&Control::new()).unwrap().written, 1);
    let verified = store.verify(false, &Control::new()).unwrap();
    assert_eq!(verified.flat_copies_removed, 0, "{verified:?}");
    // Anything in flat/ that is not a flat copy's name goes with the next compaction.
    let stray = store
        .root()
        .join("flat")
        .join(&names[4].to_hex()[..4])
        .join("stray");
    fs::write(&stray, b"x").unwrap();
    let report = store.compact(&Control::new()).unwrap();
    assert_eq!(report.removed, 1, "{report:?}");
    assert!(!stray.exists());
}
