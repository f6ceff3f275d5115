//! What the benchmarks share: commands, the page cache, the `qemu-img convert` baseline,
//! the release binary, and what `/proc` says of a process.

#![allow(dead_code)]

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rewind_tests::{DiskSpec, Format, TestVm};

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

/// The `rewind` binary to measure: `target/release/rewind`, or `REWIND_BIN`.
pub fn binary() -> std::path::PathBuf {
    let path = std::env::var_os("REWIND_BIN").map_or_else(
        || rewind_tests::target_dir().join("release/rewind"),
        std::path::PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release -p rewind` first (or set REWIND_BIN)",
        path.display()
    );
    path
}

/// CPU seconds (user + system) process `pid` (a number or `self`) used so far, all
/// threads.
pub fn cpu_secs(pid: &str) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split(' ').collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// A number field (`VmRSS` in KiB, `Threads`) of `/proc/PID/status`.
pub fn status_field(pid: u32, name: &str) -> u64 {
    status_field_of(&format!("/proc/{pid}/status"), name)
}

/// A number field of a `status` file (`/proc/PID/status`, `/proc/PID/task/TID/status`).
pub fn status_field_of(path: &str, name: &str) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The benchmarks' VM, started and ready: the tiny guest (running `workload`, if any) with
/// 256 MiB of memory, a 64 MiB qcow2 `vda`, and a qcow2 `vdb` of `disk_bytes` filled from
/// the raw image `make_image` writes under `dir` (removed afterwards).
pub fn mixed_data_vm(
    label: &str,
    workload: Option<&str>,
    dir: &Path,
    disk_bytes: u64,
    make_image: impl FnOnce(&Path),
) -> TestVm {
    eprintln!(
        "generating 2 GiB of mixed data on a {} GiB disk …",
        disk_bytes >> 30
    );
    let raw = dir.join("mixed.raw");
    make_image(&raw);
    let mut builder = TestVm::builder(label).memory_mib(256);
    if let Some(w) = workload {
        builder = builder.workload(w);
    }
    let mut vm = builder
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 64 << 20),
            DiskSpec::new("vdb", Format::Qcow2, disk_bytes),
        ])
        .define()
        .unwrap();
    vm.fill_disk("vdb", &raw).unwrap();
    fs::remove_file(&raw).unwrap();
    vm.start_and_wait_ready(Duration::from_mins(2)).unwrap();
    vm
}

/// The pid of VM `name`'s QEMU process (empty if it does not run).
pub fn qemu_pid(name: &str) -> String {
    fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}
