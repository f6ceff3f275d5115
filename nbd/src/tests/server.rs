//! The server against this crate's own client, against raw scripted requests, and against
//! hostile bytes.

use super::*;
use crate::server::MAX_PAYLOAD_BYTES;
use proptest::prelude::*;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// 4 MiB of a pattern that changes every byte, with holes (aligned 4 KiB blocks of zeros):
/// 64 KiB at 64 KiB, one block at 1 MiB, one at 1 MiB + 12 KiB, and the last 512 KiB.
pub(super) fn patterned_disk() -> Vec<u8> {
    let mut data: Vec<u8> = (0..4 * MIB)
        .map(|i| u8::try_from((i * 7 + (i >> 12)) % 255).unwrap() + 1)
        .collect();
    for (offset, length) in hole_ranges() {
        data[usize::try_from(offset).unwrap()..usize::try_from(offset + length).unwrap()].fill(0);
    }
    data
}

/// The holes of [`patterned_disk`], in order.
pub(super) fn hole_ranges() -> Vec<(u64, u64)> {
    vec![
        (64 * KIB, 64 * KIB),
        (MIB, 4 * KIB),
        (MIB + 12 * KIB, 4 * KIB),
        (4 * MIB - 512 * KIB, 512 * KIB),
    ]
}

/// `base:allocation` of [`patterned_disk`], as the client merges it.
fn expected_extents() -> Vec<Extent> {
    let mut extents = Vec::new();
    let mut at = 0;
    for (offset, length) in hole_ranges() {
        if offset > at {
            push_extent(&mut extents, extent(at, offset - at, 0));
        }
        push_extent(
            &mut extents,
            extent(offset, length, STATE_HOLE | STATE_ZERO),
        );
        at = offset + length;
    }
    if at < 4 * MIB {
        push_extent(&mut extents, extent(at, 4 * MIB - at, 0));
    }
    extents
}

fn extent(offset: u64, length: u64, flags: u32) -> Extent {
    Extent {
        offset,
        length,
        flags,
    }
}

/// A listener in a temporary folder serving `data` as `disk0`.
fn listen(data: Vec<u8>) -> (tempfile::TempDir, ListenerHandle) {
    let dir = tempfile::tempdir().unwrap();
    let export = MemoryExport::new(data);
    let handle = ListenerHandle::spawn(dir.path().join("nbd.sock"), "disk0", move || {
        Ok(export.clone())
    })
    .unwrap();
    (dir, handle)
}

/// A tiny linear congruential generator: random offsets without another dependency.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn reads_at_random_offsets_are_the_exports_bytes() {
    let data = patterned_disk();
    let (_dir, server) = listen(data.clone());
    let mut client = NbdClient::connect(server.socket(), "disk0", &[BASE_ALLOCATION]).unwrap();
    assert_eq!(client.size_bytes(), data.len() as u64);
    // The whole disk in one request: 1 MiB data pieces and holes.
    let mut all = vec![0xff; data.len()];
    client.read_at(0, &mut all).unwrap();
    assert!(all == data, "the whole disk differs");
    let mut random = Lcg(23);
    for _ in 0..300 {
        let offset = random.below(data.len() as u64);
        let length = random.below((data.len() as u64 - offset).min(300 * KIB)) + 1;
        let mut buf = vec![0xff; usize::try_from(length).unwrap()];
        client.read_at(offset, &mut buf).unwrap();
        let start = usize::try_from(offset).unwrap();
        assert!(
            buf == data[start..start + buf.len()],
            "{length} bytes at {offset} differ"
        );
    }
    client.close().unwrap();
    server.stop().unwrap();
}

#[test]
fn block_status_reports_the_holes() {
    let (_dir, server) = listen(patterned_disk());
    let mut client = NbdClient::connect(server.socket(), "disk0", &[BASE_ALLOCATION]).unwrap();
    let extents = client.block_status(BASE_ALLOCATION, 0, 4 * MIB).unwrap();
    assert_eq!(extents, expected_extents());
    // A window starting inside a hole.
    let extents = client
        .block_status(BASE_ALLOCATION, 96 * KIB, 64 * KIB)
        .unwrap();
    assert_eq!(
        extents,
        [
            extent(96 * KIB, 32 * KIB, STATE_HOLE | STATE_ZERO),
            extent(128 * KIB, 32 * KIB, 0)
        ]
    );
}

#[test]
fn the_default_export_is_the_export_and_another_name_is_unknown() {
    let (_dir, server) = listen(vec![7; 8192]);
    let client = NbdClient::connect(server.socket(), "", &[]).unwrap();
    assert_eq!(client.size_bytes(), 8192);
    let error = NbdClient::connect(server.socket(), "other", &[]).unwrap_err();
    assert!(matches!(error, NbdError::ExportNotFound { .. }), "{error}");
}

#[test]
fn every_connection_gets_its_own_export() {
    let data = patterned_disk();
    let dir = tempfile::tempdir().unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let export = MemoryExport::new(data.clone());
    let counter = Arc::clone(&opened);
    let server = ListenerHandle::spawn(dir.path().join("nbd.sock"), "disk0", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(export.clone())
    })
    .unwrap();
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let (socket, data) = (server.socket().to_owned(), data.clone());
            thread::spawn(move || {
                let mut client = NbdClient::connect(&socket, "disk0", &[]).unwrap();
                let mut buf = vec![0; 512 * 1024];
                let offset = i * MIB;
                client.read_at(offset, &mut buf).unwrap();
                let start = usize::try_from(offset).unwrap();
                assert!(buf == data[start..start + buf.len()]);
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(opened.load(Ordering::SeqCst), 4);
    server.stop().unwrap();
}

#[test]
fn stopping_ends_idle_connections_at_once_and_removes_the_socket() {
    let (_dir, server) = listen(vec![1; 4096]);
    let socket = server.socket().to_owned();
    let mut client = NbdClient::connect(&socket, "disk0", &[]).unwrap();
    let started = Instant::now();
    server.stop().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stopping took {:?}",
        started.elapsed()
    );
    assert!(!socket.exists(), "the socket was left behind");
    let mut buf = [0; 16];
    assert!(client.read_at(0, &mut buf).is_err());
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    let (_dir, server) = listen(vec![1; 4096]);
    let greeted = |stream: &mut UnixStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0; 18];
        stream.read_exact(&mut greeting).is_ok()
    };
    let mut open: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(server.socket()).unwrap())
        .collect();
    for stream in &mut open {
        assert!(greeted(stream));
    }
    let mut one_more = UnixStream::connect(server.socket()).unwrap();
    assert!(
        !greeted(&mut one_more),
        "connection {} was served",
        MAX_CONNECTIONS + 1
    );
    // Once one leaves, another is served again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = UnixStream::connect(server.socket()).unwrap();
        if greeted(&mut again) {
            break;
        }
        assert!(Instant::now() < deadline, "no connection was served again");
        thread::sleep(Duration::from_millis(20));
    }
    server.stop().unwrap();
}

#[test]
fn dropping_the_handle_stops_it_too() {
    let (_dir, server) = listen(vec![1; 4096]);
    let socket = server.socket().to_owned();
    let _client = NbdClient::connect(&socket, "disk0", &[]).unwrap();
    drop(server);
    assert!(!socket.exists());
}

// ---- Raw requests ----

/// A client that sends scripted bytes to [`serve_connection`] on a socket pair and reads
/// the replies one by one.
struct Raw {
    stream: UnixStream,
    served: Option<JoinHandle<Result<(), ServerError>>>,
}

enum Answer {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Raw {
    fn serve<E: Export + 'static>(mut export: E) -> Raw {
        let (stream, serving) = UnixStream::pair().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let served =
            thread::spawn(move || serve_connection(serving, "vda", &mut export, &StopFlag::new()));
        Raw {
            stream,
            served: Some(served),
        }
    }

    /// Serves [`patterned_disk`], and reads the greeting.
    fn patterned() -> Raw {
        let mut raw = Raw::serve(MemoryExport::new(patterned_disk()));
        raw.greeting();
        raw
    }

    /// Up to the transmission phase, structured or not, with `base:allocation`.
    fn opened(structured: bool) -> Raw {
        let mut raw = Raw::patterned();
        raw.send(&fake::client_flags());
        if structured {
            raw.send(&fake::option(OPT_STRUCTURED_REPLY, &[]));
            assert_eq!(raw.option_reply().1, REP_ACK);
            raw.send(&fake::option(
                OPT_SET_META_CONTEXT,
                &fake::meta_context_data("vda", &[BASE_ALLOCATION]),
            ));
            assert_eq!(raw.option_reply().1, REP_META_CONTEXT);
            assert_eq!(raw.option_reply().1, REP_ACK);
        }
        raw.send(&fake::option(OPT_GO, &fake::go_data("vda", &[])));
        loop {
            let (_, kind, _) = raw.option_reply();
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_INFO);
        }
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        self.u16()
    }

    /// (option, reply type, data)
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let length = self.u32();
        let data = self.recv(length as usize);
        (option, kind, data)
    }

    fn answer(&mut self) -> Answer {
        match self.u32() {
            SIMPLE_REPLY_MAGIC => Answer::Simple {
                error: self.u32(),
                cookie: self.u64(),
            },
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16();
                let kind = self.u16();
                let cookie = self.u64();
                let length = self.u32();
                Answer::Chunk {
                    flags,
                    kind,
                    cookie,
                    payload: self.recv(length as usize),
                }
            }
            magic => panic!("a reply starts with {magic:#x}"),
        }
    }

    /// A simple reply's error, for request `cookie`.
    fn simple(&mut self, cookie: u64) -> u32 {
        match self.answer() {
            Answer::Simple { error, cookie: c } if c == cookie => error,
            _ => panic!("expected a simple reply to request {cookie}"),
        }
    }

    /// The error code of a final error chunk for request `cookie`.
    fn error_chunk(&mut self, cookie: u64) -> u32 {
        match self.answer() {
            Answer::Chunk {
                flags,
                kind,
                cookie: c,
                payload,
            } if c == cookie
                && flags & REPLY_FLAG_DONE != 0
                && kind & REPLY_TYPE_ERROR_BIT != 0 =>
            {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            }
            _ => panic!("expected an error chunk for request {cookie}"),
        }
    }

    /// Hangs up and returns how the server ended.
    fn finish(mut self) -> Result<(), ServerError> {
        drop(self.stream.shutdown(Shutdown::Write));
        drop(io::copy(&mut self.stream, &mut io::sink()));
        self.served.take().unwrap().join().unwrap()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        drop(self.stream.shutdown(Shutdown::Both));
        if let Some(served) = self.served.take() {
            drop(served.join());
        }
    }
}

#[test]
fn writes_trims_and_zeroes_are_refused_and_the_connection_goes_on() {
    for structured in [false, true] {
        let mut raw = Raw::opened(structured);
        raw.send(&fake::request(0, CMD_WRITE, 1, 0, 4096));
        raw.send(&[0x55; 4096]);
        assert_eq!(raw.simple(1), NBD_EPERM);
        raw.send(&fake::request(0, CMD_TRIM, 2, 0, 4096));
        assert_eq!(raw.simple(2), NBD_EPERM);
        raw.send(&fake::request(0, CMD_WRITE_ZEROES, 3, 0, 4096));
        assert_eq!(raw.simple(3), NBD_EPERM);
        raw.send(&fake::request(0, CMD_FLUSH, 4, 0, 0));
        assert_eq!(raw.simple(4), 0);
        raw.send(&fake::request(0, CMD_CACHE, 5, 0, 4096));
        assert_eq!(raw.simple(5), 0);
        // The data is unchanged, and reads still work.
        raw.send(&fake::request(0, CMD_READ, 6, 0, 16));
        let data = if structured {
            match raw.answer() {
                Answer::Chunk {
                    kind: REPLY_TYPE_OFFSET_DATA,
                    payload,
                    flags,
                    ..
                } => {
                    assert!(flags & REPLY_FLAG_DONE != 0);
                    payload[8..].to_vec()
                }
                _ => panic!("expected data"),
            }
        } else {
            assert_eq!(raw.simple(6), 0);
            raw.recv(16)
        };
        assert_eq!(data, patterned_disk()[..16]);
        raw.send(&fake::request(0, CMD_DISC, 7, 0, 0));
        raw.finish().unwrap();
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let mut raw = Raw::opened(true);
    let size = 4 * MIB;
    // Past the end, far past the end, and an offset that overflows.
    raw.send(&fake::request(0, CMD_READ, 1, size - 10, 11));
    assert_eq!(raw.error_chunk(1), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_READ, 2, u64::MAX - 5, 4096));
    assert_eq!(raw.error_chunk(2), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_BLOCK_STATUS, 3, size, 1));
    assert_eq!(raw.error_chunk(3), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_BLOCK_STATUS, 4, 0, 0));
    assert_eq!(raw.error_chunk(4), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_CACHE, 5, size, 4096));
    assert_eq!(raw.simple(5), NBD_EINVAL);
    // Larger than any read served: the client may retry smaller.
    raw.send(&fake::request(0, CMD_READ, 6, 0, u32::MAX));
    assert_eq!(raw.error_chunk(6), NBD_EOVERFLOW);
    raw.send(&fake::request(0, CMD_READ, 7, 0, MAX_PAYLOAD_BYTES + 1));
    assert_eq!(raw.error_chunk(7), NBD_EOVERFLOW);
    // Commands that do not exist, resize included.
    raw.send(&fake::request(0, 8, 8, 0, 0));
    assert_eq!(raw.simple(8), NBD_EINVAL);
    raw.send(&fake::request(0xffff, 0xffff, 9, u64::MAX, u32::MAX));
    assert_eq!(raw.simple(9), NBD_EINVAL);
    // An empty read is answered with no data.
    raw.send(&fake::request(0, CMD_READ, 10, 0, 0));
    assert!(matches!(
        raw.answer(),
        Answer::Chunk {
            kind: REPLY_TYPE_NONE,
            flags: REPLY_FLAG_DONE,
            cookie: 10,
            ..
        }
    ));
    // One extent only, when asked; a read that must not be split.
    raw.send(&fake::request(
        CMD_FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        11,
        0,
        4 << 20,
    ));
    match raw.answer() {
        Answer::Chunk {
            kind: REPLY_TYPE_BLOCK_STATUS,
            payload,
            ..
        } => assert_eq!(
            payload,
            [
                &1u32.to_be_bytes()[..],
                &(64u32 << 10).to_be_bytes(),
                &[0; 4]
            ]
            .concat()
        ),
        _ => panic!("expected a block status"),
    }
    raw.send(&fake::request(CMD_FLAG_DF, CMD_READ, 12, 60 * KIB, 8 << 10));
    match raw.answer() {
        Answer::Chunk {
            kind: REPLY_TYPE_OFFSET_DATA,
            payload,
            flags: REPLY_FLAG_DONE,
            ..
        } => assert_eq!(payload[8..], patterned_disk()[60 << 10..68 << 10]),
        _ => panic!("expected one data chunk"),
    }
    // Still alive.
    raw.send(&fake::request(0, CMD_FLUSH, 13, 0, 0));
    assert_eq!(raw.simple(13), 0);
    // A write larger than any request may be: the connection ends, as the spec allows.
    raw.send(&fake::request(0, CMD_WRITE, 14, 0, u32::MAX));
    let error = raw.finish().unwrap_err();
    assert!(matches!(error, ServerError::Protocol { .. }), "{error}");
}

#[test]
fn without_structured_replies_errors_are_simple_and_block_status_is_refused() {
    let mut raw = Raw::opened(false);
    raw.send(&fake::request(0, CMD_READ, 1, 4 * MIB, 1));
    assert_eq!(raw.simple(1), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_READ, 2, 0, MAX_PAYLOAD_BYTES + 1));
    assert_eq!(raw.simple(2), NBD_EINVAL);
    raw.send(&fake::request(0, CMD_BLOCK_STATUS, 3, 0, 4096));
    assert_eq!(raw.simple(3), NBD_EINVAL);
    // A read across a hole: zeros in a simple reply.
    raw.send(&fake::request(0, CMD_READ, 4, 60 * KIB, 8 << 10));
    assert_eq!(raw.simple(4), 0);
    assert_eq!(raw.recv(8192), patterned_disk()[60 << 10..68 << 10]);
    raw.finish().unwrap();
}

/// An export whose reads fail at 1 MiB.
struct Failing(MemoryExport);

impl Export for Failing {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset <= MIB && MIB < offset + buf.len() as u64 {
            return Err(io::Error::other("chunk 1 MiB is damaged"));
        }
        self.0.read_at(offset, buf)
    }

    fn allocation_at(&mut self, offset: u64, length: u64) -> io::Result<Run> {
        if offset == 3 * MIB {
            return Err(io::Error::other("the index is damaged"));
        }
        // Everything is data, so that the damaged chunk is read.
        Ok(Run {
            allocation: Allocation::Data,
            length_bytes: length.min(MIB),
        })
    }
}

#[test]
fn export_errors_fail_only_their_request_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let server = ListenerHandle::spawn(dir.path().join("nbd.sock"), "disk0", || {
        Ok(Failing(MemoryExport::new(patterned_disk())))
    })
    .unwrap();
    let mut client = NbdClient::connect(server.socket(), "disk0", &[BASE_ALLOCATION]).unwrap();
    let mut buf = vec![0; 2 << 20];
    let error = client.read_at(0, &mut buf).unwrap_err();
    assert!(
        matches!(error, NbdError::CommandFailed { code: 5, .. }),
        "{error}"
    );
    let error = client
        .block_status(BASE_ALLOCATION, 3 * MIB, 4096)
        .unwrap_err();
    assert!(
        matches!(error, NbdError::CommandFailed { code: 5, .. }),
        "{error}"
    );
    let mut small = vec![0; 4096];
    client.read_at(2 * MIB, &mut small).unwrap();
    assert!(small == patterned_disk()[2 << 20..(2 << 20) + 4096]);
    // Without structured replies, too.
    let mut raw = Raw::serve(Failing(MemoryExport::new(patterned_disk())));
    raw.greeting();
    raw.send(&fake::client_flags());
    raw.send(&fake::option(OPT_EXPORT_NAME, b"vda"));
    assert_eq!(raw.u64(), 4 * MIB);
    raw.u16();
    raw.send(&fake::request(0, CMD_READ, 1, MIB - 10, 20));
    assert_eq!(raw.simple(1), NBD_EIO);
    raw.send(&fake::request(0, CMD_READ, 2, 0, 4));
    assert_eq!(raw.simple(2), 0);
    raw.recv(4);
    raw.finish().unwrap();
}

#[test]
#[allow(clippy::too_many_lines)] // one conversation
fn options_are_answered_as_the_spec_says() {
    let mut raw = Raw::serve(MemoryExport::new(vec![3; 12345]));
    let flags = raw.greeting();
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    raw.send(&fake::client_flags());

    raw.send(&fake::option(OPT_LIST, &[]));
    let (option, kind, data) = raw.option_reply();
    assert_eq!((option, kind), (OPT_LIST, REP_SERVER));
    assert_eq!(data, [&3u32.to_be_bytes()[..], b"vda"].concat());
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.send(&fake::option(OPT_LIST, b"x"));
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);

    // INFO by the default name: size and flags (no DF before structured replies), block
    // sizes unasked, the name when asked.
    raw.send(&fake::option(OPT_INFO, &fake::go_data("", &[INFO_NAME])));
    let mut infos = Vec::new();
    loop {
        let (option, kind, data) = raw.option_reply();
        assert_eq!(option, OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        infos.push(data);
    }
    let export = [
        &INFO_EXPORT.to_be_bytes()[..],
        &12345u64.to_be_bytes(),
        &(1u16 | 2 | 1 << 8 | 1 << 10).to_be_bytes(),
    ]
    .concat();
    let sizes = [
        &INFO_BLOCK_SIZE.to_be_bytes()[..],
        &1u32.to_be_bytes(),
        &(64u32 << 10).to_be_bytes(),
        &(32u32 << 20).to_be_bytes(),
    ]
    .concat();
    let name = [&INFO_NAME.to_be_bytes()[..], b"vda"].concat();
    assert_eq!(infos, [export, sizes, name]);

    raw.send(&fake::option(OPT_GO, &fake::go_data("other", &[])));
    assert_eq!(raw.option_reply().1, REP_ERR_UNKNOWN);
    raw.send(&fake::option(OPT_GO, &fake::go_data("vda", &[])[..5]));
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);
    raw.send(&fake::option(99, b"whatever"));
    assert_eq!(
        raw.option_reply(),
        (99, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    raw.send(&fake::option(5, &[])); // STARTTLS
    assert_eq!(raw.option_reply().1, REP_ERR_UNSUP);

    let set = fake::meta_context_data("vda", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]);
    raw.send(&fake::option(OPT_SET_META_CONTEXT, &set));
    assert_eq!(
        raw.option_reply().1,
        REP_ERR_INVALID,
        "before structured replies"
    );
    raw.send(&fake::option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.send(&fake::option(OPT_STRUCTURED_REPLY, b"x"));
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);

    for queries in [&[][..], &["base:"], &[BASE_ALLOCATION]] {
        let list = fake::meta_context_data("vda", queries);
        raw.send(&fake::option(OPT_LIST_META_CONTEXT, &list));
        let (_, kind, data) = raw.option_reply();
        assert_eq!(kind, REP_META_CONTEXT);
        assert_eq!(
            data,
            [&0u32.to_be_bytes()[..], BASE_ALLOCATION.as_bytes()].concat()
        );
        assert_eq!(raw.option_reply().1, REP_ACK);
    }
    let list = fake::meta_context_data("vda", &["qemu:"]);
    raw.send(&fake::option(OPT_LIST_META_CONTEXT, &list));
    assert_eq!(raw.option_reply().1, REP_ACK);
    let list = fake::meta_context_data("other", &[]);
    raw.send(&fake::option(OPT_LIST_META_CONTEXT, &list));
    assert_eq!(raw.option_reply().1, REP_ERR_UNKNOWN);
    // A count of queries the data cannot hold.
    let mut lying = fake::meta_context_data("vda", &[]);
    let at = lying.len() - 4;
    lying[at..].copy_from_slice(&u32::MAX.to_be_bytes());
    raw.send(&fake::option(OPT_SET_META_CONTEXT, &lying));
    assert_eq!(raw.option_reply().1, REP_ERR_INVALID);

    raw.send(&fake::option(OPT_SET_META_CONTEXT, &set));
    let (_, kind, data) = raw.option_reply();
    assert_eq!(kind, REP_META_CONTEXT);
    assert_eq!(
        data,
        [&1u32.to_be_bytes()[..], BASE_ALLOCATION.as_bytes()].concat()
    );
    assert_eq!(raw.option_reply().1, REP_ACK);

    // With structured replies, SEND_DF is offered.
    raw.send(&fake::option(OPT_GO, &fake::go_data("vda", &[])));
    let (_, kind, data) = raw.option_reply();
    assert_eq!(kind, REP_INFO);
    assert_eq!(
        data[10..],
        (1u16 | 2 | 1 << 7 | 1 << 8 | 1 << 10).to_be_bytes()
    );
    assert_eq!(raw.option_reply().1, REP_INFO);
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.send(&fake::request(0, CMD_BLOCK_STATUS, 1, 0, 12345));
    match raw.answer() {
        Answer::Chunk {
            kind: REPLY_TYPE_BLOCK_STATUS,
            payload,
            ..
        } => assert_eq!(
            payload,
            [&1u32.to_be_bytes()[..], &12345u32.to_be_bytes(), &[0; 4]].concat()
        ),
        _ => panic!("expected a block status"),
    }
    raw.send(&fake::request(0, CMD_DISC, 2, 0, 0));
    raw.finish().unwrap();
}

#[test]
fn abort_and_export_name_end_the_handshake() {
    let mut raw = Raw::patterned();
    raw.send(&fake::client_flags());
    raw.send(&fake::option(OPT_ABORT, &[]));
    assert_eq!(raw.option_reply().1, REP_ACK);
    raw.finish().unwrap();

    // EXPORT_NAME without NO_ZEROES: size, flags and 124 zeros, then simple replies.
    let mut raw = Raw::patterned();
    raw.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    raw.send(&fake::option(OPT_EXPORT_NAME, b"vda"));
    assert_eq!(raw.u64(), 4 * MIB);
    assert_eq!(raw.u16(), 1 | 2 | 1 << 8 | 1 << 10);
    assert_eq!(raw.recv(124), [0; 124]);
    raw.send(&fake::request(0, CMD_READ, 1, 100, 50));
    assert_eq!(raw.simple(1), 0);
    assert_eq!(raw.recv(50), patterned_disk()[100..150]);
    raw.finish().unwrap();

    // A wrong name: nothing to answer but hanging up.
    let mut raw = Raw::patterned();
    raw.send(&fake::client_flags());
    raw.send(&fake::option(OPT_EXPORT_NAME, b"nope"));
    let error = raw.finish().unwrap_err();
    assert!(
        matches!(error, ServerError::UnknownExport { .. }),
        "{error}"
    );
}

#[test]
fn hostile_handshakes_end_the_connection_without_panic() {
    type Expected = fn(&ServerError) -> bool;
    let protocol: Expected = |e| matches!(e, ServerError::Protocol { .. });
    let mut huge_option = fake::client_flags();
    huge_option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    huge_option.extend_from_slice(&OPT_GO.to_be_bytes());
    huge_option.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut cut_option = fake::client_flags();
    cut_option.extend_from_slice(&fake::option(OPT_GO, &fake::go_data("vda", &[]))[..20]);
    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        ("HTTP", b"GET / HTTP/1.1\r\n\r\n".to_vec(), protocol),
        (
            "unknown client flags",
            0xffff_ffffu32.to_be_bytes().to_vec(),
            protocol,
        ),
        ("not fixed newstyle", 0u32.to_be_bytes().to_vec(), protocol),
        ("a huge option", huge_option, protocol),
        ("a cut option", cut_option, |e| {
            matches!(e, ServerError::Disconnected { .. })
        }),
        ("cut flags", vec![0, 0], |e| {
            matches!(e, ServerError::Disconnected { .. })
        }),
    ];
    for (name, script, expected) in cases {
        let mut raw = Raw::patterned();
        raw.send(&script);
        let error = raw.finish().unwrap_err();
        assert!(expected(&error), "{name}: {error}");
    }
    // Hanging up at once, or between options, is no error.
    let raw = Raw::patterned();
    raw.finish().unwrap();
    let mut raw = Raw::patterned();
    raw.send(&fake::client_flags());
    raw.finish().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a client says after opening the export, the server neither panics nor
    /// hangs, and holds no more than a request's worth of memory.
    #[test]
    fn arbitrary_requests_after_the_handshake(
        requests in proptest::collection::vec(
            (any::<u16>(), 0u16..10, any::<u64>(), prop_oneof![0u64..300_000, any::<u64>()],
             prop_oneof![0u32..70_000, any::<u32>()]),
            0..8,
        ),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut script = fake::client_handshake("vda");
        for (flags, command, cookie, offset, length) in requests {
            script.extend(fake::request(flags, command, cookie, offset, length));
        }
        script.extend(tail);
        // Errors are expected; a panic or a hang is the failure.
        drop(fake::serve_script(&script));
    }

    /// Whatever bytes a client sends from the start.
    #[test]
    fn arbitrary_bytes_from_the_start(script in proptest::collection::vec(any::<u8>(), 0..512)) {
        drop(fake::serve_script(&script));
    }
}

/// The server fuzz corpus (`nbd/fuzz/corpus/server_requests`) replayed: every
/// conversation ends without a panic or a hang.
#[test]
fn the_server_fuzz_corpus_replays_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/server_requests");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let script = std::fs::read(entry.unwrap().path()).unwrap();
        drop(fake::serve_script(&script));
        replayed += 1;
    }
    assert!(
        replayed >= fake::client_seeds().len(),
        "{} holds no corpus",
        corpus.display()
    );
}

/// The seeds end cleanly, so they reach past the handshake.
#[test]
fn the_server_fuzz_seeds_are_well_formed() {
    for (name, script) in fake::client_seeds() {
        let result = fake::serve_script(&script);
        assert!(result.is_ok(), "{name}: {result:?}");
    }
}

/// Writes the server seeds into the corpus folder (run once by hand: `cargo test -p
/// rewind-nbd -- --ignored write_server_fuzz_seeds`).
#[test]
#[ignore = "writes the fuzz corpus's seeds into the source tree"]
fn write_server_fuzz_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/server_requests");
    std::fs::create_dir_all(&corpus).unwrap();
    for (name, script) in fake::client_seeds() {
        std::fs::write(corpus.join(format!("seed-{name}")), script).unwrap();
    }
}
