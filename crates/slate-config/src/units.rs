//! Sizes ("2GiB") and durations ("1h30m") as people write them.

use std::time::Duration;

/// Parses `512MiB`, `2GiB`, `2G`, `1048576` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. `512MiB` or `2GiB`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use KiB, MiB, GiB (or KB, MB, GB)"
            ))
        }
    };
    Ok((num * mult as f64) as u64)
}

/// Parses `90s`, `30m`, `1h30m`, `2h` into a duration.
/// The longest duration slate takes (a year): anything longer is a typo,
/// and deadlines past it would overflow the clock's arithmetic.
const MAX_DURATION_SECS: u64 = 365 * 86400;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match parse_span(s)? {
        d if d.is_zero() => Err(format!(
            "`{s}` is not a duration; write e.g. `90s`, `30m` or `1h30m`"
        )),
        d => Ok(d),
    }
}

/// Like [`parse_duration`], zero included (`0s`: "now", for `gc --older-than`).
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration; write e.g. `90s`, `30m` or `1h30m`");
    let too_long =
        || format!("`{s}` is longer than a year (365d), the longest duration slate takes");
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_long)?;
        any = true;
    }
    if !num.is_empty() {
        if any {
            return Err(bad());
        }
        total = num.parse().map_err(|_| bad())?;
        any = true;
    }
    if !any {
        return Err(bad());
    }
    if total > MAX_DURATION_SECS {
        return Err(too_long());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_overflow_are_errors_not_panics() {
        for s in [
            "18446744073709551615",
            "18446744073709551615m",
            "99999999999999999999s",
            "366d",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains(s), "{e}");
        }
        assert_eq!(parse_duration("365d").unwrap().as_secs(), 365 * 86400);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("2 parsecs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
