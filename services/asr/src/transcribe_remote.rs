//! `asr transcribe --server URL`: the audio is streamed to a feature service
//! (FeatureService.Transcribe), which decodes it and relays frames to the model service; the
//! transcript events come back and are printed like the local results.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;
use tracing::Instrument;

use anyhow::Context;
use asr_audio::decode::EncodedDecoder;
use asr_audio::Container;
use asr_proto::v1 as pb;
use asr_runtime::AuthChannel;
use pb::feature_service_client::FeatureServiceClient;
use pb::transcribe_audio_request::Payload;
use pb::transcribe_response::Event;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::transcribe::{FileResult, SegmentOut, TaskArg, TranscribeArgs};

/// Requests buffered while the input is read.
const REQUEST_BUFFER: usize = 8;
/// Bytes per audio message when the input is sent as fast as it is read.
const CHUNK_BYTES: usize = 64 * 1024;
/// With --realtime, audio sent per message (and the pause between messages).
const REALTIME_STEP: Duration = Duration::from_millis(100);
/// Largest response message accepted.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Transcribes every file (or stdin for `-`) through the feature service at `args.server`.
pub fn run(args: &TranscribeArgs) -> anyhow::Result<Vec<FileResult>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(async {
        let channel = crate::net::connect(&args.server)
            .await
            .with_context(|| format!("--server: the feature service at {}", args.server))?;
        let mut results = Vec::new();
        for file in &args.files {
            let span = tracing::info_span!("asr transcribe", file = %display_name(file));
            let result = transcribe_one(channel.clone(), file, args)
                .instrument(span)
                .await
                .with_context(|| format!("transcribing {}", display_name(file)))?;
            results.push(result);
        }
        Ok(results)
    });
    // Do not wait for a reader blocked on stdin after an error.
    runtime.shutdown_background();
    results
}

/// A gRPC status as the CLI reports it: the server's message and the code.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

fn display_name(file: &Path) -> String {
    if is_stdin(file) {
        "<stdin>".to_string()
    } else {
        file.display().to_string()
    }
}

fn is_stdin(file: &Path) -> bool {
    file.as_os_str() == "-"
}

/// The options of the request, mapped from the CLI flags.
pub fn options(args: &TranscribeArgs) -> pb::TranscriptionOptions {
    let (temperature, fallback) = match args.temperature.split_first() {
        Some((first, rest)) => (*first as f32, rest.iter().map(|t| *t as f32).collect()),
        None => (0.0, Vec::new()),
    };
    let decoding = pb::DecodingOptions {
        beam_size: Some(args.beam),
        best_of: args.best_of as u32,
        seed: args.seed,
        temperature: Some(temperature),
        // A single temperature means no fallback (as --local does).
        temperature_increment: fallback.is_empty().then_some(0.0),
        temperature_fallback: fallback,
        // Negative turns the test off here; the API says 0 for that.
        compression_ratio_threshold: Some(args.compression_ratio_threshold.max(0.0) as f32),
        log_prob_threshold: Some(args.logprob_threshold as f32),
        no_speech_threshold: Some(args.no_speech_threshold as f32),
        ..Default::default()
    };
    pb::TranscriptionOptions {
        language: args.language.clone().unwrap_or_default(),
        task: match args.task {
            TaskArg::Transcribe => pb::Task::Transcribe,
            TaskArg::Translate => pb::Task::Translate,
        } as i32,
        decoding: Some(decoding),
        timestamps: args.timestamps,
        initial_prompt: args.initial_prompt.clone().unwrap_or_default(),
        condition_on_previous_text: Some(!args.no_condition_on_previous_text),
        adapter: args.adapter_name.clone().unwrap_or_default(),
        adapter_scale: args.adapter_scale,
        partial_results: args.partial || args.realtime,
        ..Default::default()
    }
}

async fn transcribe_one(
    channel: AuthChannel,
    file: &Path,
    args: &TranscribeArgs,
) -> anyhow::Result<FileResult> {
    let mut client =
        FeatureServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
    tx.send(pb::TranscribeAudioRequest {
        payload: Some(Payload::Config(pb::TranscribeAudioConfig {
            format: None,
            options: Some(options(args)),
        })),
    })
    .await?;
    let sender = if args.realtime {
        let bytes = read_all(file)?;
        let seconds = audio_seconds(&bytes);
        tokio::spawn(send_paced(bytes, seconds, tx))
    } else {
        let path = file.to_path_buf();
        tokio::task::spawn_blocking(move || send_as_read(&path, tx))
    };
    // The caller's trace: the feature and model services add their spans to it.
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    asr_runtime::trace_context::inject_current(request.metadata_mut());
    let mut stream = client
        .transcribe(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut live = LiveLine::new(args.partial || args.realtime);
    let mut segments = Vec::new();
    let mut summary = None;
    while let Some(response) = stream.message().await.map_err(status_error)? {
        match response.event {
            Some(Event::Partial(partial)) => live.partial(&partial),
            Some(Event::Segment(segment)) => {
                live.segment(&segment);
                segments.push(segment);
            }
            Some(Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    live.clear();
    sender.await??;
    let summary = summary.context("the stream ended without a summary")?;
    let language = Some(summary.language.clone())
        .filter(|l| !l.is_empty())
        .or_else(|| segments.first().map(|s| s.language.clone()));
    let segments: Vec<SegmentOut> = segments
        .into_iter()
        .map(|s| SegmentOut {
            start: s.start_seconds,
            end: s.end_seconds,
            text: s.text.trim().to_string(),
            avg_logprob: f64::from(s.avg_logprob),
            no_speech_prob: Some(f64::from(s.no_speech_prob)),
        })
        .collect();
    Ok(FileResult::new(display_name(file), language, segments))
}

fn read_all(file: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if is_stdin(file) {
        std::io::stdin().lock().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    }
    Ok(bytes)
}

/// Streams the input in chunks as fast as it is read (blocking thread). A closed channel (the
/// server gave up) ends the reading; the server's status says why.
fn send_as_read(file: &Path, tx: mpsc::Sender<pb::TranscribeAudioRequest>) -> anyhow::Result<()> {
    let mut input: Box<dyn Read> = if is_stdin(file) {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?)
    };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err).context("reading the audio"),
        };
        let request = pb::TranscribeAudioRequest {
            payload: Some(Payload::Audio(buf[..n].to_vec())),
        };
        if tx.blocking_send(request).is_err() {
            return Ok(());
        }
    }
}

/// The input's duration, decoded locally (no resampling, no features), to pace it; `None`
/// when it cannot be decoded here (the server then reports why).
fn audio_seconds(bytes: &[u8]) -> Option<f64> {
    let container = Container::sniff(&bytes[..bytes.len().min(64)])?;
    let mut decoder = EncodedDecoder::open(std::io::Cursor::new(bytes.to_vec()), container).ok()?;
    let rate = f64::from(decoder.sample_rate());
    let (mut frames, mut samples) = (0u64, Vec::new());
    while let Ok(Some(channels)) = decoder.next_packet(&mut samples) {
        frames += (samples.len() / channels.max(1) as usize) as u64;
        samples.clear();
    }
    (frames > 0 && rate > 0.0).then(|| frames as f64 / rate)
}

/// Sends the input as a live source would: the bytes of [`REALTIME_STEP`] of audio every
/// step, from the file's byte rate (length / duration).
async fn send_paced(
    bytes: Vec<u8>,
    seconds: Option<f64>,
    tx: mpsc::Sender<pb::TranscribeAudioRequest>,
) -> anyhow::Result<()> {
    let chunk = match seconds {
        Some(seconds) => {
            ((bytes.len() as f64 / seconds) * REALTIME_STEP.as_secs_f64()).ceil() as usize
        }
        None => {
            eprintln!("warning: cannot tell the audio's duration here; sending it unpaced");
            bytes.len()
        }
    };
    let mut ticks = tokio::time::interval(REALTIME_STEP);
    for piece in bytes.chunks(chunk.max(1)) {
        ticks.tick().await;
        let request = pb::TranscribeAudioRequest {
            payload: Some(Payload::Audio(piece.to_vec())),
        };
        if tx.send(request).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Partial results on stderr while they come: one line rewritten in place on a terminal
/// (the end of the text so far), one line per update otherwise.
struct LiveLine {
    enabled: bool,
    terminal: bool,
    committed: String,
    shown: bool,
}

/// Characters of the live text kept on the rewritten line.
const LIVE_CHARS: usize = 60;

impl LiveLine {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            terminal: std::io::stderr().is_terminal(),
            committed: String::new(),
            shown: false,
        }
    }

    fn partial(&mut self, partial: &pb::PartialTranscript) {
        if !self.enabled {
            return;
        }
        if self.terminal {
            let text = format!(
                "{}{}{}",
                self.committed, partial.stable_text, partial.unstable_text
            );
            let skip = text.chars().count().saturating_sub(LIVE_CHARS);
            let tail: String = text.chars().skip(skip).collect();
            eprint!("\r\x1b[2K{tail}");
            let _ = std::io::stderr().flush();
            self.shown = true;
        } else {
            eprintln!(
                "partial [{:.1}s]: {}|{}",
                partial.audio_seconds, partial.stable_text, partial.unstable_text
            );
        }
    }

    fn segment(&mut self, segment: &pb::Segment) {
        if self.enabled {
            self.committed.push_str(segment.text.trim());
        }
    }

    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
            self.shown = false;
        }
    }
}
