//! The training runner: one thread that runs queued jobs one at a time with the recipe's
//! trainer on its own int8 copy of the base model, reporting events as it goes; the best
//! adapter goes into the registry when a job succeeds.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use asr_proto::v1 as pb;
use asr_whisper::evaluation::{EvalSet, GenerationEval};
use asr_whisper::labels::label_tokens;
use asr_whisper::train_data::{Example, Window};
use asr_whisper::trainer::{
    checkpoint_dir, checkpoint_step, interrupted_dir, select_best, BestMetric, Cancelled,
    EpochSummary, EvalResult, FitOptions, LabelIds, StepEvaluation, StepLog, Suspended, Trainer,
};
use asr_whisper::{Adapter, LoadOptions, LoadedModel, OutputProjection, Precision};
use tch::Device;
use tokio::sync::mpsc;

use crate::datasets::DatasetStore;
use crate::registry::Registry;
use crate::store::now;
use crate::training::jobs::{JobRecord, Jobs};
use crate::training::spec::{DataRef, JobSpec};
use crate::training::suspend::SuspendHandle;

use pb::training_event::Event;

pub struct Runner {
    pub jobs: Jobs,
    pub datasets: DatasetStore,
    pub registry: Registry,
    pub model_dir: PathBuf,
    pub device: Device,
    pub metrics: asr_runtime::metrics::Registry,
    pub suspend: SuspendHandle,
}

impl Runner {
    /// Runs jobs from `queue` until the service stops.
    pub fn spawn(self, mut queue: mpsc::Receiver<String>) {
        let spawned = std::thread::Builder::new()
            .name("training-runner".into())
            .spawn(move || {
                while let Some(id) = queue.blocking_recv() {
                    self.run(&id);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the training thread");
        }
    }

    fn run(&self, id: &str) {
        let (record, spec, stop) = match self.jobs.for_run(id) {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot read the job");
                return;
            }
        };
        if record.state() != pb::TrainingJobState::Queued {
            return; // cancelled while queued
        }
        if self.suspend.is_suspended() {
            return; // the service is stopping: the job stays queued for the next start
        }
        let _busy = self.suspend.running();
        let _ = self.jobs.update(id, |r| {
            r.state = pb::TrainingJobState::Running as i32;
            r.started.get_or_insert(now());
        });
        tracing::info!(job = %id, "training job started");
        let started = Instant::now();
        let outcome = self.train(id, &record, &spec, stop);
        let global_step = self
            .jobs
            .for_run(id)
            .map(|(r, _, _)| r.global_step)
            .unwrap_or(0);
        let (state, event) = match outcome {
            Ok(finished) => (
                pb::TrainingJobState::Succeeded,
                Event::JobFinished(pb::training_event::JobFinished {
                    train_runtime_seconds: started.elapsed().as_secs_f64(),
                    ..finished
                }),
            ),
            Err(e) if e.downcast_ref::<Suspended>().is_some() => {
                let _ = self
                    .jobs
                    .update(id, |r| r.state = pb::TrainingJobState::Queued as i32);
                tracing::info!(job = %id, global_step, "training suspended with a checkpoint; it resumes at the next start");
                return;
            }
            Err(e) if e.downcast_ref::<Cancelled>().is_some() => (
                pb::TrainingJobState::Cancelled,
                Event::JobCancelled(pb::training_event::JobCancelled { global_step }),
            ),
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(job = %id, %reason, "training job failed");
                let _ = self.jobs.update(id, |r| r.error = reason.clone());
                (
                    pb::TrainingJobState::Failed,
                    Event::JobFailed(pb::training_event::JobFailed {
                        reason,
                        global_step,
                    }),
                )
            }
        };
        let _ = self.jobs.update(id, |r| {
            r.state = state as i32;
            r.finished = Some(now());
        });
        if let Err(e) = self.jobs.push_event(id, event) {
            tracing::error!(job = %id, error = %e, "recording the job's end");
        }
        tracing::info!(job = %id, state = state.as_str_name(), "training job ended");
    }

    /// Examples of a dataset split, windows read from the store when their batch comes.
    fn examples(
        &self,
        data: &DataRef,
        model: &LoadedModel,
        language: &str,
        spec: &JobSpec,
    ) -> anyhow::Result<(Vec<Example>, Vec<String>)> {
        let dataset = self.datasets.get(&data.dataset)?;
        anyhow::ensure!(
            dataset.meta.n_mels == model.n_mels(),
            "dataset {} holds {}-mel features; the model takes {}",
            data.dataset,
            dataset.meta.n_mels,
            model.n_mels()
        );
        let mut examples = Vec::new();
        let mut texts = Vec::new();
        for stored in dataset.split(&data.split) {
            let labels = label_tokens(
                &model.tokenizer,
                &model.generation,
                &stored.text,
                Some(language),
                spec.task,
            )?;
            examples.push(Example {
                window: Window::Cached(dataset.window_path(stored.index)),
                labels,
            });
            texts.push(stored.text.clone());
        }
        anyhow::ensure!(
            !examples.is_empty(),
            "dataset {} has no examples in split {:?}",
            data.dataset,
            data.split
        );
        Ok((examples, texts))
    }

    fn train(
        &self,
        id: &str,
        record: &JobRecord,
        spec: &JobSpec,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<pb::training_event::JobFinished> {
        let language = if spec.language.is_empty() {
            self.datasets.get(&spec.train.dataset)?.meta.language
        } else {
            spec.language.clone()
        };
        anyhow::ensure!(
            !language.is_empty(),
            "no language: set hyperparameters.language or ingest the dataset with one"
        );
        let mut loaded = LoadedModel::load(
            &self.model_dir,
            LoadOptions {
                device: self.device,
                precision: Precision::Int8,
                // The logits' gradient flows through this projection: keep it in fp32.
                output_projection: Some(OutputProjection::Tied),
                ..Default::default()
            },
        )
        .context("loading the base model for training")?;
        let (mut train, _) = self.examples(&spec.train, &loaded, &language, spec)?;
        if let Some((data, fraction)) = &spec.mix {
            let want = (train.len() as f64 * fraction / (1.0 - fraction)).round() as usize;
            let (mut mixed, _) = self
                .examples(data, &loaded, &language, spec)
                .context("mix_dataset")?;
            anyhow::ensure!(
                mixed.len() >= want,
                "mix_fraction {fraction} needs {want} examples of mix_dataset {}, which has {}",
                data.dataset,
                mixed.len()
            );
            mixed.truncate(want);
            train.extend(mixed);
        }
        let mut evals = Vec::with_capacity(1 + spec.guards.len());
        if let Some(data) = &spec.eval {
            let (examples, texts) = self.examples(data, &loaded, &language, spec)?;
            evals.push(EvalSet {
                name: "eval".into(),
                guard: false,
                examples,
                texts,
            });
        }
        for guard in &spec.guards {
            let (examples, texts) = self
                .examples(&guard.data, &loaded, &language, spec)
                .with_context(|| format!("guard eval set {}", guard.name))?;
            evals.push(EvalSet {
                name: guard.name.clone(),
                guard: true,
                examples,
                texts,
            });
        }
        tch::manual_seed(spec.train_config.seed as i64);
        let adapter = Adapter::init(spec.lora.clone(), &loaded.model.linear_sites(), self.device)?;
        let mut config = spec.train_config.clone();
        config.mixed_precision = spec
            .mixed_precision(self.device)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids = LabelIds {
            decoder_start: loaded.generation.decoder_start_token_id,
            pad: loaded.generation.eos_token_id,
        };
        // The trainer borrows the network; evaluation borrows the tokenizer and prompt beside it.
        let LoadedModel {
            model,
            generation,
            tokenizer,
            ..
        } = &mut loaded;
        let generation_eval = spec.predict_with_generate.then(|| GenerationEval {
            generation,
            tokenizer,
            language: Some(language.clone()),
            task: spec.task,
            max_length: spec.generation_max_length,
            batch_size: spec.eval_batch_size,
        });
        let steps_per_epoch = train
            .len()
            .div_ceil(config.batch_size)
            .div_ceil(config.grad_accum) as u64;
        let mut trainer = Trainer::new(model, adapter, config, ids, train.len())?;
        trainer.stop = Some(stop);
        trainer.suspend = Some(self.suspend.flag());
        let output = self.jobs.dir_of(id).join("output");
        if let Some(dir) = resume_point(&output) {
            trainer
                .resume(&dir)
                .with_context(|| format!("resuming from {}", dir.display()))?;
            self.jobs.push_event(
                id,
                Event::Resumed(pb::training_event::Resumed {
                    checkpoint: dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    from_step: trainer.state.global_step as u64,
                }),
            )?;
        }
        let (trainable, all) = trainer.parameter_counts();
        let max_steps = trainer.total_steps() as u64;
        let _ = self.jobs.update(id, |r| r.max_steps = max_steps);
        if record.started.is_none() || trainer.state.global_step == 0 {
            self.jobs.push_event(
                id,
                Event::JobStarted(pb::training_event::JobStarted {
                    max_steps,
                    steps_per_epoch,
                    train_example_count: train.len() as u64,
                    eval_example_count: evals.first().map_or(0, |e| e.examples.len() as u64),
                    trainable_parameters: trainable as u64,
                    total_parameters: all as u64,
                    device: format!("{:?}", self.device),
                }),
            )?;
        }
        // The zero-shot pass, once per job (a resumed job has it in its checkpoint).
        if !evals.is_empty() && trainer.state.baseline.is_empty() && trainer.state.global_step == 0
        {
            let baseline = trainer.evaluate_baseline(&evals, generation_eval.as_ref())?;
            self.jobs
                .push_event(id, evaluated_event(0.0, 0, &baseline, &evals))?;
        }
        let jobs = &self.jobs;
        let logging_steps = spec.logging_steps.max(1) as i64;
        let metrics = &self.metrics;
        let last_step = std::cell::Cell::new(Instant::now());
        let on_step = |log: &StepLog| {
            asr_runtime::allocator::after_training_step(log.step);
            metrics.observe(
                "asr_model_training_step_seconds",
                "Wall time of one optimiser step (with its gradient accumulation).",
                vec![],
                &[0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0],
                last_step.replace(Instant::now()).elapsed().as_secs_f64(),
            );
            let _ = jobs.update(id, |r| {
                r.global_step = log.step as u64;
                r.epoch = log.epoch as f32;
                r.latest_loss = Some(log.loss as f32);
            });
            if log.step % logging_steps == 0 || log.step as u64 == max_steps {
                let _ = jobs.push_event(
                    id,
                    Event::StepLogged(pb::training_event::StepLogged {
                        global_step: log.step as u64,
                        epoch: log.epoch as f32,
                        loss: log.loss as f32,
                        learning_rate: log.lr as f32,
                        grad_norm: log.grad_norm as f32,
                        samples_per_second: log.samples_per_second as f32,
                        peak_memory_bytes: 0,
                    }),
                );
            }
        };
        let objective = spec.objective;
        let metric = objective.metric;
        // Every evaluated epoch so far (those before a resume included), to tell whether the
        // newest is the best under the objective.
        let mut evaluated = trainer.state.epochs.clone();
        let on_epoch = |summary: &EpochSummary| {
            let _ = jobs.push_event(
                id,
                evaluated_event(
                    summary.epoch as f32,
                    summary.steps as u64,
                    &summary.evals,
                    &evals,
                ),
            );
            evaluated.push(summary.clone());
            let value = summary.metric(metric);
            let is_best = select_best(&evaluated, &objective).epoch == summary.epoch;
            let name = format!("checkpoint-epoch-{}", summary.epoch);
            if is_best {
                let _ = jobs.update(id, |r| {
                    r.best_metric = value.map(|v| v as f32);
                    r.best_checkpoint = name.clone();
                });
            }
            let _ = jobs.push_event(
                id,
                Event::CheckpointSaved(pb::training_event::CheckpointSaved {
                    global_step: summary.steps as u64,
                    path: checkpoint_dir(&output, summary.epoch).display().to_string(),
                    name,
                    is_best,
                    metric: value.map(|v| v as f32),
                }),
            );
        };
        let options = FitOptions {
            save_total_limit: spec.save_total_limit,
            objective,
            generation: generation_eval.clone(),
            adapter_scale: spec.adapter_scale,
            eval_steps: spec.eval_steps,
            ..FitOptions::new(self.model_dir.display().to_string())
        };
        let on_evaluated = |evaluation: &StepEvaluation| {
            let _ = jobs.push_event(
                id,
                evaluated_event(
                    evaluation.epoch as f32,
                    evaluation.step as u64,
                    &evaluation.evals,
                    &evals,
                ),
            );
        };
        let fit = match trainer.fit(
            &train,
            &evals,
            &output,
            &options,
            (on_step, on_evaluated, on_epoch),
        ) {
            Err(e) if e.downcast_ref::<Suspended>().is_some() => {
                let _ = self.jobs.push_event(
                    id,
                    Event::CheckpointSaved(pb::training_event::CheckpointSaved {
                        global_step: trainer.state.global_step as u64,
                        name: "checkpoint-interrupted".into(),
                        path: interrupted_dir(&output).display().to_string(),
                        is_best: false,
                        metric: None,
                    }),
                );
                return Err(e);
            }
            other => other?,
        };
        let adapter_dir = output.join("adapter");
        if !adapter_dir.join("adapter_config.json").exists() {
            trainer
                .adapter()
                .save_peft(&adapter_dir, &self.model_dir.display().to_string())?;
        }
        self.registry
            .install(&spec.output_adapter, &adapter_dir, "trained", id, "")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = self
            .jobs
            .update(id, |r| r.adapter = spec.output_adapter.clone());
        let best_summary = fit.epochs.iter().find(|e| e.epoch == fit.best_epoch);
        let train_loss = fit.epochs.last().map_or(0.0, |e| e.train_loss);
        Ok(pb::training_event::JobFinished {
            best_checkpoint: format!("checkpoint-epoch-{}", fit.best_epoch),
            best_metric: best_summary
                .and_then(|s| s.metric(metric))
                .map(|v| v as f32),
            metric: match metric {
                BestMetric::EvalLoss => pb::BestModelMetric::EvalLoss,
                BestMetric::Cer => pb::BestModelMetric::Cer,
            } as i32,
            adapter: spec.output_adapter.clone(),
            global_step: trainer.state.global_step as u64,
            train_loss: train_loss as f32,
            train_runtime_seconds: 0.0,
            within_guard_bound: fit.within_guard_bound,
            stopped_early: fit.stopped_early,
            best_results: best_summary
                .map(|s| eval_set_results(&s.evals, &evals))
                .unwrap_or_default(),
            baseline_results: eval_set_results(&trainer.state.baseline, &evals),
        })
    }
}

/// The `Evaluated` event of an evaluation at `epoch` (fractional; 0 for the zero-shot pass).
fn evaluated_event(epoch: f32, step: u64, results: &[EvalResult], evals: &[EvalSet]) -> Event {
    Event::Evaluated(pb::training_event::Evaluated {
        epoch,
        global_step: step,
        results: eval_set_results(results, evals),
        runtime_seconds: 0.0,
    })
}

/// Trainer results as the proto reports them, with each set's example count.
fn eval_set_results(results: &[EvalResult], evals: &[EvalSet]) -> Vec<pb::EvalSetResult> {
    results
        .iter()
        .map(|r| pb::EvalSetResult {
            name: r.name.clone(),
            guard: r.guard,
            loss: r.loss as f32,
            cer: r.cer.map(|c| c as f32),
            wer: None,
            cer_regression: r.cer_regression.map(|c| c as f32),
            example_count: evals
                .iter()
                .find(|e| e.name == r.name)
                .map_or(0, |e| e.examples.len() as u64),
        })
        .collect()
}

/// Where a job continues from: the checkpoint under `output` with the most steps, the
/// mid-epoch `checkpoint-interrupted` of a suspended run included.
fn resume_point(output: &std::path::Path) -> Option<PathBuf> {
    let epoch = latest_checkpoint(output).map(|epoch| checkpoint_dir(output, epoch));
    let interrupted = Some(interrupted_dir(output)).filter(|dir| dir.exists());
    [epoch, interrupted]
        .into_iter()
        .flatten()
        .filter_map(|dir| Some((checkpoint_step(&dir)?, dir)))
        .max_by_key(|(step, _)| *step)
        .map(|(_, dir)| dir)
}

/// The latest `checkpoint-epoch-N` under `output`.
fn latest_checkpoint(output: &std::path::Path) -> Option<usize> {
    std::fs::read_dir(output)
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-epoch-")?
                .parse::<usize>()
                .ok()
        })
        .filter(|&epoch| {
            checkpoint_dir(output, epoch)
                .join("trainer_state.json")
                .exists()
        })
        .max()
}
