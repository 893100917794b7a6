//! The model service killed with SIGKILL at random moments, again and again, first while it
//! ingests a dataset and then while it trains on one. After every restart:
//! - every example it acknowledged is in the dataset, its window whole (the store's own
//!   loader, which drops torn log lines and windows of the wrong size, finds them all);
//! - every checkpoint it reported (CheckpointSaved) is on disk and readable.
//!
//! In the end the dataset is complete and the job finishes with its adapter registered.
//!
//! ASR_KILLS_PER_PHASE (default 10, so 20 kills in all) and ASR_KILL_SEED (default: the
//! clock, printed) repeat or lengthen a run.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use asr_proto::v1 as pb;
use common::{all_events, connect, examples, start, start_job, JobShape};
use model_service::datasets::DatasetStore;
use pb::model_service_client::ModelServiceClient;
use pb::training_event::Event;
use tokio_stream::wrappers::ReceiverStream;

type Client = ModelServiceClient<tonic::transport::Channel>;

/// Between examples sent while a kill may come, so that kills land in the middle of streams.
const PACE: Duration = Duration::from_millis(80);

/// xorshift64*: the kill times, reproducible from the printed seed.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound
    }
}

fn kills_per_phase() -> usize {
    std::env::var("ASR_KILLS_PER_PHASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// Sends every example, `pace` apart (CREATE_OR_APPEND, so those already stored come back as
/// duplicates), and records the ids acknowledged as stored.
async fn ingest(
    mut client: Client,
    dataset: &str,
    examples: Vec<pb::IngestExamplesRequest>,
    pace: Duration,
    acked: Arc<Mutex<HashSet<String>>>,
) -> Result<(), tonic::Status> {
    let config = pb::IngestExamplesRequest {
        payload: Some(pb::ingest_examples_request::Payload::Config(
            pb::IngestExamplesConfig {
                dataset: dataset.into(),
                language: "zh".into(),
                mode: pb::IngestMode::CreateOrAppend as i32,
                ..Default::default()
            },
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for message in std::iter::once(config).chain(examples) {
            if tx.send(message).await.is_err() {
                return;
            }
            tokio::time::sleep(pace).await;
        }
    });
    let mut acks = client
        .ingest_examples(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(ack) = acks.message().await? {
        let duplicate = ack.rejection == pb::RejectionReason::DuplicateId as i32;
        if ack.status == pb::ExampleStatus::Accepted as i32 || duplicate {
            acked.lock().unwrap().insert(ack.example_id);
        } else {
            panic!("unexpected rejection: {ack:?}");
        }
    }
    Ok(())
}

/// Every acknowledged example is in the dataset as the store loads it.
fn check_acked(data_root: &Path, dataset: &str, acked: &HashSet<String>) {
    if acked.is_empty() {
        return;
    }
    let store = DatasetStore::open(data_root).expect("store");
    let stored: HashSet<String> = store
        .get(dataset)
        .expect("the dataset opens")
        .examples
        .into_iter()
        .map(|e| e.id)
        .collect();
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}

/// A checkpoint directory that loads: trainer state, adapter and optimiser state.
fn check_checkpoint(dir: &Path) {
    assert!(
        asr_whisper::trainer::checkpoint_step(dir).is_some(),
        "{}: no trainer state",
        dir.display()
    );
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        tch::Tensor::read_safetensors(dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()));
    }
}

/// Follows the job from event `from` until the service dies: records the checkpoints it
/// reports and signals each step logged; returns the index of the next event.
async fn watch_job(
    mut client: Client,
    job: String,
    from: u64,
    saved: Arc<Mutex<Vec<PathBuf>>>,
    steps: tokio::sync::mpsc::UnboundedSender<u64>,
) -> u64 {
    let Ok(stream) = client
        .watch_training(pb::WatchTrainingRequest {
            job_id: job,
            from_event_index: from,
        })
        .await
    else {
        return from;
    };
    let mut stream = stream.into_inner();
    let mut next = from;
    while let Ok(Some(event)) = stream.message().await {
        next += 1;
        match event.event {
            Some(Event::CheckpointSaved(c)) => saved.lock().unwrap().push(PathBuf::from(c.path)),
            Some(Event::StepLogged(s)) => {
                let _ = steps.send(s.global_step);
            }
            _ => {}
        }
    }
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkills_lose_nothing_acknowledged() {
    let seed = std::env::var("ASR_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("ASR_KILL_SEED={seed}");
    let mut random = Random(seed);
    let kills = kills_per_phase();
    let data_root = tempfile::tempdir().expect("tempdir");
    let root = data_root.path();
    let espeak = examples(48);

    // Ingestion, killed at random moments.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    for kill in 0..kills {
        let (service, url) = start(root);
        let client = connect(&url).await;
        check_acked(root, "espeak", &acked.lock().unwrap());
        // As a client resuming its upload: what was not acknowledged yet.
        let missing: Vec<_> = {
            let acked = acked.lock().unwrap();
            espeak
                .iter()
                .filter(|m| match &m.payload {
                    Some(pb::ingest_examples_request::Payload::Example(e)) => {
                        !acked.contains(&e.id)
                    }
                    _ => true,
                })
                .cloned()
                .collect()
        };
        let task = tokio::spawn(ingest(client, "espeak", missing, PACE, acked.clone()));
        let delay = 50 + random.below(1000);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        drop(service); // SIGKILL
        let _ = task.await;
        println!(
            "ingest kill {}: after {delay} ms, {} acknowledged",
            kill + 1,
            acked.lock().unwrap().len()
        );
    }
    let (service, url) = start(root);
    let client = connect(&url).await;
    check_acked(root, "espeak", &acked.lock().unwrap());
    ingest(
        client.clone(),
        "espeak",
        espeak.clone(),
        Duration::ZERO,
        acked.clone(),
    )
    .await
    .expect("the last ingestion completes");
    assert_eq!(acked.lock().unwrap().len(), espeak.len());
    check_acked(root, "espeak", &acked.lock().unwrap());
    ingest(
        client.clone(),
        "train4",
        espeak[..4].to_vec(),
        Duration::ZERO,
        Arc::default(),
    )
    .await
    .expect("the training set");

    // Training, killed at random moments: after 1 to 3 steps logged by each incarnation and
    // a random pause (8 epochs of 2 steps, a checkpoint after each).
    let mut client = client;
    let job = start_job(
        &mut client,
        JobShape {
            dataset: "train4",
            epochs: 8.0,
            batch_size: 2,
            output_adapter: "survivor",
        },
    )
    .await
    .id;
    let saved = Arc::new(Mutex::new(Vec::new()));
    let mut service = service;
    let mut events_seen = 0;
    for kill in 0..kills {
        let (steps_tx, mut steps) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch_job(
            client.clone(),
            job.clone(),
            events_seen,
            saved.clone(),
            steps_tx,
        ));
        let wanted = 1 + random.below(3);
        let mut last_step = None;
        for _ in 0..wanted {
            match tokio::time::timeout(Duration::from_secs(120), steps.recv()).await {
                Ok(Some(step)) => last_step = Some(step),
                _ => break, // the job ended (or stalled: the final check says which)
            }
        }
        let delay = random.below(2000);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        drop(service); // SIGKILL
        events_seen = watcher.await.unwrap_or(events_seen);
        let (next, url) = start(root);
        service = next;
        client = connect(&url).await;
        let saved_now = saved.lock().unwrap().clone();
        for dir in &saved_now {
            check_checkpoint(dir);
        }
        println!(
            "training kill {}: {delay} ms after step {last_step:?}, {} checkpoints reported, all intact",
            kill + 1,
            saved_now.iter().collect::<HashSet<_>>().len()
        );
    }
    let events = all_events(&mut client, &job).await;
    match events.last() {
        Some(Event::JobFinished(f)) => assert_eq!(f.global_step, 16, "{f:?}"),
        other => panic!("expected JobFinished, got {other:?}"),
    }
    for dir in saved.lock().unwrap().iter() {
        check_checkpoint(dir);
    }
    let resumes = events
        .iter()
        .filter(|e| matches!(e, Event::Resumed(_)))
        .count();
    println!("the job finished after {resumes} resumes");
    client
        .get_adapter(pb::GetAdapterRequest {
            name: "survivor".into(),
        })
        .await
        .expect("the adapter is registered");
    check_acked(root, "espeak", &acked.lock().unwrap());
    drop(service);
}
