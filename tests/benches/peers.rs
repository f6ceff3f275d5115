//! Peer benchmark (issue 20): Rewind beside `qemu-img convert` and virtnbdbackup on the
//! same running VM and disk. The checkpoint benchmark's VM (the tiny TCG guest, idle, a
//! 64 MiB `vda` and a 4 GiB qcow2 `vdb` holding the store benchmark's 2 GiB of mixed data:
//! 1 GiB random, 0.5 GiB text, 0.5 GiB repeats), warm cache (every disk image, backup
//! folder or store is read once, untimed, before each timed operation), 3 rounds for each
//! of two kinds of 1 % change.
//!
//! The 1 % change: 40 MiB of writes through QEMU's block layer (HMP `qemu-io`, so dirty
//! bitmaps see them like guest writes), sizes 4 KiB, 64 KiB, 256 KiB and 1 MiB in turn
//! (the last one cut to make 40 MiB), each at a random 4 KiB-aligned place inside one of
//! the three data regions. Its bytes are one repeated value (`write -P`), or random bytes
//! (`write -s FILE`). The virtnbdbackup and Rewind incrementals see the same places and
//! sizes with different contents.
//!
//! Each round, from a VM with no libvirt checkpoint (virtnbdbackup refuses to run beside a
//! checkpoint it did not make, so the two tools take turns):
//! 1. `qemu-img convert -U -O qcow2` of both disks, fsync of the copies; the copies
//!    converted back to new images, fsynced (its "restore");
//! 2. virtnbdbackup (`-l full`, its defaults: stream format, no compression; `-n`, no
//!    progress bar), fsync of its folder; the 1 % change; `-l inc`, fsync;
//!    `virtnbdrestore` of the whole chain and of `virtnbdbackup.0` (`--until`), each into
//!    a new folder, fsynced; its checkpoints deleted;
//! 3. Rewind through the core API: a full checkpoint into a new store; the change (other
//!    contents); the incremental; the latest checkpoint restored as a new VM (`restore_as_new`,
//!    read back and fsynced), and the first restored in place over the changed disk
//!    (`restore_in_place`, VM forced off, default safety checkpoint), the VM started again.
//!
//! CPU seconds are user + system time: of the tool (from `/usr/bin/time`, children waited
//! for included; Rewind: this process) plus the VM's QEMU process (`/proc/PID/stat`). Peak
//! RSS is `/usr/bin/time`'s `%M` for commands, `VmHWM` of this process (reset before each
//! operation) for Rewind. "Bytes read from QEMU": Rewind's manifest's `read_bytes`;
//! virtnbdbackup's "bytes of data extents to backup" log lines, summed over the disks (it
//! reads exactly those extents).
//!
//! ```sh
//! tests/benches/peers.sh              # installs virtnbdbackup if missing, then runs this
//! cargo bench -p rewind-tests --bench peers
//! ```
//!
//! as root (it starts libvirt itself); ~12 GiB under the scratch root.
//! `REWIND_BENCH_ROUNDS=N` (default 3), `REWIND_BENCH_CHANGES=repeated|random|both`
//! (default both). Prints Markdown tables. Nothing here passes or fails on timing.

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

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{cpu_secs, mixed_data_vm, qemu_pid, run, status_field};
use data::{GIB, MIB, RANDOM, REPEATS, Rng, TEXT, make_image};
use rewind_core::checkpoint;
use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::lifecycle::StopMode;
use rewind_core::progress::{Control, Phase};
use rewind_core::restore::{DiskStorage, NewVm, RestoreOptions, restore_as_new, restore_in_place};
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::{TestVm, daemon};

const DISK_BYTES: u64 = 4 * GIB;
const CHANGE_BYTES: u64 = 40 * MIB;
const TARGETS: [&str; 2] = ["vda", "vdb"];

/// What the 1 % change writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every write one byte value (`qemu-io write -P`).
    Repeated,
    /// Random bytes (`qemu-io write -s FILE`).
    Random,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Repeated => "one repeated value",
            Self::Random => "random bytes",
        }
    }
}

/// The places of a 1 % change: (offset, length), 40 MiB in all.
fn change_plan(seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed | 1);
    let sizes = [4 << 10, 64 << 10, 256 << 10, MIB];
    let regions = [RANDOM, TEXT, REPEATS];
    let mut plan = Vec::new();
    let mut total = 0;
    for n in 0.. {
        if total >= CHANGE_BYTES {
            break;
        }
        let len = u64::min(sizes[n % sizes.len()], CHANGE_BYTES - total);
        let (start, region) = regions[(rng.next() % 3) as usize];
        let slots = (region - len) / 4096;
        plan.push((start + (rng.next() % slots) * 4096, len));
        total += len;
    }
    plan
}

/// Writes the change to `vdb` through QEMU; `content` makes each change's bytes differ.
fn apply_change(vm: &TestVm, plan: &[(u64, u64)], kind: Kind, content: u64, pieces: &Path) {
    let t = Instant::now();
    for (n, &(offset, len)) in plan.iter().enumerate() {
        match kind {
            Kind::Repeated => {
                // Never zero, which could be taken for a hole.
                let byte = 0x40 + (content % 0xb0) as u8;
                vm.host_write("vdb", byte, offset, len).unwrap();
            }
            Kind::Random => {
                let mut bytes = vec![0u8; len as usize];
                Rng((content << 20) ^ n as u64 ^ 0x9E37_79B9).fill(&mut bytes);
                let file = pieces.join(format!("{n}"));
                fs::write(&file, &bytes).unwrap();
                vm.host_write_file("vdb", &file, offset, len).unwrap();
                fs::remove_file(&file).unwrap();
            }
        }
    }
    eprintln!(
        "  change written ({} writes, {}) in {:.1} s",
        plan.len(),
        kind.label(),
        t.elapsed().as_secs_f64()
    );
}

/// Every file under `path` (a file or a folder).
fn files_under(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// Reads everything under `paths` once, so that the timed operation finds it in the page
/// cache.
fn warm(paths: &[&Path]) {
    let mut buf = vec![0u8; 4 * MIB as usize];
    for path in paths {
        for file in files_under(path) {
            let mut f = File::open(&file).unwrap();
            while f.read(&mut buf).unwrap() > 0 {}
        }
    }
}

/// Makes everything under `path` durable: every file and folder fsynced.
fn fsync_tree(path: &Path) {
    for file in files_under(path) {
        File::open(&file).unwrap().sync_all().unwrap();
    }
    let mut dirs = vec![path.to_owned()];
    while let Some(d) = dirs.pop() {
        if d.is_dir() {
            File::open(&d).unwrap().sync_all().unwrap();
            dirs.extend(
                fs::read_dir(&d)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
    }
}

/// `du -sb`: bytes in the files under `path`.
fn du(path: &Path) -> u64 {
    let out = run(Command::new("du").arg("-sb").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// One measured operation.
#[derive(Debug, Clone, Default)]
struct Measure {
    /// Wall seconds, the fsync of what it wrote included.
    secs: f64,
    /// Of which the fsync that followed the command (0 for Rewind, which syncs itself).
    sync_secs: f64,
    /// CPU seconds of the tool and of the VM's QEMU.
    cpu: (f64, f64),
    /// Peak RSS in KiB.
    rss_kib: u64,
    /// This process's RSS when the peak was reset (Rewind only: its peak includes it).
    rss_base_kib: u64,
    /// What the command printed on stderr.
    stderr: String,
}

/// Runs `argv` under `/usr/bin/time`, then fsyncs everything under `durable`.
fn external(argv: &[OsString], durable: &[&Path], qemu: &str, time_file: &Path) -> Measure {
    let qemu_before = cpu_secs(qemu);
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%U %S %M", "-o"])
        .arg(time_file)
        .args(argv)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{argv:?} failed:\n{stderr}");
    let synced = Instant::now();
    for path in durable {
        fsync_tree(path);
    }
    let secs = t.elapsed().as_secs_f64();
    let sync_secs = synced.elapsed().as_secs_f64();
    let qemu_cpu = cpu_secs(qemu) - qemu_before;
    let times = fs::read_to_string(time_file).unwrap();
    // The last line: an earlier one may say that the command exited non-zero.
    let fields: Vec<f64> = times
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "unexpected /usr/bin/time output: {times}");
    Measure {
        secs,
        sync_secs,
        cpu: (fields[0] + fields[1], qemu_cpu),
        rss_kib: fields[2] as u64,
        rss_base_kib: 0,
        stderr,
    }
}

fn argv(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Runs `op` in this process: wall time, CPU of this process and of QEMU, `VmHWM` (reset
/// first).
fn in_process<T>(qemu: &str, op: impl FnOnce() -> T) -> (T, Measure) {
    // 5: reset the peak RSS to the current RSS.
    fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss_base_kib = status_field(std::process::id(), "VmRSS");
    let before = (cpu_secs("self"), cpu_secs(qemu));
    let t = Instant::now();
    let value = op();
    let secs = t.elapsed().as_secs_f64();
    let measure = Measure {
        secs,
        sync_secs: 0.0,
        cpu: (cpu_secs("self") - before.0, cpu_secs(qemu) - before.1),
        rss_kib: status_field(std::process::id(), "VmHWM"),
        rss_base_kib,
        stderr: String::new(),
    };
    (value, measure)
}

/// Runs `op` while watching `control`'s phase (every 2 ms); returns its value and the
/// seconds spent in each phase, in order.
fn with_phases<T>(control: &Control, op: impl FnOnce() -> T) -> (T, Vec<(Phase, f64)>) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let mut seen: Vec<(Phase, Instant)> = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let phase = control.phase();
                if seen.last().is_none_or(|(p, _)| *p != phase) {
                    seen.push((phase, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen.push((Phase::Preparing, Instant::now()));
            seen.windows(2)
                .map(|w| (w[0].0, (w[1].1 - w[0].1).as_secs_f64()))
                .collect::<Vec<_>>()
        });
        let value = op();
        done.store(true, Ordering::Relaxed);
        (value, watch.join().unwrap())
    })
}

/// The phases that took 5 ms or more, in words.
fn phase_text(phases: &[(Phase, f64)]) -> String {
    phases
        .iter()
        .filter(|(_, s)| *s >= 0.005)
        .map(|(p, s)| format!("{} {s:.2} s", p.label()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// virtnbdbackup's "N bytes of data extents to backup", summed over the disks.
fn extent_bytes(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            let head = l.split(" bytes of data extents to backup").next()?;
            if head.len() == l.len() {
                return None;
            }
            head.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum()
}

/// Deletes every libvirt checkpoint of the VM (with its bitmaps).
fn delete_checkpoints(hv: &Hypervisor, vm: &str) {
    for name in hv.checkpoint_names(vm).unwrap() {
        hv.delete_checkpoint(vm, &name).unwrap();
    }
}

/// A VM restored as new: undefined when dropped, also when the benchmark panics.
struct Restored<'a> {
    hv: &'a Hypervisor,
    name: String,
}

impl Drop for Restored<'_> {
    fn drop(&mut self) {
        drop(self.hv.undefine_vm(&self.name));
    }
}

/// Figures of one tool in one round; `None` where the tool has no such thing.
#[derive(Debug, Default, Clone)]
struct Figures {
    full: Measure,
    size_after_full: u64,
    incr: Option<Measure>,
    incr_read: Option<u64>,
    incr_added: Option<u64>,
    /// Of the bytes added, those in the disks' data files (virtnbdbackup copies the VM's
    /// kernel and initrd into every backup).
    incr_added_data: Option<u64>,
    restore: Measure,
    restore_first: Option<Measure>,
    /// The restore of the first checkpoint without stopping the VM (Rewind stops it first;
    /// virtnbdbackup writes new images beside the running VM).
    restore_first_no_stop: Option<f64>,
    notes: Vec<String>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    for tool in ["virtnbdbackup", "virtnbdrestore", "/usr/bin/time"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: run tests/benches/peers.sh, which installs it"
        );
    }
    let version = run(Command::new("virtnbdbackup").arg("-V"));
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let scratch = ScratchDir::new("bench-peers").unwrap();
    let dir = scratch.path();

    let mut vm = mixed_data_vm("bench-peers", None, dir, DISK_BYTES, |raw| {
        make_image(raw, DISK_BYTES);
    });
    let disks: Vec<PathBuf> = TARGETS.iter().map(|t| vm.disk(t).path.clone()).collect();
    let disk_refs: Vec<&Path> = disks.iter().map(PathBuf::as_path).collect();

    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let work = dir.join("work");
    create_open_dir(&work).unwrap();
    let pieces = dir.join("pieces");
    create_open_dir(&pieces).unwrap();
    let time_file = dir.join("time.txt");
    let rounds: u64 = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let kinds: Vec<Kind> = match std::env::var("REWIND_BENCH_CHANGES").as_deref() {
        Ok("repeated") => vec![Kind::Repeated],
        Ok("random") => vec![Kind::Random],
        _ => vec![Kind::Repeated, Kind::Random],
    };

    // (kind, tool) → figures of each round.
    let mut results: BTreeMap<(u8, &str), Vec<Figures>> = BTreeMap::new();
    for (k, &kind) in kinds.iter().enumerate() {
        for round in 1..=rounds {
            eprintln!("{} , round {round}", kind.label());
            let rdir = dir.join(format!("round-{k}-{round}"));
            create_open_dir(&rdir).unwrap();
            let qemu = qemu_pid(&vm.name);
            delete_checkpoints(&hv, &vm.name);
            let plan = change_plan(0xC0FF_EE00 + 16 * k as u64 + round);

            // 1. qemu-img convert, both disks, fsynced; and back.
            let copies: Vec<PathBuf> = TARGETS
                .iter()
                .map(|t| rdir.join(format!("copy-{t}.qcow2")))
                .collect();
            warm(&disk_refs);
            let mut full = Measure::default();
            for (disk, copy) in disks.iter().zip(&copies) {
                let m = external(
                    &argv(&[
                        &"qemu-img",
                        &"convert",
                        &"-U",
                        &"-f",
                        &"qcow2",
                        &"-O",
                        &"qcow2",
                        disk,
                        copy,
                    ]),
                    &[copy],
                    &qemu,
                    &time_file,
                );
                full.secs += m.secs;
                full.sync_secs += m.sync_secs;
                full.cpu = (full.cpu.0 + m.cpu.0, full.cpu.1 + m.cpu.1);
                full.rss_kib = full.rss_kib.max(m.rss_kib);
            }
            let size_after_full = copies.iter().map(|c| du(c)).sum();
            let copy_refs: Vec<&Path> = copies.iter().map(PathBuf::as_path).collect();
            warm(&copy_refs);
            let mut restore = Measure::default();
            for copy in &copies {
                let back = copy.with_extension("back.qcow2");
                let m = external(
                    &argv(&[
                        &"qemu-img",
                        &"convert",
                        &"-f",
                        &"qcow2",
                        &"-O",
                        &"qcow2",
                        copy,
                        &back,
                    ]),
                    &[&back],
                    &qemu,
                    &time_file,
                );
                fs::remove_file(&back).unwrap();
                restore.secs += m.secs;
                restore.sync_secs += m.sync_secs;
                restore.rss_kib = restore.rss_kib.max(m.rss_kib);
            }
            results
                .entry((k as u8, "qemu-img"))
                .or_default()
                .push(Figures {
                    full,
                    size_after_full,
                    restore,
                    ..Figures::default()
                });

            // 2. virtnbdbackup.
            let vnb = rdir.join("virtnbdbackup");
            create_open_dir(&vnb).unwrap();
            let backup = |level: &str| {
                external(
                    &argv(&[
                        &"virtnbdbackup",
                        &"-U",
                        &daemon::URI,
                        &"-d",
                        &vm.name,
                        &"-l",
                        &level,
                        &"-n",
                        &"-o",
                        &vnb,
                    ]),
                    &[&vnb],
                    &qemu,
                    &time_file,
                )
            };
            warm(&disk_refs);
            let full = backup("full");
            let full_read = extent_bytes(&full.stderr);
            let size_after_full = du(&vnb);
            apply_change(&vm, &plan, kind, 2 * round, &pieces);
            let data_bytes = || -> u64 {
                files_under(&vnb)
                    .iter()
                    .filter(|f| f.extension().is_some_and(|e| e == "data"))
                    .map(|f| fs::metadata(f).unwrap().len())
                    .sum()
            };
            let data_before = data_bytes();
            warm(&disk_refs);
            let incr = backup("inc");
            let incr_read = extent_bytes(&incr.stderr);
            let incr_added = du(&vnb) - size_after_full;
            let incr_added_data = data_bytes() - data_before;
            let restore_log = rdir.join("virtnbdrestore.log");
            let vnb_restore = |until: Option<&str>, out: &Path| {
                let mut args = argv(&[
                    &"virtnbdrestore",
                    &"-U",
                    &daemon::URI,
                    &"-n",
                    &"-L",
                    &restore_log,
                    &"-i",
                    &vnb,
                    &"-o",
                    &out,
                ]);
                if let Some(until) = until {
                    args.extend(argv(&[&"--until", &until]));
                }
                warm(&[&vnb]);
                external(&args, &[out], &qemu, &time_file)
            };
            let out = rdir.join("vnb-restore");
            let restore = vnb_restore(None, &out);
            fs::remove_dir_all(&out).unwrap();
            let out = rdir.join("vnb-restore-first");
            let restore_first = vnb_restore(Some("virtnbdbackup.0"), &out);
            // Untimed check: the first backup restored equals the qemu-img copy taken just
            // before it (the idle guest does not write to vdb).
            let restored_vdb = out.join(vm.disk("vdb").path.file_name().unwrap());
            let same = Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "qcow2"])
                .arg(&restored_vdb)
                .arg(&copies[1])
                .output()
                .unwrap();
            let mut notes = vec![format!(
                "full read {} MB, its fsync {:.2} s; incremental's fsync {:.2} s",
                full_read / 1_000_000,
                full.sync_secs,
                incr.sync_secs
            )];
            notes.push(if same.status.success() {
                "restored virtnbdbackup.0 vdb = qemu-img copy".into()
            } else {
                format!(
                    "restored virtnbdbackup.0 vdb DIFFERS from the qemu-img copy: {}",
                    String::from_utf8_lossy(&same.stdout).trim()
                )
            });
            fs::remove_dir_all(&out).unwrap();
            results
                .entry((k as u8, "virtnbdbackup"))
                .or_default()
                .push(Figures {
                    full,
                    size_after_full,
                    incr: Some(incr),
                    incr_read: Some(incr_read),
                    incr_added: Some(incr_added),
                    incr_added_data: Some(incr_added_data),
                    restore,
                    restore_first_no_stop: Some(restore_first.secs),
                    restore_first: Some(restore_first),
                    notes,
                });
            delete_checkpoints(&hv, &vm.name);
            for copy in &copies {
                fs::remove_file(copy).unwrap();
            }
            fs::remove_dir_all(&vnb).unwrap();

            // 3. Rewind.
            let store_dir = rdir.join("store");
            let store = Store::init(&store_dir, &InitOptions::default()).unwrap();
            let take = || {
                checkpoint::take(&hv, &store, &vm.name, &work, &Control::new())
                    .unwrap_or_else(|e| panic!("checkpoint failed: {e}"))
            };
            warm(&disk_refs);
            let (c1, full): (Manifest, Measure) = in_process(&qemu, take);
            assert!(c1.parent.is_none());
            let size_after_full = du(&store_dir);
            apply_change(&vm, &plan, kind, 2 * round + 1, &pieces);
            warm(&disk_refs);
            let (c2, incr) = in_process(&qemu, take);
            assert_eq!(
                c2.parent.as_deref(),
                Some(c1.id.as_str()),
                "the second checkpoint should be incremental: {:?}",
                c2.full_reason
            );
            let incr_added = du(&store_dir) - size_after_full;
            let copies_dir = rdir.join("copies");
            create_open_dir(&copies_dir).unwrap();
            let new = NewVm {
                name: Some(format!("{}-copy", vm.name)),
                storage: DiskStorage::Folder(copies_dir.clone()),
            };
            warm(&[&store_dir]);
            let (report, restore) = in_process(&qemu, || {
                let _undefine = Restored {
                    hv: &hv,
                    name: format!("{}-copy", vm.name),
                };
                let options = RestoreOptions {
                    start: Some(false),
                    ..RestoreOptions::default()
                };
                restore_as_new(&hv, &store, &c2, &new, &options, &work, &Control::new())
                    .unwrap_or_else(|e| panic!("full restore failed: {e}"))
            });
            fs::remove_dir_all(&copies_dir).unwrap();
            warm(&[&store_dir]);
            let options = RestoreOptions {
                stop: StopMode::Force,
                start: Some(false),
                ..RestoreOptions::default()
            };
            let control = Control::new();
            let ((in_place, phases), restore_first) = in_process(&qemu, || {
                with_phases(&control, || {
                    restore_in_place(&hv, &store, &c1, &options, &work, &control)
                        .unwrap_or_else(|e| panic!("restore in place failed: {e}"))
                })
            });
            let stopping: f64 = phases
                .iter()
                .filter(|(p, _)| *p == Phase::Stopping)
                .map(|(_, s)| s)
                .sum();
            let written: u64 = in_place.disks.iter().map(|d| d.bytes_written).sum();
            let notes = vec![
                format!(
                    "full read {} MB; CPU of the full: Rewind {:.1} s, QEMU {:.1} s",
                    c1.read_bytes / 1_000_000,
                    full.cpu.0,
                    full.cpu.1
                ),
                format!(
                    "restore as new wrote {} MB; in place wrote {} MB: {}",
                    report.bytes_written / 1_000_000,
                    written / 1_000_000,
                    phase_text(&phases)
                ),
                format!(
                    "this process's RSS before each operation (the base of its peak): {:.0} MiB",
                    mib(full.rss_base_kib)
                ),
            ];
            results
                .entry((k as u8, "Rewind"))
                .or_default()
                .push(Figures {
                    full,
                    size_after_full,
                    incr: Some(incr),
                    incr_read: Some(c2.read_bytes),
                    incr_added: Some(incr_added),
                    incr_added_data: None,
                    restore,
                    restore_first_no_stop: Some(restore_first.secs - stopping),
                    restore_first: Some(restore_first),
                    notes,
                });
            drop(store);
            // Booted again for the next round (a guest booting under TCG takes a core).
            vm.start_and_wait_ready(Duration::from_mins(2)).unwrap();
            delete_checkpoints(&hv, &vm.name);
            fs::remove_dir_all(&rdir).unwrap();
        }
    }
    vm.destroy().unwrap();

    println!(
        "virtnbdbackup {version}; {rounds} rounds per change kind; medians (each round's figure in brackets)"
    );
    for (k, kind) in kinds.iter().enumerate() {
        print_table(*kind, &results, k as u8);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// "median (a, b, c)" of the rounds' figures, or "–".
fn cell(values: &[Option<f64>], digits: usize) -> String {
    let values: Vec<f64> = values.iter().filter_map(|v| *v).collect();
    if values.is_empty() {
        return "–".into();
    }
    let each = values
        .iter()
        .map(|v| format!("{v:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("**{:.digits$}** ({each})", median(&values))
}

/// A row of the table: what, decimals, the figure of one round.
type Row = (&'static str, usize, fn(&Figures) -> Option<f64>);

fn print_table(kind: Kind, results: &BTreeMap<(u8, &str), Vec<Figures>>, k: u8) {
    let tools = ["qemu-img", "virtnbdbackup", "Rewind"];
    let get = |tool: &str| results.get(&(k, tool)).cloned().unwrap_or_default();
    let rows: [Row; 15] = [
        ("full, wall s (durable)", 2, |f| Some(f.full.secs)),
        ("full, CPU s: tool + the VM's QEMU", 1, |f| {
            Some(f.full.cpu.0 + f.full.cpu.1)
        }),
        ("full, CPU s: tool", 1, |f| Some(f.full.cpu.0)),
        ("full, CPU s: the VM's QEMU", 1, |f| Some(f.full.cpu.1)),
        ("full, peak RSS MiB", 0, |f| Some(mib(f.full.rss_kib))),
        ("store/copy size after the full, MB", 0, |f| {
            Some(f.size_after_full as f64 / 1e6)
        }),
        (
            "incremental after the 1 % change, wall s (durable)",
            2,
            |f| f.incr.as_ref().map(|m| m.secs),
        ),
        ("incremental: MB read from QEMU", 1, |f| {
            f.incr_read.map(|b| b as f64 / 1e6)
        }),
        ("incremental: MB added (`du -sb`)", 1, |f| {
            f.incr_added.map(|b| b as f64 / 1e6)
        }),
        ("incremental: of which disk data files, MB", 1, |f| {
            f.incr_added_data.map(|b| b as f64 / 1e6)
        }),
        ("incremental, peak RSS MiB", 0, |f| {
            f.incr.as_ref().map(|m| mib(m.rss_kib))
        }),
        ("full restore of the latest, wall s (durable)", 2, |f| {
            Some(f.restore.secs)
        }),
        ("full restore, peak RSS MiB", 0, |f| {
            Some(mib(f.restore.rss_kib))
        }),
        (
            "restore of the first checkpoint over the changed disk, wall s (durable)",
            2,
            |f| f.restore_first.as_ref().map(|m| m.secs),
        ),
        ("… of it not stopping the VM", 2, |f| {
            f.restore_first_no_stop
        }),
    ];
    println!();
    println!("### 1 % change of {}", kind.label());
    println!();
    println!("| measure | {} |", tools.join(" | "));
    println!("|---|---|---|---|");
    for (what, digits, f) in rows {
        let cells: Vec<String> = tools
            .iter()
            .map(|t| cell(&get(t).iter().map(f).collect::<Vec<_>>(), digits))
            .collect();
        println!("| {what} | {} |", cells.join(" | "));
    }
    println!();
    for tool in tools {
        for (round, f) in get(tool).iter().enumerate() {
            if !f.notes.is_empty() {
                println!("- {tool}, round {}: {}", round + 1, f.notes.join("; "));
            }
        }
    }
}
