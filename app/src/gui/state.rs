//! What the window knows: filled from engine events by [`UiState::apply`], drawn by the
//! `*_ui` functions. Nothing here talks to libvirt, disks or the network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rewind_core::config::Config;
use rewind_core::engine::jobs::{JobError, JobId, JobOutput, JobRequest};
use rewind_core::engine::{Event, RunInfo, SchedulerView};
use rewind_core::history::Record;
use rewind_core::progress::Phase;
use rewind_core::scheduler::status::{RunningJob, Status};
use rewind_core::view::catalog::{BootCheckSummary, CheckpointSummary, DestinationView};
use rewind_core::view::overview::{self, VmOverview};
use rewind_core::vm::VmInfo;
use uuid::Uuid;

use super::dialogs::Dialog;
use super::settings::SettingsState;
use super::timeline::TimelineView;

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

/// A checkpoint: the destination it is in, its VM and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointKey {
    /// The destination's name.
    pub destination: String,
    /// The VM's UUID.
    pub vm_uuid: Uuid,
    /// The checkpoint's id.
    pub id: String,
}

impl CheckpointKey {
    /// The key of `c` in `destination`.
    pub fn of(destination: &str, c: &CheckpointSummary) -> Self {
        Self {
            destination: destination.to_owned(),
            vm_uuid: c.vm_uuid,
            id: c.id.clone(),
        }
    }
}

/// Measures a job's rate over its current phase, for "12 MiB/s, 40 s left".
#[derive(Debug, Clone)]
pub struct RateMeter {
    phase: Phase,
    since: Instant,
    since_bytes: u64,
    rate_bytes_per_sec: Option<f64>,
}

impl RateMeter {
    fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Preparing,
            since: now,
            since_bytes: 0,
            rate_bytes_per_sec: None,
        }
    }

    /// Takes in a progress report made at `now`.
    pub fn update(&mut self, phase: Phase, done_bytes: u64, now: Instant) {
        if phase != self.phase || done_bytes < self.since_bytes {
            self.phase = phase;
            self.since = now;
            self.since_bytes = done_bytes;
            self.rate_bytes_per_sec = None;
            return;
        }
        let secs = now.duration_since(self.since).as_secs_f64();
        // Half a second of data at least, so the first figures are not wild.
        if secs >= 0.5 {
            #[allow(clippy::cast_precision_loss)] // display only
            let rate = (done_bytes - self.since_bytes) as f64 / secs;
            self.rate_bytes_per_sec = Some(rate);
        }
    }

    /// Bytes per second in this phase, once known.
    pub fn rate_bytes_per_sec(&self) -> Option<f64> {
        self.rate_bytes_per_sec
    }

    /// Time left for `total_bytes` at the current rate.
    pub fn time_left(&self, done_bytes: u64, total_bytes: u64) -> Option<Duration> {
        let rate = self.rate_bytes_per_sec.filter(|r| *r > 0.0)?;
        #[allow(clippy::cast_precision_loss)] // display only
        let left = total_bytes.saturating_sub(done_bytes) as f64 / rate;
        Some(Duration::from_secs_f64(left.min(1e7)))
    }
}

/// A job the window started.
#[derive(Debug, Clone)]
pub struct JobView {
    /// Its number.
    pub id: JobId,
    /// What it does.
    pub label: String,
    /// What was asked.
    pub request: Arc<JobRequest>,
    /// What it does now.
    pub phase: Phase,
    /// Bytes done in this phase.
    pub done_bytes: u64,
    /// Bytes in all in this phase.
    pub total_bytes: u64,
    /// Its rate.
    pub rate: RateMeter,
    /// How it ended, once it has.
    pub result: Option<Result<JobOutput, JobError>>,
    /// Cancel was asked for.
    pub cancelling: bool,
    /// While it waits for a guest to shut down: how long until it turns the VM off.
    pub force_off_in: Option<Duration>,
    /// Turning the VM off now was asked for.
    pub forcing_off: bool,
}

/// Whether a full-state checkpoint can resume its VM, as the engine found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeCheck {
    /// Asked, no answer yet.
    Checking,
    /// It can.
    Possible,
    /// It cannot, and why.
    Impossible(String),
}

impl JobView {
    /// Whether it restores a VM (in place, as new, or undo).
    pub fn is_restore(&self) -> bool {
        matches!(
            *self.request,
            JobRequest::Restore { .. } | JobRequest::UndoRestore { .. }
        )
    }

    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.result.is_none()
    }

    /// Its label with the first letter in upper case (to start a sentence) or lower case
    /// (to go on one).
    pub fn label_cased(&self, upper: bool) -> String {
        let mut chars = self.label.chars();
        chars.next().map_or_else(String::new, |first| {
            if upper {
                first.to_uppercase().chain(chars).collect()
            } else {
                first.to_lowercase().chain(chars).collect()
            }
        })
    }
}

/// Everything the window draws, filled from engine events.
#[derive(Debug)]
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
    /// A passing message ("Checkpoint taken"), shown until dismissed.
    pub notice: Option<String>,
    /// The configuration in use (`None` until the engine reports it).
    pub config: Option<Arc<Config>>,
    /// Why the configuration file does not load (the last good one is in use).
    pub config_error: Option<String>,
    /// Every destination with its checkpoints; `None` until first looked at.
    pub destinations: Option<Arc<Vec<DestinationView>>>,
    /// The job history, oldest first.
    pub history: Arc<Vec<Record>>,
    /// Who runs the scheduler.
    pub scheduler: Option<SchedulerView>,
    /// The protection service's SSH public key (for a host's `authorized_keys`).
    pub ssh_public_key: Option<String>,
    /// The live status of this window's own scheduler.
    pub own_status: Option<Box<Status>>,
    /// Jobs this window started, newest last (finished ones stay until dismissed).
    pub jobs: Vec<JobView>,
    /// The selected checkpoint.
    pub checkpoint: Option<CheckpointKey>,
    /// The timeline's zoom and position.
    pub timeline: TimelineView,
    /// The open dialog.
    pub dialog: Option<Dialog>,
    /// The restore job the restore window follows.
    pub restore_job: Option<JobId>,
    /// Whether Rewind starts at login (`None` until the engine says).
    pub autostart: Option<bool>,
    /// What came of turning start at login on or off.
    pub autostart_note: Option<String>,
    /// Mount points of removable drives (`None` until the engine looked).
    pub drives: Option<Vec<std::path::PathBuf>>,
    /// What the engine said of full-state checkpoints' resumes (asked when the restore
    /// dialog opens).
    pub resume_checks: std::collections::HashMap<CheckpointKey, ResumeCheck>,
    /// The settings window, when open.
    pub settings: Option<SettingsState>,
    /// The Files window, while it is open.
    pub files: Option<super::files::FilesView>,
    /// The user closed the first-run guide.
    pub setup_dismissed: bool,
    /// The first-run guide's state.
    pub setup: super::setup::SetupState,
    /// The clock the window uses this frame (tests set it).
    pub now: DateTime<Utc>,
    /// Whether a tray icon shows Rewind (closing the window then keeps it running).
    pub tray_shown: bool,
    /// The user asked to quit (from the tray or the close dialog).
    pub quit: bool,
    /// The VMs that run from a checkpoint, by UUID: as the engine's newest list of the runs
    /// it serves says, and one started from this window from its job's `Running` output
    /// until it is kept or discarded.
    pub runs: std::collections::HashMap<Uuid, super::runfrom::RunView>,
}

impl Default for UiState {
    fn default() -> Self {
        Self {
            uri: String::new(),
            connection: Connection::default(),
            vms: None,
            selected: None,
            last_error: None,
            notice: None,
            config: None,
            config_error: None,
            destinations: None,
            history: Arc::default(),
            scheduler: None,
            ssh_public_key: None,
            own_status: None,
            jobs: Vec::new(),
            checkpoint: None,
            timeline: TimelineView::default(),
            dialog: None,
            restore_job: None,
            resume_checks: std::collections::HashMap::new(),
            autostart: None,
            autostart_note: None,
            drives: None,
            settings: None,
            files: None,
            setup_dismissed: false,
            setup: super::setup::SetupState::default(),
            now: Utc::now(),
            tray_shown: false,
            runs: std::collections::HashMap::new(),
            quit: false,
        }
    }
}

impl UiState {
    /// Applies one engine event.
    #[allow(clippy::too_many_lines)] // one short arm per event
    pub fn apply(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Connected { uri } => {
                self.uri = uri;
                self.connection = Connection::Connected;
            }
            Event::ConnectionFailed { error, retry_in } => {
                self.connection = Connection::Failed {
                    message: error.to_string(),
                    retry_at: now + retry_in,
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
            Event::Config { config, error } => {
                if let Some(s) = &mut self.settings {
                    s.config_changed(&config);
                }
                self.config = Some(config);
                self.config_error = error;
            }
            Event::Destinations(d) => {
                // A deleted checkpoint is deselected.
                if let Some(key) = &self.checkpoint
                    && summary_in(&d, key).is_none()
                {
                    self.checkpoint = None;
                }
                self.destinations = Some(d);
                self.date_runs();
            }
            Event::Runs(runs) => self.runs_served(runs),
            Event::History(h) => self.history = h,
            Event::Scheduler(view) => {
                if view != SchedulerView::Here {
                    self.own_status = None;
                }
                self.scheduler = Some(view);
            }
            Event::SchedulerStatus(s) => self.own_status = Some(s),
            Event::JobStarted {
                job,
                label,
                request,
            } => {
                let view = JobView {
                    id: job,
                    label,
                    request,
                    phase: Phase::Preparing,
                    done_bytes: 0,
                    total_bytes: 0,
                    rate: RateMeter::new(now),
                    result: None,
                    cancelling: false,
                    force_off_in: None,
                    forcing_off: false,
                };
                if view.is_restore() {
                    self.restore_job = Some(job);
                }
                self.jobs.push(view);
            }
            Event::JobProgress {
                job,
                phase,
                done_bytes,
                total_bytes,
                force_off_in,
            } => {
                if let Some(j) = self.jobs.iter_mut().find(|j| j.id == job) {
                    j.rate.update(phase, done_bytes, now);
                    j.phase = phase;
                    j.done_bytes = done_bytes;
                    j.total_bytes = total_bytes;
                    j.force_off_in = force_off_in;
                }
            }
            Event::DrivesFound(drives) => self.drives = Some(drives),
            Event::Autostart { enabled, changed } => {
                self.autostart = Some(enabled);
                if let Some(changed) = changed {
                    self.autostart_note = Some(match changed {
                        Ok(()) if enabled => "Rewind starts at login.".to_owned(),
                        Ok(()) => "Rewind no longer starts at login.".to_owned(),
                        Err(e) => e.message,
                    });
                }
            }
            Event::Browsed { key, ask, result } => {
                if let Some(files) = &mut self.files {
                    files.apply(&key, ask, result);
                }
            }
            Event::ResumeChecked { key, result } => {
                let key = CheckpointKey {
                    destination: key.destination,
                    vm_uuid: key.vm_uuid,
                    id: key.checkpoint,
                };
                // Kept only while the dialog that asked is open.
                if let Some(check) = self.resume_checks.get_mut(&key) {
                    *check = match result {
                        Ok(()) => ResumeCheck::Possible,
                        Err(why) => ResumeCheck::Impossible(why.message),
                    };
                }
            }
            Event::JobFinished { job, result } => {
                if let Ok(JobOutput::BootChecked {
                    check,
                    thumbnail_png,
                    ..
                }) = &result
                {
                    self.boot_checked(check, thumbnail_png.clone());
                }
                if let Ok(output) = &result {
                    self.run_changed(job, output);
                }
                if let Some(j) = self.jobs.iter_mut().find(|j| j.id == job) {
                    self.notice = Some(match &result {
                        Ok(JobOutput::BootChecked { check, vm, .. }) => {
                            match BootCheckSummary::of(check, None).reason {
                                None => format!("{}: a copy of {vm} booted", j.label),
                                Some(why) => {
                                    format!("{}: a copy of {vm} did not boot: {why}", j.label)
                                }
                            }
                        }
                        Ok(_) => format!("{}: done", j.label),
                        Err(e) => format!("{} failed: {e}", j.label),
                    });
                    j.result = Some(result);
                }
                // Keep a few finished jobs to look at, drop older ones.
                let finished = self.jobs.iter().filter(|j| !j.running()).count();
                if finished > 5 {
                    let restore = self.restore_job;
                    let mut drop = finished - 5;
                    self.jobs.retain(|j| {
                        if drop > 0 && !j.running() && Some(j.id) != restore {
                            drop -= 1;
                            false
                        } else {
                            true
                        }
                    });
                }
            }
            Event::DestinationAdded { result, warning } => {
                // The forms show the words; the kind is not needed there.
                let result = result.map_err(|e| e.message);
                if let Some(settings) = &mut self.settings {
                    settings.destination_added(result, warning);
                } else if let Some(form) = &mut self.setup.form {
                    form.destination_added(result, warning);
                } else if let Err(e) = result {
                    self.last_error = Some(e);
                }
            }
            Event::HostKeyUnknown {
                location,
                host,
                keys,
            } => {
                if let Some(settings) = &mut self.settings {
                    settings.host_key_unknown(&location, host, keys);
                }
            }
            Event::SshIdentity { public_key } => self.ssh_public_key = Some(public_key),
            Event::DestinationTested { location, result } => {
                if let Some(settings) = &mut self.settings {
                    settings.destination_tested(&location, result.map_err(|e| e.message));
                }
            }
            // The refreshed list follows; nothing to show for the event itself yet.
            _ => {}
        }
    }

    /// Follows a VM run from a checkpoint: `output` of job `job` may start or end one.
    fn run_changed(&mut self, job: JobId, output: &JobOutput) {
        let Some(request) = self
            .jobs
            .iter()
            .find(|j| j.id == job)
            .map(|j| j.request.clone())
        else {
            return;
        };
        match (&*request, output) {
            (
                JobRequest::RunFromCheckpoint {
                    destination,
                    vm_uuid,
                    ..
                },
                JobOutput::Running { vm, checkpoint },
            ) => {
                let key = CheckpointKey {
                    destination: destination.clone(),
                    vm_uuid: *vm_uuid,
                    id: checkpoint.clone(),
                };
                let time = self.summary(&key).map(|c| c.time);
                self.runs.insert(
                    *vm_uuid,
                    super::runfrom::RunView {
                        vm: vm.clone(),
                        destination: Some(destination.clone()),
                        checkpoint: checkpoint.clone(),
                        time,
                    },
                );
            }
            (JobRequest::KeepRun { vm_uuid }, JobOutput::RunKept(_))
            | (JobRequest::DiscardRun { vm_uuid }, JobOutput::RunDiscarded) => {
                self.runs.remove(vm_uuid);
            }
            _ => {}
        }
    }

    /// Takes the engine's list of the runs it serves: it replaces what the window knew. A
    /// run the window knew keeps the destination and time it knew, and one it is keeping
    /// or discarding now stays until that job ends (the engine does not list a run while it
    /// keeps it).
    fn runs_served(&mut self, runs: Vec<RunInfo>) {
        let mut known = std::mem::take(&mut self.runs);
        let mut served: std::collections::HashMap<_, _> = runs
            .into_iter()
            .map(|run| {
                let view = match known.remove(&run.vm_uuid) {
                    Some(view) if view.checkpoint == run.checkpoint => view,
                    _ => super::runfrom::RunView {
                        vm: run.vm,
                        destination: None,
                        checkpoint: run.checkpoint,
                        time: None,
                    },
                };
                (run.vm_uuid, view)
            })
            .collect();
        known.retain(|vm_uuid, _| super::runfrom::job_running(self, vm_uuid));
        served.extend(known);
        self.runs = served;
        self.date_runs();
    }

    /// Finds, for each run whose checkpoint's time the window does not know yet, its
    /// checkpoint among the destinations'.
    fn date_runs(&mut self) {
        let Some(destinations) = self.destinations.as_deref() else {
            return;
        };
        for (vm_uuid, run) in self.runs.iter_mut().filter(|(_, r)| r.time.is_none()) {
            let found = destinations.iter().find_map(|d| {
                d.checkpoints
                    .iter()
                    .find(|c| c.vm_uuid == *vm_uuid && c.id == run.checkpoint)
                    .map(|c| (&d.destination.name, c.time))
            });
            if let Some((destination, time)) = found {
                run.destination = Some(destination.clone());
                run.time = Some(time);
            }
        }
    }

    /// Shows the boot-check `check` just done on its checkpoint wherever it is, at once:
    /// the engine's next look at the destinations brings the same from its state folder.
    fn boot_checked(&mut self, check: &rewind_core::bootcheck::BootCheck, png: Option<Vec<u8>>) {
        let Some(destinations) = &mut self.destinations else {
            return;
        };
        let summary = BootCheckSummary::of(check, png);
        for c in Arc::make_mut(destinations)
            .iter_mut()
            .flat_map(|d| &mut d.checkpoints)
            .filter(|c| c.vm_uuid == check.vm_uuid && c.id == check.checkpoint)
        {
            c.boot_check = Some(summary.clone());
        }
    }

    /// The summary of checkpoint `key`, if it is (still) there.
    pub fn summary(&self, key: &CheckpointKey) -> Option<&CheckpointSummary> {
        summary_in(self.destinations.as_deref()?, key)
    }

    /// The VMs that have checkpoints in a destination but are not on this host (deleted,
    /// or from another host whose drive is plugged in here): each one's UUID and its name in
    /// its newest checkpoint, by name.
    pub fn backup_only_vms(&self) -> Vec<(Uuid, String)> {
        let Some(destinations) = self.destinations.as_deref() else {
            return Vec::new();
        };
        let here: std::collections::HashSet<&str> =
            self.vms.iter().flatten().map(|v| v.uuid.as_str()).collect();
        let mut newest: std::collections::HashMap<Uuid, (DateTime<Utc>, String)> =
            std::collections::HashMap::new();
        for c in destinations.iter().flat_map(|d| &d.checkpoints) {
            if here.contains(c.vm_uuid.to_string().as_str()) {
                continue;
            }
            let slot = newest
                .entry(c.vm_uuid)
                .or_insert_with(|| (c.time, c.vm.clone()));
            if c.time >= slot.0 {
                *slot = (c.time, c.vm.clone());
            }
        }
        let mut vms: Vec<(Uuid, String)> = newest
            .into_iter()
            .map(|(uuid, (_, name))| (uuid, name))
            .collect();
        vms.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        vms
    }

    /// The selected VM when it is one only in backups: its UUID and name.
    pub fn selected_backup_vm(&self) -> Option<(Uuid, String)> {
        let sel = self.selected.as_ref()?;
        self.backup_only_vms()
            .into_iter()
            .find(|(uuid, _)| uuid.to_string() == *sel)
    }

    /// The selected VM.
    pub fn selected_vm(&self) -> Option<&VmInfo> {
        let sel = self.selected.as_ref()?;
        self.vms.as_ref()?.iter().find(|v| &v.uuid == sel)
    }

    /// How `vm` is protected now.
    pub fn overview(&self, vm: &VmInfo) -> Option<VmOverview> {
        let config = self.config.as_deref()?;
        let destinations = self.destinations.as_deref().map_or(&[][..], |d| &d[..]);
        Some(overview::vm_overview(
            config,
            &vm.name,
            &vm.uuid,
            destinations,
            &self.history,
            self.now,
        ))
    }

    /// The scheduler's jobs running now (this window's scheduler or the daemon's).
    pub fn scheduled_running(&self) -> &[RunningJob] {
        match &self.scheduler {
            Some(SchedulerView::Here) => self.own_status.as_ref().map_or(&[], |s| &s.running),
            Some(SchedulerView::Elsewhere {
                status: Some(s), ..
            }) => &s.running,
            _ => &[],
        }
    }

    /// Whether a checkpoint of `vm` is being taken now (by the scheduler or this window).
    pub fn checkpointing(&self, vm: &VmInfo) -> bool {
        self.scheduled_running().iter().any(|r| r.vm == vm.name)
            || self.jobs.iter().any(|j| {
                j.running()
                    && matches!(&*j.request, JobRequest::Checkpoint { vm: v, .. } if *v == vm.name || *v == vm.uuid)
            })
    }

    /// Whether any job runs (for the tray's icon).
    pub fn busy(&self) -> bool {
        !self.scheduled_running().is_empty() || self.jobs.iter().any(JobView::running)
    }

    /// Whether all protection is paused (until resumed, or a timed pause not yet over).
    pub fn paused(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.paused_at(self.now))
    }

    /// How the pause reads ("paused until 15:40"), while protection is paused.
    pub fn pause_text(&self) -> Option<String> {
        self.config
            .as_ref()
            .filter(|_| self.paused())
            .and_then(|c| c.pause_text())
    }

    /// Whether some protected VM needs the user's attention.
    pub fn needs_attention(&self) -> bool {
        self.vms.as_ref().is_some_and(|vms| {
            vms.iter()
                .any(|vm| self.overview(vm).is_some_and(|o| o.badge.needs_attention()))
        }) || self.config_error.is_some()
    }

    /// A running restore blocks other actions on the same VM.
    pub fn restore_running(&self) -> bool {
        self.jobs.iter().any(|j| j.running() && j.is_restore())
    }
}

fn summary_in<'a>(
    destinations: &'a [DestinationView],
    key: &CheckpointKey,
) -> Option<&'a CheckpointSummary> {
    destinations
        .iter()
        .find(|d| d.destination.name == key.destination)?
        .checkpoints
        .iter()
        .find(|c| c.vm_uuid == key.vm_uuid && c.id == key.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_measured_per_phase_and_gives_the_time_left() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(t0);
        m.update(Phase::Copying, 0, t0);
        assert_eq!(m.rate_bytes_per_sec(), None);
        m.update(Phase::Copying, 100 << 20, t0 + Duration::from_secs(2));
        let rate = m.rate_bytes_per_sec().unwrap();
        assert!((rate - f64::from(50 << 20)).abs() < 1.0, "{rate}");
        let left = m.time_left(100 << 20, 300 << 20).unwrap();
        assert_eq!(left.as_secs(), 4);
        // A new phase starts over.
        m.update(Phase::Verifying, 0, t0 + Duration::from_secs(3));
        assert_eq!(m.rate_bytes_per_sec(), None);
        assert_eq!(m.time_left(0, 10), None);
    }
}
