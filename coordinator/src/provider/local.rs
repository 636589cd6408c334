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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    instance: Instance,
    pid: u32,
    client_token: String,
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

    fn spawn(&self, id: &str) -> Result<u32, ProviderError> {
        use std::os::unix::process::CommandExt;
        let logs = self.home.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| failed("creating the log folder", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{id}.log")))
            .map_err(|e| failed("opening the worker log", e))?;
        let stderr = log.try_clone().map_err(|e| failed("sharing the worker log", e))?;
        let child = Command::new(&self.exe)
            .args(["worker", "--instance-id", id])
            .envs(&self.env)
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
            let pid = self.spawn(&id)?;
            let instance = Instance {
                id,
                instance_type: spec.instance_type.clone(),
                zone: "local".to_string(),
                spot: spec.spot,
                state: InstanceState::Running,
                tags: spec.tags.clone(),
                launched_at_unix_ms: now_unix_ms(),
            };
            self.save(&Record { instance: instance.clone(), pid, client_token: spec.client_token.clone() })?;
            launched.push(instance);
        }
        Ok(launched)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        let records = self.records()?;
        for record in records.iter().filter(|r| ids.contains(&r.instance.id)) {
            if is_running(record.pid) {
                signal(record.pid, "TERM")?;
                let started = Instant::now();
                while is_running(record.pid) && started.elapsed() < STOP_TIMEOUT {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if is_running(record.pid) {
                    signal(record.pid, "KILL")?;
                }
            }
            let mut stopped = record.clone();
            stopped.instance.state = InstanceState::Terminated;
            self.save(&stopped)?;
        }
        Ok(())
    }

    async fn describe(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .records()?
            .into_iter()
            .map(|r| r.instance)
            .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
            .collect())
    }
}

fn signal(pid: u32, name: &str) -> Result<(), ProviderError> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .map_err(|e| failed("running kill", e))?;
    if !status.success() && is_running(pid) {
        return Err(ProviderError::Failed(format!("could not send SIG{name} to {pid}")));
    }
    Ok(())
}
