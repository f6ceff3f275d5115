//! Protection as the engine keeps it: the configuration and its watchers, the scheduler it
//! hosts (or the one another process runs), the destinations' scan and the running jobs.

use super::*;

/// What the engine keeps about protection.
pub(super) struct Protection {
    pub(super) paths: Paths,
    pub(super) config: Config,
    pub(super) scheduler: Option<SchedulerHandle>,
    pub(super) holder: Option<String>,
    pub(super) jobs: HashMap<JobId, Arc<Control>>,
    pub(super) next_job: JobId,
    pub(super) scanning: bool,
    pub(super) rescan: bool,
    pub(super) _watchers: Vec<Box<dyn std::any::Any + Send>>,
    /// The thread that answers questions about checkpoints' files, once asked one.
    pub(super) files: Option<super::files::FilesWorker>,
}

impl Protection {
    /// Looks at every destination again, off the loop (once at a time).
    pub(super) fn scan(&mut self, inner: &mpsc::Sender<Inner>) {
        if self.scanning {
            self.rescan = true;
            return;
        }
        self.scanning = true;
        let config = self.config.clone();
        let state_dir = self.paths.state_dir();
        let tx = inner.clone();
        tokio::task::spawn_blocking(move || {
            // A closed channel: the engine is stopping, nobody waits for the scan.
            drop(tx.blocking_send(Inner::Scanned(catalog::scan(&config, &state_dir))));
        });
    }

    pub(super) fn start_job(&mut self, request: JobRequest, inner: &mpsc::Sender<Inner>) -> Event {
        let job = self.next_job;
        self.next_job += 1;
        let control = Arc::new(Control::new());
        self.jobs.insert(job, control.clone());
        let label = request.label();
        let request = Arc::new(request);
        let config = self.config.clone();
        let paths = self.paths.clone();
        let tx = inner.clone();
        let run = request.clone();
        tokio::task::spawn_blocking(move || {
            let result = jobs::run(&config, &paths, &run, &control);
            // A closed channel: the engine is stopping; the job was cancelled with it.
            drop(tx.blocking_send(Inner::JobDone(job, result)));
            if matches!(
                *run,
                JobRequest::RunFromCheckpoint { .. }
                    | JobRequest::KeepRun { .. }
                    | JobRequest::DiscardRun { .. }
            ) {
                // Done or failed, the runs may have changed; sent after the job's end.
                drop(tx.blocking_send(Inner::Emit(runs_served())));
            }
        });
        Event::JobStarted {
            job,
            label,
            request,
        }
    }
}

/// Watches the configuration file, the scheduler's status file and the mounts; the
/// watchers stop when the returned handles drop (the mount thread when `inner` closes).
pub(super) fn watch(
    paths: &Paths,
    inner: &mpsc::Sender<Inner>,
) -> Vec<Box<dyn std::any::Any + Send>> {
    let mut watchers: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let tx = inner.clone();
    if let Ok(w) = ConfigWatcher::start(&paths.config, move |r| {
        // Waits for room rather than lose an edit; a closed channel: the engine is stopping.
        drop(tx.blocking_send(Inner::Config(r)));
    }) {
        watchers.push(Box::new(w));
    }
    // The scheduler's status file (ours or the daemon's) and plugged-in drives.
    if let Some(dir) = paths.status.parent() {
        std::fs::create_dir_all(dir).or_warn(format_args!("create {}", dir.display()));
        let tx = inner.clone();
        let name = paths.status.file_name().map(std::ffi::OsStr::to_os_string);
        let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            // Only changes: reading the file (ours included) raises access events, and
            // answering those would read it again, for ever.
            if e.is_ok_and(|e| {
                !matches!(e.kind, notify::EventKind::Access(_))
                    && e.paths.iter().any(|p| p.file_name() == name.as_deref())
            }) {
                // A full channel already holds a wake-up; a closed one: the engine stops.
                drop(tx.try_send(Inner::Status));
            }
        });
        if let Ok(mut w) = watcher {
            use notify::Watcher as _;
            if w.watch(dir, notify::RecursiveMode::NonRecursive).is_ok() {
                watchers.push(Box::new(w));
            }
        }
    }
    let tx = inner.clone();
    // A full channel already holds a wake-up; a closed one means the engine is stopping.
    match crate::mounts::watch("rewind-engine-mounts", move || {
        drop(tx.try_send(Inner::Mounts));
    }) {
        Ok(w) => watchers.push(Box::new(w)),
        Err(e) => tracing::warn!("drives plugged in will be noticed only at the next look: {e}"),
    }
    watchers
}

impl Engine {
    /// Takes `config` as the configuration: the front ends hear of it, and the
    /// destinations are looked at again.
    pub(super) async fn adopt_config(
        &self,
        p: &mut Protection,
        config: Config,
        inner: &mpsc::Sender<Inner>,
    ) {
        p.config = config.clone();
        self.emit(Event::Config {
            config: Arc::new(config),
            error: None,
        })
        .await;
        p.scan(inner);
    }

    /// Loads the configuration, starts the watchers and the scheduler.
    pub(super) async fn start_protection(
        &self,
        options: &EngineOptions,
        inner: &mpsc::Sender<Inner>,
    ) -> Protection {
        let (config, error) = Config::load_or_last_good(&options.paths.config);
        self.emit(Event::Config {
            config: Arc::new(config.clone()),
            error: error.map(|e| e.to_string()),
        })
        .await;
        let watchers = watch(&options.paths, inner);
        let tx = inner.clone();
        tokio::task::spawn_blocking(move || {
            let enabled = crate::autostart::is_enabled();
            // A closed channel: the engine is stopping, nobody waits for the answer.
            drop(tx.blocking_send(Inner::Emit(Event::Autostart {
                enabled,
                changed: None,
            })));
        });
        let mut protection = Protection {
            paths: options.paths.clone(),
            config,
            scheduler: None,
            holder: None,
            jobs: HashMap::new(),
            next_job: 1,
            scanning: false,
            rescan: false,
            _watchers: watchers,
            files: None,
        };
        if let Some(program) = options.scheduler {
            let lock = crate::scheduler::instance::lock_path_in(&options.paths.state_dir());
            match crate::scheduler::instance::SchedulerLock::acquire_at(&lock, program) {
                Ok(lock) => {
                    let tx = inner.clone();
                    let sink: crate::scheduler::EventSink = Arc::new(move |ev| {
                        // Called inside the scheduler's runtime, so it must not block. A
                        // full channel loses this report (the history file keeps the job's
                        // record); a closed one: the engine is stopping.
                        if tx.try_send(Inner::Scheduled(ev)).is_err() {
                            tracing::debug!("a scheduler event was not passed to the window");
                        }
                    });
                    match crate::scheduler::start(
                        options.paths.clone(),
                        lock,
                        program,
                        sink,
                        crate::scheduler::Watch::Host,
                    ) {
                        Ok(handle) => protection.scheduler = Some(handle),
                        Err(e) => {
                            self.emit(Event::Failed {
                                error: JobError::new(
                                    ErrorKind::Failed,
                                    format!("the scheduler could not start: {e}"),
                                ),
                            })
                            .await;
                        }
                    }
                }
                Err(crate::scheduler::instance::InstanceError::AlreadyRunning { holder }) => {
                    protection.holder = Some(holder);
                }
                Err(e) => {
                    self.emit(Event::Failed {
                        error: JobError::new(ErrorKind::Failed, e.to_string()),
                    })
                    .await;
                }
            }
        }
        self.emit_scheduler(&protection).await;
        if let Some(identity) = crate::ssh_identity::in_use() {
            self.emit(Event::SshIdentity {
                public_key: identity.public_key.clone(),
            })
            .await;
        }
        self.emit(Event::History(Arc::new(crate::history::read(
            &protection.paths.history,
        ))))
        .await;
        protection.scan(inner);
        if protection.scheduler.is_some() {
            // One process serves runs: the one that holds the scheduler. Their list follows
            // the adoption.
            adopt_left_runs(&self.uri, &protection.config, inner);
        } else {
            self.emit(runs_served()).await;
        }
        protection
    }

    pub(super) async fn emit_scheduler(&self, p: &Protection) {
        let status = Status::read_live(&p.paths.status);
        let view = if p.scheduler.is_some() {
            SchedulerView::Here
        } else if let Some(s) = status {
            SchedulerView::Elsewhere {
                holder: p
                    .holder
                    .clone()
                    .unwrap_or_else(|| format!("process {} ({})", s.pid, s.program)),
                status: Some(Box::new(s)),
            }
        } else if let Some(holder) = &p.holder {
            SchedulerView::Elsewhere {
                holder: holder.clone(),
                status: None,
            }
        } else {
            SchedulerView::None
        };
        self.emit(Event::Scheduler(view)).await;
    }

    pub(super) async fn handle_inner(
        &self,
        p: &mut Protection,
        msg: Inner,
        inner: &mpsc::Sender<Inner>,
    ) {
        match msg {
            Inner::Start(request) => {
                let started = p.start_job(request, inner);
                self.emit(started).await;
            }
            Inner::Config(r) => {
                // The one watcher of the file: the hosted scheduler hears of it from here.
                if let Some(s) = &p.scheduler {
                    s.config_changed(r.clone());
                }
                match r {
                    Ok(config) => self.adopt_config(p, config, inner).await,
                    Err(e) => {
                        self.emit(Event::Config {
                            config: Arc::new(p.config.clone()),
                            error: Some(e.to_string()),
                        })
                        .await;
                    }
                }
            }
            Inner::Status => {
                if p.scheduler.is_some() {
                    if let Some(s) = Status::read_live(&p.paths.status) {
                        self.emit(Event::SchedulerStatus(Box::new(s))).await;
                    }
                } else {
                    self.emit_scheduler(p).await;
                }
            }
            Inner::Mounts => {
                if let Some(s) = &p.scheduler {
                    s.mounts_changed();
                }
                p.scan(inner);
            }
            Inner::Scheduled(ev) => {
                if let SchedEvent::DestinationFound { destination, .. } = &ev
                    && p.config
                        .destination(destination)
                        .is_some_and(|d| d.store_secret.is_none() && d.store_id.is_some())
                {
                    add_missing_proof(p.paths.config.clone(), destination.clone());
                }
                let finished = matches!(ev, SchedEvent::Finished(_));
                self.emit(Event::Scheduled(Arc::new(ev))).await;
                if finished {
                    self.emit(Event::History(Arc::new(crate::history::read(
                        &p.paths.history,
                    ))))
                    .await;
                    p.scan(inner);
                }
            }
            Inner::JobDone(job, result) => {
                p.jobs.remove(&job);
                if let Err(e) = &result {
                    tracing::warn!("job {job} failed: {}", e.message);
                }
                let took = matches!(result, Ok(JobOutput::Checkpoints(_)));
                let changed_nothing = matches!(result, Ok(JobOutput::Listed(_)));
                self.emit(Event::JobFinished { job, result }).await;
                if took {
                    // Its records went into the history, as a scheduled job's do.
                    self.emit(Event::History(Arc::new(crate::history::read(
                        &p.paths.history,
                    ))))
                    .await;
                }
                if !changed_nothing {
                    p.scan(inner);
                }
            }
            Inner::Emit(event) => self.emit(event).await,
            // The loop takes these itself; one that reaches here is simply shown.
            Inner::Listed(listed) => self.emit_listed(listed).await,
            Inner::Scanned(views) => {
                p.scanning = false;
                self.emit(Event::Destinations(Arc::new(views))).await;
                if std::mem::take(&mut p.rescan) {
                    p.scan(inner);
                }
            }
        }
    }
}

/// Gives destination `name`, added by an older Rewind, its proof now that its store is here
/// (off the loop), and saves the configuration: the engine's watcher then takes it in.
fn add_missing_proof(path: std::path::PathBuf, name: String) {
    tokio::task::spawn_blocking(move || {
        let mut config = match Config::load(&path) {
            Ok(config) => config,
            Err(e) => {
                tracing::warn!("destination {name:?} keeps no proof yet: {e}");
                return;
            }
        };
        match crate::destination::add_missing_proof(&mut config, &name) {
            Ok(true) => {
                if let Err(e) = config.save(&path) {
                    tracing::warn!("the proof of destination {name:?} is not kept: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("destination {name:?} keeps no proof yet: {e}"),
        }
    });
}

/// Serves again, off the loop, the runs from checkpoints that a stopped Rewind left
/// ([`crate::restore::run::adopt_left_runs`]); a keep that was under way is started again as
/// a job, and a run that cannot be served is reported.
fn adopt_left_runs(uri: &str, config: &Config, inner: &mpsc::Sender<Inner>) {
    let (uri, config, tx) = (uri.to_owned(), config.clone(), inner.clone());
    tokio::task::spawn_blocking(move || {
        let open = |destination: &str| {
            super::jobs::store_of(&config, destination)
                .map(Arc::new)
                .map_err(|e| e.message)
        };
        let (adopted, problems) = crate::restore::run::adopt_left_runs(&uri, &open);
        for run in adopted {
            tracing::info!(
                "VM {:?} runs from checkpoint {} again, served by this process",
                run.vm,
                run.checkpoint
            );
            if run.keep_asked {
                tracing::info!("its copy to its own disks starts again");
                drop(tx.blocking_send(Inner::Start(JobRequest::KeepRun {
                    vm_uuid: run.vm_uuid,
                })));
            }
        }
        for problem in problems {
            tracing::warn!("{problem}");
            drop(tx.blocking_send(Inner::Emit(Event::Failed {
                error: JobError::new(ErrorKind::Failed, problem),
            })));
        }
        drop(tx.blocking_send(Inner::Emit(runs_served())));
    });
}

/// [`Event::Runs`]: the runs from checkpoints that this process serves now.
fn runs_served() -> Event {
    Event::Runs(
        crate::restore::run::served()
            .into_iter()
            .map(|(vm_uuid, vm, checkpoint)| RunInfo {
                vm_uuid,
                vm,
                checkpoint,
            })
            .collect(),
    )
}
