//! The client's side of an audio stream, shared by Extract and Transcribe: a config message
//! first, then audio chunks forwarded over a bounded channel to the blocking pipeline.

use asr_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::convert::ByteLayout;
use crate::error::FeatureError;
use crate::reader::AbortSlot;

/// Audio messages buffered between tonic and the decoder.
const INBOUND_CHUNKS: usize = 8;

/// What one request message of an audio stream carries.
pub enum Part<C> {
    Config(C),
    Audio(Vec<u8>),
    /// A message with no payload: tolerated as an empty chunk.
    Empty,
}

/// A request message of an audio stream (ExtractRequest, TranscribeAudioRequest).
pub trait AudioRequest: Send + 'static {
    type Config;
    fn into_part(self) -> Part<Self::Config>;
}

impl AudioRequest for pb::ExtractRequest {
    type Config = pb::ExtractConfig;
    fn into_part(self) -> Part<Self::Config> {
        use pb::extract_request::Payload;
        match self.payload {
            Some(Payload::Config(config)) => Part::Config(config),
            Some(Payload::Audio(bytes)) => Part::Audio(bytes),
            None => Part::Empty,
        }
    }
}

impl AudioRequest for pb::TranscribeAudioRequest {
    type Config = pb::TranscribeAudioConfig;
    fn into_part(self) -> Part<Self::Config> {
        use pb::transcribe_audio_request::Payload;
        match self.payload {
            Some(Payload::Config(config)) => Part::Config(config),
            Some(Payload::Audio(bytes)) => Part::Audio(bytes),
            None => Part::Empty,
        }
    }
}

/// Reads the config message that must open the stream.
pub async fn read_config<M: AudioRequest>(
    inbound: &mut Streaming<M>,
) -> Result<M::Config, FeatureError> {
    match inbound.message().await {
        Ok(Some(message)) => match message.into_part() {
            Part::Config(config) => Ok(config),
            Part::Audio(_) | Part::Empty => Err(FeatureError::ConfigNotFirst),
        },
        Ok(None) => Err(FeatureError::MissingConfig),
        Err(status) => Err(FeatureError::ClientStream(status)),
    }
}

/// The bounded channel between [`forward_audio`] and the pipeline's reader.
pub fn channel() -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    mpsc::channel(INBOUND_CHUNKS)
}

/// Forwards the audio bytes of `inbound` to the pipeline's reader until the client half-closes.
/// Protocol errors are recorded in `abort` so the pipeline reports them.
pub async fn forward_audio<M: AudioRequest>(
    mut inbound: Streaming<M>,
    chunks: mpsc::Sender<Vec<u8>>,
    layout: ByteLayout,
    abort: AbortSlot,
) {
    loop {
        let bytes = match inbound.message().await {
            Ok(Some(message)) => match message.into_part() {
                Part::Audio(bytes) => bytes,
                Part::Config(_) => {
                    abort.set(FeatureError::DuplicateConfig);
                    return;
                }
                Part::Empty => continue,
            },
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
