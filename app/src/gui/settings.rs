//! The settings window: destinations (a drive or folder, with the folder picker, optionally
//! encrypted), per-VM protection (interval, destinations, retention, kind, consistency),
//! the libvirt connection, start at login and notifications.
//!
//! It edits a draft of the configuration; "Save" sends it to the engine, which writes it
//! (the scheduler picks it up). Adding a destination goes to the engine at once, since it
//! creates or opens a store.

use std::path::PathBuf;
use std::sync::mpsc;

use egui::RichText;
use rewind_core::config::{self, Config, Kind, Protection};
use rewind_core::destination::Added;
use rewind_core::engine::Command;
use rewind_core::units::{human_bytes, interval_text};
use rewind_core::vm::VmInfo;
use zeroize::Zeroizing;

use super::Commands;
use super::state::UiState;

/// The tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsTab {
    /// Where checkpoints go.
    Destinations,
    /// Which VMs, how often, how many kept.
    Protection,
    /// Connection, start at login, notifications.
    General,
}

/// Intervals offered (others typed in the configuration stay as they are).
const INTERVALS_SECS: [u64; 8] = [
    5 * 60,
    15 * 60,
    30 * 60,
    3600,
    2 * 3600,
    4 * 3600,
    12 * 3600,
    86_400,
];

/// What the settings window edits.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // one per checkbox or wait of the form
pub struct SettingsState {
    /// The open tab.
    pub tab: SettingsTab,
    /// The configuration being edited.
    pub draft: Config,
    /// The configuration it was made from (unsaved changes are the difference).
    pub base: Config,
    /// The VM (UUID) shown in the protection tab.
    pub vm: Option<String>,
    /// The folder to add.
    pub folder: String,
    /// Encrypt a new store.
    pub encrypt: bool,
    /// Its passphrase, twice.
    pub passphrase: Zeroizing<String>,
    /// The passphrase again.
    pub passphrase_again: Zeroizing<String>,
    /// A destination is being added.
    pub adding: bool,
    /// What adding the last destination said.
    pub add_message: Option<Result<String, String>>,
    /// The folder picker's answer, while it is open.
    picker: Option<mpsc::Receiver<Option<PathBuf>>>,
    /// Start at login (as the engine found it when the settings opened, then as set).
    pub autostart: bool,
    /// The libvirt URI typed in.
    pub uri: String,
    /// The settings add a folder on another host rather than here.
    pub remote: bool,
    /// The `ssh://` address typed in.
    pub remote_url: String,
    /// A connection test is under way.
    pub testing: bool,
    /// What the last connection test said.
    pub test_message: Option<Result<String, String>>,
    /// A host met for the first time, whose key the user is asked to confirm: the location
    /// tested, the host as shown, its keys.
    pub unknown_host: Option<(String, String, Vec<rewind_core::ssh_identity::HostKey>)>,
}

impl SettingsState {
    /// Opens the folder dialog of "Add a destination" (its answer is taken in by the
    /// settings window).
    pub fn start_picking_folder(&mut self, ctx: egui::Context) {
        self.remote = false;
        self.picker = Some(pick_folder(ctx));
    }

    /// Opens on `tab`, editing the configuration in use.
    pub fn open(state: &UiState, tab: SettingsTab) -> Self {
        let config = state.config.as_deref().cloned().unwrap_or_default();
        Self {
            tab,
            uri: config.uri.clone(),
            draft: config.clone(),
            base: config,
            vm: state.selected.clone(),
            folder: String::new(),
            encrypt: false,
            passphrase: Zeroizing::default(),
            passphrase_again: Zeroizing::default(),
            adding: false,
            add_message: None,
            picker: None,
            autostart: state.autostart.unwrap_or(false),
            remote: false,
            remote_url: String::new(),
            testing: false,
            test_message: None,
            unknown_host: None,
        }
    }

    /// A host met for the first time (ignored when the address changed since).
    pub fn host_key_unknown(
        &mut self,
        location: &str,
        host: String,
        keys: Vec<rewind_core::ssh_identity::HostKey>,
    ) {
        if location == self.remote_url.trim() {
            self.unknown_host = Some((location.to_owned(), host, keys));
        }
    }

    /// The answer to a connection test (ignored when the address changed since).
    pub fn destination_tested(&mut self, location: &str, result: Result<String, String>) {
        if location == self.remote_url.trim() {
            self.testing = false;
            self.test_message = Some(result);
        }
    }

    /// Adds a protection for `vm` to the draft (into the first destination, if any).
    pub fn start_protecting(&mut self, state: &UiState, vm: &VmInfo) {
        let _ = state;
        if rewind_core::view::overview::protection_of(&self.draft, &vm.name, &vm.uuid).is_none() {
            self.draft.vms.push(Protection {
                vm: vm.name.clone(),
                uuid: Some(vm.uuid.clone()),
                destinations: self
                    .draft
                    .destinations
                    .first()
                    .map(|d| vec![d.name.clone()])
                    .unwrap_or_default(),
                ..Protection::default()
            });
        }
    }

    /// The engine saved a configuration: new destinations show in the draft.
    pub fn config_changed(&mut self, config: &Config) {
        for d in &config.destinations {
            if !self.draft.destinations.iter().any(|x| x.name == d.name) {
                self.draft.destinations.push(d.clone());
            }
            if !self.base.destinations.iter().any(|x| x.name == d.name) {
                self.base.destinations.push(d.clone());
            }
        }
    }

    /// The engine's answer to adding a destination.
    pub fn destination_added(&mut self, result: Result<Added, String>, warning: Option<String>) {
        self.adding = false;
        self.add_message = Some(result.map(|a| {
            let mut text = if a.existed {
                format!("{} is already a destination ({}).", a.location, a.name)
            } else if a.created {
                format!(
                    "Created a new store at {} as destination {}.",
                    a.location, a.name
                )
            } else {
                format!(
                    "Added the store at {} as destination {}.",
                    a.location, a.name
                )
            };
            if let Some(w) = warning {
                text.push_str("\n⚠ ");
                text.push_str(&w);
            }
            // A VM being protected without a destination gets this one.
            for p in &mut self.draft.vms {
                if p.destinations.is_empty() {
                    p.destinations.push(a.name.clone());
                }
            }
            text
        }));
        self.folder.clear();
        self.passphrase = Zeroizing::default();
        self.passphrase_again = Zeroizing::default();
    }

    /// Whether the draft differs from what is saved.
    pub fn unsaved(&self) -> bool {
        self.draft != self.base
    }

    /// What is wrong with the draft, if anything (Save is refused until fixed).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.draft.vms {
            if p.destinations.is_empty() {
                out.push(format!(
                    "{} has no destination: tick one, or add a drive first.",
                    p.vm
                ));
            }
            if p.keep.is_empty() {
                out.push(format!(
                    "{} keeps nothing: keep at least the last checkpoint.",
                    p.vm
                ));
            }
            if let Err(e) = config::check_interval(p.interval_secs) {
                out.push(format!("{}: {e}", p.vm));
            }
        }
        out
    }
}

/// Draws the settings window.
pub fn settings_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    let Some(mut s) = state.settings.take() else {
        return;
    };
    let mut open = true;
    let mut close = false;
    egui::Window::new("Settings")
        .id(egui::Id::unique("settings_window"))
        .open(&mut open)
        .default_size([640.0, 480.0])
        .collapsible(false)
        .show(ui.ctx(), |ui| {
            ui.horizontal(|ui| {
                ui.selectable_value(&mut s.tab, SettingsTab::Destinations, "Destinations");
                ui.selectable_value(&mut s.tab, SettingsTab::Protection, "Protection");
                ui.selectable_value(&mut s.tab, SettingsTab::General, "General");
            });
            ui.separator();
            egui::ScrollArea::vertical()
                .max_height(380.0)
                .show(ui, |ui| match s.tab {
                    SettingsTab::Destinations => destinations_ui(ui, state, &mut s, commands),
                    SettingsTab::Protection => protection_ui(ui, state, &mut s),
                    SettingsTab::General => {
                        general_ui(ui, &mut s, state.autostart_note.as_deref(), commands);
                    }
                });
            ui.separator();
            let problems = s.problems();
            for p in &problems {
                ui.colored_label(ui.visuals().warn_fg_color, p);
            }
            ui.horizontal(|ui| {
                let save = ui.add_enabled(
                    s.unsaved() && problems.is_empty(),
                    egui::Button::new("Save"),
                );
                if save.clicked() {
                    commands.push(Command::SaveConfig(Box::new(s.draft.clone())));
                    s.base = s.draft.clone();
                }
                if ui
                    .add_enabled(s.unsaved(), egui::Button::new("Discard changes"))
                    .clicked()
                {
                    s.draft = s.base.clone();
                }
                if ui.button("Close").clicked() {
                    close = true;
                }
                if s.unsaved() {
                    ui.label(RichText::new("Unsaved changes").weak());
                }
            });
        });
    if open && !close {
        state.settings = Some(s);
    }
}

fn destinations_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    s: &mut SettingsState,
    commands: &mut Commands,
) {
    ui.label(RichText::new("Where checkpoints go").strong());
    ui.label(
        RichText::new(
            "A removable drive is best: checkpoints on the disk the VMs are on do not survive that disk failing.",
        )
        .weak(),
    );
    ui.add_space(4.0);
    let views = state.destinations.as_deref().map_or(&[][..], |d| &d[..]);
    let mut remove = None;
    egui::Grid::new("destinations_grid")
        .num_columns(4)
        .striped(true)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            for d in &s.draft.destinations {
                ui.label(RichText::new(&d.name).strong());
                ui.label(&d.location);
                match views.iter().find(|v| v.destination.name == d.name) {
                    Some(v) => {
                        let count = v.checkpoints.len();
                        let size: u64 = v.checkpoints.iter().map(|c| c.new_bytes).sum();
                        match (&v.found, &v.error) {
                            (_, Some(e)) => ui.colored_label(ui.visuals().error_fg_color, e),
                            (rewind_core::destination::Availability::Missing { reason }, None) => {
                                ui.colored_label(ui.visuals().warn_fg_color, "absent").on_hover_text(reason)
                            }
                            _ => ui
                                .label(format!(
                                    "{count} checkpoints, {} · {}",
                                    human_bytes(size),
                                    v.fully_checked.map_or_else(
                                        || "not checked whole yet".to_owned(),
                                        |t| format!(
                                            "checked whole {}",
                                            t.with_timezone(&chrono::Local).format("%Y-%m-%d")
                                        )
                                    )
                                ))
                                .on_hover_text(fully_checked_text(v.fully_checked)),
                        };
                    }
                    None => {
                        ui.label(RichText::new("not saved yet").weak());
                    }
                }
                let used = s.draft.vms.iter().any(|p| p.destinations.contains(&d.name));
                if ui
                    .button("Remove")
                    .on_hover_text(if used {
                        "Stop using it (VMs protected into it lose it; the store and its checkpoints stay on the drive)"
                    } else {
                        "Stop using it (the store and its checkpoints stay on the drive)"
                    })
                    .clicked()
                {
                    remove = Some(d.name.clone());
                }
                ui.end_row();
            }
        });
    if s.draft.destinations.is_empty() {
        ui.label(RichText::new("No destination yet.").weak());
    }
    if let Some(name) = remove {
        s.draft.destinations.retain(|d| d.name != name);
        for p in &mut s.draft.vms {
            p.destinations.retain(|d| *d != name);
        }
    }
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        ui.label(RichText::new("Add").strong());
        ui.radio_value(&mut s.remote, false, "a drive or folder here");
        ui.radio_value(&mut s.remote, true, "a folder on another host (SSH)");
    });
    if s.remote {
        add_remote_ui(ui, state.ssh_public_key.as_deref(), s, commands);
    } else {
        add_folder_ui(ui, state, s, commands);
    }
}

/// What is wrong with an `ssh://` address typed in, said before the engine is asked.
fn remote_url_problem(url: &str) -> Option<&'static str> {
    let url = url.trim();
    if url.is_empty() {
        Some("Type the address of the folder on the other host.")
    } else if !url.starts_with("ssh://") {
        Some("The address starts with ssh://, e.g. ssh://you@nas/srv/rewind.")
    } else if !url["ssh://".len()..].contains('/') {
        Some("Add the folder on that host after its name, e.g. ssh://you@nas/srv/rewind.")
    } else {
        None
    }
}

/// The form for a store on another host: the address, a connection test, and the same
/// encryption choice as for a folder.
fn add_remote_ui(
    ui: &mut egui::Ui,
    service_key: Option<&str>,
    s: &mut SettingsState,
    commands: &mut Commands,
) {
    if let Some(key) = service_key {
        ui.label(
            RichText::new(
                "Rewind's protection service logs in with a key of its own. Add this line to ~/.ssh/authorized_keys of the account on the host:",
            )
            .weak(),
        );
        ui.horizontal(|ui| {
            let mut shown = key.to_owned();
            ui.add(
                egui::TextEdit::singleline(&mut shown)
                    .font(egui::TextStyle::Monospace)
                    .desired_width(480.0),
            );
            if ui.button("Copy").clicked() {
                ui.ctx().copy_text(key.to_owned());
            }
        });
    } else {
        ui.label(
            RichText::new(
                "Rewind logs in with your own SSH set-up (~/.ssh/config, keys, agent, known_hosts); the host must be reachable without a password prompt.",
            )
            .weak(),
        );
    }
    ui.horizontal(|ui| {
        let label = ui.label("Address");
        let edit = ui
            .add(
                egui::TextEdit::singleline(&mut s.remote_url)
                    .hint_text("ssh://you@nas/srv/rewind")
                    .desired_width(320.0),
            )
            .labelled_by(label.id);
        if edit.changed() {
            s.test_message = None;
            s.testing = false;
            s.unknown_host = None;
        }
        let test = ui.add_enabled(
            remote_url_problem(&s.remote_url).is_none() && !s.testing,
            egui::Button::new("Test connection"),
        );
        if test.clicked() {
            commands.push(Command::TestDestination {
                location: s.remote_url.trim().to_owned(),
            });
            s.testing = true;
            s.test_message = None;
        }
        if s.testing {
            ui.spinner();
            ui.label("Connecting…");
        }
    });
    host_key_ui(ui, s, commands);
    match &s.test_message {
        Some(Ok(text)) => {
            ui.colored_label(ui.visuals().hyperlink_color, text);
        }
        Some(Err(e)) => {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        None => {}
    }
    passphrase_ui(ui, s);
    let problem = remote_url_problem(&s.remote_url).or_else(|| passphrase_problem(s));
    add_button_ui(
        ui,
        s,
        problem,
        |s| Command::AddRemoteDestination {
            url: s.remote_url.trim().to_owned(),
            passphrase: s.encrypt.then(|| Zeroizing::new((*s.passphrase).clone())),
        },
        commands,
    );
}

/// A host met for the first time: its key's fingerprint, to compare with the host's own,
/// and whether to trust it.
fn host_key_ui(ui: &mut egui::Ui, s: &mut SettingsState, commands: &mut Commands) {
    let Some((location, host, keys)) = s.unknown_host.clone() else {
        return;
    };
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.label(RichText::new(format!("First connection to {host}")).strong());
        ui.label(
            "Is this your host? Compare its key with the one the host itself shows (on it: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub). A different key can mean that someone is in between.",
        );
        let key = keys
            .iter()
            .find(|k| k.kind == "ED25519")
            .or_else(|| keys.first());
        if let Some(key) = key {
            ui.label(RichText::new(format!("{} key {}", key.kind, key.fingerprint)).monospace());
        }
        ui.horizontal(|ui| {
            if let Some(key) = key
                && ui.button("Trust this host").clicked()
            {
                commands.push(Command::TrustHostKey {
                    location: location.clone(),
                    line: key.line.clone(),
                });
                s.unknown_host = None;
                s.testing = true;
                s.test_message = None;
            }
            if ui.button("Cancel").clicked() {
                s.unknown_host = None;
            }
        });
    });
}

fn passphrase_problem(s: &SettingsState) -> Option<&'static str> {
    if s.encrypt && s.passphrase.len() < 8 {
        Some("The passphrase needs 8 characters or more.")
    } else if s.encrypt && *s.passphrase != *s.passphrase_again {
        Some("The two passphrases differ.")
    } else {
        None
    }
}

/// The drive-or-folder form, shared by the settings and the first-run guide.
pub fn add_folder_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    s: &mut SettingsState,
    commands: &mut Commands,
) {
    if let Some(rx) = &s.picker {
        match rx.try_recv() {
            Ok(Some(path)) => {
                s.folder = path.display().to_string();
                s.picker = None;
            }
            Ok(None) | Err(mpsc::TryRecvError::Disconnected) => s.picker = None,
            Err(mpsc::TryRecvError::Empty) => {}
        }
    }
    ui.horizontal(|ui| {
        let label = ui.label("Folder");
        ui.add(
            egui::TextEdit::singleline(&mut s.folder)
                .hint_text("/media/you/BACKUP/rewind")
                .desired_width(320.0),
        )
        .labelled_by(label.id);
        let browse = ui.add_enabled(s.picker.is_none(), egui::Button::new("Browse…"));
        if browse.clicked() {
            s.picker = Some(pick_folder(ui.ctx().clone()));
        }
    });
    passphrase_ui(ui, s);
    let problem = if s.folder.trim().is_empty() {
        Some("Choose a folder (on a removable drive, ideally).")
    } else if !s.folder.trim().starts_with('/') {
        Some("The folder must be a full path (starting with /).")
    } else {
        passphrase_problem(s)
    };
    let vm_disks: Vec<PathBuf> = state
        .vms
        .iter()
        .flatten()
        .flat_map(|v| {
            v.protected_disks()
                .filter_map(|d| d.path().cloned())
                .collect::<Vec<_>>()
        })
        .collect();
    add_button_ui(
        ui,
        s,
        problem,
        move |s| Command::AddFolderDestination {
            folder: PathBuf::from(s.folder.trim()),
            passphrase: s.encrypt.then(|| Zeroizing::new((*s.passphrase).clone())),
            vm_disks: vm_disks.clone(),
        },
        commands,
    );
}

/// Whether to encrypt a new store, and its passphrase twice.
fn passphrase_ui(ui: &mut egui::Ui, s: &mut SettingsState) {
    ui.checkbox(&mut s.encrypt, "Encrypt the new store with a passphrase");
    if s.encrypt {
        egui::Grid::new("passphrase_grid")
            .num_columns(2)
            .show(ui, |ui| {
                let label = ui.label("Passphrase");
                ui.add(egui::TextEdit::singleline(&mut *s.passphrase).password(true))
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Passphrase again");
                ui.add(egui::TextEdit::singleline(&mut *s.passphrase_again).password(true))
                    .labelled_by(label.id);
                ui.end_row();
            });
        ui.label(
            RichText::new(
                "Without the passphrase nobody can read the checkpoints — not even you. Rewind keeps it in a file only you can read, so checkpoints run by themselves.",
            )
            .weak(),
        );
    }
}

/// "Add destination" (enabled once `problem` is `None`), the wait for the engine's answer,
/// and what it said.
fn add_button_ui(
    ui: &mut egui::Ui,
    s: &mut SettingsState,
    problem: Option<&str>,
    command: impl Fn(&SettingsState) -> Command,
    commands: &mut Commands,
) {
    let typed = if s.remote {
        !s.remote_url.is_empty()
    } else {
        !s.folder.is_empty()
    };
    ui.horizontal(|ui| {
        let add = ui.add_enabled(
            problem.is_none() && !s.adding,
            egui::Button::new("Add destination"),
        );
        if add.clicked() {
            commands.push(command(s));
            s.adding = true;
            s.add_message = None;
        }
        if s.adding {
            ui.spinner();
            ui.label("Opening the store…");
        } else if let Some(p) = problem
            && typed
        {
            ui.label(RichText::new(p).weak());
        }
    });
    match &s.add_message {
        Some(Ok(text)) => {
            ui.label(text);
        }
        Some(Err(e)) => {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        None => {}
    }
}

/// Opens the desktop's folder picker on a thread of its own; the answer arrives on the
/// channel and wakes the window.
fn pick_folder(ctx: egui::Context) -> mpsc::Receiver<Option<PathBuf>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = ["/media", "/run/media", "/mnt"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .unwrap_or_else(|| PathBuf::from("/"));
        // The dialog blocks this thread only (the desktop portal, or zenity without one).
        let picked = rfd::FileDialog::new()
            .set_title("Choose a folder for Rewind's checkpoints")
            .set_directory(start)
            .pick_folder();
        // A receiver gone: the settings were closed meanwhile; the choice is not wanted.
        drop(tx.send(picked));
        ctx.request_repaint();
    });
    rx
}

#[allow(clippy::too_many_lines)] // one form, top to bottom as the user reads it
fn protection_ui(ui: &mut egui::Ui, state: &UiState, s: &mut SettingsState) {
    let Some(vms) = &state.vms else {
        ui.label("Connecting to libvirt…");
        return;
    };
    if vms.is_empty() {
        ui.label("There are no virtual machines yet.");
        return;
    }
    let selected =
        s.vm.clone()
            .filter(|u| vms.iter().any(|v| &v.uuid == u))
            .unwrap_or_else(|| vms[0].uuid.clone());
    let vm = vms
        .iter()
        .find(|v| v.uuid == selected)
        .cloned()
        .unwrap_or_else(|| vms[0].clone());
    ui.horizontal(|ui| {
        let label = ui.label("Virtual machine");
        egui::ComboBox::from_id_salt("protection_vm")
            .selected_text(vm.name.clone())
            .show_ui(ui, |ui| {
                for v in vms {
                    if ui.selectable_label(v.uuid == vm.uuid, &v.name).clicked() {
                        s.vm = Some(v.uuid.clone());
                    }
                }
            })
            .response
            .labelled_by(label.id);
    });
    let index = s
        .draft
        .vms
        .iter()
        .position(|p| p.uuid.as_deref() == Some(vm.uuid.as_str()))
        .or_else(|| {
            s.draft
                .vms
                .iter()
                .position(|p| p.uuid.is_none() && p.vm == vm.name)
        });
    let mut protected = index.is_some();
    if ui
        .checkbox(&mut protected, format!("Protect {}", vm.name))
        .changed()
    {
        if protected {
            s.vm = Some(vm.uuid.clone());
            s.start_protecting(state, &vm);
        } else if let Some(i) = index {
            s.draft.vms.remove(i);
        }
        return;
    }
    let Some(i) = index else {
        ui.label(RichText::new("Not protected: Rewind takes no checkpoints of it.").weak());
        return;
    };
    let names: Vec<String> = s
        .draft
        .destinations
        .iter()
        .map(|d| d.name.clone())
        .collect();
    let p = &mut s.draft.vms[i];
    egui::Grid::new("protection_grid")
        .num_columns(2)
        .spacing([16.0, 6.0])
        .show(ui, |ui| {
            let label = ui.label("Every");
            egui::ComboBox::from_id_salt("interval")
                .selected_text(interval_text(p.interval_secs))
                .show_ui(ui, |ui| {
                    for secs in INTERVALS_SECS {
                        ui.selectable_value(&mut p.interval_secs, secs, interval_text(secs));
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
            ui.label("Into");
            ui.vertical(|ui| {
                if names.is_empty() {
                    ui.label(RichText::new("No destination yet: add one in Destinations.").weak());
                }
                for name in &names {
                    let mut on = p.destinations.contains(name);
                    if ui.checkbox(&mut on, name).changed() {
                        if on {
                            p.destinations.push(name.clone());
                        } else {
                            p.destinations.retain(|d| d != name);
                        }
                    }
                }
            });
            ui.end_row();
            ui.label("Keep");
            ui.vertical(|ui| {
                let k = &mut p.keep;
                let rule = |ui: &mut egui::Ui, value: &mut u32, what: &str| {
                    ui.horizontal(|ui| {
                        let value = ui.add(egui::DragValue::new(value).range(0..=999));
                        let label = ui.label(what);
                        value.labelled_by(label.id);
                    });
                };
                rule(ui, &mut k.last, "most recent");
                rule(ui, &mut k.hourly, "hourly (newest of each hour)");
                rule(ui, &mut k.daily, "daily");
                rule(ui, &mut k.weekly, "weekly");
                rule(ui, &mut k.monthly, "monthly");
                rule(ui, &mut k.yearly, "yearly");
            });
            ui.end_row();
            ui.label("What");
            ui.vertical(|ui| {
                ui.radio_value(&mut p.kind, Kind::Disk, "Disks (and UEFI variables, TPM state)");
                ui.radio_value(
                    &mut p.kind,
                    Kind::Full,
                    "Full state: memory too, so a restore resumes the VM where it was",
                )
                .on_hover_text("The VM pauses for a moment at each checkpoint while its memory is saved");
                full_state_every_ui(ui, p);
                ui.checkbox(
                    &mut p.quiesce,
                    "Freeze the guest's file systems first (application-consistent; needs the QEMU guest agent)",
                );
            });
            ui.end_row();
            ui.label("Paused");
            ui.checkbox(&mut p.paused, "Take no scheduled checkpoints of this VM for now");
            ui.end_row();
        });
}

/// With disk checkpoints: "and one with memory too every N hours".
fn full_state_every_ui(ui: &mut egui::Ui, p: &mut rewind_core::config::Protection) {
    if p.kind != Kind::Disk {
        p.full_state_every_secs = None;
        return;
    }
    ui.horizontal(|ui| {
        let mut on = p.full_state_every_secs.is_some();
        let text = if on {
            "and the memory too, every"
        } else {
            "and the memory too, now and then (full state)"
        };
        if ui.checkbox(&mut on, text).changed() {
            p.full_state_every_secs = on.then_some(3600);
        }
        if let Some(secs) = p.full_state_every_secs.as_mut() {
            let mut hours = (*secs / 3600).max(1);
            let value = ui.add(egui::DragValue::new(&mut hours).range(1..=168));
            let label = ui.label("hours");
            value.labelled_by(label.id);
            *secs = hours * 3600;
        }
    });
}

/// `autostart_note`: what came of turning start at login on or off.
fn general_ui(
    ui: &mut egui::Ui,
    s: &mut SettingsState,
    autostart_note: Option<&str>,
    commands: &mut Commands,
) {
    ui.label(RichText::new("Connection").strong());
    ui.horizontal(|ui| {
        let label = ui.label("libvirt URI");
        ui.add(egui::TextEdit::singleline(&mut s.uri).desired_width(280.0))
            .labelled_by(label.id)
            .labelled_by(label.id);
    });
    if s.uri.trim() != s.draft.uri {
        s.draft.uri = s.uri.trim().to_owned();
    }
    ui.label(
        RichText::new("qemu:///session for your own VMs, qemu:///system for the system's (virt-manager's default). The window reconnects when saved.")
            .weak(),
    );
    ui.add_space(8.0);
    ui.label(RichText::new("Start").strong());
    let mut autostart = s.autostart;
    if ui
        .checkbox(&mut autostart, "Start Rewind at login (in the tray)")
        .changed()
    {
        s.autostart = autostart;
        commands.push(Command::SetAutostart(autostart));
    }
    if let Some(text) = autostart_note {
        ui.label(RichText::new(text).weak());
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Notifications").strong());
    let n = &mut s.draft.notifications;
    ui.checkbox(&mut n.on_failure, "When a checkpoint fails");
    ui.checkbox(
        &mut n.on_stale,
        "When a VM's newest checkpoint gets old (drive missing for long)",
    );
    ui.checkbox(&mut n.on_success, "When a checkpoint succeeds");
    ui.add_space(8.0);
    ui.label(RichText::new("Work").strong());
    ui.horizontal(|ui| {
        let value = ui.add(egui::DragValue::new(&mut s.draft.max_concurrent_jobs).range(1..=8));
        let label = ui.label("checkpoints at once (of different VMs)");
        value.labelled_by(label.id);
    });
}

/// When every chunk of a destination's store was last re-hashed, for the destinations list.
fn fully_checked_text(at: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match at {
        Some(t) => format!(
            "Every chunk re-read and checked since {} (a share of the store is checked each day)",
            t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M")
        ),
        None => "Not fully checked yet: a share of the store is re-read and checked each day, \
                 all of it within four weeks"
            .to_owned(),
    }
}
