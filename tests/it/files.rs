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
    place(&disk, &efi, lbas[0]);
    let ntfs = dir.join("ntfs.img");
    sized(&ntfs, 48);
    tool(
        "mkntfs",
        Command::new("mkntfs")
            .args(["--force", "--quick", "--label", "Windows"])
            .arg(&ntfs),
    );
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
                "",
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
