//! The little HTTP/1.1 the metrics ports speak (coordinator and agent): read one request head,
//! answer it, close. Enough for Prometheus scrapes, browsers and curl; nothing more is accepted.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request's head at most; anything longer is refused.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Time for a client to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request: method, path (with query) and the whole head (for headers).
pub struct Request {
    pub method: String,
    pub path: String,
    pub head: String,
}

impl Request {
    /// The bearer token of the `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
            .and_then(|(_, value)| value.trim().strip_prefix("Bearer "))
            .map(str::trim)
    }
}

/// Reads a request head; `None` when the client went away or was slow. A head over
/// [`REQUEST_BYTES_MAX`] is answered with 400 here.
pub async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > REQUEST_BYTES_MAX {
            respond(stream, 400, "text/plain", "", "request too large\n").await?;
            return Ok(None);
        }
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk)).await.unwrap_or(Ok(0))?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
    Ok(Some(Request { method, path, head }))
}

/// Writes a whole response (`extra_headers`: complete lines, each ending in CRLF) and closes.
pub async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
