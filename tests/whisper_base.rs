//! whisper-base (converted from the setup's CTranslate2 directory) against HF transformers on
//! the espeak-ng Mandarin test clips: greedy text, CER, and int8 against fp32.

use std::path::PathBuf;

use asr_audio::InputFormat;
use asr_whisper::metrics::cer;
use asr_whisper::{DecodeOptions, LoadOptions, LoadedModel, Precision};
use e2e_support::{assets, our_windows, run_reference};
use tch::Device;

const CLIPS: usize = 100;
const BATCH: usize = 8;

struct Clip {
    path: PathBuf,
    text: String,
}

fn test_clips(count: usize) -> Vec<Clip> {
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

fn model_dir() -> PathBuf {
    let dir = assets().join("whisper-base");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: scripts/test.sh converts it",
        dir.display()
    );
    dir
}

fn transcribe(model: &LoadedModel, windows: &[Vec<f32>]) -> Vec<String> {
    let options = DecodeOptions {
        language: Some("zh".into()),
        ..Default::default()
    };
    windows
        .chunks(BATCH)
        .flat_map(|batch| {
            model
                .transcribe_windows(batch, &options)
                .expect("transcribe")
        })
        .map(|w| w.text.trim().to_string())
        .collect()
}

/// The first (only) normalised window of each clip.
fn first_windows(clips: &[Clip]) -> Vec<Vec<f32>> {
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

fn load(precision: Precision) -> LoadedModel {
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

#[test]
fn greedy_text_matches_hf_and_int8_stays_within_a_cer_point() {
    let clips = test_clips(CLIPS);
    let windows = first_windows(&clips);
    let references: Vec<&str> = clips.iter().map(|c| c.text.as_str()).collect();

    let job = serde_json::json!({
        "engine": "hf", "model": model_dir(), "language": "zh", "beam_size": 1, "batch_size": BATCH,
        "audio": clips.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
    });
    let hf: serde_json::Value = serde_json::from_str(&run_reference(
        "transcribe_reference.py",
        &[],
        Some(&job.to_string()),
    ))
    .expect("json");
    let hf_texts: Vec<String> = hf["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("text").to_string())
        .collect();

    let fp32 = load(Precision::Fp32);
    let ours = transcribe(&fp32, &windows);
    let fp32_bytes = fp32.model.weight_bytes();
    drop(fp32);
    let int8 = load(Precision::Int8);
    let ours_int8 = transcribe(&int8, &windows);
    // int8 keeps the linear weights at 1 byte per parameter; the token embedding (51865 x 512,
    // 106 MB in f32 for whisper-base, also the tied output projection), convolutions, norms and
    // biases stay f32, so the whole shrinks to a bit over half here (and to about a quarter for
    // large-v2, whose linears dominate).
    let int8_bytes = int8.model.weight_bytes();
    println!(
        "resident weights: fp32 {:.1} MB, int8 {:.1} MB",
        fp32_bytes as f64 / 1e6,
        int8_bytes as f64 / 1e6
    );
    let embedding_bytes = 51_865 * 512 * 4;
    let linear_fp32 = (fp32_bytes - embedding_bytes) as f64;
    let linear_int8 = (int8_bytes - embedding_bytes) as f64;
    assert!(
        linear_int8 < 0.3 * linear_fp32,
        "int8 weights (without the embedding) take {linear_int8} bytes, fp32 {linear_fp32}"
    );

    let identical = ours.iter().zip(&hf_texts).filter(|(a, b)| a == b).count();
    for (i, ((a, b), r)) in ours
        .iter()
        .zip(&hf_texts)
        .zip(&references)
        .enumerate()
        .filter(|(_, ((a, b), _))| a != b)
        .take(10)
    {
        println!("clip {i}: ours {a:?} | hf {b:?} | reference {r:?}");
    }
    let cer_ours = cer(ours
        .iter()
        .map(String::as_str)
        .zip(references.iter().copied()));
    let cer_hf = cer(hf_texts
        .iter()
        .map(String::as_str)
        .zip(references.iter().copied()));
    let cer_int8 = cer(ours_int8
        .iter()
        .map(String::as_str)
        .zip(references.iter().copied()));
    println!("greedy text identical to HF on {identical}/{CLIPS} clips; CER ours fp32 {:.2}%, HF fp32 {:.2}%, ours int8 {:.2}%", cer_ours * 100.0, cer_hf * 100.0, cer_int8 * 100.0);
    assert!(
        identical * 100 >= 95 * CLIPS,
        "only {identical}/{CLIPS} identical"
    );
    assert!(
        (cer_ours - cer_hf).abs() <= 0.005,
        "CER ours {cer_ours} vs HF {cer_hf}"
    );
    assert!(
        (cer_int8 - cer_ours).abs() <= 0.01,
        "CER int8 {cer_int8} vs fp32 {cer_ours}"
    );
}

/// Beam search 5 against CTranslate2's (faster-whisper's engine) on identical features: the
/// decoders are compared, not the front ends (faster-whisper pads features, HF pads audio).
#[test]
fn beam5_matches_ctranslate2_on_the_same_features() {
    let clips = test_clips(CLIPS);
    let windows = first_windows(&clips);
    let dir = tempfile::tempdir().expect("tempdir");
    let features = dir.path().join("features.npy");
    asr_audio::npy::write_f32(
        std::fs::File::create(&features).expect("npy"),
        &[windows.len(), 80, 3000],
        &windows.concat(),
    )
    .expect("write");
    let model = load(Precision::Fp32);
    let prompt = model
        .generation
        .prompt(Some("zh"), asr_whisper::Task::Transcribe, false)
        .expect("prompt");
    let ct2_dir = assets().join("whisper-base-ct2");
    let output = run_reference(
        "ct2_generate.py",
        &[
            ct2_dir.to_str().expect("path"),
            features.to_str().expect("path"),
            "5",
        ],
        Some(&serde_json::to_string(&prompt).expect("json")),
    );
    let theirs: Vec<Vec<i64>> = serde_json::from_str(output.trim()).expect("tokens");
    let options = DecodeOptions {
        language: Some("zh".into()),
        beam_size: 5,
        ..Default::default()
    };
    let ours: Vec<Vec<i64>> = windows
        .chunks(BATCH)
        .flat_map(|batch| model.transcribe_windows(batch, &options).expect("beam"))
        .map(|t| {
            t.tokens
                .into_iter()
                .filter(|&id| id != model.generation.eos_token_id)
                .collect()
        })
        .collect();
    let identical = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
    for (i, (a, b)) in ours
        .iter()
        .zip(&theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .take(5)
    {
        println!(
            "clip {i}: ours {:?} | ct2 {:?}",
            model.tokenizer.decode(a).unwrap_or_default(),
            model.tokenizer.decode(b).unwrap_or_default()
        );
    }
    println!(
        "beam 5 tokens identical to CTranslate2 on {identical}/{} clips",
        windows.len()
    );
    assert!(
        identical * 100 >= 90 * windows.len(),
        "only {identical}/{} identical",
        windows.len()
    );
}

/// Long-form: 74 s built from the AISHELL sentences (8 x both, with 0.5 s gaps), transcribed
/// window after window with timestamps: segments in order, covering the audio, with a CER
/// within 2 points of the sentences transcribed one by one.
#[test]
fn long_form_with_timestamps_keeps_order_and_accuracy() {
    let names = ["BAC009S0764W0121.wav", "BAC009S0764W0122.wav"];
    let texts = ["甚至出现交易几乎停滞的情况", "一二线城市虽然也处于调整中"];
    let clips: Vec<Vec<f32>> = names
        .iter()
        .map(|n| e2e_support::read_audio(&assets().join("aishell").join(n)).0)
        .collect();
    let gap = vec![0.0f32; 8_000];
    let mut long = Vec::new();
    let mut references = Vec::new();
    for _ in 0..8 {
        for (clip, text) in clips.iter().zip(texts) {
            long.extend_from_slice(clip);
            long.extend_from_slice(&gap);
            references.push(text);
        }
    }
    let duration = long.len() as f64 / 16_000.0;
    assert!(duration >= 60.0);
    let (_, frames) = our_windows(
        e2e_support::wav_i16(&long, 16_000, 1),
        InputFormat::Encoded,
        80,
    );
    let model = load(Precision::Int8);
    let options = DecodeOptions {
        language: Some("zh".into()),
        ..Default::default()
    };
    let segments = model
        .transcribe_long(&frames, long.len().div_ceil(160), &options)
        .expect("long-form");
    for pair in segments.windows(2) {
        assert!(
            pair[0].start <= pair[1].start && pair[0].end <= pair[1].end + 1e-6,
            "segments out of order: {pair:?}"
        );
    }
    let last_end = segments.last().map_or(0.0, |s| s.end);
    println!(
        "{} segments over {duration:.1} s, last ends at {last_end:.2} s",
        segments.len()
    );
    assert!(
        last_end >= duration - 5.0 && last_end <= duration + 0.5,
        "segments cover up to {last_end} of {duration} s"
    );

    let long_text: String = segments.iter().map(|s| s.text.as_str()).collect();
    let long_cer = cer([(long_text.as_str(), references.concat().as_str())]);
    let windows: Vec<Vec<f32>> = clips
        .iter()
        .map(|c| {
            our_windows(e2e_support::wav_i16(c, 16_000, 1), InputFormat::Encoded, 80)
                .0
                .remove(0)
        })
        .collect();
    let short = transcribe(&model, &windows);
    let short_cer = cer(short.iter().map(String::as_str).zip(texts));
    println!(
        "long-form CER {:.2}%, per-sentence CER {:.2}%",
        long_cer * 100.0,
        short_cer * 100.0
    );
    assert!(
        long_cer <= short_cer + 0.02,
        "long-form CER {long_cer} vs per-sentence {short_cer}"
    );
}
