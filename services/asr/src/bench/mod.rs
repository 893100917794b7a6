//! `asr bench`: benchmarks that run ours and the reference implementations on the same inputs
//! in one run and print ratios.

mod features;
mod guard;
mod services;
mod soak;
mod spawn;
mod train;
mod train_speed;
mod transcribe;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use asr_audio::decode::EncodedDecoder;
use asr_audio::Container;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Log-mel features: ours vs HF (default torch path and numpy path).
    Features(features::FeatureBenchArgs),
    /// Transcription of the espeak test split: ours int8/fp32 vs faster-whisper int8 and HF fp32.
    Transcribe(transcribe::TranscribeBenchArgs),
    /// Transcription through both services with 1, 4 and 8 concurrent clients, against the
    /// in-process path: throughput, latency, the cost of the hops, the gain from batching.
    Services(services::ServicesBenchArgs),
    /// Soak and load: many concurrent streams through both services for minutes, mixed clip
    /// lengths, clients that cancel or send bad input; errors by code, latency percentiles,
    /// overload refusals, and each service's RSS over time.
    Soak(soak::SoakArgs),
    /// LoRA training: ours (int8 base) vs HF PEFT (fp32) on the espeak training split, with
    /// CER before and after.
    Train(train::TrainBenchArgs),
    /// Fine-tuning without forgetting: the recipe vs the guarded settings, in-domain and
    /// guard-set CER before and after (issue 7's proof).
    Guard(guard::GuardBenchArgs),
    /// Training speed and peak memory of an architecture from its config (random weights):
    /// the recipe's whisper-large-v2 setting on a GPU.
    TrainSpeed(train_speed::TrainSpeedArgs),
    /// (internal) One engine of `bench transcribe`, in its own process so its peak RSS is its own.
    #[command(hide = true)]
    TranscribeWorker(transcribe::WorkerArgs),
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Features(args) => features::run(args),
        BenchCommand::Transcribe(args) => transcribe::run(args),
        BenchCommand::Services(args) => services::run(args),
        BenchCommand::Soak(args) => soak::run(args),
        BenchCommand::Train(args) => train::run_bench(args),
        BenchCommand::Guard(args) => guard::run_bench(args),
        BenchCommand::TrainSpeed(args) => train_speed::run(args),
        BenchCommand::TranscribeWorker(args) => transcribe::worker(args),
    }
}

pub fn manifest_audio(manifest: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(manifest).with_context(|| {
        format!(
            "reading {} (run scripts/setup.sh first)",
            manifest.display()
        )
    })?;
    let base = manifest.parent().unwrap_or(Path::new("."));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line)?;
            let audio = entry["audio"]
                .as_str()
                .context("manifest line without audio")?;
            Ok(base.join(audio))
        })
        .collect()
}

/// Samples of a 16 kHz mono clip (the corpus format): the benchmark times the log-mel step,
/// so decoding happens before the clock starts, for both sides.
pub fn decode(path: &Path) -> anyhow::Result<Vec<f32>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = EncodedDecoder::open(std::io::BufReader::new(file), Container::Wav)?;
    if decoder.sample_rate() != 16_000 {
        bail!(
            "{}: expected 16 kHz, got {} Hz",
            path.display(),
            decoder.sample_rate()
        );
    }
    let mut samples = Vec::new();
    while let Some(channels) = decoder.next_packet(&mut samples)? {
        if channels != 1 {
            bail!("{}: expected mono, got {channels} channels", path.display());
        }
    }
    Ok(samples)
}

pub fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list"))
                .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
