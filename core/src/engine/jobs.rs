//! Long jobs the window and the CLI start: checkpoint now, restore (in place, as a new VM,
//! undo), verify, delete, export, prune, garbage collection, and reading a store's list. Each runs on a blocking thread with its own [`Control`], which the
//! engine reads for progress and the window's Cancel button cancels.

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

use crate::cleanup::OrWarn as _;
use crate::config::Config;
use crate::destination;
use crate::libvirt::Hypervisor;
use crate::progress::Control;
use crate::restore::{ImageFormat, NewVm, RestoreOptions, RestoreReport};
use crate::store::gc::GcReport;
use crate::store::prune::PruneDecision;
use crate::store::retention::KeepRules;
use crate::store::verify::VerifyReport;
use crate::store::{Manifest, Store};
use crate::view::catalog;

pub use crate::job_error::{ErrorKind, JobError};

/// A job's number, unique in one engine.
pub type JobId = u64;

/// What to do.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum JobRequest {
    /// A checkpoint of this VM (name or UUID) now, into each of its destinations (or into
    /// the one named).
    Checkpoint {
        /// The VM.
        vm: String,
        /// Only into this destination (which the VM need not be protected into).
        #[serde(default)]
        destination: Option<String>,
        /// With its memory (running VMs only); else as the VM's policy says.
        #[serde(default)]
        full_state: bool,
    },
    /// Restore a checkpoint.
    Restore {
        /// The destination it is in.
        destination: String,
        /// The VM it belongs to.
        vm_uuid: Uuid,
        /// Its id.
        checkpoint: String,
        /// How.
        options: RestoreOptions,
        /// As a new VM (or onto another host); `None`: in place.
        as_new: Option<NewVm>,
    },
    /// Restore the VM's newest safety checkpoint in that destination.
    UndoRestore {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// How.
        options: RestoreOptions,
    },
    /// Verify a destination's store.
    Verify {
        /// The destination.
        destination: String,
        /// Only check that every chunk is there (not read and hashed).
        #[serde(default)]
        quick: bool,
    },
    /// Delete a checkpoint (its data goes at the next garbage collection).
    Delete {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// The checkpoint.
        checkpoint: String,
    },
    /// Write one disk of a checkpoint to an image file.
    Export {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// The checkpoint.
        checkpoint: String,
        /// The disk's target.
        disk: String,
        /// The file to create.
        out: PathBuf,
        /// Its format.
        format: ImageFormat,
        /// Who gets the file once it is written (the user who asked a service running as
        /// root); `None`: it stays the writer's. The service sets this itself.
        #[serde(default)]
        owner: Option<Owner>,
    },
    /// Restore files and folders of a checkpoint into a folder (file-level restore).
    RestoreFiles {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// The checkpoint.
        checkpoint: String,
        /// The files and folders, volume first (`p2/Users/me/thesis.docx`).
        paths: Vec<String>,
        /// The folder to restore into.
        to: PathBuf,
        /// Who gets what is written, as for [`JobRequest::Export`]; the service sets it.
        owner: Option<Owner>,
    },
    /// Remove old checkpoints of a destination's store by keep rules, then the data only
    /// they used.
    Prune {
        /// The destination.
        destination: String,
        /// Only this VM's checkpoints; `None`: every VM's, each by the rules.
        vm_uuid: Option<Uuid>,
        /// What to keep.
        rules: KeepRules,
        /// Only say what would go.
        #[serde(default)]
        dry_run: bool,
    },
    /// Remove the data no checkpoint in a destination's store uses any more.
    Gc {
        /// The destination.
        destination: String,
    },
    /// Read the list of checkpoints in a destination's store.
    List {
        /// The destination.
        destination: String,
    },
    /// Prove that a checkpoint boots: start a throwaway, isolated copy of it from the store
    /// and judge it ([`crate::bootcheck`]). Its result is kept for the checkpoint.
    BootCheck {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// The checkpoint, or `latest`.
        checkpoint: String,
        /// The longest wait for a boot signal, in seconds (default: 10 minutes).
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Run the (shut-off) VM straight from a checkpoint, its disks served from the store
    /// by this process ([`crate::restore::run`]) until it is kept or discarded.
    RunFromCheckpoint {
        /// The destination.
        destination: String,
        /// The VM.
        vm_uuid: Uuid,
        /// The checkpoint, or `latest`.
        checkpoint: String,
    },
    /// Keep the VM that runs from a checkpoint: its disks copied to new files beside its
    /// own while it runs, then it is defined on them.
    KeepRun {
        /// The VM.
        vm_uuid: Uuid,
    },
    /// Turn off the VM that runs from a checkpoint and drop what it wrote: it is as before.
    DiscardRun {
        /// The VM.
        vm_uuid: Uuid,
    },
}

/// A user and group that a written file is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// The user.
    pub uid: u32,
    /// The group.
    pub gid: u32,
}

/// What a store says of itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreFacts {
    /// Its ID.
    pub id: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its format's version.
    pub format_version: u32,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// The size of its chunks.
    pub chunk_size_bytes: u32,
}

impl StoreFacts {
    /// What `store` says of itself.
    #[must_use]
    pub fn of(store: &Store) -> Self {
        Self {
            id: store.config().id.to_string(),
            path: store.root().to_path_buf(),
            format_version: store.config().version,
            encrypted: store.is_encrypted(),
            chunk_size_bytes: store.chunk_size_bytes(),
        }
    }
}

/// A store's checkpoints.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    /// The store.
    pub store: StoreFacts,
    /// Its readable checkpoints, oldest first.
    pub checkpoints: Vec<Manifest>,
    /// Manifest files that cannot be read, with why.
    pub unreadable: Vec<(PathBuf, String)>,
}

impl Listing {
    /// The list of `store`'s checkpoints.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn of(store: &Store) -> Result<Self, crate::store::StoreError> {
        let catalog = store.catalog()?;
        Ok(Self {
            store: StoreFacts::of(store),
            checkpoints: catalog.checkpoints,
            unreadable: catalog
                .unreadable
                .into_iter()
                .map(|(path, e)| (path, e.to_string()))
                .collect(),
        })
    }
}

impl JobRequest {
    /// A few words for the progress bar.
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Self::Checkpoint { vm, .. } => format!("Checkpoint of {vm}"),
            Self::Restore {
                checkpoint, as_new, ..
            } => match as_new {
                None => format!("Restore to {checkpoint}"),
                Some(_) => format!("Restore of {checkpoint} as a new VM"),
            },
            Self::UndoRestore { .. } => "Undo restore".into(),
            Self::Verify { destination, .. } => format!("Verify {destination}"),
            Self::Delete { checkpoint, .. } => format!("Delete {checkpoint}"),
            Self::Export { disk, .. } => format!("Export of {disk}"),
            Self::RestoreFiles { paths, .. } => match paths.as_slice() {
                [one] => format!(
                    "Restore of {}",
                    one.rsplit('/').find(|n| !n.is_empty()).unwrap_or(one)
                ),
                many => format!("Restore of {} items", many.len()),
            },
            Self::Prune { destination, .. } => format!("Removing old checkpoints in {destination}"),
            Self::Gc { destination } => format!("Removing unused data in {destination}"),
            Self::List { destination } => format!("Reading the checkpoints in {destination}"),
            Self::BootCheck { checkpoint, .. } => format!("Boot-check of {checkpoint}"),
            Self::RunFromCheckpoint { checkpoint, .. } => format!("Run from {checkpoint}"),
            Self::KeepRun { .. } => "Keeping the VM run from its checkpoint".into(),
            Self::DiscardRun { .. } => "Discarding the run from the checkpoint".into(),
        }
    }
}

/// What a job produced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum JobOutput {
    /// Checkpoints taken.
    Checkpoints(Vec<Manifest>),
    /// A restore done.
    Restored(Box<RestoreReport>),
    /// A store verified.
    Verified(Box<VerifyReport>),
    /// A checkpoint deleted.
    Deleted,
    /// A disk exported.
    Exported {
        /// The checkpoint's id.
        checkpoint: String,
        /// The VM's name in it.
        vm: String,
        /// The image file written.
        file: PathBuf,
        /// The bytes of data in it.
        data_bytes: u64,
    },
    /// Old checkpoints removed (or, in a dry run, found).
    Pruned {
        /// What became of each checkpoint.
        decisions: Vec<PruneDecision>,
        /// What the garbage collection after it freed (`None` in a dry run).
        gc: Option<GcReport>,
    },
    /// Unused data removed.
    Collected(GcReport),
    /// A store's checkpoints.
    Listed(Box<Listing>),
    /// Files restored into a folder.
    FilesRestored(Box<crate::files::browse::Restored>),
    /// A VM runs from a checkpoint.
    Running {
        /// The VM's name.
        vm: String,
        /// The checkpoint.
        checkpoint: String,
    },
    /// A run from a checkpoint kept: the VM's new disk files.
    RunKept(Vec<PathBuf>),
    /// A run from a checkpoint discarded.
    RunDiscarded,
    /// A checkpoint boot-checked (booted or not: see its outcome).
    BootChecked {
        /// The result, as kept.
        check: Box<crate::bootcheck::BootCheck>,
        /// The VM's name in the checkpoint.
        vm: String,
        /// Its last screen, small, as PNG.
        thumbnail_png: Option<Vec<u8>>,
    },
}

fn no_destination(name: &str) -> JobError {
    JobError::new(
        ErrorKind::NotConfigured,
        format!("there is no destination called {name:?} in the configuration"),
    )
}

pub(super) fn store_of(config: &Config, name: &str) -> Result<Store, JobError> {
    let dest = config
        .destination(name)
        .ok_or_else(|| no_destination(name))?;
    let found = destination::locate(dest, &destination::watch_roots(config));
    Ok(destination::open(dest, &found)?)
}

/// Checkpoint `id` of the VM, or its newest if `id` is `latest` (found when the job runs,
/// so that a checkpoint taken a moment ago counts).
pub(super) fn manifest(store: &Store, vm: &Uuid, id: &str) -> Result<Manifest, JobError> {
    if id != "latest" {
        return Ok(store.manifest(vm, id)?);
    }
    store.vm_catalog(vm)?.checkpoints.pop().ok_or_else(|| {
        JobError::new(
            ErrorKind::NotFound,
            format!(
                "the store at {} holds no checkpoint of VM {vm}; list what it holds with \
                 `rewind checkpoints --in {}`",
                store.root().display(),
                store.root().display()
            ),
        )
    })
}

/// Runs `request` to the end (or until `control` is cancelled); `paths` say where the
/// history is (a checkpoint's record goes there) and the state folder, which keeps what a
/// verify found.
pub fn run(
    config: &Config,
    paths: &crate::scheduler::Paths,
    request: &JobRequest,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    let state_dir = &paths.state_dir();
    let work = crate::workdir::WorkDir::new().map_err(JobError::work_folder)?;
    let hv = || Hypervisor::connect(&config.uri);
    match request {
        JobRequest::Checkpoint {
            vm,
            destination,
            full_state,
        } => checkpoint_now(
            config,
            &paths.history,
            vm,
            destination.as_deref(),
            *full_state,
            control,
        ),
        JobRequest::Restore {
            destination,
            vm_uuid,
            checkpoint,
            options,
            as_new,
        } => {
            let store = store_of(config, destination)?;
            let m = manifest(&store, vm_uuid, checkpoint)?;
            let hv = hv()?;
            let report = match as_new {
                None => {
                    crate::restore::restore_in_place(&hv, &store, &m, options, work.path(), control)
                }
                Some(new) => crate::restore::restore_as_new(
                    &hv,
                    &store,
                    &m,
                    new,
                    options,
                    work.path(),
                    control,
                ),
            }?;
            Ok(JobOutput::Restored(Box::new(report)))
        }
        JobRequest::UndoRestore {
            destination,
            vm_uuid,
            options,
        } => undo_restore(config, destination, vm_uuid, options, work.path(), control),
        JobRequest::Verify { destination, quick } => {
            Ok(verify(config, state_dir, destination, *quick, control)?)
        }
        JobRequest::Delete {
            destination,
            vm_uuid,
            checkpoint,
        } => {
            let store = store_of(config, destination)?;
            store.delete_checkpoint(vm_uuid, checkpoint)?;
            crate::bootcheck::forget(state_dir, vm_uuid, checkpoint);
            Ok(JobOutput::Deleted)
        }
        JobRequest::Export { .. } | JobRequest::Prune { .. } => {
            store_job(config, state_dir, request, control)
        }
        JobRequest::RestoreFiles {
            destination,
            vm_uuid,
            checkpoint,
            paths,
            to,
            owner,
        } => {
            let store = Arc::new(store_of(config, destination)?);
            let m = manifest(&store, vm_uuid, checkpoint)?;
            let mut browser = crate::files::browse::Browser::open(store, m)?;
            let paths = paths
                .iter()
                .map(|p| browser.resolve(p))
                .collect::<Result<Vec<_>, _>>()?;
            control.start_phase(crate::progress::Phase::Copying);
            let done = match owner {
                Some(o) => browser.restore_for(&paths, to, (o.uid, o.gid), control)?,
                None => browser.restore(&paths, to, control)?,
            };
            Ok(JobOutput::FilesRestored(Box::new(done)))
        }
        JobRequest::Gc { destination } => {
            let store = store_of(config, destination)?;
            Ok(JobOutput::Collected(store.gc(control)?))
        }
        JobRequest::List { destination } => {
            let store = store_of(config, destination)?;
            Ok(JobOutput::Listed(Box::new(Listing::of(&store)?)))
        }
        JobRequest::BootCheck { .. } => boot_check(config, state_dir, request, control),
        JobRequest::RunFromCheckpoint { .. }
        | JobRequest::KeepRun { .. }
        | JobRequest::DiscardRun { .. } => run_from_checkpoint(config, request, control),
    }
}

/// Running a VM from a checkpoint, keeping or discarding that run.
fn run_from_checkpoint(
    config: &Config,
    request: &JobRequest,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    use crate::restore::run;
    match request {
        JobRequest::RunFromCheckpoint {
            destination,
            vm_uuid,
            checkpoint,
        } => {
            let store = Arc::new(store_of(config, destination)?);
            let m = manifest(&store, vm_uuid, checkpoint)?;
            control.start_phase(crate::progress::Phase::Starting);
            run::start_served(Hypervisor::connect(&config.uri)?, &store, &m, destination)?;
            Ok(JobOutput::Running {
                vm: m.vm.name,
                checkpoint: m.id,
            })
        }
        JobRequest::KeepRun { vm_uuid } => {
            control.start_phase(crate::progress::Phase::Copying);
            Ok(JobOutput::RunKept(run::keep_served(vm_uuid, control)?))
        }
        JobRequest::DiscardRun { vm_uuid } => {
            run::discard_served(vm_uuid)?;
            Ok(JobOutput::RunDiscarded)
        }
        _ => Err(JobError::new(
            ErrorKind::Failed,
            "not a run from a checkpoint",
        )),
    }
}

/// The boot-check job (`request`): the result is kept in `state_dir` too.
fn boot_check(
    config: &Config,
    state_dir: &std::path::Path,
    request: &JobRequest,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    let JobRequest::BootCheck {
        destination,
        vm_uuid,
        checkpoint,
        timeout_secs,
    } = request
    else {
        return Err(JobError::new(ErrorKind::Failed, "not a boot-check"));
    };
    let store = Arc::new(store_of(config, destination)?);
    let m = manifest(&store, vm_uuid, checkpoint)?;
    let hv = Hypervisor::connect(&config.uri)?;
    control.start_phase(crate::progress::Phase::BootChecking);
    let mut options = crate::bootcheck::BootCheckOptions::default();
    if let Some(secs) = timeout_secs {
        options.timeout = std::time::Duration::from_secs(*secs);
    }
    let checked = crate::bootcheck::boot_check(&hv, &store, &m, options, control)?;
    if let Err(e) = checked.save_in(state_dir) {
        tracing::warn!("could not keep the boot-check of {}: {e}", m.id);
    }
    Ok(JobOutput::BootChecked {
        check: Box::new(checked.check),
        vm: m.vm.name,
        thumbnail_png: checked.thumbnail_png,
    })
}

/// The export and prune jobs (a prune forgets the boot-checks, kept in `state_dir`, of the
/// checkpoints it removed).
fn store_job(
    config: &Config,
    state_dir: &std::path::Path,
    request: &JobRequest,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    match request {
        JobRequest::Export {
            destination,
            vm_uuid,
            checkpoint,
            disk,
            out,
            format,
            owner,
        } => {
            let store = store_of(config, destination)?;
            let m = manifest(&store, vm_uuid, checkpoint)?;
            // The image is made as `owner`'s, in the folder they may write in, held open:
            // nothing is written or given away by path.
            let data_bytes = crate::restore::export_disk_for(
                &store,
                &m,
                disk,
                out,
                *format,
                owner.map(|o| (o.uid, o.gid)),
                control,
            )?;
            Ok(JobOutput::Exported {
                checkpoint: m.id,
                vm: m.vm.name,
                file: out.clone(),
                data_bytes,
            })
        }
        JobRequest::Prune {
            destination,
            vm_uuid,
            rules,
            dry_run,
        } => {
            let store = store_of(config, destination)?;
            let decisions = store.prune(rules, *vm_uuid, *dry_run, control)?;
            let gc = if *dry_run {
                None
            } else {
                crate::bootcheck::forget_pruned(state_dir, &decisions);
                Some(store.gc(control)?)
            };
            Ok(JobOutput::Pruned { decisions, gc })
        }
        _ => Err(JobError::internal(&"not an export or prune")),
    }
}

/// A checkpoint of `vm` now into each of its destinations.
/// "Checkpoint now" of one VM, into each of its destinations (or into the one named): the
/// same job as the scheduler's (capture, history, retention, garbage collection), with the
/// VM's keep rules where it is protected into that destination, and none (all kept) where
/// it is not.
fn checkpoint_now(
    config: &Config,
    history: &std::path::Path,
    vm: &str,
    only_into: Option<&str>,
    full_state: bool,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    let protection = config.protection(vm);
    let destinations: Vec<String> = match only_into {
        Some(d) => vec![d.to_owned()],
        None => protection
            .map(|p| p.destinations.clone())
            .unwrap_or_default(),
    };
    if destinations.is_empty() {
        return Err(JobError::new(
            ErrorKind::NotConfigured,
            format!(
                "{vm} has no destination yet: protect it first (Settings, or `rewind protect`)"
            ),
        ));
    }
    let roots = destination::watch_roots(config);
    let mut taken = Vec::new();
    for name in &destinations {
        let dest = config
            .destination(name)
            .ok_or_else(|| no_destination(name))?;
        let policy = match protection {
            Some(p) if p.destinations.contains(name) => p.clone(),
            _ => crate::config::Protection {
                vm: vm.to_owned(),
                destinations: vec![name.clone()],
                keep: crate::store::retention::KeepRules::default(),
                quiesce: protection.is_none_or(|p| p.quiesce),
                ..crate::config::Protection::default()
            },
        };
        let spec = crate::scheduler::job::JobSpec {
            uri: config.uri.clone(),
            protection: policy,
            destination: dest.clone(),
            found: destination::locate(dest, &roots),
            why: crate::policy::Why::Manual,
            force_full_state: full_state,
        };
        let in_flight = crate::history::begin(history, &spec.record())
            .inspect_err(|e| tracing::warn!("the job of {vm} is not on record as it runs: {e}"))
            .ok();
        let (record, result) = crate::scheduler::job::run_for(&spec, control);
        crate::history::append(history, &record)
            .or_warn(format_args!("append to the history {}", history.display()));
        if let Some(job) = in_flight {
            job.end();
        }
        taken.push(result?);
    }
    Ok(JobOutput::Checkpoints(taken))
}

fn undo_restore(
    config: &Config,
    destination: &str,
    vm_uuid: &Uuid,
    options: &crate::restore::RestoreOptions,
    work: &std::path::Path,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    let store = store_of(config, destination)?;
    let safety = store
        .catalog()?
        .checkpoints
        .into_iter()
        .rfind(|m| {
            m.vm.uuid == *vm_uuid && m.labels.iter().any(|l| l == crate::store::SAFETY_LABEL)
        })
        .ok_or_else(|| {
            JobError::new(
                ErrorKind::NotFound,
                format!(
                    "there is no safety checkpoint of this VM in {destination} to go back to: \
                     nothing to undo (a restore asked to take none cannot be undone)"
                ),
            )
        })?;
    let hv = Hypervisor::connect(&config.uri)?;
    let report = crate::restore::restore_in_place(&hv, &store, &safety, options, work, control)?;
    Ok(JobOutput::Restored(Box::new(report)))
}

/// Whether checkpoint `checkpoint` of VM `vm_uuid` in `destination` can resume the VM
/// (see [`crate::restore::resume::check`]): `Err` says why not ([`ErrorKind::CannotResume`]
/// with just the reason as its message), or why that could not be found out.
pub fn check_resume(
    config: &Config,
    destination: &str,
    vm_uuid: &Uuid,
    checkpoint: &str,
) -> Result<(), JobError> {
    let store = store_of(config, destination)?;
    let m = manifest(&store, vm_uuid, checkpoint)?;
    let hv = Hypervisor::connect(&config.uri)?;
    match crate::restore::resume::check(&hv, &store, &m, &m.vm.name) {
        Ok(_) => Ok(()),
        Err(crate::restore::RestoreError::CannotResume { reason, .. }) => {
            Err(JobError::new(ErrorKind::CannotResume, reason))
        }
        Err(e) => Err(e.into()),
    }
}

fn verify(
    config: &Config,
    state_dir: &std::path::Path,
    destination: &str,
    quick: bool,
    control: &Arc<Control>,
) -> Result<JobOutput, JobError> {
    let store = store_of(config, destination)?;
    let started = chrono::Utc::now();
    let report = store.verify(quick, control)?;
    let broken = report
        .broken_checkpoints()
        .into_iter()
        .map(|c| (c.vm_uuid, c.id))
        .collect();
    let record = if report.quick {
        // Presence only: no chunk was re-hashed, so the rotating check's shares stay.
        catalog::VerifyRecord {
            started,
            finished: chrono::Utc::now(),
            quick: true,
            broken,
            shares: catalog::verify_record(state_dir, store.config().id)
                .map(|r| r.shares)
                .unwrap_or_default(),
        }
    } else {
        catalog::VerifyRecord::full(started, chrono::Utc::now(), broken)
    };
    // The report stands even if the record cannot be kept; the marks are a convenience.
    catalog::save_verify_record(state_dir, store.config().id, &record)
        .or_warn("keep the verify's findings in the state folder");
    Ok(JobOutput::Verified(Box::new(report)))
}
