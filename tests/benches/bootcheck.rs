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
//! 4. **Run from backup, click to "VM running"**, for a VM like part 3's whose `vdb` is the
//!    checkpoint and restore benchmarks' disk (4 GiB, 2 GiB of mixed data), checkpointed,
//!    then grown to 32 GiB and checkpointed again; page cache dropped before each, in
//!    turns: [`RunFromBackup::start`] in this process (store opened, libvirt connected, run
//!    started; then its discard timed apart); the same through the protection service
//!    (`rewind service`, [`TestService`]) as the window's click: `Start(RunFromCheckpoint)`
//!    sent through a connected `rewind_service::client::engine` (the window's link) until
//!    its `JobFinished` (then `DiscardRun` timed apart, then once more warm); and for
//!    comparison the checkpoint through a full restore as a new VM that is started
//!    ([`restore_as_new`], `start`), until it returns. Each checks that libvirt reports the
//!    VM running.
//!
//! ```sh
//! cargo build --release -p rewind   # part 4's service: target/release/rewind or REWIND_BIN
//! cargo bench -p rewind-tests --bench bootcheck
//! ```
//!
//! as root (it starts libvirt itself); ~2.2 GiB under the scratch root at most for parts
//! 1–3, ~7 GiB for part 4. `REWIND_BENCH_ROUNDS=N` (default 3) sets the rounds,
//! `REWIND_BENCH_ONLY=boot|export|clone|run` runs one part. Prints a Markdown table;
//! `core/BENCHMARKS.md` keeps the results. Nothing here passes or fails on timing; it fails
//! if a boot-check, clone or run leaves anything behind.

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

use common::{binary, drop_caches, run};
use data::{GIB, MIB, Rng, make_image};
use rewind_core::bootcheck::{BootCheckOptions, Outcome, boot_check};
use rewind_core::checkpoint;
use rewind_core::config::{Config, Destination};
use rewind_core::engine::jobs::{JobOutput, JobRequest};
use rewind_core::engine::{Command as EngineCommand, EngineHandle, Event};
use rewind_core::libvirt::Hypervisor;
use rewind_core::nbd_export::CheckpointExport;
use rewind_core::progress::Control;
use rewind_core::restore::clone::ThrowawayClone;
use rewind_core::restore::run::RunFromBackup;
use rewind_core::restore::{DiskStorage, NewVm, RestoreOptions, restore_as_new};
use rewind_core::store::{InitOptions, Manifest, Store};
use rewind_tests::scratch::{ScratchDir, create_open_dir};
use rewind_tests::service::TestService;
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
    if only.is_empty() || only == "run" {
        run_starts(&hv, dir, rounds, &mut rows);
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
    assert_no_folders(&format!("rewind-clone-{}-", std::process::id()));
}

/// Fails if a folder whose name starts with `prefix` is in Rewind's work folder.
fn assert_no_folders(prefix: &str) {
    let work = rewind_core::paths::work_dir().unwrap();
    let left: Vec<String> = fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
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

/// The sizes of the second disk of parts 3 and 4, in GiB, in the order they are grown to.
const SIZES_GIB: [u64; 2] = [4, 32];

/// What the `vdb` of [`sized_vm`] holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Written {
    /// 64 MiB of one byte at its start.
    Little,
    /// The 2 GiB of mixed data (random, text, repeats) that the checkpoint and restore
    /// benchmarks' 4 GiB disk holds.
    Mixed,
}

/// The shut-off VM of parts 3 and 4: a 64 MiB raw `vda` and a qcow2 `vdb` of
/// `SIZES_GIB[0]` GiB holding `written`; `dir` for the mixed data's raw image.
fn sized_vm(name: &str, written: Written, dir: &Path) -> TestVm {
    let vm = TestVm::builder(name)
        .disks(vec![
            DiskSpec::new("vda", Format::Raw, 64 << 20),
            DiskSpec::new("vdb", Format::Qcow2, SIZES_GIB[0] * GIB),
        ])
        .define()
        .unwrap();
    match written {
        Written::Little => {
            run(Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64M"])
                .arg(&vm.disk("vdb").path));
        }
        Written::Mixed => {
            eprintln!("generating 2 GiB of mixed data on the 4 GiB vdb …");
            let raw = dir.join("mixed.raw");
            make_image(&raw, SIZES_GIB[0] * GIB);
            vm.fill_disk("vdb", &raw).unwrap();
            fs::remove_file(&raw).unwrap();
        }
    }
    vm
}

/// Grows `vm`'s `vdb` (of [`sized_vm`]) to `size_gib` GiB if it is smaller, and
/// checkpoints the shut-off VM into `store`.
fn sized_checkpoint(
    hv: &Hypervisor,
    store: &Store,
    vm: &TestVm,
    dir: &Path,
    size_gib: u64,
) -> Manifest {
    if size_gib != SIZES_GIB[0] {
        run(Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(&vm.disk("vdb").path)
            .arg(format!("{size_gib}G")));
    }
    let t = Instant::now();
    let m = checkpoint::take(hv, store, &vm.name, &work_dir(dir), &Control::new())
        .unwrap_or_else(|e| panic!("checkpoint failed: {e}"));
    eprintln!(
        "{size_gib} GiB: checkpoint of the shut-off VM in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    m
}

/// How the rows of parts 3 and 4 name the disks of a size.
fn sized_label(size_gib: u64, written: Written) -> String {
    match written {
        Written::Little => format!("{size_gib} GiB sparse vdb (64 MiB written) + 64 MiB vda"),
        Written::Mixed => format!("{size_gib} GiB vdb (2 GiB mixed data) + 64 MiB vda"),
    }
}

/// Part 3: starting a throwaway clone of a checkpoint with a 4 GiB and a 32 GiB sparse
/// disk.
fn clone_starts(hv: &Hypervisor, dir: &Path, rounds: usize, rows: &mut Vec<Row>) {
    let vm = sized_vm("bench-bc-clone", Written::Little, dir);
    let dest = dir.join("store-clone");
    let store = Arc::new(Store::init(&dest, &InitOptions::default()).unwrap());
    let sockets = dir.join("sockets-clone");
    create_open_dir(&sockets).unwrap();
    for size_gib in SIZES_GIB {
        let m = sized_checkpoint(hv, &store, &vm, dir, size_gib);
        let label = sized_label(size_gib, Written::Little);
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

/// The destination's name in the service's configuration of part 4.
const RUN_DESTINATION: &str = "bench";

/// Part 4: the VM of part 3 run from its checkpoint, for a 4 GiB and a 32 GiB `vdb`, in
/// turns: [`RunFromBackup::start`] in this process, the same through the protection
/// service as the window's click does, and a full restore as a new VM that is started.
fn run_starts(hv: &Hypervisor, dir: &Path, rounds: usize, rows: &mut Vec<Row>) {
    let bin = binary();
    let vm = sized_vm("bench-bc-run", Written::Mixed, dir);
    let dest = dir.join("store-run");
    let store_id = Store::init(&dest, &InitOptions::default())
        .unwrap()
        .config()
        .id;
    // The service has the store as its destination and protects nothing: no job of its
    // own runs beside the measured ones.
    let service_dir = dir.join("service");
    create_open_dir(&service_dir.join("config")).unwrap();
    Config {
        uri: daemon::URI.into(),
        destinations: vec![Destination {
            name: RUN_DESTINATION.into(),
            location: dest.display().to_string(),
            store_id: Some(store_id),
            passphrase_file: None,
            store_secret: None,
        }],
        ..Config::default()
    }
    .save(&service_dir.join("config/config.ron"))
    .unwrap();
    let service = TestService::start(&bin, &service_dir).unwrap();
    let mut client =
        rewind_service::client::engine("bench", service.socket().to_path_buf(), Arc::new(|| {}))
            .unwrap();
    // Connected, and the service's first lists and status sent.
    let t = Instant::now();
    while !matches!(client.try_recv(), Some(Event::Vms(_))) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no VM list from the service"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    let copies = dir.join("copies-run");
    create_open_dir(&copies).unwrap();
    let copy_name = format!("{}-restored", vm.name);
    let running = |running: bool| {
        if running {
            "running".to_owned()
        } else {
            "**not running**".to_owned()
        }
    };
    for size_gib in SIZES_GIB {
        let m = sized_checkpoint(hv, &Store::open(&dest, None).unwrap(), &vm, dir, size_gib);
        let label = sized_label(size_gib, Written::Mixed);
        let (mut direct, mut served, mut restored) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            // 1. In this process, as a window's own engine does: the store opened, libvirt
            // connected, the run started.
            drop_caches();
            let t = Instant::now();
            let store = Arc::new(Store::open(&dest, None).unwrap());
            let open = t.elapsed().as_secs_f64();
            let run_hv = Hypervisor::connect(daemon::URI).unwrap();
            let connect = t.elapsed().as_secs_f64() - open;
            let t_start = Instant::now();
            let run = RunFromBackup::start(run_hv, &store, &m)
                .unwrap_or_else(|e| panic!("the run did not start: {e}"));
            let start = t_start.elapsed().as_secs_f64();
            let secs = t.elapsed().as_secs_f64();
            let is_running = hv.is_running(&vm.name);
            let t = Instant::now();
            run.discard().unwrap();
            let discard = t.elapsed().as_secs_f64();
            drop(store);
            assert!(!hv.is_running(&vm.name), "the VM runs after the discard");
            assert_no_folders(&format!("rewind-run-{}-", std::process::id()));
            row(
                rows,
                format!("{label}, round {round}: run from the checkpoint, RunFromBackup::start"),
                secs,
                running(is_running),
                format!(
                    "cold page cache; store opened {:.1} ms, libvirt connected {:.1} ms, \
                     RunFromBackup::start {start:.2} s; then discard (VM destroyed, export \
                     stopped, overlays removed) {discard:.2} s",
                    open * 1000.0,
                    connect * 1000.0
                ),
            );
            direct.push(secs);

            // 2. Through the service, as the window's click: the command sent on a
            // connection made before, until its job's end (the service opens the store
            // and starts the run).
            drop_caches();
            let first = service_job(&mut client, run_request(&m));
            assert!(
                matches!(first.output, JobOutput::Running { .. }),
                "the service answered {:?}",
                first.output
            );
            let is_running = hv.is_running(&vm.name);
            let discard = service_job(&mut client, JobRequest::DiscardRun { vm_uuid: m.vm.uuid });
            assert!(
                matches!(discard.output, JobOutput::RunDiscarded),
                "the service answered {:?}",
                discard.output
            );
            assert!(!hv.is_running(&vm.name), "the VM runs after the discard");
            // Once more at once, the page cache as the first left it (the service's own
            // code included, which dropping the cache evicts too).
            let warm = service_job(&mut client, run_request(&m));
            assert!(hv.is_running(&vm.name), "the VM does not run");
            service_job(&mut client, JobRequest::DiscardRun { vm_uuid: m.vm.uuid });
            assert_no_folders(&format!("rewind-run-{}-", service.pid()));
            let secs = first.finished;
            row(
                rows,
                format!(
                    "{label}, round {round}: run from the checkpoint through the service \
                     (Start(RunFromCheckpoint) → JobFinished)"
                ),
                secs,
                running(is_running),
                format!(
                    "cold page cache; JobStarted after {:.1} ms (VM lists before it: {}); then \
                     DiscardRun → JobFinished {:.2} s; at once again, warm: {:.2} s \
                     (JobStarted after {:.1} ms)",
                    first.started * 1000.0,
                    first.lists_before,
                    discard.finished,
                    warm.finished,
                    warm.started * 1000.0
                ),
            );
            served.push(secs);

            // 3. A full restore as a new VM (every chunk read, written, read back and
            // compared), started: the other way to have the VM of this checkpoint running.
            drop_caches();
            let copy = Removed(copy_name.clone());
            let new = NewVm {
                name: Some(copy_name.clone()),
                storage: DiskStorage::Folder(copies.clone()),
            };
            let options = RestoreOptions {
                start: Some(true),
                ..RestoreOptions::default()
            };
            let t = Instant::now();
            let report = restore_as_new(
                hv,
                &Store::open(&dest, None).unwrap(),
                &m,
                &new,
                &options,
                &work_dir(dir),
                &Control::new(),
            )
            .unwrap_or_else(|e| panic!("the full restore failed: {e}"));
            let secs = t.elapsed().as_secs_f64();
            let is_running = report.started && hv.is_running(&copy_name);
            let t = Instant::now();
            hv.destroy_vm(&copy_name).unwrap();
            let destroy = t.elapsed().as_secs_f64();
            drop(copy);
            for d in &report.disks {
                fs::remove_file(&d.path).unwrap();
            }
            // Its serial console's file, which the restore put beside its disks.
            drop(fs::remove_file(
                copies.join(format!("{copy_name}-console.log")),
            ));
            let written: u64 = report.disks.iter().map(|d| d.bytes_written).sum();
            row(
                rows,
                format!(
                    "{label}, round {round}: full restore as a new VM, started \
                     (restore_as_new)"
                ),
                secs,
                running(is_running),
                format!(
                    "cold page cache; {} MB written; then libvirt's destroy {destroy:.2} s",
                    written / 1_000_000
                ),
            );
            restored.push(secs);
        }
        let (direct, served, restored) = (median(direct), median(served), median(restored));
        row(
            rows,
            format!("**{label}: median of {rounds}, click to VM running**"),
            direct,
            format!("through the service {served:.2} s"),
            format!(
                "full restore as a new VM, started: {restored:.2} s (**{:.1}×** the run \
                 through the service)",
                restored / served
            ),
        );
    }
    drop(client);
    drop(service);
    let left: Vec<String> = hv
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .filter(|n| n.starts_with(&vm.name) && *n != vm.name)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let files: Vec<String> = fs::read_dir(&copies)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.is_empty(), "left in {}: {files:?}", copies.display());
    fs::remove_dir_all(&dest).unwrap();
}

/// The window's click on "Run from this checkpoint" for checkpoint `m`.
fn run_request(m: &Manifest) -> JobRequest {
    JobRequest::RunFromCheckpoint {
        destination: RUN_DESTINATION.into(),
        vm_uuid: m.vm.uuid,
        checkpoint: m.id.clone(),
    }
}

/// Removes the libvirt domain of this name (and its disks' metadata) when dropped, also
/// when the benchmark panics.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        if let Err(e) = rewind_tests::domain::remove_named(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0);
        }
    }
}

/// What [`service_job`] saw.
struct ServiceJob {
    /// Seconds from sending the command to its job's `JobStarted`.
    started: f64,
    /// Seconds from sending the command to its job's `JobFinished`.
    finished: f64,
    /// What the job did.
    output: JobOutput,
    /// VM lists (`Vms`) the service sent between the command and its `JobStarted`: it was
    /// listing the VMs after a libvirt event when the command came.
    lists_before: usize,
}

/// Sends `request` to the service through `engine` (as the window's engine does), the
/// events that came before it drained, and waits for its job to end (a failure panics).
/// Events are polled every millisecond.
fn service_job(engine: &mut EngineHandle, request: JobRequest) -> ServiceJob {
    while engine.try_recv().is_some() {}
    let asked = serde_json::to_value(&request).unwrap();
    let t = Instant::now();
    assert!(engine.send(EngineCommand::Start(request)), "not sent");
    let (mut job, mut started, mut lists_before) = (None, 0.0, 0);
    loop {
        let Some(event) = engine.try_recv() else {
            assert!(t.elapsed() < BOOT_TIMEOUT, "the service's job did not end");
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        match event {
            Event::JobStarted {
                job: j, request, ..
            } if job.is_none() && serde_json::to_value(&*request).unwrap() == asked => {
                job = Some(j);
                started = t.elapsed().as_secs_f64();
            }
            Event::Vms(_) if job.is_none() => lists_before += 1,
            Event::JobFinished { job: j, result } if Some(j) == job => {
                return ServiceJob {
                    started,
                    finished: t.elapsed().as_secs_f64(),
                    output: result.unwrap_or_else(|e| panic!("the service's job failed: {e}")),
                    lists_before,
                };
            }
            Event::Failed { error } | Event::ConnectionFailed { error, .. } => {
                panic!("the service: {error}")
            }
            _ => {}
        }
    }
}
