//! Benchmark (issue 7): how long one frame of the timeline takes with 10,000 checkpoints
//! (a checkpoint every 15 minutes for 104 days, one lane), at each zoom preset and with all
//! of them in view, while the pointer rests on a marker so hovering and its tooltip run.
//! The target is under 16 ms a frame on the 2-core, GPU-less test machine.
//!
//! Per zoom it reports, over [`FRAMES`] frames after a warm-up:
//!
//! - `timeline_ui` alone (measured inside the frame);
//! - one egui pass as the window runs it (no screen reader, so no AccessKit tree): layout
//!   and shapes, in a plain `egui::Context`;
//! - tessellating that pass's shapes into meshes (what the renderer does next);
//! - `Harness::step` of `egui_kittest`: the same pass plus the AccessKit tree kittest
//!   always builds, so an upper bound;
//! - for a few frames, the kittest wgpu render (software Vulkan, lavapipe) with the read
//!   back of the picture: far more than a real frame, which needs no read back.
//!
//! The same frame with an empty lane is the baseline, and the whole window (`main_ui`, with
//! the VM list and the checkpoint's details) is measured at two zooms too.
//!
//! ```sh
//! cargo test --release -p rewind --bin rewind -- --ignored bench_ --nocapture
//! ```
//!
//! It prints Markdown tables; `app/BENCHMARKS.md` keeps the results. Nothing here passes
//! or fails on timing.

// Figures are formatted from counts and durations; precision loss there is harmless.
#![allow(clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone as _, Utc};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;
use rewind_core::config::{Config, Destination, Protection};
use rewind_core::destination::Availability;
use rewind_core::engine::SchedulerView;
use rewind_core::libvirt::Hypervisor;
use rewind_core::store::{CheckpointKind, Consistency};
use rewind_core::view::catalog::{CheckpointSummary, DestinationView};

use super::main_ui;
use super::state::{CheckpointKey, Connection, UiState};
use super::timeline::{Lane, Marks, TimelineView, Zoom, timeline_ui, visible_range};

/// Frames measured per case, after [`WARM_UP`] frames.
const FRAMES: usize = 200;
const WARM_UP: usize = 30;
/// Frames rendered with wgpu per case (each reads the picture back).
const RENDER_FRAMES: usize = 20;
const CHECKPOINTS: usize = 10_000;
const EVERY_MINUTES: i64 = 15;
/// The timeline alone: as wide as the window's timeline gets at its default size and more.
const TIMELINE_SIZE: egui::Vec2 = egui::Vec2::new(1100.0, 200.0);
/// The whole window, as in the snapshot tests.
const WINDOW: egui::Vec2 = egui::Vec2::new(1100.0, 740.0);
const LANE: &str = "BACKUP";

fn fixed_now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
}

/// `n` checkpoints, one every 15 minutes, the newest 5 minutes before `now`: sizes spread
/// over three orders of magnitude, a full one a day, some crash-consistent, the older half
/// verified, a few damaged and a few safety checkpoints (those are never merged away).
fn checkpoints(n: usize, vm_uuid: uuid::Uuid, now: DateTime<Utc>) -> Vec<CheckpointSummary> {
    let newest = now - chrono::Duration::minutes(5);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            let back = i64::try_from(n - 1 - i).unwrap() * EVERY_MINUTES;
            let t = newest - chrono::Duration::minutes(back);
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let full = i % 96 == 0;
            CheckpointSummary {
                id: t.format("%Y%m%dT%H%M%SZ").to_string(),
                vm: "test".into(),
                vm_uuid,
                time: t,
                kind: if i % 500 == 250 {
                    CheckpointKind::Full
                } else {
                    CheckpointKind::Disk
                },
                consistency: if i % 7 == 3 {
                    Consistency::Crash
                } else {
                    Consistency::Application
                },
                consistency_note: None,
                incremental: !full,
                full_reason: None,
                logical_bytes: 40 << 30,
                new_bytes: if full {
                    20 << 30
                } else {
                    (1 << 20) << ((seed >> 33) % 10)
                },
                duration_ms: 4000,
                labels: if i % 1000 == 500 {
                    vec!["safety".into()]
                } else {
                    Vec::new()
                },
                disks: vec!["vda".into()],
                damaged: i % 2500 == 1234,
                verified: (i < n / 2).then(|| now - chrono::Duration::days(1)),
                boot_check: None,
            }
        })
        .collect()
}

/// What the timeline benchmark draws.
struct Scene {
    checkpoints: Vec<CheckpointSummary>,
    view: TimelineView,
    now: DateTime<Utc>,
    selected: Option<CheckpointKey>,
    /// How long the last `timeline_ui` took.
    timeline: Duration,
}

impl Scene {
    fn new(n: usize) -> Self {
        let now = fixed_now();
        let checkpoints = checkpoints(n, uuid::Uuid::nil(), now);
        let selected = checkpoints
            .get(n.saturating_sub(10))
            .map(|c| CheckpointKey::of(LANE, c));
        Self {
            checkpoints,
            view: TimelineView::default(),
            now,
            selected,
            timeline: Duration::ZERO,
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui) {
        // As the window does: the lane's list of references is built every frame.
        let lane = Lane {
            name: LANE,
            available: true,
            checkpoints: self.checkpoints.iter().collect(),
        };
        let marks = Marks {
            now: self.now,
            next_run: Some(self.now + chrono::Duration::minutes(10)),
            selected: self.selected.as_ref(),
        };
        let t = Instant::now();
        let _ = timeline_ui(ui, &mut self.view, std::slice::from_ref(&lane), marks);
        self.timeline = t.elapsed();
    }

    fn visible(&self) -> usize {
        let refs: Vec<&CheckpointSummary> = self.checkpoints.iter().collect();
        let (from, to) = self.view.range(self.now);
        visible_range(&refs, from, to).len()
    }
}

/// The views measured: the presets, then a span that holds every checkpoint.
fn views() -> Vec<(&'static str, TimelineView)> {
    let mut out: Vec<(&'static str, TimelineView)> = Zoom::ALL
        .into_iter()
        .map(|z| {
            let mut v = TimelineView::default();
            v.set_zoom(z);
            (z.label(), v)
        })
        .collect();
    // 104 days of checkpoints plus the share kept for the future and a margin.
    out.push((
        "whole range (120 days)",
        TimelineView {
            span_secs: 120.0 * 86_400.0,
            end: None,
        },
    ));
    out
}

/// Median and 95th percentile in milliseconds.
type Stats = (f64, f64);

/// The [`Stats`] of `samples`.
fn stats(samples: &mut [Duration]) -> Stats {
    samples.sort_unstable();
    let at = |q: f64| {
        // An index into a short list.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.95))
}

fn ms((median, p95): (f64, f64)) -> String {
    format!("{median:.2} / {p95:.2}")
}

/// One measured case.
struct Row {
    case: String,
    visible: usize,
    drawn: usize,
    /// Whether a tooltip showed (kittest).
    tooltip: bool,
    timeline: (f64, f64),
    pass: (f64, f64),
    tessellate: (f64, f64),
    /// Vertices of the last frame in kittest and in the plain passes (equal: same picture).
    vertices: (usize, usize),
    step: (f64, f64),
    render: (f64, f64),
}

/// The centre of a marker in the middle of the track, or of the track itself.
fn hover_target(h: &Harness<'_, Scene>) -> egui::Pos2 {
    let mut markers: Vec<egui::Pos2> = h
        .query_all_by_label_contains("Checkpoint 20")
        .map(|n| n.rect().center())
        .collect();
    markers.sort_by(|a, b| a.x.total_cmp(&b.x));
    markers.get(markers.len() / 2).copied().unwrap_or_else(|| {
        // No marker: the middle of the track, the hover area under the zoom buttons.
        let zoom = h.get_by_label("Hours").rect();
        egui::pos2(TIMELINE_SIZE.x / 2.0, zoom.bottom() + 20.0)
    })
}

fn vertex_count(meshes: &[egui::ClippedPrimitive]) -> usize {
    meshes
        .iter()
        .map(|m| match &m.primitive {
            egui::epaint::Primitive::Mesh(mesh) => mesh.vertices.len(),
            egui::epaint::Primitive::Callback(_) => 0,
        })
        .sum()
}

/// Times `FRAMES` egui passes of `scene` in a plain context (no AccessKit), with the
/// pointer at `pointer`; returns (`timeline_ui`, pass, tessellation, vertices of the last).
fn plain_passes(
    scene: &mut Scene,
    size: egui::Vec2,
    pointer: egui::Pos2,
) -> (Stats, Stats, Stats, usize) {
    let ctx = egui::Context::default();
    let input = |frame: usize, events: Vec<egui::Event>| egui::RawInput {
        screen_rect: Some(egui::Rect::from_min_size(egui::Pos2::ZERO, size)),
        time: Some(frame as f64 / 60.0),
        predicted_dt: 1.0 / 60.0,
        events,
        ..Default::default()
    };
    let (mut timeline, mut pass, mut tess) = (Vec::new(), Vec::new(), Vec::new());
    let mut vertices = 0;
    // 60 frames of 1/60 s: past the tooltip's half-second delay.
    let warm_up = 60;
    for frame in 0..warm_up + FRAMES {
        let events = if frame == 0 {
            vec![egui::Event::PointerMoved(pointer)]
        } else {
            Vec::new()
        };
        let raw = input(frame, events);
        let t = Instant::now();
        let output = ctx.run_ui(raw, |ui| scene.ui(ui));
        let pass_time = t.elapsed();
        let t = Instant::now();
        let meshes = ctx.tessellate(output.shapes, output.pixels_per_point);
        let tess_time = t.elapsed();
        if frame >= warm_up {
            timeline.push(scene.timeline);
            pass.push(pass_time);
            tess.push(tess_time);
            vertices = vertex_count(&meshes);
        }
    }
    (
        stats(&mut timeline),
        stats(&mut pass),
        stats(&mut tess),
        vertices,
    )
}

/// Measures one case: kittest steps and renders, then plain passes at the same pointer.
fn measure(case: String, scene: Scene, pointer: Option<egui::Pos2>) -> (Row, egui::Pos2) {
    let view = scene.view.clone();
    let mut h = Harness::builder()
        .with_size(TIMELINE_SIZE)
        .wgpu()
        .build_ui_state(|ui, s: &mut Scene| s.ui(ui), scene);
    h.step();
    h.step();
    let pointer = pointer.unwrap_or_else(|| hover_target(&h));
    h.hover_at(pointer);
    for _ in 0..WARM_UP {
        h.step();
    }
    let tooltip = h.query_by_label_contains(" of data, ").is_some();
    let drawn = h.query_all_by_label_contains("Checkpoint 20").count();
    let (mut step, mut timeline) = (Vec::new(), Vec::new());
    for _ in 0..FRAMES {
        let t = Instant::now();
        h.step();
        step.push(t.elapsed());
        timeline.push(h.state().timeline);
    }
    let mut render = Vec::new();
    for i in 0..3 + RENDER_FRAMES {
        h.step();
        let t = Instant::now();
        h.render().expect("render with wgpu");
        if i >= 3 {
            render.push(t.elapsed());
        }
    }
    assert_eq!(h.state().view, view, "the view stayed where it was put");
    let visible = h.state().visible();
    let kittest_vertices = vertex_count(
        &h.ctx
            .tessellate(h.output().shapes.clone(), h.output().pixels_per_point),
    );
    let mut scene = h.into_state();
    let (_, pass, tessellate, vertices) = plain_passes(&mut scene, TIMELINE_SIZE, pointer);
    let row = Row {
        case,
        visible,
        drawn,
        tooltip,
        vertices: (kittest_vertices, vertices),
        timeline: stats(&mut timeline),
        pass,
        tessellate,
        step: stats(&mut step),
        render: stats(&mut render),
    };
    (row, pointer)
}

fn print_rows(rows: &[Row]) {
    println!(
        "| case | in view | markers drawn | tooltip | `timeline_ui` | egui pass | tessellate | vertices (kittest / plain) | kittest `step` (+AccessKit) | wgpu render + read back |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            r.case,
            r.visible,
            r.drawn,
            if r.tooltip { "shown" } else { "none" },
            ms(r.timeline),
            ms(r.pass),
            ms(r.tessellate),
            r.vertices.0,
            r.vertices.1,
            ms(r.step),
            ms(r.render),
        );
    }
}

#[test]
#[ignore = "benchmark; run: cargo test --release -p rewind --bin rewind -- --ignored bench_ --nocapture"]
fn bench_timeline_frame_time_with_10000_checkpoints() {
    let mut rows = Vec::new();
    let mut pointer = None;
    for (name, view) in views() {
        let mut scene = Scene::new(CHECKPOINTS);
        scene.view = view;
        let (row, at) = measure(format!("10,000, {name}"), scene, None);
        if name == Zoom::Days.label() {
            pointer = Some(at);
        }
        rows.push(row);
    }
    // Baseline: the same frame, an empty lane, the pointer where it was at Days.
    for (name, view) in views()
        .into_iter()
        .filter(|(n, _)| *n == Zoom::Days.label() || n.starts_with("whole"))
    {
        let mut scene = Scene::new(0);
        scene.view = view;
        rows.push(measure(format!("baseline: 0, {name}"), scene, pointer).0);
    }
    println!(
        "\n### Timeline frame time, {CHECKPOINTS} checkpoints every {EVERY_MINUTES} min, one lane, {}x{} pt\n",
        TIMELINE_SIZE.x, TIMELINE_SIZE.y
    );
    println!("median / p95 in ms over {FRAMES} frames ({RENDER_FRAMES} for the render)\n");
    print_rows(&rows);
    println!();
}

/// The window with the test driver's VM selected and `n` checkpoints of it in one
/// destination (as the snapshot tests' fixture, with more checkpoints).
fn window_state(n: usize, view: TimelineView) -> UiState {
    let hv = Hypervisor::connect("test:///default").unwrap();
    let vms = hv.list_vms().unwrap();
    let vm = &vms[0];
    let uuid: uuid::Uuid = vm.uuid.parse().unwrap();
    let now = fixed_now();
    let checkpoints = checkpoints(n, uuid, now);
    let destination = Destination {
        name: LANE.into(),
        location: "/media/me/BACKUP/rewind".into(),
        store_id: None,
        passphrase_file: None,
        store_secret: None,
    };
    let config = Config {
        uri: "test:///default".into(),
        destinations: vec![destination.clone()],
        vms: vec![Protection {
            vm: vm.name.clone(),
            uuid: Some(vm.uuid.clone()),
            destinations: vec![LANE.into()],
            interval_secs: 900,
            ..Protection::default()
        }],
        ..Config::default()
    };
    let selected = checkpoints
        .get(n.saturating_sub(10))
        .map(|c| CheckpointKey::of(LANE, c));
    UiState {
        uri: "test:///default".into(),
        connection: Connection::Connected,
        selected: Some(vm.uuid.clone()),
        vms: Some(vms),
        config: Some(Arc::new(config)),
        destinations: Some(Arc::new(vec![DestinationView {
            destination,
            found: Availability::Folder("/media/me/BACKUP/rewind".into()),
            checkpoints,
            error: None,
            fully_checked: None,
        }])),
        scheduler: Some(SchedulerView::Here),
        checkpoint: selected,
        timeline: view,
        now,
        ..UiState::default()
    }
}

#[test]
#[ignore = "benchmark; run: cargo test --release -p rewind --bin rewind -- --ignored bench_ --nocapture"]
#[allow(clippy::too_many_lines)] // one table, case by case
fn bench_window_frame_time_with_10000_checkpoints() {
    println!(
        "\n### Whole window (`main_ui`), {}x{} pt\n",
        WINDOW.x, WINDOW.y
    );
    println!("median / p95 in ms over {FRAMES} frames, pointer on a marker\n");
    println!(
        "| case | markers drawn | tooltip | kittest `step` (+AccessKit) | egui pass | tessellate |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    let cases = views();
    for n in [CHECKPOINTS, 0] {
        for (name, view) in cases
            .iter()
            .filter(|(n, _)| *n == Zoom::Days.label() || n.starts_with("whole"))
        {
            let mut h = Harness::builder().with_size(WINDOW).build_ui_state(
                |ui, s: &mut UiState| {
                    drop(main_ui(ui, s));
                },
                window_state(n, view.clone()),
            );
            h.step();
            h.step();
            let mut markers: Vec<egui::Pos2> = h
                .query_all_by_label_contains("Checkpoint 20")
                .map(|node| node.rect().center())
                .collect();
            markers.sort_by(|a, b| a.x.total_cmp(&b.x));
            let pointer = markers
                .get(markers.len() / 2)
                .copied()
                .unwrap_or(egui::pos2(WINDOW.x / 2.0, 200.0));
            h.hover_at(pointer);
            for _ in 0..WARM_UP {
                h.step();
            }
            let tooltip = h.query_by_label_contains(" of data, ").is_some();
            let drawn = h.query_all_by_label_contains("Checkpoint 20").count();
            let mut step = Vec::new();
            for _ in 0..FRAMES {
                let t = Instant::now();
                h.step();
                step.push(t.elapsed());
            }
            let mut state = h.into_state();
            let ctx = egui::Context::default();
            let (mut pass, mut tess) = (Vec::new(), Vec::new());
            let warm_up = 60;
            for frame in 0..warm_up + FRAMES {
                let raw = egui::RawInput {
                    screen_rect: Some(egui::Rect::from_min_size(egui::Pos2::ZERO, WINDOW)),
                    time: Some(frame as f64 / 60.0),
                    predicted_dt: 1.0 / 60.0,
                    events: if frame == 0 {
                        vec![egui::Event::PointerMoved(pointer)]
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                };
                let t = Instant::now();
                let output = ctx.run_ui(raw, |ui| {
                    drop(main_ui(ui, &mut state));
                });
                let pass_time = t.elapsed();
                let t = Instant::now();
                let _ = ctx.tessellate(output.shapes, output.pixels_per_point);
                if frame >= warm_up {
                    tess.push(t.elapsed());
                    pass.push(pass_time);
                }
            }
            println!(
                "| {}, {name} | {drawn} | {} | {} | {} | {} |",
                if n == 0 { "baseline: 0" } else { "10,000" },
                if tooltip { "shown" } else { "none" },
                ms(stats(&mut step)),
                ms(stats(&mut pass)),
                ms(stats(&mut tess)),
            );
        }
    }
    println!();
}
