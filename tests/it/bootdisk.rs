//! A test guest that boots from its own disk, as an installed system does (with a BIOS:
//! `SeaBIOS`, then syslinux from the MBR and the boot partition; with UEFI and Secure Boot:
//! OVMF, then shim and GRUB; then the kernel), and that no longer boots once its boot
//! sector is zeroed: what a boot-check (issue 23) has to tell apart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rewind_tests::domain::TestDisk;
use rewind_tests::guest::READY_MARKER;
use rewind_tests::workload::scan_sequence_file;
use rewind_tests::{DiskSpec, Format, TestVm, assert_success};

const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
/// How long a guest with a zeroed boot sector must show no sign of a kernel (TCG boots the
/// good disk's kernel in well under this).
const NO_BOOT_FOR: Duration = Duration::from_mins(1);
/// Console lines that only a booting boot loader or kernel print.
const BOOT_SIGNS: &[&str] = &[
    "SYSLINUX",
    "Loading /vmlinuz",
    "Welcome to GRUB",
    "EFI stub",
    "Linux version",
    READY_MARKER,
];

/// The first 512 bytes of a disk image (`qemu-img dd`, any format), read through a file in
/// `work`.
fn first_sector(disk: &TestDisk, work: &Path) -> Vec<u8> {
    let out_path = work.join("sector0.raw");
    let out = Command::new("qemu-img")
        .args([
            "dd",
            "-f",
            disk.format.name(),
            "-O",
            "raw",
            "bs=512",
            "count=1",
        ])
        .arg(format!("if={}", disk.path.display()))
        .arg(format!("of={}", out_path.display()))
        .output()
        .unwrap();
    assert_success("qemu-img dd of the first sector", &out);
    let bytes = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    bytes
}

/// Zeroes the first 512 bytes of a disk image of a VM that is shut off: `qemu-io` for
/// qcow2 (the change goes through QEMU's block layer, as a guest's would), `dd` for raw.
fn zero_boot_sector(disk: &TestDisk) {
    let out = match disk.format {
        Format::Qcow2 => Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -z 0 512"])
            .arg(&disk.path)
            .output(),
        Format::Raw => Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=512",
                "count=1",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", disk.path.display()))
            .output(),
    }
    .unwrap();
    assert_success("zeroing the boot sector", &out);
}

fn console_path(vm: &TestVm) -> PathBuf {
    vm.dir().join("console.log")
}

/// What one firmware prints.
struct Firmware {
    /// On the console of a VM that booted from its disk.
    booted: &'static [&'static str],
    /// On the console of a VM whose disk has no boot sector.
    failed: &'static [&'static str],
    /// Files of the boot partition's `EFI/BOOT` that Rewind must list from a checkpoint of
    /// the disk (none: not checked).
    efi_boot_files: &'static [&'static str],
}

const SEABIOS: Firmware = Firmware {
    booted: &["Booting from Hard Disk", "SYSLINUX", "Loading /vmlinuz"],
    failed: &["Boot failed: not a bootable disk", "No bootable device"],
    efi_boot_files: &[],
};

const OVMF_SECURE_BOOT: Firmware = Firmware {
    booted: &["Welcome to GRUB!", "EFI stub: UEFI Secure Boot is enabled."],
    failed: &[
        "BdsDxe: failed to load",
        "No bootable option or device was found",
    ],
    efi_boot_files: &["BOOTX64.EFI", "grubx64.efi"],
};

#[test]
fn boots_from_its_disk_and_not_once_its_boot_sector_is_zeroed() {
    let vm = TestVm::builder("bootdisk")
        .boot_from_disk()
        .workload("sequence")
        .guest_agent()
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 64 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 32 << 20),
        ])
        .define()
        .unwrap_or_else(|e| panic!("{e}"));
    boots_then_not_once_zeroed(vm, &SEABIOS, "BIOS");
}

#[test]
fn uefi_secure_boot_vm_boots_from_its_disk_and_not_once_its_boot_sector_is_zeroed() {
    // vda a 32 MiB qcow2 (grown to hold the boot image), vdb added beside it.
    let vm = TestVm::uefi_tpm_builder("bootdisk-uefi")
        .boot_from_disk()
        .guest_agent()
        .define()
        .unwrap_or_else(|e| panic!("{e}"));
    boots_then_not_once_zeroed(vm, &OVMF_SECURE_BOOT, "UEFI");
}

/// Boots `vm` (workload `sequence`, guest agent) from its disk `vda` and checks what
/// `firmware` and the guest print, the agent and the records on `vdb`; then shuts it off,
/// zeroes `vda`'s first 512 bytes and checks that it no longer boots.
fn boots_then_not_once_zeroed(mut vm: TestVm, firmware: &Firmware, what: &str) {
    let xml = vm.domain().xml_desc(0).unwrap();
    assert!(
        !xml.contains("<kernel>") && !xml.contains("<initrd>"),
        "a VM that boots from its disk must not be given a kernel:\n{xml}"
    );
    let vda = vm.disk("vda").clone();
    let vdb = vm.disk("vdb").clone();
    let mbr = first_sector(&vda, vm.dir());
    assert_eq!(&mbr[510..], &[0x55, 0xaa], "vda has no MBR signature");

    // It boots from vda, runs the workload on vdb, and its agent answers.
    let started = Instant::now();
    vm.start_and_wait_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let ready_after = started.elapsed();
    let console = vm.console();
    for sign in firmware.booted {
        assert!(
            console.contains(sign),
            "the console does not show {sign:?}: did the VM boot from its disk?\n{console}"
        );
    }
    vm.wait_flushed(5, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_agent_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{what}: booted from vda, ready {:.1} s after the start; 5 records and the agent after \
         {:.1} s",
        ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    vm.destroy().unwrap_or_else(|e| panic!("{e}"));

    // The records are on vdb, and the boot sector is untouched by them.
    let scan = scan_sequence_file(&vdb.path, vdb.format.name()).unwrap();
    assert!(
        scan.is_consistent_prefix() && scan.last_valid >= 5,
        "vdb should hold records 1..=k, k >= 5: {scan:?}"
    );
    assert_eq!(
        first_sector(&vda, vm.dir()),
        mbr,
        "the workload changed vda's MBR"
    );

    if !firmware.efi_boot_files.is_empty() {
        boot_files_are_read_from_a_checkpoint(&vm, firmware.efi_boot_files);
    }

    // Zeroed boot sector: the firmware finds nothing to boot, and no kernel ever starts.
    zero_boot_sector(&vda);
    assert_eq!(first_sector(&vda, vm.dir()), vec![0u8; 512]);
    // Only what the second start prints.
    std::fs::OpenOptions::new()
        .write(true)
        .open(console_path(&vm))
        .and_then(|f| f.set_len(0))
        .unwrap();
    let started = Instant::now();
    vm.start().unwrap_or_else(|e| panic!("{e}"));
    let mut failed_after = None;
    while started.elapsed() < NO_BOOT_FOR {
        let console = vm.console();
        if let Some(sign) = BOOT_SIGNS.iter().find(|s| console.contains(*s)) {
            panic!(
                "{what}: a VM with a zeroed boot sector booted (the console shows \
                 {sign:?}):\n{console}"
            );
        }
        if failed_after.is_none() && firmware.failed.iter().all(|s| console.contains(s)) {
            failed_after = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        vm.domain().is_active().unwrap(),
        "the VM should still be running, stuck in the firmware"
    );
    let console = vm.console();
    let failed_after = failed_after.unwrap_or_else(|| {
        panic!(
            "{what}: the firmware should say it found nothing to boot ({:?}):\n{console}",
            firmware.failed
        )
    });
    eprintln!(
        "{what}: zeroed boot sector, the firmware said {:?} {:.1} s after the start; no \
         kernel within {NO_BOOT_FOR:?}",
        firmware.failed,
        failed_after.as_secs_f64()
    );
}

/// The boot partition of `vm`'s own disk, as the VM booted from it, is read from a
/// checkpoint: listed by its label, its `EFI/BOOT` folder holds `efi_boot_files`, and the
/// kernel restored from it is the one the disk was made with.
fn boot_files_are_read_from_a_checkpoint(vm: &TestVm, efi_boot_files: &[&str]) {
    let store = vm.dir().join("files-store");
    crate::rewind::checkpoint_json(&vm.name, &store);
    let s = store.to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&crate::rewind::run_ok(args)).unwrap()
    };
    let listed = json(&["files", &vm.name, "latest", "--in", s, "--json"]);
    let vda = listed["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == "vda")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(vda["partition_table"], "mbr", "{vda}");
    assert_eq!(vda["volumes"][0]["label"], "RWBOOT", "{vda}");
    let efi = json(&[
        "files",
        &vm.name,
        "latest",
        "RWBOOT/EFI/BOOT",
        "--in",
        s,
        "--json",
    ]);
    let names: Vec<&str> = efi["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in efi_boot_files {
        assert!(names.contains(name), "{name} not in {names:?}");
    }
    let out = vm.dir().join("restored");
    std::fs::create_dir(&out).unwrap();
    crate::rewind::run_ok(&[
        "restore-files",
        &vm.name,
        "latest",
        "RWBOOT/vmlinuz",
        "--from",
        s,
        "--to",
        out.to_str().unwrap(),
    ]);
    let kernel = &rewind_tests::guest_image().unwrap().kernel;
    assert!(
        std::fs::read(out.join("vmlinuz")).unwrap() == std::fs::read(kernel).unwrap(),
        "the kernel restored from the boot partition differs from {}",
        kernel.display()
    );
}

/// A file of the boot partition of a raw disk image (`mtype`, the partition at 1 MiB).
fn boot_file(raw: &Path, name: &str) -> String {
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!(
            "{}@@{}",
            raw.display(),
            rewind_tests::bootdisk::PARTITION_START_BYTES
        ))
        .arg(format!("::/{name}"))
        .output()
        .unwrap();
    assert_success(&format!("mtype {name}"), &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The virtual size of a disk image (`qemu-img info`).
fn virtual_size(disk: &TestDisk) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&disk.path)
        .output()
        .unwrap();
    assert_success("qemu-img info", &out);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

#[test]
fn a_boot_disk_carries_the_kernel_command_line_and_the_workload_gets_its_own_disk() {
    let image = rewind_tests::bootdisk::boot_image().unwrap_or_else(|e| panic!("{e}"));
    // One raw disk: the boot disk keeps it, the workload gets a second one like it.
    let vm = TestVm::builder("bootdisk-raw")
        .boot_from_disk()
        .workload("sequence")
        .define()
        .unwrap_or_else(|e| panic!("{e}"));
    let targets: Vec<&str> = vm.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["vda", "vdb"]);
    let (vda, vdb) = (vm.disk("vda"), vm.disk("vdb"));
    assert_eq!((vda.format, vdb.format), (Format::Raw, Format::Raw));
    assert_eq!((vda.size_bytes, vdb.size_bytes), (64 << 20, 64 << 20));
    for cfg in [
        boot_file(&vda.path, "syslinux.cfg"),
        boot_file(&vda.path, "EFI/BOOT/grub.cfg"),
    ] {
        assert!(
            cfg.contains("console=ttyS0 panic=-1 rw.workload=sequence rw.disk=vdb\n"),
            "the boot configuration should run the workload on vdb:\n{cfg}"
        );
    }
    let xml = vm.domain().xml_desc(0).unwrap();
    assert!(xml.contains("<bios useserial='yes'/>"), "{xml}");
    // dd zeroes a raw disk's boot sector and nothing else.
    let before = std::fs::read(&vda.path).unwrap();
    zero_boot_sector(vda);
    let after = std::fs::read(&vda.path).unwrap();
    assert_eq!(&after[..512], &[0u8; 512]);
    assert_eq!(after[512..], before[512..]);

    // A UEFI VM's small first disk grows to hold the image, and the VM gets the memory
    // GRUB needs; the boot partition cannot hold a file system for the guest.
    let vm = TestVm::uefi_tpm_builder("bootdisk-grow")
        .boot_from_disk()
        .define()
        .unwrap_or_else(|e| panic!("{e}"));
    let vda = vm.disk("vda");
    assert_eq!(vda.size_bytes, image.size_bytes.max(32 << 20));
    assert_eq!(virtual_size(vda), vda.size_bytes);
    assert_eq!(virtual_size(vm.disk("vdb")), 32 << 20);
    let xml = vm.domain().xml_desc(0).unwrap();
    assert!(!xml.contains("<bios"), "{xml}");
    let memory_kib = rewind_tests::bootdisk::UEFI_MIN_MEMORY_MIB * 1024;
    assert!(
        xml.contains(&format!("<memory unit='KiB'>{memory_kib}</memory>")),
        "{xml}"
    );
    let refused = TestVm::builder("bootdisk-fs")
        .boot_from_disk()
        .filesystem("vda")
        .define()
        .unwrap_err();
    assert!(refused.0.contains("holds the boot partition"), "{refused}");
}
