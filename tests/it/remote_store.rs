//! Stores on another host (issue 6): `ssh://` destinations, through a real OpenSSH server on
//! loopback ([`Sshd`]) and the `ssh` command with an `ssh_config` file of its own
//! (`REWIND_SSH_CONFIG`). Because the "remote" folder is on this machine, the tests also
//! open it directly and check that it is the very same store format.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rewind_core::progress::Control;
use rewind_core::store::{
    CheckpointKind, Consistency, InitOptions, Location, LockMode, Manifest, NewCheckpoint,
    SSH_CONFIG_ENV, Store, StoreError, StoreLock, VmRef,
};
use rewind_tests::compare::image_bytes;
use rewind_tests::scratch::ScratchDir;
use rewind_tests::sshd::Sshd;
use rewind_tests::{DiskSpec, Format, TestVm, daemon, noise};
use uuid::Uuid;

/// The Host alias of the test sshd in the `ssh_config` the tests write.
const ALIAS: &str = "rewind-test-host";

/// A test sshd, the `ssh_config` that reaches it as [`ALIAS`], and a scratch folder for the
/// stores ("on the remote host", which is this one).
struct Remote {
    sshd: Sshd,
    config: PathBuf,
    dir: ScratchDir,
}

impl Remote {
    fn start(label: &str) -> Self {
        let sshd = Sshd::start().unwrap_or_else(|e| panic!("{e}"));
        let config = sshd.write_ssh_config(ALIAS, None).unwrap();
        let dir = ScratchDir::new(label).unwrap();
        Self { sshd, config, dir }
    }

    /// `ssh://ALIAS/<scratch>/<name>` and the same folder as a local path.
    fn store(&self, name: &str) -> (String, PathBuf) {
        let path = self.dir.path().join(name);
        (format!("ssh://{ALIAS}{}", path.display()), path)
    }

    /// The location of `url`, with this server's `ssh_config` (as `REWIND_SSH_CONFIG` gives it
    /// to the binary).
    fn location(&self, url: &str) -> Location {
        let mut location = Location::parse(url).unwrap();
        if let Location::Ssh(ssh) = &mut location {
            ssh.ssh_config = Some(self.config.clone());
        }
        location
    }

    /// `rewind ARGS...` with this server's `ssh_config`.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::rewind::command();
        cmd.args(args)
            .env(SSH_CONFIG_ENV, &self.config)
            .env_remove("REWIND_PASSPHRASE")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rewind {args:?} failed:\n{}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.sshd.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Asserts that `out` failed with one `error:` line naming each of `words`; its stderr.
fn fails(out: &Output, words: &[&str]) -> String {
    // Progress lines (`progress: …`, on a stderr that is no terminal) may come first.
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("progress: "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1,
        "one `error:` line: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "stderr should mention {w:?}: {stderr}");
    }
    stderr
}

fn new_checkpoint(minute: u32) -> NewCheckpoint {
    NewCheckpoint {
        vm: VmRef {
            name: "api-vm".into(),
            uuid: Uuid::from_bytes([7; 16]),
        },
        time: Utc.with_ymd_and_hms(2026, 6, 1, 10, minute, 0).unwrap(),
        kind: CheckpointKind::Disk,
        consistency: Consistency::Crash,
        domain_xml: "<domain type='qemu'><name>api-vm</name></domain>".into(),
        parent: None,
        full_reason: None,
        consistency_note: None,
        labels: vec![],
        libvirt_checkpoint: None,
    }
}

/// One checkpoint of `image` (a whole file) as disk `vda`.
fn write_checkpoint(store: &Store, image: &Path, minute: u32) -> Manifest {
    let control = Control::new();
    let file = File::open(image).unwrap();
    let size = file.metadata().unwrap().len();
    let mut writer = store
        .begin_checkpoint(new_checkpoint(minute), &control)
        .unwrap();
    let object = writer.ingest_file(&file, size, None, &control).unwrap();
    writer
        .add_disk("vda", None, Some("raw".into()), object)
        .unwrap();
    writer.commit(&control).unwrap()
}

/// The lock files of remote holders in a store's `locks/`.
fn lock_files(store: &Path) -> Vec<String> {
    fs::read_dir(store.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("shared-") || n.starts_with("exclusive-"))
        .collect()
}

fn read_disk(store: &Store, m: &Manifest) -> Vec<u8> {
    store
        .object_reader(&m.disks[0].index)
        .unwrap()
        .read_all()
        .unwrap()
}

/// The store API over SFTP: what it writes is the same store as the folder opened directly
/// (checkpoints, verify, reads), leftovers are cleaned, a remote writer's lock keeps a local
/// garbage collection out, and prune and gc work over the connection.
#[test]
fn the_store_api_over_ssh_writes_the_same_store_as_a_folder() {
    let remote = Remote::start("remote-api");
    let (url, path) = remote.store("api store");
    let location = remote.location(&url);
    assert_eq!(location.to_string(), url);
    let store = Store::init_at(&location, &InitOptions::default()).unwrap();
    assert_eq!(
        store.root(),
        Path::new(&url),
        "messages name the store by its URL"
    );
    assert!(path.join("rewind-store.json").exists() && path.join("chunks").is_dir());
    assert!(matches!(
        Store::init_at(&location, &InitOptions::default()),
        Err(StoreError::AlreadyExists { .. })
    ));

    // 8 MiB of data, a hole, and a repeated chunk.
    let image = remote.dir.path().join("image.raw");
    let mut content = noise(1, 8 << 20);
    content.extend(vec![0u8; 4 << 20]);
    content.extend_from_within(..1 << 20);
    fs::write(&image, &content).unwrap();
    let first = write_checkpoint(&store, &image, 0);
    assert_eq!(read_disk(&store, &first), content);
    let second = write_checkpoint(&store, &image, 1);
    assert!(
        second.new_bytes < 4096,
        "unchanged: only its manifest is new"
    );

    // The folder itself: the same checkpoints, intact, byte for byte.
    let local = Store::open(&path, None).unwrap();
    let ids: Vec<String> = local
        .catalog()
        .unwrap()
        .checkpoints
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![first.id.clone(), second.id.clone()]);
    assert!(local.verify(false, &Control::new()).unwrap().is_clean());
    assert_eq!(read_disk(&local, &first), content);
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
    assert!(store.verify(true, &Control::new()).unwrap().is_clean());
    assert_eq!(fs::read_dir(path.join("tmp")).unwrap().count(), 0);

    // A remote writer holds the store: a local garbage collection says who, and waits.
    let control = Control::new();
    let writer = store.begin_checkpoint(new_checkpoint(2), &control).unwrap();
    let err = StoreLock::acquire(&path, LockMode::Exclusive, "gc", None).unwrap_err();
    assert!(
        err.to_string().contains("writing a checkpoint of api-vm"),
        "{err}"
    );
    drop(writer);
    // ...and a local writer's leftovers are removed by the next remote writer.
    fs::write(path.join("tmp/chunk-1-1.tmp"), "half a chunk").unwrap();
    let third = write_checkpoint(&store, &image, 3);
    assert_eq!(fs::read_dir(path.join("tmp")).unwrap().count(), 0);
    assert_eq!(
        lock_files(&path),
        Vec::<String>::new(),
        "released locks leave no file"
    );

    // Delete, prune and collect over the connection.
    store
        .delete_checkpoint(&second.vm.uuid, &second.id)
        .unwrap();
    let rules = rewind_core::store::retention::KeepRules {
        last: 1,
        ..Default::default()
    };
    let decisions = store.prune(&rules, None, false, &Control::new()).unwrap();
    assert_eq!(decisions.iter().filter(|d| !d.keep).count(), 1);
    let changed = noise(2, 2 << 20);
    let image2 = remote.dir.path().join("image2.raw");
    fs::write(&image2, &changed).unwrap();
    let fourth = write_checkpoint(&store, &image2, 4);
    store.delete_checkpoint(&third.vm.uuid, &third.id).unwrap();
    let gc = store.gc(&Control::new()).unwrap();
    assert!(
        gc.chunks_removed >= 9 && gc.bytes_removed > 8 << 20,
        "{gc:?}"
    );
    assert!(store.verify(false, &Control::new()).unwrap().is_clean());
    assert_eq!(read_disk(&local, &fourth), changed);
    assert!(matches!(
        store.manifest(&first.vm.uuid, &first.id),
        Err(StoreError::NoSuchCheckpoint { .. })
    ));
}

/// A host whose key is not in `known_hosts`, or does not match it, is refused with the
/// command that accepts it; a malformed location is refused before any connection.
/// A local writer and a garbage collection over SSH on the same store, 20 times: the
/// writer reuses chunks that only a removed checkpoint referenced, and the collection starts
/// while the writer holds them. The collection must wait for the writer (it sees the local
/// holder's lock file), so no chunk the writer committed is lost.
#[test]
fn a_local_writer_and_gc_over_ssh_never_lose_a_chunk() {
    let remote = Remote::start("remote-lock-race");
    let (url, path) = remote.store("shared");
    let local = Store::init(&path, &InitOptions::default()).unwrap();
    let over_ssh = Store::open_at(&remote.location(&url), None).unwrap();
    let image = remote.dir.path().join("image.raw");
    for round in 0..20u32 {
        let content = noise(100 + u64::from(round), 3 << 20);
        fs::write(&image, &content).unwrap();
        // The chunks of `content`, referenced by nothing once its checkpoint is removed.
        let gone = write_checkpoint(&local, &image, 2 * round);
        local.delete_checkpoint(&gone.vm.uuid, &gone.id).unwrap();
        let control = Control::new();
        let mut writer = local
            .begin_checkpoint(new_checkpoint(2 * round + 1), &control)
            .unwrap();
        let file = File::open(&image).unwrap();
        let object = writer
            .ingest_file(&file, content.len() as u64, None, &control)
            .unwrap();
        assert_eq!(object.new_bytes, 0, "round {round}: the chunks were reused");
        let (started, gc_started) = std::sync::mpsc::channel();
        let gc = std::thread::scope(|scope| {
            let gc = scope.spawn(|| {
                started.send(()).unwrap();
                over_ssh.gc(&Control::new())
            });
            gc_started.recv().unwrap();
            // Give the collection time to reach the lock (and, were it not to wait, to
            // delete), then commit.
            std::thread::sleep(Duration::from_millis(300));
            writer
                .add_disk("vda", None, Some("raw".into()), object)
                .unwrap();
            let kept = writer.commit(&control).unwrap();
            let report = gc.join().unwrap().unwrap();
            (kept, report)
        });
        let (kept, _report) = gc;
        assert_eq!(read_disk(&local, &kept), content, "round {round}");
    }
    let report = local.verify(true, &Control::new()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(lock_files(&path), Vec::<String>::new(), "no lock file left");
}

/// Names and contents of the files in `dir`.
fn tree_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn links_planted_in_a_store_over_ssh_are_refused_as_far_as_sftp_tells() {
    let remote = Remote::start("remote-links");
    let (url, path) = remote.store("linked");
    let location = remote.location(&url);
    let store = Store::init_at(&location, &InitOptions::default()).unwrap();
    let image = remote.dir.path().join("image.raw");
    fs::write(&image, noise(3, 3 << 20)).unwrap();
    write_checkpoint(&store, &image, 0);
    drop(store);
    // Every folder Rewind made there is private to the SSH user.
    for dir in ["", "chunks", "manifests", "tmp", "locks"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path.join(dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir:?} is {mode:o}");
    }
    let canary = remote.dir.path().join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("precious.txt"), "the user's thesis").unwrap();
    fs::write(canary.join("chunk-1-1.tmp"), "not Rewind's").unwrap();
    let before = tree_digest(&canary);

    // tmp/ as a link: opening the store refuses it (SFTP follows links on the server, so
    // the link is caught by looking at each folder itself, and by every listing).
    fs::remove_dir_all(path.join("tmp")).unwrap();
    std::os::unix::fs::symlink(&canary, path.join("tmp")).unwrap();
    let err = Store::open_at(&location, None).unwrap_err();
    assert!(
        matches!(err, StoreError::Refused { .. }) && err.to_string().contains("symbolic link"),
        "{err}"
    );
    fs::remove_file(path.join("tmp")).unwrap();
    fs::create_dir(path.join("tmp")).unwrap();

    // A chunk folder as a link (named as one could be): garbage collection refuses to go in.
    let store = Store::open_at(&location, None).unwrap();
    std::os::unix::fs::symlink(&canary, path.join("chunks/ffff")).unwrap();
    let err = store.gc(&Control::new()).unwrap_err();
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert_eq!(
        tree_digest(&canary),
        before,
        "nothing outside the store changed"
    );
}

#[test]
fn an_unknown_or_changed_host_key_is_refused_with_how_to_accept_it() {
    let remote = Remote::start("remote-hostkey");
    let (url, path) = remote.store("s");
    remote.run_ok(&["init", &url]);
    assert!(path.join("rewind-store.json").exists());

    // Nobody has accepted the key.
    let empty = remote.dir.path().join("empty_known_hosts");
    fs::write(&empty, "").unwrap();
    let config = remote
        .sshd
        .write_ssh_config("unknown-key", Some(&empty))
        .unwrap();
    let mut cmd = remote.command(&["checkpoints", "--in", &url.replace(ALIAS, "unknown-key")]);
    let out = cmd.env(SSH_CONFIG_ENV, &config).output().unwrap();
    let stderr = fails(
        &out,
        &[
            "ssh refused the host key of unknown-key",
            "not in known_hosts",
            "unknown-key` once and accept its key",
            "ssh://unknown-key/",
        ],
    );
    assert!(
        stderr.contains(&format!("-F {}", config.display())),
        "{stderr}"
    );

    // A different key was accepted for it before: the key "changed".
    let changed = remote.dir.path().join("changed_known_hosts");
    let other_key = fs::read_to_string(remote.sshd.client_key().with_extension("pub")).unwrap();
    let port = remote.sshd.port();
    fs::write(&changed, format!("[127.0.0.1]:{port} {}", other_key.trim())).unwrap();
    let config = remote
        .sshd
        .write_ssh_config("changed-key", Some(&changed))
        .unwrap();
    let mut cmd = remote.command(&["checkpoints", "--in", &url.replace(ALIAS, "changed-key")]);
    let out = cmd.env(SSH_CONFIG_ENV, &config).output().unwrap();
    fails(
        &out,
        &["ssh refused the host key", "changed", "accept its key"],
    );

    // Malformed or unreachable.
    fails(
        &remote.run(&["checkpoints", "--in", &format!("ssh://{ALIAS}")]),
        &["not a usable store location", "absolute path"],
    );
    fails(
        &remote.run(&["verify", "--in", "root@localhost:/srv/rewind"]),
        &["ssh://root@localhost/srv/rewind"],
    );
    let mut sshd = remote.sshd;
    sshd.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_rewind"))
        .args(["checkpoints", "--in", &url])
        .env(SSH_CONFIG_ENV, &remote.config)
        .output()
        .unwrap();
    fails(
        &out,
        &["cannot reach the host of the store", "try again", &url],
    );
}

const BOOT_TIMEOUT: Duration = Duration::from_mins(2);

/// `rewind ARGS... --json --connect <test URI>` through `remote`: its JSON.
fn json(remote: &Remote, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--json", "--connect", daemon::URI]);
    let out = remote.run_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `rewind export VM latest --from URL --disk vda` as raw: the bytes.
fn export_vda(remote: &Remote, url: &str, vm: &str, out: &Path) -> Vec<u8> {
    drop(fs::remove_file(out));
    remote.run_ok(&[
        "export",
        vm,
        "latest",
        "--from",
        url,
        "--disk",
        "vda",
        "--out",
        out.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    fs::read(out).unwrap()
}

/// A running VM checkpointed into an `ssh://` store (full, then incremental) with the
/// binary: listed, verified, exported and restored as a new VM from there, byte for byte
/// what the folder itself holds.
#[test]
fn a_running_vm_checkpointed_to_an_ssh_store_comes_back_from_it_byte_for_byte() {
    let mut vm = TestVm::builder("remote-live")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(10, BOOT_TIMEOUT).unwrap();
    let remote = Remote::start("remote-live");
    let (url, path) = remote.store("live store");
    remote.run_ok(&["init", &url]);

    let started = Instant::now();
    let full = json(&remote, &["checkpoint", &vm.name, "--to", &url]);
    let full = &full[0];
    eprintln!("full checkpoint over ssh: {:?}", started.elapsed());
    assert!(full["parent"].is_null(), "{full}");
    let flushed = vm.last_flushed_record();
    vm.wait_flushed(flushed + 5, BOOT_TIMEOUT).unwrap();
    let incr = json(&remote, &["checkpoint", &vm.name, "--to", &url]);
    let incr = &incr[0];
    assert_eq!(incr["parent"], full["id"], "incremental over ssh: {incr}");
    assert!(incr["new_bytes"].as_u64().unwrap() < 8 << 20, "{incr}");

    let listing = json(&remote, &["checkpoints", "--in", &url]);
    assert_eq!(listing["store"]["path"], url.as_str());
    let list = listing["checkpoints"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["id"], incr["id"]);
    assert_eq!(list[1]["disks"][0]["target"], "vda");
    let verified = remote.run_ok(&["verify", "--in", &url]);
    assert!(verified.contains("Everything is intact"), "{verified}");

    // The same store as the folder itself holds; the disk as the checkpoint has it.
    let local = Store::open(&path, None).unwrap();
    let m = local.catalog().unwrap().checkpoints.pop().unwrap();
    assert_eq!(m.id, incr["id"].as_str().unwrap());
    let expected = read_disk(&local, &m);
    let scan = rewind_tests::workload::scan_sequence(&expected);
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    let exported = export_vda(&remote, &url, &vm.name, &remote.dir.path().join("vda.raw"));
    assert!(exported == expected, "the export over ssh differs");

    let copy = format!("{}-copy", vm.name);
    let _cleanup = rewind_tests::RestoredVm(copy.clone());
    let disks = remote.dir.path().join("copy disks");
    let report = json(
        &remote,
        &[
            "restore",
            &vm.name,
            "latest",
            "--from",
            &url,
            "--as",
            &copy,
            "--disk-dir",
            disks.to_str().unwrap(),
            "--no-start",
        ],
    );
    assert_eq!(report["mode"], "new_vm", "{report}");
    let restored = PathBuf::from(report["disks"][0]["path"].as_str().unwrap());
    assert!(restored.starts_with(&disks), "{report}");
    assert!(
        image_bytes(&restored, "qcow2") == expected,
        "the VM restored from ssh differs"
    );
    assert!(lock_files(&path).is_empty() && fs::read_dir(path.join("tmp")).unwrap().count() == 0);
}

/// A shut-off test VM whose `vda` holds `mib` MiB of random data (then a hole); the data.
fn vm_with_random_disk(label: &str, mib: usize) -> (TestVm, Vec<u8>) {
    let vm = TestVm::builder(label)
        .workload("idle")
        .disks(vec![DiskSpec::new(
            "vda",
            Format::Qcow2,
            ((mib + 4) as u64) << 20,
        )])
        .define()
        .expect("define the test VM");
    let raw = vm.dir().join("content.raw");
    let mut content = noise(label.len() as u64 * 7919, mib << 20);
    content.resize((mib + 4) << 20, 0);
    fs::write(&raw, &content).unwrap();
    vm.fill_disk("vda", &raw).unwrap();
    fs::remove_file(&raw).unwrap();
    (vm, content)
}

/// The chunk files in a store folder.
fn chunk_files(store: &Path) -> usize {
    fs::read_dir(store.join("chunks")).map_or(0, |dirs| {
        dirs.flatten()
            .map(|d| fs::read_dir(d.path()).map_or(0, Iterator::count))
            .sum()
    })
}

/// The server dies in the middle of a checkpoint's upload: the checkpoint fails at once
/// with an error that says to try again, leaves nothing visible, and once the server is
/// back the next checkpoint works and the store verifies clean.
#[test]
fn a_server_killed_mid_upload_fails_the_checkpoint_retryably_and_the_next_one_works() {
    let (vm, content) = vm_with_random_disk("remote-kill", 192);
    let mut remote = Remote::start("remote-kill");
    let (url, path) = remote.store("store");
    remote.run_ok(&["init", &url]);
    // A store kept open across the outage (as a long-running process keeps it).
    let kept = Store::open_at(&remote.location(&url), None).unwrap();

    let child = remote
        .command(&[
            "checkpoint",
            &vm.name,
            "--to",
            &url,
            "--connect",
            daemon::URI,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_mins(1);
    while chunk_files(&path) < 8 {
        assert!(
            Instant::now() < deadline,
            "no chunk arrived: {}",
            remote.sshd.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    remote.sshd.kill();
    let killed_at = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "the checkpoint took {:?} to notice",
        killed_at.elapsed()
    );
    let stderr = fails(
        &out,
        &["connection to the host of the store was lost", "try again"],
    );
    assert!(stderr.contains(&url), "{stderr}");
    assert!(
        chunk_files(&path) < 190,
        "the upload had finished before the server was killed"
    );
    let local = Store::open(&path, None).unwrap();
    assert!(
        local.catalog().unwrap().checkpoints.is_empty(),
        "nothing visible"
    );
    assert!(local.verify(false, &Control::new()).unwrap().is_clean());

    // While it is down: unreachable, and retryable as such.
    let down = Store::open_at(&remote.location(&url), None).unwrap_err();
    assert!(down.is_retryable(), "{down}");
    let lost = kept.catalog().unwrap_err();
    assert!(
        lost.is_retryable() && lost.is_connection_failure(),
        "{lost}"
    );

    remote.sshd.restart().unwrap();
    // The open store connects again by itself.
    assert!(kept.catalog().unwrap().checkpoints.is_empty());
    assert!(kept.verify(true, &Control::new()).unwrap().is_clean());
    drop(kept);
    let taken = json(&remote, &["checkpoint", &vm.name, "--to", &url]);
    assert!(
        taken[0]["full_reason"].is_null() || taken[0]["parent"].is_null(),
        "{taken}"
    );
    let verified = remote.run_ok(&["verify", "--in", &url]);
    assert!(verified.contains("Everything is intact"), "{verified}");
    assert!(
        lock_files(&path).is_empty(),
        "the lock of the cut-off checkpoint is gone: {:?}",
        lock_files(&path)
    );
    assert_eq!(
        fs::read_dir(path.join("tmp")).unwrap().count(),
        0,
        "leftovers cleaned"
    );
    let exported = export_vda(&remote, &url, &vm.name, &remote.dir.path().join("vda.raw"));
    assert!(
        exported == content,
        "the checkpoint after the restart differs from the disk"
    );
}

/// An encrypted store on another host: created there, needs its passphrase there, holds
/// nothing readable there, and gives the disk back exactly.
#[test]
fn an_encrypted_store_on_another_host_needs_its_passphrase_and_gives_the_disk_back() {
    let (vm, content) = vm_with_random_disk("remote-enc", 12);
    let remote = Remote::start("remote-enc");
    let (url, path) = remote.store("enc");
    let with_pass = |args: &[&str], pass: &str| {
        remote
            .command(args)
            .env("REWIND_PASSPHRASE", pass)
            .output()
            .unwrap()
    };
    let out = with_pass(&["init", &url, "--encrypt"], "s3cret over ssh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("encrypted"));
    let config = fs::read_to_string(path.join("rewind-store.json")).unwrap();
    assert!(
        config.contains("argon2id") && !config.contains("s3cret"),
        "{config}"
    );

    let out = with_pass(
        &[
            "checkpoint",
            &vm.name,
            "--to",
            &url,
            "--connect",
            daemon::URI,
        ],
        "s3cret over ssh",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fails(
        &remote.run(&["checkpoints", "--in", &url]),
        &["needs a passphrase", "REWIND_PASSPHRASE", &url],
    );
    fails(
        &with_pass(&["checkpoints", "--in", &url], "S3cret over ssh"),
        &["wrong passphrase", &url],
    );
    let out = with_pass(&["verify", "--in", &url], "s3cret over ssh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The disk's bytes appear nowhere in the store's files.
    let needle = &content[1000..1064];
    for entry in fs::read_dir(path.join("chunks")).unwrap().flatten() {
        for chunk in fs::read_dir(entry.path()).unwrap().flatten() {
            let bytes = fs::read(chunk.path()).unwrap();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
    let raw = remote.dir.path().join("vda.raw");
    let out = with_pass(
        &[
            "export",
            &vm.name,
            "latest",
            "--from",
            &url,
            "--disk",
            "vda",
            "--out",
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ],
        "s3cret over ssh",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(&raw).unwrap() == content,
        "the export differs from the disk"
    );
}

/// Issue 6: a VM protected into an `ssh://` destination is checkpointed by `rewind daemon`
/// on its own; with the server down the runs fail (and are retried), nothing in the store
/// breaks, and once it is back the next run succeeds and `verify` is clean.
#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn the_daemon_protects_a_vm_into_an_ssh_store_and_gets_over_the_server_going_away() {
    let mut vm = TestVm::builder("remote-protect")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(BOOT_TIMEOUT).expect("boot");
    vm.wait_flushed(3, BOOT_TIMEOUT).unwrap();
    let mut remote = Remote::start("remote-protect");
    let (url, path) = remote.store("protected");
    let home = remote.dir.path().join("home");
    let with_home = |cmd: &mut Command| {
        cmd.args(["--connect", daemon::URI])
            .env("REWIND_CONFIG_DIR", home.join("config"))
            .env("REWIND_STATE_DIR", home.join("state"))
            .env(rewind_core::config::SHORT_INTERVALS_ENV, "1");
    };
    let run_ok = |remote: &Remote, args: &[&str]| {
        let mut cmd = remote.command(args);
        with_home(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "rewind {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let history = |remote: &Remote| -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&run_ok(remote, &["history", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let ok_count = |h: &[serde_json::Value]| h.iter().filter(|r| r["outcome"] == "ok").count();

    // Protect creates the store on the host and names the destination after it.
    let said = run_ok(
        &remote,
        &["protect", &vm.name, "--to", &url, "--every", "20s"],
    );
    assert!(said.contains("every 20 seconds"), "{said}");
    assert!(
        Store::probe(&path).is_ok(),
        "protect made the store: {said}"
    );

    let mut cmd = remote.command(&["daemon"]);
    with_home(&mut cmd);
    let mut daemon = DaemonGuard(
        cmd.stdout(Stdio::null())
            .stderr(File::create(remote.dir.path().join("daemon.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || fs::read_to_string(home.join("state/rewind.log")).unwrap_or_default();
    let wait = |what: &str, limit: Duration, ready: &mut dyn FnMut() -> bool| {
        let start = Instant::now();
        while !ready() {
            assert!(
                start.elapsed() < limit,
                "{what} did not happen within {limit:?}; daemon log:\n{}",
                daemon_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait(
        "a first checkpoint over ssh",
        Duration::from_mins(2),
        &mut || ok_count(&history(&remote)) >= 1,
    );
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(&remote, &["status", "--json"])).unwrap();
    let dest = &status["vms"][0]["destinations"][0];
    assert!(dest["last_checkpoint"].is_string(), "{status}");

    // The host goes away: runs fail and say why, and are retried.
    remote.sshd.kill();
    let ok_before = ok_count(&history(&remote));
    wait(
        "a run failing with the host down",
        Duration::from_mins(2),
        &mut || history(&remote).iter().any(|r| r["outcome"] != "ok"),
    );
    let failed = history(&remote)
        .into_iter()
        .rfind(|r| r["outcome"] != "ok")
        .unwrap();
    assert!(
        failed["error"].is_string(),
        "the failure says why: {failed}"
    );
    // Back again: the next run succeeds.
    remote.sshd.restart().unwrap();
    wait(
        "a checkpoint after the host came back",
        Duration::from_mins(2),
        &mut || ok_count(&history(&remote)) > ok_before,
    );
    drop(
        Command::new("kill")
            .args(["-TERM", &daemon.0.id().to_string()])
            .status(),
    );
    drop(daemon.0.wait());

    let listing: serde_json::Value =
        serde_json::from_str(&run_ok(&remote, &["checkpoints", "--in", &url, "--json"])).unwrap();
    assert!(
        listing["checkpoints"].as_array().unwrap().len() >= 2,
        "{listing}"
    );
    let verified = run_ok(&remote, &["verify", "--in", &url]);
    assert!(verified.contains("Everything is intact"), "{verified}");
}

/// Kills the daemon when the test ends, pass or fail.
struct DaemonGuard(std::process::Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}
