//! `rewind daemon`: the scheduler without a window (for a `systemd --user` unit), logging
//! to stderr and to Rewind's log (the journal, else a file: [`crate::logging`]), with
//! desktop notifications where the policy asks for them. SIGTERM or Ctrl-C stops it cleanly: running checkpoints are cancelled (they leave
//! nothing behind) and waited for.

use std::sync::Arc;

use anyhow::Context as _;
use rewind_core::config::Config;
use rewind_core::history::Outcome;
use rewind_core::scheduler::{self, Event, Paths, instance::SchedulerLock};

use crate::notify::Notifier;

/// `rewind daemon`.
pub fn run() -> anyhow::Result<()> {
    let lock = SchedulerLock::acquire("rewind daemon")?;
    let log = crate::logging::init(true);
    let notifier = Arc::new(Notifier::new());
    let paths = Paths::default();
    let config_path = paths.config.clone();
    tracing::info!(
        "starting (process {}; configuration {}; log: {})",
        std::process::id(),
        config_path.display(),
        log.destination
    );
    let events: scheduler::EventSink = Arc::new(move |event: Event| {
        // The notification settings as they are now (the file may change).
        let wants = Config::load_or_last_good(&config_path).0.notifications;
        let failed = matches!(&event, Event::Finished(r) if r.outcome == Outcome::Failed);
        let (line, note) = crate::notify::describe(&event, wants);
        if failed {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
        if let Some((summary, body)) = note
            && let Err(e) = notifier.notify(&summary, &body)
        {
            tracing::warn!("(no desktop notification: {e}) {summary}: {body}");
        }
    });
    let handle = scheduler::start(paths, lock, "rewind daemon", events, scheduler::Watch::Own)
        .context("could not start the scheduler")?;
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        // A second signal finds the receiver gone: the daemon is stopping already.
        tx.send(()).ok();
    })
    .context("could not install the signal handler")?;
    // An error means the handler is gone, which is also a reason to stop.
    rx.recv().ok();
    tracing::info!("stopping: cancelling running checkpoints and waiting for them");
    handle.stop();
    Ok(())
}
