//! Wall-clock time for the operator's tools, and human-readable durations and dates.

use anyhow::{Context, Result, bail};
use pollen_protocol::UnixTime;
use std::time::{Duration, SystemTime};

/// One day.
pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The current wall-clock time, in milliseconds since the Unix epoch.
pub fn unix_now() -> Result<UnixTime> {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    Ok(UnixTime(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

/// `days` days as a duration (saturating).
pub fn days(days: u64) -> Duration {
    Duration::from_secs(days.saturating_mul(DAY.as_secs()))
}

/// Parse a duration: a whole number followed by a unit, `ms`, `s`, `m`, `h` or `d`
/// (`90s`, `5m`, `1h`, `2d`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration such as 90s, 5m, 1h or 2d"))?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => bail!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"),
    };
    let ms = n
        .checked_mul(ms_per)
        .with_context(|| format!("duration {s:?} is too long"))?;
    Ok(Duration::from_millis(ms))
}

/// A duration for humans: `1h30m`, `90s`, `250ms`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

/// A wall-clock time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_unix(t: UnixTime) -> String {
    let secs = t.as_millis() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (H. Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), DAY);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "s", "-5s", "5 weeks", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix(UnixTime(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            format_unix(UnixTime::from_secs(951_782_400)),
            "2000-02-29 00:00:00 UTC"
        );
        assert_eq!(
            format_unix(UnixTime::from_secs(1_767_225_599)),
            "2025-12-31 23:59:59 UTC"
        );
    }
}
