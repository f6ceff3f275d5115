//! Rewind's protection service and its local API.
//!
//! One privileged process ([`server`]) runs the engine and its scheduler: it alone talks to
//! `qemu:///system`, reads NVRAM and TPM state, runs `qemu-nbd`, opens stores and holds
//! their passphrases. The window, the tray and the CLI are unprivileged clients
//! ([`client`]) that reach it over a Unix socket; the kernel says who each is
//! (`SO_PEERCRED`) and [`access`] decides what they may do, by libvirt's own rule. What
//! crosses the socket is in [`wire`].

pub mod access;
pub mod client;
pub mod server;
pub mod upgrade;
pub mod wire;

pub use client::{ConnectError, Connection, connect, connect_to, socket_path};
pub use server::{Running, ServiceError, ServiceOptions, start};
