//! The feature service: decodes any audio a client streams, resamples it to 16 kHz and
//! streams Whisper log-mel frames back as soon as each is complete. Stateless: replicas can
//! run side by side behind one address.
//!
//! - [`access`]: the scope each method needs when bearer tokens are checked;
//! - [`config`]: limits and defaults, validated once at start-up;
//! - [`convert`]: proto messages to typed requests, with errors naming the field;
//! - [`error`]: this layer's error enum and its one mapping to `tonic::Status`;
//! - [`inbound`]: a client's audio stream (config first, then bytes) fed to the pipeline;
//! - [`extract`]: the Extract stream: inbound bytes -> blocking pipeline -> outbound frames;
//! - [`relay`]: the Transcribe stream: the same frames relayed to the model service, its
//!   events relayed back;
//! - [`ingest_relay`] and [`ingest_examples`]: the Ingest stream: each example's audio decoded
//!   to frames and sent to the model service's dataset store, its acks relayed back in order;
//! - [`model_link`]: the lazily connecting channel to the model service and its errors;
//! - `asr_runtime::trace_context`: OpenTelemetry context in and out of gRPC metadata;
//! - [`server`]: the tonic server with health and reflection.

pub mod access;
pub mod config;
pub mod convert;
pub mod error;
mod extract;
mod inbound;
mod ingest_examples;
mod ingest_relay;
mod model_link;
mod reader;
mod relay;
pub mod server;
use asr_runtime::trace_context;

pub use config::FeatureServiceConfig;
pub use error::FeatureError;
/// Validation that lives in private modules, reachable by the fuzz targets
/// (`shared/fuzz-targets`); not an API.
#[doc(hidden)]
pub use ingest_relay::default_format as ingest_default_format;
pub use server::{serve, FeatureServer};
