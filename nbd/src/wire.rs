//! The protocol's numbers and the small helpers that write and read its fields.

use std::path::Path;

use crate::NbdError;

// Protocol constants, from doc/proto.md. Magic numbers are fixed by the protocol.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub(crate) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag of `NBD_CMD_READ`: the reply must not be split (one data chunk).
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag of `NBD_CMD_BLOCK_STATUS`: describe one extent only.
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Transmission flag: the other flags mean something.
pub(crate) const TRANSMISSION_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export cannot be written.
pub(crate) const TRANSMISSION_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLAG_DF` is understood (only with structured replies).
pub(crate) const TRANSMISSION_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections to the export see the same data.
pub(crate) const TRANSMISSION_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub(crate) const TRANSMISSION_SEND_CACHE: u16 = 1 << 10;

pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks error chunks, including types this client does not know.
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

pub(crate) const NBD_EPERM: u32 = 1;
pub(crate) const NBD_EIO: u32 = 5;
pub(crate) const NBD_EINVAL: u32 = 22;
pub(crate) const NBD_EOVERFLOW: u32 = 75;
pub(crate) const NBD_ESHUTDOWN: u32 = 108;

/// Size of a request header in the transmission phase (without extended headers).
pub(crate) const REQUEST_HEADER_BYTES: usize = 28;

// Limits.
/// Names and messages are at most 4096 bytes long in NBD.
pub(crate) const MAX_STRING: usize = 4096;
/// At most this many metadata contexts per connection (QEMU offers two kinds).
pub(crate) const MAX_META_CONTEXTS: usize = 64;
/// Longest handshake reply accepted: a 4096-byte string plus a few fixed fields.
pub(crate) const MAX_OPTION_REPLY: u32 = 8192;
/// Longest error chunk accepted: a 4096-byte message plus a few fixed fields.
pub(crate) const MAX_ERROR_CHUNK: u32 = 8192;
/// Largest read request: the payload every server must accept (2^25).
pub(crate) const MAX_READ_BYTES: usize = 32 << 20;
/// A read reply may arrive in pieces and in any order; one split into more separate pieces
/// than this (QEMU sends one to a few, in order) is treated as an attack on our memory.
pub(crate) const MAX_READ_FRAGMENTS: usize = 4096;
/// Servers should not send more extents than this in one chunk.
pub(crate) const MAX_EXTENTS_PER_CHUNK: u64 = 1 << 20;
/// The length of one `NBD_CMD_BLOCK_STATUS` request; longer ranges take several.
pub(crate) const STATUS_WINDOW_BYTES: u32 = 1 << 31;

/// The header of an option reply: magic, option, reply type, length of what follows.
pub(crate) fn option_reply_header(option: u32, kind: u32, length: u32) -> [u8; 20] {
    let mut header = [0; 20];
    header[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    header[8..12].copy_from_slice(&option.to_be_bytes());
    header[12..16].copy_from_slice(&kind.to_be_bytes());
    header[16..].copy_from_slice(&length.to_be_bytes());
    header
}

/// A simple reply's header (on success the read data follows it).
pub(crate) fn simple_reply_header(error: u32, cookie: u64) -> [u8; 16] {
    let mut header = [0; 16];
    header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&error.to_be_bytes());
    header[8..].copy_from_slice(&cookie.to_be_bytes());
    header
}

/// The header of one structured reply chunk; `length` bytes of payload follow it.
pub(crate) fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut header = [0; 20];
    header[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&kind.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..].copy_from_slice(&length.to_be_bytes());
    header
}

/// A request header in the transmission phase.
pub(crate) fn request_header(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_BYTES] {
    let mut header = [0; REQUEST_HEADER_BYTES];
    header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..].copy_from_slice(&length.to_be_bytes());
    header
}

/// One reply during option haggling.
pub(crate) struct OptionReply {
    pub(crate) kind: u32,
    pub(crate) data: Vec<u8>,
}

/// The header of a reply in the transmission phase.
pub(crate) enum Reply {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, length: u32 },
}

/// Big-endian fields from a reply already in memory; every read is bounds-checked.
pub(crate) struct Fields<'a>(pub(crate) &'a [u8]);

impl<'a> Fields<'a> {
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Refuses names the protocol cannot carry, before anything is sent.
pub(crate) fn check_names(
    socket: &Path,
    export: &str,
    meta_contexts: &[&str],
) -> Result<(), NbdError> {
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
pub(crate) fn put_u32(data: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("check_names bounds every message");
    data.extend_from_slice(&n.to_be_bytes());
}

/// Appends a string with its 32-bit length in front.
pub(crate) fn put_string(data: &mut Vec<u8>, s: &str) {
    put_u32(data, s.len());
    data.extend_from_slice(s.as_bytes());
}

/// A message from the server, made safe to show: valid UTF-8, no control characters.
pub(crate) fn server_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `" (the server says: ...)"`, or nothing when it said nothing.
pub(crate) fn server_said(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" (the server says: {message})")
    }
}

pub(crate) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

/// What an `NBD_REP_ERR_*` code means.
pub(crate) fn rep_err_reason(kind: u32) -> String {
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
pub(crate) fn errno_reason(code: u32) -> String {
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
