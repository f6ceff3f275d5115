//! The real QEMU guest agent in the tiny guest: libvirt's `virDomainFSFreeze` and
//! `virDomainFSThaw` freeze and thaw a mounted ext4 file system the guest keeps writing to.

use std::time::{Duration, Instant};

use base64::Engine as _;

use rewind_core::libvirt::Hypervisor;
use rewind_tests::guest::{AGENT_MARKER, FS_MARKER};
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);
/// How long the lines must stay still while the file system is frozen.
const FROZEN_FOR: Duration = Duration::from_secs(2);

/// `virDomainFSFreeze` of every mounted file system: how many the agent froze.
fn fs_freeze(vm: &TestVm) -> Result<u32, String> {
    hypervisor()
        .freeze_filesystems(&vm.name)
        .map_err(|e| e.to_string())
}

/// `virDomainFSThaw` of every frozen file system: how many the agent thawed.
fn fs_thaw(vm: &TestVm) -> Result<u32, String> {
    hypervisor()
        .thaw_filesystems(&vm.name)
        .map_err(|e| e.to_string())
}

fn hypervisor() -> Hypervisor {
    Hypervisor::connect(daemon::URI).unwrap_or_else(|e| panic!("{e}"))
}

/// `guest-fsfreeze-status`: `"frozen"` or `"thawed"`.
fn freeze_status(vm: &TestVm) -> String {
    let status = vm
        .agent_command(r#"{"execute":"guest-fsfreeze-status"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    status
        .as_str()
        .unwrap_or_else(|| panic!("guest-fsfreeze-status returned {status}"))
        .to_owned()
}

/// Reads a whole (small) file in the guest through the agent's guest-file-* commands.
fn read_guest_file(vm: &TestVm, path: &str) -> String {
    let agent = |cmd: serde_json::Value| {
        vm.agent_command(&cmd.to_string())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let handle = agent(serde_json::json!({
        "execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}
    }));
    let mut text = String::new();
    loop {
        let chunk = agent(serde_json::json!({
            "execute": "guest-file-read", "arguments": {"handle": handle, "count": 65536}
        }));
        let data = chunk["buf-b64"]
            .as_str()
            .expect("guest-file-read returns buf-b64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("guest-file-read sent bad base64: {e}"));
        text.push_str(&String::from_utf8_lossy(&bytes));
        if chunk["eof"].as_bool() != Some(false) {
            break;
        }
    }
    agent(serde_json::json!({
        "execute": "guest-file-close", "arguments": {"handle": handle}
    }));
    text
}

/// Freezes every file system with `virDomainFSFreeze`, checks that the guest's lines stop,
/// thaws them with `virDomainFSThaw` and checks that the lines go on; returns the last line
/// the guest reported synced.
fn freeze_stops_the_lines_and_thaw_resumes_them(vm: &TestVm) -> u64 {
    assert_eq!(freeze_status(vm), "thawed");
    let before_freeze = vm.last_fs_record();
    let frozen = fs_freeze(vm).unwrap_or_else(|e| panic!("virDomainFSFreeze failed: {e}"));
    assert!(frozen >= 1, "virDomainFSFreeze froze {frozen} file systems");
    assert_eq!(freeze_status(vm), "frozen");
    // A line appended just before the freeze may still report "synced" right after it.
    std::thread::sleep(Duration::from_millis(500));
    let at_freeze = vm.last_fs_record();
    assert!(
        at_freeze <= before_freeze + 1,
        "lines went on from {before_freeze} to {at_freeze} after the freeze returned"
    );
    std::thread::sleep(FROZEN_FOR);
    let while_frozen = vm.last_fs_record();
    assert_eq!(
        while_frozen, at_freeze,
        "the guest kept writing while its file system was frozen"
    );
    // The agent still answers while the file system is frozen.
    assert_eq!(freeze_status(vm), "frozen");

    let thawed = fs_thaw(vm).unwrap_or_else(|e| panic!("virDomainFSThaw failed: {e}"));
    assert_eq!(thawed, frozen, "thawed as many file systems as were frozen");
    assert_eq!(freeze_status(vm), "thawed");
    let after_thaw = vm
        .wait_fs_record(while_frozen + 5, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("after the thaw: {e}"));
    eprintln!(
        "froze {frozen} file system(s): lines stayed at {while_frozen} for {FROZEN_FOR:?}, \
         then went on to {after_thaw} after the thaw"
    );
    after_thaw
}

/// How many lines `/mnt/vdb/rwfs.log` holds, read through the agent; they must be
/// `RWFS 1`, `RWFS 2`, ... in order.
fn lines_in_guest_log(vm: &TestVm) -> u64 {
    let log = read_guest_file(vm, "/mnt/vdb/rwfs.log");
    let numbers: Vec<u64> = log
        .lines()
        .map(|l| {
            l.strip_prefix("RWFS ")
                .and_then(|rest| rest.split(' ').next())
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected line {l:?} in rwfs.log"))
        })
        .collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "rwfs.log holds lines 1, 2, 3, ... in order"
    );
    numbers.len() as u64
}

/// A guest with an agent that keeps appending lines to a file on ext4 on `vdb`, defined.
fn fs_guest(label: &str, format: Format) -> TestVm {
    TestVm::builder(label)
        .guest_agent()
        .disks(vec![
            DiskSpec::new("vda", format, 16 << 20),
            DiskSpec::new("vdb", format, 64 << 20),
        ])
        .filesystem("vdb")
        .workload("fswrite")
        .define()
        .expect("define the test VM")
}

#[test]
fn guest_agent_freezes_and_thaws_a_mounted_file_system() {
    let mut vm = fs_guest("agent", Format::Raw);

    let started = Instant::now();
    vm.start().expect("start");
    vm.wait_agent_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let ready_after = started.elapsed();
    let console = vm.console();
    let marker = console
        .lines()
        .find(|l| l.contains(AGENT_MARKER))
        .unwrap_or_default()
        .trim();
    eprintln!(
        "guest agent answered {:.1} s after the VM was started (mkfs.ext4 included); \
         the guest said: {marker}",
        ready_after.as_secs_f64()
    );
    vm.wait_console("REWIND-GUEST READY workload=fswrite", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_fs_record(5, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}"));

    let after_thaw = freeze_stops_the_lines_and_thaw_resumes_them(&vm);

    // The lines are on the mounted file system, one after the other, none lost to the freeze.
    let lines = lines_in_guest_log(&vm);
    assert!(
        lines >= after_thaw,
        "rwfs.log ends at line {lines} but the guest reported line {after_thaw} synced"
    );

    // After a power cut the guest keeps the file system and numbers on after its last line.
    vm.destroy().expect("power off");
    vm.start().expect("start again");
    vm.wait_console(
        &format!("{FS_MARKER} /dev/vdb ext4 (existing) mounted on /mnt/vdb"),
        BOOT_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let resumed = vm
        .wait_fs_record(lines + 1, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("after the restart: {e}"));
    // The console file starts afresh with each start.
    let first_after_restart = vm
        .console()
        .lines()
        .find_map(|l| {
            l.strip_prefix("RWFS ")?
                .strip_suffix(" synced")?
                .parse::<u64>()
                .ok()
        })
        .expect("an RWFS line after the restart");
    assert!(
        first_after_restart > lines,
        "after the restart the guest began again at line {first_after_restart} (up to \
         {resumed}), but the file already held {lines} lines"
    );
}

#[test]
fn a_file_system_on_a_disk_the_vm_lacks_is_refused() {
    let err = TestVm::builder("agent-nodisk")
        .filesystem("vdb")
        .define()
        .expect_err("vdb is not one of the VM's disks");
    assert!(err.0.contains("no such disk"), "{err}");
    let err = TestVm::builder("agent-badname")
        .filesystem("../vda")
        .define()
        .expect_err("not a plain disk name");
    assert!(
        err.0.contains("no such disk") || err.0.contains("plain"),
        "{err}"
    );
}

/// The features line of an ext4 image's superblock (`dumpe2fs -h`).
fn ext4_features(image: &std::path::Path) -> String {
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("run dumpe2fs (package e2fsprogs)");
    assert!(
        out.status.success(),
        "dumpe2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_owned()
}

/// Asserts that the ext4 image was captured frozen: its journal is empty (no
/// `needs_recovery`), and e2fsck finds nothing to fix.
fn assert_ext4_clean(image: &std::path::Path) {
    let features = ext4_features(image);
    assert!(features.contains("has_journal"), "{features}");
    assert!(
        !features.contains("needs_recovery"),
        "the checkpoint's file system needs journal recovery: it was not frozen ({features})"
    );
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// Issue 4: with a guest agent, a checkpoint is application-consistent — the ext4 file
/// system in it is clean, its journal empty — and the guest is thawed on every path: after
/// success, after an error while frozen, and (by the next run) after a crash while frozen.
#[test]
fn a_checkpoint_of_a_guest_with_an_agent_is_application_consistent_and_always_thawed() {
    let mut vm = fs_guest("agent-ckpt", Format::Qcow2);
    vm.start().expect("start");
    vm.wait_agent_ready(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_fs_record(5, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = rewind_tests::scratch::ScratchDir::new("agent-ckpt-store").unwrap();
    let dest = dir.path().join("store");
    let dest_str = dest.to_str().unwrap();

    let taken = crate::rewind::checkpoint_json(&vm.name, &dest);
    assert_eq!(taken["consistency"], "application", "{taken}");
    let note = taken["consistency_note"].as_str().unwrap_or_default();
    assert!(note.contains("froze"), "{taken}");
    assert_eq!(freeze_status(&vm), "thawed");
    let n = vm.last_fs_record();
    vm.wait_fs_record(n + 3, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("the guest stopped writing after the checkpoint: {e}"));
    // The captured file system was frozen: ext4 flushed its journal and cleared
    // needs_recovery, so it is clean as if unmounted (a crash-consistent copy of a mounted
    // ext4 needs journal recovery).
    let store = rewind_core::store::Store::open(&dest, None).unwrap();
    let m = store.catalog().unwrap().checkpoints.pop().unwrap();
    let vdb = m.disks.iter().find(|d| d.target == "vdb").unwrap();
    let image = dir.path().join("vdb.img");
    store
        .object_reader(&vdb.index)
        .unwrap()
        .write_to_file(
            &std::fs::File::create(&image).unwrap(),
            &rewind_core::progress::Control::new(),
        )
        .unwrap();
    assert_ext4_clean(&image);

    // An error while the guest is frozen: the command fails, the guest is thawed.
    let out = crate::rewind::checkpoint_command(&vm.name, &dest)
        .env("REWIND_FAULT", "after-freeze")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fault injected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        freeze_status(&vm),
        "thawed",
        "an error left the guest frozen"
    );

    // A crash while the guest is frozen: it stays frozen until the next run thaws it.
    let out = crate::rewind::checkpoint_command(&vm.name, &dest)
        .env("REWIND_FAULT", "abort-after-freeze")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(freeze_status(&vm), "frozen", "the crash came while frozen");
    let next = crate::rewind::checkpoint_json(&vm.name, &dest);
    assert_eq!(
        freeze_status(&vm),
        "thawed",
        "the next run thawed the guest"
    );
    assert_eq!(next["consistency"], "application", "{next}");
    let n = vm.last_fs_record();
    vm.wait_fs_record(n + 3, Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("the guest stopped writing: {e}"));
    assert_eq!(store.catalog().unwrap().checkpoints.len(), 2);
    crate::rewind::run_ok(&["verify", "--in", dest_str]);
}
