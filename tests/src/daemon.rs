//! Making sure `virtlogd` and `libvirtd` run, starting them by hand where there is no systemd.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::HarnessError;

/// The system daemon's socket.
pub const LIBVIRT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCKET: &str = "/var/run/libvirt/virtlogd-sock";
const VIRTLOGD_ADMIN_SOCKET: &str = "/var/run/libvirt/virtlogd-admin-sock";
/// The URI every integration test uses (as root, `qemu:///session` is the system daemon too).
pub const URI: &str = "qemu:///system";

/// Starts the daemons if they do not answer, reuses them if they do, and waits until
/// `qemu:///system` accepts connections.
///
/// Each daemon is checked on its own: libvirtd can answer while virtlogd is gone, and QEMU
/// then fails to start with "virtlogd-sock: Connection refused". A socket file left by a
/// killed daemon is removed before starting it again, since it would stop the daemon.
pub fn ensure_libvirt() -> Result<(), HarnessError> {
    let _lock = crate::scratch::lock_file("daemon")?;
    if !socket_answers(VIRTLOGD_SOCKET) {
        drop(std::fs::remove_file(VIRTLOGD_SOCKET));
        drop(std::fs::remove_file(VIRTLOGD_ADMIN_SOCKET));
        spawn_daemon("virtlogd")?;
        wait_for("virtlogd", || socket_answers(VIRTLOGD_SOCKET))?;
    }
    if connects() {
        return Ok(());
    }
    if !socket_answers(LIBVIRT_SOCKET) {
        drop(std::fs::remove_file(LIBVIRT_SOCKET));
        spawn_daemon("libvirtd")?;
    }
    wait_for("libvirtd", connects)
}

fn wait_for(name: &str, ready: impl Fn() -> bool) -> Result<(), HarnessError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(HarnessError(format!(
        "{name} was started but does not accept connections after 20 s; \
         see /var/log/libvirt/ and try `{name} -v` by hand"
    )))
}

/// Whether something listens on this unix socket (a file alone may be left by a dead daemon).
fn socket_answers(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn connects() -> bool {
    socket_answers(LIBVIRT_SOCKET) && virt::connect::Connect::open(Some(URI)).is_ok()
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
