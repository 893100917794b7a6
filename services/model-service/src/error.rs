//! The model service's errors and their single mapping to gRPC status codes.

use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request field is malformed; `field` is its path in the request (e.g.
    /// `config.options.decoding.beam_size`).
    #[error("{field}: {description}")]
    InvalidField { field: String, description: String },
    #[error("config: the first message of the stream must be a config")]
    ConfigNotFirst,
    #[error("config: the stream ended before its config message")]
    MissingConfig,
    #[error("config: sent twice; a config is allowed only as the first message")]
    DuplicateConfig,
    #[error("{what} {name:?} not found")]
    NotFound { what: &'static str, name: String },
    #[error("{what} {name:?} already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit of this service; `limit` names it as ModelLimits does.
    #[error("{limit} reached ({value}): {hint}")]
    LimitReached {
        limit: &'static str,
        value: String,
        hint: &'static str,
    },
    #[error("the model is still loading; retry shortly")]
    Loading,
    #[error("no model is loaded: start the model service with --model DIR")]
    NoModel,
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    #[error("the model service is shutting down")]
    ShuttingDown,
    #[error("client stream failed: {0}")]
    ClientStream(Status),
    /// A failure inside the model or on disk: not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ModelError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            description: description.into(),
        }
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{err:#}"))
    }
}

fn bad_request(field: &str, message: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

impl From<ModelError> for Status {
    fn from(err: ModelError) -> Status {
        let message = err.to_string();
        match err {
            ModelError::Config(_) | ModelError::FailedPrecondition(_) | ModelError::NoModel => {
                Status::failed_precondition(message)
            }
            ModelError::InvalidField { field, .. } => bad_request(&field, message),
            ModelError::ConfigNotFirst
            | ModelError::MissingConfig
            | ModelError::DuplicateConfig => bad_request("config", message),
            ModelError::NotFound { .. } => Status::not_found(message),
            ModelError::AlreadyExists { .. } => Status::already_exists(message),
            ModelError::LimitReached { .. } => Status::resource_exhausted(message),
            ModelError::Loading | ModelError::ShuttingDown => Status::unavailable(message),
            ModelError::LoadFailed(_) | ModelError::Internal(_) => Status::internal(message),
            ModelError::ClientStream(status) => Status::new(status.code(), message),
        }
    }
}
