//! `asr features`: normalised log-mel windows of a file, computed here or by a feature service.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use asr_audio::pipeline::extract_all;
use asr_audio::{
    npy, FeaturePipeline, InputFormat, MelConfig, PcmSpec, PipelineConfig, SampleFormat,
    WINDOW_FRAMES,
};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct FeaturesArgs {
    /// Audio file: wav, flac, mp3, ogg/vorbis, m4a..., or headerless PCM with --raw.
    pub file: PathBuf,
    /// Mel bins: 80 (Whisper up to large-v2) or 128 (large-v3).
    #[arg(long, default_value_t = 80, value_parser = parse_n_mels)]
    pub n_mels: u32,
    /// Where to write the .npy; without it, a summary is printed only.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Ask the feature service at this address (e.g. http://127.0.0.1:50051) instead of
    /// computing locally.
    #[arg(long, env = "ASR_FEATURE_SERVICE")]
    pub remote: Option<String>,
    /// Treat the file as headerless interleaved PCM of this sample format.
    #[arg(long, value_enum)]
    pub raw: Option<RawFormat>,
    /// Sample rate of --raw input, in Hz.
    #[arg(long, default_value_t = 16_000)]
    pub sample_rate: u32,
    /// Channel count of --raw input.
    #[arg(long, default_value_t = 1)]
    pub channels: u32,
    /// Bytes per message when streaming to --remote.
    #[arg(long, default_value_t = 64 * 1024)]
    pub chunk_bytes: usize,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RawFormat {
    S16le,
    F32le,
}

impl FeaturesArgs {
    pub fn input_format(&self) -> anyhow::Result<InputFormat> {
        Ok(match self.raw {
            None => InputFormat::Encoded,
            Some(raw) => {
                let format = match raw {
                    RawFormat::S16le => SampleFormat::S16Le,
                    RawFormat::F32le => SampleFormat::F32Le,
                };
                InputFormat::RawPcm(PcmSpec::new(format, self.sample_rate, self.channels)?)
            }
        })
    }
}

/// Raw frames of a whole file and how many windows they span.
pub struct FileFeatures {
    pub n_mels: usize,
    pub frames: Vec<f32>,
    pub windows: usize,
    pub duration_seconds: f64,
}

impl FileFeatures {
    pub fn normalised_windows(&self) -> Vec<f32> {
        asr_audio::windows_from_frames(&self.frames, self.n_mels, self.windows).concat()
    }
}

pub fn extract_local(args: &FeaturesArgs) -> anyhow::Result<FileFeatures> {
    let mel = MelConfig::new(args.n_mels)?;
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel,
        ..PipelineConfig::default()
    });
    let file =
        File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let (_, frames, summary) =
        extract_all(&pipeline, BufReader::new(file), args.input_format()?)
            .with_context(|| format!("extracting features of {}", args.file.display()))?;
    Ok(FileFeatures {
        n_mels: mel.n_mels,
        frames,
        windows: summary.windows as usize,
        duration_seconds: summary.duration_seconds,
    })
}

pub fn run(args: FeaturesArgs) -> anyhow::Result<()> {
    let features = match &args.remote {
        None => extract_local(&args)?,
        Some(addr) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::features_remote::extract_remote(addr, &args))?
        }
    };
    if features.windows == 0 {
        bail!("no audio");
    }
    let data = features.normalised_windows();
    let shape = [features.windows, features.n_mels, WINDOW_FRAMES];
    if let Some(out) = &args.out {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut writer = BufWriter::new(file);
        npy::write_f32(&mut writer, &shape, &data)?;
        writer.flush()?;
    }
    println!(
        "{}: {:.3} s of audio, {} frames, {} window(s) of [{}, {}]",
        args.file.display(),
        features.duration_seconds,
        features.frames.len() / features.n_mels,
        features.windows,
        features.n_mels,
        WINDOW_FRAMES
    );
    Ok(())
}

fn parse_n_mels(value: &str) -> Result<u32, String> {
    match value {
        "80" => Ok(80),
        "128" => Ok(128),
        other => Err(format!("must be 80 or 128, got {other}")),
    }
}
