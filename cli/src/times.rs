//! Times and durations as the read commands print them: instants in UTC (a farm's users are in
//! many time zones; the runner's clock is the one that counts), durations short and rounded.

use time::OffsetDateTime;
use time::macros::format_description;

/// An instant given in Unix milliseconds, as `2026-12-03 08:31:05 UTC`; `-` for none (0).
#[must_use]
pub fn instant(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|at| at.format(format).ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// The time from `start_ms` to `end_ms` (to now while `end_ms` is 0), as `950ms`, `12.3s`,
/// `4m 05s` or `2h 03m`.
#[must_use]
pub fn between(start_ms: i64, end_ms: i64) -> String {
    let end_ms = if end_ms == 0 { now_ms() } else { end_ms };
    duration(end_ms.saturating_sub(start_ms).max(0))
}

/// A duration in milliseconds, short.
#[must_use]
pub fn duration(ms: i64) -> String {
    let seconds = ms / 1000;
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", seconds, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m {:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{}h {:02}m", seconds / 3600, (seconds % 3600) / 60)
    }
}

/// Now, in Unix milliseconds.
#[must_use]
pub fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(now).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_instants_read_as_people_write_them() {
        assert_eq!(duration(950), "950ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(245_000), "4m 05s");
        assert_eq!(duration(7_380_000), "2h 03m");
        assert_eq!(between(1_000, 13_345), "12.3s");
        assert_eq!(instant(1_764_750_665_000), "2025-12-03 08:31:05 UTC");
        assert_eq!(instant(0), "-");
    }
}
