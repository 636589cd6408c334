//! gRPC services of the coordinator. Handlers are thin: authenticate, decode with
//! `flotilla_proto::convert`, call the node, map the error with `ApiError`.

pub mod cluster;
pub mod inference;
pub mod jobs;
pub mod raft_service;
pub mod registry;
pub(crate) mod worker_auth;

use flotilla_proto::ApiError;
use tonic::Status;

/// Maps any layer's error onto the wire through the one mapping in `flotilla-proto`.
pub(crate) fn status(err: impl Into<ApiError>) -> Status {
    err.into().into()
}
