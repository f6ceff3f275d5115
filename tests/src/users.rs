//! Normal users for tests that run Rewind as the home user would: made with `useradd`
//! (in the `libvirt` group or not), commands run as them with `setpriv`, and removed when
//! dropped, also when the test panics. Their names start with `rwt` (the leak check looks
//! for any left behind).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::HarnessError;

/// The prefix of every test user's name.
pub const PREFIX: &str = "rwt";

/// A user that exists while this lives.
#[derive(Debug)]
pub struct TestUser {
    name: String,
}

fn run(cmd: &mut Command, what: &str) -> Result<(), HarnessError> {
    let out = cmd
        .output()
        .map_err(|e| HarnessError(format!("could not run {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl TestUser {
    /// Makes a user (no home folder, no login shell), a member of `libvirt` if `libvirt`.
    pub fn create(libvirt: bool) -> Result<Self, HarnessError> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new("useradd");
        cmd.args(["--no-create-home", "--shell", "/usr/sbin/nologin"]);
        if libvirt {
            cmd.args(["--groups", "libvirt"]);
        }
        run(cmd.arg(&name), &format!("useradd {name}"))?;
        Ok(Self { name })
    }

    /// Its name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes `dir` this user's own (mode 0700).
    pub fn own(&self, dir: &Path) -> Result<(), HarnessError> {
        run(
            Command::new("chown").arg(&self.name).arg(dir),
            &format!("chown {}", dir.display()),
        )?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| HarnessError::io("make private", dir, &e))
    }

    /// `program` as this user (with their groups), with `envs` set (arguments and the rest
    /// to add). `setpriv` execs it as its own process, so the child's PID is the
    /// program's (a test can kill it).
    #[must_use]
    pub fn command(&self, program: &Path, envs: &[(&str, &Path)]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            &self.name,
            "--regid",
            &self.name,
            "--init-groups",
            "--",
        ])
        .arg("env");
        for (key, value) in envs {
            cmd.arg(format!("{key}={}", value.display()));
        }
        cmd.arg(program);
        cmd
    }

    /// `program ARGS...` run as this user, with `envs` set, to completion.
    #[must_use]
    pub fn run(&self, program: &Path, args: &[&str], envs: &[(&str, &Path)]) -> Output {
        self.command(program, envs)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("could not run setpriv: {e}"))
    }
}

/// The user ID of the user called `name`, from the user database.
fn uid_of(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .and_then(|f| f.get(2)?.parse().ok())
}

/// The processes that run as user `uid` (the owner of `/proc/PID` is the process's user).
fn processes_of(uid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let meta = e.metadata().ok()?;
            (std::os::unix::fs::MetadataExt::uid(&meta) == uid).then_some(pid)
        })
        .collect()
}

/// Stops whatever still runs as user `name` (a session bus, an accessibility bus and what
/// they started), and waits until it is gone: `userdel` refuses a user with processes.
/// Politely first, then with SIGKILL.
pub fn stop_processes_of(name: &str) {
    let Some(uid) = uid_of(name) else {
        return;
    };
    for attempt in 0..60 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            return;
        }
        let signal = if attempt < 20 { "-TERM" } else { "-KILL" };
        for pid in pids {
            drop(
                Command::new("kill")
                    .args([signal, &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        stop_processes_of(&self.name);
        if let Err(e) = run(
            Command::new("userdel").arg(&self.name),
            &format!("userdel {}", self.name),
        ) {
            eprintln!("warning: {e}");
        }
    }
}

/// Test users left behind (by a test killed before it could remove them).
#[must_use]
pub fn leftover() -> Vec<String> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|name| {
            name.strip_prefix(PREFIX)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(str::to_owned)
        .collect()
}
