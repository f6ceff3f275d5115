//! A small synchronous read-only NBD server: one export, on Unix sockets.
//!
//! Rewind serves a checkpoint's disk straight from its store this way (issue 23), as the
//! backing file of a throwaway qcow2 overlay that QEMU, `qemu-img` and `qemu-io` open with
//! their own NBD client. [`serve_connection`] speaks the protocol on one connection;
//! [`serve_listener`] (or [`ListenerHandle::spawn`]) accepts connections on a listening
//! socket, each served on its own thread with its own [`Export`].

mod commands;
mod error;
mod export;
mod listener;
mod options;

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;

pub use error::ServerError;
pub use export::{Allocation, Export, MemoryExport, Run};
pub use listener::{ListenerHandle, MAX_CONNECTIONS, StopFlag, serve_listener};

use crate::wire::{MAX_STRING, server_text};

/// Largest payload of a read or write request, as `NBD_INFO_BLOCK_SIZE` announces it: the
/// 32 MiB every client may send, so also the most one request can make the server buffer.
pub(crate) const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// The preferred block size announced: a checkpoint store's chunks are larger, but 64 KiB
/// is QEMU's cluster size and keeps overlays' read-modify-write cheap.
pub(crate) const PREFERRED_BLOCK_BYTES: u32 = 64 << 10;
/// Longest option accepted in the handshake: a name and a few metadata-context queries of
/// at most 4096 bytes each. Longer ones end the connection.
pub(crate) const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Data of a structured read reply is read from the export and sent in pieces of at most
/// this size, so that a connection holds at most this much (simple replies and
/// `NBD_CMD_FLAG_DF` need the whole request, at most 32 MiB, in one buffer).
pub(crate) const READ_PIECE_BYTES: usize = 1 << 20;
/// Most extents in one block-status reply (8 bytes each).
pub(crate) const MAX_STATUS_EXTENTS: usize = 8192;
/// The id of `base:allocation`, the only metadata context served.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Serves `export` read-only under the name `name` to the client at the other end of
/// `stream`, until the client says goodbye or hangs up, or `stop` is set.
///
/// The client may also ask for the export by the empty name (the default export). Returns
/// `Ok` when the conversation ended in an orderly way, including a client that leaves
/// during the handshake, and when `stop` ended it: [`StopFlag::stop`] shuts the socket
/// down, so a connection waiting for its client ends at once.
///
/// The socket is not shut down on return, only this handle to it closed: a caller that
/// kept a clone of the stream can still use it.
pub fn serve_connection<E: Export + ?Sized>(
    stream: UnixStream,
    name: &str,
    export: &mut E,
    stop: &StopFlag,
) -> Result<(), ServerError> {
    if name.len() > MAX_STRING {
        return Err(ServerError::NameTooLong {
            export: name.chars().take(40).collect(),
        });
    }
    let _registration = stop.register(&stream).map_err(|source| ServerError::Io {
        export: name.to_owned(),
        source,
    })?;
    let writer = stream.try_clone().map_err(|source| ServerError::Io {
        export: name.to_owned(),
        source,
    })?;
    let size_bytes = export.size_bytes();
    let mut connection = Connection {
        reader: BufReader::new(stream),
        writer: BufWriter::new(writer),
        name,
        export,
        stop,
        size_bytes,
        no_zeroes: false,
        structured: false,
        base_allocation: false,
        buffer: Vec::new(),
    };
    let result = connection.serve();
    match result {
        // A stop shuts the socket down under the connection's feet: not the client's fault.
        Err(_) if stop.is_stopped() => Ok(()),
        result => result,
    }
}

/// One client's connection and what it negotiated.
pub(crate) struct Connection<'a, E: ?Sized> {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    name: &'a str,
    export: &'a mut E,
    stop: &'a StopFlag,
    size_bytes: u64,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// The client negotiated `NBD_OPT_STRUCTURED_REPLY`.
    structured: bool,
    /// The client selected `base:allocation` with `NBD_OPT_SET_META_CONTEXT`.
    base_allocation: bool,
    /// Read data on its way to the client, reused between requests; at most 32 MiB.
    buffer: Vec<u8>,
}

impl<E: Export + ?Sized> Connection<'_, E> {
    fn serve(&mut self) -> Result<(), ServerError> {
        if self.handshake()? {
            self.transmission()?;
        }
        Ok(())
    }

    /// Whether `requested` names the export: its name, or the empty default name.
    fn is_ours(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }

    // ---- Bytes on the socket ----

    /// Whether the client has hung up before the start of its next message.
    fn at_end(&mut self) -> Result<bool, ServerError> {
        match self.reader.fill_buf() {
            Ok(buffered) => Ok(buffered.is_empty()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => self.at_end(),
            Err(error) => Err(self.io_error(error)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), ServerError> {
        self.reader.read_exact(buf).map_err(|e| self.io_error(e))
    }

    fn recv_array<const N: usize>(&mut self) -> Result<[u8; N], ServerError> {
        let mut bytes = [0; N];
        self.recv(&mut bytes)?;
        Ok(bytes)
    }

    fn recv_u32(&mut self) -> Result<u32, ServerError> {
        self.recv_array().map(u32::from_be_bytes)
    }

    fn recv_u64(&mut self) -> Result<u64, ServerError> {
        self.recv_array().map(u64::from_be_bytes)
    }

    /// Reads `length` bytes (at most `max`, else the connection ends).
    fn recv_vec(&mut self, length: u32, max: u32, what: &str) -> Result<Vec<u8>, ServerError> {
        if length > max {
            return Err(self.protocol(format!(
                "{what} is {length} bytes long, more than the {max} accepted"
            )));
        }
        let mut data = vec![0; length as usize];
        self.recv(&mut data)?;
        Ok(data)
    }

    /// Reads and discards `length` bytes, without holding them.
    fn skip(&mut self, length: u64) -> Result<(), ServerError> {
        let skipped = io::copy(&mut self.reader.by_ref().take(length), &mut io::sink())
            .map_err(|e| self.io_error(e))?;
        if skipped < length {
            return Err(self.io_error(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    /// Queues bytes for the client; [`Self::flush`] sends them.
    fn send(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        self.writer.write_all(bytes).map_err(|e| self.io_error(e))
    }

    fn flush(&mut self) -> Result<(), ServerError> {
        self.writer.flush().map_err(|e| self.io_error(e))
    }

    // ---- Errors ----

    fn io_error(&self, source: io::Error) -> ServerError {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            ServerError::Disconnected {
                export: self.name.to_owned(),
            }
        } else {
            ServerError::Io {
                export: self.name.to_owned(),
                source,
            }
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> ServerError {
        ServerError::Protocol {
            export: self.name.to_owned(),
            detail: detail.into(),
        }
    }

    fn unknown_export(&self, requested: &[u8]) -> ServerError {
        ServerError::UnknownExport {
            export: self.name.to_owned(),
            requested: server_text(&requested[..requested.len().min(200)]),
        }
    }
}
