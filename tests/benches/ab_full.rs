//! A/B of full checkpoints (issue 20, item 2): the checkpoint benchmark's VM (a 4 GiB qcow2
//! disk holding 2 GiB of mixed data, the tiny guest running under TCG), and full
//! checkpoints of it taken by two or more builds of Rewind in turn, in the same run, with
//! `qemu-img convert -O qcow2` + fsync of the same disk as the baseline. Run with
//!
//! ```sh
//! REWIND_AB_BINS=/tmp/base-bench:/tmp/head-bench cargo bench -p rewind-tests --bench ab_full
//! ```
//!
//! as root (it starts libvirt itself). Each entry of `REWIND_AB_BINS` is an `ab_full` bench
//! binary of one build (`cargo bench --no-run` prints its path); without it, this binary
//! alone is measured. Every round runs `qemu-img` once, then each build once per mode
//! (warm, and cold when `REWIND_AB_COLD=1`), the order of the builds turning every round.
//! Each build runs as a child process (`REWIND_AB_VM` set) that takes one full checkpoint
//! into a new store and prints its wall time, its own CPU seconds, the CPU seconds and
//! minor page faults of the VM's QEMU meanwhile, and the bytes read and stored. An entry may
//! end in `?VAR=value,VAR=value`: environment for that build's runs. `REWIND_AB_PERF=DIR`
//! records each child's run system-wide with `perf record -g` into
//! `DIR/<build>-<round>-<cold>.data`.
//! `REWIND_AB_SHUT_OFF=1` shuts the VM off first: the checkpoints then read its disks
//! through `qemu-nbd` or directly, and "QEMU" is the CPU of the processes the checkpoint
//! started (`qemu-nbd`, `qemu-img`).
//! `REWIND_BENCH_ROUNDS=N` (default 3). Nothing passes or fails on timing.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

mod common;
#[path = "../../core/benches/data/mod.rs"]
mod data;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{cpu_secs, drop_caches, mixed_data_vm, qemu_img_convert, qemu_pid};
use data::{GIB, make_image};
use rewind_core::checkpoint;
use rewind_core::libvirt::Hypervisor;
use rewind_core::progress::Control;
use rewind_core::store::{InitOptions, Store};
use rewind_tests::daemon;
use rewind_tests::scratch::{ScratchDir, create_open_dir};

const DISK_BYTES: u64 = 4 * GIB;

/// What one child printed for its checkpoint.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    cpu_rewind: f64,
    cpu_qemu: f64,
    read_mb: f64,
    new_mb: f64,
    /// Minor page faults of the VM's QEMU meanwhile.
    qemu_faults: f64,
}

impl Sample {
    fn parse(line: &str) -> Option<Self> {
        let v: Vec<f64> = line
            .strip_prefix("AB ")?
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        // Builds of this bench before it counted QEMU's page faults print five numbers.
        (v.len() == 5 || v.len() == 6).then(|| Self {
            secs: v[0],
            cpu_rewind: v[1],
            cpu_qemu: v[2],
            read_mb: v[3],
            new_mb: v[4],
            qemu_faults: v.get(5).copied().unwrap_or(0.0),
        })
    }
}

/// The child: one full checkpoint of the running VM `vm` into a new store under
/// `REWIND_AB_DIR`, reported on one line.
fn child(vm: &str) {
    let dir = PathBuf::from(std::env::var_os("REWIND_AB_DIR").expect("REWIND_AB_DIR"));
    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let work = dir.join(format!("work-{}", std::process::id()));
    create_open_dir(&work).unwrap();
    let path = dir.join(format!("store-{}", std::process::id()));
    let store = Store::init(&path, &InitOptions::default()).unwrap();
    // A running VM's QEMU; for a shut-off VM, the `qemu-nbd` and `qemu-img` this process
    // starts and waits for (its children's CPU).
    let qemu = Some(qemu_pid(vm)).filter(|p| !p.is_empty());
    let qemu_cpu = || qemu.as_deref().map_or_else(children_cpu_secs, cpu_secs);
    let faults = || qemu.as_deref().map_or(0, minflt);
    let control = Control::new();
    let before = (cpu_secs("self"), qemu_cpu());
    let faults_before = faults();
    let t = Instant::now();
    let manifest = checkpoint::take(&hv, &store, vm, &work, &control)
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
    let secs = t.elapsed().as_secs_f64();
    let after = (cpu_secs("self"), qemu_cpu());
    assert!(manifest.parent.is_none(), "a full checkpoint was expected");
    println!(
        "AB {secs:.3} {:.2} {:.2} {:.1} {:.1} {}",
        after.0 - before.0,
        after.1 - before.1,
        manifest.read_bytes as f64 / 1e6,
        manifest.new_bytes as f64 / 1e6,
        faults() - faults_before
    );
    drop(store);
    fs::remove_dir_all(&path).unwrap();
    fs::remove_dir_all(&work).unwrap();
}

/// CPU seconds (user + system) of this process's children that it waited for.
fn children_cpu_secs() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split(' ').collect());
    [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum::<f64>()
        / 100.0
}

/// Minor page faults of process `pid` so far.
fn minflt(pid: &str) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').nth(7)?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Ok(vm) = std::env::var("REWIND_AB_VM") {
        child(&vm);
        return;
    }
    // Each entry: a binary, optionally followed by `?VAR=value,VAR=value` for its runs.
    let builds: Vec<(PathBuf, Vec<(String, String)>)> = std::env::var("REWIND_AB_BINS")
        .map_or_else(
            |_| vec![std::env::current_exe().unwrap().display().to_string()],
            |s| s.split(':').map(str::to_owned).collect(),
        )
        .into_iter()
        .map(|entry| {
            let (bin, vars) = entry.split_once('?').unwrap_or((&entry, ""));
            let vars = vars
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (PathBuf::from(bin), vars)
        })
        .collect();
    let bins: Vec<String> = std::env::var("REWIND_AB_BINS").map_or_else(
        |_| vec!["this build".to_owned()],
        |s| s.split(':').map(str::to_owned).collect(),
    );
    let rounds: usize = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let cold_too = std::env::var("REWIND_AB_COLD").is_ok_and(|v| v == "1");
    let perf = std::env::var_os("REWIND_AB_PERF").map(PathBuf::from);
    let shut_off = std::env::var("REWIND_AB_SHUT_OFF").is_ok_and(|v| v == "1");

    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("bench-ab-full").unwrap();
    let dir = scratch.path();
    let mut vm = mixed_data_vm("abfull", Some("sequence"), dir, DISK_BYTES, |raw| {
        make_image(raw, DISK_BYTES);
    });
    let disk = vm.disk("vdb").path.clone();
    vm.wait_flushed(20, Duration::from_mins(2)).unwrap();
    if shut_off {
        vm.destroy().unwrap();
    }
    let out = dir.join("copy.qcow2");

    let modes: &[bool] = if cold_too { &[false, true] } else { &[false] };
    // (build, cold) -> samples; qemu-img's by mode.
    let mut samples: Vec<Vec<(bool, Sample)>> = vec![Vec::new(); bins.len()];
    let mut convert: Vec<(bool, f64, f64)> = Vec::new();
    let load = || {
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
            .to_owned()
    };
    for round in 0..rounds {
        for &cold in modes {
            if cold {
                drop_caches();
            }
            let (secs, cpu) = qemu_img_convert(&disk, &out);
            convert.push((cold, secs, cpu));
            eprintln!(
                "round {round} {}: qemu-img {secs:.2} s, CPU {cpu:.2} s (load {})",
                if cold { "cold" } else { "warm" },
                load()
            );
            let mut order: Vec<usize> = (0..bins.len()).collect();
            order.rotate_left(round % bins.len());
            for b in order {
                if cold {
                    drop_caches();
                }
                let mut cmd = match &perf {
                    Some(perf_dir) => {
                        let mut c = Command::new("perf");
                        c.args(["record", "-a", "-g", "-F", "499", "-q", "-o"])
                            .arg(perf_dir.join(format!("{b}-{round}-{cold}.data")))
                            .arg("--")
                            .arg(&builds[b].0);
                        c
                    }
                    None => Command::new(&builds[b].0),
                };
                cmd.envs(builds[b].1.iter().map(|(k, v)| (k, v)));
                let output = cmd
                    .env("REWIND_AB_VM", &vm.name)
                    .env("REWIND_AB_DIR", dir)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&output.stdout);
                let sample = text.lines().find_map(Sample::parse).unwrap_or_else(|| {
                    panic!(
                        "build {} printed no result: {text}\n{}",
                        bins[b],
                        String::from_utf8_lossy(&output.stderr)
                    )
                });
                eprintln!(
                    "round {round} {}: build {b}: {:.2} s, CPU Rewind {:.2} s + QEMU {:.2} s = {:.2} s, read {:.0} MB, new {:.1} MB, QEMU faults {:.0} (load {})",
                    if cold { "cold" } else { "warm" },
                    sample.secs,
                    sample.cpu_rewind,
                    sample.cpu_qemu,
                    sample.cpu_rewind + sample.cpu_qemu,
                    sample.read_mb,
                    sample.new_mb,
                    sample.qemu_faults,
                    load()
                );
                samples[b].push((cold, sample));
            }
        }
    }
    drop(vm);

    println!(
        "| build | cache | wall s, median (all) | CPU s Rewind + QEMU, median (all) | Rewind | QEMU | MB stored | QEMU minor faults |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &cold in modes {
        let cache = if cold { "cold" } else { "warm" };
        let c: Vec<&(bool, f64, f64)> = convert.iter().filter(|c| c.0 == cold).collect();
        let all = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let secs: Vec<f64> = c.iter().map(|c| c.1).collect();
        let cpu: Vec<f64> = c.iter().map(|c| c.2).collect();
        println!(
            "| qemu-img convert + fsync | {cache} | **{:.2}** ({}) | **{:.2}** ({}) | | | | |",
            median(secs.clone()),
            all(&secs),
            median(cpu.clone()),
            all(&cpu)
        );
        for (b, bin) in bins.iter().enumerate() {
            let s: Vec<Sample> = samples[b]
                .iter()
                .filter(|s| s.0 == cold)
                .map(|s| s.1)
                .collect();
            let pick = |f: fn(&Sample) -> f64| s.iter().map(f).collect::<Vec<f64>>();
            let secs = pick(|s| s.secs);
            let total = pick(|s| s.cpu_rewind + s.cpu_qemu);
            println!(
                "| {b}: {} | {cache} | **{:.2}** ({}) | **{:.2}** ({}) | {:.2} | {:.2} | {:.0} | {:.0} |",
                bin,
                median(secs.clone()),
                all(&secs),
                median(total.clone()),
                all(&total),
                median(pick(|s| s.cpu_rewind)),
                median(pick(|s| s.cpu_qemu)),
                median(pick(|s| s.new_mb)),
                median(pick(|s| s.qemu_faults)),
            );
        }
    }
}
