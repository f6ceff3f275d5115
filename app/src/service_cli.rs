//! The CLI's VM commands through the protection service: `vms`, `checkpoint`, `restore`
//! and `undo-restore` go to the service when it runs, so that a user in the `libvirt` group
//! needs no access to VM files, QEMU's sockets or the stores. Root with no service running
//! does the work directly (scripts, disaster recovery on a bare host); anyone else is told
//! how to start the service.
//!
//! The output is the same either way: the same lines, the same JSON.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow, bail};
use rewind_core::config::Config;
use rewind_core::engine::jobs::Listing;
use rewind_core::engine::jobs::{JobError, JobId, JobOutput, JobRequest};
use rewind_core::engine::{Command, Event};
use rewind_core::progress::Control;
use rewind_core::restore::{DiskStorage, NewVm, RestoreOptions, RestoreReport};
use rewind_core::store::Manifest;
use rewind_core::store::retention::KeepRules;
use rewind_core::view::catalog::DestinationView;
use rewind_core::vm::VmInfo;
use rewind_service::Connection;

use crate::progress_cli::Progress;
use crate::store_cli::{CheckpointJson, ExportAsk, say_taken};

/// Where a command runs.
pub enum Route {
    /// Through the service.
    Service(Box<Session>),
    /// Here, in this process (root with no service).
    Direct,
}

/// Goes through the service if it runs; directly if it does not and this is root, or if
/// root named another libvirt connection than the service's.
///
/// # Errors
/// The service refused this user, or it is not running and this is not root, or this user
/// named another libvirt connection than the service's (the service works on its own
/// only; never on another host by mistake).
pub fn route(connect: Option<&str>) -> anyhow::Result<Route> {
    let root = rustix::process::geteuid().is_root();
    match rewind_service::connect("cli") {
        Ok(connection) => {
            let theirs = &connection.welcome().uri;
            match connect {
                Some(uri) if uri != theirs && root => Ok(Route::Direct),
                Some(uri) if uri != theirs => bail!(
                    "Rewind's protection service works with the VMs of {theirs}, not of {uri}; \
                     leave out --connect (and LIBVIRT_DEFAULT_URI), or run this as root \
                     (sudo rewind …) to work with {uri} directly"
                ),
                _ => Ok(Route::Service(Box::new(Session::new(connection)))),
            }
        }
        Err(e) if e.is_not_running() && root => Ok(Route::Direct),
        Err(e) => Err(e.into()),
    }
}

/// A connection to the service and what it said of the state so far.
pub struct Session {
    connection: Connection,
    config: Option<Arc<Config>>,
    vms: Option<Vec<VmInfo>>,
    /// The newest list of destinations and their checkpoints.
    destinations: Option<Arc<Vec<DestinationView>>>,
}

impl Session {
    fn new(connection: Connection) -> Self {
        Self {
            connection,
            config: None,
            vms: None,
            destinations: None,
        }
    }

    /// Reads events (keeping the state they carry) until `want` finds what it waits for.
    fn wait<T>(&mut self, mut want: impl FnMut(&Event) -> Option<T>) -> anyhow::Result<T> {
        loop {
            let event = self
                .connection
                .next_event()
                .context("lost the connection to Rewind's protection service")?
                .ok_or_else(|| {
                    anyhow!(
                        "Rewind's protection service closed the connection (it may be \
                         stopping): try again"
                    )
                })?;
            match &event {
                Event::Config { config, .. } => self.config = Some(config.clone()),
                Event::Vms(vms) => self.vms = Some(vms.clone()),
                Event::Destinations(d) => self.destinations = Some(d.clone()),
                _ => {}
            }
            if let Some(found) = want(&event) {
                return Ok(found);
            }
        }
    }

    fn send(&mut self, command: Command) -> anyhow::Result<()> {
        self.connection
            .send(command)
            .context("lost the connection to Rewind's protection service")
    }

    /// The VMs, as the service lists them.
    fn vms(&mut self) -> anyhow::Result<Vec<VmInfo>> {
        if let Some(vms) = &self.vms {
            return Ok(vms.clone());
        }
        self.wait(|e| match e {
            Event::Vms(vms) => Some(Ok(vms.clone())),
            Event::ConnectionFailed { error, .. } => Some(Err(error.clone())),
            _ => None,
        })?
        .map_err(|e| anyhow::Error::new(e).context("the protection service cannot reach libvirt"))
    }

    fn config(&mut self) -> anyhow::Result<Arc<Config>> {
        if let Some(c) = &self.config {
            return Ok(c.clone());
        }
        self.wait(|e| match e {
            Event::Config { config, .. } => Some(config.clone()),
            _ => None,
        })
    }

    /// The UUID of VM `vm` (a name or a UUID): of the VM on this host, else of the VM of
    /// that name whose checkpoints are in `destination` (a VM deleted from the host).
    fn vm_uuid(&mut self, vm: &str, destination: &str, dest: &Path) -> anyhow::Result<uuid::Uuid> {
        if let Ok(uuid) = uuid::Uuid::parse_str(vm) {
            return Ok(uuid);
        }
        if let Some(host_vm) = self.vms()?.iter().find(|v| v.name == vm) {
            return uuid::Uuid::parse_str(&host_vm.uuid)
                .with_context(|| format!("libvirt gave VM {vm:?} a malformed UUID"));
        }
        let views = match &self.destinations {
            Some(views) => views.clone(),
            None => self.wait(|e| match e {
                Event::Destinations(all) => Some(all.clone()),
                _ => None,
            })?,
        };
        views
            .iter()
            .filter(|d| d.destination.name == destination)
            .flat_map(|d| &d.checkpoints)
            .rfind(|c| c.vm == vm)
            .map(|c| c.vm_uuid)
            .ok_or_else(|| {
                crate::exit::not_found(format!(
                    "there is no VM named {vm:?} on this host and no checkpoint of one in {}; \
                     `rewind checkpoints --in {}` lists what it holds",
                    dest.display(),
                    dest.display()
                ))
            })
    }

    /// The service's destination that `dest` names (by name, folder or URL); added to the
    /// service's configuration if it is a folder or URL it does not have yet (a folder
    /// only if this user may write there).
    fn destination(&mut self, dest: &Path) -> anyhow::Result<String> {
        let passphrase = std::env::var("REWIND_PASSPHRASE")
            .ok()
            .map(zeroize::Zeroizing::new);
        self.destination_with(dest, passphrase)
    }

    /// The service's destination that `dest` names (its name, folder or URL), if any.
    fn configured(&mut self, dest: &Path) -> anyhow::Result<Option<String>> {
        let config = self.config()?;
        let said = dest.to_string_lossy();
        let folder = (!said.starts_with("ssh://"))
            .then(|| std::path::absolute(dest).ok())
            .flatten();
        let same = |location: &str| match &folder {
            Some(f) => Path::new(location.trim_end_matches('/')) == f.as_path(),
            None => location == said,
        };
        Ok(config
            .destinations
            .iter()
            .find(|d| d.name == said || same(&d.location))
            .map(|d| d.name.clone()))
    }

    /// [`Session::destination`] with the passphrase of a store it adds.
    fn destination_with(
        &mut self,
        dest: &Path,
        passphrase: Option<zeroize::Zeroizing<String>>,
    ) -> anyhow::Result<String> {
        if let Some(name) = self.configured(dest)? {
            return Ok(name);
        }
        Ok(self.add_destination(dest, passphrase)?.name)
    }

    /// Asks the service to add `dest` as a destination (making a store there if there is
    /// none, with `passphrase`); what it did.
    fn add_destination(
        &mut self,
        dest: &Path,
        passphrase: Option<zeroize::Zeroizing<String>>,
    ) -> anyhow::Result<rewind_core::destination::Added> {
        let said = dest.to_string_lossy();
        let folder =
            if said.starts_with("ssh://") {
                None
            } else {
                Some(std::path::absolute(dest).with_context(|| {
                    format!("could not make {} an absolute path", dest.display())
                })?)
            };
        self.send(match folder {
            Some(folder) => Command::AddFolderDestination {
                folder,
                passphrase,
                vm_disks: Vec::new(),
            },
            None => Command::AddRemoteDestination {
                url: said.into_owned(),
                passphrase,
            },
        })?;
        let added = self.wait(|e| match e {
            Event::DestinationAdded { result, .. } => Some(result.clone()),
            _ => None,
        })?;
        Ok(added?)
    }

    /// Asks the service `ask` about checkpoint `key`'s files and waits for its answer.
    pub(crate) fn browse(
        &mut self,
        key: &rewind_core::engine::ResumeKey,
        ask: rewind_core::engine::files::BrowseAsk,
    ) -> anyhow::Result<rewind_core::engine::files::BrowseAnswer> {
        let asked = ask.clone();
        self.send(Command::Browse {
            key: key.clone(),
            ask,
        })?;
        Ok(self.wait(|e| match e {
            Event::Browsed {
                key: k,
                ask: a,
                result,
            } if k == key && *a == asked => Some(result.clone()),
            _ => None,
        })??)
    }

    /// A job of the service, followed to its end (progress on stderr, Ctrl-C cancels).
    pub(crate) fn job(&mut self, request: JobRequest, label: &str) -> anyhow::Result<JobOutput> {
        install_interrupt()?;
        self.run_job(request, label)
    }

    /// The service's destination for `dest`, if it is one of its own; and the checkpoint
    /// `checkpoint` (an id or `latest`) of VM `vm` in it.
    pub(crate) fn served_checkpoint(
        &mut self,
        dest: &Path,
        vm: &str,
        checkpoint: &str,
    ) -> Option<anyhow::Result<(String, Manifest)>> {
        let destination = served(self, dest)?;
        Some(destination.and_then(|destination| {
            let vm_uuid = self.vm_uuid(vm, &destination, dest)?;
            let listing = self.listing(&destination)?;
            let of_vm: Vec<Manifest> = listing
                .checkpoints
                .into_iter()
                .filter(|m| m.vm.uuid == vm_uuid)
                .collect();
            let m = crate::store_cli::find_in(of_vm, dest, &vm_uuid.to_string(), checkpoint)?;
            Ok((destination, m))
        }))
    }

    /// The checkpoints in the service's destination `destination`.
    fn listing(&mut self, destination: &str) -> anyhow::Result<Listing> {
        let label = format!("Reading {destination}");
        match self.run_job(
            JobRequest::List {
                destination: destination.to_owned(),
            },
            &label,
        )? {
            JobOutput::Listed(listing) => Ok(*listing),
            other => bail!("the service answered {other:?} to a list"),
        }
    }

    /// Starts `request` and follows it to its end, with a progress line on a terminal and
    /// Ctrl-C cancelling it.
    fn run_job(&mut self, request: JobRequest, label: &str) -> anyhow::Result<JobOutput> {
        let asked = as_sent(&request)?;
        // Reading a store's list is quick and moves no data: no progress for it.
        let shown = !matches!(request, JobRequest::List { .. });
        self.send(Command::Start(request))?;
        let job = self.wait(|e| match e {
            Event::JobStarted { job, request, .. }
                if as_sent(request).is_ok_and(|r| r == asked) =>
            {
                Some(Ok(*job))
            }
            Event::Failed { error } => Some(Err(error.clone())),
            _ => None,
        })??;
        let canceller = self.connection.canceller()?;
        *CURRENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((job, canceller));
        let control = Arc::new(Control::new());
        let reporter = shown.then(|| Progress::start(label, control.clone()));
        let result = self.wait(|e| match e {
            Event::JobProgress {
                job: j,
                phase,
                done_bytes,
                total_bytes,
                force_off_in,
            } if *j == job => {
                control.mirror(*phase, *done_bytes, *total_bytes);
                control.set_force_off_at(force_off_in.map(|d| std::time::SystemTime::now() + d));
                None
            }
            Event::JobFinished { job: j, result } if *j == job => Some(result.clone()),
            _ => None,
        });
        *CURRENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        drop(reporter);
        let finished = result.map_err(|lost| {
            anyhow::Error::new(JobCutOff {
                label: label.to_owned(),
                lost: format!("{lost:#}"),
            })
        })?;
        Ok(finished?)
    }
}

/// What `rewind run --keep` says when the service stopped during the copy (`e` is a
/// [`JobCutOff`]; any other error is returned as it is).
fn keep_cut_off(vm: &str, e: anyhow::Error) -> anyhow::Error {
    let Some(cut) = e.downcast_ref::<JobCutOff>() else {
        return e;
    };
    tracing::debug!("{}", cut.lost);
    anyhow!(
        "Rewind's protection service stopped while it copied the disks of {vm:?}. {vm} \
         runs on from its checkpoint, and its own disks are as they were: when the service \
         starts again, it copies them again from the beginning by itself (`rewind run --keep \
         {vm}` then says that it is being kept)"
    )
}

/// The connection to the service was lost while a job of this client ran (the service
/// stopped, was killed or restarted): what the job did is not known here.
#[derive(Debug, thiserror::Error)]
#[error(
    "{lost}, while it ran {label:?}; whether it finished is not known here: Rewind's window shows it once the service runs again"
)]
pub struct JobCutOff {
    /// The job, as shown.
    label: String,
    /// What happened to the connection.
    lost: String,
}

/// `request` as a client sends it, to know the job the service started for it: the
/// service fills in who owns what it writes.
fn as_sent(request: &JobRequest) -> serde_json::Result<serde_json::Value> {
    let mut request = request.clone();
    if let JobRequest::Export { owner, .. } | JobRequest::RestoreFiles { owner, .. } = &mut request
    {
        *owner = None;
    }
    serde_json::to_value(&request)
}

/// The job being followed, for Ctrl-C to cancel.
static CURRENT: Mutex<Option<(JobId, rewind_service::client::Canceller)>> = Mutex::new(None);

/// Ctrl-C and SIGTERM cancel the job being followed (the service stops it and cleans up);
/// a second one leaves at once, and the job goes on in the service.
fn install_interrupt() -> anyhow::Result<()> {
    let pressed = std::sync::atomic::AtomicBool::new(false);
    ctrlc::set_handler(move || {
        if pressed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        let mut current = CURRENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match current.as_mut() {
            Some((job, canceller)) => {
                eprintln!("cancelling…");
                if let Err(e) = canceller.cancel(*job) {
                    eprintln!("could not ask the service to cancel: {e}");
                }
            }
            // No job runs yet (or any more): nothing to stop but this process.
            None => std::process::exit(130),
        }
    })
    .context("could not install the signal handler")
}

/// `rewind vms` through the service.
pub fn vms(
    out: &mut dyn Write,
    session: &mut Session,
    json: bool,
    write_table: impl FnOnce(&mut dyn Write, &str, &[VmInfo]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let vms = session.vms()?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &vms).context("could not write JSON")?;
        writeln!(out)?;
        Ok(())
    } else {
        let uri = session.connection.welcome().uri.clone();
        write_table(out, &uri, &vms)
    }
}

/// `rewind checkpoint VM... --to DEST` through the service.
pub fn checkpoint(
    out: &mut dyn Write,
    session: &mut Session,
    vms: &[String],
    dest: &Path,
    json: bool,
    full_state: bool,
) -> anyhow::Result<()> {
    let destination = session.destination(dest)?;
    install_interrupt()?;
    let mut taken = Vec::new();
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    for vm in vms {
        let request = JobRequest::Checkpoint {
            vm: vm.clone(),
            destination: Some(destination.clone()),
            full_state,
        };
        match session.run_job(request, vm) {
            Ok(JobOutput::Checkpoints(manifests)) => {
                for m in manifests {
                    if !json {
                        say_taken(out, &m)?;
                    }
                    taken.push(m);
                }
            }
            Ok(other) => failed.push((vm.clone(), anyhow!("unexpected answer {other:?}"))),
            Err(e) => {
                if vms.len() > 1 {
                    eprintln!(
                        "warning: no checkpoint of {vm}: {}",
                        crate::error_text::one_line(&e)
                    );
                }
                let cancelled = e
                    .downcast_ref::<JobError>()
                    .is_some_and(|j| j.kind == rewind_core::job_error::ErrorKind::Cancelled);
                failed.push((vm.clone(), e));
                if cancelled {
                    break;
                }
            }
        }
    }
    // With none taken, the error alone is the JSON (`crate::exit`).
    if json && (failed.is_empty() || !taken.is_empty()) {
        let list: Vec<CheckpointJson<'_>> = taken.iter().map(CheckpointJson::of).collect();
        serde_json::to_writer_pretty(&mut *out, &list)?;
        writeln!(out)?;
    }
    crate::store_cli::failures(vms, failed)
}

/// What `restore` and `undo-restore` ask.
pub struct RestoreAsk<'a> {
    /// The store's folder or URL, or a destination's name.
    pub dest: &'a Path,
    /// The VM (name or UUID, as in the store).
    pub vm: &'a str,
    /// The checkpoint's id or `latest`; `None`: the newest safety checkpoint (undo).
    pub checkpoint: Option<&'a str>,
    /// The new VM's name (`restore --as`); `None`: in place.
    pub as_name: Option<&'a str>,
    /// Folder for the new VM's disks.
    pub disk_dir: Option<&'a Path>,
    /// Storage pool for the new VM's disks.
    pub pool: Option<&'a str>,
    /// How.
    pub options: RestoreOptions,
    /// Print JSON.
    pub json: bool,
}

/// `rewind restore VM CHECKPOINT --from DEST` (in place) and `rewind undo-restore VM --from
/// DEST` through the service. Which checkpoint `latest` (or the newest safety checkpoint)
/// is, the service finds when the job runs, so that one taken a moment ago counts.
pub fn restore(
    out: &mut dyn Write,
    session: &mut Session,
    ask: &RestoreAsk<'_>,
) -> anyhow::Result<()> {
    if ask.as_name.is_none() && ask.pool.is_some() {
        bail!(
            "--pool is for restoring as a new VM (--as NAME) or onto another host (--connect \
             URI, as root); a restore in place writes the disks where they were"
        );
    }
    let destination = session.destination(ask.dest)?;
    let vm_uuid = session.vm_uuid(ask.vm, &destination, ask.dest)?;
    let as_new = match ask.as_name {
        None => None,
        Some(name) => Some(NewVm {
            name: Some(name.to_owned()),
            storage: match (ask.pool, ask.disk_dir) {
                (Some(pool), _) => DiskStorage::Pool(pool.to_owned()),
                (None, Some(dir)) => DiskStorage::Folder(absolute(dir)?),
                (None, None) => {
                    // Beside the original's disks, as a restore here does.
                    let listing = session.listing(&destination)?;
                    let m = crate::store_cli::find_in(
                        listing.checkpoints,
                        ask.dest,
                        &vm_uuid.to_string(),
                        ask.checkpoint.unwrap_or("latest"),
                    )?;
                    DiskStorage::Folder(crate::restore_cli::default_disk_dir(&m))
                }
            },
        }),
    };
    install_interrupt()?;
    let request = match ask.checkpoint {
        Some(checkpoint) => JobRequest::Restore {
            destination,
            vm_uuid,
            checkpoint: checkpoint.to_owned(),
            options: ask.options.clone(),
            as_new,
        },
        None => JobRequest::UndoRestore {
            destination,
            vm_uuid,
            options: ask.options.clone(),
        },
    };
    let report: RestoreReport = match session.run_job(request, ask.vm)? {
        JobOutput::Restored(report) => *report,
        other => bail!("the service answered the restore with {other:?}"),
    };
    if ask.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        crate::restore_cli::write_report(
            out,
            ask.dest,
            &crate::restore_cli::Restored {
                id: &report.checkpoint,
                vm: &report.vm,
                time: report.checkpoint_time,
            },
            &report,
        )?;
    }
    if let Some(e) = &report.start_error {
        bail!("VM {:?} was restored, but it did not start: {e}", report.vm);
    }
    Ok(())
}

/// What `rewind run` is asked.
#[derive(Debug)]
pub struct RunAsk<'a> {
    /// The VM (name or UUID).
    pub vm: &'a str,
    /// The checkpoint to run from (or `latest`); `None` with `keep` or `discard`.
    pub checkpoint: Option<&'a str>,
    /// The store.
    pub dest: Option<&'a Path>,
    /// Keep the run.
    pub keep: bool,
    /// Discard the run.
    pub discard: bool,
    /// Print JSON.
    pub json: bool,
}

/// `rewind run` through the service, which serves the checkpoint while the VM runs from it.
///
/// # Errors
/// The VM or checkpoint is not there, the VM runs already, or the service refused.
pub fn run(out: &mut dyn Write, session: &mut Session, ask: &RunAsk<'_>) -> anyhow::Result<()> {
    let vm_uuid = |session: &mut Session| -> anyhow::Result<uuid::Uuid> {
        if let Ok(uuid) = uuid::Uuid::parse_str(ask.vm) {
            return Ok(uuid);
        }
        let vms = session.vms()?;
        let found = vms.iter().find(|v| v.name == ask.vm).ok_or_else(|| {
            crate::exit::not_found(format!(
                "there is no VM called {:?} on this machine; `rewind vms` lists them",
                ask.vm
            ))
        })?;
        Ok(uuid::Uuid::parse_str(&found.uuid)?)
    };
    install_interrupt()?;
    if ask.keep || ask.discard {
        let vm_uuid = vm_uuid(session)?;
        let request = if ask.keep {
            JobRequest::KeepRun { vm_uuid }
        } else {
            JobRequest::DiscardRun { vm_uuid }
        };
        let output = session
            .run_job(request, ask.vm)
            .map_err(|e| if ask.keep { keep_cut_off(ask.vm, e) } else { e })?;
        match output {
            JobOutput::RunKept(files) => {
                if ask.json {
                    serde_json::to_writer_pretty(
                        &mut *out,
                        &serde_json::json!({ "vm": ask.vm, "kept": true, "disks": files }),
                    )?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{} keeps running, now on its own disks: {}",
                        ask.vm,
                        files
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )?;
                    writeln!(
                        out,
                        "Its disk files from before are left as they were; delete them once you no longer need them."
                    )?;
                }
            }
            JobOutput::RunDiscarded => {
                if ask.json {
                    serde_json::to_writer_pretty(
                        &mut *out,
                        &serde_json::json!({ "vm": ask.vm, "discarded": true }),
                    )?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{} is turned off and is as it was before the run: what it wrote since is gone.",
                        ask.vm
                    )?;
                }
            }
            other => bail!("the service answered {other:?} to a run from a checkpoint"),
        }
        return Ok(());
    }
    let (Some(dest), Some(checkpoint)) = (ask.dest, ask.checkpoint) else {
        bail!("say which checkpoint to run from: rewind run VM CHECKPOINT --from DEST");
    };
    let destination = session.destination(dest)?;
    let vm_uuid = session.vm_uuid(ask.vm, &destination, dest)?;
    let request = JobRequest::RunFromCheckpoint {
        destination,
        vm_uuid,
        checkpoint: checkpoint.to_owned(),
    };
    match session.run_job(request, ask.vm)? {
        JobOutput::Running { vm, checkpoint } => {
            if ask.json {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &serde_json::json!({ "vm": vm, "checkpoint": checkpoint, "running": true }),
                )?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{vm} runs from checkpoint {checkpoint}, its disks read from the store; its own disks are untouched."
                )?;
                writeln!(
                    out,
                    "Keep it (its disks copied while it runs): rewind run --keep {vm:?}\nDiscard it (back to before): rewind run --discard {vm:?}"
                )?;
            }
            Ok(())
        }
        other => bail!("the service answered {other:?} to a run from a checkpoint"),
    }
}

/// Has the service save `config`, and waits until it uses it.
fn save_config(session: &mut Session, config: &Config) -> anyhow::Result<()> {
    session.send(Command::SaveConfig(Box::new(config.clone())))?;
    session
        .wait(|e| match e {
            Event::Config { config: now, .. } if **now == *config => Some(Ok(())),
            Event::Failed { error } => Some(Err(error.clone())),
            _ => None,
        })?
        .map_err(|e| anyhow::Error::new(e).context("the protection service did not change it"))
}

/// `rewind pause`/`rewind resume` through the service: its configuration changes, and the
/// answer waits until it uses the new one.
///
/// # Errors
/// The VM is not protected, the service refused the change, or the connection was lost.
pub fn set_paused(
    out: &mut dyn Write,
    session: &mut Session,
    vm: Option<&str>,
    pause: Option<rewind_core::pause::Pause>,
    json: bool,
) -> anyhow::Result<()> {
    let mut config = (*session.config()?).clone();
    let said = crate::protect_cli::apply_pause(&mut config, vm, pause)?;
    save_config(session, &config)?;
    let value = crate::protect_cli::paused_json(&config, vm);
    crate::protect_cli::say_either(out, json, &said, &value)
}

/// `rewind unprotect VM` through the service.
///
/// # Errors
/// The VM is not protected, or the service refused the change.
pub fn unprotect(
    out: &mut dyn Write,
    session: &mut Session,
    vm: &str,
    json: bool,
) -> anyhow::Result<()> {
    let mut config = (*session.config()?).clone();
    let (said, value) = crate::protect_cli::unprotect_in(&mut config, vm)?;
    save_config(session, &config)?;
    crate::protect_cli::say_either(out, json, &said, &value)
}

/// `rewind protect VM --to DEST ...` through the service: the destination is one the
/// service has (by name, folder or URL) or is added (a folder only if this user may write
/// there; a passphrase file is read here, as this user, and kept by the service), then the
/// VM's policy goes into the service's configuration.
///
/// # Errors
/// The VM or the destination cannot be had, or the service refused the change.
pub fn protect(
    out: &mut dyn Write,
    session: &mut Session,
    args: &crate::protect_cli::ProtectArgs<'_>,
) -> anyhow::Result<()> {
    let info = session
        .vms()?
        .into_iter()
        .find(|v| v.name == args.vm || v.uuid.eq_ignore_ascii_case(args.vm))
        .ok_or_else(|| {
            crate::exit::not_found(format!(
                "there is no VM called {:?}; `rewind vms` lists them",
                args.vm
            ))
        })?;
    let policy = crate::protect_cli::Policy::of(args)?;
    let passphrase = args
        .passphrase_file
        .map(|file| {
            std::fs::read_to_string(file)
                .map(|text| zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned()))
                .with_context(|| format!("could not read the passphrase file {}", file.display()))
        })
        .transpose()?;
    let name = session.destination_with(Path::new(args.dest), passphrase)?;
    let config = match session.config.clone() {
        Some(c) if c.destination(&name).is_some() => c,
        _ => session.wait(|e| match e {
            Event::Config { config, .. } if config.destination(&name).is_some() => {
                Some(config.clone())
            }
            _ => None,
        })?,
    };
    let mut config = (*config).clone();
    let location = config
        .destination(&name)
        .map(|d| d.location.clone())
        .unwrap_or_default();
    let said = crate::protect_cli::protect_in(&mut config, &info, &name, &location, args, &policy);
    save_config(session, &config)?;
    if args.json {
        let destination = (name.as_str(), location.as_str());
        return crate::protect_cli::say_protected(out, &config, &info.name, destination, None);
    }
    writeln!(out, "{said}")?;
    writeln!(
        out,
        "The protection service takes the first checkpoint now, and the next ones on schedule."
    )?;
    Ok(())
}

/// `rewind status` through the service: its configuration, history, scheduler and drives.
///
/// # Errors
/// The connection was lost.
pub fn status(out: &mut dyn Write, session: &mut Session, json: bool) -> anyhow::Result<()> {
    use rewind_core::engine::SchedulerView;
    let config = session.config()?;
    let mut records = None;
    let mut live = None;
    session.wait(|e| {
        match e {
            Event::History(h) => records = Some(h.as_ref().clone()),
            Event::Scheduler(view) => {
                live = Some(match view {
                    SchedulerView::Elsewhere { status, .. } => status.as_deref().cloned(),
                    _ => None,
                });
            }
            _ => {}
        }
        (records.is_some() && live.is_some()).then_some(())
    })?;
    if session.destinations.is_none() {
        session.wait(|e| matches!(e, Event::Destinations(_)).then_some(()))?;
    }
    let views = session.destinations.clone().unwrap_or_default();
    let found = move |d: &rewind_core::config::Destination| {
        views
            .iter()
            .find(|v| v.destination.name == d.name)
            .map_or_else(
                || rewind_core::destination::Availability::Missing {
                    reason: "the protection service has not looked yet".into(),
                },
                |v| v.found.clone(),
            )
    };
    crate::protect_cli::status_of(
        out,
        json,
        crate::protect_cli::StatusInputs {
            path: std::path::PathBuf::from("the protection service's configuration"),
            config: (*config).clone(),
            error: None,
            records: records.unwrap_or_default(),
            live: live.flatten(),
            found: Box::new(found),
        },
    )
}

/// `rewind history` through the service: its job history.
///
/// # Errors
/// The connection was lost.
pub fn history(
    out: &mut dyn Write,
    session: &mut Session,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let records = session.wait(|e| match e {
        Event::History(h) => Some(h.as_ref().clone()),
        _ => None,
    })?;
    crate::protect_cli::show_records(out, records, vm, json)
}

/// `rewind verify --in DEST` of one of the service's destinations, by the service.
/// `None`: `dest` is not one of them (it is verified here, as this user).
///
/// # Errors
/// The job failed, or found damage.
pub fn verify(
    out: &mut dyn Write,
    session: &mut Session,
    dest: &Path,
    quick: bool,
    json: bool,
) -> Option<anyhow::Result<()>> {
    let destination = match session.configured(dest) {
        Ok(Some(name)) => name,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    let label = format!("Verifying {destination}");
    Some(
        session
            .run_job(JobRequest::Verify { destination, quick }, &label)
            .and_then(|output| match output {
                JobOutput::Verified(report) => {
                    crate::store_cli::say_verified(out, &report, dest, json)
                }
                other => Err(anyhow!("the service answered {other:?} to a verify")),
            }),
    )
}

/// A path as the service must get it: absolute (it does not share this process's current
/// folder).
fn absolute(path: &Path) -> anyhow::Result<std::path::PathBuf> {
    std::path::absolute(path)
        .with_context(|| format!("could not make {} an absolute path", path.display()))
}

/// The service's destination that `dest` names, for a store command that the service does
/// for its own destinations. `None`: `dest` is not one of them, and the command runs here,
/// as this user.
fn served(session: &mut Session, dest: &Path) -> Option<anyhow::Result<String>> {
    session.configured(dest).transpose()
}

/// `rewind checkpoints [VM] --in DEST` of one of the service's destinations, read by the
/// service. `None`: `dest` is not one of them.
///
/// # Errors
/// The store cannot be read, or holds no checkpoint of `vm`.
pub fn checkpoints(
    out: &mut dyn Write,
    session: &mut Session,
    dest: &Path,
    vm: Option<&str>,
    json: bool,
) -> Option<anyhow::Result<()>> {
    let destination = served(session, dest)?;
    Some(destination.and_then(|destination| {
        let listing = session.listing(&destination)?;
        crate::store_cli::show_listing(out, dest, &listing, vm, json)
    }))
}

/// What `prune` asks.
pub struct PruneAsk<'a> {
    /// The store's folder or URL, or a destination's name.
    pub dest: &'a Path,
    /// Only this VM (name or UUID, as in the store).
    pub vm: Option<&'a str>,
    /// What to keep.
    pub rules: KeepRules,
    /// Only say what would go.
    pub dry_run: bool,
    /// Print JSON.
    pub json: bool,
}

/// `rewind prune --in DEST ...` of one of the service's destinations, by the service.
/// `None`: `dest` is not one of them.
///
/// # Errors
/// The job failed.
pub fn prune(
    out: &mut dyn Write,
    session: &mut Session,
    ask: &PruneAsk<'_>,
) -> Option<anyhow::Result<()>> {
    let destination = served(session, ask.dest)?;
    Some(destination.and_then(|destination| {
        let vm_uuid = match ask.vm {
            None => None,
            Some(vm) => Some(crate::store_cli::vm_in(
                &session.listing(&destination)?.checkpoints,
                ask.dest,
                vm,
            )?),
        };
        install_interrupt()?;
        let label = format!("Pruning {destination}");
        let request = JobRequest::Prune {
            destination,
            vm_uuid,
            rules: ask.rules,
            dry_run: ask.dry_run,
        };
        match session.run_job(request, &label)? {
            JobOutput::Pruned { decisions, gc } => {
                crate::store_cli::say_pruned(out, &decisions, gc, ask.dry_run, ask.json)
            }
            other => bail!("the service answered {other:?} to a prune"),
        }
    }))
}

/// `rewind gc --in DEST` of one of the service's destinations, by the service. `None`:
/// `dest` is not one of them.
///
/// # Errors
/// The job failed.
pub fn gc(
    out: &mut dyn Write,
    session: &mut Session,
    dest: &Path,
    json: bool,
) -> Option<anyhow::Result<()>> {
    let destination = served(session, dest)?;
    Some(destination.and_then(|destination| {
        install_interrupt()?;
        let label = format!("Collecting {destination}");
        match session.run_job(JobRequest::Gc { destination }, &label)? {
            JobOutput::Collected(report) => crate::store_cli::say_collected(out, &report, json),
            other => bail!("the service answered {other:?} to a garbage collection"),
        }
    }))
}

/// `rewind export ... --from DEST` of one of the service's destinations, by the service:
/// the image is written where this user may write, and is this user's. `None`: `dest` is
/// not one of them.
///
/// # Errors
/// The job failed, or this user may not write the file.
pub fn export(
    out: &mut dyn Write,
    session: &mut Session,
    ask: &ExportAsk<'_>,
) -> Option<anyhow::Result<()>> {
    let destination = served(session, ask.dest)?;
    Some(destination.and_then(|destination| {
        let vm_uuid = session.vm_uuid(ask.vm, &destination, ask.dest)?;
        let file = absolute(ask.file)?;
        install_interrupt()?;
        let request = JobRequest::Export {
            destination,
            vm_uuid,
            checkpoint: ask.checkpoint.to_owned(),
            disk: ask.disk.to_owned(),
            out: file,
            format: ask.format,
            owner: None,
        };
        match session.run_job(request, ask.vm)? {
            JobOutput::Exported {
                checkpoint,
                vm,
                file,
                data_bytes,
            } => crate::store_cli::say_exported(
                out,
                &crate::store_cli::Exported {
                    checkpoint: &checkpoint,
                    vm: &vm,
                    disk: ask.disk,
                    file: &file,
                    format: ask.format,
                    data_bytes,
                },
                ask.json,
            ),
            other => bail!("the service answered {other:?} to an export"),
        }
    }))
}

/// `rewind init DEST [--encrypt]` with the service running: the service makes the store
/// in a folder this user may write to (new or empty), keeps its passphrase, and has it as a
/// destination from then on. A store on another host is made here, as this user.
///
/// # Errors
/// There is a store there already, the folder is not empty or not this user's to write,
/// or the passphrase could not be had.
pub fn init(
    out: &mut dyn Write,
    session: &mut Session,
    dest: &Path,
    encrypt: bool,
    json: bool,
) -> Option<anyhow::Result<()>> {
    if dest.to_string_lossy().starts_with("ssh://") {
        return None;
    }
    Some((|| {
        let folder = absolute(dest)?;
        let already = || {
            anyhow!(
                "{} holds a Rewind store already: use it as it is (`rewind checkpoints --in {}`), \
                 or choose another folder",
                dest.display(),
                dest.display()
            )
        };
        // What this user sees; the service's own stores are private to it, so it is asked
        // too (below).
        if folder.join("rewind-store.json").exists() || session.configured(&folder)?.is_some() {
            return Err(already());
        }
        let passphrase = if encrypt {
            let bytes = crate::store_cli::passphrase(dest, true)?;
            Some(zeroize::Zeroizing::new(
                String::from_utf8(bytes.to_vec())
                    .context("the passphrase is not valid UTF-8 text")?,
            ))
        } else {
            None
        };
        let added = session.add_destination(&folder, passphrase)?;
        if !added.created {
            bail!(
                "{} holds a Rewind store already; the protection service has it as destination \
                 {:?} now. Use it as it is (`rewind checkpoints --in {}`)",
                dest.display(),
                added.name,
                dest.display()
            );
        }
        let id = rewind_core::store::Store::probe(&folder)
            .ok()
            .map(|c| c.id.to_string());
        let made = crate::store_cli::Initialised {
            id,
            location: folder.display().to_string(),
            encrypted: encrypt,
            destination: Some(added.name),
        };
        crate::store_cli::say_initialised(out, &made, json)
    })())
}
