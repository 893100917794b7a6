//! Shared helpers of the end-to-end tests: where the venv and assets are, running the Python
//! references, writing fixtures, and starting real services on 127.0.0.1:0.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use asr_audio::decode::EncodedDecoder;
use asr_audio::pipeline::extract_all;
use asr_audio::{Container, FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod whisper_base;

/// The repository root: `ASR_REPO_ROOT` when set (a test binary run on another machine, from
/// a copy of the repository elsewhere), else the checkout the tests were compiled in.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("ASR_REPO_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The assets made by scripts/setup.sh.
pub fn assets() -> PathBuf {
    let dir = repo_root().join("assets");
    assert!(
        dir.join("corpus/espeak/test.jsonl").exists(),
        "{} is missing: run scripts/setup.sh first",
        dir.display()
    );
    dir
}

/// The interpreter that runs the references: `ASR_PYTHON` when set (a path, or a name looked up
/// on `PATH`, e.g. `python3` on a GPU machine with torch and transformers but without our venv),
/// else the venv's python made by scripts/setup.sh.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("ASR_PYTHON") {
        return PathBuf::from(python);
    }
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh first",
        python.display()
    );
    python
}

/// Decoding options for comparing runs: one greedy decode per window at temperature 0, no
/// fallback (sampled fallbacks are random) and no thresholds (no window dropped as silence).
pub fn deterministic_decoding() -> asr_proto::v1::DecodingOptions {
    asr_proto::v1::DecodingOptions {
        temperature_increment: Some(0.0),
        compression_ratio_threshold: Some(0.0),
        log_prob_threshold: Some(f32::NEG_INFINITY),
        no_speech_threshold: Some(1.0),
        ..Default::default()
    }
}

/// The `asr` CLI binary, built by cargo (or found up to date) once per test process: the
/// e2e tests run it as a user would. Cargo sets `CARGO` for the tests it runs.
pub fn asr_cli() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "--locked", "-q", "-p", "asr", "--bin", "asr"])
            .arg("--message-format=json")
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build -p asr");
        assert!(output.status.success(), "cargo build -p asr failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "asr")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no asr executable")
    })
    .clone()
}

/// Runs `tests/reference/<script>` with [`python`]; panics with its stderr on failure.
pub fn run_reference(script: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/reference").join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python().display()));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing to python");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("waiting for python");
    assert!(
        output.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The 16 kHz mono samples of the espeak test split, in manifest order.
pub fn corpus_clips(split: &str, count: usize) -> Vec<Vec<f32>> {
    let dir = assets().join("corpus/espeak");
    let manifest = std::fs::read_to_string(dir.join(format!("{split}.jsonl"))).expect("manifest");
    manifest
        .lines()
        .take(count)
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).expect("manifest line");
            let (samples, rate, channels) =
                read_audio(&dir.join(entry["audio"].as_str().expect("audio")));
            assert_eq!((rate, channels), (16_000, 1));
            samples
        })
        .collect()
}

/// Decodes a wav file: interleaved samples, rate, channels.
pub fn read_audio(path: &Path) -> (Vec<f32>, u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut decoder =
        EncodedDecoder::open(std::io::BufReader::new(file), Container::Wav).expect("wav");
    let mut samples = Vec::new();
    let mut channels = decoder.channels();
    while let Some(c) = decoder.next_packet(&mut samples).expect("decode") {
        channels = c;
    }
    (samples, decoder.sample_rate(), channels)
}

/// A 16-bit PCM wav of `samples` (values in [-1, 1), quantised exactly as soundfile reads back).
pub fn wav_i16(samples: &[f32], rate: u32, channels: u16) -> Vec<u8> {
    let pcm: Vec<u8> = samples
        .iter()
        .flat_map(|s| ((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes())
        .collect();
    let mut out = Vec::with_capacity(44 + pcm.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2 * u32::from(channels)).to_le_bytes());
    out.extend_from_slice(&(2 * channels).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(&pcm);
    out
}

/// Our normalised windows of a whole input (`[windows][n_mels * 3000]`) and the raw frames.
pub fn our_windows(bytes: Vec<u8>, format: InputFormat, n_mels: u32) -> (Vec<Vec<f32>>, Vec<f32>) {
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(n_mels).expect("n_mels"),
        ..Default::default()
    });
    let (_, frames, summary) =
        extract_all(&pipeline, std::io::Cursor::new(bytes), format).expect("our pipeline");
    let windows =
        asr_audio::windows_from_frames(&frames, n_mels as usize, summary.windows as usize);
    (windows, frames)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    asr_audio::npy::read_f32(std::fs::File::open(path).expect("npy")).expect("read npy")
}

/// A service running in this process on 127.0.0.1:0; shut down on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The model service in this process on 127.0.0.1:0; returns a clone of the server too
/// (its scheduler counters). Waits until the model (if any) has loaded.
pub async fn start_model_service(
    config: model_service::ModelServiceConfig,
) -> (TestServer, model_service::ModelServer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = model_service::ModelServer::new(config).expect("model service config");
    if let Ok(engine) = server.engine() {
        engine.wait_ready().await.expect("the model loads");
    }
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(model_service::serve_server(
        listener,
        server.clone(),
        async {
            let _ = rx.await;
        },
    ));
    (
        TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        },
        server,
    )
}

pub async fn start_feature_service(config: feature_service::FeatureServiceConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(feature_service::serve(listener, config, async {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        shutdown: Some(tx),
        task: Some(task),
    }
}
