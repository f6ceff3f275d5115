//! The client against scripted servers, a real qemu-nbd, and arbitrary replies; the
//! server against the client, scripted clients, and QEMU's tools.

#![allow(clippy::wildcard_imports)] // the tests reach into every part of the client

use std::io::{self, Read};

use std::path::{Path, PathBuf};

use crate::client::*;
use crate::fake;
use crate::transmission::*;
use crate::wire::*;
use crate::*;

mod arbitrary_replies;
mod qemu;
mod server;
mod server_qemu;

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

/// The fuzz corpus (`nbd/fuzz/corpus/client_replies`, grown by `cargo fuzz run
/// client_replies`) replayed: every conversation that ever found a new path still ends
/// without a panic or a hang.
#[test]
fn the_fuzz_corpus_replays_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client_replies");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let script = std::fs::read(entry.unwrap().path()).unwrap();
        fake::converse(&script);
        replayed += 1;
    }
    assert!(
        replayed >= fake::seeds().len(),
        "{} holds no corpus",
        corpus.display()
    );
}

/// The seeds are conversations the client gets through: each one really exercises the
/// read, the block status and the goodbye, rather than failing in the handshake.
#[test]
fn the_fuzz_seeds_are_well_formed() {
    let seeds = fake::seeds();
    let (_, script) = seeds
        .iter()
        .find(|(name, _)| *name == "structured-replies")
        .unwrap();
    let mut client = fake::connect(
        script.clone(),
        &[BASE_ALLOCATION, "qemu:dirty-bitmap:backup-vda"],
    )
    .unwrap();
    let mut buf = vec![0; 4096];
    client.read_at(0, &mut buf).unwrap();
    assert!(buf[..2048].iter().all(|&b| b == 0xaa) && buf[2048..].iter().all(|&b| b == 0));
    let extents = client.block_status(BASE_ALLOCATION, 0, 4096).unwrap();
    assert_eq!(
        extents,
        [Extent {
            offset: 0,
            length: 4096,
            flags: 0
        }]
    );
    let extents = client
        .block_status("qemu:dirty-bitmap:backup-vda", 0, 4096)
        .unwrap();
    assert_eq!(
        extents[0],
        Extent {
            offset: 0,
            length: 1024,
            flags: 1
        }
    );
}

/// Writes the seeds into the corpus folder (run once by hand: `cargo test -p rewind-nbd
/// -- --ignored write_fuzz_seeds`).
#[test]
#[ignore = "writes the fuzz corpus's seeds into the source tree"]
fn write_fuzz_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client_replies");
    for (name, script) in fake::seeds() {
        std::fs::write(corpus.join(format!("seed-{name}")), script).unwrap();
    }
}
