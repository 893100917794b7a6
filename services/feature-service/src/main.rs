//! `feature-service`: serves Extract (audio -> log-mel frames) over gRPC.

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = asr_runtime::init("feature-service", &args.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "feature service listening");
    feature_service::serve(listener, args.service, asr_runtime::shutdown_signal()).await?;
    tracing::info!("feature service stopped");
    Ok(())
}
