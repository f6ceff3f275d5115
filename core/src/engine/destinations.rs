//! Adding and testing destinations: the slow parts run off the loop.

use super::{Engine, ErrorKind, Event, Inner, JobError, Protection, mpsc};

/// Where [`Command::AddFolderDestination`] and [`Command::AddRemoteDestination`] add.
pub(super) enum AddTarget {
    Folder {
        folder: std::path::PathBuf,
        vm_disks: Vec<std::path::PathBuf>,
    },
    Remote(String),
}

impl Engine {
    /// Answers [`Command::TestDestination`], and [`Command::TrustHostKey`] (`trust`: the
    /// confirmed key's line, pinned first), off the loop.
    pub(super) async fn test_destination(&self, location: String, trust: Option<String>) {
        let tested = location.clone();
        let (result, unknown) = tokio::task::spawn_blocking(move || {
            if let Some(line) = trust {
                let pinned = crate::ssh_identity::known_hosts_for_stores()
                    .ok_or_else(|| {
                        JobError::new(
                            ErrorKind::Invalid,
                            "cannot tell where known_hosts is: HOME is not set",
                        )
                    })
                    .and_then(|known| {
                        crate::ssh_identity::trust(&known, &line)
                            .map_err(|e| JobError::new(ErrorKind::Failed, e.to_string()))
                    });
                if let Err(e) = pinned {
                    return (Err(e), None);
                }
            }
            match probe_destination(&tested) {
                Ok(text) => (Ok(text), None),
                Err(failed) => {
                    let (e, unknown) = *failed;
                    (Err(e), unknown)
                }
            }
        })
        .await
        .unwrap_or_else(|join| (Err(JobError::internal(&join)), None));
        if let Some(event) = unknown {
            self.emit(event).await;
        }
        self.emit(Event::DestinationTested { location, result })
            .await;
    }

    /// Adds a folder destination to the configuration and saves it (off the loop: creating
    /// an encrypted store derives a key, which takes a moment).
    pub(super) async fn add_destination(
        &self,
        p: &mut Protection,
        target: AddTarget,
        passphrase: Option<zeroize::Zeroizing<String>>,
        inner: &mpsc::Sender<Inner>,
    ) {
        let mut config = p.config.clone();
        let path = p.paths.config.clone();
        let keys_dir = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("keys");
        let done = tokio::task::spawn_blocking(move || {
            let pass = match &passphrase {
                Some(text) => crate::destination::Passphrase::Typed {
                    passphrase: text.as_bytes(),
                    keys_dir: &keys_dir,
                },
                None => crate::destination::Passphrase::None,
            };
            let (added, warning) = match &target {
                AddTarget::Folder { folder, vm_disks } => {
                    let added = crate::destination::add_folder(&mut config, folder, pass)?;
                    let warning = vm_disks
                        .iter()
                        .any(|d| crate::destination::same_device(d, folder))
                        .then(|| {
                            format!(
                                "{} is on the same disk as virtual machine disks: if that disk fails, the checkpoints are lost with it. A removable drive or another host is safer.",
                                folder.display()
                            )
                        });
                    (added, warning)
                }
                AddTarget::Remote(url) => {
                    let location = crate::store::Location::parse(url)?;
                    if !location.is_remote() {
                        return Err(JobError::new(
                            ErrorKind::Invalid,
                            format!(
                                "{url} is not an ssh:// address; write ssh://[user@]host[:port]/folder"
                            ),
                        ));
                    }
                    let added = crate::destination::add_at(&mut config, &location, pass)?;
                    (added, None)
                }
            };
            config.save(&path)?;
            Ok::<_, JobError>((added, config, warning))
        })
        .await
        .unwrap_or_else(|join| Err(JobError::internal(&join)));
        match done {
            Ok((added, config, warning)) => {
                self.emit(Event::DestinationAdded {
                    result: Ok(added),
                    warning,
                })
                .await;
                self.adopt_config(p, config, inner).await;
            }
            Err(e) => {
                self.emit(Event::DestinationAdded {
                    result: Err(e),
                    warning: None,
                })
                .await;
            }
        }
    }
}

/// What is at `location` (for [`Command::TestDestination`]): a store (how many
/// checkpoints, encrypted or not), a place where one can be made, or why it cannot be
/// reached; with the keys of a host met for the first time (the user may trust one and
/// test again).
fn probe_destination(location: &str) -> Result<String, Box<(JobError, Option<Event>)>> {
    use crate::store::{Location, StoreError};
    let place = Location::parse(location.trim()).map_err(|e| Box::new((e.into(), None)))?;
    match probe(&place) {
        Ok(text) => Ok(text),
        Err(e @ StoreError::HostKey { changed: false, .. }) => {
            let Location::Ssh(ssh) = &place else {
                return Err(Box::new((e.into(), None)));
            };
            let host = match ssh.port {
                Some(port) => format!("{}:{port}", ssh.host),
                None => ssh.host.clone(),
            };
            let unknown = crate::ssh_identity::scan(&ssh.host, ssh.port)
                .inspect_err(|scan| tracing::warn!("could not read the keys of {host}: {scan}"))
                .ok()
                .map(|keys| Event::HostKeyUnknown {
                    location: location.to_owned(),
                    host,
                    keys,
                });
            Err(Box::new((e.into(), unknown)))
        }
        Err(e) => Err(Box::new((e.into(), None))),
    }
}

fn probe(place: &crate::store::Location) -> Result<String, crate::store::StoreError> {
    use crate::store::{Location, Store, StoreError};
    let host = match place {
        Location::Ssh(ssh) => format!("Reached {}. ", ssh.host),
        Location::Local(_) => String::new(),
    };
    match Store::probe_at(place) {
        Ok(c) if c.encryption.is_some() => Ok(format!(
            "{host}There is an encrypted Rewind store (ID {}): adding it needs its passphrase.",
            c.id
        )),
        Ok(c) => {
            let count = Store::open_at(place, None)
                .and_then(|s| s.catalog())
                .map(|cat| cat.checkpoints.len());
            Ok(match count {
                Ok(n) => format!(
                    "{host}There is a Rewind store (ID {}) with {n} checkpoint(s).",
                    c.id
                ),
                Err(e) => format!("{host}There is a Rewind store (ID {}), but: {e}", c.id),
            })
        }
        Err(StoreError::Missing { .. }) => Ok(format!(
            "{host}The folder does not exist yet: adding it creates a new store there."
        )),
        Err(StoreError::NotAStore { .. }) => Ok(format!(
            "{host}The folder holds no Rewind store: adding it creates one if the folder is empty."
        )),
        Err(e) => Err(e),
    }
}
