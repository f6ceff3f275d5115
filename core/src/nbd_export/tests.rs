//! The export against QEMU's own NBD client (`qemu-img`, `qemu-io`), on a real store.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::CheckpointExport;
use crate::store::Store;
use crate::store::tests::{checkpoint_file, noise, options, vm};

/// 64 KiB chunks (the tests' store): data, two holes, a patterned run, a short tail (of whole
/// sectors, as every VM disk has: QEMU rounds an export's size up to 512 bytes).
fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let c = 64 << 10;
    let mut content = noise(5, 12 * c + 1536);
    content[2 * c..4 * c].fill(0);
    content[9 * c..10 * c].fill(0);
    content[5 * c..6 * c].fill(0x5a);
    let path = dir.join("disk.raw");
    std::fs::write(&path, &content).unwrap();
    (path, content)
}

fn qemu_tools() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn qemu_reads_a_checkpoint_through_the_export_and_its_overlay_never_writes_the_store() {
    if !qemu_tools() {
        eprintln!("qemu-img/qemu-io are not installed: skipped (x installs them)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::init(&tmp.path().join("s"), &options()).unwrap());
    let (raw, content) = image(tmp.path());
    let m = checkpoint_file(&store, vm("win11", 1), 0, &raw, None);
    let sockets = tmp.path().join("run");
    std::fs::create_dir(&sockets).unwrap();
    let export = CheckpointExport::start(&store, &m, &sockets, None).unwrap();
    let disk = export.disk("vda").unwrap();
    assert_eq!(disk.size_bytes(), content.len() as u64);
    assert_eq!(disk.socket(), sockets.join("vda.sock"));
    let uri = disk.uri();

    // Byte for byte the checkpoint, read by QEMU's client.
    let copy = tmp.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy));
    let copied = std::fs::read(&copy).unwrap();
    assert_eq!(copied.len(), content.len());
    let first = copied.iter().zip(&content).position(|(a, b)| a != b);
    assert_eq!(first, None, "the copy differs");
    // The holes are reported as such (base:allocation): QEMU need not read them.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let runs: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let c = 64 << 10;
    let hole_at = |offset: u64| {
        runs.iter().any(|r| {
            let start = r["start"].as_u64().unwrap();
            let len = r["length"].as_u64().unwrap();
            (start..start + len).contains(&offset) && r["data"] == false && r["zero"] == true
        })
    };
    assert!(
        hole_at(2 * c) && hole_at(3 * c + 5) && hole_at(9 * c),
        "{map}"
    );
    assert!(!hole_at(0) && !hole_at(5 * c) && !hole_at(12 * c), "{map}");

    // A throwaway overlay on the export takes the writes; the export stays the checkpoint.
    let overlay = tmp.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &uri])
        .arg(&overlay));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 65536 4096",
            "-c",
            "read -P 0xab 65536 4096",
        ])
        .arg(&overlay));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0x5a {} 65536", 5 * c),
        ])
        .arg(&overlay));
    let again = tmp.path().join("again.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&again));
    assert!(
        std::fs::read(&again).unwrap() == content,
        "the export changed"
    );
    // QEMU's writes to the export itself are refused (read-only).
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0 0 512", &uri])
        .output()
        .unwrap();
    assert!(
        !refused.status.success() || !String::from_utf8_lossy(&refused.stdout).contains("wrote"),
        "a write to the export went through"
    );

    export.stop().unwrap();
    assert!(
        !sockets.join("vda.sock").exists(),
        "the socket is left behind"
    );
    assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0);
}

#[test]
fn a_target_that_cannot_name_a_socket_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::init(&tmp.path().join("s"), &options()).unwrap());
    let (raw, _) = image(tmp.path());
    let mut m = checkpoint_file(&store, vm("win11", 1), 0, &raw, None);
    m.disks[0].target = "../../etc/x".into();
    let err = CheckpointExport::start(&store, &m, tmp.path(), None).unwrap_err();
    assert!(err.to_string().contains("cannot name a socket"), "{err}");
    assert!(!tmp.path().join("../../etc/x.sock").exists());
}
