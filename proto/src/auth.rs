//! Bearer tokens in gRPC metadata: `authorization: Bearer <token>`.
//!
//! API clients present the cluster's API token, workers its join token, coordinator peers the
//! peer token. Comparison is constant-time so response timing does not reveal a prefix.
//!
//! A registered worker also presents its own credential (`<worker_id>.<secret>`, issued at
//! registration) in `flotilla-worker-credential`: the join token admits a machine to the
//! cluster, the credential says which worker it is, so it can report only for its own work.

use std::sync::{Arc, RwLock};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::error::{ApiError, ErrorKind};
use crate::limits::TOKEN_LEN_MAX;

pub const AUTHORIZATION_KEY: &str = "authorization";
pub const WORKER_CREDENTIAL_KEY: &str = "flotilla-worker-credential";
const BEARER_PREFIX: &str = "Bearer ";
/// Hex characters of a worker credential's secret (32 random bytes).
pub const WORKER_SECRET_HEX_LEN: usize = 64;

/// The metadata value for `token`. Fails when the token is empty, too long or not printable ASCII.
pub fn bearer_value(token: &str) -> Result<AsciiMetadataValue, ApiError> {
    let printable = token.bytes().all(|b| b.is_ascii_graphic());
    if token.is_empty() || token.len() > TOKEN_LEN_MAX || !printable {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("token must be 1 to {TOKEN_LEN_MAX} printable ASCII characters without spaces"),
        ));
    }
    format!("{BEARER_PREFIX}{token}")
        .parse()
        .map_err(|_| ApiError::new(ErrorKind::InvalidArgument, "token is not valid in gRPC metadata"))
}

/// Adds the bearer token to outgoing metadata.
pub fn attach(metadata: &mut MetadataMap, token: &str) -> Result<(), ApiError> {
    metadata.insert(AUTHORIZATION_KEY, bearer_value(token)?);
    Ok(())
}

/// Checks that `metadata` carries `Bearer <expected>`. `what` names the token in the error
/// ("API token", "join token") so the user knows which one to fix.
pub fn check(metadata: &MetadataMap, expected: &str, what: &str) -> Result<(), ApiError> {
    let presented =
        metadata.get(AUTHORIZATION_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix(BEARER_PREFIX));
    match presented {
        None => Err(ApiError::new(
            ErrorKind::Unauthenticated,
            format!("missing {what}: send `authorization: Bearer <token>` (FLOTILLA_TOKEN or .flotilla/cluster.toml)"),
        )),
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(ErrorKind::Unauthenticated, format!("wrong {what}"))),
    }
}

/// What an API token may do. Ordered: each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Look: jobs, logs, workers, instances, models (and their download), inference jobs.
    Read,
    /// Also submit and cancel training and inference jobs.
    Submit,
    /// Also change the cluster: model aliases (and whatever else administers it).
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read-only",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }
}

/// The cluster's API tokens by role: `admin` is the API token (`--token`, FLOTILLA_TOKEN);
/// the submit and read-only ones are optional. No `Debug`: it holds secrets.
#[derive(Clone)]
pub struct ApiTokens {
    pub admin: String,
    pub submit: Option<String>,
    pub read: Option<String>,
}

impl ApiTokens {
    /// The role `presented` is the token of, if any. Every candidate is compared (constant time
    /// each), so timing does not tell which matched.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let candidates =
            [(Role::Admin, Some(&self.admin)), (Role::Submit, self.submit.as_ref()), (Role::Read, self.read.as_ref())];
        candidates
            .iter()
            .filter_map(|(role, token)| token.map(|t| (role, same_secret(t, presented))))
            .fold(None, |found, (role, matched)| found.or(matched.then_some(*role)))
    }

    /// The role of the token the call presents, if it is at least `needed`; `action` names
    /// what was refused ("submit a job").
    pub fn authorize(&self, metadata: &MetadataMap, needed: Role, action: &str) -> Result<Role, ApiError> {
        let presented =
            metadata.get(AUTHORIZATION_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix(BEARER_PREFIX));
        let Some(presented) = presented else {
            return Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "missing API token: send `authorization: Bearer <token>` (FLOTILLA_TOKEN or .flotilla/cluster.toml)",
            ));
        };
        match self.role_of(presented) {
            None => Err(ApiError::new(ErrorKind::Unauthenticated, "wrong API token")),
            Some(role) if role < needed => Err(ApiError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "a {} token cannot {action}: that needs a {} token (the admin token is `api_token` in \
                     .flotilla/cluster.toml)",
                    role.name(),
                    needed.name()
                ),
            )),
            Some(role) => Ok(role),
        }
    }
}

/// The worker credential a registered worker presents: `(worker id, secret)`. `None` when the
/// call carries none; an error when it is malformed.
pub fn worker_credential(metadata: &MetadataMap) -> Option<Result<(&str, &str), ApiError>> {
    let value = metadata.get(WORKER_CREDENTIAL_KEY)?;
    let parsed = value.to_str().ok().and_then(|v| v.split_once('.')).filter(|(id, secret)| {
        !id.is_empty() && secret.len() == WORKER_SECRET_HEX_LEN && secret.bytes().all(|b| b.is_ascii_hexdigit())
    });
    Some(parsed.ok_or_else(|| {
        ApiError::new(
            ErrorKind::Unauthenticated,
            format!("{WORKER_CREDENTIAL_KEY} must be `<worker_id>.<{WORKER_SECRET_HEX_LEN} hex characters>`"),
        )
    }))
}

/// Fills `buf` from the kernel's random source: the one source of every secret, token, nonce
/// and request id in Flotilla.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf))
}

/// `bytes` random bytes as lower-case hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    random_bytes(&mut buf)?;
    Ok(hex(&buf))
}

/// Lower-case hex of `bytes`: the one spelling of digests (SHA-256 of checkpoints, workdirs,
/// credentials, data sets) and secrets in Flotilla.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Whether `a` and `b` are equal, in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    constant_time_eq(a.as_bytes(), b.as_bytes())
}

/// A tonic interceptor that adds `authorization: Bearer <token>` to every call, and the worker
/// credential once one is set. Clones share the credential: a worker that registers again
/// switches every part of the agent to its new one.
#[derive(Clone)]
pub struct BearerAuth {
    token: AsciiMetadataValue,
    credential: Arc<RwLock<Option<AsciiMetadataValue>>>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Result<BearerAuth, ApiError> {
        Ok(BearerAuth { token: bearer_value(token)?, credential: Arc::default() })
    }

    /// Sends `credential` (from the registration answer) with every later call.
    pub fn set_worker_credential(&self, credential: &str) -> Result<(), ApiError> {
        let value = credential.parse().map_err(|_| {
            ApiError::new(ErrorKind::InvalidArgument, "the worker credential is not valid in gRPC metadata")
        })?;
        let mut slot = self.credential.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(value);
        Ok(())
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(AUTHORIZATION_KEY, self.token.clone());
        let credential = self.credential.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(credential) = credential {
            request.metadata_mut().insert(WORKER_CREDENTIAL_KEY, credential);
        }
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_token_passes_and_others_are_refused() {
        let mut metadata = MetadataMap::new();
        assert_eq!(check(&metadata, "s3cret", "API token").map_err(|e| e.kind), Err(ErrorKind::Unauthenticated));
        attach(&mut metadata, "s3cret").expect("valid token");
        assert!(check(&metadata, "s3cret", "API token").is_ok());
        let err = check(&metadata, "other", "join token").expect_err("wrong token");
        assert_eq!(err.kind, ErrorKind::Unauthenticated);
        assert!(err.message.contains("join token"));
        assert!(check(&metadata, "s3cre", "API token").is_err());
    }

    #[test]
    fn each_role_does_what_it_may_and_no_more() {
        let tokens = ApiTokens { admin: "adm".into(), submit: Some("sub".into()), read: Some("red".into()) };
        let with = |token: &str| {
            let mut metadata = MetadataMap::new();
            attach(&mut metadata, token).expect("valid token");
            metadata
        };
        assert_eq!(tokens.authorize(&with("adm"), Role::Admin, "x").expect("admin"), Role::Admin);
        assert_eq!(tokens.authorize(&with("sub"), Role::Submit, "x").expect("submit"), Role::Submit);
        assert_eq!(tokens.authorize(&with("red"), Role::Read, "x").expect("read"), Role::Read);
        let refused = tokens.authorize(&with("red"), Role::Submit, "submit a job").expect_err("read-only");
        assert_eq!(refused.kind, ErrorKind::PermissionDenied);
        assert!(refused.message.contains("read-only token cannot submit a job"), "{}", refused.message);
        assert_eq!(
            tokens.authorize(&with("sub"), Role::Admin, "x").expect_err("submit").kind,
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            tokens.authorize(&with("nope"), Role::Read, "x").expect_err("wrong").kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            tokens.authorize(&MetadataMap::new(), Role::Read, "x").expect_err("missing").kind,
            ErrorKind::Unauthenticated
        );
        let admin_only = ApiTokens { admin: "adm".into(), submit: None, read: None };
        assert_eq!(
            admin_only.authorize(&with("sub"), Role::Read, "x").expect_err("unset").kind,
            ErrorKind::Unauthenticated
        );
    }

    #[test]
    fn worker_credentials_parse_only_in_their_one_form() {
        let mut metadata = MetadataMap::new();
        assert!(worker_credential(&metadata).is_none());
        let secret = "0f".repeat(32);
        metadata.insert(WORKER_CREDENTIAL_KEY, format!("w-7.{secret}").parse().expect("ascii"));
        let parsed = worker_credential(&metadata).expect("present").expect("valid");
        assert_eq!(parsed, ("w-7", secret.as_str()));
        for bad in ["w-7", "w-7.abc", ".0f", &format!("w-7.{}", "zz".repeat(32))] {
            metadata.insert(WORKER_CREDENTIAL_KEY, bad.parse().expect("ascii"));
            let err = worker_credential(&metadata).expect("present").expect_err(bad);
            assert_eq!(err.kind, ErrorKind::Unauthenticated);
        }
    }

    #[test]
    fn unusable_tokens_are_refused_before_sending() {
        for bad in ["", "has space", "tab\t", &"x".repeat(TOKEN_LEN_MAX + 1), "naïve"] {
            assert_eq!(bearer_value(bad).map_err(|e| e.kind).expect_err(bad), ErrorKind::InvalidArgument);
        }
    }
}
