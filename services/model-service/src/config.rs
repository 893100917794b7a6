//! Model service settings: every field is a flag with an environment variable.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Weight and compute precision of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// int8 weights with per-channel scales, int8 GEMMs (bitsandbytes' load_in_8bit).
    Int8,
    Fp32,
    /// CUDA only.
    Fp16,
    /// CUDA only.
    Bf16,
}

#[derive(Debug, Clone, Args)]
pub struct ModelServiceConfig {
    /// HF-layout Whisper directory (config.json, model.safetensors, tokenizer.json), loaded
    /// at start (`asr convert` makes one). Without it the service runs without a model:
    /// Transcribe and LoadAdapter answer FAILED_PRECONDITION.
    #[arg(long, env = "ASR_MODEL")]
    pub model: Option<PathBuf>,
    /// Base model precision.
    #[arg(long, env = "ASR_PRECISION", value_enum, default_value_t = Precision::Int8)]
    pub precision: Precision,
    /// Where datasets, training jobs, checkpoints and adapters live.
    #[arg(long, env = "ASR_DATA_ROOT", default_value = "data")]
    pub data_root: PathBuf,
    /// Compute device: "auto" (CUDA when present), "cpu" or "cuda:N".
    #[arg(long, env = "ASR_DEVICE", default_value = "auto")]
    pub device: String,
    /// Windows waiting for the model, across all streams; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ASR_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// Transcribe streams served at once.
    #[arg(long, env = "ASR_MAX_CONCURRENT_STREAMS", default_value_t = 32)]
    pub max_concurrent_streams: usize,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "ASR_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// On SIGTERM, how long in-flight requests may run before the remaining connections are
    /// closed, in seconds.
    #[arg(long, env = "ASR_DRAIN_SECONDS", default_value_t = 30.0)]
    pub drain_seconds: f64,
    /// Most windows the scheduler decodes as one batch (across streams).
    #[arg(long, env = "ASR_MAX_BATCH_WINDOWS", default_value_t = 8)]
    pub max_batch_windows: usize,
    /// Windows of one stream decoding at once (after its language is known).
    #[arg(long, env = "ASR_WINDOWS_IN_FLIGHT", default_value_t = 4)]
    pub windows_in_flight: usize,
    /// Examples one dataset may hold; an IngestExamples stream that would go past it ends
    /// with RESOURCE_EXHAUSTED (what was acknowledged stays).
    #[arg(long, env = "ASR_MAX_DATASET_EXAMPLES", default_value_t = 1_000_000)]
    pub max_dataset_examples: usize,
    /// Adapters held in memory at once.
    #[arg(long, env = "ASR_MAX_LOADED_ADAPTERS", default_value_t = 8)]
    pub max_loaded_adapters: usize,
    /// Training jobs waiting to run; more are RESOURCE_EXHAUSTED.
    #[arg(long, env = "ASR_MAX_QUEUED_JOBS", default_value_t = 16)]
    pub max_queued_jobs: usize,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. 127.0.0.1:9102. Unset:
    /// no metrics endpoint.
    #[arg(long, env = "ASR_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Longest audio per Transcribe stream, in seconds.
    #[arg(long, env = "ASR_MAX_AUDIO_SECONDS", default_value_t = 4.0 * 3600.0)]
    pub max_audio_seconds: f64,
    /// The only directory LoadAdapter.source_dir may import from (relative paths are
    /// resolved inside it; `..` and links leading out are refused). Default:
    /// <data-root>/imports.
    #[arg(long, env = "ASR_IMPORT_ROOT")]
    pub import_root: Option<PathBuf>,
    #[command(flatten)]
    pub security: asr_runtime::ServerSecurityArgs,
}

impl Default for ModelServiceConfig {
    fn default() -> Self {
        Self {
            model: None,
            precision: Precision::Int8,
            data_root: PathBuf::from("data"),
            device: "auto".into(),
            queue_capacity: 64,
            max_concurrent_streams: 32,
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_windows: 8,
            windows_in_flight: 4,
            max_loaded_adapters: 8,
            max_dataset_examples: 1_000_000,
            max_queued_jobs: 16,
            metrics_listen: None,
            max_audio_seconds: 4.0 * 3600.0,
            drain_seconds: 30.0,
            import_root: None,
            security: Default::default(),
        }
    }
}

impl ModelServiceConfig {
    /// Where LoadAdapter.source_dir may import from.
    pub fn import_root(&self) -> PathBuf {
        self.import_root
            .clone()
            .unwrap_or_else(|| self.data_root.join("imports"))
    }
}
