//! The connection: opening it, the public operations, and the bytes on the socket.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::transmission::push_extent;
use crate::wire::{
    CMD_DISC, CMD_FLUSH, CMD_WRITE, MAX_READ_BYTES, OPT_ABORT, STATUS_WINDOW_BYTES, check_names,
};
use crate::{Extent, NbdError};

/// A connection to one export of an NBD server, in the transmission phase.
///
/// One request is in flight at a time; every method waits for its reply. Dropping the
/// client says goodbye to the server ([`NbdClient::close`] does the same and reports errors).
#[derive(Debug)]
pub struct NbdClient {
    /// Replies are read through a buffer; requests are written straight to the socket.
    pub(crate) stream: BufReader<UnixStream>,
    pub(crate) socket: PathBuf,
    pub(crate) export: String,
    pub(crate) phase: Phase,
    pub(crate) size_bytes: u64,
    /// Whether the server agreed to `NBD_OPT_STRUCTURED_REPLY`.
    pub(crate) structured: bool,
    /// The metadata contexts asked for, without duplicates.
    pub(crate) requested: Vec<String>,
    /// The contexts the server selected, with their ids.
    pub(crate) contexts: Vec<(String, u32)>,
    /// Largest `NBD_CMD_READ` or `NBD_CMD_WRITE` sent.
    pub(crate) max_read_bytes: usize,
    /// Whether the server said the export is read-only.
    pub(crate) read_only: bool,
    pub(crate) next_cookie: u64,
}

/// What may still be said on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Options may be sent; goodbye is `NBD_OPT_ABORT`.
    Handshake,
    /// Commands may be sent; goodbye is `NBD_CMD_DISC`.
    Transmission,
    /// Nothing more: not yet greeted, closed, or broken by an error.
    Closed,
}

impl NbdClient {
    /// Connects to the server listening on the Unix socket `socket`, selects the metadata
    /// contexts `meta_contexts` (e.g. [`BASE_ALLOCATION`](crate::BASE_ALLOCATION) and a
    /// [`dirty_bitmap_context`](crate::dirty_bitmap_context)) and opens `export`.
    ///
    /// A context the server does not offer is not an error here, only when
    /// [`NbdClient::block_status`] asks for it.
    pub fn connect(socket: &Path, export: &str, meta_contexts: &[&str]) -> Result<Self, NbdError> {
        check_names(socket, export, meta_contexts)?;
        let stream = UnixStream::connect(socket).map_err(|source| NbdError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        Self::negotiate(stream, socket, export, meta_contexts)
    }

    /// The handshake, on a connected stream (`socket` names it in errors), with names
    /// [`check_names`] accepted.
    pub(crate) fn negotiate(
        stream: UnixStream,
        socket: &Path,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let mut client = NbdClient {
            stream: BufReader::new(stream),
            socket: socket.to_owned(),
            export: export.to_owned(),
            phase: Phase::Closed,
            size_bytes: 0,
            structured: false,
            requested: Vec::new(),
            contexts: Vec::new(),
            max_read_bytes: MAX_READ_BYTES,
            read_only: false,
            next_cookie: 1,
        };
        if let Err(error) = client.handshake(meta_contexts) {
            if error.ends_connection() {
                client.phase = Phase::Closed;
            }
            // Otherwise dropping the client ends the handshake politely with NBD_OPT_ABORT.
            return Err(error);
        }
        Ok(client)
    }

    /// Sends reads and writes of at most `bytes` (at least 512) per request from now on;
    /// the server's own maximum still applies.
    pub fn limit_request_bytes(&mut self, bytes: usize) {
        self.max_read_bytes = self.max_read_bytes.min(bytes.max(512));
    }

    /// The size of the export in bytes.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Fills `buf` with the export's bytes from `offset` on.
    ///
    /// Large buffers are read in several requests of at most 32 MiB (less if the server
    /// asks for less). After an error, what `buf` holds is unspecified.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.transmit(|this| {
            this.check_range(offset, buf.len() as u64)?;
            let mut at = offset;
            for piece in buf.chunks_mut(this.max_read_bytes) {
                this.read_once(at, piece)?;
                at += piece.len() as u64;
            }
            Ok(())
        })
    }

    /// Writes `data` at `offset`, in requests of at most 32 MiB (less if the server asks for
    /// less). Durable only after [`NbdClient::flush`].
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.transmit(|this| {
            this.check_range(offset, data.len() as u64)?;
            if this.read_only {
                return Err(NbdError::ReadOnly {
                    socket: this.socket.clone(),
                    export: this.export.clone(),
                });
            }
            let mut at = offset;
            for piece in data.chunks(this.max_read_bytes) {
                let length = u32::try_from(piece.len()).expect("pieces are at most 32 MiB");
                let cookie = this.send_request_with(CMD_WRITE, at, length, piece)?;
                this.recv_ack(cookie, "write", &(at..at + u64::from(length)))?;
                at += piece.len() as u64;
            }
            Ok(())
        })
    }

    /// Asks the server to make every completed write durable (`NBD_CMD_FLUSH`).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.transmit(|this| {
            let cookie = this.send_request(CMD_FLUSH, 0, 0)?;
            this.recv_ack(cookie, "flush", &(0..0))
        })
    }

    /// The status of `[offset, offset + length)` in the metadata context `context`, as
    /// extents that cover exactly that range, in order, with neighbours of equal flags
    /// merged.
    ///
    /// The result holds one [`Extent`] per change of flags: to bound memory on a large
    /// disk, ask for a window (say 1 GiB) at a time.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.transmit(|this| {
            let id = this.context_id(context)?;
            this.check_range(offset, length)?;
            let end = offset + length;
            let mut extents = Vec::new();
            let mut at = offset;
            while at < end {
                let window = u32::try_from(end - at)
                    .map_or(STATUS_WINDOW_BYTES, |left| left.min(STATUS_WINDOW_BYTES));
                // Each round describes at least one byte, so this loop ends.
                for extent in this.block_status_once(id, at, window)? {
                    at = extent.end();
                    push_extent(&mut extents, extent);
                }
            }
            Ok(extents)
        })
    }

    /// Says goodbye (`NBD_CMD_DISC`) and closes the connection. Dropping the client does the
    /// same but cannot report errors.
    pub fn close(mut self) -> Result<(), NbdError> {
        if self.phase != Phase::Transmission {
            return Ok(()); // an earlier error already ended the connection
        }
        self.phase = Phase::Closed;
        self.send_request(CMD_DISC, 0, 0).map(drop)
    }

    // ---- Bytes on the socket ----

    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        // BufReader only buffers reading: writes go straight to the socket.
        self.stream
            .get_mut()
            .write_all(bytes)
            .map_err(|e| self.io_error(e))
    }

    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        self.stream.read_exact(buf).map_err(|e| self.io_error(e))
    }

    pub(crate) fn recv_u16(&mut self) -> Result<u16, NbdError> {
        let mut bytes = [0; 2];
        self.recv(&mut bytes)?;
        Ok(u16::from_be_bytes(bytes))
    }

    pub(crate) fn recv_u32(&mut self) -> Result<u32, NbdError> {
        let mut bytes = [0; 4];
        self.recv(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    pub(crate) fn recv_u64(&mut self) -> Result<u64, NbdError> {
        let mut bytes = [0; 8];
        self.recv(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Reads a payload of `length` bytes, refusing lengths above `max`.
    pub(crate) fn recv_vec(
        &mut self,
        length: u32,
        max: u32,
        what: &str,
    ) -> Result<Vec<u8>, NbdError> {
        if length > max {
            return Err(self.protocol(format!(
                "{what} is {length} bytes long, more than the {max} accepted"
            )));
        }
        let mut data = vec![0; length as usize];
        self.recv(&mut data)?;
        Ok(data)
    }

    /// Reads and discards `length` bytes.
    pub(crate) fn skip(&mut self, length: u64) -> Result<(), NbdError> {
        let skipped = io::copy(&mut self.stream.by_ref().take(length), &mut io::sink())
            .map_err(|e| self.io_error(e))?;
        if skipped < length {
            return Err(self.io_error(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    // ---- Errors ----

    pub(crate) fn io_error(&self, source: io::Error) -> NbdError {
        let (socket, export) = (self.socket.clone(), self.export.clone());
        if source.kind() == io::ErrorKind::UnexpectedEof {
            NbdError::Disconnected { socket, export }
        } else {
            NbdError::Io {
                socket,
                export,
                source,
            }
        }
    }

    pub(crate) fn protocol(&self, detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            socket: self.socket.clone(),
            export: self.export.clone(),
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(&self, feature: &'static str) -> NbdError {
        NbdError::Unsupported {
            socket: self.socket.clone(),
            export: self.export.clone(),
            feature,
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Best effort: errors have nowhere to go here, and the server cleans up either way.
        match self.phase {
            Phase::Handshake => drop(self.send_option(OPT_ABORT, &[])),
            Phase::Transmission => drop(self.send_request(CMD_DISC, 0, 0)),
            Phase::Closed => {}
        }
        // Fails only on a socket already gone, which is the aim.
        drop(self.stream.get_ref().shutdown(Shutdown::Both));
    }
}
