//! One module per subcommand (or group): argument structs + `run` functions. Shared helpers
//! for reading job specs live in `spec_file`.

pub mod bench;
pub mod bench_collective;
pub mod bench_scheduler;
pub mod bench_train;
pub mod cluster;
pub mod coordinator;
pub mod jobs;
pub mod spec_file;
pub mod train;
pub mod validate;
pub mod workers;
