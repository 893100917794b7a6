//! FeatureService.Transcribe over real gRPC on 127.0.0.1: the feature service relays to a fake
//! ModelService (tests/common/fake_model.rs) and must pass frames, events, errors and
//! cancellations through exactly; it reports UNAVAILABLE while the model service is down and
//! picks it up again without a restart.

mod common;

use std::time::Duration;

use common::fake_model::{Ending, FakeModel, Script};
use common::harness::{
    clip, local_frames, options, requests, scripted_events, transcribe, FeatureService,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_reach_the_model_service_exactly_as_extracted() {
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script {
            n_mels: 128,
            ..Script::default()
        },
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let wav = clip();
    let events = transcribe(&mut client, requests(&wav, 4000))
        .await
        .expect("transcribe");
    assert!(events.is_empty(), "the fake sends nothing: {events:?}");

    let seen = model.wait_for_ending().await;
    assert_eq!(seen.ending, Some(Ending::Complete));
    let config = seen.config.expect("config first");
    assert_eq!(config.n_mels, 128, "n_mels from GetModelInfo");
    assert_eq!(
        config.options,
        Some(options()),
        "options passed through unchanged"
    );
    let mut frames = Vec::new();
    for batch in &seen.frames {
        assert_eq!(batch.n_mels, 128);
        assert_eq!(batch.first_frame_index as usize, frames.len() / 128);
        assert_eq!(batch.values.len(), batch.frame_count as usize * 128);
        frames.extend_from_slice(&batch.values);
    }
    let local = local_frames(&wav, 128);
    assert_eq!(frames.len(), local.len());
    assert!(
        frames == local,
        "relayed frames differ from a local extraction"
    );
    assert_eq!(seen.model_info_calls, 1);
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_back_in_order_and_unchanged() {
    let (early, late) = scripted_events();
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script {
            n_mels: 0,
            early: early.clone(),
            late: late.clone(),
            ..Script::default()
        },
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let wav = clip();
    let expected: Vec<_> = early.iter().chain(&late).cloned().collect();
    for _ in 0..2 {
        let events = transcribe(&mut client, requests(&wav, 65_536))
            .await
            .expect("transcribe");
        assert_eq!(events, expected);
    }
    let seen = model.wait_for_ending().await;
    assert_eq!(
        seen.config.expect("config").n_mels,
        80,
        "ModelInfo.n_mels 0 means 80"
    );
    assert_eq!(
        seen.frames.iter().map(|f| f.values.len()).sum::<usize>(),
        local_frames(&wav, 80).len()
    );
    assert_eq!(
        seen.model_info_calls, 1,
        "the model's n_mels is asked once and cached"
    );
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_service_errors_reach_the_client_unchanged() {
    let message = "config.options.language: \"xx\" is not a language of this model";
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script {
            reject: Some(Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation("config.options.language", message),
            )),
            ..Script::default()
        },
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let status = transcribe(&mut client, requests(&clip(), 16_000))
        .await
        .expect_err("the model service rejects the config");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), message);
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("BadRequest").field_violations;
    assert_eq!(violations[0].field, "config.options.language");
    service.stop().await;
    model.stop().await;

    // An error after some events: the events, then the same error.
    let (early, late) = scripted_events();
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script {
            early: early.clone(),
            late: late[..1].to_vec(),
            fail_after: Some(Status::resource_exhausted(
                "scheduler queue full (queue_capacity=4); retry later",
            )),
            ..Script::default()
        },
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let mut stream = client
        .transcribe(tokio_stream::iter(requests(&clip(), 16_000)))
        .await
        .expect("transcribe")
        .into_inner();
    let mut events = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the stream ended without the model service's error"),
            Err(status) => break status,
        }
    };
    assert_eq!(events, [early, late[..1].to_vec()].concat());
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "scheduler queue full (queue_capacity=4); retry later"
    );
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_until_the_model_service_comes_back() {
    // A port nobody listens on (yet).
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let service = FeatureService::start(Some(url.clone())).await;
    let mut client = service.client().await;
    let wav = clip();
    let (early, late) = scripted_events();
    let expected: Vec<_> = early.iter().chain(&late).cloned().collect();
    let script = Script {
        early,
        late,
        ..Script::default()
    };

    let status = transcribe(&mut client, requests(&wav, 16_000))
        .await
        .expect_err("no model service yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&url),
        "the message names the model service: {}",
        status.message()
    );

    for round in 0..2 {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the model service's port");
        let model = FakeModel::start_on(listener, script.clone()).await;
        let events = transcribe(&mut client, requests(&wav, 16_000))
            .await
            .unwrap_or_else(|s| panic!("round {round}: the model service is back: {s:?}"));
        assert_eq!(events, expected);
        model.stop().await;

        // Down again: UNAVAILABLE, not a hang.
        let status = transcribe(&mut client, requests(&wav, 16_000))
            .await
            .expect_err("the model service stopped");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_audio_is_invalid_argument_and_never_a_complete_input() {
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script::default(),
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let status = transcribe(&mut client, requests(&garbage, 4096))
        .await
        .expect_err("garbage");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().expect("BadRequest").field_violations[0].field,
        "audio"
    );
    // The call may not even have reached the model service; if it did, it was reset.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ending = model.seen().ending;
    assert!(
        matches!(ending, None | Some(Ending::Failed(Code::Cancelled))),
        "{ending:?}"
    );

    // A wav cut short after frames went upstream: the model service must see a cancelled
    // call, not the END_STREAM of a complete input.
    let wav = clip();
    let mut messages = requests(&wav[..wav.len() * 6 / 10], 16_000).into_iter();
    let (tx, rx) = mpsc::channel(64);
    for message in messages.by_ref() {
        tx.send(message).await.expect("send");
    }
    let call = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut stream = client
                .transcribe(ReceiverStream::new(rx))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, Status>(())
        })
    };
    for _ in 0..500 {
        if !model.seen().frames.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !model.seen().frames.is_empty(),
        "frames reached the model service"
    );
    drop(tx); // the end of the (truncated) file
    let status = call
        .await
        .expect("join")
        .expect_err("a truncated wav is an error");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let seen = model.wait_for_ending().await;
    assert_eq!(seen.ending, Some(Ending::Failed(Code::Cancelled)));
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_cancels_the_upstream_call() {
    let (early, _) = scripted_events();
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script {
            early: early.clone(),
            ..Script::default()
        },
    )
    .await;
    let service = FeatureService::start(Some(model.url())).await;
    let mut client = service.client().await;
    // Audio is still coming (the sender stays open) when the client cancels.
    let (tx, rx) = mpsc::channel(8);
    let mut messages = requests(&clip(), 16_000).into_iter();
    tx.send(messages.next().expect("config"))
        .await
        .expect("send");
    tx.send(messages.next().expect("audio"))
        .await
        .expect("send");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let cancel = request.cancellation_handle();
    let mut stream = client
        .transcribe(request)
        .await
        .expect("transcribe")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("an event");
    assert_eq!(first, early[0]);
    cancel.cancel();
    drop(stream);
    let seen = model.wait_for_ending().await;
    assert_eq!(seen.ending, Some(Ending::Failed(Code::Cancelled)));
    drop(tx);
    // The slot is free again: a new stream on the same replica works.
    let events = transcribe(&mut client, requests(&clip(), 16_000))
        .await
        .expect("transcribe");
    assert_eq!(events, early);
    service.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_model_service_transcribe_is_failed_precondition() {
    let service = FeatureService::start(None).await;
    let mut client = service.client().await;
    let status = transcribe(&mut client, requests(&clip(), 16_000))
        .await
        .expect_err("no model service");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--model-service"), "{status:?}");
    service.stop().await;
}
