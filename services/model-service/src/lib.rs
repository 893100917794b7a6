//! The model service: Whisper (int8, with LoRA adapters) on libtorch behind gRPC.
//!
//! This version serves the API surface, health and reflection, picks the compute device and
//! reports it; Transcribe, datasets, training and adapters arrive with the model core
//! (issues 3-5) and answer UNIMPLEMENTED until then.

pub mod config;
pub mod device;
pub mod error;
pub mod server;

pub use config::{ModelServiceConfig, Precision};
pub use error::ModelError;
pub use server::{serve, ModelServer};
