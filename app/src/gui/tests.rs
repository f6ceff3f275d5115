//! Tests of the window with `egui_kittest`, finding widgets by their labels as a screen
//! reader would: snapshots of the main screens (fixed data and clock, compared with the
//! images in `app/tests/snapshots/`; `UPDATE_SNAPSHOTS=1` rewrites them), the first run
//! against the real engine on libvirt's test driver, and restore + undo from the window
//! against the real engine and a real tiny guest.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone as _, Utc};
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT as _, Queryable as _};
use rewind_core::config::{Config, Destination, Protection};
use rewind_core::destination::Availability;
use rewind_core::engine::jobs::{ErrorKind, JobError, JobOutput};
use rewind_core::engine::{self, EngineOptions, SchedulerView};
use rewind_core::history::{Outcome, Record};
use rewind_core::libvirt::Hypervisor;
use rewind_core::policy::Why;
use rewind_core::scheduler::Paths;
use rewind_core::store::{CheckpointKind, Consistency, InitOptions, Store};
use rewind_core::view::catalog::{BootCheckSummary, CheckpointSummary, DestinationView};

use super::dialogs::Dialog;
use super::state::{CheckpointKey, Connection, UiState};
use super::{RewindApp, main_ui};

const WINDOW: egui::Vec2 = egui::Vec2::new(1100.0, 740.0);

fn fixed_now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
}

/// A checkpoint of the test driver's VM at `t`.
fn summary(vm_uuid: uuid::Uuid, t: DateTime<Utc>, new_mib: u64) -> CheckpointSummary {
    CheckpointSummary {
        id: t.format("%Y%m%dT%H%M%SZ").to_string(),
        vm: "test".into(),
        vm_uuid,
        time: t,
        kind: CheckpointKind::Disk,
        consistency: Consistency::Application,
        consistency_note: Some("file systems frozen by the guest agent".into()),
        incremental: true,
        full_reason: None,
        logical_bytes: 20 << 30,
        new_bytes: new_mib << 20,
        duration_ms: 4200,
        labels: Vec::new(),
        disks: vec!["vda".into()],
        damaged: false,
        verified: None,
        boot_check: None,
    }
}

/// A small picture of a login screen, as a boot-check keeps it.
fn screen_png() -> Vec<u8> {
    let picture = image::RgbImage::from_fn(160, 100, |x, y| {
        if (50..110).contains(&x) && (40..60).contains(&y) {
            image::Rgb([240, 240, 240])
        } else {
            image::Rgb([20, 60, u8::try_from(100 + y).unwrap_or(255)])
        }
    });
    let mut png = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// The window as it looks with the test driver's VM protected into a drive that holds a
/// few days of checkpoints (one crash-consistent, one damaged, one safety checkpoint).
fn fixture() -> UiState {
    let hv = Hypervisor::connect("test:///default").unwrap();
    let vms = hv.list_vms().unwrap();
    let vm = &vms[0];
    let uuid: uuid::Uuid = vm.uuid.parse().unwrap();
    let now = fixed_now();
    let mut checkpoints: Vec<CheckpointSummary> = (0..72)
        .map(|h| {
            summary(
                uuid,
                now - chrono::Duration::hours(72 - h) + chrono::Duration::minutes(3),
                1 + (h.unsigned_abs() * 37) % 900,
            )
        })
        .collect();
    checkpoints[10].consistency = Consistency::Crash;
    checkpoints[10].consistency_note = Some("no guest agent answered".into());
    checkpoints[20].damaged = true;
    for c in &mut checkpoints[..40] {
        c.verified = Some(now - chrono::Duration::hours(30));
    }
    checkpoints[60].labels = vec!["safety".into()];
    checkpoints[50].boot_check = Some(BootCheckSummary {
        checked_at: now - chrono::Duration::hours(20),
        booted: false,
        reason: Some(
            "the screen showed a blue screen (a Windows stop error or recovery screen)".into(),
        ),
        thumbnail_png: None,
    });
    checkpoints[66].boot_check = Some(BootCheckSummary {
        checked_at: now - chrono::Duration::hours(2),
        booted: true,
        reason: None,
        thumbnail_png: Some(screen_png()),
    });
    checkpoints[0].incremental = false;
    checkpoints[0].new_bytes = 12 << 30;
    let destination = Destination {
        name: "BACKUP".into(),
        location: "/media/me/BACKUP/rewind".into(),
        store_id: None,
        passphrase_file: None,
        store_secret: None,
    };
    let config = Config {
        uri: "test:///default".into(),
        destinations: vec![destination.clone()],
        vms: vec![Protection {
            vm: vm.name.clone(),
            uuid: Some(vm.uuid.clone()),
            destinations: vec!["BACKUP".into()],
            interval_secs: 3600,
            ..Protection::default()
        }],
        ..Config::default()
    };
    let last = checkpoints.last().unwrap().time;
    let history = vec![Record {
        vm: vm.name.clone(),
        vm_uuid: Some(vm.uuid.clone()),
        destination: "BACKUP".into(),
        location: Some("/media/me/BACKUP/rewind".into()),
        trigger: Why::Due,
        started: last,
        finished: last + chrono::Duration::seconds(4),
        outcome: Outcome::Ok,
        checkpoint: Some(checkpoints.last().unwrap().id.clone()),
        incremental: Some(true),
        read_bytes: 300 << 20,
        new_bytes: 120 << 20,
        pruned: 1,
        error: None,
        retryable: false,
    }];
    let selected = CheckpointKey::of("BACKUP", &checkpoints[66]);
    UiState {
        uri: "test:///default".into(),
        connection: Connection::Connected,
        selected: Some(vm.uuid.clone()),
        vms: Some(vms),
        config: Some(Arc::new(config)),
        destinations: Some(Arc::new(vec![DestinationView {
            destination,
            found: Availability::Folder("/media/me/BACKUP/rewind".into()),
            checkpoints,
            error: None,
            fully_checked: None,
        }])),
        history: Arc::new(history),
        scheduler: Some(SchedulerView::Here),
        checkpoint: Some(selected),
        now,
        ..UiState::default()
    }
}

fn harness(state: UiState) -> Harness<'static, UiState> {
    Harness::builder().with_size(WINDOW).wgpu().build_ui_state(
        |ui, state: &mut UiState| {
            drop(main_ui(ui, state));
        },
        state,
    )
}

#[test]
fn main_screen_snapshot() {
    let mut h = harness(fixture());
    h.run();
    // What the user relies on is there, by label.
    h.get_by_label("⟲ Restore…");
    h.get_by_label("Restore as new VM…");
    h.get_by_label("Export disk…");
    h.get_by_label("Verify");
    h.get_by_label("Delete…");
    h.get_by_label("Checkpoint now");
    assert!(h.query_all_by_label_contains("Checkpoint 2026-").count() > 20);
    h.get_by_label_contains("(damaged)");
    h.get_by_label_contains("(did not boot)");
    h.get_by_label_contains("(boots)");
    h.get_by_label_contains("Next checkpoint");
    // The selected checkpoint booted: the details say when, with its screen.
    h.get_by_label("Booted — checked 2026-12-01 10:00");
    h.get_by_label("The last screen of the boot-check's throwaway copy");
    h.get_by_label("Check that it boots");
    h.snapshot("main_screen");
}

/// A VM that runs from a checkpoint started elsewhere (another window, the CLI, a protection
/// service that took the run over at its start): the engine's list of the runs it serves
/// brings the banner, with the checkpoint's time found in the destinations, and a list
/// without it takes the banner away.
#[test]
fn the_engine_s_list_of_runs_brings_and_takes_the_banner() {
    use rewind_core::engine::{Event, RunInfo};
    let state = fixture();
    let vm_uuid: uuid::Uuid = state.selected.clone().unwrap().parse().unwrap();
    let key = state.checkpoint.clone().unwrap();
    let mut h = harness(state);
    h.run();
    let banner = "Running from checkpoint 2026-12-01 06:03 — its own disks are untouched";
    assert!(h.query_by_label(banner).is_none());
    h.state_mut().apply(Event::Runs(vec![RunInfo {
        vm_uuid,
        vm: "test".into(),
        checkpoint: key.id.clone(),
    }]));
    h.run();
    h.get_by_label(banner);
    h.get_by_label(super::runfrom::KEEP_BUTTON);
    h.get_by_label(super::runfrom::DISCARD_BUTTON);
    h.get_by_label(super::runfrom::LIST_NOTE);
    h.state_mut().apply(Event::Runs(Vec::new()));
    h.run();
    assert!(h.query_by_label(banner).is_none(), "the banner stays");
    assert!(h.query_by_label(super::runfrom::KEEP_BUTTON).is_none());
    assert!(h.query_by_label(super::runfrom::LIST_NOTE).is_none());
}

/// A VM that runs from a checkpoint: the banner says from when, and that its own disks are
/// untouched, with Keep and Discard; Discard asks first.
#[test]
fn run_from_checkpoint_banner_snapshot() {
    let mut state = fixture();
    let vm_uuid: uuid::Uuid = state.selected.clone().unwrap().parse().unwrap();
    let key = state.checkpoint.clone().unwrap();
    let time = state.summary(&key).unwrap().time;
    state.runs.insert(
        vm_uuid,
        super::runfrom::RunView {
            vm: "test".into(),
            destination: Some(key.destination.clone()),
            checkpoint: key.id.clone(),
            time: Some(time),
        },
    );
    let mut h = harness(state);
    h.run();
    h.get_by_label("Running from checkpoint 2026-12-01 06:03 — its own disks are untouched");
    h.get_by_label(super::runfrom::LIST_NOTE);
    h.get_by_label(super::runfrom::KEEP_BUTTON);
    h.snapshot("run_from_checkpoint_banner");
    h.get_by_label(super::runfrom::DISCARD_BUTTON).click();
    h.run();
    assert_eq!(
        h.state().dialog,
        Some(Dialog::ConfirmDiscardRun { vm_uuid }),
        "Discard asks first"
    );
}

#[test]
fn restore_confirmation_snapshot_says_what_happens() {
    let mut state = fixture();
    state.dialog = Some(Dialog::ConfirmRestore {
        key: state.checkpoint.clone().unwrap(),
        safety: true,
        save_state: false,
        disk_only: false,
    });
    let mut h = harness(state);
    h.run();
    h.get_by_label_contains("safety checkpoint in BACKUP");
    h.get_by_label_contains("is shut down");
    h.get_by_label_contains("starts again");
    h.snapshot("restore_confirmation");
    // Unticking the safety checkpoint says what that costs.
    h.get_by_label("Keep the current state as a safety checkpoint (recommended)")
        .click();
    h.run();
    h.get_by_label_contains("NOT kept");
}

#[test]
fn saving_the_running_session_is_offered_and_asked_of_the_engine() {
    use rewind_core::engine::Command;
    use rewind_core::engine::jobs::JobRequest;
    use rewind_core::libvirt::lifecycle::StopMode;
    let mut state = fixture();
    state.dialog = Some(Dialog::ConfirmRestore {
        key: state.checkpoint.clone().unwrap(),
        safety: true,
        save_state: false,
        disk_only: false,
    });
    let mut h = Harness::builder().with_size(WINDOW).build_ui_state(
        |ui, s: &mut (UiState, Vec<Command>)| {
            let commands = main_ui(ui, &mut s.0);
            s.1.extend(commands);
        },
        (state, Vec::new()),
    );
    h.run();
    h.get_by_label("Save its running session instead of shutting it down (undo resumes it)")
        .click();
    h.run();
    h.get_by_label_contains("running session saved (memory too)");
    h.get_by_label("Restore").click();
    h.run();
    let asked = h.state().1.iter().any(|c| {
        matches!(c, Command::Start(JobRequest::Restore { options, .. })
            if options.stop == StopMode::Save && options.safety_checkpoint)
    });
    assert!(asked, "{:?}", h.state().1);
}

/// A harness over `state` that keeps the commands the window gives.
fn commanding_harness(
    state: UiState,
) -> Harness<'static, (UiState, Vec<rewind_core::engine::Command>)> {
    Harness::builder().with_size(WINDOW).wgpu().build_ui_state(
        |ui, s: &mut (UiState, Vec<rewind_core::engine::Command>)| {
            let commands = main_ui(ui, &mut s.0);
            s.1.extend(commands);
        },
        (state, Vec::new()),
    )
}

/// The fixture with its selected checkpoint a full-state one, and the restore dialog open.
fn full_state_restore_dialog() -> UiState {
    let mut state = fixture();
    let key = state.checkpoint.clone().unwrap();
    let mut views = (**state.destinations.as_ref().unwrap()).clone();
    for c in &mut views[0].checkpoints {
        if c.id == key.id {
            c.kind = CheckpointKind::Full;
        }
    }
    state.destinations = Some(Arc::new(views));
    state.dialog = Some(Dialog::ConfirmRestore {
        key,
        safety: true,
        save_state: false,
        disk_only: false,
    });
    state
}

#[test]
fn a_full_state_checkpoint_that_cannot_resume_says_why_and_offers_its_disks_alone() {
    use rewind_core::engine::jobs::JobRequest;
    use rewind_core::engine::{Command, Event, ResumeKey};
    let state = full_state_restore_dialog();
    let key = state.checkpoint.clone().unwrap();
    // The spinner keeps repainting: a few frames, not "until it settles".
    let mut h = commanding_harness(state);
    h.run_steps(4);
    // Opening the dialog asks the engine, once, and says it is looking.
    let asked: Vec<_> = h
        .state()
        .1
        .iter()
        .filter(|c| matches!(c, Command::CheckResume(_)))
        .collect();
    assert_eq!(asked.len(), 1, "{:?}", h.state().1);
    h.get_by_label_contains("Checking that the checkpoint can resume");
    h.get_by_label_contains("resumes exactly where it was");
    h.state_mut().0.apply(Event::ResumeChecked {
        key: ResumeKey {
            destination: key.destination.clone(),
            vm_uuid: key.vm_uuid,
            checkpoint: key.id.clone(),
        },
        result: Err(JobError::new(
            ErrorKind::CannotResume,
            "chunk 0badc0de of its saved memory is damaged in the store",
        )),
    });
    h.run_steps(4);
    h.get_by_label_contains("cannot resume test where it was: chunk 0badc0de");
    h.get_by_label_contains("boots from the restored disks");
    h.get_by_label("Restore disks only").click();
    h.run_steps(4);
    let started = h.state().1.iter().find_map(|c| match c {
        Command::Start(JobRequest::Restore { options, .. }) => Some(options.clone()),
        _ => None,
    });
    assert!(
        started.is_some_and(|o| o.disk_only),
        "a disk-only restore is asked for: {:?}",
        h.state().1
    );
}

#[test]
fn the_restore_window_counts_the_shutdown_down_and_turns_the_vm_off_when_asked() {
    use rewind_core::engine::jobs::JobRequest;
    use rewind_core::engine::{Command, Event};
    use rewind_core::progress::Phase;
    let mut state = fixture();
    let key = state.checkpoint.clone().unwrap();
    let request = JobRequest::Restore {
        destination: key.destination.clone(),
        vm_uuid: key.vm_uuid,
        checkpoint: key.id.clone(),
        options: rewind_core::restore::RestoreOptions::default(),
        as_new: None,
    };
    state.apply(Event::JobStarted {
        job: 7,
        label: "Restore to 20261201T090300Z".into(),
        request: Arc::new(request),
    });
    state.apply(Event::JobProgress {
        job: 7,
        phase: Phase::Stopping,
        done_bytes: 0,
        total_bytes: 0,
        force_off_in: Some(Duration::from_secs(100)),
    });
    let mut h = commanding_harness(state);
    h.run_steps(4);
    // In the restore window and in the activity list.
    assert_eq!(
        h.query_all_by_label_contains("Shutting the VM down — turned off in 1:40")
            .count(),
        2
    );
    h.get_by_label_contains("The guest was asked to shut down");
    h.get_by_label("Turn off now").click();
    h.run_steps(4);
    assert!(
        h.state()
            .1
            .iter()
            .any(|c| matches!(c, Command::ForceOff(7))),
        "{:?}",
        h.state().1
    );
    assert!(
        h.get_by_label("Turn off now")
            .accesskit_node()
            .is_disabled(),
        "asked once"
    );
    // A resume that turns out impossible once it runs (a damaged chunk) offers the disks.
    h.state_mut().0.apply(Event::JobFinished {
        job: 7,
        result: Err(JobError::new(
            ErrorKind::CannotResume,
            "checkpoint x of VM \"test\" cannot resume the VM where it was",
        )),
    });
    h.run_steps(4);
    h.get_by_label("The restore did not complete");
    h.get_by_label("Restore disks only").click();
    h.run_steps(4);
    let again = h.state().1.iter().rev().find_map(|c| match c {
        Command::Start(JobRequest::Restore { options, .. }) => Some(options.clone()),
        _ => None,
    });
    assert!(again.is_some_and(|o| o.disk_only), "{:?}", h.state().1);
}

#[test]
fn first_run_snapshot_suggests_a_drive_and_warns_about_the_same_disk() {
    let mut state = fixture();
    state.config = Some(Arc::new(Config {
        uri: "test:///default".into(),
        ..Config::default()
    }));
    state.destinations = Some(Arc::default());
    state.history = Arc::default();
    state.checkpoint = None;
    let mut h = commanding_harness(state);
    h.step();
    h.get_by_label("Welcome to Rewind");
    h.get_by_label_contains("do not survive that disk failing");
    h.get_by_label("Browse…");
    // The window asks the engine for the drives (it does no I/O itself), once.
    let asked = h
        .state()
        .1
        .iter()
        .filter(|c| matches!(c, rewind_core::engine::Command::ScanDrives))
        .count();
    assert_eq!(asked, 1, "{:?}", h.state().1);
    h.state_mut()
        .0
        .apply(rewind_core::engine::Event::DrivesFound(vec![
            "/media/me/USB STICK".into(),
        ]));
    h.step();
    h.get_by_label_contains("Drives found");
    h.get_by_label("/media/me/USB STICK");
    h.get_by_label("Folder").focus();
    h.step();
    h.get_by_label("Folder").type_text("relative/path");
    h.step();
    h.get_by_label_contains("must be a full path");
}

#[test]
fn settings_protection_tab_snapshot() {
    let mut state = fixture();
    let s = super::settings::SettingsState::open(&state, super::settings::SettingsTab::Protection);
    state.settings = Some(s);
    let mut h = harness(state);
    h.run();
    h.get_by_label("Protect test");
    h.get_by_role_and_label(Role::CheckBox, "BACKUP");
    h.snapshot("settings_protection");
    // Unticking the only destination is refused until fixed.
    h.get_by_role_and_label(Role::CheckBox, "BACKUP").click();
    h.run();
    h.get_by_label_contains("has no destination");
}

#[test]
fn a_remote_host_is_tested_then_added_from_the_settings() {
    use rewind_core::engine::{Command, Event};
    let mut state = fixture();
    state.settings = Some(super::settings::SettingsState::open(
        &state,
        super::settings::SettingsTab::Destinations,
    ));
    let mut h = Harness::builder().with_size(WINDOW).build_ui_state(
        |ui, s: &mut (UiState, Vec<Command>)| {
            let commands = main_ui(ui, &mut s.0);
            s.1.extend(commands);
        },
        (state, Vec::new()),
    );
    h.step();
    h.get_by_label("a folder on another host (SSH)").click();
    h.step();
    h.get_by_label("Address").focus();
    h.step();
    h.get_by_label("Address").type_text("nas:/srv/rewind");
    h.step();
    h.get_by_label_contains("starts with ssh://");
    assert!(
        h.get_by_label("Test connection")
            .accesskit_node()
            .is_disabled(),
        "a malformed address cannot be tested"
    );
    h.state_mut().0.settings.as_mut().unwrap().remote_url = "ssh://me@nas/srv/rewind".into();
    h.step();
    settle(&mut h);
    h.get_by_label("Test connection").click();
    h.step();
    let asked = h.state().1.iter().any(|c| {
        matches!(c, Command::TestDestination { location } if location == "ssh://me@nas/srv/rewind")
    });
    assert!(asked, "{:?}", h.state().1);
    h.state_mut().0.apply(Event::DestinationTested {
        location: "ssh://me@nas/srv/rewind".into(),
        result: Err(JobError::new(
            ErrorKind::PermissionDenied,
            "nas: the host key is not known; run ssh me@nas once",
        )),
    });
    h.step();
    h.get_by_label_contains("host key is not known");
    // Through the service: its own key to put on the host, and the unknown host's
    // fingerprint to confirm; trusting it pins that key and tests again.
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample rewind-service@host";
    h.state_mut().0.apply(Event::SshIdentity {
        public_key: key.into(),
    });
    h.state_mut().0.apply(Event::HostKeyUnknown {
        location: "ssh://me@nas/srv/rewind".into(),
        host: "nas".into(),
        keys: vec![rewind_core::ssh_identity::HostKey {
            line: "nas ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINas".into(),
            fingerprint: "SHA256:abcdefgh".into(),
            kind: "ED25519".into(),
        }],
    });
    h.step();
    h.get_by_label_contains("logs in with a key of its own");
    h.get_by_label_contains("First connection to nas");
    h.get_by_label("ED25519 key SHA256:abcdefgh");
    h.get_by_label("Trust this host").click();
    h.step();
    let trusted = h.state().1.iter().any(|c| {
        matches!(c, Command::TrustHostKey { location, line }
            if location == "ssh://me@nas/srv/rewind" && line.starts_with("nas ssh-ed25519"))
    });
    assert!(trusted, "{:?}", h.state().1);
    h.step();
    assert!(h.query_by_label_contains("First connection to").is_none());
    settle(&mut h);
    h.get_by_label("Add destination").click();
    h.step();
    let added = h.state().1.iter().any(|c| {
        matches!(c, Command::AddRemoteDestination { url, passphrase: None } if url == "ssh://me@nas/srv/rewind")
    });
    assert!(added, "{:?}", h.state().1);
}

#[test]
fn the_timeline_zooms_pans_and_follows_now_again() {
    let mut h = harness(fixture());
    h.run();
    h.get_by_label("Hours").click();
    h.run();
    assert!((h.state().timeline.span_secs - 12.0 * 3600.0).abs() < 1.0);
    h.get_by_label("◀").click();
    h.run();
    assert!(h.state().timeline.end.is_some(), "panned back");
    h.get_by_label("Now").click();
    h.run();
    assert_eq!(h.state().timeline.end, None);
    // The keyboard moves between checkpoints.
    let before = h.state().checkpoint.clone().unwrap();
    let label = super::timeline::marker_label(h.state().summary(&before).unwrap());
    h.get_by_label(&label).focus();
    h.run();
    h.key_press(egui::Key::ArrowLeft);
    h.run();
    let after = h.state().checkpoint.clone().unwrap();
    assert_ne!(after, before);
    assert!(h.state().summary(&after).unwrap().time < h.state().summary(&before).unwrap().time);
}

// ---- Against the real engine ------------------------------------------------------------

/// Steps the window until `done` holds (the engine answers on its own threads).
fn wait_for<S>(
    h: &mut Harness<'_, S>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&Harness<'_, S>) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        h.step();
        if done(h) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Clicks the widget `label` once it is enabled and has stayed in the same place for a few
/// frames. Against the real engine, events arrive between frames (a job ends, the VM's state
/// changes) and move or enable widgets; a click goes to where a widget was last drawn.
fn click_when_ready<S>(h: &mut Harness<'_, S>, label: &str, timeout: Duration) {
    let mut last = None;
    let mut still = 0;
    wait_for(h, &format!("{label} enabled and still"), timeout, |h| {
        let now = h
            .query_by_label(label)
            .filter(|b| !b.accesskit_node().is_disabled())
            .map(|b| b.rect());
        still = if now.is_some() && now == last {
            still + 1
        } else {
            0
        };
        last = now;
        still >= 3
    });
    h.get_by_label(label).click();
}

/// A few frames, so windows that just opened have their final size and place before the
/// test clicks into them (clicks go to where a widget was last drawn).
fn settle<S>(h: &mut Harness<'_, S>) {
    for _ in 0..3 {
        h.step();
    }
}

fn paths(dir: &Path) -> Paths {
    Paths {
        config: dir.join("config.ron"),
        history: dir.join("history.jsonl"),
        status: dir.join("status.json"),
    }
}

fn app_harness(uri: &str, dir: &Path) -> Harness<'static, RewindApp> {
    // As main() does: the engine makes pictures' thumbnails with this binary's codecs.
    crate::thumbnail::install();
    let engine = engine::spawn_with(
        EngineOptions {
            uri: uri.into(),
            scheduler: None,
            paths: paths(dir),
        },
        Arc::new(|| {}),
    )
    .unwrap();
    Harness::builder().with_size(WINDOW).build_ui_state(
        |ui, app: &mut RewindApp| app.frame_ui(ui),
        RewindApp::new(engine, uri.into(), true),
    )
}

/// The first-run guide's first step: the drive's folder typed in and added; returns on
/// step 2.
fn add_drive_in_the_guide(h: &mut Harness<'_, RewindApp>, drive: &Path) {
    wait_for(h, "the first-run guide", Duration::from_secs(20), |h| {
        h.query_by_label("Welcome to Rewind").is_some()
    });
    h.get_by_label("Folder").focus();
    h.get_by_label("Folder")
        .type_text(&drive.join("rewind").display().to_string());
    h.step();
    h.get_by_label("Add destination").click();
    wait_for(h, "step 2 of the guide", Duration::from_secs(20), |h| {
        h.query_by_label_contains("Step 2 of 2").is_some()
    });
}

/// A new store in `store_dir`, and a configuration protecting `vm` into it as the
/// destination `name`.
fn protecting(store_dir: &Path, name: &str, vm: &rewind_tests::TestVm) -> (Store, Config) {
    let store = Store::init(store_dir, &InitOptions::default()).unwrap();
    let config = Config {
        uri: rewind_tests::daemon::URI.into(),
        destinations: vec![Destination {
            name: name.into(),
            location: store_dir.display().to_string(),
            store_id: Some(store.config().id),
            passphrase_file: None,
            store_secret: None,
        }],
        vms: vec![Protection {
            vm: vm.name.clone(),
            uuid: Some(vm.uuid.clone()),
            destinations: vec![name.into()],
            ..Protection::default()
        }],
        ..Config::default()
    };
    (store, config)
}

/// Selects VM `name` in the window and takes a checkpoint with "Checkpoint now"; returns
/// once it is on the timeline.
fn checkpoint_from_the_window(h: &mut Harness<'_, RewindApp>, name: &str) {
    wait_for(h, "the VM in the list", Duration::from_secs(30), |h| {
        h.query_all_by_label(name).next().is_some()
    });
    h.query_all_by_label(name).next().unwrap().click();
    click_when_ready(h, "Checkpoint now", Duration::from_secs(10));
    wait_for(
        h,
        "a checkpoint on the timeline",
        Duration::from_mins(3),
        |h| {
            h.query_all_by_label_contains("Checkpoint 20")
                .next()
                .is_some()
        },
    );
}

#[test]
fn first_run_adds_a_drive_and_protects_a_vm_with_the_real_engine() {
    let dir = rewind_tests::scratch::ScratchDir::new("gui-first-run").unwrap();
    let drive = dir.path().join("BACKUP");
    let mut h = app_harness("test:///default", dir.path());
    add_drive_in_the_guide(&mut h, &drive);
    assert!(
        Store::probe(&drive.join("rewind")).is_ok(),
        "the store was created on the drive"
    );
    h.get_by_label("Start protecting").click();
    wait_for(&mut h, "the VM protected", Duration::from_secs(20), |h| {
        h.state()
            .state
            .config
            .as_ref()
            .is_some_and(|c| c.vms.len() == 1)
    });
    let saved = Config::load(&dir.path().join("config.ron")).unwrap();
    assert_eq!(saved.vms[0].vm, "test");
    assert_eq!(saved.vms[0].destinations, ["BACKUP"]);
    assert_eq!(
        saved.destinations[0].location,
        drive.join("rewind").display().to_string()
    );
    // The guide is gone; the VM shows as protected.
    wait_for(&mut h, "the VM screen", Duration::from_secs(10), |h| {
        h.query_by_label("Welcome to Rewind").is_none()
            && h.query_all_by_label("protected").next().is_some()
    });
}

/// The protection service for a window test, in this process: its socket, configuration
/// and state in `dir`.
fn service_in(dir: &Path) -> rewind_service::Running {
    rewind_service::start(rewind_service::ServiceOptions {
        uri: "test:///default".into(),
        socket: dir.join("s.sock"),
        paths: paths(dir),
    })
    .unwrap()
}

#[test]
fn the_window_works_through_the_protection_service_and_comes_back_when_it_restarts() {
    let dir = rewind_tests::scratch::ScratchDir::new("gui-service").unwrap();
    let drive = dir.path().join("BACKUP");
    let service = service_in(dir.path());
    let engine =
        rewind_service::client::engine("window", dir.path().join("s.sock"), Arc::new(|| {}))
            .unwrap();
    let mut h = Harness::builder().with_size(WINDOW).build_ui_state(
        |ui, app: &mut RewindApp| app.frame_ui(ui),
        RewindApp::new(engine, "test:///default".into(), true),
    );
    // The first-run guide, answered by the service: the drive's store is made and the VM
    // protected in the service's configuration.
    add_drive_in_the_guide(&mut h, &drive);
    h.get_by_label("Start protecting").click();
    // The service's scheduler takes the VM's first checkpoint at once; libvirt's test
    // driver has no backups, so the window shows that attempt as failing, from the
    // service's history.
    let failing = |h: &Harness<'_, RewindApp>| {
        h.query_all_by_label("failing").next().is_some()
            && h.state().state.history.iter().any(|r| r.vm == "test")
    };
    wait_for(
        &mut h,
        "the service's first attempt",
        Duration::from_secs(30),
        failing,
    );
    let saved = Config::load(&dir.path().join("config.ron")).unwrap();
    assert_eq!(saved.vms[0].vm, "test");
    assert!(Store::probe(&drive.join("rewind")).is_ok());
    // The scheduler shown is the service's, not the window's.
    let shown = super::vm_list::scheduler_text(&h.state().state).1;
    assert!(shown.contains("the protection service"), "{shown:?}");

    // The service stops: the window says so, and keeps trying.
    service.stop();
    wait_for(
        &mut h,
        "the lost connection",
        Duration::from_secs(20),
        |h| matches!(h.state().state.connection, Connection::Failed { .. }),
    );
    // It is back: the window reconnects by itself and shows the protection again.
    let _service = service_in(dir.path());
    h.state_mut().state.history = Vec::new().into();
    wait_for(&mut h, "the reconnection", Duration::from_secs(40), |h| {
        matches!(h.state().state.connection, Connection::Connected) && failing(h)
    });
}

/// The last record of the sequence workload a checkpoint's `vda` holds.
fn last_record(store: &Store, vm_uuid: &uuid::Uuid, id: &str) -> u64 {
    let m = store.manifest(vm_uuid, id).unwrap();
    let disk = m.disks.iter().find(|d| d.target == "vda").unwrap();
    let bytes = store
        .object_reader(&disk.index)
        .unwrap()
        .read_all()
        .unwrap();
    let scan = rewind_tests::workload::scan_sequence(&bytes);
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    scan.last_valid
}

fn wait_resumed_after(vm: &rewind_tests::TestVm, k: u64) {
    let resumed = format!("RWSEQ resume after {k}");
    vm.wait_console_until(Duration::from_mins(3), |c| {
        c.lines().any(|l| l.trim() == resumed)
    })
    .unwrap_or_else(|tail| {
        panic!("the guest did not print {resumed:?}; console ends with:\n{tail}")
    });
}

#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn checkpoint_restore_and_undo_from_the_window_with_a_real_guest() {
    use rewind_tests::{DiskSpec, Format, TestVm, daemon};
    rewind_tests::setup().unwrap();
    let mut vm = TestVm::builder("gui-restore")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(Duration::from_mins(3))
        .expect("boot");
    vm.wait_flushed(3, Duration::from_mins(2)).unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-restore-state").unwrap();
    let store_dir = dir.path().join("store");
    let (store, config) = protecting(&store_dir, "usb", &vm);
    let config = Config {
        // The tiny guest ignores the power button: turn it off after 2 s.
        shutdown_timeout_secs: 2,
        ..config
    };
    config.save(&dir.path().join("config.ron")).unwrap();
    let vm_uuid: uuid::Uuid = vm.uuid.parse().unwrap();

    let mut h = app_harness(daemon::URI, dir.path());
    checkpoint_from_the_window(&mut h, &vm.name);
    let first = store.catalog().unwrap().checkpoints;
    assert_eq!(first.len(), 1);
    let k = last_record(&store, &vm_uuid, &first[0].id);
    // The guest goes on writing: what the restore must take back.
    vm.wait_flushed(k + 5, Duration::from_mins(2)).unwrap();

    h.get_all_by_label_contains("Checkpoint 20")
        .next()
        .unwrap()
        .click();
    click_when_ready(&mut h, "⟲ Restore…", Duration::from_secs(10));
    let question = format!("Restore {}?", vm.name);
    wait_for(
        &mut h,
        "the restore question",
        Duration::from_secs(5),
        |h| h.query_by_label(&question).is_some(),
    );
    h.get_by_label_contains("safety checkpoint in usb");
    click_when_ready(&mut h, "Restore", Duration::from_secs(10));
    let mut saw_progress = false;
    wait_for(
        &mut h,
        "the restore to complete",
        Duration::from_mins(4),
        |h| {
            saw_progress |= h.query_by_label("Restoring").is_some();
            h.query_by_label("Restore complete").is_some()
                || h.query_by_label("The restore did not complete").is_some()
        },
    );
    assert!(
        h.query_by_label("Restore complete").is_some(),
        "the restore failed: {:?}",
        h.state().state.jobs
    );
    assert!(saw_progress, "the restore window showed its progress");
    // The guest carried on from the checkpoint.
    wait_resumed_after(&vm, k);
    let safety = h
        .state()
        .state
        .jobs
        .iter()
        .find_map(|j| match &j.result {
            Some(Ok(JobOutput::Restored(r))) => r.safety_checkpoint.clone(),
            _ => None,
        })
        .expect("a safety checkpoint was taken");
    let k_safety = last_record(&store, &vm_uuid, &safety);
    assert!(
        k_safety >= k + 5,
        "the safety checkpoint holds what the guest wrote after ({k_safety} vs {k})"
    );

    // Undo: back to the state from just before the restore. (A few frames first: the
    // result window may still be finding its size and place.)
    settle(&mut h);
    h.get_by_label("Undo restore").click();
    let mut saw_undo = false;
    let deadline = Instant::now() + Duration::from_mins(4);
    loop {
        h.step();
        saw_undo |= h.query_by_label("Undoing the restore").is_some();
        let finished_restores = h
            .state()
            .state
            .jobs
            .iter()
            .filter(|j| j.is_restore() && !j.running())
            .count();
        if finished_restores == 2
            && (h.query_by_label("Restore undone").is_some()
                || h.query_by_label("The restore did not complete").is_some())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the undo; jobs: {:#?}",
            h.state()
                .state
                .jobs
                .iter()
                .map(|j| (
                    &j.label,
                    j.phase,
                    j.result.as_ref().map(|r| r.as_ref().map(|_| ()))
                ))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        h.query_by_label("Restore undone").is_some(),
        "the undo failed: {:?}",
        h.state().state.jobs
    );
    assert!(saw_undo, "the undo showed its own window");
    wait_resumed_after(&vm, k_safety);
    settle(&mut h);
    h.get_by_label("Close").click();
    h.step();
    assert!(h.state().state.restore_job.is_none());
}

/// A scheduled boot-check in the history reads as one in the activity panel (not as a
/// checkpoint taken): whether the copy booted, or why the check could not be done.
#[test]
fn scheduled_boot_checks_read_as_such_in_the_activity_panel() {
    let mut state = fixture();
    let mut history = (*state.history).clone();
    let mut failed = history[0].clone();
    failed.trigger = Why::BootCheck;
    failed.outcome = Outcome::Failed;
    failed.new_bytes = 0;
    failed.checkpoint = Some("20261201T060300Z".into());
    failed.error = Some("the screen showed a blue screen".into());
    let mut not_done = failed.clone();
    not_done.error = Some(format!(
        "{}the store is not there",
        rewind_core::scheduler::boot_checks::NOT_DONE
    ));
    let mut booted = failed.clone();
    booted.outcome = Outcome::Ok;
    booted.error = None;
    history.extend([failed, not_done, booted]);
    state.history = Arc::new(history);
    let mut h = harness(state);
    h.run();
    h.get_by_label(
        "boot-check of 20261201T060300Z in BACKUP: did not boot: the screen showed a blue screen",
    );
    h.get_by_label(
        "boot-check of 20261201T060300Z in BACKUP could not be done: the store is not there",
    );
    h.get_by_label("boot-check of 20261201T060300Z in BACKUP: booted");
    assert_eq!(
        h.query_all_by_label_contains("checkpoint taken").count(),
        1,
        "only the checkpoint's record says a checkpoint was taken"
    );
}

/// A checkpoint is boot-checked from its details against the real engine: the job shows in
/// the activity panel, then the timeline marks the checkpoint as booting, its hover says so
/// with the copy's screen, whose texture was made, and the result is kept in the engine's
/// state folder.
#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn a_checkpoint_is_boot_checked_from_its_details_and_marked_on_the_timeline() {
    use rewind_tests::{DiskSpec, Format, TestVm, daemon};
    rewind_tests::setup().unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-bootcheck").unwrap();
    let vm = TestVm::builder("gui-bootcheck")
        .guest_agent()
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    let (_store, config) = protecting(&dir.path().join("store"), "usb", &vm);
    config.save(&dir.path().join("config.ron")).unwrap();
    let mut h = app_harness(daemon::URI, dir.path());
    checkpoint_from_the_window(&mut h, &vm.name);
    h.get_all_by_label_contains("Checkpoint 20")
        .next()
        .unwrap()
        .click();
    wait_for(
        &mut h,
        "the checkpoint's details",
        Duration::from_secs(10),
        |h| h.query_by_label("Check that it boots").is_some(),
    );
    h.get_by_label("not checked yet");
    click_when_ready(&mut h, "Check that it boots", Duration::from_secs(10));
    // Its progress and Cancel are in the activity panel.
    wait_for(
        &mut h,
        "the boot-check running",
        Duration::from_secs(20),
        |h| {
            h.query_by_label("being checked now (see Activity)")
                .is_some()
                && h.query_by_label_contains("Boot-check of ").is_some()
        },
    );
    h.get_by_label("Cancel");
    wait_for(
        &mut h,
        "the checkpoint marked as booting",
        Duration::from_mins(5),
        |h| {
            h.query_by_label_contains("(boots)").is_some()
                || h.query_by_label_contains("(did not boot)").is_some()
                || h.query_by_label_contains("Boot-check of ")
                    .is_some_and(|_| {
                        h.state()
                            .state
                            .jobs
                            .iter()
                            .any(|j| matches!(j.result, Some(Err(_))))
                    })
        },
    );
    let (key, summary) = {
        let state = &h.state().state;
        let key = state
            .checkpoint
            .clone()
            .expect("the checkpoint stays selected");
        let c = state.summary(&key).unwrap().clone();
        (key, c)
    };
    let job = h.state().state.jobs.last().unwrap();
    assert!(
        matches!(job.result, Some(Ok(JobOutput::BootChecked { .. }))),
        "{:?}",
        job.result
    );
    let b = summary
        .boot_check
        .clone()
        .unwrap_or_else(|| panic!("no boot-check in {summary:?}"));
    assert!(b.booted, "{b:?}");
    assert!(b.thumbnail_png.is_some(), "no thumbnail");
    h.get_by_label_contains("(boots)");
    // The details say so, with the copy's screen.
    let said = super::bootcheck::outcome_text(&b);
    assert!(said.starts_with("Booted — checked 20"), "{said}");
    h.get_by_label(&said);
    h.get_by_label("The last screen of the boot-check's throwaway copy");
    // The throwaway copy is gone from the VM list too (which may come after the job's end:
    // the engine lists the VMs off its loop), so the list keeps its place.
    wait_for(
        &mut h,
        "the copy gone from the VM list",
        Duration::from_secs(20),
        |h| {
            h.state()
                .state
                .vms
                .iter()
                .flatten()
                .all(|v| !v.name.contains("(boot-check"))
        },
    );
    settle(&mut h);
    // Hovering the marker says the same, with the screen again.
    h.get_by_label_contains("(boots)").hover();
    wait_for(&mut h, "the marker's hover", Duration::from_secs(20), |h| {
        h.query_all_by_label(&said).count() >= 2
    });
    assert!(
        h.query_all_by_label("The last screen of the boot-check's throwaway copy")
            .count()
            >= 2
    );
    let name = super::bootcheck::texture_name(&key.vm_uuid, &key.id);
    assert!(
        h.ctx
            .tex_manager()
            .read()
            .allocated()
            .any(|(_, meta)| meta.name == name && meta.size[0] <= 320 && meta.size[1] <= 320),
        "no texture {name}"
    );
    // Kept in the engine's state folder, where its next look at the store reads it again.
    let kept = rewind_core::bootcheck::last_check(dir.path(), &key.vm_uuid, &key.id).unwrap();
    assert!(kept.booted() && kept.thumbnail);
    assert!(rewind_core::bootcheck::thumbnail_path(dir.path(), &key.vm_uuid, &key.id).is_some());
    // The engine's own look at the destinations brings the same from there.
    {
        let state = &mut h.state_mut().state;
        for c in Arc::make_mut(state.destinations.as_mut().unwrap())
            .iter_mut()
            .flat_map(|d| &mut d.checkpoints)
        {
            c.boot_check = None;
        }
    }
    assert!(
        h.state()
            .engine
            .send(rewind_core::engine::Command::RefreshCheckpoints)
    );
    wait_for(
        &mut h,
        "the engine's look at the store",
        Duration::from_secs(30),
        |h| {
            h.state()
                .state
                .summary(&key)
                .is_some_and(|c| c.boot_check.as_ref() == Some(&b))
        },
    );
}

/// The window's sources: every symbol they draw needs a glyph in the built-in fonts (a
/// missing one draws as a box).
/// Empties a (shut-off) test VM's console log, so that what follows is its next start's.
fn clear_console(vm: &rewind_tests::TestVm) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(vm.dir().join("console.log"))
        .and_then(|f| f.set_len(0))
        .unwrap();
}

/// Presses "Run from this checkpoint" (once the window sees the VM shut off) and waits
/// until the VM runs from the checkpoint and the banner says so; returns the banner's words.
fn run_from_the_window(h: &mut Harness<'_, RewindApp>, vm_uuid: uuid::Uuid) -> String {
    wait_for(
        h,
        "Run from this checkpoint enabled (the VM seen shut off)",
        Duration::from_secs(30),
        |h| {
            h.query_by_label(super::runfrom::RUN_BUTTON)
                .is_some_and(|b| !b.accesskit_node().is_disabled())
        },
    );
    click_when_ready(h, super::runfrom::RUN_BUTTON, Duration::from_secs(5));
    // Its progress and Cancel are in the activity panel, as any job's.
    wait_for(
        h,
        "the run in the activity panel",
        Duration::from_secs(20),
        |h| {
            // The button's words and the job's.
            h.query_all_by_label_contains("Run from ").count() >= 2
                || h.state().state.runs.contains_key(&vm_uuid)
        },
    );
    wait_for(
        h,
        "the VM running from its checkpoint",
        Duration::from_mins(2),
        |h| {
            h.state().state.runs.contains_key(&vm_uuid)
                || h.state()
                    .state
                    .jobs
                    .iter()
                    .any(|j| matches!(j.result, Some(Err(_))))
        },
    );
    let run = h
        .state()
        .state
        .runs
        .get(&vm_uuid)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the run failed: {:?}",
                h.state().state.jobs.last().unwrap().result
            )
        });
    let said = super::runfrom::banner_text(&run);
    assert!(
        said.starts_with("Running from checkpoint 20")
            && said.ends_with("— its own disks are untouched"),
        "{said}"
    );
    wait_for(h, "the banner", Duration::from_secs(10), |h| {
        h.query_by_label(&said).is_some()
    });
    h.get_by_label(super::runfrom::KEEP_BUTTON);
    h.get_by_label(super::runfrom::DISCARD_BUTTON);
    // The VM list says so under the VM too.
    h.get_by_label(super::runfrom::LIST_NOTE);
    // While it runs so, it cannot be started from a checkpoint again.
    assert!(
        h.get_by_label(super::runfrom::RUN_BUTTON)
            .accesskit_node()
            .is_disabled()
    );
    said
}

/// A VM runs from its checkpoint from the window against the real engine and a real guest:
/// the banner says so, Discard (confirmed) turns it off with its disk file byte for byte as
/// before; run again and kept, it goes on running on a new disk file holding its writes.
#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn a_vm_runs_from_its_checkpoint_from_the_window_and_is_discarded_or_kept() {
    use rewind_tests::{DiskSpec, Format, TestVm, daemon};
    rewind_tests::setup().unwrap();
    let mut vm = TestVm::builder("gui-run")
        .workload("sequence")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 32 << 20)])
        .define()
        .expect("define the test VM");
    vm.start_and_wait_ready(Duration::from_mins(3))
        .expect("boot");
    vm.wait_flushed(3, Duration::from_mins(2)).unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-run-state").unwrap();
    let (store, config) = protecting(&dir.path().join("store"), "usb", &vm);
    config.save(&dir.path().join("config.ron")).unwrap();
    let vm_uuid: uuid::Uuid = vm.uuid.parse().unwrap();

    let mut h = app_harness(daemon::URI, dir.path());
    checkpoint_from_the_window(&mut h, &vm.name);
    let first = store.catalog().unwrap().checkpoints;
    assert_eq!(first.len(), 1);
    let k = last_record(&store, &vm_uuid, &first[0].id);
    // The VM goes on past the checkpoint, then stops: its disk is what a run must not touch.
    vm.wait_flushed(k + 5, Duration::from_mins(2)).unwrap();
    vm.destroy().unwrap();
    let disk = vm.disk("vda").path.clone();
    let before = std::fs::read(&disk).unwrap();
    h.get_all_by_label_contains("Checkpoint 20")
        .next()
        .unwrap()
        .click();
    h.step();

    // Run, then discard: it carries on from the checkpoint, then is as it was.
    clear_console(&vm);
    let said = run_from_the_window(&mut h, vm_uuid);
    // A window opened after the run started (its engine is in the process that serves the
    // run, as the service's clients are) is told of it: the same banner, Keep and Discard.
    {
        let mut later = app_harness(daemon::URI, dir.path());
        later.state_mut().state.selected = Some(vm.uuid.clone());
        wait_for(
            &mut later,
            "the banner in a window opened later",
            Duration::from_mins(1),
            |h| h.query_by_label(&said).is_some(),
        );
        later.get_by_label(super::runfrom::KEEP_BUTTON);
        later.get_by_label(super::runfrom::DISCARD_BUTTON);
    }
    wait_resumed_after(&vm, k);
    vm.wait_flushed(k + 3, Duration::from_mins(2)).unwrap();
    click_when_ready(
        &mut h,
        super::runfrom::DISCARD_BUTTON,
        Duration::from_secs(30),
    );
    wait_for(
        &mut h,
        "the question before discarding",
        Duration::from_secs(5),
        |h| {
            h.query_by_label("Discard the run from the checkpoint?")
                .is_some()
        },
    );
    click_when_ready(
        &mut h,
        super::runfrom::CONFIRM_DISCARD_BUTTON,
        Duration::from_secs(5),
    );
    wait_for(&mut h, "the run discarded", Duration::from_mins(2), |h| {
        h.state().state.jobs.iter().any(|j| {
            matches!(
                (&*j.request, &j.result),
                (
                    rewind_core::engine::jobs::JobRequest::DiscardRun { .. },
                    Some(_)
                )
            )
        })
    });
    h.step();
    assert!(
        h.state()
            .state
            .jobs
            .iter()
            .any(|j| matches!(j.result, Some(Ok(JobOutput::RunDiscarded)))),
        "{:?}",
        h.state().state.jobs.last().unwrap().result
    );
    assert!(h.query_by_label(&said).is_none(), "the banner stays");
    assert!(h.query_by_label(super::runfrom::LIST_NOTE).is_none());
    assert!(!vm.domain().is_active().unwrap());
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a discarded run changed the VM's disk file"
    );

    // Run again, then keep: copied while it runs (in the activity panel), then on a new file.
    clear_console(&vm);
    let said = run_from_the_window(&mut h, vm_uuid);
    wait_resumed_after(&vm, k);
    vm.wait_flushed(k + 3, Duration::from_mins(2)).unwrap();
    click_when_ready(&mut h, super::runfrom::KEEP_BUTTON, Duration::from_secs(30));
    wait_for(&mut h, "the run kept", Duration::from_mins(3), |h| {
        h.state().state.jobs.iter().any(|j| {
            matches!(
                (&*j.request, &j.result),
                (
                    rewind_core::engine::jobs::JobRequest::KeepRun { .. },
                    Some(_)
                )
            )
        })
    });
    h.step();
    let kept = h
        .state()
        .state
        .jobs
        .iter()
        .find_map(|j| match &j.result {
            Some(Ok(JobOutput::RunKept(files))) => Some(files.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:?}", h.state().state.jobs.last().unwrap().result));
    assert!(h.query_by_label(&said).is_none(), "the banner stays");
    assert_eq!(kept.len(), 1);
    let new_file = &kept[0];
    assert_ne!(new_file, &disk);
    assert!(
        vm.domain().is_active().unwrap(),
        "the VM stopped while kept"
    );
    let defined = Hypervisor::connect(daemon::URI)
        .unwrap()
        .persistent_xml(&vm.name)
        .unwrap();
    assert!(
        defined.contains(&*new_file.to_string_lossy()) && !defined.contains("nbd"),
        "{defined}"
    );
    let n = vm.last_flushed_record();
    vm.wait_flushed(n + 3, Duration::from_mins(2)).unwrap();
    vm.destroy().unwrap();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "keeping the run changed the old disk file"
    );
    let scan = rewind_tests::workload::scan_sequence_file(new_file, "qcow2").unwrap();
    assert!(scan.is_consistent_prefix(), "{:?}", scan.problems);
    assert!(scan.last_valid >= n + 3, "{} < {}", scan.last_valid, n + 3);
}

const SOURCES: [&str; 13] = [
    include_str!("mod.rs"),
    include_str!("vm_list.rs"),
    include_str!("details.rs"),
    include_str!("bootcheck.rs"),
    include_str!("runfrom.rs"),
    include_str!("activity.rs"),
    include_str!("timeline.rs"),
    include_str!("dialogs/mod.rs"),
    include_str!("dialogs/restore.rs"),
    include_str!("dialogs/progress.rs"),
    include_str!("settings.rs"),
    include_str!("setup.rs"),
    include_str!("state.rs"),
];

#[test]
fn every_symbol_the_window_uses_has_a_glyph() {
    let mut used: Vec<char> = SOURCES
        .iter()
        .flat_map(|s| s.chars())
        .filter(|c| !c.is_ascii())
        .collect();
    used.sort_unstable();
    used.dedup();
    let missing = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let found = missing.clone();
    let mut h = Harness::new_ui(move |ui| {
        let mut m = found.lock().unwrap();
        m.clear();
        for &c in &used {
            if !ui
                .ctx()
                .fonts_mut(|f| f.has_glyph(&egui::FontId::proportional(12.0), c))
            {
                m.push(c);
            }
        }
    });
    h.step();
    assert!(
        missing.lock().unwrap().is_empty(),
        "no glyph for {:?}",
        missing.lock().unwrap()
    );
}

/// A VM `name` whose second disk (of `mib` MiB) holds the disk image `raw`, protected into
/// a new store "usb" in `dir`; the window on the real engine; a checkpoint taken from it;
/// and the Files window of that checkpoint open on its volume "linux".
fn files_window_of_a_new_checkpoint(
    name: &str,
    dir: &Path,
    raw: &Path,
    mib: u64,
) -> (rewind_tests::TestVm, Store, Harness<'static, RewindApp>) {
    use rewind_tests::{DiskSpec, Format, TestVm, daemon};
    let vm = TestVm::builder(name)
        .disks(vec![
            DiskSpec::new("vda", Format::Qcow2, 32 << 20),
            DiskSpec::new("vdb", Format::Qcow2, mib << 20),
        ])
        .define()
        .expect("define the test VM");
    vm.fill_disk("vdb", raw).unwrap();
    let (store, config) = protecting(&dir.join("store"), "usb", &vm);
    config.save(&dir.join("config.ron")).unwrap();

    let mut h = app_harness(daemon::URI, dir);
    checkpoint_from_the_window(&mut h, &vm.name);
    h.get_all_by_label_contains("Checkpoint 20")
        .next()
        .unwrap()
        .click();
    click_when_ready(&mut h, "Browse files…", Duration::from_secs(10));
    // The volumes, read by the engine from the store.
    wait_for(&mut h, "the volumes", Duration::from_secs(30), |h| {
        h.query_by_label_contains("linux — ").is_some()
    });
    settle(&mut h);
    h.get_by_label_contains("linux — ").click();
    (vm, store, h)
}

/// Ticks `name` in the Files window, the only item ticked, and restores it into the new
/// folder `out`, given as the folder dialog gives it; returns `out`.
fn restore_alone(h: &mut Harness<'_, RewindApp>, name: &str, out: &Path) -> std::path::PathBuf {
    h.get_by_label(&format!("Restore {name}")).click();
    wait_for(h, "the item ticked", Duration::from_secs(5), |h| {
        h.query_by_label("1 item ticked").is_some()
    });
    std::fs::create_dir(out).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send(Some(out.to_path_buf())).unwrap();
    h.state_mut().state.files.as_mut().unwrap().picking = Some(rx);
    out.to_path_buf()
}

#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn a_file_is_found_previewed_and_restored_from_the_files_window_with_the_real_engine() {
    rewind_tests::setup().unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-files").unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("docs/old")).unwrap();
    std::fs::write(
        src.join("docs/thesis.txt"),
        "Chapter 1\nIt was a dark night.\n",
    )
    .unwrap();
    std::fs::write(src.join("docs/old/draft.txt"), "first draft").unwrap();
    image::RgbImage::from_fn(800, 600, |x, y| {
        image::Rgb([x.to_le_bytes()[0], y.to_le_bytes()[0], 128])
    })
    .save(src.join("docs/photo.png"))
    .unwrap();
    let thesis_time = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    std::fs::File::options()
        .write(true)
        .open(src.join("docs/thesis.txt"))
        .unwrap()
        .set_modified(thesis_time)
        .unwrap();
    let raw = rewind_tests::disks::ext4_gpt(dir.path(), &src, 40);
    let (vm, _store, mut h) = files_window_of_a_new_checkpoint("gui-files", dir.path(), &raw, 40);
    wait_for(
        &mut h,
        "the volume's folders",
        Duration::from_secs(30),
        |h| h.query_all_by_label("📁 docs").next().is_some(),
    );
    settle(&mut h);
    h.get_all_by_label("📁 docs").last().unwrap().click();
    wait_for(&mut h, "the folder's files", Duration::from_secs(30), |h| {
        h.query_all_by_label("thesis.txt").next().is_some()
    });

    // A search finds the draft below.
    settle(&mut h);
    h.get_by_label("Search").focus();
    let field = h.get_by(|n| n.role() == Role::TextInput);
    field.focus();
    field.type_text("DRAFT");
    h.step();
    h.get_by_label("Search").click();
    wait_for(
        &mut h,
        "the search's result",
        Duration::from_secs(30),
        |h| h.query_by_label_contains("1 found for").is_some(),
    );
    h.get_by_label("vdb/p1/docs/old/draft.txt");
    settle(&mut h);
    h.get_all_by_label("📁 docs").next().unwrap().click();
    wait_for(&mut h, "the folder again", Duration::from_secs(10), |h| {
        h.query_all_by_label("thesis.txt").next().is_some()
    });

    // The preview shows the text.
    settle(&mut h);
    h.get_by_label("thesis.txt").click();
    wait_for(&mut h, "the preview", Duration::from_secs(30), |h| {
        h.query_by_label_contains("It was a dark night.").is_some()
    });

    // A picture shows as a thumbnail, made by the engine (at most 320 pixels a side).
    settle(&mut h);
    h.get_by_label("photo.png").click();
    wait_for(&mut h, "the thumbnail", Duration::from_secs(30), |h| {
        h.state()
            .state
            .files
            .as_ref()
            .is_some_and(|f| f.thumbnail.is_some())
    });
    let size = h
        .state()
        .state
        .files
        .as_ref()
        .unwrap()
        .thumbnail
        .as_ref()
        .unwrap()
        .size();
    assert_eq!(size, [320, 240]);
    settle(&mut h);
    h.get_by_label("thesis.txt").click();
    wait_for(&mut h, "the text again", Duration::from_secs(30), |h| {
        h.query_by_label_contains("It was a dark night.").is_some()
    });

    // Tick it and restore it into a folder (given as the folder dialog gives it).
    settle(&mut h);
    let out = restore_alone(&mut h, "thesis.txt", &dir.path().join("restored"));
    wait_for(&mut h, "the restored file", Duration::from_mins(1), |h| {
        h.state()
            .state
            .jobs
            .iter()
            .any(|j| !j.running() && matches!(j.result, Some(Ok(JobOutput::FilesRestored(_)))))
            || h.state()
                .state
                .jobs
                .iter()
                .any(|j| matches!(j.result, Some(Err(_))))
    });
    assert_eq!(
        std::fs::read_to_string(out.join("thesis.txt")).unwrap(),
        "Chapter 1\nIt was a dark night.\n"
    );
    assert_eq!(
        std::fs::metadata(out.join("thesis.txt"))
            .unwrap()
            .modified()
            .unwrap(),
        thesis_time
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "only the file");

    // A second checkpoint after the thesis changed and the old drafts went: "Changed since
    // the previous checkpoint" shows those, and not the picture.
    std::fs::write(
        src.join("docs/thesis.txt"),
        "Chapter 1\nIt was a bright day.\n",
    )
    .unwrap();
    std::fs::remove_dir_all(src.join("docs/old")).unwrap();
    vm.fill_disk("vdb", &rewind_tests::disks::ext4_gpt(dir.path(), &src, 40))
        .unwrap();
    h.state_mut().state.files = None;
    click_when_ready(&mut h, "Checkpoint now", Duration::from_secs(30));
    let vm_uuid: uuid::Uuid = vm.uuid.parse().unwrap();
    let newest = |h: &Harness<'_, RewindApp>| {
        h.state()
            .state
            .destinations
            .as_ref()
            .and_then(|d| {
                let of_vm: Vec<_> = d[0]
                    .checkpoints
                    .iter()
                    .filter(|c| c.vm_uuid == vm_uuid)
                    .collect();
                (of_vm.len() == 2).then(|| {
                    of_vm
                        .iter()
                        .map(|c| CheckpointKey::of("usb", c))
                        .max_by(|a, b| a.id.cmp(&b.id))
                })
            })
            .flatten()
    };
    wait_for(
        &mut h,
        "the second checkpoint",
        Duration::from_mins(3),
        |h| newest(h).is_some(),
    );
    let key = newest(&h).unwrap();
    h.state_mut().state.checkpoint = Some(key);
    click_when_ready(&mut h, "Browse files…", Duration::from_secs(10));
    wait_for(&mut h, "the volumes again", Duration::from_secs(30), |h| {
        h.query_by_label_contains("linux — ").is_some()
    });
    settle(&mut h);
    h.get_by_label_contains("linux — ").click();
    wait_for(&mut h, "the folders again", Duration::from_secs(30), |h| {
        h.query_all_by_label("📁 docs").next().is_some()
    });
    settle(&mut h);
    h.get_all_by_label("📁 docs").last().unwrap().click();
    wait_for(&mut h, "the files again", Duration::from_secs(30), |h| {
        h.query_all_by_label("photo.png").next().is_some()
    });
    settle(&mut h);
    h.get_by_label("Changed since the previous checkpoint")
        .click();
    wait_for(&mut h, "the changes", Duration::from_secs(30), |h| {
        h.query_by_label("thesis.txt (changed)").is_some()
    });
    h.get_by_label("📁 old (deleted since)");
    assert!(
        h.query_all_by_label("photo.png").next().is_none(),
        "an unchanged file is shown among the changes"
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn a_file_restore_cancelled_in_the_activity_panel_leaves_the_folder_as_it_was() {
    use rewind_core::engine::jobs::JobRequest;
    rewind_tests::setup().unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-files-cancel").unwrap();
    // A folder that takes a while to restore: 16,000 files of 24 KiB of noise in 160
    // folders (375 MiB), every chunk of it fetched from the store, decrypted, decompressed
    // and written, and every file made, filled and dated; noise, so that it neither
    // compresses nor repeats. (With 6,400 files the restore once ended before the Cancel
    // click landed on a loaded machine, after the read-ahead made it faster.)
    let src = dir.path().join("src");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for d in 0..160 {
        let folder = src.join(format!("big/part {d}"));
        std::fs::create_dir_all(&folder).unwrap();
        for f in 0..100 {
            let bytes: Vec<u8> = (0..24 * 1024 / 8)
                .flat_map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed.to_le_bytes()
                })
                .collect();
            std::fs::write(folder.join(format!("{f}.bin")), bytes).unwrap();
        }
    }
    let raw = rewind_tests::disks::ext4_gpt(dir.path(), &src, 480);
    let (_vm, _store, mut h) =
        files_window_of_a_new_checkpoint("gui-files-cancel", dir.path(), &raw, 480);
    wait_for(&mut h, "the big folder", Duration::from_secs(30), |h| {
        h.query_by_label("Restore big").is_some()
    });
    settle(&mut h);
    let out = restore_alone(&mut h, "big", &dir.path().join("restored"));
    h.step();
    // The Files window closes, so that it covers nothing of the activity panel.
    h.state_mut().state.files = None;

    // Cancelled mid-copy: bytes written, into the temporary folder in the target.
    let restoring = |h: &Harness<'_, RewindApp>| {
        h.state()
            .state
            .jobs
            .iter()
            .find(|j| matches!(*j.request, JobRequest::RestoreFiles { .. }))
            .cloned()
    };
    wait_for(&mut h, "the restore to copy", Duration::from_mins(2), |h| {
        restoring(h).is_some_and(|j| {
            !j.running() || (j.done_bytes > 0 && std::fs::read_dir(&out).unwrap().count() > 0)
        })
    });
    let job = restoring(&h).unwrap();
    assert!(
        job.running() && job.done_bytes < job.total_bytes,
        "the restore ended before it could be cancelled: {:?}",
        job.result
    );
    h.get_by_label("Cancel").click();
    wait_for(&mut h, "the restore to end", Duration::from_mins(1), |h| {
        restoring(h).is_some_and(|j| !j.running())
    });
    let job = restoring(&h).unwrap();
    assert!(
        matches!(&job.result, Some(Err(e)) if e.kind == ErrorKind::Cancelled),
        "{:?}",
        job.result
    );
    settle(&mut h);
    h.get_by_label("cancelled");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in the target folder: {left:?}");
}

#[test]
fn a_files_data_streams_are_listed_below_it_and_ticked_previewed_and_restored_like_files() {
    use rewind_core::engine::Command;
    use rewind_core::engine::files::BrowseAsk;
    use rewind_core::engine::jobs::JobRequest;
    use rewind_core::files::{Entry, EntryKind, Stream};
    let mut state = fixture();
    let key = state.checkpoint.clone().unwrap();
    let folder = "p2/Users/me/Downloads";
    let report = Entry {
        name: "report.docx".into(),
        kind: EntryKind::File,
        size_bytes: 48_000,
        modified: None,
        id: Some(70),
        streams: vec![Stream {
            name: "Zone.Identifier".into(),
            size_bytes: 26,
        }],
    };
    let mut view = super::files::FilesView {
        key: Some(key.clone()),
        title: "win11".into(),
        volumes: Some(Ok(Vec::new())),
        folder: Some(folder.into()),
        ..super::files::FilesView::default()
    };
    view.listings.insert(folder.into(), Ok(vec![report]));
    state.files = Some(view);
    let mut h = commanding_harness(state);
    h.run();

    // The stream has its own row, below its file, with its own size.
    h.get_by_label("report.docx");
    h.get_by_label("26 B");
    h.get_by_label("report.docx:Zone.Identifier").click();
    // The preview's spinner turns until the engine answers: steps, not run().
    h.run_steps(3);
    let stream = format!("{folder}/report.docx:Zone.Identifier");
    assert!(
        h.state().1.iter().any(|c| matches!(c,
            Command::Browse { ask: BrowseAsk::Preview { path }, .. } if *path == stream)),
        "no preview asked of the stream: {:?}",
        h.state().1
    );

    // Ticked alone, it is what the restore asks for.
    h.get_by_label("Restore report.docx:Zone.Identifier")
        .click();
    h.run_steps(3);
    h.get_by_label("1 item ticked");
    let to = std::path::PathBuf::from("/home/me/Restored");
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send(Some(to.clone())).unwrap();
    h.state_mut().0.files.as_mut().unwrap().picking = Some(rx);
    h.run_steps(3);
    let asked: Vec<(&str, &[String], &Path)> = h
        .state()
        .1
        .iter()
        .filter_map(|c| match c {
            Command::Start(JobRequest::RestoreFiles {
                checkpoint,
                paths,
                to,
                ..
            }) => Some((checkpoint.as_str(), paths.as_slice(), to.as_path())),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        [(key.id.as_str(), [stream].as_slice(), to.as_path())]
    );
}

/// Removes the libvirt domain called `name` (and what libvirt keeps for it) when dropped.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        if let Err(e) = rewind_tests::domain::remove_named(&self.0) {
            eprintln!("warning: could not remove VM {:?}: {e}", self.0);
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one user story, step by step
fn a_vm_gone_from_this_host_is_restored_as_new_from_a_backup_opened_in_the_window() {
    use rewind_tests::{DiskSpec, Format, TestVm, daemon};
    rewind_tests::setup().unwrap();
    let dir = rewind_tests::scratch::ScratchDir::new("gui-drive-only").unwrap();
    // A VM whose disk holds known bytes; its checkpoint in a store; then the VM is gone.
    let vm = TestVm::builder("gui-gone")
        .disks(vec![DiskSpec::new("vda", Format::Qcow2, 8 << 20)])
        .define()
        .expect("define the test VM");
    let content: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i / 4096).to_le_bytes()[0] ^ (i % 251).to_le_bytes()[0])
        .collect();
    let raw = dir.path().join("content.raw");
    std::fs::write(&raw, &content).unwrap();
    vm.fill_disk("vda", &raw).unwrap();
    let old_host = dir.path().join("old-host");
    std::fs::create_dir(&old_host).unwrap();
    let store_dir = dir.path().join("BACKUP/rewind");
    protecting(&store_dir, "old", &vm)
        .1
        .save(&old_host.join("config.ron"))
        .unwrap();
    checkpoint_from_the_window(&mut app_harness(daemon::URI, &old_host), &vm.name);
    rewind_tests::domain::remove_domain(vm.domain()).unwrap();
    let name = vm.name.clone();
    let copy_name = format!("{name} again");
    let _copy = DomainGuard(copy_name.clone());

    // This host's window: no destination yet. The backup is opened from the settings (what
    // "Open a backup…" leads to once its folder dialog answers).
    let new_host = dir.path().join("new-host");
    std::fs::create_dir(&new_host).unwrap();
    Config {
        uri: daemon::URI.into(),
        ..Config::default()
    }
    .save(&new_host.join("config.ron"))
    .unwrap();
    let mut h = app_harness(daemon::URI, &new_host);
    wait_for(&mut h, "the window", Duration::from_secs(30), |h| {
        h.query_by_label("Open a backup…").is_some()
    });
    h.state_mut().state.setup_dismissed = true;
    assert!(
        h.query_all_by_label(&name).next().is_none(),
        "the VM is gone from this host"
    );
    let settings = super::settings::SettingsState::open(
        &h.state().state,
        super::settings::SettingsTab::Destinations,
    );
    h.state_mut().state.settings = Some(settings);
    settle(&mut h);
    h.get_by_label("Folder").focus();
    h.get_by_label("Folder")
        .type_text(&store_dir.display().to_string());
    h.step();
    h.get_by_label("Add destination").click();
    wait_for(
        &mut h,
        "the destination added",
        Duration::from_secs(30),
        |h| {
            h.state()
                .state
                .config
                .as_ref()
                .is_some_and(|c| c.destinations.len() == 1)
        },
    );
    h.state_mut().state.settings = None;

    // The VM shows among those only in backups, with its checkpoint.
    wait_for(
        &mut h,
        "the VM only in backups",
        Duration::from_secs(30),
        |h| {
            h.query_by_label("Only in backups").is_some()
                && h.query_all_by_label(&name).next().is_some()
        },
    );
    settle(&mut h);
    h.query_all_by_label(&name).next().unwrap().click();
    wait_for(&mut h, "its checkpoint", Duration::from_secs(10), |h| {
        h.query_all_by_label_contains("Checkpoint 20")
            .next()
            .is_some()
    });
    h.get_by_label_contains("not on this computer");
    h.get_all_by_label_contains("Checkpoint 20")
        .next()
        .unwrap()
        .click();
    click_when_ready(&mut h, "Restore as new VM…", Duration::from_secs(10));
    h.step();
    // The test guest boots a kernel from its own folder: a restore may read it there only
    // when that folder is where the copy goes (a checkpoint's paths are only hints).
    let disks = vm.dir().to_path_buf();
    if let Some(Dialog::RestoreAsNew {
        name: new_name,
        folder,
        ..
    }) = &mut h.state_mut().state.dialog
    {
        new_name.clone_from(&copy_name);
        *folder = disks.display().to_string();
    } else {
        panic!("the restore-as-new dialog is not open");
    }
    click_when_ready(&mut h, "Restore as new VM", Duration::from_secs(10));
    wait_for(&mut h, "the restore", Duration::from_mins(3), |h| {
        h.state()
            .state
            .jobs
            .iter()
            .any(|j| j.is_restore() && !j.running())
    });
    let result = h
        .state()
        .state
        .jobs
        .iter()
        .find(|j| j.is_restore())
        .and_then(|j| j.result.clone());
    assert!(
        matches!(result, Some(Ok(JobOutput::Restored(_)))),
        "{result:?}"
    );

    // The copy is defined here, and its disk holds what the VM's held.
    let hv = Hypervisor::connect(daemon::URI).unwrap();
    let copy = hv
        .list_vms()
        .unwrap()
        .into_iter()
        .find(|v| v.name == copy_name)
        .expect("the restored VM is defined");
    let disk = copy.disks.iter().find_map(|d| d.path()).unwrap().clone();
    assert!(disk.starts_with(&disks), "{}", disk.display());
    // The copy was started: stop it (and drop its definition) before reading its disk.
    assert!(rewind_tests::domain::remove_named(&copy_name).unwrap());
    let out = dir.path().join("check.raw");
    rewind_tests::package::run_ok(
        "qemu-img",
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&disk)
            .arg(&out),
    );
    assert!(
        std::fs::read(&out).unwrap() == content,
        "the restored disk differs"
    );
}
