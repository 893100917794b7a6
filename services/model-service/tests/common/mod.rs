//! What the binary tests share: the service as a child process on 127.0.0.1:0, a client that
//! waits for the model, espeak examples as features, and a job's events.

#![allow(dead_code)] // each test file uses its own share

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use pb::model_service_client::ModelServiceClient;
use pb::training_event::Event;
use tokio_stream::wrappers::ReceiverStream;

/// The running binary; killed (SIGKILL) when dropped.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// Starts the binary on 127.0.0.1:0 and returns it with its address.
pub fn start(data_root: &Path) -> (Service, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_model-service"))
        .arg("--model")
        .arg(assets().join("whisper-base"))
        .arg("--data-root")
        .arg(data_root)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting model-service");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = entry["fields"]["address"].as_str() {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the service logs its address");
    (Service(child), format!("http://{addr}"))
}

pub async fn connect(url: &str) -> ModelServiceClient<tonic::transport::Channel> {
    let mut client = ModelServiceClient::connect(url.to_string())
        .await
        .expect("connect");
    // Wait for the model to load.
    for _ in 0..600 {
        match client.get_model_info(pb::GetModelInfoRequest {}).await {
            Ok(_) => return client,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("model info: {s:?}"),
        }
    }
    panic!("the model never loaded");
}

pub fn examples(count: usize) -> Vec<pb::IngestExamplesRequest> {
    let dir = assets().join("corpus/espeak");
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(80).expect("mel"),
        ..Default::default()
    });
    std::fs::read_to_string(dir.join("train.jsonl"))
        .expect("manifest")
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("json");
            let audio = entry["audio"].as_str().expect("audio");
            let bytes = std::fs::read(dir.join(audio)).expect("clip");
            let (_, frames, _) =
                extract_all(&pipeline, std::io::Cursor::new(bytes), InputFormat::Encoded)
                    .expect("features");
            pb::IngestExamplesRequest {
                payload: Some(pb::ingest_examples_request::Payload::Example(
                    pb::DatasetExample {
                        id: audio.to_string(),
                        text: entry["text"].as_str().expect("text").to_string(),
                        duration_seconds: 0.0,
                        features: Some(pb::MelFrames {
                            n_mels: 80,
                            first_frame_index: 0,
                            frame_count: (frames.len() / 80) as u32,
                            values: frames,
                        }),
                        split: String::new(),
                    },
                )),
            }
        })
        .collect()
}

/// Stores the first `count` espeak training clips as the dataset "espeak".
pub async fn ingest_espeak(
    client: &mut ModelServiceClient<tonic::transport::Channel>,
    count: usize,
) {
    let mut messages = vec![pb::IngestExamplesRequest {
        payload: Some(pb::ingest_examples_request::Payload::Config(
            pb::IngestExamplesConfig {
                dataset: "espeak".into(),
                language: "zh".into(),
                ..Default::default()
            },
        )),
    }];
    messages.extend(examples(count));
    let (tx, rx) = tokio::sync::mpsc::channel(count + 1);
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    drop(tx);
    let mut acks = client
        .ingest_examples(ReceiverStream::new(rx))
        .await
        .expect("ingest")
        .into_inner();
    let mut accepted = 0;
    while let Some(ack) = acks.message().await.expect("ack") {
        assert_eq!(ack.status, pb::ExampleStatus::Accepted as i32, "{ack:?}");
        accepted += 1;
    }
    assert_eq!(accepted, count);
}

/// Every event of a job, replayed from the start until its final one.
pub async fn all_events(
    client: &mut ModelServiceClient<tonic::transport::Channel>,
    job_id: &str,
) -> Vec<Event> {
    let mut watch = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job_id.to_string(),
            from_event_index: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = watch.message().await.expect("event") {
        events.push(event.event.expect("payload"));
    }
    events
}

pub fn resumed_of(events: &[Event]) -> &pb::training_event::Resumed {
    events
        .iter()
        .find_map(|e| match e {
            Event::Resumed(r) => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Resumed event: {events:?}"))
}

/// The shape of a test job: accumulation 1, no warmup, every step logged.
pub struct JobShape {
    pub dataset: &'static str,
    pub epochs: f32,
    pub batch_size: u32,
    pub output_adapter: &'static str,
}

pub async fn start_job(
    client: &mut ModelServiceClient<tonic::transport::Channel>,
    shape: JobShape,
) -> pb::TrainingJob {
    client
        .start_training(pb::StartTrainingRequest {
            train_dataset: Some(pb::DatasetRef {
                dataset: shape.dataset.into(),
                split: String::new(),
            }),
            hyperparameters: Some(pb::TrainingHyperparameters {
                epochs: shape.epochs,
                per_device_batch_size: shape.batch_size,
                gradient_accumulation_steps: 1,
                warmup_steps: Some(0),
                logging_steps: 1,
                ..Default::default()
            }),
            output_adapter: shape.output_adapter.into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
}
