//! The CSV reader: one sample per line, the label first, then the features; no header.
//!
//! Owns: line splitting (bounded), number parsing, column-count and label checks, with errors
//! that name the line and the 1-based column (column 1 is the label).
//! Must not touch: fetching or decompressing (it reads any `Read`), scaling.
//! Blank lines (all ASCII whitespace) are skipped; `\r\n` line ends are accepted; fields may have surrounding spaces.

use std::io::{self, BufRead, BufReader, Read};

use super::{CLASSES_MAX, DataError, RawData, check_limits};

/// Longest line accepted, in bytes: 100,000 features of up to ~10 characters each.
pub const LINE_LEN_MAX_BYTES: u64 = 1024 * 1024;

/// Parses CSV text from `input` (already decompressed). `uri` names the source in errors.
pub fn parse(uri: &str, input: impl Read) -> Result<RawData, DataError> {
    parse_with(uri, input, true)
}

/// Parses rows of numbers only (no label column): every column is a feature, `labels` stays
/// empty. What inference reads before it decides whether the first column is a label.
pub fn parse_unlabelled(uri: &str, input: impl Read) -> Result<RawData, DataError> {
    parse_with(uri, input, false)
}

fn parse_with(uri: &str, input: impl Read, labelled: bool) -> Result<RawData, DataError> {
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    let mut line_number = 0u64;
    let mut first_line = 0u64;
    let mut rows = 0usize;
    let mut data = RawData { values: Vec::new(), labels: Vec::new(), features_per_row: 0 };
    loop {
        line_number += 1;
        line.clear();
        let read = (&mut reader)
            .take(LINE_LEN_MAX_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| read_error(uri, line_number, &e))?;
        if read == 0 {
            break;
        }
        if line.len() as u64 > LINE_LEN_MAX_BYTES {
            return Err(DataError::TooLarge {
                uri: uri.to_string(),
                what: "the length of a line in bytes",
                value: line.len() as u64,
                limit: LINE_LEN_MAX_BYTES,
            });
        }
        let text = std::str::from_utf8(&line).map_err(|_| field_error(uri, line_number, 1, "is not UTF-8 text"))?;
        let text = text.trim_end_matches(['\n', '\r']);
        // The rule the coordinator counts inference rows by.
        if !flotilla_proto::text::is_data_line(text.as_bytes()) {
            continue;
        }
        if first_line == 0 {
            first_line = line_number;
        }
        parse_line(uri, line_number, first_line, text, labelled, rows, &mut data)?;
        rows += 1;
        check_limits(uri, rows, data.features_per_row)?;
    }
    if rows == 0 {
        return Err(DataError::Empty { uri: uri.to_string() });
    }
    Ok(data)
}

/// Parses one line into `data`; `rows` is the number of rows parsed before it.
fn parse_line(
    uri: &str,
    line: u64,
    first_line: u64,
    text: &str,
    labelled: bool,
    rows: usize,
    data: &mut RawData,
) -> Result<(), DataError> {
    let columns = text.bytes().filter(|&b| b == b',').count() + 1;
    let label_columns = usize::from(labelled);
    if rows == 0 {
        if columns < label_columns + 1 {
            return Err(DataError::ColumnCount {
                uri: uri.to_string(),
                line,
                found: columns,
                expected: label_columns + 1,
                first_line: line,
            });
        }
        data.features_per_row = columns - label_columns;
        check_limits(uri, 1, data.features_per_row)?;
    } else if columns != data.features_per_row + label_columns {
        return Err(DataError::ColumnCount {
            uri: uri.to_string(),
            line,
            found: columns,
            expected: data.features_per_row + label_columns,
            first_line,
        });
    }
    let mut fields = fields(text);
    if labelled {
        let label_text = fields.next().expect("split yields at least one field").trim();
        data.labels.push(parse_label(uri, line, label_text)?);
    }
    for (index, field) in fields.enumerate() {
        let column = index + 1 + label_columns;
        let value = parse_field(field).ok_or_else(|| {
            let hint = if line == first_line { " (a header row is not supported)" } else { "" };
            field_error(uri, line, column, &format!("`{}` is not a number{hint}", field.trim()))
        })?;
        if !value.is_finite() {
            return Err(field_error(uri, line, column, &format!("`{}` is not a finite number", field.trim())));
        }
        data.values.push(value);
    }
    Ok(())
}

/// The comma-separated fields of `text`. Split on the byte: `str::split(',')` searches for each
/// comma and then compares the match (a `memchr` and a `memcmp` call per field), which with the
/// Unicode-aware trim took most of a wide row's parse time. MNIST 5k's whole load with this and
/// [`parse_field`]: 0.68x (`scripts/bench/data.sh`, figures in its README).
fn fields(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.bytes().position(|b| b == b',') {
            Some(at) => {
                rest = Some(&current[at + 1..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// One field (surrounding whitespace allowed) as an f32: [`parse_f32`] of the trimmed text. A
/// small integer with only ASCII spaces around it (the common case) is read without the
/// Unicode-aware trim: if the bytes between ASCII whitespace are all digits, no other
/// whitespace can surround them, so both trims give the same text.
fn parse_field(field: &str) -> Option<f32> {
    small_integer(field.as_bytes().trim_ascii()).or_else(|| parse_f32(field.trim()))
}

/// Digits at most in a field read without the float parser: every integer up to 9,999,999 is
/// exact in f32.
const FAST_DIGITS_MAX: usize = 7;

/// `bytes` as an f32 when they are 1 to [`FAST_DIGITS_MAX`] ASCII digits; None otherwise.
fn small_integer(bytes: &[u8]) -> Option<f32> {
    if bytes.is_empty() || bytes.len() > FAST_DIGITS_MAX || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = bytes.iter().fold(0u32, |value, digit| value * 10 + u32::from(digit - b'0'));
    Some(value as f32)
}

/// `field` as an f32, exactly as `str::parse::<f32>` reads it. Plain unsigned integers of up to
/// [`FAST_DIGITS_MAX`] digits (pixels, counts: most of a typical CSV) skip the general float
/// parser, which took most of a data set's load time (MNIST 5k, release, the 2-core development
/// machine: the whole load 135-170 ms before, 93-98 ms with this path).
pub fn parse_f32(field: &str) -> Option<f32> {
    small_integer(field.as_bytes()).or_else(|| field.parse::<f32>().ok())
}

fn parse_label(uri: &str, line: u64, text: &str) -> Result<u32, DataError> {
    match text.parse::<i64>() {
        Ok(label) if (0..CLASSES_MAX as i64).contains(&label) => Ok(label as u32),
        Ok(_) => {
            Err(DataError::LabelOutOfRange { uri: uri.to_string(), line, label: text.to_string(), limit: CLASSES_MAX })
        }
        Err(_) => {
            let hint = if line == 1 { " (a header row is not supported)" } else { "" };
            Err(field_error(uri, line, 1, &format!("label `{text}` is not a whole number{hint}")))
        }
    }
}

fn field_error(uri: &str, line: u64, column: usize, reason: &str) -> DataError {
    DataError::Field { uri: uri.to_string(), line, column, reason: reason.to_string() }
}

fn read_error(uri: &str, line: u64, error: &io::Error) -> DataError {
    match error.kind() {
        io::ErrorKind::FileTooLarge => DataError::TooLarge {
            uri: uri.to_string(),
            what: "the decompressed size in bytes",
            value: super::DECOMPRESSED_SIZE_MAX_BYTES + 1,
            limit: super::DECOMPRESSED_SIZE_MAX_BYTES,
        },
        _ => DataError::Truncated { uri: uri.to_string(), location: format!("line {line}"), reason: error.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_like_str_split() {
        for text in ["", ",", "1", "1,2", "1,,2", ",1,", "a,b,c,", " 1 , 2 ,3", "٣,4,é", ",,,"] {
            assert_eq!(fields(text).collect::<Vec<_>>(), text.split(',').collect::<Vec<_>>(), "`{text}`");
        }
    }

    #[test]
    fn a_field_reads_exactly_what_the_trimmed_float_parser_reads() {
        let reference = |field: &str| field.trim().parse::<f32>().ok().map(f32::to_bits);
        let spaces = ["", " ", "  ", "\t", "\u{a0}", "\u{2003}", " \u{a0}"];
        let numbers = ["0", "7", "255", "1234567", "12345678", "-3", "+3", "1.5", "1e3", "", "x", "1 2", "inf"];
        for number in numbers {
            for before in spaces {
                for after in spaces {
                    let field = format!("{before}{number}{after}");
                    assert_eq!(parse_field(&field).map(f32::to_bits), reference(&field), "`{field:?}`");
                }
            }
        }
    }
}
