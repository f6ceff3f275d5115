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

/// The object path of a tray item's menu (`com.canonical.dbusmenu`).
const MENU_PATH: &str = "/MenuBar";
const MENU_INTERFACE: &str = "com.canonical.dbusmenu";

/// A dbusmenu layout node: id, properties, children (each a node in a variant).
type LayoutNode = (
    i32,
    std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
    Vec<zbus::zvariant::OwnedValue>,
);

fn unwrap_variant(value: zbus::zvariant::Value<'_>) -> zbus::zvariant::Value<'_> {
    match value {
        zbus::zvariant::Value::Value(inner) => unwrap_variant(*inner),
        other => other,
    }
}

/// The entries of the menu of the tray item `item` on `bus`: id and label, in order.
///
/// # Errors
/// The item does not answer, or its menu is malformed.
pub fn menu(
    bus: &zbus::blocking::Connection,
    item: &str,
) -> Result<Vec<(i32, String)>, HarnessError> {
    let fail = |e: &dyn std::fmt::Display| HarnessError(format!("the tray's menu: {e}"));
    let reply = bus
        .call_method(
            Some(item),
            MENU_PATH,
            Some(MENU_INTERFACE),
            "GetLayout",
            &(0i32, -1i32, Vec::<&str>::new()),
        )
        .map_err(|e| fail(&e))?;
    let (_revision, (_root, _props, children)): (u32, LayoutNode) =
        reply.body().deserialize().map_err(|e| fail(&e))?;
    children
        .into_iter()
        .map(|child| {
            let (id, props, _children): LayoutNode =
                unwrap_variant(zbus::zvariant::Value::from(child))
                    .try_into()
                    .map_err(|e| fail(&e))?;
            let label = props
                .get("label")
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| String::try_from(unwrap_variant(zbus::zvariant::Value::from(v))).ok())
                .unwrap_or_default();
            Ok((id, label))
        })
        .collect()
}

/// Clicks the entry labelled `label` in the menu of the tray item `item` on `bus`, as the
/// panel does when the user picks it.
///
/// # Errors
/// There is no such entry, or the item does not answer.
pub fn click(
    bus: &zbus::blocking::Connection,
    item: &str,
    label: &str,
) -> Result<(), HarnessError> {
    let entries = menu(bus, item)?;
    let id = entries
        .iter()
        .find(|(_, l)| l == label)
        .map(|(id, _)| *id)
        .ok_or_else(|| HarnessError(format!("no {label:?} in the tray's menu: {entries:?}")))?;
    bus.call_method(
        Some(item),
        MENU_PATH,
        Some(MENU_INTERFACE),
        "Event",
        &(id, "clicked", zbus::zvariant::Value::from(0i32), 0u32),
    )
    .map(drop)
    .map_err(|e| HarnessError(format!("clicking {label:?} in the tray's menu: {e}")))
}
