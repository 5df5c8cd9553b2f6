//! Human-readable sizes and durations for config files.
//!
//! In: strings such as `"64MiB"`, `"512KiB"`, `"4096"`, `"4h"`, `"250ms"`,
//! `"500us"`. Out: [`ByteSize`] (bytes) and [`HumanDuration`] (a
//! [`Duration`]), both serde types that serialize back to the same notation.
//!
//! Sizes: an integer followed by an optional unit `B`, `KiB`, `MiB`, `GiB`,
//! `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000).
//! Durations: an integer followed by a mandatory unit `us`, `ms`, `s`, `m`,
//! `h` or `d`. Units are case-sensitive so that `m` (minute) and `M` never
//! mix; whitespace between the number and the unit is allowed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a size or duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("`{0}` does not start with a number")]
    NoNumber(String),
    #[error("unknown unit `{unit}` in `{input}` (expected one of {expected})")]
    UnknownUnit {
        input: String,
        unit: String,
        expected: &'static str,
    },
    #[error("`{0}` overflows")]
    Overflow(String),
}

const SIZE_UNITS: &str = "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB";
const DURATION_UNITS: &str = "us, ms, s, m, h, d";

fn split_number(input: &str) -> Result<(u64, &str), UnitError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(UnitError::Empty);
    }
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits_end == 0 {
        return Err(UnitError::NoNumber(input.to_string()));
    }
    let number = trimmed[..digits_end]
        .parse::<u64>()
        .map_err(|_| UnitError::Overflow(input.to_string()))?;
    Ok((number, trimmed[digits_end..].trim_start()))
}

/// Parses `"64MiB"` and friends into a number of bytes.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(input)?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => {
            return Err(UnitError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
                expected: SIZE_UNITS,
            })
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| UnitError::Overflow(input.to_string()))
}

/// Parses `"4h"`, `"250ms"`, `"500us"` and friends.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let (number, unit) = split_number(input)?;
    let overflow = || UnitError::Overflow(input.to_string());
    match unit {
        "us" => Ok(Duration::from_micros(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(overflow),
        "h" => number
            .checked_mul(3_600)
            .map(Duration::from_secs)
            .ok_or_else(overflow),
        "d" => number
            .checked_mul(86_400)
            .map(Duration::from_secs)
            .ok_or_else(overflow),
        _ => Err(UnitError::UnknownUnit {
            input: input.to_string(),
            unit: unit.to_string(),
            expected: DURATION_UNITS,
        }),
    }
}

/// A size in bytes, written `"64MiB"` in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n << 10)
    }

    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n << 20)
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The size as a `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (unit, shift) in UNITS {
            let unit_bytes = 1u64 << shift;
            if self.0 != 0 && self.0 % unit_bytes == 0 {
                return write!(f, "{}{unit}", self.0 / unit_bytes);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A duration, written `"4h"` or `"500us"` in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_micros();
        const UNITS: [(&str, u128); 5] = [
            ("d", 86_400_000_000),
            ("h", 3_600_000_000),
            ("m", 60_000_000),
            ("s", 1_000_000),
            ("ms", 1_000),
        ];
        for (unit, unit_micros) in UNITS {
            if micros != 0 && micros % unit_micros == 0 {
                return write!(f, "{}{unit}", micros / unit_micros);
            }
        }
        write!(f, "{micros}us")
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size(""), Err(UnitError::Empty));
        assert!(matches!(parse_size("MiB"), Err(UnitError::NoNumber(_))));
        assert!(matches!(
            parse_size("3mib"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn durations_parse_and_require_a_unit() {
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert!(matches!(
            parse_duration("10"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for text in ["64MiB", "3KiB", "1000B", "1GiB"] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.to_string(), text);
        }
        for text in ["4h", "90m", "250ms", "500us", "1d", "7s"] {
            let duration: HumanDuration = text.parse().unwrap();
            assert_eq!(duration.to_string(), text);
        }
        let json = serde_json::to_string(&ByteSize::mib(64)).unwrap();
        assert_eq!(json, "\"64MiB\"");
        let back: ByteSize = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ByteSize::mib(64));
    }
}
