//! The desktop window (eframe/egui).
//!
//! Split like rerun's viewer: [`RewindApp::logic`] drains engine events into [`UiState`]
//! within a time budget; the `*_ui` functions draw that state and return [`Command`]s for
//! the engine, doing nothing themselves. The UI thread never waits on libvirt: the engine
//! wakes it with `request_repaint` when something arrives, and an idle window does not
//! repaint at all.

mod vm_list;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rewind_core::engine::{self, Command, EngineHandle, Event};
use rewind_core::vm::VmInfo;

pub use vm_list::main_ui;

/// How long one frame may spend applying engine events.
const EVENT_BUDGET: Duration = Duration::from_millis(10);

/// The application icon, also shipped in `assets/` for the desktop entry.
const ICON_PNG: &[u8] = include_bytes!("../../../assets/rewind-256.png");

/// Opens the window and runs until it is closed.
pub fn run(uri: String) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("Rewind")
        .with_app_id("rewind")
        .with_inner_size([960.0, 600.0])
        .with_min_inner_size([560.0, 360.0]);
    match load_icon() {
        Ok(icon) => viewport = viewport.with_icon(icon),
        Err(e) => eprintln!("warning: the window icon could not be loaded: {e:#}"),
    }
    let options = eframe::NativeOptions {
        viewport,
        persist_window: true,
        ..Default::default()
    };
    eframe::run_native(
        "rewind",
        options,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let engine = engine::spawn(uri.clone(), Arc::new(move || ctx.request_repaint()))?;
            Ok(Box::new(RewindApp::new(engine, uri)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context(
        "could not open the Rewind window. Is a graphical session running (DISPLAY or \
         WAYLAND_DISPLAY set)? Command-line use works without one: see `rewind --help`",
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

/// Connection to libvirt as the window shows it.
#[derive(Debug, Clone, Default)]
pub enum Connection {
    /// Not connected yet.
    #[default]
    Connecting,
    /// Connected.
    Connected,
    /// Failed; the engine retries by itself.
    Failed {
        /// What went wrong and what to do.
        message: String,
        /// When the next attempt happens.
        retry_at: Instant,
    },
}

/// Everything the window draws, filled from engine events.
#[derive(Debug, Default)]
pub struct UiState {
    /// The libvirt URI.
    pub uri: String,
    /// Connection state.
    pub connection: Connection,
    /// VMs, sorted by name; `None` until the first list arrives.
    pub vms: Option<Vec<VmInfo>>,
    /// UUID of the selected VM.
    pub selected: Option<String>,
    /// The last failure of an operation, shown until dismissed.
    pub last_error: Option<String>,
}

impl UiState {
    /// Applies one engine event.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Connected { uri } => {
                self.uri = uri;
                self.connection = Connection::Connected;
            }
            Event::ConnectionFailed { error, retry_in } => {
                self.connection = Connection::Failed {
                    message: error.to_string(),
                    retry_at: Instant::now() + retry_in,
                };
            }
            Event::Vms(vms) => {
                if let Some(sel) = &self.selected
                    && !vms.iter().any(|v| &v.uuid == sel)
                {
                    self.selected = None;
                }
                if self.selected.is_none() {
                    self.selected = vms.first().map(|v| v.uuid.clone());
                }
                self.vms = Some(vms);
            }
            Event::Failed { error } => self.last_error = Some(error.to_string()),
            // The refreshed list follows; nothing to show for the event itself yet.
            _ => {}
        }
    }
}

struct RewindApp {
    engine: EngineHandle,
    state: UiState,
}

impl RewindApp {
    fn new(engine: EngineHandle, uri: String) -> Self {
        Self {
            engine,
            state: UiState {
                uri,
                ..UiState::default()
            },
        }
    }
}

impl eframe::App for RewindApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
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
        if let Connection::Failed { retry_at, .. } = self.state.connection {
            // Keep the "retrying in N s" countdown current, once a second.
            ctx.request_repaint_after(
                retry_at
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1)),
            );
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        for command in main_ui(ui, &mut self.state) {
            if !self.engine.send(command) {
                self.state.last_error =
                    Some("Rewind's engine is busy or has stopped; try again in a moment.".into());
            }
        }
    }
}

/// Commands the UI asks for in one frame.
pub type Commands = Vec<Command>;
