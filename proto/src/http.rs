//! The little HTTP/1.1 that Flotilla's side ports speak (the coordinator's and agents' metrics
//! and dashboard ports, the local instance-metadata endpoint): read one size-bounded request
//! head, answer it, close. Enough for Prometheus scrapes, browsers, curl and the AWS SDKs'
//! metadata client; nothing more is accepted.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request's head (line + headers) at most; anything longer is refused.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// A connection that sends nothing for this long is closed.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The parts of a request the ports look at.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// With its query, if any.
    pub path: String,
    /// Names lower-cased.
    pub headers: HashMap<String, String>,
}

impl Request {
    /// The bearer token of the `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.headers.get("authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::trim)
    }
}

/// Parses a request head (`METHOD PATH HTTP/1.x` + headers). `None` when malformed.
pub fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut headers = HashMap::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Request { method: method.to_string(), path: path.to_string(), headers })
}

/// Reads and parses a request head; `None` when the client went away or was slow. A head over
/// [`REQUEST_BYTES_MAX`] or a malformed one is answered with 400 here.
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
    match parse_request(&String::from_utf8_lossy(&head)) {
        Some(request) => Ok(Some(request)),
        None => respond(stream, 400, "text/plain", "", "bad request\n").await.map(|()| None),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse() {
        let head = "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: abc\r\nHost: x\r\n\r\n";
        let request = parse_request(head).expect("valid");
        assert_eq!((request.method.as_str(), request.path.as_str()), ("GET", "/latest/meta-data/instance-id"));
        assert_eq!(request.headers["x-aws-ec2-metadata-token"], "abc");
        assert_eq!(request.bearer(), None);
        let authorized = parse_request("GET /api/jobs HTTP/1.1\r\nAuthorization: Bearer t0k \r\n\r\n").expect("valid");
        assert_eq!(authorized.bearer(), Some("t0k"));
        assert!(parse_request("garbage").is_none());
        assert!(parse_request("GET / SPDY/3\r\n\r\n").is_none());
    }
}
