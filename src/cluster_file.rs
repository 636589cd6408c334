//! `.flotilla/cluster.toml`: how CLI commands find the local cluster (DESIGN §8).
//!
//! Written by `flotilla up`, read by every client command. Holds the coordinators' addresses,
//! the API, join and peer tokens, and the pids of the processes `up` started. The file is
//! created with mode 0600 because it holds secrets.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flotilla_proto::client::ApiClient;
use flotilla_proto::tls::ClientTls;
use serde::{Deserialize, Serialize};

pub const CLUSTER_FILE: &str = "cluster.toml";
/// Largest cluster file accepted, in bytes.
const CLUSTER_FILE_LEN_MAX: u64 = 64 * 1024;
/// How long a client waits for a coordinator of a local cluster whose processes are not
/// running to accept a connection before it says the cluster is down.
const SERVING_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub cluster_id: String,
    /// The admin API token (what the CLI uses by default).
    pub api_token: String,
    /// Tokens to hand out: the submit role (submit, cancel, read) and read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_token: Option<String>,
    pub join_token: String,
    pub peer_token: String,
    /// The cluster's TLS folder (`up` creates it: ca.pem, coordinator.pem, worker.pem and their
    /// keys); absent: a plaintext cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Folders users' `file://` paths may name (the coordinators' `--data-root`s); `up` puts
    /// the folder it ran in and the cluster's parent folder here, plus its `--data-root`s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_roots: Vec<PathBuf>,
    /// The cluster store's URI (`flotilla up --store`); absent: `store/` in the cluster folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    pub coordinators: Vec<CoordinatorEntry>,
    /// The worker agents `up --workers` last asked for on this machine (what a later `up`
    /// without --workers brings back); absent in files of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorEntry {
    pub id: u64,
    pub address: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Set while the process `up` started is meant to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Where the node serves Prometheus metrics (`http://ADDRESS/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
}

impl ClusterFile {
    /// What a client of this cluster needs for TLS (the CA; no certificate of its own).
    pub fn client_tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(dir) = &self.tls_dir else { return Ok(None) };
        Ok(Some(ClientTls::load(&dir.join(crate::commands::certs::CA_FILE), None, None)?))
    }

    /// A client of this cluster with its admin token.
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::with_tls(&self.addresses(), &self.api_token, self.client_tls()?)?)
    }

    /// Whether any of its coordinators may be serving: its process (started by `up`) runs on
    /// this machine, or something accepts connections at its address within
    /// [`SERVING_PROBE_TIMEOUT`] (a node started by hand).
    pub fn may_be_serving(&self) -> bool {
        self.coordinators.iter().any(|c| {
            c.pid.is_some_and(flotilla_coordinator::provider::local::is_running)
                || c.address.parse::<std::net::SocketAddr>().map_or(true, |address| {
                    std::net::TcpStream::connect_timeout(&address, SERVING_PROBE_TIMEOUT).is_ok()
                })
        })
    }

    pub fn addresses(&self) -> String {
        self.coordinators.iter().map(|c| c.address.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn load(home: &Path) -> anyhow::Result<Option<ClusterFile>> {
        let path = home.join(CLUSTER_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if meta.len() > CLUSTER_FILE_LEN_MAX {
            bail!("{} is {} bytes; at most {CLUSTER_FILE_LEN_MAX}", path.display(), meta.len());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = toml::from_str(&text).with_context(|| format!("{} is not a valid cluster file", path.display()))?;
        Ok(Some(file))
    }

    pub fn save(&self, home: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
        let path = home.join(CLUSTER_FILE);
        let temp = home.join(format!("{CLUSTER_FILE}.tmp"));
        let text = toml::to_string(self).context("cluster file encodes as TOML")?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("cannot write {}", temp.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(&temp, &path).with_context(|| format!("cannot replace {}", path.display()))
    }
}

/// `bytes` random bytes from the kernel, as lower-case hex: tokens, cluster ids, request ids.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    flotilla_proto::auth::random_hex(bytes).context("cannot read /dev/urandom")
}

/// The folder holding the local cluster: `FLOTILLA_HOME`, else `./.flotilla`.
pub fn home() -> PathBuf {
    std::env::var_os("FLOTILLA_HOME").map_or_else(|| PathBuf::from(".flotilla"), PathBuf::from)
}

/// Where a client command connects, with which token, and the CA it trusts (TLS).
pub struct Target {
    pub addresses: String,
    pub token: String,
    pub tls: Option<ClientTls>,
}

impl Target {
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::with_tls(&self.addresses, &self.token, self.tls.clone())?)
    }
}

/// Resolves the cluster to talk to: `--coordinator`, then `FLOTILLA_COORDINATOR`, then the
/// cluster file; the token from `FLOTILLA_TOKEN`, then the cluster file.
pub fn resolve(flag: Option<&str>) -> anyhow::Result<Target> {
    let env_addresses = std::env::var("FLOTILLA_COORDINATOR").ok().filter(|s| !s.is_empty());
    let home = home();
    let file = ClusterFile::load(&home)?;
    let from_file = flag.is_none() && env_addresses.is_none();
    if let Some(file) = file.as_ref().filter(|f| from_file && !f.may_be_serving()) {
        // Said at once: a client would otherwise retry the dead addresses for 30 s (its budget
        // for riding out a leader change) and end with a bare "tcp connect error".
        bail!(
            "the local cluster in {} is not running (`flotilla down` stopped it, or its coordinators exited: their \
             logs are {}): `flotilla up` starts it again, with its jobs and data",
            home.display(),
            file.coordinators.iter().map(|c| c.log.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let addresses =
        flag.map(str::to_string).or(env_addresses).or_else(|| file.as_ref().map(ClusterFile::addresses)).with_context(
            || {
                format!(
                    "no coordinator to talk to: pass --coordinator host:port, set FLOTILLA_COORDINATOR, \
                 or start a local cluster with `flotilla up` (looked for {})",
                    home.join(CLUSTER_FILE).display()
                )
            },
        )?;
    // TLS: FLOTILLA_TLS_CA names the CA to trust, else the cluster file's TLS folder.
    let tls = match std::env::var_os("FLOTILLA_TLS_CA").filter(|p| !p.is_empty()) {
        Some(ca) => Some(ClientTls::load(Path::new(&ca), None, None)?),
        None => file.as_ref().map(ClusterFile::client_tls).transpose()?.flatten(),
    };
    let token = api_token(file.as_ref())?;
    Ok(Target { addresses, token, tls })
}

/// The API token a client presents: `FLOTILLA_TOKEN`, then the cluster file's.
pub fn api_token(file: Option<&ClusterFile>) -> anyhow::Result<String> {
    std::env::var("FLOTILLA_TOKEN")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| file.map(|f| f.api_token.clone()))
        .context("no API token: set FLOTILLA_TOKEN (the local cluster's token is in .flotilla/cluster.toml)")
}
