//! Full-state checkpoints (issue 8): memory and devices with the disks, so that restoring
//! resumes the guest where it was instead of booting it; a disk-only restore boots; a
//! damaged memory image stops the restore before anything runs.

use std::path::Path;
use std::time::Duration;

use rewind_core::store::Store;
use rewind_tests::domain::counter_line;
use rewind_tests::scratch::{ScratchDir, Tmpfs};
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const READY: &str = "REWIND-GUEST READY";

/// `rewind ARGS... --json --connect <test URI>`, which must succeed: its JSON.
fn rewind_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--json", "--connect", daemon::URI]);
    let out = crate::rewind::run_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A checkpoint of `vm` into `dest` through the CLI, full-state or not: its record.
fn checkpoint(vm: &TestVm, dest: &Path, full_state: bool) -> serde_json::Value {
    let dest = dest.to_str().unwrap();
    let mut args = vec!["checkpoint", vm.name.as_str(), "--to", dest];
    if full_state {
        args.push("--full-state");
    }
    let mut list = rewind_json(&args);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    list[0].take()
}

/// What the guest printed after the last time its counter went back (a restore): the
/// first counter line from then on, and whether it booted on the way (a READY line since
/// the counter line before). The console file may also have been started anew by QEMU.
fn after_last_restore(vm: &TestVm) -> ((u64, u64), bool) {
    let console = vm.console();
    let lines: Vec<&str> = console.lines().collect();
    let counted: Vec<(usize, (u64, u64))> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| counter_line(l).map(|c| (i, c)))
        .collect();
    let drop_at = (1..counted.len())
        .rfind(|&k| counted[k].1.0 < counted[k - 1].1.0)
        .unwrap_or(0);
    let from_line = if drop_at == 0 {
        0
    } else {
        counted[drop_at - 1].0
    };
    let booted = lines[from_line..counted[drop_at].0]
        .iter()
        .any(|l| l.contains(READY));
    (counted[drop_at].1, booted)
}

/// Waits until the guest counts again after a restore: see [`after_last_restore`].
fn wait_counting_after_restore(vm: &TestVm) -> ((u64, u64), bool) {
    vm.wait_console_until(BOOT_TIMEOUT, |_| {
        let lines = vm.counter_lines();
        let n = lines.len();
        // At least five lines in a row counting up at the end.
        n >= 5 && lines[n - 5..].windows(2).all(|w| w[1].0 == w[0].0 + 1)
    })
    .unwrap_or_else(|tail| panic!("the guest does not count; console ends with:\n{tail}"));
    after_last_restore(vm)
}

/// A booted 256 MiB test guest with one 32 MiB qcow2 disk, running `workload`.
fn booted_guest(label: &str, workload: &str) -> TestVm {
    let mut vm = TestVm::builder(label)
        .memory_mib(256)
        .workload(workload)
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm
}

/// A test guest running the `counter` workload, booted and counted to `n`.
fn counting_guest(label: &str, n: u64) -> TestVm {
    let vm = booted_guest(label, "counter");
    vm.wait_counter(n, BOOT_TIMEOUT).unwrap();
    vm
}

/// The live way merged its overlays back and kept the store's chain true: a write made
/// after checkpoint `id` is in the next checkpoint, an incremental from it.
fn assert_the_chain_goes_on_from(vm: &TestVm, dest: &Path, id: &str) {
    assert!(
        !vm.domain().xml_desc(0).unwrap().contains(".rewind-live-"),
        "the overlays are merged back"
    );
    vm.host_write("vda", 0x5a, 8 << 20, 1 << 20).unwrap();
    let after = checkpoint(vm, dest, false);
    assert_eq!(after["parent"], id, "incremental from it: {after}");
    let store = Store::open(dest, None).unwrap();
    let m = store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .find(|c| c.id == after["id"].as_str().unwrap())
        .unwrap();
    let vda = store
        .object_reader(&m.disks[0].index)
        .unwrap()
        .read_all()
        .unwrap();
    assert!(
        vda[8 << 20..9 << 20].iter().all(|&b| b == 0x5a),
        "the incremental after the live snapshot misses a write"
    );
}

#[test]
fn a_full_state_restore_resumes_the_guest_a_disk_restore_boots_it_and_undo_resumes_the_saved_session()
 {
    let vm = counting_guest("fullstate", 10);
    let dir = ScratchDir::new("fullstate-store").unwrap();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();

    // A full-state checkpoint: the guest keeps running, without a reboot.
    let (n_before, cs_before) = *vm.counter_lines().last().unwrap();
    let full = checkpoint(&vm, &dest, true);
    // QEMU started again from the saved state may have begun the console file anew.
    let (n_after, cs_after) = vm.wait_counter(n_before + 1, BOOT_TIMEOUT).unwrap();
    assert_eq!(full["kind"], "full", "{full}");
    assert!(
        full["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == "memory"),
        "{full}"
    );
    let note = full["consistency_note"].as_str().unwrap();
    assert!(note.contains("live snapshot"), "taken the live way: {note}");
    eprintln!(
        "full-state checkpoint: {note}; took {} ms",
        full["duration_ms"]
    );
    let (n_on, cs_on) = vm.wait_counter(n_after + 10, BOOT_TIMEOUT).unwrap();
    assert!(
        cs_on > cs_after && cs_after >= cs_before,
        "the guest's uptime went on: {cs_before} -> {cs_after} -> {cs_on}"
    );
    assert!(
        vm.console().matches(READY).count() <= 1,
        "the guest must not boot again"
    );
    let full_id = full["id"].as_str().unwrap().to_owned();
    assert_the_chain_goes_on_from(&vm, &dest, &full_id);

    // It counts on well past the checkpoint; then the full-state checkpoint is restored.
    let (n_later, cs_later) = vm.wait_counter(n_on + 30, BOOT_TIMEOUT).unwrap();
    let report = rewind_json(&[
        "restore",
        &vm.name,
        &full_id,
        "--from",
        dest_str,
        "--force-off",
    ]);
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(report["started"], true, "{report}");
    let ((n1, cs1), booted) = wait_counting_after_restore(&vm);
    assert!(!booted, "a full-state restore must not boot the guest");
    assert!(
        n_before < n1 && n1 <= n_after + 2 && n1 < n_later,
        "the counter goes on from the checkpoint's ({n_before}..={n_after}), not from {n_later} or 1: {n1}"
    );
    assert!(
        cs1 >= cs_before && cs1 < cs_later,
        "the uptime goes on from the checkpoint's ({cs_before} cs), not from {cs_later} cs or 0: {cs1}"
    );

    // A disk-only checkpoint restored: the guest boots, its counter starts again at 1.
    // With --save-state the running session goes into the safety checkpoint instead of
    // being shut down, so undoing the restore resumes it.
    let disk = checkpoint(&vm, &dest, false);
    assert_eq!(disk["kind"], "disk", "{disk}");
    let disk_id = disk["id"].as_str().unwrap().to_owned();
    let (n_now, _) = vm
        .wait_counter(vm.counter_lines().last().unwrap().0 + 5, BOOT_TIMEOUT)
        .unwrap();
    let report = rewind_json(&[
        "restore",
        &vm.name,
        &disk_id,
        "--from",
        dest_str,
        "--save-state",
    ]);
    assert_eq!(report["stopped"], "saved", "{report}");
    assert_eq!(report["resumed"], false, "{report}");
    assert_eq!(report["started"], true, "{report}");
    let safety_id = report["safety_checkpoint"].as_str().unwrap().to_owned();
    let ((n2, cs2), booted) = wait_counting_after_restore(&vm);
    assert!(booted, "a disk-only restore boots the guest");
    assert_eq!(
        n2, 1,
        "the in-memory counter starts again after a boot (was {n_now})"
    );
    assert!(cs2 < cs1, "the uptime starts again: {cs2} cs");
    let listed = rewind_json(&["checkpoints", &vm.name, "--in", dest_str]);
    let safety = listed["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == safety_id.as_str())
        .unwrap();
    assert_eq!(
        safety["kind"], "full",
        "the saved session is kept: {safety}"
    );

    // Undo: back to the session as it was when the restore began, without a boot.
    let report = rewind_json(&["undo-restore", &vm.name, "--from", dest_str, "--force-off"]);
    assert_eq!(report["resumed"], true, "{report}");
    let ((n3, _), booted) = wait_counting_after_restore(&vm);
    assert!(!booted, "undoing resumes the saved session");
    assert!(
        n_now < n3 && n3 <= n_now + 100,
        "the counter goes on from just before the restore ({n_now}): {n3}"
    );
}

/// Restoring full-state checkpoint `id` as a copy whose disk folder has no room for the
/// saved memory is refused before anything is made; its disks alone fit, and boot.
fn refused_for_want_of_room_beside_a_copys_disks(vm: &TestVm, dest: &Path, id: &str) {
    let small = Tmpfs::mount("small", 64 << 20).unwrap();
    let copy = format!("{} copy", vm.name);
    let copy_vm = rewind_tests::RestoredVm(copy.clone());
    let as_copy = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            vm.name.as_str(),
            id,
            "--from",
            dest.to_str().unwrap(),
            "--as",
            copy.as_str(),
            "--disk-dir",
            small.path().to_str().unwrap(),
            "--connect",
            daemon::URI,
        ];
        args.extend(extra);
        crate::rewind::run(&args)
    };
    let out = as_copy(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("not enough room")
            && stderr.contains("Nothing was changed")
            && stderr.contains("--disk-only"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(small.path()).unwrap().count(),
        0,
        "nothing was made there"
    );
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    assert!(!hv.has_vm(&copy), "no VM was defined");
    let out = as_copy(&["--disk-only", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["started"].clone(), report["resumed"].clone()),
        (true.into(), false.into()),
        "{report}"
    );
    drop(copy_vm);
}

#[test]
fn a_damaged_memory_image_is_found_before_the_vm_is_touched_and_a_disk_only_restore_boots() {
    let vm = counting_guest("fullstate-damaged", 5);
    let dir = ScratchDir::new("fullstate-damaged-store").unwrap();
    let dest = dir.path().join("store");
    let full = checkpoint(&vm, &dest, true);
    let id = full["id"].as_str().unwrap().to_owned();
    vm.wait_counter(vm.counter_lines().last().unwrap().0 + 10, BOOT_TIMEOUT)
        .unwrap();

    refused_for_want_of_room_beside_a_copys_disks(&vm, &dest, &id);

    // A chunk of the memory image goes bad on the drive.
    let store = Store::open(&dest, None).unwrap();
    let m = store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .find(|c| c.id == id)
        .unwrap();
    let memory = m.blobs.iter().find(|b| b.name == "memory").unwrap();
    let ids = store.read_page(&memory.index, 0).unwrap();
    let bad = ids[ids.len() / 2];
    let path = store.chunk_path(&bad);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let dest_str = dest.to_str().unwrap();
    let args = [
        "restore",
        vm.name.as_str(),
        id.as_str(),
        "--from",
        dest_str,
        "--force-off",
        "--connect",
        daemon::URI,
    ];
    let (n_before, _) = *vm.counter_lines().last().unwrap();
    let out = crate::rewind::run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the restore must fail");
    assert!(
        stderr.contains("cannot resume the VM where it was")
            && stderr.contains("Nothing was changed")
            && stderr.contains("--disk-only"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&bad.to_hex()),
        "names the damaged chunk: {stderr}"
    );
    // The VM was not touched: it runs on, and no safety checkpoint was taken.
    assert!(vm.domain().is_active().unwrap(), "the VM must run on");
    vm.wait_counter(n_before + 5, BOOT_TIMEOUT)
        .expect("the guest counts on without a pause or a boot");
    let store = Store::open(&dest, None).unwrap();
    assert!(
        store
            .catalog()
            .unwrap()
            .checkpoints
            .iter()
            .all(|c| c.labels.iter().all(|l| l != "safety")),
        "nothing was stopped or saved"
    );

    // What it offers works: the disks alone, and a boot.
    let report = rewind_json(&[
        "restore",
        &vm.name,
        &id,
        "--from",
        dest_str,
        "--force-off",
        "--disk-only",
    ]);
    assert_eq!(report["resumed"], false, "{report}");
    assert_eq!(report["started"], true, "{report}");
    let ((n, _), booted) = wait_counting_after_restore(&vm);
    assert!(booted && n == 1, "a disk-only restore boots the guest: {n}");
}

#[test]
fn a_capture_failing_or_killed_mid_way_loses_nothing_either_way() {
    let vm = counting_guest("fullstate-killed", 5);
    let dir = ScratchDir::new("fullstate-killed-store").unwrap();
    let dest = dir.path().join("store");
    let full_state_command = |way: &str, fault: &str| {
        let mut cmd = crate::rewind::checkpoint_command(&vm.name, &dest);
        cmd.arg("--full-state")
            .env("REWIND_FAULT", fault)
            .env(rewind_core::checkpoint::FULL_STATE_WAY_ENV, way);
        cmd.output().unwrap()
    };
    // Past `n`, and never booted again: the counter only rises, and the console shows at
    // most the first boot (QEMU started again from saved state begins it anew).
    let counting_on_from = |n: u64| {
        let (k, _) = vm.wait_counter(n + 1, BOOT_TIMEOUT).unwrap();
        let lines = vm.counter_lines();
        assert!(
            lines.windows(2).all(|w| w[1].0 > w[0].0),
            "the counter went back: the guest booted again"
        );
        let boots = vm.console().matches(READY).count();
        assert!(
            boots == 1 || (boots == 0 && lines[0].0 > 1),
            "the guest booted again"
        );
        k
    };

    // The live way. An error while the VM runs on overlays: they are merged back.
    let (n, _) = *vm.counter_lines().last().unwrap();
    let out = full_state_command("live", "after-live-snapshot");
    crate::rewind::assert_fault_injected(&out);
    assert!(
        !vm.on_live_overlay() && vm.live_overlay_files() == 0,
        "the overlays are merged and gone"
    );
    let n = counting_on_from(n);
    // Killed there: the VM runs on the overlays; the next run merges them, then works.
    let out = full_state_command("live", "abort-after-live-snapshot");
    assert!(!out.status.success());
    assert!(vm.on_live_overlay(), "the kill came while on overlays");
    let n = counting_on_from(n);
    let next = checkpoint(&vm, &dest, true);
    assert_eq!(next["kind"], "full", "{next}");
    assert!(
        !vm.on_live_overlay() && vm.live_overlay_files() == 0,
        "the next run merged them"
    );
    let n = counting_on_from(n);

    // The managed-save way. An error while the VM is saved: it runs on where it was.
    let out = full_state_command("save", "after-save");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fault injected"),
        "{stderr}"
    );
    assert!(vm.domain().is_active().unwrap(), "the VM must run again");
    let n = counting_on_from(n);
    // Killed while saved: it is off with its state kept by libvirt, and the next run
    // resumes it, then takes its checkpoint.
    let out = full_state_command("save", "abort-after-save");
    assert!(!out.status.success());
    assert!(
        !vm.domain().is_active().unwrap(),
        "the kill came while saved"
    );
    let next = checkpoint(&vm, &dest, true);
    assert_eq!(next["kind"], "full", "{next}");
    assert!(
        vm.domain().is_active().unwrap(),
        "the next run resumed the VM"
    );
    counting_on_from(n);
    assert_eq!(
        Store::open(&dest, None)
            .unwrap()
            .catalog()
            .unwrap()
            .checkpoints
            .len(),
        2
    );
}

#[test]
fn a_guest_that_writes_nothing_gets_a_live_full_state_checkpoint_too() {
    // Its overlay stays empty: merging it back must not wait for data that never comes.
    let vm = booted_guest("fullstate-idle", "idle");
    let dir = ScratchDir::new("fullstate-idle-store").unwrap();
    let dest = dir.path().join("store");
    let started = std::time::Instant::now();
    let full = checkpoint(&vm, &dest, true);
    let note = full["consistency_note"].as_str().unwrap();
    assert!(note.contains("live snapshot"), "taken the live way: {note}");
    assert!(
        !vm.domain().xml_desc(0).unwrap().contains(".rewind-live-"),
        "the overlay is merged back"
    );
    eprintln!(
        "idle guest: full-state checkpoint in {:?}",
        started.elapsed()
    );
}
