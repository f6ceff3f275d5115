//! The real `rewind` window in a real X server.

use std::process::Stdio;
use std::time::Duration;

use rewind_tests::xvfb::Xvfb;
use rewind_tests::{TestVm, daemon, target_dir};

use crate::rewind;

/// Kills the app when the test ends, pass or fail.
struct App(std::process::Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn window_opens_and_lists_vms_under_xvfb() {
    let _vm = TestVm::builder("gui")
        .name("Rewind GUI test VM")
        .define()
        .expect("define");
    let x = Xvfb::start(1280, 800).expect("Xvfb");
    let mut cmd = rewind::command();
    x.configure(&mut cmd);
    let log = x.home().join("app.log");
    std::fs::create_dir_all(x.home()).unwrap();
    let mut app = App(cmd
        .args(["--connect", daemon::URI])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start rewind"));
    let window = x.wait_window("Rewind", Duration::from_mins(1));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    window.unwrap_or_else(|e| panic!("{e}; app log:\n{}", log_text()));
    // Let it connect and draw the list, then keep the picture as a CI artifact.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        app.0.try_wait().unwrap().is_none(),
        "the app exited: {}",
        log_text()
    );
    let artifacts = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("rewind-window.png");
    x.screenshot(&shot).expect("screenshot");
    let size = std::fs::metadata(&shot).unwrap().len();
    assert!(
        size > 10_000,
        "the screenshot is suspiciously small ({size} bytes)"
    );
    assert!(!log_text().contains("panicked"), "{}", log_text());
}
