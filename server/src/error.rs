//! The domain error. The gRPC layer maps each variant to one status code in
//! exactly one place (`grpc::status`). This module depends on nothing else
//! in the crate, so every layer can use it without a cycle.

/// What can go wrong in the domain core, by the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a limit; `field` names the input.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The offending field, e.g. `tasks[0].payload`.
        field: String,
        /// What is wrong, naming the limit where there is one.
        message: String,
    },
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A size, count or rate limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The named thing exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller presented no valid credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role or scope does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A position (an event sequence) outside what is kept.
    #[error("{0}")]
    OutOfRange(String),
    /// The server is shutting down or its core has stopped.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl Error {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// Prefixes the field named by a validation error with `prefix` (for
    /// nested inputs such as `tasks[3]`). Validation's `ResourceExhausted`
    /// messages start with their field, so they get the prefix too.
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, message } => {
                Self::InvalidArgument { field: format!("{prefix}.{field}"), message }
            }
            Self::ResourceExhausted(message) => Self::ResourceExhausted(format!("{prefix}.{message}")),
            other => other,
        }
    }
}

/// A failure of the storage engine or of a stored record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine reported an error.
    #[error("storage engine: {0}")]
    Engine(String),
    /// A record could not be encoded or decoded.
    #[error("record codec: {0}")]
    Codec(String),
    /// The store cannot be opened as asked: missing, or in use.
    #[error("{0}")]
    Unavailable(String),
    /// A reading of the whole store could not start or go on (another is
    /// under way, or the writes outran it); retrying later can succeed.
    #[error("{0}")]
    Conflict(String),
    /// A write refused because this server no longer holds the leader
    /// lease it wrote under (PostgreSQL store with replicas).
    #[error("{0}")]
    Fenced(String),
}
