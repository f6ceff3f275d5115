//! Running a VM from one of its checkpoints in the window: "Run from this checkpoint" in
//! the details, and while it runs so, the banner with Keep and Discard.
//!
//! The engine's jobs do the work ([`JobRequest::RunFromCheckpoint`], `KeepRun`,
//! `DiscardRun`); their progress and Cancel are in the activity panel. The window learns
//! that a VM runs from a checkpoint from the engine's list of the runs it serves
//! (`Event::Runs`, whoever started them: another window, the CLI, a protection service that
//! took them over after a restart), and at once from the `Running` output of a job it
//! started.

use chrono::{DateTime, Local, Utc};
use egui::RichText;
use rewind_core::engine::Command;
use rewind_core::engine::jobs::JobRequest;
use rewind_core::view::catalog::CheckpointSummary;
use rewind_core::vm::VmState;
use uuid::Uuid;

use super::Commands;
use super::dialogs::Dialog;
use super::state::{CheckpointKey, UiState};

/// The button's words.
pub const RUN_BUTTON: &str = "Run from this checkpoint";
/// The banner's Keep button.
pub const KEEP_BUTTON: &str = "Keep";
/// The banner's Discard button.
pub const DISCARD_BUTTON: &str = "Discard…";
/// What the VM list says under a VM that runs from a checkpoint.
pub const LIST_NOTE: &str = "running from a checkpoint";
/// The confirmation's Discard button.
pub const CONFIRM_DISCARD_BUTTON: &str = "Discard the run";

/// A VM that runs from a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunView {
    /// The VM's name.
    pub vm: String,
    /// The destination the checkpoint is in, when the window knew it.
    pub destination: Option<String>,
    /// The checkpoint's id.
    pub checkpoint: String,
    /// The checkpoint's time, when the window knew it.
    pub time: Option<DateTime<Utc>>,
}

/// The banner's words: "Running from checkpoint 2026-12-05 03:04 — its own disks are
/// untouched".
pub fn banner_text(run: &RunView) -> String {
    let when = run.time.map_or_else(
        || run.checkpoint.clone(),
        |t| t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string(),
    );
    format!("Running from checkpoint {when} — its own disks are untouched")
}

/// Whether a job about running VM `vm_uuid` from a checkpoint (start, keep or discard)
/// runs now.
pub fn job_running(state: &UiState, vm_uuid: &Uuid) -> bool {
    state.jobs.iter().any(|j| {
        j.running()
            && match &*j.request {
                JobRequest::RunFromCheckpoint { vm_uuid: v, .. }
                | JobRequest::KeepRun { vm_uuid: v }
                | JobRequest::DiscardRun { vm_uuid: v } => v == vm_uuid,
                _ => false,
            }
    })
}

/// Why checkpoint `c` cannot be started on this machine's libvirt now, if it cannot: it is
/// damaged, libvirt is not connected, or the connection is to another host (`what` says
/// what needs this machine). Shared by "Run from this checkpoint" and "Check that it
/// boots".
pub fn why_not_started_here(state: &UiState, c: &CheckpointSummary, what: &str) -> Option<String> {
    let uri = if state.uri.is_empty() {
        state.config.as_ref().map_or("", |c| c.uri.as_str())
    } else {
        state.uri.as_str()
    };
    if c.damaged {
        Some("This checkpoint is damaged: it cannot be started".into())
    } else if uri.is_empty() {
        Some("Not connected to libvirt yet".into())
    } else if !rewind_core::libvirt::is_local_uri(uri) {
        Some(format!("{what}; Rewind is connected to {uri}"))
    } else {
        None
    }
}

/// Why the VM cannot be run from `c` now, if it cannot.
pub fn why_not(state: &UiState, key: &CheckpointKey, c: &CheckpointSummary) -> Option<String> {
    let uuid = key.vm_uuid.to_string();
    let vm = state.vms.iter().flatten().find(|v| v.uuid == uuid);
    if let Some(why) = why_not_started_here(
        state,
        c,
        "A VM runs from a checkpoint served by this machine",
    ) {
        Some(why)
    } else if state.runs.contains_key(&key.vm_uuid) {
        Some("It runs from a checkpoint now: keep or discard that run first".into())
    } else if job_running(state, &key.vm_uuid) {
        Some("It is being started from a checkpoint now".into())
    } else if let Some(vm) = vm {
        (vm.state != VmState::ShutOff).then(|| {
            format!(
                "The VM is {}: shut it down first to run it from a checkpoint",
                vm.state.label()
            )
        })
    } else {
        Some("The VM is not defined on this computer: restore it instead".into())
    }
}

/// "Run from this checkpoint": starts the job (its progress and Cancel are in the activity
/// panel).
pub fn button_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    key: &CheckpointKey,
    c: &CheckpointSummary,
    commands: &mut Commands,
) {
    let why_not = why_not(state, key, c);
    let button = ui
        .add_enabled(why_not.is_none(), egui::Button::new(RUN_BUTTON))
        .on_hover_text(
            "Start the VM straight from this checkpoint, without copying it first; its own \
             disks are not touched. Keep the run (its disks are copied while it runs) or \
             discard it afterwards",
        );
    let button = match &why_not {
        Some(why) => button.on_disabled_hover_text(why),
        None => button,
    };
    if button.clicked() {
        commands.push(Command::Start(JobRequest::RunFromCheckpoint {
            destination: key.destination.clone(),
            vm_uuid: key.vm_uuid,
            checkpoint: key.id.clone(),
        }));
    }
}

/// The banner of a VM that runs from a checkpoint, with Keep and Discard (nothing when it
/// does not).
pub fn banner_ui(ui: &mut egui::Ui, state: &mut UiState, vm_uuid: Uuid, commands: &mut Commands) {
    let Some(run) = state.runs.get(&vm_uuid).cloned() else {
        return;
    };
    let busy = job_running(state, &vm_uuid);
    egui::Frame::group(ui.style())
        .fill(ui.visuals().warn_fg_color.gamma_multiply(0.15))
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.label(RichText::new(banner_text(&run)).strong());
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(!busy, egui::Button::new(KEEP_BUTTON))
                    .on_hover_text(
                        "Keep the VM as it runs now: its disks are copied to new files beside \
                         its own while it runs (see Activity), then it uses them",
                    )
                    .on_disabled_hover_text("Being kept or discarded now (see Activity)")
                    .clicked()
                {
                    commands.push(Command::Start(JobRequest::KeepRun { vm_uuid }));
                }
                if ui
                    .add_enabled(!busy, egui::Button::new(DISCARD_BUTTON))
                    .on_hover_text(
                        "Turn the VM off and drop what it wrote since; it is as before the run",
                    )
                    .on_disabled_hover_text("Being kept or discarded now (see Activity)")
                    .clicked()
                {
                    state.dialog = Some(Dialog::ConfirmDiscardRun { vm_uuid });
                }
            });
        });
    ui.add_space(6.0);
}

/// "Discard the run?": returns whether the dialog stays open.
pub fn confirm_discard_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    vm_uuid: Uuid,
    commands: &mut Commands,
) -> bool {
    let Some(run) = state.runs.get(&vm_uuid).cloned() else {
        return false;
    };
    let mut close = false;
    let modal = egui::Modal::new(egui::Id::unique("confirm_discard_run")).show(ui.ctx(), |ui| {
        ui.set_max_width(520.0);
        ui.heading("Discard the run from the checkpoint?");
        ui.add_space(6.0);
        ui.label(format!(
            "{} is turned off at once and everything it wrote since it started from the \
             checkpoint is lost. Its own disks were not touched: it is as before the run.",
            run.vm
        ));
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button(CONFIRM_DISCARD_BUTTON).clicked() {
                commands.push(Command::Start(JobRequest::DiscardRun { vm_uuid }));
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    !modal.should_close() && !close
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;
    use rewind_core::vm::{Firmware, GuestAgent, VmInfo};

    fn vm(uuid: Uuid, state: VmState) -> VmInfo {
        VmInfo {
            name: "web".into(),
            uuid: uuid.to_string(),
            state,
            persistent: true,
            autostart: false,
            vcpus: 1,
            memory_bytes: 1 << 30,
            max_memory_bytes: 1 << 30,
            hypervisor: "kvm".into(),
            machine: None,
            arch: None,
            firmware: Firmware::Bios,
            tpm: None,
            guest_agent: GuestAgent {
                channel: false,
                connected: false,
            },
            disks: Vec::new(),
        }
    }

    /// A VM runs from a checkpoint when it is defined here, shut off, on this machine's
    /// libvirt, and the checkpoint is whole; otherwise the button says why not.
    #[test]
    fn the_button_says_why_a_vm_cannot_run_from_a_checkpoint() {
        let c = super::super::timeline::tests::sample(Utc::now());
        let key = CheckpointKey::of("usb", &c);
        let mut state = UiState {
            uri: "qemu:///system".into(),
            vms: Some(vec![vm(c.vm_uuid, VmState::ShutOff)]),
            ..UiState::default()
        };
        assert_eq!(why_not(&state, &key, &c), None);
        state.vms = Some(vec![vm(c.vm_uuid, VmState::Running)]);
        assert_eq!(
            why_not(&state, &key, &c).as_deref(),
            Some("The VM is running: shut it down first to run it from a checkpoint")
        );
        state.vms = Some(vec![vm(Uuid::new_v4(), VmState::ShutOff)]);
        assert!(
            why_not(&state, &key, &c)
                .unwrap()
                .contains("not defined on this computer")
        );
        state.vms = Some(vec![vm(c.vm_uuid, VmState::ShutOff)]);
        state.uri = "qemu+ssh://me@host/system".into();
        let why = why_not(&state, &key, &c).unwrap();
        assert!(
            why.contains("this machine") && why.contains("host"),
            "{why}"
        );
        state.uri = String::new();
        assert_eq!(
            why_not(&state, &key, &c).as_deref(),
            Some("Not connected to libvirt yet")
        );
        state.uri = "qemu:///system".into();
        let mut damaged = c.clone();
        damaged.damaged = true;
        assert!(why_not(&state, &key, &damaged).unwrap().contains("damaged"));
        // While it starts, and once it runs from a checkpoint (until kept or discarded).
        let start = |job, request| rewind_core::engine::Event::JobStarted {
            job,
            label: "Run".into(),
            request: std::sync::Arc::new(request),
        };
        state.apply(start(
            1,
            JobRequest::RunFromCheckpoint {
                destination: "usb".into(),
                vm_uuid: c.vm_uuid,
                checkpoint: c.id.clone(),
            },
        ));
        assert_eq!(
            why_not(&state, &key, &c).as_deref(),
            Some("It is being started from a checkpoint now")
        );
        state.apply(rewind_core::engine::Event::JobFinished {
            job: 1,
            result: Ok(rewind_core::engine::jobs::JobOutput::Running {
                vm: "web".into(),
                checkpoint: c.id.clone(),
            }),
        });
        assert!(
            why_not(&state, &key, &c)
                .unwrap()
                .contains("keep or discard that run first")
        );
        assert_eq!(state.runs[&c.vm_uuid].checkpoint, c.id);
        state.apply(start(2, JobRequest::DiscardRun { vm_uuid: c.vm_uuid }));
        state.apply(rewind_core::engine::Event::JobFinished {
            job: 2,
            result: Ok(rewind_core::engine::jobs::JobOutput::RunDiscarded),
        });
        assert!(state.runs.is_empty());
        assert_eq!(why_not(&state, &key, &c), None);
    }

    /// The engine's list of the runs it serves is the window's, whoever started them: a
    /// run it lists has its banner (with the checkpoint's id when the window does not know
    /// its time), one it no longer lists has none; a run started here keeps the time the
    /// window knew, and one being kept stays until its job ends.
    #[test]
    fn the_engine_s_list_of_runs_is_the_window_s() {
        use rewind_core::engine::jobs::JobOutput;
        use rewind_core::engine::{Event, RunInfo};
        let web = Uuid::new_v4();
        let db = Uuid::new_v4();
        let info = |vm_uuid, vm: &str, checkpoint: &str| RunInfo {
            vm_uuid,
            vm: vm.into(),
            checkpoint: checkpoint.into(),
        };
        let mut state = UiState::default();
        state.apply(Event::Runs(vec![info(web, "web", "20261205-030400")]));
        let run = &state.runs[&web];
        assert_eq!(run.vm, "web");
        assert_eq!(
            banner_text(run),
            "Running from checkpoint 20261205-030400 — its own disks are untouched"
        );
        state.apply(Event::Runs(Vec::new()));
        assert!(state.runs.is_empty());

        // Started here: the window knew when its checkpoint was.
        let time = Utc.with_ymd_and_hms(2026, 12, 5, 3, 4, 0).unwrap();
        state.runs.insert(
            web,
            RunView {
                vm: "web".into(),
                destination: Some("usb".into()),
                checkpoint: "20261205-030400".into(),
                time: Some(time),
            },
        );
        state.apply(Event::Runs(vec![
            info(web, "web", "20261205-030400"),
            info(db, "db", "20261201-120000"),
        ]));
        assert_eq!(state.runs[&web].time, Some(time));
        assert_eq!(state.runs[&db].checkpoint, "20261201-120000");
        // While the window's Keep of web runs, the engine does not list web.
        state.apply(Event::JobStarted {
            job: 1,
            label: "Keep".into(),
            request: std::sync::Arc::new(JobRequest::KeepRun { vm_uuid: web }),
        });
        state.apply(Event::Runs(vec![info(db, "db", "20261201-120000")]));
        assert_eq!(state.runs[&web].time, Some(time));
        state.apply(Event::JobFinished {
            job: 1,
            result: Ok(JobOutput::RunKept(Vec::new())),
        });
        state.apply(Event::Runs(vec![info(db, "db", "20261201-120000")]));
        assert_eq!(state.runs.keys().collect::<Vec<_>>(), [&db]);
    }

    #[test]
    fn the_banner_says_when_the_checkpoint_was() {
        // The tests run with TZ=UTC.
        let run = RunView {
            vm: "web".into(),
            destination: Some("usb".into()),
            checkpoint: "20261205-030400".into(),
            time: Some(Utc.with_ymd_and_hms(2026, 12, 5, 3, 4, 0).unwrap()),
        };
        assert_eq!(
            banner_text(&run),
            "Running from checkpoint 2026-12-05 03:04 — its own disks are untouched"
        );
    }
}
