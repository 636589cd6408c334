//! The trainer learns the shipped real data sets: accuracy thresholds on held-out rows.
//!
//! Each test loads the data through the real loader (object_store, gzip, scaling, seeded split),
//! trains with the real trainer on one rank, and asserts the validation accuracy the training
//! engine issue promises. Seeds are fixed (printed), so a failure reproduces exactly.

use std::ops::ControlFlow;
use std::time::Instant;

use flotilla_proto::spec::JobSpec;
use flotilla_worker::collective::local::LocalCommunicator;
use flotilla_worker::data::load_job_data;
use flotilla_worker::train::{Metrics, Trainer};

fn data_path(name: &str) -> String {
    format!("{}/../examples/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn spec(model: &str, data: &str, train: &str) -> JobSpec {
    let text = format!(
        "name = \"test\"\n[model]\n{model}\n[data]\ntrain = \"{}\"\nvalidation_fraction = 0.2\n[train]\n{train}\n\
         [workers]\nmin = 1\nmax = 1\n",
        data_path(data)
    );
    JobSpec::from_toml_str(&text).expect("test spec is valid")
}

/// Trains `spec` to the end on one rank and evaluates on its held-out split.
fn train_and_validate(spec: &JobSpec) -> Metrics {
    println!("seed = {}", spec.train.seed);
    let started = Instant::now();
    let splits =
        load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("shipped data loads");
    let validation = splits.validation.expect("validation_fraction > 0 holds rows out");
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(spec, splits.train, &mut comm, None).expect("trainer builds");
    let total = trainer.total_steps();
    let mut losses = Vec::new();
    let last = trainer
        .run(&mut comm, |_, report| {
            losses.push(report.loss);
            ControlFlow::Continue(())
        })
        .expect("training runs")
        .expect("at least one step");
    assert_eq!(last.step, total, "run() stops exactly at total_steps()");
    assert!(trainer.is_finished());
    let metrics = trainer.evaluate(&validation).expect("validation set fits the model");
    println!(
        "{}: {} steps, first loss {:.3}, last loss {:.3}, val accuracy {:.4}, val loss {:.4}, {:.1} s",
        spec.built_in().expect("a built-in job").0.kind(),
        total,
        losses[0],
        last.loss,
        metrics.val_accuracy,
        metrics.val_loss,
        started.elapsed().as_secs_f64()
    );
    metrics
}

#[test]
fn digits_mlp_reaches_95_percent() {
    let spec = spec(
        "kind = \"mlp\"\nhidden = [64]",
        "digits.csv",
        "epochs = 20\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 42",
    );
    let metrics = train_and_validate(&spec);
    assert_eq!(metrics.rows, 359);
    assert!(metrics.val_accuracy >= 0.95, "digits mlp: {metrics:?}");
}

#[test]
fn mnist_mlp_reaches_90_percent() {
    let spec = spec(
        "kind = \"mlp\"\nhidden = [256, 128]",
        "mnist_5k.csv.gz",
        "epochs = 5\nbatch_size = 64\noptimizer = \"adam\"\nlearning_rate = 0.001\nseed = 42",
    );
    let metrics = train_and_validate(&spec);
    assert_eq!(metrics.rows, 1000);
    assert!(metrics.val_accuracy >= 0.90, "mnist mlp: {metrics:?}");
}

#[test]
fn digits_cnn_learns() {
    let spec = spec(
        "kind = \"cnn\"\nchannels = [8, 16]",
        "digits.csv",
        "epochs = 10\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 7",
    );
    let metrics = train_and_validate(&spec);
    assert!(metrics.val_accuracy >= 0.90, "digits cnn: {metrics:?}");
}

#[test]
fn synthetic_blobs_with_sgd_momentum_learn() {
    let text = "name = \"blobs\"\n[model]\nkind = \"mlp\"\nhidden = [32]\n[data]\n\
                train = \"synthetic:blobs?samples=2000&features=20&classes=5&noise=0.5&seed=7\"\n\
                validation_fraction = 0.2\n[train]\nsteps = 150\nbatch_size = 32\noptimizer = \"sgd\"\n\
                momentum = 0.9\nlearning_rate = 0.05\nweight_decay = 0.0001\nseed = 3\n[workers]\nmin = 1\n";
    let spec = JobSpec::from_toml_str(text).expect("valid");
    let metrics = train_and_validate(&spec);
    assert!(metrics.val_accuracy >= 0.95, "blobs sgd: {metrics:?}");
}

/// Loads `examples/NAME` as the CLI would (relative paths resolved against its folder).
fn example_spec(name: &str) -> JobSpec {
    let folder = format!("{}/../examples", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(format!("{folder}/{name}")).expect("example exists");
    let mut spec = JobSpec::from_toml_str(&text).expect("example is valid");
    spec.resolve_relative_paths(&folder);
    spec
}

/// Trains `spec` on `world` ranks (threads over the loopback ring); returns rank 0's metrics.
fn train_gang_and_validate(spec: &JobSpec, world: usize) -> Metrics {
    println!("seed = {}", spec.train.seed);
    let started = Instant::now();
    let splits =
        load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("shipped data loads");
    let (train, validation) = (std::sync::Arc::new(splits.train), splits.validation.expect("held out"));
    let gang =
        flotilla_worker::collective::ring::loopback_gang(world, std::time::Duration::from_secs(60)).expect("gang");
    let handles: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            let (spec, train, validation) = (spec.clone(), train.clone(), validation.clone());
            std::thread::spawn(move || {
                let mut trainer = Trainer::new(&spec, train, &mut comm, None).expect("trainer builds");
                trainer.run(&mut comm, |_, _| ControlFlow::Continue(())).expect("training runs");
                (trainer.total_steps(), trainer.evaluate(&validation).expect("fits"))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
    assert!(results.iter().all(|r| r == &results[0]), "every rank ends with the same model");
    let (steps, metrics) = results[0];
    println!("{} on {world} workers: {steps} steps, {metrics:?}, {:.1} s", spec.name, started.elapsed().as_secs_f64());
    metrics
}

#[test]
fn example_mnist_mlp_on_two_workers_reaches_90_percent() {
    let spec = example_spec("mnist-mlp.toml");
    assert_eq!(spec.workers.min, 2);
    let metrics = train_gang_and_validate(&spec, 2);
    assert!(metrics.val_accuracy >= 0.90, "{metrics:?}");
}

#[test]
fn example_mnist_cnn_on_two_workers_learns() {
    let spec = example_spec("mnist-cnn.toml");
    let metrics = train_gang_and_validate(&spec, 2);
    assert!(metrics.val_accuracy >= 0.90, "{metrics:?}");
}

#[test]
fn example_digits_mlp_reaches_95_percent() {
    let spec = example_spec("digits-mlp.toml");
    let metrics = train_gang_and_validate(&spec, 1);
    assert!(metrics.val_accuracy >= 0.95, "{metrics:?}");
}

/// `train.init_from`: a fresh trainer built from another run's exported weights (the registry's
/// safetensors) starts where that run ended: before any step it evaluates exactly as the run
/// did, while the seeded weights are near chance; weights of another architecture are refused
/// with the tensor that does not fit.
#[test]
fn a_trainer_started_from_exported_weights_evaluates_as_the_run_that_exported_them() {
    use flotilla_worker::train::export::safetensors;
    let base = spec(
        "kind = \"mlp\"\nhidden = [64]",
        "digits.csv",
        "epochs = 10\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 42",
    );
    let splits = load_job_data(base.built_in().expect("built in").1, base.train.seed).expect("shipped data loads");
    let validation = splits.validation.expect("held-out rows");
    let mut comm = LocalCommunicator;
    let mut trained = Trainer::new(&base, splits.train.clone(), &mut comm, None).expect("trainer builds");
    trained.run(&mut comm, |_, _| ControlFlow::Continue(())).expect("training runs");
    let exported = trained.evaluate(&validation).expect("evaluates");
    let model = base.built_in().expect("built in").0;
    let weights = safetensors(model, trained.layout(), trained.params()).expect("exports");

    // Another job (another seed, SGD) of the same architecture, started from those weights.
    let mut tuned = base.clone();
    tuned.train.seed = 7;
    tuned.train.optimizer = flotilla_proto::spec::OptimizerSpec::Sgd { momentum: 0.9 };
    let built = Trainer::model(&tuned, &splits.train).expect("model");
    let state = built.initial_state(&tuned, &splits.train, &weights).expect("the weights fit");
    assert_eq!((state.step, state.params.as_slice()), (0, trained.params()));
    let started = Trainer::start(built, &tuned, splits.train.clone(), &mut comm, Some(state)).expect("starts");
    let seeded = Trainer::new(&tuned, splits.train.clone(), &mut comm, None).expect("seeded");
    let (from_weights, from_seed) =
        (started.evaluate(&validation).expect("a"), seeded.evaluate(&validation).expect("b"));
    println!("exported {exported:?}, started from them {from_weights:?}, seeded {from_seed:?}");
    assert_eq!(from_weights.val_accuracy, exported.val_accuracy);
    assert_eq!(from_weights.val_loss, exported.val_loss);
    assert!(exported.val_accuracy >= 0.9 && from_seed.val_accuracy < 0.5, "{exported:?} {from_seed:?}");

    let mut other = tuned.clone();
    other.model = Some(flotilla_proto::spec::ModelSpec::Mlp { hidden: vec![32] });
    let refused = Trainer::model(&other, &splits.train)
        .expect("model")
        .initial_state(&other, &splits.train, &weights)
        .expect_err("another architecture");
    let said =
        "model and data do not fit: model file: tensor `hidden.0.weight` has shape [64, 64]; this model needs [32, 64]";
    assert_eq!(refused.to_string(), said);
}
