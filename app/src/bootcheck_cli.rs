//! `rewind boot-check VM CHECKPOINT --from DEST`: starts a throwaway, isolated copy of the
//! checkpoint straight from the store and tells whether it booted
//! ([`rewind_core::bootcheck`]).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use rewind_core::bootcheck::{self, BootCheckOptions, Checked, Outcome};
use rewind_core::engine::jobs::{JobOutput, JobRequest};
use rewind_core::libvirt::Hypervisor;
use rewind_core::store::Manifest;

use crate::store_cli::{find_checkpoint, open_store};

/// The checkpoint did not boot: the result is printed already; this sets the exit code
/// (1) and the `error:` line.
#[derive(Debug, thiserror::Error)]
#[error(
    "checkpoint {checkpoint} of VM {vm:?} did not boot: {reason}. Its last screen is kept ({thumbnail}); restore an earlier checkpoint, or look at this one by restoring it as a new VM"
)]
pub struct DidNotBoot {
    /// The VM.
    pub vm: String,
    /// The checkpoint.
    pub checkpoint: String,
    /// Why.
    pub reason: String,
    /// Where its thumbnail is, or that there is none.
    pub thumbnail: String,
}

/// What `rewind boot-check` is asked.
#[derive(Debug)]
pub struct BootCheckAsk<'a> {
    /// The store.
    pub dest: &'a Path,
    /// The VM (name or UUID).
    pub vm: &'a str,
    /// The checkpoint (or `latest`).
    pub checkpoint: &'a str,
    /// libvirt's URI (this machine's).
    pub uri: &'a str,
    /// The longest wait for a boot signal, in seconds.
    pub timeout_secs: Option<u64>,
    /// Print JSON.
    pub json: bool,
}

/// Runs a boot-check and prints its result: through the protection service when
/// `session` is one and `dest` is one of its destinations (its stores are root's), else
/// here, as this user.
pub fn boot_check(
    out: &mut dyn Write,
    session: Option<&mut crate::service_cli::Session>,
    ask: &BootCheckAsk<'_>,
) -> anyhow::Result<()> {
    if let Some(session) = session
        && let Some(found) = session.served_checkpoint(ask.dest, ask.vm, ask.checkpoint)
    {
        let (destination, m) = found?;
        let request = JobRequest::BootCheck {
            destination,
            vm_uuid: m.vm.uuid,
            checkpoint: m.id.clone(),
            timeout_secs: ask.timeout_secs,
        };
        say_starting(out, ask, &m)?;
        return match session.job(request, &format!("Boot-check of {}", m.id))? {
            JobOutput::BootChecked {
                check,
                thumbnail_png,
                ..
            } => {
                // The service keeps its own copy; this user gets one to look at.
                let checked = Checked {
                    check: *check,
                    thumbnail_png,
                };
                report(out, ask, &m, &checked)
            }
            other => bail!("the service answered {other:?} to a boot-check"),
        };
    }
    let store = Arc::new(open_store(ask.dest)?);
    let m = find_checkpoint(&store, ask.dest, ask.vm, ask.checkpoint)?;
    let hv = Hypervisor::connect(ask.uri)?;
    // Ctrl-C stops the check and removes the copy.
    let interrupt = crate::store_cli::Interrupt::install()?;
    let control = interrupt.next_control();
    let mut options = BootCheckOptions::default();
    if let Some(secs) = ask.timeout_secs {
        options.timeout = std::time::Duration::from_secs(secs);
    }
    say_starting(out, ask, &m)?;
    let checked = bootcheck::boot_check(&hv, &store, &m, options, &control)?;
    report(out, ask, &m, &checked)
}

fn say_starting(out: &mut dyn Write, ask: &BootCheckAsk<'_>, m: &Manifest) -> anyhow::Result<()> {
    if !ask.json {
        writeln!(
            out,
            "Starting a throwaway copy of checkpoint {} of {} (no network, its disks read from the store)…",
            m.id, m.vm.name
        )?;
    }
    Ok(())
}

/// Keeps the result in this user's state folder and prints it; a checkpoint that did not
/// boot is the error [`DidNotBoot`].
fn report(
    out: &mut dyn Write,
    ask: &BootCheckAsk<'_>,
    m: &Manifest,
    checked: &Checked,
) -> anyhow::Result<()> {
    let state_dir = rewind_core::paths::state_dir();
    if let Err(e) = checked.save_in(&state_dir) {
        // The check itself is done: say so, and go on to its result.
        eprintln!(
            "warning: could not keep the boot-check's result in {}: {e}",
            state_dir.display()
        );
    }
    let thumbnail = bootcheck::thumbnail_path(&state_dir, &m.vm.uuid, &m.id);
    if ask.json {
        let mut value = serde_json::to_value(&checked.check)?;
        value["booted"] = checked.check.booted().into();
        value["thumbnail_path"] = thumbnail.as_ref().map(|p| p.display().to_string()).into();
        serde_json::to_writer_pretty(&mut *out, &value)?;
        writeln!(out)?;
    }
    let seconds = checked.check.took_ms.div_ceil(1000);
    match &checked.check.outcome {
        Outcome::Booted { signal } => {
            if !ask.json {
                let how = match signal {
                    bootcheck::BootSignal::Agent => "its guest agent answered",
                    bootcheck::BootSignal::Screen => {
                        "its screen settled on a login screen or desktop"
                    }
                };
                writeln!(out, "Booted in {seconds} s: {how}.")?;
                if let Some(path) = &thumbnail {
                    writeln!(out, "Its screen: {}", path.display())?;
                }
            }
            Ok(())
        }
        Outcome::Failed { failure } => Err(DidNotBoot {
            vm: m.vm.name.clone(),
            checkpoint: m.id.clone(),
            reason: failure.to_string(),
            thumbnail: thumbnail
                .map_or_else(|| "no screenshot".to_owned(), |p| p.display().to_string()),
        }
        .into()),
    }
}
