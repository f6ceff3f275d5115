//! Boot-checks in the window: the timeline's mark of a boot-checked checkpoint, the words
//! and the thumbnail its hover and the details show, and "Check that it boots".
//!
//! The thumbnail arrives as a PNG inside the checkpoint's summary (the engine, or the
//! protection service, read it from its own state folder). It is decoded once per
//! checkpoint and check, into a texture kept in egui's memory, never on every frame.

use std::collections::HashMap;

use chrono::{DateTime, Local, Utc};
use egui::{Color32, Pos2, Rect, RichText, Stroke, Vec2};
use rewind_core::engine::Command;
use rewind_core::engine::jobs::JobRequest;
use rewind_core::view::catalog::{BootCheckSummary, CheckpointSummary};
use uuid::Uuid;

use super::Commands;
use super::state::{CheckpointKey, UiState};

/// The colour of a checkpoint that booted.
const BOOTED: Color32 = Color32::from_rgb(60, 170, 90);
/// The widest a thumbnail is drawn in a hover.
const HOVER_WIDTH: f32 = 240.0;
/// The widest a thumbnail is drawn in the details.
const DETAILS_WIDTH: f32 = 200.0;
/// The largest picture decoded (thumbnails are at most 320 pixels a side).
const MAX_SIDE_PIXELS: u32 = 1024;

/// The button's words.
pub const CHECK_BUTTON: &str = "Check that it boots";

/// What came of the check, and when: "Booted — checked 2026-12-05 03:00", or "Did not
/// boot: why — checked …".
pub fn outcome_text(b: &BootCheckSummary) -> String {
    let when = b.checked_at.with_timezone(&Local).format("%Y-%m-%d %H:%M");
    if b.booted {
        format!("Booted — checked {when}")
    } else {
        format!(
            "Did not boot: {} — checked {when}",
            b.reason.as_deref().unwrap_or("no reason given")
        )
    }
}

/// What a marker's label says of its boot-check (what a screen reader says after the
/// checkpoint's time).
pub fn label_suffix(c: &CheckpointSummary) -> &'static str {
    match &c.boot_check {
        Some(b) if b.booted => " (boots)",
        Some(_) => " (did not boot)",
        None => "",
    }
}

/// Whether the checkpoint's last boot-check failed (its marker is never merged away).
pub fn failed(c: &CheckpointSummary) -> bool {
    c.boot_check.as_ref().is_some_and(|b| !b.booted)
}

/// Draws the mark under a marker of radius `r` at `center`: a small green screen when the
/// checkpoint booted, a red one crossed out when it did not.
pub fn paint_mark(
    painter: &egui::Painter,
    visuals: &egui::Visuals,
    c: &CheckpointSummary,
    center: Pos2,
    r: f32,
) {
    let Some(b) = &c.boot_check else { return };
    let screen =
        Rect::from_center_size(Pos2::new(center.x, center.y + r + 5.0), Vec2::new(9.0, 6.0));
    if b.booted {
        painter.rect_filled(screen, 1.0, BOOTED);
    } else {
        let red = visuals.error_fg_color;
        painter.rect_stroke(screen, 1.0, Stroke::new(1.5, red), egui::StrokeKind::Middle);
        let stroke = Stroke::new(1.5, red);
        painter.line_segment([screen.left_top(), screen.right_bottom()], stroke);
        painter.line_segment([screen.left_bottom(), screen.right_top()], stroke);
    }
}

/// A checkpoint's thumbnail once decoded: by VM, checkpoint and when it was checked, so a
/// new check shows its own picture. `None`: it did not decode (not tried again).
#[derive(Clone, Default)]
struct Thumbnails(HashMap<(Uuid, String, DateTime<Utc>), Option<egui::TextureHandle>>);

/// The name of the texture of checkpoint `id` of VM `vm`'s thumbnail.
pub fn texture_name(vm: &Uuid, id: &str) -> String {
    format!("rewind-boot-check-{vm}/{id}")
}

/// The texture of `c`'s boot-check thumbnail, made the first time it is asked for.
pub fn thumbnail(ctx: &egui::Context, c: &CheckpointSummary) -> Option<egui::TextureHandle> {
    let b = c.boot_check.as_ref()?;
    let png = b.thumbnail_png.as_deref()?;
    let key = (c.vm_uuid, c.id.clone(), b.checked_at);
    let cache = egui::Id::unique("rewind-boot-check-thumbnails");
    if let Some(known) = ctx.data(|d| {
        d.get_temp::<Thumbnails>(cache)
            .and_then(|t| t.0.get(&key).cloned())
    }) {
        return known;
    }
    let texture = decoded(png).map(|image| {
        ctx.load_texture(
            texture_name(&c.vm_uuid, &c.id),
            image,
            egui::TextureOptions::LINEAR,
        )
    });
    ctx.data_mut(|d| {
        d.get_temp_mut_or_default::<Thumbnails>(cache)
            .0
            .insert(key, texture.clone());
    });
    texture
}

/// The pixels of a thumbnail's PNG (bounded: the engine sent it, but a picture's size is
/// checked before it is allocated).
fn decoded(png: &[u8]) -> Option<egui::ColorImage> {
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(png), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE_PIXELS);
    limits.max_image_height = Some(MAX_SIDE_PIXELS);
    limits.max_alloc = Some(16 << 20);
    reader.limits(limits);
    let image = reader.decode().ok()?.to_rgba8();
    let size = [
        usize::try_from(image.width()).ok()?,
        usize::try_from(image.height()).ok()?,
    ];
    Some(egui::ColorImage::from_rgba_unmultiplied(
        size,
        image.as_raw(),
    ))
}

/// The thumbnail (if any), at most `width` wide, with what it shows for screen readers.
fn picture_ui(ui: &mut egui::Ui, c: &CheckpointSummary, width: f32) {
    if let Some(texture) = thumbnail(ui.ctx(), c) {
        let shown = egui::Image::new(&texture)
            .max_width(width)
            .alt_text("The last screen of the boot-check's throwaway copy");
        ui.add(shown);
    }
}

/// The boot-check part of a marker's hover: the thumbnail and what came of the check.
pub fn hover_ui(ui: &mut egui::Ui, c: &CheckpointSummary) {
    let Some(b) = &c.boot_check else { return };
    picture_ui(ui, c, HOVER_WIDTH);
    outcome_label_ui(ui, b);
}

fn outcome_label_ui(ui: &mut egui::Ui, b: &BootCheckSummary) {
    if b.booted {
        ui.colored_label(BOOTED, outcome_text(b));
    } else {
        ui.colored_label(ui.visuals().error_fg_color, outcome_text(b));
    }
}

/// The details' boot-check row: what came of the last check, or that it is being checked,
/// or that it never was.
pub fn details_ui(ui: &mut egui::Ui, state: &UiState, key: &CheckpointKey, c: &CheckpointSummary) {
    if running(state, key) {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("being checked now (see Activity)");
        });
        return;
    }
    match &c.boot_check {
        Some(b) => outcome_label_ui(ui, b),
        None => {
            ui.label("not checked yet");
        }
    }
}

/// The details' picture, beside the facts: the last screen of the checkpoint's last
/// boot-check, if one was kept.
pub fn details_picture_ui(ui: &mut egui::Ui, c: &CheckpointSummary) {
    if c.boot_check.is_none() || thumbnail(ui.ctx(), c).is_none() {
        return;
    }
    ui.vertical(|ui| {
        ui.label(RichText::new("Its screen at the boot-check").weak());
        picture_ui(ui, c, DETAILS_WIDTH);
    });
}

/// Whether a boot-check of `key` runs now (started from this window).
fn running(state: &UiState, key: &CheckpointKey) -> bool {
    state.jobs.iter().any(|j| {
        j.running()
            && matches!(&*j.request, JobRequest::BootCheck { destination, vm_uuid, checkpoint, .. }
                if *destination == key.destination && *vm_uuid == key.vm_uuid && *checkpoint == key.id)
    })
}

/// Why `c` cannot be boot-checked from here now, if it cannot.
pub fn why_not(state: &UiState, key: &CheckpointKey, c: &CheckpointSummary) -> Option<String> {
    super::runfrom::why_not_started_here(
        state,
        c,
        "A boot-check starts a copy on this machine's libvirt",
    )
    .or_else(|| running(state, key).then(|| "It is being checked now".to_owned()))
}

/// "Check that it boots": starts the boot-check job (its progress and Cancel are in the
/// activity panel).
pub fn button_ui(
    ui: &mut egui::Ui,
    state: &UiState,
    key: &CheckpointKey,
    c: &CheckpointSummary,
    commands: &mut Commands,
) {
    let why_not = why_not(state, key, c);
    let button = ui
        .add_enabled(why_not.is_none(), egui::Button::new(CHECK_BUTTON))
        .on_hover_text(
            "Start a throwaway, isolated copy of the VM from this checkpoint, see whether it \
             boots, and keep a picture of its screen (the VM itself is not touched)",
        );
    let button = match &why_not {
        Some(why) => button.on_disabled_hover_text(why),
        None => button,
    };
    if button.clicked() {
        commands.push(Command::Start(JobRequest::BootCheck {
            destination: key.destination.clone(),
            vm_uuid: key.vm_uuid,
            checkpoint: key.id.clone(),
            timeout_secs: None,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn check(booted: bool) -> BootCheckSummary {
        BootCheckSummary {
            checked_at: Utc.with_ymd_and_hms(2026, 12, 5, 3, 4, 0).unwrap(),
            booted,
            reason: (!booted).then(|| "the screen showed a blue screen".into()),
            thumbnail_png: None,
        }
    }

    #[test]
    fn the_words_say_what_came_of_the_check_and_when() {
        // The tests run with TZ=UTC.
        assert_eq!(
            outcome_text(&check(true)),
            "Booted — checked 2026-12-05 03:04"
        );
        assert_eq!(
            outcome_text(&check(false)),
            "Did not boot: the screen showed a blue screen — checked 2026-12-05 03:04"
        );
        let mut c = super::super::timeline::tests::sample(Utc::now());
        assert_eq!(label_suffix(&c), "");
        c.boot_check = Some(check(false));
        assert_eq!(label_suffix(&c), " (did not boot)");
        assert!(failed(&c));
    }

    /// A thumbnail becomes one texture, made once however often it is drawn; garbage
    /// makes none and is not decoded again.
    #[test]
    fn a_thumbnail_is_decoded_once_into_a_texture() {
        let ctx = egui::Context::default();
        let mut png = Vec::new();
        image::RgbImage::from_pixel(32, 20, image::Rgb([10, 200, 30]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let mut c = super::super::timeline::tests::sample(Utc::now());
        let mut b = check(true);
        b.thumbnail_png = Some(png);
        c.boot_check = Some(b);
        let before = ctx.tex_manager().read().num_allocated();
        let t = thumbnail(&ctx, &c).unwrap();
        assert_eq!(t.size(), [32, 20]);
        assert_eq!(thumbnail(&ctx, &c).unwrap().id(), t.id());
        assert_eq!(ctx.tex_manager().read().num_allocated(), before + 1);
        c.id = "garbage".into();
        c.boot_check.as_mut().unwrap().thumbnail_png = Some(b"not a png".to_vec());
        assert!(thumbnail(&ctx, &c).is_none());
        assert!(thumbnail(&ctx, &c).is_none());
        assert_eq!(ctx.tex_manager().read().num_allocated(), before + 1);
    }

    /// A boot-check runs where the window's libvirt is this machine's; elsewhere, on a
    /// damaged checkpoint, or while one runs, the button says why not.
    #[test]
    fn the_button_says_why_a_checkpoint_cannot_be_checked() {
        let c = super::super::timeline::tests::sample(Utc::now());
        let key = CheckpointKey::of("usb", &c);
        let mut state = UiState {
            uri: "qemu:///system".into(),
            ..UiState::default()
        };
        assert_eq!(why_not(&state, &key, &c), None);
        state.uri = "qemu+ssh://me@host/system".into();
        let why = why_not(&state, &key, &c).unwrap();
        assert!(
            why.contains("this machine") && why.contains("host"),
            "{why}"
        );
        state.uri = String::new();
        assert_eq!(
            why_not(&state, &key, &c).as_deref(),
            Some("Not connected to libvirt yet")
        );
        state.uri = "qemu:///system".into();
        let mut damaged = c.clone();
        damaged.damaged = true;
        assert!(why_not(&state, &key, &damaged).unwrap().contains("damaged"));
        state.apply(rewind_core::engine::Event::JobStarted {
            job: 1,
            label: "Boot-check".into(),
            request: std::sync::Arc::new(JobRequest::BootCheck {
                destination: "usb".into(),
                vm_uuid: c.vm_uuid,
                checkpoint: c.id.clone(),
                timeout_secs: None,
            }),
        });
        assert_eq!(
            why_not(&state, &key, &c).as_deref(),
            Some("It is being checked now")
        );
    }
}
