//! Full-state checkpoint benchmark (issue 8): a 1 GiB test guest running the `counter`
//! workload (a line every ~100 ms). For each round: a disk-only checkpoint (the baseline
//! pause: the pull backup's instant), a full-state one the managed-save way (managed save,
//! start paused from the saved state, backup begun, resume) and one the live way (live
//! external snapshot, base images read, overlays merged back), into a local store.
//! Measured: the total time of each, the pause Rewind reports, and the guest-visible pause — the longest time, seen from
//! the host, during which the guest printed no new counter line around the checkpoint
//! (the console is polled every 10 ms; the normal gap is ~100–150 ms under TCG). Then, a
//! minute after the last one, another full-state checkpoint: the store bytes it added.
//!
//! ```sh
//! cargo bench -p rewind-tests --bench fullstate
//! ```
//!
//! as root (it starts libvirt itself). `REWIND_BENCH_ROUNDS=N` (default 3). Prints a
//! Markdown table; `core/BENCHMARKS.md` keeps the results. Nothing here passes or fails.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(clippy::cast_precision_loss)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rewind_core::checkpoint::{self, TakeOptions};
use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::lifecycle::StopMode;
use rewind_core::progress::{Control, Phase};
use rewind_core::restore::{RestoreOptions, restore_in_place};
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

/// Host times at which the guest's counter was seen to change, recorded while `f` runs;
/// returns `f`'s result, its seconds, and the longest gap between changes (seconds).
fn watched<T>(vm: &TestVm, f: impl FnOnce() -> T) -> (T, f64, f64) {
    let done = Arc::new(AtomicBool::new(false));
    let changes = std::thread::scope(|scope| {
        let watcher = {
            let done = done.clone();
            scope.spawn(move || {
                let mut changes = vec![Instant::now()];
                let mut last = vm.counter_lines().last().copied();
                // A little after the end, so the first line after a pause is seen.
                let mut tail_until: Option<Instant> = None;
                loop {
                    let now = vm.counter_lines().last().copied();
                    if now.is_some() && now != last {
                        changes.push(Instant::now());
                        last = now;
                    }
                    if done.load(Ordering::Relaxed) {
                        let until =
                            *tail_until.get_or_insert(Instant::now() + Duration::from_secs(1));
                        if Instant::now() > until {
                            return changes;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let t = Instant::now();
        let out = f();
        let secs = t.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        (out, secs, watcher.join().unwrap())
    });
    let (out, secs, changes) = changes;
    let gap = changes
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .fold(0.0, f64::max);
    (out, secs, gap)
}

/// How a benchmarked checkpoint is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Disk,
    ManagedSave,
    Live,
}

fn take(hv: &Hypervisor, store: &Store, vm: &TestVm, work: &std::path::Path, way: Way) -> Manifest {
    let options = TakeOptions {
        full_state: way != Way::Disk,
        managed_save: way == Way::ManagedSave,
        ..TakeOptions::default()
    };
    checkpoint::take_with(hv, store, &vm.name, work, &options, &Control::new())
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}"))
}

/// Restores `m` in place (the VM forced off; `disk_only`: booted rather than resumed) and
/// returns how long each phase of the restore took, in order.
fn restore_phases(
    hv: &Hypervisor,
    store: &Store,
    m: &Manifest,
    work: &std::path::Path,
    disk_only: bool,
) -> Vec<(Phase, f64)> {
    let control = Control::new();
    let options = RestoreOptions {
        stop: StopMode::Force,
        disk_only,
        ..RestoreOptions::default()
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut phases: Vec<(Phase, Instant)> = vec![(control.phase(), Instant::now())];
            while !done.load(Ordering::Relaxed) {
                let now = control.phase();
                if phases.last().is_some_and(|(p, _)| *p != now) {
                    phases.push((now, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            phases.push((Phase::Preparing, Instant::now()));
            phases
                .windows(2)
                .map(|w| (w[0].0, w[1].1.duration_since(w[0].1).as_secs_f64()))
                .collect::<Vec<_>>()
        });
        let report = restore_in_place(hv, store, m, &options, work, &control)
            .unwrap_or_else(|e| panic!("restore failed: {e}"));
        assert_eq!(report.resumed, !disk_only, "{report:?}");
        done.store(true, Ordering::Relaxed);
        watcher.join().unwrap()
    })
}

fn phases_text(phases: &[(Phase, f64)]) -> String {
    phases
        .iter()
        .map(|(p, secs)| format!("{} {secs:.2} s", p.label()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn memory_bytes(m: &Manifest) -> u64 {
    m.blobs
        .iter()
        .find(|b| b.name == checkpoint::MEMORY_BLOB)
        .map_or(0, |b| b.index.size_bytes)
}

fn main() {
    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    let scratch = ScratchDir::new("bench-fullstate").unwrap();
    let dir = scratch.path();
    let mut vm = TestVm::builder("bench-fullstate")
        .memory_mib(1024)
        .workload("counter")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 64 << 20)])
        .define()
        .unwrap();
    vm.start_and_wait_ready(Duration::from_mins(2)).unwrap();
    vm.wait_counter(20, Duration::from_mins(1)).unwrap();
    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let work = dir.join("work");
    create_open_dir(&work).unwrap();
    let store = Store::init(&dir.join("store"), &InitOptions::default()).unwrap();
    let rounds: u64 = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);

    println!("| run | total s | guest-visible pause ms | notes |");
    println!("|---|---|---|---|");
    let mut last = None;
    for round in 1..=rounds {
        vm.wait_counter(
            vm.counter_lines().last().map_or(0, |c| c.0) + 20,
            Duration::from_mins(1),
        )
        .unwrap();
        let (m, secs, gap) = watched(&vm, || take(&hv, &store, &vm, &work, Way::Disk));
        println!(
            "| round {round}: disk-only checkpoint | {secs:.2} | {:.0} | {} MB new |",
            gap * 1000.0,
            m.new_bytes / 1_000_000
        );
        vm.wait_counter(
            vm.counter_lines().last().map_or(0, |c| c.0) + 20,
            Duration::from_mins(1),
        )
        .unwrap();
        for (way, what) in [
            (Way::ManagedSave, "managed save"),
            (Way::Live, "live snapshot"),
        ] {
            vm.wait_counter(
                vm.counter_lines().last().map_or(0, |c| c.0) + 20,
                Duration::from_mins(1),
            )
            .unwrap();
            let (m, secs, gap) = watched(&vm, || take(&hv, &store, &vm, &work, way));
            println!(
                "| round {round}: full-state checkpoint ({what}) | {secs:.2} | {:.0} | memory image {} MB, {} MB new in the store; {} |",
                gap * 1000.0,
                memory_bytes(&m) / 1_000_000,
                m.new_bytes / 1_000_000,
                m.consistency_note.as_deref().unwrap_or_default()
            );
            last = Some(m);
        }
    }
    let first = last.expect("at least one round");
    std::thread::sleep(Duration::from_mins(1));
    let (m, secs, gap) = watched(&vm, || take(&hv, &store, &vm, &work, Way::Live));
    println!(
        "| full-state checkpoint a minute after the last (live) | {secs:.2} | {:.0} | memory image {} MB (before: {} MB), {} bytes new in the store |",
        gap * 1000.0,
        memory_bytes(&m) / 1_000_000,
        memory_bytes(&first) / 1_000_000,
        m.new_bytes
    );

    // Restores of that checkpoint: resumed (its memory read back while the VM still runs),
    // and, as the baseline, its disks only (a boot).
    for (disk_only, what) in [(false, "resumed"), (true, "disks only, booted (baseline)")] {
        vm.wait_counter(
            vm.counter_lines().last().map_or(0, |c| c.0) + 20,
            Duration::from_mins(2),
        )
        .unwrap();
        let (phases, secs, _) = watched(&vm, || restore_phases(&hv, &store, &m, &work, disk_only));
        // Until the guest counts again: the VM's whole time away, seen from the host.
        let back = Instant::now();
        let counted = vm.counter_lines().last().map_or(0, |c| c.0);
        drop(vm.wait_console_until(Duration::from_mins(2), |_| {
            vm.counter_lines().last().is_some_and(|c| c.0 != counted)
        }));
        let reading: f64 = phases
            .iter()
            .filter(|(p, _)| *p == Phase::ReadingMemory)
            .map(|(_, s)| s)
            .sum();
        println!(
            "| full-state restore in place, {what} | {secs:.2} | {:.0} | VM away {:.2} s (restore minus reading its memory, plus until the guest counted again); {} |",
            (secs - reading + back.elapsed().as_secs_f64()) * 1000.0,
            secs - reading + back.elapsed().as_secs_f64(),
            phases_text(&phases)
        );
    }
    vm.destroy().unwrap();
}
