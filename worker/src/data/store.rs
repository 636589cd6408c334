//! Fetching data objects through `object_store`, and undoing gzip as a stream.
//!
//! Owns: mapping a [`DataUri`] to a store and a key, the size cap on what is fetched, the
//! private blocking runtime, gzip detection and the decompressed-size cap.
//! Must not touch: parsing (the readers), scaling, splitting.
//!
//! `file://` and `s3://` read through [`flotilla_store`] (S3 settings from the standard AWS
//! environment). The compressed object is fetched whole (bounded by [`FILE_SIZE_MAX_BYTES`]);
//! decompression then streams, so the decompressed text is never held in memory at once.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;
use flotilla_proto::spec::DataUri;
use flotilla_store::StoreError;
use object_store::path::Path;

use super::{DECOMPRESSED_SIZE_MAX_BYTES, DataError, FILE_SIZE_MAX_BYTES};

/// Reads the whole object at `uri`. Blocking.
pub fn fetch(uri: &DataUri) -> Result<Vec<u8>, DataError> {
    let name = uri.to_string();
    let unsupported = |reason: &str| DataError::Unsupported { uri: name.clone(), reason: reason.to_string() };
    let read_error = |e: StoreError| match e {
        StoreError::TooLarge { size_bytes, size_max_bytes, .. } => DataError::TooLarge {
            uri: name.clone(),
            what: "the object size in bytes",
            value: size_bytes,
            limit: size_max_bytes,
        },
        StoreError::InsideAsyncRuntime => DataError::InsideAsyncRuntime,
        outage if outage.is_outage() => DataError::Unavailable { uri: name.clone(), reason: outage.to_string() },
        other => DataError::Read { uri: name.clone(), reason: other.to_string() },
    };
    let (location, key) = match uri {
        DataUri::File(path) => {
            // Canonicalised: resolves `..` and symlinks (object_store refuses `..` segments) and
            // turns a missing file into an error that names the path.
            let key = Path::from_filesystem_path(path)
                .map_err(|e| DataError::Read { uri: name.clone(), reason: e.to_string() })?;
            (flotilla_store::open("/").map_err(read_error)?, key)
        }
        DataUri::S3 { .. } => {
            let location = flotilla_store::open(&name).map_err(read_error)?;
            let key = location.prefix().clone();
            (location, key)
        }
        DataUri::Relative(_) => {
            return Err(unsupported(
                "is a relative path; resolve it against the spec file first (`flotilla submit` does)",
            ));
        }
        DataUri::Synthetic(_) => return Err(unsupported("synthetic data is generated, not fetched")),
    };
    let bytes = flotilla_store::block_on(flotilla_store::get_capped(&location, &key, FILE_SIZE_MAX_BYTES))
        .map_err(read_error)?
        .map_err(read_error)?;
    Ok(bytes.to_vec())
}

/// A reader over the decompressed contents when `bytes` is gzip, else over `bytes` itself.
/// Either way reading past [`DECOMPRESSED_SIZE_MAX_BYTES`] fails with `FileTooLarge`.
pub fn maybe_gunzip<'a>(name: &str, bytes: &'a [u8]) -> Box<dyn Read + 'a> {
    if flotilla_proto::text::is_gzip(name, bytes) {
        Box::new(CappedReader { inner: MultiGzDecoder::new(bytes), left: DECOMPRESSED_SIZE_MAX_BYTES })
    } else {
        Box::new(CappedReader { inner: bytes, left: DECOMPRESSED_SIZE_MAX_BYTES })
    }
}

/// Like `Read::take`, but running past the cap is an error instead of a silent end of file.
struct CappedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("decompresses to more than {DECOMPRESSED_SIZE_MAX_BYTES} bytes"),
            )
        })?;
        Ok(n)
    }
}
