//! A store is input that anyone may have written: links, devices and FIFOs planted in it
//! are refused, never followed, and nothing outside the store changes (issue 19).

use std::fmt::Write as _;
use std::os::unix::fs::{PermissionsExt, symlink};

use super::*;

/// A folder outside the store with files in it, and a digest of everything in it.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new(parent: &Path) -> Self {
        let dir = parent.join("canary");
        fs::create_dir_all(dir.join("inner")).unwrap();
        fs::write(dir.join("precious.txt"), "the user's thesis").unwrap();
        fs::write(dir.join("inner/notes"), noise(5, 10_000)).unwrap();
        // Named like what a store holds, to tempt whatever follows a link into here.
        fs::write(dir.join("chunk-1-1.tmp"), "not Rewind's").unwrap();
        fs::write(dir.join("store.lock"), "not Rewind's").unwrap();
        Self { dir }
    }

    /// Names, kinds, modes, lengths and contents of everything in the folder.
    fn digest(&self) -> String {
        fn walk(dir: &Path, out: &mut String) {
            let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
            entries.sort_by_key(fs::DirEntry::file_name);
            for entry in entries {
                let meta = fs::symlink_metadata(entry.path()).unwrap();
                writeln!(
                    out,
                    "{} {:o} {}",
                    entry.path().display(),
                    meta.permissions().mode(),
                    meta.len()
                )
                .unwrap();
                if meta.is_dir() {
                    walk(&entry.path(), out);
                } else if meta.is_file() {
                    out.push_str(&blake3::hash(&fs::read(entry.path()).unwrap()).to_hex());
                    out.push('\n');
                }
            }
        }
        let mut out = String::new();
        walk(&self.dir, &mut out);
        out
    }
}

/// A store with one checkpoint, a canary beside it, and the canary's digest.
fn store_and_canary(tmp: &Path) -> (Store, Manifest, Canary, String) {
    let store = Store::init(&tmp.join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp, "d.img", 7);
    let m = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    let canary = Canary::new(tmp);
    let digest = canary.digest();
    (store, m, canary, digest)
}

/// Replaces folder `rel` of the store with a link to the canary.
fn plant_link(store: &Store, rel: &str, canary: &Canary) {
    let path = store.root().join(rel);
    if path.is_dir() {
        fs::remove_dir_all(&path).unwrap();
    } else if path.exists() {
        fs::remove_file(&path).unwrap();
    }
    symlink(&canary.dir, &path).unwrap();
}

fn assert_refused(e: &StoreError, what: &str) {
    let text = e.to_string();
    assert!(
        matches!(e, StoreError::Refused { .. }),
        "{what}: not a refusal: {e:?}"
    );
    assert!(
        text.contains("touched nothing outside the store"),
        "{what}: {text}"
    );
}

#[test]
fn gc_through_a_linked_tmp_folder_is_refused_and_empties_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, canary, digest) = store_and_canary(tmp.path());
    plant_link(&store, "tmp", &canary);
    let err = store.gc(&Control::new()).unwrap_err();
    assert_refused(&err, "gc");
    assert!(err.to_string().contains("/s/tmp"), "names the link: {err}");
    assert_eq!(canary.digest(), digest);
}

#[test]
fn verify_never_writes_through_a_link_in_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, m, canary, digest) = store_and_canary(tmp.path());
    // A missing chunk makes verify note it in damaged/.
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    fs::remove_file(store.chunk_path(&id)).unwrap();
    plant_link(&store, "damaged", &canary);
    let err = store.verify(false, &Control::new()).unwrap_err();
    assert_refused(&err, "verify");
    assert_eq!(canary.digest(), digest);

    // A link named as the note itself, to a file outside.
    fs::remove_file(store.root().join("damaged")).unwrap();
    fs::create_dir(store.root().join("damaged")).unwrap();
    symlink(
        canary.dir.join("precious.txt"),
        store
            .root()
            .join(format!("damaged/{}-missing", id.to_hex())),
    )
    .unwrap();
    let outcome = store.verify(false, &Control::new());
    assert_eq!(canary.digest(), digest, "the thesis is not truncated");
    let err = outcome
        .err()
        .or_else(|| store.unhealed_damage(&m).err())
        .expect("the link is reported");
    assert_refused(&err, "verify's note");
}

#[test]
fn links_in_every_folder_of_a_store_are_refused() {
    for rel in ["chunks", "manifests", "locks", "damaged", "tmp"] {
        let tmp = tempfile::tempdir().unwrap();
        let (store, m, canary, digest) = store_and_canary(tmp.path());
        let root = store.root().to_path_buf();
        drop(store);
        plant_link_at(&root, rel, &canary);
        // Opening checks the folders; every use after that must refuse as well.
        let opened = Store::open(&root, None);
        let err = match opened {
            Err(e) => e,
            Ok(store) => {
                let results: Vec<Result<(), StoreError>> = vec![
                    store.catalog().map(drop),
                    store.gc(&Control::new()).map(drop),
                    store.verify(false, &Control::new()).map(drop),
                    read_all(&store, &m, tmp.path()),
                ];
                results
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_else(|| panic!("{rel}: nothing refused the link"))
            }
        };
        assert_refused(&err, rel);
        assert_eq!(canary.digest(), digest, "{rel}");
    }
}

fn plant_link_at(root: &Path, rel: &str, canary: &Canary) {
    let path = root.join(rel);
    fs::remove_dir_all(&path).unwrap();
    symlink(&canary.dir, &path).unwrap();
}

fn read_all(store: &Store, m: &Manifest, dir: &Path) -> Result<(), StoreError> {
    let out = dir.join("out");
    let file = File::create(&out).unwrap();
    store
        .object_reader(&m.disks[0].index)?
        .write_to_file(&file, &Control::new())
}

#[test]
fn a_linked_chunk_prefix_folder_or_chunk_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, m, canary, digest) = store_and_canary(tmp.path());
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    let chunk = store.chunk_path(&id);
    // The chunk file as a link to a copy of itself outside: well-formed, and still refused.
    let outside = canary.dir.join("copy");
    fs::copy(&chunk, &outside).unwrap();
    fs::remove_file(&chunk).unwrap();
    symlink(&outside, &chunk).unwrap();
    let digest_with_copy = canary.digest();
    let err = store.read_chunk(&id, ChunkKind::Data).unwrap_err();
    assert!(
        err.to_string().contains("symbolic link"),
        "says what it is: {err}"
    );
    let err = store.gc(&Control::new()).unwrap_err();
    assert_refused(&err, "gc over a linked chunk");
    assert_eq!(canary.digest(), digest_with_copy);
    fs::remove_file(&outside).unwrap();
    assert_eq!(canary.digest(), digest);

    // The prefix folder as a link.
    let prefix = chunk.parent().unwrap().to_path_buf();
    fs::remove_dir_all(&prefix).unwrap();
    symlink(&canary.dir, &prefix).unwrap();
    let err = store.read_chunk(&id, ChunkKind::Data).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_refused(&store.gc(&Control::new()).unwrap_err(), "gc");
    assert_eq!(canary.digest(), digest);
}

#[test]
fn a_linked_config_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, canary, digest) = store_and_canary(tmp.path());
    let root = store.root().to_path_buf();
    let config = root.join(config::CONFIG_FILE);
    fs::copy(&config, canary.dir.join("config")).unwrap();
    fs::remove_file(&config).unwrap();
    symlink(canary.dir.join("config"), &config).unwrap();
    let digest = {
        let _ = digest;
        canary.digest()
    };
    assert_refused(&Store::open(&root, None).unwrap_err(), "open");
    assert_refused(&Store::probe(&root).unwrap_err(), "probe");
    assert_eq!(canary.digest(), digest);
}

#[test]
fn fifos_and_devices_in_a_store_are_refused_without_blocking_or_opening() {
    use rustix::fs::{FileType, Mode, mknodat};
    let tmp = tempfile::tempdir().unwrap();
    let (store, m, canary, digest) = store_and_canary(tmp.path());
    // A FIFO among the leftovers in tmp/: opening it for reading would block forever.
    let fifo = store.root().join("tmp/chunk-9-9.tmp");
    mknodat(
        rustix::fs::CWD,
        &fifo,
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    assert_refused(&store.gc(&Control::new()).unwrap_err(), "gc over a FIFO");
    fs::remove_file(&fifo).unwrap();
    // A chunk replaced by a FIFO: reading it must not hang.
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    fs::remove_file(store.chunk_path(&id)).unwrap();
    mknodat(
        rustix::fs::CWD,
        store.chunk_path(&id),
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = store.read_chunk(&id, ChunkKind::Data).unwrap_err();
    assert!(err.to_string().contains("FIFO"), "{err}");
    fs::remove_file(store.chunk_path(&id)).unwrap();
    // A character device (/dev/null's numbers) as a manifest. Only root may make one.
    let manifest = store.root().join(format!(
        "manifests/{}/{}.manifest",
        m.vm.uuid.hyphenated(),
        m.id
    ));
    fs::remove_file(&manifest).unwrap();
    match mknodat(
        rustix::fs::CWD,
        &manifest,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    ) {
        Ok(()) => {
            let err = store.catalog().unwrap_err();
            assert_refused(&err, "a device as a manifest");
            assert!(err.to_string().contains("character device"), "{err}");
        }
        Err(e) => eprintln!("no device made ({e}): not root"),
    }
    assert_eq!(canary.digest(), digest);
}

#[test]
fn a_manifest_name_or_path_that_leaves_the_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, m, canary, digest) = store_and_canary(tmp.path());
    for id in ["../../canary/precious", "/etc/passwd", "..", ""] {
        let err = store.manifest(&m.vm.uuid, id).unwrap_err();
        assert!(
            !matches!(err, StoreError::NoSuchCheckpoint { .. }) || !id.contains('/'),
            "{id}: {err}"
        );
        assert!(store.delete_checkpoint(&m.vm.uuid, id).is_err(), "{id}");
    }
    assert_eq!(canary.digest(), digest);
}

#[test]
fn everything_a_store_holds_is_private_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _, _) = store_and_canary(tmp.path());
    // The lock's holder file exists only while a lock is held.
    let lock = StoreLock::acquire(store.root(), LockMode::Shared, "test", None).unwrap();
    let mut seen = 0;
    let mut stack = vec![store.root().to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                assert_eq!(
                    meta.permissions().mode() & 0o777,
                    0o600,
                    "{}",
                    path.display()
                );
                seen += 1;
            }
        }
    }
    drop(lock);
    assert!(seen > 8, "looked at {seen} files");
}

#[test]
fn a_chunk_gets_its_name_only_once_it_is_on_the_drive() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let data = noise(11, CHUNK as usize);
    let (id, added) = store.put_chunk(ChunkKind::Data, &data).unwrap();
    assert!(added > 0);
    assert!(
        !store.chunk_path(&id).exists(),
        "named before the commit flushed it"
    );
    let (_, again) = store.put_chunk(ChunkKind::Data, &data).unwrap();
    assert_eq!(again, 0, "written once per job");
    assert_eq!(
        fs::read_dir(store.root().join("tmp")).unwrap().count(),
        1,
        "one file under tmp/"
    );
    store.publish_chunks(&Control::new()).unwrap();
    assert!(store.chunk_path(&id).exists());
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    assert_eq!(store.read_chunk(&id, ChunkKind::Data).unwrap(), data);
}

/// Rewrites the store's `rewind-store.json` through `edit` of its JSON.
fn edit_header(root: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = root.join(config::CONFIG_FILE);
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

fn encrypted_store_with_a_checkpoint(tmp: &Path) -> (PathBuf, Manifest) {
    let root = tmp.join("enc");
    let store = Store::init(&root, &encrypted_options("pass")).unwrap();
    assert!(store.config().mac_hex.is_some(), "a new header has its MAC");
    let (image, _) = make_image(tmp, "d.img", 3);
    let m = checkpoint_file(&store, vm("secret-vm", 4), 0, &image, None);
    (root, m)
}

#[test]
fn a_changed_encrypted_header_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _) = encrypted_store_with_a_checkpoint(tmp.path());
    let original = fs::read(root.join(config::CONFIG_FILE)).unwrap();
    let edits: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>)> = vec![
        (
            "chunk size",
            Box::new(|j| j["chunk_size_bytes"] = (CHUNK * 2).into()),
        ),
        ("version", Box::new(|j| j["version"] = 1.into())),
        (
            "creation time",
            Box::new(|j| j["created"] = "2020-01-01T00:00:00Z".into()),
        ),
        (
            "KDF cost",
            Box::new(|j| {
                let now = j["encryption"]["kdf_iterations"].as_u64().unwrap();
                j["encryption"]["kdf_iterations"] = (now + 1).into();
            }),
        ),
        ("MAC", Box::new(|j| j["mac_hex"] = "00".repeat(32).into())),
        ("MAC length", Box::new(|j| j["mac_hex"] = "abc".into())),
    ];
    for (what, edit) in edits {
        fs::write(root.join(config::CONFIG_FILE), &original).unwrap();
        edit_header(&root, edit);
        let chunks_before = fs::read_dir(root.join("chunks")).unwrap().count();
        match Store::open(&root, Some(b"pass")) {
            Err(e @ StoreError::HeaderTampered { .. }) => {
                assert!(e.to_string().contains("writes nothing"), "{what}: {e}");
            }
            // A changed KDF cost changes the key the passphrase gives: the key does not
            // open, which is refused just as well.
            Err(StoreError::WrongPassphrase { .. }) if what == "KDF cost" => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(
            fs::read_dir(root.join("chunks")).unwrap().count(),
            chunks_before
        );
    }
    fs::write(root.join(config::CONFIG_FILE), &original).unwrap();
    Store::open(&root, Some(b"pass")).unwrap();
}

#[test]
fn a_header_downgraded_to_plaintext_never_gets_plaintext_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _) = encrypted_store_with_a_checkpoint(tmp.path());
    edit_header(&root, |j| {
        j["encryption"] = serde_json::Value::Null;
        j.as_object_mut().unwrap().remove("mac_hex");
    });
    // With the passphrase (flag, environment or configuration): refused at once.
    let err = Store::open(&root, Some(b"pass")).unwrap_err();
    assert!(matches!(err, StoreError::NotEncrypted { .. }), "{err:?}");
    // Without: it opens (it says it is plain), but nothing is written into it.
    let store = Store::open(&root, None).unwrap();
    let chunks_before = chunk_files(&store);
    let (image, _) = make_image(tmp.path(), "e.img", 9);
    let control = Control::new();
    let err = store
        .begin_checkpoint(new_checkpoint(vm("secret-vm", 4), 1), &control)
        .map(drop)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::EncryptedContent { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("plaintext"), "{err}");
    assert_eq!(chunk_files(&store), chunks_before);
    let _ = image;

    // With no manifest left, an encrypted chunk gives it away just as well.
    fs::remove_dir_all(root.join("manifests")).unwrap();
    fs::create_dir(root.join("manifests")).unwrap();
    let err = store
        .begin_checkpoint(new_checkpoint(vm("secret-vm", 4), 1), &control)
        .map(drop)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::EncryptedContent { .. }),
        "{err:?}"
    );
    assert_eq!(chunk_files(&store), chunks_before);
}

#[test]
fn a_passphrase_for_a_plain_store_is_an_error_not_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _, _) = store_and_canary(tmp.path());
    let err = Store::open(store.root(), Some(b"pass")).unwrap_err();
    assert!(matches!(err, StoreError::NotEncrypted { .. }), "{err:?}");
}

#[test]
fn a_header_whose_mac_was_removed_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _) = encrypted_store_with_a_checkpoint(tmp.path());
    edit_header(&root, |j| {
        j.as_object_mut().unwrap().remove("mac_hex");
        j["chunk_size_bytes"] = (CHUNK * 2).into();
    });
    let err = Store::open(&root, Some(b"pass")).unwrap_err();
    assert!(
        matches!(&err, StoreError::HeaderTampered { detail, .. } if detail.contains("removed")),
        "{err:?}"
    );
}

#[test]
fn an_encrypted_header_from_before_macs_is_accepted_and_gets_its_mac_when_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, m) = encrypted_store_with_a_checkpoint(tmp.path());
    // As an older Rewind made it: the key wrapped with the store's ID alone, and no MAC.
    {
        let store = Store::open(&root, Some(b"pass")).unwrap();
        let keys = store.keys.as_ref().unwrap();
        let legacy = keys
            .wrap(
                b"pass",
                store.config().id.as_bytes(),
                KdfCost::FAST_FOR_TESTS,
            )
            .unwrap();
        let mut config = store.config().clone();
        config.encryption = Some(legacy);
        config.mac_hex = None;
        fs::write(root.join(config::CONFIG_FILE), config.to_json()).unwrap();
    }
    assert!(Store::probe(&root).unwrap().mac_hex.is_none());
    let store = Store::open(&root, Some(b"pass")).unwrap();
    assert!(
        store.config().mac_hex.is_some(),
        "given its MAC when opened"
    );
    let on_disk = Store::probe(&root).unwrap();
    assert!(on_disk.mac_hex.is_some(), "and written");
    let (image, _) = make_image(tmp.path(), "d.img", 3);
    checkpoint_file(&store, vm("secret-vm", 4), 1, &image, Some(&m));
    // From then on its MAC can be neither changed nor removed.
    let header = fs::read(root.join(config::CONFIG_FILE)).unwrap();
    edit_header(&root, |j| j["chunk_size_bytes"] = (CHUNK * 2).into());
    assert!(matches!(
        Store::open(&root, Some(b"pass")),
        Err(StoreError::HeaderTampered { .. })
    ));
    fs::write(root.join(config::CONFIG_FILE), &header).unwrap();
    edit_header(&root, |j| {
        j.as_object_mut().unwrap().remove("mac_hex");
    });
    assert!(matches!(
        Store::open(&root, Some(b"pass")),
        Err(StoreError::HeaderTampered { .. })
    ));
}

#[test]
fn lock_files_of_an_encrypted_store_do_not_name_the_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _) = encrypted_store_with_a_checkpoint(tmp.path());
    let store = Store::open(&root, Some(b"pass")).unwrap();
    let control = Control::new();
    let writer = store
        .begin_checkpoint(new_checkpoint(vm("secret-vm", 4), 5), &control)
        .unwrap();
    let mut seen = 0;
    for entry in fs::read_dir(root.join("locks")).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("secret-vm"), "{text}");
        seen += 1;
    }
    assert!(seen >= 2, "the lock and a holder file");
    drop(writer);
}

/// One crafted store of the corpus: what is done to a copy of a sound store, what Rewind is
/// then asked to do with it, and words its error must contain.
struct Crafted {
    name: &'static str,
    /// Made from the encrypted store (passphrase "pass") rather than the plain one.
    encrypted: bool,
    craft: Box<dyn Fn(&Path, &Manifest, &Canary)>,
    action: Action,
    says: &'static [&'static str],
}

#[derive(Clone, Copy, Debug)]
enum Action {
    /// Open the store and list it.
    Open,
    /// Open it with a passphrase and list it.
    OpenWith(&'static str),
    /// Read every checkpoint's first disk back.
    Read,
    /// Verify it (reading everything).
    Verify,
    /// Collect garbage.
    Gc,
    /// Begin a new checkpoint.
    Write,
}

fn run(root: &Path, action: Action, tmp: &Path) -> Result<(), StoreError> {
    let pass = match action {
        Action::OpenWith(p) => Some(p.as_bytes()),
        _ => None,
    };
    let store = Store::open(root, pass)?;
    let catalog = store.catalog()?;
    match action {
        Action::Open | Action::OpenWith(_) => match catalog.unreadable.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        },
        Action::Read => {
            if let Some((_, e)) = catalog.unreadable.into_iter().next() {
                return Err(e);
            }
            for m in &catalog.checkpoints {
                read_all(&store, m, tmp)?;
            }
            Ok(())
        }
        Action::Verify => {
            let report = store.verify(false, &Control::new())?;
            match (report.damaged.first(), report.unreadable_manifests.first()) {
                (Some(d), _) => Err(StoreError::Invalid(format!(
                    "verify: chunk {} {}",
                    d.chunk, d.problem
                ))),
                (None, Some((path, e))) => Err(StoreError::Invalid(format!(
                    "verify: {} {e}",
                    path.display()
                ))),
                (None, None) => Ok(()),
            }
        }
        Action::Gc => store.gc(&Control::new()).map(drop),
        Action::Write => store
            .begin_checkpoint(new_checkpoint(vm("a", 1), 30), &Control::new())
            .map(drop),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn manifest_file(root: &Path, m: &Manifest) -> PathBuf {
    root.join(format!(
        "manifests/{}/{}.manifest",
        m.vm.uuid.hyphenated(),
        m.id
    ))
}

fn edit_manifest(root: &Path, m: &Manifest, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = manifest_file(root, m);
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
}

/// The first data chunk of `m`'s first disk, and the file of its first index page.
fn first_chunk(root: &Path, m: &Manifest) -> (PathBuf, PathBuf) {
    let store = Store::open(root, None).unwrap();
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    let page = m.disks[0].index.pages[0].unwrap();
    (store.chunk_path(&id), store.chunk_path(&page))
}

fn replace_with_link(path: &Path, to: &Path) {
    if path.is_dir() {
        fs::remove_dir_all(path).unwrap();
    } else {
        fs::remove_file(path).unwrap();
    }
    symlink(to, path).unwrap();
}

fn replace_with_fifo(path: &Path) {
    fs::remove_file(path).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

#[allow(clippy::too_many_lines)] // the corpus, one entry per crafted store
fn corpus() -> Vec<Crafted> {
    let link_folder = |rel: &'static str, action: Action| Crafted {
        name: rel,
        encrypted: false,
        craft: Box::new(move |root, _, canary| replace_with_link(&root.join(rel), &canary.dir)),
        action,
        says: &["symbolic link", "touched nothing outside the store"],
    };
    let header = |name, edit: fn(&mut serde_json::Value), says: &'static [&'static str]| Crafted {
        name,
        encrypted: false,
        craft: Box::new(move |root, _, _| edit_header(root, edit)),
        action: Action::Open,
        says,
    };
    let manifest =
        |name, edit: fn(&mut serde_json::Value), says: &'static [&'static str]| Crafted {
            name,
            encrypted: false,
            craft: Box::new(move |root, m, _| edit_manifest(root, m, edit)),
            action: Action::Open,
            says,
        };
    vec![
        link_folder("tmp", Action::Gc),
        link_folder("damaged", Action::Verify),
        link_folder("chunks", Action::Open),
        link_folder("manifests", Action::Open),
        link_folder("locks", Action::Write),
        Crafted {
            name: "a linked chunk prefix folder",
            encrypted: false,
            craft: Box::new(|root, m, canary| {
                let (chunk, _) = first_chunk(root, m);
                replace_with_link(chunk.parent().unwrap(), &canary.dir);
            }),
            action: Action::Read,
            says: &["symbolic link"],
        },
        Crafted {
            name: "an extra linked chunk prefix folder",
            encrypted: false,
            craft: Box::new(|root, _, canary| {
                symlink(&canary.dir, root.join("chunks/ffff")).unwrap();
            }),
            action: Action::Gc,
            says: &["symbolic link", "chunks/ffff"],
        },
        Crafted {
            name: "a chunk linked to a file outside",
            encrypted: false,
            craft: Box::new(|root, m, canary| {
                let (chunk, _) = first_chunk(root, m);
                replace_with_link(&chunk, &canary.dir.join("precious.txt"));
            }),
            action: Action::Read,
            says: &["symbolic link"],
        },
        Crafted {
            name: "a linked VM folder of manifests",
            encrypted: false,
            craft: Box::new(|root, m, canary| {
                let dir = manifest_file(root, m).parent().unwrap().to_path_buf();
                replace_with_link(&dir, &canary.dir);
            }),
            action: Action::Open,
            says: &["symbolic link"],
        },
        Crafted {
            name: "a linked manifest",
            encrypted: false,
            craft: Box::new(|root, m, canary| {
                replace_with_link(&manifest_file(root, m), &canary.dir.join("precious.txt"));
            }),
            action: Action::Open,
            says: &["symbolic link"],
        },
        Crafted {
            name: "a linked header",
            encrypted: false,
            craft: Box::new(|root, _, canary| {
                fs::copy(
                    root.join(config::CONFIG_FILE),
                    canary.dir.join("inner/header"),
                )
                .unwrap();
                replace_with_link(
                    &root.join(config::CONFIG_FILE),
                    &canary.dir.join("inner/header"),
                );
            }),
            action: Action::Open,
            says: &["symbolic link"],
        },
        Crafted {
            name: "a FIFO among the leftovers",
            encrypted: false,
            craft: Box::new(|root, _, _| {
                fs::write(root.join("tmp/x.tmp"), b"").unwrap();
                replace_with_fifo(&root.join("tmp/x.tmp"));
            }),
            action: Action::Gc,
            says: &["FIFO"],
        },
        Crafted {
            name: "a FIFO as a chunk",
            encrypted: false,
            craft: Box::new(|root, m, _| replace_with_fifo(&first_chunk(root, m).0)),
            action: Action::Read,
            says: &["FIFO"],
        },
        Crafted {
            name: "a FIFO as a manifest",
            encrypted: false,
            craft: Box::new(|root, m, _| replace_with_fifo(&manifest_file(root, m))),
            action: Action::Open,
            says: &["FIFO"],
        },
        header(
            "a newer version",
            |j| j["version"] = 999.into(),
            &["newer", "update Rewind"],
        ),
        header("version 0", |j| j["version"] = 0.into(), &["version is 0"]),
        header(
            "another format",
            |j| j["format"] = "borg".into(),
            &["format"],
        ),
        header(
            "a chunk size that is no power of two",
            |j| j["chunk_size_bytes"] = 1_000_000.into(),
            &["power of two"],
        ),
        header(
            "a huge chunk size",
            |j| j["chunk_size_bytes"] = (1u64 << 40).into(),
            &["rewind-store.json", "damaged"],
        ),
        Crafted {
            name: "a truncated header",
            encrypted: false,
            craft: Box::new(|root, _, _| {
                let path = root.join(config::CONFIG_FILE);
                let bytes = fs::read(&path).unwrap();
                fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            }),
            action: Action::Open,
            says: &["rewind-store.json", "damaged"],
        },
        Crafted {
            name: "a header of 100 MiB",
            encrypted: false,
            craft: Box::new(|root, _, _| {
                let file = File::create(root.join(config::CONFIG_FILE)).unwrap();
                file.set_len(100 << 20).unwrap();
            }),
            action: Action::Open,
            says: &["more than the"],
        },
        manifest(
            "a disk of 2^62 bytes",
            |j| j["disks"][0]["index"]["size_bytes"] = (1u64 << 62).into(),
            &["damaged"],
        ),
        manifest(
            "a page count that does not match the size",
            |j| {
                let pages = j["disks"][0]["index"]["pages"].as_array_mut().unwrap();
                let first = pages[0].clone();
                pages.extend(std::iter::repeat_n(first, 10_000));
            },
            &["damaged"],
        ),
        manifest(
            "a disk target leaving the store",
            |j| j["disks"][0]["target"] = "../../etc".into(),
            &["damaged"],
        ),
        manifest(
            "a blob name that is an absolute path",
            |j| j["blobs"][0]["name"] = "/etc/passwd".into(),
            &["damaged"],
        ),
        manifest(
            "an id that is not its file's",
            |j| j["id"] = "../../../canary/precious".into(),
            &["damaged"],
        ),
        manifest(
            "another VM's UUID",
            |j| j["vm"]["uuid"] = Uuid::from_bytes([9; 16]).to_string().into(),
            &["damaged", "not what its file name says"],
        ),
        Crafted {
            name: "a manifest of 100 MiB",
            encrypted: false,
            craft: Box::new(|root, m, _| {
                File::create(manifest_file(root, m))
                    .unwrap()
                    .set_len(100 << 20)
                    .unwrap();
            }),
            action: Action::Open,
            says: &["more than the"],
        },
        Crafted {
            name: "a truncated chunk",
            encrypted: false,
            craft: Box::new(|root, m, _| {
                let (chunk, _) = first_chunk(root, m);
                let bytes = fs::read(&chunk).unwrap();
                fs::write(&chunk, &bytes[..bytes.len() / 3]).unwrap();
            }),
            action: Action::Read,
            says: &["chunk", "verify"],
        },
        Crafted {
            name: "a chunk whose header claims 4 GiB",
            encrypted: false,
            craft: Box::new(|root, m, _| {
                let (chunk, _) = first_chunk(root, m);
                let mut bytes = fs::read(&chunk).unwrap();
                bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                fs::write(&chunk, &bytes).unwrap();
            }),
            action: Action::Read,
            says: &["chunk"],
        },
        Crafted {
            name: "a truncated index page",
            encrypted: false,
            craft: Box::new(|root, m, _| {
                let (_, page) = first_chunk(root, m);
                let bytes = fs::read(&page).unwrap();
                fs::write(&page, &bytes[..20]).unwrap();
            }),
            action: Action::Read,
            says: &["chunk"],
        },
        Crafted {
            name: "an encrypted store's header downgraded to plain, opened with its passphrase",
            encrypted: true,
            craft: Box::new(|root, _, _| {
                edit_header(root, |j| j["encryption"] = serde_json::Value::Null);
            }),
            action: Action::OpenWith("pass"),
            says: &["not encrypted", "nothing was written"],
        },
        Crafted {
            name: "an encrypted store's header downgraded to plain, written to",
            encrypted: true,
            craft: Box::new(|root, _, _| {
                edit_header(root, |j| {
                    j["encryption"] = serde_json::Value::Null;
                    j.as_object_mut().unwrap().remove("mac_hex");
                });
            }),
            action: Action::Write,
            says: &["plaintext"],
        },
        Crafted {
            name: "an encrypted store's header with another chunk size",
            encrypted: true,
            craft: Box::new(|root, _, _| {
                edit_header(root, |j| j["chunk_size_bytes"] = (CHUNK * 4).into());
            }),
            action: Action::OpenWith("pass"),
            says: &["fails its check", "writes nothing"],
        },
        Crafted {
            name: "an encrypted store's manifest swapped for another's",
            encrypted: true,
            craft: Box::new(|root, m, _| {
                let dir = manifest_file(root, m).parent().unwrap().to_path_buf();
                let mut files: Vec<PathBuf> = fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                files.sort();
                fs::copy(&files[1], &files[0]).unwrap();
            }),
            action: Action::OpenWith("pass"),
            says: &["fails authentication"],
        },
        Crafted {
            name: "a chunk with another chunk's content",
            encrypted: false,
            craft: Box::new(|root, m, _| {
                let (chunk, page) = first_chunk(root, m);
                fs::copy(page, chunk).unwrap();
            }),
            action: Action::Verify,
            says: &["verify: chunk"],
        },
    ]
}

#[test]
fn a_corpus_of_hostile_stores_is_refused_with_clear_errors_and_touches_nothing_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let m = {
        let store = Store::init(&base, &options()).unwrap();
        let (image, _) = make_image(tmp.path(), "d.img", 21);
        let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
        checkpoint_file(&store, vm("a", 1), 1, &image, Some(&first));
        first
    };
    let encrypted = tmp.path().join("encrypted");
    let m_encrypted = {
        let store = Store::init(&encrypted, &encrypted_options("pass")).unwrap();
        let (image, _) = make_image(tmp.path(), "e.img", 22);
        let first = checkpoint_file(&store, vm("a", 1), 0, &image, None);
        checkpoint_file(&store, vm("a", 1), 1, &image, Some(&first));
        first
    };
    let corpus = corpus();
    assert!(corpus.len() >= 25, "{} crafted stores", corpus.len());
    let mut failures = Vec::new();
    for (n, crafted) in corpus.iter().enumerate() {
        let case = tmp.path().join(format!("case-{n}"));
        let root = case.join("store");
        let (from, m) = if crafted.encrypted {
            (&encrypted, &m_encrypted)
        } else {
            (&base, &m)
        };
        copy_tree(from, &root);
        let canary = Canary::new(&case);
        (crafted.craft)(&root, m, &canary);
        let digest = canary.digest();
        let outcome = run(&root, crafted.action, &case);
        let text = match &outcome {
            Ok(()) => "no error".to_owned(),
            Err(e) => e.to_string(),
        };
        eprintln!("{}: {text}", crafted.name);
        if outcome.is_ok() || !crafted.says.iter().all(|w| text.contains(w)) {
            failures.push(format!("{} ({:?}): {text}", crafted.name, crafted.action));
        }
        if canary.digest() != digest {
            failures.push(format!(
                "{}: the canary outside the store changed",
                crafted.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_shares_of_a_rotating_check_cover_every_chunk_once_and_find_damage_in_theirs() {
    use super::super::verify::share_of;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(&tmp.path().join("s"), &options()).unwrap();
    let (image, _) = make_image(tmp.path(), "d.img", 31);
    let m = checkpoint_file(&store, vm("a", 1), 0, &image, None);
    let full = store.verify(false, &Control::new()).unwrap();
    let of = crate::policy::VERIFY_SHARES;
    let pages = m
        .indexes()
        .map(|i| i.pages.iter().flatten().count() as u64)
        .sum::<u64>();
    let mut data_checked = 0;
    let mut bytes = 0;
    for k in 0..of {
        let report = store.verify_share(k, of, &Control::new()).unwrap();
        assert!(report.is_clean());
        assert_eq!(report.share, Some((k, of)));
        data_checked += report.chunks_checked - pages;
        bytes += report.bytes_checked;
    }
    assert_eq!(
        data_checked,
        full.chunks_checked - pages,
        "each data chunk once"
    );
    assert_eq!(bytes, full.bytes_checked);
    assert!(store.verify_share(of, of, &Control::new()).is_err());

    // A flipped bit in one chunk: only its share's run finds it.
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    let path = store.chunk_path(&id);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let mine = share_of(&id, of);
    let other = (mine + 1) % of;
    assert!(
        store
            .verify_share(other, of, &Control::new())
            .unwrap()
            .is_clean()
    );
    let found = store.verify_share(mine, of, &Control::new()).unwrap();
    assert_eq!(found.damaged.len(), 1, "{found:?}");
    assert_eq!(found.broken_checkpoints()[0].id, m.id);
}
