//! `model-service`: Whisper + LoRA on libtorch over gRPC.

use std::process::ExitCode;

use asr_runtime::probe::ServiceCommand;
use clap::Parser;
use model_service::ModelServiceConfig;

#[derive(Parser)]
#[command(
    name = "model-service",
    version,
    about = "Whisper + LoRA model service"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ASR_LISTEN", default_value = "127.0.0.1:50052")]
    listen: String,
    #[command(flatten)]
    service: ModelServiceConfig,
    #[command(flatten)]
    telemetry: asr_runtime::TelemetryArgs,
    #[command(subcommand)]
    command: Option<ServiceCommand>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(ServiceCommand::Healthcheck(probe)) = &args.command {
        return Ok(asr_runtime::probe::run(
            "asr.v1.ModelService",
            &args.listen,
            probe,
        ));
    }
    // Before libtorch runs: training and transcription each use it on threads of their own,
    // whose OpenMP teams must not spin against each other.
    asr_runtime::openmp::bounded_spin_or_restart();
    asr_runtime::allocator::keep_large_blocks();
    tokio::runtime::Runtime::new()?.block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = asr_runtime::init("model-service", &args.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "model service listening");
    model_service::serve(listener, args.service, asr_runtime::shutdown_signal()).await?;
    tracing::info!("model service stopped");
    Ok(())
}
