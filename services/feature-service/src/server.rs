//! The FeatureService gRPC server, with grpc.health.v1 and server reflection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use asr_audio::{FeaturePipeline, MelConfig, PipelineConfig};
use asr_proto::v1 as pb;
use futures::Stream;
use pb::feature_service_server::{FeatureService, FeatureServiceServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::config::FeatureServiceConfig;
use crate::convert::ExtractSpec;
use crate::error::FeatureError;
use crate::model_link::ModelLink;
use crate::reader::AbortSlot;
use crate::trace_context::request_span;
use crate::{extract, inbound, ingest_relay, relay};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service implementation; cheap to clone.
#[derive(Clone)]
pub struct FeatureServer {
    config: Arc<FeatureServiceConfig>,
    streams: Arc<Semaphore>,
    /// One pipeline (and mel filter bank) per supported mel count.
    pipelines: Arc<[(usize, FeaturePipeline); 2]>,
    /// The model service Transcribe relays to (`--model-service`), if any.
    model: Option<ModelLink>,
    /// Prometheus metrics of this replica.
    pub metrics: asr_runtime::metrics::Registry,
}

impl FeatureServer {
    /// Must run inside a Tokio runtime when a model service is configured (its lazily
    /// connecting channel spawns a task).
    pub fn new(config: FeatureServiceConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let model = config
            .model_service
            .as_deref()
            .map(|address| ModelLink::new(address, &config))
            .transpose()?;
        let pipeline = |n_mels: u32| -> anyhow::Result<(usize, FeaturePipeline)> {
            let mel = MelConfig::new(n_mels)?;
            let config = PipelineConfig {
                mel,
                max_audio_seconds: config.max_audio_seconds,
            };
            Ok((mel.n_mels, FeaturePipeline::new(config)))
        };
        Ok(Self {
            metrics: asr_runtime::metrics::Registry::default(),
            streams: Arc::new(Semaphore::new(config.max_concurrent_streams)),
            pipelines: Arc::new([pipeline(80)?, pipeline(128)?]),
            config: Arc::new(config),
            model,
        })
    }

    pub(crate) fn config(&self) -> &FeatureServiceConfig {
        &self.config
    }

    pub(crate) fn model_link(&self) -> Option<&ModelLink> {
        self.model.as_ref()
    }

    fn acquire_stream(&self) -> Result<OwnedSemaphorePermit, FeatureError> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| FeatureError::TooManyStreams {
                limit: self.config.max_concurrent_streams,
            })
    }

    /// Extract: validates the config, then runs the pipeline on a blocking thread.
    async fn start_extract(
        &self,
        request: Request<Streaming<pb::ExtractRequest>>,
    ) -> Result<Response<ResponseStream<pb::ExtractResponse>>, Status> {
        let permit = self.acquire_stream()?;
        let deadline = asr_runtime::deadline::of(request.metadata());
        let mut audio = request.into_inner();
        let config = inbound::read_config(&mut audio).await?;
        let spec = ExtractSpec::from_proto(config, &self.config)?;
        tracing::debug!(?spec, "extract started");
        let (chunks_tx, chunks_rx) = inbound::channel();
        let abort = AbortSlot::default();
        tokio::spawn(
            inbound::forward_audio(audio, chunks_tx, spec.layout, abort.clone()).in_current_span(),
        );
        let (responses_tx, responses_rx) = mpsc::channel(extract::OUTBOUND_MESSAGES);
        let pipeline = self.pipeline(spec.mel);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            extract::run_pipeline(pipeline, spec, chunks_rx, abort, responses_tx, permit);
        });
        Ok(Response::new(asr_runtime::deadline::until(
            Box::pin(ReceiverStream::new(responses_rx)),
            deadline,
        )))
    }

    pub(crate) fn pipeline(&self, mel: MelConfig) -> FeaturePipeline {
        let (_, pipeline) = self
            .pipelines
            .iter()
            .find(|(n, _)| *n == mel.n_mels)
            .unwrap_or(&self.pipelines[0]);
        pipeline.clone()
    }

    /// The tonic service, with this replica's message size limit.
    pub fn into_service(self) -> FeatureServiceServer<Self> {
        let limit = self.config.max_message_bytes;
        FeatureServiceServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

impl FeatureServer {
    fn count_request<T>(&self, rpc: &'static str, result: &Result<T, Status>) {
        self.metrics
            .count_rpc("asr_feature_requests_total", rpc, result);
    }

    /// Gauges sampled when metrics are read.
    fn sample_gauges(&self) {
        self.metrics.set(
            "asr_feature_active_streams",
            "Streams being served by this replica.",
            vec![],
            (self.config.max_concurrent_streams - self.streams.available_permits()) as f64,
        );
    }
}

#[tonic::async_trait]
impl FeatureService for FeatureServer {
    type ExtractStream = ResponseStream<pb::ExtractResponse>;
    type TranscribeStream = ResponseStream<pb::TranscribeResponse>;

    async fn extract(
        &self,
        request: Request<Streaming<pb::ExtractRequest>>,
    ) -> Result<Response<Self::ExtractStream>, Status> {
        let span = request_span(
            tracing::info_span!("Extract", remote = ?request.remote_addr()),
            request.metadata(),
        );
        let result = self.start_extract(request).instrument(span).await;
        self.count_request("Extract", &result);
        result
    }

    async fn transcribe(
        &self,
        request: Request<Streaming<pb::TranscribeAudioRequest>>,
    ) -> Result<Response<Self::TranscribeStream>, Status> {
        let span = request_span(
            tracing::info_span!("Transcribe", remote = ?request.remote_addr()),
            request.metadata(),
        );
        let deadline = asr_runtime::deadline::of(request.metadata());
        let responses = async {
            let permit = self.acquire_stream()?;
            relay::start(self, permit, request, deadline).await
        }
        .instrument(span)
        .await
        .map_err(Status::from);
        self.count_request("Transcribe", &responses);
        let stream: Self::TranscribeStream =
            asr_runtime::deadline::until(Box::pin(ReceiverStream::new(responses?)), deadline);
        Ok(Response::new(stream))
    }

    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestAudioRequest>>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let span = request_span(
            tracing::info_span!("Ingest", remote = ?request.remote_addr()),
            request.metadata(),
        );
        let response = async {
            let _permit = self.acquire_stream()?;
            ingest_relay::ingest(self, request)
                .await
                .inspect_err(|err| tracing::info!(error = %err, "ingest failed"))
        }
        .instrument(span)
        .await
        .map_err(Status::from);
        self.count_request("Ingest", &response);
        let response = response?;
        self.metrics.add(
            "asr_feature_ingested_audio_seconds_total",
            "Audio of examples stored through Ingest, seconds.",
            vec![],
            response.accepted_audio_seconds,
        );
        Ok(Response::new(response))
    }

    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::FeatureServiceInfo>, Status> {
        let config = &self.config;
        Ok(Response::new(pb::FeatureServiceInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            model_service_address: config.model_service.clone().unwrap_or_default(),
            supported_containers: [
                pb::Container::Wav,
                pb::Container::Flac,
                pb::Container::Mp3,
                pb::Container::Ogg,
                pb::Container::Mp4,
                pb::Container::Mkv,
                pb::Container::Aiff,
            ]
            .into_iter()
            .map(|c| c as i32)
            .collect(),
            supported_sample_formats: vec![
                pb::SampleFormat::S16le as i32,
                pb::SampleFormat::F32le as i32,
            ],
            supported_n_mels: vec![80, 128],
            limits: Some(pb::FeatureLimits {
                max_audio_seconds: config.max_audio_seconds,
                max_message_bytes: config.max_message_bytes as u64,
                default_frames_per_message: config.default_frames_per_message as u32,
                max_concurrent_streams: config.max_concurrent_streams as u32,
            }),
        }))
    }
}

/// Serves the feature service (plus health and reflection) on `listener` until `shutdown`
/// completes; in-flight streams are allowed to finish.
pub async fn serve(
    listener: TcpListener,
    config: FeatureServiceConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = std::time::Duration::from_secs_f64(config.drain_seconds);
    let server = FeatureServer::new(config)?;
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
    let (router, health) = asr_runtime::router_with_health_and_reflection::<
        FeatureServiceServer<FeatureServer>,
    >(&server.config.security, crate::access::policy())
    .await?;
    let router = router.add_service(server.into_service());
    asr_runtime::serve(router, listener, grace, health.not_serving_after(shutdown)).await
}
