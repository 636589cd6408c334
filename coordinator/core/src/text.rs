//! Rules for reading data text that the coordinator and the workers must apply identically:
//! the coordinator counts an inference input's rows at submission and the workers index the
//! same rows by number, so "is this gzip" and "is this line a data row" are decided here once;
//! the metadata endpoint writes a spot notice's time and the agent reads it with the same rule.

/// The first two bytes of every gzip member (RFC 1952).
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Whether an object named `name` whose content starts with `head` is gzip: by its magic bytes,
/// or by a `.gz` name (a `.gz` file without the magic then fails to decode, with a message,
/// rather than parsing as garbage).
pub fn is_gzip(name: &str, head: &[u8]) -> bool {
    head.starts_with(&GZIP_MAGIC) || name.to_ascii_lowercase().ends_with(".gz")
}

/// Whether a line (with or without its line end) is a data row: anything but ASCII whitespace.
/// Blank lines are skipped by every reader and never numbered.
pub fn is_data_line(line: &[u8]) -> bool {
    !line.iter().all(u8::is_ascii_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_by_magic_or_name_and_blank_lines_by_ascii_whitespace() {
        assert!(is_gzip("data.csv", &[0x1f, 0x8b, 8]));
        assert!(is_gzip("DATA.CSV.GZ", b"1,2"));
        assert!(!is_gzip("data.csv", b"1,2"));
        assert!(!is_data_line(b" \t\r\n"));
        assert!(is_data_line(b"1,2\r\n"));
        assert!(is_data_line("\u{a0}".as_bytes()), "a non-ASCII space is data (and fails to parse)");
    }

    /// An error that prints its cause in its own text too, as object_store's do.
    #[derive(Debug)]
    struct Says(String, Option<Box<Says>>);
    impl std::fmt::Display for Says {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    #[test]
    fn a_clipped_text_keeps_its_start_and_its_end() {
        assert_eq!(clip_middle("short".into(), 5), "short");
        let text = format!("rank 0 exited with status 3; its last lines:\n{}\nValueError: bad", "x".repeat(500));
        let clipped = clip_middle(text.clone(), 120);
        assert!(clipped.len() <= 120, "{}", clipped.len());
        assert!(clipped.starts_with("rank 0 exited") && clipped.ends_with("\nValueError: bad"), "{clipped}");
        assert!(clipped.contains(" … "));
        // Character boundaries on both sides, however the cut falls.
        for max in 0..40 {
            let clipped = clip_middle("ééééééééééééééééééééééé".into(), max);
            assert!(clipped.len() <= max, "{max}: {clipped}");
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = Says("Not a directory (os error 20)".into(), None);
        let local = Says(format!("Unable to open file /s/m: {io}"), Some(Box::new(io)));
        let generic = Says(format!("Generic LocalFileSystem error: {local}"), Some(Box::new(local)));
        let outer = Says("exporting the model".into(), Some(Box::new(generic)));
        let chain = std::iter::successors(Some(&outer as &(dyn std::error::Error + 'static)), |e| e.source());
        assert_eq!(
            error_chain(chain),
            "exporting the model: Generic LocalFileSystem error: Unable to open file /s/m: Not a directory (os error 20)"
        );
        let plain = Says("a".into(), Some(Box::new(Says("b".into(), None))));
        let chain = std::iter::successors(Some(&plain as &(dyn std::error::Error + 'static)), |e| e.source());
        assert_eq!(error_chain(chain), "a: b", "causes not in the text are kept");
    }
}

/// An error and its causes as one line, `error: cause: cause`, each said once. Many errors
/// already print their cause in their own text (object_store's do, and every `{source}` in a
/// message), so the plain chain (anyhow's `{:#}`) said one disk error up to four times; a cause
/// whose text the line already holds is left out.
pub fn error_chain<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let cause = cause.to_string();
        if line.is_empty() {
            line = cause;
        } else if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// `text` cut to at most `max_bytes` (at character boundaries) by leaving out its middle, marked
/// ` … `: a third of the room for its start, the rest for its end. A failure's start says what
/// failed and its end why (a traceback's last line, the output just before an exit), so a limit
/// loses neither; keeping only the start had cut every failing program's last lines off.
pub fn clip_middle(text: String, max_bytes: usize) -> String {
    const MARK: &str = " … ";
    if text.len() <= max_bytes {
        return text;
    }
    let floor = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let Some(room) = max_bytes.checked_sub(MARK.len()).filter(|room| *room > 0) else {
        return text[..floor(max_bytes)].to_string();
    };
    let head = floor(room / 3);
    let mut tail = text.len() - (room - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{MARK}{}", &text[..head], &text[tail..])
}

/// `unix_ms` as RFC 3339 UTC to the second (`2026-12-03T22:10:18Z`), the form EC2's instance
/// metadata uses for a spot notice's `time`.
pub fn rfc3339_utc(unix_ms: u64) -> String {
    // Civil-from-days (H. Hinnant), to avoid a date dependency for one format.
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Reads an RFC 3339 UTC time (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`, years 1970-9999) as unix ms;
/// `None` for anything else (offsets other than `Z` included).
pub fn parse_rfc3339_utc(text: &str) -> Option<u64> {
    let text = text.trim();
    let body = text.strip_suffix('Z').or_else(|| text.strip_suffix('z'))?;
    let (date, time) = body.split_once(['T', 't'])?;
    let number = |s: &str, digits: usize| -> Option<i64> {
        (s.len() == digits && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let mut d = date.split('-');
    let (year, month, day) = (number(d.next()?, 4)?, number(d.next()?, 2)?, number(d.next()?, 2)?);
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut t = time.split(':');
    let (hour, minute, second) = (number(t.next()?, 2)?, number(t.next()?, 2)?, number(t.next()?, 2)?);
    if d.next().is_some() || t.next().is_some() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let month_days = [
        31,
        28 + i64::from(year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)),
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1970 || !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days-from-civil (H. Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let millis: i64 = format!("{:0<3}", &fraction[..fraction.len().min(3)]).parse().ok()?;
    u64::try_from(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis).ok()
}

#[cfg(test)]
mod time_tests {
    use super::{parse_rfc3339_utc, rfc3339_utc};

    #[test]
    fn rfc3339_round_trips_and_refuses_what_it_cannot_read() {
        for ms in [0, 951_782_400_000, 1_764_799_818_000, 4_102_444_799_000] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_utc(ms)), Some(ms), "{}", rfc3339_utc(ms));
        }
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(parse_rfc3339_utc("2015-01-05T18:02:00Z"), Some(1_420_480_920_000));
        assert_eq!(parse_rfc3339_utc("2015-01-05T18:02:00.25Z"), Some(1_420_480_920_250));
        for bad in [
            "",
            "2015-01-05",
            "2015-01-05T18:02:00",
            "2015-01-05T18:02:00+01:00",
            "2015-02-29T00:00:00Z",
            "2015-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2015-01-05T24:00:00Z",
            "2015-1-05T18:02:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }
}
