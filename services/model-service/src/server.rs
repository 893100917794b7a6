//! The ModelService gRPC server, with grpc.health.v1 and server reflection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use asr_proto::v1 as pb;
use futures::Stream;
use pb::model_service_server::{ModelService, ModelServiceServer};
use tch::Device;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{ModelServiceConfig, Precision};
use crate::device;
use crate::error::ModelError;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type RpcResult<T> = Result<Response<T>, Status>;

#[derive(Clone)]
pub struct ModelServer {
    config: Arc<ModelServiceConfig>,
    device: Device,
}

impl ModelServer {
    pub fn new(config: ModelServiceConfig) -> Result<Self, ModelError> {
        if !(config.drain_seconds.is_finite() && config.drain_seconds >= 0.0) {
            return Err(ModelError::Config(
                "--drain-seconds must be 0 or more".into(),
            ));
        }
        let device = device::select(&config.device)?;
        if matches!(config.precision, Precision::Fp16 | Precision::Bf16) && device == Device::Cpu {
            return Err(ModelError::Config(format!(
                "--precision {:?} needs CUDA; this machine runs on the CPU (use int8 or fp32)",
                config.precision
            )));
        }
        tracing::info!(device = %device::describe(device), precision = ?config.precision, "model service device");
        Ok(Self {
            config: Arc::new(config),
            device,
        })
    }

    pub fn into_service(self) -> ModelServiceServer<Self> {
        let limit = self.config.max_message_bytes;
        ModelServiceServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    fn weight_precision(&self) -> pb::Precision {
        match self.config.precision {
            Precision::Int8 => pb::Precision::Int8,
            Precision::Fp32 => pb::Precision::Fp32,
            Precision::Fp16 => pb::Precision::Fp16,
            Precision::Bf16 => pb::Precision::Bf16,
        }
    }
}

fn later<T>(rpc: &'static str) -> Result<T, Status> {
    Err(ModelError::NotImplemented(rpc).into())
}

#[tonic::async_trait]
impl ModelService for ModelServer {
    type TranscribeStream = ResponseStream<pb::TranscribeResponse>;
    type IngestExamplesStream = ResponseStream<pb::IngestAck>;
    type WatchTrainingStream = ResponseStream<pb::TrainingEvent>;

    async fn transcribe(
        &self,
        _: Request<Streaming<pb::TranscribeFramesRequest>>,
    ) -> RpcResult<Self::TranscribeStream> {
        later("Transcribe")
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> RpcResult<pb::ModelInfo> {
        let config = &self.config;
        // Until the model core lands no weights are loaded: the model fields stay empty.
        Ok(Response::new(pb::ModelInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            device: device::describe(self.device),
            weight_precision: self.weight_precision() as i32,
            limits: Some(pb::ModelLimits {
                queue_capacity: config.queue_capacity as u32,
                max_concurrent_streams: config.max_concurrent_streams as u32,
                max_frames_per_window: 3000,
                max_message_bytes: config.max_message_bytes as u64,
                max_audio_seconds: config.max_audio_seconds,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn ingest_examples(
        &self,
        _: Request<Streaming<pb::IngestExamplesRequest>>,
    ) -> RpcResult<Self::IngestExamplesStream> {
        later("IngestExamples")
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> RpcResult<pb::ListDatasetsResponse> {
        later("ListDatasets")
    }

    async fn get_dataset(&self, _: Request<pb::GetDatasetRequest>) -> RpcResult<pb::Dataset> {
        later("GetDataset")
    }

    async fn delete_dataset(
        &self,
        _: Request<pb::DeleteDatasetRequest>,
    ) -> RpcResult<pb::DeleteDatasetResponse> {
        later("DeleteDataset")
    }

    async fn start_training(
        &self,
        _: Request<pb::StartTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        later("StartTraining")
    }

    async fn watch_training(
        &self,
        _: Request<pb::WatchTrainingRequest>,
    ) -> RpcResult<Self::WatchTrainingStream> {
        later("WatchTraining")
    }

    async fn list_training_jobs(
        &self,
        _: Request<pb::ListTrainingJobsRequest>,
    ) -> RpcResult<pb::ListTrainingJobsResponse> {
        later("ListTrainingJobs")
    }

    async fn get_training_job(
        &self,
        _: Request<pb::GetTrainingJobRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        later("GetTrainingJob")
    }

    async fn cancel_training(
        &self,
        _: Request<pb::CancelTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        later("CancelTraining")
    }

    async fn list_adapters(
        &self,
        _: Request<pb::ListAdaptersRequest>,
    ) -> RpcResult<pb::ListAdaptersResponse> {
        later("ListAdapters")
    }

    async fn get_adapter(&self, _: Request<pb::GetAdapterRequest>) -> RpcResult<pb::AdapterInfo> {
        later("GetAdapter")
    }

    async fn load_adapter(&self, _: Request<pb::LoadAdapterRequest>) -> RpcResult<pb::AdapterInfo> {
        later("LoadAdapter")
    }

    async fn unload_adapter(
        &self,
        _: Request<pb::UnloadAdapterRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        later("UnloadAdapter")
    }

    async fn delete_adapter(
        &self,
        _: Request<pb::DeleteAdapterRequest>,
    ) -> RpcResult<pb::DeleteAdapterResponse> {
        later("DeleteAdapter")
    }

    async fn merge_adapters(
        &self,
        _: Request<pb::MergeAdaptersRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        later("MergeAdapters")
    }
}

/// Serves the model service (plus health and reflection) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: ModelServiceConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = std::time::Duration::from_secs_f64(config.drain_seconds);
    let server = ModelServer::new(config)?;
    let router =
        asr_runtime::router_with_health_and_reflection::<ModelServiceServer<ModelServer>>()
            .await?
            .add_service(server.into_service());
    asr_runtime::serve(router, listener, grace, shutdown).await
}
