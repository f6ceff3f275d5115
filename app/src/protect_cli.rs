//! `rewind protect`, `unprotect`, `pause`, `resume`, `status` and `history`: automatic
//! protection from the command line. They edit the configuration file (which a running
//! scheduler picks up by itself) and read the history and the scheduler's status.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Local, Utc};
use rewind_core::config::{self, Config, Destination, Protection};
use rewind_core::destination::{self, Availability};
use rewind_core::history::{self, Outcome, Record};
use rewind_core::libvirt::Hypervisor;
use rewind_core::policy::{self, Why};
use rewind_core::scheduler::status::{self as live, Status};
use rewind_core::store::retention::KeepRules;
use rewind_core::units::{human_age_secs, human_bytes, interval_text};
use serde::Serialize;

/// What `rewind protect` was asked.
#[derive(Debug)]
pub struct ProtectArgs<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The destination: a folder or `ssh://` URL.
    pub dest: &'a str,
    /// `--every`.
    pub every: Option<&'a str>,
    /// `--keep-*` (all 0: keep the defaults).
    pub keep: KeepRules,
    /// `--activity`.
    pub activity: Option<&'a str>,
    /// `--no-quiesce`.
    pub no_quiesce: bool,
    /// `--full-state`.
    pub full_state: bool,
    /// `--full-state-every`.
    pub full_state_every: Option<&'a str>,
    /// `--passphrase-file`.
    pub passphrase_file: Option<&'a Path>,
    /// `--connect` was given explicitly.
    pub uri: Option<&'a str>,
    /// `--json`.
    pub json: bool,
}

fn load() -> anyhow::Result<(Config, PathBuf)> {
    let path = config::config_path();
    Ok((Config::load(&path)?, path))
}

/// Parses a size such as `2G`, `500M` (bytes when bare).
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("{text:?} is not an amount; write it like 2G or 500M"))?;
    let factor: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => bail!("{other:?} is not a size unit; use K, M, G or T (as in 2G)"),
    };
    n.checked_mul(factor)
        .with_context(|| format!("{text:?} is too large"))
}

/// The destination `args.dest` in `config` (added if new, recognised by its store's ID):
/// its name, location, and a warning if it shares a disk with the VM.
fn destination_for(
    config: &mut Config,
    args: &ProtectArgs<'_>,
    info: &rewind_core::vm::VmInfo,
) -> anyhow::Result<(String, String, Option<String>)> {
    let passphrase = args
        .passphrase_file
        .map_or(destination::Passphrase::None, destination::Passphrase::File);
    if !Path::new(args.dest).exists()
        && let Some(d) = config.destination(args.dest)
    {
        // A configured destination's name (no folder of that name here).
        return Ok((d.name.clone(), d.location.clone(), None));
    }
    if args.dest.contains("://") {
        let location = rewind_core::store::Location::parse(args.dest)?;
        let added = destination::add_at(config, &location, passphrase)?;
        return Ok((added.name, added.location, None));
    }
    let folder = std::path::absolute(args.dest)
        .with_context(|| format!("{} is not a usable path", args.dest))?;
    let added = destination::add_folder(config, &folder, passphrase)?;
    let on_vm_disk = info
        .protected_disks()
        .filter_map(|d| d.path())
        .any(|disk| destination::same_device(disk, &folder));
    let warning = on_vm_disk.then(|| {
        format!(
            "warning: {} is on the same disk as the VM's own disks; if that disk fails, the checkpoints go with it. A removable drive or another host is safer.",
            folder.display()
        )
    });
    Ok((added.name, added.location, warning))
}

/// `rewind protect VM --to DEST ...`, on this user's own configuration file.
pub fn protect(
    out: &mut dyn Write,
    default_uri: &str,
    args: &ProtectArgs<'_>,
) -> anyhow::Result<()> {
    let (mut config, path) = load()?;
    if let Some(uri) = args.uri {
        uri.clone_into(&mut config.uri);
    } else if config.vms.is_empty() {
        default_uri.clone_into(&mut config.uri);
    }
    let hv = Hypervisor::connect(&config.uri)?;
    let info = hv.vm(args.vm)?;
    let policy = Policy::of(args)?;
    let (name, location, warning) = destination_for(&mut config, args, &info)?;
    let said = protect_in(&mut config, &info, &name, &location, args, &policy);
    config.save(&path)?;
    if args.json {
        return say_protected(out, &config, &info.name, (&name, &location), warning);
    }
    writeln!(out, "{said}")?;
    if let Some(w) = warning {
        writeln!(out, "{w}")?;
    }
    match Status::read_live(&live::status_path()) {
        Some(s) => writeln!(
            out,
            "The scheduler ({}, process {}) takes the first checkpoint now.",
            s.program, s.pid
        )?,
        None => writeln!(
            out,
            "No scheduler runs yet: start the Rewind window, or `rewind daemon`. It takes the first checkpoint at once."
        )?,
    }
    Ok(())
}

/// The intervals `rewind protect` asks for, checked.
pub struct Policy {
    interval_secs: u64,
    activity_bytes: Option<u64>,
    full_state_every_secs: Option<u64>,
}

impl Policy {
    /// From the command line.
    ///
    /// # Errors
    /// An interval or size that does not parse or is out of range.
    pub fn of(args: &ProtectArgs<'_>) -> anyhow::Result<Self> {
        let interval_secs = match args.every {
            Some(every) => config::parse_interval(every).map_err(anyhow::Error::msg)?,
            None => config::DEFAULT_INTERVAL_SECS,
        };
        config::check_interval(interval_secs).map_err(anyhow::Error::msg)?;
        let full_state_every_secs = args
            .full_state_every
            .map(|every| {
                let secs = config::parse_interval(every).map_err(anyhow::Error::msg)?;
                config::check_interval(secs)
                    .map_err(|e| anyhow::anyhow!("--full-state-every: {e}"))?;
                Ok::<_, anyhow::Error>(secs)
            })
            .transpose()?;
        Ok(Self {
            interval_secs,
            activity_bytes: args.activity.map(parse_size).transpose()?,
            full_state_every_secs,
        })
    }
}

/// Protects `info` into destination `name` in `config` as `args` ask (replacing its old
/// policy); what to tell the user.
pub fn protect_in(
    config: &mut Config,
    info: &rewind_core::vm::VmInfo,
    name: &str,
    location: &str,
    args: &ProtectArgs<'_>,
    policy: &Policy,
) -> String {
    let existing = config
        .vms
        .iter()
        .position(|p| p.uuid.as_deref() == Some(info.uuid.as_str()) || p.vm == info.name);
    let mut protection = existing.map(|i| config.vms.remove(i)).unwrap_or_default();
    protection.vm.clone_from(&info.name);
    protection.uuid = Some(info.uuid.clone());
    if !protection.destinations.iter().any(|d| d == name) {
        protection.destinations.push(name.to_owned());
    }
    protection.interval_secs = policy.interval_secs;
    if !args.keep.is_empty() {
        protection.keep = args.keep;
    } else if existing.is_none() {
        protection.keep = config::default_keep();
    }
    protection.activity_bytes = policy.activity_bytes.or(protection.activity_bytes);
    protection.quiesce = !args.no_quiesce;
    protection.kind = if args.full_state {
        config::Kind::Full
    } else {
        config::Kind::Disk
    };
    protection.full_state_every_secs = policy.full_state_every_secs;
    config.vms.push(protection.clone());
    format!(
        "Protecting {}: a {}checkpoint every {} into {name} ({location}){}, keeping {}.",
        info.name,
        if args.full_state { "full-state " } else { "" },
        interval_text(policy.interval_secs),
        policy
            .full_state_every_secs
            .map(|secs| format!(", with memory too every {}", interval_text(secs)))
            .unwrap_or_default(),
        keep_text(&protection.keep)
    )
}

fn keep_text(k: &KeepRules) -> String {
    let parts: Vec<String> = [
        (k.last, "last"),
        (k.hourly, "hourly"),
        (k.daily, "daily"),
        (k.weekly, "weekly"),
        (k.monthly, "monthly"),
        (k.yearly, "yearly"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    parts.join(", ")
}

/// What `rewind protect --json` prints (documented in CLI.md).
#[derive(Serialize)]
struct ProtectedJson<'a> {
    vm: &'a str,
    uuid: Option<&'a str>,
    destination: &'a str,
    location: &'a str,
    interval_secs: u64,
    keep: KeepRules,
    activity_bytes: Option<u64>,
    quiesce: bool,
    full_state: bool,
    full_state_every_secs: Option<u64>,
    warning: Option<String>,
}

/// Prints `rewind protect --json`: the VM's protection in `config` now, into destination
/// `destination` at `location`.
///
/// # Errors
/// The output could not be written.
pub fn say_protected(
    out: &mut dyn Write,
    config: &Config,
    vm: &str,
    (destination, location): (&str, &str),
    warning: Option<String>,
) -> anyhow::Result<()> {
    let Some(p) = config.vms.iter().find(|p| p.vm == vm) else {
        bail!("{vm:?} is not in the configuration after protecting it");
    };
    crate::store_cli::write_json(
        out,
        &ProtectedJson {
            vm: &p.vm,
            uuid: p.uuid.as_deref(),
            destination,
            location,
            interval_secs: p.interval_secs,
            keep: p.keep,
            activity_bytes: p.activity_bytes,
            quiesce: p.quiesce,
            full_state: p.kind == config::Kind::Full,
            full_state_every_secs: p.full_state_every_secs,
            warning,
        },
    )
}

/// Prints `text`, or with `json` the JSON of `value`.
///
/// # Errors
/// The output could not be written.
pub fn say_either(
    out: &mut dyn Write,
    json: bool,
    text: &str,
    value: &impl Serialize,
) -> anyhow::Result<()> {
    if json {
        crate::store_cli::write_json(out, value)
    } else {
        writeln!(out, "{text}")?;
        Ok(())
    }
}

/// What `rewind unprotect --json` prints.
#[derive(Serialize)]
pub struct UnprotectedJson {
    vm: String,
    uuid: Option<String>,
    destinations: Vec<String>,
}

/// `rewind unprotect VM`, on this user's own configuration file.
pub fn unprotect(out: &mut dyn Write, vm: &str, json: bool) -> anyhow::Result<()> {
    let (mut config, path) = load()?;
    let (said, value) = unprotect_in(&mut config, vm)?;
    config.save(&path)?;
    say_either(out, json, &said, &value)
}

/// `vm` is not among the protected VMs.
fn not_protected(vm: &str) -> anyhow::Error {
    crate::exit::not_found(format!(
        "{vm:?} is not protected; `rewind status` lists the protected VMs"
    ))
}

/// Stops protecting `vm` (name or UUID) in `config`; what to tell the user, as text and
/// as JSON.
///
/// # Errors
/// It is not protected.
pub fn unprotect_in(config: &mut Config, vm: &str) -> anyhow::Result<(String, UnprotectedJson)> {
    let Some(i) = config.vms.iter().position(|p| {
        p.vm == vm
            || p.uuid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(vm))
    }) else {
        return Err(not_protected(vm));
    };
    let p = config.vms.remove(i);
    let said = format!(
        "{} is no longer protected. Its checkpoints stay in {}.",
        p.vm,
        p.destinations.join(", ")
    );
    Ok((
        said,
        UnprotectedJson {
            vm: p.vm,
            uuid: p.uuid,
            destinations: p.destinations,
        },
    ))
}

/// `rewind pause [VM] [--for-an-hour | --until-tomorrow]` (`Some`) / `rewind resume [VM]`
/// (`None`), on this user's own configuration file.
pub fn set_paused(
    out: &mut dyn Write,
    vm: Option<&str>,
    pause: Option<rewind_core::pause::Pause>,
    json: bool,
) -> anyhow::Result<()> {
    let (mut config, path) = load()?;
    let said = apply_pause(&mut config, vm, pause)?;
    config.save(&path)?;
    say_either(out, json, &said, &paused_json(&config, vm))
}

/// What `rewind pause --json` and `rewind resume --json` print (documented in CLI.md).
#[derive(Serialize)]
pub struct PausedJson {
    vm: Option<String>,
    paused: bool,
    paused_until: Option<DateTime<Utc>>,
}

/// Whether `vm` (or all protection) is paused in `config` now, as JSON.
pub fn paused_json(config: &Config, vm: Option<&str>) -> PausedJson {
    let now = Utc::now();
    let paused = match vm.and_then(|vm| config.vms.iter().find(|p| p.vm == vm)) {
        Some(p) => config.vm_paused_at(p, now),
        None => config.paused_at(now),
    };
    PausedJson {
        vm: vm.map(str::to_owned),
        paused,
        paused_until: config.paused_until.filter(|t| *t > now),
    }
}

/// Pauses or resumes in `config` as `rewind pause`/`resume` ask; what to tell the user.
///
/// # Errors
/// `vm` is not protected.
pub fn apply_pause(
    config: &mut Config,
    vm: Option<&str>,
    pause: Option<rewind_core::pause::Pause>,
) -> anyhow::Result<String> {
    let paused = pause.is_some();
    let word = if paused { "paused" } else { "resumed" };
    let Some(vm) = vm else {
        if let Some(pause) = pause {
            config.pause(pause, &chrono::Local::now());
        } else {
            config.resume();
            for p in &mut config.vms {
                p.paused = false;
            }
        }
        return Ok(
            match config
                .pause_text()
                .filter(|_| config.paused_until.is_some())
            {
                Some(text) => format!("Protection of every VM {text}."),
                None => format!("Protection of every VM {word}."),
            },
        );
    };
    let Some(p) = config.vms.iter_mut().find(|p| p.vm == vm) else {
        return Err(not_protected(vm));
    };
    p.paused = paused;
    let mut said = format!("Protection of {vm} {word}.");
    if !paused && config.paused_at(Utc::now()) {
        said.push_str("\n(All protection is still paused: `rewind resume` without a VM.)");
    }
    Ok(said)
}

/// One destination of one VM in `rewind status --json`.
#[derive(Debug, Serialize)]
struct DestinationJson {
    name: String,
    location: String,
    available: bool,
    found_at: Option<String>,
    reason: Option<String>,
    last_checkpoint: Option<String>,
    last_success: Option<DateTime<Utc>>,
    last_attempt: Option<DateTime<Utc>>,
    failures: u32,
    last_error: Option<String>,
    next_run: DateTime<Utc>,
    next_why: Why,
    stale: bool,
    running: Option<live::RunningJob>,
}

#[derive(Debug, Serialize)]
struct VmJson {
    vm: String,
    uuid: Option<String>,
    paused: bool,
    interval_secs: u64,
    keep: KeepRules,
    destinations: Vec<DestinationJson>,
}

#[derive(Debug, Serialize)]
struct SchedulerJson {
    running: bool,
    pid: Option<u32>,
    program: Option<String>,
    since: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
struct StatusJson {
    config: PathBuf,
    config_error: Option<String>,
    paused: bool,
    /// When a timed pause ends (while it lasts).
    paused_until: Option<chrono::DateTime<Utc>>,
    scheduler: SchedulerJson,
    vms: Vec<VmJson>,
}

/// What `rewind status` reports from: this user's files, or what the protection service
/// says.
pub struct StatusInputs {
    /// The configuration file shown.
    pub path: PathBuf,
    /// The configuration in use.
    pub config: Config,
    /// Why the file does not load, if it does not.
    pub error: Option<String>,
    /// The job history.
    pub records: Vec<Record>,
    /// The scheduler's live status, if it runs.
    pub live: Option<Status>,
    /// Where each destination's store is now.
    pub found: Box<dyn Fn(&Destination) -> Availability>,
}

impl StatusInputs {
    /// From this user's own files.
    fn local() -> Self {
        let path = config::config_path();
        let (config, error) = Config::load_or_last_good(&path);
        let roots = destination::watch_roots(&config);
        Self {
            path,
            error: error.map(|e| e.to_string()),
            config,
            records: history::read(&history::history_path()),
            live: Status::read_live(&live::status_path()),
            found: Box::new(move |d| destination::locate(d, &roots)),
        }
    }
}

fn status_json(inputs: StatusInputs) -> StatusJson {
    let StatusInputs {
        path,
        config,
        error,
        records,
        live,
        found,
    } = inputs;
    let now = Utc::now();
    let vms = config
        .vms
        .iter()
        .map(|p| VmJson {
            vm: p.vm.clone(),
            uuid: p.uuid.clone(),
            paused: config.vm_paused_at(p, now),
            interval_secs: p.interval_secs,
            keep: p.keep,
            destinations: p
                .destinations
                .iter()
                .filter_map(|d| config.destination(d))
                .map(|d| destination_json(p, d, &records, live.as_ref(), found(d), now))
                .collect(),
        })
        .collect();
    StatusJson {
        config: path,
        config_error: error.or_else(|| live.as_ref().and_then(|s| s.config_error.clone())),
        paused: config.paused_at(now),
        paused_until: config.paused_until.filter(|t| *t > now),
        scheduler: SchedulerJson {
            running: live.is_some(),
            pid: live.as_ref().map(|s| s.pid),
            program: live.as_ref().map(|s| s.program.clone()),
            since: live.as_ref().map(|s| s.started),
        },
        vms,
    }
}

fn destination_json(
    p: &Protection,
    d: &Destination,
    records: &[Record],
    live: Option<&Status>,
    found: Availability,
    now: DateTime<Utc>,
) -> DestinationJson {
    let track = history::track(records, &p.vm, p.uuid.as_deref(), &d.name);
    // Checkpoints only: a boot-check's record is not one.
    let checkpoints = || {
        records
            .iter()
            .rev()
            .filter(|r| r.destination == d.name && r.vm == p.vm && !r.is_boot_check())
    };
    let last_ok = checkpoints().find(|r| r.outcome == Outcome::Ok);
    let last = checkpoints().next();
    let (available, found_at, reason) = match found {
        Availability::Folder(path) => (true, Some(path.display().to_string()), None),
        Availability::Remote(l) => (true, Some(l), None),
        Availability::Missing { reason } => (false, None, Some(reason)),
    };
    let (next_run, next_why) = live
        .and_then(|s| {
            s.next
                .iter()
                .find(|n| n.vm == p.vm && n.destination == d.name)
                .map(|n| (n.at, n.why))
        })
        .unwrap_or_else(|| {
            let (at, why) = policy::next_run(p, &track, now);
            (at.max(now), why)
        });
    DestinationJson {
        name: d.name.clone(),
        location: d.location.clone(),
        available,
        found_at,
        reason,
        last_checkpoint: last_ok.and_then(|r| r.checkpoint.clone()),
        last_success: track.last_success,
        last_attempt: track.last_attempt,
        failures: track.failures,
        last_error: last
            .filter(|r| r.outcome == Outcome::Failed)
            .and_then(|r| r.error.clone()),
        next_run,
        next_why,
        stale: track.last_success.is_some() && policy::is_stale(p, &track, now, now),
        running: live.and_then(|s| {
            s.running
                .iter()
                .find(|j| j.vm == p.vm && j.destination == d.name)
                .cloned()
        }),
    }
}

fn local(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string()
}

fn ago(t: DateTime<Utc>) -> String {
    let secs = u64::try_from((Utc::now() - t).num_seconds()).unwrap_or(0);
    format!("{} ago", human_age_secs(secs))
}

/// `rewind status [--json]`.
pub fn status(out: &mut dyn Write, json: bool) -> anyhow::Result<()> {
    status_of(out, json, StatusInputs::local())
}

/// What needs the user's attention, if anything: a protected VM (not paused) whose
/// checkpoints are overdue, whose last checkpoint failed (as the window's and the tray's
/// badge say: [`overview::vm_overview`]), or one of whose destinations is missing; or a
/// configuration that does not load.
fn attention(inputs: &StatusInputs, now: DateTime<Utc>) -> Option<String> {
    use rewind_core::view::overview::{self, Badge};
    if let Some(e) = inputs
        .error
        .clone()
        .or_else(|| inputs.live.as_ref().and_then(|s| s.config_error.clone()))
    {
        return Some(format!("the configuration does not load: {e}"));
    }
    let views: Vec<rewind_core::view::catalog::DestinationView> = inputs
        .config
        .destinations
        .iter()
        .map(|d| rewind_core::view::catalog::DestinationView {
            destination: d.clone(),
            found: (inputs.found)(d),
            checkpoints: Vec::new(),
            error: None,
            fully_checked: None,
        })
        .collect();
    inputs.config.vms.iter().find_map(|p| {
        let seen = overview::vm_overview(
            &inputs.config,
            &p.vm,
            p.uuid.as_deref().unwrap_or_default(),
            &views,
            &inputs.records,
            now,
        );
        match &seen.badge {
            Badge::Failing { why } => Some(format!("{}: {why}", p.vm)),
            Badge::Paused => None,
            _ => seen
                .destinations
                .iter()
                .find(|d| !d.available)
                .map(|d| format!("{}: destination {} is missing: {}", p.vm, d.name, d.detail)),
        }
    })
}

/// `rewind status [--json]` from `inputs`.
///
/// # Errors
/// The output could not be written; or, after the output, [`crate::exit::NeedsAttention`]
/// when something needs the user's attention (the exit code says so).
pub fn status_of(out: &mut dyn Write, json: bool, inputs: StatusInputs) -> anyhow::Result<()> {
    let attention = attention(&inputs, Utc::now());
    let s = status_json(inputs);
    show_status(out, json, &s)?;
    match attention {
        Some(why) => Err(crate::exit::NeedsAttention { why }.into()),
        None => Ok(()),
    }
}

fn show_status(out: &mut dyn Write, json: bool, s: &StatusJson) -> anyhow::Result<()> {
    if json {
        return crate::store_cli::write_json(out, s);
    }
    match (&s.scheduler.pid, &s.scheduler.program) {
        (Some(pid), Some(program)) => writeln!(out, "Scheduler: runs ({program}, process {pid}).")?,
        _ => writeln!(
            out,
            "Scheduler: not running — nothing is protected until the Rewind window or `rewind daemon` runs."
        )?,
    }
    if s.paused {
        let text = rewind_core::pause::describe(
            s.paused_until.is_none(),
            s.paused_until,
            &chrono::Local::now(),
        )
        .unwrap_or_else(|| "paused".into());
        writeln!(out, "All protection is {text} (`rewind resume`).")?;
    }
    if let Some(e) = &s.config_error {
        writeln!(out, "Configuration: {e}")?;
    }
    if s.vms.is_empty() {
        writeln!(
            out,
            "No VM is protected yet: `rewind protect VM --to FOLDER`."
        )?;
    }
    for vm in &s.vms {
        writeln!(
            out,
            "{}{}: every {}, keeping {}",
            vm.vm,
            if vm.paused { " (paused)" } else { "" },
            interval_text(vm.interval_secs),
            keep_text(&vm.keep)
        )?;
        for d in &vm.destinations {
            let last = d.last_success.map_or_else(
                || "no checkpoint yet".to_owned(),
                |t| format!("last checkpoint {}", ago(t)),
            );
            writeln!(
                out,
                "  {} ({}): {}; {last}{}",
                d.name,
                d.found_at.as_deref().unwrap_or(&d.location),
                if d.available { "present" } else { "MISSING" },
                if d.stale { " — TOO OLD" } else { "" }
            )?;
            if let Some(reason) = &d.reason {
                writeln!(out, "    {reason}")?;
            }
            if let Some(job) = &d.running {
                writeln!(
                    out,
                    "    checkpoint under way ({}, {} of {}) — do not unplug this drive now",
                    job.phase,
                    human_bytes(job.done_bytes),
                    human_bytes(job.total_bytes)
                )?;
            } else {
                writeln!(
                    out,
                    "    next: {} ({})",
                    local(d.next_run),
                    d.next_why.label()
                )?;
            }
            if let Some(e) = &d.last_error {
                writeln!(
                    out,
                    "    last attempt failed ({} time(s) in a row): {e}",
                    d.failures
                )?;
            }
        }
    }
    Ok(())
}

/// `rewind history [VM] [--json]`.
pub fn show_history(out: &mut dyn Write, vm: Option<&str>, json: bool) -> anyhow::Result<()> {
    show_records(out, history::read(&history::history_path()), vm, json)
}

/// `rewind history [VM] [--json]` of `records` (this user's, or the service's).
pub fn show_records(
    out: &mut dyn Write,
    records: Vec<Record>,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| {
            vm.is_none_or(|v| {
                r.vm == v
                    || r.vm_uuid
                        .as_deref()
                        .is_some_and(|u| u.eq_ignore_ascii_case(v))
            })
        })
        .collect();
    if json {
        serde_json::to_writer_pretty(&mut *out, &records)?;
        writeln!(out)?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "No jobs have run yet.")?;
    }
    for r in &records {
        let what = match (r.outcome, &r.checkpoint) {
            (Outcome::Ok, Some(id)) if r.is_boot_check() => format!("checkpoint {id} booted"),
            (Outcome::Failed, Some(id)) if r.is_boot_check() => format!(
                "checkpoint {id} FAILED its boot-check: {}",
                r.error.as_deref().unwrap_or("?")
            ),
            (Outcome::Ok, Some(id)) => format!(
                "checkpoint {id} ({}, {} new{})",
                if r.incremental == Some(true) {
                    "incremental"
                } else {
                    "full"
                },
                human_bytes(r.new_bytes),
                if r.pruned > 0 {
                    format!(", {} old removed", r.pruned)
                } else {
                    String::new()
                }
            ),
            (Outcome::Ok, None) => "done".into(),
            (Outcome::Failed, _) => format!("FAILED: {}", r.error.as_deref().unwrap_or("?")),
            (Outcome::Cancelled, _) => "cancelled".into(),
        };
        writeln!(
            out,
            "{}  {} -> {} ({}): {what}",
            local(r.started),
            r.vm,
            r.destination,
            r.trigger.label()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `win11` protected hourly into `usb`, whose drive is there when `plugged`; with
    /// `records` as history.
    fn inputs(records: Vec<Record>, plugged: bool, paused: bool) -> StatusInputs {
        let config = Config {
            destinations: vec![Destination {
                name: "usb".into(),
                location: "/media/me/usb/rewind".into(),
                store_id: None,
                passphrase_file: None,
                store_secret: None,
            }],
            vms: vec![Protection {
                vm: "win11".into(),
                destinations: vec!["usb".into()],
                interval_secs: 3600,
                paused,
                ..Protection::default()
            }],
            ..Config::default()
        };
        StatusInputs {
            path: PathBuf::from("config.ron"),
            config,
            error: None,
            records,
            live: None,
            found: Box::new(move |d| {
                if plugged {
                    Availability::Folder(PathBuf::from(&d.location))
                } else {
                    Availability::Missing {
                        reason: "the drive is not plugged in".into(),
                    }
                }
            }),
        }
    }

    fn job(now: DateTime<Utc>, hours_ago: i64, outcome: Outcome) -> Record {
        let mut r = Record::starting(
            "win11",
            "usb",
            Why::Due,
            now - chrono::Duration::hours(hours_ago),
        );
        r.outcome = outcome;
        r
    }

    #[test]
    fn attention_for_overdue_failing_missing_and_a_broken_configuration_not_when_paused() {
        let now = Utc::now();
        let fine = || vec![job(now, 1, Outcome::Ok)];
        assert_eq!(attention(&inputs(fine(), true, false), now), None);
        let overdue = attention(&inputs(vec![job(now, 48, Outcome::Ok)], true, false), now);
        assert!(overdue.is_some_and(|w| w.starts_with("win11: in usb")));
        let failed = vec![job(now, 2, Outcome::Ok), job(now, 1, Outcome::Failed)];
        let failing = attention(&inputs(failed, true, false), now);
        assert!(failing.is_some_and(|w| w.contains("failed")));
        let missing = attention(&inputs(fine(), false, false), now);
        assert!(missing.is_some_and(|w| w.contains("not plugged in")),);
        assert_eq!(attention(&inputs(fine(), false, true), now), None);
        let mut broken = inputs(fine(), true, false);
        broken.error = Some("line 3, column 9: expected a string".into());
        assert!(attention(&broken, now).is_some_and(|w| w.contains("line 3")));
    }

    #[test]
    fn sizes_and_intervals_read_and_print_like_people_write_them() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MiB").unwrap(), 500 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(
            parse_size("3Q")
                .unwrap_err()
                .to_string()
                .contains("size unit")
        );
        assert_eq!(
            keep_text(&config::default_keep()),
            "4 last, 24 hourly, 7 daily, 4 weekly, 6 monthly"
        );
    }
}
