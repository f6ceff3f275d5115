//! Dialogs: the restore confirmation that says in plain words what will happen, the
//! restore's progress and result with "Undo restore", restore as a new VM, export, delete,
//! and the question asked on closing when no tray can keep Rewind running.

use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::Local;
use egui::RichText;
use rewind_core::engine::jobs::{JobError, JobOutput, JobRequest};
use rewind_core::engine::{Command, ResumeKey};
use rewind_core::progress::Phase;
use rewind_core::restore::{DiskStorage, ImageFormat, NewVm, RestoreOptions, RestoreReport};
use rewind_core::units::{human_age_secs, human_bytes};
use rewind_core::view::catalog::CheckpointSummary;
use rewind_core::vm::{VmInfo, VmState};

use super::Commands;
use super::state::{CheckpointKey, JobView, ResumeCheck, UiState};
use super::timeline::kind_text;

/// An open dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialog {
    /// "Restore win11 to …?"
    ConfirmRestore {
        /// The checkpoint.
        key: CheckpointKey,
        /// Keep the current state as a safety checkpoint first.
        safety: bool,
        /// Save the running session (memory too) into it instead of shutting the VM down.
        save_state: bool,
        /// Of a full-state checkpoint: put back the disks only and boot, not resume.
        disk_only: bool,
    },
    /// Restore as a new VM.
    RestoreAsNew {
        /// The checkpoint.
        key: CheckpointKey,
        /// The new VM's name.
        name: String,
        /// The folder for its disks.
        folder: String,
        /// Of a full-state checkpoint: put back the disks only and boot, not resume.
        disk_only: bool,
    },
    /// Write one disk to an image file.
    Export {
        /// The checkpoint.
        key: CheckpointKey,
        /// The disk's target.
        disk: String,
        /// The file to write.
        path: String,
        /// qcow2 (else raw).
        qcow2: bool,
    },
    /// "Delete this checkpoint?"
    ConfirmDelete {
        /// The checkpoint.
        key: CheckpointKey,
    },
    /// Closing without a tray: stop protecting?
    CloseWithoutTray,
}

fn when(c: &CheckpointSummary) -> String {
    c.time
        .with_timezone(&Local)
        .format("%A %-d %B %Y at %H:%M")
        .to_string()
}

/// Draws the open dialog (if any) and the restore window (while a restore runs or its
/// result is shown).
pub fn dialogs_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    if let Some(dialog) = state.dialog.clone() {
        let keep = match &dialog {
            Dialog::ConfirmRestore {
                key,
                safety,
                save_state,
                disk_only,
            } => confirm_restore_ui(
                ui,
                state,
                key,
                RestoreChoices {
                    safety: *safety,
                    save_state: *save_state,
                    disk_only: *disk_only,
                },
                commands,
            ),
            Dialog::RestoreAsNew {
                key,
                name,
                folder,
                disk_only,
            } => restore_as_new_ui(ui, state, key, (name, folder, *disk_only), commands),
            Dialog::Export {
                key,
                disk,
                path,
                qcow2,
            } => export_ui(ui, state, key, disk, path, *qcow2, commands),
            Dialog::ConfirmDelete { key } => confirm_delete_ui(ui, state, key, commands),
            Dialog::CloseWithoutTray => close_without_tray_ui(ui, state),
        };
        if !keep {
            state.dialog = None;
            // A later opening asks again: the store or the host may have changed.
            state.resume_checks.clear();
        }
    }
    if state.restore_job.is_some() {
        restore_window_ui(ui, state, commands);
    }
}

/// A modal with a title; returns false when closed with Escape or a click outside.
fn modal<R>(
    ui: &egui::Ui,
    id: &str,
    title: &str,
    add: impl FnOnce(&mut egui::Ui) -> R,
) -> (R, bool) {
    let response = egui::Modal::new(egui::Id::unique(id)).show(ui.ctx(), |ui| {
        ui.set_max_width(520.0);
        ui.heading(title);
        ui.add_space(6.0);
        add(ui)
    });
    let dismissed = response.should_close();
    (response.inner, !dismissed)
}

/// The VM a checkpoint belongs to, as it is now (if it exists here).
fn vm_of<'a>(state: &'a UiState, key: &CheckpointKey) -> Option<&'a VmInfo> {
    let uuid = key.vm_uuid.to_string();
    state.vms.as_ref()?.iter().find(|v| v.uuid == uuid)
}

/// What the user chose in the restore dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreChoices {
    /// Keep the current state as a safety checkpoint first.
    pub safety: bool,
    /// Save the running session into it instead of shutting the VM down.
    pub save_state: bool,
    /// Of a full-state checkpoint: the disks only, and a boot.
    pub disk_only: bool,
}

/// The plain-words list of what an in-place restore does.
pub fn restore_steps(
    vm: Option<&VmInfo>,
    c: &CheckpointSummary,
    destination: &str,
    choices: RestoreChoices,
    shutdown_timeout_secs: u64,
) -> Vec<String> {
    let RestoreChoices {
        safety,
        save_state,
        disk_only,
    } = choices;
    let name = vm.map_or(c.vm.as_str(), |v| v.name.as_str());
    let running = vm.is_some_and(|v| v.state == VmState::Running || v.state == VmState::Paused);
    let mut steps = Vec::new();
    if vm.is_none() {
        steps.push(format!(
            "{name} is not on this host any more: it is defined again from the checkpoint."
        ));
    } else if running && save_state {
        steps.push(format!(
            "{name} is paused and its running session saved (memory too): nothing of it is lost."
        ));
    } else if running && shutdown_timeout_secs == 0 {
        steps.push(format!(
            "{name} is turned off at once. Save your work in it first."
        ));
    } else if running {
        steps.push(format!(
            "{name} is shut down: asked first, turned off if it has not stopped after {} (or when you say so). Save your work in it first.",
            rewind_core::units::interval_text(shutdown_timeout_secs)
        ));
    } else {
        steps.push(format!(
            "{name} is off and stays off while its disks are rewritten."
        ));
    }
    if safety && vm.is_some() {
        steps.push(format!(
            "Its current state is kept as a safety checkpoint in {destination}, so you can undo this restore."
        ));
    } else if vm.is_some() {
        steps.push(
            "Its current state is NOT kept: changes since then are lost for good.".to_owned(),
        );
    }
    steps.push(format!(
        "Its disks ({}) are rewritten to how they were then; only what differs is written, then read back and checked.",
        c.disks.join(", ")
    ));
    let full = c.kind == rewind_core::store::CheckpointKind::Full;
    if full && !disk_only {
        steps.push(format!(
            "{name} then resumes exactly where it was at that moment, with the programs that were open (from the checkpoint's saved memory; no boot)."
        ));
    } else if full && running {
        steps.push(format!(
            "{name} then boots from the restored disks: the programs that were open at that moment are not brought back."
        ));
    } else if running {
        steps.push(format!("{name} starts again."));
    }
    steps
}

/// The safety checkpoint's check boxes.
fn restore_choices_ui(ui: &mut egui::Ui, running: bool, safety: &mut bool, save_state: &mut bool) {
    ui.add_space(6.0);
    ui.checkbox(
        safety,
        "Keep the current state as a safety checkpoint (recommended)",
    );
    if running {
        ui.add_enabled(
            *safety,
            egui::Checkbox::new(
                save_state,
                "Save its running session instead of shutting it down (undo resumes it)",
            ),
        );
    }
}

/// "What it costs": how long the VM is away, and what the restore and its safety
/// checkpoint read and write.
fn costs_ui(ui: &mut egui::Ui, name: &str, c: &CheckpointSummary, safety: bool) {
    ui.label(RichText::new("What it costs:").strong());
    ui.label(format!(
        "{name} is unavailable until it is done. The checkpoint holds {} of data; it is compared with the disks and what differs is written.{}",
        human_bytes(c.logical_bytes),
        if safety {
            " The safety checkpoint adds what changed since the last checkpoint to the store."
        } else {
            ""
        }
    ));
}

/// How the settings say a VM is stopped for a restore, and how long its guest gets to shut
/// down (0: it is turned off at once).
fn stop_mode(state: &UiState) -> (rewind_core::libvirt::lifecycle::StopMode, u64) {
    use rewind_core::libvirt::lifecycle::StopMode;
    let stop = state
        .config
        .as_ref()
        .map(|c| c.stop_mode())
        .unwrap_or_default();
    let timeout_secs = match stop {
        StopMode::Graceful { timeout_secs, .. } => timeout_secs,
        StopMode::Force | StopMode::Save => 0,
    };
    (stop, timeout_secs)
}

/// Whether a full-state checkpoint can resume its VM: asks the engine the first time.
fn resume_check(state: &mut UiState, key: &CheckpointKey, commands: &mut Commands) -> ResumeCheck {
    state
        .resume_checks
        .entry(key.clone())
        .or_insert_with(|| {
            commands.push(Command::CheckResume(ResumeKey {
                destination: key.destination.clone(),
                vm_uuid: key.vm_uuid,
                checkpoint: key.id.clone(),
            }));
            ResumeCheck::Checking
        })
        .clone()
}

/// For a full-state checkpoint: whether it can resume the VM, and the choice to restore
/// the disks only (forced when it cannot). Returns whether a resume is impossible.
fn resume_choice_ui(
    ui: &mut egui::Ui,
    check: &ResumeCheck,
    name: &str,
    disk_only: &mut bool,
) -> bool {
    ui.add_space(6.0);
    let impossible = match check {
        ResumeCheck::Checking => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(format!("Checking that the checkpoint can resume {name}…"));
            });
            false
        }
        ResumeCheck::Possible => false,
        ResumeCheck::Impossible(why) => {
            ui.colored_label(
                ui.visuals().error_fg_color,
                format!("This checkpoint cannot resume {name} where it was: {why}"),
            );
            *disk_only = true;
            true
        }
    };
    ui.add_enabled(
        !impossible,
        egui::Checkbox::new(
            disk_only,
            "Restore its disks only and boot it from them, instead of resuming it",
        ),
    );
    impossible
}

fn confirm_restore_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    key: &CheckpointKey,
    choices: RestoreChoices,
    commands: &mut Commands,
) -> bool {
    let Some(c) = state.summary(key).cloned() else {
        return false;
    };
    let full = c.kind == rewind_core::store::CheckpointKind::Full;
    let check = if full {
        resume_check(state, key, commands)
    } else {
        ResumeCheck::Possible
    };
    let vm = vm_of(state, key).cloned();
    let name = vm.as_ref().map_or(c.vm.clone(), |v| v.name.clone());
    let mut safety_now = choices.safety;
    let mut save_now = choices.save_state;
    let mut disk_only_now = choices.disk_only || matches!(check, ResumeCheck::Impossible(_));
    let mut close = false;
    let (stop, timeout_secs) = stop_mode(state);
    let running = vm
        .as_ref()
        .is_some_and(|v| v.state == VmState::Running || v.state == VmState::Paused);
    let age = u64::try_from((state.now - c.time).num_seconds()).unwrap_or(0);
    let ((), keep) = modal(ui, "confirm_restore", &format!("Restore {name}?"), |ui| {
        ui.label(format!(
            "Back to {} ({} ago), {}.",
            when(&c),
            human_age_secs(age),
            kind_text(&c)
        ));
        ui.add_space(6.0);
        ui.label(RichText::new("What happens:").strong());
        let saving = save_now && safety_now && running;
        let steps = restore_steps(
            vm.as_ref(),
            &c,
            &key.destination,
            RestoreChoices {
                safety: safety_now,
                save_state: saving,
                disk_only: disk_only_now,
            },
            timeout_secs,
        );
        for (i, step) in steps.iter().enumerate() {
            ui.label(format!("{}. {step}", i + 1));
        }
        ui.add_space(6.0);
        costs_ui(ui, &name, &c, safety_now && vm.is_some());
        if vm.is_some() {
            restore_choices_ui(ui, running, &mut safety_now, &mut save_now);
        }
        if full {
            resume_choice_ui(ui, &check, &name, &mut disk_only_now);
        }
        ui.add_space(10.0);
        ui.horizontal(|ui| {
            let label = if full && disk_only_now {
                "Restore disks only"
            } else {
                "Restore"
            };
            let restore = ui.add(egui::Button::new(RichText::new(label).strong()));
            if restore.clicked() {
                commands.push(Command::Start(JobRequest::Restore {
                    destination: key.destination.clone(),
                    vm_uuid: key.vm_uuid,
                    checkpoint: key.id.clone(),
                    options: RestoreOptions {
                        safety_checkpoint: safety_now,
                        stop: if saving {
                            rewind_core::libvirt::lifecycle::StopMode::Save
                        } else {
                            stop
                        },
                        disk_only: full && disk_only_now,
                        ..RestoreOptions::default()
                    },
                    as_new: None,
                }));
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    if let Some(Dialog::ConfirmRestore {
        safety,
        save_state,
        disk_only,
        ..
    }) = &mut state.dialog
    {
        *safety = safety_now;
        *save_state = save_now;
        *disk_only = disk_only_now;
    }
    keep && !close
}

/// `fields`: the new VM's name, the folder for its disks, disks only.
fn restore_as_new_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    key: &CheckpointKey,
    fields: (&str, &str, bool),
    commands: &mut Commands,
) -> bool {
    let (name, folder, disk_only) = fields;
    let Some(c) = state.summary(key).cloned() else {
        return false;
    };
    let full = c.kind == rewind_core::store::CheckpointKind::Full;
    let check = if full {
        resume_check(state, key, commands)
    } else {
        ResumeCheck::Possible
    };
    let mut name_now = name.to_owned();
    let mut folder_now = folder.to_owned();
    let mut disk_only_now = disk_only || matches!(check, ResumeCheck::Impossible(_));
    let mut close = false;
    let taken = state
        .vms
        .as_ref()
        .is_some_and(|vms| vms.iter().any(|v| v.name == name_now.trim()));
    let ((), keep) = modal(ui, "restore_as_new", "Restore as a new VM", |ui| {
        ui.label(format!(
            "A copy of {} as it was on {}, next to the original (which is not touched). It gets its own UUID and network addresses.",
            c.vm,
            when(&c)
        ));
        if full && !disk_only_now {
            ui.label(
                "It resumes where the VM was at that moment. Until its next boot it keeps the original's network addresses, which its programs know, with its network cards unplugged: connect them when the original is off.",
            );
        }
        ui.add_space(6.0);
        egui::Grid::new("as_new_grid")
            .num_columns(2)
            .show(ui, |ui| {
                let label = ui.label("Name of the new VM");
                ui.text_edit_singleline(&mut name_now).labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Folder for its disks");
                ui.text_edit_singleline(&mut folder_now)
                    .labelled_by(label.id);
                ui.end_row();
            });
        let problem = if name_now.trim().is_empty() {
            Some("Give the new VM a name.".to_owned())
        } else if taken {
            Some(format!(
                "A VM called {} exists already; choose another name.",
                name_now.trim()
            ))
        } else if !folder_now.starts_with('/') {
            Some("The folder must be a full path (starting with /).".to_owned())
        } else {
            None
        };
        if let Some(p) = &problem {
            ui.colored_label(ui.visuals().warn_fg_color, p);
        }
        if full {
            resume_choice_ui(ui, &check, "the copy", &mut disk_only_now);
        }
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui
                .add_enabled(problem.is_none(), egui::Button::new("Restore as new VM"))
                .clicked()
            {
                commands.push(Command::Start(JobRequest::Restore {
                    destination: key.destination.clone(),
                    vm_uuid: key.vm_uuid,
                    checkpoint: key.id.clone(),
                    options: RestoreOptions {
                        disk_only: full && disk_only_now,
                        ..RestoreOptions::default()
                    },
                    as_new: Some(NewVm {
                        name: Some(name_now.trim().to_owned()),
                        storage: DiskStorage::Folder(PathBuf::from(folder_now.trim())),
                    }),
                }));
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    if let Some(Dialog::RestoreAsNew {
        name,
        folder,
        disk_only,
        ..
    }) = &mut state.dialog
    {
        *name = name_now;
        *folder = folder_now;
        *disk_only = disk_only_now;
    }
    keep && !close
}

#[allow(clippy::too_many_arguments)] // one dialog's fields
fn export_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    key: &CheckpointKey,
    disk: &str,
    path: &str,
    qcow2: bool,
    commands: &mut Commands,
) -> bool {
    let Some(c) = state.summary(key).cloned() else {
        return false;
    };
    let mut disk_now = disk.to_owned();
    let mut path_now = path.to_owned();
    let mut qcow2_now = qcow2;
    let mut close = false;
    let ((), keep) = modal(ui, "export", "Export a disk", |ui| {
        ui.label(format!(
            "Writes one disk of {} as it was on {} to an image file you can open or attach elsewhere.",
            c.vm,
            when(&c)
        ));
        ui.add_space(6.0);
        egui::Grid::new("export_grid")
            .num_columns(2)
            .show(ui, |ui| {
                let label = ui.label("Disk");
                egui::ComboBox::from_id_salt("export_disk")
                    .selected_text(disk_now.clone())
                    .show_ui(ui, |ui| {
                        for d in &c.disks {
                            ui.selectable_value(&mut disk_now, d.clone(), d);
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
                ui.label("Format");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut qcow2_now, true, "qcow2");
                    ui.radio_value(&mut qcow2_now, false, "raw");
                });
                ui.end_row();
                let label = ui.label("File");
                ui.text_edit_singleline(&mut path_now).labelled_by(label.id);
                ui.end_row();
            });
        let problem = (!path_now.trim().starts_with('/'))
            .then_some("The file must be a full path (starting with /).");
        if let Some(p) = problem {
            ui.colored_label(ui.visuals().warn_fg_color, p);
        }
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui
                .add_enabled(problem.is_none(), egui::Button::new("Export"))
                .clicked()
            {
                commands.push(Command::Start(JobRequest::Export {
                    destination: key.destination.clone(),
                    vm_uuid: key.vm_uuid,
                    checkpoint: key.id.clone(),
                    disk: disk_now.clone(),
                    out: PathBuf::from(path_now.trim()),
                    format: if qcow2_now {
                        ImageFormat::Qcow2
                    } else {
                        ImageFormat::Raw
                    },
                }));
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    if let Some(Dialog::Export {
        disk, path, qcow2, ..
    }) = &mut state.dialog
    {
        *disk = disk_now;
        *path = path_now;
        *qcow2 = qcow2_now;
    }
    keep && !close
}

fn confirm_delete_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    key: &CheckpointKey,
    commands: &mut Commands,
) -> bool {
    let Some(c) = state.summary(key).cloned() else {
        return false;
    };
    let mut close = false;
    let ((), keep) = modal(ui, "confirm_delete", "Delete this checkpoint?", |ui| {
        ui.label(format!(
            "The checkpoint of {} from {} is removed from {}. Others are not affected; the space it alone used is freed at the next clean-up.",
            c.vm,
            when(&c),
            key.destination
        ));
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button("Delete").clicked() {
                commands.push(Command::Start(JobRequest::Delete {
                    destination: key.destination.clone(),
                    vm_uuid: key.vm_uuid,
                    checkpoint: key.id.clone(),
                }));
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    keep && !close
}

fn close_without_tray_ui(ui: &mut egui::Ui, state: &mut UiState) -> bool {
    let mut close = false;
    let ((), keep) = modal(ui, "close_without_tray", "Stop protecting?", |ui| {
        ui.label(
            "There is no tray on this desktop to keep Rewind running in. Closing the window stops automatic checkpoints until you open Rewind again (or run `rewind daemon`, see packaging/rewind.service).",
        );
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button("Quit and stop protecting").clicked() {
                state.quit = true;
                close = true;
            }
            if ui.button("Keep Rewind open").clicked() {
                close = true;
            }
        });
    });
    keep && !close
}

fn phase_text(phase: Phase) -> &'static str {
    match phase {
        Phase::Preparing => "Preparing",
        Phase::Capturing => "Capturing",
        Phase::Copying => "Copying data into the store",
        Phase::Finishing => "Finishing",
        Phase::Stopping => "Shutting the VM down",
        Phase::SafetyCheckpoint => "Keeping the current state as a safety checkpoint",
        Phase::Writing => "Writing the disks back",
        Phase::Verifying => "Reading back and checking",
        Phase::RollingBack => "Undoing what was written",
        Phase::Starting => "Starting the VM",
        Phase::ReadingMemory => "Reading back the saved memory",
    }
}

/// A job's progress bar with rate and time left.
pub fn job_progress_ui(ui: &mut egui::Ui, job: &JobView) {
    #[allow(clippy::cast_precision_loss)] // a fraction for display
    let fraction = if job.total_bytes > 0 {
        job.done_bytes as f32 / job.total_bytes as f32
    } else {
        0.0
    };
    let mut text = phase_text(job.phase).to_owned();
    if let Some(left) = job.force_off_in {
        let secs = left.as_secs();
        write!(text, " — turned off in {}:{:02}", secs / 60, secs % 60)
            .expect("writing to a String cannot fail");
    }
    if job.total_bytes > 0 {
        write!(
            text,
            " — {} of {}",
            human_bytes(job.done_bytes),
            human_bytes(job.total_bytes)
        )
        .expect("writing to a String cannot fail");
    }
    if let Some(rate) = job.rate.rate_bytes_per_sec() {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rate = rate as u64;
        write!(text, ", {}/s", human_bytes(rate)).expect("writing to a String cannot fail");
        if let Some(left) = job.rate.time_left(job.done_bytes, job.total_bytes) {
            write!(text, ", {} left", human_age_secs(left.as_secs()))
                .expect("writing to a String cannot fail");
        }
    }
    let bar = egui::ProgressBar::new(fraction).text(text);
    let bar = if job.total_bytes == 0 {
        bar.animate(true)
    } else {
        bar
    };
    ui.add(bar);
}

fn report_lines(r: &RestoreReport) -> Vec<String> {
    #[allow(clippy::cast_precision_loss)] // seconds for display
    let secs = r.duration_ms as f64 / 1000.0;
    let mut lines = vec![format!(
        "{} is back to checkpoint {}: {} written to {} disk(s) in {:.1} s, all read back and checked.",
        r.vm,
        r.checkpoint,
        human_bytes(r.bytes_written),
        r.disks.len(),
        secs
    )];
    if r.resumed {
        lines.push(format!(
            "{} resumed where it was at that moment (from its saved memory).",
            r.vm
        ));
    } else if r.started {
        lines.push(format!("{} was started again.", r.vm));
    }
    if r.network_unplugged {
        lines.push(
            "Its network cards are unplugged: until its next boot it has the original's network addresses. Connect them when the original is off.".to_owned(),
        );
    }
    if let Some(e) = &r.start_error {
        lines.push(format!("It could not be started: {e}"));
    }
    if let Some(s) = &r.safety_checkpoint {
        lines.push(format!(
            "Its state from before is kept as safety checkpoint {s}."
        ));
    }
    if let Some(n) = &r.safety_note {
        lines.push(n.clone());
    }
    lines
}

/// The same restore, disks only, when `error` says that is what can still be done.
fn disk_only_retry(request: &JobRequest, error: &JobError) -> Option<JobRequest> {
    if !error.disk_only_possible() {
        return None;
    }
    let mut again = request.clone();
    match &mut again {
        JobRequest::Restore { options, .. } | JobRequest::UndoRestore { options, .. } => {
            options.disk_only = true;
            Some(again)
        }
        _ => None,
    }
}

/// While a restore waits for the guest to shut down (the progress bar counts down), a
/// button to turn the VM off now.
fn shutdown_countdown_ui(ui: &mut egui::Ui, job: &JobView, commands: &mut Commands) -> bool {
    let Some(left) = job.force_off_in else {
        return false;
    };
    ui.add_space(4.0);
    ui.horizontal(|ui| {
        ui.label(if left.is_zero() {
            "The guest did not shut down: it is turned off now.".to_owned()
        } else {
            "The guest was asked to shut down.".to_owned()
        });
        let button = ui
            .add_enabled(!job.forcing_off, egui::Button::new("Turn off now"))
            .on_hover_text(
                "Pull the plug without waiting any longer: unsaved work in the VM is lost",
            );
        if button.clicked() {
            commands.push(Command::ForceOff(job.id));
            return true;
        }
        false
    })
    .inner
}

/// A restore that failed: what went wrong, and the disks-only restore when that is what
/// can still be done (the checkpoint cannot resume the VM and nothing was changed).
/// Returns whether to close.
fn restore_failed_ui(
    ui: &mut egui::Ui,
    job: &JobView,
    error: &JobError,
    commands: &mut Commands,
) -> bool {
    ui.colored_label(ui.visuals().error_fg_color, "The restore did not complete");
    ui.label(&error.message);
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        let mut close = false;
        if let Some(again) = disk_only_retry(&job.request, error)
            && ui
                .button(RichText::new("Restore disks only").strong())
                .on_hover_text(
                    "Put back the checkpoint's disks, UEFI variables and TPM state, and boot the VM from them",
                )
                .clicked()
        {
            commands.push(Command::Start(again));
            close = true;
        }
        close |= ui.button("Close").clicked();
        close
    })
    .inner
}

fn restore_window_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    let Some(job) = state
        .restore_job
        .and_then(|id| state.jobs.iter().find(|j| j.id == id).cloned())
    else {
        state.restore_job = None;
        return;
    };
    let mut close = false;
    let (stop_mode, _) = stop_mode(state);
    let title = match &*job.request {
        JobRequest::UndoRestore { .. } => "Undoing the restore",
        _ => "Restoring",
    };
    egui::Modal::new(egui::Id::unique("restore_window")).show(ui.ctx(), |ui| {
        ui.set_min_width(460.0);
        ui.set_max_width(560.0);
        ui.heading(title);
        ui.label(&job.label);
        ui.add_space(6.0);
        match &job.result {
            None => {
                job_progress_ui(ui, &job);
                if shutdown_countdown_ui(ui, &job, commands)
                    && let Some(j) = state.jobs.iter_mut().find(|j| j.id == job.id)
                {
                    j.forcing_off = true;
                }
                ui.add_space(6.0);
                let cancel = ui.add_enabled(!job.cancelling, egui::Button::new("Cancel"));
                if cancel.clicked() {
                    commands.push(Command::Cancel(job.id));
                    if let Some(j) = state.jobs.iter_mut().find(|j| j.id == job.id) {
                        j.cancelling = true;
                    }
                }
                if job.cancelling {
                    ui.label("Cancelling: what was written is being undone…");
                }
            }
            Some(Ok(JobOutput::Restored(report))) => {
                ui.label(RichText::new("Restore complete").strong());
                for line in report_lines(report) {
                    ui.label(line);
                }
                ui.add_space(8.0);
                ui.horizontal(|ui| {
                    let undo = match &*job.request {
                        JobRequest::Restore {
                            destination,
                            vm_uuid,
                            as_new: None,
                            ..
                        } if report.safety_checkpoint.is_some() => {
                            Some((destination.clone(), *vm_uuid))
                        }
                        _ => None,
                    };
                    if let Some((destination, vm_uuid)) = undo
                        && ui
                            .button("Undo restore")
                            .on_hover_text("Go back to the state from before this restore")
                            .clicked()
                    {
                        commands.push(Command::Start(JobRequest::UndoRestore {
                            destination,
                            vm_uuid,
                            options: RestoreOptions {
                                // Undoing keeps nothing of the restored state: it is the checkpoint.
                                safety_checkpoint: false,
                                stop: stop_mode,
                                ..RestoreOptions::default()
                            },
                        }));
                        close = true;
                    }
                    if ui.button("Close").clicked() {
                        close = true;
                    }
                });
            }
            Some(Ok(_)) => {
                close = true;
            }
            Some(Err(e)) => close = restore_failed_ui(ui, &job, e, commands),
        }
    });
    if close {
        state.restore_job = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_say_what_happens_to_a_running_vm() {
        let hv = rewind_core::libvirt::Hypervisor::connect("test:///default").unwrap();
        let vm = hv.list_vms().unwrap().remove(0);
        let c = super::super::timeline::tests::sample(chrono::Utc::now());
        let choose = |safety, disk_only| RestoreChoices {
            safety,
            save_state: false,
            disk_only,
        };
        let steps = restore_steps(Some(&vm), &c, "usb", choose(true, false), 120);
        assert!(steps[0].contains("shut down"), "{steps:?}");
        assert!(steps[0].contains("2 minutes"), "{steps:?}");
        assert!(steps[1].contains("safety checkpoint in usb"), "{steps:?}");
        assert!(steps[2].contains("vda"), "{steps:?}");
        assert!(steps[3].contains("starts again"), "{steps:?}");
        let steps = restore_steps(Some(&vm), &c, "usb", choose(false, false), 120);
        assert!(steps[1].contains("NOT kept"), "{steps:?}");
        let steps = restore_steps(None, &c, "usb", choose(true, false), 120);
        assert!(steps[0].contains("defined again"), "{steps:?}");
        let steps = restore_steps(Some(&vm), &c, "usb", choose(true, false), 0);
        assert!(steps[0].contains("turned off at once"), "{steps:?}");
        let mut full = c.clone();
        full.kind = rewind_core::store::CheckpointKind::Full;
        let steps = restore_steps(Some(&vm), &full, "usb", choose(true, false), 120);
        assert!(
            steps[3].contains("resumes exactly where it was"),
            "{steps:?}"
        );
        let steps = restore_steps(Some(&vm), &full, "usb", choose(true, true), 120);
        assert!(
            steps[3].contains("boots from the restored disks"),
            "{steps:?}"
        );
    }
}
