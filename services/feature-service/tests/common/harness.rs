//! The relay tests' harness: the feature service in this process, the clip, requests and
//! scripted model-service events.

use std::path::PathBuf;
use std::time::Duration;

use asr_audio::pipeline::extract_all;
use asr_audio::{FeaturePipeline, InputFormat, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use feature_service::FeatureServiceConfig;
use pb::feature_service_client::FeatureServiceClient;
use pb::transcribe_audio_request::Payload;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Status;

pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn clip() -> Vec<u8> {
    let root = std::env::var_os("ASR_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let path = root.join("assets/aishell/BAC009S0764W0121.wav");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh first)", path.display()))
}

/// Raw log-mel frames of `bytes` computed in this process.
pub fn local_frames(bytes: &[u8], n_mels: u32) -> Vec<f32> {
    let pipeline = FeaturePipeline::new(PipelineConfig {
        mel: MelConfig::new(n_mels).expect("n_mels"),
        ..Default::default()
    });
    let (_, frames, _) = extract_all(
        &pipeline,
        std::io::Cursor::new(bytes.to_vec()),
        InputFormat::Encoded,
    )
    .expect("local extraction");
    frames
}

/// The feature service in this process on 127.0.0.1:0.
pub struct FeatureService {
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl FeatureService {
    pub async fn start(model_service: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let config = FeatureServiceConfig {
            model_service,
            model_service_retry_seconds: 0.3,
            drain_seconds: 1.0,
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(feature_service::serve(listener, config, async {
            let _ = rx.await;
        }));
        Self {
            url,
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn client(&self) -> FeatureServiceClient<Channel> {
        FeatureServiceClient::connect(self.url.clone())
            .await
            .expect("connect to the feature service")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .expect("feature service task")
            .expect("feature service");
    }
}

pub fn options() -> pb::TranscriptionOptions {
    pb::TranscriptionOptions {
        language: "zh".into(),
        task: pb::Task::Transcribe as i32,
        decoding: Some(pb::DecodingOptions {
            beam_size: Some(3),
            temperature: Some(0.0),
            temperature_fallback: vec![0.4, 0.8],
            ..Default::default()
        }),
        timestamps: true,
        initial_prompt: "以下是普通话的句子。".into(),
        adapter: "demo".into(),
        adapter_scale: Some(0.5),
        partial_results: true,
        ..Default::default()
    }
}

/// Config (encoded audio) + the bytes in `chunk`-byte messages.
pub fn requests(bytes: &[u8], chunk: usize) -> Vec<pb::TranscribeAudioRequest> {
    let config = pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(options()),
        })),
    };
    std::iter::once(config)
        .chain(bytes.chunks(chunk).map(|c| pb::TranscribeAudioRequest {
            payload: Some(Payload::Audio(c.to_vec())),
        }))
        .collect()
}

/// Every event of a Transcribe stream, or its error (whether it came with the response
/// headers or later).
pub async fn transcribe(
    client: &mut FeatureServiceClient<Channel>,
    requests: Vec<pb::TranscribeAudioRequest>,
) -> Result<Vec<pb::TranscribeResponse>, Status> {
    let call = async {
        let mut stream = client
            .transcribe(tokio_stream::iter(requests))
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.push(event);
        }
        Ok(events)
    };
    tokio::time::timeout(PATIENCE, call)
        .await
        .expect("Transcribe did not finish in time")
}

pub fn event(event: pb::transcribe_response::Event) -> pb::TranscribeResponse {
    pb::TranscribeResponse { event: Some(event) }
}

/// A partial, two segments and a summary, as a model service would send them.
pub fn scripted_events() -> (Vec<pb::TranscribeResponse>, Vec<pb::TranscribeResponse>) {
    use pb::transcribe_response::Event;
    let early = vec![event(Event::Partial(pb::PartialTranscript {
        stable_text: "甚至".into(),
        unstable_text: "出现交易".into(),
        audio_seconds: 1.0,
        start_seconds: 0.0,
        window_index: 0,
    }))];
    let segment = |id: u32, start: f64, end: f64, text: &str| {
        event(Event::Segment(pb::Segment {
            id,
            start_seconds: start,
            end_seconds: end,
            text: text.into(),
            token_ids: vec![50_364 + id, 7, 11],
            avg_logprob: -0.25 - id as f32,
            compression_ratio: 1.1,
            no_speech_prob: 0.01,
            temperature: 0.0,
            language: "zh".into(),
            window_index: 0,
        }))
    };
    let late = vec![
        segment(0, 0.0, 2.5, "甚至出现交易"),
        segment(1, 2.5, 4.2, "几乎停滞的情况"),
        event(Event::Summary(pb::TranscriptionSummary {
            audio_seconds: 4.2,
            processing_seconds: 0.5,
            real_time_factor: 0.12,
            model_name: "fake/whisper".into(),
            precision: pb::Precision::Int8 as i32,
            adapter: "demo".into(),
            adapter_scale: 0.5,
            language: "zh".into(),
            language_probability: None,
            segment_count: 2,
            window_count: 1,
        })),
    ];
    (early, late)
}
