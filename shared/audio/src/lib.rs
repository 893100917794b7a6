//! Audio input for Whisper, shared by the feature service, the model service and the CLI.
//!
//! The data path is `bytes -> samples -> 16 kHz mono -> raw log-mel frames -> normalised
//! 30 s windows`:
//! - [`format`]: what the bytes are (raw PCM described by the client, or a container detected
//!   from its first bytes);
//! - [`pcm`] and [`decode`]: bytes to interleaved `f32` samples (raw PCM parsing, symphonia);
//! - [`resample`]: downmix and rubato resampling to 16 kHz;
//! - [`mel`]: streaming log10 mel power frames (n_fft 400, hop 160), exactly as HF computes them;
//! - [`window`]: Whisper's per-window normalisation over 3000 frames;
//! - [`pipeline`]: all of the above driven from one `Read` source, chunking-invariant;
//! - [`npy`]: the `.npy` files the CLI and the differential tests exchange.

pub mod decode;
pub mod error;
pub mod format;
pub mod mel;
pub mod npy;
pub mod pcm;
pub mod pipeline;
pub mod resample;
pub mod window;

pub use error::AudioError;
pub use format::{Container, InputFormat, PcmSpec, SampleFormat};
pub use mel::{LogMelExtractor, MelConfig, MelFilterBank};
pub use pipeline::{FeaturePipeline, PipelineConfig, PipelineEvent, StreamInfo, StreamSummary};
pub use window::{normalize_window, windows_from_frames};

/// Whisper's input sample rate.
pub const SAMPLE_RATE: u32 = 16_000;
/// STFT window length in samples (25 ms).
pub const N_FFT: usize = 400;
/// STFT hop in samples (10 ms): 100 frames per second.
pub const HOP_LENGTH: usize = 160;
/// Samples in one 30 s model window.
pub const WINDOW_SAMPLES: usize = 480_000;
/// Frames in one 30 s model window.
pub const WINDOW_FRAMES: usize = WINDOW_SAMPLES / HOP_LENGTH;
/// Raw log-mel value of a frame with no energy: `log10(max(0, 1e-10))`. Frames past the end of
/// the audio inside its last window have this value, as HF's zero padding gives them.
pub const SILENT_LOG_MEL: f32 = -10.0;
