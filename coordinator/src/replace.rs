//! Replacement capacity for the local provider: when a worker launched by it gets an
//! interruption notice or is lost, the leader launches one new worker in its place.
//!
//! Idempotent: the launch's client token is `replace-<instance>`, so a retried report, a notice
//! followed by the lease expiry, or a new leader repeating the decision launch one worker, not
//! several. Workers the provider did not launch (started by hand) are not replaced. The EC2
//! autoscaler (issue 7) generalises this to desired capacity per pool.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_core::WorkerId;

use crate::provider::local::LocalProvider;
use crate::provider::{LaunchSpec, Provider};

pub struct Replacer {
    pub provider: LocalProvider,
    /// Tags of the cluster's instances (and of the replacements).
    pub tags: BTreeMap<String, String>,
    /// Waited before each launch, as a cloud instance boots (`up --boot-delay-s`).
    pub boot_delay: std::time::Duration,
    /// One launch at a time: the local provider numbers instances by counting its records.
    pub launching: tokio::sync::Mutex<()>,
}

impl Replacer {
    /// Launches a replacement for `instance_id` (in the background) if the provider owns it.
    pub fn replace(self: &Arc<Self>, worker: WorkerId, instance_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.boot_delay).await;
            let _one_at_a_time = this.launching.lock().await;
            let ours = match this.provider.describe(&this.tags).await {
                Ok(instances) => instances.iter().any(|i| i.id == instance_id),
                Err(e) => {
                    tracing::warn!(%worker, error = %e, "cannot list the local instances; no replacement");
                    return;
                }
            };
            if !ours {
                return;
            }
            let spec = LaunchSpec {
                instance_type: "local".into(),
                zone: None,
                spot: true,
                count: 1,
                on_demand_base: 0,
                tags: this.tags.clone(),
                client_token: format!("replace-{instance_id}"),
            };
            match this.provider.launch(&spec).await {
                Ok(launched) => {
                    let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
                    tracing::info!(%worker, instance = %instance_id, replacement = ?ids, "replacement launched");
                }
                Err(e) => tracing::warn!(%worker, error = %e, "replacement launch failed"),
            }
        });
    }
}
