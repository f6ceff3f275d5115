//! `rewind tray`: the tray icon as a small process of its own, started at login (XDG
//! autostart). It is a client of the protection service like the window: it shows the
//! service's state in the icon and its tooltip (which job runs, and each VM that runs
//! from a checkpoint until it is kept or discarded), sends the desktop notifications (a failed
//! job, a drive that a due checkpoint waits for, a VM whose checkpoints are overdue), and
//! offers "Checkpoint all now", the three ways to pause, "Resume", "Keep <VM> as it runs
//! now" for each VM that runs from a checkpoint, and "Open Rewind" (which starts the window,
//! or brings the open one to the front).
//!
//! It draws nothing itself (no window, no GPU context), so it stays small while it waits.
//! Without a tray host in the session (plain GNOME) it still sends the notifications, and
//! it shows the icon as soon as a host appears.

use std::collections::HashMap;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use rewind_core::engine::jobs::JobId;
use rewind_core::engine::{Command, EngineHandle, Event};
use rewind_core::job_error::ErrorKind;

use crate::gui::instance::{self, Instance, Role};
use crate::gui::state::UiState;
use crate::gui::tray::{Tray, TrayAction, TrayLook};
use crate::notify::Notifier;

/// How often the tray looks at the clock when nothing happens (a timed pause that ends,
/// the "next checkpoint" in the tooltip).
const TICK: Duration = Duration::from_secs(30);
/// How often it tries again to show the icon when no tray host answered.
const TRAY_RETRY: Duration = Duration::from_mins(1);

/// What wakes the tray's loop.
enum Wake {
    /// The service link has events.
    Engine,
    /// A menu click.
    Action(TrayAction),
}

/// A desktop notification: its summary and body.
pub type Note = (String, String);

/// The notification an event calls for, if any, with the user's notification settings as
/// the service last said. `state` is the state before the event (to name a finished job).
/// Scheduled jobs are told by the scheduler's own events; jobs that a client asked for by
/// their end; a cancelled job is nobody's news.
#[must_use]
pub fn note_for(event: &Event, state: &UiState) -> Option<Note> {
    let wants = state
        .config
        .as_ref()
        .map(|c| c.notifications)
        .unwrap_or_default();
    match event {
        Event::Scheduled(ev) => crate::notify::describe(ev, wants).1,
        Event::JobFinished {
            job,
            result: Err(error),
        } if wants.on_failure && error.kind != ErrorKind::Cancelled => {
            let what = job_label(state, *job);
            Some((format!("{what} failed"), error.to_string()))
        }
        _ => None,
    }
}

fn job_label(state: &UiState, job: JobId) -> String {
    state
        .jobs
        .iter()
        .find(|j| j.id == job)
        .map_or_else(|| "A job".to_owned(), |j| j.label_cased(true))
}

/// `rewind tray`.
///
/// # Errors
/// Another tray of this user runs already is not an error (it says so and returns); the
/// link to the service could not be started is.
pub fn run() -> anyhow::Result<()> {
    let listener = match instance::claim(Role::Tray) {
        Ok(Instance::Shown) => {
            eprintln!("Rewind's tray icon runs already");
            return Ok(());
        }
        Ok(Instance::First(listener)) => Some(listener),
        Err(e) => {
            eprintln!("note: a second `rewind tray` will not notice this one ({e})");
            None
        }
    };
    let (tx, rx) = mpsc::channel::<Wake>();
    let waker_tx = tx.clone();
    let engine = rewind_service::client::engine(
        "tray",
        rewind_service::socket_path(),
        Arc::new(move || {
            // The loop is gone only when the tray quits.
            waker_tx.send(Wake::Engine).ok();
        }),
    )
    .context("could not start the link to the protection service")?;
    if let Some(listener) = listener {
        // A second `rewind tray` has nothing to show: this one goes on.
        instance::listen(listener, || {})?;
    }
    let result = TrayLoop::new(engine, tx).run(&rx);
    instance::release(Role::Tray);
    result
}

struct TrayLoop {
    engine: EngineHandle,
    state: UiState,
    tray: Option<Tray>,
    tray_tried: Option<std::time::Instant>,
    look: Option<TrayLook>,
    actions: mpsc::Sender<Wake>,
    notifier: Notifier,
    windows: HashMap<u32, std::thread::JoinHandle<()>>,
}

impl TrayLoop {
    fn new(engine: EngineHandle, actions: mpsc::Sender<Wake>) -> Self {
        Self {
            engine,
            state: UiState::default(),
            tray: None,
            tray_tried: None,
            look: None,
            actions,
            notifier: Notifier::new(),
            windows: HashMap::new(),
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Wake>) -> anyhow::Result<()> {
        loop {
            self.show_icon();
            match rx.recv_timeout(TICK) {
                Ok(Wake::Action(TrayAction::Quit)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Ok(());
                }
                Ok(Wake::Action(action)) => self.act(action),
                Ok(Wake::Engine) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            self.drain();
            self.update_icon();
            self.windows.retain(|_, waiter| !waiter.is_finished());
        }
    }

    /// Registers the icon, and again a while after no host answered.
    fn show_icon(&mut self) {
        if self.tray.is_some() || self.tray_tried.is_some_and(|t| t.elapsed() < TRAY_RETRY) {
            return;
        }
        self.tray_tried = Some(std::time::Instant::now());
        let actions = self.actions.clone();
        match Tray::spawn(Arc::new(move |action| {
            actions.send(Wake::Action(action)).ok();
        })) {
            Ok(tray) => {
                self.tray = Some(tray);
                self.look = None;
            }
            Err(e) => tracing::info!(
                "no tray icon for now, notifications only: {}",
                crate::error_text::one_line(&e)
            ),
        }
    }

    fn drain(&mut self) {
        self.state.now = chrono::Utc::now();
        while let Some(event) = self.engine.try_recv() {
            if let Some((summary, body)) = note_for(&event, &self.state)
                && let Err(e) = self.notifier.notify(&summary, &body)
            {
                tracing::warn!("(no desktop notification: {e}) {summary}: {body}");
            }
            self.state.apply(event);
        }
    }

    fn update_icon(&mut self) {
        let Some(tray) = &self.tray else { return };
        let look = crate::gui::tray_look(&self.state);
        if self.look.as_ref() != Some(&look) {
            tray.set(look.clone());
            self.look = Some(look);
        }
    }

    fn act(&mut self, action: TrayAction) {
        let command = match action {
            TrayAction::CheckpointAll => Some(Command::CheckpointNow { vm: None }),
            TrayAction::Pause(pause) => self.state.config.as_ref().map(|config| {
                let mut c = (**config).clone();
                c.pause(pause, &chrono::Local::now());
                Command::SaveConfig(Box::new(c))
            }),
            TrayAction::Resume => self.state.config.as_ref().map(|config| {
                let mut c = (**config).clone();
                c.resume();
                Command::SaveConfig(Box::new(c))
            }),
            TrayAction::Open => {
                self.open_window();
                None
            }
            TrayAction::Quit => None,
            TrayAction::KeepRun(vm_uuid) => Some(Command::Start(
                rewind_core::engine::jobs::JobRequest::KeepRun { vm_uuid },
            )),
        };
        if let Some(command) = command
            && !self.engine.send(command)
        {
            tracing::warn!("the protection service link is busy or gone: the click was lost");
        }
    }

    /// Starts the window (a window that runs already comes to the front by itself).
    fn open_window(&mut self) {
        let started = std::env::current_exe().and_then(|program| {
            std::process::Command::new(program)
                .stdin(std::process::Stdio::null())
                .spawn()
        });
        match started {
            Ok(mut child) => {
                let pid = child.id();
                // Reaped when it closes, so no zombie is left while the tray runs.
                if let Ok(waiter) = std::thread::Builder::new()
                    .name("rewind-window-waiter".into())
                    .spawn(move || drop(child.wait()))
                {
                    self.windows.insert(pid, waiter);
                }
            }
            Err(e) => {
                let text = format!("The window could not be started: {e}");
                if let Err(e) = self.notifier.notify("Rewind", &text) {
                    tracing::warn!("{text} (and no notification: {e})");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rewind_core::history::{Outcome, Record};
    use rewind_core::job_error::JobError;
    use rewind_core::scheduler::Event as SchedEvent;

    fn failed_record(vm: &str) -> Record {
        Record {
            outcome: Outcome::Failed,
            error: Some("no virtual machine is called \"x\"".into()),
            ..Record::starting(vm, "usb", rewind_core::policy::Why::Due, chrono::Utc::now())
        }
    }

    #[test]
    fn a_failed_scheduled_checkpoint_and_a_missing_drive_are_each_one_note() {
        let state = UiState::default();
        let failed = Event::Scheduled(Arc::new(SchedEvent::Finished(Box::new(failed_record(
            "win11",
        )))));
        let (summary, body) = note_for(&failed, &state).unwrap();
        assert_eq!(summary, "Checkpoint of win11 failed");
        assert!(body.contains("no virtual machine"), "{body}");
        let missing = Event::Scheduled(Arc::new(SchedEvent::DestinationMissing {
            destination: "usb".into(),
            reason: "the backup drive is not plugged in".into(),
        }));
        let (summary, body) = note_for(&missing, &state).unwrap();
        assert_eq!(summary, "Checkpoints wait for usb");
        assert!(
            body.starts_with("the backup drive is not plugged in."),
            "{body}"
        );
        // Its coming back, a start and a success (by default) say nothing.
        let found = Event::Scheduled(Arc::new(SchedEvent::DestinationFound {
            destination: "usb".into(),
            location: "/media/me/usb".into(),
        }));
        assert_eq!(note_for(&found, &state), None);
        let mut ok = failed_record("win11");
        ok.outcome = Outcome::Ok;
        ok.error = None;
        let ok = Event::Scheduled(Arc::new(SchedEvent::Finished(Box::new(ok))));
        assert_eq!(note_for(&ok, &state), None);
    }

    /// A scheduled boot-check that failed is one notification that names the VM, when its
    /// checkpoint was taken and why; one that booted, or could not be done, is none.
    #[test]
    fn a_failed_boot_check_is_one_note_a_passed_one_none() {
        let state = UiState::default();
        let check = |outcome, error: Option<&str>| {
            let mut r = Record::starting(
                "win11",
                "usb",
                rewind_core::policy::Why::BootCheck,
                chrono::Utc::now(),
            );
            r.checkpoint = Some("20261205T143000.000Z".into());
            r.outcome = outcome;
            r.error = error.map(str::to_owned);
            Event::Scheduled(Arc::new(SchedEvent::Finished(Box::new(r))))
        };
        let failed = check(
            Outcome::Failed,
            Some("no sign of a started system after 600 s; the screen showed a blue screen"),
        );
        let (summary, body) = note_for(&failed, &state).unwrap();
        assert!(
            summary.starts_with("win11's checkpoint of ")
                && summary.contains(" Dec ")
                && summary.ends_with(" did not boot"),
            "{summary}"
        );
        assert!(body.starts_with("no sign of a started system"), "{body}");
        assert!(body.contains("20261205T143000.000Z in usb"), "{body}");
        assert_eq!(note_for(&check(Outcome::Ok, None), &state), None);
        let not_done = format!(
            "{}libvirt is not running",
            rewind_core::scheduler::boot_checks::NOT_DONE
        );
        assert_eq!(
            note_for(&check(Outcome::Failed, Some(&not_done)), &state),
            None
        );
        assert_eq!(note_for(&check(Outcome::Cancelled, None), &state), None);
        let started = Event::Scheduled(Arc::new(SchedEvent::Started {
            vm: "win11".into(),
            destination: "usb".into(),
            why: rewind_core::policy::Why::BootCheck,
        }));
        assert_eq!(note_for(&started, &state), None);
    }

    #[test]
    fn a_failed_job_is_named_a_cancelled_one_and_turned_off_notes_are_not_sent() {
        let mut state = UiState::default();
        let failed = Event::JobFinished {
            job: 7,
            result: Err(JobError::new(ErrorKind::Failed, "the drive is full")),
        };
        assert_eq!(
            note_for(&failed, &state),
            Some(("A job failed".into(), "the drive is full".into()))
        );
        let cancelled = Event::JobFinished {
            job: 7,
            result: Err(JobError::new(ErrorKind::Cancelled, "cancelled")),
        };
        assert_eq!(note_for(&cancelled, &state), None);
        let mut config = rewind_core::config::Config::default();
        config.notifications.on_failure = false;
        state.config = Some(Arc::new(config));
        assert_eq!(note_for(&failed, &state), None);
    }
}
