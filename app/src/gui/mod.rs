//! The desktop window (eframe/egui) and the tray icon.
//!
//! Split like rerun's viewer: [`RewindApp::logic`] drains engine events into [`UiState`]
//! within a time budget; the `*_ui` functions draw that state and return [`Command`]s for
//! the engine, doing nothing themselves. The UI thread never waits on libvirt, disks or the
//! network: the engine wakes it with `request_repaint` when something arrives, and an idle
//! window repaints only once a minute (for "5 min ago").
//!
//! The window hosts the scheduler unless `rewind daemon` runs one. With a tray, closing the
//! window hides it and Rewind keeps protecting; without one, closing asks first.

mod activity;
#[cfg(test)]
mod bench;
mod bootcheck;
mod details;
pub mod dialogs;
pub mod files;
pub mod instance;
mod runfrom;
pub mod settings;
pub mod setup;
pub mod state;
#[cfg(test)]
mod tests;
pub mod timeline;
pub mod tray;
mod vm_list;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rewind_core::engine::{self, Command, EngineHandle, EngineOptions, SchedulerView};
use rewind_core::scheduler::Paths;

pub use state::{Connection, UiState};
pub use tray::{Tray, TrayAction, TrayLook, TrayState};
pub use vm_list::main_ui;

/// How long one frame may spend applying engine events.
const EVENT_BUDGET: Duration = Duration::from_millis(10);
/// An idle window redraws this often, for the ages and the "now" line.
const CLOCK_REPAINT: Duration = Duration::from_mins(1);
/// The key of the window's preferences in eframe's storage.
const PREFS_KEY: &str = "rewind-prefs";

/// The application icon, also shipped in `assets/` for the desktop entry.
const ICON_PNG: &[u8] = include_bytes!("../../../assets/rewind-256.png");

/// Commands the UI asks for in one frame.
pub type Commands = Vec<Command>;

/// How to open the window.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The libvirt URI given on the command line (else the configuration's).
    pub uri: Option<String>,
    /// Start in the tray, without showing the window.
    pub minimized: bool,
}

/// Opens the window and runs until it is closed (or, with a tray, until Quit).
pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let through_service = goes_through_service(options.uri.is_some());
    if options.minimized && through_service {
        // Start at login, as an older autostart entry asks: the tray is its own process now.
        return crate::tray_app::run();
    }
    let config_uri =
        rewind_core::config::Config::load_or_last_good(&rewind_core::config::config_path())
            .0
            .uri;
    let uri = options.uri.clone().unwrap_or(config_uri);
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("Rewind")
        // The desktop entry's ID (packaging/), so that the desktop matches the window to it.
        .with_app_id("io.github.rewindvm.Rewind")
        .with_inner_size([1040.0, 680.0])
        .with_min_inner_size([640.0, 420.0]);
    match load_icon() {
        Ok(icon) => viewport = viewport.with_icon(icon),
        Err(e) => eprintln!(
            "warning: the window icon could not be loaded: {}",
            crate::error_text::one_line(&e)
        ),
    }
    let mut listener = match instance::claim(instance::Role::Window) {
        Ok(instance::Instance::Shown) => {
            eprintln!("Rewind is open already: its window was brought to the front");
            return Ok(());
        }
        Ok(instance::Instance::First(listener)) => Some(listener),
        Err(e) => {
            eprintln!("note: a second launch will open a second window ({e})");
            None
        }
    };
    let first = listener.is_some();
    let native = eframe::NativeOptions {
        viewport,
        persist_window: true,
        ..Default::default()
    };
    let result = eframe::run_native(
        "rewind",
        native,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let waker_ctx = ctx.clone();
            let waker: engine::Waker = Arc::new(move || waker_ctx.request_repaint());
            let engine = start_engine(through_service, &uri, waker)?;
            let mut app = RewindApp::new(engine, uri, options.uri.is_some() || through_service);
            if let Some(storage) = cc.storage
                && let Some(prefs) = eframe::get_value::<Prefs>(storage, PREFS_KEY)
            {
                prefs.apply(&mut app.state);
            }
            if !through_service {
                // The window hosts protection itself: its tray icon lives here. Through the
                // service, the tray is a process of its own (`rewind tray`).
                app.start_tray(&ctx);
            }
            if let Some(listener) = listener.take() {
                let actions = app.tray_actions.clone();
                let ctx = ctx.clone();
                instance::listen(listener, move || {
                    actions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(TrayAction::Open);
                    ctx.request_repaint();
                })?;
            }
            if options.minimized {
                if app.state.tray_shown {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Visible(false));
                } else {
                    eprintln!("note: no tray to start in, so the window opens");
                }
            }
            Ok(Box::new(app))
        }),
    );
    if first {
        instance::release(instance::Role::Window);
    }
    result.map_err(|e| anyhow::anyhow!("{e}")).context(
        "could not open the Rewind window. Is a graphical session running (DISPLAY or \
         WAYLAND_DISPLAY set)? Command-line use works without one: see `rewind --help`",
    )
}

/// Whether the window (or the tray) works through the protection service: whenever the
/// service runs, and always for a user who is not root (only the service can do the work
/// then; until it runs, the window says so and keeps trying). Root with no service, or with
/// a libvirt URI named on the command line, works by itself.
fn goes_through_service(uri_named: bool) -> bool {
    let root = rustix::process::geteuid().is_root();
    !uri_named
        && (!root || std::os::unix::net::UnixStream::connect(rewind_service::socket_path()).is_ok())
}

/// The window's engine: the protection service's, or one of the window's own.
fn start_engine(
    through_service: bool,
    uri: &str,
    waker: engine::Waker,
) -> std::io::Result<EngineHandle> {
    if through_service {
        return rewind_service::client::engine("window", rewind_service::socket_path(), waker);
    }
    engine::spawn_with(
        EngineOptions {
            uri: uri.to_owned(),
            scheduler: Some(engine::THE_WINDOW),
            paths: Paths::default(),
        },
        waker,
    )
}

fn load_icon() -> anyhow::Result<egui::IconData> {
    let image = image::load_from_memory_with_format(ICON_PNG, image::ImageFormat::Png)
        .context("the built-in icon is not a valid PNG")?
        .into_rgba8();
    let (width, height) = image.dimensions();
    Ok(egui::IconData {
        rgba: image.into_raw(),
        width,
        height,
    })
}

/// What the window remembers between runs (its size and panel sizes egui keeps itself).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Prefs {
    timeline_span_secs: f64,
    selected_vm: Option<String>,
    setup_dismissed: bool,
}

impl Prefs {
    fn of(state: &UiState) -> Self {
        Self {
            timeline_span_secs: state.timeline.span_secs,
            selected_vm: state.selected.clone(),
            setup_dismissed: state.setup_dismissed,
        }
    }

    fn apply(self, state: &mut UiState) {
        if self.timeline_span_secs.is_finite() && self.timeline_span_secs > 0.0 {
            state.timeline.span_secs = self.timeline_span_secs;
        }
        state.selected = self.selected_vm;
        state.setup_dismissed = self.setup_dismissed;
    }
}

/// The window: the engine's handle, what it shows, and the tray.
pub struct RewindApp {
    engine: EngineHandle,
    /// What the window shows.
    pub state: UiState,
    /// The URI was given on the command line (a changed configuration does not move it).
    uri_pinned: bool,
    tray: Option<Tray>,
    tray_actions: Arc<Mutex<Vec<TrayAction>>>,
    tray_look: Option<TrayLook>,
    hidden: bool,
}

impl RewindApp {
    /// A window over `engine`.
    pub fn new(engine: EngineHandle, uri: String, uri_pinned: bool) -> Self {
        Self {
            engine,
            state: UiState {
                uri,
                ..UiState::default()
            },
            uri_pinned,
            tray: None,
            tray_actions: Arc::default(),
            tray_look: None,
            hidden: false,
        }
    }

    fn start_tray(&mut self, ctx: &egui::Context) {
        let actions = self.tray_actions.clone();
        let ctx = ctx.clone();
        match Tray::spawn(Arc::new(move |action| {
            actions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(action);
            ctx.request_repaint();
        })) {
            Ok(tray) => {
                self.state.tray_shown = tray.is_shown();
                self.tray = Some(tray);
            }
            Err(e) => {
                eprintln!("note: no tray icon ({})", crate::error_text::one_line(&e));
            }
        }
    }

    /// Applies waiting engine events (within the frame's budget) and the clock.
    pub fn drain_events(&mut self, ctx: &egui::Context) {
        self.state.now = chrono::Utc::now();
        let start = Instant::now();
        while start.elapsed() < EVENT_BUDGET {
            let Some(event) = self.engine.try_recv() else {
                break;
            };
            self.state.apply(event);
        }
        if start.elapsed() >= EVENT_BUDGET {
            // More events are waiting: come back next frame.
            ctx.request_repaint();
        }
    }

    /// Sends the frame's commands to the engine.
    pub fn send(&mut self, commands: Commands) {
        for command in commands {
            if !self.engine.send(command) {
                self.state.last_error =
                    Some("Rewind's engine is busy or has stopped; try again in a moment.".into());
            }
        }
    }

    /// One frame of the window without eframe (the `ui` part), for tests.
    #[cfg(test)]
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        self.drain_events(ui.ctx());
        let commands = main_ui(ui, &mut self.state);
        self.send(commands);
    }

    fn handle_tray(&mut self, ctx: &egui::Context) {
        let actions = std::mem::take(
            &mut *self
                .tray_actions
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for action in actions {
            match action {
                TrayAction::CheckpointAll => self.send(vec![Command::CheckpointNow { vm: None }]),
                TrayAction::Pause(pause) => {
                    if let Some(config) = &self.state.config {
                        let mut c = (**config).clone();
                        c.pause(pause, &chrono::Local::now());
                        self.send(vec![Command::SaveConfig(Box::new(c))]);
                    }
                }
                TrayAction::Resume => {
                    if let Some(config) = &self.state.config {
                        let mut c = (**config).clone();
                        c.resume();
                        self.send(vec![Command::SaveConfig(Box::new(c))]);
                    }
                }
                TrayAction::Open => {
                    self.hidden = false;
                    ctx.send_viewport_cmd(egui::ViewportCommand::Visible(true));
                    ctx.send_viewport_cmd(egui::ViewportCommand::Minimized(false));
                    ctx.send_viewport_cmd(egui::ViewportCommand::Focus);
                }
                TrayAction::Quit => self.state.quit = true,
                TrayAction::KeepRun(vm_uuid) => {
                    self.send(vec![Command::Start(
                        rewind_core::engine::jobs::JobRequest::KeepRun { vm_uuid },
                    )]);
                }
            }
        }
        let Some(tray) = &self.tray else { return };
        self.state.tray_shown = tray.is_shown();
        let look = tray_look(&self.state);
        if self.tray_look.as_ref() != Some(&look) {
            tray.set(look.clone());
            self.tray_look = Some(look);
        }
    }

    fn handle_close(&mut self, ctx: &egui::Context) {
        if self.state.quit {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        if ctx.input(|i| i.viewport().close_requested()) {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            if self.state.tray_shown {
                self.hidden = true;
                ctx.send_viewport_cmd(egui::ViewportCommand::Visible(false));
            } else if self.state.scheduler == Some(SchedulerView::Here) {
                // Closing ends this window's scheduler: ask first.
                self.state.dialog = Some(dialogs::Dialog::CloseWithoutTray);
            } else {
                // Protection goes on elsewhere (the protection service): just close.
                self.state.quit = true;
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
        }
    }

    /// A configuration naming another libvirt URI: connect the window there.
    fn follow_uri(&mut self, ctx: &egui::Context) {
        let Some(config) = &self.state.config else {
            return;
        };
        if self.uri_pinned || config.uri == self.state.uri || self.state.busy() {
            return;
        }
        let uri = config.uri.clone();
        let waker_ctx = ctx.clone();
        match engine::spawn_with(
            EngineOptions {
                uri: uri.clone(),
                scheduler: Some(engine::THE_WINDOW),
                paths: Paths::default(),
            },
            Arc::new(move || waker_ctx.request_repaint()),
        ) {
            Ok(engine) => {
                // The old engine stops (and hands over the scheduler) as it drops.
                self.engine = engine;
                self.state = UiState {
                    uri,
                    timeline: self.state.timeline.clone(),
                    setup_dismissed: self.state.setup_dismissed,
                    tray_shown: self.state.tray_shown,
                    ..UiState::default()
                };
            }
            Err(e) => self.state.last_error = Some(format!("could not connect to {uri}: {e}")),
        }
    }
}

/// The tray's icon, pause state and tooltip for `state`.
pub(crate) fn tray_look(state: &UiState) -> TrayLook {
    let protected = state.config.as_ref().map_or(0, |c| c.vms.len());
    let icon = if state.busy() {
        TrayState::Running
    } else if state.needs_attention() || matches!(state.connection, Connection::Failed { .. }) {
        TrayState::Attention
    } else if protected == 0 {
        TrayState::Idle
    } else {
        TrayState::Protected
    };
    let mut tooltip = match icon {
        TrayState::Running => format!("Rewind — {}", running_text(state)),
        TrayState::Attention => "Rewind — needs attention: open it to see why".to_owned(),
        TrayState::Idle => "Rewind — no VM protected yet".to_owned(),
        TrayState::Protected if state.paused() => format!(
            "Rewind — protection of {protected} VM(s) {}",
            state.pause_text().unwrap_or_else(|| "paused".into())
        ),
        TrayState::Protected => format!("Rewind — {protected} VM(s) protected"),
    };
    // A run from a checkpoint waits for the user's choice, whatever else goes on.
    let mut runs: Vec<_> = state
        .runs
        .iter()
        .map(|(vm_uuid, run)| (*vm_uuid, run.vm.clone()))
        .collect();
    runs.sort_by(|a, b| a.1.cmp(&b.1));
    let waiting = match runs.as_slice() {
        [] => None,
        [(_, vm)] => Some(format!(
            "{vm} runs from a checkpoint: open Rewind to keep or discard it"
        )),
        many => Some(format!(
            "{} VMs run from checkpoints: open Rewind to keep or discard them",
            many.len()
        )),
    };
    if let Some(waiting) = waiting {
        tooltip = format!("{tooltip}; {waiting}");
    }
    TrayLook {
        state: icon,
        paused: state.paused(),
        tooltip,
        runs,
    }
}

/// What the tray says runs: the first job of a client ("Keeping the VM run from its
/// checkpoint"), else the scheduler's (a checkpoint, or a boot-check).
fn running_text(state: &UiState) -> String {
    if let Some(job) = state.jobs.iter().find(|j| j.running()) {
        return job.label_cased(false);
    }
    match state.scheduled_running().first() {
        Some(r) if r.why == rewind_core::policy::Why::BootCheck => {
            format!("checking that a checkpoint of {} boots", r.vm)
        }
        Some(r) => format!("taking a checkpoint of {}", r.vm),
        None => "working".to_owned(),
    }
}

impl eframe::App for RewindApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_events(ctx);
        self.handle_tray(ctx);
        self.handle_close(ctx);
        self.follow_uri(ctx);
        if let Connection::Failed { retry_at, .. } = self.state.connection {
            // Keep the "retrying in N s" countdown current, once a second.
            ctx.request_repaint_after(
                retry_at
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1)),
            );
        } else if !self.hidden {
            ctx.request_repaint_after(CLOCK_REPAINT);
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let commands = main_ui(ui, &mut self.state);
        self.send(commands);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, PREFS_KEY, &Prefs::of(&self.state));
    }

    fn on_exit(&mut self) {
        if !self.engine.send(Command::Shutdown) {
            tracing::warn!("the engine had stopped already");
        }
    }
}

#[cfg(test)]
mod tray_look_tests {
    use super::*;
    use rewind_core::engine::jobs::JobRequest;
    use rewind_core::engine::{Event, RunInfo};

    /// The tooltip names what runs (a keep is not "a checkpoint"), and a VM that runs from a
    /// checkpoint is said until it is kept or discarded, whatever else goes on.
    #[test]
    fn the_tooltip_says_which_job_runs_and_which_vm_waits_to_be_kept_or_discarded() {
        let mut state = UiState::default();
        assert_eq!(tray_look(&state).tooltip, "Rewind — no VM protected yet");
        let vm_uuid = uuid::Uuid::new_v4();
        state.apply(Event::Runs(vec![RunInfo {
            vm_uuid,
            vm: "win11".into(),
            checkpoint: "20261205T143000.000Z".into(),
        }]));
        assert_eq!(
            tray_look(&state).tooltip,
            "Rewind — no VM protected yet; win11 runs from a checkpoint: open Rewind to keep or discard it"
        );
        state.apply(Event::JobStarted {
            job: 3,
            label: "Keeping the VM run from its checkpoint".into(),
            request: Arc::new(JobRequest::KeepRun { vm_uuid }),
        });
        let TrayLook {
            state: icon,
            tooltip,
            runs,
            ..
        } = tray_look(&state);
        assert_eq!(icon, TrayState::Running);
        assert_eq!(runs, [(vm_uuid, "win11".to_owned())]);
        assert!(
            tooltip.starts_with("Rewind — keeping the VM run from its checkpoint; win11 runs"),
            "{tooltip}"
        );
        state.apply(Event::Runs(vec![
            RunInfo {
                vm_uuid,
                vm: "win11".into(),
                checkpoint: "20261205T143000.000Z".into(),
            },
            RunInfo {
                vm_uuid: uuid::Uuid::new_v4(),
                vm: "debian".into(),
                checkpoint: "20261205T150000.000Z".into(),
            },
        ]));
        assert!(
            tray_look(&state)
                .tooltip
                .ends_with("; 2 VMs run from checkpoints: open Rewind to keep or discard them"),
            "{}",
            tray_look(&state).tooltip
        );
        // The tray's menu offers to keep each, by name.
        let names: Vec<_> = tray_look(&state).runs.into_iter().map(|r| r.1).collect();
        assert_eq!(names, ["debian", "win11"]);
    }
}
