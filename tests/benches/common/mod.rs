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

/// Runs a command that must succeed; returns what it printed.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Seconds for `qemu-img convert -O qcow2` of the disk (`-U`: the VM may run) plus an fsync
/// of the result, as a user's copy would need to be durable too, and the CPU seconds (user +
/// system) `qemu-img` used. The copy is removed.
pub fn qemu_img_convert(disk: &Path, out: &Path) -> (f64, f64) {
    let t = Instant::now();
    // bash's `times` prints its children's user and system time on its second line.
    let output = run(Command::new("bash")
        .args([
            "-c",
            r#"qemu-img convert -U -f qcow2 -O qcow2 "$1" "$2" && times"#,
            "bash",
        ])
        .arg(disk)
        .arg(out));
    File::open(out).unwrap().sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    fs::remove_file(out).unwrap();
    let cpu = String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|t| {
            let (m, s) = t.strip_suffix('s')?.split_once('m')?;
            Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
        })
        .sum();
    (secs, cpu)
}
