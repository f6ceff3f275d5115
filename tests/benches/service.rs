//! Service benchmark (issue 18): the protection service's memory and CPU while it protects
//! 5 VMs and nothing is due, and how long a "Checkpoint now" takes to show its first
//! progress in a window that is the service's client, against the same in a window that
//! hosts its own engine (the baseline, same run, same VMs, same store).
//!
//! The 5 VMs are real QEMU domains, shut off, each with a 256 MiB raw disk of random
//! data; they are
//! protected into one local store every 15 minutes. The service (`rewind service`, the
//! system unit's command) starts, takes their first checkpoints (shut-off VMs are read
//! through `qemu-nbd`), settles for 10 s, then for 60 s (`REWIND_IDLE_SECS`)
//! `/proc/PID/stat` gives its CPU time and `/proc/PID/status` its `VmRSS` and `VmHWM`.
//!
//! Latency: a client connected as the window is (`rewind_service::client::engine`) sends a
//! command and waits for its first event, 5 times each:
//! - `Start(Checkpoint)`: the job's `JobStarted`, then its first `JobProgress` (the engine
//!   reports progress every 250 ms);
//! - `CheckpointNow` (the window's button, run by the scheduler): the first scheduler
//!   status that shows the VM's job running.
//!
//! The baseline is an engine in this process, as a window without the service has. Events
//! are polled every 10 ms (`EngineHandle::recv_timeout`), so figures are ±10 ms.
//!
//! ```sh
//! cargo build --release -p rewind
//! cargo bench -p rewind-tests --bench service
//! ```
//!
//! As root. It uses `target/release/rewind` (or `REWIND_BIN`). Prints Markdown;
//! `app/BENCHMARKS.md` keeps the results. Nothing here passes or fails on timing.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{binary, cpu_secs, status_field};
use rewind_core::config::{Config, Destination, Protection};
use rewind_core::engine::jobs::JobRequest;
use rewind_core::engine::{self, Command, EngineHandle, EngineOptions, Event, SchedulerView};
use rewind_core::scheduler::Paths;
use rewind_core::store::{InitOptions, Store};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::service::TestService;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const VMS: usize = 5;
const ROUNDS: usize = 5;
/// Each VM's disk, full of random data.
const DISK_BYTES: u64 = 256 << 20;

fn paths(dir: &Path) -> Paths {
    Paths {
        config: dir.join("config.ron"),
        history: dir.join("history.jsonl"),
        status: dir.join("status.json"),
    }
}

/// The configuration: the VMs protected into the store every 15 minutes.
fn protecting(vms: &[TestVm], store: &Path) -> Config {
    let id = Store::init(store, &InitOptions::default())
        .unwrap()
        .config()
        .id;
    Config {
        uri: daemon::URI.into(),
        destinations: vec![Destination {
            name: "usb".into(),
            location: store.display().to_string(),
            store_id: Some(id),
            passphrase_file: None,
            store_secret: None,
        }],
        vms: vms
            .iter()
            .map(|vm| Protection {
                vm: vm.name.clone(),
                destinations: vec!["usb".into()],
                ..Protection::default()
            })
            .collect(),
        ..Config::default()
    }
}

/// Waits (up to `limit`) for the first event `want` accepts; how long that took.
fn first(
    engine: &mut EngineHandle,
    since: Instant,
    limit: Duration,
    mut want: impl FnMut(&Event) -> bool,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if let Some(event) = engine.recv_timeout(Duration::from_millis(10))
            && want(&event)
        {
            return Some(since.elapsed());
        }
    }
    None
}

fn drain(engine: &mut EngineHandle, quiet: Duration) {
    while engine.recv_timeout(quiet).is_some() {}
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "–".into(),
        |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
    )
}

/// Median of what was measured.
fn median(mut v: Vec<Option<Duration>>) -> Option<Duration> {
    v.retain(Option::is_some);
    v.sort();
    v.get(v.len() / 2).copied().flatten()
}

struct Latency {
    started: Vec<Option<Duration>>,
    progress: Vec<Option<Duration>>,
    scheduled: Vec<Option<Duration>>,
}

/// `ROUNDS` of each command through `engine`.
fn latencies(engine: &mut EngineHandle, vms: &[TestVm]) -> Latency {
    let mut l = Latency {
        started: Vec::new(),
        progress: Vec::new(),
        scheduled: Vec::new(),
    };
    drain(engine, Duration::from_secs(2));
    for round in 0..ROUNDS {
        let vm = vms[round % vms.len()].name.clone();
        let t0 = Instant::now();
        assert!(engine.send(Command::Start(JobRequest::Checkpoint {
            vm: vm.clone(),
            destination: None,
            full_state: false,
        })));
        let mut job = None;
        l.started
            .push(first(engine, t0, Duration::from_secs(10), |e| {
                if let Event::JobStarted { job: j, .. } = e {
                    job = Some(*j);
                    true
                } else {
                    false
                }
            }));
        let mut finished = false;
        let progress = first(engine, t0, Duration::from_secs(30), |e| match e {
            Event::JobProgress { job: j, .. } => Some(*j) == job,
            Event::JobFinished { job: j, .. } if Some(*j) == job => {
                finished = true;
                true
            }
            _ => false,
        });
        // A job that ended before its first report has none to show.
        l.progress.push(progress.filter(|_| !finished));
        if !finished {
            first(
                engine,
                t0,
                Duration::from_mins(2),
                |e| matches!(e, Event::JobFinished { job: j, .. } if Some(*j) == job),
            );
        }
        drain(engine, Duration::from_millis(500));
    }
    for round in 0..ROUNDS {
        let vm = vms[round % vms.len()].name.clone();
        let t0 = Instant::now();
        assert!(engine.send(Command::CheckpointNow {
            vm: Some(vm.clone())
        }));
        let running =
            |s: &rewind_core::scheduler::status::Status| s.running.iter().any(|r| r.vm == vm);
        l.scheduled
            .push(first(engine, t0, Duration::from_secs(30), |e| match e {
                Event::Scheduler(SchedulerView::Elsewhere {
                    status: Some(s), ..
                })
                | Event::SchedulerStatus(s) => running(s),
                _ => false,
            }));
        first(
            engine,
            t0,
            Duration::from_mins(2),
            |e| matches!(e, Event::Scheduled(s) if matches!(&**s, rewind_core::scheduler::Event::Finished(_))),
        );
        drain(engine, Duration::from_millis(500));
    }
    l
}

/// What an idle service costs.
struct Idle {
    first_secs: f64,
    cpu: f64,
    rss: f64,
    hwm: f64,
    threads: u64,
}

/// Starts the service in `dir`, waits for the first checkpoints of `vms` VMs, lets it
/// settle for 10 s, then measures it for `idle`.
fn idle_service(
    bin: &Path,
    dir: &Path,
    envs: &[(&str, &str)],
    vms: usize,
    idle: Duration,
) -> (TestService, Idle) {
    let service = TestService::start_with(bin, dir, envs).unwrap();
    let pid = service.pid();
    let history = dir.join("state/history.jsonl");
    let t0 = Instant::now();
    while rewind_core::history::read(&history)
        .iter()
        .filter(|r| r.outcome == rewind_core::history::Outcome::Ok)
        .count()
        < vms
    {
        assert!(
            t0.elapsed() < Duration::from_mins(10),
            "the service did not take the first checkpoints: {}",
            fs::read_to_string(service.log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let first_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(10));
    let (cpu0, at0) = (cpu_secs(&pid.to_string()), Instant::now());
    std::thread::sleep(idle);
    let cpu = (cpu_secs(&pid.to_string()) - cpu0) / at0.elapsed().as_secs_f64() * 100.0;
    let figures = Idle {
        first_secs,
        cpu,
        rss: status_field(pid, "VmRSS") as f64 / 1024.0,
        hwm: status_field(pid, "VmHWM") as f64 / 1024.0,
        threads: status_field(pid, "Threads"),
    };
    (service, figures)
}

/// A session bus for the clients (`dbus-daemon --session`); stopped when dropped.
struct Bus {
    address: String,
    pid: u32,
}

impl Bus {
    fn start() -> Self {
        let out = std::process::Command::new("dbus-daemon")
            .args(["--session", "--fork", "--print-address=1", "--print-pid=1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "dbus-daemon: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        Self {
            address: lines.next().unwrap().trim().to_owned(),
            pid: lines.next().unwrap().trim().parse().unwrap(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        drop(
            std::process::Command::new("kill")
                .arg(self.pid.to_string())
                .status(),
        );
    }
}

/// Kills a client when dropped.
struct Client(std::process::Child);

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// CPU (% of one core), `VmRSS`, `VmHWM` (MiB) and threads of `pid` over `idle`.
fn measure(pid: u32, idle: Duration) -> (f64, f64, f64, u64) {
    let (cpu0, at0) = (cpu_secs(&pid.to_string()), Instant::now());
    std::thread::sleep(idle);
    let cpu = (cpu_secs(&pid.to_string()) - cpu0) / at0.elapsed().as_secs_f64() * 100.0;
    (
        cpu,
        status_field(pid, "VmRSS") as f64 / 1024.0,
        status_field(pid, "VmHWM") as f64 / 1024.0,
        status_field(pid, "Threads"),
    )
}

/// `rewind tray` as a client of the service at `socket`, its icon shown by a tray host on
/// a session bus, measured for `idle` after 10 s; then the window as the same service's
/// client under Xvfb for `window_idle` (the baseline: what a window left open costs).
fn clients_idle(
    bin: &Path,
    dir: &Path,
    socket: &Path,
    idle: Duration,
    window_idle: Duration,
) -> [(f64, f64, f64, u64); 2] {
    let bus = Bus::start();
    let host = rewind_tests::tray_host::TrayHost::start_on(&bus.address).unwrap();
    let runtime = dir.join("runtime");
    fs::create_dir_all(&runtime).unwrap();
    fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let tray = Client(
        std::process::Command::new(bin)
            .arg("tray")
            .env("REWIND_SOCKET", socket)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("HOME", dir)
            .stderr(fs::File::create(dir.join("tray.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while host.registered().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the tray icon did not register: {}",
            fs::read_to_string(dir.join("tray.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(10));
    let tray_figures = measure(tray.0.id(), idle);
    drop(tray);

    let x = rewind_tests::xvfb::Xvfb::start(1280, 800).unwrap();
    fs::create_dir_all(x.home()).unwrap();
    let mut cmd = std::process::Command::new(bin);
    x.configure(&mut cmd);
    let window = Client(
        cmd.env("REWIND_SOCKET", socket)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stderr(fs::File::create(dir.join("window.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    x.wait_window("Rewind", Duration::from_mins(1)).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let window_figures = measure(window.0.id(), window_idle);
    [tray_figures, window_figures]
}

fn main() {
    let idle = Duration::from_secs(
        std::env::var("REWIND_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    rewind_tests::setup().expect("libvirt");
    let bin = binary();
    let dir = ScratchDir::new("svc-bench").unwrap();
    let vms: Vec<TestVm> = (0..VMS)
        .map(|i| {
            let vm = TestVm::builder(&format!("svc-bench-{i}"))
                .disks(vec![DiskSpec::new("vda", Format::Raw, DISK_BYTES)])
                .define()
                .unwrap();
            // Data to read, so that a checkpoint lasts long enough to report progress.
            let status = std::process::Command::new("dd")
                .args([
                    "if=/dev/urandom",
                    "bs=1M",
                    "conv=notrunc,fsync",
                    "status=none",
                ])
                .arg(format!("of={}", vm.disk("vda").path.display()))
                .arg(format!("count={}", DISK_BYTES >> 20))
                .status()
                .unwrap();
            assert!(status.success());
            vm
        })
        .collect();
    let store = dir.path().join("store");
    let config = protecting(&vms, &store);
    let service_dir = dir.path().join("service");
    fs::create_dir_all(service_dir.join("config")).unwrap();
    config.save(&service_dir.join("config/config.ron")).unwrap();

    // glibc's allocator as it is, and with two arenas (what `MALLOC_ARENA_MAX=2` in the
    // unit would give): the memory the service keeps while idle.
    let (service, plain) = idle_service(&bin, &service_dir, &[], VMS, idle);
    drop(service);
    let arenas_dir = dir.path().join("service-arenas");
    fs::create_dir_all(arenas_dir.join("config")).unwrap();
    // Its own store: the same work as the first run, not what dedup leaves of it.
    protecting(&vms, &dir.path().join("store-arenas"))
        .save(&arenas_dir.join("config/config.ron"))
        .unwrap();
    let (arenas_service, arenas) =
        idle_service(&bin, &arenas_dir, &[("MALLOC_ARENA_MAX", "2")], VMS, idle);
    drop(arenas_service);
    let service = TestService::start(&bin, &service_dir).unwrap();

    // A window's engine through the service, then one of its own (the baseline).
    let mut remote =
        rewind_service::client::engine("bench", service.socket().to_path_buf(), Arc::new(|| {}))
            .unwrap();
    let through = latencies(&mut remote, &vms);
    drop(remote);
    let tray_idle = Duration::from_secs(
        std::env::var("REWIND_TRAY_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let clients_dir = dir.path().join("clients");
    fs::create_dir_all(&clients_dir).unwrap();
    let [tray, window] = clients_idle(&bin, &clients_dir, service.socket(), tray_idle, idle);
    drop(service);
    let local_dir = dir.path().join("local");
    fs::create_dir_all(&local_dir).unwrap();
    config.save(&local_dir.join("config.ron")).unwrap();
    let mut local = engine::spawn_with(
        EngineOptions {
            uri: daemon::URI.into(),
            scheduler: Some(engine::THE_WINDOW),
            paths: paths(&local_dir),
        },
        Arc::new(|| {}),
    )
    .unwrap();
    let own = latencies(&mut local, &vms);
    drop(local);

    println!(
        "## Protection service, {VMS} protected VMs, idle {} s\n",
        idle.as_secs()
    );
    println!("| figure | glibc as it is | MALLOC_ARENA_MAX=2 |");
    println!("|---|---|---|");
    println!(
        "| first checkpoints of the {VMS} VMs | {:.1} s | {:.1} s |",
        plain.first_secs, arenas.first_secs
    );
    println!(
        "| CPU (one core = 100 %) | {:.3} % | {:.3} % |",
        plain.cpu, arenas.cpu
    );
    println!("| VmRSS | {:.1} MiB | {:.1} MiB |", plain.rss, arenas.rss);
    println!(
        "| VmHWM (the first checkpoints included) | {:.1} MiB | {:.1} MiB |",
        plain.hwm, arenas.hwm
    );
    println!("| threads | {} | {} |", plain.threads, arenas.threads);
    println!("\n## Command → first event (median of {ROUNDS}, ms)\n");
    println!("| command → event | window through the service | window's own engine (baseline) |");
    println!("|---|---|---|");
    println!(
        "| Checkpoint job → JobStarted | {} | {} |",
        ms(median(through.started.clone())),
        ms(median(own.started.clone()))
    );
    println!(
        "| Checkpoint job → first JobProgress | {} | {} |",
        ms(median(through.progress.clone())),
        ms(median(own.progress.clone()))
    );
    println!(
        "| \"Checkpoint now\" → scheduler shows it running | {} | {} |",
        ms(median(through.scheduled.clone())),
        ms(median(own.scheduled.clone()))
    );
    println!("\n## The service's clients, idle\n");
    println!("| process | measured for | CPU (one core = 100 %) | VmRSS | VmHWM | threads |");
    println!("|---|---|---|---|---|---|");
    for (name, secs, (cpu, rss, hwm, threads)) in [
        ("`rewind tray` (icon shown)", tray_idle.as_secs(), tray),
        ("the window (baseline)", idle.as_secs(), window),
    ] {
        println!("| {name} | {secs} s | {cpu:.3} % | {rss:.1} MiB | {hwm:.1} MiB | {threads} |");
    }
    println!("\nEach round (ms): through the service");
    for (a, b) in through.started.iter().zip(&through.progress) {
        println!("- started {}, progress {}", ms(*a), ms(*b));
    }
    println!("Own engine:");
    for (a, b) in own.started.iter().zip(&own.progress) {
        println!("- started {}, progress {}", ms(*a), ms(*b));
    }
    drop(vms);
}
