//! The transmission phase: requests, and replies checked before anything is believed.

use std::ops::Range;

use crate::client::{NbdClient, Phase};
use crate::wire::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, Fields, MAX_ERROR_CHUNK, MAX_EXTENTS_PER_CHUNK,
    MAX_READ_FRAGMENTS, NBD_ESHUTDOWN, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, Reply, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, request_header,
    server_text,
};
use crate::{Extent, NbdError};

impl NbdClient {
    /// Runs one public operation: refuses if the connection is gone, and marks it gone when
    /// the operation loses the framing.
    pub(crate) fn transmit<T>(
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
                // A goodbye to a server going away; its error is the one being returned.
                drop(self.send_request(CMD_DISC, 0, 0));
            }
        }
        result
    }

    pub(crate) fn check_range(&self, offset: u64, length: u64) -> Result<(), NbdError> {
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

    pub(crate) fn context_id(&self, context: &str) -> Result<u32, NbdError> {
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
    pub(crate) fn read_once(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
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
                        .map_err(|e| self.protocol(e.to_string()))?;
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
                        .map_err(|e| self.protocol(e.to_string()))?;
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
    pub(crate) fn block_status_once(
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
    pub(crate) fn recv_extents(
        &mut self,
        request: &Range<u64>,
        count: u64,
    ) -> Result<Vec<Extent>, NbdError> {
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
    pub(crate) fn check_none_chunk(&self, flags: u16, chunk_length: u32) -> Result<(), NbdError> {
        if chunk_length != 0 || flags & REPLY_FLAG_DONE == 0 {
            return Err(self.protocol("a NONE chunk has a payload or is not the last"));
        }
        Ok(())
    }

    /// Reads an error chunk (any type with bit 15 set): the error code and message.
    pub(crate) fn recv_error_chunk(
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
    pub(crate) fn chunk_range(
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
    pub(crate) fn recv_ack(
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
    pub(crate) fn send_request_with(
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

    pub(crate) fn send_request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
    ) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        // No command flags.
        self.send(&request_header(0, command, cookie, offset, length))?;
        Ok(cookie)
    }

    /// Reads the header of a simple reply or of one structured chunk for request `cookie`.
    pub(crate) fn recv_reply(&mut self, cookie: u64) -> Result<Reply, NbdError> {
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

    pub(crate) fn command_failed(
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
}

/// Why a read reply's chunk cannot be taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CoverageError {
    #[error("two chunks of a read reply overlap at offset {0}")]
    Overlap(u64),
    #[error("a read reply is split into more than {MAX_READ_FRAGMENTS} separate pieces")]
    Fragmented,
}

/// The parts of one read request that reply chunks have filled: sorted, disjoint ranges,
/// with touching neighbours merged (a server replying in order leaves just one).
#[derive(Default)]
pub(crate) struct Coverage {
    ranges: Vec<Range<u64>>,
}

impl Coverage {
    /// Records `range`, which must not overlap anything filled before.
    pub(crate) fn insert(&mut self, range: &Range<u64>) -> Result<(), CoverageError> {
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
                return Err(CoverageError::Overlap(r.start.max(range.start)));
            }
            merged.start = merged.start.min(r.start);
            merged.end = merged.end.max(r.end);
            last += 1;
        }
        if first == last && self.ranges.len() >= MAX_READ_FRAGMENTS {
            return Err(CoverageError::Fragmented);
        }
        self.ranges.splice(first..last, [merged]);
        Ok(())
    }

    pub(crate) fn is_exactly(&self, request: &Range<u64>) -> bool {
        self.ranges.len() == 1 && self.ranges[0] == *request
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Where `range` (inside `request`) lies in the request's buffer.
pub(crate) fn offset_in(request: &Range<u64>, range: &Range<u64>) -> Range<usize> {
    let index =
        |at: u64| usize::try_from(at - request.start).expect("a read request is at most 32 MiB");
    index(range.start)..index(range.end)
}

/// Appends `extent`, merging it into the last one if they touch and have the same flags.
pub(crate) fn push_extent(extents: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = extents.last_mut()
        && last.end() == extent.offset
        && last.flags == extent.flags
    {
        last.length += extent.length;
    } else {
        extents.push(extent);
    }
}
