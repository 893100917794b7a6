//! Fuzz targets: functions that take arbitrary bytes and must never panic, hang or allocate
//! without bound, whatever the bytes are. Errors are fine; a panic is a bug.
//!
//! The cargo-fuzz crate in `fuzz/` calls each of them from a `fuzz_targets/NAME.rs`, and
//! `tests/regressions.rs` replays every input kept under `fuzz/regressions/NAME/` and
//! `fuzz/seeds/NAME/` through them in the normal `cargo test`. `scripts/fuzz.sh` runs them.
//!
//! Some targets also assert properties of the output (lengths, finiteness) that the library
//! promises: a broken promise is reported the same way as a panic.

mod audio;
mod feature_requests;
mod input;
mod model_requests;
mod pipeline;

pub use audio::{audio_container, audio_mel, audio_pcm, audio_resample};
pub use feature_requests::feature_requests;
pub use model_requests::model_requests;
pub use pipeline::audio_pipeline;

/// A fuzz target: bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` and the corpus folders name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("audio_container", audio_container),
    ("audio_pcm", audio_pcm),
    ("audio_resample", audio_resample),
    ("audio_mel", audio_mel),
    ("audio_pipeline", audio_pipeline),
    ("feature_requests", feature_requests),
    ("model_requests", model_requests),
];
