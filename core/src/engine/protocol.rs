//! What a front end says to the engine ([`Command`]) and what the engine answers and
//! reports ([`Event`]).

use std::sync::Arc;
use std::time::Duration;

use super::jobs::{JobError, JobId, JobOutput, JobRequest};
use crate::config::Config;
use crate::history::Record;
use crate::libvirt::VmEvent;
use crate::progress::Phase;
use crate::scheduler::Event as SchedEvent;
use crate::scheduler::status::Status;
use crate::view::catalog::DestinationView;
use crate::vm::VmInfo;

/// Requests from a front end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// List the VMs again now.
    RefreshVms,
    /// Look at every destination and its checkpoints again now.
    RefreshCheckpoints,
    /// Start a long job.
    Start(JobRequest),
    /// Cancel a running job (it stops at its next check and cleans up).
    Cancel(JobId),
    /// A job waiting for a guest to shut down (before a restore) turns the VM off now.
    ForceOff(JobId),
    /// Find out whether a full-state checkpoint can resume its VM (before a restore is
    /// asked for), answered by [`Event::ResumeChecked`].
    CheckResume(ResumeKey),
    /// Look for removable drives (to suggest one for checkpoints), answered by
    /// [`Event::DrivesFound`].
    ScanDrives,
    /// Start Rewind at login, or not (the XDG autostart entry), answered by
    /// [`Event::Autostart`].
    SetAutostart(bool),
    /// Save this configuration (the scheduler picks it up).
    SaveConfig(Box<Config>),
    /// Add the store in this folder as a destination (created if the folder is missing or
    /// empty), answered by [`Event::DestinationAdded`].
    AddFolderDestination {
        /// The folder.
        folder: std::path::PathBuf,
        /// Its passphrase (encrypts a new store; opens an encrypted one), kept in a file only
        /// the user can read so checkpoints run by themselves.
        passphrase: Option<zeroize::Zeroizing<String>>,
        /// The VMs' disk images: the answer warns if the folder is on the same disk.
        vm_disks: Vec<std::path::PathBuf>,
    },
    /// Add the store in a folder on another host (`ssh://[user@]host[:port]/path`) as a
    /// destination (created if the folder is missing or empty), answered by
    /// [`Event::DestinationAdded`].
    AddRemoteDestination {
        /// The `ssh://` URL.
        url: String,
        /// Its passphrase, as for [`Command::AddFolderDestination`].
        passphrase: Option<zeroize::Zeroizing<String>>,
    },
    /// Pin a host key that the user confirmed (one [`crate::ssh_identity::HostKey::line`]
    /// of an [`Event::HostKeyUnknown`]), then test `location` again.
    TrustHostKey {
        /// The `ssh://` location that met the key.
        location: String,
        /// The key's `known_hosts` line.
        line: String,
    },
    /// Try to reach a destination that is not added yet (`ssh://…` or a folder) and say
    /// what is there, answered by [`Event::DestinationTested`].
    TestDestination {
        /// The folder or `ssh://` URL.
        location: String,
    },
    /// Have the scheduler take a checkpoint of this VM (or of all) now; without a
    /// scheduler of this window's, the engine takes it itself.
    CheckpointNow {
        /// The VM; `None` for every protected VM.
        vm: Option<String>,
    },
    /// A question about a checkpoint's files (file-level restore), answered by
    /// [`Event::Browsed`].
    Browse {
        /// The checkpoint.
        key: ResumeKey,
        /// What is asked.
        ask: super::files::BrowseAsk,
    },
    /// Stop the engine (and its scheduler: running jobs are cancelled and waited for).
    Shutdown,
}

/// A checkpoint, for [`Command::CheckResume`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ResumeKey {
    /// The destination it is in.
    pub destination: String,
    /// Its VM.
    pub vm_uuid: uuid::Uuid,
    /// Its id.
    pub checkpoint: String,
}

/// A VM that runs from a checkpoint, served by the engine's process ([`Event::Runs`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    /// The VM.
    pub vm_uuid: uuid::Uuid,
    /// Its name.
    pub vm: String,
    /// The id of the checkpoint it runs from.
    pub checkpoint: String,
}

/// Who runs the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SchedulerView {
    /// This engine runs it.
    Here,
    /// Another process does (`rewind daemon`): what it said it does, if it runs.
    Elsewhere {
        /// Who holds the scheduler's lock.
        holder: String,
        /// Its live status.
        status: Option<Box<Status>>,
    },
    /// None runs, and this engine was not asked to run one.
    None,
}

/// What the engine reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// Connected (or reconnected) to libvirt.
    Connected {
        /// The URI in use.
        uri: String,
    },
    /// The connection failed or was lost; the engine retries by itself after `retry_in`.
    ConnectionFailed {
        /// What went wrong and what to do.
        error: JobError,
        /// When the engine tries again.
        retry_in: Duration,
    },
    /// The current list of VMs.
    Vms(Vec<VmInfo>),
    /// A VM changed state (the list follows shortly).
    VmChanged(VmEvent),
    /// An operation failed.
    Failed {
        /// What went wrong and what to do.
        error: JobError,
    },
    /// The configuration in use, and why the file does not load if it does not.
    Config {
        /// The configuration.
        config: Arc<Config>,
        /// What is wrong with the file (the last good configuration is in use).
        error: Option<String>,
    },
    /// Every destination as found now, with its checkpoints.
    Destinations(Arc<Vec<DestinationView>>),
    /// The job history.
    History(Arc<Vec<Record>>),
    /// Who runs the scheduler, and what it does.
    Scheduler(SchedulerView),
    /// Something the scheduler of this engine reported.
    Scheduled(Arc<SchedEvent>),
    /// The live status of this engine's own scheduler.
    SchedulerStatus(Box<Status>),
    /// A job began.
    JobStarted {
        /// Its number.
        job: JobId,
        /// What it does, in a few words.
        label: String,
        /// What was asked.
        request: Arc<JobRequest>,
    },
    /// The answer to [`Command::AddFolderDestination`] (the configuration follows).
    DestinationAdded {
        /// The destination, or why it could not be added.
        result: Result<crate::destination::Added, JobError>,
        /// Set when the folder is on the same disk as a VM's disk images.
        warning: Option<String>,
    },
    /// The first connection to a host whose key is not known yet: its keys, for the user
    /// to compare with the host's own before [`Command::TrustHostKey`].
    HostKeyUnknown {
        /// The `ssh://` location tested.
        location: String,
        /// The host (and port) as shown.
        host: String,
        /// The keys it presents.
        keys: Vec<crate::ssh_identity::HostKey>,
    },
    /// The protection service's own SSH public key, for the `authorized_keys` of a host that
    /// holds a store (sent when the engine starts, where the service has one).
    SshIdentity {
        /// One `authorized_keys` line.
        public_key: String,
    },
    /// The answer to [`Command::TestDestination`].
    DestinationTested {
        /// The location as asked.
        location: String,
        /// What is there ("a store with 12 checkpoints", "an empty folder: a new store
        /// will be made"), or why it could not be reached.
        result: Result<String, JobError>,
    },
    /// How far a job is.
    JobProgress {
        /// Its number.
        job: JobId,
        /// What it does now.
        phase: Phase,
        /// Bytes done.
        done_bytes: u64,
        /// Bytes in all (for this phase).
        total_bytes: u64,
        /// While it waits for a guest to shut down: how long until it turns the VM off.
        force_off_in: Option<Duration>,
    },
    /// A job ended.
    JobFinished {
        /// Its number.
        job: JobId,
        /// What it did, or what went wrong and what to do.
        result: Result<JobOutput, JobError>,
    },
    /// The mount points of removable drives (the answer to [`Command::ScanDrives`]).
    DrivesFound(Vec<std::path::PathBuf>),
    /// Whether Rewind starts at login: at start, and after [`Command::SetAutostart`] (with
    /// what went wrong, if that failed).
    Autostart {
        /// Whether it does now.
        enabled: bool,
        /// The answer to a [`Command::SetAutostart`]: `Err` says why the change was not made.
        changed: Option<Result<(), JobError>>,
    },
    /// The answer to [`Command::Browse`].
    Browsed {
        /// The checkpoint asked about.
        key: ResumeKey,
        /// What was asked.
        ask: super::files::BrowseAsk,
        /// The answer, or why there is none.
        result: Result<super::files::BrowseAnswer, JobError>,
    },
    /// Every VM that runs from a checkpoint served by the engine's process, whoever
    /// started it: sent when the engine starts (after it took over the runs a stopped
    /// Rewind left) and whenever a job that starts, keeps or discards a run ends. Each list
    /// replaces the one before.
    Runs(Vec<RunInfo>),
    /// The answer to [`Command::CheckResume`].
    ResumeChecked {
        /// The checkpoint asked about.
        key: ResumeKey,
        /// `Err`: why it cannot resume its VM (a disk-only restore still can be done), or
        /// why that could not be found out.
        result: Result<(), JobError>,
    },
}

/// Called after each event so a sleeping front end wakes up and drains the channel.
pub type Waker = Arc<dyn Fn() + Send + Sync>;
