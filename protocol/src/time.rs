//! Wall-clock instants in records: whole seconds since the Unix epoch.
//!
//! Verification never reads the clock itself: callers pass `now`, so tests
//! can move time forwards and backwards.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Seconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(u64);

/// Seconds in one day, for validity windows given in days.
pub const DAY_SECS: u64 = 24 * 60 * 60;

impl Timestamp {
    /// The instant `secs` seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since the epoch.
    pub const fn as_secs(self) -> u64 {
        self.0
    }

    /// The system clock now (the epoch if the clock is set before 1970).
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self(secs)
    }

    /// `self + secs`, saturating at the far future instead of wrapping.
    pub const fn saturating_add_secs(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }

    /// `self + days`, saturating.
    pub const fn saturating_add_days(self, days: u64) -> Self {
        self.saturating_add_secs(days.saturating_mul(DAY_SECS))
    }

    /// `self - other`, or zero when `other` is later.
    pub fn saturating_duration_since(self, other: Timestamp) -> Duration {
        Duration::from_secs(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, e.g. `2027-01-15T08:30:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0;
        let days = secs / DAY_SECS;
        let rem = secs % DAY_SECS;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

/// Gregorian date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339() {
        assert_eq!(Timestamp::from_secs(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp::from_secs(1_709_210_096).to_string(),
            "2024-02-29T12:34:56Z"
        );
    }

    #[test]
    fn adding_days_saturates() {
        let t = Timestamp::from_secs(u64::MAX - 5);
        assert_eq!(t.saturating_add_days(3).as_secs(), u64::MAX);
        assert_eq!(
            Timestamp::from_secs(10).saturating_add_days(1).as_secs(),
            10 + DAY_SECS
        );
    }
}
