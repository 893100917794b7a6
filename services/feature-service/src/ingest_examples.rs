//! The client's side of an Ingest stream: `example` headers, each followed by its audio, read
//! in order; each example's audio is decoded on a blocking thread while it streams in (and
//! while the next one does), into raw log-mel frames with the model's mel count.
//!
//! Per-example problems (audio that does not decode, no audio, longer than one 30 s window, a
//! bad `example.format`) become rejections; the stream goes on. Protocol errors end it.

use asr_audio::{AudioError, FeaturePipeline, InputFormat, PipelineEvent, WINDOW_FRAMES};
use asr_proto::v1 as pb;
use pb::ingest_audio_request::Payload;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Streaming;

use crate::convert::{self, ByteLayout};
use crate::error::FeatureError;
use crate::reader::AbortSlot;
use crate::{extract, inbound};

/// What every example of one stream shares.
pub struct ExampleContext {
    pub pipeline: FeaturePipeline,
    pub n_mels: u32,
    /// `config.default_format`, validated.
    pub default_format: (InputFormat, ByteLayout),
    /// `config.split`, or "train": the split reported for examples rejected here.
    pub default_split: String,
}

/// One example, in stream order, on its way to the model service.
pub struct Pending {
    pub id: String,
    pub text: String,
    /// `AudioExampleHeader.split` as sent (empty = the stream's).
    pub split: String,
    /// The split it goes to, for a rejection made here.
    pub resolved_split: String,
    pub outcome: Outcome,
}

pub enum Outcome {
    /// Decoding on a blocking thread while its audio streams in.
    Decoding(JoinHandle<Result<Decoded, FeatureError>>),
    /// Settled without decoding (a bad `example.format`).
    Decoded(Decoded),
}

pub enum Decoded {
    /// All frames of the example: frame-major raw log10 values.
    Frames {
        values: Vec<f32>,
        duration_seconds: f64,
    },
    /// Rejected by this service; not sent to the model service.
    Rejected {
        reason: pb::RejectionReason,
        message: String,
    },
}

fn rejected(reason: pb::RejectionReason, message: impl Into<String>) -> Decoded {
    Decoded::Rejected {
        reason,
        message: message.into(),
    }
}

/// The example whose audio is streaming in.
struct Current {
    /// `None` once its decoder stopped taking audio (rejected, too long): the rest of the
    /// example's audio is dropped. Dropping the sender ends the example's audio.
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    layout: ByteLayout,
    abort: AbortSlot,
}

impl Current {
    fn discarding() -> Self {
        Self {
            chunks: None,
            layout: ByteLayout::AsIs,
            abort: AbortSlot::default(),
        }
    }

    async fn push(&mut self, bytes: Vec<u8>) {
        let Some(chunks) = &self.chunks else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        match self.layout.to_interleaved(bytes) {
            Ok(bytes) => {
                if chunks.send(bytes).await.is_err() {
                    self.chunks = None;
                }
            }
            Err(err) => {
                // The decoder reports it (a rejection) instead of the end of the audio.
                self.abort.set(err);
                self.chunks = None;
            }
        }
    }

    /// The client stream failed: the audio so far must not be taken for the whole example.
    fn abort(self) {
        self.abort.set(FeatureError::Audio(AudioError::Cancelled));
    }
}

/// Reads the examples after the config until the client half-closes, starting each one's
/// decoder and handing it on in order over the bounded `pending` channel.
pub async fn read_examples(
    mut inbound: Streaming<pb::IngestAudioRequest>,
    context: &ExampleContext,
    pending: mpsc::Sender<Pending>,
) -> Result<(), FeatureError> {
    let mut current: Option<Current> = None;
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => {
                // tonic ends a request stream the client reset (cancelled) like a complete
                // one; hyper drops this handler when it sees the reset, which it checks each
                // time the handler waits. Wait once before the last example's audio ends.
                tokio::task::yield_now().await;
                return Ok(());
            }
            Err(status) => {
                if let Some(example) = current {
                    example.abort();
                }
                return Err(FeatureError::ClientStream(status));
            }
        };
        match message.payload {
            Some(Payload::Example(header)) => {
                // Ends the previous example's audio.
                drop(current.take());
                let (next, audio) = start_example(header, context);
                if pending.send(next).await.is_err() {
                    // The relay stopped; it reports why.
                    return Ok(());
                }
                current = Some(audio);
            }
            Some(Payload::Audio(bytes)) => match current.as_mut() {
                Some(example) => example.push(bytes).await,
                None => {
                    return Err(FeatureError::invalid(
                        "audio",
                        "audio before the first `example` header: each example's audio \
                         follows its header",
                    ))
                }
            },
            Some(Payload::Config(_)) => {
                if let Some(example) = current {
                    example.abort();
                }
                return Err(FeatureError::DuplicateConfig);
            }
            None => {}
        }
    }
}

fn start_example(header: pb::AudioExampleHeader, context: &ExampleContext) -> (Pending, Current) {
    let resolved_split = if header.split.is_empty() {
        context.default_split.clone()
    } else {
        header.split.clone()
    };
    let pending = |outcome| Pending {
        id: header.id.clone(),
        text: header.text.clone(),
        split: header.split.clone(),
        resolved_split: resolved_split.clone(),
        outcome,
    };
    // An AudioFormat without a format set is unset too.
    let format = match header.format.filter(|f| f.format.is_some()) {
        None => Ok(context.default_format),
        Some(format) => convert::input_format(Some(format)),
    };
    let (input, layout) = match format {
        Ok(format) => format,
        Err(err) => {
            let outcome = Outcome::Decoded(rejected(
                pb::RejectionReason::UndecodableAudio,
                format!("example.format: {err}"),
            ));
            return (pending(outcome), Current::discarding());
        }
    };
    let (chunks, chunks_rx) = inbound::channel();
    let abort = AbortSlot::default();
    let pipeline = context.pipeline.clone();
    let n_mels = context.n_mels as usize;
    let decoder_abort = abort.clone();
    let span = tracing::Span::current();
    let decoding = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        decode_example(&pipeline, input, chunks_rx, decoder_abort, n_mels)
    });
    let current = Current {
        chunks: Some(chunks),
        layout,
        abort,
    };
    (pending(Outcome::Decoding(decoding)), current)
}

/// Decodes one example's audio to its end (blocking). Audio problems are rejections; a failed
/// client stream or the service's max_audio_seconds end the whole stream.
fn decode_example(
    pipeline: &FeaturePipeline,
    input: InputFormat,
    chunks: mpsc::Receiver<Vec<u8>>,
    abort: AbortSlot,
    n_mels: usize,
) -> Result<Decoded, FeatureError> {
    use pb::RejectionReason as R;
    let mut frames = Vec::new();
    let mut too_long = false;
    let outcome = extract::decode(pipeline, input, chunks, abort, |event| {
        if let PipelineEvent::Frames { values, .. } = event {
            if frames.len() + values.len() > WINDOW_FRAMES * n_mels {
                too_long = true;
                return Err(AudioError::Cancelled);
            }
            frames.extend_from_slice(values);
        }
        Ok(())
    });
    match outcome {
        Ok(summary) => Ok(Decoded::Frames {
            values: frames,
            duration_seconds: summary.duration_seconds,
        }),
        Err(_) if too_long => Ok(rejected(
            R::AudioTooLong,
            format!(
                "longer than 30 s (more than {WINDOW_FRAMES} frames): Whisper trains on single \
                 30 s windows"
            ),
        )),
        Err(FeatureError::Audio(AudioError::Empty)) => {
            Ok(rejected(R::EmptyAudio, AudioError::Empty.to_string()))
        }
        Err(err @ FeatureError::Audio(AudioError::TooLong { .. } | AudioError::Cancelled)) => {
            Err(err)
        }
        // Undecodable bytes, or planar PCM messages that do not hold whole frames.
        Err(err @ (FeatureError::Audio(_) | FeatureError::InvalidField { .. })) => {
            Ok(rejected(R::UndecodableAudio, err.to_string()))
        }
        Err(err) => Err(err),
    }
}
