//! Human-readable sizes and durations, shared by the CLI and the window.

/// Formats a byte count with binary units: `0 B`, `512 B`, `1.5 KiB`, `64.0 MiB`, `2.00 GiB`.
#[must_use]
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let decimals = usize::from(value < 100.0) + usize::from(value < 10.0);
    format!("{value:.decimals$} {}", UNITS[unit])
}

/// Formats an age or a duration in seconds the way people say it: `45 s`, `12 min`,
/// `5 h`, `3 days` (rounded down; short units below twice the next one).
#[must_use]
pub fn human_age_secs(secs: u64) -> String {
    match secs {
        s if s < 90 => format!("{s} s"),
        s if s < 5400 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// Formats an interval in its largest whole unit: `15 minutes`, `1 hour`, `2 days`, `1 week`.
#[must_use]
pub fn interval_text(secs: u64) -> String {
    let (n, unit) = match secs {
        0 => return "0 seconds".into(),
        s if s % 604_800 == 0 => (s / 604_800, "week"),
        s if s % 86_400 == 0 => (s / 86_400, "day"),
        s if s % 3600 == 0 => (s / 3600, "hour"),
        s if s % 60 == 0 => (s / 60, "minute"),
        s => (s, "second"),
    };
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

#[cfg(test)]
mod tests {
    use super::{human_age_secs, human_bytes, interval_text};

    #[test]
    fn ages_and_intervals() {
        assert_eq!(human_age_secs(0), "0 s");
        assert_eq!(human_age_secs(89), "89 s");
        assert_eq!(human_age_secs(90), "1 min");
        assert_eq!(human_age_secs(5399), "89 min");
        assert_eq!(human_age_secs(5400), "1 h");
        assert_eq!(human_age_secs(2 * 86_400), "2 days");
        assert_eq!(interval_text(900), "15 minutes");
        assert_eq!(interval_text(3600), "1 hour");
        assert_eq!(interval_text(2 * 86_400), "2 days");
        assert_eq!(interval_text(604_800), "1 week");
        assert_eq!(interval_text(61), "61 seconds");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(2 << 30), "2.00 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
