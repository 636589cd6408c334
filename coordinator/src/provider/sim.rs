//! The simulated provider: instances in memory, priced and limited by a replayed spot market
//! ([`flotilla_core::market::Trace`]). Launches beyond a pool's spot capacity fail with
//! [`ProviderError::Capacity`], as EC2's do; launches are idempotent by client token (the
//! launch-token tag), as the real providers are. For tests and for trying the autoscaler
//! without a cloud.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_core::autoscale::PoolKey;
use flotilla_core::market::Trace;

use super::{Instance, InstanceState, LAUNCH_COUNT_MAX, LAUNCH_TOKEN_TAG, LaunchSpec, Provider, ProviderError};

pub struct SimProvider {
    trace: Trace,
    /// The market's hour the simulation reads (advanced by [`SimProvider::set_hour`]).
    hour: Mutex<f64>,
    instances: Mutex<Vec<Instance>>,
    /// Launch calls that reached the "cloud" (for tests: never more than one per token).
    pub launch_calls: Mutex<Vec<String>>,
}

impl SimProvider {
    pub fn new(trace: Trace) -> SimProvider {
        SimProvider {
            trace,
            hour: Mutex::new(0.0),
            instances: Mutex::new(Vec::new()),
            launch_calls: Mutex::new(Vec::new()),
        }
    }

    pub fn set_hour(&self, hour: f64) {
        *self.hour.lock().expect("sim lock") = hour;
    }

    /// Every instance ever launched (all states).
    pub fn all(&self) -> Vec<Instance> {
        self.instances.lock().expect("sim lock").clone()
    }

    /// Takes an instance back (a spot interruption).
    pub fn reclaim(&self, id: &str) {
        for i in self.instances.lock().expect("sim lock").iter_mut().filter(|i| i.id == id) {
            i.state = InstanceState::Terminated;
        }
    }
}

impl Provider for SimProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Instance>, ProviderError> {
        if spec.count == 0 || spec.count > LAUNCH_COUNT_MAX || spec.on_demand_base > spec.count {
            return Err(ProviderError::Invalid(format!("count {} (1 to {LAUNCH_COUNT_MAX})", spec.count)));
        }
        let hour = *self.hour.lock().expect("sim lock");
        let mut instances = self.instances.lock().expect("sim lock");
        let earlier: Vec<Instance> = instances
            .iter()
            .filter(|i| i.tags.get(LAUNCH_TOKEN_TAG) == Some(&spec.client_token) && i.state == InstanceState::Running)
            .cloned()
            .collect();
        if !earlier.is_empty() {
            return Ok(earlier);
        }
        let zone = spec.zone.clone().unwrap_or_default();
        let pool = PoolKey { instance_type: spec.instance_type.clone(), zone: zone.clone() };
        let Some(market) = self.trace.at(&pool, hour) else {
            return Err(ProviderError::Invalid(format!("the market has no pool {pool}")));
        };
        let spot_count = if spec.spot { spec.count - spec.on_demand_base } else { 0 };
        let held = instances
            .iter()
            .filter(|i| i.spot && i.state == InstanceState::Running)
            .filter(|i| i.instance_type == pool.instance_type && i.zone == pool.zone);
        if held.count() as u32 + spot_count > market.spot_capacity {
            return Err(ProviderError::Capacity(format!(
                "InsufficientInstanceCapacity: {pool} has room for {} more spot instance(s)",
                market.spot_capacity
            )));
        }
        self.launch_calls.lock().expect("sim lock").push(spec.client_token.clone());
        let mut tags = spec.tags.clone();
        tags.insert(LAUNCH_TOKEN_TAG.into(), spec.client_token.clone());
        let mut launched = Vec::new();
        for n in 0..spec.count {
            let instance = Instance {
                id: format!("sim-{:05}", instances.len() + 1),
                instance_type: spec.instance_type.clone(),
                zone: zone.clone(),
                spot: n < spot_count,
                state: InstanceState::Running,
                tags: tags.clone(),
                launched_at_unix_ms: (hour * 3_600_000.0) as u64,
            };
            instances.push(instance.clone());
            launched.push(instance);
        }
        Ok(launched)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        for i in self.instances.lock().expect("sim lock").iter_mut().filter(|i| ids.contains(&i.id)) {
            i.state = InstanceState::Terminated;
        }
        Ok(())
    }

    async fn describe(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Instance>, ProviderError> {
        Ok(self
            .instances
            .lock()
            .expect("sim lock")
            .iter()
            .filter(|i| tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
            .cloned()
            .collect())
    }
}
