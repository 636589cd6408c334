//! Helpers for tests against moto's S3 (started by scripts/test.sh, address in
//! `FLOTILLA_MOTO_ENDPOINT`), shared by this crate's and the worker's tests. Not for
//! production use: they panic on failure.

/// moto's endpoint, or a panic that says how to start it.
pub fn moto() -> String {
    std::env::var("FLOTILLA_MOTO_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| {
        panic!("this test needs moto: run scripts/test.sh, or start `moto_server` and set FLOTILLA_MOTO_ENDPOINT")
    })
}

/// A loopback port nothing listens on, for as long as the process runs: a socket is bound to it
/// and never listens (a connection is refused at once), and it stays bound, so no other bind
/// in the process (a test's own listener on port 0, run in parallel) can take the port. A port
/// merely released after binding could be handed to such a listener, which then answered
/// where a test expected nothing (seen: a test's instance-metadata endpoint served credentials
/// to another test whose metadata endpoint had to be closed).
pub fn closed_port() -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind a loopback port");
    let port = socket.local_addr().expect("its address").port();
    // Held until the process exits: the port stays taken and closed.
    std::mem::forget(socket);
    port
}

/// The AWS settings of an S3 client on `endpoint` (for [`crate::open_with`]), with test
/// credentials unless `credentials` is false; the instance-metadata endpoint is a closed local
/// port, so nothing leaves the loopback interface.
pub fn env(endpoint: &str, credentials: bool) -> Vec<(String, String)> {
    let mut vars = vec![
        ("AWS_ENDPOINT_URL".to_string(), endpoint.to_string()),
        ("AWS_ALLOW_HTTP".to_string(), "true".to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
        ("AWS_METADATA_ENDPOINT".to_string(), format!("http://127.0.0.1:{}", closed_port())),
    ];
    if credentials {
        vars.push(("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()));
        vars.push(("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()));
    }
    vars
}

/// Creates `bucket` through the plain S3 API (moto does not check signatures).
pub fn create_bucket(endpoint: &str, bucket: &str) {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).expect("moto answers");
    write!(stream, "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .expect("the request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("the reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket {bucket}: {reply}");
}
