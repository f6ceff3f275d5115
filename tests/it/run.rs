//! Running a VM straight from its checkpoint (issue 23): discarded, its disk is byte for
//! byte as before; kept, its disk is the checkpoint plus what it wrote since, copied while
//! it ran.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rewind_core::progress::Control;
use rewind_core::restore::run::RunFromBackup;
use rewind_core::store::{Manifest, Store};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::workload::{scan_sequence, scan_sequence_file};
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

/// Empties the VM's console log (shut off), so that what follows is the next start's.
pub fn clear_console(vm: &TestVm) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(vm.dir().join("console.log"))
        .and_then(|f| f.set_len(0))
        .unwrap();
}

pub fn wait_resumed_after(vm: &TestVm, k: u64) {
    let resumed = format!("RWSEQ resume after {k}");
    vm.wait_console_until(BOOT_TIMEOUT, |c| c.lines().any(|l| l.trim() == resumed))
        .unwrap_or_else(|tail| panic!("the VM did not print {resumed:?}:\n{tail}"));
}

/// A checkpoint of `vm` (running the sequence workload) by `rewind checkpoint` into a new
/// store in a scratch folder named `label`: the folder, the store, the checkpoint, and the
/// last record in it.
fn checkpoint(vm: &TestVm, label: &str) -> (ScratchDir, Arc<Store>, Manifest, u64) {
    let dir = ScratchDir::new(label).unwrap();
    let dest = dir.path().join("store");
    let id = crate::rewind::checkpoint_json(&vm.name, &dest)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = Arc::new(Store::open(&dest, None).unwrap());
    let m = rewind_tests::compare::manifest(&store, &id);
    let scan = scan_sequence(&rewind_tests::compare::checkpoint_bytes(&store, &m, "vda"));
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    (dir, store, m, scan.last_valid)
}

#[test]
fn a_vm_runs_from_its_checkpoint_and_is_discarded_byte_exact_or_kept_with_its_writes() {
    let mut vm = TestVm::builder("run")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let (_dir, store, m, k) = checkpoint(&vm, "run-store");
    // The VM goes on past the checkpoint, then stops: its disk is what a run must not touch.
    vm.wait_flushed(k + 5, BOOT_TIMEOUT).unwrap();
    vm.destroy().unwrap();
    let disk = vm.disk("vda").path.clone();
    let before = std::fs::read(&disk).unwrap();
    let after_stop = scan_sequence_file(&disk, "qcow2").unwrap().last_valid;
    assert!(after_stop > k);
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();

    // Run and discard: it carries on from the checkpoint, then is as it was.
    clear_console(&vm);
    let connect = || rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let run = RunFromBackup::start(connect(), &store, &m).unwrap();
    wait_resumed_after(&vm, k);
    vm.wait_flushed(k + 3, BOOT_TIMEOUT).unwrap();
    run.discard().unwrap();
    assert!(!vm.domain().is_active().unwrap());
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a discarded run changed the VM's disk file"
    );
    assert!(!hv.persistent_xml(&vm.name).unwrap().contains("nbd"));

    // Run and keep: copied while it runs, switched over, defined on the new file.
    clear_console(&vm);
    let mut run = RunFromBackup::start(connect(), &store, &m).unwrap();
    wait_resumed_after(&vm, k);
    vm.wait_flushed(k + 3, BOOT_TIMEOUT).unwrap();
    let kept = run.keep(&Control::new()).unwrap();
    drop(run);
    assert_eq!(kept.len(), 1);
    let new_file = &kept[0];
    assert!(
        vm.domain().is_active().unwrap(),
        "the VM stopped while kept"
    );
    let defined = hv.persistent_xml(&vm.name).unwrap();
    assert!(
        defined.contains(&*new_file.to_string_lossy()) && !defined.contains("nbd"),
        "{defined}"
    );
    let n = vm.last_flushed_record();
    vm.wait_flushed(n + 3, BOOT_TIMEOUT).unwrap();
    vm.destroy().unwrap();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "keeping the run changed the old disk file"
    );
    let scan = scan_sequence_file(new_file, "qcow2").unwrap();
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    assert!(
        scan.last_valid >= n + 3,
        "the new disk holds records up to {}, the VM flushed {}",
        scan.last_valid,
        n + 3
    );
    assert!(Path::new(new_file).starts_with(vm.dir()));
}

/// A VM's UEFI variables and TPM state files as they are now: each file's path and bytes.
pub fn firmware_files(vm: &TestVm) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let nvram = Path::new("/var/lib/libvirt/qemu/nvram").join(format!("{}_VARS.fd", vm.name));
    files.insert(nvram.clone(), std::fs::read(&nvram).unwrap());
    let mut folders = vec![Path::new("/var/lib/libvirt/swtpm").join(&vm.uuid)];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn a_uefi_tpm_vm_runs_from_its_checkpoint_and_a_discard_puts_back_its_uefi_variables_and_tpm_state()
{
    let mut vm = TestVm::uefi_tpm_builder("run-uefi")
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(Duration::from_mins(4))
        .expect("boot with OVMF");
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    let (_dir, store, m, k) = checkpoint(&vm, "run-uefi-store");
    vm.wait_flushed(k + 3, BOOT_TIMEOUT).unwrap();
    vm.destroy().unwrap();
    let disk = vm.disk("vda").path.clone();
    let (disk_before, firmware_before) = (std::fs::read(&disk).unwrap(), firmware_files(&vm));
    let after_stop = scan_sequence_file(&disk, "qcow2").unwrap().last_valid;

    // It runs from the checkpoint with OVMF and its TPM, which write their state as it boots.
    clear_console(&vm);
    let connect = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let run = RunFromBackup::start(connect, &store, &m).unwrap();
    wait_resumed_after(&vm, k);
    vm.wait_flushed(k + 3, BOOT_TIMEOUT).unwrap();
    let changed: Vec<_> = firmware_files(&vm)
        .into_iter()
        .filter(|(path, bytes)| firmware_before.get(path) != Some(bytes))
        .map(|(path, _)| path)
        .collect();
    eprintln!("the run changed {changed:?}");
    assert!(
        !changed.is_empty(),
        "the run wrote neither UEFI variables nor TPM state, so this test shows nothing"
    );
    run.discard().unwrap();

    // Discarded: its disk, UEFI variables and TPM state are as before, byte for byte.
    assert!(std::fs::read(&disk).unwrap() == disk_before);
    let firmware_after = firmware_files(&vm);
    let differ: std::collections::BTreeSet<_> = firmware_before
        .keys()
        .chain(firmware_after.keys())
        .filter(|p| firmware_before.get(*p) != firmware_after.get(*p))
        .collect();
    assert!(
        differ.is_empty(),
        "a discarded run left these firmware files changed: {differ:?}"
    );

    // And the VM boots on them as before the run: OVMF and swtpm take the state put back.
    clear_console(&vm);
    vm.start_and_wait_ready(Duration::from_mins(4))
        .expect("the VM boots after the discarded run");
    wait_resumed_after(&vm, after_stop);
    vm.destroy().unwrap();
}
