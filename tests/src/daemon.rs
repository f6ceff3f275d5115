//! Making sure `virtlogd` and `libvirtd` run, starting them by hand where there is no systemd.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::HarnessError;

/// The system daemon's socket.
pub const LIBVIRT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCKET: &str = "/var/run/libvirt/virtlogd-sock";
/// The URI every integration test uses (as root, `qemu:///session` is the system daemon too).
pub const URI: &str = "qemu:///system";

/// Starts the daemons if their sockets are absent, reuses them if present, and waits until
/// `qemu:///system` accepts connections.
pub fn ensure_libvirt() -> Result<(), HarnessError> {
    let _lock = crate::scratch::lock_file("daemon")?;
    if connects() {
        return Ok(());
    }
    if !Path::new(VIRTLOGD_SOCKET).exists() {
        spawn_daemon("virtlogd")?;
    }
    if !Path::new(LIBVIRT_SOCKET).exists() || !connects() {
        // A stale socket from a killed daemon makes libvirtd refuse to start; it removes
        // the socket itself only when it was the one to create it.
        let _ = std::fs::remove_file(LIBVIRT_SOCKET);
        spawn_daemon("libvirtd")?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if connects() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(HarnessError(format!(
        "libvirtd was started but {URI} does not accept connections after 20 s; \
         see /var/log/libvirt/libvirtd.log"
    )))
}

fn connects() -> bool {
    Path::new(LIBVIRT_SOCKET).exists() && virt::connect::Connect::open(Some(URI)).is_ok()
}

fn spawn_daemon(name: &str) -> Result<(), HarnessError> {
    if !is_root() {
        return Err(HarnessError(format!(
            "{name} is not running and only root can start it: run the tests with `./x test`, \
             which starts it, or start it yourself (`sudo {name} -d`)"
        )));
    }
    let status = Command::new(name).arg("-d").status().map_err(|e| {
        HarnessError(format!(
            "could not run `{name} -d`: {e}; run ./x test to install libvirt"
        ))
    })?;
    if !status.success() {
        return Err(HarnessError(format!("`{name} -d` failed with {status}")));
    }
    Ok(())
}

/// Whether the tests run as root.
#[must_use]
pub fn is_root() -> bool {
    // `id -u` keeps this crate free of unsafe code.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
