//! Fault injection for the integration tests: with `REWIND_FAULT=<point>` in the
//! environment, the named point fails with an error; with `REWIND_FAULT=abort-<point>`, the
//! process aborts there as if killed; with `REWIND_FAULT=wait-<point>`, it waits there until
//! the file named by `REWIND_FAULT_RELEASE` exists (at most ten minutes), so that a test can
//! act in between. Points: `after-freeze` (the guest's file systems are frozen, the capture
//! not begun yet), `after-save` (a full-state capture saved the VM, which is shut off with
//! its state in libvirt's managed save image), `after-live-snapshot` (a live full-state
//! capture, or a running VM's full disk capture, put the VM's disks on overlays),
//! `files-staged` (a file restore copied everything into its temporary folder, and moved
//! nothing in place yet). Without the variable nothing happens.

/// A failure injected on purpose.
#[derive(Debug, thiserror::Error)]
#[error("fault injected at {0} (REWIND_FAULT)")]
pub struct Injected(&'static str);

/// Fails or aborts at `point` when `REWIND_FAULT` asks for it.
pub(crate) fn point(point: &'static str) -> Result<(), Injected> {
    let Ok(wanted) = std::env::var("REWIND_FAULT") else {
        return Ok(());
    };
    if wanted == point {
        return Err(Injected(point));
    }
    if wanted.strip_prefix("wait-") == Some(point) {
        let release =
            std::path::PathBuf::from(std::env::var_os("REWIND_FAULT_RELEASE").unwrap_or_default());
        eprintln!("REWIND_FAULT: waiting at {point} for {}", release.display());
        let deadline = std::time::Instant::now() + std::time::Duration::from_mins(10);
        while !release.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    if wanted.strip_prefix("abort-") == Some(point) {
        eprintln!("REWIND_FAULT: aborting at {point}");
        std::process::abort();
    }
    Ok(())
}
