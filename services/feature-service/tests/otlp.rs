//! With `--otlp-endpoint`, the feature-service binary exports its request spans over OTLP/gRPC
//! (here to a recording collector on 127.0.0.1); the spans carry the service name. Its
//! `healthcheck` probe (the container images' HEALTHCHECK) passes while it serves.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use asr_proto::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct RecordingCollector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for RecordingCollector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().expect("lock").push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_otlp_collector() {
    let collector = RecordingCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let child = Command::new(env!("CARGO_BIN_EXE_feature-service"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--drain-seconds",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--otlp-endpoint", &format!("http://{collector_addr}")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting feature-service");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (metrics_tx, metrics_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = entry["fields"]["address"].as_str() {
                    let _ = addr_tx.send(addr.to_string());
                }
                if let Some(addr) = entry["fields"]["metrics_address"].as_str() {
                    let _ = metrics_tx.send(addr.to_string());
                }
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the service logs its address");
    for args in [
        vec![
            "healthcheck".to_string(),
            "--url".into(),
            format!("http://{addr}"),
        ],
        vec!["--listen".to_string(), addr.clone(), "healthcheck".into()],
    ] {
        let probe = Command::new(env!("CARGO_BIN_EXE_feature-service"))
            .args(&args)
            .output()
            .expect("running the probe");
        assert!(
            probe.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
    }

    let mut client =
        pb::feature_service_client::FeatureServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
    let config = pb::ExtractRequest {
        payload: Some(pb::extract_request::Payload::Config(pb::ExtractConfig {
            format: Some(pb::AudioFormat {
                format: Some(pb::audio_format::Format::RawPcm(pb::RawPcmFormat {
                    sample_format: pb::SampleFormat::S16le as i32,
                    sample_rate_hz: 16_000,
                    channels: 1,
                    interleaved: None,
                })),
            }),
            n_mels: 80,
            max_frames_per_message: 0,
        })),
    };
    let audio = pb::ExtractRequest {
        payload: Some(pb::extract_request::Payload::Audio(vec![0u8; 3200])),
    };
    let mut responses = client
        .extract(tokio_stream::iter(vec![config, audio]))
        .await
        .expect("extract")
        .into_inner();
    while responses.message().await.expect("stream").is_some() {}
    drop(client);

    // The request is counted in the Prometheus metrics.
    let metrics_addr = metrics_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the service logs its metrics address");
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(&metrics_addr).expect("metrics socket");
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        socket.read_to_string(&mut body).expect("response");
        body
    })
    .await
    .expect("join");
    assert!(
        body.contains("asr_feature_requests_total{rpc=\"Extract\",code=\"Ok\"} 1"),
        "{body}"
    );

    // SIGTERM: the service stops and flushes its spans on the way out.
    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "feature-service exited with {exit:?}");

    let exports = collector.0.lock().expect("lock").clone();
    let spans: Vec<(String, String)> = exports
        .iter()
        .flat_map(|export| export.resource_spans.iter())
        .flat_map(|resource_spans| {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            resource_spans
                .scope_spans
                .iter()
                .flat_map(|scope| scope.spans.iter())
                .map(move |span| (service.clone(), span.name.clone()))
        })
        .collect();
    assert!(
        spans
            .iter()
            .any(|(service, name)| service == "feature-service" && name == "Extract"),
        "no Extract span from feature-service among {spans:?}"
    );
}
