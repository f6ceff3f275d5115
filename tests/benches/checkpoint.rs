//! Checkpoint benchmark (issue 4): a running VM whose 4 GiB qcow2 disk holds 2 GiB of mixed
//! data (the store benchmark's image). A full checkpoint, then an incremental after 1 % of
//! the data changed, compared with `qemu-img convert -O qcow2` of the same disk in the same
//! run; the guest's pause is read from its own uptime records, around each capture instant,
//! while each checkpoint copies (the load without a capture), and around five small
//! incrementals (a capture without the load). Run with
//!
//! ```sh
//! cargo bench -p rewind-tests --bench checkpoint
//! ```
//!
//! as root, like the integration tests (it starts libvirt itself). `REWIND_BENCH_GENTLE`
//! takes each full checkpoint at more than one priority in the same rounds (see
//! [`gentle_modes`]) and reports the guest's record gaps during each. Needs ~10 GiB under the
//! test scratch root (`REWIND_TEST_SCRATCH`, default `/var/tmp/rewind-tests`). Prints a
//! Markdown table; `core/BENCHMARKS.md` keeps the results with their conditions. Nothing
//! here passes or fails on timing.

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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{cpu_secs, drop_caches, mixed_data_vm, qemu_img_convert, qemu_pid};
use data::{DATA_BYTES, GIB, make_image, one_percent_change};
use rewind_core::checkpoint;
use rewind_core::libvirt::Hypervisor;
use rewind_core::priority::{self, Priority};
use rewind_core::progress::{Control, Phase};
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::workload::scan_sequence_file;
use rewind_tests::{TestVm, daemon};

const DISK_BYTES: u64 = 4 * GIB;

/// One timed checkpoint, with the guest records flushed just before it, when its capture
/// instant had passed (the phase turned to copying) and when it had finished.
struct Timed {
    manifest: Manifest,
    secs: f64,
    records: (u64, u64, u64),
    /// CPU seconds used meanwhile by Rewind (this process) and by the VM's QEMU.
    cpu: (f64, f64),
    /// How long each phase took.
    phases: String,
}

/// The priorities the full checkpoints run at, each one in every round, by
/// `REWIND_BENCH_GENTLE`: `0` (the default) the caller's, as "Checkpoint now"; `1` the
/// scheduler's ([`Priority::BACKGROUND`], as a scheduled checkpoint); `both` the two;
/// `idle` `SCHED_IDLE` with the idle I/O class ([`Priority::IDLE`]); `all` the three.
fn gentle_modes() -> Vec<(&'static str, Option<Priority>)> {
    let off = ("normal priority", None);
    let on = ("background priority", Some(Priority::BACKGROUND));
    let idle = ("SCHED_IDLE", Some(Priority::IDLE));
    match std::env::var("REWIND_BENCH_GENTLE").as_deref() {
        Err(_) | Ok("0") => vec![off],
        Ok("1") => vec![on],
        Ok("both") => vec![off, on],
        Ok("idle") => vec![idle],
        Ok("all") => vec![off, on, idle],
        Ok(other) => panic!("REWIND_BENCH_GENTLE={other}: use 0, 1, both, idle or all"),
    }
}

/// The largest, 90th-percentile and median gap (in hundredths of a second) between the
/// guest's records `from..=to`.
fn gap_stats(gaps_cs: &[(u64, u64)], from: u64, to: u64) -> (u64, u64, u64) {
    let mut g: Vec<u64> = gaps_cs
        .iter()
        .filter(|(i, _)| (from..=to).contains(i))
        .map(|g| g.1)
        .collect();
    if g.is_empty() {
        return (0, 0, 0);
    }
    g.sort_unstable();
    let at = |q: f64| g[((g.len() - 1) as f64 * q).round() as usize];
    (g[g.len() - 1], at(0.9), at(0.5))
}

fn take(hv: &Hypervisor, store: &Store, vm: &TestVm, work: &Path) -> Timed {
    take_at(None, hv, store, vm, work)
}

/// [`take`] at `priority` (on a thread of its own, as the scheduler's jobs run).
fn take_at(
    priority: Option<Priority>,
    hv: &Hypervisor,
    store: &Store,
    vm: &TestVm,
    work: &Path,
) -> Timed {
    let control = Arc::new(Control::new());
    let finished = Arc::new(AtomicBool::new(false));
    let before = vm.last_flushed_record();
    let qemu = qemu_pid(&vm.name);
    let cpu_before = (cpu_secs("self"), cpu_secs(&qemu));
    let watcher = std::thread::scope(|s| {
        let (control2, finished2) = (control.clone(), finished.clone());
        let t = Instant::now();
        let watch = s.spawn(move || {
            // When each phase was first seen (every 5 ms), and the record flushed when
            // copying began.
            let mut seen: Vec<(Phase, f64)> = Vec::new();
            let mut at_capture = None;
            while !finished2.load(Ordering::Relaxed) {
                let phase = control2.phase();
                if seen.last().is_none_or(|(p, _)| *p != phase) {
                    seen.push((phase, t.elapsed().as_secs_f64()));
                }
                if phase == Phase::Copying && at_capture.is_none() {
                    at_capture = Some(vm.last_flushed_record());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (at_capture.unwrap_or_else(|| vm.last_flushed_record()), seen)
        });
        let manifest = priority::run_at(priority, "rewind-job", || {
            checkpoint::take(hv, store, &vm.name, work, &control)
        })
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
        let secs = t.elapsed().as_secs_f64();
        finished.store(true, Ordering::Relaxed);
        let (at_capture, mut seen) = watch.join().unwrap();
        seen.push((Phase::Finishing, secs));
        let phases = seen
            .windows(2)
            .map(|w| format!("{} {:.2} s", w[0].0.label(), w[1].1 - w[0].1))
            .collect::<Vec<_>>()
            .join(", ");
        (manifest, secs, (at_capture, phases))
    });
    let (manifest, secs, (at_capture, phases)) = watcher;
    Timed {
        manifest,
        secs,
        records: (before, at_capture, vm.last_flushed_record()),
        phases,
        cpu: (
            cpu_secs("self") - cpu_before.0,
            cpu_secs(&qemu) - cpu_before.1,
        ),
    }
}

fn main() {
    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("bench-checkpoint").unwrap();
    let dir = scratch.path();

    let mut vm = mixed_data_vm("bench", Some("sequence"), dir, DISK_BYTES, |raw| {
        make_image(raw, DISK_BYTES);
    });
    let disk = vm.disk("vdb").path.clone();
    vm.wait_flushed(20, Duration::from_mins(2)).unwrap();

    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let work = dir.join("work");
    create_open_dir(&work).unwrap();
    let out = dir.join("copy.qcow2");
    let mut rows: Vec<(String, f64, String)> = Vec::new();

    // Rounds alternate qemu-img and Rewind, each from a cold cache and then again with the
    // disk in the page cache; every full checkpoint goes into a new store. The first
    // round's cold store is kept for the incremental.
    let rounds: usize = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut timed_full: Vec<(&str, f64, Timed)> = Vec::new();
    let modes = gentle_modes();
    // Which priority each full checkpoint ran at (by its place in `timed_full`).
    let mut mode_of: Vec<&str> = Vec::new();
    let mut store_a = None;
    for round in 1..=rounds {
        for cold in [true, false] {
            if cold {
                drop_caches();
            }
            let (convert, convert_cpu) = qemu_img_convert(&disk, &out);
            let label = if cold {
                "cold cache"
            } else {
                "disk in page cache"
            };
            rows.push((
                format!("round {round}, {label}: qemu-img convert -O qcow2 + fsync"),
                convert,
                format!("CPU: qemu-img {convert_cpu:.1} s"),
            ));
            // The priorities take turns going first.
            let mut order = modes.clone();
            order.rotate_left((round - 1) % modes.len());
            for (mode, priority) in order {
                if cold {
                    drop_caches();
                }
                let path = dir.join(format!("store-{round}-{cold}-{}", mode_of.len()));
                let store = Store::init(&path, &InitOptions::default()).unwrap();
                let t = take_at(priority, &hv, &store, &vm, &work);
                assert!(t.manifest.parent.is_none());
                let at = if modes.len() > 1 || priority.is_some() {
                    format!(" at {mode}")
                } else {
                    String::new()
                };
                rows.push((
                format!("round {round}, {label}: full checkpoint{at}"),
                t.secs,
                format!(
                    "{:.2}× qemu-img; read {} MB, {:.0} MB/s; {} MB new in the store; CPU: Rewind {:.1} s, QEMU {:.1} s; {}",
                    t.secs / convert,
                    t.manifest.read_bytes / 1_000_000,
                    DATA_BYTES as f64 / 1e6 / t.secs,
                    t.manifest.new_bytes / 1_000_000,
                    t.cpu.0,
                    t.cpu.1,
                    t.phases
                ),
            ));
                if store_a.is_none() {
                    store_a = Some(store);
                } else {
                    drop(store);
                    fs::remove_dir_all(&path).unwrap();
                }
                timed_full.push((label, convert, t));
                mode_of.push(mode);
            }
        }
    }
    for (label, (mode, _)) in ["cold cache", "disk in page cache"]
        .into_iter()
        .flat_map(|l| modes.iter().map(move |m| (l, *m)))
    {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let of = |f: &dyn Fn(&(&str, f64, Timed)) -> f64| {
            median(
                timed_full
                    .iter()
                    .zip(&mode_of)
                    .filter(|(t, m)| t.0 == label && **m == mode)
                    .map(|(t, _)| f(t))
                    .collect(),
            )
        };
        let (convert, full) = (of(&|t| t.1), of(&|t| t.2.secs));
        let at = if modes.len() > 1 {
            format!(" at {mode}")
        } else {
            String::new()
        };
        rows.push((
            format!("**median of {rounds}, {label}: full checkpoint{at}**"),
            full,
            format!("qemu-img median {convert:.2} s: **{:.2}×**", full / convert),
        ));
    }
    let store_a = store_a.expect("at least one round");
    let full_cold = &timed_full[0].2;

    // 1 %: 320 pieces of 64 KiB of new random data, written through QEMU's block layer so
    // the dirty bitmaps see them like guest writes.
    let pieces = dir.join("pieces");
    create_open_dir(&pieces).unwrap();
    for (n, (offset, piece)) in one_percent_change().iter().enumerate() {
        let file = pieces.join(format!("{n}"));
        fs::write(&file, piece).unwrap();
        vm.host_write_file("vdb", &file, *offset, piece.len() as u64)
            .unwrap();
    }
    let incr = take(&hv, &store_a, &vm, &work);
    assert_eq!(
        incr.manifest.parent.as_deref(),
        Some(full_cold.manifest.id.as_str()),
        "the second checkpoint into store A should be incremental: {:?}",
        incr.manifest.full_reason
    );
    rows.push((
        "incremental after 1 % (20 MiB in 320 pieces) changed".into(),
        incr.secs,
        format!(
            "read {} MB; {} MB new in the store; {}",
            incr.manifest.read_bytes / 1_000_000,
            incr.manifest.new_bytes / 1_000_000,
            incr.phases
        ),
    ));
    // Small incrementals (only the guest's own records changed), a few seconds apart: the
    // capture instant without the load of a large copy around it.
    let mut small = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(2));
        small.push(take(&hv, &store_a, &vm, &work));
    }

    // The guest's pause: its records are ~100 ms apart; the largest gap around each
    // capture instant, against the median gap of the whole run. The largest gap while the
    // same checkpoint copied (no capture then, but the same load on the two cores, which
    // delays the guest's records too) tells the load from the capture.
    vm.destroy().unwrap();
    let scan = scan_sequence_file(&vm.disk("vda").path, "qcow2").unwrap();
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    let gaps_cs: Vec<(u64, u64)> = scan
        .records
        .windows(2)
        .map(|w| (w[1].index, w[1].uptime_cs.saturating_sub(w[0].uptime_cs)))
        .collect();
    let mut sorted: Vec<u64> = gaps_cs.iter().map(|g| g.1).collect();
    sorted.sort_unstable();
    let median_cs = sorted[sorted.len() / 2];
    let largest_cs = |from: u64, to: u64| {
        gaps_cs
            .iter()
            .filter(|(i, _)| (from..=to).contains(i))
            .map(|g| g.1)
            .max()
            .unwrap_or(0)
    };
    let captures = timed_full
        .iter()
        .map(|(label, _, t)| (format!("full ({label})"), t))
        .chain([("incremental".to_owned(), &incr)])
        .chain(
            small
                .iter()
                .enumerate()
                .map(|(n, t)| (format!("small incremental {}", n + 1), t)),
        );
    for (what, t) in captures {
        let (from, to) = (t.records.0, t.records.1 + 2);
        let worst_cs = largest_cs(from, to);
        let copying = if t.records.2 > to {
            format!(
                "; largest gap while copying (records {}..{}, no capture) {} ms",
                to + 1,
                t.records.2,
                largest_cs(to + 1, t.records.2) * 10
            )
        } else {
            String::new()
        };
        rows.push((
            format!("guest: largest record gap around the capture instant, {what}"),
            worst_cs as f64 / 100.0,
            format!(
                "records {from}..{to}; median gap over the run {} ms, so a pause of at most {} ms{copying}",
                median_cs * 10,
                worst_cs.saturating_sub(median_cs) * 10,
            ),
        ));
    }

    // The guest's record gaps while each full checkpoint ran (from the record flushed
    // before it began to the one flushed after it ended), by the priority it ran at.
    if modes.len() > 1 || modes[0].1.is_some() {
        let mut summary: Vec<(&str, Vec<[f64; 6]>)> = modes.iter().map(|m| (m.0, vec![])).collect();
        for ((label, _, t), mode) in timed_full.iter().zip(&mode_of) {
            let (largest, p90, median) = gap_stats(&gaps_cs, t.records.0 + 1, t.records.2);
            rows.push((
                format!("guest: largest record gap during the full checkpoint ({label}) at {mode}"),
                largest as f64 / 100.0,
                format!(
                    "records {}..{}: 90th percentile {} ms, median {} ms; checkpoint {:.2} s, CPU Rewind {:.1} s, QEMU {:.1} s",
                    t.records.0 + 1,
                    t.records.2,
                    p90 * 10,
                    median * 10,
                    t.secs,
                    t.cpu.0,
                    t.cpu.1
                ),
            ));
            if let Some((_, v)) = summary.iter_mut().find(|(m, _)| m == mode) {
                v.push([
                    largest as f64 * 10.0,
                    p90 as f64 * 10.0,
                    median as f64 * 10.0,
                    t.secs,
                    t.cpu.0,
                    t.cpu.1,
                ]);
            }
        }
        for (mode, v) in summary {
            let median = |k: usize| {
                let mut x: Vec<f64> = v.iter().map(|r| r[k]).collect();
                x.sort_by(f64::total_cmp);
                x[x.len() / 2]
            };
            rows.push((
                format!("**median of {} full checkpoints at {mode}: largest guest record gap**", v.len()),
                median(0) / 1000.0,
                format!(
                    "90th percentile {:.0} ms, median gap {:.0} ms; checkpoint {:.2} s, CPU Rewind {:.1} s, QEMU {:.1} s (median gap over the whole run {} ms)",
                    median(1),
                    median(2),
                    median(3),
                    median(4),
                    median(5),
                    median_cs * 10
                ),
            ));
        }
    }

    println!("| run | seconds | notes |");
    println!("|---|---|---|");
    for (what, secs, notes) in rows {
        println!("| {what} | {secs:.2} | {notes} |");
    }
}
