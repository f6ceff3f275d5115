//! Mount and unmount events, for finding a backup drive the moment it is plugged in.
//!
//! The kernel flags `/proc/self/mountinfo` with `POLLPRI` (and `POLLERR`) whenever the mount
//! table changes, so a thread that `poll(2)`s it sleeps until something is mounted or
//! unmounted and never wakes up in between. (inotify does not see mounts themselves.) The
//! thread ends when the [`MountWatch`] is dropped: a pipe whose write end it holds is closed,
//! which wakes the `poll`.

use std::io::{Read as _, Seek as _};
use std::os::fd::OwnedFd;

use rustix::event::{PollFd, PollFlags};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Watches the mount table; stops when dropped.
#[derive(Debug)]
pub struct MountWatch {
    /// Closing it wakes the thread, which then ends.
    _stop: OwnedFd,
}

/// Calls `on_change` on a thread of its own (named `name`) each time the mount table
/// changes.
pub fn watch(name: &str, on_change: impl Fn() + Send + 'static) -> std::io::Result<MountWatch> {
    let mut file = std::fs::File::open(MOUNTINFO)?;
    let (stop_read, stop_write) = rustix::pipe::pipe()?;
    let mut last = Vec::new();
    file.read_to_end(&mut last)?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                let mut fds = [
                    PollFd::new(&file, PollFlags::PRI),
                    PollFd::new(&stop_read, PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => {
                        tracing::warn!(
                            "watching {MOUNTINFO} failed, drives are no longer noticed: {e}"
                        );
                        return;
                    }
                }
                if !fds[1].revents().is_empty() {
                    return;
                }
                // Reading the table again clears the flag; only a real change is told.
                let mut now = Vec::new();
                let read = file
                    .rewind()
                    .and_then(|()| file.read_to_end(&mut now).map(drop));
                if let Err(e) = read {
                    tracing::warn!("reading {MOUNTINFO} failed, drives are no longer noticed: {e}");
                    return;
                }
                if now != last {
                    last = now;
                    on_change();
                }
            }
        })?;
    Ok(MountWatch { _stop: stop_write })
}

/// Held by a test of this crate that changes the host's mount table, and by one that must
/// see no change in it.
#[cfg(test)]
pub(crate) static MOUNT_TABLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    #[test]
    fn nothing_wakes_it_until_the_mount_table_changes_and_dropping_it_ends_its_thread() {
        let (tx, rx) = mpsc::channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let watch = watch("test-mounts", move || {
            counted.fetch_add(1, Ordering::Relaxed);
            tx.send(()).ok();
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            calls.load(Ordering::Relaxed),
            0,
            "no wake-up without a change"
        );
        // A real change needs root (mount); ./x test runs as root.
        if rustix::process::geteuid().is_root() {
            // Other tests of this binary watch the mounts too (an idle engine must stay
            // quiet): they do not run while this one changes the mount table.
            let _quiet = MOUNT_TABLE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dir = tempfile::tempdir().unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "rewind-unit-test"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(mounted.success());
            let seen = rx.recv_timeout(Duration::from_secs(10));
            drop(
                std::process::Command::new("umount")
                    .arg(dir.path())
                    .status(),
            );
            assert!(seen.is_ok(), "the mount was noticed");
        }
        drop(watch);
    }
}
