//! A client's gRPC deadline on a streaming call, through both services with whisper-base:
//! the stream ends with DEADLINE_EXCEEDED soon after the deadline even though the client keeps
//! its request stream open, and the work behind it is freed (the model service's only stream
//! slot is taken again within moments). The model service honours a deadline on its own too.

use std::time::{Duration, Instant};

use asr_proto::v1 as pb;
use e2e_support::whisper_base::{model_dir, test_clips};
use e2e_support::{start_feature_service, start_model_service};
use feature_service::FeatureServiceConfig;
use model_service::ModelServiceConfig;
use pb::feature_service_client::FeatureServiceClient;
use pb::model_service_client::ModelServiceClient;
use pb::transcribe_audio_request::Payload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const DEADLINE: Duration = Duration::from_millis(1500);
/// How late past the deadline the stream may end (2 cores, a debug build).
const SLACK: Duration = Duration::from_secs(3);
/// How soon after the client's deadline the model service's slot must be free again.
const FREED_WITHIN: Duration = Duration::from_secs(2);

fn zh() -> pb::TranscriptionOptions {
    pb::TranscriptionOptions {
        language: "zh".into(),
        ..Default::default()
    }
}

/// A request stream that sends `messages`, then stays open as long as the returned sender
/// lives, with the test's deadline.
async fn held_open<T: Send + 'static>(
    messages: Vec<T>,
) -> (mpsc::Sender<T>, tonic::Request<ReceiverStream<T>>) {
    let (tx, rx) = mpsc::channel(messages.len().max(1));
    for message in messages {
        tx.send(message).await.expect("queued");
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(DEADLINE);
    (tx, request)
}

/// Waits for the stream's end (failing rather than hanging when it never comes); returns its
/// status and when it came.
async fn end_of<T>(mut stream: tonic::Streaming<T>) -> (tonic::Status, Instant) {
    let end = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => return (status, Instant::now()),
            }
        }
    };
    tokio::time::timeout(DEADLINE + SLACK + Duration::from_secs(10), end)
        .await
        .expect("the stream ran on past its deadline")
}

/// Runs a Transcribe call to its end; counts its segments.
async fn segments_of(
    client: &mut FeatureServiceClient<tonic::transport::Channel>,
    request: tonic::Request<tokio_stream::Iter<std::vec::IntoIter<pb::TranscribeAudioRequest>>>,
) -> Result<usize, tonic::Status> {
    let mut stream = client.transcribe(request).await?.into_inner();
    let mut segments = 0;
    while let Some(response) = stream.message().await? {
        if let Some(pb::transcribe_response::Event::Segment(_)) = response.event {
            segments += 1;
        }
    }
    Ok(segments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_end_streams_through_both_hops_and_free_the_work() {
    let data_root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(ModelServiceConfig {
        model: Some(model_dir()),
        data_root: data_root.path().to_path_buf(),
        device: "cpu".into(),
        // One stream at a time: a slot not freed would refuse the next stream.
        max_concurrent_streams: 1,
        ..Default::default()
    })
    .await;
    let features = start_feature_service(FeatureServiceConfig {
        model_service: Some(model.url()),
        ..Default::default()
    })
    .await;
    let mut client = FeatureServiceClient::connect(features.url())
        .await
        .expect("connect");
    let clip = std::fs::read(&test_clips(1)[0].path).expect("clip");

    // A live source that stops sending but never ends its stream.
    let (audio_tx, request) = held_open(vec![
        pb::TranscribeAudioRequest {
            payload: Some(Payload::Config(pb::TranscribeAudioConfig {
                format: None,
                options: Some(zh()),
            })),
        },
        pb::TranscribeAudioRequest {
            payload: Some(Payload::Audio(clip[..clip.len() / 2].to_vec())),
        },
    ])
    .await;
    let started = Instant::now();
    let stream = client
        .transcribe(request)
        .await
        .expect("stream opens")
        .into_inner();
    let (status, ended) = end_of(stream).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = ended - started;
    assert!(
        took >= DEADLINE && took < DEADLINE + SLACK,
        "ended after {took:?} (deadline {DEADLINE:?})"
    );

    // The model service's one slot is free again: a whole clip goes through. Teardown on the
    // far hop is asynchronous (the reset reaches the model service after the client has its
    // status), so the slot gets a short while; a stream whose work ran on would hold it for
    // good, as the client keeps its request stream open.
    let mut messages = vec![pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(zh()),
        })),
    }];
    messages.push(pb::TranscribeAudioRequest {
        payload: Some(Payload::Audio(clip.clone())),
    });
    let freed_by = Instant::now() + FREED_WITHIN;
    let segments = loop {
        let mut next = tonic::Request::new(tokio_stream::iter(messages.clone()));
        next.set_timeout(Duration::from_secs(120));
        match segments_of(&mut client, next).await {
            Ok(segments) => break segments,
            Err(status)
                if status.code() == Code::ResourceExhausted && Instant::now() < freed_by =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(status) => panic!("the slot was not freed: {status:?}"),
        }
    };
    assert!(segments > 0);
    drop(audio_tx);

    // The model service alone: config, then nothing, with a deadline.
    let mut model_client = ModelServiceClient::connect(model.url())
        .await
        .expect("connect");
    let (frames_tx, request) = held_open(vec![pb::TranscribeFramesRequest {
        payload: Some(pb::transcribe_frames_request::Payload::Config(
            pb::TranscribeFramesConfig {
                options: Some(zh()),
                n_mels: 80,
            },
        )),
    }])
    .await;
    let started = Instant::now();
    let stream = model_client
        .transcribe(request)
        .await
        .expect("stream opens")
        .into_inner();
    let (status, ended) = end_of(stream).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(ended - started < DEADLINE + SLACK);
    drop(frames_tx);

    features.stop().await;
    model.stop().await;
}
