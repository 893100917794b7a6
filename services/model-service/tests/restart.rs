//! A model service killed with SIGKILL in the middle of a training job resumes the job from
//! its last checkpoint when it starts again, and the job finishes with its adapter registered.
//! One stopped with SIGTERM saves a mid-epoch checkpoint first and resumes from that step.

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

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// Starts the binary on 127.0.0.1:0 and returns it with its address.
fn start(data_root: &Path) -> (Service, String) {
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

async fn connect(url: &str) -> ModelServiceClient<tonic::transport::Channel> {
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

fn examples(count: usize) -> Vec<pb::IngestExamplesRequest> {
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
async fn ingest_espeak(client: &mut ModelServiceClient<tonic::transport::Channel>, count: usize) {
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
async fn all_events(
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

fn resumed_of(events: &[Event]) -> &pb::training_event::Resumed {
    events
        .iter()
        .find_map(|e| match e {
            Event::Resumed(r) => Some(r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Resumed event: {events:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_resumes_its_training_job() {
    let data_root = tempfile::tempdir().expect("tempdir");
    let (service, url) = start(data_root.path());
    let mut client = connect(&url).await;
    ingest_espeak(&mut client, 8).await;

    // 3 epochs of 2 steps; killed once the first epoch's checkpoint is saved.
    let job = client
        .start_training(pb::StartTrainingRequest {
            train_dataset: Some(pb::DatasetRef {
                dataset: "espeak".into(),
                split: String::new(),
            }),
            hyperparameters: Some(pb::TrainingHyperparameters {
                epochs: 3.0,
                per_device_batch_size: 4,
                gradient_accumulation_steps: 1,
                warmup_steps: Some(0),
                logging_steps: 1,
                ..Default::default()
            }),
            output_adapter: "resumed".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let mut watch = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job.id.clone(),
            from_event_index: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    while let Some(event) = watch.message().await.expect("event") {
        if matches!(event.event, Some(Event::CheckpointSaved(_))) {
            break;
        }
    }
    drop(service); // SIGKILL
    drop(client);

    let (_service, url) = start(data_root.path());
    let mut client = connect(&url).await;
    let events = all_events(&mut client, &job.id).await;
    let resumed = resumed_of(&events);
    assert!(resumed.from_step >= 2, "{resumed:?}");
    match events.last() {
        Some(Event::JobFinished(f)) => assert_eq!(f.global_step, 6, "{f:?}"),
        other => panic!("expected JobFinished, got {other:?}"),
    }
    let adapter = client
        .get_adapter(pb::GetAdapterRequest {
            name: "resumed".into(),
        })
        .await
        .expect("the adapter is registered")
        .into_inner();
    assert_eq!(adapter.source_job_id, job.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_service_checkpoints_mid_epoch_and_resumes_there() {
    let data_root = tempfile::tempdir().expect("tempdir");
    let (mut service, url) = start(data_root.path());
    let mut client = connect(&url).await;
    ingest_espeak(&mut client, 8).await;

    // One epoch of 8 steps: no epoch checkpoint before the end.
    let job = client
        .start_training(pb::StartTrainingRequest {
            train_dataset: Some(pb::DatasetRef {
                dataset: "espeak".into(),
                split: String::new(),
            }),
            hyperparameters: Some(pb::TrainingHyperparameters {
                epochs: 1.0,
                per_device_batch_size: 1,
                gradient_accumulation_steps: 1,
                warmup_steps: Some(0),
                logging_steps: 1,
                ..Default::default()
            }),
            output_adapter: "terminated".into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let mut watch = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job.id.clone(),
            from_event_index: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    while let Some(event) = watch.message().await.expect("event") {
        if matches!(event.event, Some(Event::StepLogged(ref s)) if s.global_step >= 2) {
            break;
        }
    }
    // No open stream holds the drain.
    drop(watch);
    drop(client);
    let pid = service.0.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some(exit) = service.0.try_wait().expect("wait") {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the service stops within its drain deadline");
    assert!(exit.success(), "{exit:?}");
    let interrupted = data_root
        .path()
        .join("jobs")
        .join(&job.id)
        .join("output/checkpoint-interrupted");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(interrupted.join("trainer_state.json")).expect("a checkpoint"),
    )
    .expect("state");
    let saved_step = state["global_step"].as_u64().expect("global_step");
    assert!((2..8).contains(&saved_step), "saved at step {saved_step}");

    let (_service, url) = start(data_root.path());
    let mut client = connect(&url).await;
    let events = all_events(&mut client, &job.id).await;
    let resumed = resumed_of(&events);
    assert_eq!(
        (resumed.checkpoint.as_str(), resumed.from_step),
        ("checkpoint-interrupted", saved_step),
        "{events:?}"
    );
    // After the resume, the steps go on from the saved one, none repeated or skipped.
    let after: Vec<u64> = events
        .iter()
        .skip_while(|e| !matches!(e, Event::Resumed(_)))
        .filter_map(|e| match e {
            Event::StepLogged(s) => Some(s.global_step),
            _ => None,
        })
        .collect();
    assert_eq!(after, (saved_step + 1..=8).collect::<Vec<_>>());
    match events.last() {
        Some(Event::JobFinished(f)) => assert_eq!(f.global_step, 8, "{f:?}"),
        other => panic!("expected JobFinished, got {other:?}"),
    }
}
