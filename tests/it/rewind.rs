//! The `rewind` binary cargo built for these tests.

use std::path::Path;
use std::process::{Command, Output};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rewind"))
}

/// A `rewind` command (see [`rewind_tests::rewind::command`]).
pub fn command() -> Command {
    rewind_tests::rewind::command(binary())
}

/// Runs `rewind ARGS...`.
pub fn run(args: &[&str]) -> Output {
    rewind_tests::rewind::run(binary(), args)
}

/// Runs `rewind ARGS...`, asserts success, returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    rewind_tests::rewind::run_ok(binary(), args)
}

/// `rewind checkpoint VM --to DEST --connect <test URI>`, not yet run.
pub fn checkpoint_command(vm: &str, dest: &Path) -> Command {
    let mut cmd = command();
    cmd.args(["checkpoint", vm, "--to"])
        .arg(dest)
        .args(["--connect", rewind_tests::daemon::URI]);
    cmd
}

/// `rewind checkpoint VM --to DEST --json --connect <test URI>`: the one checkpoint it took.
pub fn checkpoint_json(vm: &str, dest: &Path) -> serde_json::Value {
    let out = run_ok(&[
        "checkpoint",
        vm,
        "--to",
        dest.to_str().expect("test paths are UTF-8"),
        "--json",
        "--connect",
        rewind_tests::daemon::URI,
    ]);
    let mut list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1, "{out}");
    list.remove(0)
}

/// Asserts that a `rewind` run failed at a point `REWIND_FAULT` named.
pub fn assert_fault_injected(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("fault injected"),
        "{stderr}"
    );
}
