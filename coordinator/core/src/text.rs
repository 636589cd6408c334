//! Rules for reading data text that the coordinator and the workers must apply identically:
//! the coordinator counts an inference input's rows at submission and the workers index the
//! same rows by number, so "is this gzip" and "is this line a data row" are decided here once.

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
}
