//! Harness for Rewind's integration tests: a real libvirt daemon, real QEMU guests (TCG),
//! the real `rewind` binary, a real X server.
//!
//! - [`setup`] starts `virtlogd`/`libvirtd` if needed, removes what killed test runs left
//!   behind, and builds (or reuses) the tiny guest.
//! - [`domain::TestVm`] defines a guest from the tiny image and removes it on drop;
//!   [`bootdisk`] makes a disk it boots from, for tests that need a real boot sector.
//! - [`guest`] builds the guest from Debian packages; [`workload`] reads what it wrote.
//! - [`rewind`] runs the `rewind` binary; [`xvfb`] starts an X server for the window.
//! - [`sshd::Sshd`] is an OpenSSH server on loopback: the local daemon as a remote host;
//!   [`pool::TestPool`] a storage pool in a scratch folder.

#![allow(clippy::unwrap_used)]
// test code: a panic is how it fails

// A harness reports failures by panicking with a message; documenting each panic adds nothing.
#![allow(clippy::missing_panics_doc)]

pub mod a11y;
pub mod bootdisk;
pub mod compare;
pub mod daemon;
pub mod disks;
pub mod domain;
pub mod guest;
pub mod package;
pub mod pool;
pub mod powercut;
pub mod rewind;
pub mod scratch;
pub mod service;
pub mod sshd;
pub mod sync_watch;
pub mod tray_host;
pub mod users;
pub mod workload;
pub mod xvfb;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use domain::{DiskSpec, Format, RestoredVm, TestVm};
/// The libvirt bindings the harness uses, for tests that look at a domain themselves.
pub use virt;

/// A harness failure, with a message saying what to do.
#[derive(Debug, Clone)]
pub struct HarnessError(pub String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

impl HarnessError {
    /// Wraps a libvirt error.
    #[must_use]
    #[allow(clippy::needless_pass_by_value)] // used as `map_err(HarnessError::libvirt)`
    pub fn libvirt(e: virt::error::Error) -> Self {
        Self(format!("libvirt: {}", e.message()))
    }

    /// Wraps an I/O error on `path`.
    #[must_use]
    pub fn io(action: &str, path: &Path, e: &std::io::Error) -> Self {
        Self(format!("could not {action} {}: {e}", path.display()))
    }
}

/// Panics with everything `what` printed unless it succeeded.
pub fn assert_success(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `len` bytes that do not compress, the same for the same `seed` and different for
/// different seeds (xorshift).
#[must_use]
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// The workspace's `target` folder (the test executable lives in `target/<profile>/deps`).
#[must_use]
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            Path::to_path_buf,
        )
}

/// One-time set-up shared by every test in a process: daemons, stale leftovers, guest image.
pub fn setup() -> Result<(), HarnessError> {
    static DONE: OnceLock<Result<(), HarnessError>> = OnceLock::new();
    DONE.get_or_init(|| {
        daemon::ensure_libvirt()?;
        let conn = domain::connect()?;
        for name in domain::sweep_stale(&conn) {
            eprintln!("note: removed test VM {name:?} left by a killed test run");
        }
        sweep_stale_scratch();
        guest_image()?;
        Ok(())
    })
    .clone()
}

/// The tiny guest (kernel + initramfs), built once and cached under `target/`.
pub fn guest_image() -> Result<&'static guest::GuestImage, HarnessError> {
    static IMAGE: OnceLock<Result<guest::GuestImage, HarnessError>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            guest::build_guest_image(&target_dir().join("rewind-test-guest"))
                .map_err(|e| HarnessError(format!("could not build the test guest: {e}")))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Removes scratch folders of test processes that no longer run.
fn sweep_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(scratch::root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = scratch::owner_pid(&name)
            && !scratch::pid_alive(pid)
        {
            drop(std::fs::remove_dir_all(entry.path()));
        }
    }
}
