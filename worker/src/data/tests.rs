//! Unit tests of the data module: every kind of bad input gives a `DataError` that names where.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use flotilla_proto::spec::{DataFormat, DataSpec, DataUri};

use super::*;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

fn parse_text(text: &str) -> Result<RawData, DataError> {
    csv::parse("mem://test.csv", text.as_bytes())
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> DataUri {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    DataUri::File(path.to_str().expect("utf-8 temp path").to_string())
}

fn repo_data(name: &str) -> DataUri {
    DataUri::File(format!("{}/../examples/data/{name}", env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn the_integer_fast_path_reads_exactly_what_the_float_parser_reads() {
    let bits = |text: &str| csv::parse_f32(text).map(f32::to_bits);
    let reference = |text: &str| text.parse::<f32>().ok().map(f32::to_bits);
    let mut texts: Vec<String> = (0..=20_000).map(|n| n.to_string()).collect();
    texts.extend((0..=9_999_999u32).step_by(7_919).map(|n| n.to_string()));
    texts.extend(["9999999", "0000000", "0007", "16777217", "99999999", "123456789012"].map(String::from));
    texts
        .extend(["", "-0", "-7", "+4", "1.5", "1e3", ".5", "5.", "inf", "NaN", "0x10", "1_000", "٣"].map(String::from));
    for text in &texts {
        assert_eq!(bits(text), reference(text), "`{text}`");
    }
}

#[test]
fn csv_parses_labels_features_blank_lines_and_crlf() {
    let raw = parse_text("1, 2,3\r\n\n0,4 ,5\n").expect("valid");
    assert_eq!(raw.labels, vec![1, 0]);
    assert_eq!(raw.values, vec![2.0, 3.0, 4.0, 5.0]);
    assert_eq!(raw.features_per_row, 2);
}

#[test]
fn csv_non_numeric_field_names_line_and_column() {
    let err = parse_text("1,2,3\n0,4,x5\n").expect_err("bad field");
    assert_eq!(
        err,
        DataError::Field { uri: "mem://test.csv".into(), line: 2, column: 3, reason: "`x5` is not a number".into() }
    );
    assert_eq!(err.to_string(), "mem://test.csv: line 2, column 3: `x5` is not a number");
    let err = parse_text("1,2,nan\n").expect_err("nan");
    assert!(err.to_string().contains("line 1, column 3"), "{err}");
}

#[test]
fn csv_header_row_gets_a_hint() {
    let err = parse_text("label,p1\n1,2\n").expect_err("header");
    assert!(err.to_string().contains("line 1, column 1") && err.to_string().contains("header"), "{err}");
}

#[test]
fn csv_wrong_column_count_names_both_lines() {
    let err = parse_text("\n1,2,3\n0,4\n").expect_err("short row");
    assert_eq!(
        err,
        DataError::ColumnCount { uri: "mem://test.csv".into(), line: 3, found: 2, expected: 3, first_line: 2 }
    );
    let err = parse_text("7\n").expect_err("label only");
    assert!(matches!(err, DataError::ColumnCount { line: 1, found: 1, .. }), "{err}");
}

#[test]
fn csv_label_out_of_range() {
    for (text, label) in [("1000,1\n", "1000"), ("0,1\n-1,2\n", "-1")] {
        let err = parse_text(text).expect_err("label range");
        assert!(matches!(&err, DataError::LabelOutOfRange { label: l, .. } if l == label), "{err}");
        assert!(err.to_string().contains("column 1"), "{err}");
    }
    let err = parse_text("1.5,1\n").expect_err("fractional label");
    assert!(err.to_string().contains("line 1, column 1"), "{err}");
}

#[test]
fn csv_empty_file_is_an_error() {
    assert_eq!(parse_text(""), Err(DataError::Empty { uri: "mem://test.csv".into() }));
    assert_eq!(parse_text("\n\n  \n"), Err(DataError::Empty { uri: "mem://test.csv".into() }));
}

#[test]
fn csv_truncated_gzip_names_the_line() {
    let text: String = (0..2000).map(|i| format!("{},{},{}\n", i % 10, i, i * 7 % 13)).collect();
    let compressed = gzip(text.as_bytes());
    let truncated = &compressed[..compressed.len() / 2];
    let err = csv::parse("mem://t.csv.gz", store::maybe_gunzip("mem://t.csv.gz", truncated)).expect_err("truncated");
    let DataError::Truncated { location, .. } = &err else { panic!("expected Truncated, got {err}") };
    assert!(location.starts_with("line "), "{err}");
    // The complete stream parses, also when only the magic bytes say it is gzip.
    let raw = csv::parse("mem://t", store::maybe_gunzip("mem://t", &compressed)).expect("complete gzip");
    assert_eq!(raw.labels.len(), 2000);
}

#[test]
fn gz_name_without_gzip_content_is_an_error_not_garbage() {
    let err = csv::parse("mem://x.csv.gz", store::maybe_gunzip("mem://x.csv.gz", b"1,2\n")).expect_err("not gzip");
    assert!(matches!(err, DataError::Truncated { .. }), "{err}");
}

fn idx_bytes(element_type: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, element_type, dims.len() as u8];
    dims.iter().for_each(|d| out.extend_from_slice(&d.to_be_bytes()));
    out.extend_from_slice(payload);
    out
}

#[test]
fn idx_pair_loads_with_gzip_and_scales_to_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pixels: Vec<u8> = (0..3 * 2 * 2).map(|i| (i * 20) as u8).collect();
    let images = write_file(dir.path(), "t-images-idx3-ubyte.gz", &gzip(&idx_bytes(8, &[3, 2, 2], &pixels)));
    write_file(dir.path(), "t-labels-idx1-ubyte.gz", &gzip(&idx_bytes(8, &[3], &[2, 0, 1])));
    let data = load(&images, DataFormat::Idx).expect("idx pair");
    assert_eq!((data.rows, data.features_per_row, data.classes), (3, 4, 3));
    assert_eq!(data.labels, vec![2, 0, 1]);
    assert_eq!(data.feature_scale, 255.0);
    assert_eq!(data.row(2), &[160.0 / 255.0, 180.0 / 255.0, 200.0 / 255.0, 220.0 / 255.0]);
}

#[test]
fn idx_truncated_or_mismatched_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = write_file(dir.path(), "a-images-idx3-ubyte", &idx_bytes(8, &[3, 2, 2], &[0; 11]));
    write_file(dir.path(), "a-labels-idx1-ubyte", &idx_bytes(8, &[3], &[0, 1, 2]));
    let err = load(&images, DataFormat::Idx).expect_err("truncated images");
    assert!(matches!(&err, DataError::Truncated { location, .. } if location == "byte 27"), "{err}");

    let images = write_file(dir.path(), "b-images-idx3-ubyte", &idx_bytes(8, &[3, 2, 2], &[0; 12]));
    write_file(dir.path(), "b-labels-idx1-ubyte", &idx_bytes(8, &[2], &[0, 1]));
    let err = load(&images, DataFormat::Idx).expect_err("count mismatch");
    assert!(err.to_string().contains("holds 2 labels"), "{err}");

    let images = write_file(dir.path(), "c-images-idx3-ubyte", &[0, 0, 8]);
    let err = load(&images, DataFormat::Idx).expect_err("no labels file");
    assert!(matches!(err, DataError::Read { .. }), "{err}");
    write_file(dir.path(), "c-labels-idx1-ubyte", &idx_bytes(8, &[1], &[0]));
    let err = load(&images, DataFormat::Idx).expect_err("short magic");
    assert!(err.to_string().contains("magic"), "{err}");

    let err = idx::parse("mem://f", &idx_bytes(0x0d, &[1], &[0; 4])).expect_err("float idx");
    assert!(matches!(err, DataError::Unsupported { .. }), "{err}");
}

#[test]
fn idx_labels_file_name_rule() {
    let images: DataUri = "s3://bkt/mnist/train-images-idx3-ubyte.gz".parse().expect("uri");
    assert_eq!(idx::labels_uri(&images).expect("rule").to_string(), "s3://bkt/mnist/train-labels-idx1-ubyte.gz");
    let plain = DataUri::Relative("t10k-images.idx".into());
    assert_eq!(idx::labels_uri(&plain).expect("rule").to_string(), "t10k-labels.idx");
    assert!(idx::labels_uri(&DataUri::File("/d/pixels.bin".into())).is_err());
}

#[test]
fn fetch_errors_name_the_uri() {
    let missing = DataUri::File("/nonexistent/flotilla/x.csv".into());
    let err = load(&missing, DataFormat::Csv).expect_err("missing");
    assert!(matches!(&err, DataError::Read { uri, .. } if uri == "file:///nonexistent/flotilla/x.csv"), "{err}");
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let inside = runtime.block_on(async { load(&repo_data("digits.csv"), DataFormat::Csv) });
    assert_eq!(inside, Err(DataError::InsideAsyncRuntime));
}

#[test]
fn feature_scale_is_inferred_from_the_largest_value() {
    assert_eq!(infer_feature_scale(&[0.0, 16.0, 3.0]), 16.0);
    assert_eq!(infer_feature_scale(&[0.0, 17.0]), 255.0);
    assert_eq!(infer_feature_scale(&[0.0, 0.5]), 1.0);
    assert_eq!(infer_feature_scale(&[-1.0, 200.0]), 1.0, "signed data is not grey levels");
    assert_eq!(infer_feature_scale(&[70_000.0]), 1.0);
}

#[test]
fn shipped_data_sets_load() {
    let digits = load(&repo_data("digits.csv"), DataFormat::Csv).expect("digits");
    assert_eq!((digits.rows, digits.features_per_row, digits.classes), (1797, 64, 10));
    assert_eq!(digits.feature_scale, 16.0);
    let mnist = load(&repo_data("mnist_5k.csv.gz"), DataFormat::Csv).expect("mnist");
    assert_eq!((mnist.rows, mnist.features_per_row, mnist.classes), (5000, 784, 10));
    assert_eq!(mnist.feature_scale, 255.0);
    assert!(mnist.features.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn validation_split_is_seeded_disjoint_and_covers_every_class() {
    let digits = load(&repo_data("digits.csv"), DataFormat::Csv).expect("digits");
    let spec = DataSpec {
        train: repo_data("digits.csv"),
        validation: None,
        format: DataFormat::Csv,
        validation_fraction: 0.2,
    };
    let splits = load_job_data(&spec, 42).expect("split");
    let validation = splits.validation.clone().expect("held out");
    assert_eq!(validation.rows, 359);
    assert_eq!(splits.train.rows + validation.rows, digits.rows);
    assert_eq!(load_job_data(&spec, 42).expect("again"), splits, "same seed, same split");
    assert_ne!(load_job_data(&spec, 43).expect("other seed").validation, Some(validation.clone()));
    let mut per_class = [0usize; 10];
    validation.labels.iter().for_each(|&l| per_class[l as usize] += 1);
    assert!(per_class.iter().all(|&n| n >= 20), "the sorted file is shuffled before the split: {per_class:?}");
    let all_rows: Vec<&[f32]> = (0..digits.rows).map(|r| digits.row(r)).collect();
    let parts: Vec<&[f32]> = (0..splits.train.rows)
        .map(|r| splits.train.row(r))
        .chain((0..validation.rows).map(|r| validation.row(r)))
        .collect();
    assert_eq!(sorted(all_rows), sorted(parts), "every row lands in exactly one part");
}

fn sorted(mut rows: Vec<&[f32]>) -> Vec<&[f32]> {
    rows.sort_by(|a, b| a.partial_cmp(b).expect("finite features"));
    rows
}

#[test]
fn separate_validation_file_is_scaled_like_the_train_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = write_file(dir.path(), "train.csv", b"0,0,16\n1,8,4\n");
    let validation = write_file(dir.path(), "val.csv", b"2,4,2\n");
    let spec = DataSpec { train, validation: Some(validation), format: DataFormat::Csv, validation_fraction: 0.0 };
    let splits = load_job_data(&spec, 1).expect("two files");
    let validation = splits.validation.expect("given");
    assert_eq!(validation.features, vec![0.25, 0.125], "divided by the train set's 16, not its own max");
    assert_eq!((splits.train.classes, validation.classes), (3, 3), "classes agree across the two");
}

#[test]
fn synthetic_blobs_are_deterministic() {
    let uri: DataUri = "synthetic:blobs?samples=200&features=5&classes=4&noise=0.02&seed=3".parse().expect("uri");
    let a = load(&uri, DataFormat::Synthetic).expect("blobs");
    assert_eq!(a, load(&uri, DataFormat::Synthetic).expect("again"));
    assert_eq!((a.rows, a.features_per_row, a.classes, a.feature_scale), (200, 5, 4, 1.0));
    assert_eq!(&a.labels[..5], &[0, 1, 2, 3, 0]);
    // Low noise: every sample is nearest to its own class's mean.
    let mut means = [0.0f32; 4 * 5];
    for r in 0..200 {
        a.row(r).iter().enumerate().for_each(|(f, v)| means[(r % 4) * 5 + f] += v / 50.0);
    }
    let distance =
        |r: usize, c: usize| a.row(r).iter().zip(&means[c * 5..(c + 1) * 5]).map(|(x, m)| (x - m).powi(2)).sum::<f32>();
    for r in 0..200 {
        let own = r % 4;
        assert!((0..4).filter(|&c| c != own).all(|c| distance(r, own) < distance(r, c)), "row {r}");
    }
    let too_big: DataUri = "synthetic:blobs?samples=10000000&features=100000".parse().expect("uri");
    assert!(matches!(load(&too_big, DataFormat::Synthetic), Err(DataError::TooLarge { .. })));
}
