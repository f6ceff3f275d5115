//! The protection service's own SSH identity: a key pair and a `known_hosts` file of its
//! own, in its configuration folder (`/etc/rewind/ssh/`), so that stores on another host
//! need no key from anyone's home. The window shows the public key to put in the host's
//! `authorized_keys`; the first connection to a host shows that host's key fingerprint,
//! and only once the user confirms it is the key pinned (written to this `known_hosts`).
//! ssh then checks it strictly: a changed key is refused.
//!
//! The key is made with OpenSSH's `ssh-keygen` (Ed25519, no passphrase: the service logs in
//! unattended; the file is root's alone, mode 0600). An `ssh_config` written beside it
//! makes `ssh` use only this key and this `known_hosts` ([`for_stores`] gives it to every
//! store location that names no other, see [`crate::store::Location::parse`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The service's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `ssh_config` file that uses it (`ssh -F`).
    pub config: PathBuf,
    /// The pinned host keys.
    pub known_hosts: PathBuf,
    /// The public key, one `authorized_keys` line.
    pub public_key: String,
}

/// A host's key as first seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostKey {
    /// Its `known_hosts` line (`[host]:port type base64`).
    pub line: String,
    /// `SHA256:…`, as `ssh-keygen -lf` and `ssh` show it.
    pub fingerprint: String,
    /// `ED25519`, `RSA`, `ECDSA`.
    pub kind: String,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// An OpenSSH program is not there or could not be started.
    #[error(
        "could not run {program} ({detail}); install OpenSSH's client (package openssh-client)"
    )]
    Missing {
        /// Which.
        program: &'static str,
        /// Why.
        detail: String,
    },
    /// An OpenSSH program ran and failed.
    #[error("{program} failed: {detail}")]
    Program {
        /// Which.
        program: &'static str,
        /// What it said.
        detail: String,
    },
    /// A file could not be written or read.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `known_hosts` line that is not one.
    #[error("{0:?} is not a host key line (`host type key`): nothing was trusted")]
    BadLine(String),
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn run(program: &'static str, cmd: &mut Command) -> Result<String, IdentityError> {
    let out = cmd.output().map_err(|e| IdentityError::Missing {
        program,
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(IdentityError::Program {
            program,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the identity in `dir` if it is not there (the key is never replaced), and writes
/// its `ssh_config`.
///
/// # Errors
/// `ssh-keygen` is missing or failed, or a file could not be written.
pub fn ensure(dir: &Path) -> Result<Identity, IdentityError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("make private", dir))?;
    let key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !key.exists() || !public.exists() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "localhost".to_owned(), |h| h.trim().to_owned());
        // Half a pair (a start cut short): ssh-keygen makes both anew.
        for half in [&key, &public] {
            if let Err(e) = std::fs::remove_file(half)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(io("remove", half)(e));
            }
        }
        run(
            "ssh-keygen",
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C"])
                .arg(format!("rewind-service@{host}"))
                .arg("-f")
                .arg(&key),
        )?;
    }
    let known_hosts = dir.join("known_hosts");
    if !known_hosts.exists() {
        crate::atomic_file::write(&known_hosts, b"", 0o600).map_err(io("write", &known_hosts))?;
    }
    let config = dir.join("ssh_config");
    let text = format!(
        "# Rewind's protection service logs in to stores on other hosts with this key and\n\
         # these pinned host keys only. Written by Rewind at each start: changes are lost.\n\
         Host *\n\
         \x20 IdentityFile {key}\n\
         \x20 IdentitiesOnly yes\n\
         \x20 UserKnownHostsFile {known}\n\
         \x20 GlobalKnownHostsFile /dev/null\n\
         \x20 StrictHostKeyChecking yes\n\
         \x20 BatchMode yes\n",
        key = key.display(),
        known = known_hosts.display(),
    );
    crate::atomic_file::write(&config, text.as_bytes(), 0o600).map_err(io("write", &config))?;
    let public_key = std::fs::read_to_string(&public)
        .map_err(io("read", &public))?
        .trim()
        .to_owned();
    Ok(Identity {
        config,
        known_hosts,
        public_key,
    })
}

static IN_USE: OnceLock<Identity> = OnceLock::new();

/// Makes `identity` the one every store location without an `ssh_config` of its own uses
/// (the service calls this once as it starts). Later calls change nothing.
pub fn use_for_stores(identity: Identity) {
    if IN_USE.set(identity).is_err() {
        tracing::debug!("an SSH identity is in use already");
    }
}

/// The identity in use, if the service set one.
#[must_use]
pub fn in_use() -> Option<&'static Identity> {
    IN_USE.get()
}

/// The `ssh_config` of the identity in use, for [`crate::store::Location::parse`].
#[must_use]
pub fn for_stores() -> Option<PathBuf> {
    IN_USE.get().map(|i| i.config.clone())
}

/// The `known_hosts` file a trusted host key goes to: the identity's, else the user's own
/// (`~/.ssh/known_hosts`, which their `ssh` reads).
#[must_use]
pub fn known_hosts_for_stores() -> Option<PathBuf> {
    IN_USE.get().map_or_else(
        || directories::BaseDirs::new().map(|d| d.home_dir().join(".ssh/known_hosts")),
        |i| Some(i.known_hosts.clone()),
    )
}

/// The keys `host` presents on `port` (22 when `None`), as `ssh-keyscan` sees them, with
/// their fingerprints.
///
/// # Errors
/// The host did not answer, or the programs are missing.
pub fn scan(host: &str, port: Option<u16>) -> Result<Vec<HostKey>, IdentityError> {
    let port = port.unwrap_or(22).to_string();
    let lines = run(
        "ssh-keyscan",
        Command::new("ssh-keyscan").args(["-T", "10", "-p", &port, "--", host]),
    )?;
    let mut keys = Vec::new();
    for line in lines
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some(fingerprint) = fingerprint_of(line)? else {
            continue;
        };
        let (fingerprint, kind) = fingerprint;
        keys.push(HostKey {
            line: line.trim().to_owned(),
            fingerprint,
            kind,
        });
    }
    if keys.is_empty() {
        return Err(IdentityError::Program {
            program: "ssh-keyscan",
            detail: format!(
                "{host} port {port} presented no key: check that an SSH server runs there and \
                 that the address and port are right"
            ),
        });
    }
    Ok(keys)
}

/// `(SHA256:…, ED25519)` of a `known_hosts` line, by `ssh-keygen -lf`.
fn fingerprint_of(line: &str) -> Result<Option<(String, String)>, IdentityError> {
    let dir = tempfile::tempdir().map_err(io("create", Path::new("a temporary folder")))?;
    let file = dir.path().join("key");
    std::fs::write(&file, line).map_err(io("write", &file))?;
    let out = run(
        "ssh-keygen",
        Command::new("ssh-keygen").arg("-lf").arg(&file),
    )?;
    // `256 SHA256:abc… [127.0.0.1]:2222 (ED25519)`
    let fields: Vec<&str> = out.split_whitespace().collect();
    Ok(match (fields.get(1), fields.last()) {
        (Some(fp), Some(kind)) => Some((
            (*fp).to_owned(),
            kind.trim_matches(|c| c == '(' || c == ')').to_owned(),
        )),
        _ => None,
    })
}

/// Pins `line` (a [`HostKey::line`] the user confirmed) in `known_hosts`, once.
///
/// # Errors
/// It is not a host key line, or the file could not be written.
pub fn trust(known_hosts: &Path, line: &str) -> Result<(), IdentityError> {
    let line = line.trim();
    if line.contains(['\n', '\r']) || line.split_whitespace().count() != 3 {
        return Err(IdentityError::BadLine(line.to_owned()));
    }
    let mut text = std::fs::read_to_string(known_hosts).unwrap_or_default();
    if text.lines().any(|l| l.trim() == line) {
        return Ok(());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    if let Some(dir) = known_hosts.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    crate::atomic_file::write(known_hosts, text.as_bytes(), 0o600).map_err(io("write", known_hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("ssh");
        let first = ensure(&ssh).unwrap();
        assert!(first.public_key.starts_with("ssh-ed25519 "), "{first:?}");
        assert!(first.public_key.contains("rewind-service@"), "{first:?}");
        let config = std::fs::read_to_string(&first.config).unwrap();
        assert!(config.contains("IdentitiesOnly yes"), "{config}");
        assert!(config.contains(&first.known_hosts.display().to_string()));
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&ssh), 0o700);
        assert_eq!(mode(&ssh.join("id_ed25519")), 0o600);
        // A second start keeps the key the hosts already know.
        assert_eq!(ensure(&ssh).unwrap(), first);
    }

    #[test]
    fn a_trusted_key_is_pinned_once_and_a_bad_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let known = dir.path().join("known_hosts");
        let line = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH";
        trust(&known, line).unwrap();
        trust(&known, &format!("{line}\n")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&known).unwrap(),
            format!("{line}\n")
        );
        for bad in ["", "host key", "a b c\nd e f", "a b c d"] {
            assert!(
                matches!(trust(&known, bad), Err(IdentityError::BadLine(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(&known).unwrap(),
            format!("{line}\n")
        );
    }

    #[test]
    fn a_fingerprint_is_read_from_a_key_line() {
        let dir = tempfile::tempdir().unwrap();
        let identity = ensure(dir.path()).unwrap();
        let line = format!("[127.0.0.1]:2222 {}", identity.public_key);
        let line: Vec<&str> = line.split_whitespace().take(3).collect();
        let (fingerprint, kind) = fingerprint_of(&line.join(" ")).unwrap().unwrap();
        assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        assert_eq!(kind, "ED25519");
    }
}
