//! `rewind restore` and `rewind undo-restore`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::bail;
use rewind_core::libvirt::Hypervisor;
use rewind_core::libvirt::lifecycle::StopMode;
use rewind_core::restore::{
    ComparedBy, DiskStorage, NewVm, RestoreOptions, RestoreReport, SAFETY_LABEL, restore_as_new,
    restore_in_place,
};
use rewind_core::store::{Manifest, Store};
use rewind_core::units::human_bytes;

use crate::progress_cli::Progress;
use crate::store_cli::{Interrupt, find_checkpoint, local, open_store, vm_matches};

/// What `rewind restore` was asked to do.
#[derive(Debug)]
pub struct RestoreArgs<'a> {
    /// The store's folder.
    pub dest: &'a Path,
    /// The VM, as in the store.
    pub vm: &'a str,
    /// A checkpoint id or `latest`.
    pub checkpoint: &'a str,
    /// Restore as a new VM of this name.
    pub as_name: Option<&'a str>,
    /// Where a new VM's disks go.
    pub disk_dir: Option<&'a Path>,
    /// The storage pool a new VM's disks go in (on another host: `default` unless given).
    pub pool: Option<&'a str>,
    /// Options of the restore.
    pub options: RestoreOptions,
    /// Print JSON.
    pub json: bool,
}

/// The stop mode from `--force-off` and `--shutdown-timeout`.
pub fn stop_mode(force_off: bool, shutdown_timeout_secs: u64) -> StopMode {
    if force_off {
        StopMode::Force
    } else {
        StopMode::Graceful {
            timeout_secs: shutdown_timeout_secs,
            force_after: true,
        }
    }
}

/// `rewind restore VM CHECKPOINT --from DEST [--as NEW_NAME] ...`.
pub fn restore(out: &mut dyn Write, uri: &str, args: &RestoreArgs<'_>) -> anyhow::Result<()> {
    let store = open_store(args.dest)?;
    let m = find_checkpoint(&store, args.dest, args.vm, args.checkpoint)?;
    run(out, uri, &store, &m, args)
}

/// `rewind undo-restore VM --from DEST`: restores the newest safety checkpoint.
pub fn undo_restore(out: &mut dyn Write, uri: &str, args: &RestoreArgs<'_>) -> anyhow::Result<()> {
    let store = open_store(args.dest)?;
    let safety = store
        .catalog()?
        .checkpoints
        .into_iter()
        .rfind(|m| vm_matches(m, Some(args.vm)) && m.labels.iter().any(|l| l == SAFETY_LABEL))
        .ok_or_else(|| {
            crate::exit::not_found(format!(
                "VM {:?} has no safety checkpoint in {}: nothing to undo (a restore that was asked for no safety checkpoint cannot be undone)",
                args.vm,
                args.dest.display()
            ))
        })?;
    run(out, uri, &store, &safety, args)
}

fn run(
    out: &mut dyn Write,
    uri: &str,
    store: &Store,
    m: &Manifest,
    args: &RestoreArgs<'_>,
) -> anyhow::Result<()> {
    let hv = Hypervisor::connect(uri)?;
    let work = super::store_cli::work_dir()?;
    // Ctrl-C cancels: the VM is put back as it was.
    let control = Interrupt::install()?.next_control();
    let label = args.as_name.unwrap_or(&m.vm.name);
    let reporter = Progress::start(label, control.clone());
    let local = hv.is_local();
    if local && args.as_name.is_none() && args.pool.is_some() {
        drop(reporter);
        bail!(
            "--pool is for restoring as a new VM (--as NAME) or onto another host (--connect URI); a restore in place writes the disks where they were"
        );
    }
    let result = if local && args.as_name.is_none() {
        restore_in_place(&hv, store, m, &args.options, work.path(), &control)
    } else {
        // As a new VM, or the VM itself onto another host (the workstation is gone).
        let storage = match (args.pool, args.disk_dir) {
            (Some(pool), _) => DiskStorage::Pool(pool.to_owned()),
            (None, Some(dir)) => DiskStorage::Folder(dir.to_path_buf()),
            (None, None) if local => DiskStorage::Folder(default_disk_dir(m)),
            (None, None) => DiskStorage::Pool("default".to_owned()),
        };
        let new = NewVm {
            name: args.as_name.map(str::to_owned),
            storage,
        };
        restore_as_new(&hv, store, m, &new, &args.options, work.path(), &control)
    };
    drop(reporter);
    let report = result?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        write_report(
            out,
            args.dest,
            &Restored {
                id: &m.id,
                vm: &m.vm.name,
                time: m.time,
            },
            &report,
        )?;
    }
    if let Some(e) = &report.start_error {
        bail!("VM {:?} was restored, but it did not start: {e}", report.vm);
    }
    Ok(())
}

/// Beside the checkpoint's first disk, where the original VM kept its disks.
pub(crate) fn default_disk_dir(m: &Manifest) -> PathBuf {
    m.disks
        .iter()
        .find_map(|d| d.source.as_deref())
        .and_then(|p| Path::new(p).parent())
        .map_or_else(
            || PathBuf::from("/var/lib/libvirt/images"),
            Path::to_path_buf,
        )
}

/// The checkpoint a report is about, as the text names it.
pub(crate) struct Restored<'a> {
    pub id: &'a str,
    pub vm: &'a str,
    pub time: chrono::DateTime<chrono::Utc>,
}

pub(crate) fn write_report(
    out: &mut dyn Write,
    dest: &Path,
    m: &Restored<'_>,
    report: &RestoreReport,
) -> std::io::Result<()> {
    if report.mode == "new_vm" {
        writeln!(
            out,
            "Restored checkpoint {} of {} ({}) as a new VM {}.",
            m.id,
            m.vm,
            local(m.time),
            report.vm
        )?;
    } else if report.mode == "other_host" {
        writeln!(
            out,
            "Restored checkpoint {} of {} ({}) as VM {} on {}.",
            m.id,
            m.vm,
            local(m.time),
            report.vm,
            report.uri
        )?;
    } else {
        writeln!(
            out,
            "Restored {} to checkpoint {} ({}).",
            report.vm,
            m.id,
            local(m.time)
        )?;
    }
    match (&report.safety_checkpoint, &report.safety_note) {
        (Some(id), _) => writeln!(
            out,
            "  Its state from before is kept as safety checkpoint {id}; undo with `rewind undo-restore {:?} --from {}`.",
            report.vm,
            dest.display()
        )?,
        (None, Some(note)) => writeln!(out, "  No safety checkpoint: {note}.")?,
        (None, None) => {}
    }
    for d in &report.disks {
        let how = match d.compared_by {
            ComparedBy::SafetyCheckpoint => "compared with the safety checkpoint",
            ComparedBy::DirtyBitmap => "compared by reading what the dirty bitmap marks",
            ComparedBy::Hashing => "compared by reading the disk",
            ComparedBy::NewFile => "new file",
        };
        let checked = if d.chunks_verified > 0 || d.chunks_written == 0 {
            "read back and verified"
        } else {
            "each chunk checked as read from the store"
        };
        writeln!(
            out,
            "  {}: {} of {} chunk(s) written ({}; {how}), {checked}; {}",
            d.target,
            d.chunks_written,
            d.chunks,
            human_bytes(d.bytes_written),
            d.path.display()
        )?;
    }
    let mut extra = Vec::new();
    if report.nvram {
        extra.push("UEFI variables");
    }
    if report.tpm {
        extra.push("TPM state");
    }
    if !extra.is_empty() {
        writeln!(out, "  {} restored.", extra.join(" and "))?;
    }
    if report.network_unplugged {
        writeln!(
            out,
            "  Its network cards are unplugged: until its next boot it has the original's MAC addresses, which its programs know. Connect them when the original is off (virsh domif-setlink)."
        )?;
    }
    writeln!(
        out,
        "  {} in {}.{} s.",
        if report.resumed {
            "VM resumed from the checkpoint's saved memory"
        } else if report.started {
            "VM started"
        } else {
            "VM left shut off"
        },
        report.duration_ms / 1000,
        report.duration_ms % 1000 / 100
    )
}
