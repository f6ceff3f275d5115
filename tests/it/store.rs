//! The store from the command line: `init`, `checkpoints`, `verify`, `prune`, `gc`, on real
//! folders. Checkpoints are written with `rewind-core` directly until `rewind checkpoint`
//! exists (issue 4); everything the user does goes through the real binary.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Output, Stdio};

use chrono::{TimeZone, Utc};
use rewind_core::progress::Control;
use rewind_core::store::{CheckpointKind, Consistency, Manifest, NewCheckpoint, Store, VmRef};
use rewind_tests::scratch::ScratchDir;
use uuid::Uuid;

use crate::rewind;

fn scratch(label: &str) -> ScratchDir {
    ScratchDir::new(label).expect("scratch folder")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Writes one checkpoint of `content` as disk `vda` of VM `name`.
pub(crate) fn write_checkpoint(
    store: &Store,
    name: &str,
    uuid_byte: u8,
    time: chrono::DateTime<Utc>,
    content: &[u8],
    dir: &Path,
) -> Manifest {
    let image = dir.join(format!("{name}-{}.img", time.timestamp()));
    let file = File::create(&image).unwrap();
    file.set_len(content.len() as u64 + (8 << 20)).unwrap(); // and a hole
    file.write_all_at(content, 0).unwrap();
    let size = file.metadata().unwrap().len();
    let control = Control::new();
    let new = NewCheckpoint {
        vm: VmRef {
            name: name.into(),
            uuid: Uuid::from_bytes([uuid_byte; 16]),
        },
        time,
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: format!("<domain type='qemu'><name>{name}</name></domain>"),
        parent: None,
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    };
    let mut writer = store.begin_checkpoint(new, &control).unwrap();
    let object = writer
        .ingest_file(&File::open(&image).unwrap(), size, None, &control)
        .unwrap();
    writer
        .add_disk(
            "vda",
            Some(image.display().to_string()),
            Some("raw".into()),
            object,
        )
        .unwrap();
    writer.commit(&control).unwrap()
}

fn content(seed: u8, len: usize) -> Vec<u8> {
    let low = |v: usize| v.to_le_bytes()[0];
    (0..len)
        .map(|i| low(i).wrapping_mul(31).wrapping_add(seed) ^ low(i >> 11))
        .collect()
}

fn fails(out: &Output, words: &[&str]) -> String {
    // Progress lines (`progress: …`, on a stderr that is no terminal) may come first.
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("progress: "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !out.status.success(),
        "should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1,
        "one `error:` line: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "stderr should mention {w:?}: {stderr}");
    }
    stderr
}

/// A store made with `rewind init`, holding five checkpoints of "Win 11" over three days
/// and one of "ubuntu".
fn store_with_history(dir: &ScratchDir) -> (std::path::PathBuf, Vec<Manifest>) {
    let dest = dir.path().join("backup");
    let out = rewind::run_ok(&["init", path_str(&dest)]);
    assert!(out.contains("Created store"), "{out}");
    assert!(dest.join("rewind-store.json").exists());

    // Two VMs, several checkpoints over three days.
    let store = Store::open(&dest, None).unwrap();
    let data = content(1, 3 << 20);
    let mut taken = Vec::new();
    for (day, hour) in [(1, 9), (1, 17), (2, 9), (3, 8), (3, 9)] {
        let time = Utc.with_ymd_and_hms(2026, 3, day, hour, 0, 0).unwrap();
        taken.push(write_checkpoint(
            &store,
            "Win 11",
            1,
            time,
            &data,
            dir.path(),
        ));
    }
    write_checkpoint(
        &store,
        "ubuntu",
        2,
        Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap(),
        &content(2, 1 << 20),
        dir.path(),
    );

    (dest, taken)
}

#[test]
fn init_list_and_verify_through_the_cli() {
    let dir = scratch("store-cli");
    let empty = dir.path().join("empty");
    rewind::run_ok(&["init", path_str(&empty)]);
    let listing = rewind::run_ok(&["checkpoints", "--in", path_str(&empty)]);
    assert!(listing.contains("No checkpoints"), "{listing}");
    let (dest, taken) = store_with_history(&dir);
    let json = rewind::run_ok(&["checkpoints", "--in", path_str(&dest), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let list = v["checkpoints"].as_array().unwrap();
    assert_eq!(list.len(), 6);
    let first = &list[0];
    assert_eq!(first["id"], taken[0].id.as_str());
    assert_eq!(first["vm"], "Win 11");
    assert_eq!(first["vm_uuid"], Uuid::from_bytes([1; 16]).to_string());
    assert_eq!(first["time"], "2026-03-01T09:00:00.000Z");
    assert_eq!(first["kind"], "disk");
    assert_eq!(first["consistency"], "crash");
    assert_eq!(first["logical_bytes"], 3 << 20, "the hole is not data");
    assert!(first["new_bytes"].as_u64().unwrap() > 0);
    assert!(
        list[1]["new_bytes"].as_u64().unwrap() < 4096,
        "an unchanged disk adds only its manifest"
    );
    assert_eq!(v["store"]["encrypted"], false);

    let table = rewind::run_ok(&["checkpoints", "ubuntu", "--in", path_str(&dest)]);
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table.lines().next().unwrap().starts_with("VM") && table.contains("ubuntu"),
        "{table}"
    );
    fails(
        &rewind::run(&["checkpoints", "Win 10", "--in", path_str(&dest)]),
        &["Win 10", "Win 11, ubuntu"],
    );

    let verified = rewind::run_ok(&["verify", "--in", path_str(&dest)]);
    assert!(
        verified.contains("Checked 6 checkpoint(s)") && verified.contains("intact"),
        "{verified}"
    );
}

/// Issue 21: `rewind init backup` makes the store in the folder `backup` of the current
/// folder, says where that is, and other commands find it by the same relative name.
#[test]
fn init_takes_a_folder_named_relative_to_the_current_one() {
    let dir = scratch("store-relative");
    let out = rewind::command()
        .args(["init", "backup"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = dir.path().join("backup");
    assert!(
        stdout.contains(path_str(&store)),
        "the message names the folder by its whole path: {stdout}"
    );
    Store::open(&store, None).expect("a store in ./backup");
    let listing = rewind::command()
        .args(["checkpoints", "--in", "backup"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        listing.status.success()
            && String::from_utf8_lossy(&listing.stdout).contains("No checkpoints"),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
}

#[test]
fn prune_keeps_by_rules_and_dry_run_changes_nothing() {
    let dir = scratch("store-prune");
    let (dest, taken) = store_with_history(&dir);
    // Dry run changes nothing; a real prune keeps the newest two and the newest of each day.
    let dry = rewind::run_ok(&[
        "prune",
        "Win 11",
        "--in",
        path_str(&dest),
        "--keep-last",
        "1",
        "--keep-daily",
        "2",
        "--dry-run",
    ]);
    assert!(
        dry.contains("would remove") && dry.contains("nothing was changed"),
        "{dry}"
    );
    let pruned = rewind::run_ok(&[
        "prune",
        "Win 11",
        "--in",
        path_str(&dest),
        "--keep-last",
        "1",
        "--keep-daily",
        "2",
        "--json",
    ]);
    let p: serde_json::Value = serde_json::from_str(&pruned).unwrap();
    let kept: Vec<&str> = p["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    // Newest of day 3 (09:00, also the last) and newest of day 2; day 1 goes.
    assert_eq!(kept, vec![taken[4].id.as_str(), taken[2].id.as_str()]);
    let after: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "checkpoints",
        "--in",
        path_str(&dest),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        after["checkpoints"].as_array().unwrap().len(),
        3,
        "two of Win 11 and ubuntu's one"
    );
    rewind::run_ok(&["verify", "--in", path_str(&dest)]);
    fails(
        &rewind::run(&["prune", "--in", path_str(&dest)]),
        &["keep rule"],
    );
}

#[test]
fn verify_reports_a_flipped_bit_with_the_checkpoints_it_breaks() {
    let dir = scratch("store-bitflip");
    let dest = dir.path().join("s");
    rewind::run_ok(&["init", path_str(&dest)]);
    let store = Store::open(&dest, None).unwrap();
    let data = content(7, 2 << 20);
    let a = write_checkpoint(
        &store,
        "alpha",
        1,
        Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap(),
        &data,
        dir.path(),
    );
    write_checkpoint(
        &store,
        "beta",
        2,
        Utc.with_ymd_and_hms(2026, 5, 1, 11, 0, 0).unwrap(),
        &content(9, 1 << 20),
        dir.path(),
    );
    let first_chunk = store.chunk_id(&data[..store.chunk_size_bytes() as usize]);
    let path = store.chunk_path(&first_chunk);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    fs::write(&path, bytes).unwrap();

    let quick = rewind::run(&["verify", "--in", path_str(&dest), "--quick"]);
    assert!(quick.status.success(), "quick verify checks presence only");
    let out = rewind::run(&["verify", "--in", path_str(&dest)]);
    fails(
        &out,
        &["1 damaged or missing chunk", "breaking 1 checkpoint"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&first_chunk.to_hex())
            && stdout.contains(&format!("breaks alpha checkpoint {}", a.id)),
        "{stdout}"
    );
    assert!(!stdout.contains("breaks beta"), "{stdout}");
    assert!(stdout.contains("moved aside"), "{stdout}");
    let json = rewind::run(&["verify", "--in", path_str(&dest), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        v["damaged"][0]["problem"], "missing",
        "moved aside by the first run, now missing"
    );
    assert_eq!(v["damaged"][0]["checkpoints"][0]["vm"], "alpha");
}

#[test]
fn encrypted_store_needs_its_passphrase() {
    let dir = scratch("store-enc");
    let dest = dir.path().join("enc");
    let out = rewind::command()
        .args(["init", path_str(&dest), "--encrypt"])
        .env("REWIND_PASSPHRASE", "tr0ub4dor&3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("encrypted"));
    let config = fs::read_to_string(dest.join("rewind-store.json")).unwrap();
    assert!(
        config.contains("argon2id") && !config.contains("tr0ub4dor"),
        "{config}"
    );

    let list = |pass: Option<&str>| {
        let mut cmd = rewind::command();
        cmd.args(["checkpoints", "--in", path_str(&dest)])
            .stdin(Stdio::null());
        match pass {
            Some(p) => cmd.env("REWIND_PASSPHRASE", p),
            None => cmd.env_remove("REWIND_PASSPHRASE"),
        };
        cmd.output().unwrap()
    };
    let ok = list(Some("tr0ub4dor&3"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    fails(
        &list(Some("Tr0ub4dor&3")),
        &["wrong passphrase", path_str(&dest)],
    );
    fails(&list(None), &["needs a passphrase", "REWIND_PASSPHRASE"]);
}

#[test]
fn bad_store_paths_get_clear_errors() {
    let dir = scratch("store-bad");
    let missing = dir.path().join("not-plugged-in");
    fails(
        &rewind::run(&["checkpoints", "--in", path_str(&missing)]),
        &["does not exist", "plugged in", "rewind init"],
    );
    let other = dir.path().join("photos");
    fs::create_dir(&other).unwrap();
    File::create(other.join("cat.jpg"))
        .unwrap()
        .write_all(b"meow")
        .unwrap();
    fails(
        &rewind::run(&["verify", "--in", path_str(&other)]),
        &["not a Rewind store", "rewind-store.json"],
    );
    fails(
        &rewind::run(&["init", path_str(&other)]),
        &["not empty", "photos/rewind"],
    );
    let newer = dir.path().join("newer");
    rewind::run_ok(&["init", path_str(&newer)]);
    let cfg = newer.join("rewind-store.json");
    let current = rewind_core::store::config::FORMAT_VERSION;
    let text = fs::read_to_string(&cfg).unwrap().replace(
        &format!("\"version\": {current}"),
        &format!("\"version\": {}", current + 1),
    );
    assert!(
        text.contains(&format!("\"version\": {}", current + 1)),
        "{text}"
    );
    fs::write(&cfg, text).unwrap();
    fails(
        &rewind::run(&["checkpoints", "--in", path_str(&newer)]),
        &[&format!("format version {}", current + 1), "update Rewind"],
    );
    fails(
        &rewind::run(&["init", path_str(&newer)]),
        &["already holds a Rewind store"],
    );
}

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
struct SmallDrive {
    path: std::path::PathBuf,
}

impl SmallDrive {
    fn mount(path: &Path, size_kib: u64) -> Self {
        assert!(
            rewind_tests::daemon::is_root(),
            "this test mounts a small file system and needs root: run it with ./x test"
        );
        fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_kib}k"),
                "rewind-test-drive",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", path.display());
        Self {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for SmallDrive {
    fn drop(&mut self) {
        drop(
            std::process::Command::new("umount")
                .arg(&self.path)
                .status(),
        );
    }
}

#[test]
fn a_full_drive_fails_the_new_checkpoint_and_keeps_the_old_ones() {
    let dir = scratch("store-full");
    let drive = SmallDrive::mount(&dir.path().join("drive"), 8 << 10);
    let dest = drive.path.join("rewind");
    rewind::run_ok(&["init", path_str(&dest)]);
    let store = Store::open(&dest, None).unwrap();
    // Incompressible data: 3 MiB fits the 8 MiB drive, another 6 MiB does not.
    let noise = rewind_tests::noise;
    let small = noise(1, 3 << 20);
    let kept = write_checkpoint(
        &store,
        "vm",
        1,
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        &small,
        dir.path(),
    );

    let big = noise(2, 6 << 20);
    let image = dir.path().join("big.img");
    fs::write(&image, &big).unwrap();
    let control = Control::new();
    let new = NewCheckpoint {
        vm: VmRef {
            name: "vm".into(),
            uuid: Uuid::from_bytes([1; 16]),
        },
        time: Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap(),
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: "<domain/>".into(),
        parent: None,
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    };
    let writer = store.begin_checkpoint(new, &control).unwrap();
    let err = writer
        .ingest_file(
            &File::open(&image).unwrap(),
            big.len() as u64,
            None,
            &control,
        )
        .unwrap_err();
    drop(writer);
    assert!(
        err.to_string().contains("drive of the store is full"),
        "{err}"
    );
    assert!(
        err.to_string().contains("existing checkpoints are intact"),
        "{err}"
    );

    // The earlier checkpoint is listed, verifies, and reads back; the failed one left nothing visible.
    let listing: serde_json::Value = serde_json::from_str(&rewind::run_ok(&[
        "checkpoints",
        "--in",
        path_str(&dest),
        "--json",
    ]))
    .unwrap();
    assert_eq!(listing["checkpoints"].as_array().unwrap().len(), 1);
    assert_eq!(listing["checkpoints"][0]["id"], kept.id.as_str());
    rewind::run_ok(&["verify", "--in", path_str(&dest)]);
    let mut reader = store.object_reader(&kept.disks[0].index).unwrap();
    let mut back = Vec::new();
    for i in 0..reader.chunk_count() {
        back.extend_from_slice(&reader.read(i).unwrap());
    }
    assert_eq!(&back[..small.len()], &small[..]);
    // GC gives the space of the failed attempt back, and the drive takes checkpoints again.
    let gc: serde_json::Value =
        serde_json::from_str(&rewind::run_ok(&["gc", "--in", path_str(&dest), "--json"])).unwrap();
    assert!(gc["bytes_removed"].as_u64().unwrap() > 1 << 20, "{gc}");
    write_checkpoint(
        &store,
        "vm",
        1,
        Utc.with_ymd_and_hms(2026, 1, 1, 2, 0, 0).unwrap(),
        &noise(3, 2 << 20),
        dir.path(),
    );
    rewind::run_ok(&["verify", "--in", path_str(&dest)]);
}

/// A drive that fills up with a VM's checkpoints under "keep the last 2": the checkpoint
/// that does not fit fails, `make_room` removes now what the rules would remove after it
/// (never the newest), and the same checkpoint then succeeds without anyone's help.
#[test]
fn a_full_drive_makes_room_within_the_keep_rules_and_the_next_checkpoint_fits() {
    use rewind_core::store::retention::KeepRules;
    let dir = scratch("store-room");
    let drive = SmallDrive::mount(&dir.path().join("drive"), 20 << 10);
    let store = Store::init(
        &drive.path.join("rewind"),
        &rewind_core::store::InitOptions::default(),
    )
    .unwrap();
    let rules = KeepRules {
        last: 2,
        ..KeepRules::default()
    };
    let vm = Uuid::from_bytes([1; 16]);
    let noise = |seed: u64| rewind_tests::noise(seed, 7 << 20);
    let at = |hour: u32| Utc.with_ymd_and_hms(2026, 1, 1, hour, 0, 0).unwrap();
    // Two 7 MiB checkpoints fit the 20 MiB drive; a third does not.
    let first = write_checkpoint(&store, "vm", 1, at(0), &noise(1), dir.path());
    let second_content = noise(2);
    let second = write_checkpoint(&store, "vm", 1, at(1), &second_content, dir.path());
    let third_content = noise(3);
    let try_third = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_checkpoint(&store, "vm", 1, at(2), &third_content, dir.path())
        }))
    };
    assert!(
        try_third().is_err(),
        "the third checkpoint fits: no full drive to test"
    );
    let (decisions, gc) = store.make_room(&rules, vm, at(2), &Control::new()).unwrap();
    let removed: Vec<&str> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(removed, [first.id.as_str()], "only what the rules let go");
    assert!(gc.bytes_removed > 7 << 20, "{gc:?}");
    let third = try_third().expect("the checkpoint fits once room is made");
    let ids: Vec<String> = store
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [second.id.clone(), third.id.clone()]);
    for (m, content) in [(&second, &second_content), (&third, &third_content)] {
        let back = store
            .object_reader(&m.disks[0].index)
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(&back[..content.len()], &content[..]);
    }
    assert!(store.verify(true, &Control::new()).unwrap().is_clean());

    // With one checkpoint left, nothing may go: no room is made, and the error says so.
    let one = KeepRules {
        last: 1,
        ..KeepRules::default()
    };
    store.delete_checkpoint(&vm, &second.id).unwrap();
    let (decisions, _) = store.make_room(&one, vm, at(3), &Control::new()).unwrap();
    assert!(
        decisions.iter().all(|d| d.keep),
        "the newest stays: {decisions:?}"
    );
    assert!(store.manifest(&vm, &third.id).is_ok());
}

/// `rewind export VM ID --from DEST --disk TARGET --out FILE [--format F]`.
fn export(dest: &Path, vm: &str, id: &str, disk: &str, out: &Path, format: &str) -> Output {
    rewind::run(&[
        "export",
        vm,
        id,
        "--from",
        path_str(dest),
        "--disk",
        disk,
        "--out",
        path_str(out),
        "--format",
        format,
    ])
}

/// Checks a qcow2 image with `qemu-img check` and returns its contents.
fn qcow2_contents(image: &Path, dir: &Path) -> Vec<u8> {
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let back = dir.join(format!("back-{}.raw", Uuid::new_v4().simple()));
    let convert = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&back)
        .output()
        .unwrap();
    assert!(convert.status.success());
    let bytes = fs::read(&back).unwrap();
    fs::remove_file(&back).unwrap();
    bytes
}

/// `rewind export`: a checkpoint's disk as a raw or qcow2 image that other tools read back
/// byte for byte; bad input is refused with a message naming what to do.
#[test]
fn export_writes_a_disk_as_raw_and_qcow2_images_and_refuses_bad_input() {
    let dir = scratch("export");
    let (dest, taken) = store_with_history(&dir);
    // Every "Win 11" checkpoint holds this, followed by an 8 MiB hole.
    let mut expected = content(1, 3 << 20);
    expected.resize((3 << 20) + (8 << 20), 0);

    let raw = dir.path().join("win11.raw");
    let out = export(&dest, "Win 11", "latest", "vda", &raw, "raw");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&taken[4].id),
        "{said}"
    );
    assert!(
        fs::read(&raw).unwrap() == expected,
        "the raw export differs"
    );

    let qcow2 = dir.path().join("win11.qcow2");
    let out = export(&dest, "Win 11", &taken[1].id, "vda", &qcow2, "qcow2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        qcow2_contents(&qcow2, dir.path()) == expected,
        "the qcow2 export differs"
    );

    let new = dir.path().join("new.qcow2");
    fails(
        &export(&dest, "Win 11", "latest", "vda", &raw, "raw"),
        &["already exists"],
    );
    fails(
        &export(&dest, "Win 11", "latest", "sdz", &new, "qcow2"),
        &["no disk", "vda"],
    );
    fails(
        &export(&dest, "Win 12", "latest", "vda", &new, "qcow2"),
        &["Win 12", "rewind checkpoints"],
    );
    fails(
        &export(
            &dest,
            "Win 11",
            "20200101T000000.000Z",
            "vda",
            &new,
            "qcow2",
        ),
        &[&taken[0].id, "latest"],
    );
    assert!(!new.exists(), "a refused export left a file");
}

/// A damaged chunk stops `rewind export`, which names it and leaves no image behind.
#[test]
fn export_stops_at_a_damaged_chunk_and_leaves_nothing() {
    let dir = scratch("export-damaged");
    let (dest, _) = store_with_history(&dir);
    let store = Store::open(&dest, None).unwrap();
    let data = content(1, 3 << 20);
    let first_chunk = store.chunk_id(&data[..store.chunk_size_bytes() as usize]);
    let path = store.chunk_path(&first_chunk);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    fs::write(&path, bytes).unwrap();
    let new = dir.path().join("new.img");
    for format in ["raw", "qcow2"] {
        let out = export(&dest, "Win 11", "latest", "vda", &new, format);
        fails(&out, &[&first_chunk.to_hex()[..16]]);
        assert!(!new.exists(), "a failed {format} export left a file");
    }
}
