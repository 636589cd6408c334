//! The checkpoint side of the storage layer: [`flotilla_store`] locations with the checkpoint
//! error type. `file:///abs/dir`, a plain `/abs/dir` and `s3://bucket/prefix` are accepted; the
//! settings (credentials, endpoint) come from the standard AWS environment.

pub use flotilla_store::Location;

use super::CheckpointError;

/// Checks `uri` as [`open`] would, without opening a store.
pub fn check_uri(uri: &str) -> Result<(), CheckpointError> {
    flotilla_store::check_uri(uri).map_err(CheckpointError::from)
}

/// The location `uri` names (no I/O: the first request shows a missing bucket or credentials).
pub fn open(uri: &str) -> Result<Location, CheckpointError> {
    flotilla_store::open(uri).map_err(CheckpointError::from)
}

impl From<flotilla_store::StoreError> for CheckpointError {
    fn from(error: flotilla_store::StoreError) -> CheckpointError {
        match error {
            flotilla_store::StoreError::Uri { uri, reason } => CheckpointError::Uri { uri, reason },
            other => CheckpointError::Location(other),
        }
    }
}
