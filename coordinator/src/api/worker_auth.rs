//! Worker credentials: issued by the leader at registration, checked on every later worker
//! call by whichever coordinator answers it.
//!
//! ```text
//!   register (join token) ─▶ leader draws 32 random bytes ─▶ RegisterWorker{digest} through Raft
//!        ◀── credential `<worker_id>.<secret>` (the secret is never stored)
//!   later calls: join token + credential ─▶ SHA-256(secret) == the worker's recorded digest
//!        ─▶ the call may act only as that worker (ids in the request must match it), and
//!           the state machine accepts its reports only for its own gang or shard
//! ```

use flotilla_core::WorkerId;
use flotilla_proto::{ApiError, ErrorKind, auth};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::status;
use crate::raft::node::NodeHandle;

/// A new credential for a secret (hex): `(secret, digest to record)`.
pub(crate) fn issue(secret: String) -> (String, String) {
    let digest = sha256_hex(&secret);
    (secret, digest)
}

/// A fresh secret: 32 bytes from the kernel's random source, as hex.
pub(crate) fn random_secret() -> Result<String, Status> {
    auth::random_hex(32).map_err(|e| {
        status(ApiError::new(ErrorKind::Internal, format!("cannot read /dev/urandom for a worker credential: {e}")))
    })
}

fn sha256_hex(text: &str) -> String {
    auth::hex(&Sha256::digest(text.as_bytes()))
}

/// With TLS, a worker call must come with a worker's client certificate (mutual TLS).
pub(crate) fn check_certificate<T>(request: &Request<T>, tls: bool) -> Result<(), Status> {
    if !tls {
        return Ok(());
    }
    flotilla_proto::tls::require_role(request, flotilla_proto::tls::WORKER_NAME).map_err(status)
}

/// The join token: only a cluster that accepts workers answers worker calls.
pub(crate) fn check_join_token(metadata: &MetadataMap, join_token: Option<&str>) -> Result<(), Status> {
    let Some(token) = join_token else {
        return Err(status(ApiError::new(
            ErrorKind::PermissionDenied,
            "this cluster accepts no workers (start its coordinators with --join-token)",
        )));
    };
    auth::check(metadata, token, "join token").map_err(status)
}

/// What a presented credential turned out to be.
pub(crate) enum Presented {
    /// It is this worker's.
    Valid(WorkerId),
    /// It names a worker this node does not know (never registered, or not applied here yet).
    Unknown(WorkerId),
}

/// Checks the join token and the worker credential against the replicated state.
pub(crate) async fn check<T>(
    node: &NodeHandle,
    join_token: Option<&str>,
    tls: bool,
    request: &Request<T>,
) -> Result<Presented, Status> {
    check_certificate(request, tls)?;
    check_join_token(request.metadata(), join_token)?;
    let (id, secret) = auth::worker_credential(request.metadata())
        .ok_or_else(|| {
            status(ApiError::new(
                ErrorKind::Unauthenticated,
                format!("missing {}: register first (the worker agent does)", auth::WORKER_CREDENTIAL_KEY),
            ))
        })?
        .map_err(status)?;
    let id: WorkerId = id.parse().map_err(|e| {
        status(ApiError::new(ErrorKind::Unauthenticated, format!("{}: {e}", auth::WORKER_CREDENTIAL_KEY)))
    })?;
    let presented = sha256_hex(secret);
    let recorded = node.read_local(move |state| state.workers.get(&id).map(|w| w.credential_sha256.clone())).await;
    match recorded.map_err(status)? {
        None => Ok(Presented::Unknown(id)),
        Some(digest) if !digest.is_empty() && auth::same_secret(&digest, &presented) => Ok(Presented::Valid(id)),
        Some(_) => {
            Err(status(ApiError::new(ErrorKind::Unauthenticated, format!("wrong credential for {id}; register again"))))
        }
    }
}

/// Like [`check`], for calls that need a known worker: the authenticated worker id.
pub(crate) async fn authenticate<T>(
    node: &NodeHandle,
    join_token: Option<&str>,
    tls: bool,
    request: &Request<T>,
) -> Result<WorkerId, Status> {
    match check(node, join_token, tls, request).await? {
        Presented::Valid(id) => Ok(id),
        Presented::Unknown(id) => Err(status(ApiError::new(
            ErrorKind::Unavailable,
            format!("{id} is not known to this coordinator yet; retry (or register again)"),
        ))),
    }
}

/// A request names `claimed` as its worker: it must be the authenticated one.
pub(crate) fn acting_as(authenticated: WorkerId, field: &str, claimed: &str) -> Result<WorkerId, Status> {
    let claimed: WorkerId =
        claimed.parse().map_err(|e| status(ApiError::new(ErrorKind::InvalidArgument, format!("{field}: {e}"))))?;
    if claimed != authenticated {
        return Err(status(ApiError::new(
            ErrorKind::PermissionDenied,
            format!("the credential of {authenticated} cannot act as {claimed} ({field})"),
        )));
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_checked_by_its_digest_only() {
        let (secret, digest) = issue("07".repeat(32));
        assert_eq!(digest.len(), 64);
        assert_ne!(digest, secret);
        assert_eq!(sha256_hex(&secret), digest);
        assert_ne!(issue("08".repeat(32)).1, digest);
        let fresh = random_secret().expect("random");
        assert_eq!(fresh.len(), 64);
        assert_ne!(fresh, random_secret().expect("random"));
    }

    #[test]
    fn a_worker_cannot_act_as_another() {
        let me = WorkerId(3);
        assert_eq!(acting_as(me, "worker_id", &me.to_string()).expect("itself"), me);
        let other = acting_as(me, "worker_id", &WorkerId(4).to_string()).expect_err("another");
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(acting_as(me, "worker_id", "garbage").is_err());
    }
}
