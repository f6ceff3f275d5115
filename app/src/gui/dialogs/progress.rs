//! A job's progress, its countdown and its end: the window that follows a restore.

use super::*;

pub(super) fn phase_text(phase: Phase) -> &'static str {
    match phase {
        Phase::Preparing => "Preparing",
        Phase::Capturing => "Capturing",
        Phase::Copying => "Copying data into the store",
        Phase::Finishing => "Finishing",
        Phase::Stopping => "Shutting the VM down",
        Phase::SafetyCheckpoint => "Keeping the current state as a safety checkpoint",
        Phase::Writing => "Writing the disks back",
        Phase::Verifying => "Reading back and checking",
        Phase::RollingBack => "Undoing what was written",
        Phase::Starting => "Starting the VM",
        Phase::ReadingMemory => "Reading back the saved memory",
        Phase::Compacting => "Keeping the newest checkpoint quick to restore",
        Phase::BootChecking => "Waiting for a throwaway copy to boot",
    }
}

/// A job's progress bar with rate and time left.
pub fn job_progress_ui(ui: &mut egui::Ui, job: &JobView) {
    #[allow(clippy::cast_precision_loss)] // a fraction for display
    let fraction = if job.total_bytes > 0 {
        job.done_bytes as f32 / job.total_bytes as f32
    } else {
        0.0
    };
    let mut text = phase_text(job.phase).to_owned();
    if let Some(left) = job.force_off_in {
        let secs = left.as_secs();
        write!(text, " — turned off in {}:{:02}", secs / 60, secs % 60)
            .expect("writing to a String cannot fail");
    }
    if job.total_bytes > 0 {
        write!(
            text,
            " — {} of {}",
            human_bytes(job.done_bytes),
            human_bytes(job.total_bytes)
        )
        .expect("writing to a String cannot fail");
    }
    if let Some(rate) = job.rate.rate_bytes_per_sec() {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rate = rate as u64;
        write!(text, ", {}/s", human_bytes(rate)).expect("writing to a String cannot fail");
        if let Some(left) = job.rate.time_left(job.done_bytes, job.total_bytes) {
            write!(text, ", {} left", human_age_secs(left.as_secs()))
                .expect("writing to a String cannot fail");
        }
    }
    let bar = egui::ProgressBar::new(fraction).text(text);
    let bar = if job.total_bytes == 0 {
        bar.animate(true)
    } else {
        bar
    };
    ui.add(bar);
}

pub(super) fn report_lines(r: &RestoreReport) -> Vec<String> {
    #[allow(clippy::cast_precision_loss)] // seconds for display
    let secs = r.duration_ms as f64 / 1000.0;
    let mut lines = vec![format!(
        "{} is back to checkpoint {}: {} written to {} disk(s) in {:.1} s, all read back and checked.",
        r.vm,
        r.checkpoint,
        human_bytes(r.bytes_written),
        r.disks.len(),
        secs
    )];
    if r.resumed {
        lines.push(format!(
            "{} resumed where it was at that moment (from its saved memory).",
            r.vm
        ));
    } else if r.started {
        lines.push(format!("{} was started again.", r.vm));
    }
    if r.network_unplugged {
        lines.push(
            "Its network cards are unplugged: until its next boot it has the original's network addresses. Connect them when the original is off.".to_owned(),
        );
    }
    if let Some(e) = &r.start_error {
        lines.push(format!("It could not be started: {e}"));
    }
    if let Some(s) = &r.safety_checkpoint {
        lines.push(format!(
            "Its state from before is kept as safety checkpoint {s}."
        ));
    }
    if let Some(n) = &r.safety_note {
        lines.push(n.clone());
    }
    lines
}

/// The same restore, disks only, when `error` says that is what can still be done.
pub(super) fn disk_only_retry(request: &JobRequest, error: &JobError) -> Option<JobRequest> {
    if !error.disk_only_possible() {
        return None;
    }
    let mut again = request.clone();
    match &mut again {
        JobRequest::Restore { options, .. } | JobRequest::UndoRestore { options, .. } => {
            options.disk_only = true;
            Some(again)
        }
        _ => None,
    }
}

/// While a restore waits for the guest to shut down (the progress bar counts down), a
/// button to turn the VM off now.
pub(super) fn shutdown_countdown_ui(
    ui: &mut egui::Ui,
    job: &JobView,
    commands: &mut Commands,
) -> bool {
    let Some(left) = job.force_off_in else {
        return false;
    };
    ui.add_space(4.0);
    ui.horizontal(|ui| {
        ui.label(if left.is_zero() {
            "The guest did not shut down: it is turned off now.".to_owned()
        } else {
            "The guest was asked to shut down.".to_owned()
        });
        let button = ui
            .add_enabled(!job.forcing_off, egui::Button::new("Turn off now"))
            .on_hover_text(
                "Pull the plug without waiting any longer: unsaved work in the VM is lost",
            );
        if button.clicked() {
            commands.push(Command::ForceOff(job.id));
            return true;
        }
        false
    })
    .inner
}

/// A restore that failed: what went wrong, and the disks-only restore when that is what
/// can still be done (the checkpoint cannot resume the VM and nothing was changed).
/// Returns whether to close.
pub(super) fn restore_failed_ui(
    ui: &mut egui::Ui,
    job: &JobView,
    error: &JobError,
    commands: &mut Commands,
) -> bool {
    ui.colored_label(ui.visuals().error_fg_color, "The restore did not complete");
    ui.label(&error.message);
    ui.add_space(8.0);
    ui.horizontal(|ui| {
        let mut close = false;
        if let Some(again) = disk_only_retry(&job.request, error)
            && ui
                .button(RichText::new("Restore disks only").strong())
                .on_hover_text(
                    "Put back the checkpoint's disks, UEFI variables and TPM state, and boot the VM from them",
                )
                .clicked()
        {
            commands.push(Command::Start(again));
            close = true;
        }
        close |= ui.button("Close").clicked();
        close
    })
    .inner
}

pub(super) fn restore_window_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    let Some(job) = state
        .restore_job
        .and_then(|id| state.jobs.iter().find(|j| j.id == id).cloned())
    else {
        state.restore_job = None;
        return;
    };
    let mut close = false;
    let (stop_mode, _) = stop_mode(state);
    let title = match &*job.request {
        JobRequest::UndoRestore { .. } => "Undoing the restore",
        _ => "Restoring",
    };
    egui::Modal::new(egui::Id::unique("restore_window")).show(ui.ctx(), |ui| {
        ui.set_min_width(460.0);
        ui.set_max_width(560.0);
        ui.heading(title);
        ui.label(&job.label);
        ui.add_space(6.0);
        match &job.result {
            None => {
                job_progress_ui(ui, &job);
                if shutdown_countdown_ui(ui, &job, commands)
                    && let Some(j) = state.jobs.iter_mut().find(|j| j.id == job.id)
                {
                    j.forcing_off = true;
                }
                ui.add_space(6.0);
                let cancel = ui.add_enabled(!job.cancelling, egui::Button::new("Cancel"));
                if cancel.clicked() {
                    commands.push(Command::Cancel(job.id));
                    if let Some(j) = state.jobs.iter_mut().find(|j| j.id == job.id) {
                        j.cancelling = true;
                    }
                }
                if job.cancelling {
                    ui.label("Cancelling: what was written is being undone…");
                }
            }
            Some(Ok(JobOutput::Restored(report))) => {
                let undo = matches!(&*job.request, JobRequest::UndoRestore { .. });
                ui.label(
                    RichText::new(if undo {
                        "Restore undone"
                    } else {
                        "Restore complete"
                    })
                    .strong(),
                );
                for line in report_lines(report) {
                    // An undo takes no safety checkpoint by design: nothing to tell.
                    if undo && report.safety_note.as_ref() == Some(&line) {
                        continue;
                    }
                    ui.label(line);
                }
                ui.add_space(8.0);
                ui.horizontal(|ui| {
                    let undo = match &*job.request {
                        JobRequest::Restore {
                            destination,
                            vm_uuid,
                            as_new: None,
                            ..
                        } if report.safety_checkpoint.is_some() => {
                            Some((destination.clone(), *vm_uuid))
                        }
                        _ => None,
                    };
                    if let Some((destination, vm_uuid)) = undo
                        && ui
                            .button("Undo restore")
                            .on_hover_text("Go back to the state from before this restore")
                            .clicked()
                    {
                        commands.push(Command::Start(JobRequest::UndoRestore {
                            destination,
                            vm_uuid,
                            options: RestoreOptions {
                                // Undoing keeps nothing of the restored state: it is the checkpoint.
                                safety_checkpoint: false,
                                stop: stop_mode,
                                ..RestoreOptions::default()
                            },
                        }));
                        close = true;
                    }
                    if ui.button("Close").clicked() {
                        close = true;
                    }
                });
            }
            Some(Ok(_)) => {
                close = true;
            }
            Some(Err(e)) => close = restore_failed_ui(ui, &job, e, commands),
        }
    });
    if close {
        state.restore_job = None;
    }
}
