//! Table and property tests of the spec validator: every rejected case names its field.

use proptest::prelude::*;

use super::*;

const MINIMAL: &str = r#"
name = "t"
model = { kind = "mlp" }
data = { train = "data/x.csv" }
workers = { min = 1 }
"#;

/// The DESIGN §3 example, verbatim apart from the data path.
const FULL: &str = r#"
name = "mnist-mlp"
priority = 0

[model]
kind = "mlp"
hidden = [256, 128]

[data]
train = "data/mnist_5k.csv.gz"
format = "csv"
validation_fraction = 0.2

[train]
epochs = 3
batch_size = 64
optimizer = "adam"
learning_rate = 0.001
seed = 42

[workers]
min = 2
max = 2
gpus = 0

[capacity]
spot = true
instance_types = ["g5.xlarge", "g4dn.xlarge"]
max_price_usd_per_hour = 1.5
budget_usd = 50.0
max_failures = 3

[checkpoint]
every_steps = 100
keep = 3

[output]
register_as = "mnist-mlp"
"#;

/// `MINIMAL` with one line replaced or added: `(table, key = value)`.
fn with(line: &str) -> String {
    format!("{MINIMAL}\n{line}\n")
}

fn invalid_fields(text: &str) -> Vec<String> {
    match JobSpec::from_toml_str(text) {
        Ok(spec) => panic!("accepted but should not be:\n{text}\n=> {spec:?}"),
        Err(e) => e.fields().into_iter().map(str::to_string).collect(),
    }
}

#[test]
fn the_design_example_parses_with_its_values() {
    let spec = JobSpec::from_toml_str(FULL).expect("the DESIGN example is valid");
    assert_eq!(spec.name, "mnist-mlp");
    assert_eq!(spec.model, Some(ModelSpec::Mlp { hidden: vec![256, 128] }));
    assert_eq!(spec.built_in().expect("built in").1.format, DataFormat::Csv);
    assert_eq!(spec.train.length, TrainLength::Epochs(3));
    assert_eq!(spec.workers, WorkersSpec { min: 2, max: 2, gpus: 0 });
    assert_eq!(spec.capacity.instance_types, ["g5.xlarge", "g4dn.xlarge"]);
    assert_eq!(spec.capacity.budget_usd, Some(50.0));
    assert_eq!(spec.checkpoint, CheckpointSpec { every_steps: 100, keep: 3 });
}

#[test]
fn defaults_are_filled_in() {
    let spec = JobSpec::from_toml_str(MINIMAL).expect("minimal spec is valid");
    assert_eq!(spec.priority, 0);
    assert_eq!(spec.model, Some(ModelSpec::Mlp { hidden: vec![256, 128] }));
    assert_eq!(spec.built_in().expect("built in").1.validation_fraction, 0.2);
    assert_eq!(spec.train.length, TrainLength::Epochs(1));
    assert_eq!(spec.train.batch_size, 64);
    assert_eq!(spec.train.optimizer, OptimizerSpec::Adam);
    assert_eq!(spec.train.learning_rate, 0.001);
    assert_eq!(spec.workers, WorkersSpec { min: 1, max: 1, gpus: 0 });
    assert!(spec.capacity.spot && spec.capacity.on_demand_fallback);
    assert!(!spec.capacity.mixed_types && spec.capacity.deadline_h.is_none());
    let mixed = JobSpec::from_toml_str(&with("[capacity]\nmixed_types = true")).expect("mixed");
    assert!(mixed.capacity.mixed_types);
    assert_eq!(JobSpec::from_toml_str(&mixed.to_toml()), Ok(mixed));
    assert_eq!(invalid_fields(&with("[capacity]\nmixed_types = 1")), Vec::<String>::new(), "a type error");
    assert_eq!(spec.capacity.max_failures, 3);
    assert_eq!(spec.output.register_as, "t");
    let sgd = JobSpec::from_toml_str(&with("[train]\noptimizer = \"sgd\"")).expect("sgd");
    assert_eq!(sgd.train.optimizer, OptimizerSpec::Sgd { momentum: 0.9 });
    assert_eq!(sgd.train.learning_rate, 0.01);
    let cnn = JobSpec::from_toml_str(&MINIMAL.replace("kind = \"mlp\"", "kind = \"cnn\"")).expect("cnn");
    assert_eq!(cnn.model, Some(ModelSpec::Cnn { channels: vec![16, 32] }));
}

#[test]
fn canonical_toml_parses_back_to_the_same_spec() {
    for text in [MINIMAL, FULL] {
        let spec = JobSpec::from_toml_str(text).expect("valid");
        let again = JobSpec::from_toml_str(&spec.to_toml()).expect("canonical form is valid");
        assert_eq!(spec, again, "canonical:\n{}", spec.to_toml());
        let json = serde_json::to_string(&spec).expect("json");
        assert_eq!(serde_json::from_str::<JobSpec>(&json).expect("json back"), spec);
    }
}

/// Every rejected case from the foundation issue, and the field its error must name.
#[test]
fn every_rejected_case_names_its_field() {
    let cases: &[(&str, String, &[&str])] = &[
        ("min > max", with("workers = { min = 4, max = 2 }").replace("workers = { min = 1 }\n", ""), &["workers.min"]),
        ("batch size 0", with("[train]\nbatch_size = 0"), &["train.batch_size"]),
        ("batch size negative", with("[train]\nbatch_size = -8"), &["train.batch_size"]),
        ("batch size too big", with("[train]\nbatch_size = 65537"), &["train.batch_size"]),
        ("negative price", with("[capacity]\nmax_price_usd_per_hour = -1.0"), &["capacity.max_price_usd_per_hour"]),
        ("zero price", with("[capacity]\nmax_price_usd_per_hour = 0.0"), &["capacity.max_price_usd_per_hour"]),
        ("nan price", with("[capacity]\nmax_price_usd_per_hour = nan"), &["capacity.max_price_usd_per_hour"]),
        ("negative budget", with("[capacity]\nbudget_usd = -5.0"), &["capacity.budget_usd"]),
        ("infinite budget", with("[capacity]\nbudget_usd = inf"), &["capacity.budget_usd"]),
        ("unknown model", MINIMAL.replace("\"mlp\"", "\"resnet\""), &["model.kind"]),
        ("bad scheme gs", MINIMAL.replace("data/x.csv", "gs://b/x.csv"), &["data.train"]),
        ("bad scheme http", MINIMAL.replace("data/x.csv", "https://x/y.csv"), &["data.train"]),
        ("relative file uri", MINIMAL.replace("data/x.csv", "file://x.csv"), &["data.train"]),
        ("unknown synthetic", MINIMAL.replace("data/x.csv", "synthetic:spiral"), &["data.train"]),
        ("empty name", MINIMAL.replace("name = \"t\"", "name = \"\""), &["name"]),
        ("name with space", MINIMAL.replace("name = \"t\"", "name = \"my job\""), &["name"]),
        ("name too long", MINIMAL.replace("name = \"t\"", &format!("name = \"{}\"", "a".repeat(64))), &["name"]),
        ("missing name", MINIMAL.replace("name = \"t\"", ""), &["name"]),
        ("missing model", MINIMAL.replace("model = { kind = \"mlp\" }", ""), &["model"]),
        ("missing model kind", MINIMAL.replace("{ kind = \"mlp\" }", "{ hidden = [4] }"), &["model.kind"]),
        ("missing data", MINIMAL.replace("data = { train = \"data/x.csv\" }", ""), &["data"]),
        ("missing data.train", MINIMAL.replace("train = \"data/x.csv\"", "format = \"csv\""), &["data.train"]),
        ("missing workers", MINIMAL.replace("workers = { min = 1 }", ""), &["workers"]),
        ("workers.min 0", MINIMAL.replace("min = 1", "min = 0"), &["workers.min"]),
        ("workers.max too big", MINIMAL.replace("min = 1", "min = 1, max = 5000"), &["workers.max"]),
        ("gpus negative", MINIMAL.replace("min = 1", "min = 1, gpus = -1"), &["workers.gpus"]),
        ("priority out of range", with("priority = 5000"), &["priority"]),
        ("init_from bad name", with("[train]\ninit_from = \"my model\""), &["train.init_from"]),
        ("init_from bad selector", with("[train]\ninit_from = \"base@Prod!\""), &["train.init_from"]),
        ("init_from empty selector", with("[train]\ninit_from = \"base@\""), &["train.init_from"]),
        (
            "validate_every_steps without a validation set",
            with("[train]\nvalidate_every_steps = 50")
                .replace("train = \"data/x.csv\" }", "train = \"data/x.csv\", validation_fraction = 0.0 }"),
            &["train.validate_every_steps"],
        ),
        ("validate_every_steps negative", with("[train]\nvalidate_every_steps = -1"), &["train.validate_every_steps"]),
        ("an unknown schedule", with("[train]\nlr_schedule = \"step\""), &["train.lr_schedule"]),
        ("a negative warm-up", with("[train]\nwarmup_steps = -1"), &["train.warmup_steps"]),
        ("a warm-up as long as the job", with("[train]\nsteps = 100\nwarmup_steps = 100"), &["train.warmup_steps"]),
        (
            "a floor above the learning rate",
            with("[train]\nlr_schedule = \"cosine\"\nlearning_rate = 0.01\nmin_learning_rate = 0.02"),
            &["train.min_learning_rate"],
        ),
        ("a floor without a decay", with("[train]\nmin_learning_rate = 0.0001"), &["train.min_learning_rate"]),
        ("patience without validation", with("[train]\npatience = 3"), &["train.patience"]),
        (
            "an unknown patience metric",
            with("[train]\nvalidate_every_steps = 10\npatience = 3\npatience_metric = \"accuracy\""),
            &["train.patience_metric"],
        ),
        ("a min delta without patience", with("[train]\npatience_min_delta = 0.01"), &["train.patience_min_delta"]),
        ("patience too long", with("[train]\nvalidate_every_steps = 10\npatience = 10001"), &["train.patience"]),
        ("keep_best without validation", with("[train]\nkeep_best = true"), &["train.keep_best"]),
        ("no batches accumulated", with("[train]\naccumulate_batches = 0"), &["train.accumulate_batches"]),
        ("too many batches accumulated", with("[train]\naccumulate_batches = 1025"), &["train.accumulate_batches"]),
        ("a clip of 0", with("[train]\nclip_grad_norm = 0.0"), &["train.clip_grad_norm"]),
        ("a clip of nan", with("[train]\nclip_grad_norm = nan"), &["train.clip_grad_norm"]),
        ("a target without validation", with("[train]\nstop_at_val_accuracy = 0.9"), &["train.stop_at_val_accuracy"]),
        ("a loss target without validation", with("[train]\nstop_at_val_loss = 0.2"), &["train.stop_at_val_loss"]),
        (
            "an accuracy target above 1",
            with("[train]\nvalidate_every_steps = 10\nstop_at_val_accuracy = 1.5"),
            &["train.stop_at_val_accuracy"],
        ),
        (
            "a loss target of 0",
            with("[train]\nvalidate_every_steps = 10\nstop_at_val_loss = 0.0"),
            &["train.stop_at_val_loss"],
        ),
        ("hidden empty", MINIMAL.replace("{ kind = \"mlp\" }", "{ kind = \"mlp\", hidden = [] }"), &["model.hidden"]),
        (
            "hidden zero width",
            MINIMAL.replace("{ kind = \"mlp\" }", "{ kind = \"mlp\", hidden = [8, 0] }"),
            &["model.hidden[1]"],
        ),
        (
            "channels on mlp",
            MINIMAL.replace("{ kind = \"mlp\" }", "{ kind = \"mlp\", channels = [8] }"),
            &["model.channels"],
        ),
        ("hidden on cnn", MINIMAL.replace("{ kind = \"mlp\" }", "{ kind = \"cnn\", hidden = [8] }"), &["model.hidden"]),
        (
            "too many cnn blocks",
            MINIMAL.replace("{ kind = \"mlp\" }", "{ kind = \"cnn\", channels = [1,2,3,4,5] }"),
            &["model.channels"],
        ),
        (
            "unknown format",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"data/x.csv\", format = \"parquet\""),
            &["data.format"],
        ),
        ("format not inferable", MINIMAL.replace("data/x.csv", "data/x.bin"), &["data.format"]),
        (
            "synthetic format on a file",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"data/x.csv\", format = \"synthetic\""),
            &["data.format"],
        ),
        (
            "csv format on synthetic",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"synthetic:blobs\", format = \"csv\""),
            &["data.format"],
        ),
        (
            "validation fraction 1",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"data/x.csv\", validation_fraction = 1.0"),
            &["data.validation_fraction"],
        ),
        (
            "validation fraction negative",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"data/x.csv\", validation_fraction = -0.1"),
            &["data.validation_fraction"],
        ),
        (
            "validation set and fraction",
            MINIMAL.replace(
                "train = \"data/x.csv\"",
                "train = \"a.csv\", validation = \"b.csv\", validation_fraction = 0.2",
            ),
            &["data.validation_fraction"],
        ),
        (
            "validation of another format",
            MINIMAL.replace("train = \"data/x.csv\"", "train = \"a.csv\", validation = \"synthetic:blobs\""),
            &["data.validation"],
        ),
        ("epochs and steps", with("[train]\nepochs = 1\nsteps = 10"), &["train.epochs"]),
        ("epochs 0", with("[train]\nepochs = 0"), &["train.epochs"]),
        ("steps 0", with("[train]\nsteps = 0"), &["train.steps"]),
        ("unknown optimizer", with("[train]\noptimizer = \"lion\""), &["train.optimizer"]),
        ("learning rate 0", with("[train]\nlearning_rate = 0.0"), &["train.learning_rate"]),
        ("learning rate huge", with("[train]\nlearning_rate = 11.0"), &["train.learning_rate"]),
        ("momentum with adam", with("[train]\nmomentum = 0.9"), &["train.momentum"]),
        ("momentum 1", with("[train]\noptimizer = \"sgd\"\nmomentum = 1.0"), &["train.momentum"]),
        ("negative seed", with("[train]\nseed = -1"), &["train.seed"]),
        ("bad instance type", with("[capacity]\ninstance_types = [\"G5 XL\"]"), &["capacity.instance_types[0]"]),
        (
            "duplicate instance type",
            with("[capacity]\ninstance_types = [\"g5.xlarge\", \"g5.xlarge\"]"),
            &["capacity.instance_types"],
        ),
        ("negative max_failures", with("[capacity]\nmax_failures = -1"), &["capacity.max_failures"]),
        ("checkpoint every 0", with("[checkpoint]\nevery_steps = 0"), &["checkpoint.every_steps"]),
        ("checkpoint keep 0", with("[checkpoint]\nkeep = 0"), &["checkpoint.keep"]),
        ("bad register_as", with("[output]\nregister_as = \"a/b\""), &["output.register_as"]),
    ];
    for (what, text, expected) in cases {
        let fields = invalid_fields(text);
        for field in *expected {
            assert!(fields.iter().any(|f| f == field), "{what}: expected an error on {field}, got {fields:?}");
        }
        let message = JobSpec::from_toml_str(text).expect_err(what).to_string();
        assert!(message.contains(expected[0]), "{what}: message does not name the field: {message}");
    }
}

/// A validation reaches a target when its accuracy is at least `stop_at_val_accuracy` or its
/// loss at most `stop_at_val_loss`, named with the value.
#[test]
fn validation_targets_are_reached_at_or_beyond_them() {
    let spec =
        JobSpec::from_toml_str(&with("[train]\nvalidate_every_steps = 10\nstop_at_val_accuracy = 0.9")).expect("valid");
    assert_eq!(
        spec.train.target_reached(0.9, 1.0).as_deref(),
        Some("train.stop_at_val_accuracy = 0.9 (val_accuracy 0.9000)")
    );
    assert_eq!(spec.train.target_reached(0.8999, 0.0), None, "no loss target");
    let spec =
        JobSpec::from_toml_str(&with("[train]\nvalidate_every_steps = 10\nstop_at_val_loss = 0.25")).expect("valid");
    assert_eq!(
        spec.train.target_reached(0.1, 0.25).as_deref(),
        Some("train.stop_at_val_loss = 0.25 (val_loss 0.2500)")
    );
    assert_eq!(spec.train.target_reached(1.0, 0.26), None, "no accuracy target");
    assert_eq!(JobSpec::from_toml_str(MINIMAL).expect("valid").train.target_reached(1.0, 0.0), None);
    assert!(spec.to_toml().contains("stop_at_val_loss = 0.25"), "{}", spec.to_toml());
}

/// The warm-up rises linearly to the learning rate; linear and cosine then decay towards the
/// floor without reaching it; constant without warm-up is the learning rate exactly.
#[test]
fn learning_rate_schedules_warm_up_then_decay_towards_the_floor() {
    let spec =
        |lines: &str| JobSpec::from_toml_str(&with(&format!("[train]\nsteps = 110\n{lines}"))).expect("valid").train;
    let constant = spec("learning_rate = 0.1");
    assert!((1..=110).all(|t| constant.learning_rate_at(t, 110) == 0.1), "exactly the rate");
    let warm = spec("learning_rate = 0.1\nwarmup_steps = 10");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(warm.learning_rate_at(1, 110), 0.01) && close(warm.learning_rate_at(5, 110), 0.05));
    assert_eq!(warm.learning_rate_at(10, 110), 0.1, "the warm-up's last step has the full rate");
    assert_eq!(warm.learning_rate_at(11, 110), 0.1, "constant after it");
    let cosine = spec("learning_rate = 0.1\nwarmup_steps = 10\nlr_schedule = \"cosine\"\nmin_learning_rate = 0.001");
    assert_eq!(cosine.learning_rate_at(10, 110), 0.1);
    assert_eq!(cosine.learning_rate_at(11, 110), 0.1, "the decay starts from the rate");
    assert!(close(cosine.learning_rate_at(61, 110), 0.001 + 0.099 * 0.5), "halfway: the midpoint");
    let last = cosine.learning_rate_at(110, 110);
    assert!(last > 0.001 && last < 0.0011, "the last step is just above the floor: {last}");
    let rates: Vec<f64> = (11..=110).map(|t| cosine.learning_rate_at(t, 110)).collect();
    assert!(rates.windows(2).all(|w| w[1] < w[0]), "decreasing");
    let linear = spec("learning_rate = 0.1\nlr_schedule = \"linear\"");
    assert!(close(linear.learning_rate_at(1, 110), 0.1));
    assert!(close(linear.learning_rate_at(56, 110), 0.05), "{}", linear.learning_rate_at(56, 110));
    assert!(close(linear.learning_rate_at(110, 110), 0.1 / 110.0), "one step's worth above 0");
    assert!(close(linear.learning_rate_at(500, 110), 0.0), "past the end: the floor, never below");
    assert!(linear.decays_over_length() && !warm.decays_over_length());
    let text = cosine.clone();
    let again =
        JobSpec::from_toml_str(&JobSpec { train: text, ..JobSpec::from_toml_str(MINIMAL).expect("valid") }.to_toml())
            .expect("the canonical form is valid")
            .train;
    assert_eq!(again, cosine, "the canonical TOML keeps the schedule");
    assert_eq!(LrSchedule::from_name("cosine"), Some(LrSchedule::Cosine));
}

/// Patience watches val_loss (lower is better) or val_accuracy (higher), beyond a margin.
#[test]
fn patience_counts_an_improvement_beyond_its_margin() {
    let spec = JobSpec::from_toml_str(&with(
        "[train]\nvalidate_every_steps = 10\npatience = 3\npatience_metric = \"val_accuracy\"\npatience_min_delta = 0.01",
    ))
    .expect("valid");
    let metric = spec.train.patience_metric;
    assert_eq!((spec.train.patience, metric.of(0.9, 0.3)), (3, 0.9));
    assert!(metric.improves(0.92, 0.9, 0.01) && !metric.improves(0.905, 0.9, 0.01));
    assert!(PatienceMetric::ValLoss.improves(0.2, 0.3, 0.0) && !PatienceMetric::ValLoss.improves(0.3, 0.3, 0.0));
    assert!(spec.to_toml().contains("patience_metric = \"val_accuracy\""), "{}", spec.to_toml());
    assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).expect("canonical"), spec);
}

/// `train.accumulate_batches` multiplies the samples of a worker's step, and survives the
/// canonical TOML (1, none, is left out of it).
#[test]
fn accumulated_batches_make_a_step_larger() {
    let spec = JobSpec::from_toml_str(&with("[train]\nbatch_size = 32\naccumulate_batches = 4")).expect("valid");
    assert_eq!((spec.train.accumulate_batches, spec.train.samples_per_worker_step()), (4, 128));
    assert!(spec.to_toml().contains("accumulate_batches = 4"), "{}", spec.to_toml());
    assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).expect("canonical"), spec);
    let plain = JobSpec::from_toml_str(&with("[train]\nbatch_size = 32")).expect("valid");
    assert_eq!((plain.train.accumulate_batches, plain.train.samples_per_worker_step()), (1, 32));
    assert!(!plain.to_toml().contains("accumulate_batches"), "{}", plain.to_toml());
}

/// `train.keep_best` watches `patience_metric` with or without patience, and survives the
/// canonical TOML.
#[test]
fn keep_best_watches_the_patience_metric_without_patience() {
    let spec = JobSpec::from_toml_str(&with(
        "[train]\nvalidate_every_steps = 10\nkeep_best = true\npatience_metric = \"val_accuracy\"",
    ))
    .expect("valid");
    assert!(spec.train.keep_best && spec.train.patience == 0);
    assert_eq!(spec.train.patience_metric, PatienceMetric::ValAccuracy);
    assert!(spec.to_toml().contains("keep_best = true"), "{}", spec.to_toml());
    assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).expect("canonical"), spec);
}

/// `train.init_from` takes a registered model as `NAME`, `NAME@VERSION` or `NAME@ALIAS`, and
/// survives the canonical TOML.
#[test]
fn init_from_names_a_registered_model() {
    for reference in ["base", "base@3", "base@prod", "mnist-mlp.v2@canary_1"] {
        let spec = JobSpec::from_toml_str(&with(&format!("[train]\ninit_from = \"{reference}\""))).expect(reference);
        assert_eq!(spec.train.init_from.as_deref(), Some(reference));
        assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).expect("canonical"), spec);
    }
    let message = JobSpec::from_toml_str(&with("[train]\ninit_from = \"base@Prod\"")).expect_err("alias").to_string();
    assert!(message.contains("`Prod` after '@' is neither a version nor an alias"), "{message}");
}

#[test]
fn the_min_max_message_names_both_fields_and_the_fix() {
    let text = MINIMAL.replace("workers = { min = 1 }", "workers = { min = 4, max = 2 }");
    let message = JobSpec::from_toml_str(&text).expect_err("min > max").to_string();
    assert!(message.contains("workers.min") && message.contains("workers.max"), "{message}");
    assert!(message.contains('4') && message.contains('2'), "{message}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"
        name = "bad name"
        model = { kind = "transformer" }
        data = { train = "ftp://x/y" }
        workers = { min = 0 }
        train = { batch_size = 0 }
    "#;
    let fields = invalid_fields(text);
    for field in ["name", "model.kind", "data.train", "workers.min", "train.batch_size"] {
        assert!(fields.iter().any(|f| f == field), "missing {field} in {fields:?}");
    }
}

#[test]
fn syntax_errors_and_unknown_fields_are_refused_with_the_line() {
    let cases = [
        ("unknown top-level field", with("colour = \"red\""), "colour"),
        ("unknown nested field", MINIMAL.replace("min = 1", "min = 1, minimum = 2"), "minimum"),
        ("misspelled table", with("[trian]\nepochs = 1"), "trian"),
        ("wrong type", with("[train]\nbatch_size = \"big\""), "batch_size"),
        ("not toml", "name = ".to_string(), "line 1"),
    ];
    for (what, text, needle) in cases {
        match JobSpec::from_toml_str(&text) {
            Err(SpecError::Syntax(message)) => assert!(message.contains(needle), "{what}: {message}"),
            other => panic!("{what}: expected a syntax error, got {other:?}"),
        }
    }
}

#[test]
fn oversized_specs_are_refused_before_parsing() {
    let text = format!("{MINIMAL}\n#{}\n", "x".repeat(SPEC_LEN_MAX_BYTES));
    assert_eq!(invalid_fields(&text), ["(file)"]);
}

#[test]
fn relative_paths_are_resolved_and_reported() {
    let mut spec = JobSpec::from_toml_str(MINIMAL).expect("valid");
    assert_eq!(spec.unresolved_paths().len(), 1);
    spec.resolve_relative_paths("/srv/jobs");
    assert_eq!(spec.built_in().expect("built in").1.train.to_string(), "file:///srv/jobs/data/x.csv");
    assert!(spec.unresolved_paths().is_empty());
    assert_eq!(spec.clone().validated().expect("still valid"), spec);
}

const COMMAND: &str = r#"
name = "ddp"
workers = { min = 2, gpus = 2 }

[run]
command = ["python", "train.py", "--lr", "0.1"]
workdir = "."
notice_signal = "SIGUSR1"
env = { OMP_NUM_THREADS = "1" }
"#;

#[test]
fn command_jobs_parse_with_defaults_and_round_trip() {
    let spec = JobSpec::from_toml_str(COMMAND).expect("valid command job");
    let run = spec.command().expect("a command job");
    assert_eq!(run.command, ["python", "train.py", "--lr", "0.1"]);
    assert_eq!(run.procs_per_worker, 2, "one process per GPU by default");
    assert_eq!(run.notice_signal, NoticeSignal::Usr1);
    assert_eq!(run.env.get("OMP_NUM_THREADS").map(String::as_str), Some("1"));
    assert!(spec.built_in().is_err() && spec.model.is_none() && spec.data.is_none());
    assert!(!spec.to_toml().contains("[train]"), "{}", spec.to_toml());
    assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).expect("canonical form"), spec);
    let cpu =
        JobSpec::from_toml_str("name = \"c\"\nworkers = { min = 1 }\n[run]\ncommand = [\"true\"]\n").expect("valid");
    assert_eq!(cpu.command().map(|r| (r.procs_per_worker, r.notice_signal)), Some((1, NoticeSignal::Term)));
    // The local folder must be packed by the CLI before a coordinator accepts it.
    assert_eq!(spec.unresolved_paths().iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["run.workdir"]);
    let mut packed = spec.clone();
    let digest = "ab".repeat(32);
    packed.run.as_mut().expect("run").workdir = Some(format!("s3://bucket/cluster/workdirs/{digest}.tar.gz"));
    assert!(packed.unresolved_paths().is_empty());
    assert_eq!(packed.clone().validated().expect("still valid"), packed);
}

#[test]
fn bad_command_jobs_name_their_fields() {
    let run = |extra: &str| format!("name = \"c\"\nworkers = {{ min = 1, gpus = 1 }}\n{extra}\n");
    let cases = [
        (run("[run]\nworkdir = \".\""), "run.command"),
        (run("[run]\ncommand = []"), "run.command"),
        (run("[run]\ncommand = [\"\"]"), "run.command[0]"),
        (run("[run]\ncommand = [\"x\"]\nprocs_per_worker = 2"), "run.procs_per_worker"),
        (run("[run]\ncommand = [\"x\"]\nprocs_per_worker = 0"), "run.procs_per_worker"),
        (run("[run]\ncommand = [\"x\"]\nnotice_signal = \"SIGKILL\""), "run.notice_signal"),
        (run("[run]\ncommand = [\"x\"]\nenv = { RANK = \"3\" }"), "run.env.RANK"),
        (run("[run]\ncommand = [\"x\"]\nenv = { FLOTILLA_JOB_ID = \"3\" }"), "run.env.FLOTILLA_JOB_ID"),
        (run("[run]\ncommand = [\"x\"]\nenv = { \"1X\" = \"3\" }"), "run.env.1X"),
        (run("model = { kind = \"mlp\" }\n[run]\ncommand = [\"x\"]"), "model"),
        (run("data = { train = \"x.csv\" }\n[run]\ncommand = [\"x\"]"), "data"),
        (run("train = { epochs = 2 }\n[run]\ncommand = [\"x\"]"), "train"),
    ];
    for (text, field) in cases {
        assert_eq!(invalid_fields(&text), [field], "{text}");
    }
    // Without [run], [model] stays required, and the message mentions the alternative.
    match JobSpec::from_toml_str(&run("data = { train = \"x.csv\" }")) {
        Err(SpecError::Invalid(errors)) => assert!(errors[0].message.contains("[run]"), "{errors:?}"),
        other => panic!("{other:?}"),
    }
}

fn int_field_case() -> impl Strategy<Value = (&'static str, &'static str, i64, i64)> {
    prop_oneof![
        Just(("train", "batch_size", 1, BATCH_SIZE_MAX)),
        Just(("train", "epochs", 1, EPOCHS_MAX)),
        Just(("train", "seed", 0, i64::MAX)),
        Just(("checkpoint", "every_steps", 1, CHECKPOINT_EVERY_STEPS_MAX)),
        Just(("checkpoint", "keep", 1, CHECKPOINT_KEEP_MAX)),
        Just(("capacity", "max_failures", 0, MAX_FAILURES_MAX)),
        Just(("capacity", "spares", 0, SPARES_MAX)),
    ]
}

proptest! {
    /// Any integer in a bounded field is accepted exactly when it lies in the documented range,
    /// and a rejection names that field.
    #[test]
    fn integer_fields_accept_exactly_their_range(
        (table, key, min, max) in int_field_case(),
        value in prop_oneof![any::<i64>(), -10i64..10, (0i64..3).prop_map(|d| BATCH_SIZE_MAX - 1 + d)],
    ) {
        let text = with(&format!("[{table}]\n{key} = {value}"));
        let result = JobSpec::from_toml_str(&text);
        let field = format!("{table}.{key}");
        if (min..=max).contains(&value) {
            prop_assert!(result.is_ok(), "{field} = {value} refused: {result:?}");
        } else {
            let err = result.expect_err("out of range");
            prop_assert_eq!(err.fields(), vec![field.as_str()]);
        }
    }

    /// Worker counts: accepted exactly when 1 <= min <= max <= WORKERS_MAX.
    #[test]
    fn worker_bounds(min in -2i64..1030, max in -2i64..1030) {
        let text = MINIMAL.replace("workers = { min = 1 }", &format!("workers = {{ min = {min}, max = {max} }}"));
        let ok = 1 <= min && min <= max && max <= WORKERS_MAX;
        let result = JobSpec::from_toml_str(&text);
        prop_assert_eq!(result.is_ok(), ok, "min={} max={} => {:?}", min, max, result);
        if let Err(e) = result {
            prop_assert!(e.fields().iter().all(|f| f.starts_with("workers.")), "{e}");
        }
    }

    /// Prices and budgets: accepted exactly when finite and in (0, max].
    #[test]
    fn money_fields(price in prop_oneof![any::<f64>(), -2.0f64..2.0, Just(0.0)], budget in prop_oneof![any::<f64>(), -2.0f64..2.0]) {
        let text = with(&format!("[capacity]\nmax_price_usd_per_hour = {price:?}\nbudget_usd = {budget:?}"));
        let price_ok = price.is_finite() && price > 0.0 && price <= PRICE_USD_PER_HOUR_MAX;
        let budget_ok = budget.is_finite() && budget > 0.0 && budget <= BUDGET_USD_MAX;
        match JobSpec::from_toml_str(&text) {
            Ok(spec) => {
                prop_assert!(price_ok && budget_ok);
                prop_assert_eq!(spec.capacity.max_price_usd_per_hour, Some(price));
            }
            Err(e) => {
                let fields = e.fields();
                prop_assert_eq!(fields.contains(&"capacity.max_price_usd_per_hour"), !price_ok);
                prop_assert_eq!(fields.contains(&"capacity.budget_usd"), !budget_ok);
            }
        }
    }

    /// Deadlines: accepted exactly when finite and in (0, DEADLINE_H_MAX] hours.
    #[test]
    fn deadline_field(hours in prop_oneof![any::<f64>(), -2.0f64..2.0, Just(0.0), 8000.0f64..9000.0]) {
        let text = with(&format!("[capacity]\ndeadline_h = {hours:?}"));
        let ok = hours.is_finite() && hours > 0.0 && hours <= DEADLINE_H_MAX;
        match JobSpec::from_toml_str(&text) {
            Ok(spec) => {
                prop_assert!(ok, "{hours} accepted");
                prop_assert_eq!(spec.capacity.deadline_h, Some(hours));
                prop_assert_eq!(JobSpec::from_toml_str(&spec.to_toml()).map(|s| s.capacity.deadline_h), Ok(Some(hours)));
            }
            Err(e) => {
                prop_assert!(!ok, "{hours} refused: {e}");
                prop_assert_eq!(e.fields(), vec!["capacity.deadline_h"]);
            }
        }
    }

    /// Every valid spec survives its canonical TOML form unchanged.
    #[test]
    fn canonical_form_round_trips(
        hidden in prop::collection::vec(1u32..2048, 1..5),
        epochs in prop::option::of(1i64..100),
        lr in 1e-6f64..1.0,
        sgd in any::<bool>(),
        min in 1u32..8, extra in 0u32..8,
        fraction in 0.0f64..0.9,
        budget in prop::option::of(0.01f64..1e6),
    ) {
        let length = epochs.map_or("steps = 500".to_string(), |e| format!("epochs = {e}"));
        let optimizer = if sgd { "optimizer = \"sgd\"\nmomentum = 0.5" } else { "optimizer = \"adam\"" };
        let budget = budget.map_or(String::new(), |b| format!("budget_usd = {b:?}"));
        let text = format!(
            "name = \"p\"\n[model]\nkind = \"mlp\"\nhidden = {hidden:?}\n[data]\ntrain = \"synthetic:blobs?classes=3\"\n\
             validation_fraction = {fraction:?}\n[train]\n{length}\n{optimizer}\nlearning_rate = {lr:?}\n\
             [workers]\nmin = {min}\nmax = {}\n[capacity]\n{budget}\n", min + extra
        );
        let spec = JobSpec::from_toml_str(&text).expect("generated spec is valid");
        let again = JobSpec::from_toml_str(&spec.to_toml()).expect("canonical form is valid");
        prop_assert_eq!(spec, again);
    }
}

/// A spec as the API may deliver it: any field values, valid or not (within `i64` for the
/// unsigned ones; beyond it see the test below), a built-in job or a command job.
fn any_api_spec() -> impl Strategy<Value = JobSpec> {
    let small_u32 = prop_oneof![0u32..5, Just(u32::MAX), 0u32..70_000];
    let float = prop_oneof![any::<f64>(), 0.0f64..2.0, Just(f64::NAN), Just(f64::INFINITY), Just(-1.0)];
    let name = prop_oneof![Just("ok".to_string()), Just(String::new()), Just("Bad Name".to_string()), "[a-z]{1,70}"];
    let uri = prop_oneof![
        Just("synthetic:blobs".to_string()),
        Just("s3://bucket/train.csv".to_string()),
        Just("file:///data/mnist.csv".to_string()),
        Just("synthetic:blobs?classes=3".to_string()),
    ];
    let model = prop_oneof![
        prop::collection::vec(small_u32.clone(), 0..20).prop_map(|hidden| Some(ModelSpec::Mlp { hidden })),
        prop::collection::vec(small_u32.clone(), 0..6).prop_map(|channels| Some(ModelSpec::Cnn { channels })),
        Just(None),
    ];
    let run = prop_oneof![
        Just(None),
        (
            prop::collection::vec("[a-z]{0,8}", 0..3),
            prop::option::of(Just("/work".to_string())),
            small_u32.clone(),
            prop::collection::btree_map(
                prop_oneof![Just("A".to_string()), Just("FLOTILLA_X".to_string()), Just("1a".to_string())],
                "[a-z]{0,4}",
                0..3
            ),
        )
            .prop_map(|(command, workdir, procs, env)| {
                Some(RunSpec { command, workdir, procs_per_worker: procs, notice_signal: NoticeSignal::Usr1, env })
            }),
    ];
    let data = (uri.clone(), prop::option::of(uri), float.clone()).prop_map(|(train, validation, fraction)| {
        let parse = |u: String| u.parse::<DataUri>().expect("listed URIs parse");
        Some(DataSpec {
            train: parse(train),
            validation: validation.map(parse),
            format: DataFormat::Csv,
            validation_fraction: fraction,
        })
    });
    let train = (
        prop_oneof![
            small_u32.clone().prop_map(TrainLength::Epochs),
            (0u64..2_000_000_000).prop_map(TrainLength::Steps)
        ],
        small_u32.clone(),
        prop_oneof![float.clone().prop_map(|momentum| OptimizerSpec::Sgd { momentum }), Just(OptimizerSpec::Adam)],
        float.clone(),
        float.clone(),
        0u64..=i64::MAX as u64,
        prop::option::of(prop_oneof![Just("base@2".to_string()), Just("base@Bad Alias".to_string())]),
        prop_oneof![Just(0u64), 1u64..20_000_000],
        prop::option::of(float.clone()),
        prop::option::of(float.clone()),
        prop_oneof![Just(1u32), 0u32..2000],
    );
    let schedule = (
        prop_oneof![Just(LrSchedule::Constant), Just(LrSchedule::Linear), Just(LrSchedule::Cosine)],
        prop_oneof![Just(0u64), 1u64..3_000_000_000],
        float.clone(),
        prop::option::of(float.clone()),
        prop_oneof![Just(0u32), 1u32..20_000],
        prop_oneof![Just(PatienceMetric::ValLoss), Just(PatienceMetric::ValAccuracy)],
        float.clone(),
        any::<bool>(),
    );
    let train = (train, schedule).prop_map(
        |(
            (
                length,
                batch_size,
                optimizer,
                learning_rate,
                weight_decay,
                seed,
                init_from,
                validate_every_steps,
                stop_at_val_accuracy,
                stop_at_val_loss,
                accumulate_batches,
            ),
            (
                lr_schedule,
                warmup_steps,
                min_learning_rate,
                clip_grad_norm,
                patience,
                patience_metric,
                patience_min_delta,
                keep_best,
            ),
        )| {
            TrainSpec {
                length,
                batch_size,
                accumulate_batches,
                optimizer,
                learning_rate,
                weight_decay,
                seed,
                init_from,
                validate_every_steps,
                stop_at_val_accuracy,
                stop_at_val_loss,
                lr_schedule,
                warmup_steps,
                min_learning_rate,
                clip_grad_norm,
                patience,
                patience_metric,
                patience_min_delta,
                keep_best,
            }
        },
    );
    let capacity = (
        any::<bool>(),
        prop::collection::vec(prop_oneof![Just("g5.xlarge".to_string()), Just("Bad Type".to_string())], 0..3),
        prop::option::of(float.clone()),
        prop::option::of(float.clone()),
        prop::option::of(float),
        small_u32.clone(),
        small_u32.clone(),
    )
        .prop_map(|(flag, instance_types, price, budget, deadline, max_failures, spares)| CapacitySpec {
            spot: flag,
            on_demand_fallback: !flag,
            instance_types,
            max_price_usd_per_hour: price,
            budget_usd: budget,
            deadline_h: deadline,
            mixed_types: flag,
            max_failures,
            spares,
        });
    let rest = (any::<i32>(), (small_u32.clone(), small_u32.clone(), small_u32.clone()), 0u64..20_000_000, small_u32);
    (name.clone(), model, data, run, train, capacity, rest, name).prop_map(
        |(name, model, data, run, train, capacity, (priority, (min, max, gpus), every_steps, keep), register_as)| {
            JobSpec {
                name,
                priority,
                model,
                data,
                run,
                train,
                workers: WorkersSpec { min, max, gpus },
                capacity,
                checkpoint: CheckpointSpec { every_steps, keep },
                output: OutputSpec { register_as },
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A spec from the API is checked without TOML (`validated`): it reaches the same verdict,
    /// value or errors, as the canonical TOML read back through the file's path.
    #[test]
    fn the_api_s_check_agrees_with_the_file_s(spec in any_api_spec()) {
        let direct = spec.clone().validated();
        let through_toml = JobSpec::from_toml_str(&spec.to_toml());
        prop_assert_eq!(direct, through_toml);
    }
}

/// The API's `uint64` fields beyond `i64`: a clear error naming each field (the TOML round
/// trip this check replaced panicked on them: TOML integers are `i64`).
#[test]
fn unsigned_values_beyond_i64_are_refused_by_field() {
    let mut spec = JobSpec::from_toml_str(MINIMAL).expect("valid");
    spec.train.seed = u64::MAX;
    spec.train.length = TrainLength::Steps(u64::MAX);
    spec.checkpoint.every_steps = 1 << 63;
    let err = spec.validated().expect_err("out of range");
    assert_eq!(err.fields(), ["train.steps", "train.seed", "checkpoint.every_steps"]);
    assert!(err.to_string().contains("18446744073709551615 is out of range"), "{err}");
}

/// The size limit of a spec file holds for a spec from the API too.
#[test]
fn an_api_spec_with_too_much_text_is_refused() {
    let mut spec =
        JobSpec::from_toml_str("name = \"c\"\nworkers = { min = 1 }\n[run]\ncommand = [\"python\"]\n").expect("valid");
    let run = spec.run.as_mut().expect("a command job");
    run.command = vec!["x".repeat(1000); 70];
    let err = spec.validated().expect_err("too large");
    assert_eq!(err.fields(), ["(spec)"]);
    assert!(err.to_string().contains("at most 65536"), "{err}");
}

#[test]
fn a_model_too_big_between_its_hidden_layers_is_refused_by_the_spec_alone() {
    let spec = |hidden: &str| {
        MINIMAL.replace("model = { kind = \"mlp\" }", &format!("model = {{ kind = \"mlp\", hidden = {hidden} }}"))
    };
    // Each layer is within its limit, but 2 x 65536^2 = 8.6 G weights lie between them.
    assert_eq!(invalid_fields(&spec("[65536, 65536, 65536]")), ["model.hidden"]);
    let error = JobSpec::from_toml_str(&spec("[65536, 65536, 65536]")).expect_err("refused").to_string();
    assert!(error.contains("8589934592 weights between its hidden layers alone"), "{error}");
    assert!(error.contains("at most 1073741824 parameters"), "{error}");
    // 65536 x 16384 = 2^30 exactly is still allowed (the data's layers are the worker's to count).
    assert!(JobSpec::from_toml_str(&spec("[65536, 16384]")).is_ok());
}

fn set(given: &[&str]) -> Vec<Override> {
    given.iter().map(|o| o.parse().unwrap_or_else(|e| panic!("{o}: {e}"))).collect()
}

#[test]
fn overrides_replace_fields_with_typed_values_and_plain_text() {
    let spec = JobSpec::from_toml_str_with(
        FULL,
        &set(&[
            "train.learning_rate=0.01",
            "model.hidden=[512, 64, 32]",
            "name=lr-0.01",
            "capacity.spot=false",
            "capacity.instance_types=[\"p3.2xlarge\"]",
            "data.train=s3://bucket/mnist.csv",
            "output.register_as = \"true\"",
            "train.steps=40",
        ]),
    )
    .expect("valid with the overrides");
    assert_eq!(spec.train.learning_rate, 0.01);
    assert_eq!(spec.model, Some(ModelSpec::Mlp { hidden: vec![512, 64, 32] }));
    assert_eq!(spec.name, "lr-0.01");
    assert!(!spec.capacity.spot && spec.capacity.instance_types == ["p3.2xlarge"]);
    assert_eq!(
        spec.built_in().expect("built in").1.train,
        DataUri::S3 { bucket: "bucket".into(), key: "mnist.csv".into() }
    );
    assert_eq!(spec.output.register_as, "true", "a quoted value stays text");
    // A value read as another type is text where the field takes text.
    let typed = JobSpec::from_toml_str_with(FULL, &set(&["name=2024", "output.register_as=true"])).expect("valid");
    assert_eq!((typed.name.as_str(), typed.output.register_as.as_str()), ("2024", "true"));
    let command = JobSpec::from_toml_str_with(COMMAND, &set(&["run.env.SEED=3", "run.procs_per_worker=1"]))
        .expect("a command job with its overrides");
    let run = command.command().expect("a command job");
    assert_eq!((run.env.get("SEED").map(String::as_str), run.procs_per_worker), (Some("3"), 1));
    assert_eq!(spec.train.length, TrainLength::Steps(40), "steps replace the file's epochs");
    assert_eq!(spec.train.batch_size, 64, "the rest of the table is kept");
    let epochs = JobSpec::from_toml_str_with(&with("[train]\nsteps = 5"), &set(&["train.epochs=2"])).expect("valid");
    assert_eq!(epochs.train.length, TrainLength::Epochs(2));
    // A table value replaces the whole table; a field absent from the file is added.
    let workers =
        JobSpec::from_toml_str_with(FULL, &set(&["workers={ min = 4 }", "train.weight_decay=0.01"])).expect("valid");
    assert_eq!(workers.workers, WorkersSpec { min: 4, max: 4, gpus: 0 });
    assert_eq!(workers.train.weight_decay, 0.01);
    // Without overrides the file is read as it is.
    assert_eq!(JobSpec::from_toml_str_with(FULL, &[]), JobSpec::from_toml_str(FULL));
    // A file that lacks a required field is completed by one.
    let unnamed = MINIMAL.replace("name = \"t\"", "");
    assert_eq!(invalid_fields(&unnamed), ["name"]);
    assert_eq!(JobSpec::from_toml_str_with(&unnamed, &set(&["name=sweep-3"])).expect("named").name, "sweep-3");
}

#[test]
fn a_bad_override_names_its_field_and_the_flag() {
    let error = |given: &[&str]| JobSpec::from_toml_str_with(FULL, &set(given)).expect_err("refused").to_string();
    let unknown = error(&["train.learning_rat=0.1"]);
    assert!(
        unknown.contains("train.learning_rat: --set train.learning_rat=0.1: unknown field `learning_rat`"),
        "{unknown}"
    );
    let typed = error(&["train.batch_size=big"]);
    assert!(typed.contains("train.batch_size: --set train.batch_size=big") && typed.contains("string"), "{typed}");
    let through = error(&["name.first=x"]);
    assert!(through.contains("`name` is a string, not a table"), "{through}");
    // Ranges are the validator's, named by field; every problem at once.
    let fields = |given: &[&str]| JobSpec::from_toml_str_with(FULL, &set(given)).expect_err("refused");
    let both = fields(&["train.learning_rate=20", "workers.min=9"]);
    assert_eq!(both.fields(), ["train.learning_rate", "workers.min"], "{both}");
    let two_unknown = fields(&["train.x=1", "model.y=2"]);
    assert_eq!(two_unknown.fields(), ["train.x", "model.y"], "{two_unknown}");
    // The file's own mistakes keep their line.
    let file = JobSpec::from_toml_str_with(&format!("{FULL}\nextra = 1\n"), &set(&["name=x"])).expect_err("refused");
    assert!(matches!(&file, SpecError::Syntax(m) if m.contains("extra") && m.contains("line")), "{file}");
    // Malformed flags are refused when parsed (clap shows the message with the flag).
    for (given, says) in [
        ("train.learning_rate", "is not FIELD=VALUE"),
        ("=1", "is not a field"),
        ("train..seed=1", "is not a field"),
        ("train.le arning=1", "is not a field"),
        ("a.b.c.d.e=1", "at most 4 names"),
    ] {
        let refused = given.parse::<Override>().expect_err(given);
        assert!(refused.contains(says), "{given}: {refused}");
    }
    let many: Vec<Override> =
        (0..=overrides::OVERRIDES_MAX).map(|i| format!("train.seed={i}").parse().expect("ok")).collect();
    assert_eq!(JobSpec::from_toml_str_with(FULL, &many).expect_err("too many").fields(), ["--set"]);
}

#[test]
fn a_relative_path_given_by_override_is_relative_to_the_given_folder() {
    let resolved =
        |given: &str| given.parse::<Override>().expect("parses").resolve_relative("/home/me/work").to_string();
    assert_eq!(resolved("data.train=data/x.csv"), "data.train=/home/me/work/data/x.csv");
    assert_eq!(resolved("data.validation=../v.csv"), "data.validation=/home/me/v.csv");
    assert_eq!(resolved("run.workdir=."), "run.workdir=/home/me/work");
    for kept in ["data.train=s3://b/x.csv", "data.train=/abs/x.csv", "data.train=synthetic:blobs", "name=data/x"] {
        assert_eq!(resolved(kept), kept.replace(' ', ""));
    }
    let spec =
        JobSpec::from_toml_str_with(MINIMAL, &[resolved("data.train=x.csv").parse().expect("parses")]).expect("valid");
    assert_eq!(spec.built_in().expect("built in").1.train, DataUri::File("/home/me/work/x.csv".into()));
}
