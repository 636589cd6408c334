//! The TCP ring all-reduce on real loopback sockets: sums, identical results, broadcast,
//! barrier, and failure within the timeout when a peer dies or stalls.

use std::time::{Duration, Instant};

use flotilla_worker::collective::ring::{RingCommunicator, loopback_gang};
use flotilla_worker::collective::{CollectiveError, Communicator};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A value every rank can compute: small integers, so float sums are exact in any order.
fn value(rank: usize, index: usize) -> f32 {
    ((index * 7 + rank * 13) % 1000) as f32
}

/// Runs `f` on every rank in its own thread; returns the results in rank order.
fn on_every_rank<T: Send + 'static>(
    gang: Vec<RingCommunicator>,
    f: impl Fn(&mut RingCommunicator) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            let f = f.clone();
            std::thread::spawn(move || f(&mut comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

#[test]
fn all_reduce_equals_the_sequential_sum_on_every_rank() {
    for world in 1..=4 {
        for len in [0usize, 1, 2, 3, 10_007, 262_147] {
            let gang = loopback_gang(world, TIMEOUT).expect("gang forms");
            let results = on_every_rank(gang, move |comm| {
                let mut buffer: Vec<f32> = (0..len).map(|i| value(comm.rank(), i)).collect();
                comm.all_reduce_sum(&mut buffer).expect("all-reduce");
                buffer
            });
            let expected: Vec<f32> = (0..len).map(|i| (0..world).map(|r| value(r, i)).sum()).collect();
            for (rank, result) in results.iter().enumerate() {
                assert!(result == &expected, "world {world}, len {len}: rank {rank} differs from the sequential sum");
            }
        }
    }
}

#[test]
fn all_reduce_of_64_mib_is_exact_and_identical_across_ranks() {
    const LEN: usize = 64 * 1024 * 1024 / 4;
    for world in [2, 4] {
        let gang = loopback_gang(world, TIMEOUT).expect("gang forms");
        let results = on_every_rank(gang, |comm| {
            let mut buffer: Vec<f32> = (0..LEN).map(|i| value(comm.rank(), i)).collect();
            comm.all_reduce_sum(&mut buffer).expect("all-reduce");
            buffer
        });
        for (i, got) in results[0].iter().enumerate().step_by(4099) {
            let expected: f32 = (0..world).map(|r| value(r, i)).sum();
            assert_eq!(*got, expected, "world {world}: element {i}");
        }
        assert!(results.iter().all(|r| r == &results[0]), "world {world}: ranks differ");
    }
}

#[test]
fn back_to_back_calls_of_changing_sizes_on_ranks_at_different_speeds_stay_exact() {
    // Segments are written straight from the caller's buffer: a rank that returns and refills
    // its buffer for the next call must not change what its successor still has to read.
    const SIZES: [usize; 6] = [300_001, 5, 0, 131_072, 1, 70_000];
    for world in [2, 3] {
        let gang = loopback_gang(world, TIMEOUT).expect("gang forms");
        let results = on_every_rank(gang, move |comm| {
            let mut sums = Vec::new();
            for round in 0..12 {
                let len = SIZES[round % SIZES.len()];
                let mut buffer: Vec<f32> = (0..len).map(|i| value(comm.rank() + round, i)).collect();
                if (comm.rank() + round) % 3 == 0 {
                    std::thread::sleep(Duration::from_millis(5)); // this rank falls behind
                }
                comm.all_reduce_sum(&mut buffer).expect("all-reduce");
                sums.push(buffer);
            }
            sums
        });
        for round in 0..12 {
            let len = SIZES[round % SIZES.len()];
            let expected: Vec<f32> = (0..len).map(|i| (0..world).map(|r| value(r + round, i)).sum()).collect();
            for (rank, sums) in results.iter().enumerate() {
                assert!(sums[round] == expected, "world {world}, round {round}, rank {rank}: wrong sum");
            }
        }
    }
}

#[test]
fn non_integer_sums_are_bit_identical_across_ranks_and_runs() {
    let run = || {
        let gang = loopback_gang(3, TIMEOUT).expect("gang forms");
        on_every_rank(gang, |comm| {
            let mut buffer: Vec<f32> = (0..5000).map(|i| ((i as f32) * 0.1 + comm.rank() as f32).sin() / 3.0).collect();
            comm.all_reduce_sum(&mut buffer).expect("all-reduce");
            buffer.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        })
    };
    let first = run();
    assert!(first.iter().all(|r| r == &first[0]), "ranks differ");
    assert_eq!(run(), first, "a second run differs");
}

#[test]
fn broadcast_and_barrier_work_from_any_root() {
    for world in 1..=4 {
        for root in 0..world {
            let gang = loopback_gang(world, TIMEOUT).expect("gang forms");
            let results = on_every_rank(gang, move |comm| {
                let mut buffer: Vec<f32> = (0..70_001).map(|i| value(comm.rank(), i)).collect();
                comm.broadcast(&mut buffer, root).expect("broadcast");
                comm.barrier().expect("barrier");
                buffer
            });
            let expected: Vec<f32> = (0..70_001).map(|i| value(root, i)).collect();
            assert!(results.iter().all(|r| r == &expected), "world {world} root {root}");
        }
    }
}

#[test]
fn a_dead_peer_fails_the_others_quickly() {
    let mut gang = loopback_gang(3, TIMEOUT).expect("gang forms");
    drop(gang.pop()); // rank 2 dies: its sockets close
    let started = Instant::now();
    let results = on_every_rank(gang, |comm| {
        let mut buffer = vec![1.0f32; 100_000];
        comm.all_reduce_sum(&mut buffer)
    });
    for result in results {
        assert!(matches!(result, Err(CollectiveError::PeerLost { .. })), "{result:?}");
    }
    assert!(started.elapsed() < TIMEOUT, "failure took {:?}", started.elapsed());
}

#[test]
fn a_stalled_peer_fails_the_others_within_the_timeout() {
    let timeout = Duration::from_millis(500);
    let mut gang = loopback_gang(3, timeout).expect("gang forms");
    let stalled = gang.pop().expect("rank 2"); // alive, connections open, never calls
    let started = Instant::now();
    let results = on_every_rank(gang, |comm| {
        let mut buffer = vec![1.0f32; 1000];
        comm.all_reduce_sum(&mut buffer)
    });
    for result in &results {
        assert!(
            matches!(result, Err(CollectiveError::Timeout { .. }) | Err(CollectiveError::PeerLost { .. })),
            "{result:?}"
        );
    }
    assert!(started.elapsed() < timeout * 6, "failure took {:?}", started.elapsed());
    drop(stalled);
}

/// A peer that is gone silently (frozen, cut off) leaves the others waiting for the whole
/// timeout; a superseded generation's abort flag ends that wait within a poll slice.
#[test]
fn an_aborted_rank_stops_waiting_for_a_silent_peer_long_before_the_timeout() {
    let timeout = Duration::from_secs(30);
    let mut gang = loopback_gang(2, timeout).expect("gang forms");
    let silent = gang.pop().expect("rank 1"); // alive, connections open, never calls
    let mut rank0 = gang.pop().expect("rank 0");
    let abort = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    rank0.abort_on(abort.clone());
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        abort.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let started = Instant::now();
    let mut buffer = vec![1.0f32; 1 << 20];
    let result = rank0.all_reduce_sum(&mut buffer);
    let waited = started.elapsed();
    setter.join().expect("setter");
    assert!(
        matches!(&result, Err(CollectiveError::PeerLost { reason, .. }) if reason.contains("aborted")),
        "{result:?}"
    );
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2), "aborted after {waited:?}");
    drop(silent);
}

#[test]
fn ranks_that_disagree_on_the_length_fail_instead_of_mixing_data() {
    let gang = loopback_gang(2, TIMEOUT).expect("gang forms");
    let results = on_every_rank(gang, |comm| {
        let mut buffer = vec![1.0f32; 100 + comm.rank()];
        comm.all_reduce_sum(&mut buffer)
    });
    assert!(results.iter().all(|r| matches!(r, Err(CollectiveError::Invalid(_)))), "{results:?}");
}

#[test]
fn rendezvous_times_out_when_a_rank_never_comes() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let me = listener.local_addr().expect("addr");
    let absent = std::net::SocketAddr::from(([127, 0, 0, 1], flotilla_store::testing::closed_port()));
    let config = flotilla_worker::collective::ring::RingConfig::new(
        0,
        vec![me, absent],
        1,
        vec![7; 32],
        Duration::from_millis(300),
    );
    let err = RingCommunicator::connect(listener, config).err().expect("no peer, no ring");
    assert!(matches!(err, CollectiveError::Rendezvous(_) | CollectiveError::Timeout { .. }), "{err}");
}

#[test]
fn a_dead_peer_fails_the_rendezvous_after_the_refusal_grace_and_abort_stops_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let me = listener.local_addr().expect("addr");
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], flotilla_store::testing::closed_port()));
    let mut config =
        flotilla_worker::collective::ring::RingConfig::new(0, vec![me, dead], 1, vec![7; 32], Duration::from_secs(60));
    config.refused_grace = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let err = RingCommunicator::connect(listener.try_clone().expect("clone"), config).err().expect("dead peer");
    assert!(matches!(err, CollectiveError::PeerLost { peer: 1, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "not the whole timeout: {:?}", started.elapsed());

    // Waiting for a predecessor that never comes: the abort flag ends the wait.
    let live = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = flotilla_worker::collective::ring::RingConfig::new(
        0,
        vec![me, live.local_addr().expect("addr")],
        1,
        vec![7; 32],
        Duration::from_secs(60),
    );
    let abort = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    config.abort = Some(abort.clone());
    let waiting = std::thread::spawn(move || RingCommunicator::connect(listener, config).err());
    std::thread::sleep(Duration::from_millis(100));
    abort.store(true, std::sync::atomic::Ordering::Relaxed);
    let err = waiting.join().expect("thread").expect("aborted");
    assert!(matches!(err, CollectiveError::Rendezvous(ref m) if m.contains("aborted")), "{err}");
}

#[test]
fn a_rank_without_the_gang_secret_cannot_join() {
    use flotilla_worker::collective::ring::RingConfig;
    let listeners: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    let addresses: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
    let ranks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            // Same gang id, world and addresses; rank 1 guessed everything but the secret.
            let secret = vec![rank as u8; 32];
            let config = RingConfig::new(rank, addresses.clone(), 42, secret, Duration::from_secs(10));
            std::thread::spawn(move || RingCommunicator::connect(listener, config).err())
        })
        .collect();
    for rank in ranks {
        let err = rank.join().expect("thread").expect("no ring without the shared secret");
        assert!(
            matches!(err, CollectiveError::Rendezvous(ref m) if m.contains("does not hold this gang's secret")),
            "{err}"
        );
    }
}
