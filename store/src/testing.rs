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

/// A TCP relay to a server (moto) that a test takes down and brings back: an S3 outage as a
/// client sees one (new connections are closed at once, open ones are cut), while the server
/// behind it keeps its objects. Its accepting thread lives as long as the test process; each
/// connection's two threads and sockets, as long as the connection.
pub struct Relay {
    address: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Weak<std::net::TcpStream>>>>,
}

impl Relay {
    /// Relays a loopback port to `target` (`http://host:port` or `host:port`), up.
    pub fn start(target: &str) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::Ordering;
        let target = target.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let address = listener.local_addr().expect("the relay's address");
        let relay = Relay { address, up: Arc::new(true.into()), open: Default::default() };
        let (up, open) = (relay.up.clone(), relay.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up.load(Ordering::SeqCst) {
                    drop(client); // down: closed at once
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                let (client, server) = (Arc::new(client), Arc::new(server));
                if let Ok(mut open) = open.lock() {
                    open.retain(|stream| stream.strong_count() > 0);
                    open.extend([Arc::downgrade(&client), Arc::downgrade(&server)]);
                }
                pump(client.clone(), server.clone());
                pump(server, client);
            }
        });
        relay
    }

    /// Where clients connect: `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// An outage: every open connection is cut and new ones are closed at once.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut open) = self.open.lock() {
            for stream in open.drain(..).filter_map(|s| s.upgrade()) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// The outage ends: connections are relayed again.
    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes; the sockets close
/// when both of a connection's threads end.
fn pump(from: std::sync::Arc<std::net::TcpStream>, to: std::sync::Arc<std::net::TcpStream>) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from.as_ref(), &mut to.as_ref());
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

/// The head of a request as [`http_endpoint`] hands it to its answer.
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header lines as `(name, value)`: names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header named `name` (lower case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What [`http_endpoint`] answers: a status (`"503 Service Unavailable"`), extra header lines
/// (`"ETag: \"e\""`) and a body.
pub struct Reply {
    pub status: &'static str,
    pub headers: Vec<String>,
    pub body: String,
}

impl Reply {
    pub fn new(status: &'static str, body: impl Into<String>) -> Reply {
        Reply { status, headers: Vec::new(), body: body.into() }
    }

    /// An S3 error document with `code` (`SlowDown`, `InternalError`).
    pub fn s3_error(status: &'static str, code: &str) -> Reply {
        Reply::new(status, format!("<Error><Code>{code}</Code><Message>try again</Message></Error>"))
    }

    pub fn header(mut self, line: impl Into<String>) -> Reply {
        self.headers.push(line.into());
        self
    }
}

/// A loopback HTTP/1.1 server that answers each request with `answer(request)` and closes the
/// connection (the request's body is read and dropped): a store or metadata endpoint that fails
/// as a test needs. Returns `http://127.0.0.1:port`; its thread lives as long as the process.
pub fn http_endpoint(answer: impl Fn(&Request) -> Reply + Send + 'static) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(read_half) = stream.try_clone() else { continue };
            let mut reader = BufReader::new(read_half);
            let mut first = String::new();
            if reader.read_line(&mut first).unwrap_or(0) == 0 {
                continue;
            }
            let mut words = first.split_whitespace();
            let (method, path) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
            let mut headers = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                if let Some((name, value)) = line.split_once(':') {
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                }
                line.clear();
            }
            let request = Request { method, path, headers };
            let length = request.header("content-length").and_then(|n| n.parse().ok()).unwrap_or(0usize);
            let _ = reader.read_exact(&mut vec![0; length.min(64 << 20)]);
            let reply = answer(&request);
            let extra: String = reply.headers.iter().map(|h| format!("{h}\r\n")).collect();
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{}",
                reply.status,
                reply.body.len(),
                reply.body
            );
        }
    });
    address
}
