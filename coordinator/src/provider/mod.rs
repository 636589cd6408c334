//! Capacity providers: where worker machines come from (DESIGN §6).
//!
//! One trait for every provider: `launch` (idempotent by client token), `terminate`, and
//! `describe` by tag (how a restarted coordinator finds what is already running). `local`
//! starts worker processes on this machine; `ec2` and `sim` implement the same trait.

pub mod imds;
pub mod local;

use std::collections::BTreeMap;

/// Tag that marks the instances of one cluster (its value: the cluster id).
pub const CLUSTER_TAG: &str = "flotilla-cluster";

/// Instances one launch call may ask for at most.
pub const LAUNCH_COUNT_MAX: u32 = 256;

/// What to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub instance_type: String,
    pub spot: bool,
    pub count: u32,
    /// Tags put on every instance (cluster id, job id, ...), used by `describe`.
    pub tags: BTreeMap<String, String>,
    /// A retried or repeated launch with the same token launches nothing new.
    pub client_token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InstanceState {
    Running,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub spot: bool,
    pub state: InstanceState,
    pub tags: BTreeMap<String, String>,
    pub launched_at_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The request is wrong (count out of range, bad tag); retrying will not help.
    #[error("invalid launch request: {0}")]
    Invalid(String),
    /// No capacity of this kind right now (spot pools dry, quota); retry later or elsewhere.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The provider itself failed (process spawn, API error).
    #[error("provider: {0}")]
    Failed(String),
}

#[allow(async_fn_in_trait)] // used with static dispatch only
pub trait Provider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Instance>, ProviderError>;
    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError>;
    /// Instances carrying every tag in `tags` (all states).
    async fn describe(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Instance>, ProviderError>;
}
