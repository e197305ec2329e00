//! The domain model: tasks, attempts, events and agents as the server sees
//! them. These are not the wire structs; `grpc::convert` maps between the
//! two. Every type here is what the store persists. This file holds time
//! and ids; `task`, `fleet` and `log` the rest, all re-exported here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// Milliseconds since the Unix epoch: every persisted instant.
pub type Millis = u64;

/// The wall clock now, in [`Millis`] (0 before 1970).
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
}

/// Text that is not a valid id; converts into an invalid-argument error
/// naming the kind of id.
#[derive(Clone, Debug, thiserror::Error)]
#[error("'{text}' is not a valid {what} (26 characters, Crockford base32)")]
pub struct InvalidId {
    /// The kind of id, e.g. "task id".
    pub what: &'static str,
    /// The text given.
    pub text: String,
}

impl From<InvalidId> for crate::error::Error {
    fn from(e: InvalidId) -> Self {
        Self::invalid(e.what, e.to_string())
    }
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub Ulid);

        impl $name {
            /// The 16 big-endian bytes, which sort like the id.
            pub fn to_bytes(self) -> [u8; 16] {
                self.0.to_bytes()
            }

            /// The inverse of [`Self::to_bytes`].
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Ulid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ulid::from_string(s.trim()).map(Self).map_err(|_| InvalidId { what: $what, text: s.to_owned() })
            }
        }
    };
}

ulid_id!(
    /// A task's id: a ULID, so ids sort by creation time.
    TaskId,
    "task id"
);
ulid_id!(
    /// An agent session's id, stable across resumes.
    AgentId,
    "agent id"
);
ulid_id!(
    /// A workflow's id: the tasks of one graph submit share it.
    WorkflowId,
    "workflow id"
);

mod fleet;
mod log;
mod task;

pub use fleet::*;
pub use log::*;
pub use task::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings_and_bytes() {
        let id = TaskId(Ulid::new());
        assert_eq!(id.to_string().parse::<TaskId>().ok(), Some(id));
        assert_eq!(TaskId::from_bytes(id.to_bytes()), id);
        let err = "nope".parse::<TaskId>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("task id"), "{err}");
    }
}
