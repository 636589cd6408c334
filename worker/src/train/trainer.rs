//! [`Trainer`]: the step loop of one rank. See the parent module for the picture.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, TensorData};
use flotilla_proto::spec::{JobSpec, ModelSpec, TrainLength, TrainSpec};

use super::backend::{self, Device, Tensor};
use super::flat::{self, Fnv64, ParamLayout};
use super::model::Network;
use super::optim::{self, Hyper, OptimizerState};
use super::{
    Communicator, Dataset, Handover, Metrics, PatienceCount, StepReport, TRAIN_STATE_FORMAT_VERSION, TrainError,
    TrainState, UPDATE_EXTRAS,
};
use crate::data::order::StepPlan;
use crate::data::{Cursor, epoch_order, order::ORDER_ROWS_MAX};

/// Rows evaluated per forward pass: bounds activation memory (a 512 x 32 x 28 x 28 CNN map is
/// 51 MB) independently of the validation set's size.
pub const EVAL_BATCH_ROWS: usize = 512;

/// One rank's training: model, flat parameters, optimizer state and cursor.
pub struct Trainer {
    train_spec: TrainSpec,
    data: Arc<Dataset>,
    /// The device training runs on, recording for autodiff.
    device: Device,
    /// The same device without autodiff, for evaluation.
    eval_device: Device,
    /// The burn module; its parameters always equal `params` (written back after every update).
    model: Network,
    layout: ParamLayout,
    params: Vec<f32>,
    optimizer: OptimizerState,
    cursor: Cursor,
    step: u64,
    rank: usize,
    world_size: usize,
    /// The epoch order in use, cached: `(epoch, order)`.
    order: (u64, Arc<Vec<u32>>),
    /// This rank asks the gang to stop after the next step (see [`Trainer::vote_stop`]).
    stop_vote: bool,
    /// This rank asks the gang to finish now, before its length ([`Trainer::vote_finish`]).
    finish_vote: bool,
    /// The gang agreed to finish early: this state is final ([`Trainer::is_finished`]).
    finished_early: bool,
    /// `train.patience`'s count, and whether the gang finished because it ran out.
    patience: PatienceCount,
    out_of_patience: bool,
    /// With `train.keep_best`: the parameters of `patience.best_step`'s state.
    best_params: Vec<f32>,
    /// Rank 0's validation of this state, to count in the next step ([`Trainer::count_validation`]).
    validation_to_count: Option<f32>,
    /// A live handover of this rank under way (see [`Handover`]), and whether its first update
    /// (the one that carries [`Trainer::replay_checksum`]) went out.
    handover: Option<Box<dyn Handover>>,
    handover_checked: bool,
    /// Why the last live handover was given up, until taken ([`Trainer::take_handover_failure`]).
    handover_failure: Option<String>,
    /// `params` changed without being written into `model` (a step's or a replayed update):
    /// written before the next forward pass.
    model_stale: bool,
}

impl Trainer {
    /// Builds the model for `spec` and `data` (the training split), starting fresh from the seeded
    /// initial weights or from `resume`, and checks with the other ranks (through `comm`) that
    /// every rank starts from the same state.
    pub fn new(
        spec: &JobSpec,
        data: impl Into<Arc<Dataset>>,
        comm: &mut dyn Communicator,
        resume: Option<TrainState>,
    ) -> Result<Trainer, TrainError> {
        let data = data.into();
        let model = Trainer::model(spec, &data)?;
        Trainer::start(model, spec, data, comm, resume)
    }

    /// The part of [`Trainer::new`] that needs neither the gang nor the starting state: the
    /// device and the burn model. A rank builds it while its gang forms and its state arrives.
    pub fn model(spec: &JobSpec, data: &Dataset) -> Result<Model, TrainError> {
        check_data(spec, data)?;
        let eval_device = training_device(spec.workers.gpus)?;
        let device = backend::autodiff(eval_device.clone());
        let (model, _) = spec.built_in().map_err(|e| TrainError::Shape(e.to_string()))?;
        if spec.workers.gpus == 0 {
            let parameters = super::model::parameters(model, data.features_per_row, data.classes);
            fits_in_memory(parameters, mem_available_bytes()).map_err(TrainError::Shape)?;
        }
        let network = Network::new(model, data.features_per_row, data.classes, &device)?;
        let layout = ParamLayout::of(&network);
        Ok(Model { device, eval_device, network, layout, shape: (data.features_per_row, data.classes) })
    }

    /// The rest of [`Trainer::new`] on a `model` built by [`Trainer::model`] for the same
    /// `spec` and `data`.
    pub fn start(
        model: Model,
        spec: &JobSpec,
        data: impl Into<Arc<Dataset>>,
        comm: &mut dyn Communicator,
        resume: Option<TrainState>,
    ) -> Result<Trainer, TrainError> {
        check_communicator(comm)?;
        let trainer = Trainer::assemble(model, spec, data.into(), resume, comm.rank(), comm.world_size())?;
        trainer.agree_with_peers(comm)?;
        Ok(trainer)
    }

    /// A trainer that takes the place of `rank` in a running gang of `world_size`, from the
    /// `state` its leaving member sent (a live handover's joining member, see [`Handover`]):
    /// [`Trainer::start`] without the start-up agreement, since the gang is mid-training. It
    /// catches up with [`Trainer::replay`], then steps with the gang.
    pub fn joining(
        model: Model,
        spec: &JobSpec,
        data: impl Into<Arc<Dataset>>,
        state: TrainState,
        rank: usize,
        world_size: usize,
    ) -> Result<Trainer, TrainError> {
        if rank >= world_size {
            return Err(TrainError::Communicator(format!("rank {rank} in a world of {world_size}")));
        }
        Trainer::assemble(model, spec, data.into(), Some(state), rank, world_size)
    }

    fn assemble(
        model: Model,
        spec: &JobSpec,
        data: Arc<Dataset>,
        resume: Option<TrainState>,
        rank: usize,
        world_size: usize,
    ) -> Result<Trainer, TrainError> {
        check_data(spec, &data)?;
        let Model { device, eval_device, network, layout, shape } = model;
        if shape != (data.features_per_row, data.classes) {
            return Err(TrainError::Shape(format!(
                "the model was built for {} features and {} classes; {} has {} and {}",
                shape.0, shape.1, data.source, data.features_per_row, data.classes
            )));
        }
        let train = &spec.train;
        let state = match resume {
            Some(state) => check_resume(state, &layout, train, &data)?,
            None => fresh_state(&layout, train, &data),
        };
        let model = flat::write_params(network, &state.params, &layout);
        let order = (state.cursor.epoch, Arc::new(epoch_order(train.seed, state.cursor.epoch, data.rows)));
        Ok(Trainer {
            train_spec: train.clone(),
            data,
            device,
            eval_device,
            model,
            layout,
            params: state.params,
            optimizer: state.optimizer,
            cursor: state.cursor,
            step: state.step,
            rank,
            world_size,
            order,
            stop_vote: false,
            finish_vote: false,
            finished_early: false,
            patience: state.patience,
            out_of_patience: false,
            // Kept only while the spec asks (a job resumed without it drops them).
            best_params: if train.keep_best { state.best_params } else { Vec::new() },
            validation_to_count: None,
            handover: None,
            handover_checked: false,
            handover_failure: None,
            model_stale: false,
        })
    }

    /// Every rank contributes a checksum of its starting state (parameters, optimizer state,
    /// cursor, step, data shape and labels) in its own slots of a zeroed buffer; after the
    /// all-reduce every slot must hold the same value.
    fn agree_with_peers(&self, comm: &mut dyn Communicator) -> Result<(), TrainError> {
        const PIECES: usize = 4;
        let mut buffer = vec![0.0f32; PIECES * self.world_size];
        let slot = PIECES * self.rank;
        buffer[slot..slot + PIECES].copy_from_slice(&flat::u64_to_f32_pieces(self.state_checksum()));
        comm.all_reduce_sum(&mut buffer)?;
        let sums: Vec<u64> = buffer.chunks_exact(PIECES).map(flat::f32_pieces_to_u64).collect();
        if sums.iter().any(|&s| s != sums[0]) {
            let listed: Vec<String> = sums.iter().enumerate().map(|(r, s)| format!("rank {r}: {s:016x}")).collect();
            return Err(TrainError::Disagreement(format!(
                "the starting states differ ({}); every rank must use the same spec, data and checkpoint",
                listed.join(", ")
            )));
        }
        Ok(())
    }

    fn state_checksum(&self) -> u64 {
        let mut hash = Fnv64::new();
        hash.write_f32s(&self.params);
        match &self.optimizer {
            OptimizerState::Sgd { velocity } => hash.write_f32s(velocity),
            OptimizerState::Adam { first_moment, second_moment, updates } => {
                hash.write_f32s(first_moment);
                hash.write_f32s(second_moment);
                hash.write(&updates.to_le_bytes());
            }
        }
        for value in [self.cursor.epoch, self.cursor.global_sample_offset, self.step] {
            hash.write(&value.to_le_bytes());
        }
        let patience = &self.patience;
        let best = patience.best.map_or(u64::MAX, |b| u64::from(b.to_bits()));
        for value in [best, patience.best_step, u64::from(patience.since_best), patience.counted_step] {
            hash.write(&value.to_le_bytes());
        }
        hash.write_f32s(&self.best_params);
        for value in [self.data.rows, self.data.features_per_row, self.data.classes] {
            hash.write(&(value as u64).to_le_bytes());
        }
        self.data.labels.iter().for_each(|l| hash.write(&l.to_le_bytes()));
        hash.finish()
    }

    /// Runs one optimizer step over the next global batch. All ranks must call it together.
    pub fn step(&mut self, comm: &mut dyn Communicator) -> Result<StepReport, TrainError> {
        if (comm.rank(), comm.world_size()) != (self.rank, self.world_size) {
            return Err(TrainError::Communicator(format!(
                "built as rank {} of {}, called with rank {} of {}",
                self.rank,
                self.world_size,
                comm.rank(),
                comm.world_size()
            )));
        }
        let started = Instant::now();
        self.write_model();
        let plan = self.next_plan();
        if self.order.0 != plan.epoch {
            self.order = (plan.epoch, Arc::new(epoch_order(self.train_spec.seed, plan.epoch, self.data.rows)));
        }
        let local_rows = &self.order.1[plan.local.start as usize..plan.local.end as usize];
        let mut buffer = if local_rows.is_empty() {
            vec![0.0; self.layout.len + 1] // nothing to add on the short last step: zeros
        } else {
            self.local_gradient_sum(local_rows)?
        };
        // The stop and handover votes ride in the gradient all-reduce: no extra round trip, and
        // every rank sees the same sums, so all ranks act after the same step.
        buffer.push(if std::mem::take(&mut self.stop_vote) { 1.0 } else { 0.0 });
        buffer.push(if std::mem::take(&mut self.finish_vote) { 1.0 } else { 0.0 });
        // Rank 0's validation for train.patience: every rank counts it alike.
        let counted = self.validation_to_count.take();
        buffer.extend([if counted.is_some() { 1.0 } else { 0.0 }, counted.unwrap_or(0.0)]);
        let leaving = self.handover.as_ref().is_some_and(|h| h.caught_up());
        SwapVotes::mine(leaving, self.rank, &comm.joining_links()).push_to(&mut buffer);
        comm.all_reduce_sum(&mut buffer)?;
        let swap = SwapVotes::pop_from(&mut buffer);
        let validation = buffer.split_off(buffer.len() - UPDATE_EXTRAS);
        let out_of_patience = self.count_validation_from(&validation);
        let finish_agreed = buffer.pop().expect("the buffer ends with the finish votes") > 0.0;
        let stop_agreed = buffer.pop().expect("the buffer ends with the stop votes") > 0.0;
        let global_samples = plan.global_samples();
        let loss_sum = buffer.pop().expect("the buffer ends with the loss sum");
        let loss = loss_sum / global_samples as f32;
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { step: self.step + 1, loss });
        }
        let epoch = plan.epoch;
        let report = |step: u64, learning_rate: f32, replaced: Option<usize>| {
            let seconds = started.elapsed().as_secs_f64();
            let samples_per_s = if seconds > 0.0 { global_samples as f64 / seconds } else { 0.0 };
            StepReport {
                step,
                epoch,
                loss,
                samples: global_samples,
                samples_per_s,
                learning_rate,
                stop_agreed,
                replaced,
            }
        };
        if finish_agreed || out_of_patience {
            // The job is done at the step the vote judged: this step's update is not applied
            // (nor forwarded to a joiner), so the final state is the one that was validated.
            self.finished_early = true;
            self.out_of_patience = out_of_patience;
            return Ok(report(self.step, 0.0, None));
        }
        let scale = 1.0 / global_samples as f32;
        buffer.iter_mut().for_each(|g| *g *= scale);
        let learning_rate = self.apply_update(&plan, &buffer);
        // A stop or the end of training cancels a swap agreed in the same step: the gang then
        // ends together, and the joiner's handover fails over to the stop's path.
        let replaced = swap.agreed(self.world_size).filter(|_| !stop_agreed && !self.is_finished());
        if self.handover.is_some() {
            let checksum = (!std::mem::replace(&mut self.handover_checked, true)).then(|| self.replay_checksum());
            let last = replaced == Some(self.rank);
            buffer.extend(validation); // the joiner counts it as this rank did
            let forwarded = self.handover.as_mut().map(|h| h.forward(self.step, buffer, checksum, last));
            if let Some(Err(e)) = forwarded {
                tracing::warn!(error = %e, step = self.step, "the live handover was given up");
                self.handover = None;
                self.handover_failure = Some(e.to_string());
            }
        }
        if let Some(rank) = replaced
            && rank != self.rank
        {
            comm.admit(rank)?;
        }
        Ok(report(self.step, learning_rate, replaced))
    }

    /// Applies the update of `step` that the gang's all-reduce gave (`gradient`: summed and
    /// scaled, as [`Handover::forward`] passes it) without computing anything: how a live
    /// handover's joining member catches up. The result is bit-identical to the step on the
    /// ranks that ran it (the same optimizer on the same numbers).
    pub fn replay(&mut self, step: u64, update: &[f32]) -> Result<(), TrainError> {
        if step != self.step + 1 {
            return Err(TrainError::Resume(format!(
                "the update of step {step} came after step {}; updates must come in order",
                self.step
            )));
        }
        if update.len() != self.layout.len + UPDATE_EXTRAS {
            return Err(TrainError::Shape(format!(
                "the update of step {step} has {} values; the model has {} parameters (and {UPDATE_EXTRAS} more \
                 follow them)",
                update.len(),
                self.layout.len
            )));
        }
        let (gradient, validation) = update.split_at(self.layout.len);
        self.count_validation_from(validation); // a step that ran out of patience is not forwarded
        let plan = self.next_plan();
        self.apply_update(&plan, gradient);
        Ok(())
    }

    /// This rank's plan for the next step.
    fn next_plan(&self) -> StepPlan {
        self.cursor.plan(self.data.rows as u64, self.train_spec.samples_per_worker_step(), self.rank, self.world_size)
    }

    /// The update of the step `plan` describes, from the gang's summed, scaled gradient: one
    /// function for a step and its replay, so a joiner's replay is the step's update.
    /// The parameters reach the burn module at the next step's start ([`Trainer::write_model`]):
    /// a live handover's update goes out first, and a leaving rank's last step skips the write.
    /// Returns the learning rate it applied.
    fn apply_update(&mut self, plan: &StepPlan, gradient: &[f32]) -> f32 {
        let hyper = self.update_hyper(gradient);
        self.optimizer.step(&hyper, &mut self.params, gradient);
        self.model_stale = true;
        self.cursor = self.cursor.advanced(plan, self.data.rows as u64);
        self.step += 1;
        hyper.learning_rate
    }

    /// The hyper-parameters of the next update: the schedule's rate for it
    /// ([`TrainSpec::learning_rate_at`] over [`Trainer::total_steps`]) and the clipping factor
    /// of `gradient` (`train.clip_grad_norm`). Pure in the state and the gradient, so every rank
    /// and a joiner's replay use the same.
    fn update_hyper(&self, gradient: &[f32]) -> Hyper {
        let train = &self.train_spec;
        Hyper {
            optimizer: train.optimizer,
            learning_rate: train.learning_rate_at(self.step + 1, self.total_steps()) as f32,
            weight_decay: train.weight_decay as f32,
            gradient_scale: train.clip_grad_norm.map_or(1.0, |max| optim::clip_factor(optim::l2_norm(gradient), max)),
        }
    }

    /// A checksum of what a step's update changes: the parameters' bits (Adam's moments enter
    /// them from the first update on), the cursor and the step count. A live handover's joiner
    /// compares its own after replaying the first update with the leaving rank's.
    pub fn replay_checksum(&self) -> u64 {
        let mut hash = Fnv64::new();
        hash.write_f32s(&self.params);
        for value in [self.cursor.epoch, self.cursor.global_sample_offset, self.step] {
            hash.write(&value.to_le_bytes());
        }
        hash.finish()
    }

    /// Starts a live handover of this rank (see [`Handover`]): from the next step on, every
    /// update goes to `handover`, and the rank votes to leave once its joiner caught up.
    pub fn hand_over(&mut self, handover: Box<dyn Handover>) {
        self.handover = Some(handover);
        self.handover_checked = false;
    }

    /// Why the live handover of this rank was given up (a failed transfer, a joiner too far
    /// behind), once: the rank trains on, and its agent tells the coordinator.
    pub fn take_handover_failure(&mut self) -> Option<String> {
        self.handover_failure.take()
    }

    /// Whether a live handover of this rank is under way.
    pub fn is_handing_over(&self) -> bool {
        self.handover.is_some()
    }

    /// Writes the parameters into the burn module if an update changed them since.
    fn write_model(&mut self) {
        if std::mem::take(&mut self.model_stale) {
            self.model = flat::write_params(self.model.clone(), &self.params, &self.layout);
        }
    }

    /// Asks the gang to stop: the next step carries this rank's vote, and every rank's report
    /// of that step has `stop_agreed` set, so all ranks stop at the same step boundary (e.g. to
    /// checkpoint on a preemption notice that reached one worker).
    pub fn vote_stop(&mut self) {
        self.stop_vote = true;
    }

    /// Asks the gang to finish now, before its length (rank 0's validation reached the job's
    /// target): the next step carries the vote, and on every rank that step applies no update
    /// and ends training, so the final state is this one, on all ranks.
    pub fn vote_finish(&mut self) {
        self.finish_vote = true;
    }

    /// The gang agreed to finish before the job's length ([`Trainer::vote_finish`]).
    pub fn finished_early(&self) -> bool {
        self.finished_early
    }

    /// Rank 0's validation while the job trains: evaluates this state on `data`, counts it for
    /// `train.patience` ([`Trainer::count_validation`]) and, when it reaches a target
    /// (`train.stop_at_val_accuracy` or `stop_at_val_loss`), asks the gang to finish here
    /// ([`Trainer::vote_finish`]) and returns the target, named with the value.
    pub fn validate(&mut self, data: &Dataset) -> Result<(Metrics, Option<String>), TrainError> {
        let metrics = self.evaluate(data)?;
        self.count_validation(metrics.val_accuracy, metrics.val_loss);
        let target = self.train_spec.target_reached(metrics.val_accuracy, metrics.val_loss);
        if target.is_some() {
            self.vote_finish();
        }
        Ok((metrics, target))
    }

    /// Counts rank 0's validation of this state for `train.patience` (nothing without it): the
    /// next step carries its value to every rank, which count it alike; if the job then ran
    /// out of patience, that step applies no update and ends training on every rank, as
    /// [`Trainer::vote_finish`] does.
    /// A state that counted this step's validation already (a job resumed at the step it ran
    /// out of patience) does not count it again.
    pub fn count_validation(&mut self, val_accuracy: f64, val_loss: f64) {
        let counted = self.patience.best.is_some() && self.patience.counted_step == self.step;
        if self.train_spec.counts_validations() && !counted {
            self.validation_to_count = Some(self.train_spec.patience_metric.of(val_accuracy, val_loss) as f32);
        }
    }

    /// Counts a step's `[counted, value]` (what [`Trainer::count_validation`] sent); whether the
    /// job ran out of patience with it.
    /// A new best is this state (its update is not applied yet): with `train.keep_best` every
    /// rank copies its parameters.
    fn count_validation_from(&mut self, validation: &[f32]) -> bool {
        let &[counted, value] = validation else { return false };
        if counted <= 0.0 || !self.train_spec.counts_validations() {
            return false;
        }
        let train = &self.train_spec;
        self.patience.count(self.step, value, train.patience_metric, train.patience_min_delta as f32);
        if train.keep_best && self.patience.since_best == 0 {
            self.best_params.clone_from(&self.params);
        }
        train.patience > 0 && self.patience.since_best >= train.patience
    }

    /// The job's model with `train.keep_best`: the best validated state's step and parameters,
    /// when that is not this state, and this state, whose validation is `final_metrics`, is not
    /// better (beyond `patience_min_delta`; a state counted at this step was judged already).
    /// `None`: this state is the model.
    pub fn kept_best(&self, final_metrics: Option<&Metrics>) -> Option<(u64, &[f32])> {
        let (train, count) = (&self.train_spec, &self.patience);
        let best = count.best.filter(|_| train.keep_best && !self.best_params.is_empty())?;
        if count.best_step == self.step {
            return None;
        }
        let value = final_metrics.map(|m| train.patience_metric.of(m.val_accuracy, m.val_loss) as f32);
        let judged = count.counted_step == self.step;
        if let Some(value) = value.filter(|_| !judged)
            && train.patience_metric.improves(value, best, train.patience_min_delta as f32)
        {
            return None;
        }
        Some((count.best_step, &self.best_params))
    }

    /// The count, once the gang finished because it ran out of patience.
    pub fn out_of_patience(&self) -> Option<PatienceCount> {
        self.out_of_patience.then_some(self.patience)
    }

    /// Runs one step's forward and backward pass on a batch of this rank's size and throws the
    /// result away (nothing changes): the kernels and allocations a step uses are made off the
    /// gang's critical path. A prepared replacement runs it on a scratch trainer (GPU kernels
    /// compiled before the gang waits for them), a live handover's joining member on its own
    /// while it catches up (its first step with the gang is not its model's first pass).
    pub fn warm_up(&mut self) -> Result<(), TrainError> {
        self.write_model();
        let rows = (self.train_spec.batch_size as usize).min(self.data.rows) as u32;
        if rows > 0 {
            self.local_gradient_sum(&(0..rows).collect::<Vec<u32>>())?;
        }
        Ok(())
    }

    /// The gradient summed over `rows` (their summed loss in the last slot): a forward and
    /// backward pass per `batch_size` of them (`train.accumulate_batches`: a step's rows take
    /// the memory of one batch), the passes' sums added.
    fn local_gradient_sum(&self, rows: &[u32]) -> Result<Vec<f32>, TrainError> {
        let mut batches = rows.chunks(self.train_spec.batch_size.max(1) as usize);
        let Some(first) = batches.next() else { return Ok(vec![0.0; self.layout.len + 1]) };
        let mut sum = self.batch_gradient_sum(first)?;
        for batch in batches {
            let more = self.batch_gradient_sum(batch)?;
            sum.iter_mut().zip(&more).for_each(|(total, value)| *total += value);
        }
        Ok(sum)
    }

    /// One forward and backward pass: the gradient summed over `rows`, their loss sum last.
    fn batch_gradient_sum(&self, rows: &[u32]) -> Result<Vec<f32>, TrainError> {
        let (features, labels) = self.data.gather(rows.iter().copied());
        let logits = self.model.forward(self.input(features, rows.len()));
        let loss_sum = summed_cross_entropy(logits, &labels, &self.device);
        let loss_value = flat::tensor_values(loss_sum.clone())?.first().copied().unwrap_or(f32::NAN);
        let mut grads = loss_sum.backward();
        let mut buffer = flat::flatten_gradients(&self.model, &mut grads, &self.layout, 1)?;
        *buffer.last_mut().expect("one extra slot was requested") = loss_value;
        Ok(buffer)
    }

    fn input(&self, features: Vec<f32>, rows: usize) -> Tensor<2> {
        Tensor::from_data(TensorData::new(features, [rows, self.data.features_per_row]), &self.device)
    }

    /// Accuracy and mean loss of the current weights on `data` (a validation set of the same
    /// shape). Local to this rank: no collective.
    pub fn evaluate(&self, data: &Dataset) -> Result<Metrics, TrainError> {
        self.evaluate_with(None, data)
    }

    /// Accuracy and mean loss of `params` (this model's, e.g. [`Trainer::kept_best`]'s) on `data`.
    pub fn evaluate_params(&self, params: &[f32], data: &Dataset) -> Result<Metrics, TrainError> {
        if params.len() != self.layout.len {
            return Err(TrainError::Shape(format!(
                "{} values to evaluate; the model has {} parameters",
                params.len(),
                self.layout.len
            )));
        }
        self.evaluate_with(Some(params), data)
    }

    fn evaluate_with(&self, params: Option<&[f32]>, data: &Dataset) -> Result<Metrics, TrainError> {
        if data.features_per_row != self.data.features_per_row
            || data.labels.iter().any(|&l| l as usize >= self.data.classes)
        {
            return Err(TrainError::Shape(format!(
                "{} has {} features and labels up to {}; the model takes {} features and {} classes",
                data.source,
                data.features_per_row,
                data.labels.iter().max().copied().unwrap_or(0),
                self.data.features_per_row,
                self.data.classes
            )));
        }
        let model = match params.or(self.model_stale.then_some(self.params.as_slice())) {
            Some(params) => flat::write_params(self.model.clone(), params, &self.layout).valid(),
            None => self.model.valid(),
        };
        let device = self.eval_device.clone();
        let (mut correct, mut loss_sum) = (0usize, 0.0f64);
        for start in (0..data.rows).step_by(EVAL_BATCH_ROWS) {
            let end = (start + EVAL_BATCH_ROWS).min(data.rows);
            let (features, labels) = data.gather(start as u32..end as u32);
            let input = Tensor::from_data(TensorData::new(features, [end - start, data.features_per_row]), &device);
            let logits = flat::tensor_values(model.forward(input))?;
            for (row, &label) in logits.chunks_exact(self.data.classes).zip(&labels) {
                let (best, log_sum_exp) = argmax_and_log_sum_exp(row);
                correct += usize::from(best == label as usize);
                loss_sum += log_sum_exp - f64::from(row[label as usize]);
            }
        }
        let rows = data.rows.max(1) as f64;
        Ok(Metrics { val_accuracy: correct as f64 / rows, val_loss: loss_sum / rows, rows: data.rows })
    }

    /// Trains until the spec's epochs or steps are done, `on_step` says to stop, or the gang
    /// agreed to stop ([`Trainer::vote_stop`]; `on_step` still sees that step first, so it can
    /// checkpoint with [`Trainer::state`]). Returns the last step's report (`None` when nothing
    /// was left).
    pub fn run(
        &mut self,
        comm: &mut dyn Communicator,
        mut on_step: impl FnMut(&mut Trainer, &StepReport) -> ControlFlow<()>,
    ) -> Result<Option<StepReport>, TrainError> {
        let mut last = None;
        while !self.is_finished() {
            let report = self.step(comm)?;
            last = Some(report);
            if self.finished_early {
                break; // that step changed nothing: no step to report
            }
            if on_step(self, &report).is_break() || report.stop_agreed || report.replaced == Some(self.rank) {
                break;
            }
        }
        Ok(last)
    }

    /// Everything needed to continue from here, bit-identically (see [`TrainState`]).
    pub fn state(&self) -> TrainState {
        TrainState {
            format_version: TRAIN_STATE_FORMAT_VERSION,
            step: self.step,
            cursor: self.cursor,
            params: self.params.clone(),
            optimizer: self.optimizer.clone(),
            layout_fingerprint: self.layout.fingerprint(),
            seed: self.train_spec.seed,
            train_rows: self.data.rows as u64,
            patience: self.patience,
            best_params: self.best_params.clone(),
        }
    }

    /// Whether the spec's epochs (or steps) are done.
    pub fn is_finished(&self) -> bool {
        if self.finished_early {
            return true;
        }
        match self.train_spec.length {
            TrainLength::Epochs(epochs) => self.cursor.epoch >= u64::from(epochs),
            TrainLength::Steps(steps) => self.step >= steps,
        }
    }

    /// The step count at which training ends: `train.steps`, or for `train.epochs` the steps done
    /// plus those left at the current world size (an elastic resize changes it).
    pub fn total_steps(&self) -> u64 {
        if self.finished_early {
            return self.step;
        }
        match self.train_spec.length {
            TrainLength::Steps(steps) => steps,
            TrainLength::Epochs(epochs) if self.cursor.epoch >= u64::from(epochs) => self.step,
            TrainLength::Epochs(epochs) => {
                let rows = self.data.rows as u64;
                let global_batch = self.train_spec.samples_per_worker_step() * self.world_size as u64;
                let full_epochs_left = u64::from(epochs) - self.cursor.epoch - 1;
                self.step
                    + self.cursor.steps_left_in_epoch(rows, global_batch)
                    + full_epochs_left * rows.div_ceil(global_batch)
            }
        }
    }

    pub fn steps_done(&self) -> u64 {
        self.step
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The current parameters, flattened in module order.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
}

/// A live handover's votes in one step's all-reduce, after the stop votes (see [`Handover`]).
/// Links vote their joiner's `rank + 1` and its square, so that links of several joiners
/// never add up to one joiner's pair: two links whose values sum to `2(r+1)` and whose squares
/// sum to `2(r+1)^2` are both of rank r. Ranks (at most `WORLD_MAX`) and their squares are
/// integers exact in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SwapVotes {
    /// Members leaving whose joiner caught up.
    leaving: f32,
    /// The sum of their `rank + 1`.
    leaving_ranks: f32,
    /// Joiners' proven links ([`Communicator::joining_links`]).
    links: f32,
    /// The sum of `rank + 1` over the links.
    link_ranks: f32,
    /// The sum of `(rank + 1)^2` over the links.
    link_squares: f32,
}

/// The links a joiner holds once it is ready: to its successor and from its predecessor (both
/// on one rank in a world of two; a world of one has none).
fn joiner_links(world: usize) -> f32 {
    if world == 1 { 0.0 } else { 2.0 }
}

impl SwapVotes {
    fn mine(leaving: bool, rank: usize, links: &[usize]) -> SwapVotes {
        let (leaving, leaving_ranks) = if leaving { (1.0, (rank + 1) as f32) } else { (0.0, 0.0) };
        let value = |rank: usize| (rank + 1) as f32;
        SwapVotes {
            leaving,
            leaving_ranks,
            links: links.len() as f32,
            link_ranks: links.iter().map(|&r| value(r)).sum(),
            link_squares: links.iter().map(|&r| value(r) * value(r)).sum(),
        }
    }

    fn push_to(self, buffer: &mut Vec<f32>) {
        buffer.extend([self.leaving, self.leaving_ranks, self.links, self.link_ranks, self.link_squares]);
    }

    fn pop_from(buffer: &mut Vec<f32>) -> SwapVotes {
        let mut pop = || buffer.pop().expect("the buffer ends with the handover votes");
        let link_squares = pop();
        let link_ranks = pop();
        let links = pop();
        let leaving_ranks = pop();
        SwapVotes { leaving: pop(), leaving_ranks, links, link_ranks, link_squares }
    }

    /// The rank the gang replaces after this step, once summed: exactly one member leaves, and
    /// its joiner's links to both of its neighbours are proven.
    fn agreed(self, world: usize) -> Option<usize> {
        if self.leaving != 1.0 || self.leaving_ranks < 1.0 || self.leaving_ranks > world as f32 {
            return None;
        }
        let (needed, value) = (joiner_links(world), self.leaving_ranks);
        let whole =
            self.links == needed && self.link_ranks == needed * value && self.link_squares == needed * value * value;
        whole.then_some(value as usize - 1)
    }
}

/// `-sum(log_softmax(logits)[label])` over the batch, as a one-element tensor.
fn summed_cross_entropy(logits: Tensor<2>, labels: &[u32], device: &Device) -> Tensor<1> {
    let targets: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [labels.len(), 1]), device);
    log_softmax(logits, 1).gather(1, targets).sum().neg()
}

/// Index of the largest value (first on ties) and `ln(sum(exp(row)))`, computed stably in f64.
fn argmax_and_log_sum_exp(row: &[f32]) -> (usize, f64) {
    let best = super::argmax(row);
    let max = f64::from(row.get(best).copied().unwrap_or(f32::NEG_INFINITY));
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    (best, max + sum.ln())
}

/// The device a rank trains on: the CPU for `gpus = 0`; otherwise the first GPU, after the probe
/// ([`crate::gpu::cuda_devices`]) said the driver and enough devices are there. A GPU job on a
/// machine without them gets a clear error, never a CPU run it did not ask for.
fn training_device(gpus: u32) -> Result<Device, TrainError> {
    if gpus == 0 {
        return Ok(backend::cpu());
    }
    let found =
        crate::gpu::cuda_devices().map_err(|why| TrainError::Backend(format!("workers.gpus = {gpus}: {why}")))?;
    if found < gpus as usize {
        return Err(TrainError::Backend(format!(
            "workers.gpus = {gpus}, but this machine has {found} GPU(s): lower workers.gpus or use a bigger instance"
        )));
    }
    backend::gpu(0).map_err(TrainError::Backend)
}

/// A trainer's device and burn model before the gang and the state are known
/// ([`Trainer::model`]).
pub struct Model {
    device: Device,
    eval_device: Device,
    network: Network,
    layout: ParamLayout,
    /// (features per row, classes) of the data it was built for.
    shape: (usize, usize),
}

impl Model {
    /// The state a fresh run starts from with `safetensors`' weights (`train.init_from`: a
    /// registered model's export) instead of the seeded ones: step 0, a fresh optimizer, the
    /// first epoch's order. The file must hold this model's tensors, names and shapes (the same
    /// architecture for data of the same features and classes).
    pub fn initial_state(&self, spec: &JobSpec, data: &Dataset, safetensors: &[u8]) -> Result<TrainState, TrainError> {
        let (model, _) = spec.built_in().map_err(|e| TrainError::Shape(e.to_string()))?;
        // Said as what it is (weights that do not fit), not as a checkpoint that cannot resume.
        let params = super::export::load_safetensors(model, &self.layout, safetensors).map_err(|e| match e {
            TrainError::Resume(why) => TrainError::Shape(why),
            other => other,
        })?;
        Ok(TrainState { params, ..fresh_state(&self.layout, &spec.train, data) })
    }
}

/// Bytes a parameter takes in training at the least: its value and its gradient (Adam adds two
/// moments, the all-reduce a flat copy).
const TRAINING_BYTES_PER_PARAMETER_MIN: u64 = 8;

/// Whether a model of `parameters` can train in `available` bytes of memory (pure; `None`:
/// unknown, assumed to fit). Only what surely cannot fit is refused: it would abort in an
/// allocation (SIGABRT, no message) rather than fail with a reason.
fn fits_in_memory(parameters: u64, available: Option<u64>) -> Result<(), String> {
    let needed = parameters.saturating_mul(TRAINING_BYTES_PER_PARAMETER_MIN);
    match available {
        Some(available) if needed > available => Err(format!(
            "training this model's {parameters} parameters needs at least {:.1} GiB (each value and its \
             gradient), and this machine has {:.1} GiB available: use a smaller model (model.hidden or \
             model.channels) or workers with more memory",
            super::model::gib(needed),
            super::model::gib(available)
        )),
        _ => Ok(()),
    }
}

/// The memory this process may still take, if known: the machine's (`MemAvailable` of
/// /proc/meminfo), or less where its cgroup (a container) is limited below it (v2's
/// `memory.max` less `memory.current`).
fn mem_available_bytes() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|info| {
        let line = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
        let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let number = |path: &str| read(path).and_then(|text| text.trim().parse::<u64>().ok());
    let cgroup = number("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(number("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    match (machine, cgroup) {
        (Some(machine), Some(cgroup)) => Some(machine.min(cgroup)),
        (machine, cgroup) => machine.or(cgroup),
    }
}

/// What the types cannot promise: a usable data set and a batch size.
fn check_data(spec: &JobSpec, data: &Dataset) -> Result<(), TrainError> {
    let consistent = data.labels.len() == data.rows
        && data.features.len() == data.rows.saturating_mul(data.features_per_row)
        && data.labels.iter().all(|&l| (l as usize) < data.classes);
    if data.rows == 0 || data.rows > ORDER_ROWS_MAX || !consistent {
        return Err(TrainError::Shape(format!(
            "{}: {} rows (1 to {ORDER_ROWS_MAX} needed), {} labels, {} feature values for {} per row, {} classes",
            data.source,
            data.rows,
            data.labels.len(),
            data.features.len(),
            data.features_per_row,
            data.classes
        )));
    }
    if spec.train.batch_size == 0 {
        return Err(TrainError::Shape("train.batch_size is 0".into()));
    }
    Ok(())
}

/// A sane communicator: a rank inside its world.
fn check_communicator(comm: &dyn Communicator) -> Result<(), TrainError> {
    if comm.world_size() == 0 || comm.rank() >= comm.world_size() {
        return Err(TrainError::Communicator(format!("rank {} of {}", comm.rank(), comm.world_size())));
    }
    Ok(())
}

fn fresh_state(layout: &ParamLayout, train: &TrainSpec, data: &Dataset) -> TrainState {
    TrainState {
        format_version: TRAIN_STATE_FORMAT_VERSION,
        step: 0,
        cursor: Cursor::default(),
        params: layout.initial_values(train.seed),
        optimizer: OptimizerState::new(train.optimizer, layout.len),
        layout_fingerprint: layout.fingerprint(),
        seed: train.seed,
        train_rows: data.rows as u64,
        patience: PatienceCount::default(),
        best_params: Vec::new(),
    }
}

fn check_resume(
    state: TrainState,
    layout: &ParamLayout,
    train: &TrainSpec,
    data: &Dataset,
) -> Result<TrainState, TrainError> {
    let problem = if state.format_version != TRAIN_STATE_FORMAT_VERSION {
        Some(format!("format version {} (this worker reads {TRAIN_STATE_FORMAT_VERSION})", state.format_version))
    } else if state.layout_fingerprint != layout.fingerprint() || state.params.len() != layout.len {
        Some(format!(
            "it holds {} parameters of another architecture; the model has {}",
            state.params.len(),
            layout.len
        ))
    } else if !state.optimizer.matches(train.optimizer, layout.len) {
        Some("its optimizer state is not for train.optimizer of this spec".to_string())
    } else if !state.best_params.is_empty() && state.best_params.len() != layout.len {
        Some(format!(
            "its best validated state has {} parameters; the model has {}",
            state.best_params.len(),
            layout.len
        ))
    } else if state.seed != train.seed || state.train_rows != data.rows as u64 {
        Some(format!(
            "it was trained with seed {} on {} rows; this job has seed {} and {} rows, so the sample order differs",
            state.seed, state.train_rows, train.seed, data.rows
        ))
    } else if state.cursor.global_sample_offset >= data.rows as u64 {
        Some(format!("its cursor offset {} is past the {} rows", state.cursor.global_sample_offset, data.rows))
    } else {
        None
    };
    match problem {
        Some(reason) => Err(TrainError::Resume(reason)),
        None => Ok(state),
    }
}

// The agent moves a trainer into a blocking task: it must stay `Send`.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Trainer>();
};

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &model_kind(&self.model))
            .field("params", &self.layout.len)
            .field("step", &self.step)
            .field("cursor", &self.cursor)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

fn model_kind(model: &Network) -> &'static str {
    match model {
        Network::Mlp(_) => ModelSpec::KINDS[0],
        Network::Cnn(_) => ModelSpec::KINDS[1],
    }
}

#[cfg(test)]
mod tests {
    use super::SwapVotes;

    /// The gang's sums after one all-reduce of every rank's votes.
    fn summed(votes: &[SwapVotes]) -> SwapVotes {
        let mut buffer = vec![0.0; 5];
        for vote in votes {
            let mut mine = Vec::new();
            vote.push_to(&mut mine);
            buffer.iter_mut().zip(mine).for_each(|(sum, v)| *sum += v);
        }
        SwapVotes::pop_from(&mut buffer)
    }

    #[test]
    fn a_swap_is_agreed_only_when_one_member_leaves_and_its_joiner_holds_both_links() {
        let vote = SwapVotes::mine;
        // World 3, rank 1 leaves: rank 0 holds the joiner's link as its successor, rank 2 as
        // its predecessor.
        let ready = [vote(false, 0, &[1]), vote(true, 1, &[]), vote(false, 2, &[1])];
        assert_eq!(summed(&ready).agreed(3), Some(1));
        // One link still missing; the joiner not caught up; two members leaving at once.
        let one_link = [vote(false, 0, &[1]), vote(true, 1, &[]), vote(false, 2, &[])];
        assert_eq!(summed(&one_link).agreed(3), None);
        let behind = [vote(false, 0, &[1]), vote(false, 1, &[]), vote(false, 2, &[1])];
        assert_eq!(summed(&behind).agreed(3), None);
        let two = [vote(true, 0, &[1]), vote(true, 1, &[]), vote(false, 2, &[1])];
        assert_eq!(summed(&two).agreed(3), None);
        // Links of other joiners never add up to the leaving rank's pair: ranks 0 and 2 sum to
        // 2 x rank 1 (values 1 + 3 = 2 x 2), but their squares do not (1 + 9 != 2 x 4).
        let others = [vote(false, 0, &[]), vote(true, 1, &[0, 2]), vote(false, 2, &[])];
        assert_eq!(summed(&others).agreed(3), None);
        // World 2: the one survivor holds both links; rank 0 leaving.
        let pair = [vote(true, 0, &[]), vote(false, 1, &[0, 0])];
        assert_eq!(summed(&pair).agreed(2), Some(0));
        // World 1: no links; the leaver alone decides.
        assert_eq!(summed(&[vote(true, 0, &[])]).agreed(1), Some(0));
        assert_eq!(summed(&[vote(false, 0, &[])]).agreed(1), None);
    }

    #[test]
    fn only_a_model_that_surely_cannot_fit_in_memory_is_refused() {
        use super::{fits_in_memory, mem_available_bytes};
        assert!(fits_in_memory(1 << 20, Some(8 << 20)).is_ok(), "8 bytes a parameter fit exactly");
        let error = fits_in_memory(1 << 30, Some(4 << 30)).expect_err("8 GiB in 4");
        assert!(error.contains("needs at least 8.0 GiB") && error.contains("has 4.0 GiB available"), "{error}");
        assert!(fits_in_memory(u64::MAX, None).is_ok(), "unknown memory is assumed to fit");
        assert!(mem_available_bytes().is_some_and(|bytes| bytes > 0), "read on Linux");
    }

    #[test]
    fn votes_travel_behind_the_gradient_and_come_back_in_order() {
        let mut buffer = vec![0.5, 7.0];
        let votes = SwapVotes::mine(true, 4, &[3, 5]);
        votes.push_to(&mut buffer);
        assert_eq!(SwapVotes::pop_from(&mut buffer), votes);
        assert_eq!(buffer, vec![0.5, 7.0]);
    }
}
