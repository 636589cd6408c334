//! flotilla-proto: the wire contract between the CLI, coordinators and workers.
//!
//! Owns the gRPC services (generated from `flotilla/v1/*.proto` by protox + tonic), the
//! conversions between wire messages and core types ([`convert`]), the one mapping from error
//! kinds to `tonic::Code` ([`error`]), bearer-token metadata ([`auth`]), TLS settings ([`tls`]) and the size limits every
//! endpoint enforces ([`limits`]). The ID newtypes are defined in `flotilla-core` (the state
//! machine keys its maps by them) and re-exported here with their wire form.
//!
//! Must not hold logic: a handler decodes with [`convert`], calls the layer below, and maps the
//! error with [`error::ApiError`].

pub mod auth;
pub mod client;
pub mod convert;
pub mod error;
pub mod http;
pub mod limits;
pub mod tls;

pub use error::{ApiError, ErrorKind};
pub use flotilla_core::ids::{IdParseError, JobId, NodeId, WorkerId};
pub use flotilla_core::rand;
/// The job-spec types (defined in the pure core), re-exported so workers need only this crate.
pub use flotilla_core::spec;
pub use flotilla_core::text;

/// Generated messages and services of package `flotilla.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

/// The wire package version, carried in the package name (`flotilla.v1`).
pub const PROTO_VERSION: &str = "v1";
