//! A client of the coordinator API that fails over between coordinators.
//!
//! Given one or more addresses (`host:port`, comma-separated, `http://` accepted), it sends
//! each call to the node it last succeeded with, follows `NotLeader` hints, moves to the next
//! address when a node is unreachable, and retries retryable errors with capped backoff, all
//! within a deadline. Calls must be idempotent (submissions carry a client request id).

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::BearerAuth;
use crate::error::{ApiError, ErrorKind};
use crate::limits::API_MESSAGE_BYTES_MAX;
use crate::v1::cluster_service_client::ClusterServiceClient;
use crate::v1::inference_service_client::InferenceServiceClient;
use crate::v1::job_service_client::JobServiceClient;
use crate::v1::registry_service_client::RegistryServiceClient;

/// Addresses one client accepts at most.
pub const ADDRESSES_MAX: usize = 16;
/// A call (all retries together) gives up after this long by default.
pub const CALL_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);
/// One attempt gives up after this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 pings on every connection, idle or not: a coordinator cut off the network (no RST,
/// no FIN) is noticed within interval + timeout, and open streams (assignments, logs, watches)
/// end with an error instead of waiting forever; their callers reconnect elsewhere.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Kept short: during an election the next node is usually ready within a few ticks.
const BACKOFF_MAX: Duration = Duration::from_millis(250);

pub type JobClient = JobServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type ClusterClient = ClusterServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type RegistryClient = RegistryServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type InferenceClient = InferenceServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Parses `host:port[,host:port...]`, accepting an `http://` prefix on each.
pub fn parse_addresses(text: &str) -> Result<Vec<String>, ApiError> {
    let addresses: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/').to_string())
        .collect();
    if addresses.is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            "no coordinator address given; expected host:port[,host:port]",
        ));
    }
    if addresses.len() > ADDRESSES_MAX {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!("{} addresses; at most {ADDRESSES_MAX}", addresses.len()),
        ));
    }
    for a in &addresses {
        let valid = a.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("coordinator address `{a}` is not host:port"),
            ));
        }
    }
    Ok(addresses)
}

#[derive(Clone)]
pub struct ApiClient {
    addresses: Vec<String>,
    /// `Some`: every connection is TLS (https), verifying the coordinators against the CA.
    tls: Option<crate::tls::ClientTls>,
    channels: Vec<Channel>,
    auth: BearerAuth,
    /// Index of the address to try first (the last one that answered, or the leader).
    preferred: usize,
    pub deadline: Duration,
    /// One attempt against one coordinator gives up after this long and the next is tried
    /// (agents keep it short: a heartbeat must reach a live node within its lease).
    pub attempt_timeout: Duration,
}

impl ApiClient {
    /// A plaintext client (a cluster without TLS).
    pub fn new(addresses: &str, token: &str) -> Result<ApiClient, ApiError> {
        ApiClient::with_tls(addresses, token, None)
    }

    /// A client that speaks TLS when `tls` is given.
    pub fn with_tls(addresses: &str, token: &str, tls: Option<crate::tls::ClientTls>) -> Result<ApiClient, ApiError> {
        let auth = BearerAuth::new(token)?;
        let mut client = ApiClient {
            addresses: Vec::new(),
            tls,
            channels: Vec::new(),
            auth,
            preferred: 0,
            deadline: CALL_DEADLINE_DEFAULT,
            attempt_timeout: ATTEMPT_TIMEOUT,
        };
        for address in parse_addresses(addresses)? {
            client.add(address)?;
        }
        Ok(client)
    }

    fn add(&mut self, address: String) -> Result<usize, ApiError> {
        if let Some(i) = self.addresses.iter().position(|a| *a == address) {
            return Ok(i);
        }
        let bad = |e: tonic::transport::Error| {
            ApiError::new(ErrorKind::InvalidArgument, format!("coordinator address `{address}`: {e}"))
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(bad)?;
        if let Some(tls) = &self.tls {
            let host = address.rsplit_once(':').map_or(address.as_str(), |(host, _)| host);
            endpoint = endpoint.tls_config(tls.config(host.trim_matches(['[', ']']))).map_err(bad)?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        self.addresses.push(address);
        self.channels.push(endpoint.connect_lazy());
        Ok(self.channels.len() - 1)
    }

    /// Sends this worker's credential (from its registration) with every later call, from this
    /// client and every clone of it.
    pub fn set_worker_credential(&self, credential: &str) -> Result<(), ApiError> {
        self.auth.set_worker_credential(credential)
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// Runs `call` against the coordinators' JobService until it succeeds, fails for good, or
    /// the deadline passes. `call` gets a fresh client handle each attempt.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut(JobClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(|channel, auth| {
            call(
                JobServiceClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(API_MESSAGE_BYTES_MAX),
            )
        })
        .await
    }

    /// Like [`ApiClient::call`], for the worker-facing ClusterService.
    pub async fn call_cluster<T, F, Fut>(&mut self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut(ClusterClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(|channel, auth| {
            call(
                ClusterServiceClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(API_MESSAGE_BYTES_MAX),
            )
        })
        .await
    }

    /// Like [`ApiClient::call`], for the model registry.
    pub async fn call_registry<T, F, Fut>(&mut self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut(RegistryClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(|channel, auth| {
            call(
                RegistryServiceClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(API_MESSAGE_BYTES_MAX),
            )
        })
        .await
    }

    /// Like [`ApiClient::call`], for batch inference (users submit, workers lease shards).
    pub async fn call_inference<T, F, Fut>(&mut self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut(InferenceClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(|channel, auth| {
            call(
                InferenceServiceClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(API_MESSAGE_BYTES_MAX),
            )
        })
        .await
    }

    async fn call_with<T, F, Fut>(&mut self, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut(Channel, BearerAuth) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = BACKOFF_FIRST;
        let mut last_error;
        loop {
            let index = self.preferred % self.channels.len();
            let attempt = call(self.channels[index].clone(), self.auth.clone());
            match tokio::time::timeout(self.attempt_timeout, attempt).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => last_error = ApiError::from(status),
                Err(_) => {
                    last_error = ApiError::new(
                        ErrorKind::Unavailable,
                        format!("{} did not answer within {:?}", self.addresses[index], self.attempt_timeout),
                    );
                }
            }
            if !last_error.kind.is_retryable() {
                return Err(last_error);
            }
            match last_error.leader_hint.clone() {
                Some(hint) if last_error.kind == ErrorKind::NotLeader && self.addresses.len() < ADDRESSES_MAX => {
                    self.preferred = self.add(hint)?;
                }
                _ => self.preferred = (index + 1) % self.channels.len(),
            }
            if started.elapsed() + backoff > self.deadline {
                let tried = self.addresses.join(", ");
                last_error.message =
                    format!("{} (gave up after {:?}; tried {tried})", last_error.message, self.deadline);
                return Err(last_error);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_scheme() {
        assert_eq!(
            parse_addresses("127.0.0.1:7001, http://localhost:7002/ ,").expect("valid"),
            ["127.0.0.1:7001", "localhost:7002"]
        );
        for bad in ["", ",", "localhost", "host:port", ":7001", "h:70000"] {
            assert!(parse_addresses(bad).is_err(), "{bad}");
        }
        let many = vec!["h:1"; ADDRESSES_MAX + 1].join(",");
        assert!(parse_addresses(&many).is_err());
    }
}
