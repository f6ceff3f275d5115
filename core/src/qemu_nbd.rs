//! `qemu-nbd`, for disk files no VM has open: read-only to capture a shut-off VM, writable
//! to write an exported or restored image (QEMU's own code handles every image format).

use std::path::Path;

/// `qemu-nbd` serving one disk file, read-only or writable; killed when dropped.
pub(crate) struct QemuNbd {
    child: std::process::Child,
}

/// How `qemu-nbd` serves an image.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Access<'a> {
    /// Read-only, optionally exporting a persistent dirty bitmap of the image as the
    /// `qemu:dirty-bitmap:<name>` metadata context (blocks written since it was created).
    ReadOnly {
        /// The bitmap to export.
        bitmap: Option<&'a str>,
    },
    /// Writable; writes of zeros become holes (zero clusters), so restored holes cost no
    /// space. Persistent bitmaps in the image record these writes like a VM's own; one of
    /// them may be exported as for a read-only export.
    Writable {
        /// The bitmap to export.
        bitmap: Option<&'a str>,
    },
}

/// Why `qemu-nbd` did not serve a disk.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QemuNbdError {
    /// It could not be started.
    #[error("could not run qemu-nbd to open {file}: {source}; install it (package qemu-utils)")]
    Spawn {
        /// The image.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ended before serving.
    #[error("could not open disk {file} ({status}): {said}; is a VM using it?")]
    Exited {
        /// The image.
        file: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it said.
        said: String,
    },
    /// It did not serve in time.
    #[error("qemu-nbd did not start serving {file} within 10 s")]
    Slow {
        /// The image.
        file: String,
    },
}

impl QemuNbd {
    /// Serves `file` (format `format`) as export `target` on `socket`. Its lock on the image
    /// (shared when read-only) keeps QEMU from starting a VM on it meanwhile (the start fails
    /// with a lock error).
    pub(crate) fn serve(
        file: &str,
        format: Option<&str>,
        target: &str,
        socket: &Path,
        access: Access<'_>,
    ) -> Result<Self, QemuNbdError> {
        let mut cmd = std::process::Command::new("qemu-nbd");
        let bitmap = match access {
            Access::ReadOnly { bitmap } => {
                cmd.arg("--read-only");
                bitmap
            }
            Access::Writable { bitmap } => {
                cmd.args(["--discard=unmap", "--detect-zeroes=unmap"]);
                bitmap
            }
        };
        if let Some(b) = bitmap {
            cmd.arg(format!("--bitmap={b}"));
        }
        // Not `--persistent`: the server ends when its last client disconnects, so a Rewind
        // killed mid-way does not leave it holding the image's lock. The pid file appears
        // only once the socket listens (qemu-nbd's documented behaviour): the clients must
        // not connect and disconnect before the real work begins.
        let pid_file = socket.with_extension("pid");
        crate::cleanup::remove_file(&pid_file);
        cmd.arg(format!("--pid-file={}", pid_file.display()))
            // One connection per reader, plus the one asking for the allocation map.
            .arg(format!("--shared={}", crate::store::reader_count() + 1))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--export-name={target}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(f) = format {
            cmd.arg(format!("--format={f}"));
        }
        let mut child = cmd
            .arg(file)
            .spawn()
            .map_err(|source| QemuNbdError::Spawn {
                file: file.to_owned(),
                source,
            })?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pid_file.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut said = String::new();
                if let Some(mut err) = child.stderr.take() {
                    // What it said is a courtesy; the exit status is the error.
                    drop(std::io::Read::read_to_string(&mut err, &mut said));
                }
                return Err(QemuNbdError::Exited {
                    file: file.to_owned(),
                    status,
                    said: said.trim().to_owned(),
                });
            }
            if std::time::Instant::now() > deadline {
                // Its end is all that is wanted; an error means it has ended already.
                drop(child.kill());
                drop(child.wait());
                return Err(QemuNbdError::Slow {
                    file: file.to_owned(),
                });
            }
            // qemu-nbd listens within ~10 ms: poll often, every wait here delays a restore.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(Self { child })
    }

    /// Ends a server that no client uses (one kept only for its lock on the image) at once:
    /// SIGTERM, which it handles by closing the image cleanly, then waits for it as
    /// dropping it does. Without a client it would not end by itself.
    pub(crate) fn stop(self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
            tracing::debug!("qemu-nbd did not take SIGTERM (it has ended already?): {e}");
        }
        drop(self);
    }
}

impl Drop for QemuNbd {
    /// qemu-nbd ends by itself once its clients are gone, and it must close the image
    /// cleanly: a writable qcow2 marks its persistent dirty bitmaps in use while open and
    /// stores them on close, so a server killed outright leaves them inconsistent, and the
    /// next checkpoint or restore cannot use them. So: wait for it, then ask it to stop
    /// (SIGTERM, which it handles by closing cleanly), and kill it only if it hangs.
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        let mut asked = false;
        while matches!(self.child.try_wait(), Ok(None)) {
            let waited = started.elapsed();
            if waited > std::time::Duration::from_secs(30) {
                // An error means it has ended already.
                drop(self.child.kill());
                break;
            }
            if !asked && waited > std::time::Duration::from_secs(2) {
                let pid = rustix::process::Pid::from_child(&self.child);
                if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
                    tracing::debug!("qemu-nbd did not take SIGTERM (it has ended already?): {e}");
                }
                asked = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Reaps it; an error means it was reaped already.
        drop(self.child.wait());
    }
}
