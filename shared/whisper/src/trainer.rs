//! The recipe's training loop, with the Seq2SeqTrainer semantics it relies on: epochs over a
//! seeded shuffle, micro-batches accumulated into optimiser steps (the last, shorter window of
//! an epoch steps too), global-norm clipping, AdamW on a linear schedule, a step log (loss, lr,
//! grad norm), and checkpoints (adapter in PEFT's layout, optimiser state, trainer state) from
//! which a resumed run continues exactly as an uninterrupted one: the data order and the
//! dropout masks derive from the seed and the position alone.
//!
//! The dropout masks come from libtorch's process-wide generator, reseeded at every
//! micro-batch: that exactness holds while one training runs in the process at a time.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::labels::{collate_labels, label_loss};
use crate::lora::Adapter;
use crate::model::Whisper;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LinearSchedule};

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    pub optimizer: AdamWConfig,
    pub warmup_steps: i64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Stop after this many optimiser steps (the schedule then spans them).
    pub max_steps: Option<i64>,
}

impl Default for TrainConfig {
    /// The recipe's: 3 epochs, batch 4, accumulation 4, lr 1e-3, clipping at 1.0, seed 42.
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 4,
            grad_accum: 4,
            optimizer: AdamWConfig::default(),
            warmup_steps: 0,
            max_grad_norm: 1.0,
            seed: 42,
            max_steps: None,
        }
    }
}

/// One training example: a normalised window and its label tokens (see [`crate::labels`]).
#[derive(Debug, Clone)]
pub struct Example {
    pub window: Vec<f32>,
    pub labels: Vec<i64>,
}

/// The logged figures of one optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: i64,
    /// Fractional epoch at the end of the step.
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Where training stands (saved with every checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: i64,
    /// Epochs completed.
    pub epochs_done: usize,
    pub log: Vec<StepLog>,
}

/// Token ids the collator needs.
#[derive(Debug, Clone, Copy)]
pub struct LabelIds {
    pub decoder_start: i64,
    pub pad: i64,
}

pub struct Trainer<'a> {
    model: &'a mut Whisper,
    adapter: Adapter,
    config: TrainConfig,
    ids: LabelIds,
    optimizer: AdamW,
    schedule: LinearSchedule,
    pub state: TrainerState,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

impl<'a> Trainer<'a> {
    /// Attaches `adapter` to `model` for training on `examples` examples per epoch.
    pub fn new(
        model: &'a mut Whisper,
        adapter: Adapter,
        config: TrainConfig,
        ids: LabelIds,
        examples: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(examples > 0, "the training set is empty");
        anyhow::ensure!(
            config.batch_size > 0 && config.grad_accum > 0,
            "batch size and gradient accumulation must be positive"
        );
        model.attach(&adapter);
        adapter.set_training(true);
        let batches = examples.div_ceil(config.batch_size);
        let steps_per_epoch = batches.div_ceil(config.grad_accum) as i64;
        let total = config
            .max_steps
            .unwrap_or(steps_per_epoch * config.epochs as i64);
        let schedule = LinearSchedule {
            base_lr: config.optimizer.lr,
            warmup: config.warmup_steps,
            total,
        };
        let optimizer = AdamW::new(adapter.trainable_tensors(), config.optimizer);
        Ok(Self {
            model,
            adapter,
            config,
            ids,
            optimizer,
            schedule,
            state: TrainerState::default(),
        })
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    fn finished(&self) -> bool {
        self.state.epochs_done >= self.config.epochs
            || self
                .config
                .max_steps
                .is_some_and(|max| self.state.global_step >= max)
    }

    /// Trains the next epoch (or up to `max_steps`); `on_step` sees every step's log. Returns
    /// false when training was already complete.
    pub fn train_epoch(
        &mut self,
        examples: &[Example],
        mut on_step: impl FnMut(&StepLog),
    ) -> anyhow::Result<bool> {
        if self.finished() {
            return Ok(false);
        }
        let epoch = self.state.epochs_done;
        let order = shuffled(examples.len(), self.config.seed ^ (epoch as u64 + 1));
        let batches: Vec<&[usize]> = order.chunks(self.config.batch_size).collect();
        let device = self.model.encoder.device();
        for (window_index, window) in batches.chunks(self.config.grad_accum).enumerate() {
            let mut loss_sum = 0.0;
            for (k, batch) in window.iter().enumerate() {
                // Dropout masks from the position alone, so that a resumed run draws the same.
                let micro = (window_index * self.config.grad_accum + k) as i64;
                tch::manual_seed(
                    (self.config.seed as i64)
                        .wrapping_mul(1_000_003)
                        .wrapping_add(epoch as i64 * 1_000_000 + micro),
                );
                let loss = self.micro_batch_loss(examples, batch, device)?;
                (&loss / window.len() as f64).backward();
                loss_sum += loss.double_value(&[]);
            }
            let params = self.adapter.trainable_tensors();
            let grad_norm = clip_grad_norm(&params, self.config.max_grad_norm);
            let lr = self.schedule.lr(self.state.global_step);
            self.optimizer.step(lr);
            self.optimizer.zero_grad();
            self.state.global_step += 1;
            let log = StepLog {
                step: self.state.global_step,
                epoch: epoch as f64
                    + ((window_index + 1) * self.config.grad_accum).min(batches.len()) as f64
                        / batches.len() as f64,
                loss: loss_sum / window.len() as f64,
                lr,
                grad_norm,
            };
            on_step(&log);
            self.state.log.push(log);
            if self.finished() {
                break;
            }
        }
        self.state.epochs_done += 1;
        Ok(true)
    }

    /// Mean label loss over `examples` in batches of `batch_size`, dropout off (the
    /// per-epoch eval loss).
    pub fn evaluate(&mut self, examples: &[Example]) -> anyhow::Result<f64> {
        anyhow::ensure!(!examples.is_empty(), "the evaluation set is empty");
        self.adapter.set_training(false);
        let device = self.model.encoder.device();
        let order: Vec<usize> = (0..examples.len()).collect();
        let result = tch::no_grad(|| -> anyhow::Result<f64> {
            let (mut sum, mut rows) = (0.0, 0usize);
            for batch in order.chunks(self.config.batch_size) {
                let loss = self.micro_batch_loss(examples, batch, device)?;
                sum += loss.double_value(&[]) * batch.len() as f64;
                rows += batch.len();
            }
            Ok(sum / rows as f64)
        });
        self.adapter.set_training(true);
        result
    }

    fn micro_batch_loss(
        &mut self,
        examples: &[Example],
        batch: &[usize],
        device: Device,
    ) -> anyhow::Result<Tensor> {
        let n_mels = self.model.config.num_mel_bins as i64;
        let flat: Vec<f32> = batch
            .iter()
            .flat_map(|&i| examples[i].window.iter().copied())
            .collect();
        let mel = Tensor::from_slice(&flat)
            .view([batch.len() as i64, n_mels, 3000])
            .to_device(device)
            .to_kind(self.model.encoder.kind());
        let rows: Vec<Vec<i64>> = batch.iter().map(|&i| examples[i].labels.clone()).collect();
        let labels = collate_labels(&rows, self.ids.decoder_start, self.ids.pad);
        let encoded = self.model.encoder.forward(&mel);
        let mut cache = self.model.decoder.new_cache(&encoded);
        let logits = self
            .model
            .decoder
            .forward(&labels.decoder_input_ids.to_device(device), &mut cache);
        Ok(label_loss(&logits, &labels.labels.to_device(device)))
    }

    /// Writes the adapter (PEFT layout), the optimiser state and the trainer state to `dir`.
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
        self.adapter.save_peft(dir, base_model)?;
        let state: Vec<(String, Tensor)> = self
            .optimizer
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect();
        Tensor::write_safetensors(&state, dir.join(OPTIMIZER_FILE))
            .with_context(|| format!("writing the optimizer state in {}", dir.display()))?;
        std::fs::write(
            dir.join(STATE_FILE),
            serde_json::to_string_pretty(&self.state)?,
        )?;
        Ok(())
    }

    /// Copies the adapter saved in `dir` into the one being trained (the optimiser keeps
    /// referring to the same tensors).
    fn load_adapter_weights(&mut self, dir: &Path) -> anyhow::Result<()> {
        let device = self.model.encoder.device();
        let saved = Adapter::load_peft(dir, &self.model.linear_sites(), device)?;
        tch::no_grad(|| {
            for (ours, theirs) in self
                .adapter
                .trainable_tensors()
                .iter()
                .zip(saved.trainable_tensors())
            {
                ours.shallow_clone().copy_(&theirs);
            }
        });
        Ok(())
    }

    /// Continues from a checkpoint of [`Self::save_checkpoint`] (same model, data and config).
    pub fn resume(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.load_adapter_weights(dir)?;
        self.state = serde_json::from_str(
            &std::fs::read_to_string(dir.join(STATE_FILE))
                .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?,
        )?;
        let optimizer_state = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))?;
        self.optimizer
            .load_state(&optimizer_state, self.state.global_step)?;
        Ok(())
    }
}

/// What [`Trainer::fit`] keeps on disk.
#[derive(Debug, Clone)]
pub struct FitOptions {
    /// Checkpoints kept besides the best one (HF's `save_total_limit`); `None` keeps all.
    pub save_total_limit: Option<usize>,
    /// Recorded in the adapters' config as `base_model_name_or_path`.
    pub base_model: String,
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    pub steps: i64,
    pub train_loss: f64,
    pub eval_loss: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    pub epochs: Vec<EpochSummary>,
    /// The epoch with the lowest eval loss, whose adapter ends in `<output>/adapter`.
    pub best_epoch: usize,
}

impl Trainer<'_> {
    /// Epoch after epoch until done: train, evaluate, save `<output>/checkpoint-epoch-N`,
    /// prune old checkpoints (never the best), and finally load the best adapter into the
    /// model and write it to `<output>/adapter` (HF's `load_best_model_at_end` on eval loss).
    /// Resumes from `resume_from` first when given.
    pub fn fit(
        &mut self,
        train: &[Example],
        eval: &[Example],
        output: &Path,
        options: &FitOptions,
        mut on_step: impl FnMut(&StepLog),
        mut on_epoch: impl FnMut(&EpochSummary),
    ) -> anyhow::Result<FitSummary> {
        let mut summaries: Vec<EpochSummary> = Vec::new();
        loop {
            let before = self.state.log.len();
            if !self.train_epoch(train, &mut on_step)? {
                break;
            }
            let epoch_logs = &self.state.log[before..];
            let train_loss =
                epoch_logs.iter().map(|l| l.loss).sum::<f64>() / epoch_logs.len().max(1) as f64;
            let summary = EpochSummary {
                epoch: self.state.epochs_done,
                steps: self.state.global_step,
                train_loss,
                eval_loss: self.evaluate(eval)?,
            };
            on_epoch(&summary);
            summaries.push(summary);
            self.save_checkpoint(
                &checkpoint_dir(output, self.state.epochs_done),
                &options.base_model,
            )?;
            let best = best_epoch(&summaries);
            if let Some(limit) = options.save_total_limit {
                let saved: Vec<usize> = summaries.iter().map(|s| s.epoch).collect();
                for epoch in checkpoints_to_prune(&saved, best, limit) {
                    let dir = checkpoint_dir(output, epoch);
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("removing {}", dir.display()))?;
                    }
                }
            }
        }
        let best = best_epoch(&summaries);
        if best > 0 {
            self.load_adapter_weights(&checkpoint_dir(output, best))?;
            self.adapter
                .save_peft(&output.join("adapter"), &options.base_model)?;
        }
        Ok(FitSummary {
            epochs: summaries,
            best_epoch: best,
        })
    }
}

/// `<output>/checkpoint-epoch-N`.
pub fn checkpoint_dir(output: &Path, epoch: usize) -> std::path::PathBuf {
    output.join(format!("checkpoint-epoch-{epoch}"))
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

/// The epoch with the lowest eval loss (the first of equals); 0 when none ran.
fn best_epoch(summaries: &[EpochSummary]) -> usize {
    summaries
        .iter()
        .fold(None::<&EpochSummary>, |best, s| match best {
            Some(b) if b.eval_loss <= s.eval_loss => Some(b),
            _ => Some(s),
        })
        .map_or(0, |s| s.epoch)
}

/// A permutation of `0..n` from `seed` (SplitMix64 driving Fisher-Yates): the same on every
/// machine and run.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
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

    #[test]
    fn shuffles_are_permutations_fixed_by_the_seed() {
        let a = shuffled(10, 7);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, shuffled(10, 7));
        assert_ne!(a, shuffled(10, 8));
    }
}
