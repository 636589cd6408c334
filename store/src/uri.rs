//! What a storage URI may be. Pure: no I/O, no environment.
//!
//! Accepted: `file:///abs/dir`, a plain absolute path `/abs/dir`, `s3://bucket[/prefix]`.
//! Refused with the reason: relative paths, `..` segments, empty buckets, any other scheme.

use object_store::path::Path;

use crate::error::StoreError;

/// Which store a URI is in. Two locations with the same root share connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// The local file system, keys relative to `/`.
    File,
    S3 {
        bucket: String,
    },
}

impl Root {
    /// The canonical URI of `key` in this store.
    pub fn uri_of(&self, key: &Path) -> String {
        match self {
            Root::File => format!("file:///{key}"),
            Root::S3 { bucket } if key.as_ref().is_empty() => format!("s3://{bucket}"),
            Root::S3 { bucket } => format!("s3://{bucket}/{key}"),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Root::File)
    }
}

/// A parsed storage URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUri {
    pub root: Root,
    /// The key prefix inside the store (no leading or trailing slash).
    pub prefix: Path,
}

/// Bucket names are 3 to 63 characters of lower-case letters, digits, dots and hyphens (AWS).
const BUCKET_CHARS_MAX: usize = 63;

/// Parses `uri`; the error names the URI and says what would be accepted.
pub fn parse(uri: &str) -> Result<StoreUri, StoreError> {
    let bad = |reason: &str| StoreError::Uri { uri: uri.to_string(), reason: reason.to_string() };
    let (root, rest) = if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket; expected s3://bucket/prefix"));
        }
        if bucket.len() > BUCKET_CHARS_MAX
            || !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        {
            return Err(bad("the bucket name must be at most 63 lower-case letters, digits, dots and hyphens"));
        }
        (Root::S3 { bucket: bucket.to_string() }, rest)
    } else if let Some(rest) = uri.strip_prefix("file://") {
        let Some(rest) = rest.strip_prefix('/') else {
            return Err(bad("the path must be absolute: file:///absolute/path"));
        };
        (Root::File, rest)
    } else if let Some(rest) = uri.strip_prefix('/') {
        (Root::File, rest)
    } else if let Some((scheme, _)) = uri.split_once("://") {
        return Err(bad(&format!(
            "scheme `{scheme}://` is not supported; use file:///absolute/path or s3://bucket/prefix"
        )));
    } else {
        return Err(bad("is a relative path; use an absolute path, file:///absolute/path or s3://bucket/prefix"));
    };
    let mut prefix = Path::default();
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err(bad("must not contain `.` or `..` segments"));
        }
        if segment.chars().any(char::is_control) {
            return Err(bad("must not contain control characters"));
        }
        prefix = prefix.join(segment);
    }
    Ok(StoreUri { root, prefix })
}
