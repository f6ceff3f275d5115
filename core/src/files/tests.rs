//! Browsing, searching, restoring and comparing the files of checkpoints in a real store,
//! of disks made by the real tools (sgdisk, mkfs.ext4 -d) without mounting.

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::browse::{Browser, VolumeRef};
use super::changes::{ChangeKind, changes};
use super::{EntryKind, FilesError, TreeError};
use crate::progress::Control;
use crate::store::Store;
use crate::store::tests::{checkpoint_file, noise, options, vm};

fn tools() -> bool {
    let ok = ["sgdisk", "mkfs.ext4"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !ok {
        eprintln!("skipped: sgdisk (gdisk) or mkfs.ext4 (e2fsprogs) is not installed");
    }
    ok
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn set_mtime(path: &Path, seconds: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(seconds))
        .unwrap();
}

/// A GPT disk of 48 MiB whose partition 1 ("data", ext4) holds `src`.
fn gpt_ext4_disk(dir: &Path, src: &Path) -> PathBuf {
    let image = dir.join("disk.img");
    if image.exists() {
        std::fs::remove_file(&image).unwrap();
    }
    std::fs::File::create(&image)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+40M", "-t", "1:8300", "-c", "1:linux data"])
        .arg(&image));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data", "-E", "offset=1048576", "-d"])
        .arg(src)
        .arg(&image)
        .arg("40M"));
    image
}

/// The source tree: names, a deep folder, a link, a sparse file, random content.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    let deep = src.join("Users/me/Documents/a/b/c/d/e");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("thesis.docx"), noise(1, 3_000_000)).unwrap();
    std::fs::write(src.join("Users/me/Documents/notes.txt"), b"remember").unwrap();
    std::fs::write(
        src.join("Users/me/Größe – ünïcødé ✓ long name that goes on and on and on.txt"),
        b"unicode",
    )
    .unwrap();
    let sparse = std::fs::File::create(src.join("Users/me/sparse.img")).unwrap();
    sparse.set_len(20 << 20).unwrap();
    sparse.write_all_at(b"middle", 10 << 20).unwrap();
    drop(sparse);
    symlink("Documents/notes.txt", src.join("Users/me/link")).unwrap();
    for (i, path) in walk(&src).iter().enumerate() {
        if !path.is_symlink() {
            set_mtime(path, 1_700_000_000 + i as u64 * 1000);
        }
    }
    src
}

use std::os::unix::fs::FileExt;

/// Every path below `root`, deepest first (so that folders' times are set last).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn names(path: &str) -> Vec<String> {
    path.split('/').map(str::to_owned).collect()
}

/// Asserts that `restored` holds what `original` holds: names, kinds, bytes, link
/// targets, and modification times.
fn assert_same_tree(original: &Path, restored: &Path) {
    let mut a: Vec<PathBuf> = walk(original)
        .iter()
        .map(|p| p.strip_prefix(original).unwrap().to_path_buf())
        .collect();
    let mut b: Vec<PathBuf> = walk(restored)
        .iter()
        .map(|p| p.strip_prefix(restored).unwrap().to_path_buf())
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the restored tree has other names");
    for rel in a {
        let (o, r) = (original.join(&rel), restored.join(&rel));
        let (om, rm) = (
            std::fs::symlink_metadata(&o).unwrap(),
            std::fs::symlink_metadata(&r).unwrap(),
        );
        assert_eq!(om.file_type(), rm.file_type(), "{rel:?}");
        if om.is_symlink() {
            assert_eq!(
                std::fs::read_link(&o).unwrap(),
                std::fs::read_link(&r).unwrap()
            );
            continue;
        }
        assert_eq!(om.mtime(), rm.mtime(), "modification time of {rel:?}");
        if om.is_file() {
            assert!(
                std::fs::read(&o).unwrap() == std::fs::read(&r).unwrap(),
                "content of {rel:?}"
            );
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one story: list, find, restore, refuse, cancel
fn files_are_listed_found_and_restored_with_their_bytes_times_and_holes() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(tmp.path());
    let image = gpt_ext4_disk(tmp.path(), &src);
    let store = Arc::new(Store::init(&tmp.path().join("store"), &options()).unwrap());
    let m = checkpoint_file(&store, vm("linux", 1), 0, &image, None);
    let mut browser = Browser::open(store.clone(), m).unwrap();

    // Volumes, by number, label, GPT name and disk target; a wrong name says what there is.
    let p1 = VolumeRef { disk: 0, number: 1 };
    for path in [
        "p1",
        "data",
        "DATA",
        "linux data",
        "vda/p1",
        "/p1/",
        "vda/data",
    ] {
        assert_eq!(browser.resolve(path).unwrap().volume, p1, "{path}");
    }
    assert_eq!(
        browser.resolve("data/Users/me").unwrap().names,
        names("Users/me")
    );
    let err = browser.resolve("p9/x").unwrap_err();
    assert!(matches!(err, FilesError::NoVolume { .. }));
    assert!(err.to_string().contains("p1 (data)"), "{err}");

    // A listing: folders first, sizes, kinds, times.
    let me = browser.resolve("data/Users/me").unwrap();
    let listed = browser.list(&me).unwrap();
    let shown: Vec<(&str, EntryKind)> = listed.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(shown[0], ("Documents", EntryKind::Folder));
    assert!(shown.contains(&("link", EntryKind::Symlink)));
    let sparse = listed.iter().find(|e| e.name == "sparse.img").unwrap();
    assert_eq!(sparse.size_bytes, 20 << 20);
    let original = std::fs::metadata(src.join("Users/me/sparse.img")).unwrap();
    assert_eq!(
        sparse.modified.unwrap().seconds,
        original.mtime(),
        "the modification time in the listing"
    );
    assert!(matches!(
        browser.list(&browser.resolve("data/Users/nobody").unwrap()),
        Err(FilesError::Tree {
            source: TreeError::NotFound { .. },
            ..
        })
    ));

    // Search below a folder, by piece and by pattern.
    let control = Control::new();
    let root = browser.resolve("data").unwrap();
    let (found, errors) = browser.find(&root, "THESIS", &control).unwrap();
    assert!(errors.is_empty());
    let paths: Vec<&str> = found.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["p1/Users/me/Documents/a/b/c/d/e/thesis.docx"]);
    let (found, _) = browser.find(&root, "*.txt", &control).unwrap();
    assert_eq!(found.len(), 2);

    // Restore a folder and a file: bytes, times, links; holes stay holes.
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let paths = [
        browser.resolve("p1/Users/me").unwrap(),
        browser
            .resolve("p1/Users/me/Documents/a/b/c/d/e/thesis.docx")
            .unwrap(),
    ];
    let control = Control::new();
    let done = browser.restore(&paths, &out, &control).unwrap();
    assert_eq!(done.written, [out.join("me"), out.join("thesis.docx")]);
    assert!(done.skipped.is_empty(), "{:?}", done.skipped);
    assert_eq!(done.links, 1);
    assert_same_tree(&src.join("Users/me"), &out.join("me"));
    assert_eq!(
        std::fs::read(out.join("thesis.docx")).unwrap(),
        noise(1, 3_000_000)
    );
    let restored_sparse = std::fs::metadata(out.join("me/sparse.img")).unwrap();
    assert!(
        restored_sparse.blocks() * 512 < 1 << 20,
        "the sparse file takes {} bytes on disk",
        restored_sparse.blocks() * 512
    );
    let (done_bytes, total_bytes) = control.progress_bytes();
    assert_eq!(done_bytes, total_bytes);
    assert_eq!(done.bytes, total_bytes);

    // Nothing is written over, and nothing is left behind by a refused restore.
    let before = walk(&out);
    let err = browser
        .restore(&paths[1..], &out, &Control::new())
        .unwrap_err();
    assert!(matches!(err, FilesError::Exists { .. }), "{err}");
    assert_eq!(walk(&out), before);

    // A cancelled restore leaves the folder as it was.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let control = Control::new();
    control.cancel();
    let err = browser.restore(&paths, &other, &control).unwrap_err();
    assert!(
        matches!(
            err,
            FilesError::Tree {
                source: TreeError::Cancelled(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);
}

#[test]
fn changes_name_exactly_the_files_added_changed_and_deleted() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(tmp.path());
    let image = gpt_ext4_disk(tmp.path(), &src);
    let store = Arc::new(Store::init(&tmp.path().join("store"), &options()).unwrap());
    let first = checkpoint_file(&store, vm("linux", 1), 0, &image, None);

    // Change one file, delete one, delete a folder with a file, add one.
    let docs = src.join("Users/me/Documents");
    std::fs::write(docs.join("notes.txt"), b"remember more").unwrap();
    std::fs::remove_file(src.join("Users/me/sparse.img")).unwrap();
    std::fs::remove_dir_all(docs.join("a/b/c/d")).unwrap();
    std::fs::write(src.join("Users/me/new.txt"), b"new").unwrap();
    let image = gpt_ext4_disk(tmp.path(), &src);
    let second = checkpoint_file(&store, vm("linux", 1), 1, &image, Some(&first));

    let mut old = Browser::open(store.clone(), first).unwrap();
    let mut new = Browser::open(store.clone(), second).unwrap();
    let (found, errors) = changes(&mut old, &mut new, &Control::new()).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let mut got: Vec<(String, ChangeKind)> =
        found.iter().map(|c| (c.path.clone(), c.change)).collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("p1/Users/me/Documents/a/b/c/d", ChangeKind::Deleted),
        ("p1/Users/me/Documents/a/b/c/d/e", ChangeKind::Deleted),
        (
            "p1/Users/me/Documents/a/b/c/d/e/thesis.docx",
            ChangeKind::Deleted,
        ),
        ("p1/Users/me/Documents/notes.txt", ChangeKind::Modified),
        ("p1/Users/me/new.txt", ChangeKind::Added),
        ("p1/Users/me/sparse.img", ChangeKind::Deleted),
    ];
    let want: Vec<(String, ChangeKind)> = want.iter().map(|(p, c)| ((*p).to_owned(), *c)).collect();
    assert_eq!(got, want);
}

/// A disk whose volume holds `Users/me` of [`source_tree`], checkpointed, and a browser
/// on it.
fn restorable(tmp: &Path) -> (PathBuf, Browser) {
    let src = source_tree(tmp);
    let image = gpt_ext4_disk(tmp, &src);
    let store = Arc::new(Store::init(&tmp.join("store"), &options()).unwrap());
    let m = checkpoint_file(&store, vm("linux", 1), 0, &image, None);
    (src, Browser::open(store, m).unwrap())
}

#[test]
fn a_restore_never_follows_a_link_in_place_of_the_target_or_its_temporary_folder() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, mut browser) = restorable(tmp.path());
    let me = [browser.resolve("p1/Users/me").unwrap()];
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();

    // A target folder that is a link is refused, and nothing is written where it points.
    let link = tmp.path().join("link");
    symlink(&elsewhere, &link).unwrap();
    let err = browser.restore(&me, &link, &Control::new()).unwrap_err();
    assert!(
        matches!(&err, FilesError::Output { path, .. } if *path == link),
        "{err}"
    );
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A link where the temporary folder's name would be is left alone, not written
    // through; so is a link where the restored folder's name would be.
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let staging = out.join(format!(".rewind-restore-{}-0", std::process::id()));
    symlink(&elsewhere, &staging).unwrap();
    symlink(&elsewhere, out.join("taken")).unwrap();
    let done = browser.restore(&me, &out, &Control::new()).unwrap();
    assert_eq!(done.written, [out.join("me")]);
    assert_same_tree(&src.join("Users/me"), &out.join("me"));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert_eq!(std::fs::read_link(&staging).unwrap(), elsewhere);
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left.len(), 3, "{left:?}");
    std::fs::remove_dir_all(out.join("me")).unwrap();
    std::fs::remove_file(out.join("taken")).unwrap();
    std::fs::rename(out.join(&staging), out.join("me")).unwrap();
    let err = browser.restore(&me, &out, &Control::new()).unwrap_err();
    assert!(matches!(err, FilesError::Exists { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn a_restore_for_a_user_gives_them_everything_and_goes_only_where_they_may_write() {
    if !tools() || !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root (and the tools)");
        return;
    }
    let (uid, gid) = (65534, 65534); // nobody, nogroup
    let tmp = tempfile::tempdir().unwrap();
    let (src, mut browser) = restorable(tmp.path());
    let me = [browser.resolve("p1/Users/me").unwrap()];
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(uid), Some(gid)).unwrap();

    let done = browser
        .restore_for(&me, &out, (uid, gid), &Control::new())
        .unwrap();
    assert_eq!(done.written, [out.join("me")]);
    assert_same_tree(&src.join("Users/me"), &out.join("me"));
    let mut owned = walk(&out.join("me"));
    owned.push(out.join("me"));
    for path in &owned {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{path:?}");
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // A folder of root's, even when reached through a link in a folder of the user's, is
    // refused: the folder checked is the folder written in.
    let roots = tmp.path().join("roots");
    std::fs::create_dir(&roots).unwrap();
    symlink(tmp.path(), out.join("up")).unwrap();
    let through = out.join("up/roots");
    let err = browser
        .restore_for(&me, &through, (uid, gid), &Control::new())
        .unwrap_err();
    assert!(
        matches!(&err, FilesError::Output { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&roots).unwrap().count(), 0);
}

#[test]
fn listing_a_file_or_reading_a_folder_says_what_to_do_instead() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut browser) = restorable(tmp.path());
    let file = browser.resolve("p1/Users/me/sparse.img").unwrap();
    let err = browser.list(&file).unwrap_err();
    assert!(
        matches!(
            err,
            FilesError::Tree {
                source: TreeError::NotAFolder { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("list the folder it is in"),
        "{err}"
    );
    let folder = browser.resolve("p1/Users/me").unwrap();
    let err = browser
        .tree(folder.volume)
        .unwrap()
        .read(&folder.names, None, &mut std::io::sink(), &Control::new())
        .unwrap_err();
    assert!(matches!(err, TreeError::NotAFile { .. }), "{err}");
    assert!(err.to_string().contains("restore it whole"), "{err}");
}

/// How long restoring a folder of 10,000 small files in 100 folders takes (the listing
/// walk for the progress total included): `cargo test --release -p rewind-core --lib --
/// --ignored restoring_ten_thousand --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn restoring_ten_thousand_files_timing() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for d in 0..100 {
        let folder = src.join(format!("many/folder {d}"));
        std::fs::create_dir_all(&folder).unwrap();
        for f in 0..100 {
            std::fs::write(folder.join(format!("file {f}.txt")), format!("{d} {f}")).unwrap();
        }
    }
    let image = tmp.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+88M", "-t", "1:8300"])
        .arg(&image));
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-N", "12000", "-E", "offset=1048576", "-d"])
        .arg(&src)
        .arg(&image)
        .arg("88M"));
    let store = Arc::new(Store::init(&tmp.path().join("store"), &options()).unwrap());
    let m = checkpoint_file(&store, vm("linux", 1), 0, &image, None);
    let mut browser = Browser::open(store, m).unwrap();
    let many = [browser.resolve("p1/many").unwrap()];
    let mut times = Vec::new();
    for run in 0..5 {
        let out = tmp.path().join(format!("out{run}"));
        std::fs::create_dir(&out).unwrap();
        let start = std::time::Instant::now();
        let done = browser.restore(&many, &out, &Control::new()).unwrap();
        times.push(start.elapsed());
        assert_eq!(done.files, 10_000);
        std::fs::remove_dir_all(&out).unwrap();
    }
    times.sort();
    eprintln!(
        "restoring 10,000 files: min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );
    // One listing walk of the same folders (what a second walk costs, its chunks cached).
    let mut walks = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let mut pending = vec![many[0].clone()];
        let mut entries = 0;
        while let Some(at) = pending.pop() {
            for e in browser.list(&at).unwrap() {
                entries += 1;
                if e.kind == EntryKind::Folder {
                    let mut child = at.clone();
                    child.names.push(e.name);
                    pending.push(child);
                }
            }
        }
        walks.push(start.elapsed());
        assert_eq!(entries, 10_100);
    }
    walks.sort();
    eprintln!(
        "listing them: min {:?}, median {:?}, max {:?}",
        walks[0], walks[2], walks[4]
    );
}
