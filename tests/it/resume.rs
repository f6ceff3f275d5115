//! Full-state checkpoints of a guest set up like Windows 11 (issue 16): OVMF with Secure
//! Boot variables, SMM and an emulated TPM 2.0. Taken both ways (live and managed save),
//! each resumes without a boot — in place, as a new VM, and onto another host — with its
//! sequence records going on from the checkpoint and its TPM holding the checkpoint's
//! values: PCR 16 (volatile state) and an NV counter (permanent state).
//!
//! Every `rewind` here runs with `TMPDIR` on a 64 MiB tmpfs while the saved memory is
//! larger: memory images must be staged beside the VM's storage, never in `/tmp`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rewind_core::store::Store;
use rewind_tests::domain::{TpmState, guest_tpm};
use rewind_tests::scratch::{ScratchDir, Tmpfs};
use rewind_tests::{TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(4);
const READY: &str = "REWIND-GUEST READY";
/// The size of the tmpfs `TMPDIR` points to: less than the saved memory.
const SMALL_TMP_BYTES: u64 = 64 << 20;

/// A booted UEFI + TPM guest of 256 MiB with its agent, writing sequence records, with
/// 40 MiB more of its memory filled with random data (so the saved memory is larger than the
/// small tmpfs).
fn uefi_tpm_guest(label: &str) -> TestVm {
    let mut vm = TestVm::uefi_tpm_builder(label)
        .nic()
        .guest_agent()
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT)
        .expect("boot with OVMF");
    let xml = vm.domain().xml_desc(0).unwrap();
    assert!(
        xml.contains("secure='yes'") && xml.contains("<smm state='on'/>"),
        "the guest runs OVMF with Secure Boot and SMM: {xml}"
    );
    vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
    vm.agent_command(
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","dd if=/dev/urandom of=/tmp/fill bs=1M count=40 status=none; echo RWFILL done $? >/dev/console"]}}"#,
    )
    .unwrap();
    vm.wait_console("RWFILL done 0", BOOT_TIMEOUT).unwrap();
    vm.wait_flushed(5, BOOT_TIMEOUT).unwrap();
    vm
}

/// Changes both kinds of TPM state and returns what the TPM holds then.
fn change_tpm(vm: &TestVm, digest_byte: u8) -> TpmState {
    vm.tpm("count", None).unwrap();
    let digest = format!("{digest_byte:02x}").repeat(32);
    vm.tpm("extend", Some(&digest)).unwrap()
}

/// `rewind ARGS... --json --connect URI` with `TMPDIR` in `tmp`, which must succeed: its JSON.
fn rewind_json(tmp: &Path, uri: &str, args: &[&str]) -> serde_json::Value {
    let out = crate::rewind::command()
        .args(args)
        .args(["--json", "--connect", uri])
        .env("TMPDIR", tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rewind {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_tmp_unused(tmp);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Nothing was left in `TMPDIR`, and nothing large was ever put there (a saved memory
/// would not even fit).
fn assert_tmp_unused(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("rewind-checkpoint-"))
        .collect();
    assert!(left.is_empty(), "work folders left in TMPDIR: {left:?}");
}

/// A full-state checkpoint of `vm` into `dest`, the live way or the managed-save way: its
/// id and the last sequence record its disk holds.
fn full_state_checkpoint(vm: &TestVm, dest: &Path, tmp: &Path, way: &str) -> (String, u64) {
    let out = crate::rewind::checkpoint_command(&vm.name, dest)
        .args(["--full-state", "--json"])
        .env("TMPDIR", tmp)
        .env(rewind_core::checkpoint::FULL_STATE_WAY_ENV, way)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "full-state checkpoint ({way}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_tmp_unused(tmp);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let taken = &list[0];
    let note = taken["consistency_note"].as_str().unwrap();
    match way {
        "live" => assert!(note.contains("saved while the VM ran"), "{note}"),
        _ => assert!(note.contains("the VM was paused for"), "{note}"),
    }
    let id = taken["id"].as_str().unwrap().to_owned();
    let store = Store::open(dest, None).unwrap();
    let m = store.manifest(&vm.uuid.parse().unwrap(), &id).unwrap();
    let memory = m.blobs.iter().find(|b| b.name == "memory").unwrap();
    assert!(
        memory.index.size_bytes > SMALL_TMP_BYTES,
        "the saved memory ({} bytes) must not fit the small TMPDIR",
        memory.index.size_bytes
    );
    let vda = m.disks.iter().find(|d| d.target == "vda").unwrap();
    let image = store.object_reader(&vda.index).unwrap().read_all().unwrap();
    let scan = rewind_tests::workload::scan_sequence(&image);
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    (id, scan.last_valid)
}

/// What the guest printed since `before` was its console (QEMU may have begun the file anew
/// when the VM was started again).
fn console_since(now: &str, before: &str) -> String {
    now.strip_prefix(before).unwrap_or(now).to_owned()
}

/// After a restore: the guest resumed, not booted, and went on writing records right after
/// the checkpoint's last one `k`.
fn assert_resumed_after(console: &dyn Fn() -> String, before: &str, k: u64, what: &str) {
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let records = loop {
        let since = console_since(&console(), before);
        let records: Vec<u64> = since
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("RWSEQ ")?
                    .strip_suffix(" flushed")?
                    .parse()
                    .ok()
            })
            .collect();
        if records.len() >= 5 {
            assert!(
                !since.contains(READY) && !since.contains("RWSEQ resume after"),
                "{what}: the guest booted again instead of resuming:\n{since}"
            );
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the guest wrote no records after the restore:\n{since}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        records[0] == k || records[0] == k + 1,
        "{what}: the records go on from the checkpoint's last one ({k}), not from {}",
        records[0]
    );
    assert!(
        records.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: records in order: {records:?}"
    );
}

/// A full-state checkpoint: its id, the last sequence record its disk holds, and what the
/// guest's TPM held when it was taken.
struct Taken {
    id: String,
    k: u64,
    tpm: TpmState,
}

/// A UEFI + TPM guest, `TMPDIR` on a small tmpfs, a store, and a full-state checkpoint
/// taken each way, the guest's TPM changed (`digest_bytes`) before each.
struct BothWays {
    vm: TestVm,
    tmpfs: Tmpfs,
    dir: ScratchDir,
    live: Taken,
    saved: Taken,
}

fn both_ways(label: &str, digest_bytes: (u8, u8)) -> BothWays {
    let vm = uefi_tpm_guest(label);
    let tmpfs = Tmpfs::mount("t", SMALL_TMP_BYTES).unwrap();
    let dir = ScratchDir::new(&format!("{label}-store")).unwrap();
    let dest = dir.path().join("store");
    let take = |digest_byte, way| {
        let tpm = change_tpm(&vm, digest_byte);
        let (id, k) = full_state_checkpoint(&vm, &dest, tmpfs.path(), way);
        Taken { id, k, tpm }
    };
    let live = take(digest_bytes.0, "live");
    let saved = take(digest_bytes.1, "save");
    assert_ne!(live.tpm, saved.tpm);
    BothWays {
        vm,
        tmpfs,
        dir,
        live,
        saved,
    }
}

#[test]
fn full_state_checkpoints_of_a_uefi_tpm_guest_resume_in_place_both_ways() {
    let BothWays {
        vm,
        tmpfs,
        dir,
        live,
        saved,
    } = both_ways("resume-in-place", (0x11, 0x22));
    let tmp = tmpfs.path();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();
    let (at_live, k_live, at_saved, k_saved) = (live.tpm, live.k, saved.tpm, saved.k);
    let (live, saved) = (live.id, saved.id);
    vm.wait_flushed(k_saved + 20, BOOT_TIMEOUT).unwrap();

    // Back to the live one: the TPM goes back from (0x22, 2) to (0x11, 1).
    restore_resumes(&vm, tmp, dest_str, &live, k_live, &at_live, "live");
    // On from there, then back to the managed-save one, from (0x33, 2) to (0x22, 2).
    let later = change_tpm(&vm, 0x33);
    assert_ne!(later, at_saved);
    vm.wait_flushed(k_live + 20, BOOT_TIMEOUT).unwrap();
    restore_resumes(
        &vm,
        tmp,
        dest_str,
        &saved,
        k_saved,
        &at_saved,
        "managed save",
    );
}

/// Restores full-state checkpoint `id` of `vm` in place and checks that the guest resumed
/// from it: records right after its last one `k`, its TPM holding `tpm`.
fn restore_resumes(
    vm: &TestVm,
    tmp: &Path,
    dest: &str,
    id: &str,
    k: u64,
    tpm: &TpmState,
    way: &str,
) {
    let before = vm.console();
    let report = rewind_json(
        tmp,
        daemon::URI,
        &["restore", &vm.name, id, "--from", dest, "--force-off"],
    );
    assert_eq!(report["resumed"], true, "{way}: {report}");
    assert_resumed_after(&|| vm.console(), &before, k, way);
    assert_eq!(
        &vm.tpm("show", None).unwrap(),
        tpm,
        "{way}: the TPM holds the checkpoint's PCR 16 and counter"
    );
}

#[test]
fn full_state_checkpoints_of_a_uefi_tpm_guest_resume_as_a_new_vm_and_on_another_host() {
    let BothWays {
        vm,
        tmpfs,
        dir,
        live,
        saved,
    } = both_ways("resume-elsewhere", (0x44, 0x55));
    let tmp = tmpfs.path();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();

    // As a new VM beside the original, from each.
    resumes_as_a_copy(&vm, tmp, &dir, &live, "live");
    resumes_as_a_copy(&vm, tmp, &dir, &saved, "managed save");
    let (at_saved, k_saved, saved) = (saved.tpm, saved.k, saved.id);

    // The workstation is gone: the VM, its disk, NVRAM and TPM state. It comes back from the
    // store alone onto "another host" (this daemon, through SSH) from the managed-save one.
    let sshd = rewind_tests::sshd::Sshd::start().unwrap_or_else(|e| panic!("{e}"));
    let pool = rewind_tests::pool::TestPool::create("resume-elsewhere-pool")
        .unwrap_or_else(|e| panic!("{e}"));
    rewind_tests::domain::remove_domain(vm.domain()).unwrap();
    std::fs::remove_file(&vm.disk("vda").path).unwrap();
    // What the VM boots from (the test guest's kernel) is in a storage pool, as a real VM's
    // files are: a VM not defined may have its files only there.
    let _vm_pool = rewind_tests::pool::TestPool::over(vm.dir()).unwrap_or_else(|e| panic!("{e}"));
    let report = rewind_json(
        tmp,
        &sshd.libvirt_uri(),
        &[
            "restore",
            &vm.name,
            &saved,
            "--from",
            dest_str,
            "--pool",
            pool.name(),
        ],
    );
    assert_eq!(report["mode"], "other_host", "{report}");
    assert_eq!(report["resumed"], true, "{report}");
    let console = pool.path().join("console.log");
    let read_back = || {
        std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    assert_resumed_after(&read_back, "", k_saved, "on another host");
    assert_eq!(
        guest_tpm(&vm.name, &console, "show", None).unwrap(),
        at_saved,
        "the TPM there holds the checkpoint's values"
    );
    let left: Vec<PathBuf> = std::fs::read_dir(pool.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("memory"))
        .collect();
    assert!(
        left.is_empty(),
        "the staged memory image is removed: {left:?}"
    );
}

/// Restores full-state checkpoint `taken` of `vm` (in the store in `dir`) as a copy beside
/// it and checks that the copy resumed from it (records right after its last one, its TPM
/// holding what it held then), unplugged, while the original runs on; then removes the copy.
fn resumes_as_a_copy(vm: &TestVm, tmp: &Path, dir: &ScratchDir, taken: &Taken, way: &str) {
    let Taken { id, k, tpm } = taken;
    let k = *k;
    let copy = format!("{} copie «résumée» {way}", vm.name);
    let copy_vm = rewind_tests::RestoredVm(copy.clone());
    let disks = dir.path().join(format!("copy disks {way}"));
    let dest = dir.path().join("store");
    let report = rewind_json(
        tmp,
        daemon::URI,
        &[
            "restore",
            &vm.name,
            id,
            "--from",
            dest.to_str().unwrap(),
            "--as",
            &copy,
            "--disk-dir",
            disks.to_str().unwrap(),
        ],
    );
    assert_eq!(report["mode"], "new_vm", "{way}: {report}");
    assert_eq!(report["resumed"], true, "{way}: {report}");
    assert_eq!(report["network_unplugged"], true, "{way}: {report}");
    assert_ne!(report["vm_uuid"], vm.uuid.as_str());
    // Its console is beside its disks, not in the original's folder.
    let copy_console = disks.join(format!("{copy}-console.log"));
    let read_copy = || {
        std::fs::read(&copy_console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    assert_resumed_after(&read_copy, "", k, &format!("{way}, as a new VM"));
    assert_eq!(
        &guest_tpm(&copy, &copy_console, "show", None).unwrap(),
        tpm,
        "{way}: the copy's TPM holds the checkpoint's values"
    );
    assert!(vm.domain().is_active().unwrap(), "the original runs on");
    assert_unplugged_with_the_originals_mac(vm, &copy);
    drop(copy_vm);
}

/// A copy resumed beside `vm` runs with the original's MAC address, which its guest knows,
/// unplugged; its definition has an address of its own for its next boot.
fn assert_unplugged_with_the_originals_mac(vm: &TestVm, copy: &str) {
    let mac = |xml: &str| {
        let start = xml.find("<mac address='").map(|i| i + 14)?;
        Some(xml[start..start + 17].to_owned())
    };
    let original = mac(&vm.domain().xml_desc(0).unwrap()).expect("a MAC address");
    let conn = rewind_tests::domain::connect().unwrap();
    let copy_dom = conn.lookup_domain_by_name(copy).unwrap();
    let running = copy_dom.xml_desc(0).unwrap();
    assert_eq!(
        mac(&running).as_deref(),
        Some(original.as_str()),
        "{running}"
    );
    assert!(running.contains("<link state='down'/>"), "{running}");
    let defined = copy_dom
        .xml_desc(rewind_tests::virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .unwrap();
    assert_ne!(
        mac(&defined).as_deref(),
        Some(original.as_str()),
        "{defined}"
    );
}
