//! The one mapping between Flotilla's error kinds and `tonic::Code`.
//!
//! Every layer has its own error enum; at the API boundary each converts into an [`ApiError`]
//! (kind + message), which becomes a `tonic::Status` here and nowhere else. Clients turn a
//! `Status` back into an `ApiError` and decide from the kind whether to retry, fail over to
//! another coordinator, or report. A `NotLeader` error carries the leader's address in the
//! `flotilla-leader` metadata entry so the client can go there directly.

use std::fmt;

use flotilla_core::{IdParseError, SpecError};
use tonic::{Code, Status};

/// Metadata key carrying the leader's API address on `NotLeader` errors.
pub const LEADER_HINT_KEY: &str = "flotilla-leader";
/// Metadata key carrying the error kind, so kinds that share a gRPC code stay distinct.
pub const ERROR_KIND_KEY: &str = "flotilla-error-kind";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range. Not retryable.
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The request is valid but the target's state forbids it (cancel a finished job).
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    /// A limit was hit (queue full, too many proposals in flight). Retry after a pause.
    ResourceExhausted,
    /// This node is not the Raft leader. Retry at the leader (hint attached when known).
    NotLeader,
    /// The service cannot answer now (no leader elected, shutting down). Retry.
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    /// A bug or an unexpected failure on the server. Not retryable.
    Internal,
}

impl ErrorKind {
    const ALL: [ErrorKind; 12] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::FailedPrecondition,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
        ErrorKind::NotLeader,
        ErrorKind::Unavailable,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ];

    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::NotLeader | ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::Internal => Code::Internal,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::FailedPrecondition => "failed-precondition",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::ResourceExhausted => "resource-exhausted",
            ErrorKind::NotLeader => "not-leader",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline-exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }

    /// Kinds a client may retry (possibly at another coordinator) without changing the request.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::NotLeader | ErrorKind::Unavailable | ErrorKind::ResourceExhausted | ErrorKind::DeadlineExceeded
        )
    }

    fn from_code(code: Code) -> ErrorKind {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::FailedPrecondition | Code::Aborted => ErrorKind::FailedPrecondition,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => ErrorKind::Internal,
        }
    }
}

/// An error as it crosses the API: what kind, what happened, and where the leader is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// For `NotLeader`: the leader's API address, when this node knows it.
    pub leader_hint: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), leader_hint: None }
    }

    pub fn not_leader(leader_hint: Option<String>) -> Self {
        let message = match &leader_hint {
            Some(addr) => format!("this coordinator is not the leader; the leader is at {addr}"),
            None => "this coordinator is not the leader and knows of none yet (election in progress)".to_string(),
        };
        ApiError { kind: ErrorKind::NotLeader, message, leader_hint }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.name())
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        let mut status = Status::new(err.kind.code(), err.message);
        let metadata = status.metadata_mut();
        metadata.insert(ERROR_KIND_KEY, tonic::metadata::AsciiMetadataValue::from_static(err.kind.name()));
        if let Some(value) = err.leader_hint.and_then(|hint| hint.parse().ok()) {
            metadata.insert(LEADER_HINT_KEY, value);
        }
        status
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> ApiError {
        let metadata = status.metadata();
        let named = metadata
            .get(ERROR_KIND_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|name| ErrorKind::ALL.into_iter().find(|k| k.name() == name));
        let kind = named.unwrap_or_else(|| match status.code() {
            // No kind attached: the status came from the transport (a connection reset mid-call,
            // a peer that died), not from a coordinator's answer. Another node may serve it.
            Code::Unknown | Code::Cancelled => ErrorKind::Unavailable,
            code => ErrorKind::from_code(code),
        });
        let leader_hint = metadata.get(LEADER_HINT_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut message = status.message().to_string();
        // The transport's own statuses say only "tcp connect error" or the like; why (refused,
        // no route, a certificate refused) is in their causes.
        if named.is_none()
            && let Some(source) = std::error::Error::source(&status)
        {
            let chain = std::iter::successors(Some(source), |e| e.source());
            let cause = flotilla_core::text::error_chain(chain);
            if !cause.is_empty() && !message.contains(&cause) {
                message =
                    if message.is_empty() || cause.contains(&message) { cause } else { format!("{message}: {cause}") };
            }
        }
        ApiError { kind, message, leader_hint }
    }
}

impl From<SpecError> for ApiError {
    fn from(err: SpecError) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, err.to_string())
    }
}

impl From<IdParseError> for ApiError {
    fn from(err: IdParseError) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport error that keeps its cause apart, as hyper's do.
    #[derive(Debug)]
    struct Connect(std::io::Error);
    impl std::fmt::Display for Connect {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }
    impl std::error::Error for Connect {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_transport_status_says_its_cause() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let error = ApiError::from(Status::from_error(Box::new(Connect(refused))));
        assert_eq!(error.kind, ErrorKind::Unavailable, "another node may serve it");
        assert_eq!(
            error.message, "tcp connect error: Connection refused (os error 111)",
            "it said only its first words"
        );
        // A coordinator's own answer is left as it was said.
        let answered = ApiError::from(Status::from(ApiError::new(ErrorKind::NotFound, "job-9 does not exist")));
        assert_eq!(answered.message, "job-9 does not exist");
    }

    #[test]
    fn every_kind_survives_the_wire() {
        for kind in ErrorKind::ALL {
            let status: Status = ApiError::new(kind, "boom").into();
            assert_eq!(status.code(), kind.code());
            let back = ApiError::from(status);
            assert_eq!((back.kind, back.message.as_str()), (kind, "boom"));
        }
    }

    #[test]
    fn leader_hints_travel_in_metadata() {
        let status: Status = ApiError::not_leader(Some("127.0.0.1:7001".into())).into();
        assert_eq!(status.code(), Code::Unavailable);
        let back = ApiError::from(status);
        assert_eq!(back.kind, ErrorKind::NotLeader);
        assert_eq!(back.leader_hint.as_deref(), Some("127.0.0.1:7001"));
        assert!(back.kind.is_retryable());
    }

    #[test]
    fn foreign_statuses_map_by_code() {
        assert_eq!(ApiError::from(Status::unavailable("x")).kind, ErrorKind::Unavailable);
        assert_eq!(ApiError::from(Status::unimplemented("x")).kind, ErrorKind::Internal);
        assert_eq!(ApiError::from(Status::unknown("transport error")).kind, ErrorKind::Unavailable);
        assert!(!ErrorKind::InvalidArgument.is_retryable());
    }
}
