//! Tests against a real `qemu-nbd` (package qemu-utils).

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
                drop(
                    server
                        .child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut stderr),
                );
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
        drop(self.child.kill());
        drop(self.child.wait());
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
        expected[usize::try_from(offset).unwrap()..usize::try_from(offset + length).unwrap()]
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
