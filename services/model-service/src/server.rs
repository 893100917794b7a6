//! The ModelService gRPC server, with grpc.health.v1 and server reflection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use asr_proto::v1 as pb;
use asr_whisper::Precision as CorePrecision;
use futures::Stream;
use pb::model_service_server::{ModelService, ModelServiceServer};
use tch::Device;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{ModelServiceConfig, Precision};
use crate::datasets::DatasetStore;
use crate::device;
use crate::engine::{Engine, EngineConfig, EngineState};
use crate::error::ModelError;
use crate::ingest::{Ingesting, LabelChecker};
use crate::options::MAX_BEAM_SIZE;
use crate::registry::{validate_name, Registry};
use crate::training::{Jobs, Runner};
use asr_runtime::metrics::Registry as Metrics;
use asr_runtime::trace_context::request_span;
use tracing::Instrument;

mod adapters_rpc;
mod datasets_rpc;
mod training_rpc;
mod transcribe_rpc;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type RpcResult<T> = Result<Response<T>, Status>;

/// Events buffered per Transcribe stream before the decoder waits for the client.
const EVENTS_BUFFERED: usize = 32;

#[derive(Clone)]
pub struct ModelServer {
    config: Arc<ModelServiceConfig>,
    device: Device,
    engine: Option<Engine>,
    registry: Registry,
    datasets: DatasetStore,
    /// Tokenizer and prompt of the model, to refuse transcripts too long to train on.
    labels: Option<Arc<LabelChecker>>,
    ingesting: Ingesting,
    /// Training jobs (with a model only).
    jobs: Option<Jobs>,
    streams: Arc<Semaphore>,
    /// Prometheus metrics of this service.
    pub metrics: Metrics,
    /// Transcribe streams using each adapter (DeleteAdapter refuses while in use).
    adapter_users: Arc<Mutex<HashMap<String, usize>>>,
    /// Stops training with a checkpoint when the service stops.
    training_suspend: crate::training::SuspendHandle,
}

impl ModelServer {
    pub fn new(config: ModelServiceConfig) -> Result<Self, ModelError> {
        if !(config.drain_seconds.is_finite() && config.drain_seconds >= 0.0) {
            return Err(ModelError::Config(
                "--drain-seconds must be 0 or more".into(),
            ));
        }
        for (value, flag) in [
            (config.queue_capacity, "--queue-capacity"),
            (config.max_concurrent_streams, "--max-concurrent-streams"),
            (config.max_batch_windows, "--max-batch-windows"),
            (config.windows_in_flight, "--windows-in-flight"),
        ] {
            if value == 0 {
                return Err(ModelError::Config(format!("{flag} must be at least 1")));
            }
        }
        let device = device::select(&config.device)?;
        if matches!(config.precision, Precision::Fp16 | Precision::Bf16) && device == Device::Cpu {
            return Err(ModelError::Config(format!(
                "--precision {:?} needs CUDA; this machine runs on the CPU (use int8 or fp32)",
                config.precision
            )));
        }
        tracing::info!(device = %device::describe(device), precision = ?config.precision, "model service device");
        let registry = Registry::open(&config.data_root, &config.import_root())?;
        let metrics = Metrics::default();
        let datasets = DatasetStore::open(&config.data_root)?;
        let labels = match &config.model {
            Some(dir) => Some(Arc::new(LabelChecker::load(dir).map_err(|e| {
                ModelError::Config(format!("reading the tokenizer of {}: {e:#}", dir.display()))
            })?)),
            None => None,
        };
        let engine = config.model.as_ref().map(|dir| {
            Engine::start(EngineConfig {
                model_dir: dir.clone(),
                precision: match config.precision {
                    Precision::Int8 => CorePrecision::Int8,
                    Precision::Fp32 => CorePrecision::Fp32,
                    Precision::Fp16 => CorePrecision::Fp16,
                    Precision::Bf16 => CorePrecision::Bf16,
                },
                device,
                queue_capacity: config.queue_capacity,
                max_batch_windows: config.max_batch_windows,
                max_loaded_adapters: config.max_loaded_adapters,
                metrics: metrics.clone(),
            })
        });
        let training_suspend = crate::training::SuspendHandle::default();
        let jobs = match &config.model {
            Some(dir) => {
                let (jobs, queue) = Jobs::open(&config.data_root, config.max_queued_jobs)?;
                Runner {
                    suspend: training_suspend.clone(),
                    jobs: jobs.clone(),
                    datasets: datasets.clone(),
                    registry: registry.clone(),
                    model_dir: dir.clone(),
                    device,
                    metrics: metrics.clone(),
                }
                .spawn(queue);
                Some(jobs)
            }
            None => None,
        };
        Ok(Self {
            jobs,
            metrics,
            streams: Arc::new(Semaphore::new(config.max_concurrent_streams)),
            config: Arc::new(config),
            device,
            engine,
            registry,
            datasets,
            labels,
            ingesting: Ingesting::default(),
            adapter_users: Arc::default(),
            training_suspend,
        })
    }

    pub fn into_service(self) -> ModelServiceServer<Self> {
        let limit = self.config.max_message_bytes;
        ModelServiceServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    fn count_request<T>(&self, rpc: &'static str, result: &RpcResult<T>) {
        self.metrics
            .count_rpc("asr_model_requests_total", rpc, result);
    }

    /// MergeAdapters' inputs checked against `registry`: (directory, weight) each, and their
    /// common base model. Public for the fuzz targets (`shared/fuzz-targets`).
    pub fn merge_inputs(
        registry: &Registry,
        request: &pb::MergeAdaptersRequest,
    ) -> Result<(Vec<(std::path::PathBuf, f64)>, String), ModelError> {
        if request.adapters.is_empty() {
            return Err(ModelError::invalid(
                "adapters",
                "at least one adapter is needed",
            ));
        }
        validate_name(&request.output_name, "output_name")?;
        if registry.exists(&request.output_name) {
            return Err(ModelError::AlreadyExists {
                what: "adapter",
                name: request.output_name.clone(),
            });
        }
        let mut inputs = Vec::new();
        let mut base_model: Option<String> = None;
        for (i, input) in request.adapters.iter().enumerate() {
            let field = format!("adapters[{i}]");
            validate_name(&input.name, &format!("{field}.name"))?;
            if request.adapters[..i].iter().any(|a| a.name == input.name) {
                return Err(ModelError::invalid(
                    format!("{field}.name"),
                    format!("{:?} is listed twice", input.name),
                ));
            }
            let weight = input.weight.unwrap_or(1.0);
            if !weight.is_finite() {
                return Err(ModelError::invalid(
                    format!("{field}.weight"),
                    format!("{weight} is not finite"),
                ));
            }
            let stored = registry.get(&input.name)?;
            match &base_model {
                Some(base) if *base != stored.info.base_model => {
                    return Err(ModelError::FailedPrecondition(format!(
                        "{:?} was made for {:?}, the first adapter for {base:?}",
                        input.name, stored.info.base_model
                    )))
                }
                Some(_) => {}
                None => base_model = Some(stored.info.base_model.clone()),
            }
            inputs.push((stored.dir, f64::from(weight)));
        }
        Ok((inputs, base_model.unwrap_or_default()))
    }

    /// Gauges sampled when metrics are read.
    fn sample_gauges(&self) {
        if let Some(engine) = &self.engine {
            self.metrics.set(
                "asr_model_queue_depth",
                "Windows waiting for or in the scheduler.",
                vec![],
                engine.queue_depth() as f64,
            );
            self.metrics.set(
                "asr_model_loaded_adapters",
                "Adapters in memory.",
                vec![],
                engine.loaded_adapters().len() as f64,
            );
        }
        self.metrics.set(
            "asr_model_active_streams",
            "Transcribe streams being served.",
            vec![],
            (self.config.max_concurrent_streams - self.streams.available_permits()) as f64,
        );
    }

    /// The scheduler, once a model was configured.
    pub fn engine(&self) -> Result<&Engine, ModelError> {
        self.engine.as_ref().ok_or(ModelError::NoModel)
    }

    fn weight_precision(&self) -> pb::Precision {
        match self.config.precision {
            Precision::Int8 => pb::Precision::Int8,
            Precision::Fp32 => pb::Precision::Fp32,
            Precision::Fp16 => pb::Precision::Fp16,
            Precision::Bf16 => pb::Precision::Bf16,
        }
    }

    fn compute_precision(&self) -> pb::Precision {
        match self.config.precision {
            Precision::Int8 | Precision::Fp32 => pb::Precision::Fp32,
            Precision::Fp16 => pb::Precision::Fp16,
            Precision::Bf16 => pb::Precision::Bf16,
        }
    }

    /// An adapter's registry entry with its `loaded` flag.
    fn adapter_info(&self, name: &str) -> Result<pb::AdapterInfo, ModelError> {
        let mut info = self.registry.get(name)?.info;
        info.loaded = self.engine.as_ref().is_some_and(|e| e.is_loaded(name));
        Ok(info)
    }
}

/// A List request's page size: 0 = 100, at most 1000.
fn page_size(requested: u32) -> usize {
    match requested {
        0 => 100,
        n => n.min(1000) as usize,
    }
}

/// Cuts `items` (fetched one past the page) to `size`; the next page token is the last key
/// kept, or empty on the last page.
fn trim_page<T>(items: &mut Vec<T>, size: usize, key: impl Fn(&T) -> String) -> String {
    if items.len() > size {
        items.truncate(size);
        items.last().map(key).unwrap_or_default()
    } else {
        String::new()
    }
}

#[tonic::async_trait]
impl ModelService for ModelServer {
    type TranscribeStream = ResponseStream<pb::TranscribeResponse>;
    type IngestExamplesStream = ResponseStream<pb::IngestAck>;
    type WatchTrainingStream = ResponseStream<pb::TrainingEvent>;

    async fn transcribe(
        &self,
        request: Request<Streaming<pb::TranscribeFramesRequest>>,
    ) -> RpcResult<Self::TranscribeStream> {
        // A child of the caller's trace (the feature service sends its context).
        let span = request_span(
            tracing::info_span!("Transcribe", remote = ?request.remote_addr()),
            request.metadata(),
        );
        let deadline = asr_runtime::deadline::of(request.metadata());
        let result: RpcResult<Self::TranscribeStream> = async {
            let stream = transcribe_rpc::start(self, request).await?;
            Ok(Response::new(asr_runtime::deadline::until(
                stream, deadline,
            )))
        }
        .instrument(span)
        .await;
        self.count_request("Transcribe", &result);
        result
    }

    async fn get_model_info(
        &self,
        _: Request<pb::GetModelInfoRequest>,
    ) -> RpcResult<pb::ModelInfo> {
        let result: RpcResult<pb::ModelInfo> = async {
            let config = &self.config;
            let mut info = pb::ModelInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
                device: device::describe(self.device),
                weight_precision: self.weight_precision() as i32,
                compute_precision: self.compute_precision() as i32,
                limits: Some(pb::ModelLimits {
                    queue_capacity: config.queue_capacity as u32,
                    max_concurrent_streams: config.max_concurrent_streams as u32,
                    max_frames_per_window: 3000,
                    max_beam_size: MAX_BEAM_SIZE,
                    max_target_positions: 448,
                    max_loaded_adapters: config.max_loaded_adapters as u32,
                    max_message_bytes: config.max_message_bytes as u64,
                    max_audio_seconds: config.max_audio_seconds,
                }),
                ..Default::default()
            };
            // Without a model the service still answers (adapters, datasets); with one that is
            // loading it is UNAVAILABLE.
            if let Some(engine) = &self.engine {
                match engine.state() {
                    EngineState::Ready(model) => {
                        info.model_name = model.name.clone();
                        info.n_mels = model.n_mels as u32;
                        info.vocab_size = model.vocab_size;
                        info.multilingual = model.multilingual;
                        info.languages = model.languages.clone();
                        info.encoder_layers = model.encoder_layers as u32;
                        info.decoder_layers = model.decoder_layers as u32;
                        info.d_model = model.d_model as u32;
                        if let Some(limits) = info.limits.as_mut() {
                            limits.max_target_positions = model.max_target_positions as u32;
                        }
                    }
                    EngineState::Loading => return Err(ModelError::Loading.into()),
                    EngineState::Failed(reason) => {
                        return Err(ModelError::LoadFailed(reason).into())
                    }
                }
            }
            Ok(Response::new(info))
        }
        .await;
        self.count_request("GetModelInfo", &result);
        result
    }

    async fn ingest_examples(
        &self,
        request: Request<Streaming<pb::IngestExamplesRequest>>,
    ) -> RpcResult<Self::IngestExamplesStream> {
        let result = datasets_rpc::ingest_examples(self, request).await;
        self.count_request("IngestExamples", &result);
        result
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> RpcResult<pb::ListDatasetsResponse> {
        let result = datasets_rpc::list_datasets(self, request).await;
        self.count_request("ListDatasets", &result);
        result
    }

    async fn get_dataset(&self, request: Request<pb::GetDatasetRequest>) -> RpcResult<pb::Dataset> {
        let result = datasets_rpc::get_dataset(self, request).await;
        self.count_request("GetDataset", &result);
        result
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> RpcResult<pb::DeleteDatasetResponse> {
        let result = datasets_rpc::delete_dataset(self, request).await;
        self.count_request("DeleteDataset", &result);
        result
    }

    async fn start_training(
        &self,
        request: Request<pb::StartTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        let result = training_rpc::start_training(self, request).await;
        self.count_request("StartTraining", &result);
        result
    }

    async fn watch_training(
        &self,
        request: Request<pb::WatchTrainingRequest>,
    ) -> RpcResult<Self::WatchTrainingStream> {
        let result = training_rpc::watch_training(self, request).await;
        self.count_request("WatchTraining", &result);
        result
    }

    async fn list_training_jobs(
        &self,
        request: Request<pb::ListTrainingJobsRequest>,
    ) -> RpcResult<pb::ListTrainingJobsResponse> {
        let result = training_rpc::list_training_jobs(self, request).await;
        self.count_request("ListTrainingJobs", &result);
        result
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        let result = training_rpc::get_training_job(self, request).await;
        self.count_request("GetTrainingJob", &result);
        result
    }

    async fn cancel_training(
        &self,
        request: Request<pb::CancelTrainingRequest>,
    ) -> RpcResult<pb::TrainingJob> {
        let result = training_rpc::cancel_training(self, request).await;
        self.count_request("CancelTraining", &result);
        result
    }

    async fn list_adapters(
        &self,
        request: Request<pb::ListAdaptersRequest>,
    ) -> RpcResult<pb::ListAdaptersResponse> {
        let result = adapters_rpc::list_adapters(self, request).await;
        self.count_request("ListAdapters", &result);
        result
    }

    async fn get_adapter(
        &self,
        request: Request<pb::GetAdapterRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        let result = adapters_rpc::get_adapter(self, request).await;
        self.count_request("GetAdapter", &result);
        result
    }

    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        let result = adapters_rpc::load_adapter(self, request).await;
        self.count_request("LoadAdapter", &result);
        result
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        let result = adapters_rpc::unload_adapter(self, request).await;
        self.count_request("UnloadAdapter", &result);
        result
    }

    async fn delete_adapter(
        &self,
        request: Request<pb::DeleteAdapterRequest>,
    ) -> RpcResult<pb::DeleteAdapterResponse> {
        let result = adapters_rpc::delete_adapter(self, request).await;
        self.count_request("DeleteAdapter", &result);
        result
    }

    async fn merge_adapters(
        &self,
        request: Request<pb::MergeAdaptersRequest>,
    ) -> RpcResult<pb::AdapterInfo> {
        let result = adapters_rpc::merge_adapters(self, request).await;
        self.count_request("MergeAdapters", &result);
        result
    }
}

/// Serves the model service (plus health and reflection) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: ModelServiceConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = ModelServer::new(config)?;
    serve_server(listener, server, shutdown).await
}

/// [`serve`] with a server built by the caller (who may keep a clone, e.g. to read the
/// scheduler's counters).
pub async fn serve_server(
    listener: TcpListener,
    server: ModelServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = std::time::Duration::from_secs_f64(server.config.drain_seconds);
    if let Some(address) = &server.config.metrics_listen {
        let listener = TcpListener::bind(address).await?;
        tracing::info!(metrics_address = %listener.local_addr()?, "metrics on /metrics");
        let sampler = server.clone();
        tokio::spawn(asr_runtime::metrics::serve_metrics(
            listener,
            server.metrics.clone(),
            Arc::new(move |_| sampler.sample_gauges()),
        ));
    }
    let suspend = server.training_suspend.clone();
    let (router, health) = asr_runtime::router_with_health_and_reflection::<
        ModelServiceServer<ModelServer>,
    >(&server.config.security, crate::access::policy())
    .await?;
    // Serving once the base model is loaded; a model that failed to load stays NOT_SERVING
    // (without --model the registry and datasets serve from the start).
    if let Some(engine) = server.engine.clone().filter(|e| e.ready().is_err()) {
        health.set_serving(false).await;
        let health = health.clone();
        tokio::spawn(async move {
            health.set_serving(engine.wait_ready().await.is_ok()).await;
        });
    }
    let router = router.add_service(server.into_service());
    // Training checkpoints while the transcriptions drain.
    let signal = {
        let suspend = suspend.clone();
        let shutdown = health.not_serving_after(shutdown);
        async move {
            shutdown.await;
            suspend.suspend();
        }
    };
    let served = asr_runtime::serve(router, listener, grace, signal).await;
    if suspend.is_suspended() {
        let saved = tokio::task::spawn_blocking(move || suspend.wait_idle(grace))
            .await
            .unwrap_or(false);
        if saved {
            tracing::info!("training stopped; a running job kept a checkpoint and stays queued");
        } else {
            tracing::warn!(
                grace_seconds = grace.as_secs_f64(),
                "training did not stop within the drain deadline"
            );
        }
    }
    served
}
