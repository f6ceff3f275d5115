//! The tray icon: a `StatusNotifierItem` (KDE/freedesktop tray protocol over the session
//! D-Bus, via `ksni`) with Rewind's status icon, a tooltip and a small menu.
//!
//! [`Tray::spawn`] registers the icon with the session's `org.kde.StatusNotifierWatcher`
//! and fails, with a message saying why, where no tray can show it; the window then knows
//! that closing it must quit instead of hiding. The tray lives on its own thread:
//! [`Tray::set`] only records the wanted look and wakes that thread, so the UI thread never
//! waits on D-Bus. Menu clicks and a left click on the icon call `on_action` on ksni's
//! D-Bus thread; it must not block (send a command and request a repaint).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use ksni::blocking::TrayMethods as _;
use rewind_core::pause::Pause;

/// What the icon shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrayState {
    /// Every protected VM has a recent checkpoint.
    Protected,
    /// A checkpoint or restore is running.
    Running,
    /// Something failed or needs the user.
    Attention,
    /// Nothing is protected yet.
    Idle,
}

/// What the user asked for in the tray.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrayAction {
    /// "Checkpoint all now".
    CheckpointAll,
    /// "Pause for 1 hour", "Pause until tomorrow", "Pause until I resume".
    Pause(Pause),
    /// "Resume protection".
    Resume,
    /// "Open Rewind", or a left click on the icon.
    Open,
    /// "Keep <VM> as it runs now": keep the VM that runs from a checkpoint (its disks are
    /// copied to its own files while it runs).
    KeepRun(uuid::Uuid),
    /// "Quit".
    Quit,
}

/// How long [`Tray::spawn`] waits for the session bus and the tray host to answer.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a [`Tray`] waits for its D-Bus connection to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The tooltip until the first [`Tray::set`].
const DEFAULT_TOOLTIP: &str = "Rewind";
/// The well-known name of the tray host's registry.
const WATCHER_NAME: &str = "org.kde.StatusNotifierWatcher";

/// The tray icons (64x64 PNG), made by `assets/make-tray-icons.sh` from the app icon.
const ICON_PROTECTED_PNG: &[u8] = include_bytes!("../../../assets/tray-protected.png");
const ICON_RUNNING_PNG: &[u8] = include_bytes!("../../../assets/tray-running.png");
const ICON_ATTENTION_PNG: &[u8] = include_bytes!("../../../assets/tray-attention.png");
const ICON_IDLE_PNG: &[u8] = include_bytes!("../../../assets/tray-idle.png");

/// A running tray icon. Dropping it removes the icon and stops its thread.
pub struct Tray {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    /// Receives once the worker has closed its D-Bus connection.
    stopped: mpsc::Receiver<()>,
}

impl fmt::Debug for Tray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tray")
            .field("shown", &self.is_shown())
            .finish_non_exhaustive()
    }
}

impl Tray {
    /// Registers the icon with the session's `StatusNotifierWatcher`. Err (with a message that
    /// says why: no session bus / no tray host (no org.kde.StatusNotifierWatcher)) when no
    /// tray is available, so the window knows closing must ask instead of hiding.
    ///
    /// The icon starts as [`TrayState::Idle`], not paused. `on_action` runs on the tray's
    /// D-Bus thread and must return quickly.
    pub fn spawn(on_action: Arc<dyn Fn(TrayAction) + Send + Sync>) -> anyhow::Result<Tray> {
        let icons = Icons::load()?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            shown: Arc::new(AtomicBool::new(false)),
        });
        let item = Item {
            view: TrayLook {
                state: TrayState::Idle,
                paused: false,
                tooltip: DEFAULT_TOOLTIP.to_owned(),
                runs: Vec::new(),
            },
            icons,
            on_action,
            shown: Arc::clone(&shared.shown),
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (stopped_tx, stopped_rx) = mpsc::sync_channel(1);
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("rewind-tray".into())
            .spawn(move || run_worker(item, &worker_shared, &ready_tx, &stopped_tx))
            .context("could not start the tray icon's thread (the system is out of threads?)")?;
        match ready_rx.recv_timeout(SPAWN_TIMEOUT) {
            Ok(Ok(())) => Ok(Tray {
                shared,
                worker: Some(worker),
                stopped: stopped_rx,
            }),
            Ok(Err(e)) => {
                if worker.join().is_err() {
                    tracing::warn!("the tray's thread panicked while starting");
                }
                Err(e)
            }
            // The worker notices that nobody waits any more and closes its connection.
            Err(mpsc::RecvTimeoutError::Timeout) => Err(anyhow::anyhow!(
                "no tray icon: the session bus or the tray host ({WATCHER_NAME}) did not answer \
                 within {} s. Check that the desktop session is not stuck, then restart Rewind",
                SPAWN_TIMEOUT.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(anyhow::anyhow!(
                "no tray icon: its thread stopped while registering. Restart Rewind; if this \
                 keeps happening, report it"
            )),
        }
    }

    /// Updates icon, the menu (Pause or Resume, a Keep per run) and the tooltip. Never
    /// blocks (the UI thread calls it).
    pub fn set(&self, look: TrayLook) {
        let mut pending = self.shared.lock();
        pending.view = Some(look);
        drop(pending);
        self.shared.wake.notify_one();
    }

    /// Whether a tray host still shows the icon (hosts can go away).
    pub fn is_shown(&self) -> bool {
        self.shared.shown.load(Ordering::Acquire)
    }
}

impl Drop for Tray {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        // Closing the connection takes the icon off the bus. Wait a little, but never hang the
        // app's exit on a stuck bus: then the thread is left to finish on its own.
        if self.stopped.recv_timeout(STOP_TIMEOUT).is_ok() {
            if let Some(worker) = self.worker.take()
                && worker.join().is_err()
            {
                tracing::warn!("the tray's thread panicked while stopping");
            }
        } else {
            eprintln!(
                "warning: the tray icon did not close its D-Bus connection within {} s",
                STOP_TIMEOUT.as_secs()
            );
        }
    }
}

/// What the UI thread hands to the tray thread.
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Set while the watcher has the icon; cleared when it goes away.
    shown: Arc<AtomicBool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Pending {
    /// The latest look asked for and not yet applied; older ones are skipped.
    view: Option<TrayLook>,
    stop: bool,
}

/// The tray thread: registers the item, applies [`Tray::set`] calls, and closes the connection
/// when the [`Tray`] is dropped.
fn run_worker(
    item: Item,
    shared: &Shared,
    ready: &mpsc::SyncSender<anyhow::Result<()>>,
    stopped: &mpsc::SyncSender<()>,
) {
    let shown = Arc::clone(&item.shown);
    let handle = match item.spawn() {
        Ok(handle) => handle,
        Err(e) => {
            // A receiver gone has stopped waiting for the tray.
            drop(ready.send(Err(explain_spawn_error(e))));
            return;
        }
    };
    shown.store(true, Ordering::Release);
    if ready.send(Ok(())).is_err() {
        // `Tray::spawn` gave up waiting: nobody will use or drop this icon.
        handle.shutdown().wait();
        return;
    }
    loop {
        let mut pending = shared.lock();
        while pending.view.is_none() && !pending.stop {
            pending = shared
                .wake
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if pending.stop {
            break;
        }
        let Some(view) = pending.view.take() else {
            continue;
        };
        drop(pending);
        if handle.update(|item| item.view = view).is_none() {
            // The service ended (its connection broke): no host shows the icon any more.
            shown.store(false, Ordering::Release);
        }
    }
    handle.shutdown().wait();
    shown.store(false, Ordering::Release);
    // A receiver gone has stopped waiting for the tray to end.
    stopped.send(()).ok();
}

/// Turns ksni's error into one that says what is missing and what to do.
fn explain_spawn_error(e: ksni::Error) -> anyhow::Error {
    let what = match &e {
        ksni::Error::Dbus(_) => {
            "no tray icon: the desktop session's D-Bus bus could not be reached. Start Rewind \
             from within a desktop session (DBUS_SESSION_BUS_ADDRESS must point to its bus)"
                .to_owned()
        }
        ksni::Error::Watcher(
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_),
        ) => format!(
            "no tray icon: no tray host runs on the session bus (nobody owns {WATCHER_NAME}). \
             Turn on the desktop's system tray (on GNOME: the \"AppIndicator and \
             KStatusNotifierItem Support\" extension), then restart Rewind"
        ),
        ksni::Error::Watcher(_) => format!(
            "no tray icon: the tray host ({WATCHER_NAME}) refused it. Restart the desktop's \
             system tray, then restart Rewind"
        ),
        ksni::Error::WontShow => format!(
            "no tray icon: {WATCHER_NAME} runs but no tray host shows icons. Turn on the \
             desktop's system tray, then restart Rewind"
        ),
        _ => "no tray icon: registering it failed. Restart Rewind; if this keeps happening, \
              report it"
            .to_owned(),
    };
    anyhow::Error::new(e).context(what)
}

/// The look the UI asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrayLook {
    /// The icon.
    pub state: TrayState,
    /// Protection is paused: the menu offers Resume.
    pub paused: bool,
    /// The tooltip's text.
    pub tooltip: String,
    /// The VMs that run from a checkpoint (UUID, name): the menu offers to keep each.
    pub runs: Vec<(uuid::Uuid, String)>,
}

/// The `StatusNotifierItem` that ksni serves.
struct Item {
    view: TrayLook,
    icons: Icons,
    on_action: Arc<dyn Fn(TrayAction) + Send + Sync>,
    shown: Arc<AtomicBool>,
}

impl ksni::Tray for Item {
    fn id(&self) -> String {
        "rewind".into()
    }

    fn title(&self) -> String {
        "Rewind".into()
    }

    fn category(&self) -> ksni::Category {
        ksni::Category::ApplicationStatus
    }

    fn status(&self) -> ksni::Status {
        sni_status(self.view.state)
    }

    fn icon_pixmap(&self) -> Vec<ksni::Icon> {
        vec![self.icons.for_state(self.view.state).clone()]
    }

    fn attention_icon_pixmap(&self) -> Vec<ksni::Icon> {
        vec![self.icons.attention.clone()]
    }

    fn tool_tip(&self) -> ksni::ToolTip {
        ksni::ToolTip {
            title: "Rewind".into(),
            description: self.view.tooltip.clone(),
            ..ksni::ToolTip::default()
        }
    }

    fn activate(&mut self, _x: i32, _y: i32) {
        (self.on_action)(TrayAction::Open);
    }

    fn menu(&self) -> Vec<ksni::MenuItem<Self>> {
        menu_model(self.view.paused, &self.view.runs)
            .into_iter()
            .map(|entry| match entry {
                MenuEntry::Separator => ksni::MenuItem::Separator,
                MenuEntry::Item { label, action } => ksni::menu::StandardItem {
                    label,
                    activate: Box::new(move |item: &mut Self| (item.on_action)(action)),
                    ..ksni::menu::StandardItem::default()
                }
                .into(),
            })
            .collect()
    }

    fn watcher_online(&self) {
        self.shown.store(true, Ordering::Release);
    }

    fn watcher_offline(&self, _reason: ksni::OfflineReason) -> bool {
        self.shown.store(false, Ordering::Release);
        // Keep serving: the host may come back (a restarted shell), and then the icon returns.
        true
    }
}

/// The SNI status for a state: hosts emphasise `NeedsAttention`.
fn sni_status(state: TrayState) -> ksni::Status {
    match state {
        TrayState::Attention => ksni::Status::NeedsAttention,
        TrayState::Protected | TrayState::Running | TrayState::Idle => ksni::Status::Active,
    }
}

/// One line of the tray menu.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MenuEntry {
    Item { label: String, action: TrayAction },
    Separator,
}

impl MenuEntry {
    fn item(label: impl Into<String>, action: TrayAction) -> Self {
        Self::Item {
            label: label.into(),
            action,
        }
    }
}

/// The tray menu: "Resume" while paused, else the three ways to pause; then a "Keep" for
/// each VM that runs from a checkpoint (discarding one asks first, in the window).
fn menu_model(paused: bool, runs: &[(uuid::Uuid, String)]) -> Vec<MenuEntry> {
    let mut menu = vec![MenuEntry::item(
        "Checkpoint all now",
        TrayAction::CheckpointAll,
    )];
    if paused {
        menu.push(MenuEntry::item("Resume protection", TrayAction::Resume));
    } else {
        menu.extend(
            Pause::ALL.map(|pause| MenuEntry::item(pause.label(), TrayAction::Pause(pause))),
        );
    }
    if !runs.is_empty() {
        menu.push(MenuEntry::Separator);
        menu.extend(runs.iter().map(|(vm_uuid, vm)| {
            MenuEntry::item(
                format!("Keep {vm} as it runs now"),
                TrayAction::KeepRun(*vm_uuid),
            )
        }));
    }
    menu.extend([
        MenuEntry::Separator,
        MenuEntry::item("Open Rewind", TrayAction::Open),
        MenuEntry::item("Quit", TrayAction::Quit),
    ]);
    menu
}

/// The four status icons as SNI pixmaps, decoded once.
struct Icons {
    protected: ksni::Icon,
    running: ksni::Icon,
    attention: ksni::Icon,
    idle: ksni::Icon,
}

impl Icons {
    fn load() -> anyhow::Result<Self> {
        let load = |name: &str, png: &[u8]| {
            png_to_pixmap(png).with_context(|| {
                format!(
                    "the built-in tray icon assets/{name} is damaged: regenerate it with \
                     assets/make-tray-icons.sh and rebuild Rewind"
                )
            })
        };
        Ok(Self {
            protected: load("tray-protected.png", ICON_PROTECTED_PNG)?,
            running: load("tray-running.png", ICON_RUNNING_PNG)?,
            attention: load("tray-attention.png", ICON_ATTENTION_PNG)?,
            idle: load("tray-idle.png", ICON_IDLE_PNG)?,
        })
    }

    fn for_state(&self, state: TrayState) -> &ksni::Icon {
        match state {
            TrayState::Protected => &self.protected,
            TrayState::Running => &self.running,
            TrayState::Attention => &self.attention,
            TrayState::Idle => &self.idle,
        }
    }
}

/// Decodes a PNG into the pixmap SNI wants: ARGB32, each pixel as the bytes A, R, G, B
/// (network byte order).
fn png_to_pixmap(png: &[u8]) -> anyhow::Result<ksni::Icon> {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .context("not a valid PNG")?
        .into_rgba8();
    let (width, height) = image.dimensions();
    Ok(ksni::Icon {
        width: i32::try_from(width).context("the image is too wide for a tray icon")?,
        height: i32::try_from(height).context("the image is too tall for a tray icon")?,
        data: rgba_to_argb(image.into_raw()),
    })
}

/// Reorders RGBA pixels to ARGB in place.
fn rgba_to_argb(mut data: Vec<u8>) -> Vec<u8> {
    for pixel in data.chunks_exact_mut(4) {
        pixel.rotate_right(1);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_become_argb_in_network_byte_order() {
        let rgba = vec![1, 2, 3, 4, 10, 20, 30, 40];
        assert_eq!(rgba_to_argb(rgba), vec![4, 1, 2, 3, 40, 10, 20, 30]);
    }

    #[test]
    fn a_png_becomes_a_pixmap_of_its_size() {
        let mut image = image::RgbaImage::new(3, 2);
        image.put_pixel(0, 0, image::Rgba([0xff, 0x00, 0x00, 0xff]));
        image.put_pixel(2, 1, image::Rgba([0x10, 0x20, 0x30, 0x80]));
        let mut png = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();

        let icon = png_to_pixmap(&png).unwrap();
        assert_eq!((icon.width, icon.height), (3, 2));
        assert_eq!(icon.data.len(), 3 * 2 * 4);
        assert_eq!(&icon.data[0..4], &[0xff, 0xff, 0x00, 0x00]);
        assert_eq!(
            &icon.data[4..8],
            &[0, 0, 0, 0],
            "transparent stays transparent"
        );
        assert_eq!(&icon.data[20..24], &[0x80, 0x10, 0x20, 0x30]);
    }

    #[test]
    fn a_damaged_png_is_an_error_not_a_panic() {
        let e = png_to_pixmap(b"\x89PNG\r\n\x1a\nnot really").unwrap_err();
        assert!(format!("{e:#}").contains("not a valid PNG"), "{e:#}");
    }

    #[test]
    fn every_state_has_its_own_square_opaque_cornered_icon() {
        let icons = Icons::load().unwrap();
        let states = [
            TrayState::Protected,
            TrayState::Running,
            TrayState::Attention,
            TrayState::Idle,
        ];
        for (i, a) in states.iter().enumerate() {
            let icon = icons.for_state(*a);
            assert_eq!((icon.width, icon.height), (64, 64), "{a:?}");
            assert_eq!(icon.data.len(), 64 * 64 * 4, "{a:?}");
            // The badge sits in the lower right corner; the middle of the icon is opaque.
            let middle = (32 * 64 + 32) * 4;
            assert_eq!(icon.data[middle], 0xff, "{a:?}: alpha of the middle pixel");
            for b in &states[i + 1..] {
                assert_ne!(icon.data, icons.for_state(*b).data, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn only_attention_asks_for_attention() {
        assert_eq!(
            sni_status(TrayState::Attention),
            ksni::Status::NeedsAttention
        );
        for state in [TrayState::Protected, TrayState::Running, TrayState::Idle] {
            assert_eq!(sni_status(state), ksni::Status::Active, "{state:?}");
        }
    }

    fn labels(entries: &[MenuEntry]) -> Vec<&str> {
        entries
            .iter()
            .map(|e| match e {
                MenuEntry::Item { label, .. } => label.as_str(),
                MenuEntry::Separator => "---",
            })
            .collect()
    }

    #[test]
    fn the_menu_offers_pause_while_protection_runs() {
        let menu = menu_model(false, &[]);
        assert_eq!(
            labels(&menu),
            [
                "Checkpoint all now",
                "Pause for 1 hour",
                "Pause until tomorrow",
                "Pause until I resume",
                "---",
                "Open Rewind",
                "Quit"
            ]
        );
        let actions: Vec<_> = menu
            .iter()
            .filter_map(|e| match e {
                MenuEntry::Item { action, .. } => Some(*action),
                MenuEntry::Separator => None,
            })
            .collect();
        assert_eq!(
            actions,
            [
                TrayAction::CheckpointAll,
                TrayAction::Pause(Pause::ForAnHour),
                TrayAction::Pause(Pause::UntilTomorrow),
                TrayAction::Pause(Pause::UntilResumed),
                TrayAction::Open,
                TrayAction::Quit
            ]
        );
    }

    #[test]
    fn the_menu_offers_resume_while_paused() {
        let menu = menu_model(true, &[]);
        assert_eq!(
            labels(&menu),
            [
                "Checkpoint all now",
                "Resume protection",
                "---",
                "Open Rewind",
                "Quit"
            ]
        );
        assert_eq!(
            menu[1],
            MenuEntry::item("Resume protection", TrayAction::Resume)
        );
    }

    /// Each VM that runs from a checkpoint can be kept from the menu; discarding asks first,
    /// so it is the window's.
    #[test]
    fn the_menu_offers_to_keep_each_vm_that_runs_from_a_checkpoint() {
        let (web, win) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let menu = menu_model(true, &[(web, "web".into()), (win, "win11".into())]);
        assert_eq!(
            labels(&menu),
            [
                "Checkpoint all now",
                "Resume protection",
                "---",
                "Keep web as it runs now",
                "Keep win11 as it runs now",
                "---",
                "Open Rewind",
                "Quit"
            ]
        );
        assert_eq!(
            menu[4],
            MenuEntry::item("Keep win11 as it runs now", TrayAction::KeepRun(win))
        );
    }

    #[test]
    fn ksni_menu_follows_the_model() {
        let run = (uuid::Uuid::new_v4(), "win11".to_owned());
        let item = Item {
            view: TrayLook {
                state: TrayState::Idle,
                paused: true,
                tooltip: String::new(),
                runs: vec![run.clone()],
            },
            icons: Icons::load().unwrap(),
            on_action: Arc::new(|_| {}),
            shown: Arc::default(),
        };
        let got: Vec<String> = ksni::Tray::menu(&item)
            .iter()
            .map(|entry| match entry {
                ksni::MenuItem::Standard(s) => s.label.clone(),
                ksni::MenuItem::Separator => "---".into(),
                other => format!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, labels(&menu_model(true, &[run])));
    }

    /// Tests against a real, private `dbus-daemon` with a minimal tray host written here.
    ///
    /// ksni connects to "the session bus", which only the environment names, and this
    /// process's environment is shared by every test and cannot be changed safely. So each
    /// test starts a bus and runs [`child`] in a new process of this test binary with
    /// `DBUS_SESSION_BUS_ADDRESS` pointing at it.
    mod on_a_session_bus {
        use std::collections::HashMap;
        use std::path::Path;
        use std::process::{Child, Command, Stdio};
        use std::time::Instant;

        use rewind_tests::scratch::ScratchDir;
        use rewind_tests::tray_host::TrayHost;
        use zbus::zvariant::{OwnedValue, Value};

        use super::*;

        /// Tells the child process which scenario to run.
        const SCENARIO_ENV: &str = "REWIND_TRAY_TEST_SCENARIO";
        const SNI_PATH: &str = "/StatusNotifierItem";
        const SNI_INTERFACE: &str = "org.kde.StatusNotifierItem";
        const MENU_PATH: &str = "/MenuBar";
        const MENU_INTERFACE: &str = "com.canonical.dbusmenu";
        const PATIENCE: Duration = Duration::from_secs(10);

        /// `IconPixmap`: width, height, ARGB32 bytes per icon.
        type Pixmaps = Vec<(i32, i32, Vec<u8>)>;
        /// `ToolTip`: icon name, icon pixmaps, title, description.
        type RemoteToolTip = (String, Pixmaps, String, String);
        /// A dbusmenu layout node: id, properties, children (each a node in a variant).
        type LayoutNode = (i32, HashMap<String, OwnedValue>, Vec<OwnedValue>);

        /// A private session bus whose socket is in a scratch folder; killed when dropped.
        struct Bus {
            daemon: Child,
            address: String,
        }

        impl Bus {
            fn start(dir: &Path) -> Bus {
                let config = dir.join("bus.conf");
                std::fs::write(
                    &config,
                    format!(
                        "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
                         \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                         <busconfig>\n  <type>session</type>\n  <listen>unix:path={}</listen>\n  \
                         <auth>EXTERNAL</auth>\n  <policy context=\"default\">\n    \
                         <allow send_destination=\"*\" eavesdrop=\"true\"/>\n    \
                         <allow eavesdrop=\"true\"/>\n    <allow own=\"*\"/>\n  </policy>\n\
                         </busconfig>\n",
                        dir.join("bus").display()
                    ),
                )
                .unwrap();
                let mut daemon = Command::new("dbus-daemon")
                    .arg(format!("--config-file={}", config.display()))
                    .args(["--nofork", "--print-address=1"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    // It complains about fd limits it may not raise as root in a container.
                    .stderr(std::fs::File::create(dir.join("bus.log")).unwrap())
                    .spawn()
                    .expect("dbus-daemon (package dbus) must be installed: apt-get install dbus");
                let mut line = String::new();
                let read = std::io::BufRead::read_line(
                    &mut std::io::BufReader::new(daemon.stdout.take().unwrap()),
                    &mut line,
                );
                let bus = Bus {
                    daemon,
                    address: line.trim().to_owned(),
                };
                assert!(
                    read.is_ok() && !bus.address.is_empty(),
                    "dbus-daemon printed no address"
                );
                bus
            }
        }

        impl Drop for Bus {
            fn drop(&mut self) {
                drop(self.daemon.kill());
                drop(self.daemon.wait());
            }
        }

        /// A child process, killed when dropped (a failing test must not leave it behind).
        struct ChildGuard(Child);

        impl Drop for ChildGuard {
            fn drop(&mut self) {
                drop(self.0.kill());
                drop(self.0.wait());
            }
        }

        /// Runs [`child`] with `scenario` in a new process on the bus at `address`, and fails
        /// with its output unless it passed.
        fn run_child(scenario: &str, address: &str, dir: &Path) {
            let name = module_path!().split_once("::").unwrap().1;
            let out_path = dir.join(format!("{scenario}.out"));
            let out = std::fs::File::create(&out_path).unwrap();
            let mut child = ChildGuard(
                Command::new(std::env::current_exe().unwrap())
                    .args([&format!("{name}::child"), "--exact", "--ignored"])
                    .args(["--nocapture", "--test-threads=1"])
                    .env(SCENARIO_ENV, scenario)
                    .env("DBUS_SESSION_BUS_ADDRESS", address)
                    .stdin(Stdio::null())
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap(),
            );
            let deadline = Instant::now() + Duration::from_mins(1);
            let status = loop {
                if let Some(status) = child.0.try_wait().unwrap() {
                    break Some(status);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let output = std::fs::read_to_string(&out_path).unwrap_or_default();
            assert!(
                status.is_some_and(|s| s.success()) && output.contains("1 passed"),
                "scenario {scenario} {}:\n{output}",
                status.map_or_else(|| "timed out".to_owned(), |s| s.to_string())
            );
        }

        #[test]
        fn without_a_session_bus_spawn_says_so() {
            let dir = ScratchDir::new("tray-no-bus").unwrap();
            let address = format!("unix:path={}", dir.path().join("no-bus-here").display());
            run_child("no-bus", &address, dir.path());
        }

        #[test]
        fn without_a_tray_host_spawn_says_so() {
            let dir = ScratchDir::new("tray-no-host").unwrap();
            let bus = Bus::start(dir.path());
            run_child("no-watcher", &bus.address, dir.path());
        }

        #[test]
        fn the_icon_registers_shows_its_state_and_answers_clicks() {
            let dir = ScratchDir::new("tray-host").unwrap();
            let bus = Bus::start(dir.path());
            run_child("watcher", &bus.address, dir.path());
        }

        /// The part that runs in the child process; does nothing when run on its own.
        #[test]
        #[ignore = "run by the other tests of this module in a process of its own"]
        fn child() {
            match std::env::var(SCENARIO_ENV).as_deref() {
                Ok("no-bus") => {
                    let e = Tray::spawn(Arc::new(|_| {})).unwrap_err();
                    let message = format!("{e:#}");
                    assert!(
                        message.contains("the desktop session's D-Bus bus could not be reached")
                            && message.contains("DBUS_SESSION_BUS_ADDRESS"),
                        "{message}"
                    );
                }
                Ok("no-watcher") => {
                    let e = Tray::spawn(Arc::new(|_| {})).unwrap_err();
                    let message = format!("{e:#}");
                    assert!(
                        message.contains("no tray host runs on the session bus")
                            && message.contains("nobody owns org.kde.StatusNotifierWatcher"),
                        "{message}"
                    );
                }
                Ok("watcher") => with_a_tray_host(),
                Ok(other) => panic!("unknown scenario {other:?}"),
                Err(_) => eprintln!("not in a child process: nothing to do"),
            }
        }

        fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(value) = probe() {
                    return value;
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Strips variant wrappers (`v` inside `a{sv}` and property values).
        fn unwrap_variant(value: Value<'static>) -> Value<'static> {
            match value {
                Value::Value(inner) => unwrap_variant(*inner),
                other => other,
            }
        }

        /// One menu entry as a host sees it.
        #[derive(Debug, Clone, PartialEq)]
        struct RemoteEntry {
            id: i32,
            label: String,
            separator: bool,
        }

        /// The tray item, seen over D-Bus the way a tray host sees it.
        struct Remote {
            bus: zbus::blocking::Connection,
            service: String,
        }

        impl Remote {
            fn property(&self, name: &str) -> Value<'static> {
                let reply = self
                    .bus
                    .call_method(
                        Some(self.service.as_str()),
                        SNI_PATH,
                        Some("org.freedesktop.DBus.Properties"),
                        "Get",
                        &(SNI_INTERFACE, name),
                    )
                    .unwrap();
                let value: OwnedValue = reply.body().deserialize().unwrap();
                unwrap_variant(Value::from(value))
            }

            fn string(&self, name: &str) -> String {
                String::try_from(self.property(name)).unwrap()
            }

            fn icon(&self) -> Pixmaps {
                Vec::try_from(self.property("IconPixmap")).unwrap()
            }

            fn tooltip(&self) -> (String, String) {
                let (_icon_name, _pixmaps, title, description): RemoteToolTip =
                    self.property("ToolTip").try_into().unwrap();
                (title, description)
            }

            fn menu(&self) -> Vec<RemoteEntry> {
                let reply = self
                    .bus
                    .call_method(
                        Some(self.service.as_str()),
                        MENU_PATH,
                        Some(MENU_INTERFACE),
                        "GetLayout",
                        &(0i32, -1i32, Vec::<&str>::new()),
                    )
                    .unwrap();
                let (_revision, (_root, _props, children)): (u32, LayoutNode) =
                    reply.body().deserialize().unwrap();
                children
                    .into_iter()
                    .map(|child| {
                        let (id, props, _children): LayoutNode =
                            unwrap_variant(Value::from(child)).try_into().unwrap();
                        let text = |key: &str| {
                            props
                                .get(key)
                                .map(|v| {
                                    String::try_from(unwrap_variant(Value::from(
                                        v.try_clone().unwrap(),
                                    )))
                                    .unwrap()
                                })
                                .unwrap_or_default()
                        };
                        RemoteEntry {
                            id,
                            label: text("label"),
                            separator: text("type") == "separator",
                        }
                    })
                    .collect()
            }

            fn click(&self, label: &str) {
                let entry = self
                    .menu()
                    .into_iter()
                    .find(|e| e.label == label)
                    .unwrap_or_else(|| panic!("no menu entry {label:?}"));
                self.bus
                    .call_method(
                        Some(self.service.as_str()),
                        MENU_PATH,
                        Some(MENU_INTERFACE),
                        "Event",
                        &(entry.id, "clicked", Value::from(0i32), 0u32),
                    )
                    .unwrap();
            }

            fn activate(&self) {
                self.bus
                    .call_method(
                        Some(self.service.as_str()),
                        SNI_PATH,
                        Some(SNI_INTERFACE),
                        "Activate",
                        &(0i32, 0i32),
                    )
                    .unwrap();
            }

            fn has_owner(&self) -> bool {
                zbus::blocking::fdo::DBusProxy::new(&self.bus)
                    .unwrap()
                    .name_has_owner(self.service.as_str().try_into().unwrap())
                    .unwrap()
            }
        }

        /// Forwards the names of the item's signals to a channel (from a thread that ends
        /// with the child process).
        fn watch_signals(service: &str) -> mpsc::Receiver<String> {
            let bus = zbus::blocking::Connection::session().unwrap();
            let rule = zbus::MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(service.to_owned())
                .unwrap()
                .interface(SNI_INTERFACE)
                .unwrap()
                .build();
            let messages =
                zbus::blocking::MessageIterator::for_match_rule(rule, &bus, Some(64)).unwrap();
            let (tx, rx) = mpsc::sync_channel(64);
            std::thread::spawn(move || {
                for message in messages.flatten() {
                    let member = message.header().member().map(ToString::to_string);
                    if tx.send(member.unwrap_or_default()).is_err() {
                        break;
                    }
                }
            });
            rx
        }

        fn expect_signal(signals: &mpsc::Receiver<String>, name: &str) {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match signals.recv_timeout(left) {
                    Ok(got) if got == name => return,
                    Ok(_) => {}
                    Err(e) => panic!("no {name} signal: {e}"),
                }
            }
        }

        fn labels(menu: &[RemoteEntry]) -> Vec<&str> {
            menu.iter()
                .map(|e| if e.separator { "---" } else { &e.label })
                .collect()
        }

        /// A look without runs.
        fn look(state: TrayState, paused: bool, tooltip: &str) -> TrayLook {
            TrayLook {
                state,
                paused,
                tooltip: tooltip.into(),
                runs: Vec::new(),
            }
        }

        /// A VM that runs from a checkpoint can be kept from the menu.
        fn keep_from_the_menu(tray: &Tray, item: &Remote, actions: &mpsc::Receiver<TrayAction>) {
            let win11 = uuid::Uuid::new_v4();
            tray.set(TrayLook {
                runs: vec![(win11, "win11".into())],
                ..look(TrayState::Protected, false, "win11 runs from a checkpoint")
            });
            wait_for("the menu to offer the keep", || {
                labels(&item.menu())
                    .contains(&"Keep win11 as it runs now")
                    .then_some(())
            });
            item.click("Keep win11 as it runs now");
            assert_eq!(
                actions.recv_timeout(PATIENCE),
                Ok(TrayAction::KeepRun(win11))
            );
        }

        fn with_a_tray_host() {
            let host = TrayHost::start().unwrap();
            let (actions_tx, actions) = mpsc::sync_channel(16);
            let tray = Tray::spawn(Arc::new(move |action| {
                actions_tx.try_send(action).ok();
            }))
            .unwrap();
            assert!(tray.is_shown());

            let service = wait_for("the item to register", || {
                host.registered().first().cloned()
            });
            assert!(
                service.starts_with("org.kde.StatusNotifierItem-"),
                "{service}"
            );
            let item = Remote {
                bus: zbus::blocking::Connection::session().unwrap(),
                service,
            };
            assert_eq!(item.string("Title"), "Rewind");
            assert_eq!(item.string("Id"), "rewind");
            assert_eq!(item.string("Category"), "ApplicationStatus");
            assert_eq!(item.string("Status"), "Active");
            let idle_icon = item.icon();
            assert_eq!(idle_icon.len(), 1);
            assert_eq!((idle_icon[0].0, idle_icon[0].1), (64, 64));
            assert_eq!(idle_icon[0].2.len(), 64 * 64 * 4);
            assert_eq!(item.tooltip(), ("Rewind".into(), "Rewind".into()));
            assert_eq!(
                labels(&item.menu()),
                [
                    "Checkpoint all now",
                    "Pause for 1 hour",
                    "Pause until tomorrow",
                    "Pause until I resume",
                    "---",
                    "Open Rewind",
                    "Quit"
                ]
            );

            // A new state reaches the host: signals, then the new properties.
            let signals = watch_signals(&item.service);
            tray.set(look(
                TrayState::Attention,
                true,
                "web: the last checkpoint failed",
            ));
            expect_signal(&signals, "NewStatus");
            expect_signal(&signals, "NewIcon");
            wait_for("the status to change", || {
                (item.string("Status") == "NeedsAttention").then_some(())
            });
            let attention_icon = item.icon();
            assert_ne!(attention_icon, idle_icon);
            assert_eq!(
                item.tooltip(),
                ("Rewind".into(), "web: the last checkpoint failed".into())
            );
            assert_eq!(labels(&item.menu())[1], "Resume protection");

            // Several quick updates: the last one wins.
            for state in [TrayState::Running, TrayState::Idle, TrayState::Protected] {
                tray.set(look(state, false, "all protected"));
            }
            wait_for("the last update", || {
                (item.string("Status") == "Active" && item.icon() != attention_icon).then_some(())
            });
            assert_eq!(labels(&item.menu())[1], "Pause for 1 hour");
            assert_eq!(item.tooltip().1, "all protected");

            // Clicks reach `on_action`.
            item.click("Checkpoint all now");
            assert_eq!(
                actions.recv_timeout(PATIENCE),
                Ok(TrayAction::CheckpointAll)
            );
            item.click("Pause until tomorrow");
            assert_eq!(
                actions.recv_timeout(PATIENCE),
                Ok(TrayAction::Pause(Pause::UntilTomorrow))
            );
            item.click("Open Rewind");
            assert_eq!(actions.recv_timeout(PATIENCE), Ok(TrayAction::Open));
            keep_from_the_menu(&tray, &item, &actions);
            item.click("Quit");
            assert_eq!(actions.recv_timeout(PATIENCE), Ok(TrayAction::Quit));
            item.activate();
            assert_eq!(actions.recv_timeout(PATIENCE), Ok(TrayAction::Open));

            // The host goes away and comes back: the icon follows.
            drop(host);
            wait_for("the icon to be gone", || (!tray.is_shown()).then_some(()));
            let host = TrayHost::start().unwrap();
            wait_for("the icon to be back", || tray.is_shown().then_some(()));
            let again = wait_for("the item to register again", || {
                host.registered().first().cloned()
            });
            assert_eq!(again, item.service);

            // Dropping the tray takes the item off the bus.
            assert!(item.has_owner());
            drop(tray);
            wait_for("the item's name to go", || {
                (!item.has_owner()).then_some(())
            });
            assert!(actions.try_recv().is_err(), "no stray actions");
        }
    }
}
