//! Bearer tokens in gRPC metadata: `authorization: Bearer <token>`.
//!
//! API clients present the cluster's API token, workers its join token, coordinator peers the
//! peer token. Comparison is constant-time so response timing does not reveal a prefix.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::error::{ApiError, ErrorKind};
use crate::limits::TOKEN_LEN_MAX;

pub const AUTHORIZATION_KEY: &str = "authorization";
const BEARER_PREFIX: &str = "Bearer ";

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

/// A tonic interceptor that adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth(AsciiMetadataValue);

impl BearerAuth {
    pub fn new(token: &str) -> Result<BearerAuth, ApiError> {
        bearer_value(token).map(BearerAuth)
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(AUTHORIZATION_KEY, self.0.clone());
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
    fn unusable_tokens_are_refused_before_sending() {
        for bad in ["", "has space", "tab\t", &"x".repeat(TOKEN_LEN_MAX + 1), "naïve"] {
            assert_eq!(bearer_value(bad).map_err(|e| e.kind).expect_err(bad), ErrorKind::InvalidArgument);
        }
    }
}
