//! Typed errors of `rewind-core`.
//!
//! Every message says what went wrong and what the user can do about it, and names the
//! thing concerned (URI, VM, path) last. [`Error::is_retryable`] tells callers such as the
//! scheduler whether trying again later can help.

use std::path::PathBuf;

/// Result alias for `rewind-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `rewind-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The libvirt daemon's socket is absent or refuses connections.
    #[error(
        "cannot connect to libvirt: the libvirt daemon is not running. Start it with \
         `sudo systemctl start libvirtd` (or `sudo libvirtd -d` where there is no systemd), \
         then try again ({uri}: {detail})"
    )]
    DaemonNotRunning {
        /// The URI that was tried.
        uri: String,
        /// libvirt's own words.
        detail: String,
    },

    /// The daemon runs but refuses this user.
    #[error(
        "cannot connect to libvirt: permission denied. Add your user to the `libvirt` group \
         (`sudo usermod -aG libvirt $USER`) and log in again, or connect to your own \
         session with `--connect qemu:///session` ({uri}: {detail})"
    )]
    PermissionDenied {
        /// The URI that was tried.
        uri: String,
        /// libvirt's own words.
        detail: String,
    },

    /// libvirt does not understand the URI.
    #[error(
        "cannot connect to libvirt: no driver handles this URI. Use a URI such as \
         `qemu:///system`, `qemu:///session` or `qemu+ssh://user@host/system`, and check that \
         the QEMU driver is installed (package libvirt-daemon-driver-qemu) ({uri}: {detail})"
    )]
    UnsupportedUri {
        /// The URI that was tried.
        uri: String,
        /// libvirt's own words.
        detail: String,
    },

    /// A caller asked for something that cannot be done as asked (a disk the VM lacks, a
    /// name libvirt would misread).
    #[error("{0}")]
    Invalid(String),

    /// Any other connection failure (remote host down, SSH refused, ...).
    #[error(
        "cannot connect to libvirt: {detail}. Check that the host is reachable and its \
         libvirt daemon runs ({uri})"
    )]
    Unreachable {
        /// The URI that was tried.
        uri: String,
        /// libvirt's own words.
        detail: String,
    },

    /// No VM matches a name or UUID.
    #[error(
        "no virtual machine is called {wanted:?}: `rewind vms` lists the VMs there are ({uri})"
    )]
    VmNotFound {
        /// What the user asked for.
        wanted: String,
        /// The connection searched.
        uri: String,
    },

    /// A libvirt call failed.
    #[error("libvirt could not {action}: {detail}")]
    Libvirt {
        /// What Rewind was doing, as a verb phrase ("list the VMs", "read the XML of VM \"x\"").
        action: String,
        /// libvirt's message.
        detail: String,
        /// Whether libvirt lost its connection (daemon restarted, network cut).
        connection_lost: bool,
    },

    /// libvirt returned XML Rewind cannot make sense of.
    #[error("libvirt returned a domain description Rewind cannot read: {source} (VM {vm:?})")]
    BadDomainXml {
        /// The VM concerned.
        vm: String,
        /// What is wrong.
        #[source]
        source: crate::libvirt::xml::XmlError,
    },

    /// A file-system operation failed.
    #[error("could not {action}: {source} ({})", path.display())]
    Io {
        /// What Rewind was doing.
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The caller cancelled the operation.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    /// Whether trying the same operation again later can succeed without the user changing
    /// anything (a daemon restarting, a network link coming back).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::DaemonNotRunning { .. } | Self::Unreachable { .. } => true,
            Self::Libvirt {
                connection_lost, ..
            } => *connection_lost,
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            Self::PermissionDenied { .. }
            | Self::UnsupportedUri { .. }
            | Self::VmNotFound { .. }
            | Self::BadDomainXml { .. }
            | Self::Invalid(_)
            | Self::Cancelled => false,
        }
    }
}
