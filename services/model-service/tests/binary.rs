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
    let mut log = ServiceLog::follow(&mut child.0);
    let addr = log.wait_for(field("address"));
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
    // The probe the container images use, by URL and from the listen address.
    let (healthy, message) = healthcheck(&["healthcheck", "--url", &format!("http://{addr}")]);
    assert!(healthy, "{message}");
    let (healthy, message) = healthcheck(&["--listen", &addr, "healthcheck"]);
    assert!(healthy, "{message}");
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
    let metrics_addr = log.wait_for(field("metrics_address"));
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
    let logs = log.all();
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
    let (healthy, message) = healthcheck(&[
        "healthcheck",
        "--url",
        &format!("http://{addr}"),
        "--timeout-ms",
        "2000",
    ]);
    assert!(!healthy, "a stopped service passed the probe");
    assert!(message.contains(&addr.to_string()), "{message}");
}

/// A service's JSON log lines, read on a thread of their own as they come.
struct ServiceLog {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ServiceLog {
    fn follow(child: &mut std::process::Child) -> Self {
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            lines,
            seen: Vec::new(),
        }
    }

    /// The first value `pick` finds in a line logged so far, or within 30 s.
    fn wait_for(&mut self, pick: impl Fn(&str) -> Option<String>) -> String {
        if let Some(found) = self.seen.iter().find_map(|line| pick(line)) {
            return found;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("not in the log ({e}):\n{}", self.seen.join("\n")));
            let found = pick(&line);
            self.seen.push(line);
            if let Some(found) = found {
                return found;
            }
        }
    }

    /// Every line, once the process has closed its stderr.
    fn all(mut self) -> Vec<String> {
        self.seen.extend(self.lines.iter());
        self.seen
    }
}

/// A JSON log line's `fields.NAME`, as a string.
fn field(name: &'static str) -> impl Fn(&str) -> Option<String> {
    move |line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        entry["fields"][name].as_str().map(str::to_string)
    }
}

/// `model-service ARGS...` as Docker's HEALTHCHECK runs it: (exit 0, stderr).
fn healthcheck(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_model-service"))
        .args(args)
        .output()
        .expect("running the probe");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A base model that cannot load leaves the service up (registry, datasets) but NOT_SERVING, so
/// an orchestrator does not route transcriptions to it.
#[tokio::test]
async fn a_model_that_fails_to_load_is_not_serving() {
    let data_root = tempfile::tempdir().expect("tempdir");
    // Config, tokenizer and generation settings of the test model (checked at start-up), and
    // weights that are not safetensors (read by the scheduler thread).
    let model = tempfile::tempdir().expect("model dir");
    let whisper_base =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/whisper-base");
    for entry in std::fs::read_dir(&whisper_base).expect("assets/whisper-base (scripts/setup.sh)") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json" || e == "txt") {
            std::fs::copy(&path, model.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(model.path().join("model.safetensors"), "not safetensors").expect("weights");
    let child = Command::new(env!("CARGO_BIN_EXE_model-service"))
        .arg("--data-root")
        .arg(data_root.path())
        .arg("--model")
        .arg(model.path())
        .args(["--listen", "127.0.0.1:0", "--device", "cpu"])
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting model-service");
    let mut child = KillOnDrop(child);
    let mut log = ServiceLog::follow(&mut child.0);
    let addr = log.wait_for(field("address"));
    log.wait_for(|line| line.contains("the model failed to load").then(String::new));
    let (healthy, message) = healthcheck(&["healthcheck", "--url", &format!("http://{addr}")]);
    assert!(!healthy, "a service without its model passed the probe");
    assert!(message.contains("NotServing"), "{message}");
    // It still answers what needs no model.
    let mut client = ModelServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    client
        .list_adapters(pb::ListAdaptersRequest::default())
        .await
        .expect("the registry works without a model");
}
