//! FeatureService.Ingest: labelled audio in, features stored by the model service.
//!
//! After the config, ModelService.IngestExamples is opened with the same dataset, mode and
//! split and the model's n_mels (its stream-level errors, e.g. ALREADY_EXISTS, come back
//! unchanged before any audio is read). Then three parts run together, joined by bounded
//! channels, all owned by the handler (a client that goes away drops them all):
//! - [`read_examples`]: the client's examples, each decoded on a blocking thread while its
//!   audio streams in;
//! - [`forward`]: in order, each decoded example sent upstream as a DatasetExample, or
//!   rejected here (undecodable, empty, longer than 30 s) without being sent;
//! - [`collect`]: the model service's acks matched to the examples sent, interleaved with the
//!   rejections made here, so the results keep the order of the examples.
//!
//! The response (with GetDataset's view of the dataset) is sent once the model service has
//! acknowledged every example and ended its stream.

use std::collections::VecDeque;
use std::time::Instant;

use asr_audio::{AudioError, InputFormat, MelConfig};
use asr_proto::v1 as pb;
use futures::StreamExt;
use pb::ingest_audio_request::Payload;
use pb::ingest_examples_request::Payload as Upstream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Streaming};

use crate::convert::{self, ByteLayout};
use crate::error::FeatureError;
use crate::ingest_examples::{read_examples, Decoded, ExampleContext, Outcome, Pending};
use crate::model_link::ModelLink;
use crate::server::FeatureServer;
use crate::trace_context;

/// Examples handed from the reader to the forwarder ahead of the one being forwarded (each
/// decoding on its own blocking thread).
const PENDING_EXAMPLES: usize = 1;
/// Examples buffered between the forwarder and the upstream call.
const UPSTREAM_EXAMPLES: usize = 2;
/// Outcomes waiting for their turn in the results (examples sent and not yet acknowledged,
/// rejections made here behind them).
const SLOTS: usize = 32;

/// An example's place in the results.
enum Slot {
    /// Rejected here; its ack is final.
    Local(pb::IngestAck),
    /// Sent to the model service; its ack comes from there.
    Sent { id: String, duration_seconds: f64 },
}

#[derive(Default)]
struct Tally {
    results: Vec<pb::IngestAck>,
    accepted_audio_seconds: f64,
}

/// Runs one Ingest stream to its response.
pub async fn ingest(
    server: &FeatureServer,
    request: Request<Streaming<pb::IngestAudioRequest>>,
) -> Result<pb::IngestResponse, FeatureError> {
    let started = Instant::now();
    // tonic ends this unary-response call at the client's deadline; the model service gets
    // what remains of it, so it stops too.
    let deadline = asr_runtime::deadline::of(request.metadata());
    let link = server
        .model_link()
        .ok_or(FeatureError::NoModelService)?
        .clone();
    let mut inbound = request.into_inner();
    let config = read_config(&mut inbound).await?;
    let default_format = default_format(config.default_format)?;
    let n_mels = link.n_mels().await?;
    let mel = MelConfig::new(n_mels)?;
    tracing::debug!(dataset = %config.dataset, n_mels, model_service = link.address(), "ingest started");

    let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_EXAMPLES);
    let first = pb::IngestExamplesRequest {
        payload: Some(Upstream::Config(pb::IngestExamplesConfig {
            dataset: config.dataset.clone(),
            mode: config.mode,
            n_mels,
            split: config.split.clone(),
            language: config.language.clone(),
            description: config.description.clone(),
        })),
    };
    let mut upstream = Request::new(
        futures::stream::once(async { first }).chain(ReceiverStream::new(upstream_rx)),
    );
    trace_context::inject_current(upstream.metadata_mut());
    asr_runtime::deadline::propagate(&mut upstream, deadline);
    let acks = link.ingest_examples(upstream).await?;

    let context = ExampleContext {
        pipeline: server.pipeline(mel),
        n_mels,
        default_format,
        default_split: if config.split.is_empty() {
            "train".to_string()
        } else {
            config.split.clone()
        },
    };
    let (pending_tx, pending_rx) = mpsc::channel(PENDING_EXAMPLES);
    let (slots_tx, slots_rx) = mpsc::channel(SLOTS);
    let ((), (), tally) = tokio::try_join!(
        read_examples(inbound, &context, pending_tx),
        forward(pending_rx, upstream_tx, slots_tx, n_mels),
        collect(&link, slots_rx, acks),
    )?;

    let dataset_info = match link.get_dataset(&config.dataset).await {
        Ok(dataset) => Some(dataset),
        Err(err) => {
            // The examples are stored and acknowledged; only the summary is missing.
            tracing::warn!(error = %err, dataset = %config.dataset, "GetDataset after ingestion");
            None
        }
    };
    let accepted_count = tally
        .results
        .iter()
        .filter(|ack| ack.status == pb::ExampleStatus::Accepted as i32)
        .count() as u64;
    let rejected_count = tally.results.len() as u64 - accepted_count;
    tracing::info!(
        dataset = %config.dataset,
        accepted_count,
        rejected_count,
        audio_seconds = tally.accepted_audio_seconds,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ingest finished"
    );
    Ok(pb::IngestResponse {
        dataset: config.dataset,
        accepted_count,
        rejected_count,
        accepted_audio_seconds: tally.accepted_audio_seconds,
        results: tally.results,
        dataset_info,
    })
}

/// The config message that must open the stream.
async fn read_config(
    inbound: &mut Streaming<pb::IngestAudioRequest>,
) -> Result<pb::IngestAudioConfig, FeatureError> {
    match inbound.message().await {
        Ok(Some(pb::IngestAudioRequest {
            payload: Some(Payload::Config(config)),
        })) => Ok(config),
        Ok(Some(_)) => Err(FeatureError::ConfigNotFirst),
        Ok(None) => Err(FeatureError::MissingConfig),
        Err(status) => Err(FeatureError::ClientStream(status)),
    }
}

/// Validates `config.default_format`, with errors naming its fields.
pub fn default_format(
    format: Option<pb::AudioFormat>,
) -> Result<(InputFormat, ByteLayout), FeatureError> {
    convert::input_format(format).map_err(|err| {
        let field = match &err {
            FeatureError::InvalidField { field, .. } => match *field {
                "config.format.encoded.container_hint" => {
                    "config.default_format.encoded.container_hint"
                }
                "config.format.raw_pcm.sample_format" => {
                    "config.default_format.raw_pcm.sample_format"
                }
                _ => "config.default_format",
            },
            FeatureError::Audio(AudioError::InvalidSampleRate { .. }) => {
                "config.default_format.raw_pcm.sample_rate_hz"
            }
            FeatureError::Audio(AudioError::InvalidChannels { .. }) => {
                "config.default_format.raw_pcm.channels"
            }
            _ => "config.default_format",
        };
        let description = match err {
            FeatureError::InvalidField { description, .. } => description,
            other => other.to_string(),
        };
        FeatureError::invalid(field, description)
    })
}

/// Takes the examples in order as their decoding ends: a decoded one goes upstream (its slot
/// first), a rejected one only to the results. Returning drops the upstream sender, which
/// ends the model service's input cleanly once every example is out.
async fn forward(
    mut pending: mpsc::Receiver<Pending>,
    upstream: mpsc::Sender<pb::IngestExamplesRequest>,
    slots: mpsc::Sender<Slot>,
    n_mels: u32,
) -> Result<(), FeatureError> {
    while let Some(example) = pending.recv().await {
        let decoded = match example.outcome {
            Outcome::Decoded(decoded) => decoded,
            Outcome::Decoding(decoding) => decoding
                .await
                .map_err(|_| FeatureError::Internal("the audio decoder panicked"))??,
        };
        let (slot, message) = match decoded {
            Decoded::Rejected { reason, message } => {
                let ack = pb::IngestAck {
                    example_id: example.id,
                    status: pb::ExampleStatus::Rejected as i32,
                    index: 0,
                    rejection: reason as i32,
                    message,
                    split: example.resolved_split,
                };
                (Slot::Local(ack), None)
            }
            Decoded::Frames {
                values,
                duration_seconds,
            } => {
                let slot = Slot::Sent {
                    id: example.id.clone(),
                    duration_seconds,
                };
                let features = pb::MelFrames {
                    n_mels,
                    first_frame_index: 0,
                    frame_count: (values.len() / n_mels as usize) as u32,
                    values,
                };
                let message = pb::IngestExamplesRequest {
                    payload: Some(Upstream::Example(pb::DatasetExample {
                        id: example.id,
                        text: example.text,
                        duration_seconds,
                        features: Some(features),
                        split: example.split,
                    })),
                };
                (slot, Some(message))
            }
        };
        // A closed channel: the collector or the upstream call stopped, and the collector
        // reports why.
        if slots.send(slot).await.is_err() {
            return Ok(());
        }
        if let Some(message) = message {
            if upstream.send(message).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Builds the results in example order: rejections made here as they come, the model
/// service's acks matched to the examples sent. Ends once every example is acknowledged and
/// the model service ended its stream (the dataset is then up to date).
async fn collect(
    link: &ModelLink,
    mut slots: mpsc::Receiver<Slot>,
    mut acks: Streaming<pb::IngestAck>,
) -> Result<Tally, FeatureError> {
    let mut tally = Tally::default();
    let mut waiting: VecDeque<Slot> = VecDeque::new();
    let (mut slots_open, mut acks_open) = (true, true);
    loop {
        while matches!(waiting.front(), Some(Slot::Local(_))) {
            if let Some(Slot::Local(ack)) = waiting.pop_front() {
                tally.results.push(ack);
            }
        }
        if !slots_open && waiting.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            slot = slots.recv(), if slots_open => match slot {
                Some(slot) => waiting.push_back(slot),
                None => slots_open = false,
            },
            ack = acks.message(), if acks_open => {
                let ack = ack.map_err(|status| link.error(status))?;
                if ack.is_some() {
                    // An example's slot goes out before the example does: it is in the
                    // channel if not taken yet, behind rejections made here.
                    while !matches!(waiting.front(), Some(Slot::Sent { .. })) {
                        match waiting.pop_front() {
                            Some(Slot::Local(local)) => tally.results.push(local),
                            _ => match slots.recv().await {
                                Some(slot) => waiting.push_back(slot),
                                None => break,
                            },
                        }
                    }
                }
                match (ack, waiting.pop_front()) {
                    (Some(ack), Some(Slot::Sent { id, duration_seconds })) => {
                        if ack.example_id != id {
                            return Err(FeatureError::Internal(
                                "the model service acknowledged the examples out of order",
                            ));
                        }
                        if ack.status == pb::ExampleStatus::Accepted as i32 {
                            tally.accepted_audio_seconds += duration_seconds;
                        }
                        tally.results.push(ack);
                    }
                    (Some(_), _) => {
                        return Err(FeatureError::Internal(
                            "the model service acknowledged an example it was not sent",
                        ))
                    }
                    (None, None) => acks_open = false,
                    (None, Some(_)) => {
                        return Err(FeatureError::Internal(
                            "the model service ended the ingestion before acknowledging every \
                             example",
                        ))
                    }
                }
            }
            else => {
                // Acks ended while examples are still to be sent.
                return Err(FeatureError::Internal(
                    "the model service ended the ingestion before acknowledging every example",
                ));
            }
        }
    }
    if acks_open {
        if let Some(_extra) = acks.message().await.map_err(|status| link.error(status))? {
            return Err(FeatureError::Internal(
                "the model service acknowledged an example it was not sent",
            ));
        }
    }
    Ok(tally)
}
