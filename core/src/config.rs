//! Rewind's configuration: which VMs are protected, how often, where their checkpoints go
//! and how long they are kept. One RON file, `config.ron` in the XDG config folder
//! (`~/.config/rewind/`, or `$REWIND_CONFIG_DIR`), written by `rewind protect` and the
//! window and editable by hand:
//!
//! ```ron
//! (
//!     uri: "qemu:///system",
//!     destinations: [
//!         (name: "usb", location: "/media/me/backup/rewind", store_id: Some("6a1f…")),
//!     ],
//!     vms: [
//!         (vm: "win11", destinations: ["usb"], interval_secs: 900,
//!          keep: (last: 4, hourly: 24, daily: 7, weekly: 4, monthly: 6, yearly: 0),
//!          boot_check: true),
//!     ],
//!     boot_checks: (enabled: true, interval_secs: 86400, max_load_percent: 50, quiet_secs: 900),
//! )
//! ```
//!
//! `boot_checks` (added with issue 23; a file without it gets these defaults): once per
//! `interval_secs`, when the scheduler has run no other job for `quiet_secs` (and has run
//! that long) and the one-minute load average is below `max_load_percent` of the CPUs,
//! the newest checkpoint of one protected VM is
//! started in a throwaway clone to prove that it boots ([`crate::bootcheck`],
//! [`crate::policy::next_boot_check`]). `enabled: false` turns them off for every VM, a
//! VM's `boot_check: false` for that VM; `timeout_secs` bounds the wait for a boot signal
//! (10 minutes when absent).
//!
//! Every field has a default, so a short file is a valid one. Loading reports the file,
//! line and column of a syntax error and what was expected; a file that does not load
//! never replaces the configuration in use ([`ConfigWatcher`] keeps the last good one), and
//! saving is atomic (a temporary file renamed over the old one). Each configuration that
//! loads is also copied to `config.last-good.ron`, which is used when `config.ron` is
//! broken at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cleanup::OrWarn as _;
use uuid::Uuid;

use crate::store::retention::KeepRules;

/// The shortest interval between scheduled checkpoints.
pub const MIN_INTERVAL_SECS: u64 = 5 * 60;
/// The longest.
pub const MAX_INTERVAL_SECS: u64 = 7 * 24 * 3600;
/// The default: every 15 minutes.
pub const DEFAULT_INTERVAL_SECS: u64 = 15 * 60;
/// Set to `1` to allow intervals below [`MIN_INTERVAL_SECS`] (for tests only).
pub const SHORT_INTERVALS_ENV: &str = "REWIND_ALLOW_SHORT_INTERVALS";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The libvirt connection.
    pub uri: String,
    /// Where checkpoints go.
    pub destinations: Vec<Destination>,
    /// The protected VMs.
    pub vms: Vec<Protection>,
    /// All protection paused until resumed.
    pub paused: bool,
    /// All protection paused until then (a pause "for 1 hour" or "until tomorrow": it ends
    /// by itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<chrono::DateTime<chrono::Utc>>,
    /// How many checkpoints may run at once (across VMs; one per VM always).
    pub max_concurrent_jobs: u32,
    /// More folders where removable drives appear (besides `/media/$USER`,
    /// `/run/media/$USER` and `/mnt`).
    pub watch_paths: Vec<PathBuf>,
    /// Desktop notifications.
    pub notifications: Notifications,
    /// Before a restore, how long a running VM gets to shut down when asked before it is
    /// turned off.
    pub shutdown_timeout_secs: u64,
    /// The scheduled boot-checks (added with issue 23: older files get the defaults, on and
    /// daily).
    pub boot_checks: BootChecks,
}

/// The scheduled boot-checks of the protected VMs' newest checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootChecks {
    /// Whether the scheduler boot-checks at all (each VM's `boot_check` may turn its own
    /// off).
    pub enabled: bool,
    /// How often each VM's newest checkpoint is boot-checked (and a failed or impossible
    /// check tried again), in seconds.
    pub interval_secs: u64,
    /// The machine counts as idle while its one-minute load average is below this share of
    /// its CPUs, in percent.
    pub max_load_percent: u32,
    /// The longest wait for a boot signal, in seconds (10 minutes when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// The scheduler must have run nothing (and have been running) for this long, in
    /// seconds, before a boot-check starts: not right after a checkpoint or a login.
    pub quiet_secs: u64,
}

/// The default of [`BootChecks::quiet_secs`]: 15 minutes.
pub const DEFAULT_BOOT_CHECK_QUIET_SECS: u64 = 15 * 60;

/// The default of [`BootChecks::interval_secs`]: a day.
pub const DEFAULT_BOOT_CHECK_INTERVAL_SECS: u64 = 24 * 3600;

impl Default for BootChecks {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: DEFAULT_BOOT_CHECK_INTERVAL_SECS,
            max_load_percent: 50,
            timeout_secs: None,
            quiet_secs: DEFAULT_BOOT_CHECK_QUIET_SECS,
        }
    }
}

/// The default of [`Config::shutdown_timeout_secs`].
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 120;

impl Config {
    /// Whether all protection is paused at `now` (until resumed, or until a time to come).
    #[must_use]
    pub fn paused_at(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.paused || self.paused_until.is_some_and(|t| now < t)
    }

    /// Whether `protection`'s scheduled checkpoints are paused at `now` (all protection, or
    /// this VM's).
    #[must_use]
    pub fn vm_paused_at(
        &self,
        protection: &Protection,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        protection.paused || self.paused_at(now)
    }

    /// Pauses all protection as chosen at `now`.
    pub fn pause<Tz: chrono::TimeZone>(
        &mut self,
        pause: crate::pause::Pause,
        now: &chrono::DateTime<Tz>,
    ) {
        self.paused_until = pause.ends(now);
        self.paused = self.paused_until.is_none();
    }

    /// Resumes all protection (a timed pause too).
    pub fn resume(&mut self) {
        self.paused = false;
        self.paused_until = None;
    }

    /// How the global pause reads now ("paused until 15:40"), if protection is paused.
    #[must_use]
    pub fn pause_text(&self) -> Option<String> {
        crate::pause::describe(self.paused, self.paused_until, &chrono::Local::now())
    }

    /// How the window's restores stop a running VM.
    #[must_use]
    pub fn stop_mode(&self) -> crate::libvirt::lifecycle::StopMode {
        crate::libvirt::lifecycle::StopMode::Graceful {
            timeout_secs: self.shutdown_timeout_secs,
            force_after: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            uri: crate::libvirt::DEFAULT_URI.to_owned(),
            destinations: Vec::new(),
            vms: Vec::new(),
            paused: false,
            paused_until: None,
            max_concurrent_jobs: 1,
            watch_paths: Vec::new(),
            notifications: Notifications::default(),
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            boot_checks: BootChecks::default(),
        }
    }
}

/// A place checkpoints go: a store in a folder (typically on a removable drive) or on
/// another host over SSH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// A short name the VMs' policies refer to.
    pub name: String,
    /// A folder, or `ssh://[user@]host[:port]/path`.
    pub location: String,
    /// The store's identity: a drive is recognised by it wherever it is mounted, and a
    /// folder holding another store (or none: an empty mount point) is never written to.
    #[serde(default)]
    pub store_id: Option<Uuid>,
    /// A file holding the passphrase of an encrypted store (readable only by you).
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// A secret of this destination (64 hexadecimal digits), whose proof it wrote into its
    /// store when it was added: a store that only copies the ID lacks the proof and is
    /// refused. Absent for destinations added by an older Rewind (found by ID alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_secret: Option<String>,
}

impl Destination {
    /// The secret's bytes, if it has a well-formed one.
    #[must_use]
    pub fn secret_bytes(&self) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        let bytes = hex::decode(self.store_secret.as_deref()?).ok()?;
        (bytes.len() == 32).then(|| zeroize::Zeroizing::new(bytes))
    }
}

/// Disk-only or full-state checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Disks, UEFI variables, TPM state.
    #[default]
    Disk,
    /// Also memory and device state: restoring resumes the VM where it was.
    Full,
}

/// How one VM is protected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Protection {
    /// The VM's name.
    pub vm: String,
    /// Its UUID, when known (found by it if renamed).
    pub uuid: Option<String>,
    /// Names of its destinations.
    pub destinations: Vec<String>,
    /// Seconds between checkpoints.
    pub interval_secs: u64,
    /// Take one early once the VM has written this many bytes since the last one.
    pub activity_bytes: Option<u64>,
    /// What to keep in each destination.
    pub keep: KeepRules,
    /// Disk-only or full-state.
    pub kind: Kind,
    /// With `kind: disk`: make a checkpoint full-state whenever the VM's newest full-state
    /// one in that destination is older than this ("full state every hour, disk-only every
    /// 10 minutes").
    pub full_state_every_secs: Option<u64>,
    /// Freeze the guest's file systems through its agent (application consistency).
    pub quiesce: bool,
    /// Warn once the newest checkpoint in a destination is older than this.
    pub stale_after_secs: Option<u64>,
    /// This VM's protection paused.
    pub paused: bool,
    /// Whether the scheduler boot-checks this VM's newest checkpoint (see
    /// [`Config::boot_checks`]; added with issue 23, on when absent).
    pub boot_check: bool,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            vm: String::new(),
            uuid: None,
            destinations: Vec::new(),
            interval_secs: DEFAULT_INTERVAL_SECS,
            activity_bytes: None,
            keep: default_keep(),
            kind: Kind::Disk,
            full_state_every_secs: None,
            quiesce: true,
            stale_after_secs: None,
            paused: false,
            boot_check: true,
        }
    }
}

impl Protection {
    /// How old the newest checkpoint may get before the user is told: the policy's own, or
    /// a day, or three intervals if that is longer.
    #[must_use]
    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(
            self.stale_after_secs
                .unwrap_or_else(|| (3 * self.interval_secs).max(24 * 3600)),
        )
    }
}

/// The retention of a newly protected VM: the last 4, 24 hourly, 7 daily, 4 weekly,
/// 6 monthly.
#[must_use]
pub fn default_keep() -> KeepRules {
    KeepRules {
        last: 4,
        hourly: 24,
        daily: 7,
        weekly: 4,
        monthly: 6,
        yearly: 0,
    }
}

/// When the user hears from Rewind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Notifications {
    /// A checkpoint failed.
    pub on_failure: bool,
    /// A destination's newest checkpoint is older than its VM's policy allows.
    pub on_stale: bool,
    /// A checkpoint succeeded.
    pub on_success: bool,
}

impl Default for Notifications {
    fn default() -> Self {
        Self {
            on_failure: true,
            on_stale: true,
            on_success: false,
        }
    }
}

/// What is wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not valid RON, or not what Rewind expects where it is.
    #[error(
        "the configuration file has an error at line {line}, column {column}: {message}. Fix it there; until then the last good configuration is used ({})",
        path.display()
    )]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser expected or found.
        message: String,
    },
    /// Well-formed but not sensible.
    #[error("the configuration file is not usable: {what}. Fix it; until then the last good configuration is used ({})", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: ConfigProblem,
    },
    /// Could not be read or written.
    #[error("could not {action} the configuration file: {detail} ({})", path.display())]
    Io {
        /// What Rewind was doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS's words.
        detail: String,
    },
}

/// The configuration file.
#[must_use]
pub fn config_path() -> PathBuf {
    crate::paths::config_dir().join("config.ron")
}

fn last_good_path(path: &Path) -> PathBuf {
    path.with_extension("last-good.ron")
}

/// What is wrong with an interval.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntervalError {
    /// Not a number with a unit.
    #[error("{0:?} is not an interval; write it like 15m, 2h, 1d or 1w")]
    NotAnInterval(String),
    /// An unknown unit.
    #[error("{0:?} is not a unit of time; use s, m, h, d or w (as in 15m)")]
    Unit(String),
    /// More seconds than fit.
    #[error("{0:?} is too long an interval")]
    TooLong(String),
    /// Outside what Rewind allows.
    #[error(
        "an interval of {0} s is outside 5 minutes to 1 week ({MIN_INTERVAL_SECS} to {MAX_INTERVAL_SECS} s)"
    )]
    OutOfRange(u64),
}

/// Parses an interval such as `90s`, `15m`, `2h`, `1d`, `1w` (a bare number is seconds).
pub fn parse_interval(text: &str) -> Result<u64, IntervalError> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| IntervalError::NotAnInterval(text.to_owned()))?;
    let factor = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(IntervalError::Unit(other.to_owned())),
    };
    n.checked_mul(factor)
        .ok_or_else(|| IntervalError::TooLong(text.to_owned()))
}

/// Whether intervals below the minimum are allowed (tests).
fn short_intervals_allowed() -> bool {
    std::env::var_os(SHORT_INTERVALS_ENV).is_some_and(|v| v == "1")
}

/// Checks an interval against the allowed range.
pub fn check_interval(secs: u64) -> Result<(), IntervalError> {
    let min = if short_intervals_allowed() {
        1
    } else {
        MIN_INTERVAL_SECS
    };
    if (min..=MAX_INTERVAL_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(IntervalError::OutOfRange(secs))
    }
}

/// What a configuration gets wrong that its syntax cannot say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// `max_concurrent_jobs: 0`.
    #[error("max_concurrent_jobs must be at least 1")]
    NoJobs,
    /// A destination without a name.
    #[error("a destination has an empty name")]
    UnnamedDestination,
    /// Two destinations with one name.
    #[error("two destinations are called {0:?}")]
    DestinationTwice(String),
    /// A destination without a location.
    #[error("destination {0:?} has no location")]
    NoLocation(String),
    /// A protected VM without a name.
    #[error("a protected VM has no name (field vm)")]
    UnnamedVm,
    /// A VM protected twice.
    #[error("VM {0:?} is protected twice")]
    VmTwice(String),
    /// A VM's interval.
    #[error("VM {vm:?}: {field}{source}")]
    Interval {
        /// The VM.
        vm: String,
        /// `""` or `"full_state_every_secs: "`.
        field: &'static str,
        /// What is wrong with it.
        source: IntervalError,
    },
    /// Both every checkpoint full-state and a full-state interval.
    #[error(
        "VM {0:?} has kind: full (every checkpoint full-state) and full_state_every_secs; keep one: kind: disk with full_state_every_secs mixes the two"
    )]
    FullTwice(String),
    /// A VM without a destination.
    #[error("VM {0:?} has no destination")]
    NoDestination(String),
    /// A VM naming a destination that is not there.
    #[error("VM {vm:?} names destination {missing:?}, which is not in destinations")]
    UnknownDestination {
        /// The VM.
        vm: String,
        /// The name.
        missing: String,
    },
    /// A VM that keeps nothing.
    #[error("VM {0:?} keeps nothing (every keep rule is 0); keep at least the last one")]
    KeepsNothing(String),
    /// `boot_checks.interval_secs`.
    #[error("boot_checks: interval_secs: {0}")]
    BootCheckInterval(IntervalError),
}

impl Config {
    /// Parses `text` (the content of `path`, for messages) and checks it.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = ron::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span.start.line,
            column: e.span.start.col,
            message: e.code.to_string(),
        })?;
        config.validate().map_err(|what| ConfigError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
        Ok(config)
    }

    /// Checks what RON cannot: ranges, names referred to, duplicates.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        use ConfigProblem as P;
        if self.max_concurrent_jobs == 0 {
            return Err(P::NoJobs);
        }
        check_interval(self.boot_checks.interval_secs).map_err(P::BootCheckInterval)?;
        let mut names = Vec::new();
        for d in &self.destinations {
            if d.name.trim().is_empty() {
                return Err(P::UnnamedDestination);
            }
            if names.contains(&&d.name) {
                return Err(P::DestinationTwice(d.name.clone()));
            }
            if d.location.trim().is_empty() {
                return Err(P::NoLocation(d.name.clone()));
            }
            names.push(&d.name);
        }
        let mut vms = Vec::new();
        for p in &self.vms {
            if p.vm.trim().is_empty() {
                return Err(P::UnnamedVm);
            }
            if vms.contains(&&p.vm) {
                return Err(P::VmTwice(p.vm.clone()));
            }
            vms.push(&p.vm);
            let interval = |field, secs| {
                check_interval(secs).map_err(|source| P::Interval {
                    vm: p.vm.clone(),
                    field,
                    source,
                })
            };
            interval("", p.interval_secs)?;
            if let Some(every) = p.full_state_every_secs {
                interval("full_state_every_secs: ", every)?;
                if p.kind == Kind::Full {
                    return Err(P::FullTwice(p.vm.clone()));
                }
            }
            if p.destinations.is_empty() {
                return Err(P::NoDestination(p.vm.clone()));
            }
            if let Some(missing) = p.destinations.iter().find(|d| !names.contains(d)) {
                return Err(P::UnknownDestination {
                    vm: p.vm.clone(),
                    missing: missing.clone(),
                });
            }
            if p.keep.is_empty() {
                return Err(P::KeepsNothing(p.vm.clone()));
            }
        }
        Ok(())
    }

    /// Loads `path`: a missing file is the empty default configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let config = Self::parse(&text, path)?;
                // The last good one, for a start with a broken file.
                write_atomic(&last_good_path(path), text.as_bytes())
                    .or_warn("keep the last good configuration");
                Ok(config)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::Io {
                action: "read",
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        }
    }

    /// Loads `path`, or when it is broken the last good copy of it: the configuration and
    /// the error that made Rewind fall back, if any.
    #[must_use]
    pub fn load_or_last_good(path: &Path) -> (Self, Option<ConfigError>) {
        match Self::load(path) {
            Ok(config) => (config, None),
            Err(e) => {
                let last = std::fs::read_to_string(last_good_path(path))
                    .ok()
                    .and_then(|text| Self::parse(&text, path).ok())
                    .unwrap_or_default();
                (last, Some(e))
            }
        }
    }

    /// Writes the configuration to `path` atomically (and as the last good one).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate().map_err(|what| ConfigError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
        let pretty = ron::ser::PrettyConfig::new()
            .depth_limit(4)
            .struct_names(false);
        let mut text = ron::ser::to_string_pretty(self, pretty).map_err(|e| ConfigError::Io {
            action: "write",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        text.insert_str(
            0,
            "// Rewind's configuration (documented in Rewind's app/CLI.md, `rewind protect`).\n",
        );
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        write_atomic(&last_good_path(path), text.as_bytes())
            .or_warn("keep the last good configuration");
        Ok(())
    }

    /// The destination called `name`.
    #[must_use]
    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name == name)
    }

    /// The protection of VM `name_or_uuid`.
    #[must_use]
    pub fn protection(&self, name_or_uuid: &str) -> Option<&Protection> {
        self.vms.iter().find(|p| {
            p.vm == name_or_uuid
                || p.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(name_or_uuid))
        })
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConfigError> {
    crate::atomic_file::write(path, bytes, 0o644).map_err(|e| ConfigError::Io {
        action: "write",
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Watches the configuration file and hands every version that loads to `on_change`, and
/// every error (with line and column) to `on_error`; the configuration in use stays the
/// last good one. Dropping it stops watching.
pub struct ConfigWatcher {
    _watcher: notify::RecommendedWatcher,
    /// How often the file was read after an event (for tests: an unchanged file is not
    /// read over and over).
    reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field(
                "reads",
                &self.reads.load(std::sync::atomic::Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl ConfigWatcher {
    /// Starts watching `path` (its folder is created if missing: notify cannot watch
    /// what does not exist).
    pub fn start(
        path: &Path,
        on_change: impl Fn(Result<Config, ConfigError>) + Send + 'static,
    ) -> Result<Self, ConfigError> {
        use notify::Watcher as _;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| ConfigError::Io {
            action: "create the folder of",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let file = path.to_path_buf();
        let name = file.file_name().map(std::ffi::OsStr::to_os_string);
        let mut last: Option<String> = std::fs::read_to_string(&file).ok();
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = reads.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Reads raise access events too, this watcher's own read below included:
                // answering those would read the file again and again, for ever.
                if matches!(event.kind, notify::EventKind::Access(_))
                    || !event.paths.iter().any(|p| p.file_name() == name.as_deref())
                {
                    return;
                }
                // Editors write in several steps; react to the content, once per change.
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let now = std::fs::read_to_string(&file).ok();
                if now == last || now.is_none() {
                    return;
                }
                last.clone_from(&now);
                on_change(Config::load(&file));
            })
            .map_err(|e| ConfigError::Io {
                action: "watch",
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| ConfigError::Io {
                action: "watch",
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            _watcher: watcher,
            reads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Config {
        Config {
            destinations: vec![Destination {
                name: "usb".into(),
                location: "/media/me/backup/rewind".into(),
                store_id: Some(Uuid::from_bytes([7; 16])),
                passphrase_file: None,
                store_secret: None,
            }],
            vms: vec![Protection {
                vm: "Büro \"Win 11\"".into(),
                destinations: vec!["usb".into()],
                ..Protection::default()
            }],
            ..Config::default()
        }
    }

    #[test]
    fn a_timed_pause_is_saved_and_ends_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        let now = chrono::Utc::now();
        let mut config = sample();
        config.pause(crate::pause::Pause::ForAnHour, &now);
        assert!(!config.paused);
        config.save(&path).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded, config);
        assert!(loaded.paused_at(now));
        assert!(loaded.vm_paused_at(&loaded.vms[0], now + chrono::Duration::minutes(59)));
        assert!(!loaded.paused_at(now + chrono::Duration::minutes(61)));
        config.pause(crate::pause::Pause::UntilResumed, &now);
        assert!(config.paused && config.paused_until.is_none());
        assert!(config.paused_at(now + chrono::Duration::days(400)));
        config.resume();
        assert!(!config.paused_at(now));
        // A file without the field (an older Rewind's) is not paused.
        assert_eq!(
            Config::parse("(paused: false)", &path)
                .unwrap()
                .paused_until,
            None
        );
    }

    #[test]
    fn saved_configuration_loads_back_and_a_short_file_gets_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        sample().save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), sample());
        let short = r#"(vms: [(vm: "a", destinations: ["d"])], destinations: [(name: "d", location: "/x")])"#;
        let config = Config::parse(short, &path).unwrap();
        assert_eq!(config.vms[0].interval_secs, DEFAULT_INTERVAL_SECS);
        assert_eq!(config.vms[0].keep, default_keep());
        assert!(config.vms[0].quiesce);
        assert_eq!(config.uri, "qemu:///system");
        assert_eq!(
            Config::load(&dir.path().join("none.ron")).unwrap(),
            Config::default()
        );
    }

    /// A file written before boot-checks (issue 23) loads with them on and daily; turned
    /// off, for all or one VM, they stay off through a save; a nonsense interval is refused.
    #[test]
    fn boot_checks_are_on_and_daily_unless_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        let old = r#"(vms: [(vm: "a", destinations: ["d"], paused: false)], destinations: [(name: "d", location: "/x")], shutdown_timeout_secs: 60)"#;
        let config = Config::parse(old, &path).unwrap();
        assert_eq!(config.boot_checks, BootChecks::default());
        assert!(config.boot_checks.enabled);
        assert_eq!(config.boot_checks.interval_secs, 86_400);
        assert!(config.vms[0].boot_check);

        let mut off = sample();
        off.boot_checks.enabled = false;
        off.boot_checks.timeout_secs = Some(120);
        off.vms[0].boot_check = false;
        off.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("boot_check: false"), "{text}");
        assert_eq!(Config::load(&path).unwrap(), off);

        let bad = "(boot_checks: (interval_secs: 3))";
        let err = Config::parse(bad, &path).unwrap_err().to_string();
        assert!(err.contains("boot_checks: interval_secs"), "{err}");
    }

    #[test]
    fn a_syntax_error_names_line_and_column_and_the_last_good_one_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        sample().save(&path).unwrap();
        std::fs::write(
            &path,
            "(\n  uri: \"qemu:///system\",\n  vms: [ (vm: 3) ],\n)",
        )
        .unwrap();
        let e = Config::load(&path).unwrap_err();
        let ConfigError::Syntax { line, column, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*line, *column), (3, 14), "{e}");
        assert!(e.to_string().contains("line 3, column 14"), "{e}");
        let (config, error) = Config::load_or_last_good(&path);
        assert_eq!(config, sample());
        assert!(error.is_some());
        let unknown = "(vms: [], colour: 3)";
        let e = Config::parse(unknown, &path).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn nonsense_is_refused_with_what_is_wrong() {
        let path = Path::new("c.ron");
        let mut c = sample();
        c.vms[0].destinations = vec!["nas".into()];
        assert!(
            Config::parse(&ron::to_string(&c).unwrap(), path)
                .unwrap_err()
                .to_string()
                .contains("names destination \"nas\"")
        );
        let mut c = sample();
        c.vms[0].interval_secs = 60;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("5 minutes to 1 week")
        );
        let mut c = sample();
        c.vms[0].keep = KeepRules::default();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("keeps nothing")
        );
        let mut c = sample();
        c.vms.push(c.vms[0].clone());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("protected twice")
        );
    }

    #[test]
    fn intervals_read_like_people_write_them() {
        assert_eq!(parse_interval("15m"), Ok(900));
        assert_eq!(parse_interval("2h"), Ok(7200));
        assert_eq!(parse_interval("1w"), Ok(604_800));
        assert_eq!(parse_interval("90"), Ok(90));
        assert!(
            parse_interval("15 parsecs")
                .unwrap_err()
                .to_string()
                .contains("unit of time")
        );
        assert!(
            parse_interval("soon")
                .unwrap_err()
                .to_string()
                .contains("like 15m")
        );
        assert!(check_interval(300).is_ok() && check_interval(604_800).is_ok());
        assert!(check_interval(604_801).is_err());
    }

    /// Reading the file raises inotify access events; the watcher must not take its own
    /// read for a change (it did, and spun a core each for the window's two watchers).
    #[test]
    fn the_watcher_leaves_an_unchanged_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        sample().save(&path).unwrap();
        let watcher = ConfigWatcher::start(&path, |_| {}).unwrap();
        // Someone else reads it (as the scheduler and the window do).
        let _ = std::fs::read_to_string(&path).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let reads = watcher.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reads, 0, "an unchanged file was read {reads} times");
    }

    #[test]
    fn the_watcher_hands_over_good_versions_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ron");
        sample().save(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let _watcher = ConfigWatcher::start(&path, move |r| {
            drop(tx.send(r));
        })
        .unwrap();
        let mut changed = sample();
        changed.paused = true;
        changed.save(&path).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got.unwrap(), changed);
        std::fs::write(&path, "(paused: maybe)").unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(got, Err(ConfigError::Syntax { line: 1, .. })),
            "{got:?}"
        );
    }
}
