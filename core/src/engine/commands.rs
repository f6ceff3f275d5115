//! The engine's answers to the front end's commands; those that touch files are answered
//! off the loop ([`answer_off_the_loop`]).

use super::{
    AddTarget, Arc, Command, Config, Engine, ErrorKind, Event, Inner, JobError, JobRequest,
    Protection, jobs, mpsc,
};

impl Engine {
    pub(super) async fn handle_command(
        &self,
        p: &mut Protection,
        command: Command,
        inner: &mpsc::Sender<Inner>,
    ) {
        match command {
            Command::RefreshCheckpoints => p.scan(inner),
            Command::Start(request) => {
                let started = p.start_job(request, inner);
                self.emit(started).await;
            }
            Command::AddFolderDestination {
                folder,
                passphrase,
                vm_disks,
            } => {
                self.add_destination(p, AddTarget::Folder { folder, vm_disks }, passphrase, inner)
                    .await;
            }
            Command::AddRemoteDestination { url, passphrase } => {
                self.add_destination(p, AddTarget::Remote(url), passphrase, inner)
                    .await;
            }
            Command::TestDestination { location } => self.test_destination(location, None).await,
            Command::TrustHostKey { location, line } => {
                self.test_destination(location, Some(line)).await;
            }
            Command::Cancel(job) => {
                if let Some(c) = p.jobs.get(&job) {
                    c.cancel();
                }
            }
            Command::ForceOff(job) => {
                if let Some(c) = p.jobs.get(&job) {
                    c.force_off_now();
                }
            }
            Command::ScanDrives | Command::SetAutostart(_) | Command::CheckResume(_) => {
                answer_off_the_loop(command, p.config.clone(), inner.clone());
            }
            Command::SaveConfig(config) => {
                let path = p.paths.config.clone();
                let saved =
                    tokio::task::spawn_blocking(move || config.save(&path).map(|()| config))
                        .await
                        .unwrap_or_else(|join| {
                            Err(crate::config::ConfigError::Io {
                                action: "write",
                                path: p.paths.config.clone(),
                                detail: join.to_string(),
                            })
                        });
                match saved {
                    Ok(config) => {
                        p.config = (*config).clone();
                        self.emit(Event::Config {
                            config: Arc::new(*config),
                            error: None,
                        })
                        .await;
                        p.scan(inner);
                    }
                    Err(e) => {
                        self.emit(Event::Failed {
                            error: JobError::new(ErrorKind::Invalid, e.to_string()),
                        })
                        .await;
                    }
                }
            }
            Command::CheckpointNow { vm } => {
                if let Some(s) = &p.scheduler {
                    if !s.send(crate::scheduler::Command::RunNow { vm }) {
                        tracing::warn!(
                            "the scheduler did not take \"checkpoint now\": it is stopping or busy"
                        );
                    }
                } else {
                    let vms: Vec<String> = match vm {
                        Some(vm) => vec![vm],
                        None => p.config.vms.iter().map(|v| v.vm.clone()).collect(),
                    };
                    for vm in vms {
                        let request = JobRequest::Checkpoint {
                            vm,
                            destination: None,
                            full_state: false,
                        };
                        let started = p.start_job(request, inner);
                        self.emit(started).await;
                    }
                }
            }
            Command::Browse { key, ask } => self.browse(p, key, ask, inner).await,
            Command::RefreshVms | Command::Shutdown => {}
        }
    }
}

impl Engine {
    /// Passes a question about a checkpoint's files to the files thread (started the first
    /// time).
    async fn browse(
        &self,
        p: &mut Protection,
        key: super::ResumeKey,
        ask: super::files::BrowseAsk,
        inner: &mpsc::Sender<Inner>,
    ) {
        if p.files.is_none() {
            match super::files::FilesWorker::start(inner.clone()) {
                Ok(worker) => p.files = Some(worker),
                Err(e) => {
                    self.emit(Event::Browsed {
                        key,
                        ask,
                        result: Err(JobError::new(
                            ErrorKind::Failed,
                            format!("could not start reading files: {e}"),
                        )),
                    })
                    .await;
                    return;
                }
            }
        }
        if let Some(worker) = &p.files {
            worker.ask(key, ask, p.config.clone());
        }
    }
}

/// Answers a command that reads or writes files on a blocking thread, so the loop goes on
/// meanwhile: the answer comes back as an event.
pub(super) fn answer_off_the_loop(command: Command, config: Config, tx: mpsc::Sender<Inner>) {
    tokio::task::spawn_blocking(move || {
        let event = match command {
            Command::CheckResume(key) => {
                let result =
                    jobs::check_resume(&config, &key.destination, &key.vm_uuid, &key.checkpoint);
                Event::ResumeChecked { key, result }
            }
            other => match answer_for_this_user(&other, &config) {
                Some(event) => event,
                None => return,
            },
        };
        // A closed channel: the engine is stopping, nobody waits for the answer.
        drop(tx.blocking_send(Inner::Emit(event)));
    });
}

/// Answers the commands that are the user's own matter, not the engine's: the removable
/// drives this user has mounted ([`Command::ScanDrives`]) and starting Rewind at this
/// user's login ([`Command::SetAutostart`]). A window whose engine runs in the protection
/// service answers these itself, as its user. Reads and writes files: call it off the UI
/// thread. `None` for every other command.
#[must_use]
pub fn answer_for_this_user(command: &Command, config: &Config) -> Option<Event> {
    Some(match command {
        Command::ScanDrives => Event::DrivesFound(crate::destination::removable_drives(config)),
        Command::SetAutostart(enabled) => {
            let changed = std::env::current_exe()
                .map_err(|e| {
                    JobError::new(
                        ErrorKind::Failed,
                        format!("could not find Rewind's own program: {e}"),
                    )
                })
                .and_then(|exe| Ok(crate::autostart::set_enabled(*enabled, &exe)?));
            Event::Autostart {
                enabled: crate::autostart::is_enabled(),
                changed: Some(changed),
            }
        }
        _ => return None,
    })
}
