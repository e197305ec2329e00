//! The Muster agent SDK: write agents that join a Muster fleet, and submit
//! and watch work from any Rust service.
//!
//! Two halves share one crate because agents often submit follow-up work:
//!
//! - [`Agent`] runs handlers. Build one with [`Agent::builder`], register a
//!   handler per capability, and [`run`](Agent::run) it. The runtime keeps
//!   one gRPC stream to the server, accepts assignments, streams progress
//!   and live log lines ([`TaskContext::log`], [`LogWriter`]), reports
//!   results until they are acknowledged, reconnects and resumes its
//!   session after network trouble, stops its work if it cannot reach the
//!   server for the lease TTL (the server will have reassigned it), and
//!   drains on SIGTERM.
//! - [`Client`] submits tasks ([`NewTask`] builds their specs), reads,
//!   watches, cancels and retries them, follows their logs, and drains or
//!   resumes agents. It answers with the SDK's own types ([`Task`],
//!   [`TaskEvent`], [`LogChunk`], [`AgentInfo`], [`QueueInfo`],
//!   [`Workflow`], [`Explanation`], [`TokenInfo`]), so a proto change does
//!   not break their readers; requests are still the generated [`proto`]
//!   types.
//!
//! Execution is at-least-once: a handler may run again for the same task
//! after a crash or a lost lease, so side effects should be keyed by
//! [`TaskContext::task_id`].
//!
//! `README.md` in this crate is a guide to writing an agent, walking
//! through `examples/word_count.rs` (typed JSON payloads, progress,
//! failures, cancellation, graceful shutdown, running against `muster
//! dev`); `examples/echo_agent.rs` is a second complete agent.

mod actions;
mod agent;
mod attempts;
mod backoff;
mod client;
mod connect;
mod connection;
mod context;
mod credentials;
mod drain;
mod endpoint;
mod error;
mod lease;
mod log_writer;
mod logs;
mod machine;
mod metrics;
mod records;
mod runtime;
mod settings;
mod task;
mod text;
mod trace;
mod types;

pub use muster_proto::pb as proto;
/// The Prometheus client the agent's registry comes from, so custom metrics
/// use the same version.
pub use prometheus;
pub use tokio_util::sync::CancellationToken;

pub use crate::agent::{Agent, AgentBuilder};
pub use crate::client::{Change, Client};
pub use crate::context::{Output, TaskContext, TaskError};
pub use crate::credentials::Credentials;
pub use crate::error::Error;
pub use crate::log_writer::LogWriter;
pub use crate::records::{
    AgentInfo, AgentState, Attempt, Concurrency, CreatedToken, EventKind, Explanation, ExplanationReason, Failure,
    Lock, LockMode, LogChunk, LogLine, Progress, QueueInfo, RetryPolicy, Role, Scope, ServerInfo, Submission, Task,
    TaskEvent, TaskPage, TaskSpecInfo, TaskState, TokenInfo, Workflow, WorkflowTask,
};
pub use crate::task::NewTask;
pub use crate::types::{LogStream, ParentOutput, Priority};
