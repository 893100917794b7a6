//! `fit`: the recipe's epoch loop as Seq2SeqTrainer runs it with `evaluation_strategy` and
//! `save_strategy` "epoch", `save_total_limit` and `load_best_model_at_end`: train an epoch,
//! evaluate every eval set (loss, and CER by generation when asked), save a checkpoint, prune
//! old ones (never the best), and end on the best adapter.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Example, StepLog, Suspended, Trainer};
use crate::evaluation::{EvalSet, GenerationEval};

/// What `load_best_model_at_end` compares, on the first eval set (lower is better for both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BestMetric {
    #[default]
    EvalLoss,
    /// Needs [`FitOptions::generation`].
    Cer,
}

/// How [`Trainer::fit`] evaluates and what it keeps on disk.
#[derive(Clone)]
pub struct FitOptions<'a> {
    /// Checkpoints kept, the best always among them (HF's `save_total_limit`); `None` keeps
    /// all.
    pub save_total_limit: Option<usize>,
    /// Recorded in the adapters' config as `base_model_name_or_path`.
    pub base_model: String,
    pub metric_for_best: BestMetric,
    /// Also evaluate by generation (CER) with these settings.
    pub generation: Option<GenerationEval<'a>>,
}

impl FitOptions<'_> {
    pub fn new(base_model: impl Into<String>) -> Self {
        Self {
            save_total_limit: None,
            base_model: base_model.into(),
            metric_for_best: BestMetric::EvalLoss,
            generation: None,
        }
    }
}

/// One eval set's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub name: String,
    pub loss: f64,
    /// Corpus CER (0.05 = 5 %) when evaluated by generation.
    pub cer: Option<f64>,
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
    /// The first eval set's figure for `metric`.
    pub fn metric(&self, metric: BestMetric) -> Option<f64> {
        let first = self.evals.first()?;
        match metric {
            BestMetric::EvalLoss => Some(first.loss),
            BestMetric::Cer => first.cer,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    pub epochs: Vec<EpochSummary>,
    /// The epoch whose adapter ends in the model and in `<output>/adapter`.
    pub best_epoch: usize,
}

impl Trainer<'_> {
    /// Loss (dropout off) and, with `generation`, CER of the model as it stands on `set`.
    pub fn evaluate_set(
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
        Ok(EvalResult {
            name: set.name.clone(),
            loss,
            cer,
        })
    }

    /// Epoch after epoch until done: train, evaluate each of `evals`, save
    /// `<output>/checkpoint-epoch-N`, prune old checkpoints, and finally load the best
    /// adapter (by `options.metric_for_best` on the first eval set; the last epoch when there
    /// is none) into the model and write it to `<output>/adapter`. After [`Trainer::resume`]
    /// it continues where the checkpoint left off, its earlier epochs' figures included.
    pub fn fit(
        &mut self,
        train: &[Example],
        evals: &[EvalSet],
        output: &Path,
        options: &FitOptions,
        mut on_step: impl FnMut(&StepLog),
        mut on_epoch: impl FnMut(&EpochSummary),
    ) -> anyhow::Result<FitSummary> {
        anyhow::ensure!(
            options.metric_for_best != BestMetric::Cer || options.generation.is_some(),
            "choosing the best checkpoint by CER needs evaluation by generation"
        );
        loop {
            let started = Instant::now();
            match self.train_epoch(train, &mut on_step) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) if e.downcast_ref::<Suspended>().is_some() => {
                    self.save_checkpoint(&interrupted_dir(output), &options.base_model)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            // After a mid-epoch resume this times only the steps since.
            let seconds = started.elapsed().as_secs_f64();
            let epoch_logs =
                &self.state.log[self.state.epoch_log_start.min(self.state.log.len())..];
            let train_loss =
                epoch_logs.iter().map(|l| l.loss).sum::<f64>() / epoch_logs.len().max(1) as f64;
            let samples = (epoch_logs.len() * self.config.batch_size * self.config.grad_accum)
                .min(train.len());
            let mut results = Vec::with_capacity(evals.len());
            for set in evals {
                results.push(self.evaluate_set(set, options.generation.as_ref())?);
            }
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
            let best = best_epoch(&self.state.epochs, options.metric_for_best);
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
                on_epoch(summary);
            }
        }
        let best = best_epoch(&self.state.epochs, options.metric_for_best);
        if best > 0 {
            self.load_adapter_weights(&checkpoint_dir(output, best))?;
            self.adapter
                .save_peft(&output.join("adapter"), &options.base_model)?;
        }
        Ok(FitSummary {
            epochs: self.state.epochs.clone(),
            best_epoch: best,
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

/// The epoch with the lowest `metric` (the first of equals); the last epoch when no epoch has
/// the metric; 0 when none ran.
fn best_epoch(summaries: &[EpochSummary], metric: BestMetric) -> usize {
    let best = summaries
        .iter()
        .filter_map(|s| s.metric(metric).map(|m| (s.epoch, m)))
        .fold(None::<(usize, f64)>, |best, (epoch, m)| match best {
            Some((_, b)) if b <= m => best,
            _ => Some((epoch, m)),
        });
    best.map(|(epoch, _)| epoch)
        .or_else(|| summaries.last().map(|s| s.epoch))
        .unwrap_or(0)
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

    fn summary(epoch: usize, loss: f64, cer: Option<f64>) -> EpochSummary {
        EpochSummary {
            epoch,
            steps: epoch as i64,
            train_loss: 1.0,
            samples_per_second: 1.0,
            evals: vec![EvalResult {
                name: "dev".into(),
                loss,
                cer,
            }],
        }
    }

    #[test]
    fn the_best_epoch_follows_the_chosen_metric() {
        let epochs = [
            summary(1, 0.5, Some(0.10)),
            summary(2, 0.4, Some(0.12)),
            summary(3, 0.4, Some(0.10)),
        ];
        assert_eq!(best_epoch(&epochs, BestMetric::EvalLoss), 2);
        assert_eq!(best_epoch(&epochs, BestMetric::Cer), 1);
        let without_cer = [summary(1, 0.5, None), summary(2, 0.6, None)];
        assert_eq!(best_epoch(&without_cer, BestMetric::Cer), 2);
        assert_eq!(best_epoch(&[], BestMetric::EvalLoss), 0);
    }
}
