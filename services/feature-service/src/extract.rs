//! The Extract stream. Inbound audio messages are forwarded over a bounded channel to a
//! blocking pipeline (decode -> resample -> log-mel); its frames go back over another bounded
//! channel. A client that cancels drops the response stream, the next send fails and the
//! pipeline stops.

use std::time::Instant;

use asr_audio::{AudioError, FeaturePipeline, PipelineEvent};
use asr_proto::v1 as pb;
use pb::extract_request::Payload;
use pb::extract_response::Event;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tonic::{Status, Streaming};

use crate::convert::{self, ByteLayout, ExtractSpec};
use crate::error::FeatureError;
use crate::reader::{AbortSlot, ChannelReader};

/// Audio messages buffered between tonic and the decoder.
const INBOUND_CHUNKS: usize = 8;
/// Response messages buffered between the pipeline and tonic.
pub const OUTBOUND_MESSAGES: usize = 16;

pub type ResponseSender = mpsc::Sender<Result<pb::ExtractResponse, Status>>;

/// Reads the config message that must open the stream.
pub async fn read_config(
    inbound: &mut Streaming<pb::ExtractRequest>,
) -> Result<pb::ExtractConfig, FeatureError> {
    match inbound.message().await {
        Ok(Some(pb::ExtractRequest {
            payload: Some(Payload::Config(config)),
        })) => Ok(config),
        Ok(Some(_)) => Err(FeatureError::ConfigNotFirst),
        Ok(None) => Err(FeatureError::MissingConfig),
        Err(status) => Err(FeatureError::ClientStream(status)),
    }
}

/// Forwards the audio bytes of `inbound` to the pipeline's reader until the client half-closes.
/// Protocol errors are recorded in `abort` so the pipeline reports them.
pub async fn forward_audio(
    mut inbound: Streaming<pb::ExtractRequest>,
    chunks: mpsc::Sender<Vec<u8>>,
    layout: ByteLayout,
    abort: AbortSlot,
) {
    loop {
        let bytes = match inbound.message().await {
            Ok(Some(pb::ExtractRequest {
                payload: Some(Payload::Audio(bytes)),
            })) => bytes,
            Ok(Some(pb::ExtractRequest {
                payload: Some(Payload::Config(_)),
            })) => {
                abort.set(FeatureError::DuplicateConfig);
                return;
            }
            // An empty message carries nothing; tolerate it as an empty chunk.
            Ok(Some(pb::ExtractRequest { payload: None })) => continue,
            Ok(None) => return,
            Err(status) => {
                abort.set(FeatureError::ClientStream(status));
                return;
            }
        };
        if bytes.is_empty() {
            continue;
        }
        let bytes = match layout.to_interleaved(bytes) {
            Ok(bytes) => bytes,
            Err(err) => {
                abort.set(err);
                return;
            }
        };
        if chunks.send(bytes).await.is_err() {
            // The pipeline stopped (error or cancelled); nothing more to read.
            return;
        }
    }
}

/// Runs the pipeline on a blocking thread, sending info, frames and summary (or the error).
pub fn run_pipeline(
    pipeline: FeaturePipeline,
    spec: ExtractSpec,
    chunks: mpsc::Receiver<Vec<u8>>,
    abort: AbortSlot,
    responses: ResponseSender,
    _permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let reader = ChannelReader::new(chunks, abort.clone());
    let frames_per_message = spec.frames_per_message;
    let n_mels = spec.mel.n_mels;
    let send = |event: Event| -> Result<(), AudioError> {
        responses
            .blocking_send(Ok(pb::ExtractResponse { event: Some(event) }))
            .map_err(|_| AudioError::Cancelled)
    };
    let result = pipeline.run(reader, spec.input, |event| match event {
        PipelineEvent::Started(info) => send(Event::Info(convert::stream_info(&info))),
        PipelineEvent::Frames {
            first_frame,
            values,
        } => {
            for (i, chunk) in values.chunks(frames_per_message * n_mels).enumerate() {
                send(Event::Frames(pb::MelFrames {
                    n_mels: n_mels as u32,
                    first_frame_index: first_frame + (i * frames_per_message) as u64,
                    frame_count: (chunk.len() / n_mels) as u32,
                    values: chunk.to_vec(),
                }))?;
            }
            Ok(())
        }
    });
    let outcome = result.map_err(|err| abort.take().unwrap_or(FeatureError::Audio(err)));
    match outcome {
        Ok(summary) => {
            tracing::info!(
                audio_seconds = summary.duration_seconds,
                frames = summary.frames_emitted,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "extract finished"
            );
            let _ = send(Event::Summary(convert::summary(&summary)));
        }
        Err(FeatureError::Audio(AudioError::Cancelled)) => {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "extract cancelled by the client"
            );
        }
        Err(err) => {
            tracing::info!(error = %err, "extract failed");
            let _ = responses.blocking_send(Err(err.into()));
        }
    }
}

pub fn channel() -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    mpsc::channel(INBOUND_CHUNKS)
}
