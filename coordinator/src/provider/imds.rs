//! A local instance-metadata endpoint that speaks IMDSv2, served next to each local worker so
//! that the agent polls preemption notices through the same code path as on EC2.
//!
//! ```text
//!   PUT /latest/api/token                       X-aws-ec2-metadata-token-ttl-seconds: 1..21600
//!   GET /latest/meta-data/instance-id           X-aws-ec2-metadata-token: <token>
//!   GET /latest/meta-data/instance-type         `local` (what the worker registers as)
//!   GET /latest/meta-data/placement/availability-zone   `local`
//!   GET /latest/meta-data/local-ipv4            the address peers dial (`127.0.0.1` here)
//!   GET /latest/meta-data/events/recommendations/rebalance   404 until a recommendation is
//!                                               made, then {"noticeTime":"<RFC 3339>"}
//!   GET /latest/meta-data/spot/instance-action  404 until an interruption is scheduled, then
//!                                               {"action":"terminate","time":"<RFC 3339>"}
//! ```
//!
//! A rebalance recommendation is made by writing the action file's `.rebalance` sibling (a Unix
//! time in ms: `flotilla preempt --rebalance`). An interruption is scheduled by writing the
//! action file (`flotilla preempt`), or drawn at
//! start from a seeded exponential clock (`up --spot-interruptions-per-hour`). Requests without
//! a valid token get 401, as on EC2. Every request is size-bounded (`flotilla_proto::http`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::http::{self, Request};
use tokio::net::{TcpListener, TcpStream};

/// Token lifetimes accepted, as on EC2.
const TTL_SECONDS_MAX: u64 = 21_600;
/// Notice given before the instance is taken, as on EC2.
pub const NOTICE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct ImdsConfig {
    pub instance_id: String,
    pub instance_type: String,
    pub zone: String,
    pub local_ipv4: String,
    /// When this file exists, its content (a Unix time in ms) is the scheduled interruption.
    pub action_file: PathBuf,
    /// An interruption drawn in advance (seeded), as an offset from start.
    pub interrupt_after: Option<Duration>,
}

struct Server {
    config: ImdsConfig,
    started: Instant,
    /// The seeded interruption's action time, fixed at start.
    drawn_action_at_unix_ms: Option<u64>,
    /// Signs tokens: a token is its expiry and an HMAC of it, so the server keeps no table
    /// that a flood of token requests could fill (and lock the agent out).
    token_key: [u8; 32],
}

/// The file whose content (a Unix time in ms) makes the endpoint recommend a rebalance.
pub fn rebalance_file(action_file: &std::path::Path) -> PathBuf {
    action_file.with_extension("rebalance")
}

/// Resolves at the scheduled interruption's action time, after killing the instance's worker
/// process (its pid from the instance record beside the action file), as EC2 takes the machine
/// two minutes after the notice. Never resolves while no interruption is scheduled.
pub async fn taken_at_action_time(config: &ImdsConfig) {
    let started = crate::raft::node::now_unix_ms();
    let drawn = config.interrupt_after.map(|after| started + (after + NOTICE).as_millis() as u64);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let scheduled = std::fs::read_to_string(&config.action_file).ok().and_then(|t| t.trim().parse::<u64>().ok());
        let Some(at) = scheduled.or(drawn) else { continue };
        if crate::raft::node::now_unix_ms() < at {
            continue;
        }
        let record = config.action_file.with_extension("json");
        let pid = std::fs::read_to_string(&record)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|r| r["pid"].as_u64());
        if let Some(pid) = pid.filter(|p| super::local::is_running(*p as u32)) {
            let _ = super::local::signal(pid as u32, "KILL");
        }
        return;
    }
}

fn token_mac(key: &[u8; 32], expires: u64) -> String {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&expires.to_be_bytes());
    flotilla_proto::auth::hex(&mac.finalize().into_bytes())
}

/// A key from the kernel's random source; should it be unreadable, one from the clock and the
/// pid (the endpoint is local and its tokens only gate this instance's metadata).
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    if flotilla_proto::auth::random_bytes(&mut key).is_err() {
        use sha2::Digest;
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        key = sha2::Sha256::digest(seed.as_bytes()).into();
    }
    key
}

/// Serves IMDSv2 on `listener` until the process ends.
pub async fn serve(listener: TcpListener, config: ImdsConfig) {
    let drawn_action_at_unix_ms =
        config.interrupt_after.map(|after| crate::raft::node::now_unix_ms() + (after + NOTICE).as_millis() as u64);
    let server = Arc::new(Server { config, drawn_action_at_unix_ms, started: Instant::now(), token_key: random_key() });
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server.handle(stream).await;
        });
    }
}

impl Server {
    async fn handle(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let Some(request) = http::read_request(&mut stream).await? else { return Ok(()) };
        let (status, body) = self.answer(&request);
        http::respond(&mut stream, status, "text/plain", "", &body).await
    }

    fn answer(&self, request: &Request) -> (u16, String) {
        if request.method == "PUT" && request.path == "/latest/api/token" {
            let ttl = request.headers.get("x-aws-ec2-metadata-token-ttl-seconds").and_then(|t| t.parse::<u64>().ok());
            let Some(ttl) = ttl.filter(|t| (1..=TTL_SECONDS_MAX).contains(t)) else {
                return (400, "X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600".into());
            };
            return (200, self.issue_token(Duration::from_secs(ttl)));
        }
        if request.method != "GET" {
            return (405, "method not allowed".into());
        }
        let token = request.headers.get("x-aws-ec2-metadata-token").cloned().unwrap_or_default();
        if !self.token_valid(&token) {
            return (401, "unauthorized".into());
        }
        match request.path.as_str() {
            "/latest/meta-data/instance-id" => (200, self.config.instance_id.clone()),
            "/latest/meta-data/instance-type" => (200, self.config.instance_type.clone()),
            "/latest/meta-data/placement/availability-zone" => (200, self.config.zone.clone()),
            "/latest/meta-data/local-ipv4" => (200, self.config.local_ipv4.clone()),
            "/latest/meta-data/events/recommendations/rebalance" => match self.rebalance_at_unix_ms() {
                Some(at) => (200, format!("{{\"noticeTime\":\"{}\"}}", flotilla_core::text::rfc3339_utc(at))),
                None => (404, "not found".into()),
            },
            "/latest/meta-data/spot/instance-action" => match self.action_at_unix_ms() {
                Some(at) => {
                    (200, format!("{{\"action\":\"terminate\",\"time\":\"{}\"}}", flotilla_core::text::rfc3339_utc(at)))
                }
                None => (404, "not found".into()),
            },
            _ => (404, "not found".into()),
        }
    }

    /// `<expiry, ns since start, hex>.<HMAC-SHA256 of it, hex>`.
    fn issue_token(&self, ttl: Duration) -> String {
        let expires = (self.started.elapsed() + ttl).as_nanos() as u64;
        format!("{expires:016x}.{}", token_mac(&self.token_key, expires))
    }

    fn token_valid(&self, token: &str) -> bool {
        let Some((expires, mac)) = token.split_once('.') else { return false };
        let Ok(expires) = u64::from_str_radix(expires, 16) else { return false };
        flotilla_proto::auth::same_secret(&token_mac(&self.token_key, expires), mac)
            && u128::from(expires) > self.started.elapsed().as_nanos()
    }

    /// When a rebalance recommendation was made for the instance, if one was.
    fn rebalance_at_unix_ms(&self) -> Option<u64> {
        let text = std::fs::read_to_string(rebalance_file(&self.config.action_file)).ok()?;
        text.trim().parse::<u64>().ok()
    }

    /// When the instance will be taken, if an interruption is scheduled and due to be announced.
    fn action_at_unix_ms(&self) -> Option<u64> {
        if let Ok(text) = std::fs::read_to_string(&self.config.action_file)
            && let Ok(at) = text.trim().parse::<u64>()
        {
            return Some(at);
        }
        let after = self.config.interrupt_after?;
        (self.started.elapsed() >= after).then_some(self.drawn_action_at_unix_ms).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_dates_format() {
        assert_eq!(flotilla_core::text::rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(flotilla_core::text::rfc3339_utc(1_795_948_491_458), "2026-11-29T10:34:51Z");
    }

    #[test]
    fn tokens_are_signed_not_stored_so_a_flood_locks_nobody_out() {
        let server = Server {
            config: ImdsConfig {
                instance_id: "i-1".into(),
                instance_type: "local".into(),
                zone: "local".into(),
                local_ipv4: "127.0.0.1".into(),
                action_file: PathBuf::from("/nonexistent"),
                interrupt_after: None,
            },
            started: Instant::now(),
            drawn_action_at_unix_ms: None,
            token_key: random_key(),
        };
        let agent = server.issue_token(Duration::from_secs(21_600));
        for _ in 0..100_000 {
            server.issue_token(Duration::from_secs(21_600));
        }
        assert!(server.token_valid(&agent), "the agent's token survives a flood of requests");
        let (expiry, mac) = agent.split_once('.').expect("form");
        let forged_expiry = format!("{:016x}.{mac}", u64::from_str_radix(expiry, 16).expect("hex") + 1);
        assert!(!server.token_valid(&forged_expiry), "a changed expiry breaks the signature");
        assert!(!server.token_valid(&format!("{expiry}.{}", "0".repeat(64))));
        assert!(!server.token_valid("abc") && !server.token_valid(""));
        let short = server.issue_token(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!server.token_valid(&short), "expired");
    }
}
