//! The feature service's errors and their single mapping to gRPC status codes.

use asr_audio::AudioError;
use bytes::Bytes;
use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Error)]
pub enum FeatureError {
    #[error("{field}: {description}")]
    InvalidField {
        field: &'static str,
        description: String,
    },
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error("config: the first message of the stream must be a config, got audio")]
    ConfigNotFirst,
    #[error("config: the stream ended before its config message")]
    MissingConfig,
    #[error("config: sent twice; a config is allowed only as the first message")]
    DuplicateConfig,
    #[error("too many concurrent streams on this replica (max_concurrent_streams={limit})")]
    TooManyStreams { limit: usize },
    #[error("client stream failed: {0}")]
    ClientStream(Status),
    #[error(
        "no model service configured: start the feature service with --model-service URL \
         (or ASR_MODEL_SERVICE) to transcribe"
    )]
    NoModelService,
    /// The model service could not be reached, or the connection to it broke.
    #[error("model service at {address} is unavailable: {reason}")]
    ModelServiceUnavailable { address: String, reason: String },
    /// The model service reports a mel count the feature path cannot compute.
    #[error("the model service at {address} reports n_mels={n_mels}; the feature path computes 80 or 128")]
    UnsupportedModelMels { address: String, n_mels: u32 },
    /// The model service refused this service's own credentials: not the client's fault, so
    /// not relayed as UNAUTHENTICATED / PERMISSION_DENIED (which would send the client
    /// looking at its token).
    #[error(
        "the model service at {address} refused this feature service's credentials \
         (--model-service-token-file, --model-service-tls-*): {reason}"
    )]
    ModelServiceRefusedCredentials { address: String, reason: String },
    /// A status the model service sent: relayed unchanged (code, message, details).
    #[error("{}", .0.message())]
    ModelService(Status),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl FeatureError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            description: description.into(),
        }
    }
}

fn bad_request(field: &str, message: String) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

impl From<FeatureError> for Status {
    fn from(err: FeatureError) -> Status {
        let message = err.to_string();
        match err {
            FeatureError::InvalidField { field, .. } => bad_request(field, message),
            FeatureError::ConfigNotFirst
            | FeatureError::MissingConfig
            | FeatureError::DuplicateConfig => bad_request("config", message),
            FeatureError::TooManyStreams { .. } => Status::resource_exhausted(message),
            FeatureError::ClientStream(status) => Status::new(status.code(), message),
            FeatureError::NoModelService | FeatureError::UnsupportedModelMels { .. } => {
                Status::failed_precondition(message)
            }
            FeatureError::ModelServiceUnavailable { .. } => Status::unavailable(message),
            FeatureError::ModelServiceRefusedCredentials { .. } => Status::internal(message),
            // The model service's BadRequest field paths (`config.options.*`) are those of
            // this request too: TranscribeAudioConfig.options sits where
            // TranscribeFramesConfig.options does.
            FeatureError::ModelService(status) => Status::with_details(
                status.code(),
                status.message(),
                Bytes::copy_from_slice(status.details()),
            ),
            FeatureError::Internal(_) => Status::internal(message),
            FeatureError::Audio(audio) => match audio {
                AudioError::InvalidSampleRate { .. } => {
                    bad_request("config.format.raw_pcm.sample_rate_hz", message)
                }
                AudioError::InvalidChannels { .. } => {
                    bad_request("config.format.raw_pcm.channels", message)
                }
                AudioError::InvalidMelCount(_) => bad_request("config.n_mels", message),
                AudioError::NonFiniteSample { .. }
                | AudioError::SampleOutOfRange { .. }
                | AudioError::TruncatedPcm { .. }
                | AudioError::UnrecognisedContainer(_)
                | AudioError::NoAudioTrack(_)
                | AudioError::Decode(_)
                | AudioError::Empty => bad_request("audio", message),
                AudioError::TooLong { .. } => Status::resource_exhausted(message),
                AudioError::Cancelled => Status::cancelled(message),
                AudioError::Io(_) | AudioError::Resample(_) => Status::internal(message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(FeatureError::Audio(AudioError::InvalidSampleRate {
            got: 0,
            max: 384_000,
        }));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert_eq!(violations[0].field, "config.format.raw_pcm.sample_rate_hz");
    }

    #[test]
    fn model_service_statuses_are_relayed_unchanged() {
        let sent = Status::with_error_details(
            Code::InvalidArgument,
            "config.options.language: unknown language \"xx\"",
            ErrorDetails::with_bad_request_violation("config.options.language", "unknown"),
        );
        let relayed = Status::from(FeatureError::ModelService(sent));
        assert_eq!(relayed.code(), Code::InvalidArgument);
        assert_eq!(
            relayed.message(),
            "config.options.language: unknown language \"xx\""
        );
        let details = relayed.get_error_details();
        let violations = &details.bad_request().expect("details").field_violations;
        assert_eq!(violations[0].field, "config.options.language");
    }

    #[test]
    fn limits_are_resource_exhausted() {
        let status = Status::from(FeatureError::Audio(AudioError::TooLong {
            limit_seconds: 1.0,
        }));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("max_audio_seconds"));
    }
}
