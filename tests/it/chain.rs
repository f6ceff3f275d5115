//! The chain cannot lie (issue 4): stale bitmaps are removed, and a replaced or resized disk
//! gets a full checkpoint that says why. Ctrl-C and SIGKILL in the middle of a checkpoint
//! leave nothing behind that the next run does not clean up.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::bitmaps::qcow2_bitmaps;
use rewind_core::store::Store;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

fn checkpoint(vm: &str, dest: &Path) -> serde_json::Value {
    crate::rewind::checkpoint_json(vm, dest)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stale_bitmaps_go_and_a_replaced_or_resized_disk_gets_a_full_checkpoint_saying_why() {
    let mut vm = TestVm::builder("chain")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    let disk = vm.disk("vda").path.clone();
    // Left by an earlier Rewind whose libvirt metadata was lost (say, a reinstalled host).
    let stale = "rewind-0123456789ab-20250101T000000000Z";
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-f", "qcow2"])
        .arg(&disk)
        .arg(stale));
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("chain-store").unwrap();
    let dest = dir.path().join("store");
    let hv = Hypervisor::connect(daemon::URI).unwrap();

    let first = checkpoint(&vm.name, &dest);
    assert!(first["full_reason"].is_null(), "{first}");
    let second = checkpoint(&vm.name, &dest);
    assert_eq!(second["parent"], first["id"], "{second}");
    let ours = hv.checkpoint_names(&vm.name).unwrap();
    assert_eq!(ours.len(), 1, "{ours:?}");
    // Bitmaps reach the image header when QEMU closes it.
    vm.destroy().unwrap();
    assert_eq!(
        qcow2_bitmaps(&disk).unwrap(),
        ours,
        "the stale bitmap is gone and only the current checkpoint's remains"
    );

    // The disk replaced by a copy of itself (same data, no bitmaps): libvirt still has the
    // checkpoint, but its bitmap is not in the new image.
    let copy = disk.with_extension("copy.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2"])
        .arg(&disk)
        .arg(&copy));
    std::fs::rename(&copy, &disk).unwrap();
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot again");
    let third = checkpoint(&vm.name, &dest);
    assert!(third["parent"].is_null(), "{third}");
    let reason = third["full_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("refused the incremental"), "{third}");
    assert_eq!(
        hv.checkpoint_names(&vm.name).unwrap().len(),
        1,
        "the checkpoint whose bitmap vanished is not kept"
    );
    let fourth = checkpoint(&vm.name, &dest);
    assert_eq!(fourth["parent"], third["id"], "{fourth}");

    // Resized while running: the next checkpoint is full.
    vm.resize_disk("vda", 48 << 20).unwrap();
    let fifth = checkpoint(&vm.name, &dest);
    assert!(fifth["parent"].is_null(), "{fifth}");
    let reason = fifth["full_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("resized"), "{fifth}");
    assert_eq!(fifth["disks"][0]["size_bytes"], 48 << 20, "{fifth}");
    crate::rewind::run_ok(&["verify", "--in", dest.to_str().unwrap()]);
}

/// Whether VM `vm` runs on a live snapshot's overlay (a full checkpoint is copying).
fn on_overlay(hv: &Hypervisor, vm: &str) -> bool {
    hv.domain_xml(vm).unwrap().contains(".rewind-live-")
}

/// Waits until the checkpoint is copying: the VM has a backup job (an incremental, or a
/// full over the export), or runs on a live snapshot's overlay (a full read from the
/// image under it). Fails after a minute.
fn wait_for_copy(hv: &Hypervisor, vm: &str, child: &mut std::process::Child) {
    let start = Instant::now();
    while hv.backup_job_xml(vm).unwrap().is_none() && !on_overlay(hv, vm) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rewind checkpoint ended ({status}) before it could be interrupted");
        }
        assert!(
            start.elapsed() < Duration::from_mins(1),
            "the checkpoint never began copying"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ctrl_c_cancels_cleanly_and_a_killed_checkpoint_is_cleaned_up_by_the_next() {
    let mut vm = TestVm::builder("cancel")
        .workload("idle")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 1 << 30)])
        .define()
        .expect("define the test VM");
    // 768 MiB that does not compress, so that copying takes a while.
    let raw = vm.dir().join("random.raw");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=768", "status=none"])
        .arg(format!("of={}", raw.display())));
    vm.fill_disk("vda", &raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    let dir = rewind_tests::scratch::ScratchDir::new("cancel-store").unwrap();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();
    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let spawn = || {
        crate::rewind::command()
            .args([
                "checkpoint",
                &vm.name,
                "--to",
                dest_str,
                "--connect",
                daemon::URI,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Ctrl-C while copying (a first checkpoint: a full, read from under an overlay).
    let mut child = spawn();
    wait_for_copy(&hv, &vm.name, &mut child);
    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    let store = Store::open(&dest, None).unwrap();
    assert!(store.catalog().unwrap().checkpoints.is_empty());
    assert!(
        hv.backup_job_xml(&vm.name).unwrap().is_none(),
        "a job is left"
    );
    assert!(
        !vm.on_live_overlay() && vm.live_overlay_files() == 0,
        "an overlay is left"
    );
    assert!(
        hv.checkpoint_names(&vm.name).unwrap().is_empty(),
        "a libvirt checkpoint is left"
    );

    // SIGKILL while copying: nothing can clean up, so the VM still runs on its overlay …
    let mut child = spawn();
    wait_for_copy(&hv, &vm.name, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        on_overlay(&hv, &vm.name),
        "the kill came while on the overlay"
    );
    // … until the next checkpoint, which merges it back, works and leaves only its own
    // state.
    let taken = checkpoint(&vm.name, &dest);
    assert!(taken["full_reason"].is_null(), "{taken}");
    assert!(
        hv.backup_job_xml(&vm.name).unwrap().is_none(),
        "a job is left"
    );
    assert!(
        !vm.on_live_overlay() && vm.live_overlay_files() == 0,
        "an overlay is left"
    );
    assert_eq!(hv.checkpoint_names(&vm.name).unwrap().len(), 1);
    assert_eq!(store.catalog().unwrap().checkpoints.len(), 1);
    crate::rewind::run_ok(&["verify", "--in", dest_str]);
}

/// Issue 4: every writable disk is captured — a raw disk (no bitmaps possible: read whole
/// each time, while the qcow2 disks stay incremental) and a qcow2 disk over a backing file
/// (the export shows the whole chain).
#[test]
fn raw_disks_and_backing_chains_are_captured_next_to_incremental_qcow2_disks() {
    let mut vm = TestVm::builder("mixed")
        .workload("sequence")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Raw, 16 << 20),
            DiskSpec::new("vdc", Format::Qcow2, 16 << 20).with_backing_file(),
        ])
        .define()
        .expect("define the test VM");
    let base = vm.disk("vdc").backing.clone().unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 1M"])
        .arg(&base));
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    vm.host_write("vdb", 0x5a, 4 << 20, 64 << 10).unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("mixed-store").unwrap();
    let dest = dir.path().join("store");

    let first = checkpoint(&vm.name, &dest);
    assert!(first["full_reason"].is_null(), "{first}");
    vm.host_write("vdb", 0x6b, 8 << 20, 64 << 10).unwrap();
    vm.host_write("vdc", 0x7c, 2 << 20, 64 << 10).unwrap();
    let second = checkpoint(&vm.name, &dest);
    assert_eq!(second["parent"], first["id"], "{second}");

    let store = Store::open(&dest, None).unwrap();
    let m = store.catalog().unwrap().checkpoints.pop().unwrap();
    let disk = |target: &str| {
        let d = m.disks.iter().find(|d| d.target == target).unwrap();
        store.object_reader(&d.index).unwrap().read_all().unwrap()
    };
    let vdb = disk("vdb");
    assert!(
        vdb[4 << 20..(4 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert!(
        vdb[8 << 20..(8 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0x6b)
    );
    let vdc = disk("vdc");
    assert!(
        vdc[..1 << 20].iter().all(|&b| b == 0x42),
        "the backing file's data"
    );
    assert!(
        vdc[2 << 20..(2 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0x7c)
    );
    // The incremental read the raw disk's allocated chunks again (the two written, and the
    // first, which qemu-img allocates when it creates a raw image), but of the qcow2 disks
    // only the chunk each that was written since the first checkpoint.
    let read = second["read_bytes"].as_u64().unwrap();
    assert!(read <= 5 << 20, "the incremental read {read} bytes");
    crate::rewind::run_ok(&["verify", "--in", dest.to_str().unwrap()]);
}
