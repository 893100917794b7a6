//! One Transcribe stream: frames in, windows cut every 3000 frames and queued on the
//! scheduler, segments out in window order; partial hypotheses of the window still filling
//! (LocalAgreement-2: only the prefix two successive decodes agree on is stable); a summary.
//!
//! Without timestamps each 30 s window is one segment, decoded as soon as it is complete
//! (short-form, as `asr transcribe --local`). With timestamps the stream is decoded at its
//! end with openai's seek-based long-form, so segments can span window boundaries.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use asr_audio::{normalize_window, WINDOW_FRAMES};
use asr_proto::v1 as pb;
use asr_whisper::{DecodeOptions, WindowTranscript};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tonic::{Status, Streaming};

use crate::engine::{Engine, ModelDescription};
use crate::error::ModelError;
use crate::options::StreamOptions;

const FRAMES_PER_SECOND: f64 = 100.0;
/// Frames the extractor emits past the audio's last sample (centred STFT windows).
const TRAILING_FRAMES: u64 = 2;
/// Cut windows waiting beside those on the scheduler before the stream stops reading frames.
const WINDOWS_BUFFERED: usize = 2;

/// What a stream needs besides its frames.
pub struct StreamContext {
    pub engine: Engine,
    pub model: Arc<ModelDescription>,
    pub options: StreamOptions,
    pub precision: pb::Precision,
    pub max_audio_seconds: f64,
    /// Windows of this stream decoding at once once its language is known.
    pub windows_in_flight: usize,
    pub started: Instant,
    pub metrics: asr_runtime::metrics::Registry,
    /// Held for the stream's life (max_concurrent_streams).
    pub _permit: OwnedSemaphorePermit,
    /// Marks the adapter in use while the stream runs.
    pub _adapter_use: Option<AdapterUse>,
}

/// Counts a stream as a user of an adapter until dropped.
pub struct AdapterUse {
    users: Arc<Mutex<HashMap<String, usize>>>,
    name: String,
}

impl AdapterUse {
    pub fn new(users: Arc<Mutex<HashMap<String, usize>>>, name: &str) -> Self {
        if let Ok(mut map) = users.lock() {
            *map.entry(name.to_string()).or_default() += 1;
        }
        Self {
            users,
            name: name.to_string(),
        }
    }
}

impl Drop for AdapterUse {
    fn drop(&mut self) {
        if let Ok(mut map) = self.users.lock() {
            if let Some(count) = map.get_mut(&self.name) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&self.name);
                }
            }
        }
    }
}

type Events = mpsc::Sender<Result<pb::TranscribeResponse, Status>>;
type WindowAnswer = oneshot::Receiver<Result<WindowTranscript, ModelError>>;

/// Runs the stream to its end, sending events (or one error) on `events`.
pub async fn run(
    context: StreamContext,
    inbound: Streaming<pb::TranscribeFramesRequest>,
    events: Events,
) {
    let mut session = Session::new(context, events.clone());
    if let Err(error) = session.run(inbound).await {
        tracing::debug!(%error, "transcribe stream failed");
        let _ = events.send(Err(error.into())).await;
    }
}

#[derive(Default)]
struct PartialState {
    answer: Option<WindowAnswer>,
    /// Frames received when the last partial decode was queued.
    queued_at_frames: u64,
    previous_text: String,
    stable_text: String,
}

struct Session {
    context: StreamContext,
    events: Events,
    n_mels: usize,
    frames_received: u64,
    /// Raw frames of the window being filled.
    pending: Vec<f32>,
    /// Every raw frame (timestamps mode only: long-form decodes the whole stream).
    all_frames: Vec<f32>,
    windows_cut: u32,
    /// The window cut at the end of the stream before it was full, if any.
    short_last_window: Option<u32>,
    language: Option<String>,
    options: Arc<DecodeOptions>,
    queued: VecDeque<(u32, Vec<f32>)>,
    in_flight: FuturesOrdered<WindowFuture>,
    partial: PartialState,
    segments_sent: u32,
}

type WindowFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u32, Result<WindowTranscript, ModelError>)> + Send>,
>;

impl Session {
    fn new(context: StreamContext, events: Events) -> Self {
        let options = Arc::new(context.options.decode.clone());
        Self {
            n_mels: context.model.n_mels,
            language: options.language.clone(),
            options,
            context,
            events,
            frames_received: 0,
            pending: Vec::new(),
            all_frames: Vec::new(),
            windows_cut: 0,
            short_last_window: None,
            queued: VecDeque::new(),
            in_flight: FuturesOrdered::new(),
            partial: PartialState::default(),
            segments_sent: 0,
        }
    }

    fn timestamps(&self) -> bool {
        self.context.options.decode.timestamps
    }

    async fn run(
        &mut self,
        mut inbound: Streaming<pb::TranscribeFramesRequest>,
    ) -> Result<(), ModelError> {
        let mut inbound_done = false;
        loop {
            self.submit_queued().await?;
            if inbound_done && self.queued.is_empty() && self.in_flight.is_empty() {
                break;
            }
            let reading = !inbound_done && self.queued.len() < WINDOWS_BUFFERED;
            let decoding = !self.in_flight.is_empty();
            let partial_pending = self.partial.answer.is_some();
            tokio::select! {
                message = inbound.message(), if reading => match message {
                    Ok(Some(request)) => self.on_request(request).await?,
                    Ok(None) => {
                        inbound_done = true;
                        self.end_of_frames();
                    }
                    Err(status) => return Err(ModelError::ClientStream(status)),
                },
                Some((index, result)) = self.in_flight.next(), if decoding => {
                    self.on_window(index, result?).await?;
                }
                answer = wait_partial(&mut self.partial.answer), if partial_pending => {
                    self.partial.answer = None;
                    // A failed or skipped partial decode is not the stream's failure.
                    if let Ok(Ok(transcript)) = answer {
                        self.on_partial(transcript).await?;
                    }
                }
                _ = self.events.closed() => return Ok(()),
            }
        }
        if self.timestamps() {
            self.decode_long_form().await?;
        }
        self.send_summary().await
    }

    async fn on_request(&mut self, request: pb::TranscribeFramesRequest) -> Result<(), ModelError> {
        let frames = match request.payload {
            Some(pb::transcribe_frames_request::Payload::Frames(frames)) => frames,
            Some(pb::transcribe_frames_request::Payload::Config(_)) => {
                return Err(ModelError::DuplicateConfig)
            }
            None => return Err(ModelError::invalid("payload", "empty message")),
        };
        if frames.n_mels as usize != self.n_mels {
            return Err(ModelError::invalid(
                "frames.n_mels",
                format!(
                    "{} mel bins, the stream's config says {}",
                    frames.n_mels, self.n_mels
                ),
            ));
        }
        if frames.first_frame_index != self.frames_received {
            return Err(ModelError::invalid(
                "frames.first_frame_index",
                format!(
                    "{} does not continue the stream (next frame is {})",
                    frames.first_frame_index, self.frames_received
                ),
            ));
        }
        let expected = frames.frame_count as usize * self.n_mels;
        if frames.frame_count == 0 || frames.values.len() != expected {
            return Err(ModelError::invalid(
                "frames.values",
                format!(
                    "{} values for frame_count {} x n_mels {} (frame_count must be >= 1)",
                    frames.values.len(),
                    frames.frame_count,
                    self.n_mels
                ),
            ));
        }
        if let Some(bad) = frames.values.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::invalid(
                "frames.values",
                format!("non-finite value {bad}"),
            ));
        }
        self.frames_received += u64::from(frames.frame_count);
        let limit = self.context.max_audio_seconds;
        if limit > 0.0 && self.frames_received as f64 / FRAMES_PER_SECOND > limit + 0.05 {
            return Err(ModelError::LimitReached {
                limit: "max_audio_seconds",
                value: limit.to_string(),
                hint: "the stream's audio is longer than this service accepts",
            });
        }
        if self.timestamps() {
            self.all_frames.extend_from_slice(&frames.values);
        }
        let mut values = frames.values.as_slice();
        while !values.is_empty() {
            let room = WINDOW_FRAMES * self.n_mels - self.pending.len();
            let take = room.min(values.len());
            self.pending.extend_from_slice(&values[..take]);
            values = &values[take..];
            if self.pending.len() == WINDOW_FRAMES * self.n_mels {
                self.cut_window();
            }
        }
        self.maybe_partial().await
    }

    /// The window being filled is complete (or the stream ended): queue it.
    fn cut_window(&mut self) {
        let raw = std::mem::take(&mut self.pending);
        let index = self.windows_cut;
        self.windows_cut += 1;
        self.partial = PartialState {
            queued_at_frames: self.frames_received,
            ..PartialState::default()
        };
        if !self.timestamps() {
            self.queued
                .push_back((index, normalize_window(&raw, self.n_mels)));
        }
    }

    fn end_of_frames(&mut self) {
        if !self.pending.is_empty() {
            self.short_last_window = Some(self.windows_cut);
            self.cut_window();
        }
        self.partial.answer = None;
    }

    /// Frames of audio content (the extractor's trailing frames off).
    fn content_frames(&self) -> u64 {
        self.frames_received.saturating_sub(TRAILING_FRAMES)
    }

    fn audio_seconds(&self) -> f64 {
        self.content_frames() as f64 / FRAMES_PER_SECOND
    }

    /// Queues cut windows while the stream's in-flight budget allows: one until the language
    /// is known (the first window detects it for the whole stream), then several.
    async fn submit_queued(&mut self) -> Result<(), ModelError> {
        loop {
            let budget = if self.language.is_some() {
                self.context.windows_in_flight.max(1)
            } else {
                1
            };
            if self.in_flight.len() >= budget {
                return Ok(());
            }
            let Some((index, window)) = self.queued.pop_front() else {
                return Ok(());
            };
            let answer = self
                .context
                .engine
                .submit_window(
                    window,
                    self.options.clone(),
                    self.context.options.adapter.clone(),
                    true,
                )
                .await?;
            self.in_flight.push_back(Box::pin(async move {
                let result = answer.await.unwrap_or(Err(ModelError::ShuttingDown));
                (index, result)
            }));
        }
    }

    async fn on_window(
        &mut self,
        index: u32,
        transcript: WindowTranscript,
    ) -> Result<(), ModelError> {
        if self.language.is_none() {
            self.language = transcript.language.clone();
            self.options = Arc::new(DecodeOptions {
                language: self.language.clone(),
                ..(*self.options).clone()
            });
        }
        if transcript.silent {
            return Ok(());
        }
        let window_seconds = WINDOW_FRAMES as f64 / FRAMES_PER_SECOND;
        let start = f64::from(index) * window_seconds;
        let end = if self.short_last_window == Some(index) {
            // The stream's last window ends where the audio ends.
            self.audio_seconds().clamp(start, start + window_seconds)
        } else {
            start + window_seconds
        };
        let segment = pb::Segment {
            id: self.segments_sent,
            start_seconds: start,
            end_seconds: end,
            text: transcript.text.trim().to_string(),
            token_ids: transcript.tokens.iter().map(|&t| t as u32).collect(),
            avg_logprob: transcript.avg_logprob as f32,
            compression_ratio: transcript.compression_ratio as f32,
            no_speech_prob: transcript.no_speech_prob.unwrap_or(0.0) as f32,
            temperature: transcript.temperature as f32,
            language: transcript.language.unwrap_or_default(),
            window_index: index,
        };
        self.send_segment(segment).await
    }

    async fn decode_long_form(&mut self) -> Result<(), ModelError> {
        if self.frames_received == 0 {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.all_frames);
        let segments = self
            .context
            .engine
            .long_form(
                frames,
                self.content_frames() as usize,
                self.options.clone(),
                self.context.options.adapter.clone(),
            )
            .await?;
        // Detected on the first window when the request gave none.
        if self.language.is_none() {
            self.language = segments.iter().find_map(|s| s.language.clone());
        }
        let language = self.language.clone().unwrap_or_default();
        for s in segments {
            let segment = pb::Segment {
                id: self.segments_sent,
                start_seconds: s.start,
                end_seconds: s.end.max(s.start),
                text: s.text.trim().to_string(),
                token_ids: s.tokens.iter().map(|&t| t as u32).collect(),
                avg_logprob: s.avg_logprob as f32,
                no_speech_prob: s.no_speech_prob.unwrap_or(0.0) as f32,
                compression_ratio: asr_whisper::fallback::compression_ratio(&s.text) as f32,
                language: language.clone(),
                window_index: s.window_index as u32,
                ..Default::default()
            };
            self.send_segment(segment).await?;
        }
        Ok(())
    }

    async fn send_segment(&mut self, segment: pb::Segment) -> Result<(), ModelError> {
        self.segments_sent += 1;
        self.send(pb::transcribe_response::Event::Segment(segment))
            .await
    }

    /// Queues a re-decode of the window being filled when enough new audio arrived.
    async fn maybe_partial(&mut self) -> Result<(), ModelError> {
        let Some(interval) = self.context.options.partial_interval_seconds else {
            return Ok(());
        };
        let due = (self.frames_received - self.partial.queued_at_frames) as f64
            >= interval * FRAMES_PER_SECOND;
        if self.pending.is_empty() || self.partial.answer.is_some() || !due {
            return Ok(());
        }
        self.partial.queued_at_frames = self.frames_received;
        let options = Arc::new(DecodeOptions {
            language: self.language.clone(),
            ..(*self.options).clone().without_fallback()
        });
        let window = normalize_window(&self.pending, self.n_mels);
        // A full queue skips this partial decode rather than failing the stream.
        match self
            .context
            .engine
            .submit_window(window, options, self.context.options.adapter.clone(), false)
            .await
        {
            Ok(answer) => self.partial.answer = Some(answer),
            Err(ModelError::LimitReached { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn on_partial(&mut self, transcript: WindowTranscript) -> Result<(), ModelError> {
        let text = transcript
            .text
            .trim()
            .trim_end_matches('\u{fffd}')
            .to_string();
        let agreed = common_prefix(&self.partial.previous_text, &text);
        if agreed.chars().count() > self.partial.stable_text.chars().count()
            && agreed.starts_with(&self.partial.stable_text)
        {
            self.partial.stable_text = agreed.to_string();
        }
        let unstable = text
            .strip_prefix(&self.partial.stable_text)
            .unwrap_or(&text)
            .to_string();
        self.partial.previous_text = text;
        let window_index = self.windows_cut;
        let partial = pb::PartialTranscript {
            stable_text: self.partial.stable_text.clone(),
            unstable_text: unstable,
            audio_seconds: self.audio_seconds(),
            start_seconds: f64::from(window_index) * WINDOW_FRAMES as f64 / FRAMES_PER_SECOND,
            window_index,
        };
        self.send(pb::transcribe_response::Event::Partial(partial))
            .await
    }

    async fn send_summary(&mut self) -> Result<(), ModelError> {
        let audio_seconds = self.audio_seconds();
        let processing_seconds = self.context.started.elapsed().as_secs_f64();
        let adapter = self.context.options.adapter.clone();
        let summary = pb::TranscriptionSummary {
            audio_seconds,
            processing_seconds,
            real_time_factor: if audio_seconds > 0.0 {
                processing_seconds / audio_seconds
            } else {
                0.0
            },
            model_name: self.context.model.name.clone(),
            precision: self.context.precision as i32,
            adapter: adapter.as_ref().map(|a| a.name.clone()).unwrap_or_default(),
            adapter_scale: adapter.as_ref().map_or(0.0, |a| a.scale as f32),
            language: self.language.clone().unwrap_or_default(),
            language_probability: None,
            segment_count: self.segments_sent,
            window_count: self.frames_received.div_ceil(WINDOW_FRAMES as u64) as u32,
        };
        let metrics = &self.context.metrics;
        metrics.add(
            "asr_model_audio_seconds_total",
            "Audio transcribed, seconds.",
            vec![],
            audio_seconds,
        );
        metrics.add(
            "asr_model_processing_seconds_total",
            "Wall time of finished Transcribe streams, seconds.",
            vec![],
            processing_seconds,
        );
        if audio_seconds > 0.0 {
            metrics.observe(
                "asr_model_real_time_factor",
                "Processing seconds per audio second of each Transcribe stream.",
                vec![],
                &[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0],
                processing_seconds / audio_seconds,
            );
        }
        self.send(pb::transcribe_response::Event::Summary(summary))
            .await
    }

    async fn send(&mut self, event: pb::transcribe_response::Event) -> Result<(), ModelError> {
        // A client that went away ends the stream quietly; its queued work is dropped.
        let _ = self
            .events
            .send(Ok(pb::TranscribeResponse { event: Some(event) }))
            .await;
        Ok(())
    }
}

async fn wait_partial(
    answer: &mut Option<WindowAnswer>,
) -> Result<Result<WindowTranscript, ModelError>, oneshot::error::RecvError> {
    match answer {
        Some(receiver) => receiver.await,
        None => std::future::pending().await,
    }
}

/// Longest common prefix of two strings, by characters.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    // `end` can exceed b's length in bytes only when a is a prefix of b: clamp on a.
    &a[..end.min(a.len())]
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_by_characters() {
        assert_eq!(common_prefix("一二三", "一二四"), "一二");
        assert_eq!(common_prefix("一二", "一二三"), "一二");
        assert_eq!(common_prefix("一二三", "一二"), "一二");
        assert_eq!(common_prefix("", "x"), "");
    }
}
