//! `flotilla bench-allreduce` (hidden): the measurement behind `scripts/bench/allreduce.sh`.
//!
//! Forms rings of 2 and 4 ranks on loopback in this process and times `all_reduce_sum` over
//! buffer sizes from 4 KiB to 256 MiB. Prints one JSON line per (world, size) with the median
//! time, algorithm bandwidth (bytes / time) and bus bandwidth (algbw x 2(n-1)/n, the figure
//! NCCL and gloo report), plus a baseline line: one loopback TCP stream's throughput in the
//! same run, so results can be quoted as a ratio of what the wire allows.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_worker::collective::Communicator;
use flotilla_worker::collective::ring::loopback_gang;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Largest buffer, in MiB (sizes go from 4 KiB up by factors of 4).
    #[arg(long, default_value_t = 256)]
    pub max_mib: usize,
    /// World sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub worlds: Vec<usize>,
}

fn iterations(bytes: usize) -> usize {
    match bytes {
        0..=1_048_576 => 50,
        1_048_577..=16_777_216 => 20,
        _ => 9,
    }
}

/// Median all-reduce time of `bytes` over a ring of `world` ranks.
fn measure(world: usize, bytes: usize) -> anyhow::Result<Duration> {
    let gang = loopback_gang(world, TIMEOUT)?;
    let rounds = iterations(bytes);
    let handles: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut buffer = vec![1.0f32; bytes / 4];
                let mut times = Vec::with_capacity(rounds);
                comm.all_reduce_sum(&mut buffer)?; // warm-up
                for _ in 0..rounds {
                    comm.barrier()?;
                    let started = Instant::now();
                    comm.all_reduce_sum(&mut buffer)?;
                    times.push(started.elapsed());
                }
                Ok(times)
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    for handle in handles {
        per_rank.push(handle.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    // An all-reduce is done when the slowest rank is done.
    let mut slowest: Vec<Duration> =
        (0..rounds).map(|i| per_rank.iter().map(|t| t[i]).max().unwrap_or_default()).collect();
    slowest.sort();
    Ok(slowest[rounds / 2])
}

/// One loopback TCP stream, 256 MiB in 4 MiB writes: the wire's speed on this machine.
fn loopback_baseline() -> anyhow::Result<f64> {
    const TOTAL: usize = 256 * 1024 * 1024;
    const WRITE: usize = 4 * 1024 * 1024;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; WRITE];
        let mut left = TOTAL;
        while left > 0 {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(address)?;
    let chunk = vec![7u8; WRITE];
    let started = Instant::now();
    for _ in 0..TOTAL / WRITE {
        stream.write_all(&chunk)?;
    }
    drop(stream);
    reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(TOTAL as f64 / started.elapsed().as_secs_f64() / 1e9)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let wire = loopback_baseline().context("loopback baseline")?;
    println!("{}", json!({ "bench": "loopback_tcp", "GBps": wire }));
    for &world in &args.worlds {
        let mut bytes = 4096;
        while bytes <= args.max_mib * 1024 * 1024 {
            let median = measure(world, bytes)?;
            let algbw = bytes as f64 / median.as_secs_f64() / 1e9;
            let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
            println!(
                "{}",
                json!({
                    "bench": "allreduce",
                    "world": world,
                    "bytes": bytes,
                    "median_ms": median.as_secs_f64() * 1000.0,
                    "algbw_GBps": algbw,
                    "busbw_GBps": busbw,
                    "busbw_vs_loopback": busbw / wire,
                })
            );
            bytes *= 4;
        }
    }
    Ok(())
}
