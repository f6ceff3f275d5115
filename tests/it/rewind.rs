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
