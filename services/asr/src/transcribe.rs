//! `asr transcribe`: through the services (`--server`, see [`crate::transcribe_remote`]) or,
//! with `--local`, Whisper in this process.
//!
//! Locally, without `--timestamps` each 30 s window is decoded on its own; with it, the audio
//! is transcribed window after window with a seek (openai's long-form), as timed segments.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig, WINDOW_SAMPLES};
use asr_whisper::{
    Adapter, DecodeOptions, FallbackOptions, LoadOptions, LoadedModel, Precision, Task,
};
use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Args)]
pub struct TranscribeArgs {
    /// Audio files (any format the audio library decodes); `-` reads stdin.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Run the model in this process instead of through the services.
    #[arg(long)]
    pub local: bool,
    /// Feature service to stream the audio to (without --local).
    #[arg(long, env = "ASR_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// HF-layout Whisper directory (`asr convert` makes one from faster-whisper's).
    #[arg(long, env = "ASR_MODEL", default_value = "assets/whisper-base")]
    pub model: PathBuf,
    /// Language code (e.g. zh); detected from the first window when unset.
    #[arg(long)]
    pub language: Option<String>,
    #[arg(long, value_enum, default_value_t = TaskArg::Transcribe)]
    pub task: TaskArg,
    /// Beam size; 1 is greedy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub beam: u32,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Int8)]
    pub precision: PrecisionArg,
    /// "cpu", "cuda" or "cuda:N"; default CUDA when present.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Predict timestamp tokens and report timed segments (long-form, window after window).
    #[arg(long)]
    pub timestamps: bool,
    /// Temperatures tried in turn when a decoding fails the thresholds ("0" alone: no
    /// fallback).
    #[arg(long, value_delimiter = ',', default_value = "0,0.2,0.4,0.6,0.8,1.0")]
    pub temperature: Vec<f64>,
    /// Sampled candidates per window at temperatures above 0.
    #[arg(long, default_value_t = 5)]
    pub best_of: usize,
    /// Seed of the sampling at temperatures above 0 (with each window's audio): the same
    /// file, options and seed give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Retry at the next temperature above this gzip compression ratio (negative: off).
    #[arg(long, default_value_t = 2.4, allow_negative_numbers = true)]
    pub compression_ratio_threshold: f64,
    /// Retry at the next temperature below this average log-probability.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true)]
    pub logprob_threshold: f64,
    /// A window is silence above this no-speech probability (with a low log-probability).
    #[arg(long, default_value_t = 0.6)]
    pub no_speech_threshold: f64,
    /// Text the decoder sees as if it preceded the audio (names, spelling, punctuation).
    #[arg(long)]
    pub initial_prompt: Option<String>,
    /// Long-form: do not prompt each window with the text of the previous ones.
    #[arg(long)]
    pub no_condition_on_previous_text: bool,
    /// With --local: a LoRA adapter directory (PEFT's layout: ours or one PEFT saved).
    #[arg(long, requires = "local")]
    pub adapter: Option<PathBuf>,
    /// Through the services: a LoRA adapter of the model service's registry, by name.
    #[arg(long, conflicts_with = "local")]
    pub adapter_name: Option<String>,
    /// Scale of the adapter's delta, 0.0..=1.0 (default 1.0): below 1 the adapter moves the
    /// base model only part of the way, keeping more of what it read before fine-tuning.
    /// With --adapter (local) or --adapter-name (services).
    #[arg(long)]
    pub adapter_scale: Option<f32>,
    /// Through the services: ask for partial results and show them on stderr as they come.
    #[arg(long, conflicts_with = "local")]
    pub partial: bool,
    /// Through the services: send the audio at its real-time rate, as a live source would
    /// (implies --partial).
    #[arg(long, conflicts_with = "local")]
    pub realtime: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

/// `--device`: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
pub fn parse_device(name: &str) -> anyhow::Result<tch::Device> {
    Ok(match name {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => tch::Device::Cuda(
            other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .with_context(|| format!("bad --device {other}"))?,
        ),
    })
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TaskArg {
    Transcribe,
    Translate,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Int8,
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
    Srt,
    Vtt,
}

#[derive(Serialize)]
pub struct FileResult {
    file: String,
    language: Option<String>,
    text: String,
    segments: Vec<SegmentOut>,
}

impl FileResult {
    /// The text is the segments' texts joined by spaces.
    pub fn new(file: String, language: Option<String>, segments: Vec<SegmentOut>) -> Self {
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            file,
            language,
            text,
            segments,
        }
    }
}

#[derive(Serialize)]
pub struct SegmentOut {
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub avg_logprob: f64,
    pub no_speech_prob: Option<f64>,
}

pub fn run(args: TranscribeArgs) -> anyhow::Result<()> {
    if let Some(scale) = args.adapter_scale {
        anyhow::ensure!(
            args.adapter.is_some() || args.adapter_name.is_some(),
            "--adapter-scale needs --adapter DIR (--local) or --adapter-name NAME"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&scale),
            "--adapter-scale must be in 0.0..=1.0, got {scale}"
        );
    }
    let results = if args.local {
        transcribe_local(&args)?
    } else {
        crate::transcribe_remote::run(&args)?
    };
    print_results(&results, args.format)
}

fn transcribe_local(args: &TranscribeArgs) -> anyhow::Result<Vec<FileResult>> {
    let device = parse_device(&args.device)?;
    let precision = match args.precision {
        PrecisionArg::Int8 => Precision::Int8,
        PrecisionArg::Fp32 => Precision::Fp32,
        PrecisionArg::Fp16 => Precision::Fp16,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    let mut model = LoadedModel::load(
        &args.model,
        LoadOptions {
            device,
            precision,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(dir) = &args.adapter {
        let sites = model.model.linear_sites();
        let mut adapter = Adapter::load_peft(dir, &sites, device)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        if let Some(scale) = args.adapter_scale {
            adapter = adapter.scaled(f64::from(scale), &sites);
        }
        model.model.attach(&adapter);
    }
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(model.n_mels() as u32)?,
        ..Default::default()
    });
    let options = DecodeOptions {
        language: args.language.clone(),
        task: match args.task {
            TaskArg::Transcribe => Task::Transcribe,
            TaskArg::Translate => Task::Translate,
        },
        beam_size: args.beam as usize,
        timestamps: args.timestamps,
        fallback: FallbackOptions {
            temperatures: args.temperature.clone(),
            best_of: args.best_of.max(1),
            compression_ratio_threshold: (args.compression_ratio_threshold >= 0.0)
                .then_some(args.compression_ratio_threshold),
            logprob_threshold: Some(args.logprob_threshold),
            no_speech_threshold: Some(args.no_speech_threshold),
            seed: args.seed,
        },
        initial_prompt: args.initial_prompt.clone(),
        condition_on_previous_text: !args.no_condition_on_previous_text,
        ..Default::default()
    };
    let mut results = Vec::new();
    for file in &args.files {
        let source: Box<dyn Read + Send + Sync> = if file.as_os_str() == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
            ))
        };
        let (_, frames, summary) = extract_all(&pipeline, source, InputFormat::Encoded)
            .with_context(|| format!("reading {}", file.display()))?;
        let (language, segments) = if args.timestamps {
            // Seek-based long-form with timestamps, as openai's transcribe.
            let content_frames = summary.samples.div_ceil(asr_audio::HOP_LENGTH as u64) as usize;
            let segments = model.transcribe_long(&frames, content_frames, &options)?;
            let out: Vec<SegmentOut> = segments
                .iter()
                .map(|s| SegmentOut {
                    start: s.start,
                    end: s.end,
                    text: s.text.clone(),
                    avg_logprob: s.avg_logprob,
                    no_speech_prob: s.no_speech_prob,
                })
                .collect();
            let detected = segments.iter().find_map(|s| s.language.clone());
            (options.language.clone().or(detected), out)
        } else {
            let windows =
                asr_audio::windows_from_frames(&frames, model.n_mels(), summary.windows as usize);
            let transcripts = model.transcribe_windows(&windows, &options)?;
            let window_seconds = WINDOW_SAMPLES as f64 / 16_000.0;
            let out = transcripts
                .iter()
                .enumerate()
                .map(|(i, t)| SegmentOut {
                    start: i as f64 * window_seconds,
                    end: ((i + 1) as f64 * window_seconds).min(summary.duration_seconds),
                    text: t.text.trim().to_string(),
                    avg_logprob: t.avg_logprob,
                    no_speech_prob: t.no_speech_prob,
                })
                .collect();
            (transcripts.first().and_then(|t| t.language.clone()), out)
        };
        results.push(FileResult::new(
            file.display().to_string(),
            language,
            segments,
        ));
    }
    Ok(results)
}

fn print_results(results: &[FileResult], format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Text => {
            for r in results {
                if results.len() > 1 {
                    println!("{}: {}", r.file, r.text);
                } else {
                    println!("{}", r.text);
                }
            }
        }
        OutputFormat::Json => {
            let value = if results.len() == 1 {
                serde_json::to_value(&results[0])?
            } else {
                serde_json::to_value(results)?
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        OutputFormat::Srt | OutputFormat::Vtt => {
            let vtt = matches!(format, OutputFormat::Vtt);
            if vtt {
                println!("WEBVTT\n");
            }
            for r in results {
                for (i, s) in r.segments.iter().enumerate() {
                    if !vtt {
                        println!("{}", i + 1);
                    }
                    println!(
                        "{} --> {}\n{}\n",
                        timestamp(s.start, vtt),
                        timestamp(s.end, vtt),
                        s.text
                    );
                }
            }
        }
    }
    Ok(())
}

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (VTT).
fn timestamp(seconds: f64, vtt: bool) -> String {
    let millis = (seconds * 1000.0).round() as u64;
    let (h, m, s, ms) = (
        millis / 3_600_000,
        millis / 60_000 % 60,
        millis / 1000 % 60,
        millis % 1000,
    );
    format!("{h:02}:{m:02}:{s:02}{}{ms:03}", if vtt { '.' } else { ',' })
}
