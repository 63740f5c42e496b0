//! Timestamp normalisation to RFC 3339 UTC with milliseconds.
//!
//! Parsers report their timestamp field as raw text (see
//! [`Parser::timestamp_field`](crate::Parser::timestamp_field)); a caller that
//! wants a uniform representation passes it to [`normalize`], which returns
//! e.g. `"2000-10-10T20:55:36.000Z"`. Everything here is hand-written civil
//! calendar arithmetic (proleptic Gregorian, years 0000–9999), no time zone
//! database: formats without an offset are taken as UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// The textual format of a timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimestampFormat {
    /// RFC 3339 / ISO 8601: `2024-01-02T03:04:05.123456+01:00`, `...Z`; a space
    /// instead of `T` is accepted; no offset means UTC.
    Rfc3339,
    /// Common Log Format: `10/Oct/2000:13:55:36 -0700`.
    Clf,
    /// RFC 3164 syslog: `Oct 11 22:14:15` (day may be space-padded). No year: the
    /// current year is assumed, or the previous one when that would put the time
    /// more than one day in the future. Always UTC.
    Rfc3164,
    /// nginx error log: `2024/01/02 03:04:05`, taken as UTC.
    NginxError,
    /// Seconds since the Unix epoch, optionally with a fraction: `1700000000.123`.
    UnixSeconds,
    /// Milliseconds since the Unix epoch: `1700000000123`.
    UnixMillis,
    /// Tries RFC 3339, CLF, nginx error, RFC 3164, then numbers (13 or more
    /// integer digits are milliseconds, fewer are seconds).
    Auto,
}

/// Normalise `value` in format `fmt` to RFC 3339 UTC with milliseconds
/// (`"2000-10-10T20:55:36.000Z"`); `None` when it cannot be parsed.
///
/// ```
/// use redtail_parsers::timestamp::{normalize, TimestampFormat};
/// assert_eq!(
///     normalize("10/Oct/2000:13:55:36 -0700", TimestampFormat::Clf).as_deref(),
///     Some("2000-10-10T20:55:36.000Z")
/// );
/// ```
pub fn normalize(value: &str, fmt: TimestampFormat) -> Option<String> {
    normalize_at(value, fmt, SystemTime::now())
}

/// Like [`normalize`], with `now` used to infer the year of RFC 3164 timestamps.
pub fn normalize_at(value: &str, fmt: TimestampFormat, now: SystemTime) -> Option<String> {
    let now_ms = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    let v = value.trim().as_bytes();
    let ms = match fmt {
        TimestampFormat::Rfc3339 => rfc3339(v),
        TimestampFormat::Clf => clf(v),
        TimestampFormat::Rfc3164 => rfc3164(v, now_ms),
        TimestampFormat::NginxError => nginx_error(v),
        TimestampFormat::UnixSeconds => unix(v, false),
        TimestampFormat::UnixMillis => unix(v, true),
        TimestampFormat::Auto => rfc3339(v)
            .or_else(|| clf(v))
            .or_else(|| nginx_error(v))
            .or_else(|| rfc3164(v, now_ms))
            .or_else(|| {
                let int_digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
                unix(v, int_digits >= 13)
            }),
    }?;
    format_ms(ms)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Month number (1-12) of a three-letter English abbreviation.
pub(crate) fn month_from_abbr(b: &[u8]) -> Option<u32> {
    if b.len() != 3 {
        return None;
    }
    MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(b))
        .map(|i| i as u32 + 1)
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Milliseconds since the epoch of a validated civil date-time.
fn to_ms(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> Option<i64> {
    if !(0..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || s > 60
    {
        return None;
    }
    let s = s.min(59); // leap second: clamp
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + (h * 3600 + mi * 60 + s) as i64) * 1000) + ms as i64)
}

/// Formats unix milliseconds as RFC 3339 UTC with milliseconds
/// (`2000-10-10T20:55:36.000Z`); None outside years 0–9999.
pub fn format_unix_ms(ms: i64) -> Option<String> {
    format_ms(ms)
}

fn format_ms(ms: i64) -> Option<String> {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let secs = rem / 1000;
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rem % 1000
    ))
}

fn num(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, &c| n * 10 + (c - b'0') as u32))
}

/// Fraction digits → milliseconds (truncated); returns (ms, bytes consumed incl. the dot).
fn fraction(b: &[u8]) -> Option<(u32, usize)> {
    if b.first() != Some(&b'.') && b.first() != Some(&b',') {
        return Some((0, 0));
    }
    let digits = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut ms = 0;
    for i in 0..3 {
        ms = ms * 10
            + b.get(1 + i)
                .filter(|_| i < digits)
                .map_or(0, |c| (c - b'0') as u32);
    }
    Some((ms, 1 + digits))
}

/// `+HH:MM`, `+HHMM`, `+HH`, `Z` → offset in seconds east of UTC.
fn offset(b: &[u8]) -> Option<i64> {
    match b {
        [b'Z' | b'z'] => Some(0),
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (h, m) = match rest {
                [h1, h2] => (num(&[*h1, *h2])?, 0),
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => (num(&[*h1, *h2])?, num(&[*m1, *m2])?),
                _ => return None,
            };
            if h > 23 || m > 59 {
                return None;
            }
            let off = (h * 3600 + m * 60) as i64;
            Some(if *sign == b'-' { -off } else { off })
        }
        _ => None,
    }
}

fn rfc3339(b: &[u8]) -> Option<i64> {
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (frac, n) = fraction(&b[19..])?;
    let rest = &b[19 + n..];
    let off = if rest.is_empty() { 0 } else { offset(rest)? };
    let ms = to_ms(
        num(&b[0..4])? as i64,
        num(&b[5..7])?,
        num(&b[8..10])?,
        num(&b[11..13])?,
        num(&b[14..16])?,
        num(&b[17..19])?,
        frac,
    )?;
    Some(ms - off * 1000)
}

fn clf(b: &[u8]) -> Option<i64> {
    // 10/Oct/2000:13:55:36 -0700
    if b.len() < 20 || b[2] != b'/' || b[6] != b'/' || b[11] != b':' {
        return None;
    }
    if b[14] != b':' || b[17] != b':' {
        return None;
    }
    let (frac, n) = fraction(&b[20..])?;
    let rest = &b[20 + n..];
    let off = match rest {
        [] => 0,
        [b' ', o @ ..] => offset(o)?,
        _ => return None,
    };
    let ms = to_ms(
        num(&b[7..11])? as i64,
        month_from_abbr(&b[3..6])?,
        num(&b[0..2])?,
        num(&b[12..14])?,
        num(&b[15..17])?,
        num(&b[18..20])?,
        frac,
    )?;
    Some(ms - off * 1000)
}

fn nginx_error(b: &[u8]) -> Option<i64> {
    // 2024/01/02 03:04:05
    if b.len() != 19 || b[4] != b'/' || b[7] != b'/' || b[10] != b' ' {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    to_ms(
        num(&b[0..4])? as i64,
        num(&b[5..7])?,
        num(&b[8..10])?,
        num(&b[11..13])?,
        num(&b[14..16])?,
        num(&b[17..19])?,
        0,
    )
}

fn rfc3164(b: &[u8], now_ms: i64) -> Option<i64> {
    // Oct 11 22:14:15 / Oct  1 22:14:15 (optionally with a fraction)
    if b.len() < 15 || b[3] != b' ' || b[6] != b' ' || b[9] != b':' || b[12] != b':' {
        return None;
    }
    let mon = month_from_abbr(&b[0..3])?;
    let day = if b[4] == b' ' {
        num(&b[5..6])?
    } else {
        num(&b[4..6])?
    };
    let (frac, n) = fraction(&b[15..])?;
    if 15 + n != b.len() {
        return None;
    }
    let (h, mi, s) = (num(&b[7..9])?, num(&b[10..12])?, num(&b[13..15])?);
    let (now_year, _, _) = civil_from_days(now_ms.div_euclid(86_400_000));
    let this_year = to_ms(now_year, mon, day, h, mi, s, frac);
    match this_year {
        Some(t) if t <= now_ms + 86_400_000 => Some(t),
        // In the future (or Feb 29 of a non-leap year): previous year.
        _ => to_ms(now_year - 1, mon, day, h, mi, s, frac),
    }
}

fn unix(b: &[u8], millis: bool) -> Option<i64> {
    let (neg, b) = match b {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, b),
    };
    let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if int_len == 0 || int_len > 16 {
        return None;
    }
    let int: i64 = std::str::from_utf8(&b[..int_len]).ok()?.parse().ok()?;
    let (frac, n) = fraction(&b[int_len..])?;
    if int_len + n != b.len() {
        return None;
    }
    let ms = if millis {
        int
    } else {
        int.checked_mul(1000)? + frac as i64
    };
    Some(if neg { -ms } else { ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use TimestampFormat::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn formats() {
        let n = |v, f| normalize(v, f);
        assert_eq!(
            n("10/Oct/2000:13:55:36 -0700", Clf).unwrap(),
            "2000-10-10T20:55:36.000Z"
        );
        assert_eq!(
            n("2003-10-11T22:14:15.003Z", Rfc3339).unwrap(),
            "2003-10-11T22:14:15.003Z"
        );
        assert_eq!(
            n("2024-01-02T03:04:05.123456+01:00", Rfc3339).unwrap(),
            "2024-01-02T02:04:05.123Z"
        );
        assert_eq!(
            n("2024-01-02 03:04:05", Rfc3339).unwrap(),
            "2024-01-02T03:04:05.000Z"
        );
        assert_eq!(
            n("2024/01/02 03:04:05", NginxError).unwrap(),
            "2024-01-02T03:04:05.000Z"
        );
        assert_eq!(
            n("1700000000", UnixSeconds).unwrap(),
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(
            n("1700000000.5", UnixSeconds).unwrap(),
            "2023-11-14T22:13:20.500Z"
        );
        assert_eq!(
            n("1700000000123", UnixMillis).unwrap(),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            n("1700000000123", Auto).unwrap(),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            n("10/Oct/2000:13:55:36 +0000", Auto).unwrap(),
            "2000-10-10T13:55:36.000Z"
        );
        assert_eq!(n("2024-02-30T00:00:00Z", Rfc3339), None);
        assert_eq!(n("garbage", Auto), None);
        assert_eq!(n("", Auto), None);
        assert_eq!(n("2024-01-02T03:04:05+25:00", Rfc3339), None);
    }

    #[test]
    fn rfc3164_year_inference() {
        // now = 2024-01-01T00:00:00Z
        let now = at(1_704_067_200);
        assert_eq!(
            normalize_at("Dec 31 23:00:00", Rfc3164, now).unwrap(),
            "2023-12-31T23:00:00.000Z"
        );
        assert_eq!(
            normalize_at("Jan  1 12:00:00", Rfc3164, now).unwrap(),
            "2024-01-01T12:00:00.000Z"
        );
        // more than one day in the future -> previous year
        assert_eq!(
            normalize_at("Jan  3 00:00:00", Rfc3164, now).unwrap(),
            "2023-01-03T00:00:00.000Z"
        );
        assert_eq!(normalize_at("Foo  3 00:00:00", Rfc3164, now), None);
    }

    #[test]
    fn civil_roundtrip() {
        for days in [-719_468, -1, 0, 1, 11_016, 19_723, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
