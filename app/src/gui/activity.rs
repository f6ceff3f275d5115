//! The activity view: what ran, what runs, what failed and why.

use chrono::Local;
use egui::{Color32, RichText};
use rewind_core::engine::Command;
use rewind_core::engine::jobs::JobOutput;
use rewind_core::history::{Outcome, Record};
use rewind_core::job_error::ErrorKind;
use rewind_core::policy::Why;
use rewind_core::scheduler::boot_checks::NOT_DONE;
use rewind_core::units::human_bytes;

use super::Commands;
use super::dialogs::job_progress_ui;
use super::state::UiState;

/// Running jobs (this window's and the scheduler's) and the recent history.
#[allow(clippy::too_many_lines)] // three short sections of one panel
pub(super) fn activity_ui(ui: &mut egui::Ui, state: &mut UiState, commands: &mut Commands) {
    ui.add_space(2.0);
    ui.label(RichText::new("Activity").strong());
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let mut cancel = None;
            let mut dismiss = None;
            for job in &state.jobs {
                ui.horizontal(|ui| {
                    ui.label(&job.label);
                    match &job.result {
                        None => {
                            ui.add_sized([280.0, 18.0], |ui: &mut egui::Ui| {
                                job_progress_ui(ui, job);
                                ui.label("")
                            });
                            if ui
                                .add_enabled(!job.cancelling, egui::Button::new("Cancel"))
                                .clicked()
                            {
                                cancel = Some(job.id);
                            }
                        }
                        Some(Ok(JobOutput::BootChecked { check, .. })) if !check.booted() => {
                            // Done, but what it found is a failure.
                            ui.colored_label(ui.visuals().error_fg_color, "did not boot");
                            if ui.small_button("✖").on_hover_text("Dismiss").clicked() {
                                dismiss = Some(job.id);
                            }
                        }
                        Some(Ok(_)) => {
                            ui.colored_label(Color32::from_rgb(60, 170, 90), "done");
                            if ui.small_button("✖").on_hover_text("Dismiss").clicked() {
                                dismiss = Some(job.id);
                            }
                        }
                        Some(Err(e)) => {
                            if e.kind == ErrorKind::Cancelled {
                                // As the history shows it: what the user asked for, no failure.
                                ui.label(RichText::new("cancelled").weak());
                            } else {
                                ui.colored_label(
                                    ui.visuals().error_fg_color,
                                    format!("failed: {e}"),
                                );
                            }
                            if ui.small_button("✖").on_hover_text("Dismiss").clicked() {
                                dismiss = Some(job.id);
                            }
                        }
                    }
                });
            }
            if let Some(id) = cancel {
                commands.push(Command::Cancel(id));
                if let Some(j) = state.jobs.iter_mut().find(|j| j.id == id) {
                    j.cancelling = true;
                }
            }
            if let Some(id) = dismiss {
                state.jobs.retain(|j| j.id != id);
            }
            for r in state.scheduled_running() {
                ui.horizontal(|ui| {
                    ui.spinner();
                    #[allow(clippy::cast_precision_loss)]
                    let fraction = if r.total_bytes > 0 {
                        r.done_bytes as f32 / r.total_bytes as f32
                    } else {
                        0.0
                    };
                    ui.label(format!(
                        "Checkpoint of {} into {} ({})",
                        r.vm,
                        r.destination,
                        r.why.label()
                    ));
                    ui.add(
                        egui::ProgressBar::new(fraction)
                            .desired_width(240.0)
                            .text(format!(
                                "{} — {} of {}",
                                r.phase,
                                human_bytes(r.done_bytes),
                                human_bytes(r.total_bytes)
                            )),
                    );
                });
            }
            ui.add_space(4.0);
            ui.label(RichText::new("Recent").weak());
            let vm_name = state.selected_vm().map(|v| v.name.clone());
            let mut shown = 0;
            for r in state.history.iter().rev() {
                if shown >= 20 {
                    break;
                }
                shown += 1;
                ui.horizontal_wrapped(|ui| {
                    let when = r
                        .finished
                        .with_timezone(&Local)
                        .format("%a %H:%M")
                        .to_string();
                    ui.label(RichText::new(when).weak());
                    let strong = vm_name.as_deref() == Some(r.vm.as_str());
                    let name = if strong {
                        RichText::new(&r.vm).strong()
                    } else {
                        RichText::new(&r.vm)
                    };
                    ui.label(name);
                    if r.trigger == Why::BootCheck {
                        // Not a checkpoint: the scheduled boot-check of one in the destination.
                        boot_check_record_ui(ui, r);
                        return;
                    }
                    ui.label(format!("into {}", r.destination));
                    match r.outcome {
                        Outcome::Ok => {
                            ui.colored_label(
                                Color32::from_rgb(60, 170, 90),
                                format!(
                                    "checkpoint taken, {} new{}",
                                    human_bytes(r.new_bytes),
                                    if r.pruned > 0 {
                                        format!(", {} old one(s) removed", r.pruned)
                                    } else {
                                        String::new()
                                    }
                                ),
                            );
                        }
                        Outcome::Failed => {
                            ui.colored_label(
                                ui.visuals().error_fg_color,
                                format!(
                                    "failed: {}",
                                    r.error.as_deref().unwrap_or("no reason given")
                                ),
                            );
                        }
                        Outcome::Cancelled => {
                            ui.label(RichText::new("cancelled").weak());
                        }
                    }
                });
            }
            if shown == 0 {
                ui.label(RichText::new("Nothing yet.").weak());
            }
        });
}

/// A scheduled boot-check in the recent history: whether the copy of the checkpoint booted.
fn boot_check_record_ui(ui: &mut egui::Ui, r: &Record) {
    let what = format!(
        "boot-check of {} in {}",
        r.checkpoint.as_deref().unwrap_or("its newest checkpoint"),
        r.destination
    );
    match r.outcome {
        Outcome::Ok => {
            ui.colored_label(Color32::from_rgb(60, 170, 90), format!("{what}: booted"));
        }
        Outcome::Failed => {
            let error = r.error.as_deref().unwrap_or("no reason given");
            let text = match error.strip_prefix(NOT_DONE) {
                // Not a finding about the checkpoint: tried again later.
                Some(why) => format!("{what} could not be done: {why}"),
                None => format!("{what}: did not boot: {error}"),
            };
            ui.colored_label(ui.visuals().error_fg_color, text);
        }
        Outcome::Cancelled => {
            ui.label(RichText::new(format!("{what}: cancelled")).weak());
        }
    }
}
