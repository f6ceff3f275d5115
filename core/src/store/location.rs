//! Where a store lives: a folder on this machine, or a folder on another host reached over
//! SSH (`ssh://[user@]host[:port]/path`). The store format is the same in both places.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use super::error::StoreError;

/// A store's place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A folder on this machine (a removable drive, a local disk, a mounted share).
    Local(PathBuf),
    /// A folder on another host, reached with the user's own `ssh` (its config, agent, keys
    /// and `known_hosts`).
    Ssh(SshLocation),
}

/// `ssh://[user@]host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshLocation {
    /// The login name; `None` leaves it to the ssh configuration.
    pub user: Option<String>,
    /// Host name, address or `~/.ssh/config` alias (IPv6 addresses without brackets).
    pub host: String,
    /// The port; `None` leaves it to the ssh configuration (22 by default).
    pub port: Option<u16>,
    /// The store's folder on that host: absolute, without a trailing `/`.
    pub path: PathBuf,
    /// An `ssh_config` file to use instead of `~/.ssh/config` (`ssh -F`). [`Location::parse`]
    /// takes it from the `REWIND_SSH_CONFIG` environment variable (tests and unusual
    /// setups), else from the protection service's own identity
    /// ([`crate::ssh_identity::for_stores`]); it is not part of the location's text.
    pub ssh_config: Option<PathBuf>,
}

const SCHEME: &str = "ssh://";

impl Location {
    /// Parses a store location: `ssh://[user@]host[:port]/absolute/path`, or else a folder
    /// path on this machine.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::BadLocation {
            input: text.to_owned(),
            why,
        };
        if text.is_empty() {
            return Err(bad("it is empty; give a folder or ssh://host/folder".into()));
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            if let Some(example) = scp_like(text) {
                return Err(bad(format!(
                    "it looks like an scp-style remote path; for a store on another host write \
                     {example} (or ./{text} for a local folder of that name)"
                )));
            }
            return Ok(Self::Local(PathBuf::from(text)));
        };
        if !scheme.eq_ignore_ascii_case("ssh") {
            return Err(bad(format!(
                "{scheme}:// is not a kind of store location Rewind knows; use a folder path or \
                 ssh://[user@]host[:port]/path"
            )));
        }
        if rest.contains(['?', '#']) {
            return Err(bad(
                "an ssh:// location has no query or fragment (? or #); put options such as \
                 the key or port in ~/.ssh/config"
                    .into(),
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host_port)) => {
                if user.is_empty() {
                    return Err(bad("the user name before @ is empty".into()));
                }
                if user.contains([':', ' ']) {
                    return Err(bad(
                        "the user name holds a ':' or space; passwords do not belong in the \
                         location (use keys or an ssh agent)"
                            .into(),
                    ));
                }
                (Some(user.to_owned()), host_port)
            }
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).map_err(|e| bad(e.to_string()))?;
        if path.is_empty() || path == "/" {
            return Err(bad(format!(
                "it names no folder on the host; give the store's absolute path, e.g. \
                 ssh://{authority}/srv/rewind"
            )));
        }
        if path.starts_with("/~") {
            return Err(bad(format!(
                "the path must be absolute (/home/me/rewind), not relative to the home folder \
                 ({path})"
            )));
        }
        if path
            .split('/')
            .any(|component| component == "." || component == "..")
        {
            return Err(bad(format!(
                "the path must not hold . or .. components ({path})"
            )));
        }
        let trimmed = path.trim_end_matches('/');
        let mut clean = String::with_capacity(trimmed.len());
        for part in trimmed.split('/').filter(|p| !p.is_empty()) {
            clean.push('/');
            clean.push_str(part);
        }
        Ok(Self::Ssh(SshLocation {
            user,
            host,
            port,
            path: PathBuf::from(clean),
            ssh_config: std::env::var_os(super::sftp::SSH_CONFIG_ENV)
                .filter(|c| !c.is_empty())
                .map(PathBuf::from)
                .or_else(crate::ssh_identity::for_stores),
        }))
    }

    /// The local folder, if the store is on this machine.
    #[must_use]
    pub fn as_local(&self) -> Option<&Path> {
        match self {
            Self::Local(path) => Some(path),
            Self::Ssh(_) => None,
        }
    }

    /// Whether the store is on another host.
    #[must_use]
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Ssh(_))
    }

    /// How the store's files are named in messages: the folder itself, or
    /// `ssh://user@host:port/path` for a remote one (as a path, so that file names can be
    /// joined to it).
    #[must_use]
    pub fn display_path(&self) -> PathBuf {
        match self {
            Self::Local(path) => path.clone(),
            Self::Ssh(_) => PathBuf::from(self.to_string()),
        }
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Self::Local(path.to_path_buf())
    }
}

impl SshLocation {
    /// `[user@]host` as `ssh` takes it on its command line.
    #[must_use]
    pub fn destination(&self) -> String {
        match &self.user {
            Some(user) => format!("{user}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The command that connects as Rewind does, for messages (`ssh -p 2222 me@host`).
    #[must_use]
    pub fn ssh_command(&self) -> String {
        let mut command = String::from("ssh");
        if let Some(config) = &self.ssh_config {
            write!(command, " -F {}", config.display()).expect("writing to a String cannot fail");
        }
        if let Some(port) = self.port {
            write!(command, " -p {port}").expect("writing to a String cannot fail");
        }
        command.push(' ');
        command.push_str(&self.destination());
        command
    }
}

impl fmt::Display for SshLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SCHEME)?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write!(f, "{}", self.path.display())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::Ssh(ssh) => ssh.fmt(f),
        }
    }
}

/// What is wrong with the `host[:port]` part of an `ssh://` location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum HostPortError {
    #[error("an IPv6 address opened with [ is not closed with ]")]
    Unclosed,
    #[error("unexpected {0:?} after the IPv6 address")]
    AfterV6(String),
    #[error("an IPv6 address must be written in brackets: ssh://[::1]/path")]
    BareV6,
    #[error("it names no host; write ssh://[user@]host[:port]/path")]
    NoHost,
    #[error("{0:?} is not a host name")]
    BadHost(String),
    #[error("{0:?} is not a port number (1 to 65535)")]
    BadPort(String),
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str) -> Result<(String, Option<u16>), HostPortError> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(HostPortError::Unclosed);
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(HostPortError::AfterV6(after.to_owned())),
            },
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            Some(_) => return Err(HostPortError::BareV6),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(HostPortError::NoHost);
    }
    if host.starts_with('-') || host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(HostPortError::BadHost(host.to_owned()));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(HostPortError::BadPort(p.to_owned())),
        },
    };
    Ok((host.to_owned(), port))
}

/// `host:/path` or `user@host:path` (what scp takes) is most likely meant as a remote
/// location: the `ssh://` form it stands for.
fn scp_like(text: &str) -> Option<String> {
    let (before, after) = text.split_once(':')?;
    if before.is_empty() || before.contains('/') || after.starts_with("//") {
        return None;
    }
    let path = if after.starts_with('/') {
        after.to_owned()
    } else {
        format!("/ABSOLUTE/PATH/{after}")
    };
    Some(format!("ssh://{before}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(text: &str) -> SshLocation {
        match Location::parse(text) {
            Ok(Location::Ssh(s)) => s,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn refused(text: &str, words: &[&str]) {
        let err = Location::parse(text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::BadLocation { .. }), "{msg}");
        assert!(msg.contains(text), "the message names the input: {msg}");
        for w in words {
            assert!(msg.contains(w), "{text}: {msg} should mention {w:?}");
        }
    }

    #[test]
    fn folders_stay_folders() {
        for text in [
            "/media/me/backup",
            "backup",
            "./a:b",
            "rel/x:y",
            "/srv/with space",
        ] {
            assert_eq!(
                Location::parse(text).unwrap(),
                Location::Local(PathBuf::from(text))
            );
            assert_eq!(Location::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn ssh_forms() {
        let s = ssh("ssh://me@host.example:2222/srv/rewind");
        assert_eq!(s.user.as_deref(), Some("me"));
        assert_eq!(s.host, "host.example");
        assert_eq!(s.port, Some(2222));
        assert_eq!(s.path, Path::new("/srv/rewind"));
        assert_eq!(s.destination(), "me@host.example");

        let s = ssh("ssh://backup-box/data/rewind/");
        assert_eq!((s.user, s.port), (None, None));
        assert_eq!(s.path, Path::new("/data/rewind"), "trailing slash dropped");

        let s = ssh("SSH://[::1]:22/x//y");
        assert_eq!(s.host, "::1");
        assert_eq!(s.port, Some(22));
        assert_eq!(s.path, Path::new("/x/y"));

        let s = ssh("ssh://a@b@host/p");
        assert_eq!(s.user.as_deref(), Some("a@b"), "the last @ ends the user");
    }

    #[test]
    fn display_gives_the_users_form_back() {
        for text in [
            "ssh://me@host:2222/srv/rewind",
            "ssh://host/srv/rewind",
            "ssh://[fe80::1]:2200/r",
            "ssh://root@127.0.0.1/var/tmp/s",
        ] {
            let loc = Location::parse(text).unwrap();
            assert_eq!(loc.to_string(), text);
            assert_eq!(loc.display_path(), PathBuf::from(text));
            assert_eq!(Location::parse(&loc.to_string()).unwrap(), loc);
        }
        assert_eq!(
            Location::parse("ssh://h/a/b/")
                .unwrap()
                .display_path()
                .join("chunks"),
            PathBuf::from("ssh://h/a/b/chunks")
        );
    }

    #[test]
    fn malformed_locations_say_what_is_wrong() {
        refused("ssh://host", &["absolute path", "ssh://host/srv/rewind"]);
        refused("ssh://host/", &["absolute path"]);
        refused("ssh://me@host/~/rewind", &["absolute"]);
        refused("ssh:///srv/rewind", &["no host"]);
        refused("ssh://@host/srv", &["user name"]);
        refused("ssh://me:secret@host/srv", &["password"]);
        refused("ssh://host:0/srv", &["port"]);
        refused("ssh://host:70000/srv", &["port"]);
        refused("ssh://host:ab/srv", &["port"]);
        refused("ssh://::1/srv", &["brackets"]);
        refused("ssh://[::1/srv", &["]"]);
        refused("ssh://host/srv/../etc", &[".."]);
        refused("ssh://host/srv?key=x", &["query"]);
        refused("sftp://host/srv", &["sftp://", "ssh://"]);
        refused("me@host:/srv/rewind", &["ssh://me@host/srv/rewind"]);
        refused("host:rewind", &["ssh://host/ABSOLUTE/PATH/rewind"]);
        refused("", &[]);
    }
}
