//! Fake servers: scripted bytes on one end of a socket pair, to feed the client replies
//! no real server would send. Test support for this crate's tests and the fuzz target.

#![allow(
    missing_docs,
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    clippy::unwrap_used
)]

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;

use crate::wire::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_GO,
    OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, OPTION_REPLY_MAGIC, REP_ACK, REP_INFO,
    REP_META_CONTEXT, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use crate::{NbdClient, NbdError};

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
    connect_served(script, contexts).0
}

/// [`connect`], and the server's thread, which ends once the client has hung up.
fn connect_served(
    script: Vec<u8>,
    contexts: &[&str],
) -> (Result<NbdClient, NbdError>, thread::JoinHandle<()>) {
    let (client, mut server) = UnixStream::pair().unwrap();
    let server_thread = thread::spawn(move || {
        // The client may hang up early; the script ends there.
        drop(server.write_all(&script));
        drop(server.shutdown(Shutdown::Write));
        drop(io::copy(&mut server, &mut io::sink()));
    });
    let client = NbdClient::negotiate(client, Path::new("/run/fake.sock"), "vda", contexts);
    (client, server_thread)
}

/// One whole conversation in which the server says `script`: the handshake, then a read,
/// a block status in each context, a write and a flush, each answered from what is left
/// of `script`. Errors are expected and ignored; what matters is that nothing panics,
/// hangs or allocates what a length in `script` claims. The fuzz target's body, and what
/// the corpus replay test runs.
pub fn converse(script: &[u8]) {
    const DIRTY: &str = "qemu:dirty-bitmap:backup-vda";
    let (client, served) = connect_served(script.to_vec(), &[crate::BASE_ALLOCATION, DIRTY]);
    if let Ok(client) = client {
        talk(client);
    }
    // Every conversation ends with its server: nothing outlives one input.
    served.join().expect("the fake server does not panic");
}

/// What [`converse`] asks after the handshake.
fn talk(mut client: NbdClient) {
    const DIRTY: &str = "qemu:dirty-bitmap:backup-vda";
    let length = client.size_bytes().min(64 << 10);
    let mut buf = vec![0; usize::try_from(length).expect("at most 64 KiB")];
    drop(client.read_at(0, &mut buf));
    drop(client.block_status(crate::BASE_ALLOCATION, 0, length));
    drop(client.block_status(DIRTY, 0, length));
    drop(client.write_at(0, &buf[..buf.len().min(512)]));
    drop(client.flush());
    drop(client.close());
}

/// Well-formed conversations, the fuzz corpus's seeds: a handshake with both contexts,
/// then good answers to what [`converse`] asks.
#[must_use]
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let contexts = [
        (1, crate::BASE_ALLOCATION),
        (2, "qemu:dirty-bitmap:backup-vda"),
    ];
    let handshake = handshake(4096, &contexts);
    let mut structured = handshake.clone();
    structured.extend(data(0, 1, 0, &[0xaa; 2048]));
    structured.extend(hole(0, 1, 2048, 2048));
    structured.extend(none(1));
    structured.extend(status(REPLY_FLAG_DONE, 2, 1, &[(4096, 0)]));
    structured.extend(status(REPLY_FLAG_DONE, 3, 2, &[(1024, 1), (3072, 0)]));
    structured.extend(simple(0, 4));
    structured.extend(simple(0, 5));
    let mut errors = handshake.clone();
    errors.extend(error(REPLY_FLAG_DONE, 1, 5, "disk on fire"));
    errors.extend(simple(28, 2));
    vec![
        ("handshake-only", handshake),
        ("structured-replies", structured),
        ("error-replies", errors),
        ("greeting-only", greeting()),
    ]
}
