//! Reaching the host: the system `ssh` with its configuration and agent, then the SFTP
//! subsystem, and errors that say what to do.

use super::{
    ALIVE_INTERVAL, CONNECT_TIMEOUT, ControlPersist, Duration, KnownHosts, NonZeroUsize, PathBuf,
    SessionBuilder, Sftp, SftpOptions, SshLocation, StoreError, io,
};

/// Folder for the ssh control sockets: a private folder in Rewind's runtime folder
/// ([`crate::paths::runtime_dir`]), else the temporary folder (where `openssh` makes a
/// private folder of its own, under a random name).
pub(super) fn control_dir() -> PathBuf {
    crate::paths::runtime_dir()
        .map(|run| run.join("ssh"))
        .and_then(|dir| crate::paths::private_dir(&dir, 0o700).map(|()| dir))
        .unwrap_or_else(|e| {
            tracing::warn!("ssh's control socket goes to the temporary folder: {e}");
            std::env::temp_dir()
        })
}

/// ssh's message in one line, without its banners.
pub(super) fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@') && !l.starts_with("Warning: Permanently"))
        .collect();
    let joined = lines.join("; ");
    if joined.is_empty() {
        "ssh gave no reason".into()
    } else {
        joined
    }
}

/// Turns a failed `ssh` start into the error that says what to do.
pub(super) fn connect_error(location: &SshLocation, e: &openssh::Error) -> StoreError {
    let place = location.to_string();
    let (kind, text) = match e {
        openssh::Error::Connect(io) => (io.kind(), io.to_string()),
        other => (io::ErrorKind::Other, format!("{other}")),
    };
    if kind == io::ErrorKind::NotFound && !text.contains(' ') {
        return StoreError::Ssh {
            location: place,
            detail: format!(
                "the `ssh` program could not be run ({text}); install OpenSSH's client \
                 (package openssh-client)"
            ),
        };
    }
    let lower = text.to_lowercase();
    if lower.contains("host key verification failed")
        || lower.contains("host identification has changed")
        || lower.contains("host key is known")
        || lower.contains("host key for")
    {
        let changed = lower.contains("changed");
        let detail = if changed {
            "its key has changed since it was accepted".to_owned()
        } else {
            "its key is not in known_hosts".to_owned()
        };
        return StoreError::HostKey {
            location: place,
            host: location.host.clone(),
            detail,
            accept: location.ssh_command(),
            changed,
        };
    }
    if kind == io::ErrorKind::PermissionDenied || lower.contains("permission denied") {
        return StoreError::Login {
            location: place,
            host: location.host.clone(),
            detail: one_line(&text),
            command: location.ssh_command(),
        };
    }
    let network = [
        "connection refused",
        "timed out",
        "no route to host",
        "network is unreachable",
        "could not resolve",
        "connection closed",
        "connection reset",
        "kex_exchange_identification",
        "banner exchange",
        "broken pipe",
    ];
    if matches!(
        kind,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
    ) || network.iter().any(|n| lower.contains(n))
    {
        return StoreError::Unreachable {
            location: place,
            detail: one_line(&text),
        };
    }
    StoreError::Ssh {
        location: place,
        detail: one_line(&text),
    }
}

/// Connects, starts SFTP and checks the extensions the store needs.
pub(super) async fn open_sftp(location: SshLocation) -> Result<Sftp, StoreError> {
    let mut builder = SessionBuilder::default();
    builder
        .known_hosts_check(KnownHosts::Strict)
        .connect_timeout(CONNECT_TIMEOUT)
        .server_alive_interval(ALIVE_INTERVAL)
        // The master ends by itself a minute after its last session, also when Rewind was
        // killed and could not close it.
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(60).expect("not zero"),
        ))
        .control_directory(control_dir());
    if let Some(user) = &location.user {
        builder.user(user.clone());
    }
    if let Some(port) = location.port {
        builder.port(port);
    }
    if let Some(config) = &location.ssh_config {
        builder.config_file(config);
    }
    let session = builder
        .connect_mux(&location.host)
        .await
        .map_err(|e| connect_error(&location, &e))?;
    let options = SftpOptions::new()
        // Send each request as soon as it is made: latency matters more here than
        // batching, and the store keeps several requests in flight anyway.
        .flush_interval(Duration::ZERO);
    let sftp = Sftp::from_session(session, options)
        .await
        .map_err(|e| StoreError::Ssh {
            location: location.to_string(),
            detail: format!(
                "the host's SFTP server did not start ({e}); check that sshd has an sftp \
                 Subsystem"
            ),
        })?;
    let mut missing = Vec::new();
    if !sftp.support_posix_rename() {
        missing.push("posix-rename@openssh.com (atomic renames)");
    }
    if !sftp.support_fsync() {
        missing.push("fsync@openssh.com (durable writes)");
    }
    if !missing.is_empty() {
        // The missing features are the error to report.
        drop(sftp.close().await);
        return Err(StoreError::ServerUnsupported {
            location: location.to_string(),
            missing: missing.join(" and "),
        });
    }
    Ok(sftp)
}
