//! Datasets and training jobs over real gRPC on 127.0.0.1 with whisper-base: ingestion with
//! per-example acks, a short LoRA job watched to its end with its adapter in the registry and
//! served, and a cancelled job.

use std::path::Path;

use asr_audio::InputFormat;
use asr_proto::v1 as pb;
use e2e_support::whisper_base::model_dir;
use e2e_support::{assets, our_windows, start_model_service};
use model_service::ModelServiceConfig;
use pb::model_service_client::ModelServiceClient;
use pb::training_event::Event;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

struct Clip {
    id: String,
    text: String,
    frames: Vec<f32>,
}

fn clips(split: &str, count: usize) -> Vec<Clip> {
    manifest_clips(
        &assets().join(format!("corpus/espeak/{split}.jsonl")),
        count,
    )
}

/// The first `count` clips of a manifest, as features.
fn manifest_clips(manifest: &Path, count: usize) -> Vec<Clip> {
    let dir = manifest.parent().expect("manifest folder");
    let set = manifest.file_stem().expect("name").to_string_lossy();
    std::fs::read_to_string(manifest)
        .expect("manifest")
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("json");
            let audio = entry["audio"].as_str().expect("audio");
            let bytes = std::fs::read(dir.join(audio)).expect("clip");
            Clip {
                id: format!("{set}/{audio}"),
                text: entry["text"].as_str().expect("text").to_string(),
                frames: our_windows(bytes, InputFormat::Encoded, 80).1,
            }
        })
        .collect()
}

fn example(clip: &Clip, split: &str) -> pb::IngestExamplesRequest {
    pb::IngestExamplesRequest {
        payload: Some(pb::ingest_examples_request::Payload::Example(
            pb::DatasetExample {
                id: clip.id.clone(),
                text: clip.text.clone(),
                duration_seconds: 0.0,
                features: Some(pb::MelFrames {
                    n_mels: 80,
                    first_frame_index: 0,
                    frame_count: (clip.frames.len() / 80) as u32,
                    values: clip.frames.clone(),
                }),
                split: split.into(),
            },
        )),
    }
}

async fn ingest(
    client: &mut ModelServiceClient<Channel>,
    messages: Vec<pb::IngestExamplesRequest>,
) -> Result<Vec<pb::IngestAck>, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for m in messages {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut stream = client
        .ingest_examples(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut acks = Vec::new();
    while let Some(ack) = stream.message().await? {
        acks.push(ack);
    }
    Ok(acks)
}

fn config(dataset: &str) -> pb::IngestExamplesRequest {
    pb::IngestExamplesRequest {
        payload: Some(pb::ingest_examples_request::Payload::Config(
            pb::IngestExamplesConfig {
                dataset: dataset.into(),
                mode: pb::IngestMode::CreateOrAppend as i32,
                n_mels: 80,
                split: "train".into(),
                language: "zh".into(),
                description: "espeak-ng Mandarin".into(),
            },
        )),
    }
}

/// Events of a job from the first, until its final event.
async fn watch(client: &mut ModelServiceClient<Channel>, job: &str) -> Vec<Event> {
    let mut stream = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job.into(),
            from_event_index: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event") {
        events.push(event.event.expect("payload"));
    }
    events
}

fn start_request(adapter: &str, epochs: f32) -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        train_dataset: Some(pb::DatasetRef {
            dataset: "espeak".into(),
            split: "train".into(),
        }),
        eval_dataset: Some(pb::DatasetRef {
            dataset: "espeak".into(),
            split: "eval".into(),
        }),
        hyperparameters: Some(pb::TrainingHyperparameters {
            epochs,
            per_device_batch_size: 4,
            gradient_accumulation_steps: 1,
            warmup_steps: Some(0),
            logging_steps: 1,
            ..Default::default()
        }),
        output_adapter: adapter.into(),
        ..Default::default()
    }
}

fn data_config(root: &Path) -> ModelServiceConfig {
    ModelServiceConfig {
        model: Some(model_dir()),
        data_root: root.to_path_buf(),
        device: "cpu".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_train_watch_serve_and_cancel() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, _handle) = start_model_service(data_config(root.path())).await;
    let mut client = ModelServiceClient::connect(server.url())
        .await
        .expect("connect");

    // Ingestion: 8 train and 4 eval examples, a duplicate and an empty transcript rejected.
    let train = clips("train", 8);
    let eval = clips("dev", 4);
    let mut messages = vec![config("espeak")];
    messages.extend(train.iter().map(|c| example(c, "")));
    messages.extend(eval.iter().map(|c| example(c, "eval")));
    messages.push(example(&train[0], ""));
    let mut empty = example(&train[1], "");
    if let Some(pb::ingest_examples_request::Payload::Example(e)) = &mut empty.payload {
        e.id = "empty".into();
        e.text = " ".into();
    }
    messages.push(empty);
    let acks = ingest(&mut client, messages).await.expect("ingest");
    assert_eq!(acks.len(), 14);
    let accepted = acks
        .iter()
        .filter(|a| a.status == pb::ExampleStatus::Accepted as i32)
        .count();
    assert_eq!(accepted, 12);
    assert_eq!(acks[12].rejection, pb::RejectionReason::DuplicateId as i32);
    assert_eq!(acks[13].rejection, pb::RejectionReason::EmptyText as i32);
    assert_eq!(
        (acks[0].index, acks[11].index, acks[11].split.as_str()),
        (0, 11, "eval")
    );
    let dataset = client
        .get_dataset(pb::GetDatasetRequest {
            name: "espeak".into(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!(
        (dataset.example_count, dataset.language.as_str()),
        (12, "zh")
    );
    assert_eq!(dataset.splits.len(), 2);
    assert!(dataset.audio_hours > 12.0 * 1.5 / 3600.0);

    // Bad requests name their field.
    let mut bad = start_request("x", 1.0);
    bad.train_dataset = Some(pb::DatasetRef {
        dataset: "nope".into(),
        split: String::new(),
    });
    let status = client
        .start_training(bad)
        .await
        .expect_err("unknown dataset");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("train_dataset"), "{status:?}");

    // A one-epoch job: 2 steps of batch 4, evaluated, checkpointed, its adapter registered.
    let job = client
        .start_training(start_request("espeak-lora", 1.0))
        .await
        .expect("start")
        .into_inner();
    assert_eq!(job.state, pb::TrainingJobState::Queued as i32);
    let events = watch(&mut client, &job.id).await;
    let steps: Vec<&pb::training_event::StepLogged> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepLogged(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 2, "{events:?}");
    assert!(steps
        .iter()
        .all(|s| s.loss.is_finite() && s.learning_rate > 0.0));
    assert!(
        matches!(events.first(), Some(Event::JobStarted(s)) if s.max_steps == 2 && s.trainable_parameters == 147_456)
    );
    assert!(events.iter().any(|e| matches!(e, Event::Evaluated(v) if v.results.len() == 1 && v.results[0].loss.is_finite())));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::CheckpointSaved(c) if c.is_best)));
    match events.last() {
        Some(Event::JobFinished(f)) => {
            assert_eq!((f.adapter.as_str(), f.global_step), ("espeak-lora", 2))
        }
        other => panic!("expected JobFinished, got {other:?}"),
    }
    let done = client
        .get_training_job(pb::GetTrainingJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("job")
        .into_inner();
    assert_eq!(done.state, pb::TrainingJobState::Succeeded as i32);
    let adapter = client
        .load_adapter(pb::LoadAdapterRequest {
            name: "espeak-lora".into(),
            source_dir: String::new(),
        })
        .await
        .expect("the trained adapter loads")
        .into_inner();
    assert_eq!(adapter.origin, pb::AdapterOrigin::Trained as i32);
    assert_eq!(adapter.source_job_id, job.id);
    let status = client
        .start_training(start_request("espeak-lora", 1.0))
        .await
        .expect_err("output adapter taken");
    assert_eq!(status.code(), Code::AlreadyExists);

    // A long job cancelled after its first step.
    let job = client
        .start_training(start_request("cancelled", 50.0))
        .await
        .expect("start")
        .into_inner();
    let mut stream = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job.id.clone(),
            from_event_index: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    while let Some(event) = stream.message().await.expect("event") {
        if matches!(event.event, Some(Event::StepLogged(_))) {
            break;
        }
    }
    client
        .cancel_training(pb::CancelTrainingRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("cancel");
    let events = watch(&mut client, &job.id).await;
    assert!(
        matches!(events.last(), Some(Event::JobCancelled(_))),
        "{events:?}"
    );
    let cancelled = client
        .get_training_job(pb::GetTrainingJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect("job")
        .into_inner();
    assert_eq!(cancelled.state, pb::TrainingJobState::Cancelled as i32);
    let status = client
        .get_adapter(pb::GetAdapterRequest {
            name: "cancelled".into(),
        })
        .await
        .expect_err("a cancelled job makes no adapter");
    assert_eq!(status.code(), Code::NotFound);
    let listed = client
        .list_training_jobs(pb::ListTrainingJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 2);
    server.stop().await;
}

/// Two streams append to one dataset at the same time: both are stored, with dense distinct
/// indices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingestion_into_one_dataset() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, _handle) = start_model_service(data_config(root.path())).await;
    let client = ModelServiceClient::connect(server.url())
        .await
        .expect("connect");
    let all = clips("train", 8);
    let (first, second) = all.split_at(4);
    let stream = |part: &[Clip]| {
        let mut messages = vec![config("shared")];
        messages.extend(part.iter().map(|c| example(c, "")));
        let mut client = client.clone();
        tokio::spawn(async move { ingest(&mut client, messages).await })
    };
    let (a, b) = (stream(first), stream(second));
    let mut indices: Vec<u64> = Vec::new();
    for task in [a, b] {
        let acks = task.await.expect("task").expect("ingest");
        assert!(
            acks.iter()
                .all(|a| a.status == pb::ExampleStatus::Accepted as i32),
            "{acks:?}"
        );
        indices.extend(acks.iter().map(|a| a.index));
    }
    indices.sort();
    assert_eq!(indices, (0..8).collect::<Vec<u64>>());
    let dataset = client
        .clone()
        .get_dataset(pb::GetDatasetRequest {
            name: "shared".into(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!(dataset.example_count, 8);
    server.stop().await;
}

/// Guard eval sets in a job: the zero-shot pass first, each epoch's guard regressions from it,
/// and the kept checkpoint as the objective (CER within the guard bound, early stopping)
/// selects it, checked against the figures the job itself reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guard_sets_bound_the_kept_checkpoint() {
    let root = tempfile::tempdir().expect("tempdir");
    let (server, _handle) = start_model_service(data_config(root.path())).await;
    let mut client = ModelServiceClient::connect(server.url())
        .await
        .expect("connect");
    let mut messages = vec![config("espeak")];
    messages.extend(clips("train", 8).iter().map(|c| example(c, "")));
    messages.extend(clips("dev", 3).iter().map(|c| example(c, "eval")));
    let real = manifest_clips(&assets().join("aishell/manifest.jsonl"), 2);
    messages.extend(real.iter().map(|c| example(c, "real")));
    let f2 = manifest_clips(&assets().join("guard/espeak-f2.jsonl"), 2);
    messages.extend(f2.iter().map(|c| example(c, "f2")));
    // Guard-domain examples to mix into training: never the guard sets' own.
    let voices = manifest_clips(&assets().join("guard/mix-espeak.jsonl"), 3);
    messages.extend(voices.iter().map(|c| example(c, "voices")));
    let acks = ingest(&mut client, messages).await.expect("ingest");
    assert_eq!(acks.len(), 18);

    let bound = 0.0f32;
    let mut request = start_request("guarded", 3.0);
    request.guard_eval_sets = ["real", "f2"]
        .iter()
        .map(|split| pb::GuardEvalSet {
            name: split.to_string(),
            dataset: Some(pb::DatasetRef {
                dataset: "espeak".into(),
                split: split.to_string(),
            }),
        })
        .collect();
    request.mix_dataset = Some(pb::DatasetRef {
        dataset: "espeak".into(),
        split: "voices".into(),
    });
    if let Some(h) = request.hyperparameters.as_mut() {
        h.mix_fraction = 0.2;
        h.adapter_scale = Some(0.5);
        h.learning_rate = 1e-2;
        h.metric_for_best_model = pb::BestModelMetric::Cer as i32;
        h.max_guard_regression = Some(bound);
        h.early_stopping_patience = 1;
        h.generation_max_length = 40;
        // 10 examples in batches of 4: 3 steps an epoch, evaluated also at step 2 of each.
        h.eval_steps = 2;
    }
    let job = client
        .start_training(request)
        .await
        .expect("start")
        .into_inner();
    let events = watch(&mut client, &job.id).await;
    // 8 in-domain examples + 2 mixed in (20 % of 10).
    assert!(
        matches!(events.first(), Some(Event::JobStarted(s)) if s.train_example_count == 10),
        "{:?}",
        events.first()
    );
    let evaluations: Vec<&pb::training_event::Evaluated> = events
        .iter()
        .filter_map(|e| match e {
            Event::Evaluated(v) => Some(v),
            _ => None,
        })
        .collect();
    let baseline = evaluations.first().expect("the zero-shot pass");
    assert_eq!((baseline.epoch, baseline.global_step), (0.0, 0));
    let names: Vec<(&str, bool)> = baseline
        .results
        .iter()
        .map(|r| (r.name.as_str(), r.guard))
        .collect();
    assert_eq!(names, [("eval", false), ("real", true), ("f2", true)]);
    assert!(baseline
        .results
        .iter()
        .all(|r| r.cer.is_some() && r.cer_regression.is_none()));
    assert_eq!(baseline.results[1].example_count, 2);
    // Evaluations within epochs (fractional epoch) report; those at epoch ends select.
    let (within_epochs, epochs): (Vec<_>, Vec<_>) = evaluations[1..]
        .iter()
        .copied()
        .partition(|v| v.epoch.fract() != 0.0);
    assert!(!epochs.is_empty());
    assert_eq!(
        within_epochs
            .first()
            .map(|v| (v.global_step, v.results.len())),
        Some((2, 3)),
        "{within_epochs:?}"
    );
    assert!(within_epochs.iter().all(|v| v.global_step % 2 == 0));
    let epochs = &epochs[..];
    for evaluation in epochs.iter().chain(&within_epochs) {
        for (after, before) in evaluation.results.iter().zip(&baseline.results) {
            let expected = (after.guard).then(|| after.cer.unwrap() - before.cer.unwrap());
            match (after.cer_regression, expected) {
                (Some(r), Some(e)) => assert!((r - e).abs() < 1e-5, "{after:?} vs {before:?}"),
                (None, None) => {}
                other => panic!("cer_regression of {}: {other:?}", after.name),
            }
        }
    }
    // The selection, re-derived from the reported figures.
    let within = |v: &pb::training_event::Evaluated| {
        v.results
            .iter()
            .filter(|r| r.guard)
            .all(|r| r.cer_regression.unwrap() <= bound + 1e-6)
    };
    let worst = |v: &pb::training_event::Evaluated| {
        v.results
            .iter()
            .filter_map(|r| r.cer_regression)
            .fold(f32::MIN, f32::max)
    };
    let select = |seen: &[&pb::training_event::Evaluated]| -> (u64, bool) {
        let admissible: Vec<_> = seen.iter().filter(|v| within(v)).collect();
        let mut best: Option<&&pb::training_event::Evaluated> = None;
        if admissible.is_empty() {
            for v in seen {
                if best.is_none_or(|b| worst(v) < worst(b)) {
                    best = Some(v);
                }
            }
            return (best.unwrap().epoch as u64, false);
        }
        for v in admissible {
            if best.is_none_or(|b| v.results[0].cer.unwrap() < b.results[0].cer.unwrap()) {
                best = Some(v);
            }
        }
        (best.unwrap().epoch as u64, true)
    };
    // Early stopping with patience 1: training ends after the first epoch that is not the best.
    for k in 1..epochs.len() {
        let (best, _) = select(&epochs[..k]);
        assert!(
            (k as u64) == best,
            "epoch {k} was not the best ({best}) yet training went on: {epochs:?}"
        );
    }
    let (best, within_bound) = select(epochs);
    let finished = match events.last() {
        Some(Event::JobFinished(f)) => f,
        other => panic!("expected JobFinished, got {other:?}"),
    };
    println!(
        "{} epochs evaluated, kept {}, within bound {}, stopped early {}: {:?}",
        epochs.len(),
        finished.best_checkpoint,
        finished.within_guard_bound,
        finished.stopped_early,
        epochs
            .iter()
            .map(|v| v
                .results
                .iter()
                .map(|r| (r.cer, r.cer_regression))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    assert_eq!(finished.best_checkpoint, format!("checkpoint-epoch-{best}"));
    assert_eq!(finished.within_guard_bound, within_bound);
    assert_eq!(finished.stopped_early, epochs.len() < 3);
    assert_eq!(finished.baseline_results, baseline.results);
    assert_eq!(
        finished.best_results,
        epochs[best as usize - 1].results,
        "the kept checkpoint's figures"
    );
    // The exported adapter is the kept checkpoint's at adapter_scale: B halved, A as trained.
    let output = root.path().join("jobs").join(&job.id).join("output");
    let read = |dir: std::path::PathBuf| {
        tch::Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
            .expect("adapter weights")
            .into_iter()
            .collect::<std::collections::HashMap<String, tch::Tensor>>()
    };
    let kept = read(output.join(format!("checkpoint-epoch-{best}")));
    let exported = read(output.join("adapter"));
    assert_eq!(kept.len(), exported.len());
    for (name, trained) in &kept {
        let scale = if name.contains("lora_B") { 0.5 } else { 1.0 };
        let diff = (&exported[name] - trained * scale)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-7, "{name}: {diff}");
    }
    server.stop().await;
}
