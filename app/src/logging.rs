//! Where Rewind's log goes: the core logs through `tracing`, and each front end installs
//! this subscriber once at start-up.
//!
//! - To the systemd journal where there is one (`journalctl --user -t rewind`, or
//!   `journalctl -t rewind` for the service);
//! - else to `rewind.log` in the state folder, rotated by size: past 2 MiB it becomes
//!   `rewind.log.1` (the older ones move up to `.3`, the oldest is dropped);
//! - the daemon also writes each line to its standard error.
//!
//! `REWIND_LOG` filters what is written, in `tracing`'s target syntax (`debug`,
//! `rewind_core::restore=debug,info`); the default is `info`.

use std::sync::Mutex;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The log file rotates past this size.
pub const ROTATE_BYTES: usize = 2 << 20;
/// Rotated files kept.
pub const KEEP_FILES: usize = 3;

/// The log file in the state folder (when there is no journal).
#[must_use]
pub fn log_file() -> std::path::PathBuf {
    rewind_core::paths::state_dir().join("rewind.log")
}

/// Where the log went, in words for the user (`the journal`, or the file's path).
pub struct Installed {
    /// Where the lines go.
    pub destination: String,
}

/// Installs the subscriber (once; later calls do nothing and say so). `also_stderr`: copy
/// every line to standard error too (the daemon's own output).
pub fn init(also_stderr: bool) -> Installed {
    let filter: Targets = std::env::var("REWIND_LOG")
        .ok()
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let stderr = also_stderr.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .without_time()
    });
    let journal = tracing_journald::layer()
        .ok()
        .map(|l| l.with_syslog_identifier("rewind".into()));
    let (file, destination) = if journal.is_some() {
        (None, "the journal".to_owned())
    } else {
        let path = log_file();
        let made = path.parent().map_or(Ok(()), std::fs::create_dir_all);
        match made {
            Ok(()) => {
                let rotating = FileRotate::new(
                    &path,
                    AppendCount::new(KEEP_FILES),
                    ContentLimit::BytesSurpassed(ROTATE_BYTES),
                    Compression::None,
                    None,
                );
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(Mutex::new(rotating))
                    .with_ansi(false);
                (Some(layer), path.display().to_string())
            }
            Err(e) => (None, format!("nowhere ({}: {e})", path.display())),
        }
    };
    let installed = tracing_subscriber::registry()
        .with(journal.with_filter(filter.clone()))
        .with(file.with_filter(filter.clone()))
        .with(stderr.with_filter(filter))
        .try_init();
    Installed {
        destination: match installed {
            Ok(()) => destination,
            Err(_) => "where it was set up before".to_owned(),
        },
    }
}
