//! The real `rewind` window in a real X server, with a real protected VM: it opens, lists
//! the VM, protects it by itself (the window runs the scheduler when no daemon does), and
//! leaves a screenshot for CI to keep (`target/test-artifacts/rewind-window.png`); and two
//! launches give one window.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rewind_tests::xvfb::Xvfb;
use rewind_tests::{DiskSpec, Format, TestVm, daemon, target_dir};

use crate::rewind;

/// Kills the app when the test ends, pass or fail.
struct App(std::process::Child);

impl Drop for App {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// `rewind ARGS...` with the test's own configuration and state folders.
fn rewind_in(home: &Path, args: &[&str]) -> Command {
    let mut cmd = rewind::command();
    cmd.args(args)
        .args(["--connect", daemon::URI])
        .env("REWIND_CONFIG_DIR", home.join("rewind-config"))
        .env("REWIND_STATE_DIR", home.join("rewind-state"))
        .env(rewind_core::config::SHORT_INTERVALS_ENV, "1");
    cmd
}

fn json_of(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = rewind_in(home, args).output().unwrap();
    assert!(
        out.status.success(),
        "rewind {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_window_protects_a_running_vm_under_xvfb_and_leaves_a_screenshot() {
    let mut vm = TestVm::builder("gui")
        .name("Rewind GUI test VM")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define");
    vm.start_and_wait_ready(Duration::from_mins(2))
        .expect("boot");
    let x = Xvfb::start(1280, 800).expect("Xvfb");
    let home = x.home();
    std::fs::create_dir_all(&home).unwrap();
    let store = home.join("BACKUP").join("rewind");
    let out = rewind_in(
        &home,
        &[
            "protect",
            &vm.name,
            "--to",
            store.to_str().unwrap(),
            "--every",
            "20s",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "protect: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut cmd = rewind_in(&home, &[]);
    x.configure(&mut cmd);
    let log = home.join("app.log");
    let mut app = App(cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rewind"));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    x.wait_window("Rewind", Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}; app log:\n{}", log_text()));

    // No daemon runs: the window's own scheduler takes the checkpoints.
    let start = Instant::now();
    let ok = |h: &serde_json::Value| {
        h.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["outcome"] == "ok")
            .count()
    };
    while ok(&json_of(&home, &["history", "--json"])) < 2 {
        assert!(
            start.elapsed() < Duration::from_mins(3),
            "the window took no two checkpoints in 3 minutes; app log:\n{}",
            log_text()
        );
        assert!(
            app.0.try_wait().unwrap().is_none(),
            "the app exited: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = json_of(&home, &["status", "--json"]);
    assert_eq!(status["scheduler"]["running"], true, "{status}");
    assert_eq!(
        status["scheduler"]["program"], "the Rewind window",
        "{status}"
    );
    let listing = json_of(
        &home,
        &["checkpoints", "--in", store.to_str().unwrap(), "--json"],
    );
    assert!(
        listing["checkpoints"].as_array().unwrap().len() >= 2,
        "{listing}"
    );

    // Let the timeline show them, then keep the picture as a CI artifact.
    std::thread::sleep(Duration::from_secs(2));
    let artifacts = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("rewind-window.png");
    x.screenshot(&shot).expect("screenshot");
    let size = std::fs::metadata(&shot).unwrap().len();
    assert!(
        size > 10_000,
        "the screenshot is suspiciously small ({size} bytes)"
    );
    assert!(
        app.0.try_wait().unwrap().is_none(),
        "the app exited: {}",
        log_text()
    );
    assert!(!log_text().contains("panicked"), "{}", log_text());
}

/// Visible top-level windows titled "Rewind" on the display.
fn rewind_windows(x: &Xvfb) -> usize {
    let out = Command::new("xdotool")
        .args(["search", "--onlyvisible", "--name", "^Rewind$"])
        .env("DISPLAY", x.display())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_second_launch_brings_the_first_window_forward_and_a_killed_one_is_replaced() {
    let x = Xvfb::start(1024, 700).expect("Xvfb");
    let home = x.home();
    std::fs::create_dir_all(&home).unwrap();
    let launch = |log: &str| {
        let mut cmd = rewind_in(&home, &[]);
        x.configure(&mut cmd);
        App(cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join(log)).unwrap())
            .spawn()
            .expect("start rewind"))
    };
    let mut first = launch("first.log");
    x.wait_window("Rewind", Duration::from_mins(1))
        .unwrap_or_else(|e| panic!("{e}"));

    // The second launch hands over to the first and leaves.
    let mut second = rewind_in(&home, &[]);
    x.configure(&mut second);
    let out = second.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open already"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rewind_windows(&x), 1);
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first window quit"
    );

    // A window that was killed leaves its socket behind; the next launch opens anew.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rewind_windows(&x) > 0 {
        assert!(Instant::now() < deadline, "the killed window stays");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut third = launch("third.log");
    x.wait_window("Rewind", Duration::from_mins(1))
        .unwrap_or_else(|e| {
            panic!(
                "{e}; the new window {:?} said:\n{}\nthe killed one said:\n{}",
                third.0.try_wait(),
                std::fs::read_to_string(home.join("third.log")).unwrap_or_default(),
                std::fs::read_to_string(home.join("first.log")).unwrap_or_default()
            )
        });
    assert!(third.0.try_wait().unwrap().is_none(), "the new window quit");
    assert_eq!(rewind_windows(&x), 1);
}
