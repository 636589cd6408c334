//! TLS on every gRPC connection: API clients, workers and coordinator peers.
//!
//! One cluster CA signs every certificate (`flotilla certs`, or `flotilla up` for the local
//! cluster). Roles are SAN DNS names the CA puts in each certificate:
//!
//! ```text
//!   coordinator cert: its hosts (IPs/names peers and clients dial) + coordinator.flotilla.internal
//!                     serves TLS; presents it to its peers (mutual TLS on the Raft service)
//!   worker cert:      worker.flotilla.internal; presents it on every worker call (mutual TLS)
//!   API clients:      no certificate; verify the coordinators against the CA, then the token
//! ```
//!
//! The server asks every client for a certificate but accepts none (API clients have none); each
//! service then requires the role it serves: the Raft service a coordinator's, the worker calls a
//! worker's. A plaintext client never completes a handshake; a client that trusts another CA
//! refuses the coordinator's certificate.

use std::path::Path;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::{ApiError, ErrorKind};

/// The SAN that makes a certificate a coordinator's.
pub const COORDINATOR_NAME: &str = "coordinator.flotilla.internal";
/// The SAN that makes a certificate a worker's.
pub const WORKER_NAME: &str = "worker.flotilla.internal";
/// Largest PEM file read (a certificate chain or a key).
pub const PEM_FILE_LEN_MAX: u64 = 64 * 1024;

/// Makes aws-lc-rs the process's TLS crypto provider (idempotent). Needed where rustls is
/// built with two providers (the EC2 SDK brings `ring`); called before any TLS configuration.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Reads a PEM file (bounded), naming `what` and the path in the error.
pub fn read_pem(path: &Path, what: &str) -> Result<String, ApiError> {
    let bad = |why: String| ApiError::new(ErrorKind::InvalidArgument, format!("{what} {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > PEM_FILE_LEN_MAX {
        return Err(bad(format!("{} bytes; a PEM file is at most {PEM_FILE_LEN_MAX}", meta.len())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    if !text.contains("-----BEGIN ") {
        return Err(bad("not a PEM file (no -----BEGIN line)".into()));
    }
    Ok(text)
}

/// What a client needs for TLS: the cluster CA, and its own certificate when it has a role
/// (a worker, a coordinator talking to its peers).
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: String,
    /// `(certificate chain, private key)`, PEM.
    pub identity: Option<(String, String)>,
}

impl ClientTls {
    /// Loads the CA and, when both are given, the client's certificate and key.
    pub fn load(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<ClientTls, ApiError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read_pem(cert, "TLS certificate")?, read_pem(key, "TLS key")?)),
            (None, None) => None,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::InvalidArgument,
                    "a TLS client certificate needs both --tls-cert and --tls-key",
                ));
            }
        };
        Ok(ClientTls { ca_pem: read_pem(ca, "TLS CA")?, identity })
    }

    /// The tonic client configuration for a connection to `host` (what the certificate of the
    /// coordinator there must name).
    pub fn config(&self, host: &str) -> ClientTlsConfig {
        install_crypto_provider();
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem)).domain_name(host);
        match &self.identity {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

/// The server side: the coordinator's certificate and key, and the CA its clients' certificates
/// must chain to.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Shows no key material.
impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls { .. }")
    }
}

impl ServerTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<ServerTls, ApiError> {
        Ok(ServerTls {
            cert_pem: read_pem(cert, "TLS certificate")?,
            key_pem: read_pem(key, "TLS key")?,
            ca_pem: read_pem(ca, "TLS CA")?,
        })
    }

    /// What this coordinator presents to its peers (the same certificate, as a client).
    pub fn as_client(&self) -> ClientTls {
        ClientTls { ca_pem: self.ca_pem.clone(), identity: Some((self.cert_pem.clone(), self.key_pem.clone())) }
    }
}

/// Whether the certificate chain a client presented (already verified against the cluster CA
/// by the TLS layer) names `role` ([`COORDINATOR_NAME`] or [`WORKER_NAME`]).
pub fn has_role(peer_certs: Option<&[CertificateDer<'static>]>, role: &'static str) -> bool {
    let Some(leaf) = peer_certs.and_then(|chain| chain.first()) else { return false };
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else { return false };
    let Ok(name) = ServerName::try_from(role) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Refuses a call whose TLS client certificate does not carry `role` (when the server runs TLS).
pub fn require_role<T>(request: &tonic::Request<T>, role: &'static str) -> Result<(), ApiError> {
    let certs = request.peer_certs();
    if has_role(certs.as_deref().map(Vec::as_slice), role) {
        return Ok(());
    }
    let who = if role == COORDINATOR_NAME { "a coordinator" } else { "a worker" };
    Err(ApiError::new(
        ErrorKind::Unauthenticated,
        format!("this call needs {who}'s TLS client certificate (signed by the cluster CA, naming {role})"),
    ))
}
