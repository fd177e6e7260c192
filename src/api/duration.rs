//! Durations as users write them in specs: Go/Kubernetes style `30s`, `1m30s`, `500ms`, `1.5h`.
//!
//! Kept as strings in the API types (so that an object written before a schema change still
//! deserializes) and parsed here; the CRD schema carries the same grammar as a `pattern`.

use std::time::Duration;

/// Units accepted, longest suffix first so that `ms` is not read as `m`.
const UNITS: [(&str, u128); 4] =
    [("ms", 1_000_000), ("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000)];

/// The longest duration accepted anywhere in the API (one year).
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Schema pattern for any duration, zero included (`0`, `0s`, `1m30s`).
pub const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$";

/// Schema pattern for a strictly positive duration: at least one component is non-zero.
pub const POSITIVE_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))*([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)(ms|s|m|h)([0-9]+(\.[0-9]+)?(ms|s|m|h))*$";

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration (use a number and a unit: 500ms, 30s, 5m, 1h, 1m30s)")]
    Malformed(String),
    #[error("{0:?} is longer than the maximum of 8760h")]
    TooLong(String),
}

/// Parses `1h2m3.5s`, `250ms`, `0`. Refuses negative, empty and unit-less values.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed(text.to_string());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total_nanos: u128 = 0;
    if rest.is_empty() {
        return Err(malformed());
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(malformed)?;
        let (number, tail) = rest.split_at(number_len);
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) if !w.is_empty() && !f.is_empty() && !f.contains('.') => (w, f),
            None if !number.is_empty() => (number, ""),
            _ => return Err(malformed()),
        };
        let (unit, scale) = UNITS.iter().find(|(u, _)| tail.starts_with(u)).ok_or_else(malformed)?;
        let whole: u128 = whole.parse().map_err(|_| malformed())?;
        let mut nanos = whole.checked_mul(*scale).ok_or_else(|| DurationError::TooLong(text.into()))?;
        // Fractions below a nanosecond are dropped, as Go does.
        let mut place = *scale;
        for digit in fraction.bytes() {
            place /= 10;
            nanos += u128::from(digit - b'0') * place;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(|| DurationError::TooLong(text.into()))?;
        rest = &tail[unit.len()..];
    }
    if total_nanos > MAX.as_nanos() {
        return Err(DurationError::TooLong(text.into()));
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

/// Formats like Go's `time.Duration.String` for whole milliseconds: `1h2m3s`, `1.5s`, `250ms`, `0s`.
pub fn format(d: Duration) -> String {
    let millis = d.as_millis();
    if millis == 0 {
        return "0s".into();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let (hours, rem) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rem) = (rem / 60_000, rem % 60_000);
    let (secs, ms) = (rem / 1000, rem % 1000);
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if ms == 0 {
        out.push_str(&format!("{secs}s"));
    } else {
        let frac = format!("{ms:03}");
        out.push_str(&format!("{secs}.{}s", frac.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("0.5s"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "30", "s", "-1s", "1.s", ".5s", "1..5s", "1d", "1 s", "1s ", "abc", "1sm"] {
            assert!(matches!(parse(bad), Err(DurationError::Malformed(_))), "{bad:?} accepted");
        }
        assert!(matches!(parse("8761h"), Err(DurationError::TooLong(_))));
        assert!(matches!(parse("99999999999999999999999h"), Err(DurationError::TooLong(_))));
    }

    #[test]
    fn formats_round_trip() {
        for text in ["0s", "250ms", "1s", "1.5s", "30s", "1m0s", "1m30s", "1h0m0s", "2h3m4.005s"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }

    proptest::proptest! {
        #[test]
        fn format_then_parse_is_identity(ms in 0u64..(365 * 24 * 3600 * 1000)) {
            let d = Duration::from_millis(ms);
            proptest::prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn never_panics(text in "\\PC*") {
            let _ = parse(&text);
        }
    }
}
