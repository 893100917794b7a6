//! The recipe's training loop, with the Seq2SeqTrainer semantics it relies on: epochs over a
//! seeded shuffle (HF Trainer's order for the seed), micro-batches accumulated into optimiser
//! steps (the last, shorter window of an epoch steps too), global-norm clipping, AdamW on a
//! linear schedule, a step log (loss, lr, grad norm), and checkpoints (adapter in PEFT's
//! layout, optimiser state, trainer state) from which a resumed run continues exactly as an
//! uninterrupted one: the data order and the dropout masks derive from the seed and the
//! position alone.
//!
//! The data order (and, on CUDA, the dropout masks) come from libtorch's process-wide
//! generator, reseeded at every epoch and micro-batch: that exactness holds while one
//! training runs in the process at a time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::labels::{collate_labels, label_loss};
use crate::lora::Adapter;
use crate::model::Whisper;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, GradScaler, LinearSchedule};
pub use crate::train_data::Example;

mod fit;
mod selection;
pub use fit::{
    checkpoint_dir, checkpoint_step, checkpoints_to_prune, interrupted_dir, FitListener,
    FitOptions, FitSummary, StepEvaluation,
};
pub use selection::{select_best, BestMetric, EpochSummary, EvalResult, Objective, Selection};

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
    pub mixed_precision: MixedPrecision,
}

/// Precision of the model's products during training (adapters, optimiser state, layer norms
/// and the loss stay float32; see [`Whisper::set_compute_kind`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MixedPrecision {
    /// Float32 products (the int8 GEMM for an int8 base).
    #[default]
    No,
    /// bfloat16 products: float32's range, no loss scaling needed.
    Bf16,
    /// float16 products with dynamic loss scaling (the recipe's `fp16=True`, for CUDA).
    Fp16,
}

impl MixedPrecision {
    pub fn compute_kind(self) -> Option<Kind> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(Kind::BFloat16),
            MixedPrecision::Fp16 => Some(Kind::Half),
        }
    }
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
            mixed_precision: MixedPrecision::No,
        }
    }
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
    /// Training examples per second over the step.
    pub samples_per_second: f64,
}

/// Where training stands (saved with every checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: i64,
    /// Epochs completed.
    pub epochs_done: usize,
    pub log: Vec<StepLog>,
    /// Each finished epoch's figures (from [`Trainer::fit`]).
    #[serde(default)]
    pub epochs: Vec<EpochSummary>,
    /// The loss scaler of fp16 training.
    #[serde(default)]
    pub scaler: Option<GradScaler>,
    /// Optimiser steps skipped because fp16 gradients overflowed.
    #[serde(default)]
    pub skipped_steps: i64,
    /// Optimiser steps done in the epoch under way: a checkpoint saved mid-epoch (see
    /// [`Trainer::suspend`]) resumes after them, in the same data order.
    #[serde(default)]
    pub windows_done: usize,
    /// Index in `log` of the epoch under way's first step.
    #[serde(default)]
    pub epoch_log_start: usize,
    /// The evaluations every [`FitOptions::eval_steps`] steps within epochs.
    #[serde(default)]
    pub step_evals: Vec<StepEvaluation>,
    /// The zero-shot pass over the eval sets ([`Trainer::evaluate_baseline`]), from which
    /// guard regressions are measured (kept here so that a resumed run still has it).
    #[serde(default)]
    pub baseline: Vec<EvalResult>,
}

/// Where [`Trainer::train_until`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Training was already complete; nothing ran.
    Complete,
    /// An epoch ended (possibly the last).
    EpochEnded,
    /// Mid-epoch, at a multiple of the pause interval.
    Paused,
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
    /// Set from another thread to stop before the next optimiser step ([`Cancelled`]).
    pub stop: Option<Arc<AtomicBool>>,
    /// Set from another thread to stop before the next optimiser step so that training can
    /// continue later ([`Suspended`]; `fit` keeps a mid-epoch checkpoint first).
    pub suspend: Option<Arc<AtomicBool>>,
}

/// Training was stopped through [`Trainer::stop`]; the state is that of the last completed
/// step (checkpoints written so far stay valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("training cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Training was stopped through [`Trainer::suspend`] to be resumed later; `fit` saved the
/// state of the last completed step in [`fit::interrupted_dir`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspended;

impl std::fmt::Display for Suspended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("training suspended")
    }
}

impl std::error::Error for Suspended {}

fn flag_set(flag: &Option<Arc<AtomicBool>>) -> bool {
    flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
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
        model.set_compute_kind(config.mixed_precision.compute_kind());
        // The int8 base computes as bitsandbytes does under PEFT: 8-bit activations, not the
        // 7-bit ones of fbgemm's inference path (on a tiny random model they moved the first
        // loss by 1%, against 0.2% between fp32 and bf16 compute).
        model.set_symmetric_int8(true);
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
        let scaler = (config.mixed_precision == MixedPrecision::Fp16).then(GradScaler::default);
        Ok(Self {
            model,
            adapter,
            config,
            ids,
            optimizer,
            schedule,
            state: TrainerState {
                scaler,
                ..Default::default()
            },
            stop: None,
            suspend: None,
        })
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Trainable and all parameters of the model with its adapter (PEFT's two counts).
    pub fn parameter_counts(&self) -> (i64, i64) {
        self.model.parameter_counts()
    }

    /// Optimiser steps the whole run takes (the schedule's length).
    pub fn total_steps(&self) -> i64 {
        self.schedule.total
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
        on_step: impl FnMut(&StepLog),
    ) -> anyhow::Result<bool> {
        Ok(self.train_until(examples, on_step, None)? != Progress::Complete)
    }

    /// [`Trainer::train_epoch`] that also pauses after every optimiser step that is a
    /// multiple of `pause_every` (not the epoch's last); called again, it continues the epoch
    /// where it paused, exactly as a suspended run resumes.
    pub(crate) fn train_until(
        &mut self,
        examples: &[Example],
        mut on_step: impl FnMut(&StepLog),
        pause_every: Option<i64>,
    ) -> anyhow::Result<Progress> {
        if self.finished() {
            return Ok(Progress::Complete);
        }
        let epoch = self.state.epochs_done;
        let order = epoch_order(examples.len(), self.config.seed, epoch)?;
        let batches: Vec<&[usize]> = order.chunks(self.config.batch_size).collect();
        let device = self.model.encoder.device();
        if self.state.windows_done == 0 {
            self.state.epoch_log_start = self.state.log.len();
        }
        let windows = batches.chunks(self.config.grad_accum).enumerate();
        for (window_index, window) in windows.skip(self.state.windows_done) {
            if flag_set(&self.stop) {
                return Err(Cancelled.into());
            }
            if flag_set(&self.suspend) {
                return Err(Suspended.into());
            }
            let started = std::time::Instant::now();
            let mut loss_sum = 0.0;
            for (k, batch) in window.iter().enumerate() {
                // Dropout masks from the position alone, so that a resumed run draws the same.
                let micro = (window_index * self.config.grad_accum + k) as i64;
                let key = (self.config.seed as i64)
                    .wrapping_mul(1_000_003)
                    .wrapping_add(epoch as i64 * 1_000_000 + micro);
                tch::manual_seed(key);
                crate::lora_dropout::seed_dropout(key as u64);
                let loss = self.micro_batch_loss(examples, batch, device)?;
                let loss_scale = self.state.scaler.as_ref().map_or(1.0, |s| s.scale);
                (&loss * (loss_scale / window.len() as f64)).backward();
                loss_sum += loss.double_value(&[]);
            }
            let params = self.adapter.trainable_tensors();
            let overflowed = self
                .state
                .scaler
                .as_ref()
                .is_some_and(|scaler| scaler.unscale(&params));
            let grad_norm = clip_grad_norm(&params, self.config.max_grad_norm);
            let lr = self.schedule.lr(self.state.global_step);
            // As torch.amp: a step whose gradients overflowed is skipped (the schedule still
            // advances), and the scale adapts.
            if overflowed {
                self.state.skipped_steps += 1;
            } else {
                self.optimizer.step(lr);
            }
            if let Some(scaler) = &mut self.state.scaler {
                scaler.update(overflowed);
            }
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
                samples_per_second: window.iter().map(|b| b.len()).sum::<usize>() as f64
                    / started.elapsed().as_secs_f64().max(1e-9),
            };
            on_step(&log);
            self.state.log.push(log);
            self.state.windows_done = window_index + 1;
            if self.finished() {
                break;
            }
            let epoch_ends = self.state.windows_done * self.config.grad_accum >= batches.len();
            if !epoch_ends && pause_every.is_some_and(|n| self.state.global_step % n == 0) {
                return Ok(Progress::Paused);
            }
        }
        self.state.windows_done = 0;
        self.state.epochs_done += 1;
        Ok(Progress::EpochEnded)
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
        let n_mels = self.model.config.num_mel_bins;
        let mut flat = Vec::with_capacity(batch.len() * n_mels * 3000);
        for &i in batch {
            flat.extend_from_slice(&examples[i].read_window(n_mels)?);
        }
        let mel = Tensor::from_slice(&flat)
            .view([batch.len() as i64, n_mels as i64, 3000])
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

    /// Writes the adapter (PEFT layout), the optimiser state and the trainer state to `dir`,
    /// atomically: into a sibling staging directory, synced, then renamed into place (a
    /// process killed meanwhile leaves the old checkpoint or none, never half of one).
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("a checkpoint directory needs a name")?;
        let staging = dir.with_file_name(format!(".{name}.partial"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        self.write_checkpoint_files(&staging, base_model)?;
        for entry in std::fs::read_dir(&staging)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&staging, dir)
            .with_context(|| format!("moving the checkpoint into {}", dir.display()))?;
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    fn write_checkpoint_files(&self, dir: &Path, base_model: &str) -> anyhow::Result<()> {
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

/// The order in which epoch `epoch` visits `n` examples: HF Trainer's, so that a seed visits
/// the clips as the notebook does. accelerate's seedable sampler draws `torch.randperm(n)`
/// from a generator seeded with `seed + epoch`; this draws it from libtorch's process-wide
/// generator, seeded the same (training reseeds that generator at every micro-batch anyway).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> anyhow::Result<Vec<usize>> {
    tch::manual_seed(seed.wrapping_add(epoch as u64) as i64);
    let order = Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu));
    Ok(Vec::<i64>::try_from(&order)?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let order = |seed, epoch| epoch_order(10, seed, epoch).expect("order");
        let a = order(7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, order(7, 0));
        assert_ne!(a, order(7, 1));
        assert_eq!(order(7, 1), order(8, 0));
    }
}
