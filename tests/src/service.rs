//! Rewind's protection service for a test: `rewind service` (the system unit's `ExecStart`)
//! started by hand, as root, with its socket, configuration and state in a scratch folder;
//! stopped with SIGTERM (as systemd stops it) when dropped, also when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::HarnessError;

/// A running service.
#[derive(Debug)]
pub struct TestService {
    child: Child,
    socket: PathBuf,
    config_dir: PathBuf,
    log: PathBuf,
}

impl TestService {
    /// Starts `binary service` with everything of its own under `dir` (which the clients
    /// must be able to reach), and waits for its socket.
    pub fn start(binary: &Path, dir: &Path) -> Result<Self, HarnessError> {
        Self::start_with(binary, dir, &[])
    }

    /// [`TestService::start`] with more environment variables (benchmarks).
    pub fn start_with(
        binary: &Path,
        dir: &Path,
        envs: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let socket = dir.join("rewind.sock");
        let config_dir = dir.join("config");
        let child = Command::new(binary)
            .arg("service")
            .envs(envs.iter().copied())
            .env_remove("LIBVIRT_DEFAULT_URI")
            .env("REWIND_SOCKET", &socket)
            .env("REWIND_CONFIG_DIR", &config_dir)
            .env("REWIND_STATE_DIR", dir.join("state"))
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("service.log"))
                    .map_err(|e| HarnessError::io("create", &dir.join("service.log"), &e))?,
            )
            .spawn()
            .map_err(|e| HarnessError::io("start", binary, &e))?;
        let mut service = Self {
            child,
            socket,
            config_dir,
            log: dir.join("service.log"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&service.socket).is_err() {
            if let Ok(Some(status)) = service.child.try_wait() {
                return Err(HarnessError(format!(
                    "rewind service exited with {status}: {}",
                    std::fs::read_to_string(dir.join("service.log")).unwrap_or_default()
                )));
            }
            if Instant::now() > deadline {
                service.stop();
                return Err(HarnessError(
                    "rewind service did not listen within 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(service)
    }

    /// Its socket (`REWIND_SOCKET` for clients).
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (stderr).
    #[must_use]
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its configuration folder.
    #[must_use]
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Kills it with SIGKILL, as a crash or the OOM killer would (nothing of it runs on:
    /// no cleanup, no goodbye to clients), and reaps it. Then waits (up to 10 s) until its
    /// socket no longer answers: a process it was starting at that moment (between `fork`
    /// and `exec`) holds a copy of the listening socket until it runs its program, and on a
    /// busy machine that lasted long enough for the next service to find the socket taken
    /// (systemd kills the whole unit, those too).
    pub fn kill(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            // Ended (or killed) already: its PID may be another process's by now.
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            drop(
                Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status(),
            );
        }
        let deadline = Instant::now() + Duration::from_mins(2);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.stop();
    }
}
