//! The details under the timeline: the chosen checkpoint, and the VM's facts (disks,
//! firmware).

use std::fmt::Write as _;

use chrono::Local;
use egui::RichText;
use rewind_core::engine::Command;
use rewind_core::engine::jobs::JobRequest;
use rewind_core::units::human_bytes;
use rewind_core::view::catalog::CheckpointSummary;
use rewind_core::vm::{Disk, Firmware, VmInfo};

use super::Commands;
use super::dialogs::Dialog;
use super::state::{CheckpointKey, UiState};
use super::timeline::kind_text;

#[allow(clippy::too_many_lines)] // the details grid and its actions, as shown
pub(super) fn checkpoint_details_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    key: &CheckpointKey,
    c: &CheckpointSummary,
    commands: &mut Commands,
) {
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.label(
            RichText::new(format!(
                "Checkpoint of {}",
                c.time.with_timezone(&Local).format("%A %-d %B %Y, %H:%M:%S")
            ))
            .strong(),
        );
        ui.horizontal_top(|ui| {
            egui::Grid::new("checkpoint_facts")
                .num_columns(2)
                .spacing([16.0, 3.0])
                .show(ui, |ui| {
                    let fact = |ui: &mut egui::Ui, name: &str, value: String| {
                        ui.label(RichText::new(name).weak());
                        ui.label(value);
                        ui.end_row();
                    };
                    fact(ui, "Kind", kind_text(c).to_owned());
                    if let Some(note) = &c.consistency_note {
                        fact(ui, "Consistency", note.clone());
                    }
                    fact(ui, "Data", human_bytes(c.logical_bytes));
                    fact(
                        ui,
                        "New in the store",
                        format!(
                            "{}{}",
                            human_bytes(c.new_bytes),
                            if c.incremental { " (incremental)" } else { " (full)" }
                        ),
                    );
                    if let Some(why) = &c.full_reason {
                        fact(ui, "Why full", why.clone());
                    }
                    #[allow(clippy::cast_precision_loss)]
                    fact(ui, "Took", format!("{:.1} s", c.duration_ms as f64 / 1000.0));
                    fact(ui, "Destination", key.destination.clone());
                    fact(ui, "Disks", c.disks.join(", "));
                    fact(
                        ui,
                        "Verification",
                        if c.damaged {
                            "damaged: the last verify found missing or bad data".to_owned()
                        } else if let Some(t) = c.verified {
                            format!("verified {}", t.with_timezone(&Local).format("%Y-%m-%d %H:%M"))
                        } else {
                            "not verified yet".to_owned()
                        },
                    );
                    ui.label(RichText::new("Boot-check").weak());
                    ui.vertical(|ui| super::bootcheck::details_ui(ui, state, key, c));
                    ui.end_row();
                    if c.is_safety() {
                        fact(ui, "Label", "safety checkpoint (taken before a restore)".to_owned());
                    }
                    fact(ui, "ID", c.id.clone());
                });
            ui.add_space(24.0);
            super::bootcheck::details_picture_ui(ui, c);
        });
        ui.add_space(6.0);
        let restoring = state.restore_running();
        ui.horizontal_wrapped(|ui| {
            let restore = ui
                .add_enabled(!restoring && !c.damaged, egui::Button::new(RichText::new("⟲ Restore…").strong()))
                .on_hover_text("Bring the VM back to this checkpoint")
                .on_disabled_hover_text(if c.damaged {
                    "This checkpoint is damaged; restore another one"
                } else {
                    "A restore is running"
                });
            if restore.clicked() {
                state.dialog = Some(Dialog::ConfirmRestore {
                    key: key.clone(),
                    safety: true,
                    save_state: false,
                    disk_only: false,
                });
            }
            if ui
                .add_enabled(!restoring && !c.damaged, egui::Button::new("Restore as new VM…"))
                .on_hover_text("Make a copy of the VM as it was then, next to it")
                .clicked()
            {
                let folder = state
                    .selected_vm()
                    .and_then(|v| v.protected_disks().find_map(|d| d.path().and_then(|p| p.parent())).map(|p| p.display().to_string()))
                    .unwrap_or_else(|| "/var/lib/libvirt/images".into());
                state.dialog = Some(Dialog::RestoreAsNew {
                    key: key.clone(),
                    name: format!("{} (restored {})", c.vm, c.time.with_timezone(&Local).format("%Y-%m-%d %H%M")),
                    folder,
                    disk_only: false,
                });
            }
            if ui
                .add_enabled(!c.damaged, egui::Button::new("Browse files…"))
                .on_hover_text("Look through the files of its disks as they were then, and restore some")
                .clicked()
            {
                let title = format!("{} at {}", c.vm, c.time.with_timezone(&Local).format("%Y-%m-%d %H:%M"));
                state.files = Some(super::files::FilesView::open(key.clone(), title, commands));
            }
            super::bootcheck::button_ui(ui, state, key, c, commands);
            super::runfrom::button_ui(ui, state, key, c, commands);
            if ui
                .add_enabled(!c.damaged, egui::Button::new("Export disk…"))
                .on_hover_text("Write one disk as it was then to an image file")
                .clicked()
            {
                let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
                let disk = c.disks.first().cloned().unwrap_or_default();
                state.dialog = Some(Dialog::Export {
                    key: key.clone(),
                    path: format!("{home}/{}-{disk}-{}.qcow2", c.vm.replace('/', "_"), c.id),
                    disk,
                    qcow2: true,
                });
            }
            let verifying = state.jobs.iter().any(|j| {
                j.running() && matches!(&*j.request, JobRequest::Verify { destination, .. } if *destination == key.destination)
            });
            if ui
                .add_enabled(!verifying, egui::Button::new("Verify"))
                .on_hover_text(format!(
                    "Read back every checkpoint in {} and check it (marks damaged ones)",
                    key.destination
                ))
                .clicked()
            {
                commands.push(Command::Start(JobRequest::Verify {
                    destination: key.destination.clone(),
                    quick: false,
                }));
            }
            if ui
                .add_enabled(!restoring, egui::Button::new("Delete…"))
                .on_hover_text("Remove this checkpoint from the store")
                .clicked()
            {
                state.dialog = Some(Dialog::ConfirmDelete { key: key.clone() });
            }
        });
    });
}

pub(super) fn vm_facts_ui(ui: &mut egui::Ui, vm: &VmInfo) {
    egui::Grid::new("vm_facts")
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            let fact = |ui: &mut egui::Ui, name: &str, value: String| {
                ui.label(RichText::new(name).weak());
                ui.label(value);
                ui.end_row();
            };
            fact(ui, "vCPUs", vm.vcpus.to_string());
            fact(ui, "Memory", human_bytes(vm.memory_bytes));
            fact(ui, "Firmware", firmware_text(&vm.firmware));
            fact(
                ui,
                "TPM",
                vm.tpm.as_ref().map_or_else(
                    || "none".to_owned(),
                    |t| {
                        format!(
                            "{} {} ({})",
                            t.model,
                            t.version.as_deref().unwrap_or(""),
                            t.backend
                        )
                    },
                ),
            );
            fact(
                ui,
                "Guest agent",
                match (vm.guest_agent.channel, vm.guest_agent.connected) {
                    (false, _) => "no channel".to_owned(),
                    (true, true) => "connected".to_owned(),
                    (true, false) => "channel present, not connected".to_owned(),
                },
            );
            fact(ui, "UUID", vm.uuid.clone());
        });
    ui.add_space(12.0);
    ui.label(RichText::new("Disks").strong());
    egui::Grid::new("vm_disks")
        .num_columns(4)
        .striped(true)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            for disk in &vm.disks {
                disk_row_ui(ui, disk);
            }
        });
}

pub(super) fn disk_row_ui(ui: &mut egui::Ui, disk: &Disk) {
    ui.label(&disk.target);
    ui.label(disk.format.as_deref().unwrap_or("—"));
    ui.label(disk.virtual_size_bytes.map_or("—".to_owned(), human_bytes));
    let path = disk
        .path()
        .map_or_else(|| "no medium".to_owned(), |p| p.display().to_string());
    match disk.protectable() {
        Ok(()) => ui.label(path),
        Err(why) => ui.label(RichText::new(format!("{path} — not protected: {why}")).weak()),
    };
    ui.end_row();
}

pub(super) fn firmware_text(firmware: &Firmware) -> String {
    match firmware {
        Firmware::Bios => "BIOS".to_owned(),
        Firmware::Uefi {
            secure_boot,
            nvram_path,
            ..
        } => {
            let mut s = if *secure_boot {
                "UEFI with Secure Boot".to_owned()
            } else {
                "UEFI".to_owned()
            };
            if let Some(p) = nvram_path {
                write!(s, ", NVRAM {}", p.display()).expect("writing to a String cannot fail");
            }
            s
        }
    }
}
