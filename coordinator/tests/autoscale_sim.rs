//! Deterministic simulation of the autoscaling loop across leader changes: the real pass
//! (`autoscaling::pass`), the real state machine, the simulated provider on a small market, and
//! leaders that crash at random points (between recording a request and launching it, between
//! launching and recording the result, mid-termination). Then a healthy leader takes over.
//! Invariants: no request ever launches twice (one launch call per token, never more
//! instances than it asked for), no more than `max_instances`, every request settles, no orphan
//! survives a reconcile, and with no work the fleet goes to zero.
//!
//! `FLOTILLA_AUTOSCALE_SEEDS=N` runs more seeds (default 200).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use flotilla_coordinator::autoscaling::{self, AutoscaleConfig, Control, Input, Live, Memory, REGISTER_TIMEOUT_MS};
use flotilla_coordinator::provider::sim::SimProvider;
use flotilla_coordinator::provider::{
    BoxFuture, CLUSTER_TAG, DynProvider, Instance, InstanceState, LaunchSpec, Provider, ProviderError, SpotPrices,
};
use flotilla_core::autoscale::Limits;
use flotilla_core::market::Trace;
use flotilla_core::spec::JobSpec;
use flotilla_core::state::{Applied, Command, Envelope, JobState, RequestState, State, apply};
use flotilla_proto::{ApiError, ErrorKind};

const MARKET: &str = "\
hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity
0,g5.xlarge,a,0.40,1.00,0.1,3
0,g5.xlarge,b,0.42,1.00,0.1,8
0,g4dn.xlarge,a,0.20,0.50,0.5,5
";

/// Operations (proposals and provider calls) a leader may still make before it crashes.
#[derive(Clone)]
struct Fuse(Arc<AtomicI64>);

impl Fuse {
    fn burn(&self) -> bool {
        self.0.fetch_sub(1, Ordering::SeqCst) > 0
    }
}

struct Local {
    state: State,
    index: u64,
    now: u64,
    fuse: Fuse,
    /// Rank 0's live progress per job (the leader's memory in production).
    live: BTreeMap<flotilla_core::JobId, Live>,
}

fn crashed() -> ApiError {
    ApiError::new(ErrorKind::Unavailable, "the leader crashed")
}

impl Control for Local {
    async fn input(&mut self, now_ms: u64) -> Result<Input, ApiError> {
        if self.fuse.0.load(Ordering::SeqCst) <= 0 {
            return Err(crashed());
        }
        Ok(autoscaling::input(&self.state, now_ms))
    }

    async fn propose(&mut self, command: Command) -> Result<Applied, ApiError> {
        if !self.fuse.burn() {
            return Err(crashed());
        }
        self.index += 1;
        apply(&mut self.state, self.index, Envelope::new(self.now, command))
            .map_err(|e| ApiError::new(ErrorKind::FailedPrecondition, e.to_string()))
    }

    fn live(&self, job: flotilla_core::JobId, _generation: u64) -> Option<Live> {
        self.live.get(&job).copied()
    }
}

/// The simulated cloud, reached through a leader that may die before a call goes out.
struct Crashing {
    cloud: Arc<SimProvider>,
    fuse: Fuse,
    /// Live spot prices the "cloud" reports (empty: the market file's stand).
    prices: SpotPrices,
}

impl DynProvider for Crashing {
    fn spot_prices_dyn<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<SpotPrices, ProviderError>> {
        Box::pin(async { Ok(self.prices.clone()) })
    }

    fn launch_dyn<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            if !self.fuse.burn() {
                return Err(ProviderError::Failed("the leader crashed".into()));
            }
            self.cloud.launch(spec).await
        })
    }

    fn terminate_dyn<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            if !self.fuse.burn() {
                return Err(ProviderError::Failed("the leader crashed".into()));
            }
            self.cloud.terminate(ids).await
        })
    }

    fn describe_dyn<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>, ProviderError>> {
        Box::pin(async move {
            if !self.fuse.burn() {
                return Err(ProviderError::Failed("the leader crashed".into()));
            }
            self.cloud.describe(tags).await
        })
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn config() -> AutoscaleConfig {
    AutoscaleConfig {
        limits: Limits { max_instances: 12, max_usd_per_hour: 50.0, idle_cooldown_ms: 60_000, ..Limits::default() },
        market: Trace::parse(MARKET).expect("market"),
        cluster_tags: BTreeMap::from([(CLUSTER_TAG.to_string(), "sim".to_string())]),
        cluster_id: "sim".into(),
        market_start_unix_ms: 0,
    }
}

fn job(name: &str, workers: u32, spot: bool) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\n\
         workers = {{ min = {workers}, max = {workers}, gpus = 1 }}\ncapacity = {{ spot = {spot} }}\n"
    ))
    .expect("spec")
}

/// What a seed exercised: (requests a crashed leader left unsettled, of which already
/// launched in the cloud).
fn run_seed(seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed);
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let config = config();
    let mut state = State::default();
    let mut index = 0;
    for (i, (workers, spot)) in [(4, true), (2, true), (3, false), (4, true)].into_iter().enumerate() {
        if rng.below(4) == 0 && i > 0 {
            continue;
        }
        index += 1;
        let command = Command::SubmitJob {
            spec: Box::new(job(&format!("j{i}"), workers, spot)),
            client_request_id: format!("r{i}"),
        };
        apply(&mut state, index, Envelope::new(0, command)).expect("submit");
    }
    let mut now = 1_000u64;
    // Leaders that crash at random points.
    for _term in 0..rng.below(6) + 1 {
        let fuse = Fuse(Arc::new(AtomicI64::new(rng.below(14) as i64)));
        let mut control = Local { state, index, now, fuse: fuse.clone(), live: BTreeMap::new() };
        let provider = Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() };
        let mut memory = Memory::default();
        for _ in 0..3 {
            now += 2_000 + rng.below(5_000);
            control.now = now;
            if futures_block_on(autoscaling::pass(&mut control, &provider, &config, &mut memory, now)).is_err() {
                break;
            }
        }
        state = control.state;
        index = control.index;
    }
    // A healthy leader finishes the work.
    let unsettled: Vec<String> = state
        .instance_requests
        .values()
        .filter(|r| r.state == RequestState::Requested)
        .map(|r| r.request_id.clone())
        .collect();
    let launched_unrecorded = unsettled
        .iter()
        .filter(|t| cloud.all().iter().any(|i| i.tags.get("flotilla-launch-token") == Some(*t)))
        .count();
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let mut control = Local { state, index, now, fuse: fuse.clone(), live: BTreeMap::new() };
    let provider = Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() };
    let mut memory = Memory::default();
    for _ in 0..4 {
        now += 40_000;
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config, &mut memory, now)).expect("healthy pass");
    }
    let state = &control.state;
    let all = cloud.all();
    let calls = cloud.launch_calls.lock().expect("calls").clone();
    let mut unique = calls.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), calls.len(), "seed {seed}: a token reached the cloud twice: {calls:?}");
    for request in state.instance_requests.values() {
        assert_ne!(request.state, RequestState::Requested, "seed {seed}: unsettled {request:?}");
        let launched = all.iter().filter(|i| i.tags.get("flotilla-launch-token") == Some(&request.request_id)).count();
        assert!(launched as u32 <= request.count, "seed {seed}: {launched} for {request:?}");
    }
    let running: Vec<&Instance> = all.iter().filter(|i| i.state == InstanceState::Running).collect();
    assert!(running.len() <= 12, "seed {seed}: {} running", running.len());
    for i in &running {
        let known = state.instances.get(&i.id).is_some_and(|r| r.terminated_at_unix_ms.is_none());
        assert!(known, "seed {seed}: orphan {} survived the reconcile", i.id);
    }
    // No work left: every instance (none registers a worker here) goes once idle past the
    // registration timeout and the cooldown.
    for job in control.state.jobs.keys().copied().collect::<Vec<_>>() {
        control.index += 1;
        let cancel = Command::CancelJob { job_id: job, reason: String::new() };
        let _ = apply(&mut control.state, control.index, Envelope::new(now, cancel));
    }
    assert!(control.state.jobs.values().all(|j| j.state == JobState::Cancelled));
    for _ in 0..3 {
        now += REGISTER_TIMEOUT_MS + 60_000;
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config, &mut memory, now)).expect("idle pass");
    }
    let left: Vec<String> =
        cloud.all().into_iter().filter(|i| i.state == InstanceState::Running).map(|i| i.id).collect();
    assert!(left.is_empty(), "seed {seed}: the idle fleet did not reach zero: {left:?}");
    (unsettled.len(), launched_unrecorded)
}

fn futures_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
}

#[test]
fn no_request_launches_twice_across_leader_crashes_and_idle_fleets_go_to_zero() {
    let seeds = std::env::var("FLOTILLA_AUTOSCALE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200u64);
    let (mut unsettled, mut launched_unrecorded) = (0, 0);
    for seed in 0..seeds {
        let (u, l) = run_seed(seed);
        unsettled += u;
        launched_unrecorded += l;
    }
    // The crash points that matter were hit: requests recorded but not launched, and launched
    // but not recorded, both finished by the next leader without a second launch.
    assert!(
        unsettled > launched_unrecorded && launched_unrecorded > 0,
        "{unsettled} unsettled, {launched_unrecorded} launched"
    );
}

#[test]
fn a_capacity_error_backs_off_and_falls_back_to_on_demand() {
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let config = config();
    let mut state = State::default();
    // A gang of 9: more than any spot pool holds (3, 8 and 5).
    let command = Command::SubmitJob { spec: Box::new(job("big", 9, true)), client_request_id: "r".into() };
    apply(&mut state, 1, Envelope::new(0, command)).expect("submit");
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let mut control = Local { state, index: 1, now: 1000, fuse: fuse.clone(), live: BTreeMap::new() };
    let provider = Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() };
    let mut memory = Memory::default();
    let mut now = 1000;
    for _ in 0..6 {
        now += 5_000;
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config, &mut memory, now)).expect("pass");
    }
    let failed = control.state.instance_requests.values().filter(|r| r.state == RequestState::Failed).count();
    assert!(failed >= 1, "spot capacity errors recorded: {:?}", control.state.instance_requests);
    let on_demand = cloud.all().iter().filter(|i| !i.spot && i.state == InstanceState::Running).count();
    assert_eq!(on_demand, 9, "after the spot pools back off, on-demand: {:?}", cloud.all());
    assert!(failed <= 4, "back-off, not a tight retry loop: {failed} failed requests");
}

/// Registers a worker on `instance` (Raft index `index`) as its agent would.
fn register_worker(
    state: &mut State,
    index: u64,
    instance: &flotilla_core::state::InstanceRecord,
) -> flotilla_core::WorkerId {
    let info = flotilla_core::state::WorkerInfo {
        cpus: 1,
        gpus: 1,
        memory_bytes: 0,
        instance_id: instance.id.clone(),
        instance_type: instance.instance_type.clone(),
        zone: instance.zone.clone(),
        hostname: "h".into(),
        data_addr: "127.0.0.1:1".into(),
    };
    let register = Command::RegisterWorker { info, credential_sha256: String::new() };
    match apply(state, index, Envelope::new(index * 1000, register)) {
        Ok(Applied::WorkerRegistered { worker_id }) => worker_id,
        other => panic!("the worker registers: {other:?}"),
    }
}

/// A healthy leader over a state holding one submitted job of `spec` (TOML), its provider and
/// the simulated cloud behind it.
fn submitted(spec: &str) -> (Local, Crashing, Arc<SimProvider>) {
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let mut state = State::default();
    let spec = JobSpec::from_toml_str(spec).expect("spec");
    apply(&mut state, 1, Envelope::new(0, Command::SubmitJob { spec: Box::new(spec), client_request_id: "r".into() }))
        .expect("submit");
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let control = Local { state, index: 1, now: 1000, fuse: fuse.clone(), live: BTreeMap::new() };
    (control, Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() }, cloud)
}

/// A healthy leader over a state holding one submitted spot job of 2 workers.
fn one_spot_job(prices: SpotPrices) -> (Local, Crashing) {
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let mut state = State::default();
    let command = Command::SubmitJob { spec: Box::new(job("j", 2, true)), client_request_id: "r".into() };
    apply(&mut state, 1, Envelope::new(0, command)).expect("submit");
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let control = Local { state, index: 1, now: 1000, fuse: fuse.clone(), live: BTreeMap::new() };
    (control, Crashing { cloud, fuse, prices })
}

#[test]
fn live_spot_prices_from_the_provider_override_the_market_file() {
    // By the file, g4dn.xlarge/a is cheapest (0.20 x (1 + 2 x 0.5 x 0.1) = 0.22); the cloud
    // says g5.xlarge/b is at 0.05 now.
    let prices = SpotPrices::from([(("g5.xlarge".to_string(), "b".to_string()), 0.05)]);
    let (mut control, provider) = one_spot_job(prices);
    let mut memory = Memory::default();
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let request = control.state.instance_requests.values().next().expect("a request");
    assert_eq!((request.instance_type.as_str(), request.zone.as_str(), request.usd_per_hour), ("g5.xlarge", "b", 0.05));
}

#[test]
fn an_inference_job_buys_workers_for_its_shards() {
    use flotilla_core::state::{InferenceRequest, ModelArtifact, ModelShape, WorkerInfo};
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let mut state = State::default();
    let mut at = 0;
    let mut step = |state: &mut State, command| {
        at += 1;
        apply(state, at, Envelope::new(at, command)).expect("applies")
    };
    // A trained and registered model (its trainer is gone since).
    step(&mut state, Command::SubmitJob { spec: Box::new(job("m", 1, true)), client_request_id: "t".into() });
    let info = WorkerInfo {
        cpus: 1,
        gpus: 1,
        memory_bytes: 0,
        instance_id: "gone".into(),
        instance_type: "g5.xlarge".into(),
        zone: "a".into(),
        hostname: "h".into(),
        data_addr: "127.0.0.1:1".into(),
    };
    let Applied::WorkerRegistered { worker_id } =
        step(&mut state, Command::RegisterWorker { info, credential_sha256: String::new() })
    else {
        panic!()
    };
    let job_id = flotilla_core::JobId(1);
    step(&mut state, Command::AssignGang { job_id, workers: vec![worker_id] });
    let artifact = ModelArtifact {
        artifact_uri: "file:///s/model.safetensors".into(),
        dataset_sha256: String::new(),
        shape: ModelShape { features_per_row: 4, classes: 2, feature_scale: 1.0 },
    };
    let finish = Command::JobFinished {
        job_id,
        generation: 1,
        success: true,
        reason: String::new(),
        step: 1,
        metrics: None,
        artifact: Some(artifact),
        reporter: None,
    };
    step(&mut state, finish);
    step(&mut state, Command::WorkerLost { worker_id, last_step_seen: 0, last_heard_unix_ms: 0 });
    let request = InferenceRequest {
        model: "m".into(),
        version: 1,
        input_uri: "file:///in.csv".into(),
        output_uri: "file:///out".into(),
        workers: 2,
        batch_size: 0,
        shard_rows: 0,
        rows: 1000,
        labelled: false,
        input_bytes: 0,
        shard_byte_offsets: Vec::new(),
    };
    step(&mut state, Command::SubmitInference { request: Box::new(request), client_request_id: "i".into() });
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let mut control = Local { state, index: 100, now: 1000, fuse: fuse.clone(), live: BTreeMap::new() };
    let provider = Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() };
    let mut memory = Memory::default();
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let requests: Vec<_> = control.state.instance_requests.values().collect();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!((requests[0].count, requests[0].spot, requests[0].job), (2, true, Some(flotilla_core::JobId(2))));
}

#[test]
fn a_spot_notice_raises_the_risk_of_its_pool_and_zone_once() {
    use flotilla_core::autoscale::PoolKey;
    let (mut control, provider) = one_spot_job(SpotPrices::new());
    let mut memory = Memory::default();
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let instance = control.state.instances.values().find(|i| i.spot).expect("a spot instance was bought").clone();
    let pool = PoolKey { instance_type: instance.instance_type.clone(), zone: instance.zone.clone() };
    // Its worker registers and gets a spot interruption notice.
    let worker_id = register_worker(&mut control.state, 2, &instance);
    let notice = Command::WorkerInterrupted { worker_id, kind: "spot".into(), action_at_unix_ms: None };
    apply(&mut control.state, 3, Envelope::new(3500, notice)).expect("the notice applies");
    control.index = 3;
    assert!(memory.risk.is_empty());
    for now in [4000, 6000] {
        futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, now)).expect("pass");
    }
    assert_eq!(memory.risk.len(), 1, "one notice, seen by two passes, is one event");
    let same_zone = PoolKey { instance_type: "other".into(), zone: instance.zone.clone() };
    let elsewhere = PoolKey { instance_type: "other".into(), zone: "elsewhere".into() };
    let (own, zone, far) = (
        memory.risk.extra_rate(&pool, 6000),
        memory.risk.extra_rate(&same_zone, 6000),
        memory.risk.extra_rate(&elsewhere, 6000),
    );
    assert!(own > zone && zone > 0.0 && far == 0.0, "{own} {zone} {far}");
}

#[test]
fn an_elastic_job_below_its_max_grows_on_spot_in_its_gangs_pool() {
    let (mut control, provider, _) = submitted(
        "name = \"e\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 1, max = 3, gpus = 1 }\n",
    );
    let mut memory = Memory::default();
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let first: Vec<_> = control.state.instances.values().cloned().collect();
    assert_eq!(first.len(), 1, "min = 1 is bought first: {first:?}");
    let instance = &first[0];
    // Its worker registers and the job runs on it, a gang of 1.
    let worker_id = register_worker(&mut control.state, 2, instance);
    let job_id = *control.state.jobs.keys().next().expect("the job");
    apply(&mut control.state, 3, Envelope::new(3500, Command::AssignGang { job_id, workers: vec![worker_id] }))
        .expect("assign");
    control.index = 3;
    for now in [4000, 6000] {
        futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, now)).expect("pass");
    }
    let grown: Vec<_> = control.state.instance_requests.values().filter(|r| r.job == Some(job_id)).collect();
    assert_eq!(grown.len(), 2, "one request for min, one for growth (bought once): {grown:?}");
    let growth = grown.iter().find(|r| r.count == 2).expect("2 more for max = 3");
    assert!(growth.spot, "growth is spot only");
    assert_eq!((&growth.instance_type, &growth.zone), (&instance.instance_type, &instance.zone), "the gang's pool");
}

#[test]
fn warm_spares_are_bought_in_the_gangs_pool_kept_while_idle_and_take_a_lost_members_place_at_once() {
    let (mut control, provider, cloud) = submitted(
        "name = \"s\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 1, max = 1, gpus = 1 }\ncapacity = { spares = 1 }\n",
    );
    let mut memory = Memory::default();
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let first: Vec<_> = control.state.instances.values().cloned().collect();
    assert_eq!(first.len(), 1, "the gang first, no spare while the job waits: {first:?}");
    let member = register_worker(&mut control.state, 2, &first[0]);
    let job_id = *control.state.jobs.keys().next().expect("the job");
    apply(&mut control.state, 3, Envelope::new(3500, Command::AssignGang { job_id, workers: vec![member] }))
        .expect("assign");
    control.index = 3;
    // Running: one spare is bought, once, in the gang's pool.
    for now in [4000, 6000] {
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, now)).expect("pass");
    }
    let requests: Vec<_> = control.state.instance_requests.values().filter(|r| r.job == Some(job_id)).collect();
    assert_eq!(requests.len(), 2, "one request for the gang, one for the spare: {requests:?}");
    let spare = control.state.instances.values().find(|i| i.id != first[0].id).cloned().expect("the spare's instance");
    assert_eq!((&spare.instance_type, &spare.zone), (&first[0].instance_type, &first[0].zone), "the gang's pool");
    control.index += 1;
    let spare_worker = register_worker(&mut control.state, control.index, &spare);
    // Idle far past the cooldown, the spare is kept (an idle instance nobody waits for goes).
    let mut now = 6000;
    for _ in 0..3 {
        now += REGISTER_TIMEOUT_MS + 60_000;
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, now)).expect("idle pass");
    }
    let kept = control.state.instances.get(&spare.id).is_some_and(|i| i.terminated_at_unix_ms.is_none());
    assert!(kept, "the idle spare is kept: {:?}", control.state.instances.get(&spare.id));
    assert_eq!(control.state.instance_requests.len(), 2, "nothing more bought");
    // The member is lost without notice: the job regroups on the spare at once, nothing to buy.
    control.index += 1;
    let lost = Command::WorkerLost { worker_id: member, last_step_seen: 0, last_heard_unix_ms: 0 };
    apply(&mut control.state, control.index, Envelope::new(now, lost)).expect("lost");
    let (pending, free) = flotilla_coordinator::scheduling::scheduler_input(&control.state, |_| u64::MAX, 0);
    let placed = flotilla_core::scheduler::schedule(&pending, &free);
    assert_eq!(placed.placements.len(), 1, "{placed:?}");
    assert_eq!((placed.placements[0].job, placed.placements[0].workers.clone()), (job_id, vec![spare_worker]));
    // With the job over, the spare is given back after the cooldown like any idle instance.
    control.index += 1;
    let cancel = Command::CancelJob { job_id, reason: String::new() };
    apply(&mut control.state, control.index, Envelope::new(now, cancel)).expect("cancel");
    for _ in 0..3 {
        now += REGISTER_TIMEOUT_MS + 60_000;
        control.now = now;
        futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, now)).expect("idle pass");
    }
    let running: Vec<String> =
        cloud.all().into_iter().filter(|i| i.state == InstanceState::Running).map(|i| i.id).collect();
    assert!(!running.contains(&spare.id), "the spare went with the job: {running:?}");
}

#[test]
fn a_spot_job_out_of_slack_for_its_deadline_checkpoints_and_moves_to_on_demand() {
    use flotilla_core::JobId;
    use flotilla_core::state::{GenerationEnd, StopReason};
    let cloud = Arc::new(SimProvider::new(Trace::parse(MARKET).expect("market")));
    let mut state = State::default();
    // A deadline one hour after submission (at t = 0), checkpoints every 100 steps.
    let spec = JobSpec::from_toml_str(
        "name = \"d\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 2, max = 2, gpus = 1 }\ncapacity = { deadline_h = 1.0 }\n",
    )
    .expect("spec");
    apply(&mut state, 1, Envelope::new(0, Command::SubmitJob { spec: Box::new(spec), client_request_id: "r".into() }))
        .expect("submit");
    let fuse = Fuse(Arc::new(AtomicI64::new(i64::MAX)));
    let mut control = Local { state, index: 1, now: 1000, fuse: fuse.clone(), live: BTreeMap::new() };
    let provider = Crashing { cloud: cloud.clone(), fuse, prices: SpotPrices::new() };
    let mut memory = Memory::default();
    let mut pass = |control: &mut Local, now_ms: u64| {
        control.now = now_ms;
        futures_block_on(autoscaling::pass(control, &provider, &config(), &mut memory, now_ms)).expect("pass")
    };
    pass(&mut control, 2000);
    let spot: Vec<_> = control.state.instances.values().cloned().collect();
    assert!(spot.len() == 2 && spot.iter().all(|i| i.spot), "with slack, spot first: {spot:?}");
    let workers: Vec<_> =
        spot.iter().enumerate().map(|(i, x)| register_worker(&mut control.state, 2 + i as u64, x)).collect();
    let job_id = JobId(1);
    apply(&mut control.state, 4, Envelope::new(4000, Command::AssignGang { job_id, workers })).expect("assign");
    control.index = 4;
    // 2 s per step. Remaining work + 0.1 h restart + 103 steps at risk (0.057 h):
    // at 0.3 h, 900 steps left (0.5 h): 0.96 h < 1 h, slack; at 0.4 h, 850 left: 1.03 h, out.
    let at = |hours: f64| (hours * 3_600_000.0) as u64;
    let report = |step: u64| Live { step, total_steps: 1100, eta_ms: (1100 - step) * 2000 };
    control.live.insert(job_id, report(200));
    assert!(pass(&mut control, at(0.3)).deadline_moves.is_empty());
    assert_eq!(control.state.jobs[&job_id].checkpoint_requested, None);
    control.live.insert(job_id, report(250));
    assert_eq!(pass(&mut control, at(0.4)).deadline_moves, [job_id]);
    let job = &control.state.jobs[&job_id];
    assert!(job.on_demand_only && job.checkpoint_requested == Some(StopReason::Deadline), "{job:?}");
    let event = job.events.iter().rev().find(|e| e.kind == "deadline").expect("a deadline event");
    assert!(event.message.contains("850 steps at 2.00 s/step"), "{}", event.message);
    // The gang checkpoints and stops; the job waits for on-demand capacity only.
    control.live.clear();
    let ended = Command::GenerationEnded {
        job_id,
        generation: 1,
        end: GenerationEnd::Checkpointed,
        step: 260,
        reporter: None,
        announced: None,
    };
    apply(&mut control.state, 5, Envelope::new(at(0.41), ended)).expect("ended");
    control.index = 5;
    let (pending, free) = flotilla_coordinator::scheduling::scheduler_input(&control.state, |_| u64::MAX, 0);
    let plan = flotilla_core::scheduler::schedule(&pending, &free);
    assert!(plan.placements.is_empty(), "the idle spot workers are not for it: {plan:?}");
    assert!(pass(&mut control, at(0.42)).deadline_moves.is_empty(), "moved once");
    let on_demand: Vec<_> = control.state.instance_requests.values().filter(|r| !r.spot).collect();
    assert_eq!(on_demand.len(), 1, "{:?}", control.state.instance_requests);
    assert_eq!((on_demand[0].count, on_demand[0].job), (2, Some(job_id)));
}

/// An autoscaler pass at `now_ms`.
fn pass_at(control: &mut Local, provider: &Crashing, memory: &mut Memory, now_ms: u64) {
    control.now = now_ms;
    futures_block_on(autoscaling::pass(control, provider, &config(), memory, now_ms)).expect("pass");
}

/// [`one_spot_job`] running: its gang bought (a pass at t = 2 s), registered and assigned
/// (generation 1). Also the gang's instances and workers, in that order.
fn one_running_spot_gang(
    memory: &mut Memory,
) -> (Local, Crashing, Vec<flotilla_core::state::InstanceRecord>, Vec<flotilla_core::WorkerId>) {
    let (mut control, provider) = one_spot_job(SpotPrices::new());
    pass_at(&mut control, &provider, memory, 2000);
    let gang: Vec<_> = control.state.instances.values().cloned().collect();
    assert_eq!(gang.len(), 2);
    let workers: Vec<_> =
        gang.iter().enumerate().map(|(i, x)| register_worker(&mut control.state, 2 + i as u64, x)).collect();
    let assign = Command::AssignGang { job_id: flotilla_core::JobId(1), workers: workers.clone() };
    apply(&mut control.state, 4, Envelope::new(4000, assign)).expect("assign");
    (control, provider, gang, workers)
}

/// [`one_running_spot_gang`] whose rank 1 got a two-minute spot notice at t = 10 s.
fn rank1_noticed(
    memory: &mut Memory,
) -> (Local, Crashing, Vec<flotilla_core::state::InstanceRecord>, Vec<flotilla_core::WorkerId>) {
    let (mut control, provider, gang, workers) = one_running_spot_gang(memory);
    let notice =
        Command::WorkerInterrupted { worker_id: workers[1], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
    apply(&mut control.state, 5, Envelope::new(10_000, notice)).expect("notice");
    control.index = 5;
    (control, provider, gang, workers)
}

/// The instances bought besides the gang's.
fn bought(control: &Local, gang: &[flotilla_core::state::InstanceRecord]) -> Vec<flotilla_core::state::InstanceRecord> {
    control.state.instances.values().filter(|i| !gang.iter().any(|g| g.id == i.id)).cloned().collect()
}

#[test]
fn a_notice_with_time_to_spare_buys_one_replacement_elsewhere_and_hands_over_to_it() {
    use flotilla_core::state::StopReason;
    let mut memory = Memory::default();
    // Rank 1 gets a two-minute spot notice at t = 10 s.
    let (mut control, provider, gang, workers) = rank1_noticed(&mut memory);
    let pass = |control: &mut Local, memory: &mut Memory, now_ms: u64| pass_at(control, &provider, memory, now_ms);
    let job_id = flotilla_core::JobId(1);
    assert_eq!(control.state.jobs[&job_id].checkpoint_requested, None, "the gang trains on");
    // Leaders come and go: exactly one replacement is bought, outside the noticed pool.
    pass(&mut control, &mut memory, 11_000);
    pass(&mut control, &mut memory, 12_000);
    pass(&mut control, &mut Memory::default(), 13_000);
    let replacements = bought(&control, &gang);
    assert_eq!(replacements.len(), 1, "{:?}", control.state.instances);
    let noticed =
        &gang.iter().find(|g| g.id == control.state.workers[&workers[1]].info.instance_id).expect("noticed").clone();
    assert_ne!(
        (&replacements[0].instance_type, &replacements[0].zone),
        (&noticed.instance_type, &noticed.zone),
        "not in the pool being reclaimed"
    );
    use flotilla_coordinator::scheduling::{HandoverPolicy, PREPARE_WAIT_MAX_MS, handover_commands};
    const EXPECTED: HandoverPolicy = HandoverPolicy { replacements_expected: true, live: false };
    let nothing_prepared = |_| None;
    // Before it registers there is nothing to hand over to; once it does, it is reserved and
    // prepares while the gang trains on.
    assert!(handover_commands(&control.state, 14_000, EXPECTED, nothing_prepared).is_empty());
    let replacement = register_worker(&mut control.state, 6, &replacements[0]);
    let commands = handover_commands(&control.state, 15_000, EXPECTED, nothing_prepared);
    assert_eq!(commands, [Command::HandoverTo { job_id, generation: 1, replacement }]);
    for command in commands {
        apply(&mut control.state, 7, Envelope::new(15_000, command)).expect("reserve");
    }
    assert_eq!(control.state.jobs[&job_id].checkpoint_requested, None, "trains on while it prepares");
    assert!(handover_commands(&control.state, 16_000, EXPECTED, nothing_prepared).is_empty());
    // Another job prepared is not this one.
    assert!(handover_commands(&control.state, 16_000, EXPECTED, |_| Some(flotilla_core::JobId(9))).is_empty());
    // It reports the job prepared: the gang hands over.
    let ready = [Command::HandoverReady { job_id, generation: 1, live: false }];
    let prepared = |w| (w == replacement).then_some(job_id);
    assert_eq!(handover_commands(&control.state, 16_000, EXPECTED, prepared), ready);
    // One that never reports is waited for PREPARE_WAIT_MAX_MS at most.
    assert!(handover_commands(&control.state, 15_000 + PREPARE_WAIT_MAX_MS - 1, EXPECTED, nothing_prepared).is_empty());
    assert_eq!(handover_commands(&control.state, 15_000 + PREPARE_WAIT_MAX_MS, EXPECTED, nothing_prepared), ready);
    // A replacement still reserved though lost (a state an older build wrote; this one gives
    // it up, see the next test) ends the handover at a checkpoint.
    let fallback = [Command::RequestCheckpoint { job_id, generation: 1, reason: StopReason::Preemption }];
    let mut lost = control.state.clone();
    lost.workers.get_mut(&replacement).expect("worker").lost_at_unix_ms = Some(15_500);
    assert_eq!(handover_commands(&lost, 16_000, EXPECTED, prepared), fallback);
    for command in handover_commands(&control.state, 16_000, EXPECTED, prepared) {
        apply(&mut control.state, 8, Envelope::new(16_000, command)).expect("hand over");
    }
    assert_eq!(control.state.jobs[&job_id].checkpoint_requested, Some(StopReason::Handover));
    assert!(handover_commands(&control.state, 17_000, EXPECTED, prepared).is_empty(), "once");
    // Without a replacement in time, the fallback is the checkpoint-and-stop path.
    let mut late = control.state.clone();
    late.jobs.get_mut(&job_id).expect("job").handovers[0].replacement = None;
    late.jobs.get_mut(&job_id).expect("job").checkpoint_requested = None;
    late.workers.get_mut(&replacement).expect("worker").lost_at_unix_ms = Some(15_000);
    assert!(handover_commands(&late, 84_999, EXPECTED, nothing_prepared).is_empty());
    assert_eq!(handover_commands(&late, 85_000, EXPECTED, nothing_prepared), fallback);
    assert_eq!(handover_commands(&late, 20_000, HandoverPolicy::default(), nothing_prepared).len(), 1, "none can come");
}

#[test]
fn a_replacement_lost_while_it_prepares_is_bought_again_and_the_handover_goes_on() {
    let mut memory = Memory::default();
    let (mut control, provider, gang, _) = rank1_noticed(&mut memory);
    let pass = |control: &mut Local, memory: &mut Memory, now_ms: u64| pass_at(control, &provider, memory, now_ms);
    let job_id = flotilla_core::JobId(1);
    pass(&mut control, &mut memory, 11_000);
    let [first] = bought(&control, &gang).try_into().expect("one replacement bought");
    let replacement = register_worker(&mut control.state, 6, &first);
    let reserve = Command::HandoverTo { job_id, generation: 1, replacement };
    apply(&mut control.state, 7, Envelope::new(15_000, reserve)).expect("reserve");
    // It dies while it prepares (its lease expired): given up, the gang trains on, and the
    // autoscaler buys one more, once, whatever the leader changes.
    let lost = Command::WorkerLost { worker_id: replacement, last_step_seen: 0, last_heard_unix_ms: 0 };
    apply(&mut control.state, 8, Envelope::new(20_000, lost)).expect("lost");
    control.index = 8;
    let job = &control.state.jobs[&job_id];
    assert_eq!((job.checkpoint_requested, job.handovers[0].replacement), (None, None), "training on, seeking another");
    pass(&mut control, &mut memory, 21_000);
    pass(&mut control, &mut Memory::default(), 22_000);
    pass(&mut control, &mut memory, 23_000);
    let now_bought = bought(&control, &gang);
    assert_eq!(now_bought.len(), 2, "one more: {:?}", control.state.instances);
    let second = now_bought.into_iter().find(|i| i.id != first.id).expect("the second");
    use flotilla_coordinator::scheduling::{HandoverPolicy, handover_commands};
    const EXPECTED: HandoverPolicy = HandoverPolicy { replacements_expected: true, live: false };
    let again = register_worker(&mut control.state, 9, &second);
    let commands = handover_commands(&control.state, 30_000, EXPECTED, |_| None);
    assert_eq!(commands, [Command::HandoverTo { job_id, generation: 1, replacement: again }]);
    for command in commands {
        apply(&mut control.state, 10, Envelope::new(30_000, command)).expect("reserve again");
    }
    let prepared = |w| (w == again).then_some(job_id);
    assert_eq!(
        handover_commands(&control.state, 31_000, EXPECTED, prepared),
        [Command::HandoverReady { job_id, generation: 1, live: false }]
    );
    // The lost worker's instance is given back after the idle cooldown (60 s here, from the
    // first pass that saw it lost, at 21 s), not kept as capacity.
    control.index = 10;
    pass(&mut control, &mut memory, 80_999);
    assert!(control.state.instances[&first.id].terminated_at_unix_ms.is_none());
    pass(&mut control, &mut memory, 81_000);
    assert!(control.state.instances[&first.id].terminated_at_unix_ms.is_some(), "{:?}", control.state.instances);
    assert!(control.state.instances[&second.id].terminated_at_unix_ms.is_none(), "the one preparing stays");
}

#[test]
fn a_worker_its_peers_cannot_reach_is_no_capacity_and_one_more_is_bought() {
    use flotilla_core::state::GenerationEnd;
    let mut memory = Memory::default();
    let (mut control, provider, gang, workers) = one_running_spot_gang(&mut memory);
    // The gang breaks at the rendezvous: rank 0 could not reach rank 1's data port.
    let broke = Command::GenerationEnded {
        job_id: flotilla_core::JobId(1),
        generation: 1,
        end: GenerationEnd::PeerLost { reason: "rank 1 was lost during rendezvous".into(), unreachable_rank: Some(1) },
        step: 0,
        reporter: Some(workers[0]),
        announced: None,
    };
    apply(&mut control.state, 5, Envelope::new(20_000, broke)).expect("broke");
    control.index = 5;
    assert!(control.state.workers[&workers[1]].unreachable_until_unix_ms > 21_000);
    // The job waits for 2: rank 0's worker is capacity, rank 1's is not while held: one is bought.
    pass_at(&mut control, &provider, &mut memory, 21_000);
    assert_eq!(bought(&control, &gang).len(), 1, "{:?}", control.state.instances);
}

#[test]
fn members_noticed_together_get_one_replacement_each_bought_once() {
    let mut memory = Memory::default();
    let (mut control, provider, gang, workers) = one_running_spot_gang(&mut memory);
    let pass = |control: &mut Local, memory: &mut Memory, now_ms: u64| pass_at(control, &provider, memory, now_ms);
    let job_id = flotilla_core::JobId(1);
    // The pool is reclaimed: both members noticed within a second.
    for (i, worker_id) in workers.iter().enumerate() {
        let notice =
            Command::WorkerInterrupted { worker_id: *worker_id, kind: "spot".into(), action_at_unix_ms: Some(130_000) };
        apply(&mut control.state, 5 + i as u64, Envelope::new(10_000 + i as u64 * 500, notice)).expect("notice");
    }
    control.index = 7;
    assert_eq!(control.state.jobs[&job_id].handovers.len(), 2, "both handed over, the gang trains on");
    // Two replacements, bought once whatever the leader changes, outside the noticed pool.
    pass(&mut control, &mut memory, 11_000);
    pass(&mut control, &mut Memory::default(), 12_000);
    let replacements = bought(&control, &gang);
    assert_eq!(replacements.len(), 2, "{:?}", control.state.instances);
    assert!(replacements.iter().all(|r| (&r.instance_type, &r.zone) != (&gang[0].instance_type, &gang[0].zone)));
    // One registers and is reserved: the other is still on its way, nothing more is bought.
    let first = register_worker(&mut control.state, 8, &replacements[0]);
    let reserve = Command::HandoverTo { job_id, generation: 1, replacement: first };
    apply(&mut control.state, 9, Envelope::new(13_000, reserve)).expect("reserve");
    control.index = 9;
    pass(&mut control, &mut memory, 14_000);
    assert_eq!(bought(&control, &gang).len(), 2, "{:?}", control.state.instances);
}

/// An instance whose worker never registers (a broken image or boot script, no route to the
/// coordinators) is terminated once overdue, its pool backs off, the job's events say why, and
/// the gang is bought again elsewhere. It used to count as the gang's idle capacity: the job
/// waited forever while the instance was paid for.
#[test]
fn an_instance_whose_worker_never_registers_is_terminated_and_its_pool_backs_off() {
    let (mut control, provider, cloud) = submitted(
        "name = \"n\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 2, gpus = 1 }\n",
    );
    let mut memory = Memory::default();
    let pass_at = |control: &mut Local, memory: &mut Memory, now: u64| {
        control.now = now;
        futures_block_on(autoscaling::pass(control, &provider, &config(), memory, now)).expect("pass")
    };
    let mut now = 2000;
    pass_at(&mut control, &mut memory, now);
    let first: Vec<_> = control.state.instances.values().cloned().collect();
    assert_eq!(first.len(), 2, "the gang is bought: {first:?}");
    // What it says of the job (the scheduler appends it to the pending reason).
    let job_id = *control.state.jobs.keys().next().expect("the job");
    let note = memory.notes.get(&job_id).cloned().unwrap_or_default();
    assert!(note.starts_with("buying 2 spot instance(s) in "), "{note}");
    pass_at(&mut control, &mut memory, now + 2000);
    assert_eq!(
        memory.notes.get(&job_id).map(String::as_str),
        Some("2 instance(s) bought for it are starting (their workers register as they boot)")
    );
    let pool = (first[0].instance_type.clone(), first[0].zone.clone());
    // Still booting a minute before the timeout: nothing terminated, nothing bought twice.
    now += REGISTER_TIMEOUT_MS - 60_000;
    let report = pass_at(&mut control, &mut memory, now);
    assert!(report.no_shows.is_empty() && report.launched.is_empty(), "{report:?}");
    // Overdue: both go, the job says so once per instance, and the gang is bought again
    // outside the pool that backs off.
    now += 60_000;
    let report = pass_at(&mut control, &mut memory, now);
    let mut ids: Vec<String> = first.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    let mut no_shows = report.no_shows.clone();
    no_shows.sort();
    assert_eq!(no_shows, ids, "{report:?}");
    for id in &ids {
        let gone = cloud.all().into_iter().any(|i| i.id == *id && i.state == InstanceState::Terminated);
        assert!(gone, "{id} terminated in the cloud");
        assert!(control.state.instances[id].terminated_at_unix_ms.is_some(), "{id} recorded as terminated");
    }
    let events = |control: &Local| -> Vec<String> {
        let job = control.state.jobs.values().next().expect("the job");
        job.events.iter().filter(|e| e.kind == "capacity").map(|e| e.message.clone()).collect()
    };
    let said = events(&control);
    assert_eq!(said.len(), 2, "{said:?}");
    for (message, id) in said.iter().zip(&ids) {
        assert!(message.contains(id.as_str()) && message.contains("registered no worker in 10 min"), "{message}");
        assert!(message.contains("`flotilla worker`"), "{message}");
    }
    assert_eq!(report.launched.len(), 2, "bought again: {report:?}");
    for id in &report.launched {
        let again = &control.state.instances[id];
        assert!(
            !(again.spot && (again.instance_type.clone(), again.zone.clone()) == pool),
            "not in the pool that backs off: {again:?}"
        );
    }
    // Said once: later passes add nothing for the instances already gone.
    pass_at(&mut control, &mut memory, now + 2000);
    assert_eq!(events(&control).len(), 2);
}

/// A failed launch is part of the job's reason (what the provider said) until a launch for it
/// succeeds: it used to be recorded only on the instance request, which no command shows.
#[test]
fn a_failed_launch_is_in_the_jobs_reason_until_one_succeeds() {
    // 4 workers of g5.xlarge: pool a (cheapest) has spot capacity for 3 only.
    let (mut control, provider, _cloud) = submitted(
        "name = \"f\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 4, gpus = 1 }\ncapacity = { instance_types = [\"g5.xlarge\"] }\n",
    );
    let job_id = *control.state.jobs.keys().next().expect("the job");
    let mut memory = Memory::default();
    control.now = 2000;
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 2000)).expect("pass");
    let note = memory.notes.get(&job_id).cloned().unwrap_or_default();
    assert!(
        note.contains("; the last launch failed: 4 spot in g5.xlarge/a: no capacity: "),
        "the provider's answer in the job's word: {note}"
    );
    // The pool backs off; the next pass buys in b and the failure is no longer said.
    control.now = 4000;
    futures_block_on(autoscaling::pass(&mut control, &provider, &config(), &mut memory, 4000)).expect("pass");
    let note = memory.notes.get(&job_id).cloned().unwrap_or_default();
    assert!(note.starts_with("buying 4 spot instance(s) in g5.xlarge/b") && !note.contains("failed"), "{note}");
}
