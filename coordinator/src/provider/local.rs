//! The local provider (the embedded default): each "instance" is a `flotilla worker` process on
//! this machine, started in its own process group with its log under the cluster's folder.
//!
//! Instances are recorded as JSON files under `<home>/instances/` (id, pid, tags, launch token),
//! so any process (`up`, `down`, a coordinator) can describe and terminate them by tag.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Instance, InstanceState, LAUNCH_COUNT_MAX, LaunchSpec, Provider, ProviderError};
use crate::raft::node::now_unix_ms;

/// Environment variables of a coordinator that its local workers must not inherit.
const COORDINATOR_SECRETS: [&str; 7] = [
    "FLOTILLA_TOKEN",
    "FLOTILLA_SUBMIT_TOKEN",
    "FLOTILLA_READ_TOKEN",
    "FLOTILLA_PEER_TOKEN",
    "FLOTILLA_TLS_CERT",
    "FLOTILLA_TLS_KEY",
    "FLOTILLA_TLS_CA",
];

/// How long `terminate` waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Instance records read at most.
const RECORDS_MAX: usize = 10_000;

pub struct LocalProvider {
    /// The cluster's folder; instance records and logs live under it.
    pub home: PathBuf,
    /// The `flotilla` executable to start.
    pub exe: PathBuf,
    /// Environment every worker gets (coordinator addresses, join token, FLOTILLA_HOME).
    pub env: BTreeMap<String, String>,
    /// Random spot interruptions for demos and tests: mean rate per instance-hour (0: none),
    /// drawn from `seed` so a run can be replayed.
    pub interruptions_per_hour: f64,
    pub seed: u64,
}

/// The time until instance `number`'s interruption: exponential with the given rate, from a
/// seeded SplitMix64 draw (no thread RNG: replayable).
pub fn interruption_after(per_hour: f64, seed: u64, number: u64) -> Option<Duration> {
    if per_hour <= 0.0 || !per_hour.is_finite() {
        return None;
    }
    // The number-th draw of the seed's stream (SplitMix64 advances by the golden ratio).
    let z = flotilla_core::rand::SplitMix64::new(
        seed.wrapping_add(number.wrapping_sub(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    )
    .next_u64();
    let uniform = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64; // in (0, 1)
    Some(Duration::from_secs_f64(-uniform.ln() / per_hour * 3600.0))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    instance: Instance,
    pid: u32,
    client_token: String,
    /// The instance's metadata endpoint process.
    #[serde(default)]
    imds_pid: Option<u32>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

/// True when `pid` is alive and is a flotilla process (not a recycled pid).
pub fn is_running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("flotilla"))
}

impl LocalProvider {
    fn records_dir(&self) -> PathBuf {
        self.home.join("instances")
    }

    fn records(&self) -> Result<Vec<Record>, ProviderError> {
        let dir = self.records_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(failed(&format!("reading {}", dir.display()), e)),
        };
        let mut records = Vec::new();
        for entry in entries.take(RECORDS_MAX) {
            let path = entry.map_err(|e| failed("reading instance records", e))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue; // `.action` files of scheduled interruptions live beside the records
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            match serde_json::from_str::<Record>(&text) {
                Ok(mut record) => {
                    if !is_running(record.pid) {
                        record.instance.state = InstanceState::Terminated;
                    }
                    records.push(record);
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable instance record"),
            }
        }
        records.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        Ok(records)
    }

    fn save(&self, record: &Record) -> Result<(), ProviderError> {
        let dir = self.records_dir();
        std::fs::create_dir_all(&dir).map_err(|e| failed("creating the instance folder", e))?;
        let text = serde_json::to_string_pretty(record).expect("an instance record is plain data");
        std::fs::write(dir.join(format!("{}.json", record.instance.id)), text)
            .map_err(|e| failed("saving an instance", e))
    }

    /// The file `flotilla preempt` writes to schedule an instance's interruption.
    pub fn action_file(&self, id: &str) -> PathBuf {
        self.records_dir().join(format!("{id}.action"))
    }

    /// Starts the instance's metadata endpoint; returns its pid and address.
    fn spawn_imds(&self, id: &str, number: u64) -> Result<(u32, String), ProviderError> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| failed("finding a port for the metadata endpoint", e))?
            .port();
        let address = format!("127.0.0.1:{port}");
        let mut command = Command::new(&self.exe);
        command
            .args(["imds", "--instance-id", id, "--listen", &address])
            .arg("--action-file")
            .arg(self.action_file(id));
        if let Some(after) = interruption_after(self.interruptions_per_hour, self.seed, number) {
            command.args(["--interrupt-after-ms", &after.as_millis().to_string()]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| failed("starting a metadata endpoint", e))?;
        Ok((child.id(), address))
    }

    fn spawn(&self, id: &str, imds: &str) -> Result<u32, ProviderError> {
        use std::os::unix::process::CommandExt;
        let logs = self.home.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| failed("creating the log folder", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{id}.log")))
            .map_err(|e| failed("opening the worker log", e))?;
        let stderr = log.try_clone().map_err(|e| failed("sharing the worker log", e))?;
        let mut command = Command::new(&self.exe);
        // A worker holds none of its launcher's secrets (a coordinator's API and peer tokens,
        // its certificate): what it needs comes in `env` or from the cluster folder.
        for secret in COORDINATOR_SECRETS {
            command.env_remove(secret);
        }
        let child = command
            .args(["worker", "--instance-id", id])
            .envs(&self.env)
            .env("FLOTILLA_IMDS_ENDPOINT", imds)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| failed("starting a worker process", e))?;
        Ok(child.id())
    }
}

impl Provider for LocalProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Instance>, ProviderError> {
        self.launch_now(spec)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        {
            let records = self.records()?;
            for record in records.iter().filter(|r| ids.contains(&r.instance.id)) {
                stop_process(record.pid).await?;
                if let Some(imds) = record.imds_pid.filter(|p| is_running(*p)) {
                    signal(imds, "KILL")?;
                }
                let mut stopped = record.clone();
                stopped.instance.state = InstanceState::Terminated;
                self.save(&stopped)?;
            }
            Ok(())
        }
    }

    async fn describe(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Instance>, ProviderError> {
        {
            Ok(self
                .records()?
                .into_iter()
                .map(|r| r.instance)
                .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
                .collect())
        }
    }
}

impl LocalProvider {
    fn launch_now(&self, spec: &LaunchSpec) -> Result<Vec<Instance>, ProviderError> {
        if spec.count == 0 || spec.count > LAUNCH_COUNT_MAX {
            return Err(ProviderError::Invalid(format!("count {} (1 to {LAUNCH_COUNT_MAX})", spec.count)));
        }
        let records = self.records()?;
        let earlier: Vec<Instance> =
            records.iter().filter(|r| r.client_token == spec.client_token).map(|r| r.instance.clone()).collect();
        if !earlier.is_empty() {
            return Ok(earlier); // idempotent: this token already launched these
        }
        let first = records.len() + 1;
        let mut launched = Vec::new();
        for number in first..first + spec.count as usize {
            let id = format!("local-{number}");
            let (imds_pid, imds) = self.spawn_imds(&id, number as u64)?;
            let pid = self.spawn(&id, &imds)?;
            let mut tags = spec.tags.clone();
            tags.insert(super::LAUNCH_TOKEN_TAG.to_string(), spec.client_token.clone());
            let instance = Instance {
                id,
                instance_type: spec.instance_type.clone(),
                zone: "local".to_string(),
                spot: spec.spot,
                state: InstanceState::Running,
                tags,
                launched_at_unix_ms: now_unix_ms(),
            };
            let record = Record {
                instance: instance.clone(),
                pid,
                client_token: spec.client_token.clone(),
                imds_pid: Some(imds_pid),
            };
            self.save(&record)?;
            launched.push(instance);
        }
        Ok(launched)
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within [`STOP_TIMEOUT`].
pub async fn stop_process(pid: u32) -> Result<(), ProviderError> {
    if !is_running(pid) {
        return Ok(());
    }
    signal(pid, "TERM")?;
    let started = Instant::now();
    while is_running(pid) && started.elapsed() < STOP_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_running(pid) {
        signal(pid, "KILL")?;
    }
    Ok(())
}

/// Sends SIG`name` to `pid` (an error only if the process is still there afterwards).
pub fn signal(pid: u32, name: &str) -> Result<(), ProviderError> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .map_err(|e| failed("running kill", e))?;
    if !status.success() && is_running(pid) {
        return Err(ProviderError::Failed(format!("could not send SIG{name} to {pid}")));
    }
    Ok(())
}

impl LocalProvider {
    /// The worker process of a running instance (for `flotilla preempt --hard`).
    pub fn worker_pid(&self, id: &str) -> Result<Option<u32>, ProviderError> {
        Ok(self.records()?.into_iter().find(|r| r.instance.id == id && is_running(r.pid)).map(|r| r.pid))
    }

    /// Schedules a spot interruption notice for `id`: its metadata endpoint announces
    /// termination at `at_unix_ms` from now on.
    pub fn schedule_interruption(&self, id: &str, at_unix_ms: u64) -> Result<(), ProviderError> {
        if !self.records()?.iter().any(|r| r.instance.id == id) {
            return Err(ProviderError::Invalid(format!("no local instance `{id}`")));
        }
        std::fs::write(self.action_file(id), at_unix_ms.to_string())
            .map_err(|e| failed("scheduling the interruption", e))
    }

    /// Makes a rebalance recommendation for `id` (EC2's early warning that the instance is at
    /// elevated risk of interruption): its metadata endpoint announces it from now on.
    pub fn recommend_rebalance(&self, id: &str) -> Result<(), ProviderError> {
        if !self.records()?.iter().any(|r| r.instance.id == id) {
            return Err(ProviderError::Invalid(format!("no local instance `{id}`")));
        }
        let now = crate::raft::node::now_unix_ms().to_string();
        std::fs::write(super::imds::rebalance_file(&self.action_file(id)), now)
            .map_err(|e| failed("recommending a rebalance", e))
    }

    /// Kills the worker process of `id` without notice (a hard loss).
    pub fn kill(&self, id: &str) -> Result<(), ProviderError> {
        match self.worker_pid(id)? {
            Some(pid) => signal(pid, "KILL"),
            None => Err(ProviderError::Invalid(format!("no running local instance `{id}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interruptions_are_seeded_and_follow_the_rate() {
        assert_eq!(interruption_after(0.0, 1, 1), None);
        assert_eq!(interruption_after(6.0, 7, 3), interruption_after(6.0, 7, 3), "replayable");
        assert_ne!(interruption_after(6.0, 7, 3), interruption_after(6.0, 7, 4));
        let n = 20_000u64;
        let mean_s: f64 =
            (0..n).filter_map(|i| interruption_after(6.0, 42, i)).map(|d| d.as_secs_f64()).sum::<f64>() / n as f64;
        assert!((mean_s - 600.0).abs() < 30.0, "mean {mean_s} s for 6 per hour (expected 600 s)");
    }
}
