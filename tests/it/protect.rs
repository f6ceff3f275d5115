//! Automatic protection (issue 6): `rewind protect` and `rewind daemon` against a real
//! guest — checkpoints by themselves at an interval, retention, status and history, one
//! scheduler at a time, a broken configuration file, and a removable drive that is
//! unplugged (nothing written to the bare mount point) and plugged in again elsewhere
//! (found by its store's ID, caught up at once).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rewind_tests::scratch::ScratchDir;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

/// Rewind's configuration and state folders for one test, so that tests do not see each
/// other's (or the user's) configuration.
struct Home {
    dir: ScratchDir,
}

impl Home {
    fn new(label: &str) -> Self {
        Self {
            dir: ScratchDir::new(label).unwrap(),
        }
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn config_file(&self) -> PathBuf {
        self.config_dir().join("config.ron")
    }

    /// `rewind ARGS...` with this home.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::rewind::command();
        cmd.args(args)
            .args(["--connect", daemon::URI])
            .env("REWIND_CONFIG_DIR", self.config_dir())
            .env("REWIND_STATE_DIR", self.state_dir())
            .env(rewind_core::config::SHORT_INTERVALS_ENV, "1");
        cmd
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "rewind {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.run_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// `rewind status --json` (and with `text`, `rewind status`): its exit code (0, or 5
    /// when something needs attention) and its output.
    fn status(&self, text: bool) -> (Option<i32>, String) {
        let args: &[&str] = if text {
            &["status"]
        } else {
            &["status", "--json"]
        };
        let out = self.command(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `rewind status --json`, which exits with 5: something needs attention.
    fn status_needing_attention(&self) -> serde_json::Value {
        let (code, text) = self.status(false);
        assert_eq!(code, Some(5), "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    fn ok_checkpoints(&self) -> Vec<serde_json::Value> {
        self.json(&["history", "--json"])
            .as_array()
            .unwrap()
            .iter()
            // Checkpoints, not the boot-checks the daemon may run when the machine is idle.
            .filter(|r| r["outcome"] == "ok" && r["trigger"] != "boot_check")
            .cloned()
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("rewind.log")).unwrap_or_default()
    }

    /// Starts `rewind daemon`; it is stopped when the guard drops.
    fn daemon(&self) -> Daemon {
        let stderr = std::fs::File::create(self.dir.path().join("daemon.stderr")).unwrap();
        let child = self
            .command(&["daemon"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Daemon { child: Some(child) }
    }
}

/// A running `rewind daemon`, killed when dropped (also when the test fails).
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// SIGTERM, as systemd sends: it must stop cleanly and soon.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        drop(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status(),
        );
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_mins(1),
                "rewind daemon did not stop within a minute of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.kill());
            drop(child.wait());
        }
    }
}

/// Waits until `ready()` holds, failing after `limit` with `what` and the daemon's log.
fn wait_for(home: &Home, limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}; daemon log:\n{}",
            home.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn booted_guest(label: &str) -> TestVm {
    let mut vm = TestVm::builder(label)
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(3, BOOT_TIMEOUT).unwrap();
    vm
}

/// That after its checkpoints the daemon kept flat copies (`FORMAT.md`) of the newest
/// one's patches in `store` (the guest's records change a few pieces of a chunk between
/// two checkpoints).
fn assert_flat_copies(home: &Home, store: &Path) {
    let copies: usize = std::fs::read_dir(store.join("flat")).map_or(0, |dirs| {
        dirs.flatten()
            .filter_map(|d| std::fs::read_dir(d.path()).ok())
            .map(Iterator::count)
            .sum()
    });
    assert!(copies >= 1, "no flat copies; log:\n{}", home.log());
    assert!(home.log().contains("flat copies of"), "{}", home.log());
}

#[test]
fn the_daemon_takes_checkpoints_by_itself_thins_them_out_and_survives_a_broken_config() {
    let vm = booted_guest("protect-daemon");
    let home = Home::new("protect-daemon-home");
    let store = home.dir.path().join("store");
    let store_str = store.to_str().unwrap();
    let said = home.run_ok(&[
        "protect",
        &vm.name,
        "--to",
        store_str,
        "--every",
        "20s",
        "--keep-last",
        "2",
    ]);
    assert!(said.contains("every 20 seconds"), "{said}");
    // Below the minimum without the test switch.
    let out = crate::rewind::command()
        .args(["protect", &vm.name, "--to", store_str, "--every", "1m"])
        .args(["--connect", daemon::URI])
        .env("REWIND_CONFIG_DIR", home.config_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("5 minutes to 1 week"),
        "{stderr}"
    );

    let started = Instant::now();
    let mut daemon = home.daemon();
    wait_for(&home, Duration::from_secs(80), "three checkpoints", || {
        home.ok_checkpoints().len() >= 3
    });
    eprintln!("three checkpoints in {:?}", started.elapsed());

    // Only one scheduler at a time, and it says which one runs.
    let out = home.command(&["daemon"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon ran");
    assert!(
        stderr.contains("already runs in process") && stderr.contains("rewind daemon"),
        "{stderr}"
    );

    // Retention: two kept in the store, the history says what went.
    let listing = home.json(&["checkpoints", "--in", store_str, "--json"]);
    let kept: Vec<&str> = listing["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let history = home.ok_checkpoints();
    assert!(kept.len() <= 2, "keep-last 2 left {kept:?}");
    assert!(
        history
            .iter()
            .map(|r| r["pruned"].as_u64().unwrap())
            .sum::<u64>()
            >= 1
    );
    let newest = history.last().unwrap();
    assert!(
        kept.contains(&newest["checkpoint"].as_str().unwrap()),
        "{kept:?} {newest}"
    );
    assert_eq!(newest["incremental"], true, "{newest}");

    let status = home.json(&["status", "--json"]);
    assert_eq!(status["scheduler"]["running"], true, "{status}");
    assert_eq!(status["scheduler"]["program"], "rewind daemon");
    let dest = &status["vms"][0]["destinations"][0];
    assert_eq!(dest["available"], true, "{status}");
    assert!(dest["last_success"].is_string(), "{status}");
    assert!(dest["last_checkpoint"].is_string(), "{status}");

    // A broken configuration file: said with line and column, and the daemon goes on with
    // the last good one.
    let good = std::fs::read_to_string(home.config_file()).unwrap();
    std::fs::write(home.config_file(), "(\n  vms: [\n    (vm: 42),\n  ],\n)\n").unwrap();
    wait_for(
        &home,
        Duration::from_secs(20),
        "the configuration error in the log",
        || home.log().contains("line 3, column"),
    );
    let status = home.status_needing_attention();
    assert!(
        status["config_error"]
            .as_str()
            .unwrap_or_default()
            .contains("line 3, column"),
        "{status}"
    );
    let before = home.ok_checkpoints().len();
    wait_for(
        &home,
        Duration::from_mins(1),
        "a checkpoint under the last good configuration",
        || home.ok_checkpoints().len() > before,
    );
    std::fs::write(home.config_file(), good).unwrap();

    let stopped = daemon.terminate();
    assert!(stopped.success(), "rewind daemon exited with {stopped}");
    let status = home.json(&["status", "--json"]);
    assert_eq!(status["scheduler"]["running"], false, "{status}");
    let history = home.run_ok(&["history", &vm.name]);
    assert!(history.contains("incremental"), "{history}");
    assert_flat_copies(&home, &store);
    crate::rewind::run_ok(&["verify", "--in", store_str]);
}

/// A mount under the scratch folder, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn bind(from: &Path, to: &Path) -> Self {
        std::fs::create_dir_all(to).unwrap();
        let status = Command::new("mount")
            .args(["--bind"])
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount --bind {} {}",
            from.display(),
            to.display()
        );
        Self(to.to_path_buf())
    }

    fn unmount(self) {
        drop(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        drop(Command::new("umount").arg(&self.0).status());
    }
}

#[test]
fn an_unplugged_drive_is_never_written_and_is_caught_up_when_it_comes_back_elsewhere() {
    let vm = booted_guest("protect-drive");
    let home = Home::new("protect-drive-home");
    // The "drive": a folder bind-mounted under a watched folder, as udisks mounts drives.
    let drive = home.dir.path().join("drive");
    std::fs::create_dir_all(&drive).unwrap();
    let media = home.dir.path().join("media");
    let plugged = Mount::bind(&drive, &media.join("BACKUP"));
    let dest = media.join("BACKUP/rewind");
    home.run_ok(&[
        "protect",
        &vm.name,
        "--to",
        dest.to_str().unwrap(),
        "--every",
        "1h",
    ]);
    let mut config = rewind_core::config::Config::load(&home.config_file()).unwrap();
    config.watch_paths = vec![media.clone()];
    config.save(&home.config_file()).unwrap();
    assert!(
        drive.join("rewind/rewind-store.json").exists(),
        "the store is on the drive"
    );

    // Unplugged: the mount point is an empty folder.
    plugged.unmount();
    let mount_point = media.join("BACKUP");
    let _daemon = home.daemon();
    wait_for(
        &home,
        Duration::from_secs(30),
        "status saying the drive is missing",
        || {
            let status = home.status_needing_attention();
            let d = &status["vms"][0]["destinations"][0];
            d["available"] == false
                && d["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("not plugged in")
        },
    );
    std::thread::sleep(Duration::from_secs(6));
    let written: Vec<_> = std::fs::read_dir(&mount_point).unwrap().collect();
    assert!(
        written.is_empty(),
        "something was written to the bare mount point: {written:?}"
    );
    assert!(home.ok_checkpoints().is_empty());
    let (code, text) = home.status(true);
    assert!(
        code == Some(5) && text.contains("MISSING"),
        "{code:?}: {text}"
    );

    // Plugged in again, under another name: found by its ID, caught up at once.
    let _again = Mount::bind(&drive, &media.join("BACKUP1"));
    wait_for(
        &home,
        Duration::from_mins(1),
        "the catch-up checkpoint",
        || !home.ok_checkpoints().is_empty(),
    );
    let record = home.ok_checkpoints().remove(0);
    assert_eq!(
        record["location"].as_str().unwrap(),
        media.join("BACKUP1/rewind").to_str().unwrap(),
        "{record}"
    );
    assert_eq!(record["trigger"], "first", "{record}");
    assert!(std::fs::read_dir(&mount_point).unwrap().next().is_none());
    let listing = crate::rewind::run_ok(&[
        "checkpoints",
        "--in",
        media.join("BACKUP1/rewind").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        listing.contains(record["checkpoint"].as_str().unwrap()),
        "{listing}"
    );
}

/// A private session bus with a monitor on it and a daemon using it; all stopped when
/// dropped.
struct Session {
    bus_pid: u32,
    monitor: Child,
    daemon: Daemon,
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.daemon.child.is_some() {
            let _ = self.daemon.terminate();
        }
        drop(self.monitor.kill());
        drop(self.monitor.wait());
        drop(Command::new("kill").arg(self.bus_pid.to_string()).status());
    }
}

impl Session {
    /// Starts a bus, a monitor of notification calls writing to `monitor_log`, and `rewind
    /// daemon` of `home` on that bus.
    fn start(home: &Home, monitor_log: &Path) -> Self {
        let out = Command::new("dbus-daemon")
            .args(["--session", "--fork", "--print-address=1", "--print-pid=1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let address = lines.next().unwrap().trim().to_owned();
        let bus_pid: u32 = lines.next().unwrap().trim().parse().unwrap();
        let monitor = Command::new("dbus-monitor")
            .args([
                "--address",
                &address,
                "interface=org.freedesktop.Notifications",
            ])
            .stdout(std::fs::File::create(monitor_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let stderr = std::fs::File::create(home.dir.path().join("daemon.stderr")).unwrap();
        let child = home
            .command(&["daemon"])
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self {
            bus_pid,
            monitor,
            daemon: Daemon { child: Some(child) },
        }
    }
}

/// VM `rwt-no-such-vm` protected into `store`: every checkpoint fails at once (there is no
/// such VM) and leaves a record, with no guest to boot.
fn failing_config(store: &Path) -> rewind_core::config::Config {
    let id = rewind_core::store::Store::probe(store).unwrap().id;
    rewind_core::config::Config {
        uri: daemon::URI.into(),
        destinations: vec![rewind_core::config::Destination {
            name: "usb".into(),
            location: store.display().to_string(),
            store_id: Some(id),
            passphrase_file: None,
            store_secret: None,
        }],
        vms: vec![rewind_core::config::Protection {
            vm: "rwt-no-such-vm".into(),
            destinations: vec!["usb".into()],
            ..rewind_core::config::Protection::default()
        }],
        ..rewind_core::config::Config::default()
    }
}

#[test]
fn a_timed_pause_holds_the_schedule_says_when_it_ends_and_ends_by_itself() {
    rewind_tests::setup().unwrap();
    let home = Home::new("protect-pause-home");
    let store = home.dir.path().join("store");
    crate::rewind::run_ok(&["init", store.to_str().unwrap()]);
    failing_config(&store).save(&home.config_file()).unwrap();

    // The CLI's three pauses, and resume.
    let said = home.run_ok(&["pause", "--for-an-hour"]);
    assert!(
        said.contains("Protection of every VM paused until "),
        "{said}"
    );
    let status = home.json(&["status", "--json"]);
    assert_eq!(status["paused"], true, "{status}");
    let until: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(status["paused_until"].clone()).unwrap();
    let left = until - chrono::Utc::now();
    assert!(
        left > chrono::Duration::minutes(58) && left <= chrono::Duration::hours(1),
        "{status}"
    );
    assert_eq!(status["vms"][0]["paused"], true, "{status}");
    let text = home.run_ok(&["status"]);
    assert!(text.contains("All protection is paused until "), "{text}");
    let said = home.run_ok(&["pause", "--until-tomorrow"]);
    assert!(said.contains("paused until tomorrow 06:00"), "{said}");
    let refused = home
        .command(&["pause", "rwt-no-such-vm", "--for-an-hour"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    home.run_ok(&["pause"]);
    let status = home.json(&["status", "--json"]);
    assert_eq!(
        (&status["paused"], &status["paused_until"]),
        (&serde_json::Value::Bool(true), &serde_json::Value::Null),
        "{status}"
    );
    home.run_ok(&["resume"]);
    assert_eq!(home.json(&["status", "--json"])["paused"], false);

    // A pause that ends in 8 s: the scheduler takes nothing before, and starts by itself
    // after, with nobody resuming.
    let mut config = rewind_core::config::Config::load(&home.config_file()).unwrap();
    let ends = chrono::Utc::now() + chrono::Duration::seconds(8);
    config.paused_until = Some(ends);
    config.save(&home.config_file()).unwrap();
    let _daemon = home.daemon();
    let history = || home.json(&["history", "--json"]);
    while chrono::Utc::now() < ends - chrono::Duration::seconds(1) {
        assert_eq!(history(), serde_json::json!([]), "a job ran while paused");
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_for(
        &home,
        Duration::from_secs(30),
        "the first job after the pause",
        || !history().as_array().unwrap().is_empty(),
    );
    let first: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(history()[0]["started"].clone()).unwrap();
    assert!(first >= ends, "started {first}, the pause ended {ends}");
}

#[test]
fn a_failed_checkpoint_is_notified_on_the_desktop_bus_and_logged() {
    rewind_tests::setup().unwrap();
    let home = Home::new("protect-notify-home");
    let store = home.dir.path().join("store");
    crate::rewind::run_ok(&["init", store.to_str().unwrap()]);
    failing_config(&store).save(&home.config_file()).unwrap();
    let monitor = home.dir.path().join("bus.log");
    let _session = Session::start(&home, &monitor);
    wait_for(
        &home,
        Duration::from_secs(30),
        "the failure in the log",
        || home.log().contains("FAILED"),
    );
    let log = home.log();
    assert!(
        log.contains("no virtual machine is called \"rwt-no-such-vm\""),
        "{log}"
    );
    // There is a session bus but no notification service: the message goes to the log.
    assert!(log.contains("(no desktop notification:"), "{log}");
    wait_for(
        &home,
        Duration::from_secs(10),
        "the Notify call on the bus",
        || {
            std::fs::read_to_string(&monitor)
                .unwrap_or_default()
                .contains("Checkpoint of rwt-no-such-vm failed")
        },
    );
    let bus = std::fs::read_to_string(&monitor).unwrap();
    assert!(bus.contains("member=Notify"), "{bus}");
    let history = home.json(&["history", "--json"]);
    assert_eq!(history[0]["outcome"], "failed", "{history}");
    assert_eq!(history[0]["retryable"], false, "{history}");
}

#[test]
fn the_daemon_takes_full_state_checkpoints_as_often_as_the_policy_says_and_disk_ones_between() {
    let vm = booted_guest("protect-fullstate");
    let home = Home::new("protect-fullstate-home");
    let store = home.dir.path().join("store");
    let store_str = store.to_str().unwrap();
    let said = home.run_ok(&[
        "protect",
        &vm.name,
        "--to",
        store_str,
        "--every",
        "8s",
        "--full-state-every",
        "30s",
        "--keep-last",
        "50",
    ]);
    assert!(said.contains("with memory too every 30 seconds"), "{said}");
    let _daemon = home.daemon();
    let taken = || -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
        let listing = home.json(&["checkpoints", "--in", store_str, "--json"]);
        listing["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["kind"].as_str().unwrap().to_owned(),
                    c["time"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    };
    wait_for(
        &home,
        Duration::from_secs(150),
        "two full-state checkpoints",
        || taken().iter().filter(|t| t.0 == "full").count() >= 2,
    );
    let taken = taken();
    let kinds: Vec<&str> = taken.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        kinds[0], "full",
        "the first one holds the memory: {kinds:?}"
    );
    assert!(kinds.contains(&"disk"), "disk-only ones between: {kinds:?}");
    let fulls: Vec<_> = taken
        .iter()
        .filter(|t| t.0 == "full")
        .map(|t| t.1)
        .collect();
    for pair in fulls.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::seconds(30),
            "full-state ones at least 30 s apart: {taken:?}"
        );
    }
    // The guest ran on all along: the records on its disk come from one boot.
    let store = rewind_core::store::Store::open(&store, None).unwrap();
    let last = store.catalog().unwrap().checkpoints.pop().unwrap();
    let vda = store
        .object_reader(&last.disks[0].index)
        .unwrap()
        .read_all()
        .unwrap();
    let scan = rewind_tests::workload::scan_sequence(&vda);
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    assert_eq!(scan.boots, 1, "the guest booted again");
    drop(vm);
}

/// The daemon's rotating check: with a destination whose store has a share due, it
/// re-hashes that share by itself, finds the bit flipped in a chunk of it, names the
/// checkpoint that chunk breaks in its record, and moves the chunk aside.
#[test]
fn the_daemon_re_hashes_a_share_of_each_store_by_itself_and_finds_damage_there() {
    use rewind_core::store::verify::share_of;
    use rewind_core::store::{InitOptions, Store};
    use rewind_core::view::catalog::{VerifyRecord, save_verify_record, verify_record};
    let home = Home::new("rotating-check");
    let store_dir = home.dir.path().join("store");
    let store = Store::init(
        &store_dir,
        &InitOptions {
            chunk_size_bytes: 64 << 10,
            ..InitOptions::default()
        },
    )
    .unwrap();
    // A checkpoint of 2 MiB of noise, through the store API.
    let content = rewind_tests::noise(1, 2 << 20);
    let m = crate::store::write_checkpoint(
        &store,
        "rotating",
        5,
        chrono::Utc::now(),
        &content,
        home.dir.path(),
    );
    let id = store.read_page(&m.disks[0].index, 0).unwrap()[0];
    let of = rewind_core::policy::VERIFY_SHARES;
    let share = share_of(&id, of);
    // Every other share was checked 21 hours ago: the one holding the chunk is due.
    let then = chrono::Utc::now() - chrono::TimeDelta::hours(21);
    let mut record = None;
    for k in (0..of).filter(|&k| k != share) {
        record = Some(VerifyRecord::with_share(record, k, then, then, Vec::new()));
    }
    let state = home.state_dir();
    save_verify_record(&state, store.config().id, &record.unwrap()).unwrap();
    let chunk = store.chunk_path(&id);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&chunk, &bytes).unwrap();
    let mut config = failing_config(&store_dir);
    config.vms.clear();
    std::fs::create_dir_all(home.config_dir()).unwrap();
    config.save(&home.config_file()).unwrap();

    let _daemon = home.daemon();
    let store_id = store.config().id;
    wait_for(
        &home,
        Duration::from_mins(2),
        "the rotating check of the due share",
        || {
            verify_record(&state, store_id)
                .is_some_and(|r| r.shares.get(share as usize).copied().flatten().is_some())
        },
    );
    let record = verify_record(&state, store_id).unwrap();
    assert_eq!(record.broken, [(m.vm.uuid, m.id.clone())], "{record:?}");
    assert!(!chunk.exists(), "the damaged chunk is moved aside");
    assert_eq!(
        record.fully_checked(),
        Some(then),
        "every share is now checked, the oldest 21 hours ago"
    );
    // The daemon says so (and notifies, as for a failure).
    wait_for(
        &home,
        Duration::from_secs(30),
        "the damage in the log",
        || {
            let log = home.log();
            log.contains("found damage") && log.contains(&m.id)
        },
    );
}

/// The priority of every thread of process `pid` that can be read now: (thread id, name,
/// priority).
fn thread_priorities(pid: u32) -> Vec<(i32, String, rewind_core::priority::ThreadPriority)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let tid: i32 = t.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            // A thread that ended meanwhile is skipped.
            let p = rewind_core::priority::of_thread(Some(tid)).ok()?;
            Some((tid, comm.trim().to_owned(), p))
        })
        .collect()
}

/// Issue 20: a checkpoint the daemon takes by itself runs its job thread and the store's
/// chunk workers at the background priority (nice 19, best-effort I/O level 7); the
/// daemon's other threads and the VM's QEMU (whose NBD export Rewind reads) keep theirs.
#[test]
fn a_scheduled_checkpoint_works_at_a_low_priority_and_the_vm_keeps_its_own() {
    use rewind_core::priority::{Priority, ThreadPriority};
    // 128 MiB that does not compress on a second disk: a copy long enough for its workers
    // to be seen by a look every millisecond.
    let home = Home::new("protect-gentle-home");
    let raw = home.dir.path().join("noise.raw");
    std::fs::write(&raw, rewind_tests::noise(20, 128 << 20)).unwrap();
    let mut vm = TestVm::builder("protect-gentle")
        .workload("sequence")
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, 128 << 20),
        ])
        .define()
        .expect("define the test VM");
    vm.fill_disk("vdb", &raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(3, BOOT_TIMEOUT).unwrap();
    let qemu: u32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", vm.name))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let store = home.dir.path().join("store");
    home.run_ok(&[
        "protect",
        &vm.name,
        "--to",
        store.to_str().unwrap(),
        "--every",
        "1h",
    ]);

    // The first checkpoint is due at once: watch the daemon's threads until it is done.
    let mut daemon = home.daemon();
    let pid = daemon.child.as_ref().unwrap().id();
    let mut seen: std::collections::HashMap<i32, (String, ThreadPriority)> =
        std::collections::HashMap::new();
    let start = Instant::now();
    let mut last_look = Instant::now();
    loop {
        for (tid, name, p) in thread_priorities(pid) {
            if name.starts_with("rewind-chunks") || name == "rewind-job" {
                // The latest look: the job thread lowers itself just after it starts.
                seen.insert(tid, (name, p));
            }
        }
        if last_look.elapsed() > Duration::from_millis(500) {
            last_look = Instant::now();
            if !home.ok_checkpoints().is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_mins(2),
                "no checkpoint within 2 minutes; daemon log:\n{}",
                home.log()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let background = ThreadPriority {
        nice: 19,
        sched_idle: false,
        io_class: 2,
        io_level: 7,
    };
    let workers = seen
        .values()
        .filter(|(name, _)| name.starts_with("rewind-chunks"))
        .count();
    assert!(workers > 0, "no chunk worker seen: {seen:?}");
    assert!(
        seen.values().any(|(name, _)| name == "rewind-job"),
        "{seen:?}"
    );
    for (name, p) in seen.values() {
        assert_eq!(*p, background, "{name}");
        assert!(p.at_most(Priority::BACKGROUND));
    }
    // The daemon itself (its main thread, the scheduler) and the VM were not lowered.
    let daemon_threads = thread_priorities(pid);
    let main = daemon_threads
        .iter()
        .find(|t| t.0 == i32::try_from(pid).unwrap());
    assert_eq!(main.map(|t| t.2.nice), Some(0), "{daemon_threads:?}");
    let qemu_threads = thread_priorities(qemu);
    assert!(!qemu_threads.is_empty());
    for (_, name, p) in &qemu_threads {
        assert!(
            p.nice == 0 && !p.sched_idle && p.io_class != 3,
            "QEMU's {name}: {p:?}"
        );
    }
    eprintln!(
        "{workers} chunk workers seen at {background:?}, QEMU's {} threads at nice 0",
        qemu_threads.len()
    );
    assert!(daemon.terminate().success());
    vm.destroy().unwrap();
}

/// Issue 23: the daemon boot-checks a protected guest's newest checkpoint by itself, once,
/// after its first checkpoint: a history record that it booted, the result kept for the
/// checkpoint, and no copy of the VM left behind. (The load limit is lifted: the test
/// machine is never idle.)
#[test]
fn the_daemon_boot_checks_the_newest_checkpoint_by_itself() {
    let mut vm = TestVm::builder("schedcheck")
        .workload("sequence")
        .guest_agent()
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_agent_ready(BOOT_TIMEOUT).unwrap();
    vm.wait_flushed(3, BOOT_TIMEOUT).unwrap();
    let home = Home::new("schedcheck");
    let store = home.dir.path().join("store");
    home.run_ok(&[
        "protect",
        &vm.name,
        "--to",
        store.to_str().unwrap(),
        "--every",
        "1d",
    ]);
    let mut config = rewind_core::config::Config::load(&home.config_file()).unwrap();
    assert!(config.boot_checks.enabled && config.vms[0].boot_check);
    config.boot_checks.max_load_percent = 100_000;
    config.boot_checks.quiet_secs = 0;
    config.boot_checks.timeout_secs = Some(300);
    config.save(&home.config_file()).unwrap();

    // Short: the backup's socket lives in it.
    let work_dir = ScratchDir::new("w").unwrap();
    let work = work_dir.path().join("w");
    let stderr = std::fs::File::create(home.dir.path().join("daemon.stderr")).unwrap();
    let child = home
        .command(&["daemon"])
        .env("REWIND_WORK_DIR", &work)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child: Some(child) };
    let checks = || -> Vec<serde_json::Value> {
        home.json(&["history", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["trigger"] == "boot_check" && r["outcome"] != "cancelled")
            .cloned()
            .collect()
    };
    wait_for(
        &home,
        Duration::from_mins(8),
        "a scheduled boot-check",
        || !checks().is_empty(),
    );
    // A day must pass before the next: none follows at once.
    std::thread::sleep(Duration::from_secs(3));
    assert!(daemon.terminate().success());

    let checks = checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let check = &checks[0];
    assert_eq!(check["outcome"], "ok", "{check}; log:\n{}", home.log());
    let taken = home.ok_checkpoints();
    let first = taken
        .iter()
        .find(|r| r["trigger"] == "first")
        .unwrap_or_else(|| panic!("no first checkpoint: {taken:?}"));
    assert_eq!(check["checkpoint"], first["checkpoint"], "{check}");
    let uuid = check["vm_uuid"].as_str().unwrap();
    let kept = home
        .state_dir()
        .join("boot-checks")
        .join(uuid)
        .join(format!("{}.json", check["checkpoint"].as_str().unwrap()));
    assert!(kept.exists(), "{}", kept.display());
    // A boot-check is no checkpoint: the status still counts one checkpoint, ok.
    let status = home.json(&["status", "--json"]);
    let dest = &status["vms"][0]["destinations"][0];
    assert_eq!(dest["failures"], 0, "{status}");
    assert_eq!(dest["last_checkpoint"], first["checkpoint"], "{status}");

    let hv = rewind_core::libvirt::Hypervisor::connect(daemon::URI).unwrap();
    let clones: Vec<String> = hv
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .filter(|n| n.starts_with(&vm.name) && n.contains("boot-check"))
        .collect();
    assert_eq!(clones, Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the work folder: {left:?}");
    assert!(vm.domain().is_active().unwrap());
    // Once the checked checkpoint is pruned, its kept result goes with it.
    let s = store.to_str().unwrap();
    home.run_ok(&["checkpoint", &vm.name, "--to", s]);
    home.run_ok(&["prune", &vm.name, "--in", s, "--keep-last", "1"]);
    assert!(!kept.exists(), "{}", kept.display());
    vm.destroy().unwrap();
}
