//! Restore (issue 5): in place with a safety checkpoint and undo, writing only what differs;
//! a VM deleted with its disks brought back from the store alone; a new VM beside the
//! original; a damaged chunk stopping the restore; Ctrl-C and SIGKILL in the middle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rewind_core::store::{Manifest, Store};
use rewind_tests::compare::{checkpoint_bytes, image_bytes, manifest};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::workload::scan_sequence;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

mod confine;

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that the VM's disks `targets` hold exactly what checkpoint `m` has.
fn assert_disks_are(vm: &TestVm, store: &Store, m: &Manifest, targets: &[&str], what: &str) {
    for target in targets {
        assert!(
            image_bytes(&vm.disk(target).path, "qcow2") == checkpoint_bytes(store, m, target),
            "{target} is not {what}"
        );
    }
}

/// A store in a scratch folder holding one checkpoint of `vm`: the folder (removed when
/// dropped), the store's path, and the checkpoint's id.
fn store_with_checkpoint(vm: &TestVm, label: &str) -> (ScratchDir, PathBuf, String) {
    let dir = ScratchDir::new(label).unwrap();
    let dest = dir.path().join("store");
    let taken = crate::rewind::checkpoint_json(&vm.name, &dest);
    let id = taken["id"].as_str().unwrap().to_owned();
    (dir, dest, id)
}

/// A booted BIOS test guest with one 32 MiB qcow2 disk writing sequence records, `records`
/// of them flushed already.
fn booted_sequence_guest(label: &str, records: u64) -> TestVm {
    let mut vm = TestVm::builder(label)
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(records, BOOT_TIMEOUT).unwrap();
    vm
}

/// A UEFI + TPM test guest running the sequence workload, booted and writing.
fn booted_uefi_tpm_guest(label: &str) -> TestVm {
    let mut vm = TestVm::uefi_tpm_builder(label)
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(Duration::from_mins(4))
        .expect("boot with OVMF");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    vm
}

fn open(dest: &Path) -> Store {
    Store::open(dest, None).unwrap()
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

/// After the VM ran again: a restore without a safety checkpoint lets the dirty bitmap alone
/// say what to compare (only the chunks it marks are read), and is exact.
fn restore_without_safety_checkpoint_reads_what_the_bitmap_marks(
    vm: &mut TestVm,
    dest_str: &str,
    id: &str,
) {
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot again");
    vm.host_write("vdb", 0x51, 200 << 20, 64 << 10).unwrap();
    let quick = rewind_json(&[
        "restore",
        &vm.name,
        id,
        "--from",
        dest_str,
        "--force-off",
        "--no-start",
        "--no-safety-checkpoint",
    ]);
    eprintln!("restore without safety checkpoint: {quick:#}");
    assert_eq!(quick["disks"][1]["compared_by"], "dirty_bitmap", "{quick}");
    assert!(quick["safety_checkpoint"].is_null());
    let store = open(&PathBuf::from(dest_str));
    let m = manifest(&store, id);
    assert_disks_are(
        vm,
        &store,
        &m,
        &["vdb"],
        "the checkpoint's after a restore without safety checkpoint",
    );
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
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-delta-store");
    let dest_str = dest.to_str().unwrap();

    // Three 64 KiB writes in three different 1 MiB chunks of vdb, through QEMU (the dirty
    // bitmap sees them as it sees the guest's), while the guest goes on writing to vda.
    for (i, at) in [3u64, 77, 150].iter().enumerate() {
        vm.host_write("vdb", 0x41 + u8::try_from(i).unwrap(), at << 20, 64 << 10)
            .unwrap();
    }
    vm.wait_flushed(vm.last_flushed_record() + 10, BOOT_TIMEOUT)
        .unwrap();

    // The tiny guest ignores the power button: asked to shut down, it is forced off when
    // its time is up.
    let report = rewind_json(&[
        "restore",
        &vm.name,
        &id,
        "--from",
        dest_str,
        "--shutdown-timeout",
        "2",
    ]);
    eprintln!("restore: {report:#}");
    assert_eq!(report["mode"], "in_place");
    assert_eq!(report["stopped"], "forced", "{report}");
    assert_eq!(report["started"], true, "{report}");
    let vdb = &report["disks"][1];
    assert_eq!(vdb["target"], "vdb");
    assert_eq!(vdb["compared_by"], "safety_checkpoint", "{report}");
    assert_eq!(vdb["chunks"], 256);
    assert_eq!(
        vdb["chunks_written"], 3,
        "only the three chunks written since are written back: {report}"
    );
    // Only the 64 KiB the dirty bitmap marks in each: the rest of those chunks still holds
    // the checkpoint's bytes.
    assert_eq!(vdb["bytes_written"], 3 * (64 << 10), "{report}");
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
    assert_disks_are(
        &vm,
        &store,
        &safety,
        &["vda", "vdb"],
        "as it was before the restore",
    );

    restore_without_safety_checkpoint_reads_what_the_bitmap_marks(&mut vm, dest_str, &id);

    // The chain of incrementals stayed true: the next checkpoint (of the shut-off VM, from
    // its dirty bitmap) is incremental and holds exactly what is on the disks.
    let next = crate::rewind::checkpoint_json(&vm.name, &dest);
    assert_eq!(next["parent"], id.as_str(), "{next}");
    let store = open(&dest);
    let next = manifest(&store, next["id"].as_str().unwrap());
    assert_disks_are(
        &vm,
        &store,
        &next,
        &["vda", "vdb"],
        "what the checkpoint after the restores holds",
    );
    crate::rewind::run_ok(&["verify", "--in", dest_str]);
}

#[test]
fn a_vm_deleted_with_its_disks_comes_back_from_the_store_alone() {
    let mut vm = booted_sequence_guest("restore-gone", 8);
    let (_dir, dest, _) = store_with_checkpoint(&vm, "restore-gone-store");
    let dest_str = dest.to_str().unwrap();

    // Gone: the definition (with libvirt's records of its checkpoints) and the disk file.
    rewind_tests::domain::remove_domain(vm.domain()).unwrap();
    std::fs::remove_file(&vm.disk("vda").path).unwrap();
    let stderr = rewind_fails(&["checkpoints", &vm.name, "--in", "/nonexistent/store"]);
    assert!(stderr.contains("does not exist"), "{stderr}");

    // Not defined any more, the VM may have its files only where libvirt keeps VMs: its
    // scratch folder is no storage pool, so the restore is refused before it makes
    // anything, and says what to do.
    let stderr = rewind_fails(&["restore", &vm.name, "latest", "--from", dest_str]);
    assert!(
        stderr.contains("was refused, and nothing was changed")
            && stderr.contains(&format!(
                "disk vda's image \"{}\"",
                vm.disk("vda").path.display()
            ))
            && stderr.contains("virsh pool-define-as"),
        "{stderr}"
    );
    assert!(!vm.disk("vda").path.exists(), "nothing was made");
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    assert!(!hv.has_vm(&vm.uuid), "nothing was defined");

    // As a real user's VM is, its folder is a libvirt storage pool: it comes back.
    let _pool = rewind_tests::pool::TestPool::over(vm.dir()).unwrap_or_else(|e| panic!("{e}"));
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

/// The UEFI variables and TPM state folder of a test VM.
fn firmware_state(vm: &TestVm) -> (PathBuf, PathBuf) {
    let info = rewind_core::libvirt::Hypervisor::connect(daemon::URI)
        .unwrap()
        .vm(&vm.name)
        .unwrap();
    let nvram = info.firmware.nvram_path().expect("UEFI VM").clone();
    let tpm = info
        .tpm
        .and_then(|t| t.state_path)
        .expect("TPM state folder");
    (nvram, tpm)
}

/// Every file under `dir`, relative path -> content.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let content = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), content));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn in_place_restore_of_a_uefi_tpm_guest_brings_back_disk_nvram_and_tpm_state() {
    let mut vm = booted_uefi_tpm_guest("restore-uefi");
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-uefi-store");
    let dest_str = dest.to_str().unwrap();
    let (nvram, tpm_dir) = firmware_state(&vm);
    let tpm_then = files_under(&tpm_dir);
    assert!(!tpm_then.is_empty());

    // The guest goes on, then its disk is overwritten, its UEFI variables are garbled and
    // its TPM state is deleted.
    vm.wait_flushed(vm.last_flushed_record() + 10, BOOT_TIMEOUT)
        .unwrap();
    vm.host_write("vda", 0xee, 0, 2 << 20).unwrap();
    vm.destroy().unwrap();
    let mut garbled = std::fs::read(&nvram).unwrap();
    let middle = garbled.len() / 2;
    garbled[middle..middle + 64].fill(0x5a);
    std::fs::write(&nvram, &garbled).unwrap();
    std::fs::remove_dir_all(&tpm_dir).unwrap();

    let report = rewind_json(&["restore", &vm.name, &id, "--from", dest_str]);
    assert_eq!(report["stopped"], "was_off");
    assert_eq!(report["nvram"], true, "{report}");
    assert_eq!(report["tpm"], true, "{report}");
    assert_eq!(report["started"], false, "it was off, so it stays off");
    let store = open(&dest);
    let m = manifest(&store, &id);
    let blob = |name: &str| {
        let b = m.blobs.iter().find(|b| b.name == name).unwrap();
        store.object_reader(&b.index).unwrap().read_all().unwrap()
    };
    assert!(
        image_bytes(&vm.disk("vda").path, "qcow2") == checkpoint_bytes(&store, &m, "vda"),
        "the disk is not the checkpoint's"
    );
    assert!(
        std::fs::read(&nvram).unwrap() == blob("nvram"),
        "NVRAM not restored"
    );
    assert_eq!(files_under(&tpm_dir), tpm_then, "TPM state not restored");
    // The safety checkpoint kept the garbled variables (and knew there was no TPM state).
    let safety = manifest(&store, report["safety_checkpoint"].as_str().unwrap());
    let b = safety.blobs.iter().find(|b| b.name == "nvram").unwrap();
    assert!(store.object_reader(&b.index).unwrap().read_all().unwrap() == garbled);
    assert!(safety.blobs.iter().all(|b| b.name != "tpm"));

    // It boots with its TPM (swtpm must accept the restored state) and carries on.
    vm.start_and_wait_ready(Duration::from_mins(4))
        .expect("the restored UEFI + TPM guest boots");
    wait_resumed_after(&vm, last_record(&store, &m));
}

#[test]
fn restore_as_a_new_vm_runs_beside_the_original() {
    let vm = booted_sequence_guest("restore-new", 5);
    let (dir, dest, id) = store_with_checkpoint(&vm, "restore-new-store");
    let dest_str = dest.to_str().unwrap();
    let id = id.as_str();
    let copy = format!("{} Kopie", vm.name);
    let _cleanup = rewind_tests::RestoredVm(copy.clone());
    let disks = dir.path().join("copy disks");

    // Refused with what to do: a name in use, a checkpoint or VM that is not there.
    let stderr = rewind_fails(&[
        "restore", &vm.name, id, "--from", dest_str, "--as", &vm.name,
    ]);
    assert!(
        stderr.contains("exists already on") && stderr.contains("choose another name"),
        "{stderr}"
    );
    let stderr = rewind_fails(&[
        "restore",
        &vm.name,
        "20200101T000000.000Z",
        "--from",
        dest_str,
    ]);
    assert!(stderr.contains("or say `latest`"), "{stderr}");
    let stderr = rewind_fails(&["restore", "nobody", "latest", "--from", dest_str]);
    assert!(
        stderr.contains("no checkpoints of a VM named \"nobody\""),
        "{stderr}"
    );

    let report = rewind_json(&[
        "restore",
        &vm.name,
        id,
        "--from",
        dest_str,
        "--as",
        &copy,
        "--disk-dir",
        disks.to_str().unwrap(),
    ]);
    assert_eq!(report["mode"], "new_vm");
    assert_eq!(report["started"], true, "{report}");
    assert_ne!(report["vm_uuid"], vm.uuid.as_str());
    let path = PathBuf::from(report["disks"][0]["path"].as_str().unwrap());
    assert!(path.starts_with(&disks), "{report}");

    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    assert!(hv.vm(&copy).unwrap().state.is_active() && vm.domain().is_active().unwrap());
    let mac = |xml: &str| {
        let start = xml.find("<mac address='").map(|i| i + 14)?;
        Some(xml[start..start + 17].to_owned())
    };
    let (new_xml, old_xml) = (
        hv.domain_xml(&copy).unwrap(),
        hv.domain_xml(&vm.name).unwrap(),
    );
    if let (Some(a), Some(b)) = (mac(&new_xml), mac(&old_xml)) {
        assert_ne!(a, b, "the copy has its own MAC address");
    }
    // The copy carries on from the checkpoint on its own console, beside its disks (not
    // in the original's folder); the original goes on.
    let console = disks.join(format!("{copy}-console.log"));
    let store = open(&dest);
    let k = last_record(&store, &manifest(&store, id));
    let resumed = format!("RWSEQ resume after {k}");
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.lines().any(|l| l.trim() == resumed) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy did not print {resumed:?} in {}: {text}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = vm.last_flushed_record();
    vm.wait_flushed(before + 5, BOOT_TIMEOUT).unwrap();
    assert!(
        image_bytes(&path, "qcow2")[..4096 * 2]
            == checkpoint_bytes(&store, &manifest(&store, id), "vda")[..4096 * 2]
    );
    // Restoring it again under the same name is refused: it exists now.
    let stderr = rewind_fails(&["restore", &vm.name, id, "--from", dest_str, "--as", &copy]);
    assert!(stderr.contains("exists already"), "{stderr}");
}

#[test]
fn a_damaged_chunk_stops_the_restore_before_the_vm_starts_and_puts_the_disks_back() {
    let mut vm = TestVm::builder("restore-damaged")
        .workload("sequence")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 64 << 20),
        ])
        .define()
        .expect("define the test VM");
    let data = random_file(vm.dir(), "data.raw", 32);
    vm.fill_disk("vdb", &data).unwrap();
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-damaged-store");
    let dest_str = dest.to_str().unwrap();
    vm.host_write("vdb", 0x77, 5 << 20, 1 << 20).unwrap();
    vm.host_write("vdb", 0x78, 9 << 20, 1 << 20).unwrap();

    // The chunk the restore needs for vdb's slot 9 goes bad on the drive.
    let store = open(&dest);
    let m = manifest(&store, &id);
    let vdb = m.disks.iter().find(|d| d.target == "vdb").unwrap();
    let bad = store.read_page(&vdb.index, 0).unwrap()[9];
    let path = store.chunk_path(&bad);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let stderr = rewind_fails(&["restore", &vm.name, &id, "--from", dest_str, "--force-off"]);
    assert!(
        stderr.contains(&bad.to_hex()),
        "names the damaged chunk: {stderr}"
    );
    assert!(stderr.contains("rewind verify"), "{stderr}");
    assert!(
        stderr.contains("put back as it was before the restore")
            && stderr.contains("left shut off"),
        "{stderr}"
    );
    assert!(!vm.domain().is_active().unwrap(), "the VM must not start");
    let store = open(&dest);
    let safety = store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .rfind(|c| c.labels.iter().any(|l| l == "safety"))
        .expect("the safety checkpoint is kept");
    for target in ["vda", "vdb"] {
        assert!(
            image_bytes(&vm.disk(target).path, "qcow2")
                == checkpoint_bytes(&store, &safety, target),
            "{target} is not as it was before the restore"
        );
    }
    // Nothing is left half-done: the VM can be checkpointed and started.
    crate::rewind::checkpoint_json(&vm.name, &dest);
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot again");
}

/// A process whose command line names `path`, if any.
fn process_using(path: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(path))
                .then_some(pid)
        })
}

/// The note a running restore of the VM with this UUID keeps on the host.
fn marker_path(uuid: &str) -> PathBuf {
    rewind_core::notes::restoring_dir().join(format!("{uuid}.json"))
}

/// Starts `rewind restore VM ID --from DEST --force-off` and waits until it writes disks.
fn restore_until_writing(vm: &TestVm, id: &str, dest: &str) -> std::process::Child {
    let mut child = crate::rewind::command()
        .args(["restore", &vm.name, id, "--from", dest, "--force-off"])
        .args(["--connect", daemon::URI])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !marker_path(&vm.uuid).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("rewind restore ended ({status}) before it wrote anything");
        }
        assert!(
            start.elapsed() < Duration::from_mins(2),
            "the restore never began writing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn ctrl_c_mid_restore_puts_the_vm_back_and_a_killed_restore_is_finished_by_the_next() {
    let mut vm = TestVm::builder("restore-cancel")
        .disks(vec![
            DiskSpec::new("vda", Format::Raw, 16 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 1 << 30),
        ])
        .define()
        .expect("define the test VM");
    // The checkpoint holds one 640 MiB of random data, the disk another: every chunk differs,
    // so writing takes a while.
    let then = random_file(vm.dir(), "then.raw", 640);
    vm.fill_disk("vdb", &then).unwrap();
    std::fs::remove_file(&then).unwrap();
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-cancel-store");
    let dest_str = dest.to_str().unwrap();
    let now = random_file(vm.dir(), "now.raw", 640);
    vm.fill_disk("vdb", &now).unwrap();
    std::fs::remove_file(&now).unwrap();
    let current = image_bytes(&vm.disk("vdb").path, "qcow2");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");

    // Ctrl-C while the disks are written: back as before, running again.
    let child = restore_until_writing(&vm, &id, dest_str);
    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cancelled")
            && stderr.contains("is as it was before the restore and runs again"),
        "{stderr}"
    );
    assert!(vm.domain().is_active().unwrap(), "the VM runs again");
    assert!(
        image_bytes(&vm.disk("vdb").path, "qcow2") == current,
        "vdb is not as it was before the cancelled restore"
    );
    assert!(
        !marker_path(&vm.uuid).exists(),
        "the restore's note is left"
    );

    // SIGKILL while writing: nothing can roll back, and the half-written disks are not
    // taken for the VM's state …
    let mut child = restore_until_writing(&vm, &id, dest_str);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    // No qemu-nbd of the killed restore stays behind holding the image.
    let vdb = vm.disk("vdb").path.to_string_lossy().into_owned();
    let start = std::time::Instant::now();
    while let Some(pid) = process_using(&vdb) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} still serves {vdb} after its restore was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stderr = rewind_fails(&["checkpoint", &vm.name, "--to", dest_str]);
    assert!(stderr.contains("was cut short"), "{stderr}");
    // … until the restore is run again, which finishes it.
    let report = rewind_json(&["restore", &vm.name, &id, "--from", dest_str, "--force-off"]);
    assert!(
        report["safety_note"]
            .as_str()
            .unwrap_or_default()
            .contains("cut short"),
        "{report}"
    );
    let store = open(&dest);
    assert!(
        image_bytes(&vm.disk("vdb").path, "qcow2")
            == checkpoint_bytes(&store, &manifest(&store, &id), "vdb"),
        "vdb is not the checkpoint's after the second restore"
    );
    assert!(!marker_path(&vm.uuid).exists());
    crate::rewind::checkpoint_json(&vm.name, &dest);
    crate::rewind::run_ok(&["verify", "--in", dest_str]);
}

/// The workstation is gone: the VM (UEFI, TPM) is brought back from the store alone on
/// another host, reached only through a `qemu+ssh://` URI (a real sshd on loopback; the
/// "other host" is this machine's daemon, so the test can look at the files).
#[test]
fn a_uefi_tpm_vm_comes_back_on_another_host_over_ssh_from_the_store_alone() {
    let mut vm = booted_uefi_tpm_guest("restore-elsewhere");
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-elsewhere-store");
    let dest_str = dest.to_str().unwrap();
    let sshd = rewind_tests::sshd::Sshd::start().unwrap_or_else(|e| panic!("{e}"));
    let uri = sshd.libvirt_uri();
    let pool = rewind_tests::pool::TestPool::create("restore-elsewhere-pool")
        .unwrap_or_else(|e| panic!("{e}"));
    let restore_there = |extra: &[&str]| {
        let mut cmd = crate::rewind::command();
        cmd.args(["restore", &vm.name, &id, "--from", dest_str, "--json"])
            .args(["--connect", &uri, "--pool", pool.name()])
            .args(extra);
        cmd.output().unwrap()
    };

    // While the VM is there, it is not made twice.
    let out = restore_there(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is defined on") && stderr.contains("--as NAME"),
        "{stderr}"
    );

    // Gone: definition, NVRAM, TPM state, disk. What the VM boots from (the test guest's
    // kernel) is in a storage pool, as a real VM's files are.
    rewind_tests::domain::remove_domain(vm.domain()).unwrap();
    std::fs::remove_file(&vm.disk("vda").path).unwrap();
    let _vm_pool = rewind_tests::pool::TestPool::over(vm.dir()).unwrap_or_else(|e| panic!("{e}"));
    let swtpm_log = PathBuf::from(format!("/var/log/swtpm/libvirt/qemu/{}-swtpm.log", vm.name));
    let log_before = std::fs::read_to_string(&swtpm_log)
        .unwrap_or_default()
        .len();

    let out = restore_there(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("restore on another host: {report:#}");
    assert_eq!(report["mode"], "other_host");
    assert_eq!(report["vm_uuid"], vm.uuid.as_str(), "the same VM: {report}");
    assert_eq!(report["started"], true, "{report}");
    assert_eq!(
        (report["nvram"].clone(), report["tpm"].clone()),
        (true.into(), true.into())
    );
    let disk = PathBuf::from(report["disks"][0]["path"].as_str().unwrap());
    assert!(disk.starts_with(pool.path()), "{report}");

    // Its disk is the checkpoint's, it boots with its own TPM (swtpm made no new one) and
    // carries on from the checkpoint, logging beside its disk there.
    let store = open(&dest);
    let m = manifest(&store, &id);
    let console = pool.path().join("console.log");
    let resumed = format!("RWSEQ resume after {}", last_record(&store, &m));
    let deadline = std::time::Instant::now() + Duration::from_mins(4);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == resumed)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM restored over ssh did not print {resumed:?} in {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = rewind_tests::workload::scan_sequence(&image_bytes(&disk, "qcow2"));
    assert!(records.is_consistent_prefix(), "{:?}", records.problems);
    let log = std::fs::read_to_string(&swtpm_log).unwrap_or_default();
    assert!(
        !log.get(log_before..)
            .unwrap_or_default()
            .contains("manufacturing"),
        "swtpm made a new TPM instead of using the restored state"
    );
    vm.destroy().unwrap();
}

#[test]
fn a_guest_that_ignores_the_power_button_gets_a_countdown_and_is_turned_off_when_asked() {
    use rewind_core::libvirt::lifecycle::StopMode;
    use rewind_core::progress::{Control, Phase};
    use rewind_core::restore::RestoreOptions;
    const TIMEOUT: Duration = Duration::from_mins(10);
    // The tiny guest has no ACPI daemon: the power button does nothing.
    let vm = booted_sequence_guest("restore-countdown", 5);
    let (_dir, dest, id) = store_with_checkpoint(&vm, "restore-countdown-store");
    vm.wait_flushed(vm.last_flushed_record() + 10, BOOT_TIMEOUT)
        .unwrap();

    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let store = open(&dest);
    let m = manifest(&store, &id);
    let work = rewind_core::workdir::WorkDir::new().unwrap();
    let control = Control::new();
    let options = RestoreOptions {
        stop: StopMode::Graceful {
            timeout_secs: TIMEOUT.as_secs(),
            force_after: true,
        },
        ..RestoreOptions::default()
    };
    let started = std::time::Instant::now();
    let report = std::thread::scope(|s| {
        let restore = s.spawn(|| {
            rewind_core::restore::restore_in_place(&hv, &store, &m, &options, work.path(), &control)
        });
        // The countdown shows while the guest is asked to shut down, and runs down.
        let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
        let first = loop {
            if let Some(left) = control.force_off_in() {
                break left;
            }
            assert!(
                std::time::Instant::now() < deadline && !restore.is_finished(),
                "no countdown while shutting the guest down"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(control.phase(), Phase::Stopping);
        assert!(first <= TIMEOUT, "{first:?}");
        std::thread::sleep(Duration::from_millis(1500));
        let later = control.force_off_in().expect("still waiting");
        assert!(later < first, "it counts down: {first:?} then {later:?}");
        assert!(
            vm.domain().is_active().unwrap(),
            "the guest ignored the power button"
        );
        control.force_off_now();
        restore.join().unwrap()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.stopped.as_deref(), Some("forced"), "{report:?}");
    assert!(
        started.elapsed() < TIMEOUT,
        "turned off when asked, not after the whole wait"
    );
    assert_eq!(control.force_off_in(), None, "no countdown after the wait");
    assert!(report.started, "it runs again: {report:?}");
    wait_resumed_after(&vm, last_record(&store, &m));
}
