//! The built `model-service` binary: starts with no library path set (libtorch found through
//! its rpath), restarts itself once with a bounded OpenMP spin when none is set, serves health
//! and GetModelInfo over loopback, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use asr_proto::v1 as pb;
use pb::model_service_client::ModelServiceClient;

/// Kills the service if the test fails half-way, so no orphan keeps cargo waiting.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_runs_without_library_path_and_stops_on_sigterm() {
    let data_root = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_model-service"))
        .arg("--data-root")
        .arg(data_root.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--log-format",
            "json",
            "--drain-seconds",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LIBTORCH")
        // No waiting policy chosen (cargo's config sets one for tests): the binary sets its own.
        .env_remove("OMP_WAIT_POLICY")
        .env_remove("GOMP_SPINCOUNT")
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting model-service");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (metrics_tx, metrics_rx) = std::sync::mpsc::channel();
    let log_reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = entry["fields"]["address"].as_str() {
                    let _ = addr_tx.send(addr.to_string());
                }
                if let Some(addr) = entry["fields"]["metrics_address"].as_str() {
                    let _ = metrics_tx.send(addr.to_string());
                }
            }
            lines.push(line);
        }
        lines
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the service logs its address");
    // Restarted in place: the same pid, now with libgomp's spin bounded.
    let environ = std::fs::read(format!("/proc/{}/environ", child.0.id())).expect("environ");
    let environ: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    assert!(
        environ.contains(&&b"GOMP_SPINCOUNT=10000"[..]),
        "{:?}",
        String::from_utf8_lossy(&environ.join(&b' '))
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "asr.v1.ModelService".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let info = ModelServiceClient::new(channel.clone())
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    assert_eq!(info.device, "cpu");
    assert_eq!(info.weight_precision, pb::Precision::Int8 as i32);
    // Without --model the registry answers, and what needs the model says how to get one.
    let adapters = ModelServiceClient::new(channel.clone())
        .list_adapters(pb::ListAdaptersRequest::default())
        .await
        .expect("the registry works without a model")
        .into_inner();
    assert!(adapters.adapters.is_empty());
    let no_model = ModelServiceClient::new(channel.clone())
        .load_adapter(pb::LoadAdapterRequest {
            name: "any".into(),
            source_dir: String::new(),
        })
        .await
        .expect_err("no model");
    assert_eq!(no_model.code(), tonic::Code::FailedPrecondition);
    assert!(no_model.message().contains("--model"), "{no_model:?}");

    // Prometheus text on /metrics, with the requests just made counted by code.
    let metrics_addr = metrics_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the service logs its metrics address");
    let mut socket = std::net::TcpStream::connect(&metrics_addr).expect("metrics socket");
    use std::io::{Read, Write};
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    socket.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(
            "asr_model_requests_total{rpc=\"LoadAdapter\",code=\"FailedPrecondition\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.contains("# TYPE asr_model_active_streams gauge"),
        "{body}"
    );

    // The client keeps its connection open: the drain deadline must still let the process go.
    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = child.0.wait().expect("wait");
    let logs = log_reader.join().expect("log reader");
    assert!(
        exit.success(),
        "model-service exited with {exit:?}; logs:\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter().any(|l| l.contains("model service stopped")),
        "no clean stop in logs"
    );
    drop(channel);
}
