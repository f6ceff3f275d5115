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

mod progress;
mod restore;

pub use progress::job_progress_ui;
use progress::restore_window_ui;
use restore::{RestoreChoices, confirm_restore_ui, restore_as_new_ui, stop_mode};

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
    /// "Discard the run from the checkpoint?"
    ConfirmDiscardRun {
        /// The VM that runs from a checkpoint.
        vm_uuid: uuid::Uuid,
    },
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
            Dialog::ConfirmDiscardRun { vm_uuid } => {
                super::runfrom::confirm_discard_ui(ui, state, *vm_uuid, commands)
            }
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
                    owner: None,
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
            "There is no tray on this desktop to keep Rewind running in. Closing the window stops automatic checkpoints until you open Rewind again (or run `rewind daemon`).",
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

#[cfg(test)]
mod tests {
    use super::restore::restore_steps;
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
