//! A private X server (Xvfb) for tests of the window, stopped when dropped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::scratch::ScratchDir;

/// A running Xvfb with its own display number and runtime folder.
#[derive(Debug)]
pub struct Xvfb {
    child: Child,
    display: String,
    dir: ScratchDir,
}

impl Xvfb {
    /// Starts Xvfb on a free display (it picks one and reports it through `-displayfd`),
    /// never resetting between clients.
    pub fn start(width: u32, height: u32) -> Result<Self, HarnessError> {
        let dir = ScratchDir::new("xvfb")?;
        let mut child = Command::new("Xvfb")
            // `-noreset`: an X server resets when its last client leaves (a window a test
            // killed), and while it does, a new client cannot connect ("Failed to open
            // connection to X server": the next window of the same test).
            .args([
                "-displayfd",
                "1",
                "-nolisten",
                "tcp",
                "-noreset",
                "-screen",
                "0",
            ])
            .arg(format!("{width}x{height}x24"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                HarnessError(format!(
                    "could not start Xvfb: {e}; install it with ./x test (package xvfb)"
                ))
            })?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut number = String::new();
        let mut byte = [0u8; 1];
        while stdout
            .read(&mut byte)
            .map_err(|e| HarnessError(e.to_string()))?
            == 1
            && byte[0] != b'\n'
        {
            number.push(char::from(byte[0]));
        }
        if number.trim().is_empty() {
            drop(child.kill());
            drop(child.wait());
            return Err(HarnessError(
                "Xvfb exited without reporting a display".into(),
            ));
        }
        let runtime = dir.path().join("runtime");
        std::fs::create_dir_all(&runtime).map_err(|e| HarnessError::io("create", &runtime, &e))?;
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| HarnessError::io("chmod", &runtime, &e))?;
        Ok(Self {
            child,
            display: format!(":{}", number.trim()),
            dir,
        })
    }

    /// The `DISPLAY` value.
    #[must_use]
    pub fn display(&self) -> &str {
        &self.display
    }

    /// A 0700 folder for `XDG_RUNTIME_DIR` (winit wants one).
    #[must_use]
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    /// A folder for the app's config/data/state (`XDG_*_HOME`), so tests never touch `~`.
    #[must_use]
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Sets `DISPLAY`, `XDG_RUNTIME_DIR` and private XDG homes on `cmd`.
    pub fn configure(&self, cmd: &mut Command) {
        let home = self.home();
        cmd.env("DISPLAY", &self.display)
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_STATE_HOME", home.join("state"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env_remove("WAYLAND_DISPLAY");
    }

    /// Waits for a top-level window whose title contains `title`; returns its X id.
    pub fn wait_window(&self, title: &str, timeout: Duration) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new("xdotool")
                .args(["search", "--onlyvisible", "--name", title])
                .env("DISPLAY", &self.display)
                .output()
                .map_err(|e| {
                    HarnessError(format!(
                        "could not run xdotool: {e}; install it with ./x test"
                    ))
                })?;
            let ids = String::from_utf8_lossy(&out.stdout);
            if let Some(id) = ids.lines().next() {
                return Ok(id.trim().to_owned());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError(format!(
                    "no window titled {title:?} after {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG of the whole screen (`ImageMagick`'s `import`).
    pub fn screenshot(&self, path: &Path) -> Result<(), HarnessError> {
        let status = Command::new("import")
            .args(["-window", "root"])
            .arg(path)
            .env("DISPLAY", &self.display)
            .status()
            .map_err(|e| HarnessError(format!("could not run import: {e}; install imagemagick")))?;
        if !status.success() {
            return Err(HarnessError(format!("import failed with {status}")));
        }
        Ok(())
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}
