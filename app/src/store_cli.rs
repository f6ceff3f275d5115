//! `rewind init`, `checkpoints`, `verify`, `prune` and `gc`: the store from the command line.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, Local, Utc};
use rewind_core::config::{self, Config, Destination};
use rewind_core::destination::{self, Availability};
use rewind_core::engine::jobs::{Listing, StoreFacts};
use rewind_core::progress::Control;
use rewind_core::store::retention::KeepRules;
use rewind_core::store::verify::VerifyReport;
use rewind_core::store::{InitOptions, Location, Manifest, Store, StoreError};
use rewind_core::units::human_bytes;
use rewind_core::workdir::WorkDir;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::progress_cli::Progress;

/// Environment variable that holds a store's passphrase (for scripts and tests).
pub const PASSPHRASE_ENV: &str = "REWIND_PASSPHRASE";

/// The passphrase from the environment or, in a terminal, from a prompt.
pub(crate) fn passphrase(store: &Path, confirm: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(pass) = std::env::var_os(PASSPHRASE_ENV) {
        let pass = Zeroizing::new(pass.into_encoded_bytes());
        if pass.is_empty() {
            bail!("{PASSPHRASE_ENV} is set but empty; set it to the store's passphrase");
        }
        return Ok(pass);
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "the store at {} needs a passphrase: run Rewind in a terminal to be asked for it, \
             or set {PASSPHRASE_ENV}",
            store.display()
        );
    }
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("Passphrase for {}: ", store.display()))
            .context("could not read the passphrase from the terminal")?
            .into_bytes(),
    );
    if first.is_empty() {
        bail!("an empty passphrase is not allowed");
    }
    if confirm {
        let second = Zeroizing::new(
            rpassword::prompt_password("Same passphrase again: ")
                .context("could not read the passphrase from the terminal")?
                .into_bytes(),
        );
        if first != second {
            bail!("the two passphrases differ; nothing was created");
        }
    }
    Ok(first)
}

/// The passphrase in [`PASSPHRASE_ENV`], if it is set.
fn given_passphrase() -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    match std::env::var_os(PASSPHRASE_ENV) {
        None => Ok(None),
        Some(pass) if pass.is_empty() => {
            bail!("{PASSPHRASE_ENV} is set but empty; set it to the store's passphrase")
        }
        Some(pass) => Ok(Some(Zeroizing::new(pass.into_encoded_bytes()))),
    }
}

/// Where a store is, from a `DEST` argument: a folder, or `ssh://[user@]host[:port]/path`.
pub(crate) fn location(dest: &Path) -> anyhow::Result<Location> {
    let location = match dest.to_str() {
        Some(text) => Location::parse(text)?,
        // Not UTF-8: surely no URL.
        None => Location::Local(dest.to_path_buf()),
    };
    // A folder named relative to where the command runs: the same folder, named so that
    // messages (and the service, which runs elsewhere) see where it is.
    Ok(match location {
        Location::Local(path) => Location::Local(
            std::path::absolute(&path)
                .with_context(|| format!("could not make {} an absolute path", path.display()))?,
        ),
        ssh @ Location::Ssh(_) => ssh,
    })
}

/// The configured destination that `dest` names, when `dest` is no path that exists
/// (nor a URL), with the configuration it is in (this user's, or root's: the one in
/// effect when the CLI works directly).
fn named_destination(dest: &Path) -> Option<(Config, Destination)> {
    let name = dest.to_str()?;
    if name.contains("://") || dest.exists() {
        return None;
    }
    let (config, _) = Config::load_or_last_good(&config::config_path());
    let found = config.destination(name)?.clone();
    Some((config, found))
}

/// Where the store of `dest` is: `dest` itself, or where the store of the configured
/// destination of that name is now (wherever its drive is mounted).
///
/// # Errors
/// `dest` names a destination whose store is not there now (its drive unplugged).
pub(crate) fn store_path(dest: &Path) -> anyhow::Result<Cow<'_, Path>> {
    let Some((config, d)) = named_destination(dest) else {
        return Ok(Cow::Borrowed(dest));
    };
    match destination::locate(&d, &destination::watch_roots(&config)) {
        Availability::Folder(path) => Ok(Cow::Owned(path)),
        Availability::Remote(url) => Ok(Cow::Owned(PathBuf::from(url))),
        Availability::Missing { reason } => Err(destination::OpenError::Missing { reason }.into()),
    }
}

/// The configured destinations' names, for a message.
fn destination_names() -> String {
    let (config, _) = Config::load_or_last_good(&config::config_path());
    let names: Vec<&str> = config
        .destinations
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    if names.is_empty() {
        "none are configured".into()
    } else {
        format!("the configured destinations are {}", names.join(", "))
    }
}

/// Opens a store (a folder, `ssh://…`, or a configured destination's name), asking for its
/// passphrase if it is encrypted (a destination's passphrase file is read instead).
///
/// # Errors
/// No store there (`not found`: `dest` is neither a store nor a destination's name), or
/// it does not open.
pub fn open_store(dest: &Path) -> anyhow::Result<Store> {
    if let Some((config, d)) = named_destination(dest)
        && d.passphrase_file.is_some()
        && std::env::var_os(PASSPHRASE_ENV).is_none()
    {
        let found = destination::locate(&d, &destination::watch_roots(&config));
        return Ok(destination::open(&d, &found)?);
    }
    let path = store_path(dest)?;
    // A bare word may have been meant as a destination's name: say which there are.
    let word = !dest.as_os_str().as_encoded_bytes().contains(&b'/');
    open_path(&path).map_err(|e| match e.downcast_ref::<StoreError>() {
        Some(StoreError::Missing { .. }) if word => e.context(format!(
            "{} is neither a store's folder nor a destination's name ({})",
            dest.display(),
            destination_names()
        )),
        _ => e,
    })
}

/// Opens the store at `dest` (a folder or `ssh://…`), asking for its passphrase if it is
/// encrypted.
fn open_path(dest: &Path) -> anyhow::Result<Store> {
    let location = location(dest)?;
    // A passphrase in the environment is given from the start: a store whose header says
    // "not encrypted" then refuses it rather than being written in plaintext.
    let given = given_passphrase()?;
    match Store::open_at(&location, given.as_deref().map(Vec::as_slice)) {
        Err(StoreError::PassphraseRequired { path }) => {
            let pass = passphrase(&path, false)?;
            Ok(Store::open_at(&location, Some(pass.as_slice()))?)
        }
        other => Ok(other?),
    }
}

/// `rewind checkpoint VM... --to DEST [--json] [--full-state]`: one VM after the other; a VM
/// that fails does not stop the others, and the command fails at the end if any did.
pub fn checkpoint(
    out: &mut dyn Write,
    uri: &str,
    vms: &[String],
    dest: &Path,
    json: bool,
    full_state: bool,
) -> anyhow::Result<()> {
    let asked = dest;
    let dest = &*store_path(asked)?;
    let location = location(dest)?;
    let given = given_passphrase()?;
    let store = match Store::open_at(&location, given.as_deref().map(Vec::as_slice)) {
        Err(StoreError::Missing { .. }) => Store::init_at(&location, &InitOptions::default())?,
        // An empty folder becomes a store; one holding other things stays as it is.
        Err(not_a_store @ StoreError::NotAStore { .. }) => {
            match Store::init_at(&location, &InitOptions::default()) {
                Err(StoreError::NotEmpty { .. }) => return Err(not_a_store.into()),
                created => created?,
            }
        }
        // A destination's passphrase file, or the passphrase asked for.
        Err(StoreError::PassphraseRequired { .. }) => open_store(asked)?,
        opened => opened?,
    };
    let hv = rewind_core::libvirt::Hypervisor::connect(uri)?;
    let interrupt = Interrupt::install()?;
    let mut taken = Vec::new();
    let mut failed = Vec::new();
    for vm in vms {
        if interrupt.control().is_cancelled() {
            failed.push((vm.clone(), anyhow!("cancelled before it began")));
            continue;
        }
        match checkpoint_one(&hv, &store, vm, full_state, &interrupt.next_control()) {
            Ok(m) => {
                if !json {
                    say_taken(out, &m)?;
                }
                taken.push(m);
            }
            Err(e) => {
                // Said now, so that it is not lost if a later VM takes long.
                if vms.len() > 1 {
                    eprintln!(
                        "warning: no checkpoint of {vm}: {}",
                        crate::error_text::one_line(&e)
                    );
                }
                failed.push((vm.clone(), e));
            }
        }
    }
    // With none taken, the error alone is the JSON (`crate::exit`).
    if json && (failed.is_empty() || !taken.is_empty()) {
        let list: Vec<CheckpointJson<'_>> = taken.iter().map(CheckpointJson::of).collect();
        serde_json::to_writer_pretty(&mut *out, &list)?;
        writeln!(out)?;
    }
    if interrupt.control().is_cancelled() {
        let untaken: Vec<&str> = failed.iter().map(|(vm, _)| vm.as_str()).collect();
        bail!(
            "cancelled (Ctrl-C): no checkpoint of {} was taken{}",
            untaken.join(", "),
            if taken.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} checkpoint(s) taken before stay in the store",
                    taken.len()
                )
            }
        );
    }
    failures(vms, failed)
}

/// The end of `rewind checkpoint VM...`: fine, the one VM's error, or which VMs failed.
pub(crate) fn failures(
    vms: &[String],
    mut failed: Vec<(String, anyhow::Error)>,
) -> anyhow::Result<()> {
    match failed.len() {
        0 => Ok(()),
        1 if vms.len() == 1 => Err(failed.remove(0).1),
        n => bail!(
            "{n} of {} checkpoints failed: {}",
            vms.len(),
            failed
                .iter()
                .map(|(vm, _)| vm.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The line that says a checkpoint was taken.
pub(crate) fn say_taken(out: &mut dyn Write, m: &Manifest) -> std::io::Result<()> {
    writeln!(
        out,
        "Checkpoint {} of {} taken ({}{}, {} of data, {} new in the store{}).",
        m.id,
        m.vm.name,
        if m.kind == rewind_core::store::CheckpointKind::Full {
            "full state with memory, disks "
        } else {
            ""
        },
        if m.parent.is_some() {
            "incremental"
        } else {
            "full"
        },
        human_bytes(m.logical_bytes),
        human_bytes(m.new_bytes),
        m.full_reason
            .as_deref()
            .map(|r| format!("; full because {r}"))
            .unwrap_or_default()
    )
}

/// `--no-wait`: this command's jobs fail as busy instead of waiting for a store's lock.
static FAIL_WHEN_BUSY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets `--no-wait` for the jobs this command runs here.
pub(crate) fn fail_when_busy(yes: bool) {
    FAIL_WHEN_BUSY.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// A control for a job this command runs here, failing as busy with `--no-wait`.
pub(crate) fn job_control() -> Control {
    let control = Control::new();
    if FAIL_WHEN_BUSY.load(std::sync::atomic::Ordering::Relaxed) {
        control.fail_when_busy();
    }
    control
}

/// Ctrl-C (SIGINT) and SIGTERM cancel the checkpoint being taken: the engine stops at its
/// next check and cleans up (no checkpoint, no libvirt job, no frozen guest). A second
/// Ctrl-C exits at once; the next run then cleans up what is left.
pub(crate) struct Interrupt {
    current: std::sync::Arc<std::sync::Mutex<std::sync::Arc<Control>>>,
}

impl Interrupt {
    pub(crate) fn install() -> anyhow::Result<Self> {
        let current =
            std::sync::Arc::new(std::sync::Mutex::new(std::sync::Arc::new(job_control())));
        let handler_current = current.clone();
        ctrlc::set_handler(move || {
            let control = handler_current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if control.is_cancelled() {
                eprintln!("\nInterrupted again: exiting now; the next run cleans up.");
                std::process::exit(130);
            }
            eprintln!("\nCancelling… (press Ctrl-C again to exit at once)");
            control.cancel();
        })
        .context("could not install the Ctrl-C handler")?;
        Ok(Self { current })
    }

    /// The control of the job now running.
    fn control(&self) -> std::sync::Arc<Control> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A fresh control for the next job, cancelled if the user already interrupted.
    pub(crate) fn next_control(&self) -> std::sync::Arc<Control> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = std::sync::Arc::new(job_control());
        if current.is_cancelled() {
            next.cancel();
        }
        *current = next.clone();
        next
    }
}

/// A folder for one job's sockets and scratch files (core's [`WorkDir`]), with a message
/// that names it when it cannot be made.
pub(crate) fn work_dir() -> anyhow::Result<WorkDir> {
    WorkDir::new().context(
        "could not make a folder for the job in Rewind's work folder (set REWIND_WORK_DIR \
         to a private folder of yours to use another)",
    )
}

fn checkpoint_one(
    hv: &rewind_core::libvirt::Hypervisor,
    store: &Store,
    vm: &str,
    full_state: bool,
    control: &std::sync::Arc<Control>,
) -> anyhow::Result<Manifest> {
    let work = work_dir()?;
    let reporter = Progress::start(vm, control.clone());
    let options = rewind_core::checkpoint::TakeOptions {
        full_state,
        ..rewind_core::checkpoint::TakeOptions::default()
    };
    let result = rewind_core::checkpoint::take_with(hv, store, vm, work.path(), &options, control);
    drop(reporter);
    Ok(result?)
}

/// `rewind init DEST [--encrypt]`.
pub fn init(out: &mut dyn Write, dest: &Path, encrypt: bool, json: bool) -> anyhow::Result<()> {
    let location = location(dest)?;
    let mut options = InitOptions::default();
    if encrypt {
        options.passphrase = Some(passphrase(dest, true)?);
    }
    let store = Store::init_at(&location, &options)?;
    let made = Initialised {
        id: Some(store.config().id.to_string()),
        location: location.to_string(),
        encrypted: encrypt,
        destination: None,
    };
    say_initialised(out, &made, json)
}

/// A store `rewind init` made (`--json`, documented in CLI.md).
#[derive(Serialize)]
pub(crate) struct Initialised {
    /// The new store's ID (`None`: the service's store, which this user cannot read).
    pub id: Option<String>,
    /// Where it is: a folder or `ssh://` URL.
    pub location: String,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// The protection service's destination that keeps it, if the service made it.
    pub destination: Option<String>,
}

/// Prints what `rewind init` made.
pub(crate) fn say_initialised(
    out: &mut dyn Write,
    made: &Initialised,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return write_json(out, made);
    }
    let kind = if made.encrypted { "an encrypted " } else { "" };
    let id = made
        .id
        .as_deref()
        .map(|id| format!(" {id}"))
        .unwrap_or_default();
    match &made.destination {
        None => writeln!(out, "Created {kind}store{id} in {}.", made.location)?,
        Some(name) => writeln!(
            out,
            "Created {kind}store{id} in {}; the protection service keeps it as destination {name:?}.",
            made.location
        )?,
    }
    if made.encrypted {
        say_keep_passphrase(out)?;
    }
    Ok(())
}

/// `value` as pretty JSON, one document on its own lines.
///
/// # Errors
/// The output could not be written.
pub(crate) fn write_json(out: &mut dyn Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).context("could not write JSON")?;
    writeln!(out)?;
    Ok(())
}

/// The advice after an encrypted store is made.
pub(crate) fn say_keep_passphrase(out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "Keep the passphrase safe: without it nothing in this store can be restored."
    )
}

pub(crate) fn local(time: DateTime<Utc>) -> String {
    time.with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// One checkpoint in `rewind checkpoints --json` (documented in CLI.md).
#[derive(Serialize)]
pub(crate) struct CheckpointJson<'a> {
    id: &'a str,
    vm: &'a str,
    vm_uuid: String,
    time: String,
    kind: rewind_core::store::CheckpointKind,
    consistency: rewind_core::store::Consistency,
    consistency_note: Option<&'a str>,
    logical_bytes: u64,
    new_bytes: u64,
    duration_ms: u64,
    read_bytes: u64,
    parent: Option<&'a str>,
    full_reason: Option<&'a str>,
    labels: &'a [String],
    disks: Vec<DiskJson<'a>>,
    blobs: Vec<&'a str>,
    program_version: &'a str,
}

#[derive(Serialize)]
struct DiskJson<'a> {
    target: &'a str,
    size_bytes: u64,
    data_bytes: u64,
    source: Option<&'a str>,
    format: Option<&'a str>,
}

impl<'a> CheckpointJson<'a> {
    pub(crate) fn of(m: &'a Manifest) -> Self {
        Self {
            id: &m.id,
            vm: &m.vm.name,
            vm_uuid: m.vm.uuid.to_string(),
            time: m.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kind: m.kind,
            consistency: m.consistency,
            consistency_note: m.consistency_note.as_deref(),
            logical_bytes: m.logical_bytes,
            new_bytes: m.new_bytes,
            duration_ms: m.duration_ms,
            read_bytes: m.read_bytes,
            parent: m.parent.as_deref(),
            full_reason: m.full_reason.as_deref(),
            labels: &m.labels,
            disks: m
                .disks
                .iter()
                .map(|d| DiskJson {
                    target: &d.target,
                    size_bytes: d.index.size_bytes,
                    data_bytes: d.index.data_bytes,
                    source: d.source.as_deref(),
                    format: d.format.as_deref(),
                })
                .collect(),
            blobs: m.blobs.iter().map(|b| b.name.as_str()).collect(),
            program_version: &m.program_version,
        }
    }
}

/// Whether `filter` (a VM name or UUID) selects `m`.
pub(crate) fn vm_matches(m: &Manifest, filter: Option<&str>) -> bool {
    filter.is_none_or(|f| m.vm.name == f || m.vm.uuid.to_string().eq_ignore_ascii_case(f))
}

/// `rewind checkpoints [VM] --in DEST [--json]`.
pub fn checkpoints(
    out: &mut dyn Write,
    dest: &Path,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(dest)?;
    show_listing(out, dest, &Listing::of(&store)?, vm, json)
}

/// Prints a store's list of checkpoints (of every VM, or of `vm`) as `rewind checkpoints`
/// does.
pub(crate) fn show_listing(
    out: &mut dyn Write,
    dest: &Path,
    listing: &Listing,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let selected: Vec<&Manifest> = listing
        .checkpoints
        .iter()
        .filter(|m| vm_matches(m, vm))
        .collect();
    if let Some(name) = vm
        && selected.is_empty()
        && !listing.checkpoints.is_empty()
    {
        let mut names: Vec<&str> = listing
            .checkpoints
            .iter()
            .map(|m| m.vm.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        return Err(crate::exit::not_found(format!(
            "no checkpoints of a VM named {name:?} in {}; it holds checkpoints of: {}",
            dest.display(),
            names.join(", ")
        )));
    }
    if json {
        #[derive(Serialize)]
        struct ListingJson<'a> {
            store: &'a StoreFacts,
            checkpoints: Vec<CheckpointJson<'a>>,
            unreadable: Vec<Unreadable<'a>>,
        }
        let json = ListingJson {
            store: &listing.store,
            checkpoints: selected.iter().map(|m| CheckpointJson::of(m)).collect(),
            unreadable: listing
                .unreadable
                .iter()
                .map(|(path, error)| Unreadable { path, error })
                .collect(),
        };
        serde_json::to_writer_pretty(&mut *out, &json)?;
        writeln!(out)?;
        return Ok(());
    }
    if selected.is_empty() {
        writeln!(out, "No checkpoints in {} yet.", dest.display())?;
    } else {
        let rows: Vec<[String; 7]> = selected
            .iter()
            .map(|m| {
                [
                    m.vm.name.clone(),
                    m.id.clone(),
                    local(m.time),
                    format!("{:?}", m.kind).to_lowercase(),
                    format!("{:?}", m.consistency).to_lowercase(),
                    human_bytes(m.logical_bytes),
                    human_bytes(m.new_bytes),
                ]
            })
            .collect();
        let header = [
            "VM",
            "CHECKPOINT",
            "TIME",
            "KIND",
            "CONSISTENCY",
            "DATA",
            "NEW",
        ]
        .map(String::from);
        write_table(out, &header, &rows)?;
    }
    for (path, error) in &listing.unreadable {
        writeln!(out, "warning: {} cannot be read: {error}", path.display())?;
    }
    Ok(())
}

fn write_table<const N: usize>(
    out: &mut dyn Write,
    header: &[String; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let widths: Vec<usize> = (0..N)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[derive(Serialize)]
struct Unreadable<'a> {
    path: &'a Path,
    error: &'a str,
}

/// `rewind verify --in DEST [--quick] [--json]`. Fails (exit 1) when anything is damaged.
pub fn verify(out: &mut dyn Write, dest: &Path, quick: bool, json: bool) -> anyhow::Result<()> {
    let store = open_store(dest)?;
    let control = std::sync::Arc::new(job_control());
    let reporter = Progress::start(&format!("Verifying {}", dest.display()), control.clone());
    let report = store.verify(quick, &control);
    drop(reporter);
    say_verified(out, &report?, dest, json)
}

/// Prints a verify's report (as JSON with `json`); an error if it found damage.
///
/// # Errors
/// The report shows damage, or the output could not be written.
pub fn say_verified(
    out: &mut dyn Write,
    report: &VerifyReport,
    dest: &Path,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
    } else {
        write_verify_report(out, report)?;
    }
    if !report.is_clean() {
        let broken = report.broken_checkpoints().len();
        bail!(
            "verification found {} damaged or missing chunk(s) breaking {broken} checkpoint(s) and {} unreadable \
             manifest(s) in {}; the next checkpoint of the same data rewrites damaged chunks",
            report.damaged.len(),
            report.unreadable_manifests.len(),
            dest.display()
        );
    }
    Ok(())
}

fn write_verify_report(out: &mut dyn Write, report: &VerifyReport) -> std::io::Result<()> {
    writeln!(
        out,
        "Checked {} checkpoint(s): {} chunk(s), {} of data{}.",
        report.checkpoints,
        report.chunks_checked,
        human_bytes(report.bytes_checked),
        if report.quick {
            " (quick: presence only)"
        } else {
            ""
        }
    )?;
    for d in &report.damaged {
        writeln!(
            out,
            "{} chunk {} is {}.",
            if d.kind == "data" { "Data" } else { "Index" },
            d.chunk,
            d.problem
        )?;
        if let Some(to) = &d.moved_to {
            writeln!(out, "  moved aside to {}", to.display())?;
        }
        for c in &d.checkpoints {
            writeln!(
                out,
                "  breaks {} checkpoint {} ({})",
                c.vm,
                c.id,
                local(c.time)
            )?;
        }
    }
    for (path, error) in &report.unreadable_manifests {
        writeln!(out, "Manifest {} cannot be read: {error}", path.display())?;
    }
    if report.is_clean() {
        writeln!(out, "Everything is intact.")?;
    }
    Ok(())
}

/// `rewind prune --in DEST --keep-… [--dry-run] [--json]`, then garbage collection.
pub fn prune(
    out: &mut dyn Write,
    dest: &Path,
    vm: Option<&str>,
    rules: &KeepRules,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(dest)?;
    let control = job_control();
    let vm_uuid = match vm {
        None => None,
        Some(filter) => Some(vm_in(&store.catalog()?.checkpoints, dest, filter)?),
    };
    let decisions = store.prune(rules, vm_uuid, dry_run, &control)?;
    let gc = if dry_run {
        None
    } else {
        rewind_core::bootcheck::forget_pruned(&rewind_core::paths::state_dir(), &decisions);
        Some(store.gc(&control)?)
    };
    say_pruned(out, &decisions, gc, dry_run, json)
}

/// The UUID of the VM (name or UUID) that has checkpoints among `checkpoints` of the store
/// at `dest`.
pub(crate) fn vm_in(
    checkpoints: &[Manifest],
    dest: &Path,
    filter: &str,
) -> anyhow::Result<uuid::Uuid> {
    checkpoints
        .iter()
        .find(|m| vm_matches(m, Some(filter)))
        .map(|m| m.vm.uuid)
        .ok_or_else(|| no_checkpoints_of(filter, dest))
}

/// Prints what a prune did, as `rewind prune` does.
pub(crate) fn say_pruned(
    out: &mut dyn Write,
    decisions: &[rewind_core::store::prune::PruneDecision],
    gc: Option<rewind_core::store::gc::GcReport>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        #[derive(Serialize)]
        struct PruneJson<'a> {
            dry_run: bool,
            decisions: &'a [rewind_core::store::prune::PruneDecision],
            gc: Option<rewind_core::store::gc::GcReport>,
        }
        serde_json::to_writer_pretty(
            &mut *out,
            &PruneJson {
                dry_run,
                decisions,
                gc,
            },
        )?;
        writeln!(out)?;
        return Ok(());
    }
    for d in decisions {
        let reasons: Vec<String> = d
            .reasons
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        writeln!(
            out,
            "{} {} {} ({}){}",
            if d.keep {
                "keep  "
            } else if dry_run {
                "would remove"
            } else {
                "remove"
            },
            d.vm,
            d.id,
            local(d.time),
            if reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", reasons.join(", "))
            }
        )?;
    }
    let removed = decisions.iter().filter(|d| !d.keep).count();
    match gc {
        Some(gc) => writeln!(
            out,
            "Removed {removed} checkpoint(s); freed {} in {} chunk(s).",
            human_bytes(gc.bytes_removed),
            gc.chunks_removed
        )?,
        None => writeln!(
            out,
            "Dry run: would remove {removed} checkpoint(s); nothing was changed."
        )?,
    }
    Ok(())
}

/// `rewind gc --in DEST [--json]`.
pub fn gc(out: &mut dyn Write, dest: &Path, json: bool) -> anyhow::Result<()> {
    let store = open_store(dest)?;
    let report = store.gc(&job_control())?;
    say_collected(out, &report, json)
}

/// Prints what a garbage collection did, as `rewind gc` does.
pub(crate) fn say_collected(
    out: &mut dyn Write,
    report: &rewind_core::store::gc::GcReport,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "Removed {} unused chunk(s) ({}); {} chunk(s) in use.",
            report.chunks_removed,
            human_bytes(report.bytes_removed),
            report.chunks_kept
        )?;
    }
    Ok(())
}

/// The checkpoint `id` (or `latest`) of VM `vm` (name or UUID) in `store`.
pub(crate) fn find_checkpoint(
    store: &Store,
    dest: &Path,
    vm: &str,
    id: &str,
) -> anyhow::Result<Manifest> {
    find_in(store.catalog()?.checkpoints, dest, vm, id)
}

/// The checkpoint `id` (or `latest`) of VM `vm` (name or UUID) among `checkpoints` of the
/// store at `dest`.
pub(crate) fn find_in(
    checkpoints: Vec<Manifest>,
    dest: &Path,
    vm: &str,
    id: &str,
) -> anyhow::Result<Manifest> {
    let of_vm: Vec<Manifest> = checkpoints
        .into_iter()
        .filter(|m| vm_matches(m, Some(vm)))
        .collect();
    if of_vm.is_empty() {
        return Err(no_checkpoints_of(vm, dest));
    }
    let found = if id == "latest" {
        of_vm.last().cloned()
    } else {
        of_vm.iter().find(|m| m.id == id).cloned()
    };
    found.ok_or_else(|| {
        crate::exit::not_found(format!(
            "VM {vm:?} has no checkpoint {id:?} in {}; its checkpoints are {} (or say `latest`)",
            dest.display(),
            of_vm
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The store at `dest` holds no checkpoint of VM `vm`.
fn no_checkpoints_of(vm: &str, dest: &Path) -> anyhow::Error {
    crate::exit::not_found(format!(
        "no checkpoints of a VM named {vm:?} in {}; `rewind checkpoints --in {}` lists what it holds",
        dest.display(),
        dest.display()
    ))
}

/// What `export` asks.
pub struct ExportAsk<'a> {
    /// The store's folder or URL, or a destination's name.
    pub dest: &'a Path,
    /// The VM (name or UUID, as in the store).
    pub vm: &'a str,
    /// The checkpoint's id or `latest`.
    pub checkpoint: &'a str,
    /// The disk's target.
    pub disk: &'a str,
    /// The image file to create.
    pub file: &'a Path,
    /// Its format.
    pub format: rewind_core::restore::ImageFormat,
    /// Print JSON.
    pub json: bool,
}

/// `rewind export VM CHECKPOINT --from DEST --disk TARGET --out FILE [--format qcow2|raw]`.
pub fn export(out: &mut dyn Write, ask: &ExportAsk<'_>) -> anyhow::Result<()> {
    let store = open_store(ask.dest)?;
    let m = find_checkpoint(&store, ask.dest, ask.vm, ask.checkpoint)?;
    // Ctrl-C cancels: the half-written image is removed.
    let control = Interrupt::install()?.next_control();
    let reporter = Progress::start(&m.vm.name, control.clone());
    let result =
        rewind_core::restore::export_disk(&store, &m, ask.disk, ask.file, ask.format, &control);
    drop(reporter);
    let data_bytes = result?;
    let exported = Exported {
        checkpoint: &m.id,
        vm: &m.vm.name,
        disk: ask.disk,
        file: ask.file,
        format: ask.format,
        data_bytes,
    };
    say_exported(out, &exported, ask.json)
}

/// What an export wrote (`rewind export --json`, documented in CLI.md).
#[derive(Serialize)]
pub(crate) struct Exported<'a> {
    /// The checkpoint's id.
    pub checkpoint: &'a str,
    /// The VM's name.
    pub vm: &'a str,
    /// The disk's target.
    pub disk: &'a str,
    /// The image written.
    pub file: &'a Path,
    /// Its format.
    #[serde(serialize_with = "format_name")]
    pub format: rewind_core::restore::ImageFormat,
    /// The bytes of data in it.
    pub data_bytes: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `serialize_with` passes a reference
fn format_name<S: serde::Serializer>(
    format: &rewind_core::restore::ImageFormat,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(format.name())
}

/// Prints what an export wrote, as `rewind export` does.
pub(crate) fn say_exported(
    out: &mut dyn Write,
    exported: &Exported<'_>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return write_json(out, exported);
    }
    writeln!(
        out,
        "Wrote disk {} of checkpoint {} of {} to {} ({}, {} of data).",
        exported.disk,
        exported.checkpoint,
        exported.vm,
        exported.file.display(),
        exported.format.name(),
        human_bytes(exported.data_bytes)
    )?;
    Ok(())
}
