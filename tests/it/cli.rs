//! The command line as a user meets it: help, version, and errors that say what to do.

use crate::rewind;

#[test]
fn help_and_version() {
    let help = rewind::run_ok(&["--help"]);
    assert!(help.contains("vms") && help.contains("--connect"), "{help}");
    let version = rewind::run_ok(&["--version"]);
    assert_eq!(version.trim(), format!("rewind {}", rewind_core::VERSION));
}

fn fails_with(args: &[&str], expected: &[&str]) {
    let out = rewind::run(args);
    assert!(!out.status.success(), "rewind {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: "),
        "one line starting with `error:`: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for word in expected {
        assert!(
            stderr.contains(word),
            "stderr should mention {word:?}: {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "nothing on stdout");
}

#[test]
fn daemon_not_running_says_how_to_start_it() {
    fails_with(
        &[
            "vms",
            "--connect",
            "qemu:///system?socket=/nonexistent/libvirt-sock",
        ],
        &["not running", "systemctl start libvirtd", "libvirtd -d"],
    );
}

#[test]
fn unknown_uri_says_which_uris_work() {
    fails_with(
        &["vms", "--connect", "bogus:///x"],
        &["no driver", "qemu:///system", "bogus:///x"],
    );
}

#[test]
fn unreachable_remote_host_is_named() {
    fails_with(
        &[
            "vms",
            "--connect",
            "qemu+ssh://nobody@127.0.0.1:1/system?no_tty=1",
        ],
        &["cannot connect", "127.0.0.1"],
    );
}

#[test]
fn bad_arguments_are_explained() {
    let out = rewind::run(&["vms", "--frobnicate"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error:") && stderr.contains("--frobnicate"),
        "{stderr}"
    );
}

// ---- The conventions of issue 21: exit codes, JSON everywhere, attention, progress ----

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rewind_core::config::Config;
use rewind_core::history::{Outcome, Record};
use rewind_tests::scratch::ScratchDir;
use rewind_tests::{DiskSpec, Format, TestVm, daemon};

/// The exit codes app/CLI.md documents.
const FAILURE: i32 = 1;
const USAGE: i32 = 2;
const NOT_FOUND: i32 = 3;
const BUSY: i32 = 4;
const NEEDS_ATTENTION: i32 = 5;

/// Rewind's configuration and state folders for one test, and a current folder with
/// nothing in it (so that a destination's name is no folder there).
struct Home {
    dir: ScratchDir,
}

impl Home {
    fn new(label: &str) -> Self {
        let dir = ScratchDir::new(label).unwrap();
        std::fs::create_dir(dir.path().join("cwd")).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config_file(&self) -> PathBuf {
        self.path("config").join("config.ron")
    }

    fn history_file(&self) -> PathBuf {
        self.path("state").join("history.jsonl")
    }

    /// `rewind ARGS... --connect <test URI>` with this home.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::rewind::command();
        cmd.args(args)
            .args(["--connect", daemon::URI])
            .current_dir(self.path("cwd"))
            .env("REWIND_CONFIG_DIR", self.path("config"))
            .env("REWIND_STATE_DIR", self.path("state"))
            .env_remove("REWIND_PASSPHRASE");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

/// `out` as one JSON document, after asserting that it exited with `code`.
fn json_exiting(out: &Output, code: i32, what: &str) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit code\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `rewind ARGS...` succeeded and printed one JSON document.
fn json_ok(home: &Home, args: &[&str]) -> serde_json::Value {
    json_exiting(&home.run(args), 0, &format!("rewind {args:?}"))
}

/// `rewind ARGS...` failed with `code` and printed `{"error": {"kind": kind, "message"}}`
/// on stdout, and the same message on stderr's `error:` line; the message.
fn json_error(home: &Home, args: &[&str], code: i32, kind: &str) -> String {
    let out = home.run(args);
    let what = format!("rewind {args:?}");
    let v = json_exiting(&out, code, &what);
    let error = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {v}"));
    assert_eq!(error.len(), 2, "{what}: only kind and message: {v}");
    assert_eq!(error["kind"], kind, "{what}: {v}");
    let message = error["message"].as_str().unwrap().to_owned();
    assert!(
        !message.is_empty() && !message.contains('\n'),
        "{what}: {v}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.strip_prefix("error: ") == Some(message.as_str())),
        "{what}: the `error:` line says the same: {stderr}"
    );
    message
}

/// A `rewind daemon` of a home, killed when dropped (also when the test fails).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

#[test]
fn every_printing_command_speaks_json_and_fails_with_a_json_error_and_its_exit_code() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-contract");
    let vm = TestVm::builder("cli-contract")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    let store = home.path("store");
    let s = store.to_str().unwrap();
    vms_and_init_contract(&home, &vm, s);
    let id = store_contract(&home, &vm, s);
    export_and_restore_contract(&home, &vm, s, &id);
    protection_contract(&home, &vm, s);
    // Wrong arguments: clap's usage error, as JSON too.
    json_error(&home, &["vms", "--json", "--frobnicate"], USAGE, "usage");
}

/// A VM no command finds.
const NO_VM: &str = "rwt-cli-no-such-vm";

/// A checkpoint id no store holds.
const NO_ID: &str = "20001231T000000.000Z";

/// `vms` and `init` (a store at `s`).
fn vms_and_init_contract(home: &Home, vm: &TestVm, s: &str) {
    let vms = json_ok(home, &["vms", "--json"]);
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == vm.name.as_str()),
        "{vms}"
    );
    let out = crate::rewind::command()
        .args(["vms", "--json", "--connect"])
        .arg("qemu:///system?socket=/nonexistent/libvirt-sock")
        .output()
        .unwrap();
    let v = json_exiting(&out, FAILURE, "vms without a daemon");
    assert_eq!(v["error"]["kind"], "unavailable", "{v}");

    let made = json_ok(home, &["init", s, "--json"]);
    assert_eq!(
        (&made["location"], &made["encrypted"], &made["destination"]),
        (
            &serde_json::Value::from(s),
            &serde_json::Value::Bool(false),
            &serde_json::Value::Null
        ),
        "{made}"
    );
    assert!(made["id"].is_string(), "{made}");
    json_error(home, &["init", s, "--json"], FAILURE, "invalid");
}

/// `checkpoint`, `checkpoints`, `verify`, `prune`, `gc` on the store at `s`: the id of
/// the checkpoint taken.
fn store_contract(home: &Home, vm: &TestVm, s: &str) -> String {
    let empty = home.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let gone = home.path("gone");
    let gone = gone.to_str().unwrap();

    // A shut-off VM: read from its disk file.
    let taken = json_ok(home, &["checkpoint", &vm.name, "--to", s, "--json"]);
    assert_eq!(taken.as_array().unwrap().len(), 1, "{taken}");
    let id = taken[0]["id"].as_str().unwrap().to_owned();
    let args = ["checkpoint", NO_VM, "--to", s, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");

    let listed = json_ok(home, &["checkpoints", "--in", s, "--json"]);
    assert_eq!(listed["checkpoints"][0]["id"], id.as_str(), "{listed}");
    let args = ["checkpoints", NO_VM, "--in", s, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");
    let args = ["checkpoints", "--in", empty.to_str().unwrap(), "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");

    let verified = json_ok(home, &["verify", "--in", s, "--json"]);
    assert_eq!(verified["damaged"], serde_json::json!([]), "{verified}");
    let args = ["verify", "--in", gone, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");

    let args = [
        "prune",
        "--in",
        s,
        "--keep-last",
        "5",
        "--dry-run",
        "--json",
    ];
    assert_eq!(json_ok(home, &args)["dry_run"], true);
    let args = ["prune", NO_VM, "--in", s, "--keep-last", "1", "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");

    let collected = json_ok(home, &["gc", "--in", s, "--json"]);
    assert_eq!(collected["chunks_removed"], 0, "{collected}");
    json_error(
        home,
        &["gc", "--in", gone, "--json"],
        NOT_FOUND,
        "not_found",
    );
    id
}

/// `export`, `restore` (in place, then undone, and as a new VM) of checkpoint `id`.
fn export_and_restore_contract(home: &Home, vm: &TestVm, s: &str, id: &str) {
    let image = home.path("vda.qcow2");
    let image_arg = image.to_str().unwrap();
    let export = |checkpoint: &str| {
        home.run(&[
            "export", &vm.name, checkpoint, "--from", s, "--disk", "vda", "--out", image_arg,
            "--json",
        ])
    };
    let exported = json_exiting(&export(id), 0, "export");
    assert_eq!(
        (
            &exported["checkpoint"],
            &exported["disk"],
            &exported["format"]
        ),
        (
            &serde_json::Value::from(id),
            &serde_json::Value::from("vda"),
            &serde_json::Value::from("qcow2")
        ),
        "{exported}"
    );
    assert!(image.exists());
    std::fs::remove_file(&image).unwrap();
    let failed = json_exiting(&export(NO_ID), NOT_FOUND, "export of no checkpoint");
    assert_eq!(failed["error"]["kind"], "not_found", "{failed}");
    assert!(!image.exists());

    let restored = json_ok(home, &["restore", &vm.name, id, "--from", s, "--json"]);
    assert_eq!(restored["mode"], "in_place", "{restored}");
    assert!(restored["safety_checkpoint"].is_string(), "{restored}");
    let args = ["restore", &vm.name, NO_ID, "--from", s, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");
    let undone = json_ok(home, &["undo-restore", &vm.name, "--from", s, "--json"]);
    assert_eq!(undone["mode"], "in_place", "{undone}");
    let args = ["undo-restore", NO_VM, "--from", s, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");
    let copy = format!("{}-copy", vm.name);
    let _copy = rewind_tests::RestoredVm(copy.clone());
    let as_new = json_ok(
        home,
        &[
            "restore",
            &vm.name,
            id,
            "--from",
            s,
            "--as",
            &copy,
            "--no-start",
            "--json",
        ],
    );
    assert_eq!(
        (&as_new["mode"], &as_new["vm"]),
        (
            &serde_json::Value::from("new_vm"),
            &serde_json::Value::from(copy.as_str())
        ),
        "{as_new}"
    );
}

/// `protect` into `s`, the destination by its name, `status`, `history`, `pause`,
/// `resume` and `unprotect`.
fn protection_contract(home: &Home, vm: &TestVm, s: &str) {
    let args = ["protect", &vm.name, "--to", s, "--every", "1h", "--json"];
    let protected = json_ok(home, &args);
    assert_eq!(
        (&protected["vm"], &protected["interval_secs"]),
        (
            &serde_json::Value::from(vm.name.as_str()),
            &serde_json::Value::from(3600)
        ),
        "{protected}"
    );
    let name = protected["destination"].as_str().unwrap().to_owned();
    let args = ["protect", NO_VM, "--to", s, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");
    let by_name = json_ok(home, &["checkpoints", "--in", &name, "--json"]);
    assert_eq!(by_name["store"]["path"], s, "{by_name}");
    let args = ["checkpoints", "--in", "no-such-destination", "--json"];
    let message = json_error(home, &args, NOT_FOUND, "not_found");
    assert!(
        message.contains("no-such-destination") && message.contains(&name),
        "names the destinations there are: {message}"
    );

    let status = json_ok(home, &["status", "--json"]);
    assert_eq!(status["vms"][0]["vm"], vm.name.as_str(), "{status}");
    let history = json_ok(home, &["history", "--json"]);
    assert_eq!(history, serde_json::json!([]));

    let paused = json_ok(home, &["pause", &vm.name, "--json"]);
    assert_eq!(
        (&paused["vm"], &paused["paused"]),
        (
            &serde_json::Value::from(vm.name.as_str()),
            &serde_json::Value::Bool(true)
        ),
        "{paused}"
    );
    json_error(home, &["pause", NO_VM, "--json"], NOT_FOUND, "not_found");
    let resumed = json_ok(home, &["resume", "--json"]);
    assert_eq!(
        resumed,
        serde_json::json!({"vm": null, "paused": false, "paused_until": null})
    );
    json_error(home, &["resume", NO_VM, "--json"], NOT_FOUND, "not_found");
    let unprotected = json_ok(home, &["unprotect", &vm.name, "--json"]);
    assert_eq!(unprotected["destinations"], serde_json::json!([name]));
    let args = ["unprotect", &vm.name, "--json"];
    json_error(home, &args, NOT_FOUND, "not_found");
}

/// A new store at `store`, destination `usb` of a configuration that protects each of
/// `vms` into it, every `interval_secs`.
fn usb_config(store: &std::path::Path, vms: &[&str], interval_secs: u64) -> Config {
    crate::rewind::run_ok(&["init", store.to_str().unwrap()]);
    Config {
        uri: daemon::URI.into(),
        destinations: vec![rewind_core::config::Destination {
            name: "usb".into(),
            location: store.display().to_string(),
            store_id: Some(rewind_core::store::Store::probe(store).unwrap().id),
            passphrase_file: None,
            store_secret: None,
        }],
        vms: vms
            .iter()
            .map(|vm| rewind_core::config::Protection {
                vm: (*vm).into(),
                destinations: vec!["usb".into()],
                interval_secs,
                ..rewind_core::config::Protection::default()
            })
            .collect(),
        ..Config::default()
    }
}

#[test]
fn a_destination_name_finds_its_drive_and_a_missing_drive_is_unavailable() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-dest-name");
    let store = home.path("drive");
    usb_config(&store, &[], 3600)
        .save(&home.config_file())
        .unwrap();
    let listed = json_ok(&home, &["verify", "--in", "usb", "--json"]);
    assert_eq!(listed["checkpoints"], 0, "{listed}");
    let collected = json_ok(&home, &["gc", "--in", "usb", "--json"]);
    assert_eq!(collected["chunks_removed"], 0, "{collected}");
    // Unplugged: the name is known, its store is away.
    std::fs::rename(&store, home.path("elsewhere")).unwrap();
    json_error(
        &home,
        &["checkpoints", "--in", "usb", "--json"],
        FAILURE,
        "unavailable",
    );
}

#[test]
fn a_second_scheduler_is_busy() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-busy");
    let _first = Daemon(
        home.command(&["daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while json_ok(&home, &["status", "--json"])["scheduler"]["running"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = home.run(&["daemon"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(BUSY), "{stderr}");
    assert!(stderr.contains("already runs"), "{stderr}");
}

#[test]
fn a_busy_store_is_waited_for_or_with_no_wait_fails_at_once_as_busy() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-busy-store");
    let store = home.path("store");
    let s = store.to_str().unwrap();
    json_ok(&home, &["init", s, "--json"]);
    // Another process holds the store as removing unused data does (exclusively).
    let held = rewind_core::store::StoreLock::acquire(
        &store,
        rewind_core::store::LockMode::Exclusive,
        "removing unused chunks",
        None,
    )
    .unwrap();

    let message = json_error(
        &home,
        &["verify", "--in", s, "--no-wait", "--json"],
        BUSY,
        "busy",
    );
    assert!(
        message.contains("busy") && message.contains("removing unused chunks"),
        "says who holds it: {message}"
    );
    let out = home.run(&["gc", "--in", s, "--no-wait"]);
    assert_eq!(
        out.status.code(),
        Some(BUSY),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without --no-wait the command waits, and goes on once the store is free.
    let mut waiting = home
        .command(&["verify", "--in", s, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "verify waits for the store"
    );
    drop(held);
    let out = waiting.wait_with_output().unwrap();
    let report = json_exiting(&out, 0, "rewind verify after the store was freed");
    assert!(report.is_object(), "{report}");
}

/// A job record of VM `vm` into `usb`, begun `minutes_ago`.
fn record(vm: &str, minutes_ago: i64, outcome: Outcome) -> Record {
    let started = chrono::Utc::now() - chrono::Duration::minutes(minutes_ago);
    let mut r = Record::starting(vm, "usb", rewind_core::policy::Why::Due, started);
    r.outcome = outcome;
    if outcome == Outcome::Failed {
        r.error = Some("the disk caught fire".into());
    }
    r
}

/// `rewind status` and `status --json` of `home`: both exit with `code`; the text and the
/// JSON.
fn status_exiting(home: &Home, code: i32) -> (String, serde_json::Value) {
    let text = home.run(&["status"]);
    assert_eq!(
        text.status.code(),
        Some(code),
        "{}{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(
        text.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let json = json_exiting(&home.run(&["status", "--json"]), code, "status --json");
    (String::from_utf8(text.stdout).unwrap(), json)
}

#[test]
fn status_needs_attention_for_an_overdue_vm_a_failed_checkpoint_and_a_missing_drive() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-status");
    let store = home.path("drive");
    let vm = "rwt-status-vm";
    let mut config = usb_config(&store, &[vm], 3600);
    config.save(&home.config_file()).unwrap();
    let history = |records: &[Record]| {
        drop(std::fs::remove_file(home.history_file()));
        for r in records {
            rewind_core::history::append(&home.history_file(), r).unwrap();
        }
    };

    // All is well: a checkpoint ten minutes ago, hourly.
    history(&[record(vm, 10, Outcome::Ok)]);
    let (text, json) = status_exiting(&home, 0);
    assert!(
        text.contains("present") && !text.contains("TOO OLD"),
        "{text}"
    );
    assert_eq!(json["vms"][0]["destinations"][0]["stale"], false, "{json}");

    // Overdue: the newest checkpoint is two days old (hourly: it may be one day old).
    history(&[record(vm, 2 * 24 * 60, Outcome::Ok)]);
    let (text, json) = status_exiting(&home, NEEDS_ATTENTION);
    assert!(text.contains("TOO OLD"), "the output is as before: {text}");
    assert_eq!(json["vms"][0]["destinations"][0]["stale"], true, "{json}");

    // The last checkpoint failed.
    history(&[record(vm, 20, Outcome::Ok), record(vm, 5, Outcome::Failed)]);
    let (text, json) = status_exiting(&home, NEEDS_ATTENTION);
    assert!(text.contains("last attempt failed"), "{text}");
    assert_eq!(json["vms"][0]["destinations"][0]["failures"], 1, "{json}");

    // The drive is missing (its folder gone), all else well.
    history(&[record(vm, 10, Outcome::Ok)]);
    std::fs::rename(&store, home.path("unplugged")).unwrap();
    let (text, json) = status_exiting(&home, NEEDS_ATTENTION);
    assert!(text.contains("MISSING"), "{text}");
    assert_eq!(
        json["vms"][0]["destinations"][0]["available"], false,
        "{json}"
    );

    // A paused VM asks for nothing, even with its drive away.
    config.vms[0].paused = true;
    config.save(&home.config_file()).unwrap();
    status_exiting(&home, 0);
}

#[test]
fn a_checkpoint_whose_stderr_is_no_terminal_says_its_progress_in_plain_lines() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-progress");
    let vm = TestVm::builder("cli-progress")
        .disks(vec![DiskSpec::new("vda", Format::Raw, 128 << 20)])
        .define()
        .expect("define the test VM");
    // 96 MiB of data that does not compress: copying it takes more than a moment.
    let raw = home.path("data.raw");
    let mut data = rewind_tests::noise(21, 96 << 20);
    data.resize(128 << 20, 0);
    std::fs::write(&raw, data).unwrap();
    vm.fill_disk("vda", &raw).unwrap();
    let store = home.path("store");
    let started = Instant::now();
    let out = home
        .command(&[
            "checkpoint",
            &vm.name,
            "--to",
            store.to_str().unwrap(),
            "--json",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let took_secs = usize::try_from(started.elapsed().as_secs()).unwrap();
    rewind_tests::assert_success("rewind checkpoint", &out);
    let taken: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        taken.as_array().unwrap().len(),
        1,
        "stdout is the JSON only"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let prefix = format!("progress: {}: ", vm.name);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no progress lines");
    for line in &lines {
        let rest = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("not a progress line: {line:?}\n{stderr}"));
        assert!(!rest.contains('\r') && !rest.contains('\u{1b}'), "{line:?}");
    }
    let copying: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains(" % ("))
        .collect();
    assert!(
        copying
            .iter()
            .all(|l| l.ends_with(')') && l.contains(" of ")),
        "{stderr}"
    );
    assert!(
        !copying.is_empty(),
        "a line with the copying's percent: {stderr}"
    );
    assert!(
        copying.len() <= 11 + took_secs / 10 + 1,
        "at most one per tenth (from 0 %) and one every 10 s ({took_secs} s): {stderr}"
    );
}

#[test]
fn through_the_service_errors_keep_their_kind_and_status_needs_attention() {
    rewind_tests::setup().unwrap();
    let home = Home::new("cli-svc");
    // One VM protected, which the service's scheduler fails to checkpoint at once (there is
    // no such VM).
    let failing = "rwt-cli-svc-no-such-vm";
    let svc_dir = home.path("svc");
    std::fs::create_dir(&svc_dir).unwrap();
    usb_config(&home.path("store"), &[failing], 3600)
        .save(&svc_dir.join("config/config.ron"))
        .unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_rewind"));
    let service = rewind_tests::service::TestService::start(binary, &svc_dir).unwrap();
    let socket = service.socket().to_owned();
    let run = |args: &[&str]| {
        home.command(args)
            .env("REWIND_SOCKET", &socket)
            .output()
            .unwrap()
    };
    let error_kind = |args: &[&str], code: i32| {
        let v = json_exiting(&run(args), code, &format!("rewind {args:?} (service)"));
        v["error"]["kind"].as_str().unwrap_or_default().to_owned()
    };

    // The service's job fails: its JobError comes back with its kind.
    let args = ["checkpoint", NO_VM, "--to", "usb", "--json"];
    assert_eq!(error_kind(&args, NOT_FOUND), "not_found");
    let args = ["prune", NO_VM, "--in", "usb", "--keep-last", "1", "--json"];
    assert_eq!(error_kind(&args, NOT_FOUND), "not_found");
    let args = ["restore", NO_VM, "latest", "--from", "usb", "--json"];
    assert_eq!(error_kind(&args, NOT_FOUND), "not_found");
    let verified = json_exiting(&run(&["verify", "--in", "usb", "--json"]), 0, "verify");
    assert_eq!(verified["checkpoints"], 0, "{verified}");

    // Once the scheduler's checkpoint has failed, status needs attention.
    let start = Instant::now();
    while json_exiting(&run(&["history", "--json"]), 0, "history") == serde_json::json!([]) {
        assert!(
            start.elapsed() < Duration::from_mins(1),
            "the service's scheduler ran nothing:\n{}",
            std::fs::read_to_string(service.log()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = run(&["status", "--json"]);
    let json = json_exiting(&status, NEEDS_ATTENTION, "status (service)");
    assert_eq!(json["vms"][0]["destinations"][0]["failures"], 1, "{json}");
    let text = run(&["status"]);
    assert_eq!(text.status.code(), Some(NEEDS_ATTENTION));
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("last attempt failed"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // Nothing protected any more: all is well.
    let unprotected = json_exiting(&run(&["unprotect", failing, "--json"]), 0, "unprotect");
    assert_eq!(unprotected["vm"], failing, "{unprotected}");
    assert_eq!(
        error_kind(&["unprotect", failing, "--json"], NOT_FOUND),
        "not_found"
    );
    json_exiting(
        &run(&["status", "--json"]),
        0,
        "status (service), nothing protected",
    );
}
