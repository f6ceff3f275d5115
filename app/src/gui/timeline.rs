//! A VM's checkpoints on a time axis: one lane per destination, zoomed from hours to
//! months and panned by dragging. Markers are coloured by kind and consistency, sized by how
//! much they added, and marked when verified or damaged, and when boot-checked (a small
//! screen under them, crossed out in red when the copy did not boot); a "now" line and the
//! next scheduled checkpoint show where protection stands.
//!
//! Drawing is bounded by the width, not the number of checkpoints: only the visible range
//! is looked at (binary search in time order) and markers closer than a few pixels are
//! merged into one (the selected and damaged ones always show). Every drawn marker is a
//! widget with a label, so it can be reached with the keyboard and found by screen readers
//! and tests.

use chrono::{DateTime, Datelike as _, Local, TimeZone as _, Utc};
use egui::{Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, Vec2};
use rewind_core::store::{CheckpointKind, Consistency};
use rewind_core::units::human_bytes;
use rewind_core::view::catalog::CheckpointSummary;

use super::state::CheckpointKey;

/// Zoom presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zoom {
    /// Half a day.
    Hours,
    /// A week.
    Days,
    /// Two months.
    Weeks,
    /// A year.
    Months,
}

impl Zoom {
    /// Every preset, shortest first.
    pub const ALL: [Self; 4] = [Self::Hours, Self::Days, Self::Weeks, Self::Months];

    /// The visible span.
    pub fn span_secs(self) -> f64 {
        match self {
            Self::Hours => 12.0 * 3600.0,
            Self::Days => 7.0 * 86_400.0,
            Self::Weeks => 8.0 * 7.0 * 86_400.0,
            Self::Months => 365.0 * 86_400.0,
        }
    }

    /// Its button's word.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hours => "Hours",
            Self::Days => "Days",
            Self::Weeks => "Weeks",
            Self::Months => "Months",
        }
    }
}

/// The shortest and longest spans one can zoom to.
const MIN_SPAN_SECS: f64 = 600.0;
const MAX_SPAN_SECS: f64 = 5.0 * 365.0 * 86_400.0;
/// Room right of "now" (a share of the span) for the next scheduled checkpoint.
const FUTURE_SHARE: f64 = 0.08;
/// Markers closer than this are drawn as one.
const MERGE_PX: f32 = 3.0;
const LANE_HEIGHT: f32 = 34.0;
const AXIS_HEIGHT: f32 = 20.0;
const LABEL_WIDTH: f32 = 120.0;

/// Where the timeline looks.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineView {
    /// Seconds across the visible width.
    pub span_secs: f64,
    /// The time at the right edge; `None` follows "now".
    pub end: Option<DateTime<Utc>>,
}

impl Default for TimelineView {
    fn default() -> Self {
        Self {
            span_secs: Zoom::Days.span_secs(),
            end: None,
        }
    }
}

impl TimelineView {
    /// The visible time range at `now`.
    pub fn range(&self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let end = self
            .end
            .unwrap_or_else(|| now + secs(self.span_secs * FUTURE_SHARE));
        (end - secs(self.span_secs), end)
    }

    /// Moves the view by `delta_secs` (positive: later). Moving to or past "now" follows it
    /// again.
    pub fn pan(&mut self, delta_secs: f64, now: DateTime<Utc>) {
        let (_, end) = self.range(now);
        let end = end + secs(delta_secs);
        let follow = now + secs(self.span_secs * FUTURE_SHARE);
        self.end = (end < follow).then_some(end);
    }

    /// Zooms by `factor` (< 1: closer) keeping the time at `anchor_share` of the width (0 =
    /// left edge, 1 = right edge) in place.
    pub fn zoom(&mut self, factor: f64, anchor_share: f64, now: DateTime<Utc>) {
        let (start, _) = self.range(now);
        let anchor = start + secs(self.span_secs * anchor_share);
        let span = (self.span_secs * factor).clamp(MIN_SPAN_SECS, MAX_SPAN_SECS);
        let end = anchor + secs(span * (1.0 - anchor_share));
        self.span_secs = span;
        let follow = now + secs(span * FUTURE_SHARE);
        self.end = (end < follow - secs(1.0)).then_some(end);
    }

    /// Shows a preset zoom around now.
    pub fn set_zoom(&mut self, zoom: Zoom) {
        self.span_secs = zoom.span_secs();
        self.end = None;
    }

    /// The preset this view is at, if any.
    pub fn preset(&self) -> Option<Zoom> {
        Zoom::ALL
            .into_iter()
            .find(|z| (z.span_secs() - self.span_secs).abs() < 1.0)
    }

    /// Brings `t` into view (centred) if it is not.
    pub fn reveal(&mut self, t: DateTime<Utc>, now: DateTime<Utc>) {
        let (start, end) = self.range(now);
        if t < start || t > end {
            let centred = t + secs(self.span_secs / 2.0);
            let follow = now + secs(self.span_secs * FUTURE_SHARE);
            self.end = (centred < follow).then_some(centred);
        }
    }
}

fn secs(s: f64) -> chrono::Duration {
    #[allow(clippy::cast_possible_truncation)] // spans are far below i64 milliseconds
    chrono::Duration::milliseconds((s * 1000.0) as i64)
}

/// One lane: a destination and this VM's checkpoints in it, oldest first.
#[derive(Debug)]
pub struct Lane<'a> {
    /// The destination's name.
    pub name: &'a str,
    /// Whether its store is there now.
    pub available: bool,
    /// The checkpoints, oldest first.
    pub checkpoints: Vec<&'a CheckpointSummary>,
}

/// What the timeline shows besides the lanes.
#[derive(Debug, Clone, Copy)]
pub struct Marks<'a> {
    /// The clock.
    pub now: DateTime<Utc>,
    /// The next scheduled checkpoint.
    pub next_run: Option<DateTime<Utc>>,
    /// The selected checkpoint.
    pub selected: Option<&'a CheckpointKey>,
}

/// The indexes of `times` (sorted) within `[from, to]`.
pub fn visible_range(
    times: &[&CheckpointSummary],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> std::ops::Range<usize> {
    let a = times.partition_point(|c| c.time < from);
    let b = times.partition_point(|c| c.time <= to);
    a..b.max(a)
}

/// The time between ticks so they are at least `min_px` apart: (seconds, months).
/// A step of months is counted in calendar months.
pub fn tick_step(span_secs: f64, width_px: f32, min_px: f32) -> (i64, u32) {
    const STEPS: [i64; 13] = [
        60, 300, 900, 1800, 3600, 10_800, 21_600, 43_200, 86_400, 172_800, 604_800, 1_209_600, 0,
    ];
    let per_px = span_secs / f64::from(width_px.max(1.0));
    for s in STEPS {
        if s == 0 {
            break;
        }
        #[allow(clippy::cast_precision_loss)] // small numbers
        if s as f64 / per_px >= f64::from(min_px) {
            return (s, 0);
        }
    }
    for months in [1u32, 3, 6, 12, 24, 60] {
        if f64::from(months) * 30.4 * 86_400.0 / per_px >= f64::from(min_px) {
            return (0, months);
        }
    }
    (0, 120)
}

/// Tick times within `[from, to]`, on local round times (midnights, month starts).
pub fn ticks(from: DateTime<Utc>, to: DateTime<Utc>, step: (i64, u32)) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    match step {
        (s, 0) if s > 0 => {
            let offset = i64::from(
                Local
                    .from_utc_datetime(&from.naive_utc())
                    .offset()
                    .local_minus_utc(),
            );
            let local = from.timestamp() + offset;
            let mut t = local.div_euclid(s) * s + s - offset;
            // Weeks start on Mondays.
            if s == 604_800 || s == 1_209_600 {
                t -= ((t + offset).div_euclid(86_400) + 3).rem_euclid(7) * 86_400;
                if t < from.timestamp() {
                    t += s;
                }
            }
            while t <= to.timestamp() && out.len() < 400 {
                if let Some(d) = DateTime::from_timestamp(t, 0) {
                    out.push(d);
                }
                t += s;
            }
        }
        (_, months) => {
            let months = months.max(1);
            let l = from.with_timezone(&Local);
            let mut index = l.year() * 12 + i32::try_from(l.month0()).unwrap_or(0);
            index = index.div_euclid(i32::try_from(months).unwrap_or(1))
                * i32::try_from(months).unwrap_or(1);
            loop {
                let (y, m) = (
                    index.div_euclid(12),
                    u32::try_from(index.rem_euclid(12)).unwrap_or(0) + 1,
                );
                let Some(t) = Local
                    .with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .earliest()
                    .map(|t| t.with_timezone(&Utc))
                else {
                    break;
                };
                if t > to || out.len() >= 400 {
                    break;
                }
                if t >= from {
                    out.push(t);
                }
                index += i32::try_from(months).unwrap_or(1);
            }
        }
    }
    out
}

fn tick_label(t: DateTime<Utc>, step: (i64, u32)) -> String {
    let l = t.with_timezone(&Local);
    match step {
        (s, 0) if s < 86_400 => {
            if l.format("%H:%M").to_string() == "00:00" {
                l.format("%a %-d %b").to_string()
            } else {
                l.format("%H:%M").to_string()
            }
        }
        (_, 0) => l.format("%a %-d %b").to_string(),
        (_, m) if m < 12 => l.format("%b %Y").to_string(),
        _ => l.format("%Y").to_string(),
    }
}

/// The colour of a checkpoint's marker.
pub fn marker_color(c: &CheckpointSummary) -> Color32 {
    match (c.kind, c.consistency) {
        (CheckpointKind::Full, _) => Color32::from_rgb(150, 100, 225),
        (_, Consistency::Application) => Color32::from_rgb(60, 170, 90),
        (_, Consistency::Crash) => Color32::from_rgb(225, 160, 40),
    }
}

/// The words for a checkpoint's kind and consistency.
pub fn kind_text(c: &CheckpointSummary) -> &'static str {
    match (c.kind, c.consistency) {
        (CheckpointKind::Full, _) => "full state (memory too)",
        (_, Consistency::Application) => "disks, application-consistent",
        (_, Consistency::Crash) => "disks, crash-consistent",
    }
}

/// The label of a checkpoint's marker (what a screen reader says, what tests look for).
pub fn marker_label(c: &CheckpointSummary) -> String {
    let mut s = format!(
        "Checkpoint {}",
        c.time.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S")
    );
    if c.is_safety() {
        s.push_str(" (safety)");
    }
    if c.damaged {
        s.push_str(" (damaged)");
    }
    s.push_str(super::bootcheck::label_suffix(c));
    s
}

fn radius(new_bytes: u64, max_new_bytes: u64) -> f32 {
    #[allow(clippy::cast_precision_loss)] // a drawing size
    let share =
        ((new_bytes as f64).ln_1p() / (max_new_bytes.max(2) as f64).ln_1p()).clamp(0.0, 1.0);
    #[allow(clippy::cast_possible_truncation)]
    let r = 3.5 + 4.5 * share as f32;
    r
}

/// Draws the timeline; returns the checkpoint clicked (or chosen with the arrow keys).
#[allow(clippy::too_many_lines)] // one drawing pass; the parts are in helpers below
pub fn timeline_ui(
    ui: &mut egui::Ui,
    view: &mut TimelineView,
    lanes: &[Lane<'_>],
    marks: Marks<'_>,
) -> Option<CheckpointKey> {
    let mut chosen = None;
    controls_ui(ui, view, marks.now);
    #[allow(clippy::cast_precision_loss)] // a handful of lanes
    let lanes_height = LANE_HEIGHT * lanes.len().max(1) as f32;
    let width = ui.available_width().max(LABEL_WIDTH + 100.0);
    let (outer, _) =
        ui.allocate_exact_size(Vec2::new(width, lanes_height + AXIS_HEIGHT), Sense::hover());
    let track = Rect::from_min_max(
        Pos2::new(outer.left() + LABEL_WIDTH, outer.top()),
        Pos2::new(outer.right() - 8.0, outer.bottom() - AXIS_HEIGHT),
    );
    let response = ui
        .interact(
            track,
            ui.scope_id().with("timeline_track"),
            Sense::click_and_drag(),
        )
        .on_hover_cursor(egui::CursorIcon::Grab);
    let (start, end) = view.range(marks.now);
    let secs_per_px = view.span_secs / f64::from(track.width());
    let x_of = |t: DateTime<Utc>| -> f32 {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let x = (t - start).num_milliseconds() as f64 / 1000.0 / secs_per_px;
        #[allow(clippy::cast_possible_truncation)]
        let x = x as f32;
        track.left() + x
    };

    // Dragging pans; the wheel zooms around the pointer, sideways scrolling pans.
    if response.dragged() {
        view.pan(-f64::from(response.drag_delta().x) * secs_per_px, marks.now);
    }
    if response.hovered() {
        let (scroll, zoom_delta, pointer) =
            ui.input(|i| (i.smooth_scroll_delta, i.zoom_delta(), i.pointer.hover_pos()));
        let anchor = pointer.map_or(1.0, |p| {
            f64::from(((p.x - track.left()) / track.width()).clamp(0.0, 1.0))
        });
        if scroll.y.abs() > 0.0 {
            view.zoom((-f64::from(scroll.y) * 0.004).exp(), anchor, marks.now);
        } else if (zoom_delta - 1.0).abs() > f32::EPSILON {
            view.zoom(1.0 / f64::from(zoom_delta), anchor, marks.now);
        }
        if scroll.x.abs() > 0.0 {
            view.pan(-f64::from(scroll.x) * secs_per_px, marks.now);
        }
    }

    let painter = ui.painter_at(outer);
    let visuals = ui.visuals().clone();
    let weak = visuals.weak_text_color();
    let font = FontId::proportional(11.0);
    painter.rect_filled(track, 4.0, visuals.extreme_bg_color);

    axis(
        &painter,
        track,
        view.span_secs,
        (start, end),
        &x_of,
        &visuals,
        &font,
    );

    let has_any = lanes.iter().any(|l| !l.checkpoints.is_empty());
    if !has_any {
        painter.text(
            track.center(),
            Align2::CENTER_CENTER,
            "No checkpoints yet",
            FontId::proportional(13.0),
            weak,
        );
    }

    for (i, lane) in lanes.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let top = track.top() + LANE_HEIGHT * i as f32;
        let mid = top + LANE_HEIGHT / 2.0;
        let name_color = if lane.available {
            visuals.text_color()
        } else {
            weak
        };
        painter.text(
            Pos2::new(outer.left() + 4.0, mid),
            Align2::LEFT_CENTER,
            if lane.available {
                lane.name.to_owned()
            } else {
                format!("{} (absent)", lane.name)
            },
            FontId::proportional(12.0),
            name_color,
        );
        if i > 0 {
            painter.line_segment(
                [Pos2::new(track.left(), top), Pos2::new(track.right(), top)],
                Stroke::new(1.0, visuals.faint_bg_color),
            );
        }
        let range = visible_range(&lane.checkpoints, start, end);
        let visible = &lane.checkpoints[range.clone()];
        let max_new = visible.iter().map(|c| c.new_bytes).max().unwrap_or(1);
        let mut last_x = f32::NEG_INFINITY;
        for c in visible {
            let key = CheckpointKey::of(lane.name, c);
            let selected = marks.selected == Some(&key);
            let x = x_of(c.time);
            // Of markers closer than a few pixels, the first stands for them all.
            if !selected && !c.damaged && !super::bootcheck::failed(c) && x - last_x < MERGE_PX {
                continue;
            }
            last_x = x;
            let r = radius(c.new_bytes, max_new);
            let center = Pos2::new(x, mid);
            let hit = Rect::from_center_size(center, Vec2::splat((r * 2.0).max(12.0)));
            let id = ui
                .scope_id()
                .with(("checkpoint", lane.name, &c.id, c.vm_uuid));
            let marker = ui.interact(hit, id, Sense::click());
            let label = marker_label(c);
            marker.widget_info(|| {
                egui::WidgetInfo::selected(egui::Role::Button, true, selected, label.clone())
            });
            paint_marker(
                &painter,
                &visuals,
                c,
                center,
                r,
                (selected, marker.has_focus()),
            );
            if marker.clicked() {
                chosen = Some(key.clone());
            }
            if marker.has_focus()
                && let Some(other) = arrow_step(ui, &lane.checkpoints, c)
            {
                chosen = Some(CheckpointKey::of(lane.name, other));
                view.reveal(other.time, marks.now);
                let focus = ui
                    .scope_id()
                    .with(("checkpoint", lane.name, &other.id, other.vm_uuid));
                ui.memory_mut(|m| m.request_focus(focus));
            }
            marker.on_hover_ui(|ui| checkpoint_tooltip_ui(ui, c, lane.name));
        }
        if let Some(next) = marks.next_run
            && next >= start
            && next <= end
        {
            next_run_ui(ui, &painter, Pos2::new(x_of(next), mid), next, i, weak);
        }
    }

    // Now.
    if marks.now >= start && marks.now <= end {
        let x = x_of(marks.now);
        let red = Color32::from_rgb(220, 70, 70);
        painter.line_segment(
            [Pos2::new(x, track.top()), Pos2::new(x, track.bottom())],
            Stroke::new(1.5, red),
        );
        painter.text(
            Pos2::new(x + 3.0, track.top() + 1.0),
            Align2::LEFT_TOP,
            "now",
            font,
            red,
        );
    }
    legend_ui(ui);
    chosen
}

fn axis(
    painter: &egui::Painter,
    track: Rect,
    span_secs: f64,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    x_of: &dyn Fn(DateTime<Utc>) -> f32,
    visuals: &egui::Visuals,
    font: &FontId,
) {
    let step = tick_step(span_secs, track.width(), 90.0);
    for t in ticks(start, end, step) {
        let x = x_of(t);
        painter.line_segment(
            [Pos2::new(x, track.top()), Pos2::new(x, track.bottom())],
            Stroke::new(1.0, visuals.faint_bg_color),
        );
        painter.text(
            Pos2::new(x, track.bottom() + 3.0),
            Align2::CENTER_TOP,
            tick_label(t, step),
            font.clone(),
            visuals.weak_text_color(),
        );
    }
}

/// Draws one marker: filled by kind and consistency, a ring for safety checkpoints, a
/// red ring and "!" when damaged, a tick when verified, a small screen under it when
/// boot-checked.
fn paint_marker(
    painter: &egui::Painter,
    visuals: &egui::Visuals,
    c: &CheckpointSummary,
    center: Pos2,
    r: f32,
    (selected, focused): (bool, bool),
) {
    let weak = visuals.weak_text_color();
    let (x, mid) = (center.x, center.y);
    let color = marker_color(c);
    if c.is_safety() {
        painter.circle_stroke(center, r, Stroke::new(2.0, weak));
    } else {
        painter.circle_filled(center, r, color);
    }
    if c.damaged {
        painter.circle_stroke(center, r + 2.5, Stroke::new(2.0, visuals.error_fg_color));
        painter.text(
            Pos2::new(x, mid - r - 3.0),
            Align2::CENTER_BOTTOM,
            "!",
            FontId::proportional(12.0),
            visuals.error_fg_color,
        );
    } else if c.verified.is_some() {
        painter.text(
            Pos2::new(x, mid - r - 2.0),
            Align2::CENTER_BOTTOM,
            "✔",
            FontId::proportional(9.0),
            color,
        );
    }
    super::bootcheck::paint_mark(painter, visuals, c, center, r);
    if selected {
        painter.circle_stroke(
            center,
            r + 4.0,
            Stroke::new(2.0, visuals.selection.stroke.color),
        );
    }
    if focused {
        painter.circle_stroke(center, r + 6.0, visuals.widgets.hovered.fg_stroke);
    }
}

/// The checkpoint the left or right arrow key moves to from `c`.
fn arrow_step<'a>(
    ui: &egui::Ui,
    checkpoints: &[&'a CheckpointSummary],
    c: &CheckpointSummary,
) -> Option<&'a CheckpointSummary> {
    let (left, right) = ui.input(|i| {
        (
            i.key_pressed(egui::Key::ArrowLeft),
            i.key_pressed(egui::Key::ArrowRight),
        )
    });
    let p = checkpoints
        .iter()
        .position(|o| o.id == c.id && o.vm_uuid == c.vm_uuid)?;
    let q = if left {
        p.checked_sub(1)?
    } else if right {
        Some(p + 1).filter(|q| *q < checkpoints.len())?
    } else {
        return None;
    };
    Some(checkpoints[q])
}

/// The next scheduled checkpoint: an outlined diamond with a tooltip.
fn next_run_ui(
    ui: &egui::Ui,
    painter: &egui::Painter,
    at: Pos2,
    next: DateTime<Utc>,
    lane: usize,
    color: Color32,
) {
    let d = 5.0;
    let pts = vec![
        Pos2::new(at.x, at.y - d),
        Pos2::new(at.x + d, at.y),
        Pos2::new(at.x, at.y + d),
        Pos2::new(at.x - d, at.y),
    ];
    painter.add(egui::Shape::closed_line(pts, Stroke::new(1.5, color)));
    let hit = Rect::from_center_size(at, Vec2::splat(12.0));
    let label = format!(
        "Next checkpoint {}",
        next.with_timezone(&Local).format("%Y-%m-%d %H:%M")
    );
    let r = ui.interact(hit, ui.scope_id().with(("next_run", lane)), Sense::hover());
    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, label.clone()));
    r.on_hover_text(label);
}

fn controls_ui(ui: &mut egui::Ui, view: &mut TimelineView, now: DateTime<Utc>) {
    ui.horizontal(|ui| {
        ui.label("Zoom:");
        let current = view.preset();
        for z in Zoom::ALL {
            if ui
                .selectable_label(current == Some(z), z.label())
                .on_hover_text(format!(
                    "Show the last {}",
                    match z {
                        Zoom::Hours => "12 hours",
                        Zoom::Days => "7 days",
                        Zoom::Weeks => "8 weeks",
                        Zoom::Months => "12 months",
                    }
                ))
                .clicked()
            {
                view.set_zoom(z);
            }
        }
        ui.separator();
        if ui.button("◀").on_hover_text("Earlier").clicked() {
            view.pan(-view.span_secs / 2.0, now);
        }
        if ui
            .add_enabled(view.end.is_some(), egui::Button::new("▶"))
            .on_hover_text("Later")
            .clicked()
        {
            view.pan(view.span_secs / 2.0, now);
        }
        if ui
            .add_enabled(view.end.is_some(), egui::Button::new("Now"))
            .on_hover_text("Back to now")
            .clicked()
        {
            view.end = None;
        }
        ui.label(
            egui::RichText::new("Drag to move, scroll to zoom")
                .weak()
                .small(),
        );
    });
}

fn legend_ui(ui: &mut egui::Ui) {
    ui.horizontal_wrapped(|ui| {
        let dot = |ui: &mut egui::Ui, color: Color32, text: &str| {
            ui.label(egui::RichText::new("⏺").color(color));
            ui.label(egui::RichText::new(text).small());
        };
        dot(ui, Color32::from_rgb(60, 170, 90), "application-consistent");
        dot(ui, Color32::from_rgb(225, 160, 40), "crash-consistent");
        dot(ui, Color32::from_rgb(150, 100, 225), "full state");
        ui.label(egui::RichText::new("○").weak());
        ui.label(egui::RichText::new("safety (before a restore)").small());
        ui.label(
            egui::RichText::new(
                "✔ verified · ! damaged · screen below: it boots (red, crossed: it did not) · \
                 outlined diamond: the next one",
            )
            .small(),
        );
        ui.label(egui::RichText::new("bigger = more changed").small().weak());
    });
}

/// The details shown when hovering a marker.
pub fn checkpoint_tooltip_ui(ui: &mut egui::Ui, c: &CheckpointSummary, destination: &str) {
    ui.strong(
        c.time
            .with_timezone(&Local)
            .format("%A %-d %B %Y, %H:%M:%S")
            .to_string(),
    );
    ui.label(kind_text(c));
    ui.label(format!(
        "{} of data, {} new{}",
        human_bytes(c.logical_bytes),
        human_bytes(c.new_bytes),
        if c.incremental {
            ", incremental"
        } else {
            ", full"
        }
    ));
    ui.label(format!("in {destination}"));
    if c.is_safety() {
        ui.label("Safety checkpoint taken before a restore");
    }
    if c.damaged {
        ui.colored_label(
            ui.visuals().error_fg_color,
            "Damaged: the last verify found missing or bad data",
        );
    } else if let Some(t) = c.verified {
        ui.label(format!(
            "Verified {}",
            t.with_timezone(&Local).format("%Y-%m-%d %H:%M")
        ));
    }
    super::bootcheck::hover_ui(ui, c);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Duration;

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, 0, 0).unwrap()
    }

    #[test]
    fn the_view_follows_now_until_panned_back_and_returns_when_panned_forward() {
        let now = at(12);
        let mut v = TimelineView {
            span_secs: 3600.0 * 10.0,
            end: None,
        };
        let (start, end) = v.range(now);
        assert!(end > now && start < now);
        v.pan(-3600.0, now);
        assert!(v.end.is_some());
        let (_, end2) = v.range(now);
        assert_eq!(end - end2, Duration::hours(1));
        v.pan(7200.0, now);
        assert_eq!(v.end, None, "panning past now follows now again");
    }

    #[test]
    fn zoom_keeps_the_anchor_in_place_and_stays_within_bounds() {
        let now = at(12);
        let mut v = TimelineView {
            span_secs: 86_400.0,
            end: Some(at(6)),
        };
        let (start, _) = v.range(now);
        let anchor = start + secs(86_400.0 * 0.25);
        v.zoom(0.5, 0.25, now);
        let (start2, _) = v.range(now);
        let anchor2 = start2 + secs(v.span_secs * 0.25);
        assert!((anchor2 - anchor).num_seconds().abs() <= 1);
        assert!((v.span_secs - 43_200.0).abs() < 1.0);
        v.zoom(1e-9, 0.5, now);
        assert!((v.span_secs - MIN_SPAN_SECS).abs() < 1e-6);
        v.zoom(1e12, 0.5, now);
        assert!((v.span_secs - MAX_SPAN_SECS).abs() < 1e-6);
        v.set_zoom(Zoom::Weeks);
        assert_eq!(v.preset(), Some(Zoom::Weeks));
        assert_eq!(v.end, None);
    }

    #[test]
    fn ticks_are_far_enough_apart_and_on_round_times() {
        // 12 hours over 1200 px: an hour is 100 px.
        assert_eq!(tick_step(43_200.0, 1200.0, 90.0), (3600, 0));
        // A year over 1000 px: months.
        let (s, m) = tick_step(365.0 * 86_400.0, 1000.0, 90.0);
        assert_eq!((s, m), (0, 3));
        let t = ticks(at(0) + Duration::minutes(7), at(6), (3600, 0));
        assert_eq!(t.len(), 6);
        for w in t.windows(2) {
            assert_eq!(w[1] - w[0], Duration::hours(1));
        }
        let m = ticks(at(0), at(0) + Duration::days(200), (0, 1));
        assert!(m.len() >= 6, "{m:?}");
        for t in m {
            assert_eq!(t.with_timezone(&Local).day(), 1);
        }
    }

    #[test]
    fn only_the_visible_range_is_looked_at() {
        let cps: Vec<CheckpointSummary> = (0..10_000)
            .map(|i| {
                let mut c = sample(at(0) + Duration::minutes(i));
                c.id = i.to_string();
                c
            })
            .collect();
        let refs: Vec<&CheckpointSummary> = cps.iter().collect();
        let r = visible_range(&refs, at(1), at(2));
        assert_eq!(r, 60..121);
        assert_eq!(
            visible_range(&refs, at(0) - Duration::days(2), at(0) - Duration::days(1)),
            0..0
        );
    }

    #[test]
    fn bigger_changes_draw_bigger_markers() {
        assert!(radius(1 << 30, 1 << 30) > radius(1 << 20, 1 << 30));
        assert!(radius(0, 0) >= 3.5);
        assert!(radius(u64::MAX, 1) <= 8.0 + f32::EPSILON);
    }

    pub(crate) fn sample(t: DateTime<Utc>) -> CheckpointSummary {
        CheckpointSummary {
            id: t.format("%Y%m%dT%H%M%SZ").to_string(),
            vm: "win11".into(),
            vm_uuid: uuid::Uuid::nil(),
            time: t,
            kind: CheckpointKind::Disk,
            consistency: Consistency::Application,
            consistency_note: None,
            incremental: true,
            full_reason: None,
            logical_bytes: 1 << 30,
            new_bytes: 1 << 20,
            duration_ms: 1000,
            labels: Vec::new(),
            disks: vec!["vda".into()],
            damaged: false,
            verified: None,
            boot_check: None,
        }
    }
}
