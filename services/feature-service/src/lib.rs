//! The feature service: decodes any audio a client streams, resamples it to 16 kHz and
//! streams Whisper log-mel frames back as soon as each is complete. Stateless: replicas can
//! run side by side behind one address.
//!
//! - [`config`]: limits and defaults, validated once at start-up;
//! - [`convert`]: proto messages to typed requests, with errors naming the field;
//! - [`error`]: this layer's error enum and its one mapping to `tonic::Status`;
//! - [`extract`]: the Extract stream: inbound bytes -> blocking pipeline -> outbound frames;
//! - [`server`]: the tonic server with health and reflection.

pub mod config;
pub mod convert;
pub mod error;
mod extract;
mod reader;
pub mod server;

pub use config::FeatureServiceConfig;
pub use error::FeatureError;
pub use server::{serve, FeatureServer};
