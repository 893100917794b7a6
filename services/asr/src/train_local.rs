//! `asr train --local`: the recipe in this process. Datasets → cached features and labels →
//! the int8 base with a LoRA adapter → `Trainer::fit`, with a progress bar, a step log, an
//! epoch table and `<output>/train_summary.json`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use asr_audio::{FeaturePipeline, MelConfig, PipelineConfig};
use asr_whisper::dataset::read_dataset;
use asr_whisper::evaluation::{EvalSet, GenerationEval};
use asr_whisper::feature_cache::FeatureCache;
use asr_whisper::lora::trainable_parameters_line;
use asr_whisper::optim::AdamWConfig;
use asr_whisper::train_data::{prepare_set, LabelSpec, PreparedSet};
use asr_whisper::trainer::{
    checkpoint_dir, BestMetric, EpochSummary, EvalResult, FitOptions, LabelIds, MixedPrecision,
    Objective, StepEvaluation, StepLog, TrainConfig, Trainer,
};
use asr_whisper::{Adapter, LoadOptions, LoadedModel, OutputProjection, Precision, Task};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::process::peak_rss_bytes;
use crate::train::LoraArgs;
use crate::train_guard::GuardArgs;
use crate::train_report::{eval_cell, print_before_after, print_epoch_table};
use crate::transcribe::{parse_device, TaskArg};

/// The recipe's flags, named as the notebook's `Seq2SeqTrainingArguments` name them.
#[derive(Args)]
pub struct RecipeArgs {
    /// Training data: a JSONL manifest ({"audio", "text"} per line) or a Common Voice
    /// release directory (read at --train-split).
    #[arg(long)]
    pub train: Option<PathBuf>,
    #[arg(long, default_value = "train")]
    pub train_split: String,
    /// Evaluation data (manifest or Common Voice directory, read at --eval-split).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    /// Where checkpoints, the best adapter and train_summary.json go.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// HF-layout Whisper directory to fine-tune.
    #[arg(long, env = "ASR_MODEL", default_value = "assets/whisper-base")]
    pub model: PathBuf,
    /// How the frozen base is held: int8 (the recipe's load_in_8bit) or fp32.
    #[arg(long, value_enum, default_value_t = BasePrecision::Int8)]
    pub precision: BasePrecision,
    /// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Precision of the model's products (adapters, optimiser and layer norms stay fp32):
    /// auto is the recipe's fp16 (with loss scaling) on CUDA and fp32 (no) on the CPU, as the
    /// model service resolves it; bf16 is the option for CPUs with AVX512-BF16 (about 1.2x
    /// faster there, at about half a CER point in one run).
    #[arg(long, value_enum, default_value_t = MixedPrecisionArg::Auto)]
    pub mixed_precision: MixedPrecisionArg,
    #[arg(long, default_value = "zh")]
    pub language: String,
    #[arg(long, value_enum, default_value_t = TaskArg::Transcribe)]
    pub task: TaskArg,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Examples per micro-batch (per_device_train_batch_size).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient_accumulation_steps).
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    /// Steps of linear warmup (--preset guarded: 15).
    #[arg(long, default_value_t = 0, default_value_if("preset", "guarded", "15"))]
    pub warmup_steps: i64,
    /// AdamW's decoupled weight decay on the adapter weights (--preset guarded: 0.01).
    #[arg(
        long,
        default_value_t = 0.0,
        default_value_if("preset", "guarded", "0.01")
    )]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Stop after this many optimiser steps (the schedule then spans them).
    #[arg(long)]
    pub max_steps: Option<i64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print a step line every N optimiser steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: i64,
    /// Checkpoints kept (the best always among them); all when unset.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Evaluate by generation too (CER), as predict_with_generate.
    #[arg(long)]
    pub eval_cer: bool,
    /// Also evaluate every N optimiser steps within epochs (reported; checkpoints and the
    /// kept adapter stay per epoch).
    #[arg(long)]
    pub eval_steps: Option<i64>,
    /// Prompt plus generated tokens when evaluating by generation.
    #[arg(long, default_value_t = 96)]
    pub generation_max_length: usize,
    /// Which eval figure picks the adapter kept at the end.
    #[arg(long, value_enum, default_value_t = MetricArg::Loss)]
    pub metric_for_best: MetricArg,
    /// Skip the zero-shot evaluation before training.
    #[arg(long)]
    pub no_baseline_eval: bool,
    /// Use only the first N training clips (quick runs).
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Use only the first N evaluation clips.
    #[arg(long)]
    pub max_eval_examples: Option<usize>,
    /// Continue from a checkpoint directory of an earlier run with the same settings.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// Feature cache directory (default: $ASR_CACHE/features, else ~/.cache/asr-lora/features).
    #[arg(long)]
    pub feature_cache: Option<PathBuf>,
    #[command(flatten)]
    pub guard: GuardArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BasePrecision {
    Int8,
    Fp32,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MixedPrecisionArg {
    Auto,
    No,
    Bf16,
    Fp16,
}

impl MixedPrecisionArg {
    pub fn resolve(self, device: tch::Device) -> MixedPrecision {
        if matches!(self, MixedPrecisionArg::Bf16) && !device.is_cuda() && !cpu_has_bf16() {
            eprintln!(
                "warning: this CPU has no AVX512-BF16: bf16 products are emulated here and slower than fp32"
            );
        }
        match self {
            MixedPrecisionArg::No => MixedPrecision::No,
            MixedPrecisionArg::Bf16 => MixedPrecision::Bf16,
            MixedPrecisionArg::Fp16 => MixedPrecision::Fp16,
            MixedPrecisionArg::Auto if device.is_cuda() => MixedPrecision::Fp16,
            MixedPrecisionArg::Auto => MixedPrecision::No,
        }
    }
}

fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    Loss,
    Cer,
}

#[derive(Serialize)]
struct RunSummary<'a> {
    model: String,
    mixed_precision: String,
    /// Peak resident memory of this process (VmHWM), features and evaluation included.
    peak_rss_bytes: u64,
    train_examples: usize,
    /// Of `train_examples`, those taken from --mix.
    mix_examples: usize,
    skipped_over_30s: usize,
    trainable_parameters: i64,
    all_parameters: i64,
    baseline: Vec<EvalResult>,
    epochs: &'a [EpochSummary],
    best_epoch: usize,
    /// False when no epoch met --max-guard-regression.
    within_guard_bound: bool,
    /// The scale of the evaluations and of the exported adapter.
    adapter_scale: f64,
    /// Evaluations within epochs (--eval-steps).
    step_evals: &'a [StepEvaluation],
    stopped_early: bool,
    adapter: String,
}

/// Resuming into another output directory: the source run's checkpoints up to the resumed
/// epoch are copied in, so that the best of them can still be chosen at the end.
fn adopt_checkpoints(checkpoint: &Path, output: &Path, epochs_done: usize) -> anyhow::Result<()> {
    let source = checkpoint.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(output)?;
    if source.canonicalize()? == output.canonicalize()? {
        return Ok(());
    }
    for epoch in 1..=epochs_done {
        let from = checkpoint_dir(source, epoch);
        let to = checkpoint_dir(output, epoch);
        if !from.is_dir() || to.exists() {
            continue;
        }
        std::fs::create_dir_all(&to)?;
        for file in std::fs::read_dir(&from)? {
            let file = file?;
            if file.file_type()?.is_file() {
                std::fs::copy(file.path(), to.join(file.file_name()))
                    .with_context(|| format!("copying {}", file.path().display()))?;
            }
        }
    }
    Ok(())
}

fn default_feature_cache() -> PathBuf {
    if let Some(cache) = std::env::var_os("ASR_CACHE") {
        return PathBuf::from(cache).join("features");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/asr-lora/features")
}

/// Reads a dataset and prepares its examples with a progress bar.
fn prepare(
    name: &str,
    path: &Path,
    split: &str,
    limit: Option<usize>,
    cache: &mut FeatureCache,
    spec: LabelSpec,
) -> anyhow::Result<PreparedSet> {
    let mut entries = read_dataset(path, split)?;
    if let Some(limit) = limit {
        entries.truncate(limit);
    }
    let bar = ProgressBar::new(entries.len() as u64).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} clips {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{name} features"));
    let set = prepare_set(&entries, cache, spec, || bar.inc(1))?;
    bar.finish_and_clear();
    println!(
        "{name}: {} examples from {} ({} clips over 30 s skipped, {} features from the cache)",
        set.examples.len(),
        path.display(),
        set.skipped_too_long,
        set.cache_hits
    );
    anyhow::ensure!(
        !set.examples.is_empty(),
        "{name}: no usable clip in {}",
        path.display()
    );
    Ok(set)
}

pub fn run(lora: &LoraArgs, args: &RecipeArgs) -> anyhow::Result<()> {
    let (Some(train_path), Some(output)) = (&args.train, &args.output) else {
        anyhow::bail!("--local needs --train DATA and --output DIR");
    };
    let device = parse_device(&args.device)?;
    let mut loaded = LoadedModel::load(
        &args.model,
        LoadOptions {
            device,
            precision: match args.precision {
                BasePrecision::Int8 => Precision::Int8,
                BasePrecision::Fp32 => Precision::Fp32,
            },
            // The logits' gradient flows through this projection: keep it in fp32.
            output_projection: Some(OutputProjection::Tied),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let task = match args.task {
        TaskArg::Transcribe => Task::Transcribe,
        TaskArg::Translate => Task::Translate,
    };
    let spec = LabelSpec {
        tokenizer: &loaded.tokenizer,
        generation: &loaded.generation,
        language: Some(&args.language),
        task,
    };
    let n_mels = loaded.n_mels();
    let mut cache = FeatureCache::new(
        &args
            .feature_cache
            .clone()
            .unwrap_or_else(default_feature_cache),
        FeaturePipeline::new(PipelineConfig {
            mel: MelConfig::new(n_mels as u32)?,
            ..Default::default()
        }),
        n_mels,
    );
    args.guard.validate()?;
    let mut train = prepare(
        "train",
        train_path,
        &args.train_split,
        args.max_train_examples,
        &mut cache,
        spec,
    )?;
    let in_domain = train.examples.len();
    let mut mix_examples = 0;
    if let Some(mix_path) = &args.guard.mix {
        let want = args.guard.mix_count(in_domain);
        let mix = prepare(
            "mix",
            mix_path,
            &args.guard.mix_split,
            Some(want),
            &mut cache,
            spec,
        )?;
        anyhow::ensure!(
            mix.examples.len() == want,
            "--mix-fraction {} needs {want} examples from {}, which has {}",
            args.guard.mix_fraction,
            mix_path.display(),
            mix.examples.len()
        );
        mix_examples = want;
        train.examples.extend(mix.examples);
        println!(
            "training set: {in_domain} in-domain + {mix_examples} mixed-in examples ({:.0} %)",
            100.0 * mix_examples as f64 / train.examples.len() as f64
        );
    }
    let mut evals: Vec<EvalSet> = Vec::new();
    if let Some(path) = &args.eval {
        let set = prepare(
            "eval",
            path,
            &args.eval_split,
            args.max_eval_examples,
            &mut cache,
            spec,
        )?;
        evals.push(EvalSet {
            name: "eval".into(),
            guard: false,
            examples: set.examples,
            texts: set.texts,
        });
    }
    for guard in &args.guard.guards {
        let set = prepare(
            &guard.name,
            &guard.data,
            &args.guard.guard_split,
            args.max_eval_examples,
            &mut cache,
            spec,
        )?;
        evals.push(EvalSet {
            name: guard.name.clone(),
            guard: true,
            examples: set.examples,
            texts: set.texts,
        });
    }
    // Guard sets are compared by CER, so they imply evaluation by generation.
    let eval_cer = args.eval_cer || !args.guard.guards.is_empty();
    anyhow::ensure!(
        args.metric_for_best != MetricArg::Cer || eval_cer,
        "--metric-for-best cer needs --eval-cer"
    );
    anyhow::ensure!(
        args.guard.max_guard_regression.is_none() || !args.no_baseline_eval,
        "--max-guard-regression compares with the zero-shot pass: drop --no-baseline-eval"
    );

    // Seeded just before, as PEFT after `set_seed`: the same seed gives PEFT's initial adapter.
    tch::manual_seed(args.seed as i64);
    let adapter = Adapter::init(lora.config(), &loaded.model.linear_sites(), device)?;
    let generation_eval = eval_cer.then(|| GenerationEval {
        generation: &loaded.generation,
        tokenizer: &loaded.tokenizer,
        language: Some(args.language.clone()),
        task,
        max_length: args.generation_max_length,
        batch_size: args.batch_size.max(1) * 4,
    });
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        optimizer: AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        warmup_steps: args.warmup_steps,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        max_steps: args.max_steps,
        mixed_precision: args.mixed_precision.resolve(device),
    };
    let ids = LabelIds {
        decoder_start: loaded.generation.decoder_start_token_id,
        pad: loaded.generation.eos_token_id,
    };
    let (epochs, batch_size, grad_accum) = (config.epochs, config.batch_size, config.grad_accum);
    let mixed_precision = config.mixed_precision;
    let mut trainer = Trainer::new(
        &mut loaded.model,
        adapter,
        config,
        ids,
        train.examples.len(),
    )?;
    let (trainable, all) = trainer.parameter_counts();
    println!("{}", trainable_parameters_line(trainable, all));
    if let Some(checkpoint) = &args.resume_from {
        trainer
            .resume(checkpoint)
            .with_context(|| format!("resuming from {}", checkpoint.display()))?;
        adopt_checkpoints(checkpoint, output, trainer.state.epochs_done)?;
        println!(
            "resumed from {} at step {} (epoch {})",
            checkpoint.display(),
            trainer.state.global_step,
            trainer.state.epochs_done
        );
    }

    let mut baseline = Vec::new();
    if !args.no_baseline_eval {
        let resumed = trainer.state.global_step > 0;
        baseline = trainer.evaluate_baseline(&evals, generation_eval.as_ref())?;
        if !resumed {
            for result in &baseline {
                println!(
                    "zero-shot {}: loss {:.4}{}",
                    result.name,
                    result.loss,
                    result
                        .cer
                        .map_or(String::new(), |c| format!(", CER {:.2}%", c * 100.0))
                );
            }
        }
    }

    let total_steps = trainer.total_steps();
    println!(
        "training: {} examples, {epochs} epochs, batch {batch_size} x accumulation {grad_accum}, {total_steps} optimiser steps, mixed precision {mixed_precision:?}, {device:?}",
        train.examples.len(),
    );
    let bar = ProgressBar::new(total_steps as u64).with_style(
        ProgressStyle::with_template(
            "{prefix:>5} [{bar:30}] {pos}/{len} steps {elapsed}<{eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix("train");
    bar.set_position(trainer.state.global_step as u64);
    let logging_steps = args.logging_steps.max(1);
    let on_step = |log: &StepLog| {
        asr_runtime::allocator::after_training_step(log.step);
        bar.set_position(log.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e}", log.loss, log.lr));
        if log.step % logging_steps == 0 || log.step == total_steps {
            bar.suspend(|| {
                println!(
                    "step {:>5}  epoch {:>5.2}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  samples/s {:.2}",
                    log.step, log.epoch, log.loss, log.lr, log.grad_norm, log.samples_per_second
                )
            });
        }
    };
    let on_epoch = |summary: &EpochSummary| {
        bar.suspend(|| {
            println!(
                "epoch {} done: step {}, train loss {:.4}, {:.2} samples/s{}",
                summary.epoch,
                summary.steps,
                summary.train_loss,
                summary.samples_per_second,
                summary
                    .evals
                    .iter()
                    .map(|e| format!(", {} {}", e.name, eval_cell(e).trim()))
                    .collect::<String>()
            )
        });
    };
    let objective = Objective {
        metric: match args.metric_for_best {
            MetricArg::Loss => BestMetric::EvalLoss,
            MetricArg::Cer => BestMetric::Cer,
        },
        max_guard_regression: args.guard.max_guard_regression,
        early_stopping_patience: args.guard.early_stopping_patience,
    };
    let options = FitOptions {
        save_total_limit: args.save_total_limit,
        objective,
        generation: generation_eval.clone(),
        adapter_scale: args.guard.adapter_scale,
        eval_steps: args.eval_steps,
        ..FitOptions::new(args.model.display().to_string())
    };
    let on_evaluated = |evaluation: &StepEvaluation| {
        bar.suspend(|| {
            println!(
                "evaluated at step {} (epoch {:.2}){}",
                evaluation.step,
                evaluation.epoch,
                evaluation
                    .evals
                    .iter()
                    .map(|e| format!(", {} {}", e.name, eval_cell(e).trim()))
                    .collect::<String>()
            )
        });
    };
    let fit = trainer.fit(
        &train.examples,
        &evals,
        output,
        &options,
        (on_step, on_evaluated, on_epoch),
    )?;
    bar.finish_and_clear();

    println!();
    print_epoch_table(&evals, &baseline, &fit);
    let adapter_dir = output.join("adapter");
    if fit.stopped_early {
        println!(
            "stopped early: {} evaluations without a new best",
            args.guard.early_stopping_patience
        );
    }
    println!(
        "best epoch {}: adapter in {}",
        fit.best_epoch,
        adapter_dir.display()
    );
    if let Some(kept) = fit.epochs.iter().find(|e| e.epoch == fit.best_epoch) {
        if evals.iter().any(|e| e.guard) && !baseline.is_empty() {
            println!();
            print_before_after(&baseline, kept, args.guard.max_guard_regression);
        }
    }
    if !fit.within_guard_bound {
        println!(
            "warning: no epoch kept every guard set within --max-guard-regression {}; kept epoch {}, which regresses least",
            args.guard.max_guard_regression.unwrap_or_default(),
            fit.best_epoch
        );
    }
    let summary = RunSummary {
        model: args.model.display().to_string(),
        mixed_precision: format!("{mixed_precision:?}"),
        peak_rss_bytes: peak_rss_bytes(),
        train_examples: train.examples.len(),
        mix_examples,
        skipped_over_30s: train.skipped_too_long,
        trainable_parameters: trainable,
        all_parameters: all,
        baseline,
        epochs: &fit.epochs,
        best_epoch: fit.best_epoch,
        within_guard_bound: fit.within_guard_bound,
        adapter_scale: args.guard.adapter_scale,
        step_evals: &trainer.state.step_evals,
        stopped_early: fit.stopped_early,
        adapter: adapter_dir.display().to_string(),
    };
    std::fs::write(
        output.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(())
}
