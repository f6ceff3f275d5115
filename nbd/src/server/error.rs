//! What can end a connection or a listener early.

use std::io;
use std::path::PathBuf;

/// Why [`serve_connection`](crate::serve_connection) or
/// [`serve_listener`](crate::serve_listener) ended other than cleanly.
///
/// A client that says goodbye, hangs up between messages, or is cut off by a stop is not
/// an error. Errors a client causes end only its own connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Reading from or writing to the client's socket failed.
    #[error("lost the connection to an NBD client of export {export:?}: {source}")]
    Io {
        /// The export served.
        export: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// The client hung up in the middle of a message.
    #[error("an NBD client of export {export:?} hung up in the middle of a message")]
    Disconnected {
        /// The export served.
        export: String,
    },

    /// The client sent something the protocol does not allow, or that this server refuses
    /// to take (an over-long option or write); the connection was closed.
    #[error(
        "an NBD client of export {export:?} does not follow the NBD protocol, so its \
         connection was closed: {detail}"
    )]
    Protocol {
        /// The export served.
        export: String,
        /// What was wrong.
        detail: String,
    },

    /// The client asked for another export with `NBD_OPT_EXPORT_NAME`, which has no way to
    /// say no except closing the connection.
    #[error(
        "an NBD client asked for export {requested:?}, but this server serves only {export:?}; \
         its connection was closed"
    )]
    UnknownExport {
        /// The export served.
        export: String,
        /// What the client asked for (made printable).
        requested: String,
    },

    /// The export's name cannot be sent: NBD names are at most 4096 bytes.
    #[error("cannot serve export {export:?}...: NBD names are at most 4096 bytes long")]
    NameTooLong {
        /// The start of the name.
        export: String,
    },

    /// Opening the export for a new connection failed.
    #[error("cannot open export {export:?} for a new NBD connection: {source}")]
    OpenExport {
        /// The export served.
        export: String,
        /// The export's error.
        #[source]
        source: io::Error,
    },

    /// The listening socket failed.
    #[error(
        "cannot accept NBD connections for export {export:?} on {socket}: {source}",
        socket = socket.display()
    )]
    Accept {
        /// The export served.
        export: String,
        /// The listening socket's path, if it has one.
        socket: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// A thread for a connection or for the listener could not be started.
    #[error("cannot start a thread to serve NBD export {export:?}: {source}")]
    Spawn {
        /// The export served.
        export: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },

    /// The listener's thread panicked (a bug).
    #[error("the thread serving NBD export {export:?} panicked")]
    Panicked {
        /// The export served.
        export: String,
    },
}
