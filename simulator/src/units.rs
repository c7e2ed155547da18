//! Units in scenario files: durations (`500ms`, `1.5s`, `10m`, `2h`, `1d`), sizes
//! (`256MiB`, `1GiB`, `16KiB`, `100MB`, plain bytes) and rates (`1Gbit`, `20Mbit`,
//! `100MB/s`, `50MiB/s`). Simulated time is kept in whole microseconds.

use serde::{Deserialize, Serialize};

/// A duration in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dur(pub u64);

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bytes(pub u64);

/// A rate in bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate(pub f64);

fn split(s: &str) -> Result<(f64, &str), String> {
    let t = s.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let n: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by a unit"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?}: must be a non-negative number"));
    }
    Ok((n, unit.trim()))
}

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (n, unit) = split(&s)?;
        let us_per = match unit {
            "us" | "µs" => 1.0,
            "ms" => 1e3,
            "" | "s" => 1e6,
            "m" | "min" => 60e6,
            "h" => 3600e6,
            "d" => 86_400e6,
            other => {
                return Err(format!(
                    "{s:?}: unknown duration unit {other:?} (us, ms, s, m, h, d)"
                ));
            }
        };
        Ok(Dur((n * us_per).round() as u64))
    }
}

impl From<Dur> for String {
    fn from(d: Dur) -> String {
        format!("{}ms", d.0 as f64 / 1e3)
    }
}

impl Dur {
    /// Seconds, as a float.
    pub fn secs(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl TryFrom<String> for Bytes {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (n, unit) = split(&s)?;
        let mult = match unit {
            "" | "B" => 1.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown size unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        Ok(Bytes((n * mult).round() as u64))
    }
}

impl From<Bytes> for String {
    fn from(b: Bytes) -> String {
        format!("{}B", b.0)
    }
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (n, unit) = split(&s)?;
        let bytes_per_sec = match unit {
            "bit" | "bps" | "bit/s" => n / 8.0,
            "Kbit" | "kbit" | "Kbps" | "kbps" => n * 1e3 / 8.0,
            "Mbit" | "Mbps" => n * 1e6 / 8.0,
            "Gbit" | "Gbps" => n * 1e9 / 8.0,
            "B/s" => n,
            "KB/s" | "kB/s" => n * 1e3,
            "MB/s" => n * 1e6,
            "GB/s" => n * 1e9,
            "KiB/s" => n * 1024.0,
            "MiB/s" => n * 1024.0 * 1024.0,
            "GiB/s" => n * 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown rate unit {other:?} (bit, Kbit, Mbit, Gbit, B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
                ));
            }
        };
        if bytes_per_sec <= 0.0 {
            return Err(format!("{s:?}: a rate must be above zero"));
        }
        Ok(Rate(bytes_per_sec))
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        format!("{}B/s", r.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(Dur::try_from("1.5s".to_string()).unwrap(), Dur(1_500_000));
        assert_eq!(Dur::try_from("10m".to_string()).unwrap(), Dur(600_000_000));
        assert_eq!(Dur::try_from("500us".to_string()).unwrap(), Dur(500));
        assert_eq!(
            Bytes::try_from("256MiB".to_string()).unwrap(),
            Bytes(256 << 20)
        );
        assert_eq!(Rate::try_from("1Gbit".to_string()).unwrap(), Rate(125e6));
        assert_eq!(Rate::try_from("20Mbit".to_string()).unwrap(), Rate(2.5e6));
        assert!(Rate::try_from("0Mbit".to_string()).is_err());
        assert!(Dur::try_from("3 weeks".to_string()).is_err());
    }
}
