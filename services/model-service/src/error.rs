//! The model service's errors and their single mapping to gRPC status codes.

use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0} is not implemented by this version of the model service")]
    NotImplemented(&'static str),
}

impl From<ModelError> for Status {
    fn from(err: ModelError) -> Status {
        let message = err.to_string();
        match err {
            ModelError::Config(_) => Status::failed_precondition(message),
            ModelError::NotImplemented(_) => Status::unimplemented(message),
        }
    }
}
