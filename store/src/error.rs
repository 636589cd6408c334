//! The storage layer's errors, and the one place that turns an object_store error into a cause
//! a user can act on.

/// Why a location cannot be used, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The bucket does not exist (or is in another account).
    NoBucket,
    /// No credentials were found in the environment, a profile or the instance role.
    NoCredentials(String),
    /// Credentials were found and refused (wrong key, no permission).
    Refused(String),
    /// The endpoint did not answer (wrong AWS_ENDPOINT_URL, no network, firewall).
    Unreachable(String),
    /// The client could not be configured (e.g. an http:// endpoint without AWS_ALLOW_HTTP).
    Config(String),
    /// A local folder that cannot be used (permissions, read-only disk).
    Local(String),
    Other(String),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::NoBucket => write!(f, "the bucket does not exist; create it or fix the bucket name"),
            Cause::NoCredentials(detail) => write!(
                f,
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use a profile \
                 (AWS_PROFILE), or run on EC2 with an instance role ({detail})"
            ),
            Cause::Refused(detail) => write!(f, "the credentials were refused: {detail}"),
            Cause::Unreachable(detail) => {
                write!(f, "the endpoint is unreachable (check AWS_ENDPOINT_URL and the network): {detail}")
            }
            Cause::Config(detail) => write!(f, "cannot configure the S3 client: {detail}"),
            Cause::Local(detail) => write!(f, "{detail}"),
            Cause::Other(detail) => write!(f, "{detail}"),
        }
    }
}

impl Cause {
    /// Whether this may pass by itself: the endpoint did not answer (refused or dropped
    /// connections, timeouts) or answered with a server error or throttling after the client's
    /// retries. Trying again later may work, and nothing the user must fix is known. A missing
    /// bucket, refused credentials or a bad setting are not outages: waiting does not fix them.
    pub fn is_outage(&self) -> bool {
        match self {
            Cause::Unreachable(_) => true,
            Cause::Other(text) => server_side(text),
            _ => false,
        }
    }

    /// The cause behind `error`, read from its whole source chain (S3 error codes arrive as text).
    pub fn classify(error: &object_store::Error) -> Cause {
        let text = error.to_string();
        let mut chain = text.clone();
        let mut source = std::error::Error::source(error);
        while let Some(e) = source {
            chain.push_str(": ");
            chain.push_str(&e.to_string());
            source = e.source();
        }
        let has = |needle: &str| chain.contains(needle);
        if matches!(error, object_store::Error::Generic { store: "LocalFileSystem", .. })
            || matches!(error, object_store::Error::PermissionDenied { .. })
                && !has("AccessDenied")
                && !has("InvalidAccessKeyId")
        {
            return Cause::Local(text);
        }
        if has("NoSuchBucket") || has("specified bucket does not exist") {
            Cause::NoBucket
        } else if has("InvalidAccessKeyId") || has("SignatureDoesNotMatch") || has("AccessDenied") || has("Forbidden") {
            Cause::Refused(text)
        } else if has("credential") || has("Credential") || has("metadata") || has("token") {
            Cause::NoCredentials(text)
        } else if has("connect")
            || has("Connect")
            || has("timed out")
            || has("dns error")
            || has("error sending request")
        {
            Cause::Unreachable(text)
        } else if has("AllowHttp") || has("allow_http") || has("HTTP") && has("not allowed") {
            Cause::Config(format!("{text} (set AWS_ALLOW_HTTP=true for an http:// endpoint)"))
        } else {
            Cause::Other(text)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage URI `{uri}` {reason}")]
    Uri { uri: String, reason: String },
    #[error("{uri} cannot be used: {cause}")]
    Unusable { uri: String, cause: Cause },
    #[error("{uri} does not exist")]
    NotFound { uri: String },
    #[error("{uri}: {source}")]
    Op { uri: String, source: object_store::Error },
    #[error("{uri} is {size_bytes} bytes; the limit is {size_max_bytes}")]
    TooLarge { uri: String, size_bytes: u64, size_max_bytes: u64 },
    #[error("{uri} holds more than {limit} objects")]
    TooMany { uri: String, limit: usize },
    #[error("a blocking storage call was made inside an async runtime (a bug: call it from a plain thread)")]
    InsideAsyncRuntime,
    #[error("cannot start a tokio runtime: {0}")]
    Runtime(String),
}

impl StoreError {
    /// An operation on `uri` failed: not-found kept apart, the rest with its cause when it is
    /// one the user can fix.
    pub fn op(uri: String, source: object_store::Error) -> StoreError {
        match &source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { uri },
            _ => match Cause::classify(&source) {
                cause @ (Cause::NoBucket | Cause::NoCredentials(_) | Cause::Refused(_) | Cause::Unreachable(_)) => {
                    StoreError::Unusable { uri, cause }
                }
                _ => StoreError::Op { uri, source },
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// The store did not answer, or failed on its side ([`Cause::is_outage`]): a later try may
    /// work. What a caller waits out instead of counting it against the job.
    pub fn is_outage(&self) -> bool {
        match self {
            StoreError::Unusable { cause, .. } => cause.is_outage(),
            StoreError::Op { source, .. } => is_outage(source),
            _ => false,
        }
    }
}

/// [`Cause::is_outage`] of an object_store error (a missing object is not an outage).
pub fn is_outage(error: &object_store::Error) -> bool {
    !matches!(error, object_store::Error::NotFound { .. }) && Cause::classify(error).is_outage()
}

/// A server error or throttling, as object_store words it after its retries ("Server returned
/// non-2xx status code: 503 Service Unavailable", or the S3 error code in the body).
fn server_side(text: &str) -> bool {
    const SIGNS: [&str; 6] =
        ["status code: 5", "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl"];
    SIGNS.iter().any(|sign| text.contains(sign))
}
