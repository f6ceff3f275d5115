//! FAT images made by `mkfs.vfat` and filled by mtools (no mount), read back; and damaged
//! copies of them, which must give errors or listings, never panics or hangs.

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::*;
use crate::files::{FileTree, Slice};

/// `name`, if it is installed (in `PATH` or an `sbin` folder).
pub(in crate::files) fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether all of `names` are installed; if not, says which one is missing (the test is
/// then skipped).
pub(in crate::files) fn tools(test: &str, names: &[&str]) -> bool {
    for name in names {
        if tool(name).is_none() {
            println!("skipping {test}: {name} is not installed");
            return false;
        }
    }
    true
}

/// Runs `program` with `args` (times in UTC; mtools' checks of the geometry off), and
/// asserts it succeeds.
pub(in crate::files) fn run(program: &str, args: &[&str]) {
    let output = Command::new(tool(program).expect("checked by tools()"))
        .args(args)
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("the tool starts");
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An empty (sparse) image file of `mib` MiB.
pub(in crate::files) fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path
}

/// The volume in the image file at `path`.
pub(in crate::files) fn volume(path: &Path) -> VolumeDisk {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    Slice::new(Box::new(file), 0, len)
}

/// The path `a/b/c` as a [`FileTree`] path.
pub(in crate::files) fn p(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// 2021-03-04 05:06:08 UTC.
pub(in crate::files) const MTIME: i64 = 1_614_834_368;

/// A file in `dir` with `content`, last modified at [`MTIME`].
pub(in crate::files) fn host_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(content).unwrap();
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(MTIME.unsigned_abs()))
        .unwrap();
    path
}

/// The content of `path` in `tree`, read with a fresh [`Control`], and the done bytes it
/// counted.
pub(in crate::files) fn content(tree: &mut dyn FileTree, path: &str) -> (Vec<u8>, u64) {
    let control = Control::new();
    let mut out = Vec::new();
    let n = tree.read(&p(path), None, &mut out, &control).unwrap();
    assert_eq!(n, out.len() as u64);
    (out, control.progress_bytes().0)
}

const LONG: &str = "Überraschung – ein sehr langer Dateiname, ganz ohne 8.3 (ÄÖÜ ß) 日本語.txt";
const DEPTH: usize = 12;

/// A FAT32 image like an EFI system partition: long non-ASCII names, a deep tree, a
/// multi-MiB random file.
fn fat32(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = image(dir, "fat32.img", 40);
    let img_s = img.to_str().unwrap();
    run("mkfs.vfat", &["-F", "32", "-n", "EFI", img_s]);
    let big = crate::store::tests::noise(7, (5 << 20) + 123);
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let long = host_file(&src, LONG, b"long name\n");
    let readme = host_file(&src, "readme.txt", b"hello\n");
    let bigf = host_file(&src, "big.bin", &big);
    let mut folders = vec!["::/EFI".to_owned(), "::/EFI/BOOT".to_owned()];
    let mut deep = String::from("::");
    for level in 1..=DEPTH {
        deep = format!("{deep}/Level {level}");
        folders.push(deep.clone());
    }
    folders.push("::/Données".into());
    let mut args = vec!["-i", img_s];
    args.extend(folders.iter().map(String::as_str));
    run("mmd", &args);
    let deep_target = format!("{deep}/");
    for (file, target) in [
        (&long, "::/EFI/BOOT/"),
        (&readme, "::/"),
        (&bigf, "::/Données/"),
        (&readme, deep_target.as_str()),
    ] {
        run(
            "mcopy",
            &["-m", "-i", img_s, file.to_str().unwrap(), target],
        );
    }
    (img, big)
}

#[test]
fn fat32_lists_looks_up_and_reads_what_mtools_wrote() {
    if !tools("fat32", &["mkfs.vfat", "mmd", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, big) = fat32(dir.path());
    let mut tree = open(volume(&img)).unwrap();

    let root = tree.list(&[]).unwrap();
    let names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["EFI", "Level 1", "Données", "readme.txt"],
        "{root:?}"
    );
    assert_eq!(root[0].kind, EntryKind::Folder);
    assert_eq!(root[0].size_bytes, 0);
    let readme = &root[3];
    assert_eq!((readme.kind, readme.size_bytes), (EntryKind::File, 6));
    assert_eq!(
        readme.modified,
        Some(Timestamp {
            seconds: MTIME,
            nanos: 0
        })
    );

    let boot = tree.list(&p("EFI/BOOT")).unwrap();
    assert_eq!(boot.len(), 1, "{boot:?}");
    assert_eq!(boot[0].name, LONG);
    assert_eq!(boot[0].size_bytes, 10);
    assert_eq!(boot[0].modified.map(|t| t.seconds), Some(MTIME));

    // Case-insensitive, by long or short name.
    let lower = format!("efi/boot/{}", LONG.to_lowercase());
    assert_eq!(tree.entry(&p(&lower)).unwrap().name, LONG);
    assert_eq!(tree.entry(&p("README.TXT")).unwrap().name, "readme.txt");
    assert_eq!(content(&mut *tree, &lower).0, b"long name\n");
    assert_eq!(tree.entry(&[]).unwrap().kind, EntryKind::Folder);

    let (read, done) = content(&mut *tree, "données/BIG.BIN");
    assert_eq!(read.len(), big.len());
    assert!(read == big, "big.bin differs");
    assert_eq!(done, big.len() as u64);

    let deep: Vec<String> = (1..=DEPTH).map(|level| format!("Level {level}")).collect();
    let listed = tree.list(&deep).unwrap();
    assert_eq!(listed.len(), 1);
    let mut file = deep.clone();
    file.push("readme.txt".into());
    assert_eq!(tree.entry(&file).unwrap().size_bytes, 6);
    let (read, _) = content(&mut *tree, &file.join("/"));
    assert_eq!(read, b"hello\n");

    assert!(matches!(
        tree.list(&p("nothing/here")),
        Err(TreeError::NotFound { .. })
    ));
    assert!(matches!(
        tree.list(&p("readme.txt")),
        Err(TreeError::NotAFolder { .. })
    ));
    assert!(matches!(
        tree.entry(&p("readme.txt/x")),
        Err(TreeError::NotAFolder { .. })
    ));
    let control = Control::new();
    let mut sink = Vec::new();
    assert!(matches!(
        tree.read(&p("EFI"), None, &mut sink, &control),
        Err(TreeError::NotAFile { .. })
    ));
    assert!(matches!(
        tree.read(&[], None, &mut sink, &control),
        Err(TreeError::NotAFile { .. })
    ));
    assert!(matches!(
        tree.read(
            &p("readme.txt"),
            Some("Zone.Identifier"),
            &mut sink,
            &control
        ),
        Err(TreeError::NotFound { .. })
    ));
    control.cancel();
    assert!(matches!(
        tree.read(&p("Données/big.bin"), None, &mut sink, &control),
        Err(TreeError::Cancelled(_))
    ));
    drop(tree);

    // Nothing was written to the image, not even on unmount.
    let mut again = open(volume(&img)).unwrap();
    assert_eq!(again.list(&[]).unwrap(), root);
}

#[test]
fn a_file_is_read_from_the_disk_about_once() {
    if !tools("fat32 reads", &["mkfs.vfat", "mmd", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, big) = fat32(dir.path());
    // The FAT, the folders and the clusters are read in turns: each is read once, not
    // once per cluster.
    let counted = Arc::new(AtomicU64::new(0));
    let file = std::fs::File::open(&img).unwrap();
    let len = file.metadata().unwrap().len();
    let disk = Counting {
        inner: file,
        read: Arc::clone(&counted),
    };
    let mut tree = open(Slice::new(Box::new(disk), 0, len)).unwrap();
    counted.store(0, Ordering::Relaxed);
    assert!(content(&mut *tree, "Données/big.bin").0 == big);
    let from_disk = counted.load(Ordering::Relaxed);
    assert!(
        from_disk < big.len() as u64 * 3 / 2,
        "{from_disk} bytes read from the disk for a file of {}",
        big.len()
    );
}

#[test]
fn fat16_and_fat12_are_read_too() {
    if !tools("fat16", &["mkfs.vfat", "mmd", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = crate::store::tests::noise(3, 300_000);
    let file = host_file(&src, "Ein längerer Name.bin", &data);
    for (bits, mib) in [("16", 16), ("12", 2)] {
        let img = image(dir.path(), &format!("fat{bits}.img"), mib);
        let img_s = img.to_str().unwrap();
        run("mkfs.vfat", &["-F", bits, "-n", "SMALL", img_s]);
        run("mmd", &["-i", img_s, "::/Ordner"]);
        run(
            "mcopy",
            &["-m", "-i", img_s, file.to_str().unwrap(), "::/Ordner/"],
        );
        let mut tree = open(volume(&img)).unwrap();
        let root = tree.list(&[]).unwrap();
        assert_eq!(root.len(), 1, "FAT{bits}: {root:?}");
        assert_eq!(root[0].name, "Ordner");
        let listed = tree.list(&p("ordner")).unwrap();
        assert_eq!(listed.len(), 1, "FAT{bits}: {listed:?}");
        assert_eq!(listed[0].name, "Ein längerer Name.bin");
        assert_eq!(listed[0].modified.map(|t| t.seconds), Some(MTIME));
        let (read, done) = content(&mut *tree, "Ordner/EIN LÄNGERER NAME.BIN");
        assert!(read == data, "FAT{bits}: content differs");
        assert_eq!(done, data.len() as u64);
    }
}

/// A disk that counts the bytes read from it.
struct Counting {
    inner: std::fs::File,
    read: Arc<AtomicU64>,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Seek for Counting {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

/// A disk in memory shared by many damaged copies, each a few patched bytes.
pub(in crate::files) struct Patched {
    pub(in crate::files) base: Arc<Vec<u8>>,
    pub(in crate::files) patches: BTreeMap<u64, u8>,
    pub(in crate::files) position: u64,
}

impl Read for Patched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut cursor = Cursor::new(&self.base[..]);
        cursor.set_position(self.position);
        let n = cursor.read(buf)?;
        for (at, byte) in self.patches.range(self.position..self.position + n as u64) {
            buf[usize::try_from(at - self.position).unwrap()] = *byte;
        }
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for Patched {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let mut cursor = Cursor::new(&self.base[..]);
        cursor.set_position(self.position);
        self.position = cursor.seek(to)?;
        Ok(self.position)
    }
}

impl Patched {
    pub(in crate::files) fn volume(base: &Arc<Vec<u8>>, patches: BTreeMap<u64, u8>) -> VolumeDisk {
        let len = base.len() as u64;
        Slice::new(
            Box::new(Self {
                base: Arc::clone(base),
                patches,
                position: 0,
            }),
            0,
            len,
        )
    }
}

/// A tiny xorshift generator, for repeatable damage.
pub(in crate::files) struct Rng(pub(in crate::files) u64);

impl Rng {
    pub(in crate::files) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub(in crate::files) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A writer that refuses more than `left` bytes (a damaged file may claim 4 GiB).
pub(in crate::files) struct Capped(pub(in crate::files) u64);

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len() as u64;
        self.0 = self
            .0
            .checked_sub(n)
            .ok_or_else(|| io::Error::other("enough"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lists and reads all of `tree` it can, within bounds; errors are fine.
pub(in crate::files) fn walk_all(tree: &mut dyn FileTree) {
    let mut folders = vec![Vec::<String>::new()];
    let mut lists = 0;
    while let Some(folder) = folders.pop() {
        lists += 1;
        if lists > 100 {
            break;
        }
        let Ok(entries) = tree.list(&folder) else {
            continue;
        };
        for entry in entries.iter().take(200) {
            let mut path = folder.clone();
            path.push(entry.name.clone());
            drop(tree.entry(&path));
            match entry.kind {
                EntryKind::Folder if path.len() < 16 => folders.push(path),
                EntryKind::File => {
                    drop(tree.read(&path, None, &mut Capped(16 << 20), &Control::new()));
                }
                _ => {}
            }
        }
    }
}

/// Little-endian `u16` and `u32` of `bytes` at `at`.
fn le16(bytes: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

fn le32(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
}

#[test]
fn damaged_fat_images_give_errors_or_listings_never_panics_or_hangs() {
    if !tools("damaged fat", &["mkfs.vfat", "mmd", "mcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = fat32(dir.path());
    let base = Arc::new(std::fs::read(&img).unwrap());
    let sector = le16(&base, 11);
    let cluster = sector * u64::from(base[13]);
    let fat_start = le16(&base, 14) * sector;
    let fat_len = le32(&base, 36) * sector;
    let data_start = fat_start + u64::from(base[16]) * fat_len;
    let root_cluster = le32(&base, 44);
    let root = data_start + (root_cluster - 2) * cluster;

    // A root folder whose only cluster is followed by itself, full of deleted entries:
    // `fatfs` would read it forever.
    let mut patches = BTreeMap::new();
    for i in 0..cluster {
        patches.insert(root + i, if i % 32 == 0 { 0xe5 } else { 0 });
    }
    for (i, byte) in u32::try_from(root_cluster)
        .unwrap()
        .to_le_bytes()
        .into_iter()
        .enumerate()
    {
        patches.insert(fat_start + root_cluster * 4 + i as u64, byte);
    }
    let mut tree = open(Patched::volume(&base, patches)).unwrap();
    let err = tree.list(&[]).unwrap_err();
    assert!(
        matches!(&err, TreeError::Damaged { detail } if detail.contains("loops")),
        "{err}"
    );

    // Random damage to the boot sector, the FAT and the folders.
    let regions = [
        (0, 512),
        (fat_start, 4096),
        (data_start, 64 << 10),
        (root, cluster),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200 {
        let mut patches = BTreeMap::new();
        for _ in 0..=rng.below(16) {
            let (start, len) = regions[usize::try_from(rng.below(4)).unwrap()];
            let byte = u8::try_from(rng.below(256)).unwrap();
            patches.insert(start + rng.below(len), byte);
        }
        let started = std::time::Instant::now();
        if let Ok(mut tree) = open(Patched::volume(&base, patches)) {
            walk_all(&mut *tree);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
}
