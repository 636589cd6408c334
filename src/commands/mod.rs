//! One module per subcommand (or group): argument structs + `run` functions. Shared helpers
//! for reading job specs live in `spec_file`.

pub mod bench;
pub mod bench_checkpoint;
pub mod bench_collective;
pub mod bench_gpu;
pub mod bench_infer;
pub mod bench_live_handover;
pub mod bench_scheduler;
pub mod bench_spot;
pub mod bench_train;
pub mod certs;
pub mod cluster;
pub mod coordinator;
pub mod dashboard;
pub mod history;
pub mod infer;
pub mod jobs;
pub mod models;
pub mod spec_file;

/// Resolves on SIGTERM or Ctrl-C: how the long-running roles (coordinator, worker) stop cleanly.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
pub mod train;
pub mod validate;
pub mod workers;
