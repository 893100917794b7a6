//! whisper-base and the espeak-ng test clips, for the tests that run the real model.

use std::path::PathBuf;

use asr_audio::InputFormat;
use asr_whisper::{Adapter, LoadOptions, LoadedModel, Precision};
use tch::{Device, Tensor};

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

/// A LoRA adapter of whisper-base trained by this project on the espeak-ng training split
/// (PEFT layout; `tests/fixtures/README.md` says how it was made). With it the model reads the
/// test clips, which the base model cannot.
pub fn espeak_adapter_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/espeak-lora")
}

/// [`load`] with the PEFT adapter in `adapter_dir` attached.
pub fn load_with_adapter(precision: Precision, adapter_dir: &std::path::Path) -> LoadedModel {
    let mut model = load(precision);
    let sites = model.model.linear_sites();
    let adapter = Adapter::load_peft(adapter_dir, &sites, Device::Cpu)
        .unwrap_or_else(|e| panic!("adapter {}: {e:#}", adapter_dir.display()));
    model.model.attach(&adapter);
    model
}

/// Teacher forcing: each window's token sequence fed whole to the decoder, after the windows'
/// encoder output `encoded`, and the argmax of the logits at every position (entry `t` is the
/// model's next-token choice after the first `t + 1` tokens). Unlike free decoding, one
/// different choice does not change what follows, so this compares two models' numerics
/// position by position.
pub fn teacher_forced_choices(
    model: &LoadedModel,
    encoded: &Tensor,
    sequences: &[Vec<i64>],
) -> Vec<Vec<i64>> {
    assert_eq!(encoded.size()[0], sequences.len() as i64);
    let pad = model.generation.eos_token_id;
    let mut choices = Vec::with_capacity(sequences.len());
    for (start, tokens) in (0..).step_by(8).zip(sequences.chunks(8)) {
        let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
        // Padding goes after each sequence: the causal mask keeps it out of the real positions.
        let padded: Vec<i64> = tokens
            .iter()
            .flat_map(|t| {
                t.iter()
                    .copied()
                    .chain(std::iter::repeat(pad))
                    .take(longest)
            })
            .collect();
        let best = tch::no_grad(|| {
            let encoder_out = encoded.narrow(0, start, tokens.len() as i64);
            let mut cache = model.model.decoder.new_cache(&encoder_out);
            let input = Tensor::from_slice(&padded).view([tokens.len() as i64, longest as i64]);
            model
                .model
                .decoder
                .forward(&input, &mut cache)
                .argmax(-1, false)
        });
        for (row, t) in tokens.iter().enumerate() {
            let row: Vec<i64> = Vec::try_from(best.get(row as i64)).expect("argmax");
            choices.push(row[..t.len()].to_vec());
        }
    }
    choices
}
