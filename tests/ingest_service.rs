//! FeatureService.Ingest end to end over real gRPC on 127.0.0.1: the real model service
//! (whisper-base) and the real feature service pointed at it. Audio files ingested through the
//! feature service are stored exactly as the same clips' features computed here and sent
//! straight to ModelService.IngestExamples: the stored windows are byte-identical.

use std::path::Path;

use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, PipelineConfig};
use asr_proto::v1 as pb;
use e2e_support::whisper_base::model_dir;
use e2e_support::{assets, start_feature_service, start_model_service};
use feature_service::FeatureServiceConfig;
use model_service::ModelServiceConfig;
use pb::feature_service_client::FeatureServiceClient;
use pb::ingest_audio_request::Payload;
use pb::model_service_client::ModelServiceClient;
use tonic::Code;

const CLIPS: usize = 6;
const CHUNK: usize = 16 * 1024;

struct Clip {
    id: String,
    text: String,
    bytes: Vec<u8>,
}

fn train_clips(count: usize) -> Vec<Clip> {
    let dir = assets().join("corpus/espeak");
    std::fs::read_to_string(dir.join("train.jsonl"))
        .expect("manifest")
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("json");
            let audio = entry["audio"].as_str().expect("audio");
            Clip {
                id: audio.to_string(),
                text: entry["text"].as_str().expect("text").to_string(),
                bytes: std::fs::read(dir.join(audio)).expect("clip"),
            }
        })
        .collect()
}

fn audio_config(dataset: &str, mode: pb::IngestMode) -> pb::IngestAudioRequest {
    pb::IngestAudioRequest {
        payload: Some(Payload::Config(pb::IngestAudioConfig {
            dataset: dataset.into(),
            mode: mode as i32,
            split: "train".into(),
            language: "zh".into(),
            description: "espeak-ng Mandarin".into(),
            default_format: None,
        })),
    }
}

fn audio_example(id: &str, text: &str, audio: &[u8]) -> Vec<pb::IngestAudioRequest> {
    let header = pb::IngestAudioRequest {
        payload: Some(Payload::Example(pb::AudioExampleHeader {
            id: id.into(),
            text: text.into(),
            format: None,
            split: String::new(),
        })),
    };
    std::iter::once(header)
        .chain(audio.chunks(CHUNK).map(|c| pb::IngestAudioRequest {
            payload: Some(Payload::Audio(c.to_vec())),
        }))
        .collect()
}

/// The clips' features computed here, sent straight to the model service.
async fn ingest_local_features(
    client: &mut ModelServiceClient<tonic::transport::Channel>,
    dataset: &str,
    mode: pb::IngestMode,
    clips: &[Clip],
) -> Result<Vec<pb::IngestAck>, tonic::Status> {
    use pb::ingest_examples_request::Payload as P;
    let pipeline = FeaturePipeline::new(PipelineConfig::default());
    let mut messages = vec![pb::IngestExamplesRequest {
        payload: Some(P::Config(pb::IngestExamplesConfig {
            dataset: dataset.into(),
            mode: mode as i32,
            n_mels: 80,
            split: "train".into(),
            language: "zh".into(),
            description: "espeak-ng Mandarin".into(),
        })),
    }];
    for clip in clips {
        let (_, frames, summary) = extract_all(
            &pipeline,
            std::io::Cursor::new(clip.bytes.clone()),
            InputFormat::Encoded,
        )
        .expect("local extraction");
        messages.push(pb::IngestExamplesRequest {
            payload: Some(P::Example(pb::DatasetExample {
                id: clip.id.clone(),
                text: clip.text.clone(),
                duration_seconds: summary.duration_seconds,
                features: Some(pb::MelFrames {
                    n_mels: 80,
                    first_frame_index: 0,
                    frame_count: (frames.len() / 80) as u32,
                    values: frames,
                }),
                split: String::new(),
            })),
        });
    }
    let mut stream = client
        .ingest_examples(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut acks = Vec::new();
    while let Some(ack) = stream.message().await? {
        acks.push(ack);
    }
    Ok(acks)
}

fn window(root: &Path, dataset: &str, index: usize) -> Vec<u8> {
    let path = root
        .join("datasets")
        .join(dataset)
        .join("windows")
        .join(format!("{index}.f32"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audio_through_the_feature_service_is_stored_as_local_features_are() {
    let root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(ModelServiceConfig {
        model: Some(model_dir()),
        data_root: root.path().to_path_buf(),
        device: "cpu".into(),
        ..Default::default()
    })
    .await;
    let features = start_feature_service(FeatureServiceConfig {
        model_service: Some(model.url()),
        ..Default::default()
    })
    .await;
    let mut feature_client = FeatureServiceClient::connect(features.url())
        .await
        .expect("connect to the feature service");
    let mut model_client = ModelServiceClient::connect(model.url())
        .await
        .expect("connect to the model service");
    let clips = train_clips(CLIPS);

    // Audio files through FeatureService.Ingest.
    let mut requests = vec![audio_config("via-features", pb::IngestMode::Create)];
    for clip in &clips {
        requests.extend(audio_example(&clip.id, &clip.text, &clip.bytes));
    }
    let response = feature_client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("ingest through the feature service")
        .into_inner();
    assert_eq!(
        (response.accepted_count, response.rejected_count),
        (CLIPS as u64, 0),
        "{:#?}",
        response.results
    );
    let acks: Vec<(&str, u64, &str)> = response
        .results
        .iter()
        .map(|a| (a.example_id.as_str(), a.index, a.split.as_str()))
        .collect();
    let expected: Vec<(&str, u64, &str)> = clips
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i as u64, "train"))
        .collect();
    assert_eq!(acks, expected);
    assert!(response.accepted_audio_seconds > CLIPS as f64 * 1.0);
    let info = response.dataset_info.expect("dataset_info");
    assert_eq!(
        (
            info.name.as_str(),
            info.example_count,
            info.n_mels,
            info.language.as_str()
        ),
        ("via-features", CLIPS as u64, 80, "zh")
    );
    assert!((info.audio_hours * 3600.0 - response.accepted_audio_seconds).abs() < 1e-6);

    // The same clips as local features, straight to the model service.
    let direct = ingest_local_features(&mut model_client, "direct", pb::IngestMode::Create, &clips)
        .await
        .expect("direct ingestion");
    assert!(direct
        .iter()
        .all(|a| a.status == pb::ExampleStatus::Accepted as i32));
    for index in 0..CLIPS {
        let (relayed, local) = (
            window(root.path(), "via-features", index),
            window(root.path(), "direct", index),
        );
        assert_eq!(relayed.len(), 80 * 3000 * 4);
        assert!(
            relayed == local,
            "window {index} differs between the feature service and local features"
        );
    }
    let direct_info = model_client
        .get_dataset(pb::GetDatasetRequest {
            name: "direct".into(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!(direct_info.example_count, info.example_count);
    assert_eq!(direct_info.audio_hours, info.audio_hours);

    // CREATE on a taken name: the model service's status, relayed unchanged.
    let direct_status =
        ingest_local_features(&mut model_client, "direct", pb::IngestMode::Create, &[])
            .await
            .expect_err("taken");
    let status = feature_client
        .ingest(tokio_stream::iter(vec![audio_config(
            "direct",
            pb::IngestMode::Create,
        )]))
        .await
        .expect_err("taken");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(
        (status.code(), status.message()),
        (direct_status.code(), direct_status.message())
    );

    // Appending: a duplicate id rejected by the model service and undecodable audio
    // rejected by the feature service, each in its place.
    let mut requests = vec![audio_config("via-features", pb::IngestMode::Append)];
    requests.extend(audio_example(&clips[0].id, &clips[0].text, &clips[0].bytes));
    requests.extend(audio_example("garbage", "乱码", &[0x42; 5000]));
    let response = feature_client
        .ingest(tokio_stream::iter(requests))
        .await
        .expect("append")
        .into_inner();
    let rejections: Vec<(&str, pb::RejectionReason)> = response
        .results
        .iter()
        .map(|a| (a.example_id.as_str(), a.rejection()))
        .collect();
    assert_eq!(
        rejections,
        [
            (clips[0].id.as_str(), pb::RejectionReason::DuplicateId),
            ("garbage", pb::RejectionReason::UndecodableAudio),
        ]
    );
    assert_eq!(
        response.dataset_info.map(|d| d.example_count),
        Some(CLIPS as u64)
    );

    features.stop().await;
    model.stop().await;
}
