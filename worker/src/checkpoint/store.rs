//! Object stores from URIs: `file:///abs/dir` or a plain absolute path (local disk); `s3://`
//! arrives with the S3 configuration (the match below is where it goes).

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

use super::CheckpointError;

/// Whether [`open`] may create the local folder (writers) or must find it (readers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A store and the prefix inside it that a URI names.
pub fn open(uri: &str, access: Access) -> Result<(Arc<dyn ObjectStore>, Path), CheckpointError> {
    let bad = |reason: &str| CheckpointError::Uri { uri: uri.to_string(), reason: reason.to_string() };
    let path = if let Some(rest) = uri.strip_prefix("file://") {
        rest
    } else if uri.starts_with('/') {
        uri
    } else if uri.starts_with("s3://") {
        return Err(bad("s3:// checkpoints need the S3 store, which this build does not include yet"));
    } else {
        return Err(bad("expected file:///absolute/path or /absolute/path"));
    };
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute (file:///...)"));
    }
    match access {
        Access::Write => std::fs::create_dir_all(path).map_err(|e| bad(&format!("cannot create {path}: {e}")))?,
        Access::Read if !std::path::Path::new(path).is_dir() => {
            return Err(CheckpointError::Partial { prefix: path.to_string() });
        }
        Access::Read => {}
    }
    let store = LocalFileSystem::new_with_prefix(path).map_err(CheckpointError::Store)?;
    Ok((Arc::new(store), Path::default()))
}
