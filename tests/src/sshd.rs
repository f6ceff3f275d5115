//! A real OpenSSH server on loopback, so tests reach the local libvirt daemon the way Rewind
//! reaches another host: `qemu+ssh://root@127.0.0.1:PORT/system` (libvirt runs
//! `virt-ssh-helper` on the far side).
//!
//! Everything lives in a scratch folder: host and client keys made with `ssh-keygen`, a
//! test-only `sshd_config` (loopback, a free port, keys only), the `known_hosts` the harness
//! fills with the host key, and sshd's log. The server is killed on drop, also when the test
//! panics; its command line names the scratch folder, so `leak-check` finds it if a killed
//! test run leaves it, and the next [`Sshd::start`] removes servers of dead test processes.
//!
//! libvirt's `ssh` transport ignores the URI's `known_hosts` parameter (only the `libssh`
//! and `libssh2` transports read it) and runs the plain `ssh` command, which would consult
//! root's own `~/.ssh`. [`Sshd::libvirt_uri`] therefore names, with `command=`, a small script
//! in the scratch folder that runs `ssh` with this server's `known_hosts` and no user
//! configuration: host keys are verified, nothing outside the scratch folder is read or
//! written. [`Sshd::libssh_uri`] gives the same server through libvirt's `libssh` transport.
//!
//! Remote stores (`ssh://…`) go through the `ssh` command too, which Rewind points at an
//! `ssh_config` file with `REWIND_SSH_CONFIG`: [`Sshd::write_ssh_config`] writes one whose
//! Host alias reaches this server with this folder's key and `known_hosts`, and SFTP is
//! served by sshd's own `internal-sftp`.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::scratch::{self, ScratchDir};

/// OpenSSH's server (package openssh-server, which `./x test` installs). sshd re-executes
/// itself per connection and insists on an absolute path.
const SSHD: &str = "/usr/sbin/sshd";

/// sshd's privilege-separation folder, which its init script normally creates.
const PRIVSEP_DIR: &str = "/run/sshd";

/// How long sshd may take to accept connections after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running test sshd on `127.0.0.1`.
#[derive(Debug)]
pub struct Sshd {
    port: u16,
    child: Option<Child>,
    // Dropped last: the folder goes after the server.
    dir: ScratchDir,
}

impl Sshd {
    /// Generates keys, writes the configuration and starts sshd on a free loopback port;
    /// returns once it accepts connections.
    pub fn start() -> Result<Self, HarnessError> {
        if !Path::new(SSHD).exists() {
            return Err(HarnessError(format!(
                "{SSHD} is missing: install openssh-server (`./x test` does)"
            )));
        }
        sweep_stale_servers();
        let dir = ScratchDir::new("sshd")?;
        keygen(&dir.path().join("host_ed25519"), "rewind-test-host")?;
        keygen(&dir.path().join("client_ed25519"), "rewind-test-client")?;
        let client_pub = dir.path().join("client_ed25519.pub");
        fs::copy(&client_pub, dir.path().join("authorized_keys"))
            .map_err(|e| HarnessError::io("copy", &client_pub, &e))?;
        write_ssh_command(dir.path())?;
        let mut sshd = Self {
            port: 0,
            child: None,
            dir,
        };
        // A free port can be taken by someone else between finding and binding it: retry.
        let mut last_error = None;
        for _ in 0..5 {
            sshd.port = free_port()?;
            sshd.write_config()?;
            match sshd.spawn() {
                Ok(()) => return Ok(sshd),
                Err(e) if sshd.log().contains("Address already in use") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("five attempts were made"))
    }

    /// The port sshd listens on (on 127.0.0.1).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The scratch folder with keys, configuration and log.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client's private key (authorized for root).
    #[must_use]
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// The `known_hosts` file that holds this server's host key.
    #[must_use]
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The local libvirt daemon as another host, through this sshd and OpenSSH's `ssh`:
    /// `qemu+ssh://root@127.0.0.1:PORT/system?keyfile=...&command=...` (see the module
    /// documentation for why `command` instead of `known_hosts`).
    #[must_use]
    pub fn libvirt_uri(&self) -> String {
        format!(
            "qemu+ssh://root@127.0.0.1:{}/system?keyfile={}&command={}",
            self.port,
            self.client_key().display(),
            self.dir.path().join("ssh-command").display()
        )
    }

    /// The same through libvirt's built-in libssh client, which reads `known_hosts` itself:
    /// `qemu+libssh://root@127.0.0.1:PORT/system?keyfile=...&known_hosts=...&sshauth=privkey`.
    #[must_use]
    pub fn libssh_uri(&self) -> String {
        format!(
            "qemu+libssh://root@127.0.0.1:{}/system?keyfile={}&known_hosts={}&sshauth=privkey",
            self.port,
            self.client_key().display(),
            self.known_hosts().display()
        )
    }

    /// Writes an `ssh_config` file (for `ssh -F`, or Rewind's `REWIND_SSH_CONFIG`) in which
    /// Host `alias` is this server as root, with this folder's client key and `known_hosts`,
    /// strict host-key checking and no prompts; returns its path. `known_hosts` replaces
    /// the server's own `known_hosts` file when given (e.g. an empty one, to see an unknown
    /// host refused).
    pub fn write_ssh_config(
        &self,
        alias: &str,
        known_hosts: Option<&Path>,
    ) -> Result<PathBuf, HarnessError> {
        let known = known_hosts.map_or_else(|| self.known_hosts(), Path::to_path_buf);
        let config = format!(
            "# Test-only: Host {alias} is the test sshd of {dir}.\n\
             Host {alias}\n\
             \x20 HostName 127.0.0.1\n\
             \x20 Port {port}\n\
             \x20 User root\n\
             \x20 IdentityFile {key}\n\
             \x20 IdentitiesOnly yes\n\
             \x20 UserKnownHostsFile {known}\n\
             \x20 GlobalKnownHostsFile /dev/null\n\
             \x20 StrictHostKeyChecking yes\n\
             \x20 BatchMode yes\n\
             \x20 ConnectTimeout 10\n",
            dir = self.dir.path().display(),
            port = self.port,
            key = self.client_key().display(),
            known = known.display(),
        );
        let path = self.dir.path().join(format!("ssh_config-{alias}"));
        write(&path, config.as_bytes())?;
        Ok(path)
    }

    /// Whether the server process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server and every session it serves (each connection's sshd processes and
    /// what runs in them, e.g. `virt-ssh-helper`): open connections break at once, like a
    /// network cut. Nothing happens if it is not running.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Stop the listener and then its descendants before killing any, so none can fork
        // meanwhile or be re-parented out of reach (sessions outlive their listener).
        let root = child.id();
        signal("STOP", &[root]);
        let mut tree = vec![root];
        loop {
            let new: Vec<u32> = descendants(&tree)
                .into_iter()
                .filter(|p| !tree.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            signal("STOP", &new);
            tree.extend(new);
        }
        signal("KILL", &tree);
        drop(child.kill());
        drop(child.wait());
    }

    /// Starts the server again after [`Sshd::kill`], on the same port with the same keys;
    /// the same URIs work again.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        // The port may still be held for a moment by connections being torn down.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline && self.log().contains("already in use") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What sshd logged (for failure messages).
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn write_config(&self) -> Result<(), HarnessError> {
        let dir = self.dir.path().display();
        let config = format!(
            "# Test-only sshd for Rewind's remote-host tests: loopback, keys from this folder.\n\
             ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {dir}/host_ed25519\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             StrictModes no\n\
             UsePAM no\n\
             UseDNS no\n\
             PrintMotd no\n\
             X11Forwarding no\n\
             MaxStartups 50\n\
             Subsystem sftp internal-sftp\n",
            port = self.port
        );
        write(&self.dir.path().join("sshd_config"), config.as_bytes())?;
        let host_pub = self.dir.path().join("host_ed25519.pub");
        let key =
            fs::read_to_string(&host_pub).map_err(|e| HarnessError::io("read", &host_pub, &e))?;
        // `ssh` looks a non-standard port up as `[host]:port`.
        let mut known = String::new();
        writeln!(known, "[127.0.0.1]:{} {}", self.port, key.trim())
            .expect("writing to a String cannot fail");
        write(&self.known_hosts(), known.as_bytes())
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        if !Path::new(PRIVSEP_DIR).is_dir() {
            fs::create_dir_all(PRIVSEP_DIR)
                .and_then(|()| fs::set_permissions(PRIVSEP_DIR, fs::Permissions::from_mode(0o755)))
                .map_err(|e| HarnessError::io("create", Path::new(PRIVSEP_DIR), &e))?;
        }
        let log = self.dir.path().join("sshd.log");
        drop(fs::remove_file(&log));
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError(format!("could not run {SSHD}: {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(HarnessError(format!(
                    "the test sshd exited with {status} before it accepted connections; its \
                     log:\n{}",
                    self.log()
                )));
            }
            if banner_answers(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(HarnessError(format!(
                    "the test sshd does not answer on 127.0.0.1:{} after {START_TIMEOUT:?}; its \
                     log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The script libvirt runs instead of `ssh` (`command=` in the URI): OpenSSH's client with
/// this folder's `known_hosts`, strict host-key checking, no user configuration and no
/// prompts. Its command line names the scratch folder, which lets `leak-check` find it.
fn write_ssh_command(dir: &Path) -> Result<(), HarnessError> {
    let known_hosts = dir.join("known_hosts");
    let script = format!(
        "#!/bin/sh\n\
         # Test-only: ssh for libvirt's qemu+ssh transport, verifying the test sshd's host key.\n\
         exec ssh -F /dev/null -o UserKnownHostsFile='{}' -o GlobalKnownHostsFile=/dev/null \
         -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 \"$@\"\n",
        known_hosts.display()
    );
    let path = dir.join("ssh-command");
    write(&path, script.as_bytes())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .map_err(|e| HarnessError::io("make executable", &path, &e))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), HarnessError> {
    fs::write(path, bytes).map_err(|e| HarnessError::io("write", path, &e))
}

fn keygen(path: &Path, comment: &str) -> Result<(), HarnessError> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            HarnessError(format!(
                "could not run ssh-keygen: {e}; install openssh-client (`./x test` does)"
            ))
        })?;
    if !out.status.success() {
        return Err(HarnessError(format!(
            "ssh-keygen could not make {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| HarnessError(format!("could not find a free loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError(format!("could not find a free loopback port: {e}")))
}

/// Whether an SSH server greets on this loopback port.
fn banner_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    drop(stream.set_read_timeout(Some(Duration::from_secs(2))));
    let mut greeting = [0u8; 8];
    stream.read_exact(&mut greeting).is_ok() && greeting.starts_with(b"SSH-2.0-")
}

fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    drop(
        Command::new("kill")
            .arg(format!("-{name}"))
            .args(pids.iter().map(u32::to_string))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status(),
    );
}

/// Processes whose parent is in `parents`.
fn descendants(parents: &[u32]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_pid(pid).is_some_and(|p| parents.contains(&p)))
        .collect()
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the `(comm)`, which may hold
/// spaces and parentheses itself).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Kills test sshds (and their sessions) whose test process has died: a test killed with
/// SIGKILL cannot run its destructors.
fn sweep_stale_servers() {
    let root = scratch::root().to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(SSHD) {
            continue;
        }
        let Some(at) = cmdline.find(&format!("{root}/")) else {
            continue;
        };
        let folder = cmdline[at + root.len() + 1..]
            .split('/')
            .next()
            .unwrap_or_default();
        if folder.ends_with("-sshd")
            && let Some(owner) = scratch::owner_pid(folder)
            && !scratch::pid_alive(owner)
        {
            let mut tree = vec![pid];
            tree.extend(descendants(&tree));
            signal("KILL", &tree);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_reads_past_odd_command_names() {
        let me = std::process::id();
        let parent = parent_pid(me).expect("our own stat is readable");
        assert!(parent > 0);
        assert!(descendants(&[parent]).contains(&me));
    }
}
