//! Deadlines (`capacity.deadline_h`): when a job must leave spot for on-demand capacity to
//! finish in time ("Can't Be Late", NSDI'24, is the idea). Pure.
//!
//! ```text
//!   progress report (step, total_steps, eta_ms) ─▶ Pace (ms per step, kept by the leader)
//!   now + remaining work + restart + work at risk >= deadline  ─▶  out of slack: on-demand
//! ```
//!
//! Spot is cheaper but may stop the job; on-demand is not stopped. As long as the remaining
//! work, one restart (a replacement and a resume) and the work one more interruption could lose
//! (a checkpoint interval and a few steps) still fit before the deadline, spot is safe to try;
//! once they no longer fit, the job moves to on-demand and stays there. Used by the leader's
//! autoscaling pass and by the market simulation, so the bench measures the rule that ships.

/// Steps of margin on top of a checkpoint interval (the step in flight, the stop, the resume).
pub const MARGIN_STEPS: f64 = 3.0;

/// How fast a job trains, from its progress reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Steps the job takes in all.
    pub total_steps: u64,
    /// Wall-clock milliseconds per step at the current world size.
    pub ms_per_step: f64,
}

impl Pace {
    /// From a progress report: the step reached, the total and the trainer's estimate of the
    /// time left. `None` when the report cannot say (no total, done, or no estimate yet).
    pub fn from_report(step: u64, total_steps: u64, eta_ms: u64) -> Option<Pace> {
        let left = total_steps.checked_sub(step).filter(|left| *left > 0)?;
        let ms_per_step = eta_ms as f64 / left as f64;
        (ms_per_step.is_finite() && ms_per_step > 0.0).then_some(Pace { total_steps, ms_per_step })
    }

    /// Hours of work left from `step` (the step a new generation resumes at, or the live step).
    pub fn remaining_h(&self, step: u64) -> f64 {
        self.total_steps.saturating_sub(step) as f64 * self.ms_per_step / 3_600_000.0
    }

    /// Hours of work one more interruption could cost: a checkpoint interval of
    /// `checkpoint_every_steps` and [`MARGIN_STEPS`].
    pub fn at_risk_h(&self, checkpoint_every_steps: u64) -> f64 {
        (checkpoint_every_steps as f64 + MARGIN_STEPS) * self.ms_per_step / 3_600_000.0
    }
}

/// What decides whether a job still has slack, all in hours on one clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slack {
    pub now_h: f64,
    pub deadline_h: f64,
    /// Work left.
    pub remaining_h: f64,
    /// A move or a replacement: provisioning plus the resume.
    pub restart_h: f64,
    /// Work one more interruption could lose.
    pub at_risk_h: f64,
}

impl Slack {
    /// Hours to spare (negative: late even on on-demand from now on).
    pub fn spare_h(&self) -> f64 {
        self.deadline_h - (self.now_h + self.remaining_h + self.restart_h + self.at_risk_h)
    }

    /// Whether the job must run on on-demand capacity from now on to finish by the deadline.
    /// Not a number anywhere (a broken estimate) counts as out of slack: the deadline is the
    /// user's word, the estimate only ours.
    pub fn out(&self) -> bool {
        let spare = self.spare_h();
        spare.is_nan() || spare <= 0.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_pace_comes_from_reports_that_can_say() {
        let pace = Pace::from_report(100, 1100, 2_000_000).expect("1000 steps left in 2000 s");
        assert_eq!(pace, Pace { total_steps: 1100, ms_per_step: 2000.0 });
        assert!((pace.remaining_h(200) - 0.5).abs() < 1e-12, "900 steps x 2 s");
        assert!((pace.at_risk_h(97) - 100.0 * 2.0 / 3600.0).abs() < 1e-12);
        assert_eq!(Pace::from_report(5, 0, 1000), None, "no total");
        assert_eq!(Pace::from_report(10, 10, 1000), None, "done");
        assert_eq!(Pace::from_report(11, 10, 1000), None, "past the total");
        assert_eq!(Pace::from_report(1, 10, 0), None, "no estimate yet");
    }

    #[test]
    fn slack_runs_out_when_the_work_and_one_restart_no_longer_fit() {
        let slack = Slack { now_h: 1.0, deadline_h: 5.0, remaining_h: 3.0, restart_h: 0.1, at_risk_h: 0.2 };
        assert!(!slack.out());
        assert!((slack.spare_h() - 0.7).abs() < 1e-12);
        assert!(Slack { now_h: 1.7, ..slack }.out(), "no spare hour left");
        assert!(Slack { remaining_h: f64::NAN, ..slack }.out(), "a broken estimate is not slack");
    }

    proptest! {
        /// Time only uses slack up: once out, a job stays out as the clock moves on (with the
        /// same work left), and more work left never gives slack back.
        #[test]
        fn slack_only_shrinks_with_time_and_work(
            now in 0.0f64..100.0,
            later in 0.0f64..10.0,
            deadline in 0.0f64..200.0,
            remaining in 0.0f64..100.0,
            more in 0.0f64..10.0,
            restart in 0.0f64..1.0,
            risk in 0.0f64..1.0,
        ) {
            let slack = Slack { now_h: now, deadline_h: deadline, remaining_h: remaining, restart_h: restart, at_risk_h: risk };
            if slack.out() {
                let later_out = Slack { now_h: now + later, ..slack }.out();
                let more_out = Slack { remaining_h: remaining + more, ..slack }.out();
                prop_assert!(later_out && more_out);
            }
            // On-demand from now on finishes by the deadline whenever the job is not out.
            if !slack.out() {
                prop_assert!(now + remaining + restart <= deadline);
            }
        }
    }
}
