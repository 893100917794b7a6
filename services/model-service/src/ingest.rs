//! ModelService.IngestExamples: a config, then examples as features; each example is stored
//! durably (or rejected, which does not end the stream) and acknowledged in order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use asr_proto::v1 as pb;
use asr_whisper::{GenerationConfig, Task, WhisperTokenizer};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::datasets::{Appender, Dataset, DatasetStore, Rejection};
use crate::engine::ModelDescription;
use crate::error::ModelError;
use crate::registry::validate_name;

/// Tokenises transcripts to refuse those that do not fit the decoder with the prompt.
pub struct LabelChecker {
    pub tokenizer: WhisperTokenizer,
    pub generation: GenerationConfig,
}

impl LabelChecker {
    pub fn load(model_dir: &std::path::Path) -> anyhow::Result<Self> {
        let generation = GenerationConfig::from_file(&model_dir.join("generation_config.json"))?;
        let tokenizer = WhisperTokenizer::from_file(
            &model_dir.join("tokenizer.json"),
            generation.eos_token_id,
        )?;
        Ok(Self {
            tokenizer,
            generation,
        })
    }

    fn check(&self, text: &str, language: Option<&str>) -> Result<(), Rejection> {
        let too_long = |message: String| Rejection {
            reason: pb::RejectionReason::TextTooLong,
            message,
        };
        let prompt = self
            .generation
            .prompt(language, Task::Transcribe, false)
            .map_err(|e| too_long(format!("{e:#}")))?;
        let text_tokens = self
            .tokenizer
            .encode(text)
            .map_err(|e| too_long(format!("{e:#}")))?;
        let total = prompt.len() + text_tokens.len() + 1;
        if total > self.generation.max_length {
            return Err(too_long(format!(
                "{total} label tokens with the prompt; the decoder holds {}",
                self.generation.max_length
            )));
        }
        Ok(())
    }
}

/// Datasets with an ingestion in progress (one writer each; deletion waits).
pub type Ingesting = Arc<Mutex<HashSet<String>>>;

/// Marks a dataset as being ingested until dropped.
pub struct IngestGuard {
    ingesting: Ingesting,
    name: String,
}

impl IngestGuard {
    fn acquire(ingesting: &Ingesting, name: &str) -> Result<Self, ModelError> {
        let mut set = ingesting.lock().map_err(ModelError::internal)?;
        if !set.insert(name.to_string()) {
            return Err(ModelError::FailedPrecondition(format!(
                "dataset {name:?} is being ingested by another stream"
            )));
        }
        Ok(Self {
            ingesting: ingesting.clone(),
            name: name.to_string(),
        })
    }
}

impl Drop for IngestGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.ingesting.lock() {
            set.remove(&self.name);
        }
    }
}

pub struct IngestContext {
    pub store: DatasetStore,
    pub model: Arc<ModelDescription>,
    pub labels: Arc<LabelChecker>,
    pub ingesting: Ingesting,
}

/// Validates the config, opens or creates the dataset, and returns the appender with the
/// default split; errors here fail the RPC before any example is read.
pub async fn open(
    context: &IngestContext,
    inbound: &mut Streaming<pb::IngestExamplesRequest>,
) -> Result<(Appender, String, IngestGuard), ModelError> {
    let config = match inbound.message().await.map_err(ModelError::ClientStream)? {
        Some(pb::IngestExamplesRequest {
            payload: Some(pb::ingest_examples_request::Payload::Config(config)),
        }) => config,
        Some(_) => return Err(ModelError::ConfigNotFirst),
        None => return Err(ModelError::MissingConfig),
    };
    validate_name(&config.dataset, "config.dataset")?;
    let n_mels = if config.n_mels == 0 {
        80
    } else {
        config.n_mels as usize
    };
    if n_mels != context.model.n_mels {
        return Err(ModelError::invalid(
            "config.n_mels",
            format!(
                "{n_mels}: this model takes {} mel bins",
                context.model.n_mels
            ),
        ));
    }
    let split = if config.split.is_empty() {
        "train".to_string()
    } else {
        config.split.clone()
    };
    validate_name(&split, "config.split")?;
    if !config.language.is_empty() && !context.model.languages.contains(&config.language) {
        return Err(ModelError::invalid(
            "config.language",
            format!("{:?} is not a language this model knows", config.language),
        ));
    }
    let guard = IngestGuard::acquire(&context.ingesting, &config.dataset)?;
    let mode = pb::IngestMode::try_from(config.mode).unwrap_or(pb::IngestMode::Unspecified);
    let store = context.store.clone();
    let name = config.dataset.clone();
    let exists = store.exists(&name);
    let dataset: Dataset = match (mode, exists) {
        (pb::IngestMode::Unspecified | pb::IngestMode::Create, true) => {
            return Err(ModelError::AlreadyExists {
                what: "dataset",
                name,
            })
        }
        (pb::IngestMode::Append, false) => {
            return Err(ModelError::NotFound {
                what: "dataset",
                name,
            })
        }
        (_, false) => store.create(&name, n_mels, &config.language, &config.description)?,
        (_, true) => {
            let mut dataset = store.get(&name)?;
            if dataset.meta.n_mels != n_mels {
                return Err(ModelError::FailedPrecondition(format!(
                    "dataset {name:?} holds {}-mel features, not {n_mels}",
                    dataset.meta.n_mels
                )));
            }
            if !config.language.is_empty()
                && !dataset.meta.language.is_empty()
                && dataset.meta.language != config.language
            {
                return Err(ModelError::FailedPrecondition(format!(
                    "dataset {name:?} is in {:?}, not {:?}",
                    dataset.meta.language, config.language
                )));
            }
            let mut changed = false;
            if dataset.meta.language.is_empty() && !config.language.is_empty() {
                dataset.meta.language = config.language.clone();
                changed = true;
            }
            if !config.description.is_empty() {
                dataset.meta.description = config.description.clone();
                changed = true;
            }
            if changed {
                store.update_meta(&dataset)?;
            }
            dataset
        }
    };
    let appender = tokio::task::spawn_blocking(move || Appender::new(dataset))
        .await
        .map_err(ModelError::internal)??;
    Ok((appender, split, guard))
}

/// Stores the stream's examples, one ack each, in order.
pub async fn run(
    labels: Arc<LabelChecker>,
    mut appender: Appender,
    default_split: String,
    guard: IngestGuard,
    mut inbound: Streaming<pb::IngestExamplesRequest>,
    acks: mpsc::Sender<Result<pb::IngestAck, Status>>,
) {
    let _guard = guard;
    let language = Some(appender.dataset.meta.language.clone()).filter(|l| !l.is_empty());
    loop {
        let example = match inbound.message().await {
            Ok(Some(pb::IngestExamplesRequest {
                payload: Some(pb::ingest_examples_request::Payload::Example(example)),
            })) => example,
            Ok(Some(_)) => {
                let _ = acks.send(Err(ModelError::DuplicateConfig.into())).await;
                break;
            }
            Ok(None) => break,
            Err(status) => {
                let _ = acks
                    .send(Err(ModelError::ClientStream(status).into()))
                    .await;
                break;
            }
        };
        let split = if example.split.is_empty() {
            default_split.clone()
        } else {
            example.split.clone()
        };
        let id = example.id.clone();
        let ack = if let Err(e) = validate_name(&split, "example.split") {
            pb::IngestAck {
                example_id: id,
                status: pb::ExampleStatus::Rejected as i32,
                rejection: pb::RejectionReason::Unspecified as i32,
                message: e.to_string(),
                ..Default::default()
            }
        } else {
            let labels = labels.clone();
            let language = language.clone();
            let split_for_store = split.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let result = appender.append(example, &split_for_store, |text| {
                    labels.check(text, language.as_deref())
                });
                (appender, result)
            })
            .await;
            let result;
            (appender, result) = match joined {
                Ok(pair) => pair,
                Err(e) => {
                    let _ = acks.send(Err(ModelError::internal(e).into())).await;
                    return;
                }
            };
            match result {
                Ok(Ok(stored)) => pb::IngestAck {
                    example_id: id,
                    status: pb::ExampleStatus::Accepted as i32,
                    index: stored.index,
                    split,
                    ..Default::default()
                },
                Ok(Err(rejection)) => pb::IngestAck {
                    example_id: id,
                    status: pb::ExampleStatus::Rejected as i32,
                    rejection: rejection.reason as i32,
                    message: rejection.message,
                    split,
                    ..Default::default()
                },
                Err(e) => {
                    // The store failed: what was acknowledged stays; this stream ends.
                    let _ = acks.send(Err(e.into())).await;
                    return;
                }
            }
        };
        if acks.send(Ok(ack)).await.is_err() {
            break;
        }
    }
    if let Err(e) = tokio::task::spawn_blocking(move || appender.finish()).await {
        tracing::warn!(error = %e, "recording the dataset's update time");
    }
}
