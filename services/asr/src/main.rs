//! `asr`: the controller CLI.

mod adapters;
mod bench;
mod convert;
mod features;
mod features_remote;
mod net;
mod process;
mod remote;
mod status;
mod train;
mod train_guard;
mod train_local;
mod train_remote;
mod train_report;
mod transcribe;
mod transcribe_remote;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "asr",
    version,
    about = "Whisper + LoRA: features, transcription, datasets and training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: net::ConnectionArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Compute Whisper's normalised log-mel windows of an audio file, locally or through a
    /// feature service, and write them as float32 .npy of shape [windows, n_mels, 3000].
    Features(features::FeaturesArgs),
    /// Transcribe audio files with Whisper: through the feature and model services
    /// (`--server`), or in this process (`--local`).
    Transcribe(transcribe::TranscribeArgs),
    /// Health and description of the running feature and model services.
    Status(status::StatusArgs),
    /// Benchmarks against the reference implementations.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Convert a faster-whisper / CTranslate2 Whisper directory into an HF transformers one.
    Convert(convert::ConvertArgs),
    /// Store a dataset (JSONL manifest or Common Voice split) in the model service.
    Ingest(remote::IngestArgs),
    /// Training jobs of the model service: start, watch, list, cancel.
    #[command(subcommand)]
    Jobs(remote::JobsCommand),
    /// LoRA adapters: merge one into a model's weights; list, load, delete in the model
    /// service's registry.
    #[command(subcommand)]
    Adapters(adapters::AdaptersCommand),
    /// LoRA fine-tuning: a job of the model service on its datasets (`--output-adapter NAME
    /// --watch`), or `--local` in this process; `--dry-run` builds the model and adapter and
    /// prints the parameter count.
    Train(Box<train::TrainArgs>),
}

fn main() -> anyhow::Result<()> {
    // Before libtorch allocates: its large activations are reused from the heap.
    asr_runtime::allocator::keep_large_blocks();
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the CLI's spans are exported (and the trace
    // context sent to the services): a runtime of its own drives the exporter, and the guard
    // flushes it before exit.
    let telemetry = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let guard = {
                let _entered = runtime.enter();
                asr_runtime::init(
                    "asr",
                    &asr_runtime::TelemetryArgs {
                        // The CLI's own spans are at info level.
                        log: std::env::var("ASR_LOG").unwrap_or_else(|_| "warn,asr=info".into()),
                        log_format: asr_runtime::LogFormat::Text,
                        otlp_endpoint: Some(endpoint),
                    },
                )?
            };
            Some((runtime, guard))
        }
        _ => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            None
        }
    };
    let result = run(Cli::parse());
    if let Some((runtime, guard)) = telemetry {
        let _entered = runtime.enter();
        drop(guard);
    }
    result
}

fn run(cli: Cli) -> anyhow::Result<()> {
    net::init(&cli.connection)?;
    match cli.command {
        Command::Features(args) => features::run(args),
        Command::Transcribe(args) => transcribe::run(args),
        Command::Status(args) => status::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Convert(args) => convert::run(args),
        Command::Train(args) => train::run(*args),
        Command::Adapters(command) => adapters::run(command),
        Command::Ingest(args) => remote::ingest(args),
        Command::Jobs(command) => remote::jobs(command),
    }
}
