//! `asr status`: health and self-description of the running services.

use anyhow::Context;
use asr_proto::v1 as pb;
use asr_runtime::AuthChannel;
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Args)]
pub struct StatusArgs {
    /// Feature service address.
    #[arg(
        long,
        env = "ASR_FEATURE_SERVICE",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Model service address (default: the one the feature service relays to).
    #[arg(long, env = "ASR_MODEL_SERVICE")]
    pub model_service: Option<String>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(status(args))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let channel = connect(&args.server).await?;
    let health = serving(&channel, "asr.v1.FeatureService").await?;
    let info = pb::feature_service_client::FeatureServiceClient::new(channel)
        .get_info(pb::GetInfoRequest {})
        .await?
        .into_inner();
    let limits = info.limits.unwrap_or_default();
    println!(
        "feature service {}: {health:?}, version {}, max audio {} s, {} streams, relays to {:?}",
        args.server,
        info.version,
        limits.max_audio_seconds,
        limits.max_concurrent_streams,
        info.model_service_address
    );
    let model_address = args
        .model_service
        .or_else(|| (!info.model_service_address.is_empty()).then_some(info.model_service_address));
    if let Some(address) = model_address {
        let channel = connect(&address).await?;
        let health = serving(&channel, "asr.v1.ModelService").await?;
        let model = pb::model_service_client::ModelServiceClient::new(channel)
            .get_model_info(pb::GetModelInfoRequest {})
            .await?
            .into_inner();
        let model_name = if model.model_name.is_empty() {
            "(none loaded)"
        } else {
            model.model_name.as_str()
        };
        println!(
            "model service {address}: {health:?}, version {}, device {}, model {model_name}",
            model.version, model.device
        );
    }
    Ok(())
}

async fn connect(address: &str) -> anyhow::Result<AuthChannel> {
    crate::net::connect(address).await
}

async fn serving(channel: &AuthChannel, service: &str) -> anyhow::Result<ServingStatus> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .with_context(|| format!("health check of {service}"))?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}
