//! What the checkpoint and restore benchmarks share: commands, the page cache, the
//! `qemu-img convert` baseline.

#![allow(dead_code)]

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Drops the page cache (needs root).
pub fn drop_caches() {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success())
        && fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    assert!(ok, "could not drop the page cache (run as root)");
}

/// Runs a command that must succeed.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seconds for `qemu-img convert -O qcow2` of the disk (`-U`: the VM may run) plus an fsync
/// of the result, as a user's copy would need to be durable too. The copy is removed.
pub fn qemu_img_convert(disk: &Path, out: &Path) -> f64 {
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "qcow2"])
        .arg(disk)
        .arg(out));
    File::open(out).unwrap().sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    fs::remove_file(out).unwrap();
    secs
}
