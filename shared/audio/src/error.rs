//! One error type for the audio layer; services map it to gRPC status codes in one place.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AudioError {
    #[error("sample_rate_hz must be between 1000 and {max} Hz, got {got}")]
    InvalidSampleRate { got: u32, max: u32 },
    #[error("channels must be between 1 and {max}, got {got}")]
    InvalidChannels { got: u32, max: u32 },
    #[error("n_mels must be 80 or 128, got {0}")]
    InvalidMelCount(u32),
    #[error("sample {index} of the raw PCM input is not finite ({value})")]
    NonFiniteSample { index: u64, value: f32 },
    #[error("raw PCM input ends inside a frame: {trailing_bytes} trailing bytes do not make a whole {frame_bytes}-byte frame")]
    TruncatedPcm {
        trailing_bytes: usize,
        frame_bytes: usize,
    },
    #[error(
        "audio format not recognised: the first bytes are not wav, flac, mp3, ogg or mp4 ({0})"
    )]
    UnrecognisedContainer(String),
    #[error("audio stream has no decodable audio track: {0}")]
    NoAudioTrack(String),
    #[error("audio could not be decoded: {0}")]
    Decode(String),
    #[error("audio stream is empty: no samples were received")]
    Empty,
    #[error("audio is longer than max_audio_seconds={limit_seconds}")]
    TooLong { limit_seconds: f64 },
    #[error("audio source failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("sample {index} is {value}: samples must be finite and within +-{max:e}")]
    SampleOutOfRange { index: u64, value: f32, max: f32 },
    #[error("resampler failed: {0}")]
    Resample(String),
    #[error("the consumer of the frames went away")]
    Cancelled,
}
