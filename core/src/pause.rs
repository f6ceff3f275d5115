//! Pausing protection: "for 1 hour", "until tomorrow" and "until I resume", as the tray,
//! the window and `rewind pause` offer them. A timed pause is a time in the configuration
//! ([`crate::config::Config::paused_until`]); it ends by itself, with no one there to
//! resume it. Pure, so the choices are tested with a fake clock.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};

/// When "until tomorrow" ends: this hour of the next day, local time (a pause taken in the
/// evening ends before the working day, not a few minutes later at midnight).
pub const TOMORROW_HOUR: u32 = 6;

/// How long to pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pause {
    /// For one hour from now.
    ForAnHour,
    /// Until [`TOMORROW_HOUR`] o'clock tomorrow, local time.
    UntilTomorrow,
    /// Until the user resumes.
    UntilResumed,
}

impl Pause {
    /// Every choice, in menu order.
    pub const ALL: [Self; 3] = [Self::ForAnHour, Self::UntilTomorrow, Self::UntilResumed];

    /// What a menu says.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::ForAnHour => "Pause for 1 hour",
            Self::UntilTomorrow => "Pause until tomorrow",
            Self::UntilResumed => "Pause until I resume",
        }
    }

    /// When a pause chosen at `now` ends by itself (in `now`'s time zone for "tomorrow");
    /// `None`: it does not.
    #[must_use]
    pub fn ends<Tz: TimeZone>(self, now: &DateTime<Tz>) -> Option<DateTime<Utc>> {
        match self {
            Self::ForAnHour => Some(now.with_timezone(&Utc) + Duration::hours(1)),
            Self::UntilTomorrow => {
                let tomorrow = now.date_naive().succ_opt()?;
                let wake = tomorrow.and_time(NaiveTime::from_hms_opt(TOMORROW_HOUR, 0, 0)?);
                // A clock change that skips that hour: the first moment after it.
                let local = now
                    .timezone()
                    .from_local_datetime(&wake)
                    .earliest()
                    .or_else(|| {
                        now.timezone()
                            .from_local_datetime(&(wake + Duration::hours(1)))
                            .earliest()
                    })?;
                Some(local.with_timezone(&Utc))
            }
            Self::UntilResumed => None,
        }
    }
}

/// How a pause reads for the user at `now`: "paused until 15:40", "paused until tomorrow
/// 06:00", "paused"; `None` when protection is not paused.
#[must_use]
pub fn describe<Tz: TimeZone>(
    paused: bool,
    until: Option<DateTime<Utc>>,
    now: &DateTime<Tz>,
) -> Option<String>
where
    Tz::Offset: std::fmt::Display,
{
    if paused {
        return Some("paused until resumed".to_owned());
    }
    let until = until.filter(|t| *t > now.with_timezone(&Utc))?;
    let local = until.with_timezone(&now.timezone());
    let day = if local.date_naive() == now.date_naive() {
        String::new()
    } else if Some(local.date_naive()) == now.date_naive().succ_opt() {
        "tomorrow ".to_owned()
    } else {
        format!("{} ", local.format("%Y-%m-%d"))
    };
    Some(format!("paused until {day}{}", local.format("%H:%M")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;

    fn at(offset_hours: i32, text: &str) -> DateTime<FixedOffset> {
        let tz = FixedOffset::east_opt(offset_hours * 3600).unwrap();
        tz.from_local_datetime(
            &chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn an_hour_is_an_hour_and_until_resumed_never_ends() {
        let now = at(1, "2026-12-04 21:30");
        assert_eq!(
            Pause::ForAnHour.ends(&now).unwrap(),
            now.with_timezone(&Utc) + Duration::hours(1)
        );
        assert_eq!(Pause::UntilResumed.ends(&now), None);
    }

    #[test]
    fn until_tomorrow_ends_at_six_in_the_morning_local_time() {
        // Late in the evening, in a zone east of UTC: 06:00 tomorrow there.
        let now = at(2, "2026-12-04 23:50");
        let ends = Pause::UntilTomorrow.ends(&now).unwrap();
        assert_eq!(
            ends.with_timezone(&now.timezone()),
            at(2, "2026-12-05 06:00")
        );
        // Just after midnight it is still the next day's morning, not 30 hours away.
        let now = at(-5, "2026-12-31 00:10");
        let ends = Pause::UntilTomorrow.ends(&now).unwrap();
        assert_eq!(
            ends.with_timezone(&now.timezone()),
            at(-5, "2027-01-01 06:00")
        );
    }

    #[test]
    fn a_pause_reads_as_when_it_ends() {
        let now = at(0, "2026-12-04 14:40");
        let hour = Pause::ForAnHour.ends(&now);
        assert_eq!(
            describe(false, hour, &now).as_deref(),
            Some("paused until 15:40")
        );
        let tomorrow = Pause::UntilTomorrow.ends(&now);
        assert_eq!(
            describe(false, tomorrow, &now).as_deref(),
            Some("paused until tomorrow 06:00")
        );
        assert_eq!(
            describe(true, None, &now).as_deref(),
            Some("paused until resumed")
        );
        // A pause that has ended is no pause.
        let later = at(0, "2026-12-04 16:00");
        assert_eq!(describe(false, hour, &later), None);
        assert_eq!(describe(false, None, &now), None);
    }
}
