//! Idle benchmark (issue 7): CPU and memory of the real `rewind` window, started under Xvfb
//! with 5 protected VMs, when nothing happens. The targets are under 1 % of one core and
//! under 150 MB resident.
//!
//! The VMs are libvirt's test driver's (`test:///<file>` with 5 running `type='test'`
//! domains), so no guest runs. They are protected into one local store, every week; the
//! history says each was checkpointed a minute ago, so no checkpoint is due (a test-driver
//! domain cannot be checkpointed anyway). The last case leaves the history out to show what
//! the app does on start: first checkpoints, which fail, then retries.
//!
//! For each case the app starts with a private `HOME`, XDG folders, `REWIND_CONFIG_DIR`
//! and `REWIND_STATE_DIR`, the window appears, it settles for 10 s, then for 60 s
//! (`REWIND_IDLE_SECS`) `/proc/PID/stat` gives the CPU time of all its threads, their
//! context switches give the wake-ups, and `/proc/PID/status` gives `VmRSS` and `VmHWM`.
//! Xvfb's own CPU time is reported too (a window that repaints makes the X server work).
//! The baseline is the same app with no protected VM and no destination (the first-run
//! guide).
//!
//! ```sh
//! cargo build --release -p rewind
//! cargo bench -p rewind-tests --bench gui_idle
//! ```
//!
//! It uses `target/release/rewind` (or `REWIND_BIN`); it needs `Xvfb` and `xdotool`. Prints
//! a Markdown table; `app/BENCHMARKS.md` keeps the results. Nothing here passes or fails on
//! timing.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, status_field, status_field_of};

use rewind_core::config::{Config, Destination, Protection};
use rewind_core::history::{self, Outcome, Record};
use rewind_core::policy::Why;
use rewind_core::store::{InitOptions, Store};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::xvfb::Xvfb;

const VMS: usize = 5;
const SETTLE: Duration = Duration::from_secs(10);
const WEEK_SECS: u64 = 7 * 86_400;
/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Kills the app when the case ends, pass or fail.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// One case.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// No protected VM, no destination.
    Baseline,
    /// 5 protected VMs, the window shown.
    Visible,
    /// 5 protected VMs, started with `--minimized`.
    Minimized,
    /// 5 protected VMs, the window unmapped with `xdotool windowunmap` once shown (as a
    /// window manager hides a minimised window).
    Unmapped,
    /// 5 protected VMs and no history: what runs on start.
    NoHistory,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Self::Baseline => "baseline: 0 protected, no destination, window shown",
            Self::Visible => "5 protected, window shown",
            Self::Minimized => "5 protected, `--minimized`",
            Self::Unmapped => "5 protected, window unmapped (`xdotool windowunmap`)",
            Self::NoHistory => "5 protected, no history (first checkpoints due at start)",
        }
    }
}

/// What one case measured.
struct Figures {
    cpu_percent: f64,
    max_second_percent: f64,
    wakeups_per_sec: f64,
    rss_mib: f64,
    hwm_mib: f64,
    threads: u64,
    xvfb_percent: f64,
    visible: &'static str,
    jobs: usize,
    notes: String,
}

/// The test driver's node: `VMS` running domains.
fn node_xml(dir: &Path) -> String {
    let mut xml = String::from("<node>\n");
    for i in 1..=VMS {
        write!(
            xml,
            "  <domain type='test'>\n    <name>idle-vm-{i}</name>\n    \
             <uuid>6f1e0c52-7a4b-4c8e-9d2a-00000000000{i}</uuid>\n    \
             <memory unit='MiB'>2048</memory>\n    <vcpu>2</vcpu>\n    \
             <os><type arch='x86_64'>hvm</type></os>\n    <devices>\n      \
             <disk type='file' device='disk'><source file='{}/disk{i}.qcow2'/>\
             <target dev='vda' bus='virtio'/></disk>\n    </devices>\n  </domain>\n",
            dir.display()
        )
        .expect("writing to a String cannot fail");
    }
    xml.push_str("</node>\n");
    xml
}

fn uuid_of(i: usize) -> String {
    format!("6f1e0c52-7a4b-4c8e-9d2a-00000000000{i}")
}

/// The app's folders under `home`.
struct AppDirs {
    home: PathBuf,
    config: PathBuf,
    state: PathBuf,
}

impl AppDirs {
    fn new(home: &Path) -> Self {
        Self {
            home: home.to_path_buf(),
            config: home.join("config/rewind"),
            state: home.join("state/rewind"),
        }
    }
}

/// Writes the configuration (and, unless `case` says not, a history of a checkpoint a
/// minute ago for each VM). Returns how many history records there are.
fn write_config(case: Case, uri: &str, dirs: &AppDirs, store_dir: &Path) -> usize {
    fs::create_dir_all(&dirs.config).unwrap();
    fs::create_dir_all(&dirs.state).unwrap();
    let mut config = Config {
        uri: uri.into(),
        ..Config::default()
    };
    if case == Case::Baseline {
        config.save(&dirs.config.join("config.ron")).unwrap();
        return 0;
    }
    let store = Store::init(store_dir, &InitOptions::default()).unwrap();
    config.destinations = vec![Destination {
        name: "local".into(),
        location: store_dir.display().to_string(),
        store_id: Some(store.config().id),
        passphrase_file: None,
        store_secret: None,
    }];
    config.vms = (1..=VMS)
        .map(|i| Protection {
            vm: format!("idle-vm-{i}"),
            uuid: Some(uuid_of(i)),
            destinations: vec!["local".into()],
            interval_secs: WEEK_SECS,
            ..Protection::default()
        })
        .collect();
    config.save(&dirs.config.join("config.ron")).unwrap();
    if case == Case::NoHistory {
        return 0;
    }
    // A minute ago, in RFC 3339 (from `date`: this crate does not depend on chrono).
    let out = Command::new("date")
        .args(["-u", "-d", "1 minute ago", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    let started = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for i in 1..=VMS {
        let record: Record = serde_json::from_value(serde_json::json!({
            "vm": format!("idle-vm-{i}"),
            "vm_uuid": uuid_of(i),
            "destination": "local",
            "location": store_dir.display().to_string(),
            "trigger": Why::First,
            "started": started,
            "finished": started,
            "outcome": Outcome::Ok,
            "checkpoint": "seeded",
            "incremental": false,
        }))
        .expect("a history record");
        history::append(&dirs.state.join("history.jsonl"), &record).unwrap();
    }
    VMS
}

/// User + system clock ticks of `pid` (all its threads).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split(' ').collect());
    [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum()
}

/// Context switches of every thread of `pid`: how often it woke up.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let path = t.path().join("status").display().to_string();
            status_field_of(&path, "voluntary_ctxt_switches")
                + status_field_of(&path, "nonvoluntary_ctxt_switches")
        })
        .sum()
}

/// Context switches of `pid`'s threads, summed by thread name: who wakes up.
fn switches_by_thread(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let name = fs::read_to_string(t.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let path = t.path().join("status").display().to_string();
        *by_name.entry(name).or_insert(0) += status_field_of(&path, "voluntary_ctxt_switches")
            + status_field_of(&path, "nonvoluntary_ctxt_switches");
    }
    by_name
}

/// The threads that woke most between `before` and `after`, as wake-ups a second.
fn top_wakers(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    secs: f64,
) -> String {
    let mut rates: Vec<(f64, &str)> = after
        .iter()
        .map(|(name, n)| {
            let was = before.get(name).copied().unwrap_or(0);
            (n.saturating_sub(was) as f64 / secs, name.as_str())
        })
        .filter(|(rate, _)| *rate >= 0.05)
        .collect();
    rates.sort_by(|a, b| b.0.total_cmp(&a.0));
    rates
        .iter()
        .take(6)
        .map(|(rate, name)| format!("{name} {rate:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Xvfb this process started (our child named `Xvfb`).
fn xvfb_pid() -> Option<u32> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        let (name, rest) = stat.split_once(") ")?;
        let parent = rest.split(' ').nth(1)?;
        (name.ends_with("(Xvfb") && parent == me).then_some(pid)
    })
}

/// Whether a window titled "Rewind" is mapped.
fn window_visible(x: &Xvfb) -> Option<String> {
    let out = Command::new("xdotool")
        .args(["search", "--onlyvisible", "--name", "Rewind"])
        .env("DISPLAY", x.display())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}

fn run_case(case: Case, uri: &str, store_dir: &Path, idle: Duration) -> Figures {
    let x = Xvfb::start(1280, 800).expect("Xvfb");
    let dirs = AppDirs::new(&x.home());
    let seeded = write_config(case, uri, &dirs, store_dir);
    let log = dirs.home.join("app.log");
    let mut cmd = Command::new(binary());
    x.configure(&mut cmd);
    cmd.env_remove("LIBVIRT_DEFAULT_URI")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env("HOME", &dirs.home)
        .env("REWIND_CONFIG_DIR", &dirs.config)
        .env("REWIND_STATE_DIR", &dirs.state)
        .args(["--connect", uri]);
    if case == Case::Minimized {
        cmd.arg("--minimized");
    }
    let mut app = App(cmd
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rewind"));
    let pid = app.0.id();
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let shown = x.wait_window(
        "Rewind",
        Duration::from_secs(if case == Case::Minimized { 15 } else { 60 }),
    );
    if case != Case::Minimized {
        shown.unwrap_or_else(|e| panic!("{e}; app log:\n{}", log_text()));
    }
    if case == Case::Unmapped
        && let Some(id) = window_visible(&x)
    {
        let ok = Command::new("xdotool")
            .args(["windowunmap", &id])
            .env("DISPLAY", x.display())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "xdotool windowunmap failed");
    }
    std::thread::sleep(SETTLE);
    assert!(
        app.0.try_wait().unwrap().is_none(),
        "the app exited: {}",
        log_text()
    );
    let xvfb = xvfb_pid();
    let xvfb_ticks = || xvfb.map_or(0, cpu_ticks);
    let (cpu0, sw0, x0) = (cpu_ticks(pid), switches(pid), xvfb_ticks());
    let by_thread0 = switches_by_thread(pid);
    let start = Instant::now();
    let mut last = cpu0;
    let mut max_second = 0;
    while start.elapsed() < idle {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_ticks(pid);
        max_second = max_second.max(now - last);
        last = now;
    }
    let secs = start.elapsed().as_secs_f64();
    let (cpu1, sw1, x1) = (cpu_ticks(pid), switches(pid), xvfb_ticks());
    let wakers = top_wakers(&by_thread0, &switches_by_thread(pid), secs);
    let visible = if window_visible(&x).is_some() {
        "mapped"
    } else {
        "not mapped"
    };
    let records = history::read(&dirs.state.join("history.jsonl"));
    let mut notes: Vec<String> = log_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    notes.sort();
    notes.dedup();
    let failed: Vec<String> = records
        .iter()
        .skip(seeded)
        .filter_map(|r| r.error.clone())
        .collect();
    if let Some(e) = failed.first() {
        notes.push(format!("job error: {e}"));
    }
    notes.push(format!("wake-ups/s by thread: {wakers}"));
    let figures = Figures {
        cpu_percent: (cpu1 - cpu0) as f64 / TICKS_PER_SEC / secs * 100.0,
        max_second_percent: max_second as f64 / TICKS_PER_SEC * 100.0,
        wakeups_per_sec: (sw1 - sw0) as f64 / secs,
        rss_mib: status_field(pid, "VmRSS") as f64 / 1024.0,
        hwm_mib: status_field(pid, "VmHWM") as f64 / 1024.0,
        threads: status_field(pid, "Threads"),
        xvfb_percent: (x1 - x0) as f64 / TICKS_PER_SEC / secs * 100.0,
        visible,
        jobs: records.len() - seeded,
        notes: notes.join("; "),
    };
    drop(app);
    figures
}

fn main() {
    let idle = Duration::from_secs(
        std::env::var("REWIND_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let dir = ScratchDir::new("gui-idle").expect("scratch folder");
    let node = dir.path().join("node.xml");
    fs::write(&node, node_xml(dir.path())).unwrap();
    let uri = format!("test://{}", node.display());
    let cases = [
        Case::Baseline,
        Case::Visible,
        Case::Minimized,
        Case::Unmapped,
        Case::NoHistory,
    ];
    let mut rows = Vec::new();
    for (n, case) in cases.into_iter().enumerate() {
        // A fresh store per case: nothing one case did shows in the next.
        let store_dir = dir.path().join(format!("store-{n}"));
        eprintln!("{} ...", case.label());
        let f = run_case(case, &uri, &store_dir, idle);
        rows.push((case, f));
    }
    println!(
        "\n### Idle window, {VMS} test-driver VMs, 10 s settle then {} s, Xvfb 1280x800\n",
        idle.as_secs()
    );
    println!(
        "| case | CPU (one core = 100 %) | busiest second | wake-ups/s | VmRSS | VmHWM | threads | Xvfb CPU | window | jobs run |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for (case, f) in &rows {
        println!(
            "| {} | {:.2} % | {:.0} % | {:.1} | {:.1} MiB | {:.1} MiB | {} | {:.2} % | {} | {} |",
            case.label(),
            f.cpu_percent,
            f.max_second_percent,
            f.wakeups_per_sec,
            f.rss_mib,
            f.hwm_mib,
            f.threads,
            f.xvfb_percent,
            f.visible,
            f.jobs,
        );
    }
    println!();
    for (case, f) in &rows {
        if !f.notes.is_empty() {
            println!("- {}: {}", case.label(), f.notes);
        }
    }
}
