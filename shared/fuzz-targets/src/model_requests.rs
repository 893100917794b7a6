//! ModelService requests: the bytes decoded as each request message, then every
//! proto -> domain conversion the service runs on it before it needs its model or its stores.
//!
//! Not covered, because they need a loaded model or a live stream: the checks of a
//! Transcribe stream's `frames` messages (they depend on the frames already received) and
//! of an IngestExamples `example` past its split (they run inside the on-disk dataset
//! appender), and the job lookups of Watch/Get/CancelTraining (the job store).

use std::sync::OnceLock;

use asr_proto::v1 as pb;
use model_service::engine::ModelDescription;
use model_service::ingest::check_config;
use model_service::options::{ModelFacts, StreamOptions};
use model_service::registry::{validate_name, Registry};
use model_service::training::spec::JobSpec;
use model_service::{ModelError, ModelServer};
use prost::Message;

/// whisper-base's vocabulary size (the multilingual models').
const VOCAB_SIZE: u32 = 51_865;

/// A model as ModelInfo would describe it: what the checks that depend on the model see.
fn model() -> &'static ModelDescription {
    static MODEL: OnceLock<ModelDescription> = OnceLock::new();
    MODEL.get_or_init(|| ModelDescription {
        name: "whisper-base".into(),
        n_mels: 80,
        vocab_size: VOCAB_SIZE,
        multilingual: true,
        languages: ["en", "zh", "de", "es", "ru", "ko", "fr", "ja", "yue"]
            .map(String::from)
            .to_vec(),
        encoder_layers: 6,
        decoder_layers: 6,
        d_model: 512,
        max_target_positions: 448,
        weight_bytes: 0,
    })
}

/// An empty adapter registry (and import root) in the temp folder, shared by every run of
/// the process: lookups in it answer NOT_FOUND after the request's own checks.
fn registry() -> Option<&'static Registry> {
    static REGISTRY: OnceLock<Option<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let root = std::env::temp_dir().join("asr-fuzz-empty-registry");
            Registry::open(&root, &root.join("imports")).ok()
        })
        .as_ref()
}

pub fn model_requests(data: &[u8]) {
    transcribe_frames(data);
    if let Ok(request) = pb::StartTrainingRequest::decode(data) {
        if let Ok(spec) = checked(JobSpec::from_request(&request)) {
            let _ = checked(spec.mixed_precision(tch::Device::Cpu));
        }
    }
    if let Ok(request) = pb::IngestExamplesRequest::decode(data) {
        use pb::ingest_examples_request::Payload;
        match request.payload {
            Some(Payload::Config(config)) => {
                let _ = checked(check_config(&config, model()));
            }
            Some(Payload::Example(example)) if !example.split.is_empty() => {
                let _ = checked(validate_name(&example.split, "example.split"));
            }
            _ => {}
        }
    }
    adapters(data);
    names(data);
}

/// TranscribeFramesRequest's config: n_mels and the options, as `start_transcribe` checks
/// them against the model.
fn transcribe_frames(data: &[u8]) {
    let Ok(request) = pb::TranscribeFramesRequest::decode(data) else {
        return;
    };
    let Some(pb::transcribe_frames_request::Payload::Config(config)) = request.payload else {
        return;
    };
    let model = model();
    let facts = ModelFacts {
        languages: &model.languages,
        vocab_size: model.vocab_size,
    };
    if let Ok(options) = checked(StreamOptions::from_proto(config.options, &facts)) {
        let fallback = &options.decode.fallback;
        assert!(!fallback.temperatures.is_empty());
        assert!((1..=16).contains(&options.decode.beam_size));
    }
}

/// MergeAdapters and LoadAdapter against the empty registry.
fn adapters(data: &[u8]) {
    let Some(registry) = registry() else {
        return;
    };
    if let Ok(request) = pb::MergeAdaptersRequest::decode(data) {
        let _ = checked(ModelServer::merge_inputs(registry, &request));
    }
    if let Ok(request) = pb::LoadAdapterRequest::decode(data) {
        if checked(validate_name(&request.name, "name")).is_ok() && !request.source_dir.is_empty() {
            let _ = checked(registry.import(&request.name, &request.source_dir));
        }
    }
}

/// Requests that carry only a registry name (or a page token, checked the same way).
fn names(data: &[u8]) {
    let mut names = Vec::new();
    if let Ok(r) = pb::GetAdapterRequest::decode(data) {
        names.push(r.name);
    }
    if let Ok(r) = pb::UnloadAdapterRequest::decode(data) {
        names.push(r.name);
    }
    if let Ok(r) = pb::DeleteAdapterRequest::decode(data) {
        names.push(r.name);
    }
    if let Ok(r) = pb::GetDatasetRequest::decode(data) {
        names.push(r.name);
    }
    if let Ok(r) = pb::DeleteDatasetRequest::decode(data) {
        names.push(r.name);
    }
    if let Ok(r) = pb::ListAdaptersRequest::decode(data) {
        names.push(r.page_token);
    }
    if let Ok(r) = pb::ListDatasetsRequest::decode(data) {
        names.push(r.page_token);
    }
    for name in names {
        if checked(validate_name(&name, "name")).is_ok() {
            assert!(!name.contains(['/', '\\', '\0']) && !name.starts_with('.'));
        }
    }
    let _ = pb::GetModelInfoRequest::decode(data);
    let _ = pb::WatchTrainingRequest::decode(data);
    let _ = pb::ListTrainingJobsRequest::decode(data);
    let _ = pb::GetTrainingJobRequest::decode(data);
    let _ = pb::CancelTrainingRequest::decode(data);
}

/// Errors also go through their mapping to a gRPC status, as the service sends them.
fn checked<T>(result: Result<T, ModelError>) -> Result<T, ()> {
    result.map_err(|err| {
        let _ = tonic::Status::from(err);
    })
}
