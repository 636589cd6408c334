//! `flotilla submit` and `flotilla status`: the job API from the command line.

use std::path::PathBuf;

use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::{job_state_name, spec_to_proto};
use flotilla_proto::v1::{self, GetJobRequest, ListJobsRequest, SubmitJobRequest};
use serde_json::{Value, json};

use super::spec_file::{self, LoadError};
use crate::cluster_file;
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Path to the job spec (TOML).
    pub spec: PathBuf,
    /// Follow the job: a live progress line on stderr until it ends (exit status 1 unless it
    /// succeeds).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// The job's priority instead of the spec's `priority` (-1000..=1000, higher first): a
    /// waiting job stops running jobs of lower priority that hold the workers it needs.
    #[arg(long, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-flotilla_core::spec::PRIORITY_ABS_MAX..=flotilla_core::spec::PRIORITY_ABS_MAX))]
    pub priority: Option<i32>,
    /// Replace a field of the file: `--set train.learning_rate=0.01` (repeatable; a relative
    /// path is relative to the current folder; README: Job specs).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub overrides: Vec<flotilla_core::spec::Override>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// A job id (`job-7` or `7`); without it, every job.
    pub job: Option<String>,
    /// Only jobs in this state (repeatable: `--state recovering --state running`); inference
    /// jobs too, in the table.
    #[arg(long = "state", value_enum, conflicts_with = "job")]
    pub states: Vec<StateArg>,
    /// Only training jobs whose name matches this pattern (`*`: any characters, `?`: one;
    /// `--name 'mnist-lr-*'` lists a sweep's jobs); the table then leaves inference jobs out.
    #[arg(long, conflicts_with = "job")]
    pub name: Option<String>,
    /// Follow the job until it ends (a live progress line on stderr, as `submit --follow`),
    /// then show it; exit status 1 unless it succeeds.
    #[arg(long, short = 'f', requires = "job")]
    pub follow: bool,
}

/// A job state as `status --state` takes it (README: the states table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Pending,
    Provisioning,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl StateArg {
    fn proto(self) -> v1::JobState {
        match self {
            StateArg::Pending => v1::JobState::Pending,
            StateArg::Provisioning => v1::JobState::Provisioning,
            StateArg::Running => v1::JobState::Running,
            StateArg::Recovering => v1::JobState::Recovering,
            StateArg::Succeeded => v1::JobState::Succeeded,
            StateArg::Failed => v1::JobState::Failed,
            StateArg::Cancelled => v1::JobState::Cancelled,
        }
    }
}

/// A client for the resolved cluster; call inside a tokio runtime context (channels connect lazily).
fn client(coordinator: Option<&str>) -> anyhow::Result<ApiClient> {
    let target = cluster_file::resolve(coordinator)?;
    target.client()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")
}

pub fn submit(args: SubmitArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let spec = match spec_file::load(&args.spec, &args.overrides) {
        Ok(spec) => spec,
        Err(LoadError::Io(e)) => return Err(e),
        Err(LoadError::Spec(e)) => anyhow::bail!("{}: {e}", args.spec.display()),
    };
    let mut spec = spec;
    if let Some(priority) = args.priority {
        spec.priority = priority;
    }
    let runtime = runtime()?;
    let _context = runtime.enter();
    let mut client = client(coordinator)?;
    if let Some(run) = spec.run.as_mut()
        && let Some(folder) = run.workdir.clone().filter(|w| w.starts_with('/'))
    {
        run.workdir = Some(runtime.block_on(upload_workdir(&mut client, std::path::Path::new(&folder)))?);
    }
    let request =
        SubmitJobRequest { spec: Some(spec_to_proto(&spec)), client_request_id: cluster_file::random_hex(16)? };
    let response = runtime
        .block_on(client.call(|mut c| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        }))
        .map_err(anyhow::Error::from)?;
    if output == OutputFormat::Json {
        print_json(&json!({ "id": response.job_id, "duplicate": response.duplicate, "served_by": response.served_by }));
    }
    let followed = args.follow.then(|| follow_until_ctrl_c(&runtime, &mut client, &response.job_id));
    // The contract (DESIGN §8): the job id alone on the last line of stdout.
    println!("{}", response.job_id);
    match followed {
        Some(followed) => succeeded(&followed?, &response.job_id),
        None => Ok(()),
    }
}

/// [`follow`] until the job ends (`Some`, its final status) or Ctrl-C stops the following
/// (`None`): the job goes on.
fn follow_until_ctrl_c(
    runtime: &tokio::runtime::Runtime,
    client: &mut ApiClient,
    job_id: &str,
) -> anyhow::Result<Option<v1::JobStatus>> {
    runtime.block_on(async {
        tokio::select! {
            job = follow(client, job_id) => job.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    })
}

/// Whether `error` is the API's `NotFound`.
fn is_not_found(error: &anyhow::Error) -> bool {
    error.downcast_ref::<flotilla_proto::ApiError>().is_some_and(|e| e.kind == flotilla_proto::ErrorKind::NotFound)
}

/// The end of a followed job as an exit status: success only for a job that succeeded; Ctrl-C
/// (`None`) stops the following, not the job, and says so, so that nobody takes it for a cancel.
fn succeeded(followed: &Option<v1::JobStatus>, id: &str) -> anyhow::Result<()> {
    match followed {
        None => anyhow::bail!(
            "stopped following; {id} keeps running (`flotilla status {id}` shows it, `flotilla cancel {id}` stops it)"
        ),
        Some(job) if job.state != v1::JobState::Succeeded as i32 => {
            anyhow::bail!("{} ended {}: {}", job.id, state_name(job), job.reason)
        }
        Some(_) => Ok(()),
    }
}

/// Workdir upload chunks (well under the API's message limit).
const WORKDIR_CHUNK_BYTES: usize = 1 << 20;

/// Packs `folder` and stores it in the cluster store through the API (content-addressed: an
/// unchanged folder is not sent twice); returns the URI for run.workdir.
async fn upload_workdir(client: &mut ApiClient, folder: &std::path::Path) -> anyhow::Result<String> {
    let max = flotilla_core::spec::run::WORKDIR_BYTES_MAX;
    let packed = flotilla_worker::workdir::pack(folder, max)?;
    let total = packed.archive.len() as u64;
    let chunks: Vec<v1::WorkdirChunk> = packed
        .archive
        .chunks(WORKDIR_CHUNK_BYTES)
        .enumerate()
        .map(|(i, data)| v1::WorkdirChunk {
            sha256: if i == 0 { packed.sha256.clone() } else { String::new() },
            total_bytes: if i == 0 { total } else { 0 },
            data: data.to_vec(),
        })
        .collect();
    let uploaded = client
        .call(|mut c| {
            let chunks = chunks.clone();
            async move { c.upload_workdir(tokio_stream::iter(chunks)).await }
        })
        .await
        .with_context(|| format!("uploading run.workdir {}", folder.display()))?;
    eprintln!(
        "workdir {} ({total} bytes packed){}: {}",
        folder.display(),
        if uploaded.written { "" } else { " already in the cluster store" },
        uploaded.uri
    );
    Ok(uploaded.uri)
}

/// Streams the job's progress to stderr until it ends; returns its final status.
async fn follow(client: &mut ApiClient, job_id: &str) -> anyhow::Result<v1::JobStatus> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last_printed: Option<(String, std::time::Instant)> = None;
    loop {
        let request = v1::WatchJobRequest { job_id: job_id.to_string() };
        let mut stream = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.watch_job(request).await }
            })
            .await?;
        // A stream that breaks (leader change, restart) is opened again; the job decides the end.
        while let Ok(Some(update)) = stream.message().await {
            let Some(job) = update.job else { continue };
            let line = progress_line(&job, update.progress.as_ref());
            let due = last_printed.as_ref().is_none_or(|(text, at)| {
                !text.starts_with(&line[..line.find("step").unwrap_or(line.len())]) || at.elapsed().as_secs() >= 1
            });
            let ended = [v1::JobState::Succeeded, v1::JobState::Failed, v1::JobState::Cancelled]
                .iter()
                .any(|s| *s as i32 == job.state);
            if due || ended {
                let mut err = std::io::stderr();
                let _ = if tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
                last_printed = Some((line, std::time::Instant::now()));
            }
            if ended {
                if tty {
                    eprintln!();
                }
                return Ok(job);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// `job-1 Running gen 1 world 2 step 120/192 [######----] 62% loss 0.2345 9000 samples/s ETA 3s`
fn progress_line(job: &v1::JobStatus, live: Option<&v1::LiveProgress>) -> String {
    let mut line = format!("{} {} gen {} world {}", job.id, state_name(job), job.generation, job.world_size);
    let metrics = job.metrics.unwrap_or_default();
    if job.total_steps > 0 {
        let fraction = (job.step as f64 / job.total_steps as f64).clamp(0.0, 1.0);
        let filled = (fraction * 20.0).round() as usize;
        line += &format!(
            " step {}/{} [{}{}] {:>3.0}%",
            job.step,
            job.total_steps,
            "#".repeat(filled),
            "-".repeat(20 - filled),
            fraction * 100.0
        );
    } else if job.step > 0 {
        line += &format!(" step {}", job.step);
    }
    if let Some(loss) = metrics.train_loss {
        line += &format!(" loss {loss:.4}");
    }
    if let Some(rate) = metrics.samples_per_s {
        line += &format!(" {rate:.0} samples/s");
    }
    if let Some(eta) = live.map(|p| p.eta_ms).filter(|ms| *ms > 0) {
        line += &format!(" ETA {}s", eta.div_ceil(1000));
    }
    if let Some(accuracy) = metrics.val_accuracy {
        line += &format!(" val_accuracy {accuracy:.4}");
    }
    if job.stall_ms_total > 0 {
        line += &format!(" stalled {} ms (last {} ms)", job.stall_ms_total, job.last_stall_ms);
    }
    if let Some(handing_over) = handing_over(job) {
        line += &format!(" {handing_over}");
    }
    if !job.reason.is_empty() {
        line += &format!(" ({})", job.reason);
    }
    line
}

/// The job's reason, after the handovers under way (both views show it).
fn reason_text(job: &v1::JobStatus) -> String {
    match handing_over(job) {
        Some(handing_over) if job.reason.is_empty() => handing_over,
        Some(handing_over) => format!("{handing_over}; {}", job.reason),
        None => job.reason.clone(),
    }
}

/// `handing over: worker-2 -> worker-4 (until ...), worker-1 -> ? (no deadline)` while
/// handovers are under way.
fn handing_over(job: &v1::JobStatus) -> Option<String> {
    let each: Vec<String> = job.handovers.iter().map(handover_text).collect();
    (!each.is_empty()).then(|| format!("handing over: {}", each.join(", ")))
}

/// `worker-2 -> worker-4 (until 12:03:15Z)`, `worker-1 -> ? (no deadline)`.
fn handover_text(h: &v1::HandoverStatus) -> String {
    let replacement = if h.replacement.is_empty() { "?" } else { h.replacement.as_str() };
    let until = match h.until_unix_ms {
        0 => "no deadline".to_string(),
        at => format!("until {}", flotilla_core::text::rfc3339_utc(at)),
    };
    format!("{} -> {replacement} ({until})", h.leaving)
}

/// `JobService.GetJob` for `id`.
fn get_job(
    runtime: &tokio::runtime::Runtime,
    client: &mut ApiClient,
    id: &str,
) -> Result<v1::GetJobResponse, flotilla_proto::ApiError> {
    let request = GetJobRequest { job_id: id.to_string() };
    runtime.block_on(client.call(|mut c| {
        let request = request.clone();
        async move { c.get_job(request).await }
    }))
}

pub fn status(args: StatusArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let mut client = client(coordinator)?;
    match args.job {
        Some(job) => {
            // An inference job (same id space) is not followed: it is shown, as without --follow.
            let followed = match args.follow.then(|| follow_until_ctrl_c(&runtime, &mut client, &job)).transpose() {
                Err(e) if is_not_found(&e) => {
                    eprintln!("{job}: no training job has this id to follow");
                    None
                }
                other => other?,
            };
            if let Some(None) = followed {
                return succeeded(&None, &job);
            }
            let response = match get_job(&runtime, &mut client, &job) {
                // Not a training job: it may be an inference job (they share the id space).
                Err(e) if e.kind == flotilla_proto::ErrorKind::NotFound => {
                    return super::infer::status(&mut client, &runtime, &job, output).map_err(|inference| {
                        if is_not_found(&inference) {
                            anyhow::anyhow!("{job} does not exist: no training or inference job has this id (`flotilla status` lists them)")
                        } else {
                            anyhow::anyhow!("{e} ({})", flotilla_core::text::error_chain(inference.chain()))
                        }
                    });
                }
                other => other.map_err(anyhow::Error::from)?,
            };
            let job = response.job.context("the coordinator answered without a job")?;
            match output {
                OutputFormat::Json => print_json(&status_json(&job, Some(response.served_by))),
                OutputFormat::Text => print!("{}", job_text(&job, response.served_by)),
            }
            if followed.is_some() {
                let id = job.id.clone();
                return succeeded(&Some(job), &id);
            }
        }
        None => {
            let states: Vec<i32> = args.states.iter().map(|s| s.proto() as i32).collect();
            let (mut jobs, served_by) = runtime.block_on(list_all(&mut client, &states))?;
            if let Some(pattern) = &args.name {
                jobs.retain(|j| name_matches(pattern, &j.name));
            }
            match output {
                OutputFormat::Json => {
                    print_json(&Value::Array(jobs.iter().map(|j| status_json(j, Some(served_by))).collect()))
                }
                OutputFormat::Text if args.name.is_some() => print_table(&jobs, served_by),
                OutputFormat::Text => {
                    print_table(&jobs, served_by);
                    let mut inferences = Vec::new();
                    let mut page_token = String::new();
                    loop {
                        let request =
                            v1::ListInferencesRequest { page_token: page_token.clone(), ..Default::default() };
                        let page = runtime.block_on(client.call_inference(|mut c| {
                            let request = request.clone();
                            async move { c.list_inferences(request).await }
                        }))?;
                        inferences.extend(
                            page.inferences.into_iter().filter(|i| states.is_empty() || states.contains(&i.state)),
                        );
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        page_token = page.next_page_token;
                    }
                    super::infer::print_table(&inferences);
                }
            }
        }
    }
    Ok(())
}

/// Whether `name` matches `pattern`, whose `*` stands for any characters and `?` for one
/// (a shell's glob, without brackets).
fn name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer match: on a mismatch, the last `*` takes one more character.
    let (mut p, mut n, mut star): (usize, usize, Option<(usize, usize)>) = (0, 0, None);
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => (p, n) = (p + 1, n + 1),
            _ => match star {
                Some((at, taken)) => (p, n, star) = (at + 1, taken + 1, Some((at, taken + 1))),
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Pages through every job in `states` (all: empty; the server caps each page).
async fn list_all(client: &mut ApiClient, states: &[i32]) -> anyhow::Result<(Vec<v1::JobStatus>, u64)> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListJobsRequest { page_token: page_token.clone(), states: states.to_vec(), ..Default::default() };
        let page = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.list_jobs(request).await }
            })
            .await
            .map_err(anyhow::Error::from)?;
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok((jobs, page.served_by));
        }
        page_token = page.next_page_token;
    }
}

fn state_name(job: &v1::JobStatus) -> &'static str {
    v1::JobState::try_from(job.state).map_or("Unknown", job_state_name)
}

/// A job's event in JSON output (`since_unix_ms` only where it is known, see the proto).
pub fn event_json(e: &v1::JobEvent) -> Value {
    let mut event = json!({"at_unix_ms": e.at_unix_ms, "kind": e.kind, "message": e.message});
    if let Some(since) = e.since_unix_ms {
        event["since_unix_ms"] = json!(since);
    }
    event
}

/// The job's priority (its spec's; 0, the default, when the answer carries no spec).
fn priority(job: &v1::JobStatus) -> i32 {
    job.spec.as_ref().map_or(0, |s| s.priority)
}

/// The `status --output json` object (DESIGN §8 names these keys; scripts rely on them).
/// `served_by` is the node that answered a read; `null` after a write (`cancel`, `resume`),
/// whose answer does not name its node.
pub fn status_json(job: &v1::JobStatus, served_by: Option<u64>) -> Value {
    let metrics = job.metrics.unwrap_or_default();
    json!({
        "id": job.id,
        "name": job.name,
        "priority": priority(job),
        "state": state_name(job),
        "reason": job.reason,
        "step": job.step,
        "total_steps": job.total_steps,
        "world_size": job.world_size,
        "generation": job.generation,
        "recoveries": job.recoveries,
        "preemptions": job.preemptions,
        "failures": job.failures,
        "checkpoints": job.checkpoints,
        "steps_lost": job.steps_lost,
        "metrics": {
            "val_accuracy": metrics.val_accuracy,
            "val_loss": metrics.val_loss,
            "train_loss": metrics.train_loss,
            "samples_per_s": metrics.samples_per_s,
            "val_step": metrics.val_step,
        },
        "cost_usd": job.cost_usd,
        "lost_work_usd": job.lost_work_usd,
        "stall_ms_total": job.stall_ms_total,
        "last_stall_ms": job.last_stall_ms,
        "resume_peer_bytes": job.resume_peer_bytes,
        "resume_storage_bytes": job.resume_storage_bytes,
        "latest_checkpoint": job
            .latest_checkpoint
            .as_ref()
            .map(|c| json!({ "step": c.step, "uri": c.uri, "pending": c.pending })),
        "served_by": served_by,
        "submitted_at_unix_ms": job.submitted_at_unix_ms,
        "events": job.events.iter().map(event_json).collect::<Vec<_>>(),
        "handovers": job.handovers.iter().map(|h| json!({
            "leaving": h.leaving,
            "replacement": (!h.replacement.is_empty()).then_some(&h.replacement),
            "until_unix_ms": (h.until_unix_ms > 0).then_some(h.until_unix_ms),
        })).collect::<Vec<_>>(),
        "spares": job.spares,
        // The spec it runs, as `validate -o json` shows one (`--set` overrides included).
        "spec": job.spec.clone().and_then(|s| flotilla_proto::convert::spec_from_proto(s).ok()),
    })
}

/// Characters of a command job's command line `status` shows at most.
const COMMAND_SHOWN_MAX: usize = 120;

/// What a job trains, on one line (the fields a sweep varies): `mlp hidden = [256, 128] on DATA; adam lr
/// 0.003, batch 64 per worker, 6 epochs, seed 42`, or a command job's command line.
fn spec_text(spec: &flotilla_core::spec::JobSpec) -> String {
    use flotilla_core::spec::{OptimizerSpec, TrainLength};
    let (model, data) = match spec.built_in() {
        Ok(built_in) => built_in,
        Err(_) => {
            let command = spec.command().map(|r| r.command.join(" ")).unwrap_or_default();
            return match command.char_indices().nth(COMMAND_SHOWN_MAX) {
                Some((cut, _)) => format!("runs {} …", &command[..cut]),
                None => format!("runs {command}"),
            };
        }
    };
    let train = &spec.train;
    let optimizer = match train.optimizer {
        OptimizerSpec::Adam => "adam".to_string(),
        OptimizerSpec::Sgd { momentum } => format!("sgd (momentum {momentum})"),
    };
    let length = match train.length {
        TrainLength::Epochs(n) => format!("{n} epoch(s)"),
        TrainLength::Steps(n) => format!("{n} step(s)"),
    };
    let decay = if train.weight_decay > 0.0 { format!(", weight decay {}", train.weight_decay) } else { String::new() };
    let init = train.init_from.as_ref().map_or(String::new(), |r| format!(", from the weights of {r}"));
    let warmup = match train.warmup_steps {
        0 => String::new(),
        steps => format!("{steps} warm-up step(s)"),
    };
    let schedule = match (train.decays_over_length(), warmup.is_empty()) {
        (false, true) => String::new(),
        (false, false) => format!(" after {warmup}"),
        (true, true) => format!(" ({} to {})", train.lr_schedule.name(), train.min_learning_rate),
        (true, false) => format!(" ({} to {} after {warmup})", train.lr_schedule.name(), train.min_learning_rate),
    };
    let clip = train.clip_grad_norm.map_or(String::new(), |norm| format!(", gradient norm clipped to {norm}"));
    let patience = match train.patience {
        0 => String::new(),
        n => format!(", patience {n} validation(s) of {}", train.patience_metric.name()),
    };
    let keep = match (train.keep_best, train.patience) {
        (false, _) => String::new(),
        (true, 0) => format!(", keeps the best validated state by {}", train.patience_metric.name()),
        (true, _) => ", keeps the best validated state".to_string(),
    };
    let batch = match train.accumulate_batches {
        0 | 1 => format!("batch {} per worker", train.batch_size),
        n => format!("batch {} x {n} accumulated per worker", train.batch_size),
    };
    format!(
        "{model} on {}; {optimizer} lr {}{schedule}{decay}{clip}, {batch}, {length}{patience}{keep}, seed {}{init}",
        data.train, train.learning_rate, train.seed
    )
}

/// Bytes for a reader: `0 B`, `512 B`, `2.8 MB`, `1.2 GB` (decimal units).
fn bytes_text(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", bytes as f64 / 1e6),
        _ => format!("{:.1} GB", bytes as f64 / 1e9),
    }
}

/// Events shown by `status JOB` (the newest; `-o json` has all the coordinator keeps).
const EVENTS_SHOWN: usize = 20;

/// `flotilla status JOB` for a reader: where the job is, what preemptions cost it, its newest
/// checkpoint, then its latest events.
fn job_text(job: &v1::JobStatus, served_by: u64) -> String {
    let metrics = job.metrics.unwrap_or_default();
    let mut lines = vec![format!("{} {}: {}", job.id, job.name, state_name(job))];
    let mut line = |label: &str, value: String| lines.push(format!("  {label:<12} {value}"));
    let of_total = match job.total_steps {
        0 => String::new(),
        total => format!("/{total} ({:.0}%)", job.step as f64 * 100.0 / total as f64),
    };
    line("step", format!("{}{of_total}, generation {}, world {}", job.step, job.generation, job.world_size));
    let reason = reason_text(job);
    if !reason.is_empty() {
        line("reason", reason);
    }
    if let Some(spec) = job.spec.clone().and_then(|s| flotilla_proto::convert::spec_from_proto(s).ok()) {
        line("spec", spec_text(&spec));
    }
    let mut training = Vec::new();
    if let Some(loss) = metrics.train_loss {
        training.push(format!("loss {loss:.4}"));
    }
    if let Some(rate) = metrics.samples_per_s.filter(|r| *r > 0.0) {
        training.push(format!("{rate:.0} samples/s"));
    }
    if let Some(accuracy) = metrics.val_accuracy {
        training.push(format!("validation accuracy {accuracy:.4}"));
    }
    if let Some(loss) = metrics.val_loss {
        training.push(format!("validation loss {loss:.4}"));
    }
    if metrics.val_step > 0 && metrics.val_accuracy.is_some() {
        // While it trains: the newest validation's step; once it succeeded, that of the state
        // kept as its model (train.keep_best), when not its last.
        training.push(match job.state == v1::JobState::Succeeded as i32 {
            true => format!("of its model: the best validated state, step {}", metrics.val_step),
            false => format!("validated at step {}", metrics.val_step),
        });
    }
    if !training.is_empty() {
        line("metrics", training.join(", "));
    }
    line(
        "interrupted",
        format!(
            "{} preemption(s), {} recovery(ies), {} failure(s), {} step(s) lost; {} ms without a step in all (last {} ms)",
            job.preemptions, job.recoveries, job.failures, job.steps_lost, job.stall_ms_total, job.last_stall_ms
        ),
    );
    if job.resume_peer_bytes > 0 || job.resume_storage_bytes > 0 {
        line(
            "resumed from",
            format!(
                "{} peer to peer, {} from the store",
                bytes_text(job.resume_peer_bytes),
                bytes_text(job.resume_storage_bytes)
            ),
        );
    }
    let newest = job.latest_checkpoint.as_ref().map_or(String::new(), |c| {
        format!("; newest at step {}: {}{}", c.step, c.uri, if c.pending { " (being written)" } else { "" })
    });
    line("checkpoints", format!("{}{newest}", job.checkpoints));
    if let Some(resume) = resume_hint(job) {
        line("resume", resume);
    }
    let wanted = job.spec.as_ref().and_then(|s| s.capacity.as_ref()).map_or(0, |c| c.spares);
    if wanted > 0 && job.state == v1::JobState::Running as i32 {
        let which = match job.spares.as_slice() {
            [] => " (none free in the gang's pool yet)".to_string(),
            spares => format!(": {}", spares.join(", ")),
        };
        line("spares", format!("{} of {wanted}{which}", job.spares.len()));
    }
    line("cost", format!("${:.2} (work lost to interruptions ${:.2})", job.cost_usd, job.lost_work_usd));
    let submitted = flotilla_core::text::rfc3339_utc(job.submitted_at_unix_ms);
    line("submitted", format!("{submitted}, priority {}", priority(job)));
    let skipped = job.events.len().saturating_sub(EVENTS_SHOWN);
    if skipped > 0 {
        line("events", format!("{skipped} earlier not shown (-o json lists them)"));
    }
    for event in &job.events[skipped..] {
        let at = flotilla_core::text::rfc3339_utc(event.at_unix_ms);
        let time = at.split('T').nth(1).unwrap_or(&at).to_string();
        line("event", format!("{time} {}: {}", event.kind, event.message));
    }
    lines.push(format!("(served by coordinator node {served_by})"));
    lines.join("\n") + "\n"
}

/// How a Failed or Cancelled job goes on (`flotilla resume`), with the override a spent
/// budget needs; `None` for any other job.
fn resume_hint(job: &v1::JobStatus) -> Option<String> {
    let ended = [v1::JobState::Failed, v1::JobState::Cancelled].map(|s| s as i32);
    if !ended.contains(&job.state) {
        return None;
    }
    // The same test the coordinator's resume refuses by: the charge has reached the budget.
    let budget_usd = job.spec.as_ref().and_then(|s| s.capacity.as_ref()).and_then(|c| c.budget_usd);
    let spent = budget_usd.is_some_and(|budget| job.cost_usd >= budget);
    let budget = if spent { " --set capacity.budget_usd=N" } else { "" };
    let from = match job.latest_checkpoint.as_ref().filter(|c| c.step > 0) {
        Some(c) => format!("goes on from its checkpoint of step {}", c.step),
        None => "starts it again (no checkpoint was recorded)".to_string(),
    };
    Some(format!("`flotilla resume {}{budget}` {from}", job.id))
}

fn print_table(jobs: &[v1::JobStatus], served_by: u64) {
    println!("{:<10} {:<24} {:<12} {:>12} {:>6}  REASON", "ID", "NAME", "STATE", "STEP", "WORLD");
    for job in jobs {
        let steps =
            if job.total_steps > 0 { format!("{}/{}", job.step, job.total_steps) } else { job.step.to_string() };
        let reason = reason_text(job);
        println!(
            "{:<10} {:<24} {:<12} {:>12} {:>6}  {}",
            job.id,
            job.name,
            state_name(job),
            steps,
            job.world_size,
            reason
        );
    }
    println!("({} job(s), served by coordinator node {served_by})", jobs.len());
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The jobs to cancel (`job-7` or `7`; several: each is cancelled, those that cannot be are
    /// named, and the exit status is 1 if any could not).
    #[arg(required = true, num_args = 1..=CANCEL_JOBS_MAX)]
    pub jobs: Vec<String>,
    /// Why; shown in `status`.
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// Jobs one `flotilla cancel` takes at most.
const CANCEL_JOBS_MAX: usize = 1000;

/// Cancels each job in turn. One job prints its status (`-o json`: its object); several print
/// one line each (`-o json`: an array, with `{"id", "error"}` for a job not cancelled).
pub fn cancel(args: CancelArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let mut client = client(coordinator)?;
    let mut cancel_one = |id: &str| {
        let request = v1::CancelJobRequest { job_id: id.to_string(), reason: args.reason.clone() };
        runtime
            .block_on(client.call(|mut c| {
                let request = request.clone();
                async move { c.cancel_job(request).await }
            }))
            .map_err(anyhow::Error::from)
            .and_then(|r| r.job.context("the coordinator answered without a job"))
    };
    if let [id] = args.jobs.as_slice() {
        let job = cancel_one(id)?;
        match output {
            OutputFormat::Json => print_json(&status_json(&job, None)),
            OutputFormat::Text => println!("{} {}", job.id, state_name(&job)),
        }
        return Ok(());
    }
    each_job(
        &args.jobs,
        output,
        "cancelled",
        cancel_one,
        |job| status_json(job, None),
        |job| format!("{} {}", job.id, state_name(job)),
    )
}

/// Tries `one` on each of several jobs in turn: a success is printed (`-o json`: an array of
/// `json_of`, else a `text_of` line each); a refusal is named once on stderr (the
/// coordinator's refusals name the job already) and, in JSON, as `{"id", "error"}`; any
/// refusal ends with exit status 1 and the jobs not `done` (`cancel` and `resume` of several).
fn each_job<T>(
    ids: &[String],
    output: OutputFormat,
    done: &str,
    mut one: impl FnMut(&str) -> anyhow::Result<T>,
    json_of: impl Fn(&T) -> Value,
    text_of: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let (mut shown, mut refused) = (Vec::new(), Vec::new());
    for id in ids {
        match one(id) {
            Ok(answer) if output == OutputFormat::Json => shown.push(json_of(&answer)),
            Ok(answer) => println!("{}", text_of(&answer)),
            Err(e) => {
                let why = flotilla_core::text::error_chain(e.chain());
                if output == OutputFormat::Json {
                    shown.push(json!({ "id": id, "error": why }));
                }
                match why.contains(id.as_str()) {
                    true => eprintln!("error: {why}"),
                    false => eprintln!("error: {id}: {why}"),
                }
                refused.push(id.as_str());
            }
        }
    }
    if output == OutputFormat::Json {
        print_json(&Value::Array(shown));
    }
    if !refused.is_empty() {
        anyhow::bail!("{} of {} job(s) not {done}: {}", refused.len(), ids.len(), refused.join(", "));
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// The jobs to resume from their newest checkpoint (`job-7` or `7`; several: each is
    /// resumed with the same `--set`, those that cannot be are named, and the exit status is 1
    /// if any could not).
    #[arg(required = true, num_args = 1..=CANCEL_JOBS_MAX)]
    pub jobs: Vec<String>,
    /// Change a field of its spec for the rest of the run: `--set capacity.budget_usd=20`,
    /// `--set train.steps=5000` (repeatable; priority, train.epochs or train.steps, workers,
    /// capacity, checkpoint and output may change, not what the job trains).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub overrides: Vec<flotilla_core::spec::Override>,
    /// Follow the job until it ends, as `submit --follow` (exit status 1 unless it succeeds);
    /// one job only.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `flotilla resume`: a Failed or Cancelled job waits for workers again and resumes from its
/// newest checkpoint; `--set` applies to the spec it ran with (read from the coordinator).
pub fn resume(args: ResumeArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    if args.follow && args.jobs.len() > 1 {
        anyhow::bail!(
            "--follow follows one job; {} were named (`flotilla status JOB --follow` follows each)",
            args.jobs.len()
        );
    }
    let runtime = runtime()?;
    let _context = runtime.enter();
    let mut client = client(coordinator)?;
    if let [id] = args.jobs.as_slice() {
        let (job, from_step) = resume_one(&runtime, &mut client, id, &args.overrides)?;
        match output {
            OutputFormat::Json => print_json(&resumed_json(&job, from_step)),
            OutputFormat::Text => eprintln!("{}", resumed_text(&job, from_step)),
        }
        let followed = args.follow.then(|| follow_until_ctrl_c(&runtime, &mut client, &job.id));
        if output == OutputFormat::Text {
            // As `submit`: the job id alone on the last line of stdout.
            println!("{}", job.id);
        }
        return match followed {
            Some(followed) => succeeded(&followed?, &job.id),
            None => Ok(()),
        };
    }
    let resume = |id: &str| resume_one(&runtime, &mut client, id, &args.overrides);
    each_job(
        &args.jobs,
        output,
        "resumed",
        resume,
        |(job, from)| resumed_json(job, *from),
        |(job, from)| resumed_text(job, *from),
    )
}

/// `job-2 Recovering: resumes from step 1200`.
fn resumed_text(job: &v1::JobStatus, from_step: u64) -> String {
    let from = match from_step {
        0 => "the start (no checkpoint was recorded)".to_string(),
        step => format!("step {step}"),
    };
    format!("{} {}: resumes from {from}", job.id, state_name(job))
}

/// The job's status with `from_step`, as `resume -o json` prints it.
fn resumed_json(job: &v1::JobStatus, from_step: u64) -> Value {
    let mut shown = status_json(job, None);
    shown["from_step"] = json!(from_step);
    shown
}

/// Resumes `id` with `overrides` applied to the spec it ran with (read from the coordinator):
/// its status after the resume and the step it resumes from.
fn resume_one(
    runtime: &tokio::runtime::Runtime,
    client: &mut ApiClient,
    id: &str,
    overrides: &[flotilla_core::spec::Override],
) -> anyhow::Result<(v1::JobStatus, u64)> {
    let spec = match overrides.is_empty() {
        true => None,
        false => {
            let job = get_job(runtime, client, id)?.job.context("the coordinator answered without a job")?;
            let ran = job.spec.context("the coordinator answered without the job's spec")?;
            let ran = flotilla_proto::convert::spec_from_proto(ran).with_context(|| format!("{id}'s spec"))?;
            let changed = flotilla_core::spec::JobSpec::from_toml_str_with(&ran.to_toml(), overrides)
                .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
            Some(spec_to_proto(&changed))
        }
    };
    let request = v1::ResumeJobRequest { job_id: id.to_string(), spec };
    let response = runtime
        .block_on(client.call(|mut c| {
            let request = request.clone();
            async move { c.resume_job(request).await }
        }))
        .map_err(anyhow::Error::from)?;
    let job = response.job.context("the coordinator answered without a job")?;
    Ok((job, response.from_step))
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The job whose log to print.
    pub job: String,
    /// Keep printing new lines until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// The gang member (NODE_RANK) whose output to print; 0, worker 0, is the job's log.
    #[arg(long, default_value_t = 0)]
    pub node: u32,
}

pub fn logs(args: LogsArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let _context = runtime.enter();
    let mut client = client(coordinator)?;
    let request = v1::GetLogsRequest { job_id: args.job, follow: args.follow, from_offset: 0, node: args.node };
    runtime.block_on(async move {
        let mut stream = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.get_logs(request).await }
            })
            .await?;
        while let Some(chunk) = stream.message().await.map_err(flotilla_proto::ApiError::from)? {
            for line in chunk.lines {
                match output {
                    OutputFormat::Json => print_json(&json!({ "line": line })),
                    OutputFormat::Text => println!("{line}"),
                }
            }
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_spec_reads_as_one_line() {
        let built_in = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"x\"\nmodel = { kind = \"cnn\" }\ndata = { train = \"s3://bkt/d.csv\" }\nworkers = { min = 2 }\n\
             [train]\nsteps = 500\noptimizer = \"sgd\"\nlearning_rate = 0.05\nweight_decay = 0.0001\n",
        )
        .expect("valid");
        assert_eq!(
            spec_text(&built_in),
            "cnn channels = [16, 32] on s3://bkt/d.csv; sgd (momentum 0.9) lr 0.05, weight decay 0.0001, batch 64 per worker, \
             500 step(s), seed 42"
        );
        let scheduled = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"x\"\nmodel = { kind = \"mlp\", hidden = [8] }\ndata = { train = \"s3://bkt/d.csv\" }\n\
             workers = { min = 1 }\n[train]\nsteps = 500\nlr_schedule = \"cosine\"\nwarmup_steps = 50\n\
             min_learning_rate = 0.00001\nclip_grad_norm = 1.0\nvalidate_every_steps = 50\npatience = 4\n",
        )
        .expect("valid");
        assert_eq!(
            spec_text(&scheduled),
            "mlp hidden = [8] on s3://bkt/d.csv; adam lr 0.001 (cosine to 0.00001 after 50 warm-up step(s)), gradient \
             norm clipped to 1, batch 64 per worker, 500 step(s), patience 4 validation(s) of val_loss, seed 42"
        );
        let kept = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"x\"\nmodel = { kind = \"mlp\", hidden = [8] }\ndata = { train = \"s3://bkt/d.csv\" }\n\
             workers = { min = 1 }\n[train]\nsteps = 500\nvalidate_every_steps = 50\nkeep_best = true\n\
             patience_metric = \"val_accuracy\"\naccumulate_batches = 4\n",
        )
        .expect("valid");
        assert_eq!(
            spec_text(&kept),
            "mlp hidden = [8] on s3://bkt/d.csv; adam lr 0.001, batch 64 x 4 accumulated per worker, 500 step(s), \
             keeps the best validated state by val_accuracy, seed 42"
        );
        let long = "a".repeat(200);
        let command = flotilla_core::spec::JobSpec::from_toml_str(&format!(
            "name = \"c\"\nworkers = {{ min = 1 }}\n[run]\ncommand = [\"python\", \"{long}\"]\n"
        ))
        .expect("valid");
        let shown = spec_text(&command);
        assert!(shown.starts_with("runs python aaa") && shown.ends_with(" …"), "{shown}");
        assert_eq!(shown.chars().count(), "runs ".len() + COMMAND_SHOWN_MAX + " …".chars().count());
    }

    #[test]
    fn names_match_a_glob() {
        for (pattern, name) in [
            ("mnist-lr-*", "mnist-lr-0.001"),
            ("*", ""),
            ("*lr*", "mnist-lr-3"),
            ("m?ist", "mnist"),
            ("a*b*c", "axxbyyc"),
            ("a*bc", "abcbc"),
            ("exact", "exact"),
        ] {
            assert!(name_matches(pattern, name), "{pattern} matches {name}");
        }
        for (pattern, name) in
            [("mnist-lr-*", "mnist-mlp"), ("m?ist", "mnst"), ("a*b", "abc"), ("exact", "exact2"), ("?", "")]
        {
            assert!(!name_matches(pattern, name), "{pattern} does not match {name}");
        }
    }

    #[test]
    fn one_job_reads_as_a_block_with_its_handover_checkpoint_and_newest_events() {
        let events = (0..25u64)
            .map(|i| v1::JobEvent {
                at_unix_ms: 1_796_493_600_000 + i * 1000,
                kind: "gang".into(),
                message: format!("e{i}"),
                since_unix_ms: None,
            })
            .collect();
        let job = v1::JobStatus {
            id: "job-3".into(),
            name: "mnist-mlp".into(),
            state: v1::JobState::Running.into(),
            step: 3200,
            total_steps: 12800,
            world_size: 2,
            generation: 2,
            preemptions: 1,
            recoveries: 1,
            stall_ms_total: 1952,
            last_stall_ms: 1952,
            resume_storage_bytes: 5_643_990,
            checkpoints: 7,
            metrics: Some(v1::JobMetrics {
                train_loss: Some(0.25),
                samples_per_s: Some(5230.4),
                val_accuracy: Some(0.9125),
                val_step: 3000,
                ..Default::default()
            }),
            latest_checkpoint: Some(v1::CheckpointRef {
                step: 3150,
                uri: "file:///s/ckpt/3150".into(),
                pending: true,
                ..Default::default()
            }),
            handovers: vec![v1::HandoverStatus {
                leaving: "worker-1".into(),
                replacement: String::new(),
                until_unix_ms: 0,
            }],
            events,
            spec: Some(v1::JobSpec {
                capacity: Some(v1::CapacitySpec { spares: 2, ..Default::default() }),
                ..Default::default()
            }),
            spares: vec!["worker-4".into()],
            ..Default::default()
        };
        let text = job_text(&job, 1);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "job-3 mnist-mlp: Running");
        assert_eq!(lines[1], "  step         3200/12800 (25%), generation 2, world 2");
        assert_eq!(lines[2], "  reason       handing over: worker-1 -> ? (no deadline)");
        assert_eq!(
            lines[3],
            "  metrics      loss 0.2500, 5230 samples/s, validation accuracy 0.9125, validated at step 3000"
        );
        assert!(lines[4].ends_with("1 preemption(s), 1 recovery(ies), 0 failure(s), 0 step(s) lost; 1952 ms without a step in all (last 1952 ms)"));
        assert_eq!(lines[5], "  resumed from 0 B peer to peer, 5.6 MB from the store");
        assert_eq!(lines[6], "  checkpoints  7; newest at step 3150: file:///s/ckpt/3150 (being written)");
        assert_eq!(lines[7], "  spares       1 of 2: worker-4");
        // A succeeded job whose model is an earlier validated state (train.keep_best) names it.
        let kept = v1::JobStatus {
            state: v1::JobState::Succeeded.into(),
            step: 240,
            metrics: Some(v1::JobMetrics { val_accuracy: Some(0.95), val_step: 180, ..Default::default() }),
            ..Default::default()
        };
        let said = "  metrics      validation accuracy 0.9500, of its model: the best validated state, step 180\n";
        assert!(job_text(&kept, 1).contains(said), "{}", job_text(&kept, 1));
        assert!(text.contains("  events       5 earlier not shown (-o json lists them)\n"), "{text}");
        assert!(
            !text.contains(": e4\n") && text.contains("  event        ") && text.contains("Z gang: e5\n"),
            "{text}"
        );
        assert_eq!(*lines.last().expect("lines"), "(served by coordinator node 1)");
        assert!(!text.contains("  resume "), "a running job is not resumed: {text}");
    }

    /// A Failed or Cancelled job's text says how it goes on; a spent budget, with the raise.
    #[test]
    fn an_ended_job_says_how_to_resume_it() {
        let checkpoint = Some(v1::CheckpointRef { step: 1200, ..Default::default() });
        let mut job = v1::JobStatus {
            id: "job-2".into(),
            state: v1::JobState::Failed as i32,
            reason: "budget spent: 5.01 USD of capacity.budget_usd = 5.00; stopped at the checkpoint of step 1200"
                .into(),
            latest_checkpoint: checkpoint,
            cost_usd: 5.01,
            spec: Some(v1::JobSpec {
                capacity: Some(v1::CapacitySpec { budget_usd: Some(5.0), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let said = "`flotilla resume job-2 --set capacity.budget_usd=N` goes on from its checkpoint of step 1200";
        assert_eq!(resume_hint(&job).as_deref(), Some(said));
        assert!(job_text(&job, 1).contains(&format!("  resume       {said}\n")));
        job.state = v1::JobState::Cancelled as i32;
        job.reason = "cancelled by user".into();
        job.cost_usd = 4.2;
        job.latest_checkpoint = None;
        let said = "`flotilla resume job-2` starts it again (no checkpoint was recorded)";
        assert_eq!(resume_hint(&job).as_deref(), Some(said));
        job.state = v1::JobState::Succeeded as i32;
        assert_eq!(resume_hint(&job), None);
    }
}
