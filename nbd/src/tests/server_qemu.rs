//! The server against QEMU's own NBD client: `qemu-img` and `qemu-io` (package
//! qemu-utils), as QEMU uses a served checkpoint, the backing file of a qcow2 overlay.

use super::server::{hole_ranges, patterned_disk};
use super::*;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// No QEMU tool run here takes more than a second or two; one that hangs is killed.
const TOOL_TIMEOUT: Duration = Duration::from_mins(1);

/// Whether `qemu-img` and `qemu-io` can be run; if not, says so (the test is skipped).
fn qemu_tools_present(test: &str) -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        let runs = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            eprintln!("SKIPPED {test}: {tool} cannot be run (install qemu-utils)");
            return false;
        }
    }
    true
}

/// A child process killed and reaped when dropped, so that none outlives a failed test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// Runs `command` to its end and returns its output; panics with its stderr if it fails.
fn run(command: &mut Command) -> Output {
    let output = run_unchecked(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `command` to its end within [`TOOL_TIMEOUT`] (else kills it and panics) and
/// returns its output, whether it succeeded or not.
fn run_unchecked(command: &mut Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let mut child = Reaped(child);
    // Read the pipes on threads so that a chatty tool cannot block on a full pipe.
    let mut stdout = child.0.stdout.take().unwrap();
    let mut stderr = child.0.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        drop(stdout.read_to_end(&mut bytes));
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        drop(stderr.read_to_end(&mut bytes));
        bytes
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{command:?} did not finish in {TOOL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// [`patterned_disk`] with 64 KiB of 0x5a at 256 KiB, for `qemu-io`'s `read -P`.
fn disk() -> Vec<u8> {
    let mut data = patterned_disk();
    data[256 << 10..320 << 10].fill(0x5a);
    data
}

/// Serves `data` as `disk0` in `dir`; returns the handle and the URI QEMU opens.
fn serve(dir: &Path, data: &[u8]) -> (ListenerHandle, String) {
    let export = MemoryExport::new(data.to_vec());
    let socket = dir.join("disk0.sock");
    let handle = ListenerHandle::spawn(&socket, "disk0", move || Ok(export.clone())).unwrap();
    let uri = format!("nbd+unix:///disk0?socket={}", socket.display());
    (handle, uri)
}

#[test]
fn qemu_img_copies_compares_and_maps_the_export() {
    if !qemu_tools_present("qemu_img_copies_compares_and_maps_the_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let (server, uri) = serve(dir.path(), &data);

    let copy = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == data, "the copy differs");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&copy));

    // The map: holes are neither data nor anything but zeros; the rest is data.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let mut described = 0;
    let mut holes = Vec::new();
    for entry in map.as_array().unwrap() {
        let start = entry["start"].as_u64().unwrap();
        let length = entry["length"].as_u64().unwrap();
        assert_eq!(start, described, "the map has a gap: {map}");
        described += length;
        if entry["data"] == false {
            assert_eq!(entry["zero"], true, "{entry}");
            match holes.last_mut() {
                Some((offset, hole_length)) if *offset + *hole_length == start => {
                    *hole_length += length;
                }
                _ => holes.push((start, length)),
            }
        }
    }
    assert_eq!(described, data.len() as u64);
    assert_eq!(holes, hole_ranges(), "{map}");
    server.stop().unwrap();
}

#[test]
fn qemu_io_reads_patterns_through_the_export() {
    if !qemu_tools_present("qemu_io_reads_patterns_through_the_export") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, uri) = serve(dir.path(), &disk());
    run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -q -P 0x5a 256k 64k",
        "-c",
        "read -q -P 0 64k 64k",
        "-c",
        "read -q -P 0 3584k 512k",
        uri.as_str(),
    ]));
    // A wrong pattern is noticed, so the reads above did check something.
    let wrong = run_unchecked(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x5b 256k 4k",
        &uri,
    ]));
    let said = String::from_utf8_lossy(&wrong.stdout);
    assert!(said.contains("Pattern verification failed"), "{said}");
    // Opening the export itself for writing is refused (QEMU: "Permission denied").
    let write =
        run_unchecked(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", &uri]));
    assert!(
        !write.status.success(),
        "{}",
        String::from_utf8_lossy(&write.stdout)
    );
    server.stop().unwrap();
}

#[test]
fn a_qcow2_overlay_on_the_export_takes_writes_and_leaves_the_export_alone() {
    if !qemu_tools_present("a_qcow2_overlay_on_the_export_takes_writes_and_leaves_the_export_alone")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let (server, uri) = serve(dir.path(), &data);
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &uri])
        .arg(&overlay));
    let overlay_arg = overlay.to_str().unwrap();
    // Writes into data, into a hole, and across the end of a hole.
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -q -P 0xa5 0 64k",
        "-c",
        "write -q -P 0xa6 1m 4k",
        "-c",
        "write -q -P 0xa7 120k 16k",
        overlay_arg,
    ]));
    let mut expected = data.clone();
    expected[..64 << 10].fill(0xa5);
    expected[1 << 20..(1 << 20) + 4096].fill(0xa6);
    expected[120 << 10..136 << 10].fill(0xa7);
    run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -q -P 0xa5 0 64k",
        "-c",
        "read -q -P 0x5a 256k 64k",
        "-c",
        "read -q -P 0 64k 56k",
        "-c",
        "read -q -P 0xa7 120k 16k",
        overlay_arg,
    ]));
    let merged = dir.path().join("merged.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", overlay_arg])
        .arg(&merged));
    assert!(
        std::fs::read(&merged).unwrap() == expected,
        "the overlay does not read as the export with the writes"
    );
    // The export is as it was: through our client, and through QEMU's.
    let mut client = NbdClient::connect(server.socket(), "disk0", &[]).unwrap();
    let mut read_back = vec![0; data.len()];
    client.read_at(0, &mut read_back).unwrap();
    assert!(read_back == data, "the export changed");
    client.close().unwrap();
    let original = dir.path().join("original.raw");
    std::fs::write(&original, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&original));
    server.stop().unwrap();
    assert!(!dir.path().join("disk0.sock").exists());
    // Once the export is gone, the overlay cannot be opened: it really reads through it.
    let orphan = run_unchecked(Command::new("qemu-io").args([
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read 0 4k",
        overlay_arg,
    ]));
    assert!(!orphan.status.success());
}

/// How fast QEMU reads a served export (`cargo test --release -p rewind-nbd -- --ignored
/// --nocapture qemu_reads_the_export_at`): 256 MiB of data, read in 1 MiB requests.
#[test]
#[ignore = "a measurement, not a check"]
fn qemu_reads_the_export_at() {
    if !qemu_tools_present("qemu_reads_the_export_at") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..256u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap() | 1)
        .collect();
    let (server, uri) = serve(dir.path(), &data);
    let started = Instant::now();
    let bench = run(Command::new("qemu-img").args([
        "bench", "-f", "raw", "-c", "256", "-s", "1M", "-d", "4", &uri,
    ]));
    let elapsed = started.elapsed();
    eprintln!(
        "qemu-img bench read 256 MiB in {elapsed:?} ({:.0} MiB/s): {}",
        256.0 / elapsed.as_secs_f64(),
        String::from_utf8_lossy(&bench.stdout).trim()
    );
    server.stop().unwrap();
}
