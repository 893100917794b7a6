//! `asr bench transcribe`: the espeak-ng test split transcribed by whisper-base, greedy, on 2
//! threads, by ours (int8 and fp32), faster-whisper (int8, the setup's CTranslate2 directory)
//! and HF transformers (fp32). Each engine runs in its own process, so its peak RSS is its
//! own; the timed part is features + decoding of clips already in memory, after model load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use asr_audio::{LogMelExtractor, MelConfig};
use asr_whisper::metrics::cer;
use asr_whisper::{DecodeOptions, LoadOptions, LoadedModel, OutputProjection, Precision};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::decode;
use crate::process::{peak_rss_bytes, run_child};

#[derive(Args)]
pub struct TranscribeBenchArgs {
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    manifest: PathBuf,
    /// HF-layout model (ours and HF).
    #[arg(long, default_value = "assets/whisper-base")]
    model: PathBuf,
    /// CTranslate2 directory of the same model (faster-whisper).
    #[arg(long, default_value = "assets/whisper-base-ct2")]
    ct2_model: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Windows decoded together by ours and HF (faster-whisper decodes clip by clip).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    manifest: PathBuf,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    precision: WorkerPrecision,
    #[arg(long)]
    threads: usize,
    #[arg(long)]
    batch: usize,
    /// How the logits projection is held (default: the library's choice).
    #[arg(long, value_enum)]
    output_projection: Option<ProjectionArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum WorkerPrecision {
    Int8,
    Fp32,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProjectionArg {
    Tied,
    Bf16,
    Int8,
}

impl From<ProjectionArg> for OutputProjection {
    fn from(arg: ProjectionArg) -> Self {
        match arg {
            ProjectionArg::Tied => OutputProjection::Tied,
            ProjectionArg::Bf16 => OutputProjection::BFloat16,
            ProjectionArg::Int8 => OutputProjection::Int8,
        }
    }
}

/// What each engine reports.
#[derive(Serialize, Deserialize)]
struct EngineRun {
    texts: Vec<String>,
    seconds: f64,
    peak_rss_bytes: u64,
}

struct Clip {
    path: PathBuf,
    text: String,
}

fn read_manifest(manifest: &Path) -> anyhow::Result<Vec<Clip>> {
    let base = manifest.parent().unwrap_or(Path::new("."));
    std::fs::read_to_string(manifest)
        .with_context(|| {
            format!(
                "reading {} (run scripts/setup.sh first)",
                manifest.display()
            )
        })?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line)?;
            Ok(Clip {
                path: base.join(
                    entry["audio"]
                        .as_str()
                        .context("manifest line without audio")?,
                ),
                text: entry["text"]
                    .as_str()
                    .context("manifest line without text")?
                    .to_string(),
            })
        })
        .collect()
}

/// One engine of ours, in this process: prints an [`EngineRun`] as JSON.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads as i32);
    let precision = match args.precision {
        WorkerPrecision::Int8 => Precision::Int8,
        WorkerPrecision::Fp32 => Precision::Fp32,
    };
    let model = LoadedModel::load(
        &args.model,
        LoadOptions {
            precision,
            output_projection: args.output_projection.map(Into::into),
            ..Default::default()
        },
    )?;
    let clips = read_manifest(&args.manifest)?;
    let audio: Vec<Vec<f32>> = clips
        .iter()
        .map(|c| decode(&c.path))
        .collect::<anyhow::Result<_>>()?;
    let bank = std::sync::Arc::new(asr_audio::MelFilterBank::new(MelConfig::new(
        model.n_mels() as u32,
    )?));
    // As the references run: temperature 0, no fallback.
    let options = DecodeOptions {
        language: Some("zh".into()),
        ..Default::default()
    }
    .without_fallback();
    let start = Instant::now();
    let mut texts = Vec::with_capacity(audio.len());
    for batch in audio.chunks(args.batch.max(1)) {
        let windows: Vec<Vec<f32>> = batch
            .iter()
            .map(|samples| {
                let mut extractor = LogMelExtractor::with_bank(bank.clone());
                let mut frames = Vec::new();
                extractor.push(samples, &mut frames);
                extractor.finish(&mut frames)?;
                Ok(asr_audio::normalize_window(
                    &frames[..frames.len().min(3000 * model.n_mels())],
                    model.n_mels(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        texts.extend(
            model
                .transcribe_windows(&windows, &options)?
                .into_iter()
                .map(|t| t.text.trim().to_string()),
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let run = EngineRun {
        texts,
        seconds,
        peak_rss_bytes: peak_rss_bytes(),
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

fn run_process(command: &mut Command, stdin: Option<String>) -> anyhow::Result<EngineRun> {
    let stdout = run_child(command, stdin.as_deref(), false)?;
    let line = stdout.lines().last().context("no output")?;
    Ok(serde_json::from_str(line)?)
}

pub fn run(args: TranscribeBenchArgs) -> anyhow::Result<()> {
    let clips = read_manifest(&args.manifest)?;
    let audio_seconds: f64 = clips
        .iter()
        .map(|c| decode(&c.path).map(|s| s.len() as f64 / 16_000.0))
        .sum::<anyhow::Result<f64>>()?;
    let references: Vec<&str> = clips.iter().map(|c| c.text.as_str()).collect();
    let exe = std::env::current_exe()?;
    let ours = |precision: &str| -> anyhow::Result<EngineRun> {
        run_process(
            Command::new(&exe)
                .args(["bench", "transcribe-worker", "--precision", precision])
                .arg("--manifest")
                .arg(&args.manifest)
                .arg("--model")
                .arg(&args.model)
                .args([
                    "--threads",
                    &args.threads.to_string(),
                    "--batch",
                    &args.batch.to_string(),
                ]),
            None,
        )
    };
    let reference = |engine: &str, model: &Path, compute_type: &str| -> anyhow::Result<EngineRun> {
        let job = serde_json::json!({
            "engine": engine, "model": model, "compute_type": compute_type, "language": "zh",
            "beam_size": 1, "batch_size": args.batch, "threads": args.threads,
            "audio": clips.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
        });
        run_process(
            Command::new(&args.python).arg("tests/reference/transcribe_reference.py"),
            Some(job.to_string()),
        )
    };
    let runs = [
        ("ours int8", ours("int8")?),
        ("ours fp32", ours("fp32")?),
        (
            "faster-whisper int8",
            reference("faster-whisper", &args.ct2_model, "int8")?,
        ),
        (
            "hf transformers fp32",
            reference("hf", &args.model, "float32")?,
        ),
    ];
    println!(
        "transcription benchmark: {} clips, {audio_seconds:.1} s of audio, whisper-base, greedy, language zh, {} threads",
        clips.len(),
        args.threads
    );
    println!(
        "{:<22} {:>8} {:>12} {:>8}",
        "engine", "RTF", "peak RSS MB", "CER %"
    );
    for (name, run) in &runs {
        let error = cer(run
            .texts
            .iter()
            .map(String::as_str)
            .zip(references.iter().copied()));
        println!(
            "{name:<22} {:>8.4} {:>12.0} {:>8.2}",
            run.seconds / audio_seconds,
            run.peak_rss_bytes as f64 / 1e6,
            error * 100.0
        );
    }
    let (int8, fw, hf) = (&runs[0].1, &runs[2].1, &runs[3].1);
    println!(
        "speed ours int8 / faster-whisper int8: {:.2}x (goal >= 1x)",
        fw.seconds / int8.seconds
    );
    println!(
        "speed ours int8 / hf fp32:             {:.2}x (goal >= 3x)",
        hf.seconds / int8.seconds
    );
    println!(
        "peak RSS ours int8 / hf fp32:          {:.2} (goal < 1)",
        int8.peak_rss_bytes as f64 / hf.peak_rss_bytes as f64
    );
    Ok(())
}
