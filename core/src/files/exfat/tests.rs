//! exFAT images made by `mkfs.exfat`, filled either by writing directory entry sets into
//! them here (from the specification, checked by `fsck.exfat`) or through a FUSE mount
//! where one works; and damaged copies of them, which must give errors or listings, never
//! panics or hangs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::files::fat::tests::{
    Capped, MTIME, Patched, Rng, content, host_file, image, p, run, tool, tools, volume, walk_all,
};

/// The fields of a FAT-style timestamp.
fn stamp(year: u32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> u32 {
    ((year - 1980) << 25)
        | (month << 21)
        | (day << 16)
        | (hour << 11)
        | (minute << 5)
        | (second / 2)
}

/// The specification's checksum of an entry set (bytes 2 and 3 of its first entry left
/// out), as its pseudo-code writes it.
fn checksum(entries: &[[u8; 32]]) -> u16 {
    let mut sum: u16 = 0;
    for (i, byte) in entries.iter().flatten().enumerate() {
        if i == 2 || i == 3 {
            continue;
        }
        sum = (if sum & 1 == 1 { 0x8000u16 } else { 0 })
            .wrapping_add(sum >> 1)
            .wrapping_add(u16::from(*byte));
    }
    sum
}

/// The specification's hash of an up-cased name.
fn name_hash(name: &str) -> u16 {
    let mut hash: u16 = 0;
    for unit in name.to_uppercase().encode_utf16() {
        for byte in unit.to_le_bytes() {
            hash = (if hash & 1 == 1 { 0x8000u16 } else { 0 })
                .wrapping_add(hash >> 1)
                .wrapping_add(u16::from(byte));
        }
    }
    hash
}

/// What an entry set describes.
struct Set<'a> {
    name: &'a str,
    folder: bool,
    /// Timestamp, 10 ms increment, UTC offset.
    modified: (u32, u8, u8),
    first: u32,
    no_fat_chain: bool,
    valid: u64,
    length: u64,
}

/// The entries of a file entry set: file, stream extension, file names.
fn entry_set(set: &Set<'_>) -> Vec<[u8; 32]> {
    let name: Vec<u16> = set.name.encode_utf16().collect();
    let parts = name.len().div_ceil(15);
    let mut file = [0u8; 32];
    file[0] = 0x85;
    file[1] = u8::try_from(1 + parts).unwrap();
    file[4..6].copy_from_slice(&(if set.folder { 0x10u16 } else { 0x20 }).to_le_bytes());
    // Created and last read at other times, which must not be taken for it.
    let other = stamp(2000, 1, 1, 0, 0, 0);
    file[8..12].copy_from_slice(&other.to_le_bytes());
    file[12..16].copy_from_slice(&set.modified.0.to_le_bytes());
    file[16..20].copy_from_slice(&other.to_le_bytes());
    file[20] = 42;
    file[21] = set.modified.1;
    file[22] = 0x80 | 4;
    file[23] = set.modified.2;
    file[24] = 0x80 | 8;
    let mut stream = [0u8; 32];
    stream[0] = 0xc0;
    stream[1] = 1 | if set.no_fat_chain { 2 } else { 0 };
    stream[3] = u8::try_from(name.len()).unwrap();
    stream[4..6].copy_from_slice(&name_hash(set.name).to_le_bytes());
    stream[8..16].copy_from_slice(&set.valid.to_le_bytes());
    stream[20..24].copy_from_slice(&set.first.to_le_bytes());
    stream[24..32].copy_from_slice(&set.length.to_le_bytes());
    let mut entries = vec![file, stream];
    for chunk in name.chunks(15) {
        let mut part = [0u8; 32];
        part[0] = 0xc1;
        for (i, unit) in chunk.iter().enumerate() {
            part[2 + 2 * i..4 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
        entries.push(part);
    }
    let sum = checksum(&entries);
    entries[0][2..4].copy_from_slice(&sum.to_le_bytes());
    entries
}

/// An image made by `mkfs.exfat`, to write files into.
struct Builder {
    img: Vec<u8>,
    cluster: usize,
    fat: usize,
    heap: usize,
    bitmap: usize,
    root: u32,
    /// The next free cluster, from the top down.
    next: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl Builder {
    fn new(path: &Path) -> Self {
        let img = std::fs::read(path).unwrap();
        let sector = 1usize << img[108];
        let cluster = sector << img[109];
        let fat = u32_at(&img, 80) as usize * sector;
        let heap = u32_at(&img, 88) as usize * sector;
        let count = u32_at(&img, 92);
        let root = u32_at(&img, 96);
        let root_at = heap + (root as usize - 2) * cluster;
        // The allocation bitmap is listed first in the root by mkfs.exfat.
        let bitmap_entry = (0..cluster / 32)
            .map(|i| root_at + 32 * i)
            .find(|at| img[*at] == 0x81)
            .unwrap();
        let bitmap = heap + (u32_at(&img, bitmap_entry + 20) as usize - 2) * cluster;
        Self {
            img,
            cluster,
            fat,
            heap,
            bitmap,
            root,
            next: count + 1,
        }
    }

    fn at(&self, cluster: u32) -> usize {
        self.heap + (cluster as usize - 2) * self.cluster
    }

    /// `n` free clusters (descending), marked in the allocation bitmap.
    fn alloc(&mut self, n: usize) -> Vec<u32> {
        let mut clusters = Vec::new();
        for _ in 0..n {
            let c = self.next;
            self.next -= 1;
            let bit = c as usize - 2;
            self.img[self.bitmap + bit / 8] |= 1 << (bit % 8);
            clusters.push(c);
        }
        clusters
    }

    /// Links `clusters` in the FAT, in that order.
    fn chain(&mut self, clusters: &[u32]) {
        for (i, c) in clusters.iter().enumerate() {
            let next = clusters.get(i + 1).copied().unwrap_or(0xffff_ffff);
            let at = self.fat + *c as usize * 4;
            self.img[at..at + 4].copy_from_slice(&next.to_le_bytes());
        }
    }

    /// Writes `data` into `clusters`, in order.
    fn write(&mut self, clusters: &[u32], data: &[u8]) {
        for (c, piece) in clusters.iter().zip(data.chunks(self.cluster)) {
            let at = self.at(*c);
            self.img[at..at + piece.len()].copy_from_slice(piece);
        }
    }

    /// Adds `set` to the (one-cluster) folder at `folder`.
    fn add(&mut self, folder: u32, set: &Set<'_>) {
        let entries = entry_set(set);
        let start = self.at(folder);
        let free = (0..self.cluster / 32)
            .map(|i| start + 32 * i)
            .find(|at| self.img[*at] == 0)
            .unwrap();
        assert!(free + 32 * entries.len() <= start + self.cluster);
        for (i, entry) in entries.iter().enumerate() {
            self.img[free + 32 * i..free + 32 * i + 32].copy_from_slice(entry);
        }
    }

    /// A new empty folder `name` in `parent`, in one cluster without a FAT chain.
    fn folder(&mut self, parent: u32, name: &str) -> u32 {
        let c = self.alloc(1)[0];
        let length = self.cluster as u64;
        self.add(
            parent,
            &Set {
                name,
                folder: true,
                modified: (stamp(2020, 1, 2, 3, 4, 6), 0, 0),
                first: c,
                no_fat_chain: true,
                valid: length,
                length,
            },
        );
        c
    }
}

const LONG: &str = "Ein sehr langer Dateiname über fünfzehn Zeichen – ÄÖÜ 日本語.bin";
const DEPTH: usize = 12;

/// An image with hand-written entry sets: a folder with a fragmented multi-MiB file, a
/// half-written file, an empty one, 12 levels of folders and times with UTC offsets.
fn handmade(dir: &Path) -> (PathBuf, Vec<u8>, u32) {
    let img = image(dir, "exfat.img", 16);
    run("mkfs.exfat", &["-L", "USB", img.to_str().unwrap()]);
    let mut b = Builder::new(&img);
    let root = b.root;
    let folder = b.folder(root, "Ordner Äpfel");

    let big = crate::store::tests::noise(11, (3 << 20) + 77);
    let mut clusters = b.alloc(big.len().div_ceil(b.cluster));
    // Fragmented: runs going up, then down, then a jump.
    clusters[100..300].reverse();
    clusters[400..].reverse();
    b.chain(&clusters);
    b.write(&clusters, &big);
    b.add(
        folder,
        &Set {
            name: LONG,
            folder: false,
            modified: (stamp(2021, 3, 4, 7, 6, 8), 50, 0x80 | 8),
            first: clusters[0],
            no_fat_chain: false,
            valid: big.len() as u64,
            length: big.len() as u64,
        },
    );

    let half = b.alloc(3);
    let mut contiguous = half.clone();
    contiguous.reverse();
    b.write(&contiguous, &[0xaa; 10_000]);
    b.add(
        folder,
        &Set {
            name: "halb.bin",
            folder: false,
            modified: (stamp(2021, 3, 4, 5, 6, 8), 0, 0),
            first: contiguous[0],
            no_fat_chain: true,
            valid: 4000,
            length: 10_000,
        },
    );
    b.add(
        folder,
        &Set {
            name: "leer.txt",
            folder: false,
            modified: (stamp(2021, 3, 4, 5, 6, 8), 0, 0),
            first: 0,
            no_fat_chain: false,
            valid: 0,
            length: 0,
        },
    );

    let mut parent = root;
    for level in 1..=DEPTH {
        parent = b.folder(parent, &format!("Ebene {level}"));
    }
    let deep = b.alloc(1);
    b.write(&deep, b"tief\n");
    b.add(
        parent,
        &Set {
            name: "datei.txt",
            folder: false,
            modified: (stamp(2021, 3, 4, 5, 6, 8), 0, 0),
            first: deep[0],
            no_fat_chain: true,
            valid: 5,
            length: 5,
        },
    );
    // UTC-3:30, as Newfoundland writes it.
    b.add(
        root,
        &Set {
            name: "Zeit.txt",
            folder: false,
            modified: (stamp(2021, 3, 4, 1, 36, 8), 199, 0x80 | (0x80 - 14)),
            first: 0,
            no_fat_chain: false,
            valid: 0,
            length: 0,
        },
    );
    std::fs::write(&img, &b.img).unwrap();
    (img, big, clusters[0])
}

#[test]
fn handmade_entry_sets_are_listed_looked_up_and_read() {
    if !tools("exfat", &["mkfs.exfat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, big, first) = handmade(dir.path());
    if tool("fsck.exfat").is_some() {
        // The real tool agrees the entries written here are sound.
        run("fsck.exfat", &["-n", img.to_str().unwrap()]);
    }
    let mut tree = open(volume(&img)).unwrap();

    let root = tree.list(&[]).unwrap();
    let names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["Ordner Äpfel", "Ebene 1", "Zeit.txt"]);
    assert_eq!(root[0].kind, EntryKind::Folder);
    // 01:36:08.00 + 1.99 s at UTC-3:30 is 05:06:09.99 UTC.
    assert_eq!(
        root[2].modified,
        Some(Timestamp {
            seconds: MTIME + 1,
            nanos: 990_000_000
        })
    );

    let listed = tree.list(&p("ORDNER äPFEL")).unwrap();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, [LONG, "halb.bin", "leer.txt"]);
    let long = &listed[0];
    assert_eq!(long.kind, EntryKind::File);
    assert_eq!(long.size_bytes, big.len() as u64);
    assert_eq!(long.id, Some(u64::from(first)));
    // 07:06:08.50 at UTC+2 is 05:06:08.50 UTC.
    assert_eq!(
        long.modified,
        Some(Timestamp {
            seconds: MTIME,
            nanos: 500_000_000
        })
    );
    assert_eq!(listed[2].id, None);

    let (read, done) = content(&mut *tree, &format!("ordner äpfel/{}", LONG.to_uppercase()));
    assert_eq!(read.len(), big.len());
    assert!(read == big, "the fragmented file differs");
    assert_eq!(done, big.len() as u64);
    let (read, _) = content(&mut *tree, "Ordner Äpfel/halb.bin");
    assert_eq!(read.len(), 10_000);
    assert!(read[..4000].iter().all(|b| *b == 0xaa));
    assert!(read[4000..].iter().all(|b| *b == 0));
    assert!(content(&mut *tree, "Ordner Äpfel/leer.txt").0.is_empty());

    let deep: Vec<String> = (1..=DEPTH).map(|l| format!("Ebene {l}")).collect();
    assert_eq!(tree.list(&deep).unwrap().len(), 1);
    let file = format!("{}/DATEI.TXT", deep.join("/"));
    assert_eq!(content(&mut *tree, &file).0, b"tief\n");
    assert_eq!(tree.entry(&p(&file)).unwrap().size_bytes, 5);
    assert_eq!(tree.entry(&[]).unwrap().kind, EntryKind::Folder);

    assert!(matches!(
        tree.list(&p("nicht/da")),
        Err(TreeError::NotFound { .. })
    ));
    assert!(matches!(
        tree.list(&p("Zeit.txt")),
        Err(TreeError::NotAFolder { .. })
    ));
    assert!(matches!(
        tree.entry(&p("Zeit.txt/x")),
        Err(TreeError::NotAFolder { .. })
    ));
    let control = Control::new();
    let mut sink = Vec::new();
    assert!(matches!(
        tree.read(&p("Ebene 1"), None, &mut sink, &control),
        Err(TreeError::NotAFile { .. })
    ));
    assert!(matches!(
        tree.read(&p("Zeit.txt"), Some("x"), &mut sink, &control),
        Err(TreeError::NotFound { .. })
    ));
    control.cancel();
    assert!(matches!(
        tree.read(
            &p(&format!("Ordner Äpfel/{LONG}")),
            None,
            &mut sink,
            &control
        ),
        Err(TreeError::Cancelled(_))
    ));
}

/// A FUSE or kernel mount of an image, undone when dropped (even if the test fails).
struct Mounted {
    dir: PathBuf,
    loop_device: Option<String>,
    /// exfat-fuse, run in the foreground: it writes the last of its records as it exits,
    /// after `umount` returns.
    daemon: Option<std::process::Child>,
    active: bool,
    /// Tests that must see no change in the mount table wait while this one is there.
    _quiet: std::sync::MutexGuard<'static, ()>,
}

/// Whether `dir` is a mount point now.
fn is_mount_point(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(dir.as_ref()))
}

impl Mounted {
    /// Mounts `img` on `dir`: the kernel's exFAT, else exfat-fuse on a loop device.
    fn new(img: &Path, dir: &Path) -> Option<Self> {
        let mut mounted = Self {
            dir: dir.to_owned(),
            loop_device: None,
            daemon: None,
            active: false,
            _quiet: crate::mounts::MOUNT_TABLE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        let (img_s, dir_s) = (img.to_str()?, dir.to_str()?);
        let kernel = tool("mount").is_some_and(|mount| {
            Command::new(mount)
                .args(["-t", "exfat", "-o", "loop", img_s, dir_s])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if kernel {
            mounted.active = true;
            return Some(mounted);
        }
        let fuse = tool("mount.exfat-fuse")?;
        let output = Command::new(tool("losetup")?)
            .args(["-f", "--show", img_s])
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        mounted.loop_device = Some(device.clone());
        let daemon = Command::new(fuse)
            .args(["-d", device.as_str(), dir_s])
            .env("TZ", "UTC")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        mounted.daemon = Some(daemon);
        for _ in 0..100 {
            if is_mount_point(dir) {
                mounted.active = true;
                return Some(mounted);
            }
            let daemon = mounted.daemon.as_mut()?;
            if daemon.try_wait().ok()?.is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            // Tried again while it fails (busy for a moment): exfat-fuse writes its folders'
            // records only as it unmounts, so killing it below while it is still mounted
            // would lose what the test wrote.
            for _ in 0..100 {
                let done = Command::new("umount")
                    .arg(&self.dir)
                    .status()
                    .is_ok_and(|s| s.success());
                if done || !is_mount_point(&self.dir) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some(daemon) = &mut self.daemon {
            let deadline = std::time::Instant::now() + Duration::from_mins(1);
            while matches!(daemon.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(daemon.kill());
            drop(daemon.wait());
        }
        if let Some(device) = &self.loop_device {
            // What exfat-fuse wrote may still sit in the loop device's cache (its last
            // close flushes it only if nobody else has the device open, a probing tool
            // for one): written through to the image before it is read.
            if let Err(e) = std::fs::File::open(device).and_then(|d| d.sync_all()) {
                eprintln!("could not flush {device}: {e}");
            }
            drop(Command::new("losetup").args(["-d", device]).status());
        }
    }
}

#[test]
fn files_written_through_a_mount_are_read_back() {
    if !tools("exfat mount", &["mkfs.exfat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "mounted.img", 32);
    run("mkfs.exfat", &["-L", "USB", img.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let big = crate::store::tests::noise(5, (4 << 20) + 5);
    {
        let Some(_mounted) = Mounted::new(&img, &mnt) else {
            println!(
                "skipping the exfat mount test: neither the kernel's exFAT nor exfat-fuse \
                 (with losetup) could mount an image here"
            );
            return;
        };
        let mut deep = mnt.join("Données");
        for level in 1..=DEPTH {
            deep = deep.join(format!("Niveau {level}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        for file in [
            host_file(&deep, "fin.txt", b"fin\n"),
            host_file(&mnt.join("Données"), LONG, &big),
            host_file(&mnt, "ß.txt", b""),
        ] {
            // exfat-fuse sets the time of a written file when it is closed, and takes
            // a time only with the access time: set both again.
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(MTIME.unsigned_abs());
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_times(std::fs::FileTimes::new().set_accessed(at).set_modified(at))
                .unwrap();
        }
    }
    let mut tree = open(volume(&img)).unwrap();
    let root = tree.list(&[]).unwrap();
    let mut names: Vec<&str> = root.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["Données", "ß.txt"]);
    let listed = tree.list(&p("DONNÉES")).unwrap();
    let file = listed.iter().find(|e| e.name == LONG).unwrap();
    assert_eq!(file.size_bytes, big.len() as u64);
    assert_eq!(file.modified.map(|t| t.seconds), Some(MTIME));
    let (read, done) = content(&mut *tree, &format!("données/{LONG}"));
    assert!(read == big, "the file written through the mount differs");
    assert_eq!(done, big.len() as u64);
    let mut deep = String::from("Données");
    for level in 1..=DEPTH {
        deep = format!("{deep}/Niveau {level}");
    }
    assert_eq!(content(&mut *tree, &format!("{deep}/FIN.TXT")).0, b"fin\n");
}

#[test]
fn damaged_exfat_images_give_errors_or_listings_never_panics_or_hangs() {
    if !tools("damaged exfat", &["mkfs.exfat"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _, first) = handmade(dir.path());
    let base = Arc::new(std::fs::read(&img).unwrap());
    let b = Builder::new(&img);
    let root = b.at(b.root) as u64;
    let fat = b.fat as u64;

    // A root folder whose cluster is followed by itself, full of deleted entries.
    let mut patches = BTreeMap::new();
    for i in 0..b.cluster as u64 {
        patches.insert(root + i, if i % 32 == 0 { 0x05 } else { 0 });
    }
    for (i, byte) in b.root.to_le_bytes().into_iter().enumerate() {
        patches.insert(fat + u64::from(b.root) * 4 + i as u64, byte);
    }
    let Err(err) = open(Patched::volume(&base, patches)) else {
        panic!("a looping root folder was opened");
    };
    assert!(
        matches!(&err, TreeError::Damaged { detail } if detail.contains("loops")),
        "{err}"
    );

    // An entry set whose checksum does not match is skipped, the rest still listed.
    let zeit: Vec<u8> = "Zeit".encode_utf16().flat_map(u16::to_le_bytes).collect();
    let root_at = b.at(b.root);
    let at = base[root_at..root_at + b.cluster]
        .windows(zeit.len())
        .position(|w| w == zeit.as_slice())
        .unwrap()
        + root_at;
    let mut tree = open(Patched::volume(&base, BTreeMap::from([(at as u64, b'z')]))).unwrap();
    let names: Vec<String> = tree
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["Ordner Äpfel", "Ebene 1"]);

    // A file's chain looping back to its start.
    let mut patches = BTreeMap::new();
    for (i, byte) in first.to_le_bytes().into_iter().enumerate() {
        patches.insert(fat + u64::from(first - 50) * 4 + i as u64, byte);
    }
    let mut tree = open(Patched::volume(&base, patches)).unwrap();
    let err = tree
        .read(
            &p(&format!("Ordner Äpfel/{LONG}")),
            None,
            &mut Capped(64 << 20),
            &Control::new(),
        )
        .unwrap_err();
    assert!(matches!(err, TreeError::Damaged { .. }), "{err}");

    let regions = [
        (0, 512),
        (fat, 64),
        (fat + u64::from(first - 800) * 4, 4096),
        (root, 512),
        // The folder "Ordner Äpfel", in the last cluster.
        (b.at(u32_at(&base, 92) + 1) as u64, 512),
    ];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..200 {
        let mut patches = BTreeMap::new();
        for _ in 0..=rng.below(16) {
            let (start, len) = regions[usize::try_from(rng.below(regions.len() as u64)).unwrap()];
            let byte = u8::try_from(rng.below(256)).unwrap();
            patches.insert(start + rng.below(len), byte);
        }
        let started = std::time::Instant::now();
        if let Ok(mut tree) = open(Patched::volume(&base, patches)) {
            walk_all(&mut *tree);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
}
