//! A spot market replayed from a trace, and a simulation of a training workload on it under a
//! purchasing policy: what the cost benchmark (`scripts/bench/spot_cost.sh`) and the simulated
//! provider use. Pure and seeded: the same trace, workload, policy and seed give the same result.
//!
//! Trace format (CSV, `#` comments, one header line):
//!
//! ```text
//!   hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity
//!   0,g5.xlarge,us-east-1a,0.42,1.006,0.05,40
//! ```
//!
//! Each row holds for its pool (type + zone) from `hour` until that pool's next row.
//! `interruptions_per_hour` is the chance per instance-hour that a spot instance is taken back;
//! `spot_capacity` is how many spot instances the pool can hold then (when it falls below what
//! is held, the excess is taken back; a request beyond it is a capacity error).

mod sim;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::autoscale::{PoolKey, Quote};

pub use sim::{Outcome, Policy, SimJob, SimParams, benchmark_workload, simulate};

/// Rows in a trace at most.
pub const TRACE_ROWS_MAX: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct PoolState {
    pub spot_usd_per_hour: f64,
    pub on_demand_usd_per_hour: f64,
    pub interruptions_per_hour: f64,
    pub spot_capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    /// Per pool: (from hour, state), sorted by hour.
    pools: BTreeMap<PoolKey, Vec<(f64, PoolState)>>,
    /// The last hour any row starts at.
    pub end_hour: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("trace line {line}: {message}")]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

impl Trace {
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut trace = Trace::default();
        let mut header_seen = false;
        let mut rows = 0usize;
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let row = raw.split('#').next().unwrap_or("").trim();
            if row.is_empty() {
                continue;
            }
            if !header_seen {
                header_seen = true;
                if row.starts_with("hour") {
                    continue;
                }
            }
            rows += 1;
            if rows > TRACE_ROWS_MAX {
                return Err(TraceError { line, message: format!("more than {TRACE_ROWS_MAX} rows") });
            }
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            let err = |message: String| TraceError { line, message };
            if fields.len() != 7 {
                return Err(err(format!(
                    "{} fields; expected 7: hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,\
                     interruptions_per_hour,spot_capacity",
                    fields.len()
                )));
            }
            let number = |i: usize, name: &str| -> Result<f64, TraceError> {
                let v: f64 = fields[i].parse().map_err(|_| err(format!("{name} `{}` is not a number", fields[i])))?;
                if !v.is_finite() || v < 0.0 {
                    return Err(err(format!("{name} must be finite and >= 0, got {v}")));
                }
                Ok(v)
            };
            let hour = number(0, "hour")?;
            let state = PoolState {
                spot_usd_per_hour: number(3, "spot_usd_per_hour")?,
                on_demand_usd_per_hour: number(4, "on_demand_usd_per_hour")?,
                interruptions_per_hour: number(5, "interruptions_per_hour")?,
                spot_capacity: fields[6]
                    .parse()
                    .map_err(|_| err(format!("spot_capacity `{}` is not a count", fields[6])))?,
            };
            if fields[1].is_empty() || fields[2].is_empty() {
                return Err(err("instance_type and zone must not be empty".into()));
            }
            let pool = PoolKey { instance_type: fields[1].to_string(), zone: fields[2].to_string() };
            trace.pools.entry(pool).or_default().push((hour, state));
            trace.end_hour = trace.end_hour.max(hour);
        }
        if trace.pools.is_empty() {
            return Err(TraceError { line: 0, message: "no rows".into() });
        }
        for (pool, rows) in &mut trace.pools {
            rows.sort_by(|a, b| a.0.total_cmp(&b.0));
            if rows[0].0 > 0.0 {
                return Err(TraceError { line: 0, message: format!("{pool} has no row at hour 0") });
            }
        }
        Ok(trace)
    }

    pub fn pools(&self) -> impl Iterator<Item = &PoolKey> {
        self.pools.keys()
    }

    /// Leaves out the pools of the zones `keep` refuses (a zone the provider cannot launch
    /// in); returns those zones, sorted, once each.
    pub fn retain_zones(&mut self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let dropped: std::collections::BTreeSet<String> =
            self.pools.keys().filter(|p| !keep(&p.zone)).map(|p| p.zone.clone()).collect();
        self.pools.retain(|p, _| !dropped.contains(&p.zone));
        dropped.into_iter().collect()
    }

    /// The state of `pool` at `hour` (the last row at or before it).
    pub fn at(&self, pool: &PoolKey, hour: f64) -> Option<&PoolState> {
        let rows = self.pools.get(pool)?;
        let i = rows.partition_point(|(h, _)| *h <= hour);
        rows.get(i.checked_sub(1)?).map(|(_, s)| s)
    }

    /// Quotes for the autoscaler at `hour` (GPUs per instance: 1 for every pool of a trace).
    pub fn quotes(&self, hour: f64) -> Vec<Quote> {
        self.pools
            .keys()
            .filter_map(|pool| {
                let s = self.at(pool, hour)?;
                Some(Quote {
                    pool: pool.clone(),
                    gpus: 1,
                    spot_usd_per_hour: s.spot_usd_per_hour,
                    on_demand_usd_per_hour: s.on_demand_usd_per_hour,
                    interruptions_per_hour: s.interruptions_per_hour,
                })
            })
            .collect()
    }
}
