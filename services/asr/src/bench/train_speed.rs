//! `asr bench train-speed`: training speed and peak memory of an architecture from its HF
//! config alone (random weights: speed does not depend on their values), with the recipe's
//! LoRA, batch and precision. On a CUDA machine with whisper-large-v2's config this is the
//! notebook's setting (int8 base, LoRA r=4 on q_proj/v_proj, batch 4, fp16), which reached
//! 2.99 samples/s there.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use asr_whisper::lora::trainable_parameters_line;
use asr_whisper::train_data::Example;
use asr_whisper::trainer::{LabelIds, TrainConfig, Trainer};
use asr_whisper::{Adapter, Weights, Whisper, WhisperConfig};
use clap::Args;
use tch::Kind;

use crate::process::peak_rss_bytes;
use crate::train::LoraArgs;
use crate::train_local::{BasePrecision, MixedPrecisionArg};
use crate::transcribe::parse_device;

#[derive(Args)]
pub struct TrainSpeedArgs {
    /// HF config.json of the architecture (e.g. ../shared/configs/whisper-large-v2.json).
    #[arg(long)]
    model_config: PathBuf,
    /// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, value_enum, default_value_t = BasePrecision::Int8)]
    precision: BasePrecision,
    #[arg(long, value_enum, default_value_t = MixedPrecisionArg::Auto)]
    mixed_precision: MixedPrecisionArg,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Timed optimiser steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Label tokens per example after the 4 prompt tokens (Common Voice sentences give ~20).
    #[arg(long, default_value_t = 20)]
    label_tokens: usize,
    #[command(flatten)]
    lora: LoraArgs,
}

/// Peak memory of this process on the GPU, polled from nvidia-smi (CUDA context and the
/// allocator's cache included, as a user sees it), or `None` without nvidia-smi.
struct GpuMemoryPoll {
    peak_mib: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    seen: Arc<AtomicBool>,
}

impl GpuMemoryPoll {
    fn start() -> Self {
        let (peak_mib, running, seen) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        );
        let (peak, run, ok) = (peak_mib.clone(), running.clone(), seen.clone());
        std::thread::spawn(move || {
            let pid = std::process::id().to_string();
            while run.load(Ordering::Relaxed) {
                let output = std::process::Command::new("nvidia-smi")
                    .args([
                        "--query-compute-apps=pid,used_memory",
                        "--format=csv,noheader,nounits",
                    ])
                    .output();
                let Ok(output) = output else { return };
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let mut fields = line.split(',').map(str::trim);
                    if fields.next() == Some(pid.as_str()) {
                        if let Some(mib) = fields.next().and_then(|m| m.parse::<u64>().ok()) {
                            peak.fetch_max(mib, Ordering::Relaxed);
                            ok.store(true, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        Self {
            peak_mib,
            running,
            seen,
        }
    }

    fn finish(self) -> Option<u64> {
        self.running.store(false, Ordering::Relaxed);
        self.seen
            .load(Ordering::Relaxed)
            .then(|| self.peak_mib.load(Ordering::Relaxed))
    }
}

/// splitmix64, for reproducible label tokens without another dependency.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn run(args: TrainSpeedArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let config = WhisperConfig::from_file(&args.model_config)?;
    tch::manual_seed(0);
    let started = Instant::now();
    let mut weights = Weights::random(device, Kind::Float, 0.02);
    if matches!(args.precision, BasePrecision::Int8) {
        weights = weights.with_int8_linears(asr_whisper::linear::DEFAULT_OUTLIER_THRESHOLD);
    }
    let mut model = Whisper::load(weights, &config)
        .with_context(|| format!("building {}", args.model_config.display()))?;
    let adapter = Adapter::init(args.lora.config(), &model.linear_sites(), device)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let n_mels = config.num_mel_bins;
    let total_steps = args.warmup_steps + args.steps;
    let examples = total_steps * args.batch_size;
    let mut state = 7u64;
    let window: Vec<f32> = (0..n_mels * 3000)
        .map(|_| (next_random(&mut state) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    // <|startoftranscript|><|zh|><|transcribe|><|notimestamps|> text <|endoftext|>.
    let examples: Vec<Example> = (0..examples)
        .map(|_| {
            let mut labels = vec![50258, 50260, 50359, 50363];
            labels
                .extend((0..args.label_tokens).map(|_| (next_random(&mut state) % 50_000) as i64));
            labels.push(50257);
            Example::in_memory(window.clone(), labels)
        })
        .collect();
    let train_config = TrainConfig {
        epochs: 1,
        batch_size: args.batch_size,
        grad_accum: 1,
        max_steps: Some(total_steps as i64),
        mixed_precision: args.mixed_precision.resolve(device),
        ..Default::default()
    };
    let mixed_precision = train_config.mixed_precision;
    let ids = LabelIds {
        decoder_start: 50258,
        pad: 50257,
    };
    let count = examples.len();
    let mut trainer = Trainer::new(&mut model, adapter, train_config, ids, count)?;
    let (trainable, all) = trainer.parameter_counts();
    let poll = device.is_cuda().then(GpuMemoryPoll::start);
    let mut timed_from: Option<Instant> = (args.warmup_steps == 0).then(Instant::now);
    let mut losses = Vec::new();
    trainer.train_epoch(&examples, |log| {
        losses.push(log.loss);
        if log.step as usize == args.warmup_steps {
            timed_from = Some(Instant::now());
        }
    })?;
    let seconds = timed_from
        .map(|t| t.elapsed().as_secs_f64())
        .context("no timed step ran")?;
    let gpu_peak = poll.and_then(GpuMemoryPoll::finish);
    let samples_per_second = (args.steps * args.batch_size) as f64 / seconds;
    println!(
        "training speed: {} ({} mels, {} + {} layers, d_model {}), random weights, {device:?}",
        args.model_config.display(),
        n_mels,
        config.encoder_layers,
        config.decoder_layers,
        config.d_model
    );
    println!("{}", trainable_parameters_line(trainable, all));
    println!(
        "base {}, mixed precision {mixed_precision:?}, batch {}, {} label tokens, {} warm-up + {} timed steps (model built in {load_seconds:.1} s)",
        match args.precision {
            BasePrecision::Int8 => "int8",
            BasePrecision::Fp32 => "fp32",
        },
        args.batch_size,
        args.label_tokens + 5,
        args.warmup_steps,
        args.steps
    );
    println!(
        "losses: first {:.3}, last {:.3} ({} skipped fp16 steps)",
        losses.first().copied().unwrap_or(f64::NAN),
        losses.last().copied().unwrap_or(f64::NAN),
        trainer.state.skipped_steps
    );
    println!(
        "samples/s {samples_per_second:.3}   s/step {:.3}   peak {}",
        seconds / args.steps as f64,
        match gpu_peak {
            Some(mib) => format!("GPU memory {mib} MiB (nvidia-smi)"),
            None => format!("RSS {:.0} MB", peak_rss_bytes() as f64 / (1024.0 * 1024.0)),
        }
    );
    println!("reference: the notebook reached 2.99 samples/s (whisper-large-v2, int8 + LoRA, fp16, batch 4, on its GPU)");
    Ok(())
}
