//! The data port's one owner: an agent listens on a single advertised port (the only one the
//! cluster's firewall opens between workers), and two protocols arrive on it.
//!
//! ```text
//!   accept ──▶ peek the first 8 bytes (a thread per connection, at most CLASSIFY_MAX at once)
//!                "FLOTRING" ──▶ the ring queue: the running rank's rendezvous takes it
//!                "FLOTJOIN" ──▶ the join queue: a member joining the running ring in place
//!                               of one that leaves (collective::ring's join); the running
//!                               rank takes it at a step boundary
//!                "FLOTLIVE" ──▶ the live queue: a live handover's leaving member sends its
//!                               state and updates to this worker, the joining member
//!                               (checkpoint::live)
//!                "FLOTPUSH" ──▶ the push handler: a handover's leaving member pushes the
//!                               stop-step state to its replacement (checkpoint::push)
//!                anything else, silence, EOF ──▶ dropped
//! ```
//!
//! The magic is peeked, not read, so each protocol reads its own hello from the start. The
//! ring queue is bounded: connections nobody takes (a generation that never started) wait
//! there until the next rendezvous drops them as stale (their gang id does not match).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first 8 bytes of a ring rendezvous ("FLOTRING", little-endian).
pub const RING_MAGIC: u64 = 0x464c_4f54_5249_4e47;
/// The first 8 bytes of a link from a member joining a running ring ("FLOTJOIN", little-endian).
pub const JOIN_MAGIC: u64 = 0x464c_4f54_4a4f_494e;
/// The first 8 bytes of a live handover's transfer ("FLOTLIVE", little-endian).
pub const LIVE_MAGIC: u64 = 0x464c_4f54_4c49_5645;
/// The first 8 bytes of a state push ("FLOTPUSH", little-endian).
pub const PUSH_MAGIC: u64 = 0x464c_4f54_5055_5348;
/// Connections being classified at once at most; more are dropped (a port scan, a flood).
const CLASSIFY_MAX: usize = 64;
/// Ring connections waiting for a rendezvous at most.
const RING_QUEUE_MAX: usize = 64;
/// Joining members' links waiting for the running rank at most (a joiner opens two).
const JOIN_QUEUE_MAX: usize = 8;
/// Live handover transfers waiting for the joining member at most.
const LIVE_QUEUE_MAX: usize = 4;
/// How long a new connection may take to send its magic.
const MAGIC_TIMEOUT: Duration = Duration::from_secs(2);

/// Called with each state-push connection, on a thread of its own.
pub type PushHandler = Arc<dyn Fn(TcpStream) + Send + Sync>;

pub struct DataPort {
    ring: Mutex<Receiver<TcpStream>>,
    join: Mutex<Receiver<TcpStream>>,
    live: Mutex<Receiver<TcpStream>>,
    addr: SocketAddr,
}

impl DataPort {
    /// Takes over `listener` for the life of the process: connections are classified and
    /// routed (see the module docs). Without a `push` handler, pushes are dropped.
    pub fn start(listener: TcpListener, push: Option<PushHandler>) -> std::io::Result<Arc<DataPort>> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(false)?;
        let (ring_tx, ring_rx) = sync_channel(RING_QUEUE_MAX);
        let (join_tx, join_rx) = sync_channel(JOIN_QUEUE_MAX);
        let (live_tx, live_rx) = sync_channel(LIVE_QUEUE_MAX);
        let queues = Queues { ring: ring_tx, join: join_tx, live: live_tx };
        let classifying = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new().name("data-port".into()).spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if classifying.fetch_add(1, Ordering::AcqRel) >= CLASSIFY_MAX {
                    classifying.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (queues, push, classifying) = (queues.clone(), push.clone(), classifying.clone());
                let spawned = std::thread::Builder::new().name("data-port-conn".into()).spawn(move || {
                    route(stream, &queues, push.as_ref());
                    classifying.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    tracing::warn!("the data port could not start a thread; a connection was dropped");
                }
            }
        })?;
        Ok(Arc::new(DataPort { ring: Mutex::new(ring_rx), join: Mutex::new(join_rx), live: Mutex::new(live_rx), addr }))
    }

    /// The address the port is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next ring connection, waiting at most `wait`; None when none came.
    pub fn next_ring(&self, wait: Duration) -> Option<TcpStream> {
        let ring = self.ring.lock().ok()?;
        ring.recv_timeout(wait).ok()
    }

    /// The next joining member's link that has already arrived, without waiting.
    pub fn next_join(&self) -> Option<TcpStream> {
        self.join.lock().ok()?.try_recv().ok()
    }

    /// The next live handover's transfer to this worker, waiting at most `wait`.
    pub fn next_live(&self, wait: Duration) -> Option<TcpStream> {
        self.live.lock().ok()?.recv_timeout(wait).ok()
    }
}

/// Where classified connections wait for their taker.
#[derive(Clone)]
struct Queues {
    ring: SyncSender<TcpStream>,
    join: SyncSender<TcpStream>,
    live: SyncSender<TcpStream>,
}

fn route(stream: TcpStream, queues: &Queues, push: Option<&PushHandler>) {
    let queue = |queue: &SyncSender<TcpStream>, name: &str, stream| match queue.try_send(stream) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => tracing::warn!("the {name} queue is full; a connection was dropped"),
        Err(TrySendError::Disconnected(_)) => {}
    };
    match peek_magic(&stream) {
        Some(RING_MAGIC) => queue(&queues.ring, "ring", stream),
        Some(JOIN_MAGIC) => queue(&queues.join, "join", stream),
        Some(LIVE_MAGIC) => queue(&queues.live, "live handover", stream),
        Some(PUSH_MAGIC) => match push {
            Some(push) => push(stream),
            None => tracing::debug!("a state push arrived where none is taken; dropped"),
        },
        _ => {} // not ours: a port scan, a liveness probe that hung up
    }
}

/// The connection's first 8 bytes, left unread.
fn peek_magic(stream: &TcpStream) -> Option<u64> {
    let deadline = Instant::now() + MAGIC_TIMEOUT;
    stream.set_read_timeout(Some(MAGIC_TIMEOUT)).ok()?;
    let mut magic = [0u8; 8];
    loop {
        match stream.peek(&mut magic) {
            Ok(8) => return Some(u64::from_le_bytes(magic)),
            Ok(0) => return None, // closed before saying anything
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(_) | Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn connections_go_where_their_magic_says_and_keep_their_first_bytes() {
        let (pushed_tx, pushed) = std::sync::mpsc::channel::<Vec<u8>>();
        let pushed_tx = Mutex::new(pushed_tx);
        let handler: PushHandler = Arc::new(move |mut stream: TcpStream| {
            let mut hello = [0u8; 12];
            stream.read_exact(&mut hello).expect("the push's hello");
            pushed_tx.lock().expect("sender").send(hello.to_vec()).expect("send");
        });
        let port = DataPort::start(TcpListener::bind("127.0.0.1:0").expect("bind"), Some(handler)).expect("port");
        let addr = port.local_addr();
        // Noise first: silence that hangs up, and a stranger's bytes; neither reaches anyone.
        drop(TcpStream::connect(addr).expect("connect"));
        TcpStream::connect(addr).expect("connect").write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let mut push = TcpStream::connect(addr).expect("connect");
        push.write_all(&[PUSH_MAGIC.to_le_bytes().as_slice(), b"push"].concat()).expect("write");
        let mut ring = TcpStream::connect(addr).expect("connect");
        ring.write_all(&[RING_MAGIC.to_le_bytes().as_slice(), b"ring"].concat()).expect("write");
        let mut join = TcpStream::connect(addr).expect("connect");
        join.write_all(&[JOIN_MAGIC.to_le_bytes().as_slice(), b"join"].concat()).expect("write");
        let mut live = TcpStream::connect(addr).expect("connect");
        live.write_all(&[LIVE_MAGIC.to_le_bytes().as_slice(), b"live"].concat()).expect("write");
        let got = pushed.recv_timeout(Duration::from_secs(5)).expect("the push handler ran");
        assert_eq!(got, [PUSH_MAGIC.to_le_bytes().as_slice(), b"push"].concat(), "read from its first byte");
        let mut taken = port.next_ring(Duration::from_secs(5)).expect("the ring connection is queued");
        let mut hello = [0u8; 12];
        taken.read_exact(&mut hello).expect("the ring's hello");
        assert_eq!(&hello[8..], b"ring");
        assert!(port.next_ring(Duration::from_millis(200)).is_none(), "only one ring connection came");
        // A joiner's link waits in a queue of its own: the rendezvous never takes it.
        let mut queued = None;
        for _ in 0..500 {
            queued = port.next_join();
            if queued.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut taken = queued.expect("the joiner's link is queued");
        taken.read_exact(&mut hello).expect("the joiner's hello");
        assert_eq!(&hello[8..], b"join");
        assert!(port.next_join().is_none(), "only one joiner's link came");
        let mut taken = port.next_live(Duration::from_secs(5)).expect("the live transfer is queued");
        taken.read_exact(&mut hello).expect("the transfer's hello");
        assert_eq!(&hello[8..], b"live");
    }
}
