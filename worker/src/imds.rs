//! The agent's side of the instance-metadata service (IMDSv2): a token, then the spot
//! interruption notice. The same code polls EC2's endpoint (169.254.169.254) and the local
//! provider's (`FLOTILLA_IMDS_ENDPOINT`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// EC2's metadata address.
pub const EC2_ENDPOINT: &str = "169.254.169.254:80";
/// Token lifetime requested, seconds.
const TOKEN_TTL_SECONDS: u64 = 300;
/// One request may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a response at most.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("metadata endpoint {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("metadata endpoint answered {status} to {path}")]
    Status { status: u16, path: String },
}

pub struct ImdsClient {
    /// host:port
    endpoint: String,
    token: Option<String>,
}

impl ImdsClient {
    /// `endpoint` as `http://host:port` or `host:port`.
    pub fn new(endpoint: &str) -> ImdsClient {
        let endpoint = endpoint.trim_start_matches("http://").trim_end_matches('/').to_string();
        ImdsClient { endpoint, token: None }
    }

    async fn request(&self, method: &str, path: &str, header: (&str, &str)) -> Result<(u16, String), ImdsError> {
        let unreachable = |reason: String| ImdsError::Unreachable { endpoint: self.endpoint.clone(), reason };
        let exchange = async {
            let mut stream = TcpStream::connect(&self.endpoint).await?;
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{}: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.endpoint, header.0, header.1
            );
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.take(RESPONSE_BYTES_MAX as u64).read_to_end(&mut response).await?;
            std::io::Result::Ok(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let text = String::from_utf8_lossy(&response);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| unreachable("not an HTTP response".into()))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    async fn token(&mut self) -> Result<String, ImdsError> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        let ttl = TOKEN_TTL_SECONDS.to_string();
        let (status, body) =
            self.request("PUT", "/latest/api/token", ("X-aws-ec2-metadata-token-ttl-seconds", &ttl)).await?;
        if status != 200 {
            return Err(ImdsError::Status { status, path: "/latest/api/token".into() });
        }
        self.token = Some(body.trim().to_string());
        Ok(body.trim().to_string())
    }

    /// `GET path` with a token (fetched once, renewed once on 401); `None` on 404.
    pub async fn get(&mut self, path: &str) -> Result<Option<String>, ImdsError> {
        for _ in 0..2 {
            let token = self.token().await?;
            let (status, body) = self.request("GET", path, ("X-aws-ec2-metadata-token", &token)).await?;
            match status {
                200 => return Ok(Some(body)),
                404 => return Ok(None),
                401 => self.token = None, // expired: fetch a new token once
                status => return Err(ImdsError::Status { status, path: path.into() }),
            }
        }
        Err(ImdsError::Status { status: 401, path: path.into() })
    }

    pub async fn instance_id(&mut self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/instance-id").await
    }

    /// The spot interruption notice (`{"action": ..., "time": ...}`), if one was given.
    pub async fn instance_action(&mut self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/spot/instance-action").await
    }

    /// EC2's rebalance recommendation (`{"noticeTime": ...}`): the instance is at elevated risk
    /// of interruption, often well before the two-minute notice.
    pub async fn rebalance_recommendation(&mut self) -> Result<Option<String>, ImdsError> {
        self.get("/latest/meta-data/events/recommendations/rebalance").await
    }
}
