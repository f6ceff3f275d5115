//! Desktop notifications (freedesktop `org.freedesktop.Notifications` over the session
//! D-Bus). Without a session bus or a notification service, `notify` returns an error and
//! the caller logs the message instead.

use std::collections::HashMap;

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
