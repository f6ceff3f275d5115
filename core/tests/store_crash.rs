//! Crash safety of the store: a process writing checkpoints (and pruning and collecting
//! garbage) is killed with SIGKILL at random instants. After each kill, `verify` must find
//! the store intact and every checkpoint the store lists must read back byte-exact.
//!
//! The writer is this test binary itself, re-run with `--ignored --exact crash_child`
//! and `REWIND_CRASH_CHILD` set: the child's progress is printed on stdout as
//! `WRITING n hash`, `COMMITTED n id` and `DELETING n` lines.

#![allow(clippy::unwrap_used)] // test code: a panic is how it fails
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rewind_core::progress::Control;
use rewind_core::store::{
    CheckpointKind, Consistency, InitOptions, NewCheckpoint, Store, StoreError, VmRef,
};
use uuid::Uuid;

const CHUNK: u32 = 64 << 10;
const IMAGE_BYTES: usize = 6 << 20;
const KILLS: usize = 24;
const VM_UUID: Uuid = Uuid::from_bytes([0x42; 16]);

/// Deterministic image content for checkpoint `n`: mostly shared with `n - 1`, with a few
/// changed regions (some zeroed, some text, some noise) so that dedup, holes and new
/// chunks all occur.
fn image_content(n: u64) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut content: Vec<u8> = (0..IMAGE_BYTES).map(|_| (next() >> 32) as u8).collect();
    content[IMAGE_BYTES / 2..IMAGE_BYTES / 2 + (1 << 20)].fill(0);
    for k in 0..=n {
        let mut y = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for _ in 0..4 {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            let start = usize::try_from(y % (IMAGE_BYTES as u64 - 100_000)).unwrap();
            let len = 1000 + usize::try_from((y >> 20) % 90_000).unwrap();
            let fill = (y >> 40) as u8;
            content[start..start + len].fill(fill);
        }
    }
    content
}

fn time_of(n: u64) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
        + chrono::Duration::minutes(i64::try_from(n).unwrap())
}

fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The child: keeps writing checkpoints n, n+1, … until killed; every fourth round it also
/// deletes its oldest checkpoint and collects garbage, so kills land in GC too.
#[test]
#[ignore = "run by crash_at_random_instants_loses_nothing as its child process"]
fn crash_child() {
    let Some(root) = std::env::var_os("REWIND_CRASH_CHILD") else {
        return;
    };
    let root = Path::new(&root);
    let store = Store::open(root, None).unwrap();
    let control = Control::new();
    let image = root.parent().unwrap().join("image.raw");
    let catalog = store.catalog().unwrap();
    let mut parent = catalog.checkpoints.last().cloned();
    let mut n = catalog
        .checkpoints
        .iter()
        .map(|m| (m.time - time_of(0)).num_minutes() as u64 + 1)
        .max()
        .unwrap_or(0);
    loop {
        let content = image_content(n);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&image)
            .unwrap();
        file.set_len(0).unwrap();
        file.set_len(IMAGE_BYTES as u64).unwrap();
        for (i, piece) in content.chunks(CHUNK as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                file.write_all_at(piece, (i * CHUNK as usize) as u64)
                    .unwrap();
            }
        }
        println!("WRITING {n} {}", digest(&content));
        let new = NewCheckpoint {
            vm: VmRef {
                name: "crash".into(),
                uuid: VM_UUID,
            },
            time: time_of(n),
            kind: CheckpointKind::Disk,
            consistency: Consistency::Crash,
            domain_xml: "<domain/>".into(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            full_reason: None,
            consistency_note: None,
            labels: vec![],
            libvirt_checkpoint: None,
        };
        let mut writer = match store.begin_checkpoint(new.clone(), &control) {
            Err(StoreError::ParentGone { .. }) => {
                parent = None;
                store
                    .begin_checkpoint(
                        NewCheckpoint {
                            parent: None,
                            ..new
                        },
                        &control,
                    )
                    .unwrap()
            }
            other => other.unwrap(),
        };
        let object = writer
            .ingest_file(
                &File::open(&image).unwrap(),
                IMAGE_BYTES as u64,
                parent.as_ref().map(|p| &p.disks[0].index),
                &control,
            )
            .unwrap();
        writer
            .add_disk("vda", None, Some("raw".into()), object)
            .unwrap();
        writer
            .add_blob_bytes("nvram", format!("nvram of {n}").as_bytes())
            .unwrap();
        let m = writer.commit(&control).unwrap();
        println!("COMMITTED {n} {}", m.id);
        parent = Some(m);
        if n % 4 == 3 {
            let oldest = store
                .catalog()
                .unwrap()
                .checkpoints
                .into_iter()
                .next()
                .unwrap();
            let k = (oldest.time - time_of(0)).num_minutes();
            println!("DELETING {k}");
            store.delete_checkpoint(&VM_UUID, &oldest.id).unwrap();
            store.gc(&control).unwrap();
            println!("COLLECTED");
        }
        n += 1;
    }
}

#[test]
fn crash_at_random_instants_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    Store::init(
        &root,
        &InitOptions {
            chunk_size_bytes: CHUNK,
            ..InitOptions::default()
        },
    )
    .unwrap();
    // Expected content digest of every checkpoint n that was ever started.
    let mut expected: HashMap<u64, String> = HashMap::new();
    let mut committed_total = 0;
    let mut seed = 0x1234_5678_u64;
    let mut observed_kill_points = Vec::new();
    for round in 0..KILLS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("REWIND_CRASH_CHILD", &root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the child to start its first checkpoint, then a pseudo-random time more.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 1500);
        let mut last = String::new();
        let started = Instant::now();
        let mut killed_at: Option<Instant> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(line) => {
                    let line = child_words(&line);
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    match parts.as_slice() {
                        ["WRITING", n, hash] => {
                            expected.insert(n.parse().unwrap(), (*hash).to_owned());
                            if killed_at.is_none() {
                                killed_at = Some(Instant::now() + delay);
                            }
                        }
                        ["COMMITTED", ..] => committed_total += 1,
                        _ => {}
                    }
                    last = line;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the child ended by itself after {last:?}")
                }
            }
            if killed_at.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_mins(2),
                "the child made no progress: {last:?}"
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        observed_kill_points.push(last.split_whitespace().next().unwrap_or("").to_owned());

        check_store(&root, &expected, &format!("round {round}, after {last:?}"));
    }
    let store = Store::open(&root, None).unwrap();
    store.gc(&Control::new()).unwrap();
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
    assert!(
        committed_total >= KILLS,
        "too few checkpoints were committed to mean anything: {committed_total}"
    );
    // Kills must have landed in different phases, not always at the same point.
    observed_kill_points.sort();
    observed_kill_points.dedup();
    assert!(
        observed_kill_points.len() >= 2,
        "kills all landed after {observed_kill_points:?}"
    );
    eprintln!(
        "{KILLS} kills, {committed_total} checkpoints committed, kill points after: {observed_kill_points:?}"
    );
}

/// After a kill: the store verifies clean and every checkpoint it lists reads back as written.
fn check_store(root: &Path, expected: &HashMap<u64, String>, when: &str) {
    let store = Store::open(root, None).unwrap();
    let report = store.verify(false, &Control::new()).unwrap();
    assert!(report.is_clean(), "{when}: verify after kill: {report:?}");
    let catalog = store.catalog().unwrap();
    for m in &catalog.checkpoints {
        let n = u64::try_from((m.time - time_of(0)).num_minutes()).unwrap();
        let mut out = Vec::new();
        let mut reader = store.object_reader(&m.disks[0].index).unwrap();
        for i in 0..reader.chunk_count() {
            out.extend_from_slice(&reader.read(i).unwrap());
        }
        let want = expected
            .get(&n)
            .unwrap_or_else(|| panic!("{when}: checkpoint {n} was never written"));
        assert_eq!(
            &digest(&out),
            want,
            "{when}: checkpoint {n} reads back different data"
        );
        let nvram = store
            .object_reader(&m.blobs[0].index)
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(nvram, format!("nvram of {n}").as_bytes());
    }
}

/// The child's words in a line of its output: libtest prints `test crash_child ... `
/// without a newline before the child's first line.
fn child_words(line: &str) -> String {
    ["WRITING", "COMMITTED", "DELETING", "COLLECTED"]
        .iter()
        .filter_map(|w| line.find(w))
        .min()
        .map_or_else(|| line.to_owned(), |at| line[at..].to_owned())
}
