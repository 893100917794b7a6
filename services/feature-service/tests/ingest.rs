//! FeatureService.Ingest over real gRPC on 127.0.0.1 against the fake ModelService
//! (tests/common/fake_model.rs): each example's audio is decoded with the model's n_mels and
//! forwarded exactly as a local extraction gives it; acks come back in example order with the
//! examples rejected here (undecodable, empty, longer than 30 s) in their place; the model
//! service's stream errors are relayed unchanged.

mod common;

use std::path::PathBuf;

use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PcmSpec, PipelineConfig, SampleFormat};
use asr_proto::v1 as pb;
use common::fake_model::{FakeModel, Script};
use common::harness::{FeatureService, PATIENCE};
use pb::feature_service_client::FeatureServiceClient;
use pb::ingest_audio_request::Payload;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

const CHUNK: usize = 3000;

fn repo_root() -> PathBuf {
    std::env::var_os("ASR_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The first `count` clips of the espeak-ng train split: (id, text, wav bytes).
fn train_clips(count: usize) -> Vec<(String, String, Vec<u8>)> {
    let dir = repo_root().join("assets/corpus/espeak");
    let manifest = std::fs::read_to_string(dir.join("train.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh first)", dir.display()));
    manifest
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("json");
            let audio = entry["audio"].as_str().expect("audio");
            let bytes = std::fs::read(dir.join(audio)).expect("clip");
            let text = entry["text"].as_str().expect("text").to_string();
            (audio.to_string(), text, bytes)
        })
        .collect()
}

/// Frames and duration of a local extraction.
fn local(bytes: &[u8], format: InputFormat, n_mels: u32) -> (Vec<f32>, f64) {
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(n_mels).expect("n_mels"),
        ..Default::default()
    });
    let (_, frames, summary) =
        extract_all(&pipeline, std::io::Cursor::new(bytes.to_vec()), format).expect("extract");
    (frames, summary.duration_seconds)
}

/// 16 kHz mono s16le samples of a 440 Hz tone.
fn tone(seconds: f64) -> Vec<u8> {
    (0..(seconds * 16_000.0) as usize)
        .flat_map(|i| {
            let v = (i as f64 * 440.0 * std::f64::consts::TAU / 16_000.0).sin() * 8000.0;
            (v as i16).to_le_bytes()
        })
        .collect()
}

fn wav(pcm: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + pcm.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&16_000u32.to_le_bytes());
    out.extend_from_slice(&32_000u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(pcm);
    out
}

fn raw_pcm_16k() -> pb::AudioFormat {
    pb::AudioFormat {
        format: Some(pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
            sample_format: pb::SampleFormat::S16le as i32,
            sample_rate_hz: 16_000,
            channels: 1,
            interleaved: None,
        })),
    }
}

fn config(dataset: &str) -> pb::IngestAudioRequest {
    pb::IngestAudioRequest {
        payload: Some(Payload::Config(pb::IngestAudioConfig {
            dataset: dataset.into(),
            mode: pb::IngestMode::CreateOrAppend as i32,
            split: "train".into(),
            language: "zh".into(),
            description: "espeak-ng Mandarin".into(),
            default_format: None,
        })),
    }
}

/// An example header and its audio in `CHUNK`-byte messages.
fn example(
    id: &str,
    text: &str,
    format: Option<pb::AudioFormat>,
    split: &str,
    audio: &[u8],
) -> Vec<pb::IngestAudioRequest> {
    let header = pb::IngestAudioRequest {
        payload: Some(Payload::Example(pb::AudioExampleHeader {
            id: id.into(),
            text: text.into(),
            format,
            split: split.into(),
        })),
    };
    std::iter::once(header)
        .chain(audio.chunks(CHUNK).map(|c| pb::IngestAudioRequest {
            payload: Some(Payload::Audio(c.to_vec())),
        }))
        .collect()
}

async fn ingest(
    client: &mut FeatureServiceClient<Channel>,
    requests: Vec<pb::IngestAudioRequest>,
) -> Result<pb::IngestResponse, Status> {
    tokio::time::timeout(PATIENCE, client.ingest(tokio_stream::iter(requests)))
        .await
        .expect("Ingest did not finish in time")
        .map(tonic::Response::into_inner)
}

async fn fake(script: Script) -> FakeModel {
    FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        script,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_forwarded_as_extracted_and_acks_come_back_in_order() {
    let model = fake(Script {
        n_mels: 128,
        ..Script::default()
    })
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let clips = train_clips(4);
    let tone = tone(1.5);
    let too_long = wav(&vec![0u8; 31 * 32_000]);
    let garbage: Vec<u8> = b"this is not audio, only text that no decoder takes; "
        .repeat(100)
        .to_vec();

    let mut requests = vec![config("espeak")];
    requests.extend(example(&clips[0].0, &clips[0].1, None, "", &clips[0].2));
    requests.extend(example(&clips[1].0, &clips[1].1, None, "", &clips[1].2));
    requests.extend(example("garbage", "乱码", None, "", &garbage));
    requests.extend(example(&clips[2].0, " ", None, "", &clips[2].2));
    requests.extend(example("long", "太长了", None, "", &too_long));
    requests.extend(example("tone", "音", Some(raw_pcm_16k()), "dev", &tone));
    requests.extend(example("silent", "无声", None, "", &[]));
    requests.extend(example(&clips[3].0, &clips[3].1, None, "", &clips[3].2));
    let response = ingest(&mut client, requests).await.expect("ingest");

    use pb::RejectionReason as R;
    let expected = [
        (clips[0].0.as_str(), R::Unspecified, "train"),
        (&clips[1].0, R::Unspecified, "train"),
        ("garbage", R::UndecodableAudio, "train"),
        (&clips[2].0, R::EmptyText, "train"),
        ("long", R::AudioTooLong, "train"),
        ("tone", R::Unspecified, "dev"),
        ("silent", R::EmptyAudio, "train"),
        (&clips[3].0, R::Unspecified, "train"),
    ];
    let got: Vec<(&str, R, &str)> = response
        .results
        .iter()
        .map(|a| (a.example_id.as_str(), a.rejection(), a.split.as_str()))
        .collect();
    assert_eq!(got, expected, "{:#?}", response.results);
    let accepted: Vec<u64> = response
        .results
        .iter()
        .filter(|a| a.status() == pb::ExampleStatus::Accepted)
        .map(|a| a.index)
        .collect();
    assert_eq!(accepted, [0, 1, 2, 3], "indices from the model service");
    assert!(response
        .results
        .iter()
        .filter(|a| a.rejection() != R::Unspecified)
        .all(|a| a.status() == pb::ExampleStatus::Rejected && !a.message.is_empty()));
    assert_eq!((response.accepted_count, response.rejected_count), (4, 4));
    assert_eq!(response.dataset, "espeak");

    // Exactly the decodable examples reached the model service, as extracted locally.
    let seen = model.seen();
    let upstream = seen.ingest_config.expect("config");
    assert_eq!(
        upstream,
        pb::IngestExamplesConfig {
            dataset: "espeak".into(),
            mode: pb::IngestMode::CreateOrAppend as i32,
            n_mels: 128,
            split: "train".into(),
            language: "zh".into(),
            description: "espeak-ng Mandarin".into(),
        }
    );
    let tone_format = InputFormat::RawPcm(PcmSpec::new(SampleFormat::S16Le, 16_000, 1).unwrap());
    let sent = [
        (&clips[0], InputFormat::Encoded, ""),
        (&clips[1], InputFormat::Encoded, ""),
        (&clips[2], InputFormat::Encoded, ""),
    ];
    let mut wanted: Vec<(String, String, Vec<f32>, f64, String)> = sent
        .iter()
        .map(|((id, text, bytes), format, split)| {
            let text = if id == &clips[2].0 { " " } else { text };
            let (frames, seconds) = local(bytes, *format, 128);
            (id.clone(), text.into(), frames, seconds, split.to_string())
        })
        .collect();
    let (frames, seconds) = local(&tone, tone_format, 128);
    wanted.push(("tone".into(), "音".into(), frames, seconds, "dev".into()));
    let (frames, seconds) = local(&clips[3].2, InputFormat::Encoded, 128);
    wanted.push((
        clips[3].0.clone(),
        clips[3].1.clone(),
        frames,
        seconds,
        String::new(),
    ));
    assert_eq!(seen.examples.len(), wanted.len());
    let mut accepted_seconds = 0.0;
    for (example, (id, text, frames, seconds, split)) in seen.examples.iter().zip(&wanted) {
        assert_eq!(
            (&example.id, &example.text, &example.split),
            (id, text, split)
        );
        assert_eq!(example.duration_seconds, *seconds, "{id}");
        let features = example.features.as_ref().expect("features");
        assert_eq!(
            (features.n_mels, features.first_frame_index),
            (128, 0),
            "{id}"
        );
        assert_eq!(features.frame_count as usize * 128, frames.len(), "{id}");
        assert!(
            features.values == *frames,
            "{id}: forwarded frames differ from a local extraction"
        );
        if !text.trim().is_empty() {
            accepted_seconds += seconds;
        }
    }
    assert!((response.accepted_audio_seconds - accepted_seconds).abs() < 1e-9);
    assert_eq!(seen.ingest_completed, 1, "the upstream input ended cleanly");
    assert_eq!(seen.dataset_requests, ["espeak"]);
    let info = response.dataset_info.expect("dataset_info");
    assert_eq!((info.name.as_str(), info.example_count), ("espeak", 4));
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_service_stream_errors_are_relayed_unchanged() {
    let clip = train_clips(1).remove(0);
    let cases = [
        Status::already_exists("dataset \"espeak\" already exists"),
        Status::with_error_details(
            Code::InvalidArgument,
            "config.dataset: must be 1..=64 characters of [A-Za-z0-9._-]",
            ErrorDetails::with_bad_request_violation("config.dataset", "bad name"),
        ),
        Status::failed_precondition("dataset \"espeak\" is in \"en\", not \"zh\""),
    ];
    for sent in cases {
        let model = fake(Script {
            ingest_reject: Some(sent.clone()),
            ..Script::default()
        })
        .await;
        let service = FeatureService::start(Some(model.url())).await;
        let mut client = service.client().await;
        let mut requests = vec![config("espeak")];
        requests.extend(example(&clip.0, &clip.1, None, "", &clip.2));
        let status = ingest(&mut client, requests).await.expect_err("refused");
        assert_eq!(status.code(), sent.code());
        assert_eq!(status.message(), sent.message());
        assert_eq!(status.details(), sent.details(), "details unchanged");
        assert!(model.seen().examples.is_empty());
        service.stop().await;
        model.stop().await;
    }
}

fn field(status: &Status) -> String {
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("BadRequest").field_violations;
    violations[0].field.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_and_missing_model_service() {
    let clip = train_clips(1).remove(0);
    let model = fake(Script::default()).await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;

    // An example header before the config.
    let status = ingest(&mut client, example("a", "b", None, "", &clip.2))
        .await
        .expect_err("config first");
    assert_eq!(
        (status.code(), field(&status).as_str()),
        (Code::InvalidArgument, "config")
    );
    // Audio before the first example header.
    let mut requests = vec![config("espeak")];
    requests.extend(example("a", "b", None, "", &clip.2).into_iter().skip(1));
    let status = ingest(&mut client, requests)
        .await
        .expect_err("audio first");
    assert_eq!(
        (status.code(), field(&status).as_str()),
        (Code::InvalidArgument, "audio")
    );
    // A bad default format names its field.
    let mut bad = config("espeak");
    if let Some(Payload::Config(c)) = &mut bad.payload {
        let mut format = raw_pcm_16k();
        if let Some(pb::audio_format::Format::RawPcm(raw)) = &mut format.format {
            raw.sample_rate_hz = 0;
        }
        c.default_format = Some(format);
    }
    let status = ingest(&mut client, vec![bad])
        .await
        .expect_err("bad format");
    assert_eq!(
        (status.code(), field(&status).as_str()),
        (
            Code::InvalidArgument,
            "config.default_format.raw_pcm.sample_rate_hz"
        )
    );
    // A config-only stream creates nothing but still answers.
    let response = ingest(&mut client, vec![config("espeak")])
        .await
        .expect("empty ingest");
    assert_eq!((response.accepted_count, response.rejected_count), (0, 0));
    assert!(response.results.is_empty());
    service.stop().await;
    model.stop().await;

    // The model service unreachable: UNAVAILABLE.
    let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", gone.local_addr().expect("addr"));
    drop(gone);
    let service = FeatureService::start(Some(url)).await;
    let mut client = service.client().await;
    let mut requests = vec![config("espeak")];
    requests.extend(example(&clip.0, &clip.1, None, "", &clip.2));
    let status = ingest(&mut client, requests.clone())
        .await
        .expect_err("unavailable");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    service.stop().await;

    // No model service configured: FAILED_PRECONDITION.
    let service = FeatureService::start(None).await;
    let mut client = service.client().await;
    let status = ingest(&mut client, requests).await.expect_err("no model");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_mid_example_stores_nothing_partial() {
    let model = fake(Script::default()).await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let clips = train_clips(2);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let call = tokio::spawn(async move {
        client
            .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut requests = vec![config("espeak")];
    requests.extend(example(&clips[0].0, &clips[0].1, None, "", &clips[0].2));
    let second = example(&clips[1].0, &clips[1].1, None, "", &clips[1].2);
    let half = second.len() / 2;
    requests.extend(second.into_iter().take(half));
    for request in requests {
        tx.send(request).await.expect("send");
    }
    // The first example is complete once the second one's header arrived.
    for _ in 0..500 {
        if !model.seen().examples.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(model.seen().examples.len(), 1);
    call.abort();
    let _ = call.await;
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let seen = model.seen();
    assert_eq!(
        seen.examples
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        [clips[0].0.as_str()],
        "the half-sent example must not be stored"
    );
    service.stop().await;
    model.stop().await;
}
