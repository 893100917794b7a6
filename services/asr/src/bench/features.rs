//! `asr bench features`: our log-mel extractor against HF's WhisperFeatureExtractor on the same
//! clips, in one run, printing throughput ratios. Pin it to one core (`taskset -c 0`, as
//! scripts/bench-features.sh does); the Python reference inherits the pinning.

use super::{cpus_allowed, decode, manifest_audio};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use std::sync::Arc;

use asr_audio::{LogMelExtractor, MelConfig, MelFilterBank, WINDOW_SAMPLES};
use clap::Args;

#[derive(Args)]
pub struct FeatureBenchArgs {
    /// JSONL manifest of the clips ({"audio": path relative to the manifest, ...}).
    #[arg(long, default_value = "assets/corpus/espeak/test.jsonl")]
    manifest: PathBuf,
    /// Identical full 30 s windows to time, built by concatenating the clips.
    #[arg(long, default_value_t = 20)]
    windows: usize,
    #[arg(long, default_value_t = 80)]
    n_mels: u32,
    /// Timed passes over the set (the best is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Python with transformers (the repo's venv by default).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Where to write the 30 s window wavs the reference reads.
    #[arg(long, default_value = "target/bench-features")]
    work_dir: PathBuf,
}

pub fn run(args: FeatureBenchArgs) -> anyhow::Result<()> {
    let clip_paths = manifest_audio(&args.manifest)?;
    let clips: Vec<Vec<f32>> = clip_paths
        .iter()
        .map(|p| decode(p))
        .collect::<anyhow::Result<_>>()?;
    let audio_seconds: f64 = clips.iter().map(|c| c.len() as f64 / 16_000.0).sum();
    let window_audio = full_windows(&clips, args.windows);
    std::fs::create_dir_all(&args.work_dir)?;
    let window_paths = write_windows(&args.work_dir, &window_audio)?;

    let bank = Arc::new(MelFilterBank::new(MelConfig::new(args.n_mels)?));
    let ours_clips = best_of(args.repeats, || extract_set(&bank, &clips));
    let ours_windows = best_of(args.repeats, || extract_set(&bank, &window_audio));

    let spec = serde_json::json!({
        "clips": clip_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "windows": window_paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    let spec_path = args.work_dir.join("clips.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let output = Command::new(&args.python)
        .arg("tests/reference/bench_hf_features.py")
        .arg(&spec_path)
        .arg(args.n_mels.to_string())
        .arg(args.repeats.to_string())
        .output()
        .with_context(|| format!("running {}", args.python.display()))?;
    if !output.status.success() {
        bail!(
            "HF reference failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let hf: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let seconds = |key: &str| {
        hf[key]
            .as_f64()
            .with_context(|| format!("missing {key} in {hf}"))
    };

    let windows = window_audio.len() as f64;
    let padded_seconds = clips.len() as f64 * 30.0;
    println!("log-mel benchmark: {} clips ({audio_seconds:.1} s of audio, {padded_seconds:.0} s as HF pads them), {} full 30 s windows, n_mels {}", clips.len(), window_audio.len(), args.n_mels);
    println!("cpus allowed: {}", cpus_allowed());
    println!(
        "{:<22} {:>12} {:>14} {:>12}",
        "extractor", "audio-s/s", "padded-s/s", "windows/s"
    );
    let row = |name: &str, clips_s: f64, windows_s: f64| {
        println!(
            "{name:<22} {:>12.0} {:>14.0} {:>12.1}",
            audio_seconds / clips_s,
            padded_seconds / clips_s,
            windows / windows_s
        );
    };
    row("ours (rust)", ours_clips, ours_windows);
    let (hf_torch_clips, hf_torch_windows) =
        (seconds("torch_clips_s")?, seconds("torch_windows_s")?);
    let (hf_numpy_clips, hf_numpy_windows) =
        (seconds("numpy_clips_s")?, seconds("numpy_windows_s")?);
    row("hf default (torch)", hf_torch_clips, hf_torch_windows);
    row("hf numpy", hf_numpy_clips, hf_numpy_windows);
    println!(
        "ratio audio-seconds/s, ours / hf default: {:.1}x (goal >= 20x)",
        hf_torch_clips / ours_clips
    );
    println!(
        "ratio audio-seconds/s, ours / hf numpy:   {:.1}x",
        hf_numpy_clips / ours_clips
    );
    println!(
        "ratio full windows/s,  ours / hf default: {:.2}x (goal >= 2x)",
        hf_torch_windows / ours_windows
    );
    println!(
        "ratio full windows/s,  ours / hf numpy:   {:.2}x",
        hf_numpy_windows / ours_windows
    );
    Ok(())
}

/// Our whole extraction of a set: frames of each clip and its normalised windows.
fn extract_set(bank: &Arc<MelFilterBank>, set: &[Vec<f32>]) {
    let mut frames = Vec::new();
    for clip in set {
        frames.clear();
        let mut extractor = LogMelExtractor::with_bank(bank.clone());
        extractor.push(clip, &mut frames);
        let Ok(end) = extractor.finish(&mut frames) else {
            continue;
        };
        let windows = asr_audio::windows_from_frames(&frames, bank.n_mels(), end.windows as usize);
        std::hint::black_box(windows);
    }
}

fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `count` windows of exactly 30 s, cycling through the clips.
fn full_windows(clips: &[Vec<f32>], count: usize) -> Vec<Vec<f32>> {
    let mut stream = clips.iter().flatten().copied().cycle();
    (0..count)
        .map(|_| stream.by_ref().take(WINDOW_SAMPLES).collect())
        .collect()
}

fn write_windows(dir: &Path, windows: &[Vec<f32>]) -> anyhow::Result<Vec<PathBuf>> {
    windows
        .iter()
        .enumerate()
        .map(|(i, window)| {
            let path = dir.join(format!("window{i:02}.wav"));
            std::fs::write(&path, wav_f32(window))?;
            Ok(path)
        })
        .collect()
}

/// A 16 kHz mono float32 wav, so the reference reads exactly our samples.
pub(super) fn wav_f32(samples: &[f32]) -> Vec<u8> {
    let data_len = (samples.len() * 4) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&16_000u32.to_le_bytes());
    out.extend_from_slice(&(16_000u32 * 4).to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&32u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}
