//! The handshake: options haggled before the export opens.

use crate::NbdError;
use crate::client::{NbdClient, Phase};
use crate::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Fields, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, MAX_OPTION_REPLY, MAX_READ_BYTES, NBDMAGIC, OLDSTYLE_MAGIC,
    OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, OPTION_REPLY_MAGIC, OptionReply, REP_ACK,
    REP_ERR, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, TRANSMISSION_READ_ONLY,
    option_name, put_string, put_u32, rep_err_reason, server_text,
};

impl NbdClient {
    pub(crate) fn handshake(&mut self, meta_contexts: &[&str]) -> Result<(), NbdError> {
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

    pub(crate) fn set_meta_contexts(&mut self, meta_contexts: &[&str]) -> Result<(), NbdError> {
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

    pub(crate) fn go(&mut self) -> Result<(), NbdError> {
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

    pub(crate) fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut message = Vec::with_capacity(16 + data.len());
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        put_u32(&mut message, data.len());
        message.extend_from_slice(data);
        self.send(&message)
    }

    pub(crate) fn recv_option_reply(&mut self, option: u32) -> Result<OptionReply, NbdError> {
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
    pub(crate) fn option_failed(&self, option: u32, reply: &OptionReply) -> NbdError {
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
}
