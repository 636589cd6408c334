//! Optimizers on flat buffers: SGD with momentum and Adam, with the spec's weight decay.
//!
//! Owns: the update arithmetic and the optimizer state, which is plain `Vec<f32>` (plus Adam's
//! step count), so a checkpoint holds it exactly and a resume continues bit-identically.
//! Must not touch: burn, collectives, data. Pure functions of their inputs.
//!
//! Conventions (those of PyTorch's `SGD` and `Adam`, and burn's): weight decay is L2, added to
//! the gradient (`g += weight_decay x p`) before the update; SGD momentum has no dampening and no
//! Nesterov term (`v = mu v + g; p -= lr v`); Adam uses beta1 0.9, beta2 0.999, epsilon 1e-8 and
//! bias correction (`p -= lr m_hat / (sqrt(v_hat) + eps)`).

use flotilla_proto::spec::OptimizerSpec;
use serde::{Deserialize, Serialize};

pub const ADAM_BETA1: f32 = 0.9;
pub const ADAM_BETA2: f32 = 0.999;
pub const ADAM_EPSILON: f32 = 1e-8;

/// Everything an optimizer carries from one step to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerState {
    /// Momentum buffer, one value per parameter (zeros before the first step).
    Sgd { velocity: Vec<f32> },
    /// First and second moment estimates, and the number of updates applied (for bias correction).
    Adam { first_moment: Vec<f32>, second_moment: Vec<f32>, updates: u64 },
}

/// The hyper-parameters of one update, from the job's `[train]` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    pub optimizer: OptimizerSpec,
    /// This update's rate (`train.lr_schedule` makes it change from step to step).
    pub learning_rate: f32,
    pub weight_decay: f32,
    /// Multiplies the gradient before anything else (`train.clip_grad_norm`'s clipping); 1 is
    /// exact (`g x 1 = g`), so an unclipped step is bit-identical to one without the factor.
    pub gradient_scale: f32,
}

/// The factor that scales a gradient of L2 norm `norm` down to `max_norm` (1 when it is not
/// longer), as PyTorch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    ((max_norm / (norm + 1e-6)).min(1.0)) as f32
}

/// The L2 norm of `values`, summed in f64 in order (the same bits on every rank).
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

impl OptimizerState {
    /// The state before the first step, for `len` parameters.
    pub fn new(optimizer: OptimizerSpec, len: usize) -> OptimizerState {
        match optimizer {
            OptimizerSpec::Sgd { .. } => OptimizerState::Sgd { velocity: vec![0.0; len] },
            OptimizerSpec::Adam => {
                OptimizerState::Adam { first_moment: vec![0.0; len], second_moment: vec![0.0; len], updates: 0 }
            }
        }
    }

    /// Whether this state belongs to `optimizer` with `len` parameters.
    pub fn matches(&self, optimizer: OptimizerSpec, len: usize) -> bool {
        match (self, optimizer) {
            (OptimizerState::Sgd { velocity }, OptimizerSpec::Sgd { .. }) => velocity.len() == len,
            (OptimizerState::Adam { first_moment, second_moment, .. }, OptimizerSpec::Adam) => {
                first_moment.len() == len && second_moment.len() == len
            }
            _ => false,
        }
    }

    /// Applies one update to `params` with the averaged gradient `gradient` (same length).
    pub fn step(&mut self, hyper: &Hyper, params: &mut [f32], gradient: &[f32]) {
        assert_eq!(params.len(), gradient.len(), "the trainer sizes both from the layout");
        let (lr, decay, scale) = (hyper.learning_rate, hyper.weight_decay, hyper.gradient_scale);
        match (self, hyper.optimizer) {
            (OptimizerState::Sgd { velocity }, OptimizerSpec::Sgd { momentum }) => {
                let momentum = momentum as f32;
                for ((p, &g), v) in params.iter_mut().zip(gradient).zip(velocity.iter_mut()) {
                    let g = g * scale + decay * *p;
                    *v = momentum * *v + g;
                    *p -= lr * *v;
                }
            }
            (OptimizerState::Adam { first_moment, second_moment, updates }, OptimizerSpec::Adam) => {
                *updates += 1;
                let exponent = i32::try_from(*updates).unwrap_or(i32::MAX);
                let correction1 = 1.0 - f64::from(ADAM_BETA1).powi(exponent);
                let correction2 = 1.0 - f64::from(ADAM_BETA2).powi(exponent);
                // p -= lr * (m / c1) / (sqrt(v / c2) + eps), with the corrections folded in f64.
                let step_size = (f64::from(lr) / correction1) as f32;
                let sqrt_correction2 = correction2.sqrt() as f32;
                let moments = first_moment.iter_mut().zip(second_moment.iter_mut());
                for ((p, &g), (m, v)) in params.iter_mut().zip(gradient).zip(moments) {
                    let g = g * scale + decay * *p;
                    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
                    *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / sqrt_correction2 + ADAM_EPSILON);
                }
            }
            _ => unreachable!("Trainer::new checks that the state matches the spec's optimizer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(optimizer: OptimizerSpec, learning_rate: f32, weight_decay: f32) -> Hyper {
        Hyper { optimizer, learning_rate, weight_decay, gradient_scale: 1.0 }
    }

    #[test]
    fn clipping_scales_a_long_gradient_to_the_limit_and_leaves_a_short_one() {
        let gradient = [3.0f32, 4.0];
        assert_eq!(l2_norm(&gradient), 5.0);
        let factor = clip_factor(l2_norm(&gradient), 1.0);
        assert!((factor - 0.2).abs() < 1e-6, "{factor}");
        assert_eq!(clip_factor(l2_norm(&gradient), 10.0), 1.0, "shorter than the limit: unchanged");
        // The factor applies before weight decay: SGD without momentum moves by lr x g x factor.
        let h = Hyper { gradient_scale: factor, ..hyper(OptimizerSpec::Sgd { momentum: 0.0 }, 1.0, 0.0) };
        let mut state = OptimizerState::new(h.optimizer, 2);
        let mut p = [0.0f32, 0.0];
        state.step(&h, &mut p, &gradient);
        assert!((l2_norm(&p) - 1.0).abs() < 1e-5, "the update has the clipped length: {p:?}");
    }

    #[test]
    fn sgd_with_momentum_matches_the_formula() {
        let h = hyper(OptimizerSpec::Sgd { momentum: 0.5 }, 0.1, 0.0);
        let mut state = OptimizerState::new(h.optimizer, 1);
        let mut p = [1.0f32];
        state.step(&h, &mut p, &[2.0]); // v = 2, p = 1 - 0.2
        assert!((p[0] - 0.8).abs() < 1e-7);
        state.step(&h, &mut p, &[2.0]); // v = 0.5*2 + 2 = 3, p = 0.8 - 0.3
        assert!((p[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn weight_decay_pulls_towards_zero() {
        let h = hyper(OptimizerSpec::Sgd { momentum: 0.0 }, 0.1, 0.5);
        let mut state = OptimizerState::new(h.optimizer, 1);
        let mut p = [2.0f32];
        state.step(&h, &mut p, &[0.0]); // g = 0.5 * 2 = 1, p = 2 - 0.1
        assert!((p[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_the_learning_rate() {
        // With bias correction, the first update is lr * g / (|g| + eps): about lr in size.
        let h = hyper(OptimizerSpec::Adam, 0.01, 0.0);
        let mut state = OptimizerState::new(h.optimizer, 2);
        let mut p = [1.0f32, -1.0];
        state.step(&h, &mut p, &[3.0, -0.001]);
        assert!((p[0] - 0.99).abs() < 1e-6, "{p:?}");
        assert!((p[1] + 0.99).abs() < 1e-4, "{p:?}");
        assert!(matches!(state, OptimizerState::Adam { updates: 1, .. }));
        assert!(state.matches(OptimizerSpec::Adam, 2));
        assert!(!state.matches(OptimizerSpec::Sgd { momentum: 0.9 }, 2));
    }
}
