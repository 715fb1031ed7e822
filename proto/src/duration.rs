//! Gateway API durations (GEP-2257): one to four `<number><unit>` parts,
//! units h, m, s, ms, numbers of at most five digits: "10s", "1m30s", "250ms".

use std::time::Duration;

/// Parses a Gateway API duration. "0s" is a valid zero duration.
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like \"10s\", \"1m30s\" or \"250ms\"");
    if text.is_empty() {
        return Err(bad());
    }
    let bytes = text.as_bytes();
    let (mut i, mut parts, mut total) = (0usize, 0usize, Duration::ZERO);
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &text[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit = if text[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else {
            let d = match bytes.get(i) {
                Some(b'h') => Duration::from_secs(n * 3600),
                Some(b'm') => Duration::from_secs(n * 60),
                Some(b's') => Duration::from_secs(n),
                _ => return Err(bad()),
            };
            i += 1;
            d
        };
        total += unit;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    Ok(total)
}

/// Parses an optional duration: empty means `None`, and so does "0s"
/// (GEP-1742: a zero timeout disables it).
pub fn parse_opt(text: &str) -> Result<Option<Duration>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    parse(text).map(|d| (!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_forms() {
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse("1h2m3s4ms").unwrap(),
            Duration::from_millis(3_723_004)
        );
        assert_eq!(parse_opt("0s").unwrap(), None);
        assert_eq!(parse_opt("").unwrap(), None);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "123456s",
            "1h1h1h1h1h",
            "-1s",
            "10 s",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
