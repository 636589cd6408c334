//! Free loopback ports for a local cluster (`flotilla up`) and tests, chosen below the
//! kernel's ephemeral range.
//!
//! Binding port 0 and closing the listener hands back a port from the ephemeral range, the
//! same range outgoing connections take their source ports from: between the pick and the
//! coordinator's own bind, a connection from anything else on the machine can take it (seen as
//! a coordinator that never listens, under a full test run). Ports below that range are never
//! given to outgoing connections, so a port that binds there now stays ours unless another
//! process binds it on purpose.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::TcpListener;

/// Where the ephemeral range starts when /proc does not say (Linux's default).
const EPHEMERAL_LOW_DEFAULT: u16 = 32768;
/// The lowest port tried.
const LOW: u16 = 10_000;
/// Random ports tried before falling back to one the kernel picks.
const TRIES: usize = 64;

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next().and_then(|low| low.parse().ok()))
        .unwrap_or(EPHEMERAL_LOW_DEFAULT)
}

/// A port on 127.0.0.1 that is free now, below the ephemeral range when there is room there.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let high = ephemeral_low();
    if high > LOW {
        let random = RandomState::new();
        for attempt in 0..TRIES {
            let port = LOW + (random.hash_one(attempt) % u64::from(high - LOW)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_free_and_below_the_ephemeral_range() {
        let port = free_loopback_port().expect("a port");
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("the port binds");
        if ephemeral_low() > LOW {
            assert!((LOW..ephemeral_low()).contains(&port), "{port}");
        }
        let taken = listener.local_addr().expect("address").port();
        let other = free_loopback_port().expect("another port");
        assert_ne!(other, taken, "a bound port is never offered");
    }
}
