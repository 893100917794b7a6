//! `fit`: the recipe's epoch loop as Seq2SeqTrainer runs it with `evaluation_strategy` and
//! `save_strategy` "epoch", `save_total_limit` and `load_best_model_at_end`: train an epoch,
//! evaluate every eval set (loss, and CER by generation when asked), save a checkpoint, prune
//! old ones (never the best), and end on the best adapter. Beyond HF: guard sets, whose CER
//! is compared with the zero-shot pass, can bound which checkpoint may be kept
//! ([`Objective::max_guard_regression`]), and early stopping counts evaluations without a new
//! best under that same objective ([`super::selection`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::selection::{
    patience_spent, select_best, BestMetric, EpochSummary, EvalResult, Objective,
};
use super::{Example, Progress, StepLog, Suspended, Trainer};
use crate::evaluation::{EvalSet, GenerationEval};

/// How [`Trainer::fit`] evaluates and what it keeps on disk.
#[derive(Clone)]
pub struct FitOptions<'a> {
    /// Checkpoints kept, the best always among them (HF's `save_total_limit`); `None` keeps
    /// all.
    pub save_total_limit: Option<usize>,
    /// Recorded in the adapters' config as `base_model_name_or_path`.
    pub base_model: String,
    pub objective: Objective,
    /// Also evaluate by generation (CER) with these settings.
    pub generation: Option<GenerationEval<'a>>,
    /// Scale of the adapter's delta (0..=1) at which every epoch is evaluated and the kept
    /// adapter exported (its B multiplied by it, so that it serves as evaluated at scale 1):
    /// below 1 the adapter moves the base model only part of the way. 1 is the recipe.
    pub adapter_scale: f64,
    /// Also evaluate every eval set after every this many optimiser steps within an epoch
    /// (reported through [`FitListener::evaluated`] and kept in the state; checkpoints and
    /// the choice of the kept adapter stay per epoch). `None`: at epoch ends only.
    pub eval_steps: Option<i64>,
}

/// What [`Trainer::fit`] reports as it goes. A pair of closures `(on_step, on_epoch)` is one;
/// a triple `(on_step, on_evaluated, on_epoch)` also sees the evaluations within epochs.
pub trait FitListener {
    /// Every optimiser step's log.
    fn step(&mut self, _log: &StepLog) {}
    /// An evaluation within an epoch ([`FitOptions::eval_steps`]).
    fn evaluated(&mut self, _evaluation: &StepEvaluation) {}
    /// An epoch's figures, once its checkpoint is on disk.
    fn epoch(&mut self, _summary: &EpochSummary) {}
}

impl<S: FnMut(&StepLog), E: FnMut(&EpochSummary)> FitListener for (S, E) {
    fn step(&mut self, log: &StepLog) {
        (self.0)(log)
    }
    fn epoch(&mut self, summary: &EpochSummary) {
        (self.1)(summary)
    }
}

impl<S, V, E> FitListener for (S, V, E)
where
    S: FnMut(&StepLog),
    V: FnMut(&StepEvaluation),
    E: FnMut(&EpochSummary),
{
    fn step(&mut self, log: &StepLog) {
        (self.0)(log)
    }
    fn evaluated(&mut self, evaluation: &StepEvaluation) {
        (self.1)(evaluation)
    }
    fn epoch(&mut self, summary: &EpochSummary) {
        (self.2)(summary)
    }
}

/// The figures of an evaluation within an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvaluation {
    pub step: i64,
    /// Fractional epoch.
    pub epoch: f64,
    pub evals: Vec<EvalResult>,
}

impl FitOptions<'_> {
    pub fn new(base_model: impl Into<String>) -> Self {
        Self {
            save_total_limit: None,
            base_model: base_model.into(),
            objective: Objective::default(),
            generation: None,
            adapter_scale: 1.0,
            eval_steps: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    pub epochs: Vec<EpochSummary>,
    /// The epoch whose adapter ends in the model and in `<output>/adapter`.
    pub best_epoch: usize,
    /// False when no epoch met [`Objective::max_guard_regression`] (the kept one regresses
    /// least); true without a bound.
    pub within_guard_bound: bool,
    /// Training ended before its last epoch by [`Objective::early_stopping_patience`].
    pub stopped_early: bool,
}

impl Trainer<'_> {
    /// Loss (dropout off) and, with `generation`, CER of the model as it stands on `set`.
    pub fn evaluate_set(
        &mut self,
        set: &EvalSet,
        generation: Option<&GenerationEval>,
    ) -> anyhow::Result<EvalResult> {
        self.evaluate_set_at(set, generation, 1.0)
    }

    /// [`Trainer::evaluate_set`] with the adapter's delta scaled by `scale` (see
    /// [`FitOptions::adapter_scale`]); the trained adapter is attached again afterwards.
    pub fn evaluate_set_at(
        &mut self,
        set: &EvalSet,
        generation: Option<&GenerationEval>,
        scale: f64,
    ) -> anyhow::Result<EvalResult> {
        if scale == 1.0 {
            return self.evaluate_unscaled(set, generation);
        }
        let scaled = self.adapter.scaled(scale, &self.model.linear_sites());
        self.model.attach(&scaled);
        let result = self.evaluate_unscaled(set, generation);
        self.model.attach(&self.adapter);
        result
    }

    fn evaluate_unscaled(
        &mut self,
        set: &EvalSet,
        generation: Option<&GenerationEval>,
    ) -> anyhow::Result<EvalResult> {
        let loss = self
            .evaluate(&set.examples)
            .with_context(|| format!("evaluating on {}", set.name))?;
        let cer = match generation {
            Some(generation) => {
                self.adapter.set_training(false);
                let cer = generation.cer(self.model, set);
                self.adapter.set_training(true);
                Some(cer.with_context(|| format!("transcribing {}", set.name))?)
            }
            None => None,
        };
        let baseline_cer = self
            .state
            .baseline
            .iter()
            .find(|b| b.name == set.name)
            .and_then(|b| b.cer);
        Ok(EvalResult {
            name: set.name.clone(),
            guard: set.guard,
            loss,
            cer,
            cer_regression: match (set.guard, cer, baseline_cer) {
                (true, Some(cer), Some(before)) => Some(cer - before),
                _ => None,
            },
        })
    }

    /// Every set of `evals`, as `options` evaluates them (generation, adapter scale).
    fn evaluate_all(
        &mut self,
        evals: &[EvalSet],
        options: &FitOptions,
    ) -> anyhow::Result<Vec<EvalResult>> {
        evals
            .iter()
            .map(|set| {
                self.evaluate_set_at(set, options.generation.as_ref(), options.adapter_scale)
            })
            .collect()
    }

    /// The zero-shot pass: every eval set evaluated before the first step (the fresh
    /// adapter's B is zero, so this is the base model), kept in the state and in every
    /// checkpoint. Guard regressions are measured from it. After a resume, or when already
    /// done, it returns the kept results without evaluating again.
    pub fn evaluate_baseline(
        &mut self,
        evals: &[EvalSet],
        generation: Option<&GenerationEval>,
    ) -> anyhow::Result<Vec<EvalResult>> {
        if self.state.global_step == 0 && self.state.baseline.is_empty() {
            let mut results = Vec::with_capacity(evals.len());
            for set in evals {
                results.push(self.evaluate_set(set, generation)?);
            }
            self.state.baseline = results;
        }
        Ok(self.state.baseline.clone())
    }

    /// Epoch after epoch until done: train, evaluate each of `evals`, save
    /// `<output>/checkpoint-epoch-N`, prune old checkpoints, and finally load the adapter that
    /// `options.objective` selects ([`select_best`]; the last epoch when nothing is evaluated)
    /// into the model and write it to `<output>/adapter`. With early stopping it ends once the
    /// patience is spent. After [`Trainer::resume`] it continues where the checkpoint left
    /// off, its earlier epochs' figures included.
    pub fn fit(
        &mut self,
        train: &[Example],
        evals: &[EvalSet],
        output: &Path,
        options: &FitOptions,
        mut listener: impl FitListener,
    ) -> anyhow::Result<FitSummary> {
        let objective = options.objective;
        anyhow::ensure!(
            (0.0..=1.0).contains(&options.adapter_scale),
            "the adapter scale must be in 0..=1, got {}",
            options.adapter_scale
        );
        anyhow::ensure!(
            objective.metric != BestMetric::Cer || options.generation.is_some(),
            "choosing the best checkpoint by CER needs evaluation by generation"
        );
        if objective.max_guard_regression.is_some() {
            anyhow::ensure!(
                evals.iter().any(|e| e.guard),
                "a bound on guard regression needs at least one guard eval set"
            );
            anyhow::ensure!(
                options.generation.is_some(),
                "a bound on guard regression needs evaluation by generation (CER)"
            );
            let missing: Vec<&str> = evals
                .iter()
                .filter(|e| e.guard)
                .filter(|e| {
                    !self
                        .state
                        .baseline
                        .iter()
                        .any(|b| b.name == e.name && b.cer.is_some())
                })
                .map(|e| e.name.as_str())
                .collect();
            anyhow::ensure!(
                missing.is_empty(),
                "a bound on guard regression needs the zero-shot CER of every guard set \
                 (evaluate_baseline with generation); missing: {}",
                missing.join(", ")
            );
        }
        let mut stopped_early = false;
        // Training time of the epoch under way, evaluations within it excluded.
        let mut epoch_started = Instant::now();
        loop {
            // Only an end before the last epoch counts as stopping early.
            if !self.finished() && patience_spent(&self.state.epochs, &objective) {
                stopped_early = true;
                break;
            }
            let pause_every = options.eval_steps.filter(|&n| n > 0);
            match self.train_until(train, |log| listener.step(log), pause_every) {
                Ok(Progress::EpochEnded) => {}
                Ok(Progress::Complete) => break,
                Ok(Progress::Paused) => {
                    let evaluating = Instant::now();
                    let evaluation = StepEvaluation {
                        step: self.state.global_step,
                        epoch: self.state.log.last().map_or(0.0, |l| l.epoch),
                        evals: self.evaluate_all(evals, options)?,
                    };
                    listener.evaluated(&evaluation);
                    self.state.step_evals.push(evaluation);
                    epoch_started += evaluating.elapsed();
                    continue;
                }
                Err(e) if e.downcast_ref::<Suspended>().is_some() => {
                    self.save_checkpoint(&interrupted_dir(output), &options.base_model)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            // After a mid-epoch resume this times only the steps since.
            let seconds = epoch_started.elapsed().as_secs_f64();
            let epoch_logs =
                &self.state.log[self.state.epoch_log_start.min(self.state.log.len())..];
            let train_loss =
                epoch_logs.iter().map(|l| l.loss).sum::<f64>() / epoch_logs.len().max(1) as f64;
            let samples = (epoch_logs.len() * self.config.batch_size * self.config.grad_accum)
                .min(train.len());
            let results = self.evaluate_all(evals, options)?;
            let summary = EpochSummary {
                epoch: self.state.epochs_done,
                steps: self.state.global_step,
                train_loss,
                samples_per_second: samples as f64 / seconds.max(1e-9),
                evals: results,
            };
            self.state.epochs.push(summary);
            self.save_checkpoint(
                &checkpoint_dir(output, self.state.epochs_done),
                &options.base_model,
            )?;
            // Superseded by the epoch's checkpoint.
            let interrupted = interrupted_dir(output);
            if interrupted.exists() {
                std::fs::remove_dir_all(&interrupted)
                    .with_context(|| format!("removing {}", interrupted.display()))?;
            }
            let best = select_best(&self.state.epochs, &objective).epoch;
            if let Some(limit) = options.save_total_limit {
                let saved: Vec<usize> = self.state.epochs.iter().map(|s| s.epoch).collect();
                for epoch in checkpoints_to_prune(&saved, best, limit) {
                    let dir = checkpoint_dir(output, epoch);
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("removing {}", dir.display()))?;
                    }
                }
            }
            // Reported once its checkpoint is on disk, so a listener may rely on it.
            if let Some(summary) = self.state.epochs.last() {
                listener.epoch(summary);
            }
            epoch_started = Instant::now();
        }
        let best = select_best(&self.state.epochs, &objective);
        if best.epoch > 0 {
            self.load_adapter_weights(&checkpoint_dir(output, best.epoch))?;
            let exported = if options.adapter_scale == 1.0 {
                None
            } else {
                Some(
                    self.adapter
                        .scaled(options.adapter_scale, &self.model.linear_sites()),
                )
            };
            exported
                .as_ref()
                .unwrap_or(&self.adapter)
                .save_peft(&output.join("adapter"), &options.base_model)?;
        }
        Ok(FitSummary {
            epochs: self.state.epochs.clone(),
            best_epoch: best.epoch,
            within_guard_bound: best.within_guard_bound,
            stopped_early,
        })
    }
}

/// `<output>/checkpoint-epoch-N`.
pub fn checkpoint_dir(output: &Path, epoch: usize) -> PathBuf {
    output.join(format!("checkpoint-epoch-{epoch}"))
}

/// `<output>/checkpoint-interrupted`: the mid-epoch checkpoint of a suspended run.
pub fn interrupted_dir(output: &Path) -> PathBuf {
    output.join("checkpoint-interrupted")
}

/// The optimiser step a checkpoint directory holds, if it holds a complete one.
pub fn checkpoint_step(dir: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(dir.join(super::STATE_FILE)).ok()?;
    let state: super::TrainerState = serde_json::from_str(&text).ok()?;
    Some(state.global_step)
}

/// Which of the `saved` epochs (oldest first) to delete, as HF's `save_total_limit` with
/// `load_best_model_at_end`: at most `limit` checkpoints, the best always among them (with a
/// limit of 1, the best and the latest when they differ).
pub fn checkpoints_to_prune(saved: &[usize], best: usize, limit: usize) -> Vec<usize> {
    let latest = saved.last().copied().unwrap_or(0);
    let keep = limit.max(1).max(if best == latest { 1 } else { 2 });
    let excess = saved.len().saturating_sub(keep);
    saved
        .iter()
        .copied()
        .filter(|&e| e != best)
        .take(excess)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_best_and_the_latest() {
        assert_eq!(checkpoints_to_prune(&[1, 2, 3], 3, 1), vec![1, 2]);
        assert_eq!(checkpoints_to_prune(&[1, 2, 3], 1, 1), vec![2]);
        assert_eq!(checkpoints_to_prune(&[1, 2, 3, 4], 2, 2), vec![1, 3]);
        assert_eq!(checkpoints_to_prune(&[1, 2, 3], 2, 5), Vec::<usize>::new());
    }
}
