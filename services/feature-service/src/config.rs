//! Limits and defaults of a feature service replica.

use std::path::PathBuf;

use clap::Args;

/// Limits and defaults; every field is a flag with an environment variable.
#[derive(Debug, Clone, Args)]
pub struct FeatureServiceConfig {
    /// Longest audio accepted per stream, in seconds; longer streams end with
    /// RESOURCE_EXHAUSTED as soon as the limit is crossed.
    #[arg(long, env = "ASR_MAX_AUDIO_SECONDS", default_value_t = 4.0 * 3600.0)]
    pub max_audio_seconds: f64,
    /// Streams served at once by this replica; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ASR_MAX_CONCURRENT_STREAMS", default_value_t = 64)]
    pub max_concurrent_streams: usize,
    /// Frames per MelFrames message when the client does not choose (100 = 1 s of audio).
    #[arg(long, env = "ASR_FRAMES_PER_MESSAGE", default_value_t = 100)]
    pub default_frames_per_message: usize,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "ASR_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// On SIGTERM, how long in-flight streams may run before the remaining connections are
    /// closed, in seconds.
    #[arg(long, env = "ASR_DRAIN_SECONDS", default_value_t = 10.0)]
    pub drain_seconds: f64,
    /// Address of the model service that Transcribe and Ingest relay to, e.g.
    /// http://127.0.0.1:50052. Connected lazily: the feature service starts (and serves
    /// Extract) while the model service is down, and picks it up when it comes back.
    #[arg(long, env = "ASR_MODEL_SERVICE")]
    pub model_service: Option<String>,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. 127.0.0.1:9101. Unset:
    /// no metrics endpoint.
    #[arg(long, env = "ASR_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Timeout of one connection attempt to the model service, in seconds.
    #[arg(long, env = "ASR_MODEL_SERVICE_CONNECT_SECONDS", default_value_t = 5.0)]
    pub model_service_connect_seconds: f64,
    /// How long a request keeps retrying an unavailable model service (with exponential
    /// backoff) before it fails with UNAVAILABLE, in seconds; 0 = one attempt.
    #[arg(long, env = "ASR_MODEL_SERVICE_RETRY_SECONDS", default_value_t = 3.0)]
    pub model_service_retry_seconds: f64,
    /// PEM CA certificates to verify an https:// model service with; unset: the system's
    /// roots.
    #[arg(long, env = "ASR_MODEL_SERVICE_TLS_CA")]
    pub model_service_tls_ca: Option<PathBuf>,
    /// PEM client certificate for a model service that asks for one (mutual TLS).
    #[arg(
        long,
        env = "ASR_MODEL_SERVICE_TLS_CERT",
        requires = "model_service_tls_key"
    )]
    pub model_service_tls_cert: Option<PathBuf>,
    /// PEM key of --model-service-tls-cert.
    #[arg(
        long,
        env = "ASR_MODEL_SERVICE_TLS_KEY",
        requires = "model_service_tls_cert"
    )]
    pub model_service_tls_key: Option<PathBuf>,
    /// File holding the bearer token this service presents to the model service (it needs
    /// the transcribe and train scopes there). The token can also come in
    /// ASR_MODEL_SERVICE_TOKEN.
    #[arg(long, env = "ASR_MODEL_SERVICE_TOKEN_FILE")]
    pub model_service_token_file: Option<PathBuf>,
    #[arg(skip = std::env::var("ASR_MODEL_SERVICE_TOKEN").ok())]
    pub model_service_token: Option<String>,
    #[command(flatten)]
    pub security: asr_runtime::ServerSecurityArgs,
}

impl Default for FeatureServiceConfig {
    fn default() -> Self {
        Self {
            max_audio_seconds: 4.0 * 3600.0,
            max_concurrent_streams: 64,
            default_frames_per_message: 100,
            max_message_bytes: 4 * 1024 * 1024,
            drain_seconds: 10.0,
            model_service: None,
            metrics_listen: None,
            model_service_connect_seconds: 5.0,
            model_service_retry_seconds: 3.0,
            model_service_tls_ca: None,
            model_service_tls_cert: None,
            model_service_tls_key: None,
            model_service_token_file: None,
            model_service_token: None,
            security: Default::default(),
        }
    }
}

impl FeatureServiceConfig {
    /// Checks the values a flag can get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_audio_seconds.is_finite() && self.max_audio_seconds > 0.0,
            "--max-audio-seconds must be positive"
        );
        anyhow::ensure!(
            self.max_concurrent_streams > 0,
            "--max-concurrent-streams must be at least 1"
        );
        anyhow::ensure!(
            (1..=asr_audio::WINDOW_FRAMES).contains(&self.default_frames_per_message),
            "--frames-per-message must be 1..=3000"
        );
        anyhow::ensure!(
            self.max_message_bytes >= 1024,
            "--max-message-bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.model_service_connect_seconds.is_finite()
                && self.model_service_connect_seconds > 0.0,
            "--model-service-connect-seconds must be positive"
        );
        anyhow::ensure!(
            self.model_service_retry_seconds.is_finite() && self.model_service_retry_seconds >= 0.0,
            "--model-service-retry-seconds must be 0 or more"
        );
        Ok(())
    }
}
