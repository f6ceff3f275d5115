//! The main screen: the VM list on the left; the selected VM's protection, its checkpoint
//! timeline and the selected checkpoint's details in the middle; activity at the bottom.

use std::fmt::Write as _;
use std::time::Instant;

use chrono::Local;
use egui::{Color32, RichText};
use rewind_core::engine::{Command, SchedulerView};
use rewind_core::pause::Pause;
use rewind_core::units::{human_age_secs, interval_text};
use rewind_core::view::overview::{Badge, VmOverview};
use rewind_core::vm::{VmInfo, VmState};

use super::activity::activity_ui;
use super::details::{checkpoint_details_ui, vm_facts_ui};
use super::dialogs::dialogs_ui;
use super::settings::{SettingsState, SettingsTab, settings_ui};
use super::state::{Connection, UiState};
use super::timeline::{Lane, Marks, timeline_ui};
use super::{Commands, setup};

/// Draws the whole window and returns what the user asked for.
#[must_use]
pub fn main_ui(ui: &mut egui::Ui, state: &mut UiState) -> Commands {
    let mut commands = Commands::new();
    egui::Panel::top("top_bar").show(ui, |ui| {
        top_bar_ui(ui, state, &mut commands);
    });
    messages_ui(ui, state);
    let connected_with_vms = matches!(&state.vms, Some(v) if !v.is_empty());
    if connected_with_vms {
        egui::Panel::bottom("activity")
            .resizable(true)
            .default_size(150.0)
            .show(ui, |ui| activity_ui(ui, state, &mut commands));
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
        (_, Some(vms)) if vms.is_empty() && state.backup_only_vms().is_empty() => {
            egui::CentralPanel::default().show(ui, |ui| {
                no_vms_ui(ui, &state.uri);
                ui.add_space(8.0);
                ui.label("Lost a computer? Open the backup of its VMs to bring them back here.");
                open_backup_button(ui, state);
            });
        }
        (_, Some(_)) => {
            egui::Panel::left("vm_list")
                .resizable(true)
                .default_size(250.0)
                .show(ui, |ui| vm_list_ui(ui, state));
            egui::CentralPanel::default().show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    if setup::needed(state) {
                        setup::setup_ui(ui, state, &mut commands);
                    } else if let Some(vm) = state.selected_vm().cloned() {
                        vm_ui(ui, state, &vm, &mut commands);
                    } else if let Some((uuid, name)) = state.selected_backup_vm() {
                        backup_vm_ui(ui, state, uuid, &name, &mut commands);
                    } else {
                        ui.label("Select a virtual machine on the left.");
                    }
                });
            });
        }
    }
    if state.settings.is_some() {
        settings_ui(ui, state, &mut commands);
    }
    dialogs_ui(ui, state, &mut commands);
    super::files::files_ui(ui, state, &mut commands);
    commands
}

fn messages_ui(ui: &mut egui::Ui, state: &mut UiState) {
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
    if let Some(error) = state.config_error.clone() {
        egui::Panel::bottom("config_error_bar").show(ui, |ui| {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("⚠ The configuration file does not load, so the last good one is in use: {error}"),
            );
        });
    }
    if let Some(notice) = state.notice.clone() {
        egui::Panel::bottom("notice_bar").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("ℹ {notice}"));
                if ui.button("OK").clicked() {
                    state.notice = None;
                }
            });
        });
    }
}

/// Who protects, in a few words.
pub(super) fn scheduler_text(state: &UiState) -> (Color32, String) {
    let green = Color32::from_rgb(60, 170, 90);
    let amber = Color32::from_rgb(220, 160, 40);
    if state.paused() {
        let text = state
            .pause_text()
            .map_or_else(|| "Protection paused".into(), |t| format!("Protection {t}"));
        return (amber, text);
    }
    match &state.scheduler {
        Some(SchedulerView::Here) => (green, "Protecting (this window)".into()),
        Some(SchedulerView::Elsewhere { holder, status }) => match status {
            Some(_) => (green, format!("Protecting ({holder})")),
            None => (amber, format!("Protection run by {holder}")),
        },
        Some(SchedulerView::None) => (amber, "No scheduler runs".into()),
        None => (Color32::GRAY, String::new()),
    }
}

fn top_bar_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
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
        let (color, text) = scheduler_text(state);
        if !text.is_empty() {
            ui.separator();
            ui.colored_label(color, text);
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui
                .button("⚙ Settings")
                .on_hover_text("Destinations, protection, connection, start at login")
                .clicked()
            {
                let tab = if state
                    .config
                    .as_ref()
                    .is_some_and(|c| c.destinations.is_empty())
                {
                    SettingsTab::Destinations
                } else {
                    SettingsTab::Protection
                };
                state.settings = Some(SettingsState::open(state, tab));
            }
            let refresh = ui
                .add_enabled(
                    matches!(state.connection, Connection::Connected),
                    egui::Button::new("⟳ Refresh"),
                )
                .on_hover_text("List the virtual machines and checkpoints again");
            if refresh.clicked() {
                commands.push(Command::RefreshVms);
                commands.push(Command::RefreshCheckpoints);
            }
            if let Some(config) = state.config.clone()
                && !config.vms.is_empty()
            {
                if state.paused() {
                    if ui
                        .button("▶ Resume protection")
                        .on_hover_text("Take checkpoints on schedule again")
                        .clicked()
                    {
                        let mut c = (*config).clone();
                        c.resume();
                        commands.push(Command::SaveConfig(Box::new(c)));
                    }
                } else {
                    ui.menu_button("⏸ Pause protection", |ui| {
                        for pause in Pause::ALL {
                            if ui.button(pause.label()).clicked() {
                                let mut c = (*config).clone();
                                c.pause(pause, &Local::now());
                                commands.push(Command::SaveConfig(Box::new(c)));
                                ui.close();
                            }
                        }
                    })
                    .response
                    .on_hover_text("Take no scheduled checkpoints for a while");
                }
                if ui
                    .button("Checkpoint all now")
                    .on_hover_text("Take a checkpoint of every protected VM now")
                    .clicked()
                {
                    commands.push(Command::CheckpointNow { vm: None });
                }
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

/// The badge's colour.
pub fn badge_color(ui: &egui::Ui, badge: &Badge) -> Color32 {
    match badge {
        Badge::Protected => Color32::from_rgb(60, 170, 90),
        Badge::Paused => Color32::from_rgb(220, 160, 40),
        Badge::Failing { .. } => ui.visuals().error_fg_color,
        Badge::NotProtected => ui.visuals().weak_text_color(),
    }
}

pub(super) fn ago_text(state: &UiState, t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = u64::try_from((state.now - t).num_seconds()).unwrap_or(0);
    format!("{} ago", human_age_secs(secs))
}

fn vm_list_ui(ui: &mut egui::Ui, state: &mut UiState) {
    ui.add_space(4.0);
    ui.label(RichText::new("Virtual machines").strong());
    ui.add_space(4.0);
    let Some(vms) = state.vms.clone() else { return };
    egui::ScrollArea::vertical().show(ui, |ui| {
        for vm in &vms {
            let selected = state.selected.as_ref() == Some(&vm.uuid);
            let overview = state.overview(vm);
            let running = state.checkpointing(vm);
            ui.horizontal(|ui| {
                ui.label(RichText::new(state_dot(vm.state)).color(state_color(ui, vm.state)))
                    .on_hover_text(vm.state.label());
                let response = ui
                    .selectable_label(selected, &vm.name)
                    .on_hover_text(format!("{} — {}", vm.name, vm.state.label()));
                if response.clicked() && !selected {
                    state.selected = Some(vm.uuid.clone());
                    state.checkpoint = None;
                }
                if running {
                    ui.spinner().on_hover_text("A checkpoint is being taken");
                }
            });
            if let Some(run) = vm
                .uuid
                .parse::<uuid::Uuid>()
                .ok()
                .and_then(|u| state.runs.get(&u))
            {
                ui.horizontal(|ui| {
                    ui.add_space(18.0);
                    ui.label(
                        RichText::new(super::runfrom::LIST_NOTE)
                            .small()
                            .color(ui.visuals().warn_fg_color),
                    )
                    .on_hover_text(super::runfrom::banner_text(run));
                });
            }
            if let Some(o) = &overview {
                ui.horizontal_wrapped(|ui| {
                    ui.add_space(18.0);
                    let badge = ui.label(
                        RichText::new(o.badge.label())
                            .small()
                            .color(badge_color(ui, &o.badge)),
                    );
                    if let Badge::Failing { why } = &o.badge {
                        badge.on_hover_text(why);
                    }
                    if let Some(t) = o.last_checkpoint {
                        ui.label(
                            RichText::new(format!("· last {}", ago_text(state, t)))
                                .small()
                                .weak(),
                        );
                    }
                    for d in &o.destinations {
                        let (mark, color) = if d.available {
                            ("⏺", Color32::from_rgb(60, 170, 90))
                        } else {
                            ("○", ui.visuals().warn_fg_color)
                        };
                        ui.label(
                            RichText::new(format!("{mark} {}", d.name))
                                .small()
                                .color(color),
                        )
                        .on_hover_text(&d.detail);
                    }
                });
            }
            ui.add_space(2.0);
        }
        backup_only_list_ui(ui, state);
    });
}

/// The VMs only in backups, under the host's, and the way to open a backup drive.
fn backup_only_list_ui(ui: &mut egui::Ui, state: &mut UiState) {
    let gone = state.backup_only_vms();
    if !gone.is_empty() {
        ui.add_space(8.0);
        ui.label(RichText::new("Only in backups").strong())
            .on_hover_text("VMs that are not on this computer, with checkpoints in a destination");
        for (uuid, name) in gone {
            let id = uuid.to_string();
            let selected = state.selected.as_ref() == Some(&id);
            ui.horizontal(|ui| {
                ui.label(RichText::new("○").weak())
                    .on_hover_text("Not on this computer");
                if ui
                    .selectable_label(selected, &name)
                    .on_hover_text(format!("{name} — only in backups"))
                    .clicked()
                    && !selected
                {
                    state.selected = Some(id.clone());
                    state.checkpoint = None;
                }
            });
        }
    }
    ui.add_space(8.0);
    open_backup_button(ui, state);
}

/// "Open a backup…": a drive's or a folder's store, added as a destination so that its
/// VMs show here (the settings' own dialog, with its passphrase for an encrypted store).
fn open_backup_button(ui: &mut egui::Ui, state: &mut UiState) {
    if ui
        .button("Open a backup…")
        .on_hover_text(
            "Use the checkpoints on a drive or in a folder (from this computer or another): \
             its VMs appear here, to restore or to look through",
        )
        .clicked()
    {
        let mut settings = SettingsState::open(state, SettingsTab::Destinations);
        settings.start_picking_folder(ui.ctx().clone());
        state.settings = Some(settings);
    }
}

/// The lanes of `vm`'s timeline: its destinations, then any other destination that holds
/// checkpoints of it.
/// The timeline's lanes of the VM `uuid`: the destinations it is protected into (from
/// `overview`), then any other holding its checkpoints.
fn lanes_of<'a>(
    state: &'a UiState,
    uuid: uuid::Uuid,
    overview: Option<&VmOverview>,
) -> Vec<Lane<'a>> {
    let Some(destinations) = state.destinations.as_deref() else {
        return Vec::new();
    };
    let mut names: Vec<&str> = overview
        .map(|o| o.destinations.iter().map(|d| d.name.as_str()).collect())
        .unwrap_or_default();
    for d in destinations {
        if !names.contains(&d.destination.name.as_str())
            && d.checkpoints.iter().any(|c| c.vm_uuid == uuid)
        {
            names.push(&d.destination.name);
        }
    }
    names
        .into_iter()
        .filter_map(|n| destinations.iter().find(|d| d.destination.name == n))
        .map(|d| Lane {
            name: &d.destination.name,
            available: d.error.is_none()
                && !matches!(
                    d.found,
                    rewind_core::destination::Availability::Missing { .. }
                ),
            checkpoints: d.checkpoints.iter().filter(|c| c.vm_uuid == uuid).collect(),
        })
        .collect()
}

fn vm_ui(ui: &mut egui::Ui, state: &mut UiState, vm: &VmInfo, commands: &mut Commands) {
    let overview = state.overview(vm);
    ui.horizontal(|ui| {
        ui.heading(&vm.name);
        ui.label(RichText::new(vm.state.label()).color(state_color(ui, vm.state)));
        if let Some(o) = &overview {
            ui.label(
                RichText::new(o.badge.label())
                    .strong()
                    .color(badge_color(ui, &o.badge)),
            );
        }
    });
    if let Ok(uuid) = vm.uuid.parse::<uuid::Uuid>() {
        super::runfrom::banner_ui(ui, state, uuid, commands);
    }
    protection_summary_ui(ui, state, vm, overview.as_ref(), commands);
    ui.add_space(6.0);
    // Parsed once: formatting every checkpoint's UUID each frame costs milliseconds with
    // thousands of checkpoints.
    let lanes = vm
        .uuid
        .parse::<uuid::Uuid>()
        .map(|uuid| lanes_of(state, uuid, overview.as_ref()))
        .unwrap_or_default();
    let marks = Marks {
        now: state.now,
        next_run: overview.as_ref().and_then(|o| o.next_run),
        selected: state.checkpoint.as_ref(),
    };
    let mut view = state.timeline.clone();
    let chosen = if lanes.is_empty() {
        ui.label(
            RichText::new("No checkpoints of this VM yet. Protect it and its checkpoints appear here on a timeline.")
                .weak(),
        );
        None
    } else {
        timeline_ui(ui, &mut view, &lanes, marks)
    };
    drop(lanes);
    state.timeline = view;
    if let Some(key) = chosen {
        state.checkpoint = Some(key);
    }
    ui.add_space(8.0);
    if let Some(key) = state.checkpoint.clone()
        && let Some(c) = state.summary(&key).cloned()
    {
        checkpoint_details_ui(ui, state, &key, &c, commands);
    } else if state.destinations.as_ref().is_some_and(|d| !d.is_empty()) {
        ui.label(
            RichText::new("Select a checkpoint on the timeline to see it and restore it.").weak(),
        );
    }
    ui.add_space(8.0);
    egui::CollapsingHeader::new("About this VM")
        .default_open(false)
        .show(ui, |ui| vm_facts_ui(ui, vm));
}

/// A VM that is only in backups: its checkpoints on the timeline, to restore (in place
/// makes it again, with its name) or to look through.
fn backup_vm_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    uuid: uuid::Uuid,
    name: &str,
    commands: &mut Commands,
) {
    ui.horizontal(|ui| {
        ui.heading(name);
        ui.label(RichText::new("not on this computer").weak());
    });
    ui.label(
        "Its checkpoints are in the destinations below. Restore one to make the VM again on \
         this computer (with its name, or as a new VM), export a disk, or browse its files.",
    );
    ui.add_space(6.0);
    let lanes = lanes_of(state, uuid, None);
    let marks = Marks {
        now: state.now,
        next_run: None,
        selected: state.checkpoint.as_ref(),
    };
    let mut view = state.timeline.clone();
    let chosen = timeline_ui(ui, &mut view, &lanes, marks);
    drop(lanes);
    state.timeline = view;
    if let Some(key) = chosen {
        state.checkpoint = Some(key);
    }
    ui.add_space(8.0);
    if let Some(key) = state.checkpoint.clone()
        && let Some(c) = state.summary(&key).cloned()
    {
        checkpoint_details_ui(ui, state, &key, &c, commands);
    } else {
        ui.label(RichText::new("Select a checkpoint on the timeline.").weak());
    }
}

fn protection_summary_ui(
    ui: &mut egui::Ui,
    state: &mut UiState,
    vm: &VmInfo,
    overview: Option<&VmOverview>,
    commands: &mut Commands,
) {
    let protection = state
        .config
        .as_deref()
        .and_then(|c| rewind_core::view::overview::protection_of(c, &vm.name, &vm.uuid))
        .cloned();
    ui.horizontal_wrapped(|ui| match (&protection, overview) {
        (Some(p), Some(o)) => {
            let mut text = format!(
                "A checkpoint every {} into {}",
                interval_text(p.interval_secs),
                p.destinations.join(", ")
            );
            match o.last_checkpoint {
                Some(t) => {
                    write!(text, "; the last {}", ago_text(state, t))
                        .expect("writing to a String cannot fail");
                }
                None => text.push_str("; none yet"),
            }
            if let Some(next) = o.next_run {
                write!(
                    text,
                    "; next at {}",
                    next.with_timezone(&Local).format("%H:%M")
                )
                .expect("writing to a String cannot fail");
            }
            ui.label(text);
        }
        _ => {
            ui.label("Not protected: no checkpoints are taken of this VM.");
        }
    });
    if let Some(Badge::Failing { why }) = overview.map(|o| &o.badge) {
        ui.colored_label(ui.visuals().error_fg_color, format!("⚠ {why}"));
    }
    ui.horizontal(|ui| {
        let busy = state.checkpointing(vm);
        if protection.is_some() {
            if ui
                .add_enabled(!busy, egui::Button::new("Checkpoint now"))
                .on_hover_text("Take a checkpoint of this VM now, into each of its destinations")
                .clicked()
            {
                commands.push(Command::CheckpointNow {
                    vm: Some(vm.name.clone()),
                });
            }
            if ui.button("Protection settings…").clicked() {
                let mut s = SettingsState::open(state, SettingsTab::Protection);
                s.vm = Some(vm.uuid.clone());
                state.settings = Some(s);
            }
        } else if ui
            .button("Protect this VM…")
            .on_hover_text("Choose where and how often its checkpoints are taken")
            .clicked()
        {
            let mut s = SettingsState::open(state, SettingsTab::Protection);
            s.vm = Some(vm.uuid.clone());
            s.start_protecting(state, vm);
            state.settings = Some(s);
        }
        if busy {
            ui.spinner();
            ui.label("Taking a checkpoint…");
        }
    });
}

pub(super) fn state_color(ui: &egui::Ui, state: VmState) -> Color32 {
    match state {
        VmState::Running => Color32::from_rgb(60, 170, 90),
        VmState::Paused | VmState::PmSuspended => Color32::from_rgb(220, 160, 40),
        VmState::Crashed => ui.visuals().error_fg_color,
        _ => ui.visuals().weak_text_color(),
    }
}

pub(super) fn state_dot(state: VmState) -> &'static str {
    match state {
        VmState::Running => "▶",
        VmState::Paused | VmState::PmSuspended => "⏸",
        VmState::Crashed => "✖",
        _ => "■",
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
                drop(main_ui(ui, state));
            },
            std::mem::take(&mut state),
        );
        harness.run();
        assert_eq!(harness.state().selected, None);
        harness.get_by_label("test").click();
        harness.run();
        assert_eq!(harness.state().selected.as_deref(), Some(vm.uuid.as_str()));
        // The VM's facts are a click away.
        harness.get_by_label("About this VM").click();
        harness.run();
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
        assert!(
            matches!(
                sent.as_slice(),
                [Command::RefreshVms, Command::RefreshCheckpoints]
            ),
            "{sent:?}"
        );
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
                drop(main_ui(ui, state));
            },
            state,
        );
        harness.run();
        harness.get_by_label("Rewind cannot reach libvirt");
        harness.get_by_label("the libvirt daemon is not running");
    }
}
