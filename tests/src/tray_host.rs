//! A minimal tray host for tests and benchmarks: an `org.kde.StatusNotifierWatcher` on the
//! session bus (the one `DBUS_SESSION_BUS_ADDRESS` names) that records which items
//! register, as a desktop's panel would. Dropping it closes its connection, so its name
//! goes away (a panel that quits).

use std::sync::{Arc, Mutex, PoisonError};

use crate::HarnessError;

/// The well-known name tray items look for.
pub const WATCHER_NAME: &str = "org.kde.StatusNotifierWatcher";

/// The watcher's D-Bus object: records who registers.
struct Watcher {
    items: Arc<Mutex<Vec<String>>>,
}

#[zbus::interface(name = "org.kde.StatusNotifierWatcher")]
#[allow(clippy::unused_self)] // D-Bus methods and properties take `&self`
impl Watcher {
    fn register_status_notifier_item(&self, service: &str) {
        self.items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(service.to_owned());
    }

    fn register_status_notifier_host(&self, service: &str) {
        let _ = service;
    }

    #[zbus(property)]
    fn registered_status_notifier_items(&self) -> Vec<String> {
        self.items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    #[zbus(property)]
    fn is_status_notifier_host_registered(&self) -> bool {
        true
    }

    #[zbus(property)]
    fn protocol_version(&self) -> i32 {
        0
    }
}

/// A running tray host.
#[derive(Debug)]
pub struct TrayHost {
    _connection: zbus::blocking::Connection,
    items: Arc<Mutex<Vec<String>>>,
}

impl TrayHost {
    /// Takes the watcher's name on the session bus.
    ///
    /// # Errors
    /// No session bus, or the name is taken.
    pub fn start() -> Result<Self, HarnessError> {
        Self::on(zbus::blocking::connection::Builder::session())
    }

    /// Takes the watcher's name on the bus at `address`.
    ///
    /// # Errors
    /// The bus does not answer, or the name is taken.
    pub fn start_on(address: &str) -> Result<Self, HarnessError> {
        Self::on(zbus::blocking::connection::Builder::address(address))
    }

    fn on(
        builder: zbus::Result<zbus::blocking::connection::Builder<'static>>,
    ) -> Result<Self, HarnessError> {
        let items = Arc::new(Mutex::new(Vec::new()));
        let fail = |e: zbus::Error| HarnessError(format!("could not start a tray host: {e}"));
        let connection = builder
            .map_err(fail)?
            .serve_at(
                "/StatusNotifierWatcher",
                Watcher {
                    items: Arc::clone(&items),
                },
            )
            .map_err(fail)?
            .name(WATCHER_NAME)
            .map_err(fail)?
            .build()
            .map_err(fail)?;
        Ok(Self {
            _connection: connection,
            items,
        })
    }

    /// The bus names of the items that registered, in order.
    #[must_use]
    pub fn registered(&self) -> Vec<String> {
        self.items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
