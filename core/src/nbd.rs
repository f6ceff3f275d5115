//! A small synchronous NBD client, for reading the disks that QEMU exports.
//!
//! Rewind reads a VM's disks over NBD (the Network Block Device protocol) in two cases:
//!
//! - during a pull-mode backup (`virDomainBackupBegin`): libvirt has QEMU export each disk on
//!   a Unix socket under the disk's target name (`vda`), and the clusters changed since the
//!   last checkpoint in the metadata context `qemu:dirty-bitmap:backup-vda`;
//! - for a shut-off VM, whose qcow2 files are exported with `qemu-nbd --read-only`.
//!
//! [`NbdClient`] follows `doc/proto.md` of the NBD project. It implements:
//!
//! - the fixed newstyle handshake over a Unix socket, with `NBD_FLAG_C_NO_ZEROES` where the
//!   server offers it;
//! - the options `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` (the context ids the
//!   server returns are recorded; a requested context it does not return is an error only
//!   when it is used) and `NBD_OPT_GO` (export size from `NBD_INFO_EXPORT`, maximum payload
//!   from `NBD_INFO_BLOCK_SIZE` if the server sends it);
//! - `NBD_CMD_READ` ([`NbdClient::read_at`]), in requests of at most 32 MiB, answered with
//!   structured replies (data, holes, errors) or a simple reply;
//! - `NBD_CMD_BLOCK_STATUS` ([`NbdClient::block_status`]), repeated until the whole range is
//!   described, since servers may describe less than was asked;
//! - a clean goodbye (`NBD_OPT_ABORT` during the handshake, `NBD_CMD_DISC` after it) on
//!   [`NbdClient::close`] or drop.
//!
//! - `NBD_CMD_WRITE` ([`NbdClient::write_at`]) and `NBD_CMD_FLUSH` ([`NbdClient::flush`]);
//!
//! It does not implement: `NBD_CMD_TRIM`, `WRITE_ZEROES`, `CACHE`;
//! TCP and TLS; the oldstyle and non-fixed newstyle handshakes, and the `NBD_OPT_EXPORT_NAME`
//! fallback for servers without `NBD_OPT_GO` (QEMU, nbdkit and nbd-server all have it);
//! `NBD_OPT_LIST` and `NBD_OPT_LIST_META_CONTEXT`; the experimental extended headers (64-bit
//! lengths); more than one request in flight; timeouts (a server that stops answering blocks
//! the caller). It does not request `NBD_INFO_BLOCK_SIZE`, which would oblige it to align
//! every request to the server's minimum block size; servers then accept any alignment
//! (QEMU does for `NBD_OPT_GO`).
//!
//! Nothing a server sends can make the client panic, and no length a server sends is
//! trusted for an allocation: handshake replies are capped at a few KiB, read data goes
//! straight into the caller's buffer and must lie inside the request, and a block-status
//! reply may hold at most one extent per requested byte. A reply that breaks the protocol,
//! or a lost connection, makes the client unusable ([`NbdError::Unusable`] from then on),
//! because where the next reply starts can no longer be known; an error the server reports
//! for one request ([`NbdError::CommandFailed`]) does not.

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The standard metadata context that reports allocation, with [`STATE_HOLE`] and
/// [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";

/// `base:allocation` flag `NBD_STATE_HOLE`: the extent is not allocated on the server.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag `NBD_STATE_ZERO`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// Flag of a `qemu:dirty-bitmap:*` context: the extent was written since the bitmap started.
pub const STATE_DIRTY: u32 = 1;

/// The metadata context under which QEMU exports the dirty bitmap `bitmap`.
#[must_use]
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A run of bytes of an export that have the same flags in one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The first byte.
    pub offset: u64,
    /// How many bytes (never zero in what [`NbdClient::block_status`] returns).
    pub length: u64,
    /// The flags, whose meaning depends on the context: [`STATE_HOLE`] and [`STATE_ZERO`]
    /// for [`BASE_ALLOCATION`], [`STATE_DIRTY`] for a dirty bitmap.
    pub flags: u32,
}

impl Extent {
    /// One past the last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether all bits of `flag` are set, e.g. `extent.has(STATE_DIRTY)`.
    #[must_use]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }
}

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

    /// [`NbdClient::block_status`] asked for a context that was not passed to
    /// [`NbdClient::connect`].
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

    /// A name given to [`NbdClient::connect`] cannot be sent.
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
    fn ends_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Io { .. } | NbdError::Disconnected { .. } | NbdError::Protocol { .. }
        )
    }
}

/// A connection to one export of an NBD server, in the transmission phase.
///
/// One request is in flight at a time; every method waits for its reply. Dropping the
/// client says goodbye to the server ([`NbdClient::close`] does the same and reports errors).
#[derive(Debug)]
pub struct NbdClient {
    /// Replies are read through a buffer; requests are written straight to the socket.
    stream: BufReader<UnixStream>,
    socket: PathBuf,
    export: String,
    phase: Phase,
    size_bytes: u64,
    /// Whether the server agreed to `NBD_OPT_STRUCTURED_REPLY`.
    structured: bool,
    /// The metadata contexts asked for, without duplicates.
    requested: Vec<String>,
    /// The contexts the server selected, with their ids.
    contexts: Vec<(String, u32)>,
    /// Largest `NBD_CMD_READ` or `NBD_CMD_WRITE` sent.
    max_read_bytes: usize,
    /// Whether the server said the export is read-only.
    read_only: bool,
    next_cookie: u64,
}

/// What may still be said on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Options may be sent; goodbye is `NBD_OPT_ABORT`.
    Handshake,
    /// Commands may be sent; goodbye is `NBD_CMD_DISC`.
    Transmission,
    /// Nothing more: not yet greeted, closed, or broken by an error.
    Closed,
}

// Protocol constants, from doc/proto.md. Magic numbers are fixed by the protocol.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR | 1;
const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// Transmission flag: the export cannot be written.
const TRANSMISSION_READ_ONLY: u16 = 1 << 1;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks error chunks, including types this client does not know.
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

const NBD_ESHUTDOWN: u32 = 108;

// Limits.
/// Names and messages are at most 4096 bytes long in NBD.
const MAX_STRING: usize = 4096;
/// At most this many metadata contexts per connection (QEMU offers two kinds).
const MAX_META_CONTEXTS: usize = 64;
/// Longest handshake reply accepted: a 4096-byte string plus a few fixed fields.
const MAX_OPTION_REPLY: u32 = 8192;
/// Longest error chunk accepted: a 4096-byte message plus a few fixed fields.
const MAX_ERROR_CHUNK: u32 = 8192;
/// Largest read request: the payload every server must accept (2^25).
const MAX_READ_BYTES: usize = 32 << 20;
/// A read reply may arrive in pieces and in any order; one split into more separate pieces
/// than this (QEMU sends one to a few, in order) is treated as an attack on our memory.
const MAX_READ_FRAGMENTS: usize = 4096;
/// Servers should not send more extents than this in one chunk.
const MAX_EXTENTS_PER_CHUNK: u64 = 1 << 20;
/// The length of one `NBD_CMD_BLOCK_STATUS` request; longer ranges take several.
const STATUS_WINDOW_BYTES: u32 = 1 << 31;

impl NbdClient {
    /// Connects to the server listening on the Unix socket `socket`, selects the metadata
    /// contexts `meta_contexts` (e.g. [`BASE_ALLOCATION`] and a
    /// [`dirty_bitmap_context`]) and opens `export`.
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
    fn negotiate(
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

    // ---- Handshake ----

    fn handshake(&mut self, meta_contexts: &[&str]) -> Result<(), NbdError> {
        if self.recv_u64()? != NBDMAGIC {
            return Err(self.protocol("it does not greet with NBDMAGIC; is it an NBD server?"));
        }
        match self.recv_u64()? {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(self.unsupported("the newstyle handshake")),
            other => return Err(self.protocol(format!("unknown handshake magic {other:#x}"))),
        }
        let server_flags = self.recv_u16()?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.unsupported("the fixed newstyle handshake"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        // NO_ZEROES only changes the reply to NBD_OPT_EXPORT_NAME, which this client never
        // sends; it is harmless where offered and keeps the handshake the usual one.
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.send(&client_flags.to_be_bytes())?;
        self.phase = Phase::Handshake;

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let reply = self.recv_option_reply(OPT_STRUCTURED_REPLY)?;
        match reply.kind {
            REP_ACK => self.structured = true,
            // An old server: reads still work, with simple replies.
            REP_ERR_UNSUP => self.structured = false,
            _ => return Err(self.option_failed(OPT_STRUCTURED_REPLY, &reply)),
        }
        if !meta_contexts.is_empty() {
            self.set_meta_contexts(meta_contexts)?;
        }
        self.go()
    }

    fn set_meta_contexts(&mut self, meta_contexts: &[&str]) -> Result<(), NbdError> {
        if !self.structured {
            return Err(self.unsupported("structured replies, which metadata contexts need"));
        }
        let mut requested: Vec<String> = Vec::new();
        for &name in meta_contexts {
            if !requested.iter().any(|r| r == name) {
                requested.push(name.to_owned());
            }
        }
        let mut data = Vec::new();
        put_string(&mut data, &self.export);
        put_u32(&mut data, requested.len());
        for name in &requested {
            put_string(&mut data, name);
        }
        self.send_option(OPT_SET_META_CONTEXT, &data)?;
        loop {
            let reply = self.recv_option_reply(OPT_SET_META_CONTEXT)?;
            match reply.kind {
                REP_META_CONTEXT => {
                    let mut fields = Fields(&reply.data);
                    let Some(id) = fields.u32() else {
                        return Err(self.protocol("an NBD_REP_META_CONTEXT reply is too short"));
                    };
                    let Ok(name) = String::from_utf8(fields.0.to_vec()) else {
                        return Err(self.protocol("a metadata context name is not UTF-8"));
                    };
                    if self.contexts.len() == requested.len() {
                        return Err(self.protocol("it selected more metadata contexts than asked"));
                    }
                    if self.contexts.iter().any(|(n, i)| *i == id || *n == name) {
                        return Err(self.protocol(format!(
                            "it selected metadata context {name:?} (id {id}) twice"
                        )));
                    }
                    self.contexts.push((name, id));
                }
                REP_ACK => break,
                _ => return Err(self.option_failed(OPT_SET_META_CONTEXT, &reply)),
            }
        }
        self.requested = requested;
        Ok(())
    }

    fn go(&mut self) -> Result<(), NbdError> {
        let mut data = Vec::new();
        put_string(&mut data, &self.export);
        // No information requests: see the module documentation on NBD_INFO_BLOCK_SIZE.
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut size_bytes = None;
        loop {
            let reply = self.recv_option_reply(OPT_GO)?;
            match reply.kind {
                REP_INFO => {
                    let mut fields = Fields(&reply.data);
                    match fields.u16() {
                        Some(INFO_EXPORT) => {
                            // 64 bits size, 16 bits transmission flags.
                            let (Some(size), Some(flags), true) =
                                (fields.u64(), fields.u16(), fields.0.is_empty())
                            else {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_EXPORT is {} bytes long instead of 12",
                                    reply.data.len()
                                )));
                            };
                            size_bytes = Some(size);
                            self.read_only = flags & TRANSMISSION_READ_ONLY != 0;
                        }
                        Some(INFO_BLOCK_SIZE) => {
                            let (Some(_minimum), Some(_preferred), Some(maximum), true) = (
                                fields.u32(),
                                fields.u32(),
                                fields.u32(),
                                fields.0.is_empty(),
                            ) else {
                                return Err(self.protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE is {} bytes long instead of 14",
                                    reply.data.len()
                                )));
                            };
                            // A server that takes less than the usual 32 MiB per request gets less.
                            if let Ok(maximum) = usize::try_from(maximum)
                                && maximum > 0
                            {
                                self.max_read_bytes = maximum.min(MAX_READ_BYTES);
                            }
                        }
                        // Names, descriptions and future types: to be ignored, says the spec.
                        Some(_) => {}
                        None => return Err(self.protocol("an NBD_REP_INFO reply is empty")),
                    }
                }
                REP_ACK => break,
                _ => return Err(self.option_failed(OPT_GO, &reply)),
            }
        }
        let Some(size_bytes) = size_bytes else {
            return Err(self.protocol("it opened the export without sending its size"));
        };
        self.size_bytes = size_bytes;
        self.phase = Phase::Transmission;
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut message = Vec::with_capacity(16 + data.len());
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        put_u32(&mut message, data.len());
        message.extend_from_slice(data);
        self.send(&message)
    }

    fn recv_option_reply(&mut self, option: u32) -> Result<OptionReply, NbdError> {
        let magic = self.recv_u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(self.protocol(format!(
                "a reply to {} starts with {magic:#x} instead of the option reply magic",
                option_name(option)
            )));
        }
        let echoed = self.recv_u32()?;
        if echoed != option {
            return Err(self.protocol(format!(
                "the reply to {} is for option {echoed}",
                option_name(option)
            )));
        }
        let kind = self.recv_u32()?;
        let length = self.recv_u32()?;
        let data = self.recv_vec(length, MAX_OPTION_REPLY, "an option reply")?;
        Ok(OptionReply { kind, data })
    }

    /// The error for an option reply that is neither success nor expected information.
    fn option_failed(&self, option: u32, reply: &OptionReply) -> NbdError {
        let message = server_text(&reply.data);
        match reply.kind {
            REP_ERR_UNKNOWN => NbdError::ExportNotFound {
                socket: self.socket.clone(),
                export: self.export.clone(),
                message,
            },
            REP_ERR_UNSUP => self.unsupported(option_name(option)),
            kind if kind & REP_ERR != 0 => NbdError::Refused {
                socket: self.socket.clone(),
                export: self.export.clone(),
                option: option_name(option),
                reason: rep_err_reason(kind),
                message,
            },
            kind => self.protocol(format!(
                "unexpected reply type {kind} to {}",
                option_name(option)
            )),
        }
    }

    // ---- Transmission ----

    /// Runs one public operation: refuses if the connection is gone, and marks it gone when
    /// the operation loses the framing.
    fn transmit<T>(
        &mut self,
        operation: impl FnOnce(&mut Self) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        if self.phase != Phase::Transmission {
            return Err(NbdError::Unusable {
                socket: self.socket.clone(),
                export: self.export.clone(),
            });
        }
        let result = operation(self);
        if let Err(error) = &result {
            if error.ends_connection() {
                self.phase = Phase::Closed;
            } else if let NbdError::CommandFailed {
                code: NBD_ESHUTDOWN,
                ..
            } = error
            {
                // The spec asks clients to disconnect when the server shuts down.
                self.phase = Phase::Closed;
                let _ = self.send_request(CMD_DISC, 0, 0);
            }
        }
        result
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(NbdError::OutOfRange {
                socket: self.socket.clone(),
                export: self.export.clone(),
                offset,
                length,
                size_bytes: self.size_bytes,
            }),
        }
    }

    fn context_id(&self, context: &str) -> Result<u32, NbdError> {
        if !self.requested.iter().any(|r| r == context) {
            return Err(NbdError::ContextNotRequested {
                socket: self.socket.clone(),
                export: self.export.clone(),
                context: context.to_owned(),
            });
        }
        self.contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|&(_, id)| id)
            .ok_or_else(|| NbdError::ContextNotOffered {
                socket: self.socket.clone(),
                export: self.export.clone(),
                context: context.to_owned(),
            })
    }

    /// One `NBD_CMD_READ` of `buf.len()` (at most 32 MiB) bytes.
    fn read_once(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = u32::try_from(buf.len()).expect("read_at sends at most 32 MiB per request");
        let cookie = self.send_request(CMD_READ, offset, length)?;
        let request = offset..offset + u64::from(length);
        let mut filled = Coverage::default();
        let mut failure = None;
        loop {
            let (flags, kind, chunk_length) = match self.recv_reply(cookie)? {
                // A simple reply's data follows only on success, and is exactly as long as asked.
                Reply::Simple { error: 0 } => return self.recv(buf),
                Reply::Simple { error } => {
                    return Err(self.command_failed("read", &request, error, String::new()));
                }
                Reply::Chunk {
                    flags,
                    kind,
                    length,
                } => (flags, kind, length),
            };
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let Some(data_length) = chunk_length.checked_sub(8).filter(|&n| n > 0) else {
                        return Err(self.protocol(format!(
                            "a data chunk is {chunk_length} bytes long, too short"
                        )));
                    };
                    let at = self.recv_u64()?;
                    // Checked before the data is read: a chunk longer than the request is an
                    // error, not an allocation.
                    let range = self.chunk_range(&request, at, u64::from(data_length))?;
                    filled
                        .insert(&range)
                        .map_err(|detail| self.protocol(detail))?;
                    let piece = offset_in(&request, &range);
                    self.recv(&mut buf[piece])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if chunk_length != 12 {
                        return Err(self.protocol(format!(
                            "a hole chunk is {chunk_length} bytes long instead of 12"
                        )));
                    }
                    let at = self.recv_u64()?;
                    let hole_length = self.recv_u32()?;
                    if hole_length == 0 {
                        return Err(self.protocol("a hole chunk has length 0"));
                    }
                    let range = self.chunk_range(&request, at, u64::from(hole_length))?;
                    filled
                        .insert(&range)
                        .map_err(|detail| self.protocol(detail))?;
                    buf[offset_in(&request, &range)].fill(0);
                }
                REPLY_TYPE_NONE => self.check_none_chunk(flags, chunk_length)?,
                kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
                    let error = self.recv_error_chunk(kind, chunk_length)?;
                    // Keep reading to the last chunk so that the connection stays usable.
                    failure.get_or_insert(error);
                }
                kind => {
                    return Err(
                        self.protocol(format!("a read was answered with chunk type {kind}"))
                    );
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some((code, message)) = failure {
            return Err(self.command_failed("read", &request, code, message));
        }
        if !filled.is_exactly(&request) {
            return Err(self.protocol(format!(
                "it ended its reply to a read of {length} bytes at offset {offset} after {} bytes",
                filled.bytes()
            )));
        }
        Ok(())
    }

    /// One `NBD_CMD_BLOCK_STATUS` for context `id`: the extents from `offset` on, clipped to
    /// the window; at least one.
    fn block_status_once(
        &mut self,
        id: u32,
        offset: u64,
        length: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        let cookie = self.send_request(CMD_BLOCK_STATUS, offset, length)?;
        let request = offset..offset + u64::from(length);
        let mut extents = None;
        // One chunk per selected context; this catches a second one.
        let mut seen = Vec::new();
        let mut failure = None;
        loop {
            let (flags, kind, chunk_length) = match self.recv_reply(cookie)? {
                Reply::Simple { error: 0 } => {
                    return Err(self.protocol("it answered a status request without extents"));
                }
                Reply::Simple { error } => {
                    return Err(self.command_failed(
                        "report the status of",
                        &request,
                        error,
                        String::new(),
                    ));
                }
                Reply::Chunk {
                    flags,
                    kind,
                    length,
                } => (flags, kind, length),
            };
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    // A context id, then (length, flags) pairs: at least one, and at most one
                    // per requested byte, since all but the last must end inside the request.
                    let count = chunk_length
                        .checked_sub(4)
                        .filter(|n| *n > 0 && n % 8 == 0)
                        .map(|n| u64::from(n / 8));
                    let Some(count) = count else {
                        return Err(self.protocol(format!(
                            "a status chunk is {chunk_length} bytes long, not 4 plus a multiple of 8"
                        )));
                    };
                    if count > MAX_EXTENTS_PER_CHUNK.min(u64::from(length)) {
                        return Err(self.protocol(format!(
                            "a status chunk holds {count} extents for a request of {length} bytes"
                        )));
                    }
                    let chunk_id = self.recv_u32()?;
                    if !self.contexts.iter().any(|&(_, i)| i == chunk_id) {
                        return Err(self.protocol(format!(
                            "a status chunk is for context id {chunk_id}, which it never selected"
                        )));
                    }
                    if seen.contains(&chunk_id) {
                        return Err(self.protocol(format!(
                            "it sent two status chunks for context id {chunk_id}"
                        )));
                    }
                    seen.push(chunk_id);
                    if chunk_id == id {
                        extents = Some(self.recv_extents(&request, count)?);
                    } else {
                        self.skip(count * 8)?;
                    }
                }
                REPLY_TYPE_NONE => self.check_none_chunk(flags, chunk_length)?,
                kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
                    let error = self.recv_error_chunk(kind, chunk_length)?;
                    failure.get_or_insert(error);
                }
                kind => {
                    return Err(self.protocol(format!(
                        "a status request was answered with chunk type {kind}"
                    )));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some((code, message)) = failure {
            return Err(self.command_failed("report the status of", &request, code, message));
        }
        extents.ok_or_else(|| self.protocol(format!("it sent no status for context id {id}")))
    }

    /// Reads `count` (length, flags) descriptors starting at `request.start`, clipping the
    /// last to the request.
    fn recv_extents(&mut self, request: &Range<u64>, count: u64) -> Result<Vec<Extent>, NbdError> {
        let mut extents = Vec::new();
        let mut at = request.start;
        for _ in 0..count {
            let length = self.recv_u32()?;
            let flags = self.recv_u32()?;
            if length == 0 {
                return Err(self.protocol("a status chunk holds an extent of length 0"));
            }
            if at == request.end {
                return Err(self.protocol("a status chunk goes on after the requested range"));
            }
            let end = at.saturating_add(u64::from(length)).min(request.end);
            push_extent(
                &mut extents,
                Extent {
                    offset: at,
                    length: end - at,
                    flags,
                },
            );
            at = end;
        }
        Ok(extents)
    }

    /// Checks an `NBD_REPLY_TYPE_NONE` chunk, which has no payload and must be the last.
    fn check_none_chunk(&self, flags: u16, chunk_length: u32) -> Result<(), NbdError> {
        if chunk_length != 0 || flags & REPLY_FLAG_DONE == 0 {
            return Err(self.protocol("a NONE chunk has a payload or is not the last"));
        }
        Ok(())
    }

    /// Reads an error chunk (any type with bit 15 set): the error code and message.
    fn recv_error_chunk(
        &mut self,
        kind: u16,
        chunk_length: u32,
    ) -> Result<(u32, String), NbdError> {
        let data = self.recv_vec(chunk_length, MAX_ERROR_CHUNK, "an error chunk")?;
        let mut fields = Fields(&data);
        let (Some(code), Some(message_length)) = (fields.u32(), fields.u16()) else {
            return Err(self.protocol(format!(
                "an error chunk is {chunk_length} bytes long, too short"
            )));
        };
        let Some(message) = fields.bytes(usize::from(message_length)) else {
            return Err(self.protocol("an error chunk's message is longer than the chunk"));
        };
        let mut message = server_text(message);
        if kind == REPLY_TYPE_ERROR_OFFSET {
            let Some(at) = fields.u64() else {
                return Err(self.protocol("an error chunk lacks its offset"));
            };
            message = if message.is_empty() {
                format!("at offset {at}")
            } else {
                format!("at offset {at}: {message}")
            };
        }
        Ok((code, message))
    }

    /// `[at, at + length)`, if the request contains it.
    fn chunk_range(
        &self,
        request: &Range<u64>,
        at: u64,
        length: u64,
    ) -> Result<Range<u64>, NbdError> {
        match at.checked_add(length) {
            Some(end) if at >= request.start && end <= request.end => Ok(at..end),
            _ => Err(self.protocol(format!(
                "a chunk of {length} bytes at offset {at} lies outside the request for \
                 {} bytes at offset {}",
                request.end - request.start,
                request.start
            ))),
        }
    }

    /// The reply to a command that returns no data (write, flush): a simple reply, or
    /// structured chunks that are errors or a final NONE.
    fn recv_ack(
        &mut self,
        cookie: u64,
        command: &'static str,
        request: &Range<u64>,
    ) -> Result<(), NbdError> {
        let mut failure = None;
        loop {
            match self.recv_reply(cookie)? {
                Reply::Simple { error: 0 } => return Ok(()),
                Reply::Simple { error } => {
                    return Err(self.command_failed(command, request, error, String::new()));
                }
                Reply::Chunk {
                    flags,
                    kind,
                    length,
                } => {
                    match kind {
                        REPLY_TYPE_NONE => self.check_none_chunk(flags, length)?,
                        kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
                            let error = self.recv_error_chunk(kind, length)?;
                            failure.get_or_insert(error);
                        }
                        kind => {
                            return Err(self.protocol(format!(
                                "a {command} request was answered with chunk type {kind}"
                            )));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        match failure {
            Some((code, message)) => Err(self.command_failed(command, request, code, message)),
            None => Ok(()),
        }
    }

    /// Sends a request followed by its payload (a write's data).
    fn send_request_with(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        let cookie = self.send_request(command, offset, length)?;
        self.send(payload)?;
        Ok(cookie)
    }

    fn send_request(&mut self, command: u16, offset: u64, length: u32) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut request = Vec::with_capacity(28);
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes()); // command flags
        request.extend_from_slice(&command.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        self.send(&request)?;
        Ok(cookie)
    }

    /// Reads the header of a simple reply or of one structured chunk for request `cookie`.
    fn recv_reply(&mut self, cookie: u64) -> Result<Reply, NbdError> {
        let (reply, echoed) = match self.recv_u32()? {
            SIMPLE_REPLY_MAGIC => {
                let error = self.recv_u32()?;
                (Reply::Simple { error }, self.recv_u64()?)
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let flags = self.recv_u16()?;
                let kind = self.recv_u16()?;
                let echoed = self.recv_u64()?;
                let length = self.recv_u32()?;
                (
                    Reply::Chunk {
                        flags,
                        kind,
                        length,
                    },
                    echoed,
                )
            }
            magic => return Err(self.protocol(format!("a reply starts with {magic:#x}"))),
        };
        if echoed != cookie {
            return Err(self.protocol(format!(
                "a reply is for request {echoed}, but request {cookie} is the one in flight"
            )));
        }
        Ok(reply)
    }

    fn command_failed(
        &self,
        command: &'static str,
        request: &Range<u64>,
        code: u32,
        message: String,
    ) -> NbdError {
        NbdError::CommandFailed {
            socket: self.socket.clone(),
            export: self.export.clone(),
            command,
            offset: request.start,
            length: request.end - request.start,
            code,
            message,
        }
    }

    // ---- Bytes on the socket ----

    fn send(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        // BufReader only buffers reading: writes go straight to the socket.
        self.stream
            .get_mut()
            .write_all(bytes)
            .map_err(|e| self.io_error(e))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        self.stream.read_exact(buf).map_err(|e| self.io_error(e))
    }

    fn recv_u16(&mut self) -> Result<u16, NbdError> {
        let mut bytes = [0; 2];
        self.recv(&mut bytes)?;
        Ok(u16::from_be_bytes(bytes))
    }

    fn recv_u32(&mut self) -> Result<u32, NbdError> {
        let mut bytes = [0; 4];
        self.recv(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn recv_u64(&mut self) -> Result<u64, NbdError> {
        let mut bytes = [0; 8];
        self.recv(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Reads a payload of `length` bytes, refusing lengths above `max`.
    fn recv_vec(&mut self, length: u32, max: u32, what: &str) -> Result<Vec<u8>, NbdError> {
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
    fn skip(&mut self, length: u64) -> Result<(), NbdError> {
        let skipped = io::copy(&mut self.stream.by_ref().take(length), &mut io::sink())
            .map_err(|e| self.io_error(e))?;
        if skipped < length {
            return Err(self.io_error(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    // ---- Errors ----

    fn io_error(&self, source: io::Error) -> NbdError {
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

    fn protocol(&self, detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            socket: self.socket.clone(),
            export: self.export.clone(),
            detail: detail.into(),
        }
    }

    fn unsupported(&self, feature: &'static str) -> NbdError {
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
        let _ = self.stream.get_ref().shutdown(Shutdown::Both);
    }
}

/// One reply during option haggling.
struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

/// The header of a reply in the transmission phase.
enum Reply {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, length: u32 },
}

/// Big-endian fields from a reply already in memory; every read is bounds-checked.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// The parts of one read request that reply chunks have filled: sorted, disjoint ranges,
/// with touching neighbours merged (a server replying in order leaves just one).
#[derive(Default)]
struct Coverage {
    ranges: Vec<Range<u64>>,
}

impl Coverage {
    /// Records `range`, which must not overlap anything filled before.
    fn insert(&mut self, range: &Range<u64>) -> Result<(), String> {
        // Ranges before `first` end before `range` starts, without touching it.
        let first = self.ranges.partition_point(|r| r.end < range.start);
        let mut merged = range.clone();
        let mut last = first;
        // At most two neighbours touch `range`: one ending where it starts, one starting
        // where it ends.
        while let Some(r) = self.ranges.get(last) {
            if r.start > range.end {
                break;
            }
            if r.start < range.end && range.start < r.end {
                return Err(format!(
                    "two chunks of a read reply overlap at offset {}",
                    r.start.max(range.start)
                ));
            }
            merged.start = merged.start.min(r.start);
            merged.end = merged.end.max(r.end);
            last += 1;
        }
        if first == last && self.ranges.len() >= MAX_READ_FRAGMENTS {
            return Err(format!(
                "a read reply is split into more than {MAX_READ_FRAGMENTS} separate pieces"
            ));
        }
        self.ranges.splice(first..last, [merged]);
        Ok(())
    }

    fn is_exactly(&self, request: &Range<u64>) -> bool {
        self.ranges.len() == 1 && self.ranges[0] == *request
    }

    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Where `range` (inside `request`) lies in the request's buffer.
fn offset_in(request: &Range<u64>, range: &Range<u64>) -> Range<usize> {
    let index =
        |at: u64| usize::try_from(at - request.start).expect("a read request is at most 32 MiB");
    index(range.start)..index(range.end)
}

/// Appends `extent`, merging it into the last one if they touch and have the same flags.
fn push_extent(extents: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = extents.last_mut()
        && last.end() == extent.offset
        && last.flags == extent.flags
    {
        last.length += extent.length;
    } else {
        extents.push(extent);
    }
}

/// Refuses names the protocol cannot carry, before anything is sent.
fn check_names(socket: &Path, export: &str, meta_contexts: &[&str]) -> Result<(), NbdError> {
    let invalid = |detail: String| NbdError::InvalidArgument {
        socket: socket.to_owned(),
        detail,
    };
    if meta_contexts.len() > MAX_META_CONTEXTS {
        return Err(invalid(format!(
            "{} metadata contexts were asked for, more than the {MAX_META_CONTEXTS} supported",
            meta_contexts.len()
        )));
    }
    for (what, name) in std::iter::once(("export name", export))
        .chain(meta_contexts.iter().map(|&c| ("metadata context", c)))
    {
        if name.len() > MAX_STRING {
            return Err(invalid(format!(
                "the {what} {:?}... is longer than the {MAX_STRING} bytes NBD allows",
                name.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Appends a 32-bit length; the length of everything this client sends fits.
fn put_u32(data: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("check_names bounds every message");
    data.extend_from_slice(&n.to_be_bytes());
}

/// Appends a string with its 32-bit length in front.
fn put_string(data: &mut Vec<u8>, s: &str) {
    put_u32(data, s.len());
    data.extend_from_slice(s.as_bytes());
}

/// A message from the server, made safe to show: valid UTF-8, no control characters.
fn server_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `" (the server says: ...)"`, or nothing when it said nothing.
fn server_said(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" (the server says: {message})")
    }
}

fn option_name(option: u32) -> &'static str {
    match option {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

/// What an `NBD_REP_ERR_*` code means.
fn rep_err_reason(kind: u32) -> String {
    let reason = match kind & !REP_ERR {
        1 => "not supported (NBD_REP_ERR_UNSUP)",
        2 => "forbidden by the server's policy (NBD_REP_ERR_POLICY)",
        3 => "invalid (NBD_REP_ERR_INVALID)",
        4 => "not supported on the server's platform (NBD_REP_ERR_PLATFORM)",
        5 => "TLS is required, which this client does not do (NBD_REP_ERR_TLS_REQD)",
        6 => "no such export (NBD_REP_ERR_UNKNOWN)",
        7 => "the server is shutting down (NBD_REP_ERR_SHUTDOWN)",
        8 => "the server requires block size negotiation (NBD_REP_ERR_BLOCK_SIZE_REQD)",
        9 => "the request is too big (NBD_REP_ERR_TOO_BIG)",
        _ => return format!("error {kind:#x}"),
    };
    reason.to_owned()
}

/// What an NBD error code in the transmission phase means.
fn errno_reason(code: u32) -> String {
    let reason = match code {
        1 => "operation not permitted (NBD_EPERM)",
        5 => "input/output error (NBD_EIO)",
        12 => "out of memory (NBD_ENOMEM)",
        22 => "invalid argument (NBD_EINVAL)",
        28 => "no space left (NBD_ENOSPC)",
        75 => "value too large (NBD_EOVERFLOW)",
        95 => "operation not supported (NBD_ENOTSUP)",
        NBD_ESHUTDOWN => "the server is shutting down (NBD_ESHUTDOWN)",
        _ => return format!("error {code}"),
    };
    reason.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake servers: scripted bytes on one end of a socket pair, to feed the client replies
    /// no real server would send.
    mod fake {
        use super::*;
        use std::thread;

        pub const COOKIE: u64 = 1;

        pub fn greeting() -> Vec<u8> {
            let mut s = Vec::new();
            s.extend_from_slice(&NBDMAGIC.to_be_bytes());
            s.extend_from_slice(&IHAVEOPT.to_be_bytes());
            s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            s
        }

        pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
            let mut s = Vec::new();
            s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&option.to_be_bytes());
            s.extend_from_slice(&kind.to_be_bytes());
            s.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
            s.extend_from_slice(data);
            s
        }

        pub fn info_export(size: u64) -> Vec<u8> {
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            option_reply(OPT_GO, REP_INFO, &info)
        }

        pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
            let mut data = id.to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &data)
        }

        /// A whole successful handshake for an export of `size` bytes selecting `contexts`.
        pub fn handshake(size: u64, contexts: &[(u32, &str)]) -> Vec<u8> {
            let mut s = greeting();
            s.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
            if !contexts.is_empty() {
                for &(id, name) in contexts {
                    s.extend(meta_context(id, name));
                }
                s.extend(option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
            }
            s.extend(info_export(size));
            s.extend(option_reply(OPT_GO, REP_ACK, &[]));
            s
        }

        pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
            chunk_with_length(
                flags,
                kind,
                cookie,
                u32::try_from(payload.len()).unwrap(),
                payload,
            )
        }

        /// A chunk whose header may lie about its length.
        pub fn chunk_with_length(
            flags: u16,
            kind: u16,
            cookie: u64,
            length: u32,
            payload: &[u8],
        ) -> Vec<u8> {
            let mut s = Vec::new();
            s.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&flags.to_be_bytes());
            s.extend_from_slice(&kind.to_be_bytes());
            s.extend_from_slice(&cookie.to_be_bytes());
            s.extend_from_slice(&length.to_be_bytes());
            s.extend_from_slice(payload);
            s
        }

        pub fn data(flags: u16, cookie: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
            let mut payload = offset.to_be_bytes().to_vec();
            payload.extend_from_slice(bytes);
            chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &payload)
        }

        pub fn hole(flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
            let mut payload = offset.to_be_bytes().to_vec();
            payload.extend_from_slice(&length.to_be_bytes());
            chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &payload)
        }

        pub fn status(flags: u16, cookie: u64, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
            let mut payload = id.to_be_bytes().to_vec();
            for &(length, state) in extents {
                payload.extend_from_slice(&length.to_be_bytes());
                payload.extend_from_slice(&state.to_be_bytes());
            }
            chunk(flags, REPLY_TYPE_BLOCK_STATUS, cookie, &payload)
        }

        pub fn error(flags: u16, cookie: u64, code: u32, message: &str) -> Vec<u8> {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(&u16::try_from(message.len()).unwrap().to_be_bytes());
            payload.extend_from_slice(message.as_bytes());
            chunk(flags, REPLY_TYPE_ERROR_BIT | 1, cookie, &payload)
        }

        pub fn none(cookie: u64) -> Vec<u8> {
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
        }

        pub fn simple(error: u32, cookie: u64) -> Vec<u8> {
            let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            s.extend_from_slice(&error.to_be_bytes());
            s.extend_from_slice(&cookie.to_be_bytes());
            s
        }

        /// Runs the handshake against a server that sends `script` and then nothing more
        /// (reads past its end see end-of-file rather than hang). What the client sends is
        /// read and ignored.
        pub fn connect(script: Vec<u8>, contexts: &[&str]) -> Result<NbdClient, NbdError> {
            let (client, mut server) = UnixStream::pair().unwrap();
            thread::spawn(move || {
                let _ = server.write_all(&script);
                let _ = server.shutdown(Shutdown::Write);
                let _ = io::copy(&mut server, &mut io::sink());
            });
            NbdClient::negotiate(client, Path::new("/run/fake.sock"), "vda", contexts)
        }
    }

    fn is_protocol(error: &NbdError) -> bool {
        matches!(error, NbdError::Protocol { .. })
    }

    #[test]
    fn a_well_behaved_server_is_understood() {
        let context = &[(7, BASE_ALLOCATION), (9, "qemu:dirty-bitmap:b0")][..];
        let mut script = fake::handshake(1 << 20, context);
        // A read answered out of order, with a hole, then the final NONE chunk.
        script.extend(fake::data(0, 1, 2048, &[0xbb; 2048]));
        script.extend(fake::hole(0, 1, 0, 1024));
        script.extend(fake::data(0, 1, 1024, &[0xaa; 1024]));
        script.extend(fake::none(1));
        // A simple reply is accepted too.
        script.extend(fake::simple(0, 2));
        script.extend_from_slice(&[0xcc; 16]);
        // Status of 8192 bytes at 4096: the other context's chunk comes first; the server
        // describes only 3072 bytes, then the rest with a last extent reaching beyond.
        script.extend(fake::status(0, 3, 9, &[(4096, 1)]));
        script.extend(fake::status(REPLY_FLAG_DONE, 3, 7, &[(1024, 3), (2048, 0)]));
        script.extend(fake::status(0, 4, 7, &[(512, 0), (1 << 20, 3)]));
        script.extend(fake::status(REPLY_FLAG_DONE, 4, 9, &[(4096, 0)]));

        let contexts = [BASE_ALLOCATION, "qemu:dirty-bitmap:b0"];
        let mut client = fake::connect(script, &contexts).unwrap();
        assert_eq!(client.size_bytes(), 1 << 20);

        let mut buf = vec![0xff; 4096];
        client.read_at(0, &mut buf).unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 0));
        assert!(buf[1024..2048].iter().all(|&b| b == 0xaa));
        assert!(buf[2048..].iter().all(|&b| b == 0xbb));

        let mut small = [0; 16];
        client.read_at(100, &mut small).unwrap();
        assert_eq!(small, [0xcc; 16]);

        let extents = client.block_status(BASE_ALLOCATION, 4096, 8192).unwrap();
        let expected = [
            Extent {
                offset: 4096,
                length: 1024,
                flags: 3,
            },
            Extent {
                offset: 5120,
                length: 2560,
                flags: 0,
            },
            Extent {
                offset: 7680,
                length: 4608,
                flags: 3,
            },
        ];
        assert_eq!(extents, expected);
        client.close().unwrap();
    }

    #[test]
    #[allow(clippy::too_many_lines)] // a table of cases
    fn broken_handshakes_are_errors() {
        type Expected = fn(&NbdError) -> bool;
        let go_ack = fake::option_reply(OPT_GO, REP_ACK, &[]);
        let structured_ack = fake::option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let with_greeting = |rest: &[Vec<u8>]| {
            let mut s = fake::greeting();
            s.extend(structured_ack.clone());
            s.extend(rest.concat());
            s
        };
        let mut oldstyle = NBDMAGIC.to_be_bytes().to_vec();
        oldstyle.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        let mut not_fixed = fake::greeting();
        not_fixed.truncate(16);
        not_fixed.extend_from_slice(&0u16.to_be_bytes());
        let mut huge_reply = fake::greeting();
        huge_reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        huge_reply.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        huge_reply.extend_from_slice(&REP_ACK.to_be_bytes());
        huge_reply.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut short_export_info = INFO_EXPORT.to_be_bytes().to_vec();
        short_export_info.extend_from_slice(&[0; 7]);

        let cases: Vec<(&str, Vec<u8>, &[&str], Expected)> = vec![
            ("nothing at all", vec![], &[], |e| {
                matches!(e, NbdError::Disconnected { .. })
            }),
            (
                "not NBD",
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                &[],
                is_protocol,
            ),
            ("oldstyle", oldstyle, &[], |e| {
                matches!(e, NbdError::Unsupported { .. })
            }),
            ("not fixed newstyle", not_fixed, &[], |e| {
                matches!(e, NbdError::Unsupported { .. })
            }),
            (
                "cut in the greeting",
                fake::greeting()[..12].to_vec(),
                &[],
                |e| matches!(e, NbdError::Disconnected { .. }),
            ),
            ("a 4 GiB option reply", huge_reply, &[], is_protocol),
            (
                "a reply to another option",
                with_greeting(&[fake::option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])]),
                &[],
                is_protocol,
            ),
            (
                "no export size",
                with_greeting(std::slice::from_ref(&go_ack)),
                &[],
                is_protocol,
            ),
            (
                "a short NBD_INFO_EXPORT",
                with_greeting(&[fake::option_reply(OPT_GO, REP_INFO, &short_export_info)]),
                &[],
                is_protocol,
            ),
            (
                "an empty NBD_REP_INFO",
                with_greeting(&[fake::option_reply(OPT_GO, REP_INFO, &[])]),
                &[],
                is_protocol,
            ),
            (
                "an unknown reply type",
                with_greeting(&[fake::option_reply(OPT_GO, 77, &[])]),
                &[],
                is_protocol,
            ),
            (
                "a context name that is not UTF-8",
                with_greeting(&[fake::option_reply(
                    OPT_SET_META_CONTEXT,
                    REP_META_CONTEXT,
                    &[0, 0, 0, 1, 0xff, 0xfe],
                )]),
                &[BASE_ALLOCATION],
                is_protocol,
            ),
            (
                "a short context reply",
                with_greeting(&[fake::option_reply(
                    OPT_SET_META_CONTEXT,
                    REP_META_CONTEXT,
                    &[0],
                )]),
                &[BASE_ALLOCATION],
                is_protocol,
            ),
            (
                "more contexts than asked",
                with_greeting(&[fake::meta_context(1, "a:b"), fake::meta_context(2, "c:d")]),
                &[BASE_ALLOCATION],
                is_protocol,
            ),
            (
                "the same context id twice",
                with_greeting(&[fake::meta_context(1, "a:b"), fake::meta_context(1, "c:d")]),
                &[BASE_ALLOCATION, "qemu:dirty-bitmap:b0"],
                is_protocol,
            ),
            (
                "TLS required",
                with_greeting(&[fake::option_reply(OPT_GO, REP_ERR | 5, b"use TLS")]),
                &[],
                |e| matches!(e, NbdError::Refused { .. }),
            ),
            (
                "no NBD_OPT_GO",
                with_greeting(&[fake::option_reply(OPT_GO, REP_ERR_UNSUP, &[])]),
                &[],
                |e| matches!(e, NbdError::Unsupported { .. }),
            ),
        ];
        for (what, script, contexts, expected) in cases {
            let error = fake::connect(script, contexts).expect_err(what);
            assert!(expected(&error), "{what}: unexpected error {error:?}");
            assert!(
                error.to_string().contains("/run/fake.sock"),
                "{what}: {error}"
            );
        }
    }

    #[test]
    fn unknown_exports_are_named_and_messages_sanitised() {
        let mut script = fake::greeting();
        script.extend(fake::option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        script.extend(fake::option_reply(
            OPT_GO,
            REP_ERR_UNKNOWN,
            b"export 'vda' not present\x1b[31m",
        ));
        let error = fake::connect(script, &[]).unwrap_err();
        assert!(
            matches!(error, NbdError::ExportNotFound { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the NBD server at /run/fake.sock does not offer export \"vda\" \
             (the server says: export 'vda' not present [31m)"
        );
    }

    #[test]
    fn a_server_without_structured_replies_can_still_be_read() {
        let mut script = fake::greeting();
        script.extend(fake::option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
        script.extend(fake::info_export(4096));
        script.extend(fake::option_reply(OPT_GO, REP_ACK, &[]));
        script.extend(fake::simple(0, 1));
        script.extend_from_slice(&[7; 512]);
        let mut client = fake::connect(script.clone(), &[]).unwrap();
        let mut buf = [0; 512];
        client.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [7; 512]);

        // Metadata contexts need structured replies.
        let error = fake::connect(script, &[BASE_ALLOCATION]).unwrap_err();
        assert!(matches!(error, NbdError::Unsupported { .. }), "{error:?}");
    }

    #[test]
    #[allow(clippy::too_many_lines)] // a table of cases
    fn malformed_read_replies_are_errors_and_end_the_connection() {
        use fake::{COOKIE, chunk, chunk_with_length, data, hole};
        const DONE: u16 = REPLY_FLAG_DONE;
        let mut unknown_error_too_long = 5u32.to_be_bytes().to_vec();
        unknown_error_too_long.extend_from_slice(&100u16.to_be_bytes());
        unknown_error_too_long.extend_from_slice(b"short");

        // Each reply answers a read of 4096 bytes at offset 4096.
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "data longer than asked",
                data(DONE, COOKIE, 4096, &[1; 8192]),
            ),
            ("data before the request", data(DONE, COOKIE, 0, &[1; 4096])),
            (
                "data past the request",
                data(DONE, COOKIE, 8000, &[1; 4096]),
            ),
            (
                "data at offset 2^64 - 1",
                data(DONE, COOKIE, u64::MAX, &[1; 16]),
            ),
            (
                "a 4 GiB data chunk",
                chunk_with_length(DONE, REPLY_TYPE_OFFSET_DATA, COOKIE, u32::MAX, &[0; 8]),
            ),
            (
                "a data chunk without data",
                chunk(DONE, REPLY_TYPE_OFFSET_DATA, COOKIE, &[0; 8]),
            ),
            (
                "a data chunk cut short",
                data(DONE, COOKIE, 4096, &[1; 4096])[..100].to_vec(),
            ),
            (
                "overlapping chunks",
                [
                    data(0, COOKIE, 4096, &[1; 2048]),
                    data(DONE, COOKIE, 5000, &[1; 3192]),
                ]
                .concat(),
            ),
            (
                "a hole overlapping data",
                [
                    data(0, COOKIE, 4096, &[1; 4096]),
                    hole(DONE, COOKIE, 8000, 100),
                ]
                .concat(),
            ),
            ("a hole of length 0", hole(DONE, COOKIE, 4096, 0)),
            (
                "a hole past the request",
                hole(DONE, COOKIE, 4096, u32::MAX),
            ),
            (
                "a hole chunk of the wrong size",
                chunk(DONE, REPLY_TYPE_OFFSET_HOLE, COOKIE, &[0; 16]),
            ),
            (
                "success with too little data",
                data(DONE, COOKIE, 4096, &[1; 4095]),
            ),
            ("success with nothing", fake::none(COOKIE)),
            (
                "a NONE chunk that is not last",
                [chunk(0, REPLY_TYPE_NONE, COOKIE, &[]), fake::none(COOKIE)].concat(),
            ),
            (
                "a NONE chunk with a payload",
                chunk(DONE, REPLY_TYPE_NONE, COOKIE, &[0; 4]),
            ),
            ("another request's reply", data(DONE, 99, 4096, &[1; 4096])),
            (
                "a status chunk",
                fake::status(DONE, COOKIE, 1, &[(4096, 0)]),
            ),
            ("an unknown chunk type", chunk(DONE, 42, COOKIE, &[])),
            (
                "an error chunk too short",
                chunk(DONE, REPLY_TYPE_ERROR_BIT | 1, COOKIE, &[0, 0, 0, 5]),
            ),
            (
                "an error message longer than its chunk",
                chunk(
                    DONE,
                    REPLY_TYPE_ERROR_BIT | 9,
                    COOKIE,
                    &unknown_error_too_long,
                ),
            ),
            (
                "a 4 GiB error chunk",
                chunk_with_length(DONE, REPLY_TYPE_ERROR_BIT | 1, COOKIE, u32::MAX, &[]),
            ),
            (
                "an error offset without its offset",
                chunk(
                    DONE,
                    REPLY_TYPE_ERROR_OFFSET,
                    COOKIE,
                    &[0, 0, 0, 5, 0, 0, 1, 2],
                ),
            ),
            ("bad reply magic", b"garbage garbage garbage".to_vec()),
            ("end of file", vec![]),
        ];
        for (what, reply) in cases {
            let mut script = fake::handshake(1 << 20, &[]);
            script.extend(reply);
            let mut client = fake::connect(script, &[]).unwrap();
            let mut buf = vec![0; 4096];
            let error = client.read_at(4096, &mut buf).expect_err(what);
            assert!(
                matches!(
                    error,
                    NbdError::Protocol { .. } | NbdError::Disconnected { .. }
                ),
                "{what}: unexpected error {error:?}"
            );
            let again = client.read_at(4096, &mut buf).expect_err(what);
            assert!(
                matches!(again, NbdError::Unusable { .. }),
                "{what}: {again:?}"
            );
        }
    }

    #[test]
    fn write_and_flush_replies_errors_and_protocol_breaks() {
        let mut script = fake::handshake(1 << 20, &[]);
        script.extend(fake::none(1)); // write 1: done
        script.extend(fake::simple(0, 2)); // flush 2: a simple reply is fine too
        script.extend(fake::error(REPLY_FLAG_DONE, 3, 28, "no space")); // write 3
        script.extend(fake::simple(0, 4)); // write 4, after the error
        script.extend(fake::data(REPLY_FLAG_DONE, 5, 0, &[9; 16])); // data for a flush
        let mut client = fake::connect(script, &[]).unwrap();
        client.write_at(0, &[7; 100]).unwrap();
        client.flush().unwrap();
        let error = client.write_at(4096, &[7; 100]).unwrap_err();
        assert!(
            matches!(
                error,
                NbdError::CommandFailed {
                    code: 28,
                    command: "write",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("no space"), "{error}");
        client.write_at(0, &[7; 10]).unwrap();
        let error = client.flush().unwrap_err();
        assert!(matches!(error, NbdError::Protocol { .. }), "{error:?}");
        assert!(matches!(
            client.flush().unwrap_err(),
            NbdError::Unusable { .. }
        ));
    }

    #[test]
    fn server_errors_keep_the_connection_usable() {
        let mut script = fake::handshake(1 << 20, &[(1, BASE_ALLOCATION)]);
        // An error chunk between data chunks, then success on the next request.
        script.extend(fake::data(0, 1, 0, &[1; 512]));
        script.extend(fake::error(0, 1, 5, "disk on fire"));
        script.extend(fake::hole(0, 1, 512, 512));
        script.extend(fake::none(1));
        script.extend(fake::data(REPLY_FLAG_DONE, 2, 0, &[2; 1024]));
        // A simple error reply to a status request, an error chunk with an offset.
        script.extend(fake::simple(22, 3));
        let mut error_offset = 5u32.to_be_bytes().to_vec();
        error_offset.extend_from_slice(&0u16.to_be_bytes());
        error_offset.extend_from_slice(&4096u64.to_be_bytes());
        script.extend(fake::chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR_OFFSET,
            4,
            &error_offset,
        ));
        // The server shuts down: the client says goodbye and is done.
        script.extend(fake::error(REPLY_FLAG_DONE, 5, NBD_ESHUTDOWN, ""));

        let mut client = fake::connect(script, &[BASE_ALLOCATION]).unwrap();
        let mut buf = vec![0; 1024];
        let error = client.read_at(0, &mut buf).unwrap_err();
        assert!(
            matches!(error, NbdError::CommandFailed { code: 5, .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the NBD server at /run/fake.sock failed to read 1024 bytes at offset 0 of export \
             \"vda\": input/output error (NBD_EIO) (the server says: disk on fire)"
        );
        client.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [2; 1024]);

        let error = client.block_status(BASE_ALLOCATION, 0, 4096).unwrap_err();
        assert!(
            matches!(error, NbdError::CommandFailed { code: 22, .. }),
            "{error:?}"
        );
        let error = client.read_at(4096, &mut buf).unwrap_err();
        assert!(error.to_string().contains("at offset 4096"), "{error}");

        let error = client.read_at(0, &mut buf).unwrap_err();
        assert!(matches!(
            error,
            NbdError::CommandFailed {
                code: NBD_ESHUTDOWN,
                ..
            }
        ));
        let error = client.read_at(0, &mut buf).unwrap_err();
        assert!(matches!(error, NbdError::Unusable { .. }), "{error:?}");
    }

    #[test]
    fn malformed_status_replies_are_errors_and_end_the_connection() {
        use fake::{COOKIE, chunk, chunk_with_length, status};
        const DONE: u16 = REPLY_FLAG_DONE;
        // Each reply answers a status request for 4096 bytes at offset 0, contexts 1 and 2.
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no extents", status(DONE, COOKIE, 1, &[])),
            (
                "a ragged chunk",
                chunk(
                    DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    COOKIE,
                    &[0, 0, 0, 1, 0, 0, 16, 0, 0],
                ),
            ),
            (
                "an extent of length 0",
                status(DONE, COOKIE, 1, &[(0, 0), (4096, 0)]),
            ),
            (
                "extents after the range",
                status(DONE, COOKIE, 1, &[(4096, 0), (512, 1)]),
            ),
            (
                "more extents than bytes asked for",
                chunk_with_length(
                    DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    COOKIE,
                    4 + 8 * 4097,
                    &[0, 0, 0, 1],
                ),
            ),
            (
                "a 4 GiB chunk",
                chunk_with_length(
                    DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    COOKIE,
                    u32::MAX - 3,
                    &[0, 0, 0, 1],
                ),
            ),
            ("an unknown context", status(DONE, COOKIE, 3, &[(4096, 0)])),
            (
                "the same context twice",
                [
                    status(0, COOKIE, 1, &[(4096, 0)]),
                    status(DONE, COOKIE, 1, &[(4096, 0)]),
                ]
                .concat(),
            ),
            (
                "no chunk for the context",
                [status(0, COOKIE, 2, &[(4096, 0)]), fake::none(COOKIE)].concat(),
            ),
            ("a simple reply without extents", fake::simple(0, COOKIE)),
            ("a data chunk", fake::data(DONE, COOKIE, 0, &[0; 16])),
            (
                "cut short",
                status(DONE, COOKIE, 1, &[(1024, 0), (3072, 1)])[..30].to_vec(),
            ),
        ];
        for (what, reply) in cases {
            let mut script = fake::handshake(1 << 20, &[(1, BASE_ALLOCATION), (2, "x-a:b")]);
            script.extend(reply);
            let mut client = fake::connect(script, &[BASE_ALLOCATION, "x-a:b"]).unwrap();
            let error = client
                .block_status(BASE_ALLOCATION, 0, 4096)
                .expect_err(what);
            assert!(
                matches!(
                    error,
                    NbdError::Protocol { .. } | NbdError::Disconnected { .. }
                ),
                "{what}: unexpected error {error:?}"
            );
            let again = client
                .block_status(BASE_ALLOCATION, 0, 4096)
                .expect_err(what);
            assert!(
                matches!(again, NbdError::Unusable { .. }),
                "{what}: {again:?}"
            );
        }
    }

    #[test]
    fn requests_outside_the_export_or_context_list_are_refused_locally() {
        let script = fake::handshake(4096, &[(1, BASE_ALLOCATION)]);
        let contexts = [BASE_ALLOCATION, "qemu:dirty-bitmap:b0"];
        let mut client = fake::connect(script, &contexts).unwrap();
        let mut buf = [0; 16];
        let error = client.read_at(4090, &mut buf).unwrap_err();
        assert!(matches!(error, NbdError::OutOfRange { .. }), "{error:?}");
        let error = client.read_at(u64::MAX, &mut buf).unwrap_err();
        assert!(matches!(error, NbdError::OutOfRange { .. }), "{error:?}");
        let error = client.block_status(BASE_ALLOCATION, 4096, 1).unwrap_err();
        assert!(matches!(error, NbdError::OutOfRange { .. }), "{error:?}");
        let error = client
            .block_status("qemu:dirty-bitmap:b0", 0, 4096)
            .unwrap_err();
        assert!(
            matches!(error, NbdError::ContextNotOffered { .. }),
            "{error:?}"
        );
        let error = client
            .block_status("qemu:dirty-bitmap:b1", 0, 4096)
            .unwrap_err();
        assert!(
            matches!(error, NbdError::ContextNotRequested { .. }),
            "{error:?}"
        );
        // Nothing was sent, so the connection is still fine; empty requests send nothing.
        client.read_at(4096, &mut []).unwrap();
        assert_eq!(client.block_status(BASE_ALLOCATION, 100, 0).unwrap(), []);

        let long = "x".repeat(MAX_STRING + 1);
        let error = NbdClient::connect(Path::new("/nonexistent"), &long, &[]).unwrap_err();
        assert!(
            matches!(error, NbdError::InvalidArgument { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn coverage_tracks_pieces_in_any_order() {
        let mut c = Coverage::default();
        c.insert(&(10..20)).unwrap();
        c.insert(&(30..40)).unwrap();
        assert!(c.insert(&(15..16)).is_err());
        assert!(c.insert(&(19..31)).is_err());
        assert!(c.insert(&(0..11)).is_err());
        assert!(c.insert(&(5..45)).is_err());
        c.insert(&(20..30)).unwrap();
        assert!(c.is_exactly(&(10..40)));
        c.insert(&(0..10)).unwrap();
        c.insert(&(40..50)).unwrap();
        assert!(c.is_exactly(&(0..50)));
        assert_eq!(c.bytes(), 50);

        let mut c = Coverage::default();
        for i in 0..MAX_READ_FRAGMENTS as u64 {
            c.insert(&(i * 2..i * 2 + 1)).unwrap();
        }
        assert!(c.insert(&(u64::MAX - 1..u64::MAX)).is_err());
    }

    /// Tests against a real `qemu-nbd` (package qemu-utils).
    mod qemu {
        use super::*;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        const MIB: u64 = 1 << 20;
        const KIB_64: u64 = 64 << 10;

        /// A `qemu-nbd` serving one image read-only as export `vda`; killed when dropped, so
        /// that no server outlives a failed test.
        struct Server {
            child: Child,
            socket: PathBuf,
        }

        impl Server {
            fn start(dir: &Path, format: &str, image: &Path, extra: &[&str]) -> Server {
                let mut args = vec!["--read-only"];
                args.extend_from_slice(extra);
                Self::start_writable(dir, format, image, &args)
            }

            /// Like [`Server::start`], but writable unless `extra` says `--read-only`.
            fn start_writable(dir: &Path, format: &str, image: &Path, extra: &[&str]) -> Server {
                let socket = dir.join("nbd.sock");
                let child = Command::new("qemu-nbd")
                    .arg(format!("--socket={}", socket.display()))
                    .arg(format!("--format={format}"))
                    .args(["--persistent", "--shared=4", "--export-name=vda"])
                    .args(extra)
                    .arg(image)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("cannot start qemu-nbd: install qemu-utils");
                let mut server = Server { child, socket };
                let deadline = Instant::now() + Duration::from_secs(10);
                while !server.socket.exists() {
                    if let Some(status) = server.child.try_wait().unwrap() {
                        let mut stderr = String::new();
                        let _ = server
                            .child
                            .stderr
                            .take()
                            .unwrap()
                            .read_to_string(&mut stderr);
                        panic!("qemu-nbd exited with {status}: {stderr}");
                    }
                    assert!(Instant::now() < deadline, "qemu-nbd made no socket in 10 s");
                    std::thread::sleep(Duration::from_millis(10));
                }
                server
            }

            fn connect(&self, contexts: &[&str]) -> NbdClient {
                // The socket file appears just before qemu-nbd listens on it.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    match NbdClient::connect(&self.socket, "vda", contexts) {
                        Err(NbdError::Connect { source, .. })
                            if source.kind() == io::ErrorKind::ConnectionRefused
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        result => return result.unwrap(),
                    }
                }
            }
        }

        impl Drop for Server {
            fn drop(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        fn run(command: &mut Command) {
            let output = command
                .output()
                .unwrap_or_else(|e| panic!("{command:?}: {e}"));
            assert!(
                output.status.success(),
                "{command:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }

        /// Creates an image of `size` bytes and writes `(pattern, offset, length)` runs into
        /// it with qemu-io, returning the bytes it must then hold.
        fn image(
            path: &Path,
            format: &str,
            size: u64,
            bitmap: Option<&str>,
            writes: &[(u8, u64, u64)],
        ) -> Vec<u8> {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", format])
                .arg(path)
                .arg(size.to_string()));
            if let Some(bitmap) = bitmap {
                run(Command::new("qemu-img")
                    .args(["bitmap", "--add"])
                    .arg(path)
                    .arg(bitmap));
            }
            let mut expected = vec![0; usize::try_from(size).unwrap()];
            let mut qemu_io = Command::new("qemu-io");
            qemu_io.args(["-f", format]);
            for &(pattern, offset, length) in writes {
                qemu_io
                    .arg("-c")
                    .arg(format!("write -q -P {pattern:#x} {offset} {length}"));
                expected
                    [usize::try_from(offset).unwrap()..usize::try_from(offset + length).unwrap()]
                    .fill(pattern);
            }
            run(qemu_io.arg(path));
            expected
        }

        fn extent(offset: u64, length: u64, flags: u32) -> Extent {
            Extent {
                offset,
                length,
                flags,
            }
        }

        #[test]
        fn writes_and_flush_reach_the_image_and_read_only_exports_refuse_them() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.qcow2");
            let size = 8 * MIB;
            let mut expected = image(&path, "qcow2", size, None, &[(0x11, 0, KIB_64)]);
            {
                let server = Server::start_writable(dir.path(), "qcow2", &path, &[]);
                let mut nbd = server.connect(&[]);
                // Unaligned, across a cluster boundary, and up to the last byte.
                let writes: [(u64, Vec<u8>); 3] = [
                    (MIB - 100, vec![0xab; 70_000]),
                    (3 * MIB, (0..=255u8).cycle().take(2 << 20).collect()),
                    (size - 10, vec![0xcd; 10]),
                ];
                for (offset, data) in &writes {
                    nbd.write_at(*offset, data).unwrap();
                    let at = usize::try_from(*offset).unwrap();
                    expected[at..at + data.len()].copy_from_slice(data);
                }
                nbd.flush().unwrap();
                let mut back = vec![0; usize::try_from(size).unwrap()];
                nbd.read_at(0, &mut back).unwrap();
                assert!(back == expected, "reads after writes differ");
                let err = nbd.write_at(size - 1, &[1, 2]).unwrap_err();
                assert!(matches!(err, NbdError::OutOfRange { .. }), "{err}");
                nbd.close().unwrap();
            }
            // The image itself holds the writes (read by qemu-img, not through the server).
            let raw = dir.path().join("back.raw");
            run(Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&path)
                .arg(&raw));
            assert!(
                std::fs::read(&raw).unwrap() == expected,
                "the image differs"
            );

            let server = Server::start(dir.path(), "qcow2", &path, &[]);
            let mut nbd = server.connect(&[]);
            let err = nbd.write_at(0, &[1]).unwrap_err();
            assert!(matches!(err, NbdError::ReadOnly { .. }), "{err}");
            assert!(err.to_string().contains("read-only"), "{err}");
            let mut first = [0u8; 4];
            nbd.read_at(0, &mut first).unwrap();
            assert_eq!(first, [0x11; 4], "still usable after the refusal");
        }

        #[test]
        fn raw_image_reads_and_allocation() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.raw");
            let size = 8 * MIB;
            let expected = image(&path, "raw", size, None, &[(0xab, MIB, KIB_64)]);
            let server = Server::start(dir.path(), "raw", &path, &[]);
            let mut client = server.connect(&[BASE_ALLOCATION]);
            assert_eq!(client.size_bytes(), size);

            let mut buf = vec![0x55; expected.len()];
            client.read_at(0, &mut buf).unwrap();
            assert!(
                buf == expected,
                "the export's bytes differ from what was written"
            );
            let mut piece = [0; 300];
            client.read_at(MIB - 100, &mut piece).unwrap();
            assert_eq!(piece[..], expected[1024 * 1024 - 100..1024 * 1024 + 200]);

            let extents = client.block_status(BASE_ALLOCATION, 0, size).unwrap();
            let unwritten = STATE_HOLE | STATE_ZERO;
            assert_eq!(
                extents,
                [
                    // `qemu-img create` allocates the first 4 KiB of a raw image (for
                    // QEMU's O_DIRECT alignment probing): data, though it reads as zeroes.
                    extent(0, 4096, 0),
                    extent(4096, MIB - 4096, unwritten),
                    extent(MIB, KIB_64, 0),
                    extent(MIB + KIB_64, size - MIB - KIB_64, unwritten),
                ]
            );
            client.close().unwrap();
        }

        #[test]
        fn qcow2_image_reads_in_pieces_and_allocation() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.qcow2");
            let size = 40 * MIB;
            // The 2 MiB run crosses the 32 MiB boundary of read requests.
            let writes = [
                (0xab, MIB, KIB_64),
                (0xcd, 31 * MIB, 2 * MIB),
                (0xef, size - KIB_64, KIB_64),
            ];
            let expected = image(&path, "qcow2", size, None, &writes);
            let converted = dir.path().join("converted.raw");
            run(Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&path)
                .arg(&converted));
            assert!(std::fs::read(&converted).unwrap() == expected);

            let server = Server::start(dir.path(), "qcow2", &path, &[]);
            let mut client = server.connect(&[BASE_ALLOCATION]);
            assert_eq!(client.size_bytes(), size);
            let mut buf = vec![0x55; expected.len()];
            client.read_at(0, &mut buf).unwrap();
            assert!(
                buf == expected,
                "the export's bytes differ from what was written"
            );

            let unwritten = STATE_HOLE | STATE_ZERO;
            let extents = client.block_status(BASE_ALLOCATION, 0, size).unwrap();
            assert_eq!(
                extents,
                [
                    extent(0, MIB, unwritten),
                    extent(MIB, KIB_64, 0),
                    extent(MIB + KIB_64, 30 * MIB - KIB_64, unwritten),
                    extent(31 * MIB, 2 * MIB, 0),
                    extent(33 * MIB, size - 33 * MIB - KIB_64, unwritten),
                    extent(size - KIB_64, KIB_64, 0),
                ]
            );
            // A range that starts and ends inside extents comes back clipped to it.
            let extents = client
                .block_status(BASE_ALLOCATION, MIB - 4096, 8192)
                .unwrap();
            assert_eq!(
                extents,
                [extent(MIB - 4096, 4096, unwritten), extent(MIB, 4096, 0)]
            );
        }

        #[test]
        fn dirty_bitmap_names_exactly_the_written_clusters() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.qcow2");
            let size = 8 * MIB;
            // qemu-io opens the image with the bitmap enabled, so its writes mark it.
            let writes = [
                (0xab, MIB, KIB_64),
                (0x01, 3 * MIB + 512, 4096),
                (0x02, 5 * MIB - 1024, 2048),
            ];
            image(&path, "qcow2", size, Some("b0"), &writes);
            let server = Server::start(dir.path(), "qcow2", &path, &["--bitmap=b0"]);
            let bitmap = dirty_bitmap_context("b0");
            let mut client = server.connect(&[BASE_ALLOCATION, &bitmap]);

            let dirty = client.block_status(&bitmap, 0, size).unwrap();
            assert_eq!(
                dirty,
                [
                    extent(0, MIB, 0),
                    extent(MIB, KIB_64, STATE_DIRTY),
                    extent(MIB + KIB_64, 2 * MIB - KIB_64, 0),
                    extent(3 * MIB, KIB_64, STATE_DIRTY),
                    extent(3 * MIB + KIB_64, 2 * MIB - 2 * KIB_64, 0),
                    extent(5 * MIB - KIB_64, 2 * KIB_64, STATE_DIRTY),
                    extent(5 * MIB + KIB_64, 3 * MIB - KIB_64, 0),
                ]
            );
            assert!(dirty[1].has(STATE_DIRTY) && !dirty[0].has(STATE_DIRTY));
            // The other context works on the same connection.
            let allocation = client.block_status(BASE_ALLOCATION, 0, MIB + 1).unwrap();
            assert_eq!(
                allocation,
                [extent(0, MIB, STATE_HOLE | STATE_ZERO), extent(MIB, 1, 0)]
            );
        }

        #[test]
        fn errors_name_what_is_missing() {
            let dir = tempfile::tempdir().unwrap();
            let missing = dir.path().join("missing.sock");
            let error = NbdClient::connect(&missing, "vda", &[]).unwrap_err();
            assert!(matches!(error, NbdError::Connect { .. }), "{error:?}");
            assert!(
                error.to_string().contains(&missing.display().to_string()),
                "{error}"
            );

            let path = dir.path().join("disk.qcow2");
            image(&path, "qcow2", MIB, Some("b0"), &[]);
            // Exported without --bitmap: the bitmap's context is not offered.
            let server = Server::start(dir.path(), "qcow2", &path, &[]);
            for contexts in [&[][..], &[BASE_ALLOCATION][..]] {
                let error = NbdClient::connect(&server.socket, "nope", contexts).unwrap_err();
                assert!(
                    matches!(error, NbdError::ExportNotFound { .. }),
                    "{error:?}"
                );
                let message = error.to_string();
                assert!(
                    message.contains("does not offer export \"nope\""),
                    "{message}"
                );
                assert!(
                    message.contains(&server.socket.display().to_string()),
                    "{message}"
                );
            }

            let bitmap = dirty_bitmap_context("b0");
            let mut client = server.connect(&[BASE_ALLOCATION, &bitmap]);
            let error = client.block_status(&bitmap, 0, MIB).unwrap_err();
            assert!(
                matches!(error, NbdError::ContextNotOffered { .. }),
                "{error:?}"
            );
            assert!(
                error.to_string().contains("\"qemu:dirty-bitmap:b0\""),
                "{error}"
            );
            let error = client
                .block_status("qemu:dirty-bitmap:b1", 0, MIB)
                .unwrap_err();
            assert!(
                matches!(error, NbdError::ContextNotRequested { .. }),
                "{error:?}"
            );
            let error = client.read_at(MIB - 1, &mut [0; 2]).unwrap_err();
            assert!(matches!(error, NbdError::OutOfRange { .. }), "{error:?}");
            // None of these spoil the connection.
            assert_eq!(
                client.block_status(BASE_ALLOCATION, 0, MIB).unwrap(),
                [extent(0, MIB, 3)]
            );
            drop(client);

            // A second connection after the first said goodbye.
            let mut client = server.connect(&[]);
            let mut buf = [1; 512];
            client.read_at(MIB - 512, &mut buf).unwrap();
            assert_eq!(buf, [0; 512]);
            let error = client.block_status(BASE_ALLOCATION, 0, MIB).unwrap_err();
            assert!(
                matches!(error, NbdError::ContextNotRequested { .. }),
                "{error:?}"
            );
        }
    }

    mod arbitrary_replies {
        use super::*;
        use proptest::prelude::*;

        /// A reply chunk for request 1, often well-formed in its framing, with contents that
        /// are anything.
        fn chunk() -> impl Strategy<Value = Vec<u8>> {
            let payload = prop_oneof![
                (0u64..8192, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
                    |(offset, bytes)| (
                        REPLY_TYPE_OFFSET_DATA,
                        [&offset.to_be_bytes()[..], &bytes].concat()
                    )
                ),
                (0u64..8192, 0u32..8192).prop_map(|(offset, length)| (
                    REPLY_TYPE_OFFSET_HOLE,
                    [&offset.to_be_bytes()[..], &length.to_be_bytes()].concat()
                )),
                (
                    0u32..3,
                    proptest::collection::vec((0u32..5000, 0u32..4), 0..4)
                )
                    .prop_map(|(id, extents)| {
                        let mut p = id.to_be_bytes().to_vec();
                        for (length, flags) in extents {
                            p.extend_from_slice(&length.to_be_bytes());
                            p.extend_from_slice(&flags.to_be_bytes());
                        }
                        (REPLY_TYPE_BLOCK_STATUS, p)
                    }),
                (
                    prop_oneof![
                        Just(REPLY_TYPE_ERROR_BIT | 1),
                        Just(REPLY_TYPE_ERROR_OFFSET),
                        Just(REPLY_TYPE_NONE),
                        any::<u16>()
                    ],
                    proptest::collection::vec(any::<u8>(), 0..32)
                ),
            ];
            (
                0u16..2,
                payload,
                prop::option::weighted(0.1, any::<u32>()),
                prop::bool::weighted(0.05),
            )
                .prop_map(|(flags, (kind, payload), lie, simple)| {
                    if simple {
                        return fake::simple(u32::from(flags), 1);
                    }
                    let length = lie.unwrap_or(u32::try_from(payload.len()).unwrap());
                    fake::chunk_with_length(flags, kind, 1, length, &payload)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn never_panic(chunks in proptest::collection::vec(chunk(), 0..6), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
                let contexts = [(1, BASE_ALLOCATION), (2, "x-a:b")];
                let names = [BASE_ALLOCATION, "x-a:b"];
                for tail in [chunks.concat(), raw] {
                    let mut script = fake::handshake(8192, &contexts);
                    script.extend(&tail);
                    let mut client = fake::connect(script.clone(), &names).unwrap();
                    let mut buf = vec![0; 4096];
                    let _ = client.read_at(4096, &mut buf);
                    let mut client = fake::connect(script, &names).unwrap();
                    if let Ok(extents) = client.block_status(BASE_ALLOCATION, 0, 4096) {
                        prop_assert_eq!(extents.first().map(|e| e.offset), Some(0));
                        prop_assert_eq!(extents.last().map(Extent::end), Some(4096));
                    }
                }
            }

            #[test]
            fn broken_handshakes_never_panic(cut in 0usize..200, flip in any::<(usize, u8)>()) {
                let mut script = fake::handshake(8192, &[(1, BASE_ALLOCATION)]);
                let at = flip.0 % script.len();
                script[at] ^= flip.1;
                script.truncate(cut.max(at + 1));
                let _ = fake::connect(script, &[BASE_ALLOCATION]);
            }
        }
    }
}
