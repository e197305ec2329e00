//! The one mapping from domain errors to gRPC statuses.

use tonic::Status;

use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Store(_) => Status::internal(message),
        }
    }
}
