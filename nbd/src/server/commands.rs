//! The server's side of the transmission phase: requests, checked before they are obeyed.

use std::io;

use super::{
    BASE_ALLOCATION_ID, Connection, Export, MAX_PAYLOAD_BYTES, MAX_STATUS_EXTENTS,
    READ_PIECE_BYTES, Run, ServerError,
};
use crate::wire::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ,
    CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_EOVERFLOW, NBD_EPERM,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_HEADER_BYTES,
    REQUEST_MAGIC, chunk_header, simple_reply_header,
};

/// `NBD_REPLY_TYPE_ERROR`: an error for the whole request.
const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Error messages sent to the client are cut to this many bytes.
const MAX_ERROR_MESSAGE: usize = 1024;

/// One request's header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

impl Request {
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }
}

/// An error to report for one request; the connection goes on.
struct Failure {
    code: u32,
    message: String,
    /// Where in the request it happened, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
    offset: Option<u64>,
}

impl Failure {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            offset: None,
        }
    }

    fn export(error: &io::Error, offset: u64) -> Self {
        Failure {
            code: NBD_EIO,
            message: format!("the export failed at offset {offset}: {error}"),
            offset: Some(offset),
        }
    }
}

/// Why a request was not answered with success.
enum RequestError {
    /// Reported to the client; the connection goes on.
    Failed(Failure),
    /// The socket failed: the connection is over.
    Connection(ServerError),
}

impl From<Failure> for RequestError {
    fn from(failure: Failure) -> Self {
        RequestError::Failed(failure)
    }
}

impl From<ServerError> for RequestError {
    fn from(error: ServerError) -> Self {
        RequestError::Connection(error)
    }
}

impl<E: Export + ?Sized> Connection<'_, E> {
    /// Answers requests until the client says goodbye or hangs up.
    pub(super) fn transmission(&mut self) -> Result<(), ServerError> {
        loop {
            if self.stop.is_stopped() || self.at_end()? {
                return Ok(());
            }
            let request = self.recv_request()?;
            let result = match request.command {
                CMD_DISC => return Ok(()),
                CMD_READ => self.read(&request),
                CMD_BLOCK_STATUS => self.block_status(&request),
                CMD_WRITE => {
                    // The payload follows the header; it must be consumed (or the
                    // connection closed) to find the next request.
                    if request.length > MAX_PAYLOAD_BYTES {
                        return Err(self.protocol(format!(
                            "a write of {} bytes is larger than the {MAX_PAYLOAD_BYTES} accepted",
                            request.length
                        )));
                    }
                    self.skip(u64::from(request.length))?;
                    Err(Failure::new(NBD_EPERM, "the export is read-only").into())
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    Err(Failure::new(NBD_EPERM, "the export is read-only").into())
                }
                CMD_FLUSH => Ok(()),
                CMD_CACHE => self.check_range(&request).map_err(RequestError::from),
                other => Err(
                    Failure::new(NBD_EINVAL, format!("command {other} is not supported")).into(),
                ),
            };
            match result {
                Ok(()) if matches!(request.command, CMD_READ | CMD_BLOCK_STATUS) => {}
                Ok(()) => self.send(&simple_reply_header(0, request.cookie))?,
                Err(RequestError::Failed(failure)) => self.fail(&request, &failure)?,
                Err(RequestError::Connection(error)) => return Err(error),
            }
            self.flush()?;
        }
    }

    fn recv_request(&mut self) -> Result<Request, ServerError> {
        let header: [u8; REQUEST_HEADER_BYTES] = self.recv_array()?;
        let mut fields = crate::wire::Fields(&header);
        let (Some(magic), Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) = (
            fields.u32(),
            fields.u16(),
            fields.u16(),
            fields.u64(),
            fields.u64(),
            fields.u32(),
        ) else {
            return Err(self.protocol("a request header is short"));
        };
        if magic != REQUEST_MAGIC {
            return Err(self.protocol(format!(
                "a request starts with {magic:#x} instead of the request magic"
            )));
        }
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    fn check_range(&self, request: &Request) -> Result<(), Failure> {
        match request.end() {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(Failure::new(
                NBD_EINVAL,
                format!(
                    "{} bytes at offset {} reach past the end of the export ({} bytes)",
                    request.length, request.offset, self.size_bytes
                ),
            )),
        }
    }

    /// The run of the export at `at`, cut to end at `end` (which is after `at`).
    fn run_at(&mut self, at: u64, end: u64) -> Result<Run, Failure> {
        let mut run = self
            .export
            .allocation_at(at, end - at)
            .map_err(|e| Failure::export(&e, at))?;
        if run.length_bytes == 0 {
            return Err(Failure::export(
                &io::Error::other("it described no bytes"),
                at,
            ));
        }
        run.length_bytes = run.length_bytes.min(end - at);
        Ok(run)
    }

    /// `NBD_CMD_READ`; on success the reply has been queued.
    fn read(&mut self, request: &Request) -> Result<(), RequestError> {
        if request.length > MAX_PAYLOAD_BYTES {
            // EOVERFLOW tells a structured client to retry smaller.
            let code = if self.structured {
                NBD_EOVERFLOW
            } else {
                NBD_EINVAL
            };
            return Err(Failure::new(
                code,
                format!(
                    "a read of {} bytes is larger than the {MAX_PAYLOAD_BYTES} served at once",
                    request.length
                ),
            )
            .into());
        }
        self.check_range(request)?;
        if self.structured && request.flags & CMD_FLAG_DF == 0 {
            return self.read_structured(request);
        }
        // One piece: the whole request in the buffer first, since an error can no longer
        // be told once the data's header is sent.
        let length = request.length as usize;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        buffer.resize(length, 0);
        let result = (|| {
            self.fill(request.offset, &mut buffer)?;
            if self.structured {
                // 8 + at most 32 MiB: fits in 32 bits.
                let chunk_length = u32::try_from(8 + length).unwrap_or(u32::MAX);
                self.send(&chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    request.cookie,
                    chunk_length,
                ))?;
                self.send(&request.offset.to_be_bytes())?;
            } else {
                self.send(&simple_reply_header(0, request.cookie))?;
            }
            self.send(&buffer)?;
            Ok(())
        })();
        // Keep the buffer for the next request, unless it grew past one piece: a connection
        // does not hold 32 MiB between requests.
        if buffer.capacity() <= READ_PIECE_BYTES {
            self.buffer = buffer;
        }
        result
    }

    /// Fills `buf` with the export's bytes from `offset` on, zeros where it has holes.
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let run = self.run_at(at, end)?;
            let range = usize::try_from(at - offset).unwrap_or(usize::MAX)
                ..usize::try_from(at - offset + run.length_bytes).unwrap_or(usize::MAX);
            let Some(piece) = buf.get_mut(range) else {
                return Err(Failure::new(
                    NBD_EIO,
                    "internal error: a run outside the read",
                ));
            };
            if run.allocation.reads_as_zeros() {
                piece.fill(0);
            } else {
                self.export
                    .read_at(at, piece)
                    .map_err(|e| Failure::export(&e, at))?;
            }
            at += run.length_bytes;
        }
        Ok(())
    }

    /// A structured read: data in pieces of at most [`READ_PIECE_BYTES`], holes as
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`, an error as the last chunk.
    fn read_structured(&mut self, request: &Request) -> Result<(), RequestError> {
        let cookie = request.cookie;
        let end = request.offset + u64::from(request.length);
        if request.length == 0 {
            self.send(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))?;
            return Ok(());
        }
        let mut at = request.offset;
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = (|| {
            while at < end {
                let run = self.run_at(at, end)?;
                let run_end = at + run.length_bytes;
                if run.allocation.reads_as_zeros() {
                    let done = if run_end == end { REPLY_FLAG_DONE } else { 0 };
                    // A run lies inside the request, which is at most 32 MiB.
                    let length = u32::try_from(run.length_bytes).unwrap_or(u32::MAX);
                    self.send(&chunk_header(done, REPLY_TYPE_OFFSET_HOLE, cookie, 12))?;
                    self.send(&at.to_be_bytes())?;
                    self.send(&length.to_be_bytes())?;
                    at = run_end;
                    continue;
                }
                while at < run_end {
                    let piece = usize::try_from(run_end - at)
                        .unwrap_or(READ_PIECE_BYTES)
                        .min(READ_PIECE_BYTES);
                    buffer.clear();
                    buffer.resize(piece, 0);
                    self.export
                        .read_at(at, &mut buffer)
                        .map_err(|e| Failure::export(&e, at))?;
                    let piece_end = at + piece as u64;
                    let done = if piece_end == end { REPLY_FLAG_DONE } else { 0 };
                    let length = u32::try_from(8 + piece).unwrap_or(u32::MAX);
                    self.send(&chunk_header(done, REPLY_TYPE_OFFSET_DATA, cookie, length))?;
                    self.send(&at.to_be_bytes())?;
                    self.send(&buffer)?;
                    at = piece_end;
                }
            }
            Ok(())
        })();
        self.buffer = buffer;
        result
    }

    /// `NBD_CMD_BLOCK_STATUS` in `base:allocation`; on success the reply has been queued.
    fn block_status(&mut self, request: &Request) -> Result<(), RequestError> {
        if !self.structured || !self.base_allocation {
            return Err(Failure::new(
                NBD_EINVAL,
                "block status needs structured replies and the context base:allocation",
            )
            .into());
        }
        if request.length == 0 {
            return Err(Failure::new(NBD_EINVAL, "block status of zero bytes").into());
        }
        self.check_range(request)?;
        let end = request.offset + u64::from(request.length);
        let most = if request.flags & CMD_FLAG_REQ_ONE == 0 {
            MAX_STATUS_EXTENTS
        } else {
            1
        };
        // (length, flags) pairs, neighbours of equal flags merged.
        let mut extents: Vec<(u64, u32)> = Vec::new();
        let mut at = request.offset;
        while at < end {
            let run = self.run_at(at, end)?;
            let flags = run.allocation.base_allocation_flags();
            let count = extents.len();
            match extents.last_mut() {
                Some((length, last)) if *last == flags => *length += run.length_bytes,
                _ if count == most => break,
                _ => extents.push((run.length_bytes, flags)),
            }
            at += run.length_bytes;
        }
        let mut payload = Vec::with_capacity(4 + 8 * extents.len());
        payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (length, flags) in extents {
            // Extents lie inside the request, whose length is 32 bits.
            payload.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.send(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            request.cookie,
            length,
        ))?;
        self.send(&payload)?;
        Ok(())
    }

    /// Reports `failure` for `request`: an error chunk where the request expects a
    /// structured reply, else a simple reply.
    fn fail(&mut self, request: &Request, failure: &Failure) -> Result<(), ServerError> {
        let structured = self.structured && matches!(request.command, CMD_READ | CMD_BLOCK_STATUS);
        if !structured {
            return self.send(&simple_reply_header(failure.code, request.cookie));
        }
        let mut message = failure.message.as_bytes();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !failure.message.is_char_boundary(cut) {
                cut -= 1;
            }
            message = &message[..cut];
        }
        // At most 1024 bytes.
        let message_length = u16::try_from(message.len()).unwrap_or(0);
        let mut payload = failure.code.to_be_bytes().to_vec();
        payload.extend_from_slice(&message_length.to_be_bytes());
        payload.extend_from_slice(&message[..usize::from(message_length)]);
        // ERROR_OFFSET only for an offset inside the request (always, for the export's).
        let kind = match failure.offset {
            Some(offset)
                if request.command == CMD_READ
                    && offset >= request.offset
                    && request.end().is_some_and(|end| offset < end) =>
            {
                payload.extend_from_slice(&offset.to_be_bytes());
                REPLY_TYPE_ERROR_OFFSET
            }
            _ => REPLY_TYPE_ERROR,
        };
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.send(&chunk_header(REPLY_FLAG_DONE, kind, request.cookie, length))?;
        self.send(&payload)
    }
}
