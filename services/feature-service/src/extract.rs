//! The Extract stream. Inbound audio messages are forwarded over a bounded channel
//! ([`crate::inbound`]) to a blocking pipeline (decode -> resample -> log-mel); its frames go
//! back over another bounded channel. A client that cancels drops the response stream, the
//! next send fails and the pipeline stops.
//!
//! [`decode`] and [`mel_messages`] are the pieces Transcribe's relay shares.

use std::time::Instant;

use asr_audio::{AudioError, FeaturePipeline, InputFormat, PipelineEvent, StreamSummary};
use asr_proto::v1 as pb;
use pb::extract_response::Event;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tonic::Status;

use crate::convert::{self, ExtractSpec};
use crate::error::FeatureError;
use crate::reader::{AbortSlot, ChannelReader};

/// Response messages buffered between the pipeline and tonic.
pub const OUTBOUND_MESSAGES: usize = 16;

pub type ResponseSender = mpsc::Sender<Result<pb::ExtractResponse, Status>>;

/// Runs `pipeline` over the audio chunks arriving on `chunks` (blocking), handing each event
/// to `sink`. The error is the stream's real cause: a protocol error recorded in `abort` by
/// the task forwarding the client's messages wins over the I/O error the reader then sees.
pub fn decode<S>(
    pipeline: &FeaturePipeline,
    input: InputFormat,
    chunks: mpsc::Receiver<Vec<u8>>,
    abort: AbortSlot,
    sink: S,
) -> Result<StreamSummary, FeatureError>
where
    S: FnMut(PipelineEvent<'_>) -> Result<(), AudioError>,
{
    let reader = ChannelReader::new(chunks, abort.clone());
    pipeline
        .run(reader, input, sink)
        .map_err(|err| abort.take().unwrap_or(FeatureError::Audio(err)))
}

/// Frame-major raw frames starting at `first_frame`, cut into MelFrames messages of at most
/// `frames_per_message` frames.
pub fn mel_messages(
    first_frame: u64,
    values: &[f32],
    n_mels: usize,
    frames_per_message: usize,
) -> impl Iterator<Item = pb::MelFrames> + '_ {
    values
        .chunks(frames_per_message * n_mels)
        .enumerate()
        .map(move |(i, chunk)| pb::MelFrames {
            n_mels: n_mels as u32,
            first_frame_index: first_frame + (i * frames_per_message) as u64,
            frame_count: (chunk.len() / n_mels) as u32,
            values: chunk.to_vec(),
        })
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
    let frames_per_message = spec.frames_per_message;
    let n_mels = spec.mel.n_mels;
    let send = |event: Event| -> Result<(), AudioError> {
        responses
            .blocking_send(Ok(pb::ExtractResponse { event: Some(event) }))
            .map_err(|_| AudioError::Cancelled)
    };
    let outcome = decode(&pipeline, spec.input, chunks, abort, |event| match event {
        PipelineEvent::Started(info) => send(Event::Info(convert::stream_info(&info))),
        PipelineEvent::Frames {
            first_frame,
            values,
        } => mel_messages(first_frame, values, n_mels, frames_per_message)
            .try_for_each(|frames| send(Event::Frames(frames))),
    });
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
