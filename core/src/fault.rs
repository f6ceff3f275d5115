//! Fault injection for the integration tests: with `REWIND_FAULT=<point>` in the
//! environment, the named point fails with an error; with `REWIND_FAULT=abort-<point>`, the
//! process aborts there as if killed. Points: `after-freeze` (the guest's file systems are
//! frozen, the backup not begun yet), `after-save` (a full-state capture saved the VM,
//! which is shut off with its state in libvirt's managed save image), `after-live-snapshot`
//! (a live full-state capture put the VM's disks on overlays). Without the variable nothing
//! happens.

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
    if wanted.strip_prefix("abort-") == Some(point) {
        eprintln!("REWIND_FAULT: aborting at {point}");
        std::process::abort();
    }
    Ok(())
}
