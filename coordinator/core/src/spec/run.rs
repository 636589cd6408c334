//! `[run]`: a command job. The user's own program (PyTorch, JAX, anything) runs on every gang
//! member under the torchrun environment contract instead of the built-in trainer.
//!
//! ```toml
//! [run]
//! command = ["python", "train.py", "--epochs", "3"]
//! workdir = "."                  # packed by `flotilla submit`, unpacked on every worker
//! procs_per_worker = 1           # default: workers.gpus, or 1 on CPU workers
//! notice_signal = "SIGTERM"      # sent to the process group on a preemption notice
//! env = { OMP_NUM_THREADS = "1" }
//! ```
//!
//! A workdir is a local folder in the file; `flotilla submit` packs it into the cluster store
//! and rewrites the field to the packed archive's URI (`<store>/workdirs/<sha256>.tar.gz`),
//! which is what a coordinator accepts ([`is_packed_workdir`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Arguments of `run.command` at most (the program counts as one).
pub const COMMAND_ARGS_MAX: usize = 256;
/// Bytes of one argument, one environment value or the workdir at most.
pub const RUN_TEXT_LEN_MAX: usize = 4096;
/// Variables in `run.env` at most.
pub const ENV_VARS_MAX: usize = 128;
/// Bytes of one environment variable name at most.
pub const ENV_NAME_LEN_MAX: usize = 128;
/// Processes per worker at most (one per GPU; the largest instances carry 16).
pub const PROCS_PER_WORKER_MAX: i64 = 16;
/// Size of a packed workdir (tar.gz) at most: code and small assets, not data sets (those go in
/// the store or S3 and are read by the program).
pub const WORKDIR_BYTES_MAX: u64 = 64 << 20;

/// Variables Flotilla sets on every process (the torchrun contract and its own); `run.env`
/// may not override them.
pub const RESERVED_ENV: [&str; 7] =
    ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"];
/// Prefix of Flotilla's own variables (FLOTILLA_JOB_ID, FLOTILLA_CHECKPOINT_DIR, ...).
pub const RESERVED_ENV_PREFIX: &str = "FLOTILLA_";

/// The signal sent to the program's process group on a preemption notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeSignal {
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGINT")]
    Int,
    #[serde(rename = "SIGUSR1")]
    Usr1,
    #[serde(rename = "SIGUSR2")]
    Usr2,
    #[serde(rename = "SIGHUP")]
    Hup,
}

impl NoticeSignal {
    pub const NAMES: [&'static str; 5] = ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"];
    const ALL: [NoticeSignal; 5] =
        [NoticeSignal::Term, NoticeSignal::Int, NoticeSignal::Usr1, NoticeSignal::Usr2, NoticeSignal::Hup];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|s| *s == self).expect("every signal is listed")]
    }

    pub fn from_name(name: &str) -> Option<NoticeSignal> {
        Self::NAMES.iter().position(|n| *n == name).map(|i| Self::ALL[i])
    }
}

/// A validated `[run]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The program and its arguments, run without a shell.
    pub command: Vec<String>,
    /// The folder the program runs in: a local path in a spec file, the packed archive's URI
    /// once submitted. Without one, the program runs in an empty folder of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Processes started on each worker (LOCAL_WORLD_SIZE).
    pub procs_per_worker: u32,
    pub notice_signal: NoticeSignal,
    /// Extra environment for every process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// The content digest of a workdir archive packed into a cluster store, from its URI
/// (`<store>/workdirs/<64 hex>.tar.gz`); `None` for anything else (a local folder).
pub fn packed_workdir_sha256(uri: &str) -> Option<&str> {
    let scheme = uri.starts_with("s3://") || uri.starts_with("file:///");
    let (_, name) = uri.rsplit_once("/workdirs/")?;
    let digest = name.strip_suffix(".tar.gz")?;
    (scheme && is_workdir_sha256(digest)).then_some(digest)
}

/// Whether `uri` names a workdir archive packed into a cluster store.
pub fn is_packed_workdir(uri: &str) -> bool {
    packed_workdir_sha256(uri).is_some()
}

/// Whether `digest` is a SHA-256 as a packed workdir's name spells it (64 lower-case hex).
pub fn is_workdir_sha256(digest: &str) -> bool {
    digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= ENV_NAME_LEN_MAX
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
