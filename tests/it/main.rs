//! Integration tests: real libvirt daemon, real QEMU guests under TCG, the real `rewind`
//! binary and a real X server. One test binary, so the tiny guest is built once and at most
//! two guests run at a time (see `rewind_tests::domain`).

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails

mod agent;
mod backup;
mod bootcheck;
mod bootdisk;
mod chain;
mod cli;
mod events;
mod files;
mod fullstate;
mod generate;
mod gui;
mod powercut;
mod protect;
mod remote;
mod remote_store;
mod restore;
mod resume;
mod rewind;
mod run;
mod service;
mod store;
mod vms;
