//! The command line: argument parsing and the text/JSON front end over `rewind-core`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use rewind_core::libvirt::{DEFAULT_URI, Hypervisor};
use rewind_core::store::retention::KeepRules;
use rewind_core::units::human_bytes;
use rewind_core::vm::{Disk, Firmware, VmInfo};

use crate::store_cli;

/// Checkpoints and one-click restore for the virtual machines of your workstation.
///
/// Without a command, opens the Rewind window.
#[derive(Debug, Parser)]
#[command(name = "rewind", version, about, long_about = None)]
pub struct Args {
    /// libvirt connection URI, e.g. `qemu:///system` or `qemu+ssh://user@host/system`
    /// [default: `qemu:///system`]
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "URI",
        env = "LIBVIRT_DEFAULT_URI"
    )]
    pub connect: Option<String>,

    /// Start in the tray without showing the window (what starting at login does)
    #[arg(long)]
    pub minimized: bool,

    /// When a store is busy (another Rewind process holds it, e.g. removing unused data),
    /// fail at once with exit code 4 instead of waiting for it
    #[arg(long, global = true)]
    pub no_wait: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Args {
    /// The libvirt URI to use.
    pub fn uri(&self) -> String {
        self.connect
            .clone()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_URI.to_owned())
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the virtual machines with their state, disks, firmware and TPM
    Vms {
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md) instead of a table
        #[arg(long)]
        json: bool,
    },

    /// Create a backup store in a folder (new or empty), optionally encrypted
    Init {
        /// The folder, e.g. on a removable drive: /media/me/backup/rewind
        dest: PathBuf,
        /// Encrypt the store with a passphrase (asked for, or read from `REWIND_PASSPHRASE`)
        #[arg(long)]
        encrypt: bool,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Take a checkpoint of a running VM now (full the first time, then incremental)
    Checkpoint {
        /// The VMs (names or UUIDs), one after the other
        #[arg(required = true)]
        vm: Vec<String>,
        /// The store's folder (or `ssh://` URL, or a configured destination's name); a new,
        /// unencrypted store is created there if there is none
        #[arg(long = "to", value_name = "DEST")]
        store: PathBuf,
        /// Print the new checkpoints as a JSON array (records as in `rewind checkpoints --json`)
        #[arg(long)]
        json: bool,
        /// Save memory and device state too (running VMs only): restoring the checkpoint
        /// resumes the VM where it was instead of booting it. The VM pauses for a moment
        #[arg(long)]
        full_state: bool,
    },

    /// List the checkpoints in a store, of every VM or of one
    Checkpoints {
        /// Only this VM (name or UUID)
        vm: Option<String>,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Check that every checkpoint in a store is intact; exits with 1 if anything is damaged
    Verify {
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Only check that every chunk is present (much faster; no re-reading of data)
        #[arg(long)]
        quick: bool,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Remove old checkpoints by keep rules (per VM), then the data only they used
    Prune {
        /// Only this VM (name or UUID)
        vm: Option<String>,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Keep the N newest checkpoints
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest checkpoint of each of the last N hours that have one
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_hourly: u32,
        /// Keep the newest checkpoint of each of the last N days that have one
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: u32,
        /// Keep the newest checkpoint of each of the last N weeks that have one
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_weekly: u32,
        /// Keep the newest checkpoint of each of the last N months that have one
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_monthly: u32,
        /// Keep the newest checkpoint of each of the last N years that have one
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_yearly: u32,
        /// Only say what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Write one disk of a checkpoint to a standalone image file (qcow2 or raw)
    Export {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "from", value_name = "DEST")]
        store: PathBuf,
        /// The disk's target, e.g. `vda` (`rewind checkpoints --json` lists them)
        #[arg(long)]
        disk: String,
        /// The image file to create (it must not exist)
        #[arg(long)]
        out: PathBuf,
        /// Image format
        #[arg(long, value_enum, default_value_t = ExportFormat::Qcow2)]
        format: ExportFormat,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Bring a VM back to a checkpoint: in place (undoable), or as a new VM beside it
    ///
    /// In place, the VM is shut down, a safety checkpoint of its current state is taken,
    /// only the chunks that differ are written back, everything written is read back and
    /// checked, then UEFI variables, TPM state and definition are restored and the VM starts
    /// again if it was running. `rewind undo-restore` goes back to the safety checkpoint.
    Restore {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "from", value_name = "DEST")]
        store: PathBuf,
        /// Restore as a new VM of this name (new UUID and MAC addresses) beside the original
        #[arg(long = "as", value_name = "NEW_NAME")]
        as_name: Option<String>,
        /// Folder for the new VM's disks [default: where the original's disks were]
        #[arg(
            long,
            value_name = "DIR",
            requires = "as_name",
            conflicts_with = "pool"
        )]
        disk_dir: Option<PathBuf>,
        /// Storage pool for the disks of a new VM, or of the VM brought back onto another
        /// host with --connect URI [default there: `default`]
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        #[command(flatten)]
        how: RestoreHow,
        /// Take no safety checkpoint first (the restore then cannot be undone)
        #[arg(long)]
        no_safety_checkpoint: bool,
    },

    /// Undo the last restore of a VM: restore its newest safety checkpoint
    UndoRestore {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "from", value_name = "DEST")]
        store: PathBuf,
        #[command(flatten)]
        how: RestoreHow,
    },

    /// Protect a VM: checkpoints by themselves at an interval into a destination, thinned out
    /// by keep rules (run `rewind daemon` or the window to have them taken)
    Protect {
        /// The VM (name or UUID)
        vm: String,
        /// Where the checkpoints go: a folder (a store is created there if it is new or
        /// empty; a removable drive is recognised by its store wherever it is mounted)
        #[arg(long = "to", value_name = "DEST")]
        dest: String,
        /// How often: 15m, 2h, 1d, 1w … (5 minutes to 1 week) [default: 15m]
        #[arg(long, value_name = "INTERVAL")]
        every: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Take one early once the VM has written this much since the last (e.g. 2G)
        #[arg(long, value_name = "SIZE")]
        activity: Option<String>,
        /// Do not freeze the guest's file systems (checkpoints are then crash-consistent)
        #[arg(long)]
        no_quiesce: bool,
        /// Every checkpoint with memory and device state too, so that restoring one resumes
        /// the VM where it was (it pauses for a moment at each)
        #[arg(long, conflicts_with = "full_state_every")]
        full_state: bool,
        /// Disk-only checkpoints, and one with memory too this often (e.g. 1h)
        #[arg(long, value_name = "INTERVAL")]
        full_state_every: Option<String>,
        /// File with the passphrase of an encrypted store (for unattended checkpoints)
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Stop protecting a VM (its checkpoints stay)
    Unprotect {
        /// The VM (name or UUID)
        vm: String,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Pause protection of one VM, or of all (until resumed, or for a while)
    Pause {
        /// The VM [default: all]
        vm: Option<String>,
        /// Pause all protection for one hour (it resumes by itself)
        #[arg(long, conflicts_with_all = ["vm", "until_tomorrow"])]
        for_an_hour: bool,
        /// Pause all protection until 06:00 tomorrow, local time (it resumes by itself)
        #[arg(long, conflicts_with = "vm")]
        until_tomorrow: bool,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Resume protection of one VM, or of all
    Resume {
        /// The VM [default: all]
        vm: Option<String>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Each protected VM: its last checkpoint, the next one, whether its destinations are there
    Status {
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// What every scheduled checkpoint did, of every VM or of one
    History {
        /// Only this VM (name or UUID)
        vm: Option<String>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Run this user's own scheduler without a window (the older way: the protection service
    /// replaces it)
    Daemon,

    /// Show Rewind's tray icon and send its desktop notifications, as a client of the
    /// protection service (started at login; the window is opened from its menu)
    Tray,

    /// Run the protection service, as root: it does every protection job, and the window,
    /// the tray and the CLI of users in the `libvirt` group are its clients (its systemd
    /// unit, rewind.service, runs this)
    Service,

    /// Remove data that no checkpoint uses any more (prune does this itself)
    Gc {
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// What a checkpoint's disks hold, read straight from the store: without PATH, each
    /// disk's volumes with their size, file system and label; with PATH, a folder's entries
    /// or a file
    ///
    /// A PATH starts with its volume: its partition number (`p2/Users/me`), its label
    /// (`Windows/Users/me`), and for a disk other than the first its target (`vdb/p1/home`).
    Files {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// A folder or file, volume first (`p2/Users/me`, `Windows/Users/me`, `vdb/p1`)
        path: Option<String>,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Search below PATH (or every volume) for names holding NAME, ignoring case; `*`
        /// and `?` work as in a shell
        #[arg(long, value_name = "NAME")]
        find: Option<String>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Restore files and folders from a checkpoint into a folder, read straight from the
    /// store: their content, links and modification times; nothing is written over, and a
    /// cancel (Ctrl-C) leaves the folder as it was
    RestoreFiles {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// Files or folders, volume first (`p2/Users/me/thesis.docx`), as `rewind files`
        /// shows them
        #[arg(required = true)]
        paths: Vec<String>,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "from", value_name = "DEST")]
        store: PathBuf,
        /// The folder to restore into (each PATH goes in under its own name)
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// The files that changed in a checkpoint since the one before it (or since another),
    /// by the file systems' own records: added, modified, deleted
    Changes {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "in", value_name = "DEST")]
        store: PathBuf,
        /// Compare with this checkpoint (id or `latest`) instead of the one before
        #[arg(long, value_name = "CHECKPOINT")]
        since: Option<String>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Run a shut-off VM straight from a checkpoint: it starts within seconds, its disks
    /// read from the store through the protection service and its writes kept aside, while
    /// its own disks stay as they are. Then keep it (`--keep`: its disks are copied to new
    /// files while it runs, and it is defined on them) or discard it (`--discard`: it is
    /// turned off and is as before)
    Run {
        /// The VM (name or UUID)
        vm: String,
        /// The checkpoint's id, or `latest` (to start a run)
        checkpoint: Option<String>,
        /// The store's folder or a configured destination's name (to start a run)
        #[arg(long = "from", value_name = "DEST")]
        store: Option<PathBuf>,
        /// Keep the VM that runs from a checkpoint
        #[arg(long, conflicts_with_all = ["discard", "checkpoint", "store"])]
        keep: bool,
        /// Discard the run: turn the VM off and drop what it wrote
        #[arg(long, conflicts_with_all = ["checkpoint", "store"])]
        discard: bool,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Prove that a checkpoint boots: start a throwaway copy of it straight from the store
    /// (its own name, no network, no host devices, its disks read-only from the store with
    /// writes going to temporary overlays), wait for its guest agent to answer or its
    /// screen to settle on a login screen or desktop, keep a thumbnail of its screen, and
    /// remove the copy. Exits 0 when it booted, 1 with the reason when it did not
    BootCheck {
        /// The VM (name or UUID, as in the store)
        vm: String,
        /// The checkpoint's id, or `latest`
        checkpoint: String,
        /// The store's folder, `ssh://` URL, or a configured destination's name
        #[arg(long = "from", value_name = "DEST")]
        store: PathBuf,
        /// The longest wait for a sign of a started system, in seconds [default: 600]
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Print JSON (its format: /usr/share/doc/rewind/CLI.md)
        #[arg(long)]
        json: bool,
    },

    /// Write the man pages or the shell completions the package installs (for packaging)
    #[command(hide = true)]
    Generate(crate::generate::GenerateArgs),
}

impl Command {
    /// Whether it always runs in this process, never through the protection service: the
    /// processes themselves.
    fn runs_here(&self) -> bool {
        match self {
            Self::Daemon | Self::Tray | Self::Service | Self::Generate(_) => true,
            Self::Files { .. }
            | Self::RestoreFiles { .. }
            | Self::Changes { .. }
            | Self::BootCheck { .. }
            | Self::Run { .. }
            | Self::Vms { .. }
            | Self::Init { .. }
            | Self::Checkpoint { .. }
            | Self::Checkpoints { .. }
            | Self::Verify { .. }
            | Self::Prune { .. }
            | Self::Export { .. }
            | Self::Restore { .. }
            | Self::UndoRestore { .. }
            | Self::Protect { .. }
            | Self::Unprotect { .. }
            | Self::Pause { .. }
            | Self::Resume { .. }
            | Self::Status { .. }
            | Self::History { .. }
            | Self::Gc { .. } => false,
        }
    }

    /// Whether `--json` was asked for: then stdout holds one JSON document, errors
    /// included.
    pub fn json(&self) -> bool {
        match self {
            Self::Vms { json }
            | Self::Init { json, .. }
            | Self::Checkpoint { json, .. }
            | Self::Checkpoints { json, .. }
            | Self::Verify { json, .. }
            | Self::Prune { json, .. }
            | Self::Export { json, .. }
            | Self::Protect { json, .. }
            | Self::Unprotect { json, .. }
            | Self::Pause { json, .. }
            | Self::Resume { json, .. }
            | Self::Status { json }
            | Self::History { json, .. }
            | Self::Gc { json, .. }
            | Self::Files { json, .. }
            | Self::RestoreFiles { json, .. }
            | Self::Changes { json, .. }
            | Self::Run { json, .. }
            | Self::BootCheck { json, .. } => *json,
            Self::Restore { how, .. } | Self::UndoRestore { how, .. } => how.json,
            Self::Daemon | Self::Tray | Self::Service | Self::Generate(_) => false,
        }
    }
}

/// `--keep-*` of `rewind protect`.
#[derive(Debug, clap::Args)]
pub struct KeepArgs {
    /// Keep the N newest checkpoints
    #[arg(long = "keep-last", value_name = "N", default_value_t = 0)]
    last: u32,
    /// Keep the newest of each of the last N hours
    #[arg(long = "keep-hourly", value_name = "N", default_value_t = 0)]
    hourly: u32,
    /// Keep the newest of each of the last N days
    #[arg(long = "keep-daily", value_name = "N", default_value_t = 0)]
    daily: u32,
    /// Keep the newest of each of the last N weeks
    #[arg(long = "keep-weekly", value_name = "N", default_value_t = 0)]
    weekly: u32,
    /// Keep the newest of each of the last N months
    #[arg(long = "keep-monthly", value_name = "N", default_value_t = 0)]
    monthly: u32,
    /// Keep the newest of each of the last N years
    #[arg(long = "keep-yearly", value_name = "N", default_value_t = 0)]
    yearly: u32,
}

impl KeepArgs {
    fn rules(&self) -> KeepRules {
        KeepRules {
            last: self.last,
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
        }
    }
}

/// Options shared by `restore` and `undo-restore`.
#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)] // command-line switches, each its own flag
pub struct RestoreHow {
    /// Leave the VM shut off afterwards (by default it starts again if it was running)
    #[arg(long)]
    no_start: bool,
    /// Pull the plug instead of asking the guest to shut down (unsaved work in it is lost)
    #[arg(long, conflicts_with = "save_state")]
    force_off: bool,
    /// Instead of shutting a running VM down, save its memory and devices into the safety
    /// checkpoint: nothing of the running session is lost, and undoing the restore resumes
    /// the VM where it was
    #[arg(long)]
    save_state: bool,
    /// Seconds the guest gets to shut down before it is forced off
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    shutdown_timeout: u64,
    /// Of a full-state checkpoint, put back only the disks, UEFI variables and TPM state and
    /// boot the VM from them, instead of resuming it where it was from its saved memory
    #[arg(long)]
    disk_only: bool,
    /// Print what was done as JSON (its format: /usr/share/doc/rewind/CLI.md)
    #[arg(long)]
    json: bool,
}

impl RestoreHow {
    fn options(&self, safety_checkpoint: bool) -> rewind_core::restore::RestoreOptions {
        rewind_core::restore::RestoreOptions {
            stop: if self.save_state {
                rewind_core::libvirt::lifecycle::StopMode::Save
            } else {
                crate::restore_cli::stop_mode(self.force_off, self.shutdown_timeout)
            },
            safety_checkpoint,
            start: self.no_start.then_some(false),
            disk_only: self.disk_only,
        }
    }
}

/// `rewind export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// qcow2: only the data is allocated
    Qcow2,
    /// raw: a sparse file
    Raw,
}

impl ExportFormat {
    fn image(self) -> rewind_core::restore::ImageFormat {
        match self {
            Self::Qcow2 => rewind_core::restore::ImageFormat::Qcow2,
            Self::Raw => rewind_core::restore::ImageFormat::Raw,
        }
    }
}

/// Runs a subcommand, writing its output to `out`.
#[allow(clippy::too_many_lines)] // one short arm per command
pub fn run(args: &Args, command: &Command, out: &mut dyn Write) -> anyhow::Result<()> {
    store_cli::fail_when_busy(args.no_wait);
    if let Some(done) = through_service(args, command, out) {
        return done;
    }
    match command {
        Command::Vms { json } => {
            let hv = Hypervisor::connect(&args.uri())?;
            let vms = hv.list_vms()?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &vms).context("could not write JSON")?;
                writeln!(out)?;
            } else {
                write_vm_table(out, hv.uri(), &vms)?;
            }
        }
        Command::Init {
            dest,
            encrypt,
            json,
        } => store_cli::init(out, dest, *encrypt, *json)?,
        Command::Checkpoint {
            vm,
            store,
            json,
            full_state,
        } => {
            store_cli::checkpoint(out, &args.uri(), vm, store, *json, *full_state)?;
        }
        Command::Checkpoints { vm, store, json } => {
            store_cli::checkpoints(out, store, vm.as_deref(), *json)?;
        }
        Command::Verify { store, quick, json } => store_cli::verify(out, store, *quick, *json)?,
        Command::Prune {
            vm,
            store,
            dry_run,
            json,
            ..
        } => {
            let rules = prune_rules(command).unwrap_or_default();
            store_cli::prune(out, store, vm.as_deref(), &rules, *dry_run, *json)?;
        }
        Command::Gc { store, json } => store_cli::gc(out, store, *json)?,
        Command::Files { .. } | Command::RestoreFiles { .. } | Command::Changes { .. } => {
            files_command(out, None, command)?;
        }
        Command::BootCheck { .. } => {
            if let Some(done) = boot_check_command(args, out, None, command) {
                done?;
            }
        }
        Command::Run { .. } => anyhow::bail!(
            "rewind run needs the protection service, which serves the checkpoint to the VM \
             for as long as it runs from it: start it (`systemctl start rewind`, or \
             `rewind service` as root)"
        ),
        Command::Export { .. } => {
            if let Some(ask) = export_ask(command) {
                store_cli::export(out, &ask)?;
            }
        }
        Command::Restore {
            vm,
            checkpoint,
            store,
            as_name,
            disk_dir,
            pool,
            how,
            no_safety_checkpoint,
        } => {
            let restore = crate::restore_cli::RestoreArgs {
                dest: store,
                vm,
                checkpoint,
                as_name: as_name.as_deref(),
                disk_dir: disk_dir.as_deref(),
                pool: pool.as_deref(),
                options: how.options(!*no_safety_checkpoint),
                json: how.json,
            };
            crate::restore_cli::restore(out, &args.uri(), &restore)?;
        }
        Command::Protect { .. } => {
            if let Some(protect) = protect_args(args, command) {
                crate::protect_cli::protect(out, &args.uri(), &protect)?;
            }
        }
        Command::Unprotect { vm, json } => crate::protect_cli::unprotect(out, vm, *json)?,
        Command::Pause {
            vm,
            for_an_hour,
            until_tomorrow,
            json,
        } => {
            let pause = pause_asked(*for_an_hour, *until_tomorrow);
            crate::protect_cli::set_paused(out, vm.as_deref(), Some(pause), *json)?;
        }
        Command::Resume { vm, json } => {
            crate::protect_cli::set_paused(out, vm.as_deref(), None, *json)?;
        }
        Command::Status { json } => crate::protect_cli::status(out, *json)?,
        Command::History { vm, json } => {
            crate::protect_cli::show_history(out, vm.as_deref(), *json)?;
        }
        Command::Daemon => crate::daemon::run()?,
        Command::Tray => crate::tray_app::run()?,
        Command::Service => crate::service::run(&args.uri())?,
        Command::Generate(generate) => crate::generate::run(out, Args::command(), generate)?,
        Command::UndoRestore { vm, store, how } => {
            let restore = crate::restore_cli::RestoreArgs {
                dest: store,
                vm,
                checkpoint: "latest",
                as_name: None,
                disk_dir: None,
                pool: None,
                options: how.options(true),
                json: how.json,
            };
            crate::restore_cli::undo_restore(out, &args.uri(), &restore)?;
        }
    }
    Ok(())
}

/// What `rewind protect` asks for (`None` for another command).
fn protect_args<'a>(
    args: &'a Args,
    command: &'a Command,
) -> Option<crate::protect_cli::ProtectArgs<'a>> {
    let Command::Protect {
        vm,
        dest,
        every,
        keep,
        activity,
        no_quiesce,
        full_state,
        full_state_every,
        passphrase_file,
        json,
    } = command
    else {
        return None;
    };
    Some(crate::protect_cli::ProtectArgs {
        vm,
        dest,
        every: every.as_deref(),
        keep: keep.rules(),
        activity: activity.as_deref(),
        no_quiesce: *no_quiesce,
        full_state: *full_state,
        full_state_every: full_state_every.as_deref(),
        passphrase_file: passphrase_file.as_deref(),
        uri: args.connect.as_deref().filter(|u| !u.trim().is_empty()),
        json: *json,
    })
}

/// The pause `rewind pause` asks for.
fn pause_asked(for_an_hour: bool, until_tomorrow: bool) -> rewind_core::pause::Pause {
    if for_an_hour {
        rewind_core::pause::Pause::ForAnHour
    } else if until_tomorrow {
        rewind_core::pause::Pause::UntilTomorrow
    } else {
        rewind_core::pause::Pause::UntilResumed
    }
}

/// Runs `command` through the protection service if it is one that goes there and the
/// service runs (or must run: for a user who is not root). `None`: run it here.
///
/// The VM commands always go there. The store commands go there for the service's own
/// destinations (whose passphrases only it holds); any other store is read here, as this
/// user, also when the service does not run.
fn through_service(
    args: &Args,
    command: &Command,
    out: &mut dyn Write,
) -> Option<anyhow::Result<()>> {
    use crate::service_cli::{self as remote, RestoreAsk, Route};
    if command.runs_here() {
        return None;
    }
    // Store commands read any other store here: only the service's own ones need it.
    let goes = !matches!(
        command,
        Command::Init { .. }
            | Command::Verify { .. }
            | Command::Checkpoints { .. }
            | Command::Prune { .. }
            | Command::Gc { .. }
            | Command::Export { .. }
            | Command::Files { .. }
            | Command::RestoreFiles { .. }
            | Command::Changes { .. }
            | Command::BootCheck { .. }
    );
    let mut session = match remote::route(args.connect.as_deref()) {
        Ok(Route::Direct) => return None,
        Ok(Route::Service(session)) => session,
        // A store command reads any other store here: only the service's own ones need it.
        Err(_) if !goes => return None,
        Err(e) => return Some(Err(e)),
    };
    let session = &mut *session;
    Some(match command {
        Command::Init {
            dest,
            encrypt,
            json,
        } => return remote::init(out, session, dest, *encrypt, *json),
        Command::Verify { .. }
        | Command::Checkpoints { .. }
        | Command::Prune { .. }
        | Command::Gc { .. }
        | Command::Export { .. }
        | Command::Files { .. }
        | Command::RestoreFiles { .. }
        | Command::Changes { .. } => return store_through_service(session, command, out),
        Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Status { .. }
        | Command::History { .. }
        | Command::Protect { .. }
        | Command::Unprotect { .. } => protection_through_service(args, session, command, out),
        Command::Vms { json } => remote::vms(out, session, *json, |out, uri, vms| {
            Ok(write_vm_table(out, uri, vms)?)
        }),
        Command::Checkpoint {
            vm,
            store,
            json,
            full_state,
        } => remote::checkpoint(out, session, vm, store, *json, *full_state),
        Command::Restore {
            vm,
            checkpoint,
            store,
            as_name,
            disk_dir,
            pool,
            how,
            no_safety_checkpoint,
        } => remote::restore(
            out,
            session,
            &RestoreAsk {
                dest: store,
                vm,
                checkpoint: Some(checkpoint),
                as_name: as_name.as_deref(),
                disk_dir: disk_dir.as_deref(),
                pool: pool.as_deref(),
                options: how.options(!*no_safety_checkpoint),
                json: how.json,
            },
        ),
        Command::UndoRestore { vm, store, how } => remote::restore(
            out,
            session,
            &RestoreAsk {
                dest: store,
                vm,
                checkpoint: None,
                as_name: None,
                disk_dir: None,
                pool: None,
                options: how.options(true),
                json: how.json,
            },
        ),
        Command::BootCheck { .. } => boot_check_command(args, out, Some(session), command)?,
        Command::Run { .. } => run_command(out, session, command)?,
        Command::Daemon | Command::Tray | Command::Service | Command::Generate(_) => {
            return None;
        }
    })
}

/// `rewind run` through the service's `session`; `None` for any other command.
fn run_command(
    out: &mut dyn Write,
    session: &mut crate::service_cli::Session,
    command: &Command,
) -> Option<anyhow::Result<()>> {
    let Command::Run {
        vm,
        checkpoint,
        store,
        keep,
        discard,
        json,
    } = command
    else {
        return None;
    };
    Some(crate::service_cli::run(
        out,
        session,
        &crate::service_cli::RunAsk {
            vm,
            checkpoint: checkpoint.as_deref(),
            dest: store.as_deref(),
            keep: *keep,
            discard: *discard,
            json: *json,
        },
    ))
}

/// `rewind boot-check`, through the service's `session` when there is one; `None` for any
/// other command.
fn boot_check_command(
    args: &Args,
    out: &mut dyn Write,
    session: Option<&mut crate::service_cli::Session>,
    command: &Command,
) -> Option<anyhow::Result<()>> {
    let Command::BootCheck {
        vm,
        checkpoint,
        store,
        timeout,
        json,
    } = command
    else {
        return None;
    };
    Some(crate::bootcheck_cli::boot_check(
        out,
        session,
        &crate::bootcheck_cli::BootCheckAsk {
            dest: store,
            vm,
            checkpoint,
            uri: &args.uri(),
            timeout_secs: *timeout,
            json: *json,
        },
    ))
}

/// A protection command (`protect`, `unprotect`, `pause`, `resume`, `status`, `history`)
/// on the service's configuration and history.
fn protection_through_service(
    args: &Args,
    session: &mut crate::service_cli::Session,
    command: &Command,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use crate::service_cli as remote;
    match command {
        Command::Pause {
            vm,
            for_an_hour,
            until_tomorrow,
            json,
        } => remote::set_paused(
            out,
            session,
            vm.as_deref(),
            Some(pause_asked(*for_an_hour, *until_tomorrow)),
            *json,
        ),
        Command::Resume { vm, json } => {
            remote::set_paused(out, session, vm.as_deref(), None, *json)
        }
        Command::Status { json } => remote::status(out, session, *json),
        Command::History { vm, json } => remote::history(out, session, vm.as_deref(), *json),
        Command::Protect { .. } => protect_args(args, command)
            .map_or(Ok(()), |protect| remote::protect(out, session, &protect)),
        Command::Unprotect { vm, json } => remote::unprotect(out, session, vm, *json),
        _ => Ok(()),
    }
}

/// A store command for one of the service's destinations, by the service. `None`: the
/// store is not one of them (it is read here).
fn store_through_service(
    session: &mut crate::service_cli::Session,
    command: &Command,
    out: &mut dyn Write,
) -> Option<anyhow::Result<()>> {
    use crate::service_cli::{self as remote, PruneAsk};
    match command {
        Command::Verify { store, quick, json } => {
            remote::verify(out, session, store, *quick, *json)
        }
        Command::Checkpoints { vm, store, json } => {
            remote::checkpoints(out, session, store, vm.as_deref(), *json)
        }
        Command::Prune {
            vm,
            store,
            dry_run,
            json,
            ..
        } => {
            let ask = PruneAsk {
                dest: store,
                vm: vm.as_deref(),
                rules: prune_rules(command)?,
                dry_run: *dry_run,
                json: *json,
            };
            remote::prune(out, session, &ask)
        }
        Command::Gc { store, json } => remote::gc(out, session, store, *json),
        Command::Export { .. } => remote::export(out, session, &export_ask(command)?),
        // The service reads its own destinations; any other store is read here.
        Command::Files { .. } | Command::RestoreFiles { .. } | Command::Changes { .. } => {
            Some(files_command(out, Some(session), command))
        }
        _ => None,
    }
}

/// `rewind files`, `restore-files` or `changes`: through the service's `session` for its
/// own destinations, else here.
fn files_command(
    out: &mut dyn Write,
    session: Option<&mut crate::service_cli::Session>,
    command: &Command,
) -> anyhow::Result<()> {
    use crate::files_cli::{self as files, CheckpointAsk, FilesAsk};
    match command {
        Command::Files {
            vm,
            checkpoint,
            path,
            store,
            find,
            json,
        } => files::files(
            out,
            session,
            &FilesAsk {
                dest: store,
                vm,
                checkpoint,
                path: path.as_deref(),
                find: find.as_deref(),
                json: *json,
            },
        ),
        Command::RestoreFiles {
            vm,
            checkpoint,
            paths,
            store,
            to,
            json,
        } => files::restore_files(
            out,
            session,
            &CheckpointAsk {
                dest: store,
                vm,
                checkpoint,
                json: *json,
            },
            paths,
            to,
        ),
        Command::Changes {
            vm,
            checkpoint,
            store,
            since,
            json,
        } => files::changes(
            out,
            session,
            &CheckpointAsk {
                dest: store,
                vm,
                checkpoint,
                json: *json,
            },
            since.as_deref(),
        ),
        _ => Ok(()),
    }
}

/// What `rewind export` asks (`None` for another command).
fn export_ask(command: &Command) -> Option<store_cli::ExportAsk<'_>> {
    let Command::Export {
        vm,
        checkpoint,
        store,
        disk,
        out,
        format,
        json,
    } = command
    else {
        return None;
    };
    Some(store_cli::ExportAsk {
        dest: store,
        vm,
        checkpoint,
        disk,
        file: out,
        format: format.image(),
        json: *json,
    })
}

/// The keep rules of `rewind prune` (`None` for another command).
fn prune_rules(command: &Command) -> Option<KeepRules> {
    let Command::Prune {
        keep_last,
        keep_hourly,
        keep_daily,
        keep_weekly,
        keep_monthly,
        keep_yearly,
        ..
    } = command
    else {
        return None;
    };
    Some(KeepRules {
        last: *keep_last,
        hourly: *keep_hourly,
        daily: *keep_daily,
        weekly: *keep_weekly,
        monthly: *keep_monthly,
        yearly: *keep_yearly,
    })
}

/// How a column of the `rewind vms` table gets a VM's cell.
type Cell = fn(&VmInfo) -> String;

/// The `rewind vms` table's columns: title, and how to get a VM's cell.
const COLUMNS: [(&str, Cell); 5] = [
    ("NAME", |v| v.name.clone()),
    ("STATE", |v| v.state.label().to_owned()),
    ("vCPUS", |v| v.vcpus.to_string()),
    ("MEMORY", |v| human_bytes(v.memory_bytes)),
    ("FIRMWARE", firmware_label),
];

/// The `rewind vms` table: one row per VM, then one indented line per disk.
fn write_vm_table(out: &mut dyn Write, uri: &str, vms: &[VmInfo]) -> std::io::Result<()> {
    if vms.is_empty() {
        writeln!(
            out,
            "No virtual machines on {uri}. Create one with virt-manager or virt-install, \
             or connect elsewhere with --connect URI."
        )?;
        return Ok(());
    }
    let widths: Vec<usize> = COLUMNS
        .iter()
        .map(|(title, cell)| {
            vms.iter()
                .map(|v| cell(v).chars().count())
                .chain([title.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let row = |out: &mut dyn Write, cells: &[String]| -> std::io::Result<()> {
        let mut line = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()) + 2,
            ));
        }
        writeln!(out, "{}", line.trim_end())
    };
    row(
        out,
        &COLUMNS
            .iter()
            .map(|(t, _)| (*t).to_owned())
            .collect::<Vec<_>>(),
    )?;
    for vm in vms {
        row(out, &COLUMNS.iter().map(|(_, f)| f(vm)).collect::<Vec<_>>())?;
        for disk in &vm.disks {
            writeln!(out, "    {}", disk_line(disk))?;
        }
    }
    Ok(())
}

fn firmware_label(vm: &VmInfo) -> String {
    let mut label = match &vm.firmware {
        Firmware::Bios => "BIOS".to_owned(),
        Firmware::Uefi { secure_boot, .. } if *secure_boot => "UEFI (Secure Boot)".to_owned(),
        Firmware::Uefi { .. } => "UEFI".to_owned(),
    };
    if let Some(tpm) = &vm.tpm {
        label.push_str(" + TPM");
        if let Some(v) = &tpm.version {
            label.push(' ');
            label.push_str(v);
        }
    }
    label
}

fn disk_line(disk: &Disk) -> String {
    let mut parts = vec![disk.target.clone()];
    parts.push(disk.format.clone().unwrap_or_else(|| "?".into()));
    if let Some(size) = disk.virtual_size_bytes {
        parts.push(human_bytes(size));
    }
    match disk.path() {
        Some(path) => parts.push(path.display().to_string()),
        None => parts.push(format!("{:?}", disk.source).to_lowercase()),
    }
    if let Err(why) = disk.protectable() {
        parts.push(format!("(not protected: {why})"));
    } else if !disk.backing_chain.is_empty() {
        parts.push(format!("(backed by {} image(s))", disk.backing_chain.len()));
    }
    parts.join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn vms_table_of_test_driver() {
        let args = Args::parse_from(["rewind", "--connect", "test:///default", "vms"]);
        let mut out = Vec::new();
        run(&args, args.command.as_ref().unwrap(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        assert!(
            header.starts_with("NAME") && header.contains("STATE"),
            "{text}"
        );
        let row = lines.next().unwrap();
        assert!(
            row.starts_with("test ") && row.contains("running"),
            "{text}"
        );
    }

    #[test]
    fn vms_json_of_test_driver() {
        let args = Args::parse_from(["rewind", "-c", "test:///default", "vms", "--json"]);
        let mut out = Vec::new();
        run(&args, args.command.as_ref().unwrap(), &mut out).unwrap();
        let vms: Vec<VmInfo> = serde_json::from_slice(&out).unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].name, "test");
    }
}
