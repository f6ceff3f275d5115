//! One scheduled job: a checkpoint of one VM into one destination, then that destination's
//! retention for the VM, garbage collection, and flat copies of the newest checkpoints. Runs on a blocking thread; everything it
//! does checks the job's [`Control`], so stopping Rewind stops it cleanly (the checkpoint
//! engine leaves nothing half-done behind). An automatic job runs at a low CPU and I/O
//! priority ([`crate::priority`]), so the user's VMs come first.

use chrono::Utc;

use crate::checkpoint::TakeOptions;
use crate::config::{Destination, Protection};
use crate::destination::Availability;
use crate::history::{Outcome, Record};
use crate::job_error::{ErrorKind, JobError};
use crate::libvirt::Hypervisor;
use crate::policy::{self, Why};
use crate::priority::Priority;
use crate::progress::Control;
use crate::store::{CheckpointKind, Manifest};
use crate::vm::VmState;

/// What to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The libvirt connection.
    pub uri: String,
    /// The VM's policy.
    pub protection: Protection,
    /// The destination.
    pub destination: Destination,
    /// Where its store was found.
    pub found: Availability,
    /// Why it runs.
    pub why: Why,
    /// Take it with the VM's memory whatever the policy says (`rewind checkpoint
    /// --full-state`).
    pub force_full_state: bool,
}

/// Where the job wrote, for the record.
fn location_text(found: &Availability) -> Option<String> {
    match found {
        Availability::Folder(p) => Some(p.display().to_string()),
        Availability::Remote(l) => Some(l.clone()),
        Availability::Missing { .. } => None,
    }
}

impl JobSpec {
    /// The priority the job runs at: [`Priority::BACKGROUND`] when nobody waits for it (the
    /// timer, a drive plugged in, the VM's activity, a retry), its caller's when the user
    /// asked for it now.
    #[must_use]
    pub fn priority(&self) -> Option<Priority> {
        (self.why != Why::Manual).then_some(Priority::BACKGROUND)
    }

    /// The job's record as it starts (what [`crate::history::begin`] keeps while it runs).
    #[must_use]
    pub fn record(&self) -> Record {
        Record {
            vm_uuid: self.protection.uuid.clone(),
            location: location_text(&self.found),
            ..Record::starting(
                &self.protection.vm,
                &self.destination.name,
                self.why,
                Utc::now(),
            )
        }
    }
}

/// Runs the job and says how it went.
#[must_use]
pub fn run(spec: &JobSpec, control: &Control) -> Record {
    run_for(spec, control).0
}

/// Runs the job: how it went, for the history, and the checkpoint it took (or why none).
/// Every trigger runs this: the timer, a drive plugged in, "Checkpoint now" from the
/// window, the tray or the CLI. An automatic one runs at [`JobSpec::priority`], on a
/// thread of its own.
pub fn run_for(spec: &JobSpec, control: &Control) -> (Record, Result<Manifest, JobError>) {
    crate::priority::run_at(spec.priority(), "rewind-job", || run_here(spec, control))
}

fn run_here(spec: &JobSpec, control: &Control) -> (Record, Result<Manifest, JobError>) {
    let mut record = spec.record();
    let taken = run_into(spec, control, &mut record);
    if let Err(failure) = &taken {
        record.outcome = if control.is_cancelled() {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        };
        record.error = Some(failure.message.clone());
        record.retryable = failure.retryable;
    }
    record.finished = Utc::now();
    (record, taken)
}

fn run_into(spec: &JobSpec, control: &Control, record: &mut Record) -> Result<Manifest, JobError> {
    let store = crate::destination::open(&spec.destination, &spec.found)?;
    let hv = Hypervisor::connect(&spec.uri)?;
    let vm = match &spec.protection.uuid {
        Some(uuid) if hv.has_vm(uuid) => uuid.clone(),
        _ => spec.protection.vm.clone(),
    };
    let work = crate::workdir::WorkDir::new().map_err(JobError::work_folder)?;
    let info = hv.vm(&vm).ok();
    // The VM's checkpoints in this store, read once for the whole job: the full-state
    // policy, the chain of the new checkpoint and the retention after it all use them.
    let uuid = info
        .as_ref()
        .and_then(|i| uuid::Uuid::parse_str(&i.uuid).ok());
    let known = match uuid {
        Some(u) => Some(store.vm_catalog(&u)?.checkpoints),
        None => None,
    };
    // Only a mixed policy needs to know when the last full-state one was.
    let last_full_state = if spec.protection.full_state_every_secs.is_some() {
        known
            .iter()
            .flatten()
            .filter(|m| m.kind == CheckpointKind::Full)
            .map(|m| m.time)
            .max()
    } else {
        None
    };
    let running = info.is_some_and(|v| v.state == VmState::Running);
    let mut options = TakeOptions {
        quiesce: spec.protection.quiesce,
        full_state: spec.force_full_state
            || policy::wants_full_state(&spec.protection, running, last_full_state, Utc::now()),
        known,
        ..TakeOptions::default()
    };
    let m = match crate::checkpoint::take_with(&hv, &store, &vm, work.path(), &options, control)
        .map_err(JobError::from)
    {
        // A full drive: remove now what the keep rules would remove after this checkpoint,
        // and try once more. Without it, a full drive would stay full for good (retention
        // runs only after a checkpoint succeeds).
        Err(full) if full.kind == ErrorKind::NoSpace && !spec.protection.keep.is_empty() => {
            let Some(vm_uuid) = uuid else {
                return Err(full);
            };
            let (decisions, gc) =
                store.make_room(&spec.protection.keep, vm_uuid, Utc::now(), control)?;
            let removed = decisions.iter().filter(|d| !d.keep).count();
            record.pruned = u32::try_from(removed).unwrap_or(u32::MAX);
            if removed == 0 && gc.bytes_removed == 0 {
                return Err(JobError::new(
                    ErrorKind::NoSpace,
                    format!(
                        "{} The keep rules allow removing nothing more: free space on the \
                         drive, keep fewer checkpoints, or use a larger drive",
                        full.message
                    ),
                ));
            }
            tracing::info!(
                "the store was full: removed {removed} old checkpoints ({} bytes freed), trying again",
                gc.bytes_removed
            );
            options.known = Some(store.vm_catalog(&vm_uuid)?.checkpoints);
            crate::checkpoint::take_with(&hv, &store, &vm, work.path(), &options, control)?
        }
        other => other?,
    };
    record.vm.clone_from(&m.vm.name);
    record.vm_uuid = Some(m.vm.uuid.to_string());
    record.checkpoint = Some(m.id.clone());
    record.incremental = Some(m.parent.is_some());
    record.read_bytes = m.read_bytes;
    record.new_bytes = m.new_bytes;
    // Retention for this VM in this destination, then the data only removed ones used. A
    // destination the VM is not protected into has no keep rules: all is kept.
    if spec.protection.keep.is_empty() {
        compact_after(&store, spec, control);
        return Ok(m);
    }
    let vm_uuid = m.vm.uuid;
    let decisions = match options.known {
        Some(mut known) if uuid == Some(vm_uuid) => {
            known.push(m.clone());
            let catalog = crate::store::Catalog {
                checkpoints: known,
                unreadable: Vec::new(),
            };
            store.prune_known(&catalog, &spec.protection.keep, Some(vm_uuid), control)?
        }
        _ => store.prune(&spec.protection.keep, Some(vm_uuid), false, control)?,
    };
    crate::bootcheck::forget_pruned(&crate::paths::state_dir(), &decisions);
    let removed = decisions.iter().filter(|d| !d.keep).count();
    record.pruned = record
        .pruned
        .saturating_add(u32::try_from(removed).unwrap_or(u32::MAX));
    if removed > 0 {
        store.gc(control)?;
    }
    compact_after(&store, spec, control);
    Ok(m)
}

/// After an automatic job, keeps the newest checkpoints of the store quick to restore:
/// flat copies of their patches ([`crate::store::flat`]), at the job's low priority. A
/// job the user waits for leaves it to the next automatic one. The checkpoint is taken
/// whatever happens here: a failure is logged, and a cancel stops it.
fn compact_after(store: &crate::store::Store, spec: &JobSpec, control: &Control) {
    if spec.why == Why::Manual {
        return;
    }
    control.start_phase(crate::progress::Phase::Compacting);
    match store.compact(control) {
        Ok(report) => tracing::info!(
            "flat copies of {} patches of the newest checkpoints ({} written, {} bytes; {} removed)",
            report.copies,
            report.written,
            report.bytes_written,
            report.removed
        ),
        Err(e) if control.is_cancelled() => tracing::info!("compaction stopped: {e}"),
        Err(e) => tracing::warn!(
            "could not keep flat copies of the newest checkpoints of {}: {e}",
            spec.destination.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_job_nobody_asked_for_now_runs_at_the_background_priority() {
        let spec = |why| JobSpec {
            uri: "test:///default".into(),
            protection: Protection::default(),
            destination: Destination {
                name: "d".into(),
                location: "/nowhere".into(),
                store_id: None,
                passphrase_file: None,
                store_secret: None,
            },
            found: Availability::Folder("/nowhere".into()),
            why,
            force_full_state: false,
        };
        for why in [
            Why::First,
            Why::Due,
            Why::CatchUp,
            Why::Activity,
            Why::Retry,
        ] {
            assert_eq!(spec(why).priority(), Some(Priority::BACKGROUND), "{why:?}");
        }
        assert_eq!(spec(Why::Manual).priority(), None);
    }
}
