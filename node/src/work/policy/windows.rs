//! Sharing windows: when an owner lends a GPU, as spans of days and hours
//! in the owner's time zone (`"Mon-Fri 19:00-07:00"`, `"Sat-Sun"`).

/// Days and a daily span of minutes in which a GPU is lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight; `end` ≤ `start` runs past midnight into the
    /// next day.
    start: u16,
    end: u16,
}

pub(super) const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

pub(super) const WINDOW_FORM: &str = "write windows like \"Mon-Fri 19:00-07:00\", \"Sat-Sun\", \"daily 22:00-06:00\" or \"Mon,Wed 12:00-14:00\"";

pub(super) fn day(text: &str) -> Option<usize> {
    let t = text.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| t.len() >= 3 && d.starts_with(&t[..3]) && t.starts_with(d))
}

pub(super) fn minutes(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

impl Window {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("window {text:?}: {why}; {WINDOW_FORM}");
        let mut days = [true; 7];
        let (mut start, mut end) = (0, 24 * 60);
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() || words.len() > 2 {
            return Err(bad("expected days, a time span, or both"));
        }
        for word in words {
            if word.contains(':') {
                let (a, b) = word
                    .split_once('-')
                    .ok_or_else(|| bad("a time span is HH:MM-HH:MM"))?;
                start = minutes(a).ok_or_else(|| bad(&format!("{a:?} is not a time")))?;
                end = minutes(b).ok_or_else(|| bad(&format!("{b:?} is not a time")))?;
                if start == end {
                    return Err(bad("the span is empty (start equals end)"));
                }
            } else if word.eq_ignore_ascii_case("daily") || word == "*" {
                days = [true; 7];
            } else {
                days = [false; 7];
                for part in word.split(',') {
                    let (a, b) = part.split_once('-').unwrap_or((part, part));
                    let a = day(a).ok_or_else(|| bad(&format!("{a:?} is not a day")))?;
                    let b = day(b).ok_or_else(|| bad(&format!("{b:?} is not a day")))?;
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
            }
        }
        Ok(Self { days, start, end })
    }

    /// Whether minute `m` of weekday `d` (Monday 0) is inside.
    fn contains(&self, d: usize, m: u16) -> bool {
        if self.start < self.end {
            self.days[d] && m >= self.start && m < self.end
        } else {
            (self.days[d] && m >= self.start) || (self.days[(d + 6) % 7] && m < self.end)
        }
    }
}

/// Sharing windows in a time zone; no windows means always open.
#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    texts: Vec<String>,
    tz: jiff::tz::TimeZone,
    tz_name: String,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.windows == other.windows && self.tz_name == other.tz_name
    }
}

impl Eq for Schedule {}

impl Schedule {
    /// Parses windows and a time zone name (empty: the system's).
    pub fn new(windows: &[String], timezone: &str) -> Result<Self, String> {
        let (tz, tz_name) = if timezone.is_empty() {
            let tz = jiff::tz::TimeZone::system();
            let name = tz
                .iana_name()
                .unwrap_or("the system's time zone")
                .to_owned();
            (tz, name)
        } else {
            let tz = jiff::tz::TimeZone::get(timezone).map_err(|e| {
                format!(
                    "timezone = {timezone:?} is not a time zone ({e}); write an IANA name like \"Europe/Berlin\" or \"America/New_York\", or \"UTC\""
                )
            })?;
            (tz, timezone.to_owned())
        };
        Ok(Self {
            windows: windows
                .iter()
                .map(|w| Window::parse(w))
                .collect::<Result<_, _>>()?,
            texts: windows.to_vec(),
            tz,
            tz_name,
        })
    }

    /// Whether the GPU is lent at `at` (seconds since the epoch).
    pub fn open_at(&self, at: i64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let Ok(ts) = jiff::Timestamp::from_second(at) else {
            return false;
        };
        let z = ts.to_zoned(self.tz.clone());
        let d = usize::from(z.weekday().to_monday_zero_offset().unsigned_abs());
        let m = u16::try_from(i32::from(z.hour()) * 60 + i32::from(z.minute())).unwrap_or(0);
        self.windows.iter().any(|w| w.contains(d, m))
    }

    /// The next minute (within a week) at which the window state differs
    /// from now's, in the schedule's time zone.
    pub fn next_change(&self, at: i64) -> Option<String> {
        let now = self.open_at(at);
        let start = at - at.rem_euclid(60) + 60;
        (0..7 * 24 * 60 + 1)
            .map(|i| start + i * 60)
            .find(|&t| self.open_at(t) != now)
            .and_then(|t| jiff::Timestamp::from_second(t).ok())
            .map(|t| {
                t.to_zoned(self.tz.clone())
                    .strftime("%a %H:%M %Z")
                    .to_string()
            })
    }

    /// The windows as written (empty: always open).
    pub fn windows(&self) -> &[String] {
        &self.texts
    }

    /// The time zone the windows are read in.
    pub fn timezone(&self) -> &str {
        &self.tz_name
    }

    /// The windows as written, with the time zone.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.texts.join(", "), self.tz_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(weekday: &str, hm: &str) -> i64 {
        // 2026-11-30 is a Monday.
        let d = day(weekday).unwrap() as i64;
        let m = i64::from(minutes(hm).unwrap());
        jiff::civil::date(2026, 11, 30)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second()
            + d * 86_400
            + m * 60
    }

    #[test]
    fn windows_open_and_close() {
        let s = Schedule::new(&["Mon-Fri 19:00-07:00".into(), "Sat-Sun".into()], "UTC").unwrap();
        assert!(!s.open_at(at("mon", "12:00")));
        assert!(s.open_at(at("mon", "19:00")));
        assert!(s.open_at(at("tue", "06:59")));
        assert!(!s.open_at(at("tue", "07:00")));
        assert!(s.open_at(at("sat", "12:00")));
        // Friday night runs into Saturday; Monday 06:00 belongs to Sunday's
        // whole day, not to a Sunday-night span.
        assert!(s.open_at(at("sat", "03:00")));
        assert!(!s.open_at(at("mon", "08:00")));
        assert_eq!(s.next_change(at("mon", "12:00")).unwrap(), "Mon 19:00 UTC");
        let always = Schedule::new(&[], "UTC").unwrap();
        assert!(always.open_at(at("wed", "03:00")));
        assert!(always.next_change(at("wed", "03:00")).is_none());
    }

    #[test]
    fn windows_follow_the_time_zone() {
        let s = Schedule::new(&["daily 09:00-17:00".into()], "America/New_York").unwrap();
        // 15:00 UTC is 10:00 in New York in November.
        assert!(s.open_at(at("wed", "15:00")));
        assert!(!s.open_at(at("wed", "23:00")));
    }

    #[test]
    fn bad_windows_and_zones_say_how_to_write_them() {
        for (w, tz, want) in [
            ("Mon-Fry", "UTC", "\"Fry\" is not a day"),
            ("Mon 25:00-26:00", "UTC", "is not a time"),
            ("12:00-12:00", "UTC", "empty"),
            ("Mon-Fri", "Mars/Olympus", "IANA"),
        ] {
            let e = Schedule::new(&[w.into()], tz).unwrap_err();
            assert!(e.contains(want), "{w} {tz}: {e}");
        }
    }
}
