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

impl Drop for TestUser {
    fn drop(&mut self) {
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
