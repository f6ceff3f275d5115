//! `rewind-core`: everything Rewind does except drawing it.
//!
//! libvirt access ([`libvirt`]), the description of VMs ([`vm`]), the backup [`store`], and
//! the [`engine`] that
//! front ends drive with commands and that answers with events. This crate never depends on
//! a GUI toolkit; the window, the tray and the CLI in the `rewind` crate are thin layers
//! over it.

pub mod atomic_file;
pub mod autostart;
pub mod bootcheck;
pub mod checkpoint;
mod cleanup;
pub mod config;
pub mod destination;
pub mod engine;
pub mod error;
mod fault;
pub mod files;
pub mod firmware;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod identity;
pub mod job_error;
pub mod libvirt;
pub mod mounts;
pub mod nbd_export;
pub mod notes;
pub mod paths;
pub mod pause;
pub mod policy;
pub mod priority;
pub mod progress;
pub mod qcow2;
mod qemu_nbd;
pub mod restore;
pub mod scheduler;
pub mod ssh_identity;
pub mod staging;
pub mod store;
pub mod units;
pub mod view;
pub mod vm;
pub mod workdir;

pub use error::{Error, Result};

/// The version of this build, recorded in everything Rewind writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
