//! ModelService.IngestExamples: a config, then examples as features; each example is stored
//! durably (or rejected, which does not end the stream) and acknowledged in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use asr_proto::v1 as pb;
use asr_whisper::{GenerationConfig, Task, WhisperTokenizer};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::datasets::{Appender, Dataset, DatasetStore, Rejection};
use crate::engine::ModelDescription;
use crate::error::ModelError;
use crate::options::check_n_mels;
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

/// One appender per dataset, shared by the streams ingesting into it at the same time (each
/// append takes its lock, so indices stay dense and the log stays whole).
type SharedAppender = Arc<Mutex<Appender>>;

/// Datasets with an ingestion in progress, with their appender and number of streams.
#[derive(Clone, Default)]
pub struct Ingesting(Arc<Mutex<HashMap<String, (SharedAppender, usize)>>>);

impl Ingesting {
    pub fn is_active(&self, dataset: &str) -> bool {
        self.0.lock().is_ok_and(|t| t.contains_key(dataset))
    }

    /// The dataset's appender for one more stream: the live one, or the dataset opened (or
    /// created) as `open` says. Runs under the table's lock, so two streams never open the
    /// same dataset twice.
    fn join(
        &self,
        name: &str,
        open: impl FnOnce(Option<&mut Appender>) -> Result<Option<Appender>, ModelError>,
    ) -> Result<IngestGuard, ModelError> {
        let mut table = self.0.lock().map_err(ModelError::internal)?;
        let appender = match table.get_mut(name) {
            Some((shared, users)) => {
                let mut live = shared.lock().map_err(ModelError::internal)?;
                open(Some(&mut live))?;
                drop(live);
                *users += 1;
                shared.clone()
            }
            None => {
                let appender =
                    open(None)?.ok_or_else(|| ModelError::Internal("no appender opened".into()))?;
                let shared = Arc::new(Mutex::new(appender));
                table.insert(name.to_string(), (shared.clone(), 1));
                shared
            }
        };
        Ok(IngestGuard {
            table: self.clone(),
            name: name.to_string(),
            appender,
        })
    }

    fn leave(&self, name: &str) {
        let Ok(mut table) = self.0.lock() else {
            return;
        };
        let last = match table.get_mut(name) {
            Some((_, users)) => {
                *users -= 1;
                *users == 0
            }
            None => false,
        };
        if last {
            if let Some((shared, _)) = table.remove(name) {
                if let Ok(mut appender) = shared.lock() {
                    if let Err(e) = appender.touch() {
                        tracing::warn!(dataset = %name, error = %e, "recording the update time");
                    }
                }
            }
        }
    }
}

/// A stream's share of a dataset's appender; leaves the table when dropped.
pub struct IngestGuard {
    table: Ingesting,
    name: String,
    appender: SharedAppender,
}

impl Drop for IngestGuard {
    fn drop(&mut self) {
        self.table.leave(&self.name);
    }
}

pub struct IngestContext {
    pub store: DatasetStore,
    pub model: Arc<ModelDescription>,
    pub labels: Arc<LabelChecker>,
    pub ingesting: Ingesting,
    /// Examples one dataset may hold (`--max-dataset-examples`).
    pub max_dataset_examples: usize,
}

/// Validates the config, opens or creates the dataset, and returns the appender with the
/// default split; errors here fail the RPC before any example is read.
pub async fn open(
    context: &IngestContext,
    inbound: &mut Streaming<pb::IngestExamplesRequest>,
) -> Result<(String, IngestGuard), ModelError> {
    let config = match inbound.message().await.map_err(ModelError::ClientStream)? {
        Some(pb::IngestExamplesRequest {
            payload: Some(pb::ingest_examples_request::Payload::Config(config)),
        }) => config,
        Some(_) => return Err(ModelError::ConfigNotFirst),
        None => return Err(ModelError::MissingConfig),
    };
    let (n_mels, split) = check_config(&config, &context.model)?;
    let mode = pb::IngestMode::try_from(config.mode).unwrap_or(pb::IngestMode::Unspecified);
    let store = context.store.clone();
    let table = context.ingesting.clone();
    let max_examples = context.max_dataset_examples;
    let name = config.dataset.clone();
    let guard = tokio::task::spawn_blocking(move || {
        table.join(&name, |live| match live {
            Some(appender) => {
                if matches!(mode, pb::IngestMode::Unspecified | pb::IngestMode::Create) {
                    return Err(ModelError::AlreadyExists {
                        what: "dataset",
                        name: name.clone(),
                    });
                }
                reconcile(&store, &mut appender.dataset, &config, n_mels)?;
                Ok(None)
            }
            None => {
                let exists = store.exists(&name);
                let dataset = match (mode, exists) {
                    (pb::IngestMode::Unspecified | pb::IngestMode::Create, true) => {
                        return Err(ModelError::AlreadyExists {
                            what: "dataset",
                            name: name.clone(),
                        })
                    }
                    (pb::IngestMode::Append, false) => {
                        return Err(ModelError::NotFound {
                            what: "dataset",
                            name: name.clone(),
                        })
                    }
                    (_, false) => {
                        store.create(&name, n_mels, &config.language, &config.description)?
                    }
                    (_, true) => {
                        let mut dataset = store.get(&name)?;
                        reconcile(&store, &mut dataset, &config, n_mels)?;
                        dataset
                    }
                };
                Appender::new(dataset, max_examples).map(Some)
            }
        })
    })
    .await
    .map_err(ModelError::internal)??;
    Ok((split, guard))
}

/// The config's checks that need no store (dataset name, n_mels, default split, language):
/// returns the stream's n_mels and default split.
pub fn check_config(
    config: &pb::IngestExamplesConfig,
    model: &ModelDescription,
) -> Result<(usize, String), ModelError> {
    validate_name(&config.dataset, "config.dataset")?;
    let n_mels = check_n_mels(config.n_mels, model.n_mels)?;
    let split = if config.split.is_empty() {
        "train".to_string()
    } else {
        config.split.clone()
    };
    validate_name(&split, "config.split")?;
    if !config.language.is_empty() && !model.languages.contains(&config.language) {
        return Err(ModelError::invalid(
            "config.language",
            format!("{:?} is not a language this model knows", config.language),
        ));
    }
    Ok((n_mels, split))
}

/// Checks an existing dataset against an appending stream's config, and records a new
/// description (or a first language).
fn reconcile(
    store: &DatasetStore,
    dataset: &mut Dataset,
    config: &pb::IngestExamplesConfig,
    n_mels: usize,
) -> Result<(), ModelError> {
    let name = &config.dataset;
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
    if !config.description.is_empty() && dataset.meta.description != config.description {
        dataset.meta.description = config.description.clone();
        changed = true;
    }
    if changed {
        store.update_meta(dataset)?;
    }
    Ok(())
}

/// Stores the stream's examples, one ack each, in order.
pub async fn run(
    labels: Arc<LabelChecker>,
    default_split: String,
    guard: IngestGuard,
    mut inbound: Streaming<pb::IngestExamplesRequest>,
    acks: mpsc::Sender<Result<pb::IngestAck, Status>>,
) {
    let appender = guard.appender.clone();
    let language = appender
        .lock()
        .ok()
        .map(|a| a.dataset.meta.language.clone())
        .filter(|l| !l.is_empty());
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
                message: e.to_string(),
                ..Default::default()
            }
        } else {
            let (labels, language, shared) = (labels.clone(), language.clone(), appender.clone());
            let split_for_store = split.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let mut appender = shared.lock().map_err(ModelError::internal)?;
                appender.append(example, &split_for_store, |text| {
                    labels.check(text, language.as_deref())
                })
            })
            .await
            .map_err(ModelError::internal)
            .and_then(|r| r);
            match stored {
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
    drop(guard);
}
