//! Running the real `rewind` binary.
//!
//! The integration tests belong to the `rewind` package, so cargo builds the binary before
//! them and passes its path as `env!("CARGO_BIN_EXE_rewind")`; they hand that path in here.

use std::path::Path;
use std::process::{Command, Output};

/// A `rewind` command with a clean environment for libvirt and no protection service.
#[must_use]
pub fn command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_remove("LIBVIRT_DEFAULT_URI");
    // Root works directly when no service answers: these tests do not go through one
    // that may run on this machine (the service's own tests name theirs).
    cmd.env("REWIND_SOCKET", "/nonexistent/rewind-tests.sock");
    cmd
}

/// Runs `rewind ARGS...` to completion.
#[must_use]
pub fn run(binary: &Path, args: &[&str]) -> Output {
    command(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", binary.display()))
}

/// Runs `rewind ARGS...`, asserts success and returns stdout.
#[must_use]
pub fn run_ok(binary: &Path, args: &[&str]) -> String {
    let out = run(binary, args);
    crate::assert_success(&format!("rewind {args:?}"), &out);
    String::from_utf8(out.stdout).expect("rewind prints UTF-8")
}
