//! The main screen: the VM list on the left, the selected VM's details in the middle.

use std::fmt::Write as _;
use std::time::Instant;

use egui::{Color32, RichText};
use rewind_core::engine::Command;
use rewind_core::units::human_bytes;
use rewind_core::vm::{Disk, Firmware, VmInfo, VmState};

use super::{Commands, Connection, UiState};

/// Draws the whole window and returns what the user asked for.
#[must_use]
pub fn main_ui(ui: &mut egui::Ui, state: &mut UiState) -> Commands {
    let mut commands = Commands::new();
    egui::Panel::top("top_bar").show(ui, |ui| {
        top_bar_ui(ui, state, &mut commands);
    });
    if let Some(message) = state.last_error.clone() {
        egui::Panel::bottom("error_bar").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.colored_label(ui.visuals().error_fg_color, format!("⚠ {message}"));
                if ui.button("Dismiss").clicked() {
                    state.last_error = None;
                }
            });
        });
    }
    match (&state.connection, &state.vms) {
        (Connection::Failed { message, retry_at }, None) => {
            let message = message.clone();
            let retry_at = *retry_at;
            egui::CentralPanel::default().show(ui, |ui| {
                connection_failed_ui(ui, &message, retry_at, &mut commands);
            });
        }
        (_, None) => {
            egui::CentralPanel::default().show(ui, |ui| {
                ui.centered_and_justified(|ui| {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label(format!("Connecting to {}…", state.uri));
                    });
                });
            });
        }
        (_, Some(vms)) if vms.is_empty() => {
            egui::CentralPanel::default().show(ui, |ui| no_vms_ui(ui, &state.uri));
        }
        (_, Some(_)) => {
            egui::Panel::left("vm_list")
                .resizable(true)
                .default_size(240.0)
                .show(ui, |ui| vm_list_ui(ui, state));
            egui::CentralPanel::default().show(ui, |ui| {
                let selected = state.vms.as_ref().and_then(|vms| {
                    vms.iter()
                        .find(|v| Some(&v.uuid) == state.selected.as_ref())
                });
                match selected {
                    Some(vm) => vm_details_ui(ui, vm),
                    None => {
                        ui.label("Select a virtual machine on the left.");
                    }
                }
            });
        }
    }
    commands
}

fn top_bar_ui(ui: &mut egui::Ui, state: &UiState, commands: &mut Commands) {
    ui.horizontal(|ui| {
        ui.heading("Rewind");
        ui.separator();
        let (dot, text) = match &state.connection {
            Connection::Connecting => (Color32::GRAY, format!("Connecting to {}", state.uri)),
            Connection::Connected => (Color32::from_rgb(60, 170, 90), state.uri.clone()),
            Connection::Failed { .. } => (
                ui.visuals().error_fg_color,
                format!("Not connected to {}", state.uri),
            ),
        };
        ui.colored_label(dot, "⏺");
        ui.label(text);
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let refresh = ui
                .add_enabled(
                    matches!(state.connection, Connection::Connected),
                    egui::Button::new("⟳ Refresh"),
                )
                .on_hover_text("List the virtual machines again");
            if refresh.clicked() {
                commands.push(Command::RefreshVms);
            }
        });
    });
}

fn connection_failed_ui(
    ui: &mut egui::Ui,
    message: &str,
    retry_at: Instant,
    commands: &mut Commands,
) {
    ui.add_space(24.0);
    ui.vertical_centered(|ui| {
        ui.heading("Rewind cannot reach libvirt");
        ui.add_space(8.0);
        ui.label(message);
        ui.add_space(8.0);
        let secs = retry_at.saturating_duration_since(Instant::now()).as_secs();
        ui.label(RichText::new(format!("Trying again in {secs} s…")).weak());
        if ui.button("Try again now").clicked() {
            commands.push(Command::RefreshVms);
        }
    });
}

fn no_vms_ui(ui: &mut egui::Ui, uri: &str) {
    ui.add_space(24.0);
    ui.vertical_centered(|ui| {
        ui.heading("No virtual machines yet");
        ui.add_space(8.0);
        ui.label(format!(
            "There are no virtual machines on {uri}. Create one with virt-manager \
             (Virtual Machine Manager) and it appears here by itself."
        ));
    });
}

fn vm_list_ui(ui: &mut egui::Ui, state: &mut UiState) {
    ui.add_space(4.0);
    ui.label(RichText::new("Virtual machines").strong());
    ui.add_space(4.0);
    let Some(vms) = &state.vms else { return };
    egui::ScrollArea::vertical().show(ui, |ui| {
        for vm in vms {
            let selected = state.selected.as_ref() == Some(&vm.uuid);
            ui.horizontal(|ui| {
                ui.label(RichText::new(state_dot(vm.state)).color(state_color(ui, vm.state)))
                    .on_hover_text(vm.state.label());
                let response = ui
                    .selectable_label(selected, &vm.name)
                    .on_hover_text(format!("{} — {}", vm.name, vm.state.label()));
                if response.clicked() {
                    state.selected = Some(vm.uuid.clone());
                }
            });
        }
    });
}

fn state_color(ui: &egui::Ui, state: VmState) -> Color32 {
    match state {
        VmState::Running => Color32::from_rgb(60, 170, 90),
        VmState::Paused | VmState::PmSuspended => Color32::from_rgb(220, 160, 40),
        VmState::Crashed => ui.visuals().error_fg_color,
        _ => ui.visuals().weak_text_color(),
    }
}

fn state_dot(state: VmState) -> &'static str {
    match state {
        VmState::Running => "▶",
        VmState::Paused | VmState::PmSuspended => "⏸",
        VmState::Crashed => "✖",
        _ => "■",
    }
}

fn vm_details_ui(ui: &mut egui::Ui, vm: &VmInfo) {
    ui.heading(&vm.name);
    ui.label(RichText::new(vm.state.label()).strong());
    ui.add_space(8.0);
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

fn disk_row_ui(ui: &mut egui::Ui, disk: &Disk) {
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

fn firmware_text(firmware: &Firmware) -> String {
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
                let _ = write!(s, ", NVRAM {}", p.display());
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;
    use rewind_core::libvirt::Hypervisor;

    fn state_with_test_driver_vms() -> UiState {
        let hv = Hypervisor::connect("test:///default").unwrap();
        UiState {
            uri: hv.uri().to_owned(),
            connection: Connection::Connected,
            vms: Some(hv.list_vms().unwrap()),
            ..UiState::default()
        }
    }

    #[test]
    fn lists_vms_and_shows_the_selected_one() {
        let mut state = state_with_test_driver_vms();
        let vm = state.vms.as_ref().unwrap()[0].clone();
        let mut harness = Harness::new_ui_state(
            |ui, state: &mut UiState| {
                let _ = main_ui(ui, state);
            },
            std::mem::take(&mut state),
        );
        harness.run();
        assert_eq!(harness.state().selected, None);
        harness.get_by_label("test").click();
        harness.run();
        assert_eq!(harness.state().selected.as_deref(), Some(vm.uuid.as_str()));
        // The details panel shows the VM's facts.
        harness.get_by_label(&vm.uuid);
        harness.get_by_label("running");
    }

    #[test]
    fn refresh_button_sends_a_command() {
        let state = state_with_test_driver_vms();
        let mut sent = Vec::new();
        let mut harness = Harness::new_ui_state(
            |ui, state: &mut (UiState, Vec<Command>)| {
                let cmds = main_ui(ui, &mut state.0);
                state.1.extend(cmds);
            },
            (state, Vec::new()),
        );
        harness.run();
        harness.get_by_label("⟳ Refresh").click();
        harness.run();
        sent.extend(harness.state().1.iter().cloned());
        assert!(matches!(sent.as_slice(), [Command::RefreshVms]), "{sent:?}");
    }

    #[test]
    fn explains_an_unreachable_daemon() {
        let state = UiState {
            uri: "qemu:///system".into(),
            connection: Connection::Failed {
                message: "the libvirt daemon is not running".into(),
                retry_at: Instant::now(),
            },
            ..UiState::default()
        };
        let mut harness = Harness::new_ui_state(
            |ui, state: &mut UiState| {
                let _ = main_ui(ui, state);
            },
            state,
        );
        harness.run();
        harness.get_by_label("Rewind cannot reach libvirt");
        harness.get_by_label("the libvirt daemon is not running");
    }
}
