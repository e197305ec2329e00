//! Muster's wire contract: the `muster.v1` gRPC services and messages.
//!
//! The generated code lives in a private module and is re-exported as
//! [`pb`]. Domain code converts at the edge; these structs are not the
//! server's model.

mod generated {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("muster.v1");
}

pub mod trace_context;

/// The generated `muster.v1` types, clients and servers.
pub mod pb {
    pub use crate::generated::*;
}

/// The encoded `FileDescriptorSet` of `muster.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/muster_descriptor.bin"));

impl pb::AttemptRef {
    /// Builds a reference to attempt `attempt` of task `task_id`.
    pub fn new(task_id: impl Into<String>, attempt: u32) -> Self {
        Self { task_id: task_id.into(), attempt }
    }
}

impl pb::TaskState {
    /// True for SUCCEEDED, FAILED and CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The short upper-case name used in CLIs and JSON ("RUNNING").
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified => "UNSPECIFIED",
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::Assigned => "ASSIGNED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses a short name ("running", "RUNNING") or the full proto name.
    pub fn parse(s: &str) -> Option<Self> {
        let upper = s.trim().to_ascii_uppercase();
        let short = upper.strip_prefix("TASK_STATE_").unwrap_or(&upper);
        [Self::Pending, Self::Queued, Self::Assigned, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|state| state.short_name() == short)
    }
}

impl pb::LogStream {
    /// The short lower-case name ("stdout"); `log` for unspecified.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified | Self::Log => "log",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

impl pb::Priority {
    /// The short lower-case name ("critical").
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Unspecified | Self::Normal => "normal",
            Self::Low => "low",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// Parses "low", "normal", "high" or "critical" (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Self::Low),
            "normal" => Some(Self::Normal),
            "high" => Some(Self::High),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }
}
