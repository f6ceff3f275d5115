//! Best-effort steps: tidying up after a job that failed or is done, undoing what a
//! failed step left. They must not change the job's outcome, nor vanish unsaid: a failure
//! is logged as a warning, with what was being done.

use std::fmt::Display;
use std::path::Path;

/// Logs a failed best-effort step as a warning.
pub(crate) trait OrWarn {
    /// `what` says what was being done ("remove the overlay /x/y").
    fn or_warn(self, what: impl Display);
}

impl<T, E: Display> OrWarn for Result<T, E> {
    fn or_warn(self, what: impl Display) {
        if let Err(e) = self {
            tracing::warn!("could not {what}: {e}");
        }
    }
}

/// Removes a file; one that is not there is fine.
pub(crate) fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("could not remove {}: {e}", path.display());
        }
        _ => {}
    }
}

/// Removes a folder and everything in it; one that is not there is fine.
pub(crate) fn remove_dir_all(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("could not remove {}: {e}", path.display());
        }
        _ => {}
    }
}
