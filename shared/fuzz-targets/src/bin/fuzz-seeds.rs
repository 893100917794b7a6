//! Writes hand-made protobuf encodings of valid requests, one file each, as seeds of the
//! request targets: `fuzz-seeds DIR` writes `DIR/feature_requests/*.pb` and
//! `DIR/model_requests/*.pb` (scripts/fuzz.sh runs it; fuzz/seeds/ holds its output).

use std::path::Path;

use asr_proto::v1 as pb;
use prost::Message;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuzz-seeds DIR");
        std::process::exit(2);
    };
    let dir = Path::new(&dir);
    write(&dir.join("feature_requests"), feature_seeds())?;
    write(&dir.join("model_requests"), model_seeds())
}

fn write(dir: &Path, seeds: Vec<(&str, Vec<u8>)>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("{name}.pb")), bytes)?;
    }
    Ok(())
}

fn raw_pcm(sample_rate_hz: u32, channels: u32, interleaved: Option<bool>) -> pb::AudioFormat {
    pb::AudioFormat {
        format: Some(pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
            sample_format: pb::SampleFormat::S16le as i32,
            sample_rate_hz,
            channels,
            interleaved,
        })),
    }
}

fn options() -> pb::TranscriptionOptions {
    pb::TranscriptionOptions {
        language: "zh".into(),
        decoding: Some(pb::DecodingOptions {
            beam_size: Some(5),
            temperature_increment: Some(0.2),
            ..Default::default()
        }),
        adapter: "mine-lora".into(),
        adapter_scale: Some(0.5),
        partial_results: true,
        partial_interval_seconds: Some(1.0),
        ..Default::default()
    }
}

fn feature_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use pb::extract_request::Payload as Extract;
    use pb::ingest_audio_request::Payload as Ingest;
    use pb::transcribe_audio_request::Payload as Transcribe;
    let extract = |payload| pb::ExtractRequest {
        payload: Some(payload),
    };
    let audio: Vec<u8> = (0..64u8).collect();
    vec![
        (
            "extract_config_planar",
            extract(Extract::Config(pb::ExtractConfig {
                format: Some(raw_pcm(44_100, 2, Some(false))),
                n_mels: 128,
                max_frames_per_message: 3000,
            }))
            .encode_to_vec(),
        ),
        (
            "extract_config_encoded",
            extract(Extract::Config(pb::ExtractConfig {
                format: Some(pb::AudioFormat {
                    format: Some(pb::audio_format::Format::Encoded(pb::EncodedFormat {
                        container_hint: pb::Container::Flac as i32,
                    })),
                }),
                n_mels: 80,
                max_frames_per_message: 0,
            }))
            .encode_to_vec(),
        ),
        (
            "extract_audio",
            extract(Extract::Audio(audio.clone())).encode_to_vec(),
        ),
        (
            "transcribe_config",
            pb::TranscribeAudioRequest {
                payload: Some(Transcribe::Config(pb::TranscribeAudioConfig {
                    format: Some(raw_pcm(16_000, 1, None)),
                    options: Some(options()),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "ingest_config",
            pb::IngestAudioRequest {
                payload: Some(Ingest::Config(pb::IngestAudioConfig {
                    dataset: "mine".into(),
                    mode: pb::IngestMode::Append as i32,
                    split: "dev".into(),
                    language: "zh".into(),
                    description: "seed".into(),
                    default_format: Some(raw_pcm(48_000, 2, Some(true))),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "ingest_example",
            pb::IngestAudioRequest {
                payload: Some(Ingest::Example(pb::AudioExampleHeader {
                    id: "clip-1".into(),
                    text: "你好".into(),
                    format: Some(raw_pcm(22_050, 3, Some(false))),
                    split: "train".into(),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "ingest_audio",
            pb::IngestAudioRequest {
                payload: Some(Ingest::Audio(audio)),
            }
            .encode_to_vec(),
        ),
    ]
}

fn model_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dataset = |name: &str, split: &str| pb::DatasetRef {
        dataset: name.into(),
        split: split.into(),
    };
    vec![
        (
            "transcribe_frames_config",
            pb::TranscribeFramesRequest {
                payload: Some(pb::transcribe_frames_request::Payload::Config(
                    pb::TranscribeFramesConfig {
                        options: Some(options()),
                        n_mels: 80,
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            "start_training",
            pb::StartTrainingRequest {
                train_dataset: Some(dataset("espeak", "train")),
                eval_dataset: Some(dataset("espeak", "dev")),
                output_adapter: "espeak-demo".into(),
                lora: Some(pb::LoraConfig {
                    r: 4,
                    alpha: 64.0,
                    dropout: Some(0.05),
                    target_modules: vec!["q_proj".into(), "v_proj".into()],
                    bias: pb::LoraBias::None as i32,
                }),
                hyperparameters: Some(pb::TrainingHyperparameters {
                    learning_rate: 1e-3,
                    epochs: 1.0,
                    per_device_batch_size: 4,
                    gradient_accumulation_steps: 4,
                    metric_for_best_model: pb::BestModelMetric::Cer as i32,
                    language: "zh".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "ingest_examples_config",
            pb::IngestExamplesRequest {
                payload: Some(pb::ingest_examples_request::Payload::Config(
                    pb::IngestExamplesConfig {
                        dataset: "espeak".into(),
                        mode: pb::IngestMode::Create as i32,
                        n_mels: 80,
                        split: "train".into(),
                        language: "zh".into(),
                        description: "seed".into(),
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            "merge_adapters",
            pb::MergeAdaptersRequest {
                adapters: vec![
                    pb::WeightedAdapter {
                        name: "a".into(),
                        weight: Some(0.5),
                    },
                    pb::WeightedAdapter {
                        name: "b".into(),
                        weight: None,
                    },
                ],
                combination: pb::AdapterCombination::Cat as i32,
                output_name: "merged".into(),
                load: true,
            }
            .encode_to_vec(),
        ),
        (
            "load_adapter",
            pb::LoadAdapterRequest {
                name: "imported".into(),
                source_dir: "peft/adapter".into(),
            }
            .encode_to_vec(),
        ),
        (
            "get_adapter",
            pb::GetAdapterRequest {
                name: "espeak-demo".into(),
            }
            .encode_to_vec(),
        ),
    ]
}
