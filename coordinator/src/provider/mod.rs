//! Capacity providers: where worker machines come from (DESIGN §6).
//!
//! One trait for every provider: `launch` (idempotent by client token), `terminate`, and
//! `describe` by tag (how a restarted coordinator finds what is already running). `local`
//! starts worker processes on this machine; `ec2` and `sim` implement the same trait.

pub mod imds;
pub mod local;
pub mod sim;

use std::collections::BTreeMap;

/// Tag that marks the instances of one cluster (its value: the cluster id).
pub const CLUSTER_TAG: &str = "flotilla-cluster";

/// Instances one launch call may ask for at most.
pub const LAUNCH_COUNT_MAX: u32 = 256;

/// What to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub instance_type: String,
    /// The availability zone (a gang's instances share one); `None`: the provider chooses.
    pub zone: Option<String>,
    pub spot: bool,
    pub count: u32,
    /// Of `count`, how many are on-demand even when `spot` is set (a stable base).
    pub on_demand_base: u32,
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

/// Tag every launched instance carries with its launch's client token: a repeated launch finds
/// what the first one started by describing this tag, even where the cloud (or moto) ignores
/// client tokens.
pub const LAUNCH_TOKEN_TAG: &str = "flotilla-launch-token";

/// A source of machines. Futures are `Send` so that a coordinator can drive any provider from
/// its tasks (see [`DynProvider`]).
pub trait Provider {
    /// Launches `spec.count` instances. Idempotent by `spec.client_token`: a repeated call
    /// returns the instances the first one launched. A partly fulfilled request returns what
    /// was launched; nothing launched for lack of capacity is [`ProviderError::Capacity`].
    fn launch(&self, spec: &LaunchSpec) -> impl Future<Output = Result<Vec<Instance>, ProviderError>> + Send;
    fn terminate(&self, ids: &[String]) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Instances carrying every tag in `tags` (all states).
    fn describe(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<Instance>, ProviderError>> + Send;
    /// Current spot prices per (instance type, zone), USD per hour, where the provider knows
    /// them (EC2's price history); empty otherwise, and the market file's prices stand.
    fn spot_prices(
        &self,
        _instance_types: &[String],
    ) -> impl Future<Output = Result<SpotPrices, ProviderError>> + Send {
        async { Ok(BTreeMap::new()) }
    }
}

/// Spot prices per (instance type, zone), USD per hour.
pub type SpotPrices = BTreeMap<(String, String), f64>;

/// A boxed future, for providers behind `dyn`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Provider`] as a trait object: what the coordinator holds, whichever provider it runs with.
pub trait DynProvider: Send + Sync {
    fn launch_dyn<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>>;
    fn terminate_dyn<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>>;
    fn describe_dyn<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>>;
    fn spot_prices_dyn<'a>(&'a self, instance_types: &'a [String]) -> BoxFuture<'a, Result<SpotPrices, ProviderError>>;
}

impl<P: Provider + Send + Sync> DynProvider for P {
    fn launch_dyn<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.launch(spec))
    }

    fn terminate_dyn<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(self.terminate(ids))
    }

    fn describe_dyn<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(self.describe(tags))
    }

    fn spot_prices_dyn<'a>(&'a self, instance_types: &'a [String]) -> BoxFuture<'a, Result<SpotPrices, ProviderError>> {
        Box::pin(self.spot_prices(instance_types))
    }
}

/// What a reconciliation did: running instances of this cluster that are kept (known to the
/// state, or about to be), and those that are not (orphans: launched by a leader that died
/// before recording them, or left over), which were terminated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: Vec<Instance>,
    pub orphans_terminated: Vec<String>,
}

/// After a restart or a leader change, and periodically: lists the running instances tagged
/// with `cluster_tags`, keeps those `keep` accepts and terminates the rest.
pub async fn reconcile(
    provider: &dyn DynProvider,
    cluster_tags: &BTreeMap<String, String>,
    keep: &(dyn Fn(&Instance) -> bool + Sync),
) -> Result<Reconciled, ProviderError> {
    let running: Vec<Instance> =
        provider.describe_dyn(cluster_tags).await?.into_iter().filter(|i| i.state == InstanceState::Running).collect();
    let (adopted, orphans): (Vec<Instance>, Vec<Instance>) = running.into_iter().partition(|i| keep(i));
    let orphans_terminated: Vec<String> = orphans.into_iter().map(|i| i.id).collect();
    if !orphans_terminated.is_empty() {
        provider.terminate_dyn(&orphans_terminated).await?;
    }
    Ok(Reconciled { adopted, orphans_terminated })
}
