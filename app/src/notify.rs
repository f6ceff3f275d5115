//! Desktop notifications (freedesktop `org.freedesktop.Notifications` over the session
//! D-Bus). Without a session bus or a notification service, `notify` returns an error and
//! the caller logs the message instead.

use std::collections::HashMap;

use rewind_core::config::Notifications;
use rewind_core::history::{Outcome, Record};
use rewind_core::policy::Why;
use rewind_core::scheduler::{Event, boot_checks};
use rewind_core::units::human_bytes;

/// Sends notifications; connects to the session bus on first use.
#[derive(Debug, Default)]
pub struct Notifier {
    connection: std::sync::Mutex<Option<zbus::blocking::Connection>>,
}

impl Notifier {
    /// A notifier (nothing is connected yet).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Shows a notification.
    pub fn notify(&self, summary: &str, body: &str) -> anyhow::Result<()> {
        let mut connection = self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if connection.is_none() {
            *connection =
                Some(zbus::blocking::Connection::session().map_err(|e| {
                    anyhow::anyhow!("no session bus to send notifications on ({e})")
                })?);
        }
        let bus = connection.as_ref().expect("just set");
        let hints: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
        bus.call_method(
            Some("org.freedesktop.Notifications"),
            "/org/freedesktop/Notifications",
            Some("org.freedesktop.Notifications"),
            "Notify",
            &(
                "Rewind",
                0u32,
                "rewind",
                summary,
                body,
                Vec::<&str>::new(),
                hints,
                -1i32,
            ),
        )
        .map_err(|e| anyhow::anyhow!("no notification service answered ({e})"))?;
        Ok(())
    }
}

/// What an event means for the user: a log line, and a notification if one is due.
pub fn describe(event: &Event, wants: Notifications) -> (String, Option<(String, String)>) {
    match event {
        Event::Started {
            vm,
            destination,
            why: Why::BootCheck,
        } => (
            format!("boot-check of {vm}'s newest checkpoint in {destination} begins"),
            None,
        ),
        Event::Finished(r) if r.is_boot_check() => describe_boot_check(r, wants),
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
        } => (
            format!("destination {destination} missing: {reason}"),
            wants.on_failure.then(|| {
                (
                    format!("Checkpoints wait for {destination}"),
                    format!(
                        "{reason}. The checkpoints that are due are taken as soon as it is \
                         back."
                    ),
                )
            }),
        ),
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
        } => describe_stale(vm, destination, *last_success, why, wants),
        Event::Checked {
            destination,
            share,
            broken,
            error,
        } => describe_check(destination, *share, broken, error.as_ref(), wants),
        Event::ConfigReloaded => ("configuration reloaded".into(), None),
        Event::ConfigError(e) => (format!("configuration: {e}"), None),
        Event::Stopped => ("scheduler stopped".into(), None),
        _ => (format!("{event:?}"), None),
    }
}

/// What a scheduled boot-check's record `r` means for the user: one notification when the
/// checkpoint did not boot; none when it booted, was cancelled or could not be done (that
/// one is logged and tried again a day later).
fn describe_boot_check(r: &Record, wants: Notifications) -> (String, Option<(String, String)>) {
    let id = r.checkpoint.as_deref().unwrap_or("?");
    let error = r.error.as_deref().unwrap_or("unknown error");
    match r.outcome {
        Outcome::Ok => (
            format!(
                "boot-check of {}'s checkpoint {id} in {}: it booted",
                r.vm, r.destination
            ),
            None,
        ),
        Outcome::Cancelled => (
            format!("boot-check of {}'s checkpoint {id} cancelled", r.vm),
            None,
        ),
        Outcome::Failed if error.starts_with(boot_checks::NOT_DONE) => (
            format!("{}'s checkpoint {id} in {}: {error}", r.vm, r.destination),
            None,
        ),
        Outcome::Failed => {
            let when = checkpoint_time(id);
            let line = format!(
                "boot-check of {}'s checkpoint {id} in {} FAILED: {error}",
                r.vm, r.destination
            );
            let note = wants.on_failure.then(|| {
                (
                    format!("{}'s checkpoint of {when} did not boot", r.vm),
                    format!(
                        "{error}. Checkpoint {id} in {}; `rewind boot-check` tries it again.",
                        r.destination
                    ),
                )
            });
            (line, note)
        }
    }
}

/// When checkpoint `id` was taken, in local time ("Sat 5 Dec 14:30"), or the id itself if
/// it does not name a time.
fn checkpoint_time(id: &str) -> String {
    chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%S%.3fZ").map_or_else(
        |_| id.to_owned(),
        |t| {
            t.and_utc()
                .with_timezone(&chrono::Local)
                .format("%a %-d %b %H:%M")
                .to_string()
        },
    )
}

/// What the daily check of `destination` (share `k` of `of`) means for the user.
fn describe_check(
    destination: &str,
    (k, of): (u32, u32),
    broken: &[rewind_core::store::verify::CheckpointRef],
    error: Option<&rewind_core::job_error::JobError>,
    wants: Notifications,
) -> (String, Option<(String, String)>) {
    if let Some(e) = error {
        return (
            format!("the daily check of {destination} (share {k} of {of}) did not run: {e}"),
            None,
        );
    }
    if broken.is_empty() {
        return (
            format!("the daily check of {destination} (share {k} of {of}) found it whole"),
            None,
        );
    }
    let names: Vec<String> = broken
        .iter()
        .map(|c| format!("{} of {}", c.id, c.vm))
        .collect();
    let line = format!(
        "the daily check of {destination} (share {k} of {of}) found damage: {} cannot be \
         restored completely",
        names.join(", ")
    );
    let note = wants.on_failure.then(|| {
        (
            format!("Damaged checkpoints in {destination}"),
            format!(
                "{} checkpoint(s) cannot be restored completely ({}). A later checkpoint of \
                 the same data heals them; run `rewind verify` on the store to see all.",
                broken.len(),
                names.join(", ")
            ),
        )
    });
    (line, note)
}

/// What a stale VM (no checkpoint for longer than its policy allows) means for the user.
fn describe_stale(
    vm: &str,
    destination: &str,
    last_success: Option<chrono::DateTime<chrono::Utc>>,
    why: &str,
    wants: Notifications,
) -> (String, Option<(String, String)>) {
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
