//! A model service killed with SIGKILL in the middle of a training job resumes the job from
//! its last checkpoint when it starts again, and the job finishes with its adapter registered.
//! One stopped with SIGTERM saves a mid-epoch checkpoint first and resumes from that step.

mod common;

use std::process::Command;
use std::time::Duration;

use asr_proto::v1 as pb;
use common::{all_events, connect, ingest_espeak, resumed_of, start, start_job, JobShape};
use pb::training_event::Event;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_resumes_its_training_job() {
    let data_root = tempfile::tempdir().expect("tempdir");
    let (service, url) = start(data_root.path());
    let mut client = connect(&url).await;
    ingest_espeak(&mut client, 8).await;

    // 3 epochs of 2 steps; killed once the first epoch's checkpoint is saved.
    let job = start_job(
        &mut client,
        JobShape {
            dataset: "espeak",
            epochs: 3.0,
            batch_size: 4,
            output_adapter: "resumed",
        },
    )
    .await;
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
    let job = start_job(
        &mut client,
        JobShape {
            dataset: "espeak",
            epochs: 1.0,
            batch_size: 1,
            output_adapter: "terminated",
        },
    )
    .await;
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
