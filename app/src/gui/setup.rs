//! The first-run guide: choose where checkpoints go (a removable drive is suggested), then
//! which VMs to protect. It shows while there is no destination or nothing is protected,
//! until the user skips it.

use egui::RichText;
use rewind_core::config::Protection;
use rewind_core::engine::Command;
use rewind_core::units::interval_text;

use super::Commands;
use super::settings::{SettingsState, SettingsTab, add_folder_ui};
use super::state::UiState;

/// The guide's own state.
#[derive(Debug, Default)]
pub struct SetupState {
    /// The destination form.
    pub form: Option<SettingsState>,
    /// The engine was asked for the drives plugged in.
    looked: bool,
    /// VMs ticked for protection (UUIDs).
    pub chosen: Vec<String>,
    chosen_init: bool,
}

/// Whether the guide shows.
pub fn needed(state: &UiState) -> bool {
    let Some(config) = &state.config else {
        return false;
    };
    !state.setup_dismissed
        && state.vms.as_ref().is_some_and(|v| !v.is_empty())
        && (config.destinations.is_empty() || config.vms.is_empty())
}

/// Draws the guide.
#[allow(clippy::too_many_lines)] // the guide's steps, in the order shown
pub fn setup_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    let mut setup = std::mem::take(&mut state.setup);
    let Some(config) = state.config.clone() else {
        return;
    };
    ui.add_space(12.0);
    ui.heading("Welcome to Rewind");
    ui.label(
        "Rewind takes checkpoints of your virtual machines while they run, so you can bring any of them back to an earlier moment with one click.",
    );
    ui.add_space(10.0);
    if config.destinations.is_empty() {
        ui.label(RichText::new("Step 1 of 2: where should checkpoints go?").strong());
        ui.label(
            "Plug in a removable drive and choose a folder on it. Checkpoints on the same disk as the VMs do not survive that disk failing — a drive (or another computer) does.",
        );
        if !setup.looked {
            setup.looked = true;
            commands.push(Command::ScanDrives);
        }
        let form = setup
            .form
            .get_or_insert_with(|| SettingsState::open(state, SettingsTab::Destinations));
        let drives = state.drives.clone();
        match drives.as_deref() {
            Some([]) => {
                ui.label(RichText::new("No removable drive is plugged in now.").weak());
            }
            Some(drives) => {
                ui.horizontal_wrapped(|ui| {
                    ui.label("Drives found:");
                    for d in drives {
                        if ui
                            .button(d.display().to_string())
                            .on_hover_text("Use a folder called rewind on this drive")
                            .clicked()
                        {
                            form.folder = d.join("rewind").display().to_string();
                        }
                    }
                });
            }
            None => {
                ui.spinner();
            }
        }
        ui.add_space(4.0);
        add_folder_ui(ui, state, form, commands);
    } else {
        ui.label(
            RichText::new("Step 2 of 2: which virtual machines should Rewind protect?").strong(),
        );
        let vms = state.vms.clone().unwrap_or_default();
        if !setup.chosen_init {
            setup.chosen_init = true;
            setup.chosen = vms.iter().map(|v| v.uuid.clone()).collect();
        }
        for vm in &vms {
            let mut on = setup.chosen.contains(&vm.uuid);
            if ui.checkbox(&mut on, &vm.name).changed() {
                if on {
                    setup.chosen.push(vm.uuid.clone());
                } else {
                    setup.chosen.retain(|u| *u != vm.uuid);
                }
            }
        }
        let destination = config.destinations[0].name.clone();
        ui.label(format!(
            "A checkpoint every {} into {destination}, keeping the last few, then hourly, daily, weekly and monthly ones. Change this any time in Settings.",
            interval_text(rewind_core::config::DEFAULT_INTERVAL_SECS)
        ));
        if ui
            .add_enabled(
                !setup.chosen.is_empty(),
                egui::Button::new("Start protecting"),
            )
            .clicked()
        {
            let mut c = (*config).clone();
            for vm in vms.iter().filter(|v| setup.chosen.contains(&v.uuid)) {
                if rewind_core::view::overview::protection_of(&c, &vm.name, &vm.uuid).is_none() {
                    c.vms.push(Protection {
                        vm: vm.name.clone(),
                        uuid: Some(vm.uuid.clone()),
                        destinations: vec![destination.clone()],
                        ..Protection::default()
                    });
                }
            }
            commands.push(Command::SaveConfig(Box::new(c)));
        }
    }
    ui.add_space(10.0);
    if ui.button("Skip for now").clicked() {
        state.setup_dismissed = true;
    }
    state.setup = setup;
}
