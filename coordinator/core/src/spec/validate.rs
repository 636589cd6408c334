//! Raw spec -> validated `JobSpec`: defaults, ranges, cross-field rules.
//!
//! Every check appends to one list instead of returning early, so a user fixes all problems
//! in one edit. Messages say the value, the allowed range and, where useful, the fix.

use super::raw::*;
use super::*;

/// Collects field errors while the spec is built.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_string(), message: message.into() });
    }

    /// An integer in `[min, max]`, or `default` when absent.
    fn int(&mut self, field: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let Some(v) = value else { return default };
        if (min..=max).contains(&v) {
            v
        } else {
            self.fail(field, format!("{v} is out of range; allowed: {min} to {max}"));
            default.clamp(min, max)
        }
    }

    /// A finite float in `(min, max]` (`min_inclusive` = false) or `[min, max]`.
    fn float(&mut self, field: &str, value: Option<f64>, default: f64, range: (f64, f64), min_inclusive: bool) -> f64 {
        let Some(v) = value else { return default };
        let (min, max) = range;
        let above_min = if min_inclusive { v >= min } else { v > min };
        if v.is_finite() && above_min && v <= max {
            v
        } else {
            let open = if min_inclusive { '[' } else { '(' };
            self.fail(field, format!("{v} is out of range; allowed: {open}{min}, {max}]"));
            default
        }
    }

    /// One of a field's named choices (`from_name` reads `allowed`), or `default` when absent.
    fn choice<T>(
        &mut self,
        field: &str,
        value: Option<&str>,
        default: T,
        from_name: fn(&str) -> Option<T>,
        allowed: &[&str],
    ) -> T {
        let Some(name) = value else { return default };
        from_name(name).unwrap_or_else(|| {
            self.fail(field, format!("`{name}` is not allowed; use one of {}", allowed.join(", ")));
            default
        })
    }

    fn required<T>(&mut self, field: &str, value: Option<T>, hint: &str) -> Option<T> {
        if value.is_none() {
            self.fail(field, format!("is required; {hint}"));
        }
        value
    }

    fn name(&mut self, field: &str, value: &str) {
        let ok = !value.is_empty()
            && value.len() <= NAME_LEN_MAX
            && value.as_bytes()[0].is_ascii_alphanumeric()
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            self.fail(
                field,
                format!(
                    "`{value}` is not a valid name; use 1 to {NAME_LEN_MAX} letters, digits, '-', '_' \
                     or '.', starting with a letter or digit"
                ),
            );
        }
    }
}

pub(super) fn validate(raw: RawJobSpec) -> Result<JobSpec, SpecError> {
    let mut c = Checker::default();
    let name = c.required("name", raw.name, "give the job a name, e.g. name = \"mnist-mlp\"");
    if let Some(name) = &name {
        c.name("name", name);
    }
    let name = name.unwrap_or_default();
    let priority = c.int("priority", raw.priority, 0, -PRIORITY_ABS_MAX, PRIORITY_ABS_MAX);
    let command_job = raw.run.is_some();
    let (model, data) = if command_job {
        // The program brings its own model, data and loop: built-in settings would be ignored.
        for (field, given) in
            [("model", raw.model.is_some()), ("data", raw.data.is_some()), ("train", raw.train.is_some())]
        {
            if given {
                c.fail(
                    field,
                    format!("a command job ([run]) runs your program, which decides its own {field}; remove [{field}]"),
                );
            }
        }
        (None, None)
    } else {
        (model(&mut c, raw.model), data(&mut c, raw.data))
    };
    let train = train(&mut c, raw.train.unwrap_or_default());
    let watched = train.patience > 0 || train.keep_best;
    if !watched && (train.patience_min_delta > 0.0 || train.patience_metric != PatienceMetric::ValLoss) {
        let field = if train.patience_min_delta > 0.0 { "train.patience_min_delta" } else { "train.patience_metric" };
        c.fail(
            field,
            "applies only with train.patience (how many validations without a better one end the job) or \
             train.keep_best (the best validated state is the job's model)",
        );
    }
    if train.min_learning_rate > train.learning_rate {
        c.fail(
            "train.min_learning_rate",
            format!("is above train.learning_rate ({}): the schedule decays to it from there", train.learning_rate),
        );
    }
    if train.min_learning_rate > 0.0 && !train.decays_over_length() {
        c.fail("train.min_learning_rate", "applies only to lr_schedule = \"linear\" or \"cosine\"");
    }
    if let TrainLength::Steps(steps) = train.length
        && train.warmup_steps >= steps
    {
        c.fail(
            "train.warmup_steps",
            format!("must be less than train.steps ({steps}): the warm-up would take the whole job"),
        );
    }
    for (field, set) in [
        ("train.stop_at_val_accuracy", train.stop_at_val_accuracy.is_some()),
        ("train.stop_at_val_loss", train.stop_at_val_loss.is_some()),
        ("train.patience", train.patience > 0),
        ("train.keep_best", train.keep_best),
    ] {
        if set && train.validate_every_steps == 0 {
            c.fail(field, "needs train.validate_every_steps: how often rank 0 evaluates the validation set");
        }
    }
    if train.validate_every_steps > 0
        && data.as_ref().is_some_and(|d| d.validation.is_none() && d.validation_fraction == 0.0)
    {
        c.fail(
            "train.validate_every_steps",
            "needs a validation set: set data.validation (a file) or data.validation_fraction (e.g. 0.1)",
        );
    }
    let workers = workers(&mut c, raw.workers);
    let run = raw.run.map(|r| run(&mut c, r, workers.map_or(0, |w| w.gpus)));
    let capacity = capacity(&mut c, raw.capacity.unwrap_or_default());
    let checkpoint = checkpoint(&mut c, raw.checkpoint.unwrap_or_default());
    let output = output(&mut c, raw.output.unwrap_or_default(), &name);

    let complete = run.is_some() || (model.is_some() && data.is_some());
    match (c.errors.is_empty() && complete, workers) {
        (true, Some(workers)) => Ok(JobSpec {
            name,
            priority: i32::try_from(priority).expect("priority was range-checked"),
            model,
            data,
            run,
            train,
            workers,
            capacity,
            checkpoint,
            output,
        }),
        _ => Err(SpecError::Invalid(c.errors)),
    }
}

fn model(c: &mut Checker, raw: Option<RawModel>) -> Option<ModelSpec> {
    let raw = c.required(
        "model",
        raw,
        "add a [model] table with kind = \"mlp\" or \"cnn\" (or a [run] table to run your own program)",
    )?;
    let kind = c.required("model.kind", raw.kind, "one of: mlp, cnn")?;
    let layers =
        |c: &mut Checker, field: &str, given: Option<Vec<i64>>, default: &[u32], max_len: usize, max_width: i64| {
            let Some(values) = given else { return default.to_vec() };
            if values.is_empty() || values.len() > max_len {
                c.fail(field, format!("has {} entries; allowed: 1 to {max_len}", values.len()));
            }
            let mut out = Vec::with_capacity(values.len());
            for (i, v) in values.into_iter().enumerate() {
                if (1..=max_width).contains(&v) {
                    out.push(u32::try_from(v).expect("width was range-checked"));
                } else {
                    c.fail(&format!("{field}[{i}]"), format!("{v} is out of range; allowed: 1 to {max_width}"));
                }
            }
            out
        };
    match kind.as_str() {
        "mlp" => {
            if raw.channels.is_some() {
                c.fail("model.channels", "applies only to kind = \"cnn\"; use model.hidden for an mlp");
            }
            let hidden = layers(c, "model.hidden", raw.hidden, &[256, 128], MLP_LAYERS_MAX, MLP_WIDTH_MAX);
            // What the spec alone decides (the input and output layers depend on the data; the
            // worker checks the whole count once it has loaded it).
            let between: u64 = hidden.windows(2).map(|w| u64::from(w[0]) * u64::from(w[1])).sum();
            if between > MODEL_PARAMETERS_MAX {
                c.fail(
                    "model.hidden",
                    format!(
                        "has {between} weights between its hidden layers alone; a model has at most \
                         {MODEL_PARAMETERS_MAX} parameters (4 GiB of weights): use narrower or fewer layers"
                    ),
                );
            }
            Some(ModelSpec::Mlp { hidden })
        }
        "cnn" => {
            if raw.hidden.is_some() {
                c.fail("model.hidden", "applies only to kind = \"mlp\"; use model.channels for a cnn");
            }
            let channels = layers(c, "model.channels", raw.channels, &[16, 32], CNN_BLOCKS_MAX, CNN_CHANNELS_MAX);
            Some(ModelSpec::Cnn { channels })
        }
        other => {
            c.fail("model.kind", format!("`{other}` is not a known model; allowed: {}", ModelSpec::KINDS.join(", ")));
            None
        }
    }
}

fn data(c: &mut Checker, raw: Option<RawData>) -> Option<DataSpec> {
    let raw = c.required("data", raw, "add a [data] table with train = \"path/to/train.csv\"")?;
    let train_text = c.required("data.train", raw.train, "a path, file://, s3:// or synthetic: URI")?;
    let parse = |c: &mut Checker, field: &str, text: &str| match text.parse::<DataUri>() {
        Ok(uri) => Some(uri),
        Err(e) => {
            c.fail(field, e.0);
            None
        }
    };
    let train = parse(c, "data.train", &train_text);
    let validation = raw.validation.as_deref().and_then(|t| parse(c, "data.validation", t));
    let format = match raw.format.as_deref() {
        Some("csv") => Some(DataFormat::Csv),
        Some("idx") => Some(DataFormat::Idx),
        Some("synthetic") => Some(DataFormat::Synthetic),
        Some(other) => {
            c.fail(
                "data.format",
                format!("`{other}` is not a known format; allowed: {}", DataFormat::NAMES.join(", ")),
            );
            None
        }
        None => None,
    };
    let train = train?;
    let implied = train.implied_format();
    let format = match (format, implied) {
        (Some(given), _) => {
            let synthetic_uri = implied == Some(DataFormat::Synthetic);
            if (given == DataFormat::Synthetic) != synthetic_uri {
                c.fail(
                    "data.format",
                    format!("is \"{given}\" but data.train is `{train}`; format = \"synthetic\" goes with synthetic: URIs, and only with them"),
                );
            }
            given
        }
        (None, Some(implied)) => implied,
        (None, None) => {
            c.fail("data.format", format!("cannot be inferred from `{train}`; set format = \"csv\" or \"idx\""));
            DataFormat::Csv
        }
    };
    if let Some(v) = &validation {
        let v_format = v.implied_format();
        if (v_format == Some(DataFormat::Synthetic)) != (format == DataFormat::Synthetic) {
            c.fail("data.validation", format!("`{v}` is not of the train data's format ({format})"));
        }
    }
    let fraction_default = if validation.is_some() { 0.0 } else { 0.2 };
    let validation_fraction = c.float(
        "data.validation_fraction",
        raw.validation_fraction,
        fraction_default,
        (0.0, VALIDATION_FRACTION_MAX),
        true,
    );
    if validation.is_some() && validation_fraction != 0.0 {
        c.fail("data.validation_fraction", "must be 0 (or absent) when data.validation names a separate set");
    }
    Some(DataSpec { train, validation, format, validation_fraction })
}

fn train(c: &mut Checker, raw: RawTrain) -> TrainSpec {
    let length = match (raw.epochs, raw.steps) {
        (Some(_), Some(_)) => {
            c.fail("train.epochs", "and train.steps are mutually exclusive; keep one");
            TrainLength::Epochs(1)
        }
        (None, Some(_)) => TrainLength::Steps(c.int("train.steps", raw.steps, 1, 1, STEPS_MAX) as u64),
        (epochs, None) => TrainLength::Epochs(c.int("train.epochs", epochs, 1, 1, EPOCHS_MAX) as u32),
    };
    let batch_size = c.int("train.batch_size", raw.batch_size, 64, 1, BATCH_SIZE_MAX) as u32;
    let optimizer = match raw.optimizer.as_deref().unwrap_or("adam") {
        "adam" => {
            if raw.momentum.is_some() {
                c.fail("train.momentum", "applies only to optimizer = \"sgd\" (adam keeps its own moments)");
            }
            OptimizerSpec::Adam
        }
        "sgd" => OptimizerSpec::Sgd { momentum: c.float("train.momentum", raw.momentum, 0.9, (0.0, 0.999), true) },
        other => {
            c.fail("train.optimizer", format!("`{other}` is not a known optimizer; allowed: sgd, adam"));
            OptimizerSpec::Adam
        }
    };
    let lr_default = match optimizer {
        OptimizerSpec::Adam => 0.001,
        OptimizerSpec::Sgd { .. } => 0.01,
    };
    TrainSpec {
        length,
        batch_size,
        accumulate_batches: c.int("train.accumulate_batches", raw.accumulate_batches, 1, 1, ACCUMULATE_BATCHES_MAX)
            as u32,
        optimizer,
        learning_rate: c.float("train.learning_rate", raw.learning_rate, lr_default, (0.0, LEARNING_RATE_MAX), false),
        weight_decay: c.float("train.weight_decay", raw.weight_decay, 0.0, (0.0, 0.999), true),
        seed: c.int("train.seed", raw.seed, 42, 0, i64::MAX) as u64,
        init_from: raw.init_from.inspect(|reference| model_reference(c, "train.init_from", reference)),
        validate_every_steps: c.int(
            "train.validate_every_steps",
            raw.validate_every_steps,
            0,
            0,
            VALIDATE_EVERY_STEPS_MAX,
        ) as u64,
        stop_at_val_accuracy: raw
            .stop_at_val_accuracy
            .map(|v| c.float("train.stop_at_val_accuracy", Some(v), v, (0.0, 1.0), false)),
        stop_at_val_loss: raw
            .stop_at_val_loss
            .map(|v| c.float("train.stop_at_val_loss", Some(v), v, (0.0, STOP_AT_VAL_LOSS_MAX), false)),
        lr_schedule: c.choice(
            "train.lr_schedule",
            raw.lr_schedule.as_deref(),
            LrSchedule::Constant,
            LrSchedule::from_name,
            &LrSchedule::NAMES,
        ),
        warmup_steps: c.int("train.warmup_steps", raw.warmup_steps, 0, 0, STEPS_MAX) as u64,
        min_learning_rate: c.float(
            "train.min_learning_rate",
            raw.min_learning_rate,
            0.0,
            (0.0, LEARNING_RATE_MAX),
            true,
        ),
        clip_grad_norm: raw
            .clip_grad_norm
            .map(|v| c.float("train.clip_grad_norm", Some(v), v, (0.0, CLIP_GRAD_NORM_MAX), false)),
        patience: c.int("train.patience", raw.patience, 0, 0, PATIENCE_MAX) as u32,
        patience_metric: c.choice(
            "train.patience_metric",
            raw.patience_metric.as_deref(),
            PatienceMetric::ValLoss,
            PatienceMetric::from_name,
            &PatienceMetric::NAMES,
        ),
        patience_min_delta: c.float(
            "train.patience_min_delta",
            raw.patience_min_delta,
            0.0,
            (0.0, STOP_AT_VAL_LOSS_MAX),
            true,
        ),
        keep_best: raw.keep_best.unwrap_or(false),
    }
}

/// A registered model's reference: `NAME`, `NAME@VERSION` or `NAME@ALIAS` (an alias's rules:
/// 1 to 63 of a-z, 0-9, `-`, `_`).
fn model_reference(c: &mut Checker, field: &str, reference: &str) {
    let (name, selector) = reference.split_once('@').map_or((reference, None), |(n, s)| (n, Some(s)));
    c.name(field, name);
    let selector_ok = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if let Some(selector) = selector.filter(|s| !selector_ok(s)) {
        c.fail(
            field,
            format!(
                "`{selector}` after '@' is neither a version nor an alias; write NAME, NAME@VERSION or NAME@ALIAS \
                 (e.g. mnist-mlp@3)"
            ),
        );
    }
}

fn workers(c: &mut Checker, raw: Option<RawWorkers>) -> Option<WorkersSpec> {
    let raw = c.required("workers", raw, "add a [workers] table, e.g. workers = { min = 2, max = 2 }")?;
    let min = c.int("workers.min", raw.min, 1, 1, WORKERS_MAX);
    let max = c.int("workers.max", raw.max, min, 1, WORKERS_MAX);
    if min > max {
        c.fail(
            "workers.min",
            format!("{min} is greater than workers.max = {max}; raise workers.max or lower workers.min"),
        );
    }
    let gpus = c.int("workers.gpus", raw.gpus, 0, 0, GPUS_PER_WORKER_MAX);
    Some(WorkersSpec { min: min as u32, max: max as u32, gpus: gpus as u32 })
}

fn capacity(c: &mut Checker, raw: RawCapacity) -> CapacitySpec {
    let instance_types = raw.instance_types.unwrap_or_default();
    if instance_types.len() > INSTANCE_TYPES_MAX {
        c.fail(
            "capacity.instance_types",
            format!("has {} entries; at most {INSTANCE_TYPES_MAX}", instance_types.len()),
        );
    }
    for (i, t) in instance_types.iter().enumerate() {
        let ok = (3..=64).contains(&t.len())
            && t.split_once('.').is_some_and(|(family, size)| !family.is_empty() && !size.is_empty())
            && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !ok {
            c.fail(
                &format!("capacity.instance_types[{i}]"),
                format!("`{t}` is not an instance type; expected FAMILY.SIZE such as \"g5.xlarge\""),
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in &instance_types {
        if !seen.insert(t) {
            c.fail("capacity.instance_types", format!("lists `{t}` twice"));
        }
    }
    let positive = |c: &mut Checker, field: &str, v: Option<f64>, max: f64| {
        v.map(|v| c.float(field, Some(v), max, (0.0, max), false))
    };
    CapacitySpec {
        spot: raw.spot.unwrap_or(true),
        on_demand_fallback: raw.on_demand_fallback.unwrap_or(true),
        instance_types,
        max_price_usd_per_hour: positive(
            c,
            "capacity.max_price_usd_per_hour",
            raw.max_price_usd_per_hour,
            PRICE_USD_PER_HOUR_MAX,
        ),
        budget_usd: positive(c, "capacity.budget_usd", raw.budget_usd, BUDGET_USD_MAX),
        deadline_h: positive(c, "capacity.deadline_h", raw.deadline_h, DEADLINE_H_MAX),
        mixed_types: raw.mixed_types.unwrap_or(false),
        max_failures: c.int("capacity.max_failures", raw.max_failures, 3, 0, MAX_FAILURES_MAX) as u32,
        spares: c.int("capacity.spares", raw.spares, 0, 0, SPARES_MAX) as u32,
    }
}

fn checkpoint(c: &mut Checker, raw: RawCheckpoint) -> CheckpointSpec {
    CheckpointSpec {
        every_steps: c.int("checkpoint.every_steps", raw.every_steps, 100, 1, CHECKPOINT_EVERY_STEPS_MAX) as u64,
        keep: c.int("checkpoint.keep", raw.keep, 3, 1, CHECKPOINT_KEEP_MAX) as u32,
    }
}

fn output(c: &mut Checker, raw: RawOutput, job_name: &str) -> OutputSpec {
    let raw_given = raw.register_as.is_some();
    let register_as = raw.register_as.unwrap_or_else(|| job_name.to_string());
    if raw_given || !job_name.is_empty() {
        c.name("output.register_as", &register_as);
    }
    OutputSpec { register_as }
}

fn run(c: &mut Checker, raw: RawRun, gpus: u32) -> RunSpec {
    use super::run::*;
    let given = raw.command.is_some();
    let command =
        c.required("run.command", raw.command, "the program and its arguments, e.g. [\"python\", \"train.py\"]");
    let command = command.unwrap_or_default();
    if given && (command.is_empty() || command.len() > COMMAND_ARGS_MAX) {
        c.fail("run.command", format!("has {} entries; allowed: 1 to {COMMAND_ARGS_MAX}", command.len()));
    }
    if command.first().is_some_and(|program| program.trim().is_empty()) {
        c.fail("run.command[0]", "is empty; name the program to run, e.g. \"python\"");
    }
    for (i, arg) in command.iter().enumerate() {
        if arg.len() > RUN_TEXT_LEN_MAX || arg.contains('\0') {
            c.fail(&format!("run.command[{i}]"), format!("must be at most {RUN_TEXT_LEN_MAX} bytes, without NUL"));
        }
    }
    if let Some(workdir) = &raw.workdir
        && (workdir.is_empty() || workdir.len() > RUN_TEXT_LEN_MAX || workdir.contains('\0'))
    {
        c.fail("run.workdir", format!("must be a folder path of 1 to {RUN_TEXT_LEN_MAX} bytes"));
    }
    let default_procs = i64::from(gpus.max(1));
    let procs = c.int("run.procs_per_worker", raw.procs_per_worker, default_procs, 1, PROCS_PER_WORKER_MAX);
    if gpus > 0 && procs > i64::from(gpus) {
        c.fail(
            "run.procs_per_worker",
            format!("{procs} is more than workers.gpus = {gpus}; run at most one process per GPU"),
        );
    }
    let notice_signal = c.choice(
        "run.notice_signal",
        raw.notice_signal.as_deref(),
        NoticeSignal::Term,
        NoticeSignal::from_name,
        &NoticeSignal::NAMES,
    );
    let env = raw.env.unwrap_or_default();
    if env.len() > ENV_VARS_MAX {
        c.fail("run.env", format!("has {} variables; at most {ENV_VARS_MAX}", env.len()));
    }
    for (name, value) in &env {
        let field = format!("run.env.{name}");
        if !is_env_name(name) {
            c.fail(&field, format!("`{name}` is not a variable name; use letters, digits and '_' (at most {ENV_NAME_LEN_MAX}), not starting with a digit"));
        } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with(RESERVED_ENV_PREFIX) {
            c.fail(&field, "is set by Flotilla on every process (the torchrun contract); remove it");
        }
        if value.len() > RUN_TEXT_LEN_MAX || value.contains('\0') {
            c.fail(&field, format!("the value must be at most {RUN_TEXT_LEN_MAX} bytes, without NUL"));
        }
    }
    RunSpec { command, workdir: raw.workdir, procs_per_worker: procs as u32, notice_signal, env }
}
