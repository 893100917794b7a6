//! `feature-service`: serves Extract (audio -> log-mel frames) over gRPC.

use std::process::ExitCode;

use asr_runtime::probe::ServiceCommand;
use clap::Parser;
use feature_service::FeatureServiceConfig;

#[derive(Parser)]
#[command(
    name = "feature-service",
    version,
    about = "Whisper feature service: any audio in, log-mel frames out"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ASR_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    #[command(flatten)]
    service: FeatureServiceConfig,
    #[command(flatten)]
    telemetry: asr_runtime::TelemetryArgs,
    #[command(subcommand)]
    command: Option<ServiceCommand>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(ServiceCommand::Healthcheck(probe)) = &args.command {
        return Ok(asr_runtime::probe::run(
            "asr.v1.FeatureService",
            &args.listen,
            probe,
        ));
    }
    tokio::runtime::Runtime::new()?.block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = asr_runtime::init("feature-service", &args.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "feature service listening");
    feature_service::serve(listener, args.service, asr_runtime::shutdown_signal()).await?;
    tracing::info!("feature service stopped");
    Ok(())
}
