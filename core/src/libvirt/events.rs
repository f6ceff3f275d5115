//! Domain lifecycle events (started, stopped, defined, ...) from libvirt.
//!
//! libvirt delivers events through an event loop that must be registered before the first
//! connection is opened; [`ensure_event_loop`] does that once per process and runs the loop
//! on a named thread. The same loop drives connection keep-alives.

use std::ffi::c_int;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use virt::connect::Connect;

use super::ffi;

/// What happened to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    /// Defined or its definition changed.
    Defined,
    /// Undefined (deleted).
    Undefined,
    /// Started or restored.
    Started,
    /// Paused.
    Suspended,
    /// Unpaused.
    Resumed,
    /// Stopped (shut down, destroyed, crashed, saved, migrated away).
    Stopped,
    /// The guest is shutting down.
    Shutdown,
    /// Suspended by guest power management.
    PmSuspended,
    /// The guest crashed.
    Crashed,
    /// A kind newer than this build of Rewind.
    Other,
}

impl LifecycleKind {
    /// Maps `virDomainEventType`.
    #[must_use]
    pub fn from_raw(event: c_int) -> Self {
        match event {
            0 => Self::Defined,
            1 => Self::Undefined,
            2 => Self::Started,
            3 => Self::Suspended,
            4 => Self::Resumed,
            5 => Self::Stopped,
            6 => Self::Shutdown,
            7 => Self::PmSuspended,
            8 => Self::Crashed,
            _ => Self::Other,
        }
    }
}

/// One lifecycle event of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// The VM's name.
    pub name: String,
    /// The VM's UUID.
    pub uuid: String,
    /// What happened.
    pub kind: LifecycleKind,
    /// libvirt's detail code for the kind (e.g. why it stopped).
    pub detail: i32,
}

/// Starts libvirt's default event loop on a background thread, once per process.
///
/// Must run before a connection is opened for that connection to deliver events;
/// [`super::Hypervisor::connect`] calls it.
pub fn ensure_event_loop() {
    static STARTED: OnceLock<bool> = OnceLock::new();
    STARTED.get_or_init(|| {
        // Errors go to the caller through return values; stop libvirt printing them too.
        virt::error::clear_error_callback();
        if virt::event::event_register_default_impl().is_err() {
            return false;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if virt::event::event_run_default_impl().is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })
            .is_ok()
    });
}

/// A live registration for lifecycle events; dropping it stops the callbacks.
#[derive(Debug)]
pub struct Subscription {
    conn: Connect,
    id: c_int,
}

impl Subscription {
    pub(super) fn new(
        conn: &Connect,
        handler: impl Fn(VmEvent) + Send + Sync + 'static,
    ) -> Result<Self, virt::error::Error> {
        let id = ffi::register_lifecycle(conn, Box::new(handler))?;
        Ok(Self {
            conn: conn.clone(),
            id,
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        ffi::deregister(&self.conn, self.id);
    }
}
