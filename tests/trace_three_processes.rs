//! One transcription is one trace: `asr transcribe --server` (with OTEL_EXPORTER_OTLP_ENDPOINT),
//! the feature service and the model service, three processes exporting over OTLP to a
//! recording collector here, give spans of one trace id, each service's span a child of its
//! caller's.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_support::assets;
use e2e_support::whisper_base::model_dir;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        if let Ok(mut exports) = self.0.lock() {
            exports.push(request.into_inner());
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A span as exported: (service, name, trace id, span id, parent span id).
type SpanRow = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

impl Collector {
    fn spans(&self) -> Vec<SpanRow> {
        let exports = self.0.lock().map(|e| e.clone()).unwrap_or_default();
        exports
            .iter()
            .flat_map(|e| e.resource_spans.iter())
            .flat_map(|rs| {
                let service = rs
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
                rs.scope_spans.iter().flat_map(move |ss| {
                    let service = service.clone();
                    ss.spans.iter().map(move |s| {
                        (
                            service.clone(),
                            s.name.clone(),
                            s.trace_id.clone(),
                            s.span_id.clone(),
                            s.parent_span_id.clone(),
                        )
                    })
                })
            })
            .collect()
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workspace's debug binaries (built here when this test runs alone).
fn binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .expect("test binary")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "model-service",
                "-p",
                "feature-service",
                "-p",
                "asr",
            ])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building the binaries");
    }
    path
}

fn start(name: &str, args: &[&str], collector: &str) -> (KillOnDrop, String) {
    let mut child = Command::new(binary(name))
        .args(args)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--otlp-endpoint",
            collector,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
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
        .unwrap_or_else(|_| panic!("{name} did not log its address"));
    (KillOnDrop(child), format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transcription_is_one_trace_across_three_processes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let data_root = tempfile::tempdir().expect("tempdir");
    let model = model_dir().display().to_string();
    let data = data_root.path().display().to_string();
    let (_model_service, model_url) = start(
        "model-service",
        &["--model", &model, "--data-root", &data, "--device", "cpu"],
        &collector_url,
    );
    let (_feature_service, feature_url) = start(
        "feature-service",
        &["--model-service", &model_url],
        &collector_url,
    );
    // The model loads in the background.
    let mut client = asr_proto::v1::model_service_client::ModelServiceClient::connect(model_url)
        .await
        .expect("connect");
    for _ in 0..600 {
        if client
            .get_model_info(asr_proto::v1::GetModelInfoRequest {})
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let clip = assets().join("aishell/BAC009S0764W0121.wav");
    let output = tokio::task::spawn_blocking({
        let (feature_url, collector_url) = (feature_url.clone(), collector_url.clone());
        move || {
            Command::new(binary("asr"))
                .args(["transcribe", "--server", &feature_url, "--language", "zh"])
                .arg(&clip)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url)
                .output()
                .expect("asr")
        }
    })
    .await
    .expect("join");
    assert!(
        output.status.success(),
        "asr failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!String::from_utf8_lossy(&output.stdout).trim().is_empty());

    // The services export in batches (every few seconds); the CLI flushed at exit.
    let mut found = None;
    for _ in 0..100 {
        let spans = collector.spans();
        let cli = spans
            .iter()
            .find(|s| s.0 == "asr" && s.1 == "asr transcribe");
        if let Some(cli) = cli {
            let in_trace: Vec<&SpanRow> = spans.iter().filter(|s| s.2 == cli.2).collect();
            let feature = in_trace
                .iter()
                .find(|s| s.0 == "feature-service" && s.1 == "Transcribe" && s.4 == cli.3);
            let model = in_trace
                .iter()
                .find(|s| s.0 == "model-service" && s.1 == "Transcribe");
            if let (Some(feature), Some(model)) = (feature, model) {
                found = Some((feature.3.clone(), model.4.clone(), in_trace.len()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (feature_span, model_parent, count) = found.unwrap_or_else(|| {
        let names: Vec<(String, String)> =
            collector.spans().into_iter().map(|s| (s.0, s.1)).collect();
        panic!("no trace through the three processes; spans seen: {names:?}")
    });
    // The model service's span hangs below a feature-service span of the same trace (the
    // relay's, itself below the request span).
    let spans = collector.spans();
    let parent = spans
        .iter()
        .find(|s| s.3 == model_parent)
        .expect("the model span's parent was exported");
    assert_eq!(parent.0, "feature-service", "{parent:?}");
    println!(
        "one trace, {count} spans; feature Transcribe {:02x?}, model parent {:02x?}",
        feature_span, model_parent
    );
}
