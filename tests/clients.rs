//! The clients in other languages (`examples/python`, `examples/node`), run as a user runs
//! them, against the real services on 127.0.0.1 with whisper-base:
//! - the Python client (stubs generated from proto/ by grpcio-tools) and the Node client
//!   (@grpc/grpc-js, proto/ loaded at run time) transcribe each clip to exactly the text the
//!   Rust client and the `asr` CLI get, also paced at real time with partial results, and read the
//!   `google.rpc.BadRequest` field of an INVALID_ARGUMENT;
//! - the Python trainer ingests a manifest through the feature service, starts a job on the
//!   model service it asks the feature service for, and follows it to the end;
//! - the Python reflection client lists and describes both services, as grpcurl would.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use asr_proto::v1 as pb;
use e2e_support::whisper_base::{model_dir, test_clips};
use e2e_support::{
    asr_cli, assets, deterministic_decoding, python, repo_root, start_feature_service,
    start_model_service,
};
use feature_service::FeatureServiceConfig;
use model_service::ModelServiceConfig;
use pb::feature_service_client::FeatureServiceClient;
use pb::transcribe_audio_request::Payload;
use pb::transcribe_response::Event;
use serde_json::Value;

/// Longest a client may run (a hung client fails the test instead of the CI run).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

/// Held by the tests that run the model: the live-paced streams must get their partial
/// decodes done while the audio arrives, which a training job beside them on 2 cores can
/// prevent (partial decodes are best-effort: one still running at the end is dropped).
static MODEL_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn examples() -> PathBuf {
    repo_root().join("examples")
}

/// Runs a command to its end (killed after [`CLIENT_TIMEOUT`]).
async fn run(mut command: tokio::process::Command, what: &str) -> Output {
    command.kill_on_drop(true);
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} ran past {CLIENT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

/// `examples/python/<script> args...` with the venv's python.
async fn python_example(script: &str, args: &[&str]) -> Output {
    let dir = examples().join("python");
    let mut command = tokio::process::Command::new(python());
    command.current_dir(&dir).arg(dir.join(script)).args(args);
    run(command, &format!("{script} {args:?}")).await
}

/// `node examples/node/transcribe.js args...` (`ASR_NODE` names another node).
async fn node_example(args: &[&str]) -> Output {
    let dir = examples().join("node");
    assert!(
        dir.join("node_modules/@grpc/grpc-js").exists(),
        "{} is missing: scripts/setup.sh installs it (npm ci)",
        dir.join("node_modules").display()
    );
    let node = std::env::var_os("ASR_NODE").unwrap_or_else(|| "node".into());
    let mut command = tokio::process::Command::new(node);
    command
        .current_dir(&dir)
        .arg(dir.join("transcribe.js"))
        .args(args);
    run(command, &format!("transcribe.js {args:?}")).await
}

/// The last stdout line of a successful run, as JSON.
fn json_of(output: &Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: last stdout line is not JSON ({e}): {stdout}"))
}

/// The JSON error line of a run that must fail.
fn error_of(output: &Output, what: &str) -> Value {
    assert!(
        !output.status.success(),
        "{what} succeeded but must fail:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON error line ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    value["error"].clone()
}

fn model_config(data_root: &std::path::Path) -> ModelServiceConfig {
    ModelServiceConfig {
        model: Some(model_dir()),
        data_root: data_root.to_path_buf(),
        device: "cpu".into(),
        ..Default::default()
    }
}

/// What the clients' `--language zh --no-fallback` asks for: one greedy decode per window,
/// no fallback and no thresholds (sampled fallbacks are random, so no two runs could be
/// compared otherwise).
fn zh_no_fallback() -> pb::TranscriptionOptions {
    pb::TranscriptionOptions {
        language: "zh".into(),
        decoding: Some(deterministic_decoding()),
        ..Default::default()
    }
}

/// The Rust client's segments for a file: its bytes in chunks through FeatureService.Transcribe.
async fn rust_segments(server: &str, path: &std::path::Path) -> Vec<pb::Segment> {
    let mut client = FeatureServiceClient::connect(server.to_string())
        .await
        .expect("connect");
    let bytes = std::fs::read(path).expect("clip");
    let mut messages = vec![pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(zh_no_fallback()),
        })),
    }];
    messages.extend(bytes.chunks(64 * 1024).map(|c| pb::TranscribeAudioRequest {
        payload: Some(Payload::Audio(c.to_vec())),
    }));
    let mut stream = client
        .transcribe(tokio_stream::iter(messages))
        .await
        .expect("transcribe")
        .into_inner();
    let mut segments = Vec::new();
    let mut summary = None;
    while let Some(response) = stream.message().await.expect("event") {
        match response.event.expect("event") {
            Event::Segment(s) => segments.push(s),
            Event::Summary(s) => summary = Some(s),
            Event::Partial(_) => {}
        }
    }
    assert!(summary.is_some(), "the Rust client got no summary");
    segments
}

fn text_of(segments: &[pb::Segment]) -> String {
    segments
        .iter()
        .map(|s| s.text.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks one client's JSON result against the Rust client's segments.
fn assert_same(result: &Value, expected: &[pb::Segment], what: &str) {
    assert_eq!(
        result["text"].as_str(),
        Some(text_of(expected).as_str()),
        "{what}: text differs from the Rust client's"
    );
    let segments = result["segments"].as_array().expect("segments");
    assert_eq!(segments.len(), expected.len(), "{what}: segment count");
    for (got, want) in segments.iter().zip(expected) {
        assert_eq!(got["text"].as_str(), Some(want.text.as_str()), "{what}");
        assert_eq!(got["start"].as_f64(), Some(want.start_seconds), "{what}");
        assert_eq!(got["end"].as_f64(), Some(want.end_seconds), "{what}");
    }
    assert_eq!(result["language"], "zh", "{what}");
    assert_eq!(result["model_name"], "whisper-base", "{what}");
    assert_eq!(result["precision"], "PRECISION_INT8", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_and_node_clients_transcribe_as_the_rust_client() {
    let _one_at_a_time = MODEL_TESTS.lock().await;
    let data_root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(model_config(data_root.path())).await;
    let features = start_feature_service(FeatureServiceConfig {
        model_service: Some(model.url()),
        ..Default::default()
    })
    .await;
    let server = features.url();
    let aishell = assets().join("aishell/BAC009S0764W0121.wav");
    let mut clips: Vec<PathBuf> = test_clips(3).into_iter().map(|c| c.path).collect();
    clips.push(aishell.clone());

    // One stream at a time, so that no window is batched with another (float rounding).
    for clip in &clips {
        let path = clip.to_str().expect("utf-8 path");
        let segments = rust_segments(&server, clip).await;
        assert!(!segments.is_empty(), "{path}: no segment");
        let args = [
            path,
            "--server",
            &server,
            "--language",
            "zh",
            "--no-fallback",
            "--json",
        ];
        // The Rust CLI, with its flags for the same decoding (one temperature: no fallback).
        let mut cli = tokio::process::Command::new(asr_cli());
        cli.args(["transcribe", "--server", &server, path, "--language", "zh"])
            .args(["--temperature", "0", "--compression-ratio-threshold", "-1"])
            .args(["--logprob-threshold", "-1e30", "--no-speech-threshold", "1"])
            .args(["--format", "json"]);
        let cli = run(cli, "asr transcribe --server").await;
        assert!(
            cli.status.success(),
            "asr transcribe --server failed: {}",
            String::from_utf8_lossy(&cli.stderr)
        );
        let cli: Value = serde_json::from_slice(&cli.stdout).expect("asr --format json");
        let cli_segments = cli["segments"].as_array().expect("segments");
        assert_eq!(
            cli_segments
                .iter()
                .map(|s| s["text"].as_str().unwrap_or_default())
                .collect::<Vec<_>>(),
            segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>(),
            "{path}: the Rust CLI's segments differ from the Rust client's"
        );
        let py = json_of(
            &python_example("transcribe.py", &args).await,
            "transcribe.py",
        );
        assert_same(&py, &segments, &format!("python, {path}"));
        let js = json_of(&node_example(&args).await, "transcribe.js");
        assert_same(&js, &segments, &format!("node, {path}"));
        println!(
            "{path}: {:?} (rust client = asr CLI = python = node)",
            text_of(&segments)
        );
    }

    // Live-paced with partial results (a re-decode queued every 0.5 s of audio): partials
    // arrive before the end, the final text is the Rust client's. The two AISHELL clips as one
    // 8.3 s recording, one client after the other: partial decodes are best-effort (one still
    // running when the audio ends is dropped), and a loaded 2-core machine may need seconds for
    // one.
    let (mut samples, rate, channels) = e2e_support::read_audio(&aishell);
    samples.extend(e2e_support::read_audio(&assets().join("aishell/BAC009S0764W0122.wav")).0);
    let long = data_root.path().join("aishell-8s.wav");
    std::fs::write(&long, e2e_support::wav_i16(&samples, rate, channels as u16)).expect("wav");
    let long_expected = rust_segments(&server, &long).await;
    assert!(!long_expected.is_empty(), "no segment for the 8.3 s clip");
    let paced = [
        "--server",
        &server,
        "--language",
        "zh",
        "--no-fallback",
        "--realtime",
        "--partial",
        "--partial-interval",
        "0.5",
        "--json",
    ];
    let long_path = long.to_str().expect("utf-8 path");
    let paced_args = [&[long_path][..], &paced].concat();
    for client in ["python", "node"] {
        let what = format!("{client} --realtime");
        let started = std::time::Instant::now();
        let output = match client {
            "python" => python_example("transcribe.py", &paced_args).await,
            _ => node_example(&paced_args).await,
        };
        let result = json_of(&output, &what);
        assert!(
            started.elapsed() >= Duration::from_secs(7),
            "{what}: 8.3 s of audio sent in {:?}: not paced",
            started.elapsed()
        );
        assert_same(&result, &long_expected, &what);
        assert!(
            result["partial_count"].as_u64().unwrap_or(0) >= 1,
            "{what}: no partial results: {result}"
        );
        println!(
            "{what}: {} partial results, last stable {}",
            result["partial_count"], result["last_stable_text"]
        );
    }

    // INVALID_ARGUMENT: both clients read the field from the google.rpc.BadRequest detail.
    let clip = clips[0].to_str().expect("utf-8 path");
    // Beam 0 reaches the service as a set field (proto3 `optional`), not as "unset".
    let bad_language = [clip, "--server", &server, "--language", "klingon", "--json"];
    let beam_zero = [clip, "--server", &server, "--beam", "0", "--json"];
    for (bad, field) in [
        (bad_language, "config.options.language"),
        (beam_zero, "config.options.decoding.beam_size"),
    ] {
        for (what, output) in [
            ("python", python_example("transcribe.py", &bad).await),
            ("node", node_example(&bad).await),
        ] {
            let error = error_of(&output, what);
            assert_eq!(error["code"], "INVALID_ARGUMENT", "{what}: {error}");
            assert_eq!(
                error["field_violations"][0]["field"], field,
                "{what}: {error}"
            );
        }
    }
    features.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_client_ingests_a_manifest_and_follows_a_training_job() {
    let _one_at_a_time = MODEL_TESTS.lock().await;
    let data_root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(model_config(data_root.path())).await;
    let features = start_feature_service(FeatureServiceConfig {
        model_service: Some(model.url()),
        ..Default::default()
    })
    .await;
    let corpus = assets().join("corpus/espeak");
    let train = corpus.join("train.jsonl");
    let dev = corpus.join("dev.jsonl");
    let server = features.url();
    // No --model-service: the script asks the feature service where the model service is.
    let output = python_example(
        "train.py",
        &[
            train.to_str().expect("utf-8"),
            "--eval-manifest",
            dev.to_str().expect("utf-8"),
            "--max-examples",
            "4",
            "--server",
            &server,
            "--dataset",
            "espeak-py",
            "--output-adapter",
            "espeak-py-lora",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--max-steps",
            "2",
            "--warmup-steps",
            "0",
            "--logging-steps",
            "1",
            "--json",
        ],
    )
    .await;
    let result = json_of(&output, "train.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let ingested = result["ingested"].as_array().expect("ingested");
    assert_eq!(ingested.len(), 2, "{result}");
    assert_eq!(ingested[0]["accepted"], 4, "{result}");
    assert_eq!(ingested[1]["accepted"], 4, "{result}");
    assert_eq!(ingested[1]["split"], "eval", "{result}");
    assert_eq!(result["state"], "TRAINING_JOB_STATE_SUCCEEDED", "{result}");
    assert_eq!(result["global_step"], 2, "{result}");
    assert_eq!(result["step_events"], 2, "{result}");
    assert_eq!(result["adapter"], "espeak-py-lora", "{result}");
    // The progress it printed on the way.
    for expected in [
        "started: 4 examples, 2 steps",
        "step     2",
        "eval at step 2",
        "finished at step 2",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }

    // The model service agrees: the dataset, the job and its adapter.
    let mut client = pb::model_service_client::ModelServiceClient::connect(model.url())
        .await
        .expect("connect");
    let dataset = client
        .get_dataset(pb::GetDatasetRequest {
            name: "espeak-py".into(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!(
        (dataset.example_count, dataset.language.as_str()),
        (8, "zh")
    );
    let job = client
        .get_training_job(pb::GetTrainingJobRequest {
            job_id: result["job_id"].as_str().expect("job id").into(),
        })
        .await
        .expect("job")
        .into_inner();
    assert_eq!(job.state, pb::TrainingJobState::Succeeded as i32);
    assert_eq!(job.adapter, "espeak-py-lora");
    client
        .get_adapter(pb::GetAdapterRequest {
            name: "espeak-py-lora".into(),
        })
        .await
        .expect("the trained adapter is in the registry");
    features.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_client_lists_and_describes_both_services() {
    // Reflection needs no model.
    let data_root = tempfile::tempdir().expect("tempdir");
    let (model, _handle) = start_model_service(ModelServiceConfig {
        model: None,
        ..model_config(data_root.path())
    })
    .await;
    let features = start_feature_service(FeatureServiceConfig {
        model_service: Some(model.url()),
        ..Default::default()
    })
    .await;
    for (name, url) in [
        ("feature service", features.url()),
        ("model service", model.url()),
    ] {
        let reflect = |args: Vec<&str>| {
            let mut all = vec!["--server", url.as_str()];
            all.extend(args);
            let all: Vec<String> = all.into_iter().map(String::from).collect();
            async move {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                let output = python_example("reflect.py", &refs).await;
                let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
                assert!(
                    output.status.success(),
                    "reflect.py {refs:?} failed:\n{stdout}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                stdout
            }
        };

        let services = reflect(vec!["list"]).await;
        let services: Vec<&str> = services.lines().collect();
        for service in [
            "asr.v1.FeatureService",
            "asr.v1.ModelService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.contains(&service),
                "{name}: {service} not in {services:?}"
            );
        }

        let methods = reflect(vec!["list", "asr.v1.FeatureService"]).await;
        let methods: Vec<&str> = methods.lines().collect();
        assert_eq!(
            methods,
            [
                "asr.v1.FeatureService.Extract",
                "asr.v1.FeatureService.Transcribe",
                "asr.v1.FeatureService.Ingest",
                "asr.v1.FeatureService.GetInfo",
            ],
            "{name}"
        );
        let methods = reflect(vec!["list", "asr.v1.ModelService"]).await;
        for method in [
            "Transcribe",
            "StartTraining",
            "WatchTraining",
            "LoadAdapter",
        ] {
            assert!(
                methods
                    .lines()
                    .any(|l| l == format!("asr.v1.ModelService.{method}")),
                "{name}: {method} not in {methods}"
            );
        }

        let described = reflect(vec![
            "describe",
            "asr.v1.FeatureService.Transcribe",
            "asr.v1.ModelService.StartTraining",
            "asr.v1.ModelService.WatchTraining",
            "grpc.health.v1.Health.Check",
            "asr.v1.TranscriptionOptions",
            "asr.v1.Task",
        ])
        .await;
        for expected in [
            "asr.v1.FeatureService.Transcribe is a method:",
            "rpc Transcribe ( stream .asr.v1.TranscribeAudioRequest ) returns ( stream .asr.v1.TranscribeResponse );",
            "rpc StartTraining ( .asr.v1.StartTrainingRequest ) returns ( .asr.v1.TrainingJob );",
            "rpc WatchTraining ( .asr.v1.WatchTrainingRequest ) returns ( stream .asr.v1.TrainingEvent );",
            "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns ( .grpc.health.v1.HealthCheckResponse );",
            "asr.v1.TranscriptionOptions is a message:",
            "  string language = 1;",
            "  .asr.v1.DecodingOptions decoding = 3;",
            "  optional float adapter_scale = 11;",
            // The .proto comments travel with the descriptors.
            "  // Spoken language as a Whisper language code",
            "asr.v1.Task is an enum:",
            "  TASK_TRANSLATE = 2;",
        ] {
            assert!(
                described.lines().any(|l| l.starts_with(expected)),
                "{name}: no line {expected:?} in:\n{described}"
            );
        }
    }
    features.stop().await;
    model.stop().await;
}
