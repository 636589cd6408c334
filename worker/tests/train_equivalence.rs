//! What makes preemptible training safe: a resumed run equals an uninterrupted one bit for bit,
//! and W workers with batch B equal one worker with batch W x B (within float rounding).
//!
//! Data-parallel tests run every rank in its own thread over the real TCP ring on loopback.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::spec::JobSpec;
use flotilla_worker::collective::Communicator;
use flotilla_worker::collective::local::LocalCommunicator;
use flotilla_worker::collective::ring::loopback_gang;
use flotilla_worker::data::{Dataset, load_job_data};
use flotilla_worker::train::{TrainError, TrainState, Trainer};

const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Float tolerance for data-parallel equivalence: W ranks sum per-rank gradient sums in another
/// order than one rank sums its batch, so results differ by rounding (~1e-7 relative per step);
/// after 20-50 optimizer steps the largest parameter difference stays far below this.
const DATA_PARALLEL_TOLERANCE: f32 = 1e-5;

fn data_path(name: &str) -> String {
    format!("{}/../examples/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn spec(model: &str, train_uri: &str, validation_fraction: f64, train: &str, workers: usize) -> JobSpec {
    let text = format!(
        "name = \"test\"\n[model]\n{model}\n[data]\ntrain = \"{train_uri}\"\nvalidation_fraction = {validation_fraction}\n\
         [train]\n{train}\n[workers]\nmin = {workers}\nmax = {workers}\n"
    );
    JobSpec::from_toml_str(&text).expect("test spec is valid")
}

fn digits_spec(model: &str, train: &str, workers: usize) -> JobSpec {
    spec(model, &data_path("digits.csv"), 0.2, train, workers)
}

fn train_set(spec: &JobSpec) -> Arc<Dataset> {
    Arc::new(load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("data loads").train)
}

/// Trains on one rank from `resume` for `steps` steps; returns the final state.
fn train_alone(spec: &JobSpec, data: &Arc<Dataset>, resume: Option<TrainState>, steps: u64) -> TrainState {
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(spec, data.clone(), &mut comm, resume).expect("trainer builds");
    for _ in 0..steps {
        trainer.step(&mut comm).expect("step");
    }
    trainer.state()
}

/// Trains `world` ranks (one thread each, over the loopback ring) for `steps` steps from
/// `resume`; returns every rank's final state.
fn train_gang(
    spec: &JobSpec,
    data: &Arc<Dataset>,
    world: usize,
    resume: Option<TrainState>,
    steps: u64,
) -> Vec<TrainState> {
    let gang = loopback_gang(world, COLLECTIVE_TIMEOUT).expect("loopback gang forms");
    let handles: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            let (spec, data, resume) = (spec.clone(), data.clone(), resume.clone());
            std::thread::spawn(move || {
                let mut trainer = Trainer::new(&spec, data, &mut comm, resume).expect("trainer builds");
                for _ in 0..steps {
                    trainer.step(&mut comm).expect("step");
                }
                trainer.state()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// K steps, export (through JSON, as a checkpoint would), rebuild, K more steps: bit-identical to
/// 2K uninterrupted steps. K is chosen so the run crosses an epoch boundary (and its short step).
fn assert_resume_is_bit_identical(spec: &JobSpec, k: u64) {
    let data = train_set(spec);
    let uninterrupted = train_alone(spec, &data, None, 2 * k);
    let halfway = train_alone(spec, &data, None, k);
    let json = serde_json::to_string(&halfway).expect("state serialises");
    let restored: TrainState = serde_json::from_str(&json).expect("state deserialises");
    assert_eq!(bits(&restored.params), bits(&halfway.params), "JSON round trip is exact");
    let resumed = train_alone(spec, &data, Some(restored), k);
    assert!(uninterrupted.cursor.epoch >= 1, "the run crossed an epoch boundary: {:?}", uninterrupted.cursor);
    assert_eq!(resumed.step, 2 * k);
    assert_eq!(resumed.cursor, uninterrupted.cursor);
    assert_eq!(bits(&resumed.params), bits(&uninterrupted.params), "weights are bit-identical");
    assert_eq!(resumed.optimizer, uninterrupted.optimizer, "optimizer state is identical");
}

#[test]
fn resume_mlp_adam_is_bit_identical() {
    // 1438 train rows / 32 = 45 steps per epoch (the 45th has 30 rows): 2 x 30 steps crosses it.
    let spec = digits_spec(
        "kind = \"mlp\"\nhidden = [32]",
        "epochs = 5\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nweight_decay = 0.0001\nseed = 11",
        1,
    );
    assert_resume_is_bit_identical(&spec, 30);
}

#[test]
fn resume_cnn_sgd_momentum_is_bit_identical() {
    // 1438 / 64 = 23 steps per epoch: 2 x 12 steps crosses it.
    let spec = digits_spec(
        "kind = \"cnn\"\nchannels = [4, 8]",
        "epochs = 2\nbatch_size = 64\noptimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05\nseed = 5",
        1,
    );
    assert_resume_is_bit_identical(&spec, 12);
}

/// A learning rate that warms up and decays over the run (here over epochs: the steps left are
/// re-counted from the cursor) and a clipped gradient resume bit for bit, as a constant rate
/// does; and they change the run (the same spec without them ends elsewhere).
#[test]
fn resume_with_a_schedule_and_clipping_is_bit_identical() {
    let train = "epochs = 2\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 11";
    let scheduled = digits_spec(
        "kind = \"mlp\"\nhidden = [32]",
        &format!(
            "{train}\nlr_schedule = \"cosine\"\nwarmup_steps = 10\nmin_learning_rate = 0.0001\nclip_grad_norm = 0.5"
        ),
        1,
    );
    assert_resume_is_bit_identical(&scheduled, 30);
    let plain = digits_spec("kind = \"mlp\"\nhidden = [32]", train, 1);
    let data = train_set(&plain);
    let (a, b) = (train_alone(&plain, &data, None, 30), train_alone(&scheduled, &data, None, 30));
    assert!(max_abs_diff(&a.params, &b.params) > 1e-3, "the schedule and the clipping change the weights");
}

/// Each update applies the schedule's rate for its step, and a gradient longer than
/// `clip_grad_norm` moves plain SGD by exactly `rate x clip_grad_norm`.
#[test]
fn each_update_has_the_scheduled_rate_and_the_clipped_length() {
    let spec = digits_spec(
        "kind = \"mlp\"\nhidden = [16]",
        "steps = 20\nbatch_size = 32\noptimizer = \"sgd\"\nmomentum = 0.0\nlearning_rate = 0.1\nseed = 3\n\
         lr_schedule = \"linear\"\nwarmup_steps = 4\nclip_grad_norm = 0.01",
        1,
    );
    let data = train_set(&spec);
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(&spec, data, &mut comm, None).expect("trainer builds");
    for update in 1..=20u64 {
        let before = trainer.params().to_vec();
        let report = trainer.step(&mut comm).expect("step");
        let rate = spec.train.learning_rate_at(update, 20);
        assert_eq!(report.learning_rate, rate as f32, "step {update}");
        let moved: f64 = before.iter().zip(trainer.params()).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
        let expected = rate * 0.01;
        assert!((moved - expected).abs() < expected * 1e-2, "step {update}: moved {moved:e}, expected {expected:e}");
    }
    assert!(trainer.is_finished());
}

#[test]
fn two_workers_with_batch_b_equal_one_worker_with_batch_2b() {
    for optimizer in [
        "optimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05",
        "optimizer = \"adam\"\nlearning_rate = 0.01",
        // Clipping uses the all-reduced gradient's norm: the same on every rank and as one rank's.
        "optimizer = \"sgd\"\nmomentum = 0.9\nlearning_rate = 0.05\nlr_schedule = \"cosine\"\nwarmup_steps = 5\n\
         clip_grad_norm = 0.5",
    ] {
        let one = digits_spec(
            "kind = \"mlp\"\nhidden = [32]",
            &format!("steps = 50\nbatch_size = 32\n{optimizer}\nseed = 9"),
            1,
        );
        let two = digits_spec(
            "kind = \"mlp\"\nhidden = [32]",
            &format!("steps = 50\nbatch_size = 16\n{optimizer}\nseed = 9"),
            2,
        );
        let data = train_set(&one);
        let single = train_alone(&one, &data, None, 50);
        let ranks = train_gang(&two, &data, 2, None, 50);
        assert_eq!(bits(&ranks[0].params), bits(&ranks[1].params), "ranks hold bit-identical weights");
        assert_eq!(ranks[0].cursor, single.cursor, "both consumed the same samples");
        let diff = max_abs_diff(&ranks[0].params, &single.params);
        println!("{}: max |w(2 x B16) - w(1 x B32)| after 50 steps = {diff:e}", optimizer.lines().next().unwrap_or(""));
        assert!(diff < DATA_PARALLEL_TOLERANCE, "max abs diff {diff:e}");
    }
}

/// `train.accumulate_batches = 4` with batch B is batch 4 x B in one pass, within float rounding
/// (the passes' sums are added in another order), on one rank and on two (2 x 4 x B16 = 1 x
/// B128), through the epoch's short last step; the samples consumed are the same.
#[test]
fn accumulated_batches_equal_one_larger_batch() {
    let train = |batch: &str| format!("steps = 40\n{batch}\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 4");
    let mlp = "kind = \"mlp\"\nhidden = [32]";
    let large = digits_spec(mlp, &train("batch_size = 128"), 1);
    let accumulated = digits_spec(mlp, &train("batch_size = 32\naccumulate_batches = 4"), 1);
    let data = train_set(&large);
    let single = train_alone(&large, &data, None, 40);
    let summed = train_alone(&accumulated, &data, None, 40);
    assert_eq!(summed.cursor, single.cursor, "the same samples");
    assert!(summed.cursor.epoch >= 3, "through short last steps: {:?}", summed.cursor);
    let diff = max_abs_diff(&summed.params, &single.params);
    println!("max |w(B32 x 4 accumulated) - w(B128)| after 40 steps = {diff:e}");
    assert!(diff < DATA_PARALLEL_TOLERANCE, "max abs diff {diff:e}");
    let two = digits_spec(mlp, &train("batch_size = 16\naccumulate_batches = 4"), 2);
    let ranks = train_gang(&two, &data, 2, None, 40);
    assert!(bits(&ranks[0].params) == bits(&ranks[1].params), "ranks hold bit-identical weights");
    assert_eq!(ranks[0].cursor, single.cursor, "the same samples");
    let diff = max_abs_diff(&ranks[0].params, &single.params);
    println!("max |w(2 x B16 x 4 accumulated) - w(1 x B128)| after 40 steps = {diff:e}");
    assert!(diff < DATA_PARALLEL_TOLERANCE, "max abs diff {diff:e}");
}

#[test]
fn three_workers_match_one_through_a_short_last_step_where_a_rank_gets_nothing() {
    // 100 rows, global batch 48: steps of 48, 48 and 4 rows; on the third, ranks 1 and 2 are idle.
    let blobs = "synthetic:blobs?samples=100&features=8&classes=3&noise=0.5&seed=1";
    let model = "kind = \"mlp\"\nhidden = [16]";
    let one =
        spec(model, blobs, 0.0, "epochs = 3\nbatch_size = 48\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 2", 1);
    let three =
        spec(model, blobs, 0.0, "epochs = 3\nbatch_size = 16\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 2", 3);
    let data = train_set(&one);
    let single = train_alone(&one, &data, None, 9);
    let ranks = train_gang(&three, &data, 3, None, 9);
    assert_eq!(single.cursor.epoch, 3);
    assert_eq!(ranks[2].cursor, single.cursor);
    let diff = max_abs_diff(&ranks[2].params, &single.params);
    assert!(diff < DATA_PARALLEL_TOLERANCE, "max abs diff {diff:e}");
}

#[test]
fn resume_at_another_world_size_continues_the_same_run() {
    // 2 workers x B16 for 25 steps, checkpoint, then 1 worker x B32 for 25 more: the same global
    // batches as 50 steps of 1 worker x B32, so the same weights within rounding.
    let train =
        |batch: u32| format!("steps = 50\nbatch_size = {batch}\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 4");
    let one = digits_spec("kind = \"mlp\"\nhidden = [32]", &train(32), 1);
    let two = digits_spec("kind = \"mlp\"\nhidden = [32]", &train(16), 2);
    let data = train_set(&one);
    let uninterrupted = train_alone(&one, &data, None, 50);
    let checkpoint = train_gang(&two, &data, 2, None, 25).remove(0);
    let resumed = train_alone(&one, &data, Some(checkpoint), 25);
    assert_eq!(resumed.cursor, uninterrupted.cursor);
    let diff = max_abs_diff(&resumed.params, &uninterrupted.params);
    assert!(diff < DATA_PARALLEL_TOLERANCE, "max abs diff {diff:e}");
}

#[test]
fn ranks_that_start_differently_refuse_to_train() {
    let base = "steps = 5\nbatch_size = 16\noptimizer = \"adam\"\nlearning_rate = 0.01";
    let specs = [
        digits_spec("kind = \"mlp\"\nhidden = [8]", &format!("{base}\nseed = 1"), 2),
        digits_spec("kind = \"mlp\"\nhidden = [8]", &format!("{base}\nseed = 2"), 2),
    ];
    let data = train_set(&specs[0]);
    let gang = loopback_gang(2, COLLECTIVE_TIMEOUT).expect("gang");
    let handles: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            let (spec, data) = (specs[comm.rank()].clone(), data.clone());
            std::thread::spawn(move || Trainer::new(&spec, data, &mut comm, None).map(|_| ()))
        })
        .collect();
    for handle in handles {
        let err = handle.join().expect("rank thread").expect_err("different seeds disagree");
        assert!(matches!(err, TrainError::Disagreement(_)), "{err}");
        assert!(err.to_string().contains("rank 0") && err.to_string().contains("rank 1"), "{err}");
    }
}

#[test]
fn a_state_from_another_job_is_refused() {
    let mlp = digits_spec("kind = \"mlp\"\nhidden = [8]", "steps = 2\nbatch_size = 16\nseed = 1", 1);
    let data = train_set(&mlp);
    let state = train_alone(&mlp, &data, None, 1);
    let cases = [
        (digits_spec("kind = \"mlp\"\nhidden = [9]", "steps = 2\nbatch_size = 16\nseed = 1", 1), "architecture"),
        (digits_spec("kind = \"mlp\"\nhidden = [8]", "steps = 2\nbatch_size = 16\nseed = 2", 1), "seed"),
        (digits_spec("kind = \"mlp\"\nhidden = [8]", "steps = 2\noptimizer = \"sgd\"\nseed = 1", 1), "optimizer"),
    ];
    for (other, needle) in cases {
        let err = Trainer::new(&other, data.clone(), &mut LocalCommunicator, Some(state.clone())).expect_err(needle);
        assert!(matches!(err, TrainError::Resume(_)) && err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn a_non_square_cnn_input_and_a_non_finite_loss_are_errors() {
    let blobs = "synthetic:blobs?samples=200&features=10&classes=3&seed=1";
    let cnn = spec("kind = \"cnn\"\nchannels = [4]", blobs, 0.0, "steps = 1", 1);
    let err = Trainer::new(&cnn, train_set(&cnn), &mut LocalCommunicator, None).expect_err("10 is not square");
    assert!(matches!(err, TrainError::Shape(_)) && err.to_string().contains("square"), "{err}");

    // Finite but huge features (signed, so not rescaled) overflow the logits to infinity: NaN.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.csv");
    let rows: String = (0..40).map(|i| format!("{},3e38,-3e38,3e38,1\n", i % 2)).collect();
    std::fs::write(&path, rows).expect("write");
    let wild = spec(
        "kind = \"mlp\"\nhidden = [16]",
        path.to_str().expect("utf-8 path"),
        0.0,
        "steps = 5\nbatch_size = 8\nseed = 1",
        1,
    );
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(&wild, train_set(&wild), &mut comm, None).expect("builds");
    let err = trainer.run(&mut comm, |_, _| std::ops::ControlFlow::Continue(())).expect_err("diverges");
    let TrainError::NonFiniteLoss { step, .. } = &err else { panic!("expected NonFiniteLoss, got {err}") };
    assert_eq!(*step, trainer.steps_done() + 1, "the error names the step that failed");
    assert!(err.to_string().contains(&format!("at step {step}")), "{err}");
}

#[test]
fn a_gpu_job_on_a_machine_without_one_is_refused_with_the_fix() {
    // No GPU here or in CI: with the `cuda` feature the probe finds no driver; without it the
    // build has no CUDA backend. Either way a clear error naming workers.gpus, and no panic.
    if flotilla_worker::gpu::cuda_devices().is_ok() {
        return; // a GPU machine: scripts/gpu_check.sh covers it
    }
    let gpu = spec("kind = \"mlp\"\nhidden = [8]", &data_path("digits.csv"), 0.2, "steps = 1", 1);
    let gpu = JobSpec { workers: flotilla_proto::spec::WorkersSpec { gpus: 1, ..gpu.workers }, ..gpu };
    let err = Trainer::new(&gpu, train_set(&gpu), &mut LocalCommunicator, None).expect_err("no GPU here");
    let text = err.to_string();
    assert!(matches!(err, TrainError::Backend(_)) && text.contains("workers.gpus = 1"), "{text}");
    assert!(text.contains("workers.gpus = 0") || text.contains("--features cuda"), "names a fix: {text}");
}

/// Trains on one rank as the agent's rank 0 does with `train.patience`: validates every
/// `every` steps (and first the step it resumes at, whose validation its predecessor did not
/// count) and counts each, until the trainer finishes or `steps` steps are done.
fn train_validating(
    spec: &JobSpec,
    data: &Arc<Dataset>,
    validation: &Dataset,
    resume: Option<TrainState>,
    steps: u64,
) -> Trainer {
    let every = spec.train.validate_every_steps;
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(spec, data.clone(), &mut comm, resume).expect("trainer builds");
    let start = trainer.steps_done();
    let count = |trainer: &mut Trainer| {
        if trainer.steps_done() > 0 && trainer.steps_done().is_multiple_of(every) {
            let metrics = trainer.evaluate(validation).expect("validation");
            trainer.count_validation(metrics.val_accuracy, metrics.val_loss);
        }
    };
    count(&mut trainer);
    while !trainer.is_finished() && trainer.steps_done() < start + steps {
        trainer.step(&mut comm).expect("step");
        if !trainer.is_finished() {
            count(&mut trainer);
        }
    }
    trainer
}

/// `train.patience`: the run ends at the validation that made `patience` in a row without a
/// better one, applying no update there; a run resumed from any step before (at a validation
/// step or between two) ends at the same step with the same bits and the same count.
#[test]
fn patience_ends_the_run_at_the_same_step_however_it_was_resumed() {
    let spec = digits_spec(
        "kind = \"mlp\"\nhidden = [32]",
        "steps = 2000\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 11\n\
         validate_every_steps = 10\npatience = 3\npatience_metric = \"val_accuracy\"\npatience_min_delta = 0.002",
        1,
    );
    let splits = load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("data loads");
    let (data, validation) = (Arc::new(splits.train), splits.validation.expect("a validation split"));
    let whole = train_validating(&spec, &data, &validation, None, u64::MAX);
    let finish = whole.steps_done();
    let count = whole.out_of_patience().expect("it ran out of patience");
    println!("patience: finished at step {finish} of 2000, {count:?}");
    assert!(finish < 2000 && finish.is_multiple_of(10), "at a validation step before its length: {finish}");
    assert!(whole.finished_early() && whole.is_finished());
    assert_eq!((count.since_best, count.counted_step), (3, finish));
    assert_eq!(count.best_step + 30, finish, "three validations after the best");
    let end = whole.state();
    assert_eq!(end.step, finish, "the finishing step applied no update");
    for stop in [finish - 30, finish - 25, finish - 10] {
        let first = train_validating(&spec, &data, &validation, None, stop);
        assert!(!first.is_finished(), "still running at {stop}");
        let json = serde_json::to_string(&first.state()).expect("state serialises");
        let resumed =
            train_validating(&spec, &data, &validation, Some(serde_json::from_str(&json).expect("json")), 500);
        assert_eq!(resumed.steps_done(), finish, "resumed at {stop}");
        assert_eq!(resumed.out_of_patience(), Some(count));
        assert_eq!(bits(&resumed.state().params), bits(&end.params), "resumed at {stop}: the same weights");
    }
    // A job resumed at the step it finished (trained further) does not count that validation
    // twice: it trains on until the next one.
    let again = train_validating(&spec, &data, &validation, Some(end), 5);
    assert_eq!((again.steps_done(), again.is_finished()), (finish + 5, false));
}

/// `train.keep_best`: every rank keeps the parameters of the best validated state, bit for bit
/// those of a run stopped at that step; a run resumed before or at the best, or after it, keeps
/// the same ones; keeping them changes nothing about the training; and the final state is the
/// model instead only when its own validation (not counted yet) is better.
#[test]
fn keep_best_holds_the_best_validated_state_however_it_was_resumed() {
    let train = "steps = 2000\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nseed = 11\n\
                 validate_every_steps = 10\npatience = 3\npatience_metric = \"val_accuracy\"\npatience_min_delta = 0.002";
    let plain = digits_spec("kind = \"mlp\"\nhidden = [32]", train, 1);
    let spec = digits_spec("kind = \"mlp\"\nhidden = [32]", &format!("{train}\nkeep_best = true"), 1);
    let splits = load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("data loads");
    let (data, validation) = (Arc::new(splits.train), splits.validation.expect("a validation split"));
    let whole = train_validating(&spec, &data, &validation, None, u64::MAX);
    let count = whole.out_of_patience().expect("it ran out of patience");
    let (best_step, best) = whole.kept_best(None).expect("the best is an earlier state than the last");
    assert_eq!(best_step, count.best_step);
    let at_best = train_validating(&spec, &data, &validation, None, best_step);
    assert!(bits(best) == bits(&at_best.state().params), "the parameters of step {best_step}");
    let evaluated = whole.evaluate_params(best, &validation).expect("evaluates");
    assert_eq!(evaluated, at_best.evaluate(&validation).expect("evaluates"));
    assert_eq!(evaluated.val_accuracy as f32, count.best.expect("a best"), "the count's best is that state's");
    // The last state was validated and counted: the count judged it, whatever is said now.
    let perfect = flotilla_worker::train::Metrics { val_accuracy: 1.0, val_loss: 0.0, rows: validation.rows };
    assert_eq!(whole.kept_best(Some(&perfect)).map(|(step, _)| step), Some(best_step));
    let without = train_validating(&plain, &data, &validation, None, u64::MAX);
    assert!(without.kept_best(None).is_none(), "nothing kept without train.keep_best");
    assert!(bits(&without.state().params) == bits(&whole.state().params), "the training is the same");
    assert!(without.state().best_params.is_empty());
    for stop in [best_step - 5, best_step, whole.steps_done() - 10] {
        let first = train_validating(&spec, &data, &validation, None, stop);
        let json = serde_json::to_string(&first.state()).expect("state serialises");
        let state = serde_json::from_str(&json).expect("json");
        let resumed = train_validating(&spec, &data, &validation, Some(state), 5000);
        let kept = resumed.kept_best(None).map(|(step, params)| (step, bits(params) == bits(best)));
        assert_eq!(kept, Some((best_step, true)), "resumed at {stop}: the same step and bits");
    }
    // Between two validations the final state was not counted: it is the model when its own
    // validation is better than the best one, and not otherwise.
    let between = train_validating(&spec, &data, &validation, None, best_step + 15);
    let worst = flotilla_worker::train::Metrics { val_accuracy: 0.0, val_loss: 9.0, rows: validation.rows };
    assert!(between.kept_best(Some(&perfect)).is_none(), "a better last state is the model");
    assert_eq!(between.kept_best(Some(&worst)).map(|(step, _)| step), Some(best_step));
}
