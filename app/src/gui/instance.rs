//! One window, and one tray, per user: the first one listens on a socket in the user's
//! runtime folder (`$XDG_RUNTIME_DIR/rewind-window.sock`, `rewind-tray.sock`); a second
//! launch finds it there, asks it to come to the front, and leaves. A socket left by a
//! process that was killed is found dead (the connection is refused) and taken over.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// What a second launch says.
const SHOW: &str = "show";

/// Which single-instance process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The window.
    Window,
    /// The tray icon (`rewind tray`).
    Tray,
}

/// The socket of this user's window or tray.
fn socket_path(role: Role) -> PathBuf {
    let name = match role {
        Role::Window => "window",
        Role::Tray => "tray",
    };
    std::env::var_os("XDG_RUNTIME_DIR").map_or_else(
        || {
            std::env::temp_dir().join(format!(
                "rewind-{name}-{}.sock",
                rustix::process::getuid().as_raw()
            ))
        },
        |dir| PathBuf::from(dir).join(format!("rewind-{name}.sock")),
    )
}

/// Whether this is the first window.
#[derive(Debug)]
pub enum Instance {
    /// It is: it listens for later launches.
    First(UnixListener),
    /// Another window runs and was asked to come to the front.
    Shown,
}

/// Asks a running window to come to the front.
fn show(path: &std::path::Path) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    writeln!(stream, "{SHOW}")
}

/// Becomes the first window, or hands over to the one that runs.
///
/// # Errors
/// The socket can be neither reached nor made (the window then runs without it).
pub fn claim(role: Role) -> std::io::Result<Instance> {
    let path = socket_path(role);
    for _ in 0..2 {
        if show(&path).is_ok() {
            return Ok(Instance::Shown);
        }
        match UnixListener::bind(&path) {
            Ok(listener) => return Ok(Instance::First(listener)),
            // Left by a window that is gone (the connection was refused): take it over.
            // Or another launch bound it just now: the next round shows that one.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if show(&path).is_ok() {
                    return Ok(Instance::Shown);
                }
                std::fs::remove_file(&path)?;
            }
            Err(e) => return Err(e),
        }
    }
    UnixListener::bind(&path).map(Instance::First)
}

/// Calls `on_show` for each later launch, on a thread of its own.
///
/// # Errors
/// The thread could not be started.
pub fn listen(
    listener: UnixListener,
    on_show: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rewind-instance".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.trim() == SHOW {
                    on_show();
                }
            }
        })
}

/// Removes the socket as the first window (or tray) ends.
pub fn release(role: Role) {
    let path = socket_path(role);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("could not remove {}: {e}", path.display());
    }
}
