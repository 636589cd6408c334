//! Data locations in a job spec: local paths, `file://`, `s3://` and `synthetic:` generators.
//!
//! Parsing is pure string work. Turning a relative path into an absolute `file://` URI needs the
//! directory of the spec file, which the CLI supplies at submit time
//! ([`DataUri::resolve_relative`]); the coordinator only ever stores resolved URIs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest URI accepted, in bytes (object-store keys are limited to 1 KiB; the bucket and the
/// scheme need the rest).
pub const URI_LEN_MAX_BYTES: usize = 2048;

/// Where a data set comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataUri {
    /// A path relative to the spec file's folder, not yet resolved (see `resolve_relative`).
    Relative(String),
    /// An absolute local path (`file:///abs/path` or `/abs/path`).
    File(String),
    /// An object in S3 (or an S3-compatible store).
    S3 { bucket: String, key: String },
    /// Data generated from a seed; nothing is read.
    Synthetic(SyntheticSpec),
}

/// A URI did not parse. The message says what forms are accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(pub String);

impl DataUri {
    /// The format a URI implies, if it implies one (`.csv`, `.csv.gz`, `-ubyte`, `synthetic:`).
    pub fn implied_format(&self) -> Option<super::DataFormat> {
        use super::DataFormat;
        let path = match self {
            DataUri::Synthetic(_) => return Some(DataFormat::Synthetic),
            DataUri::Relative(p) | DataUri::File(p) => p.as_str(),
            DataUri::S3 { key, .. } => key.as_str(),
        };
        let lower = path.to_ascii_lowercase();
        let lower = lower.strip_suffix(".gz").unwrap_or(&lower);
        if lower.ends_with(".csv") {
            Some(DataFormat::Csv)
        } else if lower.ends_with("-ubyte") || lower.ends_with(".idx") {
            Some(DataFormat::Idx)
        } else {
            None
        }
    }

    /// Turns a relative path into an absolute `file://` URI under `base_dir` (an absolute path,
    /// normally the folder of the spec file), with `.` and `..` resolved by name
    /// ([`join_lexically`]): `../data/x.csv` next to `/srv/jobs/a.toml` is
    /// `file:///srv/data/x.csv`. Other URIs are returned unchanged.
    pub fn resolve_relative(&self, base_dir: &str) -> DataUri {
        match self {
            DataUri::Relative(rel) => DataUri::File(join_lexically(base_dir, rel)),
            other => other.clone(),
        }
    }

    pub fn is_resolved(&self) -> bool {
        !matches!(self, DataUri::Relative(_))
    }
}

/// `rel` joined to the absolute path `base`, with `.` and empty segments dropped and each `..`
/// taking away the segment before it (never above `/`), as a shell's `cd` does: the coordinators
/// refuse a path that still holds `..` (they confine local paths to their data roots), so the
/// CLI sends the resolved form. Pure string work; symlinks are resolved where the path is used.
pub fn join_lexically(base: &str, rel: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in base.split('/').chain(rel.split('/')) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => segments.push(name),
        }
    }
    format!("/{}", segments.join("/"))
}

impl fmt::Display for DataUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataUri::Relative(p) => f.write_str(p),
            DataUri::File(p) => write!(f, "file://{p}"),
            DataUri::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            DataUri::Synthetic(s) => s.fmt(f),
        }
    }
}

impl FromStr for DataUri {
    type Err = UriError;

    fn from_str(input: &str) -> Result<Self, UriError> {
        if input.is_empty() {
            return Err(UriError("is empty; give a path, file://, s3:// or synthetic: URI".into()));
        }
        if input.len() > URI_LEN_MAX_BYTES {
            return Err(UriError(format!("is {} bytes long; at most {URI_LEN_MAX_BYTES} are accepted", input.len())));
        }
        if input.chars().any(char::is_control) {
            return Err(UriError("contains a control character".into()));
        }
        if let Some(rest) = input.strip_prefix("synthetic:") {
            return rest.parse().map(DataUri::Synthetic);
        }
        if let Some(rest) = input.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(UriError(format!(
                    "`{input}` is not an absolute file URI; write file:///absolute/path \
                     (three slashes) or a plain path relative to the spec file"
                )));
            }
            return Ok(DataUri::File(rest.to_string()));
        }
        if let Some(rest) = input.strip_prefix("s3://") {
            return parse_s3(input, rest);
        }
        if let Some((scheme, _)) = input.split_once("://") {
            return Err(UriError(format!(
                "scheme `{scheme}` is not supported; use a path, file://, s3:// or synthetic:"
            )));
        }
        if input.starts_with('/') {
            return Ok(DataUri::File(input.to_string()));
        }
        Ok(DataUri::Relative(input.to_string()))
    }
}

fn parse_s3(input: &str, rest: &str) -> Result<DataUri, UriError> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric();
    if !bucket_ok {
        return Err(UriError(format!(
            "`{input}`: bucket `{bucket}` is not a valid S3 bucket name (3 to 63 lowercase \
             letters, digits, '-' or '.')"
        )));
    }
    if key.is_empty() {
        return Err(UriError(format!("`{input}` names a bucket but no object; write s3://{bucket}/path/to/file")));
    }
    Ok(DataUri::S3 { bucket: bucket.to_string(), key: key.to_string() })
}

impl Serialize for DataUri {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DataUri {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The synthetic generators a spec can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// Gaussian clusters, one per class, in `features` dimensions: linearly separable up to
    /// `noise`, so a model that learns anything reaches high accuracy.
    Blobs,
}

impl SyntheticKind {
    pub const ALL: [SyntheticKind; 1] = [SyntheticKind::Blobs];

    pub fn name(self) -> &'static str {
        match self {
            SyntheticKind::Blobs => "blobs",
        }
    }
}

/// Samples in one synthetic data set at most (10 M x 784 floats is already 31 GB).
pub const SYNTHETIC_SAMPLES_MAX: u64 = 10_000_000;
/// Features per synthetic sample at most.
pub const SYNTHETIC_FEATURES_MAX: u64 = 100_000;
/// Classes in a synthetic data set at most.
pub const SYNTHETIC_CLASSES_MAX: u64 = 1_000;

/// A fully parameterised synthetic data set: `synthetic:blobs?samples=N&features=F&classes=C&noise=X&seed=S`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub kind: SyntheticKind,
    pub samples: u64,
    pub features: u64,
    pub classes: u64,
    /// Standard deviation of each cluster around its centre (centres are about 1 apart).
    pub noise: f64,
    pub seed: u64,
}

impl fmt::Display for SyntheticSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "synthetic:{}?samples={}&features={}&classes={}&noise={}&seed={}",
            self.kind.name(),
            self.samples,
            self.features,
            self.classes,
            self.noise,
            self.seed
        )
    }
}

impl FromStr for SyntheticSpec {
    type Err = UriError;

    fn from_str(rest: &str) -> Result<Self, UriError> {
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let kind = SyntheticKind::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            let known: Vec<_> = SyntheticKind::ALL.iter().map(|k| k.name()).collect();
            UriError(format!("synthetic generator `{name}` is unknown; known: {}", known.join(", ")))
        })?;
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| UriError(format!("synthetic parameter `{pair}` needs the form key=value")))?;
            if params.insert(key, value).is_some() {
                return Err(UriError(format!("synthetic parameter `{key}` is given twice")));
            }
        }
        let mut spec = SyntheticSpec { kind, samples: 10_000, features: 784, classes: 10, noise: 1.0, seed: 0 };
        for (key, value) in params {
            match key {
                "samples" => spec.samples = int_param(key, value, 1, SYNTHETIC_SAMPLES_MAX)?,
                "features" => spec.features = int_param(key, value, 1, SYNTHETIC_FEATURES_MAX)?,
                "classes" => spec.classes = int_param(key, value, 2, SYNTHETIC_CLASSES_MAX)?,
                "seed" => spec.seed = int_param(key, value, 0, i64::MAX as u64)?,
                "noise" => {
                    spec.noise = value
                        .parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite() && *n > 0.0 && *n <= 100.0)
                        .ok_or_else(|| {
                            UriError(format!("synthetic parameter noise = `{value}`: expected a number in (0, 100]"))
                        })?
                }
                _ => {
                    return Err(UriError(format!(
                        "synthetic parameter `{key}` is unknown; known: samples, features, classes, noise, seed"
                    )));
                }
            }
        }
        Ok(spec)
    }
}

fn int_param(key: &str, value: &str, min: u64, max: u64) -> Result<u64, UriError> {
    value.parse::<u64>().ok().filter(|n| (min..=max).contains(n)).ok_or_else(|| {
        UriError(format!("synthetic parameter {key} = `{value}`: expected a whole number in [{min}, {max}]"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_canonically() {
        let cases = [
            ("data/x.csv", "data/x.csv"),
            ("/abs/x.csv", "file:///abs/x.csv"),
            ("file:///abs/x.csv.gz", "file:///abs/x.csv.gz"),
            ("s3://my-bucket/a/b.csv", "s3://my-bucket/a/b.csv"),
            ("synthetic:blobs", "synthetic:blobs?samples=10000&features=784&classes=10&noise=1&seed=0"),
            (
                "synthetic:blobs?classes=3&features=2&seed=9&noise=0.5",
                "synthetic:blobs?samples=10000&features=2&classes=3&noise=0.5&seed=9",
            ),
        ];
        for (input, canonical) in cases {
            let uri: DataUri = input.parse().expect(input);
            assert_eq!(uri.to_string(), canonical);
            assert_eq!(canonical.parse::<DataUri>().expect(canonical).to_string(), canonical);
        }
    }

    #[test]
    fn bad_uris_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("gs://bucket/x.csv", "scheme `gs`"),
            ("http://example.com/x.csv", "scheme `http`"),
            ("file://relative/x.csv", "three slashes"),
            ("s3://Bad_Bucket/x", "bucket"),
            ("s3://bucket", "no object"),
            ("synthetic:spirals", "unknown; known: blobs"),
            ("synthetic:blobs?classes=1", "classes"),
            ("synthetic:blobs?samples=0", "samples"),
            ("synthetic:blobs?noise=nan", "noise"),
            ("synthetic:blobs?color=red", "`color` is unknown"),
            ("synthetic:blobs?seed", "key=value"),
            ("synthetic:blobs?seed=1&seed=2", "twice"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<DataUri>().expect_err(input);
            assert!(err.to_string().contains(needle), "{input}: {err}");
        }
        let long = "a".repeat(URI_LEN_MAX_BYTES + 1);
        assert!(long.parse::<DataUri>().is_err());
    }

    #[test]
    fn relative_paths_resolve_under_the_spec_folder() {
        let uri: DataUri = "./data/x.csv".parse().expect("relative");
        assert!(!uri.is_resolved());
        assert_eq!(uri.resolve_relative("/home/u/examples/").to_string(), "file:///home/u/examples/data/x.csv");
        let s3: DataUri = "s3://bkt/x.csv".parse().expect("s3");
        assert_eq!(s3.resolve_relative("/base"), s3);
        // `..` and `.` are resolved by name, never above the root (coordinators refuse `..`).
        let up: DataUri = "../data/./x.csv".parse().expect("relative");
        assert_eq!(up.resolve_relative("/srv/jobs").to_string(), "file:///srv/data/x.csv");
        let cases = [
            ("/srv/jobs", "a//b/../c", "/srv/jobs/a/c"),
            ("/srv", "../../../x", "/x"),
            ("/", "x", "/x"),
            ("/srv/jobs/", ".", "/srv/jobs"),
            ("/srv/jobs", "..x/y..", "/srv/jobs/..x/y.."),
        ];
        for (base, rel, joined) in cases {
            assert_eq!(join_lexically(base, rel), joined, "{base} + {rel}");
        }
    }
}
