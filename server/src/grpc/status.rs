//! The one mapping from domain errors to gRPC statuses.

use tonic::Status;

use crate::error::{Error, StoreError};

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument { .. } => Status::invalid_argument(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::AlreadyExists(_) => Status::already_exists(message),
            Error::OutOfRange(_) => Status::out_of_range(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Store(StoreError::Conflict(_)) => Status::aborted(message),
            Error::Store(StoreError::Unavailable(_) | StoreError::Fenced(_)) => Status::unavailable(message),
            Error::Store(_) => Status::internal(message),
        }
    }
}

/// What tonic says about a request message it could not read, restated as
/// the caller's error: undecodable bytes are `INVALID_ARGUMENT` (tonic says
/// INTERNAL) and a message over the size limit is `RESOURCE_EXHAUSTED`
/// naming `max_message_bytes` (tonic says OUT_OF_RANGE). Any other status
/// is returned as it is.
pub(crate) fn inbound(status: Status, max_message_bytes: usize) -> Status {
    const UNDECODABLE: &str = "failed to decode Protobuf message";
    const TOO_LARGE: &str = "decoded message length too large";
    match status.code() {
        tonic::Code::Internal if status.message().starts_with(UNDECODABLE) => Status::invalid_argument(format!(
            "the request is not a valid protobuf message for this method ({})",
            status.message()
        )),
        tonic::Code::OutOfRange if status.message().contains(TOO_LARGE) => Status::resource_exhausted(format!(
            "the message is larger than max_message_bytes ({max_message_bytes} bytes)"
        )),
        _ => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_requests_become_the_callers_error() {
        let decode = <prost_types::Duration as prost::Message>::decode(&[0x0f][..]).err().map(|e| e.to_string());
        let decode = decode.unwrap_or_default();
        let status = inbound(Status::internal(decode), 16);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = inbound(
            Status::out_of_range("Error, decoded message length too large: found 20 bytes, the limit is: 16 bytes"),
            16,
        );
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("max_message_bytes (16 bytes)"), "{}", status.message());
        let status = inbound(Status::internal("store: disk full"), 16);
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
