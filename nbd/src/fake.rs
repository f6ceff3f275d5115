//! Fake servers and clients: scripted bytes on one end of a socket pair, to feed the
//! client replies no real server would send, and the server requests no real client
//! would. Test support for this crate's tests and the fuzz targets.

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
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_INFO, REP_META_CONTEXT, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
    chunk_header, option_reply_header, request_header, simple_reply_header,
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
    let mut s = option_reply_header(option, kind, u32::try_from(data.len()).unwrap()).to_vec();
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
    let mut s = chunk_header(flags, kind, cookie, length).to_vec();
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
    simple_reply_header(error, cookie).to_vec()
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

// ---- The other way round: scripted clients, for the server ----

/// The client's answer to the greeting: fixed newstyle, no zeroes.
pub fn client_flags() -> Vec<u8> {
    (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec()
}

/// An option as a client sends it.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut s = IHAVEOPT.to_be_bytes().to_vec();
    s.extend_from_slice(&option.to_be_bytes());
    s.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    s.extend_from_slice(data);
    s
}

/// The data of `NBD_OPT_GO`/`NBD_OPT_INFO`: an export name and information requests.
pub fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// The data of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for query in queries {
        data.extend_from_slice(&u32::try_from(query.len()).unwrap().to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

/// A request in the transmission phase.
pub fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    request_header(flags, command, cookie, offset, length).to_vec()
}

/// What a client like QEMU's says up to the transmission phase: flags, structured
/// replies, `base:allocation`, then `NBD_OPT_GO` for `name`.
pub fn client_handshake(name: &str) -> Vec<u8> {
    let mut s = client_flags();
    s.extend(option(OPT_STRUCTURED_REPLY, &[]));
    s.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_context_data(name, &[crate::BASE_ALLOCATION]),
    ));
    s.extend(option(OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE])));
    s
}

/// The export that [`serve_script`] serves: 256 KiB of a pattern, with holes.
pub fn fuzz_export() -> crate::MemoryExport {
    let mut data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8 | 1).collect();
    data[16 << 10..48 << 10].fill(0);
    data[200 << 10..].fill(0);
    crate::MemoryExport::new(data)
}

/// One whole connection in which a client says `script` (then hangs up) to
/// [`serve_connection`](crate::serve_connection) serving [`fuzz_export`] as `vda`;
/// returns its result. What the server sends back is read and thrown away. The fuzz
/// target's body, and what the corpus replay test runs: nothing may panic, hang or
/// allocate what a length in `script` claims.
pub fn serve_script(script: &[u8]) -> Result<(), crate::ServerError> {
    let (client, server) = UnixStream::pair().unwrap();
    let mut writer = client.try_clone().unwrap();
    let script = script.to_vec();
    let writing = thread::spawn(move || {
        // The server may stop reading early; the script ends there.
        drop(writer.write_all(&script));
        drop(writer.shutdown(Shutdown::Write));
    });
    let mut reader = client;
    let draining = thread::spawn(move || drop(io::copy(&mut reader, &mut io::sink())));
    let mut export = fuzz_export();
    // The server gets a clone: this end stays open until the writer is done, so that no
    // write meets a closed socket (a fuzzer's process does not ignore SIGPIPE).
    let result = crate::serve_connection(
        server.try_clone().unwrap(),
        "vda",
        &mut export,
        &crate::StopFlag::new(),
    );
    drop(server.shutdown(Shutdown::Write));
    drop(io::copy(&mut &server, &mut io::sink()));
    writing.join().expect("the script's writer does not panic");
    draining.join().expect("the reply drain does not panic");
    result
}

/// Well-formed client conversations, the server fuzz corpus's seeds.
#[must_use]
pub fn client_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::wire::{
        CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ,
        CMD_TRIM, CMD_WRITE, OPT_ABORT, OPT_EXPORT_NAME, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT,
    };
    let mut qemu_like = client_handshake("vda");
    qemu_like.extend(request(0, CMD_BLOCK_STATUS, 1, 0, 256 << 10));
    qemu_like.extend(request(0, CMD_READ, 2, 0, 64 << 10));
    qemu_like.extend(request(CMD_FLAG_DF, CMD_READ, 3, 4096, 8192));
    qemu_like.extend(request(
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        4,
        20 << 10,
        4096,
    ));
    qemu_like.extend(request(0, CMD_WRITE, 5, 0, 16));
    qemu_like.extend_from_slice(&[0x55; 16]);
    qemu_like.extend(request(0, CMD_TRIM, 6, 0, 4096));
    qemu_like.extend(request(0, CMD_FLUSH, 7, 0, 0));
    qemu_like.extend(request(0, CMD_CACHE, 8, 0, 4096));
    qemu_like.extend(request(0, CMD_READ, 9, 255 << 10, 2048));
    qemu_like.extend(request(0, CMD_DISC, 10, 0, 0));
    let mut old_style = client_flags();
    old_style.extend(option(OPT_EXPORT_NAME, b"vda"));
    old_style.extend(request(0, CMD_READ, 1, 1000, 5000));
    old_style.extend(request(0, CMD_BLOCK_STATUS, 2, 0, 4096));
    old_style.extend(request(0, CMD_DISC, 3, 0, 0));
    let mut haggling = client_flags();
    haggling.extend(option(OPT_LIST, &[]));
    haggling.extend(option(OPT_INFO, &go_data("vda", &[0, 1, 2, 3])));
    haggling.extend(option(
        OPT_LIST_META_CONTEXT,
        &meta_context_data("vda", &["base:"]),
    ));
    haggling.extend(option(OPT_GO, &go_data("other", &[])));
    haggling.extend(option(99, b"what"));
    haggling.extend(option(OPT_ABORT, &[]));
    vec![
        ("qemu-like", qemu_like),
        ("export-name", old_style),
        ("haggling", haggling),
        ("flags-only", client_flags()),
    ]
}
