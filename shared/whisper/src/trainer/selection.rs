//! Which checkpoint a run keeps and when it stops: the figures of an evaluation, HF's
//! `metric_for_best_model` on the in-domain set, a bound on guard sets' CER regression from
//! the zero-shot pass, and early stopping's patience, all over the epochs evaluated so far.

use serde::{Deserialize, Serialize};

/// What `load_best_model_at_end` compares, on the first in-domain (non-guard) eval set (lower
/// is better for both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BestMetric {
    #[default]
    EvalLoss,
    /// Needs [`super::FitOptions::generation`].
    Cer,
}

/// Which checkpoint is kept and when training stops. The default is the recipe's: the best
/// by eval loss, no guard bound, no early stopping.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Objective {
    pub metric: BestMetric,
    /// Largest CER increase over the zero-shot pass (absolute: 0.01 = one point) allowed on
    /// any guard set. A checkpoint beyond it is kept only when every checkpoint is (then the
    /// one that regresses least, and [`super::FitSummary::within_guard_bound`] is false). Needs
    /// generation and [`super::Trainer::evaluate_baseline`].
    pub max_guard_regression: Option<f64>,
    /// Stop after this many evaluations without a new best (HF's EarlyStoppingCallback
    /// patience); 0 never stops early.
    pub early_stopping_patience: usize,
}

/// One eval set's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub name: String,
    /// Evaluated as a guard set.
    #[serde(default)]
    pub guard: bool,
    pub loss: f64,
    /// Corpus CER (0.05 = 5 %) when evaluated by generation.
    pub cer: Option<f64>,
    /// Guard sets: CER minus the zero-shot pass's CER (positive = worse than before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cer_regression: Option<f64>,
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    /// Optimiser steps done at the end of the epoch.
    pub steps: i64,
    pub train_loss: f64,
    pub samples_per_second: f64,
    /// Every eval set, in the order given.
    pub evals: Vec<EvalResult>,
}

impl EpochSummary {
    /// The first in-domain eval set's figure for `metric`.
    pub fn metric(&self, metric: BestMetric) -> Option<f64> {
        let first = self.evals.iter().find(|e| !e.guard)?;
        match metric {
            BestMetric::EvalLoss => Some(first.loss),
            BestMetric::Cer => first.cer,
        }
    }

    /// The largest CER regression of any guard set; `None` without guard regressions.
    pub fn worst_guard_regression(&self) -> Option<f64> {
        self.evals
            .iter()
            .filter_map(|e| e.cer_regression)
            .reduce(f64::max)
    }

    /// Whether every guard set stays within `bound` (true without a bound).
    pub fn within_guard_bound(&self, bound: Option<f64>) -> bool {
        let Some(bound) = bound else { return true };
        // A hair of slack so that a regression equal to the bound passes despite rounding.
        self.evals
            .iter()
            .filter(|e| e.guard)
            .all(|e| e.cer_regression.is_some_and(|r| r <= bound + 1e-9))
    }
}

/// The checkpoint an [`Objective`] keeps among evaluated epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// 0 when no epoch was evaluated.
    pub epoch: usize,
    pub within_guard_bound: bool,
}

/// The epoch `objective` keeps: among the epochs within the guard bound, the one with the
/// lowest metric (the first of equals; the last of them when none has the metric). When no
/// epoch is within the bound, the one whose worst guard regression is smallest. 0 when none
/// ran.
pub fn select_best(summaries: &[EpochSummary], objective: &Objective) -> Selection {
    let admissible: Vec<&EpochSummary> = summaries
        .iter()
        .filter(|s| s.within_guard_bound(objective.max_guard_regression))
        .collect();
    if admissible.is_empty() {
        let least_regressed = summaries
            .iter()
            .map(|s| (s.epoch, s.worst_guard_regression().unwrap_or(f64::INFINITY)))
            .fold(None::<(usize, f64)>, |best, (epoch, r)| match best {
                Some((_, b)) if b <= r => best,
                _ => Some((epoch, r)),
            });
        return Selection {
            epoch: least_regressed.map_or(0, |(epoch, _)| epoch),
            within_guard_bound: summaries.is_empty(),
        };
    }
    let best = admissible
        .iter()
        .filter_map(|s| s.metric(objective.metric).map(|m| (s.epoch, m)))
        .fold(None::<(usize, f64)>, |best, (epoch, m)| match best {
            Some((_, b)) if b <= m => best,
            _ => Some((epoch, m)),
        });
    Selection {
        epoch: best
            .map(|(epoch, _)| epoch)
            .or_else(|| admissible.last().map(|s| s.epoch))
            .unwrap_or(0),
        within_guard_bound: true,
    }
}

/// Whether early stopping ends training: `patience` evaluations have passed since the one
/// [`select_best`] keeps.
pub(crate) fn patience_spent(summaries: &[EpochSummary], objective: &Objective) -> bool {
    let Some(latest) = summaries.last() else {
        return false;
    };
    objective.early_stopping_patience > 0
        && latest.epoch - select_best(summaries, objective).epoch
            >= objective.early_stopping_patience
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(epoch: usize, loss: f64, cer: Option<f64>) -> EpochSummary {
        EpochSummary {
            epoch,
            steps: epoch as i64,
            train_loss: 1.0,
            samples_per_second: 1.0,
            evals: vec![EvalResult {
                name: "dev".into(),
                guard: false,
                loss,
                cer,
                cer_regression: None,
            }],
        }
    }

    fn guarded(epoch: usize, cer: f64, regressions: &[f64]) -> EpochSummary {
        let mut s = summary(epoch, 1.0, Some(cer));
        for (i, r) in regressions.iter().enumerate() {
            s.evals.push(EvalResult {
                name: format!("guard{i}"),
                guard: true,
                loss: 1.0,
                cer: Some(0.1 + r),
                cer_regression: Some(*r),
            });
        }
        s
    }

    fn by(metric: BestMetric) -> Objective {
        Objective {
            metric,
            ..Default::default()
        }
    }

    #[test]
    fn the_best_epoch_follows_the_chosen_metric() {
        let epochs = [
            summary(1, 0.5, Some(0.10)),
            summary(2, 0.4, Some(0.12)),
            summary(3, 0.4, Some(0.10)),
        ];
        assert_eq!(select_best(&epochs, &by(BestMetric::EvalLoss)).epoch, 2);
        assert_eq!(select_best(&epochs, &by(BestMetric::Cer)).epoch, 1);
        let without_cer = [summary(1, 0.5, None), summary(2, 0.6, None)];
        assert_eq!(select_best(&without_cer, &by(BestMetric::Cer)).epoch, 2);
        assert_eq!(select_best(&[], &by(BestMetric::EvalLoss)).epoch, 0);
    }

    #[test]
    fn the_guard_bound_excludes_epochs_that_forget() {
        // In-domain CER falls each epoch while guard set 1 regresses more and more.
        let epochs = [
            guarded(1, 0.30, &[0.0, 0.005]),
            guarded(2, 0.20, &[-0.01, 0.01]),
            guarded(3, 0.10, &[0.0, 0.04]),
        ];
        let bounded = |bound| Objective {
            metric: BestMetric::Cer,
            max_guard_regression: Some(bound),
            early_stopping_patience: 0,
        };
        assert_eq!(select_best(&epochs, &by(BestMetric::Cer)).epoch, 3);
        let kept = select_best(&epochs, &bounded(0.01));
        assert_eq!((kept.epoch, kept.within_guard_bound), (2, true));
        assert_eq!(select_best(&epochs, &bounded(0.005)).epoch, 1);
        // Nothing within the bound: the epoch that regresses least, flagged.
        let kept = select_best(&epochs, &bounded(0.001));
        assert_eq!((kept.epoch, kept.within_guard_bound), (1, false));
    }

    #[test]
    fn early_stopping_counts_evaluations_since_the_best() {
        let patience = |p| Objective {
            metric: BestMetric::EvalLoss,
            max_guard_regression: None,
            early_stopping_patience: p,
        };
        let epochs = [
            summary(1, 0.5, None),
            summary(2, 0.4, None),
            summary(3, 0.45, None),
            summary(4, 0.41, None),
        ];
        assert!(!patience_spent(&epochs[..2], &patience(1)));
        assert!(patience_spent(&epochs[..3], &patience(1)));
        assert!(!patience_spent(&epochs[..3], &patience(2)));
        assert!(patience_spent(&epochs, &patience(2)));
        assert!(!patience_spent(&epochs, &patience(0)));
        assert!(!patience_spent(&[], &patience(1)));
        // An epoch beyond the guard bound is no improvement, however low its loss.
        let guarded_epochs = [guarded(1, 0.3, &[0.0]), guarded(2, 0.1, &[0.05])];
        let objective = Objective {
            metric: BestMetric::Cer,
            max_guard_regression: Some(0.01),
            early_stopping_patience: 1,
        };
        assert!(patience_spent(&guarded_epochs, &objective));
    }
}
