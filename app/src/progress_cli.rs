//! The progress of a long job on stderr: a bar with rate and ETA on a terminal (indicatif),
//! plain lines otherwise (a log, a pipe, CI), so that stdout stays the command's result.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rewind_core::progress::Control;
use rewind_core::units::human_bytes;

/// How often the job's [`Control`] is looked at.
const TICK: Duration = Duration::from_millis(200);

/// A job's progress on stderr, following its [`Control`] until dropped: on a terminal a bar
/// (the phase, then once the size is known the bar, percent, bytes, rate and time left);
/// elsewhere a line at each phase and at most every 10 % or 10 s of copying, each starting
/// with `progress:` (as errors start with `error:`).
pub(crate) struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// While the size is unknown: `win11: preparing…`.
const WAITING: &str = "{prefix}: {msg}…";
/// `win11: copying [#######>............]  35 %  120.00 MiB of 340.00 MiB, 88.20 MiB/s, 3s left`.
const COPYING: &str = "{prefix}: {msg} [{bar:20}] {percent:>3} %  {binary_bytes} of {binary_total_bytes}, {binary_bytes_per_sec}, {eta} left";

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .expect("the templates are valid (tested)")
        .progress_chars("#>.")
}

/// The phase's words, with the countdown of a shutdown that turns the VM off.
fn phase_text(control: &Control) -> String {
    match control.force_off_in() {
        Some(left) => format!(
            "{} (turned off in {} s; Ctrl-C leaves it running)",
            control.phase().label(),
            left.as_secs()
        ),
        None => control.phase().label().to_owned(),
    }
}

impl Progress {
    /// Follows `control`, the job of `label` (a VM's name, or what is done).
    pub(crate) fn start(label: &str, control: Arc<Control>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let label = label.to_owned();
        let terminal = std::io::stderr().is_terminal();
        let thread = std::thread::Builder::new()
            .name("rewind-progress".into())
            .spawn(move || {
                if terminal {
                    draw_bar(&label, &control, &stop);
                } else {
                    write_lines(&label, &control, &stop);
                }
            })
            .map_err(|e| tracing::warn!("no progress shown: could not start its thread: {e}"))
            .ok();
        Self { done, thread }
    }
}

/// The bar on a terminal, until `stop`.
fn draw_bar(label: &str, control: &Control, stop: &AtomicBool) {
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(5),
    )
    .with_style(style(WAITING))
    .with_prefix(label.to_owned());
    let mut sized = false;
    while !stop.load(Ordering::Relaxed) {
        let (done_bytes, total_bytes) = control.progress_bytes();
        if total_bytes > 0 && !sized {
            bar.set_style(style(COPYING));
            sized = true;
        }
        if total_bytes > 0 {
            bar.set_length(total_bytes);
            bar.set_position(done_bytes.min(total_bytes));
        }
        bar.set_message(phase_text(control));
        std::thread::sleep(TICK);
    }
    bar.finish_and_clear();
}

/// Plain lines on stderr, until `stop`.
fn write_lines(label: &str, control: &Control, stop: &AtomicBool) {
    let mut lines = Lines::new(label);
    while !stop.load(Ordering::Relaxed) {
        let (done_bytes, total_bytes) = control.progress_bytes();
        // By the phase itself: the countdown of a shutdown is said with it, not each second.
        let phase = control.phase().label();
        if let Some(line) = lines.next(phase, done_bytes, total_bytes, Instant::now()) {
            match control.force_off_in() {
                Some(left) => eprintln!(
                    "{line} (turned off in {} s; Ctrl-C leaves it running)",
                    left.as_secs()
                ),
                None => eprintln!("{line}"),
            }
        }
        std::thread::sleep(TICK);
    }
}

/// When a plain progress line is due, and what it says.
struct Lines {
    label: String,
    /// The phase of the last line.
    phase: Option<String>,
    /// When the last line was written, and the tenth of the work it showed.
    last: Option<(Instant, u64)>,
    /// Since when the phase has had a size, and the bytes done then (for the rate).
    sized_since: Option<(Instant, u64)>,
}

/// How long plain lines wait at most between two while bytes are copied.
const LINE_EVERY: Duration = Duration::from_secs(10);

impl Lines {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            phase: None,
            last: None,
            sized_since: None,
        }
    }

    /// The line to write for this look at the job, if one is due: at each new phase, and
    /// while bytes are copied at each tenth more of them or every 10 s.
    fn next(&mut self, phase: &str, done: u64, total: u64, now: Instant) -> Option<String> {
        let new_phase = self.phase.as_deref() != Some(phase);
        if new_phase {
            self.phase = Some(phase.to_owned());
            self.sized_since = None;
        }
        if total == 0 {
            self.last = Some((now, 0));
            return new_phase.then(|| format!("progress: {}: {phase}", self.label));
        }
        let done = done.min(total);
        let (since, done_then) = *self.sized_since.get_or_insert((now, done));
        let tenth = done.saturating_mul(10) / total;
        let due = new_phase
            || self.last.is_none_or(|(at, last_tenth)| {
                tenth > last_tenth || now.duration_since(at) >= LINE_EVERY
            });
        if !due {
            return None;
        }
        self.last = Some((now, tenth));
        let secs = now.duration_since(since).as_secs_f64();
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        #[allow(clippy::cast_sign_loss)] // display only; both are positive
        let rate = (secs >= 0.5).then(|| ((done - done_then) as f64 / secs) as u64);
        Some(format!(
            "progress: {}: {phase} {} % ({} of {}{})",
            self.label,
            done.saturating_mul(100) / total,
            human_bytes(done),
            human_bytes(total),
            rate.map(|r| format!(", {}/s", human_bytes(r)))
                .unwrap_or_default()
        ))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the progress line's thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain lines: one per phase, then while copying one per tenth or per 10 s, with the
    /// rate once there is one.
    #[test]
    fn plain_lines_say_each_phase_and_copying_by_tenths_or_every_ten_seconds() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut lines = Lines::new("win11");
        assert_eq!(
            lines.next("preparing", 0, 0, at(0)).as_deref(),
            Some("progress: win11: preparing")
        );
        assert_eq!(lines.next("preparing", 0, 0, at(200)), None);
        let total = 100 << 20;
        assert_eq!(
            lines.next("copying", 0, total, at(400)).as_deref(),
            Some("progress: win11: copying 0 % (0 B of 100 MiB)")
        );
        assert_eq!(lines.next("copying", 5 << 20, total, at(600)), None);
        assert_eq!(
            lines.next("copying", 12 << 20, total, at(1400)).as_deref(),
            Some("progress: win11: copying 12 % (12.0 MiB of 100 MiB, 12.0 MiB/s)")
        );
        assert_eq!(lines.next("copying", 15 << 20, total, at(2400)), None);
        // Slow: a line after 10 s all the same.
        assert_eq!(
            lines
                .next("copying", 16 << 20, total, at(11_400))
                .as_deref(),
            Some("progress: win11: copying 16 % (16.0 MiB of 100 MiB, 1.45 MiB/s)")
        );
        assert_eq!(
            lines.next("finishing", 0, 0, at(11_600)).as_deref(),
            Some("progress: win11: finishing")
        );
    }

    /// A terminal that keeps the last line drawn.
    #[derive(Debug, Default)]
    struct Screen(std::sync::Mutex<String>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, line: &str) -> std::io::Result<()> {
            self.write_str(line)
        }
        fn write_str(&self, text: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(text);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().clear();
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the bar draws on a terminal: the VM, the phase, then, once the size is known,
    /// the bar, the percentage, the sizes, the rate and the time left.
    #[test]
    fn the_progress_bar_shows_phase_bar_percent_and_sizes() {
        let screen = std::sync::Arc::new(Screen::default());
        let target = indicatif::ProgressDrawTarget::term_like(Box::new(ArcScreen(screen.clone())));
        let bar = indicatif::ProgressBar::with_draw_target(None, target)
            .with_style(style(WAITING))
            .with_prefix("win11")
            .with_message("preparing");
        bar.tick();
        assert_eq!(screen.0.lock().unwrap().trim(), "win11: preparing…");
        bar.set_style(style(COPYING));
        bar.set_length(100 << 20);
        bar.set_message("copying");
        bar.set_position(50 << 20);
        bar.tick();
        let line = screen.0.lock().unwrap().clone();
        assert!(
            line.starts_with(
                "win11: copying [##########>.........]  50 %  50.00 MiB of 100.00 MiB, "
            ) && line.trim_end().ends_with(" left"),
            "rate and time left: {line}"
        );
    }

    /// The screen shared with the test that reads it.
    #[derive(Debug)]
    struct ArcScreen(std::sync::Arc<Screen>);

    impl indicatif::TermLike for ArcScreen {
        fn width(&self) -> u16 {
            self.0.width()
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_up(n)
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_down(n)
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_right(n)
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.0.move_cursor_left(n)
        }
        fn write_line(&self, line: &str) -> std::io::Result<()> {
            self.0.write_line(line)
        }
        fn write_str(&self, text: &str) -> std::io::Result<()> {
            self.0.write_str(text)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.0.clear_line()
        }
        fn flush(&self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
}
