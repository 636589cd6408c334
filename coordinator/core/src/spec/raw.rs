//! The job spec exactly as a user wrote it: every field optional, unknown fields refused.
//!
//! Integers are read as `i64` and floats as `f64` so that out-of-range values reach
//! `validate` (which names the field and the allowed range) instead of failing inside serde
//! with a message about Rust types. Nothing here has defaults: those live in `validate`.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobSpec {
    pub name: Option<String>,
    pub priority: Option<i64>,
    pub model: Option<RawModel>,
    pub data: Option<RawData>,
    pub train: Option<RawTrain>,
    pub workers: Option<RawWorkers>,
    pub capacity: Option<RawCapacity>,
    pub checkpoint: Option<RawCheckpoint>,
    pub output: Option<RawOutput>,
    pub run: Option<RawRun>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub command: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub procs_per_worker: Option<i64>,
    pub notice_signal: Option<String>,
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub kind: Option<String>,
    pub hidden: Option<Vec<i64>>,
    pub channels: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    pub train: Option<String>,
    pub validation: Option<String>,
    pub format: Option<String>,
    pub validation_fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrain {
    pub epochs: Option<i64>,
    pub steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub optimizer: Option<String>,
    pub learning_rate: Option<f64>,
    pub momentum: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkers {
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub gpus: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapacity {
    pub spot: Option<bool>,
    pub on_demand_fallback: Option<bool>,
    pub instance_types: Option<Vec<String>>,
    pub max_price_usd_per_hour: Option<f64>,
    pub budget_usd: Option<f64>,
    pub deadline_h: Option<f64>,
    pub mixed_types: Option<bool>,
    pub max_failures: Option<i64>,
    pub spares: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheckpoint {
    pub every_steps: Option<i64>,
    pub keep: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutput {
    pub register_as: Option<String>,
}
