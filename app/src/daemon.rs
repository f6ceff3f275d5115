//! `rewind daemon`: the scheduler without a window (for a `systemd --user` unit), logging
//! to stderr and to Rewind's log (the journal, else a file: [`crate::logging`]), with
//! desktop notifications where the policy asks for them. SIGTERM or Ctrl-C stops it cleanly: running checkpoints are cancelled (they leave
//! nothing behind) and waited for.

use std::sync::Arc;

use anyhow::Context as _;
use rewind_core::config::{Config, Notifications};
use rewind_core::history::Outcome;
use rewind_core::scheduler::{self, Event, Paths, instance::SchedulerLock};
use rewind_core::units::human_bytes;

use crate::notify::Notifier;

/// What an event means for the user: a log line, and a notification if one is due.
fn describe(event: &Event, wants: Notifications) -> (String, Option<(String, String)>) {
    match event {
        Event::Started {
            vm,
            destination,
            why,
        } => (
            format!(
                "checkpoint of {vm} into {destination} begins ({})",
                why.label()
            ),
            None,
        ),
        Event::Finished(r) => match r.outcome {
            Outcome::Ok => {
                let line = format!(
                    "checkpoint {} of {} into {} taken: {} new, {} old removed",
                    r.checkpoint.as_deref().unwrap_or("?"),
                    r.vm,
                    r.destination,
                    human_bytes(r.new_bytes),
                    r.pruned
                );
                let note = wants.on_success.then(|| {
                    (
                        format!("{} is protected", r.vm),
                        format!("New checkpoint in {}.", r.destination),
                    )
                });
                (line, note)
            }
            Outcome::Failed => {
                let error = r.error.as_deref().unwrap_or("unknown error");
                let line = format!(
                    "checkpoint of {} into {} FAILED{}: {error}",
                    r.vm,
                    r.destination,
                    if r.retryable { " (will retry)" } else { "" }
                );
                let note = wants
                    .on_failure
                    .then(|| (format!("Checkpoint of {} failed", r.vm), error.to_owned()));
                (line, note)
            }
            Outcome::Cancelled => (
                format!("checkpoint of {} into {} cancelled", r.vm, r.destination),
                None,
            ),
        },
        Event::DestinationMissing {
            destination,
            reason,
        } => (format!("destination {destination} missing: {reason}"), None),
        Event::DestinationFound {
            destination,
            location,
        } => (
            format!("destination {destination} found at {location}"),
            None,
        ),
        Event::Stale {
            vm,
            destination,
            last_success,
            why,
        } => {
            let age = last_success.map_or_else(
                || "there is no checkpoint".to_owned(),
                |t| {
                    let secs = u64::try_from((chrono::Utc::now() - t).num_seconds()).unwrap_or(0);
                    format!(
                        "the last checkpoint is {} old",
                        rewind_core::units::human_age_secs(secs)
                    )
                },
            );
            let line = format!("{vm} in {destination}: {age}: {why}");
            let note = wants.on_stale.then(|| {
                (
                    format!("{vm} needs a checkpoint"),
                    format!("In {destination}, {age}. {why}"),
                )
            });
            (line, note)
        }
        Event::ConfigReloaded => ("configuration reloaded".into(), None),
        Event::ConfigError(e) => (format!("configuration: {e}"), None),
        Event::Stopped => ("scheduler stopped".into(), None),
        _ => (format!("{event:?}"), None),
    }
}

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
        let (line, note) = describe(&event, wants);
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
