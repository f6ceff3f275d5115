//! What a checkpoint's disks hold, read straight from the store (`rewind files`): a disk
//! laid out like a Windows 11 install's, made with the real tools (sgdisk, mkfs.vfat,
//! mkntfs, mkfs.ext4) without mounting anything, checkpointed through a test VM.

use std::path::Path;
use std::process::Command;

use rewind_tests::scratch::ScratchDir;
use rewind_tests::{DiskSpec, Format, TestVm};

use crate::rewind;

const MIB: u64 = 1 << 20;

/// Runs a disk tool, failing the test with what it said.
fn tool(what: &str, command: &mut Command) {
    rewind_tests::package::run_ok(what, command);
}

/// A file of `mib` MiB.
fn sized(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
}

/// Copies `image` into `disk` at sector `lba`.
fn place(disk: &Path, image: &Path, lba: u64) {
    tool(
        "dd",
        Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=512", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={lba}")),
    );
}

/// A 160 MiB GPT disk: an EFI system partition (FAT32), Windows (NTFS), a volume with the
/// `BitLocker` signature only and a Linux partition (ext4); the partitions' first sectors.
fn windows_like_disk(dir: &Path) -> (std::path::PathBuf, [u64; 4]) {
    let disk = dir.join("disk.raw");
    sized(&disk, 160);
    let lbas = [2048, 2048 + 40 * 2048, 2048 + 88 * 2048, 2048 + 104 * 2048];
    tool(
        "sgdisk",
        Command::new("sgdisk")
            .arg(format!("--new=1:{}:+40M", lbas[0]))
            .args(["--typecode=1:ef00", "--change-name=1:EFI system partition"])
            .arg(format!("--new=2:{}:+48M", lbas[1]))
            .args(["--typecode=2:0700", "--change-name=2:Basic data partition"])
            .arg(format!("--new=3:{}:+16M", lbas[2]))
            .args(["--typecode=3:0700", "--change-name=3:Data"])
            .arg(format!("--new=4:{}:+48M", lbas[3]))
            .args(["--typecode=4:8300", "--change-name=4:Linux"])
            .arg(&disk),
    );
    let efi = dir.join("efi.img");
    sized(&efi, 40);
    tool(
        "mkfs.vfat",
        Command::new("mkfs.vfat")
            .args(["-F", "32", "-s", "1", "-n", "SYSTEM"])
            .arg(&efi),
    );
    fill_efi(dir, &efi);
    place(&disk, &efi, lbas[0]);
    let ntfs = dir.join("ntfs.img");
    sized(&ntfs, 48);
    tool(
        "mkntfs",
        Command::new("mkntfs")
            .args(["--force", "--quick", "--label", "Windows"])
            .arg(&ntfs),
    );
    fill_ntfs(dir, &ntfs);
    place(&disk, &ntfs, lbas[1]);
    // BitLocker: what its volume header starts with.
    let locked = dir.join("bitlocker.img");
    let mut header = vec![0u8; 512];
    header[..11].copy_from_slice(b"\xebX\x90-FVE-FS-");
    header[510..].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(&locked, &header).unwrap();
    place(&disk, &locked, lbas[2]);
    let ext4 = dir.join("ext4.img");
    sized(&ext4, 48);
    tool(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "home"])
            .arg(&ext4),
    );
    place(&disk, &ext4, lbas[3]);
    (disk, lbas)
}

/// The files put into the EFI system partition: (path, content, modification time), made
/// with mtools (`mmd`, `mcopy -m`) without mounting.
fn efi_files() -> Vec<(String, Vec<u8>, u64)> {
    vec![
        (
            "EFI/Microsoft/Boot/bootmgfw.efi".into(),
            pseudo_random(3, 1_500_000),
            1_700_000_000,
        ),
        (
            "EFI/Microsoft/Boot/de-DE/Größe – Übersetzung ünïcødé.txt".into(),
            "Grüße".repeat(200).into_bytes(),
            1_700_003_600,
        ),
        (
            "EFI/Boot/bootx64.efi".into(),
            pseudo_random(4, 70_000),
            1_690_000_000,
        ),
    ]
}

/// The files put into the NTFS partition's root with ntfscp (which makes no folders):
/// (name, content, modification time).
fn ntfs_files() -> Vec<(String, Vec<u8>, u64)> {
    vec![
        (
            "Thesis – Entwurf ünïcødé, a long name that goes on.docx".into(),
            pseudo_random(5, 2_500_000),
            1_701_000_000,
        ),
        ("notes.txt".into(), b"buy milk".to_vec(), 1_702_000_000),
    ]
}

/// Deterministic bytes that do not compress.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Writes `content` to `path` with `seconds` as its modification time.
fn source_file(path: &Path, content: &[u8], seconds: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    set_mtime(path, seconds);
}

/// The EFI partition's files, put in with mtools.
fn fill_efi(dir: &Path, efi: &Path) {
    let src = dir.join("efi-src");
    for (path, content, t) in efi_files() {
        source_file(&src.join(&path), content.as_slice(), t);
    }
    let mut folders = vec![
        "EFI",
        "EFI/Microsoft",
        "EFI/Microsoft/Boot",
        "EFI/Microsoft/Boot/de-DE",
        "EFI/Boot",
    ];
    folders.dedup();
    for folder in folders {
        tool(
            "mmd",
            Command::new("mmd")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(efi)
                .arg(format!("::/{folder}")),
        );
    }
    for (path, _, _) in efi_files() {
        tool(
            "mcopy",
            Command::new("mcopy")
                // FAT keeps local time: UTC here, as Rewind reads it.
                .env("TZ", "UTC")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-m", "-i"])
                .arg(efi)
                .arg(src.join(&path))
                .arg(format!("::/{path}")),
        );
    }
}

/// The NTFS partition's files, put in with ntfscp (with their times).
fn fill_ntfs(dir: &Path, ntfs: &Path) {
    let src = dir.join("ntfs-src");
    for (name, content, t) in ntfs_files() {
        source_file(&src.join(&name), &content, t);
        tool(
            "ntfscp",
            Command::new("ntfscp")
                .args(["-q", "-t"])
                .arg(ntfs)
                .arg(src.join(&name))
                .arg(&name),
        );
    }
    // An alternate data stream on the thesis, as a browser's download mark is.
    let mark = dir.join("zone");
    std::fs::write(&mark, b"[ZoneTransfer]\r\nZoneId=3\r\n").unwrap();
    tool(
        "ntfscp",
        Command::new("ntfscp")
            .args(["-q", "-N", "Zone.Identifier"])
            .arg(ntfs)
            .arg(&mark)
            .arg(&ntfs_files()[0].0),
    );
}

#[test]
fn files_lists_the_volumes_of_a_windows_like_disk_from_the_store() {
    let dir = ScratchDir::new("files-volumes").unwrap();
    let (raw, lbas) = windows_like_disk(dir.path());
    let vm = TestVm::builder("files")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 160 * MIB),
        ])
        .define()
        .expect("define the test VM");
    vm.fill_disk("vdb", &raw).unwrap();
    let store = dir.path().join("store");
    rewind::checkpoint_json(&vm.name, &store);
    let s = store.to_str().unwrap();

    let listed: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files", &vm.name, "latest", "--in", s, "--json",
    ]))
    .unwrap();
    let disks = listed["disks"].as_array().unwrap();
    let vdb = disks
        .iter()
        .find(|d| d["target"] == "vdb")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(vdb["partition_table"], "gpt", "{vdb}");
    let volumes = vdb["volumes"].as_array().unwrap();
    let seen: Vec<(u64, u64, &str, &str, &str, &str)> = volumes
        .iter()
        .map(|v| {
            (
                v["number"].as_u64().unwrap(),
                v["start_bytes"].as_u64().unwrap(),
                v["file_system"].as_str().unwrap(),
                v["label"].as_str().unwrap_or(""),
                v["partition_type"].as_str().unwrap(),
                v["partition_name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                1,
                lbas[0] * 512,
                "fat32",
                "SYSTEM",
                "EFI system",
                "EFI system partition"
            ),
            (
                2,
                lbas[1] * 512,
                "ntfs",
                "Windows",
                "Microsoft basic data",
                "Basic data partition"
            ),
            (
                3,
                lbas[2] * 512,
                "bitlocker",
                "",
                "Microsoft basic data",
                "Data"
            ),
            (4, lbas[3] * 512, "ext", "home", "Linux filesystem", "Linux"),
        ],
        "{vdb}"
    );
    assert_eq!(volumes[1]["size_bytes"], 48 * MIB, "{vdb}");
    // The VM's own first disk is empty: no table, no volume.
    let vda = disks.iter().find(|d| d["target"] == "vda").unwrap();
    assert_eq!(vda["partition_table"], "none", "{vda}");

    // The table for people names each volume, and says what a BitLocker volume needs.
    let table = rewind::run_ok(&["files", &vm.name, "latest", "--in", s]);
    for words in [
        "vdb/p1",
        "FAT32",
        "SYSTEM",
        "vdb/p2",
        "NTFS",
        "BitLocker (locked",
        "ext4",
        "home",
    ] {
        assert!(table.contains(words), "{words}:\n{table}");
    }

    windows_files_round_trip(&vm.name, s, dir.path());

    // An unknown checkpoint is "not found".
    let out = rewind::run(&[
        "files",
        &vm.name,
        "20000101T000000.000Z",
        "--in",
        s,
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The EFI and NTFS files of the Windows-like disk: listed, found, restored, compared.
fn windows_files_round_trip(vm: &str, s: &str, dir: &Path) {
    // The EFI partition by its label, the Windows one by its label too.
    let listed: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files",
        vm,
        "latest",
        "SYSTEM/efi/microsoft/BOOT",
        "--in",
        s,
        "--json",
    ]))
    .unwrap();
    assert_eq!(listed["path"], "vdb/p1/efi/microsoft/BOOT", "{listed}");
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["de-DE", "bootmgfw.efi"], "{listed}");
    let windows: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files", vm, "latest", "Windows", "--in", s, "--json",
    ]))
    .unwrap();
    let entries = windows["entries"].as_array().unwrap();
    let thesis = &ntfs_files()[0];
    let shown = entries
        .iter()
        .find(|e| e["name"] == thesis.0.as_str())
        .unwrap_or_else(|| panic!("{windows}"));
    assert_eq!(shown["size_bytes"], thesis.1.len(), "{shown}");
    assert_eq!(shown["streams"][0]["name"], "Zone.Identifier", "{shown}");
    assert!(
        entries
            .iter()
            .all(|e| !e["name"].as_str().unwrap().starts_with('$')),
        "NTFS's own files are not listed: {windows}"
    );
    // Search every volume by pattern.
    let found: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files", vm, "latest", "--find", "*.EFI", "--in", s, "--json",
    ]))
    .unwrap();
    let mut paths: Vec<&str> = found["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "vdb/p1/EFI/Boot/bootx64.efi",
            "vdb/p1/EFI/Microsoft/Boot/bootmgfw.efi"
        ],
        "{found}"
    );
    // Restore the EFI folder and the thesis; compare bytes and times with the sources.
    let out = dir.join("windows-restored");
    std::fs::create_dir(&out).unwrap();
    rewind::run_ok(&[
        "restore-files",
        vm,
        "latest",
        "vdb/p1/EFI",
        &format!("Windows/{}", thesis.0),
        // Its alternate data stream, named as ntfs-3g names it.
        &format!("Windows/{}:zone.identifier", thesis.0),
        "--from",
        s,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&dir.join("efi-src/EFI"), &out.join("EFI"), false);
    assert_eq!(
        std::fs::read(out.join(format!("{}:Zone.Identifier", thesis.0))).unwrap(),
        b"[ZoneTransfer]\r\nZoneId=3\r\n"
    );
    let restored = out.join(&thesis.0);
    assert!(same_bytes(&dir.join("ntfs-src").join(&thesis.0), &restored));
    assert_eq!(
        std::fs::metadata(&restored).unwrap().modified().unwrap(),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(thesis.2)
    );
}

/// Sets the modification time of `path` (a file or a folder) to `seconds` since 1970.
fn set_mtime(path: &Path, seconds: u64) {
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .unwrap();
    file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
        .unwrap();
}

/// Every path below `root`, children before their folder.
fn walk(root: &Path) -> Vec<std::path::PathBuf> {
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

/// The long, non-ASCII name the tests use (200 bytes of UTF-8, as ext4 allows up to 255).
fn long_name() -> String {
    let mut name = "Größe – ünïcødé ✓ Übersetzung ".to_owned();
    while name.len() < 196 {
        name.push('ß');
    }
    name.push_str(".txt");
    name
}

/// A Linux guest's files: a deep tree, a long non-ASCII name, a sparse file of 1 GiB, a
/// 200 MiB file of random bytes, a link; every time set.
fn linux_tree(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("linux-src");
    let me = src.join("home/me");
    let mut deep = me.join("deep");
    for level in 1..=24 {
        deep.push(format!("level {level}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(me.join("Documents")).unwrap();
    std::fs::create_dir_all(me.join("Videos")).unwrap();
    std::fs::create_dir_all(src.join("var/lib")).unwrap();
    std::fs::write(deep.join("leaf.txt"), b"at the bottom").unwrap();
    std::fs::write(me.join(long_name()), "ünïcødé".repeat(1000)).unwrap();
    tool(
        "head",
        Command::new("sh").arg("-c").arg(format!(
            "head -c 1000000 /dev/urandom > '{}' && head -c 209715200 /dev/urandom > '{}'",
            me.join("Documents/thesis.docx").display(),
            me.join("Videos/big.bin").display()
        )),
    );
    let sparse = std::fs::File::create(src.join("var/lib/sparse.img")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    for at in [0u64, 300 << 20, (1 << 30) - 5] {
        std::os::unix::fs::FileExt::write_all_at(&sparse, b"hello", at).unwrap();
    }
    drop(sparse);
    std::os::unix::fs::symlink("Documents/thesis.docx", me.join("latest-thesis")).unwrap();
    for (i, path) in walk(&src).iter().enumerate() {
        if !path.is_symlink() {
            set_mtime(path, 1_650_000_000 + i as u64 * 3600);
        }
    }
    src
}

/// Asserts that `restored` holds what `original` holds: the same names and kinds, bytes,
/// link targets and modification times (of folders too when `folder_times`: mtools makes
/// folders with the time it runs at, mkfs.ext4 -d copies theirs).
fn assert_same_tree(original: &Path, restored: &Path, folder_times: bool) {
    let rel = |root: &Path| {
        let mut v: Vec<std::path::PathBuf> = walk(root)
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        v.sort();
        v
    };
    let names = rel(original);
    assert_eq!(names, rel(restored), "the restored tree has other names");
    for name in names {
        let (o, r) = (original.join(&name), restored.join(&name));
        let (om, rm) = (
            std::fs::symlink_metadata(&o).unwrap(),
            std::fs::symlink_metadata(&r).unwrap(),
        );
        assert_eq!(om.file_type(), rm.file_type(), "{}", name.display());
        if om.is_symlink() {
            assert_eq!(
                std::fs::read_link(&o).unwrap(),
                std::fs::read_link(&r).unwrap()
            );
            continue;
        }
        if om.is_dir() && !folder_times {
            continue;
        }
        assert_eq!(
            om.modified().unwrap(),
            rm.modified().unwrap(),
            "the modification time of {}",
            name.display()
        );
        if om.is_file() {
            assert_eq!(om.len(), rm.len(), "{}", name.display());
            assert!(
                same_bytes(&o, &r),
                "the content of {} differs from the original",
                name.display()
            );
        }
    }
}

/// Whether two files hold the same bytes, read in pieces.
fn same_bytes(first: &Path, second: &Path) -> bool {
    use std::io::Read as _;
    let (mut one, mut other) = (
        std::fs::File::open(first).unwrap(),
        std::fs::File::open(second).unwrap(),
    );
    let (mut mine, mut theirs) = (vec![0; 1 << 20], vec![0; 1 << 20]);
    loop {
        let got = one.read(&mut mine).unwrap();
        if got == 0 {
            return other.read(&mut theirs).unwrap() == 0;
        }
        if other.read_exact(&mut theirs[..got]).is_err() || mine[..got] != theirs[..got] {
            return false;
        }
    }
}

#[test]
fn files_of_an_ext4_disk_are_listed_found_restored_and_compared() {
    let dir = ScratchDir::new("files-ext4").unwrap();
    let src = linux_tree(dir.path());
    let raw = rewind_tests::disks::ext4_gpt(dir.path(), &src, 320);
    let vm = TestVm::builder("files-ext4")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 320 * MIB),
        ])
        .define()
        .expect("define the test VM");
    vm.fill_disk("vdb", &raw).unwrap();
    let store = dir.path().join("store");
    rewind::checkpoint_json(&vm.name, &store);
    let s = store.to_str().unwrap();

    let leaf = deep_leaf();
    listed_and_found(&vm.name, s, &leaf);
    restored(&vm.name, s, &src, dir.path());
    changes_named(&vm, &store, &src, dir.path(), &leaf);
}

/// The path of the deepest file of [`linux_tree`], as `rewind files` names it.
fn deep_leaf() -> String {
    let levels: Vec<String> = (1..=24).map(|l| format!("level {l}")).collect();
    format!("vdb/p1/home/me/deep/{}/leaf.txt", levels.join("/"))
}

/// Listing a folder by label and by number, and searching by piece and pattern.
fn listed_and_found(vm: &str, s: &str, leaf: &str) {
    // A folder, by the volume's label; its entries with sizes, kinds and times.
    let listed: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files",
        vm,
        "latest",
        "linux/home/me",
        "--in",
        s,
        "--json",
    ]))
    .unwrap();
    assert_eq!(listed["path"], "vdb/p1/home/me", "{listed}");
    let entries = listed["entries"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    let long = long_name();
    assert_eq!(
        kinds,
        [
            ("deep", "folder"),
            ("Documents", "folder"),
            ("Videos", "folder"),
            (long.as_str(), "file"),
            ("latest-thesis", "symlink"),
        ],
        "{listed}"
    );
    // The same folder by partition number, and a file by itself, for people.
    let table = rewind::run_ok(&["files", vm, "latest", "vdb/p1/home/me/Videos", "--in", s]);
    assert!(
        table.contains("big.bin") && table.contains("200 MiB"),
        "{table}"
    );

    // Search, by a piece of a name and by a pattern, below a folder and everywhere.
    let found: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files", vm, "latest", "--find", "LEAF", "--in", s, "--json",
    ]))
    .unwrap();
    let paths: Vec<&str> = found["found"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, [leaf], "{found}");
    let found: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "files",
        vm,
        "latest",
        "linux/home",
        "--find",
        "*.bin",
        "--in",
        s,
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        found["found"][0]["path"], "vdb/p1/home/me/Videos/big.bin",
        "{found}"
    );
}

/// Restoring a folder and a sparse file, and what is refused.
fn restored(vm: &str, s: &str, src: &Path, dir: &Path) {
    // Restore a folder (with its deep tree, big file and link) and the sparse file.
    let out = dir.join("restored");
    std::fs::create_dir(&out).unwrap();
    let o = out.to_str().unwrap();
    let restored: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "restore-files",
        vm,
        "latest",
        "linux/home/me",
        "vdb/p1/var/lib/sparse.img",
        "--from",
        s,
        "--to",
        o,
        "--json",
    ]))
    .unwrap();
    assert_eq!(restored["links"], 1, "{restored}");
    assert_same_tree(&src.join("home/me"), &out.join("me"), true);
    assert!(same_bytes(
        &src.join("var/lib/sparse.img"),
        &out.join("sparse.img")
    ));
    let sparse = std::fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(
        sparse.modified().unwrap(),
        std::fs::metadata(src.join("var/lib/sparse.img"))
            .unwrap()
            .modified()
            .unwrap()
    );
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&sparse) * 512 < 4 * MIB,
        "the restored 1 GiB sparse file takes {} bytes on disk",
        std::os::unix::fs::MetadataExt::blocks(&sparse) * 512
    );

    // Nothing is written over: the second time is refused, and changes nothing.
    let again = rewind::run(&[
        "restore-files",
        vm,
        "latest",
        "linux/home/me/Documents",
        "linux/home/me",
        "--from",
        s,
        "--to",
        o,
    ]);
    assert_eq!(again.status.code(), Some(1));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("already exists") && said.contains("never writes over"),
        "{said}"
    );
    assert!(
        !out.join("Documents").exists(),
        "a refused restore wrote Documents"
    );

    // A path that names nothing is "not found", with what to do.
    let missing = rewind::run(&[
        "restore-files",
        vm,
        "latest",
        "linux/home/nobody",
        "--from",
        s,
        "--to",
        o,
    ]);
    assert_eq!(missing.status.code(), Some(3));
    let missing = rewind::run(&["files", vm, "latest", "nowhere/x", "--in", s]);
    assert_eq!(missing.status.code(), Some(3));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("vdb/p1 (linux)"), "{said}");
}

/// Changing files in the disk, a second checkpoint, and `rewind changes`.
fn changes_named(vm: &TestVm, store: &Path, src: &Path, dir: &Path, leaf: &str) {
    let s = store.to_str().unwrap();
    // Changes: one file changed, one deleted with its folder, one added; then a second
    // checkpoint, and exactly those are named.
    let me = src.join("home/me");
    std::fs::write(me.join("Documents/thesis.docx"), b"rewritten").unwrap();
    let level24 = leaf
        .trim_start_matches("vdb/p1/")
        .trim_end_matches("/leaf.txt");
    std::fs::remove_dir_all(src.join(level24)).unwrap();
    std::fs::write(me.join("Documents/new notes.txt"), b"new").unwrap();
    let raw = rewind_tests::disks::ext4_gpt(dir, src, 320);
    vm.fill_disk("vdb", &raw).unwrap();
    rewind::checkpoint_json(&vm.name, store);
    let changed: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "changes", &vm.name, "latest", "--in", s, "--json",
    ]))
    .unwrap();
    let mut got: Vec<(String, String)> = changed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["change"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    let level24 = format!("vdb/p1/{level24}");
    let want = [
        ("vdb/p1/home/me/Documents/new notes.txt", "added"),
        ("vdb/p1/home/me/Documents/thesis.docx", "modified"),
        (level24.as_str(), "deleted"),
        (leaf, "deleted"),
    ];
    let mut want: Vec<(String, String)> = want
        .iter()
        .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
        .collect();
    want.sort();
    assert_eq!(got, want, "{changed}");
    // For people, one line each.
    let lines = rewind::run_ok(&["changes", &vm.name, "latest", "--in", s]);
    assert!(
        lines.contains("modified  vdb/p1/home/me/Documents/thesis.docx"),
        "{lines}"
    );
}
