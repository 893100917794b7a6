//! The feature-service binary with OpenTelemetry on: the trace a client sends continues on
//! the hop to the model service (a fake, tests/common/fake_model.rs).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use asr_proto::v1 as pb;
use common::fake_model::{FakeModel, Script};
use common::harness::{clip, requests};
use pb::feature_service_client::FeatureServiceClient;
use tokio::net::TcpListener;

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The feature-service binary with OpenTelemetry on: the trace a client sends in
/// `traceparent` continues on the model-service hop (same trace id, the feature service's
/// own span as parent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_continues_to_the_model_service() {
    let model = FakeModel::start_on(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Script::default(),
    )
    .await;
    // Spans are exported nowhere (a closed port): only the propagation matters here.
    let collector = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let child = Command::new(env!("CARGO_BIN_EXE_feature-service"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--model-service", &model.url()])
        .args(["--otlp-endpoint", &format!("http://{collector}")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting feature-service");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = entry["fields"]["address"].as_str() {
                    let _ = addr_tx.send(addr.to_string());
                }
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the service logs its address");
    let mut client = FeatureServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(tokio_stream::iter(requests(&clip(), 16_000)));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01")
            .parse()
            .expect("ascii"),
    );
    let mut stream = client
        .transcribe(request)
        .await
        .expect("transcribe")
        .into_inner();
    while stream.message().await.expect("stream").is_some() {}

    let seen = model.wait_for_ending().await;
    let traceparent = seen
        .traceparent
        .expect("the model-service call carries a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], trace_id, "same trace: {traceparent}");
    assert_ne!(
        parts[2], client_span,
        "the parent is the feature service's span: {traceparent}"
    );
    drop(child);
    model.stop().await;
}
