//! Boot-checks (issue 23): a throwaway, isolated copy of a checkpoint started straight from
//! the store, judged, and removed without a trace while the original VM runs on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rewind_tests::scratch::ScratchDir;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

/// `rewind boot-check VM latest --from DEST --json` with its state and work folders in
/// `dir`: its output.
fn boot_check(vm: &str, dest: &Path, dir: &Path, timeout_secs: u64) -> std::process::Output {
    let mut cmd: Command = crate::rewind::command();
    cmd.args(["boot-check", vm, "latest", "--from"])
        .arg(dest)
        .args([
            "--timeout",
            &timeout_secs.to_string(),
            "--json",
            "--connect",
            daemon::URI,
        ])
        .env("REWIND_STATE_DIR", dir.join("state"))
        .env("REWIND_WORK_DIR", dir.join("work"));
    cmd.output().unwrap()
}

/// [`boot_check`], which must succeed: its JSON report.
fn boot_check_ok(vm: &str, dest: &Path, dir: &Path) -> serde_json::Value {
    let out = boot_check(vm, dest, dir, 300);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boot-check failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

/// The names of the VMs libvirt knows that are boot-check copies of `vm`.
fn clones_of(vm: &str) -> Vec<String> {
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    hv.list_vms()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .filter(|n| n.starts_with(vm) && n.contains("boot-check"))
        .collect()
}

/// What is left in the work folder (the clones' folders, sockets, overlays, NVRAM copies).
fn left_in(work: &Path) -> Vec<String> {
    std::fs::read_dir(work)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_boot_check_boots_a_copy_from_the_store_keeps_its_screen_and_leaves_nothing_behind() {
    let mut vm = TestVm::builder("bootcheck")
        .workload("sequence")
        .guest_agent()
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let dir = ScratchDir::new("bootcheck").unwrap();
    let dest = dir.path().join("store");
    let taken = crate::rewind::checkpoint_json(&vm.name, &dest);
    let id = taken["id"].as_str().unwrap().to_owned();
    let before = vm.last_flushed_record();

    let report = boot_check_ok(&vm.name, &dest, dir.path());
    assert_eq!(report["booted"], true, "{report}");
    assert_eq!(report["checkpoint"], id.as_str());
    assert_eq!(report["outcome"]["outcome"], "booted", "{report}");
    assert_eq!(report["outcome"]["signal"], "agent", "{report}");

    // Its screen is kept as a small picture that is not blank.
    let png = Path::new(
        report["thumbnail_path"]
            .as_str()
            .unwrap_or_else(|| panic!("no thumbnail: {report}")),
    );
    assert!(
        png.starts_with(dir.path().join("state")),
        "{}",
        png.display()
    );
    let picture = image::open(png).unwrap().to_rgb8();
    assert!(picture.width() <= 320 && picture.height() <= 320);
    let first = picture.get_pixel(0, 0);
    assert!(
        picture.pixels().any(|p| p != first),
        "the thumbnail is one colour"
    );

    // Nothing is left: no domain, no folder (overlays, sockets, NVRAM copy), no process
    // holding the store.
    assert_eq!(clones_of(&vm.name), Vec::<String>::new());
    assert_eq!(left_in(&dir.path().join("work")), Vec::<String>::new());
    // The original ran on throughout, untouched.
    assert!(vm.domain().is_active().unwrap());
    vm.wait_flushed(before + 3, BOOT_TIMEOUT).unwrap();
}

/// The sequence workload's last record in checkpoint `id`'s disk `target`.
fn last_record(dest: &Path, id: &str, target: &str) -> u64 {
    let store = rewind_core::store::Store::open(dest, None).unwrap();
    let m = rewind_tests::compare::manifest(&store, id);
    let scan = rewind_tests::workload::scan_sequence(&rewind_tests::compare::checkpoint_bytes(
        &store, &m, target,
    ));
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    scan.last_valid
}

#[test]
fn a_clone_boots_from_its_disk_through_the_export_with_the_checkpoints_records_and_a_zeroed_boot_sector_fails()
 {
    let mut vm = TestVm::builder("bootcheck-disk")
        .boot_from_disk()
        .workload("sequence")
        .guest_agent()
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 64 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 32 << 20),
        ])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let dir = ScratchDir::new("bootcheck-disk").unwrap();
    let dest = dir.path().join("store");
    let taken = crate::rewind::checkpoint_json(&vm.name, &dest);
    let id = taken["id"].as_str().unwrap().to_owned();
    let k = last_record(&dest, &id, "vdb");

    // The clone boots from the checkpoint's vda (SeaBIOS, syslinux, its kernel) read
    // through the export, and its workload carries on from the checkpoint's last record.
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let store = std::sync::Arc::new(rewind_core::store::Store::open(&dest, None).unwrap());
    let m = rewind_tests::compare::manifest(&store, &id);
    let clone = rewind_core::restore::clone::ThrowawayClone::start(&hv, &store, &m).unwrap();
    let (folder, console) = (
        clone.folder().to_path_buf(),
        clone.console_log().unwrap().to_path_buf(),
    );
    let resumed = format!("RWSEQ resume after {k}");
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.lines().any(|l| l.trim() == resumed) {
            assert!(text.contains("Booting from Hard Disk"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clone did not print {resumed:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(clones_of(&vm.name).len(), 1);
    clone.finish().unwrap();
    assert_eq!(clones_of(&vm.name), Vec::<String>::new());
    assert!(!folder.exists(), "{} is left", folder.display());
    // The original's disks are its own: it ran on.
    let before = vm.last_flushed_record();
    vm.wait_flushed(before + 2, BOOT_TIMEOUT).unwrap();

    // A checkpoint of the disk with its boot sector zeroed fails the check: SeaBIOS finds
    // nothing to boot, the agent never answers, and the check says what the screen showed.
    vm.destroy().unwrap();
    let vda = vm.disk("vda").clone();
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -z 0 512"])
        .arg(&vda.path)
        .output()
        .unwrap();
    rewind_tests::assert_success("zeroing the boot sector", &out);
    crate::rewind::checkpoint_json(&vm.name, &dest);
    let out = boot_check(&vm.name, &dest, dir.path(), 45);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("did not boot: no sign of a started system after")
            && stderr.contains("a text screen"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.split("\n{\"error\"").next().unwrap()).unwrap();
    assert_eq!(report["booted"], false, "{report}");
    assert_eq!(
        report["outcome"]["failure"]["reason"], "timeout",
        "{report}"
    );
    assert_eq!(
        report["outcome"]["failure"]["screen"], "text_mode",
        "{report}"
    );
    assert!(Path::new(report["thumbnail_path"].as_str().unwrap()).exists());
    assert_eq!(clones_of(&vm.name), Vec::<String>::new());
    assert_eq!(left_in(&dir.path().join("work")), Vec::<String>::new());
}

/// The entries of folder `dir` (sorted), none if it is not there.
fn entries(dir: &Path) -> Vec<String> {
    let mut names = left_in(dir);
    names.sort();
    names
}

/// What is in folder `dir` now that was not in `before` (other tests' VMs may come and
/// go meanwhile: only what is new is this test's leak).
fn new_in(dir: &Path, before: &[String]) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect()
}

#[test]
fn a_uefi_tpm_vm_is_boot_checked_with_copies_of_its_firmware_state_that_go_even_when_rewind_is_killed()
 {
    let mut vm = TestVm::uefi_tpm_builder("bootcheck-uefi")
        .guest_agent()
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(Duration::from_mins(4))
        .expect("boot with OVMF");
    vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
    let dir = ScratchDir::new("bootcheck-uefi").unwrap();
    let dest = dir.path().join("store");
    crate::rewind::checkpoint_json(&vm.name, &dest);
    let (swtpm, nvram) = (
        Path::new("/var/lib/libvirt/swtpm"),
        Path::new("/var/lib/libvirt/qemu/nvram"),
    );
    let (tpm_before, nvram_before) = (entries(swtpm), entries(nvram));
    let original_vars = std::fs::read(nvram.join(format!("{}_VARS.fd", vm.name))).unwrap();

    // Booted with OVMF from the copied variables, its TPM state copied for its own UUID.
    let report = boot_check_ok(&vm.name, &dest, dir.path());
    assert_eq!(report["outcome"]["signal"], "agent", "{report}");
    assert_eq!(
        new_in(swtpm, &tpm_before),
        Vec::<String>::new(),
        "a TPM state copy is left"
    );
    assert_eq!(
        new_in(nvram, &nvram_before),
        Vec::<String>::new(),
        "an NVRAM copy is left"
    );
    assert_eq!(left_in(&dir.path().join("work")), Vec::<String>::new());
    assert!(
        std::fs::read(nvram.join(format!("{}_VARS.fd", vm.name))).unwrap() == original_vars
            || vm.domain().is_active().unwrap(),
        "the original's UEFI variables were touched"
    );

    // Killed while its copy boots: libvirt removes the copy with Rewind's connection, and
    // the next boot-check removes the folder and the TPM state it left.
    let mut cmd: Command = crate::rewind::command();
    cmd.args(["boot-check", &vm.name, "latest", "--from"])
        .arg(&dest)
        .args(["--json", "--connect", daemon::URI])
        .env("REWIND_STATE_DIR", dir.path().join("state"))
        .env("REWIND_WORK_DIR", dir.path().join("work"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while clones_of(&vm.name).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no copy started");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while !clones_of(&vm.name).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy outlived the killed rewind"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "after the kill: TPM state left {:?}, folders left {:?}",
        new_in(swtpm, &tpm_before),
        left_in(&dir.path().join("work"))
    );
    boot_check_ok(&vm.name, &dest, dir.path());
    assert_eq!(
        new_in(swtpm, &tpm_before),
        Vec::<String>::new(),
        "the killed run's TPM state is left"
    );
    assert_eq!(new_in(nvram, &nvram_before), Vec::<String>::new());
    assert_eq!(left_in(&dir.path().join("work")), Vec::<String>::new());
    assert!(vm.domain().is_active().unwrap());
}
