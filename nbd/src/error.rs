//! What can go wrong talking to an NBD server.

use std::io;
use std::path::PathBuf;

use crate::wire::{errno_reason, server_said};

/// Everything that can go wrong talking to an NBD server.
///
/// Every message names the server's socket, and the export where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The socket is missing or nobody listens on it.
    #[error("cannot connect to the NBD server at {socket}: {source}", socket = socket.display())]
    Connect {
        /// The server's socket.
        socket: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// Reading from or writing to the socket failed.
    #[error(
        "lost the connection to the NBD server at {socket} (export {export:?}): {source}",
        socket = socket.display()
    )]
    Io {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// The server closed the connection in the middle of a message.
    #[error(
        "the NBD server at {socket} closed the connection unexpectedly (export {export:?})",
        socket = socket.display()
    )]
    Disconnected {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
    },

    /// The server sent something the protocol does not allow.
    #[error(
        "the NBD server at {socket} does not follow the NBD protocol (export {export:?}): {detail}",
        socket = socket.display()
    )]
    Protocol {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// What was wrong.
        detail: String,
    },

    /// The server lacks something this client needs.
    #[error(
        "the NBD server at {socket} does not support {feature}, which this client needs \
         (export {export:?})",
        socket = socket.display()
    )]
    Unsupported {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// What it lacks.
        feature: &'static str,
    },

    /// The server has no export of that name.
    #[error(
        "the NBD server at {socket} does not offer export {export:?}{said}",
        socket = socket.display(),
        said = server_said(message)
    )]
    ExportNotFound {
        /// The server's socket.
        socket: PathBuf,
        /// The export that was asked for.
        export: String,
        /// The server's own words, if any.
        message: String,
    },

    /// The server refused an option for another reason (TLS required, policy, shutting down...).
    #[error(
        "the NBD server at {socket} refused {option} for export {export:?}: {reason}{said}",
        socket = socket.display(),
        said = server_said(message)
    )]
    Refused {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// The option, e.g. `NBD_OPT_GO`.
        option: &'static str,
        /// What the reply code means.
        reason: String,
        /// The server's own words, if any.
        message: String,
    },

    /// [`NbdClient::block_status`](crate::NbdClient::block_status) asked for a context that
    /// was not passed to [`NbdClient::connect`](crate::NbdClient::connect).
    #[error(
        "metadata context {context:?} was not requested when connecting to export {export:?} \
         of the NBD server at {socket}; pass it to NbdClient::connect",
        socket = socket.display()
    )]
    ContextNotRequested {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// The context.
        context: String,
    },

    /// The context was requested, but the server did not select it.
    #[error(
        "the NBD server at {socket} does not offer metadata context {context:?} for export \
         {export:?}; a dirty bitmap must be exported by the server (libvirt: an incremental \
         backup; qemu-nbd: --bitmap)",
        socket = socket.display()
    )]
    ContextNotOffered {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// The context.
        context: String,
    },

    /// A read or status request reaches past the end of the export.
    #[error(
        "cannot access {length} bytes at offset {offset} of export {export:?}: it is only \
         {size_bytes} bytes long (NBD server at {socket})",
        socket = socket.display()
    )]
    OutOfRange {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// The first byte asked for.
        offset: u64,
        /// How many bytes were asked for.
        length: u64,
        /// The size of the export.
        size_bytes: u64,
    },

    /// The server reported an error for one request; the connection remains usable.
    #[error(
        "the NBD server at {socket} failed to {command} {length} bytes at offset {offset} of \
         export {export:?}: {reason}{said}",
        socket = socket.display(),
        reason = errno_reason(*code),
        said = server_said(message)
    )]
    CommandFailed {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
        /// What was being done: `read`, `write`, `flush` or `report the status of`.
        command: &'static str,
        /// The first byte of the request.
        offset: u64,
        /// The length of the request.
        length: u64,
        /// The NBD error code (5 = `NBD_EIO`, 108 = `NBD_ESHUTDOWN`, ...).
        code: u32,
        /// The server's own words, if any.
        message: String,
    },

    /// A write to an export the server offers read-only.
    #[error("the NBD server at {socket} offers export {export:?} read-only: it cannot be written", socket = socket.display())]
    ReadOnly {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
    },

    /// A name given to [`NbdClient::connect`](crate::NbdClient::connect) cannot be sent.
    #[error("cannot ask the NBD server at {socket}: {detail}", socket = socket.display())]
    InvalidArgument {
        /// The server's socket.
        socket: PathBuf,
        /// What is wrong with the argument.
        detail: String,
    },

    /// An earlier error ended the connection, or it was closed.
    #[error(
        "the connection to the NBD server at {socket} (export {export:?}) can no longer be \
         used after an earlier error; connect again",
        socket = socket.display()
    )]
    Unusable {
        /// The server's socket.
        socket: PathBuf,
        /// The export.
        export: String,
    },
}

impl NbdError {
    /// Whether the connection's framing is lost: nothing more can be read from it.
    pub(crate) fn ends_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Io { .. } | NbdError::Disconnected { .. } | NbdError::Protocol { .. }
        )
    }
}
