//! The Transcribe RPC's start: the stream's config checked (mel bins, options, adapter) and
//! its decoding task spawned.

use std::time::Instant;

use asr_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};
use tracing::Instrument;

use super::{ModelServer, ResponseStream, EVENTS_BUFFERED};
use crate::error::ModelError;
use crate::options::{check_n_mels, ModelFacts, StreamOptions};
use crate::transcribe::{self, AdapterUse, StreamContext};

/// Opens a Transcribe stream: reads the config message, validates it, and starts decoding.
pub(super) async fn start(
    server: &ModelServer,
    request: Request<Streaming<pb::TranscribeFramesRequest>>,
) -> Result<ResponseStream<pb::TranscribeResponse>, ModelError> {
    let started = Instant::now();
    let engine = server.engine()?.clone();
    let model = engine.ready()?;
    let permit =
        server
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ModelError::LimitReached {
                limit: "max_concurrent_streams",
                value: server.config.max_concurrent_streams.to_string(),
                hint: "too many Transcribe streams; retry later",
            })?;
    let mut inbound = request.into_inner();
    let config = match inbound.message().await.map_err(ModelError::ClientStream)? {
        Some(pb::TranscribeFramesRequest {
            payload: Some(pb::transcribe_frames_request::Payload::Config(config)),
        }) => config,
        Some(_) => return Err(ModelError::ConfigNotFirst),
        None => return Err(ModelError::MissingConfig),
    };
    check_n_mels(config.n_mels, model.n_mels)?;
    let options = StreamOptions::from_proto(
        config.options,
        &ModelFacts {
            languages: &model.languages,
            vocab_size: model.vocab_size,
        },
    )?;
    let adapter_use = match &options.adapter {
        Some(choice) => {
            // A bad reference in the request, not the resource the RPC acts on: the
            // field is named, as for any other option.
            if !server.registry.exists(&choice.name) {
                return Err(ModelError::invalid(
                    "config.options.adapter",
                    format!("{:?} is not in the registry (ListAdapters)", choice.name),
                ));
            }
            if !engine.is_loaded(&choice.name) {
                return Err(ModelError::FailedPrecondition(format!(
                    "adapter {:?} is not loaded (LoadAdapter first)",
                    choice.name
                )));
            }
            Some(AdapterUse::new(server.adapter_users.clone(), &choice.name))
        }
        None => None,
    };
    let context = StreamContext {
        engine,
        model,
        options,
        precision: server.weight_precision(),
        max_audio_seconds: server.config.max_audio_seconds,
        windows_in_flight: server.config.windows_in_flight,
        started,
        metrics: server.metrics.clone(),
        _permit: permit,
        _adapter_use: adapter_use,
    };
    let (events, responses) = mpsc::channel(EVENTS_BUFFERED);
    tokio::spawn(transcribe::run(context, inbound, events).in_current_span());
    Ok(Box::pin(ReceiverStream::new(responses)))
}
