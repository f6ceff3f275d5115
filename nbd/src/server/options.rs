//! The server's side of the fixed newstyle handshake: the options a client may send.

use super::{
    BASE_ALLOCATION_ID, Connection, Export, MAX_OPTION_BYTES, MAX_PAYLOAD_BYTES,
    PREFERRED_BLOCK_BYTES, ServerError,
};
use crate::BASE_ALLOCATION;
use crate::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Fields, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, INFO_NAME, MAX_STRING, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME,
    OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_INVALID, REP_ERR_SHUTDOWN, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_INFO, REP_META_CONTEXT, REP_SERVER, TRANSMISSION_CAN_MULTI_CONN, TRANSMISSION_HAS_FLAGS,
    TRANSMISSION_READ_ONLY, TRANSMISSION_SEND_CACHE, TRANSMISSION_SEND_DF, option_reply_header,
    put_string,
};

/// What the handshake loop does after an option.
enum Next {
    Options,
    /// The export is open: on to the transmission phase.
    Transmission,
    /// The client left, politely or not.
    End,
}

impl<E: Export + ?Sized> Connection<'_, E> {
    /// The handshake; `Ok(true)` when the client opened the export.
    pub(super) fn handshake(&mut self) -> Result<bool, ServerError> {
        self.send(&NBDMAGIC.to_be_bytes())?;
        self.send(&IHAVEOPT.to_be_bytes())?;
        self.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        self.flush()?;
        if self.at_end()? {
            return Ok(false);
        }
        let client_flags = self.recv_u32()?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            // The spec: a server that does not know a client flag must close.
            return Err(self.protocol(format!("unknown client flags {client_flags:#x}")));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol(
                "the client does not do the fixed newstyle handshake, the only one served",
            ));
        }
        self.no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            match self.option()? {
                Next::Options => {}
                Next::Transmission => return Ok(true),
                Next::End => return Ok(false),
            }
        }
    }

    /// Reads and answers one option.
    fn option(&mut self) -> Result<Next, ServerError> {
        if self.at_end()? {
            return Ok(Next::End);
        }
        let magic = self.recv_u64()?;
        if magic != IHAVEOPT {
            return Err(self.protocol(format!(
                "an option starts with {magic:#x} instead of IHAVEOPT"
            )));
        }
        let option = self.recv_u32()?;
        let length = self.recv_u32()?;
        if length > MAX_OPTION_BYTES {
            // Too long to be anything this server understands; reading it all would only
            // keep the thread busy. Say so, then hang up.
            self.reply(option, REP_ERR_TOO_BIG, b"option too long")?;
            self.flush()?;
            return Err(self.protocol(format!(
                "option {option} is {length} bytes long, more than the {MAX_OPTION_BYTES} accepted"
            )));
        }
        let data = self.recv_vec(length, MAX_OPTION_BYTES, "an option")?;
        if self.stop.is_stopped() {
            self.reply(option, REP_ERR_SHUTDOWN, b"the server is shutting down")?;
            self.flush()?;
            return Ok(Next::End);
        }
        let next = match option {
            OPT_EXPORT_NAME => return self.export_name(&data),
            OPT_ABORT => {
                // Best effort: the client may already be gone, and the spec lets it.
                drop(self.reply(option, REP_ACK, &[]).and_then(|()| self.flush()));
                return Ok(Next::End);
            }
            OPT_LIST => self.list(&data)?,
            OPT_INFO | OPT_GO => self.info(option, &data)?,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[])?;
                } else {
                    self.reply(
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY has no data",
                    )?;
                }
                Next::Options
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data)?,
            _ => {
                self.reply(option, REP_ERR_UNSUP, b"option not supported")?;
                Next::Options
            }
        };
        self.flush()?;
        Ok(next)
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way to open the export, with no way to refuse.
    fn export_name(&mut self, name: &[u8]) -> Result<Next, ServerError> {
        if !self.is_ours(name) {
            return Err(self.unknown_export(name));
        }
        self.send(&self.size_bytes.to_be_bytes())?;
        self.send(&self.transmission_flags().to_be_bytes())?;
        if !self.no_zeroes {
            self.send(&[0; 124])?;
        }
        self.flush()?;
        Ok(Next::Transmission)
    }

    /// `NBD_OPT_LIST`: the one export.
    fn list(&mut self, data: &[u8]) -> Result<Next, ServerError> {
        if !data.is_empty() {
            self.reply(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST has no data")?;
            return Ok(Next::Options);
        }
        let mut server = Vec::with_capacity(4 + self.name.len());
        put_string(&mut server, self.name);
        self.reply(OPT_LIST, REP_SERVER, &server)?;
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Next::Options)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: the export's size, flags and block sizes.
    fn info(&mut self, option: u32, data: &[u8]) -> Result<Next, ServerError> {
        let mut fields = Fields(data);
        let parsed = (|| {
            let name = string(&mut fields)?;
            let count = fields.u16()?;
            let requests = (0..count)
                .map(|_| fields.u16())
                .collect::<Option<Vec<u16>>>()?;
            fields.0.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.reply(option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(Next::Options);
        };
        if !self.is_ours(name) {
            self.reply(option, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(Next::Options);
        }
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&self.size_bytes.to_be_bytes());
        export.extend_from_slice(&self.transmission_flags().to_be_bytes());
        self.reply(option, REP_INFO, &export)?;
        // Sent even unasked: a minimum of 1 is the default, so it binds the client to nothing.
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        sizes.extend_from_slice(&1u32.to_be_bytes());
        sizes.extend_from_slice(&PREFERRED_BLOCK_BYTES.to_be_bytes());
        sizes.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
        self.reply(option, REP_INFO, &sizes)?;
        if requests.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(self.name.as_bytes());
            self.reply(option, REP_INFO, &info)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(if option == OPT_GO {
            Next::Transmission
        } else {
            Next::Options
        })
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: only `base:allocation`.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Next, ServerError> {
        let set = option == OPT_SET_META_CONTEXT;
        let mut fields = Fields(data);
        let parsed = (|| {
            let name = string(&mut fields)?;
            let count = fields.u32()?;
            // Each query takes at least 4 bytes: a count beyond that is a lie.
            if u64::from(count) > fields.0.len() as u64 / 4 {
                return None;
            }
            let queries = (0..count)
                .map(|_| string(&mut fields))
                .collect::<Option<Vec<&[u8]>>>()?;
            fields.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply(option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(Next::Options);
        };
        if set && !self.structured {
            self.reply(
                option,
                REP_ERR_INVALID,
                b"metadata contexts need NBD_OPT_STRUCTURED_REPLY first",
            )?;
            return Ok(Next::Options);
        }
        if !self.is_ours(name) {
            self.reply(option, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(Next::Options);
        }
        let wanted = if set {
            queries.iter().any(|&q| q == BASE_ALLOCATION.as_bytes())
        } else {
            // Listing: no query means every context; "base:" means its whole namespace.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|&q| q == BASE_ALLOCATION.as_bytes() || q == b"base:")
        };
        if set {
            // Each SET replaces the contexts selected before.
            self.base_allocation = wanted;
        }
        if wanted {
            // The id in replies to a listing is reserved, and zero.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut context = id.to_be_bytes().to_vec();
            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &context)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Next::Options)
    }

    /// The flags sent with the export's size.
    fn transmission_flags(&self) -> u16 {
        let mut flags = TRANSMISSION_HAS_FLAGS
            | TRANSMISSION_READ_ONLY
            | TRANSMISSION_CAN_MULTI_CONN
            | TRANSMISSION_SEND_CACHE;
        if self.structured {
            // Only with structured replies, says the spec.
            flags |= TRANSMISSION_SEND_DF;
        }
        flags
    }

    /// Queues one option reply.
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), ServerError> {
        let length = u32::try_from(data.len())
            .map_err(|_| self.protocol("an option reply would be longer than 4 GiB"))?;
        self.send(&option_reply_header(option, kind, length))?;
        self.send(data)
    }
}

/// A string with its 32-bit length in front, of at most [`MAX_STRING`] bytes.
fn string<'a>(fields: &mut Fields<'a>) -> Option<&'a [u8]> {
    let length = usize::try_from(fields.u32()?).ok()?;
    if length > MAX_STRING {
        return None;
    }
    fields.bytes(length)
}
