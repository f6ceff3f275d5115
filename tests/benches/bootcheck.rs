//! Boot-check and NBD export benchmark (issue 23), on this machine's libvirt (TCG):
//!
//! 1. **Boot-check end to end** of the tiny test guest with a guest agent (direct kernel
//!    boot) and of the disk-booting one (`SeaBIOS`, syslinux, kernel and initramfs read
//!    from its `vda`): open the store, find the checkpoint, [`boot_check`] (clone started
//!    from the store, agent answers, screenshot, thumbnail, clone removed), as
//!    `rewind boot-check VM latest --from DEST` does, minus the process start and the
//!    saving of the result. Its `took_ms` (clone started → boot signal) beside the wall
//!    time. Baseline, in turns in the same run: the same guest's own cold boot, from
//!    libvirt's start to its agent answering `guest-ping`; and between them the clone
//!    alone ([`ThrowawayClone::start`] to `guest-ping` answered, polled as often as the
//!    baseline), which shows what the export costs the boot.
//! 2. **The export's read speed**: `qemu-img convert` (into QEMU's `null-co` driver, so
//!    only the reading counts) of a 1 GiB disk of random data, page cache dropped, through
//!    [`CheckpointExport`] from a plain and from an encrypted store, against the same raw
//!    image read directly and through `qemu-nbd --read-only`, in turns. Then random 4 KiB
//!    reads (`qemu-io` `read` commands at random offsets, one process and one connection)
//!    over the whole disk and within 16 MiB of it: the chunk cache under random access.
//! 3. **Starting a clone**: [`ThrowawayClone::start`] (export, overlays, firmware, libvirt
//!    start) for a checkpoint whose second disk is a 4 GiB, then a 32 GiB sparse qcow2
//!    (64 MiB written), and its parts: the export's start alone and one overlay's
//!    `qemu-img create`; then libvirt's destroy of the clone and the rest of its removal.
//!
//! ```sh
//! cargo bench -p rewind-tests --bench bootcheck
//! ```
//!
//! as root (it starts libvirt itself); ~2.2 GiB under the scratch root at most.
//! `REWIND_BENCH_ROUNDS=N` (default 3) sets the rounds, `REWIND_BENCH_ONLY=boot|export|clone`
//! runs one part. Prints a Markdown table; `core/BENCHMARKS.md` keeps the results. Nothing
//! here passes or fails on timing; it fails if a boot-check or clone leaves anything behind.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::too_many_lines
)]

mod common;
#[path = "../../core/benches/data/mod.rs"]
mod data;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{drop_caches, run};
use data::{GIB, MIB, Rng};
use rewind_core::bootcheck::{BootCheckOptions, Outcome, boot_check};
use rewind_core::checkpoint;
use rewind_core::libvirt::Hypervisor;
use rewind_core::nbd_export::CheckpointExport;
use rewind_core::progress::Control;
use rewind_core::restore::clone::ThrowawayClone;
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::{DiskSpec, Format, TestVm, daemon};
use zeroize::Zeroizing;

const BOOT_TIMEOUT: Duration = Duration::from_mins(3);
/// The disk read in part 2.
const EXPORT_BYTES: u64 = GIB;
/// Random 4 KiB reads per `qemu-io` run.
const RANDOM_READS: usize = 500;

/// One row of the printed table.
struct Row {
    what: String,
    secs: f64,
    figure: String,
    notes: String,
}

fn row(rows: &mut Vec<Row>, what: impl Into<String>, secs: f64, figure: String, notes: String) {
    let what = what.into();
    eprintln!("{what}: {secs:.2} s {figure} {notes}");
    rows.push(Row {
        what,
        secs,
        figure,
        notes,
    });
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    rewind_tests::setup().unwrap_or_else(|e| panic!("{e}"));
    rewind_core::engine::files::set_thumbnailer(thumbnail);
    let scratch = ScratchDir::new("bench-bootcheck").unwrap();
    let dir = scratch.path();
    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let rounds: usize = std::env::var("REWIND_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("REWIND_BENCH_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    if only.is_empty() || only == "boot" {
        boot_checks(&hv, dir, rounds, &mut rows);
    }
    if only.is_empty() || only == "export" {
        export_reads(&hv, dir, rounds, &mut rows);
    }
    if only.is_empty() || only == "clone" {
        clone_starts(&hv, dir, rounds, &mut rows);
    }
    println!("| run | seconds | figure | notes |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {} | {} |",
            r.what, r.secs, r.figure, r.notes
        );
    }
}

/// A folder in `dir` for checkpoints' scratch files.
fn work_dir(dir: &Path) -> PathBuf {
    let work = dir.join("work");
    create_open_dir(&work).unwrap();
    work
}

/// Part 1: boot-checks of the agent guest and of the disk-booting guest, each against its
/// own cold boot.
fn boot_checks(hv: &Hypervisor, dir: &Path, rounds: usize, rows: &mut Vec<Row>) {
    let guests = [
        (
            "agent guest (kernel boot)",
            TestVm::builder("bench-bc-agent")
                .workload("sequence")
                .guest_agent()
                .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)]),
        ),
        (
            "disk-booting guest (SeaBIOS, syslinux)",
            TestVm::builder("bench-bc-disk")
                .boot_from_disk()
                .workload("sequence")
                .guest_agent()
                .disks(vec![
                    DiskSpec::new("vda", Format::Qcow2, 64 << 20),
                    DiskSpec::new("vdb", Format::Qcow2, 32 << 20),
                ]),
        ),
    ];
    for (label, builder) in guests {
        let mut vm = builder.define().unwrap();
        vm.start_and_wait_ready(BOOT_TIMEOUT).unwrap();
        vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
        vm.wait_flushed(3, BOOT_TIMEOUT).unwrap();
        let dest = dir.join(format!("store-{}", vm.name));
        let store = Store::init(&dest, &InitOptions::default()).unwrap();
        let m = checkpoint::take(hv, &store, &vm.name, &work_dir(dir), &Control::new())
            .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
        drop(store);
        eprintln!("{label}: checkpoint {} taken", m.id);
        // The original is off while the copy boots: both would share the 2 cores.
        vm.destroy().unwrap();
        let (mut boots, mut walls, mut tooks) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let t = Instant::now();
            vm.start().unwrap();
            vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
            let boot = t.elapsed().as_secs_f64();
            let t = Instant::now();
            vm.destroy().unwrap();
            let destroy = t.elapsed().as_secs_f64();
            row(
                rows,
                format!("{label}, round {round}: baseline, its own cold boot to agent answering"),
                boot,
                String::new(),
                format!(
                    "libvirt start → `guest-ping` answered; then libvirt's destroy {destroy:.2} s"
                ),
            );
            boots.push(boot);

            // The clone alone, watched as the baseline is (every 100 ms): what the export
            // costs the boot, without the boot-check's 2 s polls and its wait for a
            // screenshot.
            let store = Arc::new(Store::open(&dest, None).unwrap());
            let t = Instant::now();
            let clone = ThrowawayClone::start(hv, &store, &m).unwrap();
            let started = t.elapsed().as_secs_f64();
            while !hv.agent_answers(clone.name(), Duration::from_secs(1)) {
                assert!(
                    t.elapsed() < BOOT_TIMEOUT,
                    "the clone's agent never answered"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let clone_boot = t.elapsed().as_secs_f64();
            clone.finish().unwrap();
            drop(store);
            row(
                rows,
                format!(
                    "{label}, round {round}: its clone from the export, start to agent answering"
                ),
                clone_boot,
                String::new(),
                format!(
                    "ThrowawayClone::start {started:.2} s of it; {:.2}× its cold boot",
                    clone_boot / boot
                ),
            );

            let t = Instant::now();
            let store = Arc::new(Store::open(&dest, None).unwrap());
            let m = store
                .catalog()
                .unwrap()
                .checkpoints
                .into_iter()
                .max_by_key(|m| m.time)
                .unwrap();
            let options = BootCheckOptions {
                timeout: BOOT_TIMEOUT,
                ..BootCheckOptions::default()
            };
            let checked = boot_check(hv, &store, &m, options, &Control::new())
                .unwrap_or_else(|e| panic!("boot-check could not run: {e}"));
            let wall = t.elapsed().as_secs_f64();
            assert_nothing_left(hv, &vm.name);
            let took = checked.check.took_ms as f64 / 1000.0;
            let outcome = match &checked.check.outcome {
                Outcome::Booted { signal } => format!("booted ({signal:?})"),
                Outcome::Failed { failure } => format!("**did not boot**: {failure}"),
            };
            row(
                rows,
                format!("{label}, round {round}: boot-check end to end"),
                wall,
                format!("took_ms {}", checked.check.took_ms),
                format!(
                    "{outcome}; {:.2}× its cold boot; outside took_ms (store, clone start and \
                     removal, thumbnail {}): {:.2} s",
                    wall / boot,
                    checked.thumbnail_png.as_ref().map_or(0, Vec::len),
                    wall - took
                ),
            );
            walls.push(wall);
            tooks.push(took);
        }
        let (boot, wall, took) = (median(boots), median(walls), median(tooks));
        row(
            rows,
            format!("**{label}: median of {rounds}, boot-check end to end**"),
            wall,
            format!("took_ms median {:.0}", took * 1000.0),
            format!("cold boot median {boot:.2} s: **{:.2}×**", wall / boot),
        );
    }
}

/// Fails if a boot-check copy of `vm` is still defined, or a clone folder of this process
/// is left in Rewind's work folder.
fn assert_nothing_left(hv: &Hypervisor, vm: &str) {
    let clones: Vec<String> = hv
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .filter(|n| n.starts_with(vm) && n.contains("boot-check"))
        .collect();
    assert!(clones.is_empty(), "left behind: {clones:?}");
    let prefix = format!("rewind-clone-{}-", std::process::id());
    let work = rewind_core::paths::work_dir().unwrap();
    let left: Vec<String> = fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", work.display());
}

/// A PNG thumbnail of a screenshot, as the `rewind` binary makes it (`app/src/thumbnail.rs`).
fn thumbnail(bytes: &[u8], kind: &str) -> Option<Vec<u8>> {
    let format = match kind {
        "png" => image::ImageFormat::Png,
        "ppm" => image::ImageFormat::Pnm,
        _ => return None,
    };
    let picture = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .decode()
        .ok()?;
    let side = rewind_core::engine::files::THUMBNAIL_PIXELS;
    let mut png = Vec::new();
    picture
        .thumbnail(side, side)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .ok()?;
    Some(png)
}

/// Seconds for `qemu-img convert` of `source` (a file or an NBD URI, raw) into `null-co`:
/// only the reading counts.
fn convert(source: &str) -> f64 {
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", source, "--target-image-opts"])
        .arg(format!("driver=null-co,size={EXPORT_BYTES}")));
    t.elapsed().as_secs_f64()
}

/// Seconds for `RANDOM_READS` reads of 4 KiB at random 4 KiB-aligned offsets in the first
/// `span` bytes of `source`, by one `qemu-io` (one connection).
fn random_reads(source: &str, span: u64, seed: u64) -> f64 {
    let mut rng = Rng(seed);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "raw"]);
    for _ in 0..RANDOM_READS {
        let offset = rng.next() % (span / 4096) * 4096;
        cmd.arg("-c").arg(format!("read {offset} 4k"));
    }
    cmd.arg(source).stdout(Stdio::null());
    let t = Instant::now();
    run(&mut cmd);
    t.elapsed().as_secs_f64()
}

/// `qemu-nbd --read-only` serving `image` (raw) on a socket in `dir`: the child and URI.
fn qemu_nbd(image: &Path, dir: &Path) -> (Child, String) {
    let socket = dir.join("qemu-nbd.sock");
    drop(fs::remove_file(&socket));
    let child = Command::new("qemu-nbd")
        .args(["--read-only", "--persistent", "-f", "raw", "-k"])
        .arg(&socket)
        .arg(image)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, format!("nbd+unix:///?socket={}", socket.display()))
}

/// Stops a `qemu-nbd` that [`qemu_nbd`] started, and removes its socket (killed, it
/// leaves it).
fn stop(mut child: Child, uri: &str) {
    child.kill().unwrap();
    child.wait().unwrap();
    let socket = uri.split_once("socket=").unwrap().1;
    fs::remove_file(socket).unwrap();
}

/// Part 2: reading a 1 GiB disk of random data through the export, plain and encrypted,
/// against the raw image and `qemu-nbd`.
fn export_reads(hv: &Hypervisor, dir: &Path, rounds: usize, rows: &mut Vec<Row>) {
    let vm = TestVm::builder("bench-bc-export")
        .disks(vec![
            DiskSpec::new("vda", Format::Raw, 64 << 20),
            DiskSpec::new("vdb", Format::Raw, EXPORT_BYTES),
        ])
        .define()
        .unwrap();
    let image = vm.disk("vdb").path.clone();
    eprintln!("writing 1 GiB of random data into {} …", image.display());
    {
        let mut file = OpenOptions::new().write(true).open(&image).unwrap();
        let mut rng = Rng(0x2300_b007);
        let mut buf = vec![0u8; (4 * MIB) as usize];
        for _ in 0..EXPORT_BYTES / (4 * MIB) {
            rng.fill(&mut buf);
            file.write_all(&buf).unwrap();
        }
        file.sync_all().unwrap();
    }
    let raw = image.to_str().unwrap().to_owned();
    let sockets = dir.join("sockets");
    create_open_dir(&sockets).unwrap();
    let mb_s = |secs: f64| format!("{:.0} MB/s", EXPORT_BYTES as f64 / 1e6 / secs);
    for encrypted in [false, true] {
        let kind = if encrypted { "encrypted" } else { "plain" };
        // One store at a time: the scratch disk is small.
        let dest = dir.join(format!("store-{kind}"));
        let options = InitOptions {
            passphrase: encrypted.then(|| Zeroizing::new(b"benchmark".to_vec())),
            ..InitOptions::default()
        };
        let store = Store::init(&dest, &options).unwrap();
        let t = Instant::now();
        let m = checkpoint::take(hv, &store, &vm.name, &work_dir(dir), &Control::new())
            .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
        eprintln!(
            "{kind} store: checkpoint of the shut-off VM in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let store = Arc::new(store);
        let (mut direct, mut nbd, mut ours) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            drop_caches();
            let secs = convert(&raw);
            direct.push(secs);
            row(
                rows,
                format!("{kind} run, round {round}: baseline: qemu-img convert of the raw image"),
                secs,
                mb_s(secs),
                "cold page cache".into(),
            );

            drop_caches();
            let (child, uri) = qemu_nbd(&image, &sockets);
            let secs = convert(&uri);
            stop(child, &uri);
            nbd.push(secs);
            row(
                rows,
                format!("{kind} run, round {round}: baseline: through qemu-nbd --read-only"),
                secs,
                mb_s(secs),
                "cold page cache".into(),
            );

            drop_caches();
            let export = CheckpointExport::start(&store, &m, &sockets, None).unwrap();
            let secs = convert(&export.disk("vdb").unwrap().uri());
            export.stop().unwrap();
            ours.push(secs);
            row(
                rows,
                format!("{kind} run, round {round}: through CheckpointExport ({kind} store)"),
                secs,
                mb_s(secs),
                format!(
                    "cold page cache; {:.2}× the raw image, {:.2}× qemu-nbd",
                    secs / direct[round - 1],
                    secs / nbd[round - 1]
                ),
            );
        }
        let (direct_s, nbd_s, ours_s) = (median(direct), median(nbd), median(ours));
        row(
            rows,
            format!("**{kind}: median of {rounds}, CheckpointExport**"),
            ours_s,
            mb_s(ours_s),
            format!(
                "raw image {direct_s:.2} s ({}), qemu-nbd {nbd_s:.2} s ({}): **{:.2}×** qemu-nbd",
                mb_s(direct_s),
                mb_s(nbd_s),
                ours_s / nbd_s
            ),
        );

        // Random 4 KiB reads: over the whole disk (nearly every read a new chunk), and
        // within 16 MiB (every chunk fits the connection's cache).
        for (span, what) in [(EXPORT_BYTES, "over 1 GiB"), (16 * MIB, "within 16 MiB")] {
            drop_caches();
            let secs = random_reads(&raw, span, 7);
            let per = |secs: f64| format!("{:.2} ms/read", secs * 1000.0 / RANDOM_READS as f64);
            row(
                rows,
                format!(
                    "{kind} run: baseline: {RANDOM_READS} random 4 KiB reads {what}, raw image"
                ),
                secs,
                per(secs),
                "cold page cache; one qemu-io".into(),
            );
            let base = secs;
            drop_caches();
            let (child, uri) = qemu_nbd(&image, &sockets);
            let secs = random_reads(&uri, span, 7);
            stop(child, &uri);
            row(
                rows,
                format!("{kind} run: baseline: {RANDOM_READS} random 4 KiB reads {what}, qemu-nbd"),
                secs,
                per(secs),
                "cold page cache".into(),
            );
            let nbd = secs;
            drop_caches();
            let export = CheckpointExport::start(&store, &m, &sockets, None).unwrap();
            let uri = export.disk("vdb").unwrap().uri();
            let secs = random_reads(&uri, span, 7);
            // The same offsets again in a new connection: the chunk files in the page cache.
            let again = random_reads(&uri, span, 7);
            export.stop().unwrap();
            row(
                rows,
                format!("{kind} run: {RANDOM_READS} random 4 KiB reads {what}, CheckpointExport"),
                secs,
                per(secs),
                format!(
                    "cold page cache: {:.1}× the raw image, {:.1}× qemu-nbd; the same reads \
                     again (new connection, chunk files in the page cache): {again:.2} s, {}",
                    secs / base,
                    secs / nbd,
                    per(again)
                ),
            );
        }
        drop(store);
        fs::remove_dir_all(&dest).unwrap();
    }
    assert!(
        fs::read_dir(&sockets).unwrap().next().is_none(),
        "sockets left in {}",
        sockets.display()
    );
}

/// Part 3: starting a throwaway clone of a checkpoint with a 4 GiB and a 32 GiB sparse
/// disk.
fn clone_starts(hv: &Hypervisor, dir: &Path, rounds: usize, rows: &mut Vec<Row>) {
    let vm = TestVm::builder("bench-bc-clone")
        .disks(vec![
            DiskSpec::new("vda", Format::Raw, 64 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 4 * GIB),
        ])
        .define()
        .unwrap();
    let vdb = vm.disk("vdb").path.clone();
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64M"])
        .arg(&vdb));
    let dest = dir.join("store-clone");
    let store = Arc::new(Store::init(&dest, &InitOptions::default()).unwrap());
    let sockets = dir.join("sockets-clone");
    create_open_dir(&sockets).unwrap();
    for size_gib in [4u64, 32] {
        if size_gib != 4 {
            run(Command::new("qemu-img")
                .args(["resize", "-q", "-f", "qcow2"])
                .arg(&vdb)
                .arg(format!("{size_gib}G")));
        }
        let t = Instant::now();
        let m: Manifest = checkpoint::take(hv, &store, &vm.name, &work_dir(dir), &Control::new())
            .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
        eprintln!(
            "{size_gib} GiB: checkpoint of the shut-off VM in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let label = format!("{size_gib} GiB sparse vdb (64 MiB written) + 64 MiB vda");
        let mut starts = Vec::new();
        for round in 1..=rounds {
            // Its parts, alone: the export, and one overlay over it.
            let t = Instant::now();
            let export = CheckpointExport::start(&store, &m, &sockets, None).unwrap();
            let export_secs = t.elapsed().as_secs_f64();
            let overlay = sockets.join("overlay.qcow2");
            let t = Instant::now();
            run(Command::new("qemu-img")
                .args(["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(export.disk("vdb").unwrap().uri())
                .arg(&overlay)
                .arg((size_gib * GIB).to_string()));
            let overlay_secs = t.elapsed().as_secs_f64();
            fs::remove_file(&overlay).unwrap();
            export.stop().unwrap();

            let t = Instant::now();
            let clone = ThrowawayClone::start(hv, &store, &m)
                .unwrap_or_else(|e| panic!("the clone did not start: {e}"));
            let secs = t.elapsed().as_secs_f64();
            let running = hv.is_running(clone.name());
            // Its removal in two parts: libvirt's destroy, then the rest of `finish`.
            let t = Instant::now();
            hv.destroy_vm(clone.name()).unwrap();
            let destroy = t.elapsed().as_secs_f64();
            let t = Instant::now();
            clone.finish().unwrap();
            let finish = t.elapsed().as_secs_f64();
            assert_nothing_left(hv, &vm.name);
            row(
                rows,
                format!("{label}, round {round}: ThrowawayClone::start returns"),
                secs,
                if running {
                    "running".into()
                } else {
                    "**not running**".into()
                },
                format!(
                    "parts alone: export start {:.1} ms, one overlay's qemu-img create {:.1} \
                     ms; then libvirt's destroy {destroy:.2} s, the rest of finish (export stopped, \
                     folder removed) {finish:.2} s",
                    export_secs * 1000.0,
                    overlay_secs * 1000.0
                ),
            );
            starts.push(secs);
        }
        let start = median(starts);
        row(
            rows,
            format!("**{label}: median of {rounds}, clone start**"),
            start,
            String::new(),
            String::new(),
        );
    }
    drop(store);
    fs::remove_dir_all(&dest).unwrap();
}
