//! `rewind vms`: real guests (BIOS and UEFI + TPM), their workload, and what Rewind reports.

use std::path::Path;
use std::time::Duration;

use rewind_core::vm::{DiskSource, Firmware, VmInfo, VmState};
use rewind_tests::workload::scan_sequence_file;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

use crate::rewind;

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
const UEFI_BOOT_TIMEOUT: Duration = Duration::from_mins(4);

/// `rewind vms --json` against the test daemon, parsed with the same types it printed.
fn listed_vms() -> Vec<VmInfo> {
    let out = rewind::run_ok(&["vms", "--json", "--connect", daemon::URI]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("rewind vms --json is not valid: {e}\n{out}"))
}

fn listed(uuid: &str) -> VmInfo {
    listed_vms()
        .into_iter()
        .find(|v| v.uuid == uuid)
        .unwrap_or_else(|| panic!("VM {uuid} is missing from `rewind vms --json`"))
}

fn wait_flushed(vm: &TestVm, n: u64, timeout: Duration) -> u64 {
    vm.wait_flushed(n, timeout)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's data disk holds a consistent prefix covering at least what it had flushed.
fn assert_disk_prefix(path: &Path, format: &str, flushed_before: u64) -> u64 {
    let scan = scan_sequence_file(path, format).expect("read the data disk");
    assert!(
        scan.is_consistent_prefix(),
        "the disk is not a consistent prefix: {:?}",
        scan.problems
    );
    assert!(
        scan.last_valid >= flushed_before,
        "the guest had flushed record {flushed_before}, but the disk holds only 1..{}",
        scan.last_valid
    );
    scan.last_valid
}

#[test]
fn bios_guest_runs_sequence_workload_and_is_listed() {
    let mut vm = TestVm::builder("seq-bios")
        .workload("sequence")
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    let disk = vm.disk("vda").clone();

    // The workload advances on the disk itself, as a consistent prefix.
    let flushed = wait_flushed(&vm, 5, Duration::from_mins(1));
    let first = assert_disk_prefix(&disk.path, "raw", flushed);
    let flushed = wait_flushed(&vm, first + 5, Duration::from_mins(1));
    let second = assert_disk_prefix(&disk.path, "raw", flushed);
    assert!(
        second > first,
        "the sequence did not advance on disk ({first} -> {second})"
    );

    let info = listed(&vm.uuid);
    assert_eq!(info.name, vm.name);
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.hypervisor, "qemu", "tests run under TCG");
    assert_eq!(info.vcpus, 1);
    assert_eq!(info.memory_bytes, 192 << 20);
    assert_eq!(info.firmware, Firmware::Bios);
    assert_eq!(info.tpm, None);
    assert!(!info.guest_agent.channel);
    assert_eq!(info.disks.len(), 1);
    let d = &info.disks[0];
    assert_eq!(d.target, "vda");
    assert_eq!(d.format.as_deref(), Some("raw"));
    assert_eq!(
        d.source,
        DiskSource::File {
            path: disk.path.clone()
        }
    );
    assert_eq!(d.virtual_size_bytes, Some(disk.size_bytes));
    assert!(
        d.allocated_bytes.is_some_and(|a| a > 0),
        "the guest wrote data: {d:?}"
    );
    assert!(d.backing_chain.is_empty());
    assert!(d.protectable().is_ok());

    // The table shows the same VM as running.
    let table = rewind::run_ok(&["vms", "--connect", daemon::URI]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&vm.name))
        .unwrap_or_else(|| panic!("{} missing from table:\n{table}", vm.name));
    assert!(row.contains("running") && row.contains("BIOS"), "{row}");
    assert!(table.contains(&disk.path.display().to_string()), "{table}");
}

#[test]
fn uefi_tpm_guest_reports_firmware_tpm_and_backing_chain() {
    let mut vm = TestVm::builder("seq-uefi")
        .uefi()
        .tpm()
        .agent_channel()
        .memory_mib(256)
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 64 << 20).with_backing_file(),
        ])
        .workload("sequence")
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(UEFI_BOOT_TIMEOUT)
        .expect("boot with OVMF");
    let disk = vm.disk("vda").clone();
    let flushed = wait_flushed(&vm, 3, Duration::from_mins(1));
    assert_disk_prefix(&disk.path, "qcow2", flushed);

    let info = listed(&vm.uuid);
    assert_eq!(info.state, VmState::Running);
    let Firmware::Uefi {
        loader_path,
        nvram_path,
        ..
    } = &info.firmware
    else {
        panic!("expected UEFI firmware, got {:?}", info.firmware)
    };
    let loader = loader_path
        .as_ref()
        .expect("libvirt resolved the OVMF loader");
    assert!(loader.exists(), "loader {} exists", loader.display());
    let nvram = nvram_path.as_ref().expect("the VM has its own NVRAM");
    assert!(nvram.is_file(), "NVRAM {} exists", nvram.display());

    let tpm = info.tpm.as_ref().expect("a TPM is reported");
    assert_eq!(
        (
            tpm.model.as_str(),
            tpm.backend.as_str(),
            tpm.version.as_deref()
        ),
        ("tpm-crb", "emulator", Some("2.0"))
    );
    let state = tpm.state_path.as_ref().expect("TPM state folder");
    assert!(state.is_dir(), "swtpm keeps state in {}", state.display());
    assert!(info.guest_agent.channel, "the agent channel is reported");
    assert!(
        !info.guest_agent.connected,
        "no agent runs in the tiny guest"
    );

    let d = &info.disks[0];
    assert_eq!(d.format.as_deref(), Some("qcow2"));
    let chain: Vec<_> = d.backing_chain.iter().map(|b| b.path.clone()).collect();
    assert_eq!(
        chain,
        vec![disk.backing.clone().unwrap()],
        "live backing chain"
    );

    // Shut off, the facts remain: libvirt no longer describes the chain, Rewind reads it.
    vm.destroy().unwrap();
    let info = listed(&vm.uuid);
    assert_eq!(info.state, VmState::ShutOff);
    assert_eq!(info.firmware.nvram_path(), Some(nvram));
    let chain: Vec<_> = info.disks[0]
        .backing_chain
        .iter()
        .map(|b| b.path.clone())
        .collect();
    assert_eq!(
        chain,
        vec![disk.backing.clone().unwrap()],
        "backing chain of a shut-off VM"
    );
    assert_eq!(
        info.disks[0].backing_chain[0].format.as_deref(),
        Some("qcow2")
    );
}

#[test]
fn vm_with_spaces_quotes_and_umlauts_is_listed() {
    let name = "Büro Win 11 \"Test\"";
    let vm = TestVm::builder("buero")
        .name(name)
        .define()
        .expect("define");
    let info = listed(&vm.uuid);
    assert_eq!(info.name, name);
    assert_eq!(info.state, VmState::ShutOff);

    let table = rewind::run_ok(&["vms", "--connect", daemon::URI]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(name) && l.contains("shut off")),
        "{name} missing from table:\n{table}"
    );

    // The library finds it by its exact name and by UUID.
    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    assert_eq!(hv.vm(name).unwrap().uuid, vm.uuid);
    assert_eq!(hv.vm(&vm.uuid).unwrap().name, name);
}
