//! The one error type of the SDK, shared by the [`Client`](crate::Client) and
//! the [`Agent`](crate::Agent) runtime.

/// Why an SDK call failed.
///
/// `Status` keeps the server's [`tonic::Status`] whole, so callers can branch
/// on its `code()` (for example `NOT_FOUND` or `ALREADY_EXISTS`) and show its
/// `message()`, which names the offending field and limit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection to the server could not be made or broke; the cause
    /// is in [`source`](std::error::Error::source).
    #[error("connection to the server failed")]
    Transport(#[from] tonic::transport::Error),
    /// The server answered with an error status.
    #[error("server returned {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(#[from] tonic::Status),
    /// The endpoint is not a usable `http://host:port` address.
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    /// The server broke the protocol (for example a missing field or an
    /// unexpected first message).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A value could not be encoded as JSON.
    #[error("json encoding failed: {0}")]
    Json(#[from] serde_json::Error),
    /// The agent was built with a configuration it cannot run with.
    #[error("invalid agent configuration: {0}")]
    InvalidConfig(String),
    /// The `/metrics` endpoint could not listen on its address.
    #[error("cannot serve metrics on {address}")]
    MetricsListen {
        /// The address asked for.
        address: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// `err` followed by each of its causes, separated by `: `, for log lines
/// (which show only `Display`, not the source chain).
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_error_keeps_code_and_message() {
        let err = Error::from(tonic::Status::not_found("task 42 not found"));
        match &err {
            Error::Status(status) => {
                assert_eq!(status.code(), tonic::Code::NotFound);
                assert_eq!(status.message(), "task 42 not found");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(err.to_string(), "server returned NotFound: task 42 not found");
    }

    #[test]
    fn error_chain_appends_causes() {
        let io = std::io::Error::other("connection refused");
        let err = Error::Protocol("no registration".to_owned());
        assert_eq!(error_chain(&err), "protocol error: no registration");
        assert_eq!(error_chain(&WrapErr(io)), "tcp connect: connection refused");
    }

    #[derive(Debug)]
    struct WrapErr(std::io::Error);

    impl std::fmt::Display for WrapErr {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect")
        }
    }

    impl std::error::Error for WrapErr {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
