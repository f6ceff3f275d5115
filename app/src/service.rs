//! `rewind service`: the protection service (`rewind_service`), run as root by the system
//! unit `packaging/systemd/rewind.service`. It logs to stderr and to the journal (else to
//! `/var/lib/rewind/rewind.log`). SIGTERM or Ctrl-C stops it cleanly: running jobs are
//! cancelled (they leave nothing behind) and waited for, and the socket is removed.

use anyhow::Context as _;
use rewind_core::scheduler::Paths;
use rewind_service::{ServiceOptions, socket_path};

/// `rewind service`.
pub fn run(uri: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!(
            "the protection service runs as root (it reads VM files only root may read): \
             start it with `systemctl start rewind`, or run `rewind service` as root"
        );
    }
    let log = crate::logging::init(true);
    let options = ServiceOptions {
        uri: uri.to_owned(),
        socket: socket_path(),
        paths: Paths::default(),
    };
    tracing::info!(
        "starting (process {}; configuration {}; log: {})",
        std::process::id(),
        options.paths.config.display(),
        log.destination
    );
    adopt_older_configuration(&options.paths);
    // What a restore or export killed with an earlier service left in a user's folder. On
    // a thread of its own: a folder on a network file system that is gone could hang.
    std::thread::Builder::new()
        .name("remove-left-staging".into())
        .spawn(|| {
            rewind_core::files::staging::remove_left(&rewind_core::paths::state_dir());
        })
        .ok();
    // Its own key for stores on other hosts, unless the environment names an ssh_config.
    if std::env::var_os(rewind_core::store::SSH_CONFIG_ENV).is_none() {
        let dir = rewind_core::paths::config_dir().join("ssh");
        match rewind_core::ssh_identity::ensure(&dir) {
            Ok(identity) => {
                tracing::info!("SSH key for stores on other hosts: {}", identity.public_key);
                rewind_core::ssh_identity::use_for_stores(identity);
            }
            Err(e) => tracing::error!(
                "no SSH key of its own ({e}): stores on other hosts cannot be reached"
            ),
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        // A second signal finds the receiver gone: the service is stopping already.
        tx.send(()).ok();
    })
    .context("could not install the signal handler")?;
    let running = rewind_service::start(options)?;
    // An error means the handler is gone, which is also a reason to stop.
    rx.recv().ok();
    tracing::info!("stopping: cancelling running jobs and waiting for them");
    running.stop();
    tracing::info!("stopped");
    Ok(())
}

/// On the first start: an older Rewind's configuration, keys and history move here
/// (`rewind_service::upgrade`). Only for the installed service's own folders, or where
/// `$REWIND_LEGACY_HOMES` names the homes: a service with a folder of its own for a test
/// must not take a configuration from this host's homes.
fn adopt_older_configuration(paths: &rewind_core::scheduler::Paths) {
    use rewind_service::upgrade;
    let own_folders = std::env::var_os(rewind_core::paths::CONFIG_DIR_ENV).is_none();
    if !own_folders && std::env::var_os(upgrade::LEGACY_HOMES_ENV).is_none() {
        return;
    }
    match upgrade::adopt_if_new(paths, &upgrade::places_on_this_host()) {
        Ok(Some(adopted)) => {
            tracing::info!(
                "moved the configuration of {} from {} ({} protected VMs, {} passphrase files into {}, {} history records); the old files are left as they were",
                adopted.from.owner,
                adopted.from.config_dir.display(),
                adopted.vms,
                adopted.keys,
                paths.config.display(),
                adopted.records
            );
            for note in adopted.notes {
                tracing::warn!("{note}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!("{}", crate::error_text::one_line(&anyhow::Error::new(e))),
    }
}
