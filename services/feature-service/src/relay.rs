//! FeatureService.Transcribe: the client's audio is decoded into raw log-mel frames with the
//! model's mel count and relayed to ModelService.Transcribe as they are produced; the model
//! service's events (and errors) come back to the client unchanged.
//!
//! One stream runs as three parts joined by bounded channels:
//! - [`inbound::forward_audio`] (a task): client audio messages -> the pipeline's reader;
//! - the pipeline (a blocking thread): bytes -> frames -> the upstream call's request stream,
//!   which opens with the config (options unchanged, n_mels);
//! - [`relay`] (a task): drives the upstream call, sends its events to the client, and ends
//!   the stream at the first error from any side or when the client goes away.
//!
//! The upstream request stream ends cleanly (END_STREAM) only once the audio was decoded
//! completely; any other end cancels the call (RST_STREAM), so the model service never takes
//! a broken or abandoned input for a complete one. See [`UpstreamGuard`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use asr_audio::{
    AudioError, FeaturePipeline, InputFormat, MelConfig, PipelineEvent, StreamSummary,
};
use asr_proto::v1 as pb;
use futures::{Stream, StreamExt};
use pb::transcribe_frames_request::Payload;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::{JoinError, JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{CancellationHandle, Request, Status, Streaming};
use tracing::Instrument;

use crate::error::FeatureError;
use crate::extract::{self, OUTBOUND_MESSAGES};
use crate::inbound;
use crate::model_link::ModelLink;
use crate::reader::AbortSlot;
use crate::server::FeatureServer;
use crate::{convert, trace_context};

/// Frames messages buffered between the pipeline and the upstream call.
const UPSTREAM_MESSAGES: usize = 16;

type Responses = mpsc::Receiver<Result<pb::TranscribeResponse, Status>>;
type ResponseSender = mpsc::Sender<Result<pb::TranscribeResponse, Status>>;
type Decoding = JoinHandle<Result<StreamSummary, FeatureError>>;

/// Starts relaying one Transcribe stream; errors before the first response (no model service,
/// a bad config, the model service unreachable) are returned, later ones end the stream. The
/// model service gets what remains of the client's `deadline`.
pub async fn start(
    server: &FeatureServer,
    permit: OwnedSemaphorePermit,
    request: Request<Streaming<pb::TranscribeAudioRequest>>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Responses, FeatureError> {
    let link = server
        .model_link()
        .ok_or(FeatureError::NoModelService)?
        .clone();
    let mut audio = request.into_inner();
    let config = inbound::read_config(&mut audio).await?;
    let (input, layout) = convert::input_format(config.format)?;
    let n_mels = link.n_mels().await?;
    let mel = MelConfig::new(n_mels)?;
    tracing::debug!(
        n_mels,
        ?input,
        model_service = link.address(),
        "transcribe started"
    );

    let (frames_tx, frames_rx) = mpsc::channel(UPSTREAM_MESSAGES);
    let first = pb::TranscribeFramesRequest {
        payload: Some(Payload::Config(pb::TranscribeFramesConfig {
            options: config.options,
            n_mels,
        })),
    };
    let mut upstream =
        Request::new(futures::stream::once(async { first }).chain(ReceiverStream::new(frames_rx)));
    trace_context::inject_current(upstream.metadata_mut());
    asr_runtime::deadline::propagate(&mut upstream, deadline);
    let guard = UpstreamGuard {
        cancel: Some(upstream.cancellation_handle()),
        keep_open: Some(frames_tx.clone()),
        stop: Arc::default(),
    };

    let (chunks_tx, chunks_rx) = inbound::channel();
    let abort = AbortSlot::default();
    tokio::spawn(inbound::forward_audio(audio, chunks_tx, layout, abort.clone()).in_current_span());
    let pipeline = server.pipeline(mel);
    let frames_per_message = server.config().default_frames_per_message;
    let stop = guard.stop.clone();
    let span = tracing::Span::current();
    let decoding = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let sink = FrameSink {
            frames: frames_tx,
            n_mels,
            frames_per_message,
            stop,
        };
        decode(&pipeline, input, chunks_rx, abort, sink)
    });

    let (responses_tx, responses_rx) = mpsc::channel(OUTBOUND_MESSAGES);
    tokio::spawn(relay(link, upstream, decoding, guard, responses_tx, permit).in_current_span());
    Ok(responses_rx)
}

/// Where the pipeline's frames go: the upstream request stream, as MelFrames messages.
struct FrameSink {
    frames: mpsc::Sender<pb::TranscribeFramesRequest>,
    n_mels: u32,
    frames_per_message: usize,
    stop: Arc<AtomicBool>,
}

/// Runs on a blocking thread until the audio ends, it fails, or the relay stops it.
fn decode(
    pipeline: &FeaturePipeline,
    input: InputFormat,
    chunks: mpsc::Receiver<Vec<u8>>,
    abort: AbortSlot,
    sink: FrameSink,
) -> Result<StreamSummary, FeatureError> {
    let n_mels = sink.n_mels as usize;
    extract::decode(pipeline, input, chunks, abort, |event| {
        if sink.stop.load(Ordering::Relaxed) {
            return Err(AudioError::Cancelled);
        }
        let PipelineEvent::Frames {
            first_frame,
            values,
        } = event
        else {
            return Ok(());
        };
        extract::mel_messages(first_frame, values, n_mels, sink.frames_per_message).try_for_each(
            |frames| {
                let message = pb::TranscribeFramesRequest {
                    payload: Some(Payload::Frames(frames)),
                };
                // Fails once the upstream call dropped its request stream.
                sink.frames
                    .blocking_send(message)
                    .map_err(|_| AudioError::Cancelled)
            },
        )
    })
}

/// Decides how the upstream request stream ends. [`UpstreamGuard::finish`] (the audio was
/// decoded completely) lets it end with END_STREAM once the pipeline's last frames are out.
/// Dropped before that (an error, the client gone, the model service finished early) it
/// cancels the call, which tonic sends as RST_STREAM(CANCEL), and stops the pipeline.
struct UpstreamGuard {
    cancel: Option<CancellationHandle>,
    /// Holds the request stream open whatever the pipeline does with its own sender.
    keep_open: Option<mpsc::Sender<pb::TranscribeFramesRequest>>,
    stop: Arc<AtomicBool>,
}

impl UpstreamGuard {
    fn finish(&mut self) {
        self.keep_open = None;
    }
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(keep_open) = self.keep_open.take() {
            // Cancel before the stream can end: a cancelled request body never sends
            // END_STREAM.
            if let Some(cancel) = self.cancel.take() {
                cancel.cancel();
            }
            drop(keep_open);
        }
    }
}

/// Why a relay stopped early.
enum Stop {
    /// The client went away (cancelled or disconnected); nobody to tell.
    ClientGone,
    Failed(FeatureError),
}

async fn relay<S>(
    link: ModelLink,
    upstream: Request<S>,
    decoding: Decoding,
    mut guard: UpstreamGuard,
    client: ResponseSender,
    _permit: OwnedSemaphorePermit,
) where
    S: Stream<Item = pb::TranscribeFramesRequest> + Send + 'static,
{
    let started = Instant::now();
    let outcome = run(&link, upstream, decoding, &mut guard, &client).await;
    // Cancel the upstream call (if still open) before telling the client.
    drop(guard);
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(()) => tracing::info!(elapsed_ms, "transcribe finished"),
        Err(Stop::ClientGone) => tracing::info!(elapsed_ms, "transcribe cancelled by the client"),
        Err(Stop::Failed(err)) => {
            tracing::info!(elapsed_ms, error = %err, "transcribe failed");
            let _ = client.send(Err(err.into())).await;
        }
    }
}

async fn run<S>(
    link: &ModelLink,
    upstream: Request<S>,
    mut decoding: Decoding,
    guard: &mut UpstreamGuard,
    client: &ResponseSender,
) -> Result<(), Stop>
where
    S: Stream<Item = pb::TranscribeFramesRequest> + Send + 'static,
{
    let mut decoded = false;
    let call = link.transcribe(upstream);
    tokio::pin!(call);
    // `biased`: a client that went away wins over everything else, so its cancel is not
    // mistaken for the end of its audio (tonic ends a cancelled request stream like a
    // complete one).
    let mut responses = loop {
        tokio::select! {
            biased;
            () = client.closed() => return Err(Stop::ClientGone),
            done = &mut decoding, if !decoded => {
                decoded = true;
                settle(done, guard, client)?;
            }
            opened = &mut call => break opened.map_err(Stop::Failed)?,
        }
    };
    loop {
        tokio::select! {
            biased;
            () = client.closed() => return Err(Stop::ClientGone),
            done = &mut decoding, if !decoded => {
                decoded = true;
                settle(done, guard, client)?;
            }
            event = responses.message() => match event {
                Ok(Some(event)) => {
                    if client.send(Ok(event)).await.is_err() {
                        return Err(Stop::ClientGone);
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(Stop::Failed(link.error(status))),
            },
        }
    }
}

/// The pipeline's outcome: a complete decode lets the upstream input end; a failure ends the
/// stream with its error.
fn settle(
    done: Result<Result<StreamSummary, FeatureError>, JoinError>,
    guard: &mut UpstreamGuard,
    client: &ResponseSender,
) -> Result<(), Stop> {
    match done {
        // The audio "ended" because the client cancelled: tonic reports a reset request
        // stream as a clean end; the response side tells them apart.
        Ok(Ok(_)) if client.is_closed() => Err(Stop::ClientGone),
        Ok(Ok(summary)) => {
            tracing::debug!(
                audio_seconds = summary.duration_seconds,
                frames = summary.frames_emitted,
                "audio decoded"
            );
            guard.finish();
            Ok(())
        }
        // The upstream call stopped taking frames: its own outcome (an error or the end of
        // its responses) follows on the response stream.
        Ok(Err(FeatureError::Audio(AudioError::Cancelled))) => Ok(()),
        Ok(Err(err)) => Err(Stop::Failed(err)),
        Err(_) => Err(Stop::Failed(FeatureError::Internal(
            "the audio pipeline panicked",
        ))),
    }
}
