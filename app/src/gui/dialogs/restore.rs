//! The restore dialogs: in place (with the resume check and the choices), and as a new VM.

use super::{
    CheckpointKey, CheckpointSummary, Command, Commands, Dialog, DiskStorage, JobRequest, NewVm,
    PathBuf, RestoreOptions, ResumeCheck, ResumeKey, RichText, UiState, VmInfo, VmState,
    human_age_secs, human_bytes, kind_text, modal, vm_of, when,
};

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
pub(super) fn restore_choices_ui(
    ui: &mut egui::Ui,
    running: bool,
    safety: &mut bool,
    save_state: &mut bool,
) {
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
pub(super) fn costs_ui(ui: &mut egui::Ui, name: &str, c: &CheckpointSummary, safety: bool) {
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
pub(super) fn stop_mode(state: &UiState) -> (rewind_core::libvirt::lifecycle::StopMode, u64) {
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
pub(super) fn resume_check(
    state: &mut UiState,
    key: &CheckpointKey,
    commands: &mut Commands,
) -> ResumeCheck {
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
pub(super) fn resume_choice_ui(
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

pub(super) fn confirm_restore_ui(
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
pub(super) fn restore_as_new_ui(
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
