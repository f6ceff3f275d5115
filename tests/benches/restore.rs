//! Restore benchmark (issue 5): the checkpoint benchmark's VM (a 4 GiB qcow2 disk holding
//! 2 GiB of mixed data), checkpointed live into a local store. Then:
//!
//! - a full restore of that checkpoint (as a new VM: every chunk read from the store and
//!   hash-checked once, written straight into a new qcow2 file, read back and compared,
//!   flushed, `qemu-img check`), against
//!   `qemu-img convert -O qcow2` of the same disk plus an fsync, in the same run, from a
//!   cold cache and with the data in the page cache;
//! - delta restores in place after 1 % of the data changed (320 pieces of 64 KiB written
//!   through QEMU while the VM runs): forced off, safety checkpoint from the dirty bitmap,
//!   only differing chunks written and verified; with and without the safety checkpoint.
//!
//! ```sh
//! cargo bench -p rewind-tests --bench restore
//! ```
//!
//! as root (it starts libvirt itself); ~12 GiB under the scratch root.
//! `REWIND_BENCH_ROUNDS=N` (default 3) sets the rounds, `REWIND_BENCH_ONLY=full|delta` runs
//! one half. Prints a Markdown
//! table; `core/BENCHMARKS.md` keeps the results. Nothing here passes or fails on timing.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
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

use common::{drop_caches, mixed_data_vm, qemu_img_convert};
use data::{DATA_BYTES, GIB, make_image, one_percent_change};
use rewind_core::checkpoint;
use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::lifecycle::StopMode;
use rewind_core::progress::{Control, Phase};
use rewind_core::restore::{
    DiskStorage, NewVm, RestoreOptions, RestoreReport, restore_as_new, restore_in_place,
};
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::{TestVm, daemon};

const DISK_BYTES: u64 = 4 * GIB;

/// A restore run with the time spent in each phase.
struct Timed {
    report: RestoreReport,
    secs: f64,
    phases: Vec<(Phase, f64)>,
    /// CPU seconds of this process (Rewind) and of its finished children (qemu-nbd).
    cpu: (f64, f64),
}

/// CPU seconds (user + system) of this process and of its children that have ended.
fn cpu_secs() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<f64> = stat.rsplit_once(") ").map_or(vec![], |(_, rest)| {
        rest.split(' ').map(|f| f.parse().unwrap_or(0.0)).collect()
    });
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0) / 100.0;
    (field(11) + field(12), field(13) + field(14))
}

fn timed(restore: impl FnOnce(&Control) -> RestoreReport) -> Timed {
    let control = Arc::new(Control::new());
    let done = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_secs();
    let started = Instant::now();
    let (report, phases) = std::thread::scope(|scope| {
        let (watched, finished) = (control.clone(), done.clone());
        let watch = scope.spawn(move || {
            let mut seen: Vec<(Phase, Instant)> = Vec::new();
            while !finished.load(Ordering::Relaxed) {
                let phase = watched.phase();
                if seen.last().is_none_or(|(last, _)| *last != phase) {
                    seen.push((phase, Instant::now()));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            seen.push((Phase::Preparing, Instant::now()));
            seen.windows(2)
                .map(|w| (w[0].0, (w[1].1 - w[0].1).as_secs_f64()))
                .collect::<Vec<_>>()
        });
        let report = restore(&control);
        done.store(true, Ordering::Relaxed);
        (report, watch.join().unwrap())
    });
    let secs = started.elapsed().as_secs_f64();
    let cpu_after = cpu_secs();
    Timed {
        report,
        secs,
        phases,
        cpu: (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1),
    }
}

fn phase_text(t: &Timed) -> String {
    let phases = t
        .phases
        .iter()
        .filter(|(_, s)| *s >= 0.005)
        .map(|(p, s)| format!("{} {s:.2} s", p.label()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{phases}; CPU: Rewind {:.1} s, qemu-nbd {:.1} s",
        t.cpu.0, t.cpu.1
    )
}

/// 1 % of the data: 320 pieces of 64 KiB of new random data through QEMU's block layer.
fn change_one_percent(vm: &TestVm, pieces: &Path, round: u64) {
    for (n, (offset, mut piece)) in one_percent_change().into_iter().enumerate() {
        // Another change each round, at the same places.
        piece[0] = piece[0].wrapping_add(round as u8);
        let file = pieces.join(format!("{n}"));
        fs::write(&file, &piece).unwrap();
        vm.host_write_file("vdb", &file, offset, piece.len() as u64)
            .unwrap();
    }
}

fn main() {
    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("bench-restore").unwrap();
    let dir = scratch.path();

    let mut vm = mixed_data_vm("bench-restore", None, dir, DISK_BYTES, |raw| {
        make_image(raw, DISK_BYTES);
    });
    let disk = vm.disk("vdb").path.clone();

    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let work = dir.join("work");
    create_open_dir(&work).unwrap();
    let store = Store::init(&dir.join("store"), &InitOptions::default()).unwrap();
    let c1: Manifest = checkpoint::take(&hv, &store, &vm.name, &work, &Control::new())
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
    eprintln!("checkpoint {} taken", c1.id);
    let out = dir.join("copy.qcow2");
    let copies = dir.join("copies");
    create_open_dir(&copies).unwrap();
    let mut rows: Vec<(String, f64, String)> = Vec::new();
    let rounds: u64 = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);

    // Full restores, each against qemu-img in the same conditions.
    let mut fulls: Vec<(bool, f64, f64)> = Vec::new();
    let only = std::env::var("REWIND_BENCH_ONLY").unwrap_or_default();
    let full_rounds = if only == "delta" { 0 } else { rounds };
    for round in 1..=full_rounds {
        for cold in [true, false] {
            if cold {
                drop_caches();
            }
            let (convert, convert_cpu) = qemu_img_convert(&disk, &out);
            if cold {
                drop_caches();
            }
            let name = format!("{}-copy", vm.name);
            let new = NewVm {
                name: Some(name.clone()),
                storage: DiskStorage::Folder(copies.clone()),
            };
            let options = RestoreOptions {
                start: Some(false),
                ..RestoreOptions::default()
            };
            let t = timed(|control| {
                restore_as_new(&hv, &store, &c1, &new, &options, &work, control)
                    .unwrap_or_else(|e| panic!("full restore failed: {e}"))
            });
            hv.undefine_vm(&name).unwrap();
            for d in &t.report.disks {
                fs::remove_file(&d.path).unwrap();
            }
            let label = if cold {
                "cold cache"
            } else {
                "store in page cache"
            };
            rows.push((
                format!("round {round}, {label}: qemu-img convert -O qcow2 + fsync"),
                convert,
                format!("CPU: qemu-img {convert_cpu:.1} s"),
            ));
            rows.push((
                format!("round {round}, {label}: full restore (as a new VM)"),
                t.secs,
                format!(
                    "{:.2}× qemu-img; {} MB written, {:.0} MB/s; {}",
                    t.secs / convert,
                    t.report.bytes_written / 1_000_000,
                    DATA_BYTES as f64 / 1e6 / t.secs,
                    phase_text(&t)
                ),
            ));
            fulls.push((cold, convert, t.secs));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut full_medians = Vec::new();
    for cold in [true, false] {
        let convert = median(fulls.iter().filter(|f| f.0 == cold).map(|f| f.1).collect());
        let full = median(fulls.iter().filter(|f| f.0 == cold).map(|f| f.2).collect());
        full_medians.push(full);
        rows.push((
            format!(
                "**median of {rounds}, {}: full restore**",
                if cold {
                    "cold cache"
                } else {
                    "store in page cache"
                }
            ),
            full,
            format!("qemu-img median {convert:.2} s: **{:.2}×**", full / convert),
        ));
    }

    if only == "full" {
        print_rows(rows);
        return;
    }

    // Delta restores in place of the running VM after 1 % changed.
    let pieces = dir.join("pieces");
    create_open_dir(&pieces).unwrap();
    let mut deltas: Vec<(bool, f64)> = Vec::new();
    for round in 1..=rounds {
        for safety in [true, false] {
            change_one_percent(&vm, &pieces, round * 2 + u64::from(safety));
            let options = RestoreOptions {
                stop: StopMode::Force,
                safety_checkpoint: safety,
                start: Some(false),
                ..RestoreOptions::default()
            };
            let t = timed(|control| {
                restore_in_place(&hv, &store, &c1, &options, &work, control)
                    .unwrap_or_else(|e| panic!("delta restore failed: {e}"))
            });
            let vdb = t.report.disks.iter().find(|d| d.target == "vdb").unwrap();
            rows.push((
                format!(
                    "round {round}: delta restore after 1 % changed, {}",
                    if safety {
                        "with safety checkpoint"
                    } else {
                        "without safety checkpoint"
                    }
                ),
                t.secs,
                format!(
                    "vdb: {} of {} chunks written ({} MB), compared by {:?}; {}",
                    vdb.chunks_written,
                    vdb.chunks,
                    vdb.bytes_written / 1_000_000,
                    vdb.compared_by,
                    phase_text(&t)
                ),
            ));
            // Without the VM's stop (libvirt's destroy; a real guest's shutdown takes
            // longer still): what the restore itself costs.
            let stopping: f64 = t
                .phases
                .iter()
                .filter(|(p, _)| *p == Phase::Stopping)
                .map(|(_, s)| s)
                .sum();
            deltas.push((safety, t.secs - stopping));
            // Booted before the next round: a guest still booting under TCG takes a core
            // from the next restore.
            let booting = Instant::now();
            vm.start_and_wait_ready(Duration::from_mins(2)).unwrap();
            eprintln!(
                "guest booted again in {:.1} s",
                booting.elapsed().as_secs_f64()
            );
        }
    }
    for safety in [true, false] {
        let delta = median(
            deltas
                .iter()
                .filter(|d| d.0 == safety)
                .map(|d| d.1)
                .collect(),
        );
        rows.push((
            format!(
                "**median of {rounds}: delta restore without the VM's stop, {}**",
                if safety {
                    "with safety checkpoint"
                } else {
                    "without safety checkpoint"
                }
            ),
            delta,
            format!(
                "**{:.0} %** of the cold full restore, {:.0} % of the warm one",
                delta / full_medians[0] * 100.0,
                delta / full_medians[1] * 100.0
            ),
        ));
    }
    vm.destroy().unwrap();
    print_rows(rows);
}

fn print_rows(rows: Vec<(String, f64, String)>) {
    println!("| run | seconds | notes |");
    println!("|---|---|---|");
    for (what, secs, notes) in rows {
        println!("| {what} | {secs:.2} | {notes} |");
    }
}
