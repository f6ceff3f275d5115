//! Progress and cancellation, passed into every long loop.
//!
//! A [`Control`] is shared (in an `Arc`) between the caller that may cancel and watch, and
//! the loop that does the work. The loop calls [`Control::check`] at each step and adds to
//! the progress counters; the UI reads them whenever it repaints. Nothing blocks.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Cancellation flag, phase and progress counters of one job.
#[derive(Debug, Default)]
pub struct Control {
    cancelled: AtomicBool,
    cancel_deferred: AtomicBool,
    phase: AtomicU8,
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
    /// While the job waits for a guest to shut down: when it turns the VM off (ms since
    /// the Unix epoch; 0 when not waiting).
    force_off_at_ms: AtomicU64,
    /// Turning the VM off now, without waiting for the guest any longer, was asked for.
    force_off_now: AtomicBool,
    /// A store's lock held by others fails the job as busy instead of being waited for.
    fail_when_busy: AtomicBool,
}

/// What a job is doing, for the progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Phase {
    /// Looking at the VM and the store, cleaning up after earlier runs.
    #[default]
    Preparing = 0,
    /// Freezing the guest's file systems and marking the capture instant.
    Capturing = 1,
    /// Reading data and writing it into the store.
    Copying = 2,
    /// Making the result durable.
    Finishing = 3,
    /// Shutting a VM down (before a restore).
    Stopping = 4,
    /// Taking the safety checkpoint of the current state (before a restore).
    SafetyCheckpoint = 5,
    /// Writing what differs back to the disks.
    Writing = 6,
    /// Reading what was written back and checking it.
    Verifying = 7,
    /// Undoing a restore that was cancelled or failed half-way.
    RollingBack = 8,
    /// Starting the VM again.
    Starting = 9,
    /// Reading a full-state checkpoint's saved memory back out of the store (before a
    /// restore touches the VM).
    ReadingMemory = 10,
    /// Keeping the newest checkpoints quick to restore (flat copies of their patches,
    /// after a scheduled checkpoint).
    Compacting = 11,
    /// Starting a throwaway copy of a checkpoint and waiting for it to boot.
    BootChecking = 12,
}

impl Phase {
    /// A word for the user.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Capturing => "capturing",
            Self::Copying => "copying",
            Self::Finishing => "finishing",
            Self::Stopping => "shutting the VM down",
            Self::SafetyCheckpoint => "safety checkpoint",
            Self::Writing => "writing",
            Self::Verifying => "verifying",
            Self::RollingBack => "rolling back",
            Self::Starting => "starting the VM",
            Self::ReadingMemory => "reading the saved memory",
            Self::Compacting => "keeping the newest checkpoint quick to restore",
            Self::BootChecking => "waiting for a throwaway copy to boot",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Capturing,
            2 => Self::Copying,
            3 => Self::Finishing,
            4 => Self::Stopping,
            5 => Self::SafetyCheckpoint,
            6 => Self::Writing,
            7 => Self::Verifying,
            8 => Self::RollingBack,
            9 => Self::Starting,
            10 => Self::ReadingMemory,
            11 => Self::Compacting,
            12 => Self::BootChecking,
            _ => Self::Preparing,
        }
    }
}

/// The job was cancelled by its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

impl Control {
    /// A fresh control: not cancelled, no progress.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the job fail as busy ([`crate::store::StoreError::Busy`]) instead of waiting
    /// when another process holds a store's lock it needs: for a script that would rather
    /// try again later.
    pub fn fail_when_busy(&self) {
        self.fail_when_busy.store(true, Ordering::Relaxed);
    }

    /// Whether the job waits for a store's lock that another process holds (the default).
    #[must_use]
    pub fn waits_when_busy(&self) -> bool {
        !self.fail_when_busy.load(Ordering::Relaxed)
    }

    /// Asks the job to stop at its next check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`Control::cancel`] was called.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// While `deferred`, [`Control::check`] lets the job go on although it was cancelled
    /// (for a stretch that must not stop half-way); the cancel takes effect after.
    pub fn defer_cancel(&self, deferred: bool) {
        self.cancel_deferred.store(deferred, Ordering::Relaxed);
    }

    /// `Err(Cancelled)` once the job has been cancelled (unless the cancel is deferred).
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() && !self.cancel_deferred.load(Ordering::Relaxed) {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// Records what the job is doing now.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Moves to the next phase of a job with several (a restore: stopping, writing,
    /// verifying): progress starts again from zero for it.
    pub fn start_phase(&self, phase: Phase) {
        self.set_phase(phase);
        self.done_bytes.store(0, Ordering::Relaxed);
        self.total_bytes.store(0, Ordering::Relaxed);
    }

    /// What the job is doing now.
    #[must_use]
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Sets how many bytes the job will process in all.
    pub fn set_total_bytes(&self, total_bytes: u64) {
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
    }

    /// Adds to the total (for jobs that discover their work as they go).
    pub fn add_total_bytes(&self, bytes: u64) {
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Shows the progress of a job that runs elsewhere (in the protection service), as it
    /// reported it: this control then mirrors it for a progress line.
    pub fn mirror(&self, phase: Phase, done_bytes: u64, total_bytes: u64) {
        self.set_phase(phase);
        self.done_bytes.store(done_bytes, Ordering::Relaxed);
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
    }

    /// Records that `bytes` more have been processed.
    pub fn add_done_bytes(&self, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Notes that the job waits for a guest to shut down until `deadline`, when it turns the
    /// VM off (`None`: it no longer waits).
    pub fn set_force_off_at(&self, deadline: Option<SystemTime>) {
        let ms = deadline.map_or(0, |d| {
            d.duration_since(UNIX_EPOCH).map_or(1, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
        });
        self.force_off_at_ms.store(ms, Ordering::Relaxed);
    }

    /// While the job waits for a guest to shut down: how long until it turns the VM off.
    #[must_use]
    pub fn force_off_in(&self) -> Option<Duration> {
        match self.force_off_at_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => {
                let at = UNIX_EPOCH + Duration::from_millis(ms);
                Some(at.duration_since(SystemTime::now()).unwrap_or_default())
            }
        }
    }

    /// Asks a job that waits for a guest to shut down to turn the VM off now.
    pub fn force_off_now(&self) {
        self.force_off_now.store(true, Ordering::Relaxed);
    }

    /// Whether [`Control::force_off_now`] was called.
    #[must_use]
    pub fn force_off_asked(&self) -> bool {
        self.force_off_now.load(Ordering::Relaxed)
    }

    /// `(done_bytes, total_bytes)` so far.
    #[must_use]
    pub fn progress_bytes(&self) -> (u64, u64) {
        (
            self.done_bytes.load(Ordering::Relaxed),
            self.total_bytes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_progress() {
        let c = Control::new();
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.phase(), Phase::Preparing);
        for phase in [
            Phase::Capturing,
            Phase::Copying,
            Phase::Finishing,
            Phase::Stopping,
            Phase::SafetyCheckpoint,
            Phase::Writing,
            Phase::Verifying,
            Phase::RollingBack,
            Phase::Starting,
            Phase::ReadingMemory,
        ] {
            c.set_phase(phase);
            assert_eq!(c.phase(), phase);
        }
        c.set_total_bytes(10);
        c.add_done_bytes(4);
        c.add_total_bytes(5);
        assert_eq!(c.progress_bytes(), (4, 15));
        c.defer_cancel(true);
        c.cancel();
        assert_eq!(c.check(), Ok(()), "deferred");
        c.defer_cancel(false);
        assert_eq!(c.check(), Err(Cancelled));
    }

    #[test]
    fn a_shutdown_countdown_and_turning_off_now() {
        let c = Control::new();
        assert_eq!(c.force_off_in(), None, "not waiting");
        c.set_force_off_at(Some(SystemTime::now() + Duration::from_secs(90)));
        let left = c.force_off_in().unwrap();
        assert!(left > Duration::from_secs(85) && left <= Duration::from_secs(90));
        c.set_force_off_at(Some(SystemTime::now() - Duration::from_secs(1)));
        assert_eq!(c.force_off_in(), Some(Duration::ZERO), "overdue: now");
        assert!(!c.force_off_asked());
        c.force_off_now();
        assert!(c.force_off_asked());
        c.set_force_off_at(None);
        assert_eq!(c.force_off_in(), None);
    }
}
