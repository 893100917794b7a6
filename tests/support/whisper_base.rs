//! whisper-base and the espeak-ng test clips, for the tests that run the real model.

use std::path::PathBuf;

use asr_audio::InputFormat;
use asr_whisper::{LoadOptions, LoadedModel, Precision};
use tch::Device;

use crate::{assets, our_windows};

pub struct Clip {
    pub path: PathBuf,
    pub text: String,
}

/// The first `count` clips of the espeak-ng test split.
pub fn test_clips(count: usize) -> Vec<Clip> {
    let dir = assets().join("corpus/espeak");
    std::fs::read_to_string(dir.join("test.jsonl"))
        .expect("manifest")
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("json");
            Clip {
                path: dir.join(entry["audio"].as_str().expect("audio")),
                text: entry["text"].as_str().expect("text").to_string(),
            }
        })
        .collect()
}

/// The converted whisper-base directory.
pub fn model_dir() -> PathBuf {
    let dir = assets().join("whisper-base");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: scripts/test.sh converts it",
        dir.display()
    );
    dir
}

/// The first (only) normalised window of each clip.
pub fn first_windows(clips: &[Clip]) -> Vec<Vec<f32>> {
    clips
        .iter()
        .map(|clip| {
            our_windows(
                std::fs::read(&clip.path).expect("clip"),
                InputFormat::Encoded,
                80,
            )
            .0
            .remove(0)
        })
        .collect()
}

/// Writes normalised windows as a float32 .npy `[N, 80, 3000]` (for the Python references).
pub fn write_windows_npy(path: &std::path::Path, windows: &[Vec<f32>]) {
    asr_audio::npy::write_f32(
        std::fs::File::create(path).expect("npy"),
        &[windows.len(), 80, 3000],
        &windows.concat(),
    )
    .expect("write");
}

pub fn load(precision: Precision) -> LoadedModel {
    LoadedModel::load(
        &model_dir(),
        LoadOptions {
            device: Device::Cpu,
            precision,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading whisper-base ({precision:?}): {e:#}"))
}
