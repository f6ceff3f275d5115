//! Restore (issue 5): in place with a safety checkpoint and undo, writing only what differs;
//! a VM deleted with its disks brought back from the store alone; a new VM beside the
//! original; a damaged chunk stopping the restore; Ctrl-C and SIGKILL in the middle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rewind_core::store::{Manifest, Store};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::workload::scan_sequence;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest-visible bytes of a disk image (also of a running VM's: `-U`).
fn image_bytes(path: &Path, format: &str) -> Vec<u8> {
    let raw = path.with_extension("compare.raw");
    let _ = std::fs::remove_file(&raw);
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// Disk `target` of checkpoint `m`, read back out of the store.
fn checkpoint_bytes(store: &Store, m: &Manifest, target: &str) -> Vec<u8> {
    let disk = m.disks.iter().find(|d| d.target == target).unwrap();
    store
        .object_reader(&disk.index)
        .unwrap()
        .read_all()
        .unwrap()
}

fn open(dest: &Path) -> Store {
    Store::open(dest, None).unwrap()
}

fn manifest(store: &Store, id: &str) -> Manifest {
    store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("no checkpoint {id}"))
}

/// `rewind ARGS... --json --connect <test URI>`, which must succeed: its JSON.
fn rewind_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--json", "--connect", daemon::URI]);
    let out = crate::rewind::run_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `rewind ARGS... --connect <test URI>`, which must fail: its stderr.
fn rewind_fails(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--connect", daemon::URI]);
    let out = crate::rewind::run(&all);
    assert!(
        !out.status.success(),
        "rewind {all:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the guest's console says its sequence workload resumed after record `k`
/// and has flushed record `k + 3` since.
fn wait_resumed_after(vm: &TestVm, k: u64) {
    let resumed = format!("RWSEQ resume after {k}");
    vm.wait_console_until(BOOT_TIMEOUT, |c| c.lines().any(|l| l.trim() == resumed))
        .unwrap_or_else(|tail| {
            panic!("the guest did not print {resumed:?}; console ends with:\n{tail}")
        });
    vm.wait_flushed(k + 3, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The last record a checkpoint's `vda` holds (the sequence workload's).
fn last_record(store: &Store, m: &Manifest) -> u64 {
    let scan = scan_sequence(&checkpoint_bytes(store, m, "vda"));
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    scan.last_valid
}

/// Random data nobody can compress, as a file QEMU can read.
fn random_file(dir: &Path, name: &str, mib: u32) -> PathBuf {
    let path = dir.join(name);
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("count={mib}"))
        .arg(format!("of={}", path.display())));
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    path
}

#[test]
fn delta_restore_writes_only_what_changed_and_undo_brings_back_the_state_before() {
    let mut vm = TestVm::builder("restore-delta")
        .workload("sequence")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 256 << 20),
        ])
        .define()
        .expect("define the test VM");
    let data = random_file(vm.dir(), "data.raw", 192);
    vm.fill_disk("vdb", &data).unwrap();
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let dir = ScratchDir::new("restore-delta-store").unwrap();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();
    let first = crate::rewind::checkpoint_json(&vm.name, &dest);
    let id = first["id"].as_str().unwrap().to_owned();

    // Three 64 KiB writes in three different 1 MiB chunks of vdb, through QEMU (the dirty
    // bitmap sees them as it sees the guest's), while the guest goes on writing to vda.
    for (i, at) in [3u64, 77, 150].iter().enumerate() {
        vm.host_write("vdb", 0x41 + u8::try_from(i).unwrap(), at << 20, 64 << 10)
            .unwrap();
    }
    vm.wait_flushed(vm.last_flushed_record() + 10, BOOT_TIMEOUT)
        .unwrap();

    let report = rewind_json(&["restore", &vm.name, &id, "--from", dest_str, "--force-off"]);
    eprintln!("restore: {report:#}");
    assert_eq!(report["mode"], "in_place");
    assert_eq!(report["stopped"], "forced");
    assert_eq!(report["started"], true, "{report}");
    let vdb = &report["disks"][1];
    assert_eq!(vdb["target"], "vdb");
    assert_eq!(vdb["compared_by"], "safety_checkpoint", "{report}");
    assert_eq!(vdb["chunks"], 256);
    assert_eq!(
        vdb["chunks_written"], 3,
        "only the three chunks written since are written back: {report}"
    );
    assert_eq!(vdb["bytes_written"], 3 << 20);
    assert_eq!(vdb["chunks_verified"], 3);

    // The safety checkpoint holds the state from just before, and was itself taken from
    // the dirty bitmap: it read only what had changed since the first checkpoint.
    let store = open(&dest);
    let safety_id = report["safety_checkpoint"].as_str().unwrap();
    let safety = manifest(&store, safety_id);
    assert_eq!(safety.labels, vec!["safety".to_owned()]);
    assert_eq!(safety.parent.as_deref(), Some(id.as_str()), "{safety:?}");
    assert!(
        safety.read_bytes <= 8 << 20,
        "the safety checkpoint read {} bytes",
        safety.read_bytes
    );
    let before = checkpoint_bytes(&store, &safety, "vdb");
    assert!(before[(3 << 20)..(3 << 20) + 4].iter().all(|&b| b == 0x41));

    // The disks are the checkpoint's, byte for byte, and the guest carried on from it.
    let m = manifest(&store, &id);
    let k = last_record(&store, &m);
    wait_resumed_after(&vm, k);
    assert!(
        image_bytes(&vm.disk("vdb").path, "qcow2") == checkpoint_bytes(&store, &m, "vdb"),
        "vdb differs from the checkpoint"
    );

    // Undo: back to the safety checkpoint, exactly.
    let undo = rewind_json(&[
        "undo-restore",
        &vm.name,
        "--from",
        dest_str,
        "--force-off",
        "--no-start",
    ]);
    assert_eq!(undo["checkpoint"], safety_id, "{undo}");
    assert_eq!(undo["started"], false);
    let store = open(&dest);
    for target in ["vda", "vdb"] {
        let disk = vm.disk(target);
        assert!(
            image_bytes(&disk.path, "qcow2") == checkpoint_bytes(&store, &safety, target),
            "{target} is not as it was before the restore"
        );
    }

    // The chain of incrementals stayed true: the next checkpoint (of the shut-off VM, from
    // its dirty bitmap) is incremental and holds exactly what is on the disks.
    let next = crate::rewind::checkpoint_json(&vm.name, &dest);
    assert_eq!(next["parent"], id.as_str(), "{next}");
    let store = open(&dest);
    let next = manifest(&store, next["id"].as_str().unwrap());
    for target in ["vda", "vdb"] {
        assert!(
            image_bytes(&vm.disk(target).path, "qcow2") == checkpoint_bytes(&store, &next, target),
            "{target}: the checkpoint after the restores differs from the disk"
        );
    }
    crate::rewind::run_ok(&["verify", "--in", dest_str]);
}

#[test]
fn a_vm_deleted_with_its_disks_comes_back_from_the_store_alone() {
    let mut vm = TestVm::builder("restore-gone")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(8, BOOT_TIMEOUT).unwrap();
    let dir = ScratchDir::new("restore-gone-store").unwrap();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();
    crate::rewind::checkpoint_json(&vm.name, &dest);

    // Gone: the definition (with libvirt's records of its checkpoints) and the disk file.
    rewind_tests::domain::remove_domain(vm.domain()).unwrap();
    std::fs::remove_file(&vm.disk("vda").path).unwrap();
    let stderr = rewind_fails(&["checkpoints", &vm.name, "--in", "/nonexistent/store"]);
    assert!(stderr.contains("does not exist"), "{stderr}");

    let report = rewind_json(&["restore", &vm.name, "latest", "--from", dest_str]);
    assert_eq!(report["defined"], true, "{report}");
    assert_eq!(report["stopped"], "was_off");
    assert!(report["safety_checkpoint"].is_null());
    assert!(
        report["safety_note"]
            .as_str()
            .unwrap_or_default()
            .contains("not defined"),
        "{report}"
    );
    assert_eq!(report["disks"][0]["compared_by"], "new_file");
    // It was not running when restored, so it stays off until asked.
    assert_eq!(report["started"], false);
    let store = open(&dest);
    let m = store.catalog().unwrap().checkpoints.pop().unwrap();
    assert!(
        image_bytes(&vm.disk("vda").path, "qcow2") == checkpoint_bytes(&store, &m, "vda"),
        "the recreated disk differs from the checkpoint"
    );
    vm.start().unwrap();
    wait_resumed_after(&vm, last_record(&store, &m));
}
