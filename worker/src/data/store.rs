//! Fetching data objects through `object_store`, and undoing gzip as a stream.
//!
//! Owns: mapping a [`DataUri`] to a store and a key, the size cap on what is fetched, the
//! private blocking runtime, gzip detection and the decompressed-size cap.
//! Must not touch: parsing (the readers), scaling, splitting.
//!
//! `file://` reads through [`LocalFileSystem`]; `s3://` becomes one more arm in [`fetch`] once
//! the worker is built with object_store's `aws` feature (not enabled yet: it adds the AWS SDK's
//! TLS stack to every worker build). The compressed object is fetched whole (bounded by
//! [`FILE_SIZE_MAX_BYTES`]); decompression then streams, so the decompressed text is never held
//! in memory at once.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;
use flotilla_proto::spec::DataUri;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{DECOMPRESSED_SIZE_MAX_BYTES, DataError, FILE_SIZE_MAX_BYTES};

/// Reads the whole object at `uri`. Blocking.
pub fn fetch(uri: &DataUri) -> Result<Vec<u8>, DataError> {
    let name = uri.to_string();
    let unsupported = |reason: &str| DataError::Unsupported { uri: name.clone(), reason: reason.to_string() };
    match uri {
        DataUri::File(path) => {
            // Canonicalised: resolves `..` and symlinks (object_store refuses `..` segments) and
            // turns a missing file into an error that names the path.
            let key = Path::from_filesystem_path(path)
                .map_err(|e| DataError::Read { uri: name.clone(), reason: e.to_string() })?;
            block_on(get_capped(&LocalFileSystem::new(), &key, &name))?
        }
        DataUri::S3 { .. } => Err(unsupported(
            "s3:// is not built into this worker yet (object_store's `aws` feature is off); copy the \
             data to the worker and use file://",
        )),
        DataUri::Relative(_) => {
            Err(unsupported("is a relative path; resolve it against the spec file first (`flotilla submit` does)"))
        }
        DataUri::Synthetic(_) => Err(unsupported("synthetic data is generated, not fetched")),
    }
}

async fn get_capped<S: ObjectStore>(store: &S, key: &Path, name: &str) -> Result<Vec<u8>, DataError> {
    let read_error = |e: object_store::Error| DataError::Read { uri: name.to_string(), reason: e.to_string() };
    let result = store.get(key).await.map_err(read_error)?;
    if result.meta.size > FILE_SIZE_MAX_BYTES {
        return Err(DataError::TooLarge {
            uri: name.to_string(),
            what: "the object size in bytes",
            value: result.meta.size,
            limit: FILE_SIZE_MAX_BYTES,
        });
    }
    Ok(result.bytes().await.map_err(read_error)?.to_vec())
}

/// Runs `future` to completion on a private current-thread runtime. Refuses to run inside an
/// async runtime, where blocking would stall (and tokio would panic).
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, DataError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(DataError::InsideAsyncRuntime);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| DataError::Read {
        uri: "(runtime)".into(),
        reason: format!("cannot start a tokio runtime: {e}"),
    })?;
    Ok(runtime.block_on(future))
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
