//! The feature service's link to the model service: one lazily connecting channel shared by
//! every stream, the model's mel count, and how model-service failures are reported.
//!
//! tonic reconnects a lazy channel on the next call after its connection broke, so a model
//! service that restarts is picked up without restarting this one. A call that finds the
//! model service unavailable is retried with exponential backoff for
//! `--model-service-retry-seconds`, then fails with UNAVAILABLE.

use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use asr_proto::v1 as pb;
use asr_runtime::{AuthChannel, ClientSecurity, ClientSecurityConfig};
use futures::Stream;
use pb::model_service_client::ModelServiceClient;
use tokio::time::Instant;
use tonic::{Code, Request, Status, Streaming};

use crate::config::FeatureServiceConfig;
use crate::error::FeatureError;
use crate::trace_context;

/// First pause between attempts; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Cheap to clone; clones share the channel and the cached model facts.
#[derive(Clone)]
pub struct ModelLink {
    address: Arc<str>,
    channel: AuthChannel,
    /// The model's mel count, asked once per connection: forgotten when the model service
    /// becomes unavailable (it may come back with another model).
    n_mels: Arc<Mutex<Option<u32>>>,
    call_timeout: Duration,
    retry: Duration,
    max_message_bytes: usize,
}

impl ModelLink {
    /// A link to `address` (e.g. `http://127.0.0.1:50052`); nothing is connected until the
    /// first call. Must run inside a Tokio runtime (the channel spawns its worker).
    pub fn new(address: &str, config: &FeatureServiceConfig) -> anyhow::Result<Self> {
        let connect_timeout = Duration::from_secs_f64(config.model_service_connect_seconds);
        let security = ClientSecurity::new(&ClientSecurityConfig {
            tls_ca: config.model_service_tls_ca.clone(),
            tls_cert: config.model_service_tls_cert.clone(),
            tls_key: config.model_service_tls_key.clone(),
            tls_domain: None,
            token_file: config.model_service_token_file.clone(),
            token: config.model_service_token.clone(),
        })
        .context("the model service's TLS and token settings")?;
        let endpoint = security
            .endpoint(address)
            .context("--model-service")?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(Self {
            address: address.into(),
            channel: security.authorize(endpoint.connect_lazy()),
            n_mels: Arc::default(),
            call_timeout: connect_timeout,
            retry: Duration::from_secs_f64(config.model_service_retry_seconds),
            max_message_bytes: config.max_message_bytes,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn client(&self) -> ModelServiceClient<AuthChannel> {
        ModelServiceClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// Mel bins of the model's frames (ModelInfo.n_mels; 0 means 80), asked once and cached.
    pub async fn n_mels(&self) -> Result<u32, FeatureError> {
        if let Some(n_mels) = self.cached_n_mels() {
            return Ok(n_mels);
        }
        let info = self.model_info().await?;
        let n_mels = if info.n_mels == 0 { 80 } else { info.n_mels };
        if !matches!(n_mels, 80 | 128) {
            return Err(FeatureError::UnsupportedModelMels {
                address: self.address.to_string(),
                n_mels,
            });
        }
        if let Ok(mut cached) = self.n_mels.lock() {
            *cached = Some(n_mels);
        }
        Ok(n_mels)
    }

    fn cached_n_mels(&self) -> Option<u32> {
        self.n_mels.lock().ok().and_then(|cached| *cached)
    }

    fn forget_model(&self) {
        if let Ok(mut cached) = self.n_mels.lock() {
            *cached = None;
        }
    }

    /// GetModelInfo, retried with backoff while the model service is unavailable.
    async fn model_info(&self) -> Result<pb::ModelInfo, FeatureError> {
        let deadline = Instant::now() + self.retry;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut request = Request::new(pb::GetModelInfoRequest {});
            trace_context::inject_current(request.metadata_mut());
            let mut client = self.client();
            let status =
                match tokio::time::timeout(self.call_timeout, client.get_model_info(request)).await
                {
                    Ok(Ok(info)) => return Ok(info.into_inner()),
                    Ok(Err(status)) => status,
                    Err(_) => Status::unavailable(format!(
                        "GetModelInfo got no answer within {:.1} s",
                        self.call_timeout.as_secs_f64()
                    )),
                };
            if status.code() != Code::Unavailable || Instant::now() + backoff > deadline {
                return Err(self.error(status));
            }
            tracing::debug!(address = %self.address, error = %describe(&status), ?backoff, "model service unavailable; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Opens ModelService.Transcribe with `requests` (and the caller's metadata, e.g. a
    /// cancellation handle and the trace context); resolves when the model service answers
    /// with its response headers.
    pub async fn transcribe<S>(
        &self,
        requests: Request<S>,
    ) -> Result<Streaming<pb::TranscribeResponse>, FeatureError>
    where
        S: Stream<Item = pb::TranscribeFramesRequest> + Send + 'static,
    {
        self.client()
            .transcribe(requests)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.error(status))
    }

    /// Opens ModelService.IngestExamples with `requests` (config first); resolves when the
    /// model service has opened the dataset and answers with its response headers, so
    /// NOT_FOUND / ALREADY_EXISTS / FAILED_PRECONDITION come back here.
    pub async fn ingest_examples<S>(
        &self,
        requests: Request<S>,
    ) -> Result<Streaming<pb::IngestAck>, FeatureError>
    where
        S: Stream<Item = pb::IngestExamplesRequest> + Send + 'static,
    {
        self.client()
            .ingest_examples(requests)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.error(status))
    }

    /// ModelService.GetDataset.
    pub async fn get_dataset(&self, name: &str) -> Result<pb::Dataset, FeatureError> {
        let mut request = Request::new(pb::GetDatasetRequest {
            name: name.to_string(),
        });
        trace_context::inject_current(request.metadata_mut());
        match tokio::time::timeout(self.call_timeout, self.client().get_dataset(request)).await {
            Ok(Ok(dataset)) => Ok(dataset.into_inner()),
            Ok(Err(status)) => Err(self.error(status)),
            Err(_) => Err(FeatureError::ModelServiceUnavailable {
                address: self.address.to_string(),
                reason: format!(
                    "GetDataset got no answer within {:.1} s",
                    self.call_timeout.as_secs_f64()
                ),
            }),
        }
    }

    /// A failed model-service call as this service reports it. A status the model service
    /// sent is relayed unchanged; one made on this side by the transport (no connection,
    /// connection lost) becomes UNAVAILABLE naming the address.
    pub fn error(&self, status: Status) -> FeatureError {
        // tonic attaches the underlying error as the source of statuses it makes itself;
        // statuses decoded from the peer's trailers have none.
        let local = status.source().is_some();
        if local || status.code() == Code::Unavailable {
            self.forget_model();
        }
        if local {
            FeatureError::ModelServiceUnavailable {
                address: self.address.to_string(),
                reason: describe(&status),
            }
        } else if matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied
        ) {
            tracing::error!(address = %self.address, reason = status.message(), "the model service refused this service's credentials");
            FeatureError::ModelServiceRefusedCredentials {
                address: self.address.to_string(),
                reason: status.message().to_string(),
            }
        } else {
            FeatureError::ModelService(status)
        }
    }
}

/// A status's message followed by its chain of causes, without repeats.
fn describe(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = status.source();
    while let Some(err) = source {
        let cause = err.to_string();
        if !cause.is_empty() && !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = err.source();
    }
    text
}
