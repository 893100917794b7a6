//! The model service: Whisper (int8, with LoRA adapters) on libtorch behind gRPC.
//!
//! - [`engine`]: the batching scheduler, one thread owning the model;
//! - [`transcribe`]: one Transcribe stream (windows, partial results, segments);
//! - [`options`]: request options validated into decoding settings;
//! - [`registry`]: the adapter registry on disk; [`datasets`], [`ingest`]: the dataset
//!   store and IngestExamples;
//! - [`training`]: LoRA training jobs (validated, persisted, resumed after a restart);
//! - [`store`]: atomic writes and listing shared by the on-disk stores;
//! - [`server`]: the gRPC surface; [`access`]: the scope each method needs.

pub mod access;
pub mod config;
pub mod datasets;
pub mod device;
pub mod engine;
pub mod error;
pub mod ingest;
pub mod options;
pub mod registry;
pub mod server;
pub mod store;
pub mod training;
pub mod transcribe;

pub use config::{ModelServiceConfig, Precision};
pub use error::ModelError;
pub use server::{serve, serve_server, ModelServer};
