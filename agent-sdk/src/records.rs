//! The SDK's own types for what [`Client`](crate::Client) returns: tasks,
//! their events and logs, workflows, agents, queues and tokens, converted
//! from the generated wire types at the edge.
//!
//! Code that reads tasks depends on these instead of the generated proto
//! structs, so a change to the proto does not break it. Every conversion is
//! infallible: an enum value this SDK does not know (sent by a newer server)
//! becomes an `Unknown` variant carrying the wire number, absent messages
//! become defaults or `None`, and timestamps and durations become
//! [`SystemTime`](std::time::SystemTime) and
//! [`Duration`](std::time::Duration), saturating instead of failing.
//!
//! Requests (a task's spec, listing and watch filters, a token's creation)
//! are still the generated types: build specs with
//! [`NewTask`](crate::NewTask), and filters with
//! [`TaskState`]'s conversion to the wire number.

mod admin;
mod events;
mod fleet;
mod log_chunk;
mod tasks;
mod time;
mod workflow;

pub use self::admin::{CreatedToken, Role, Scope, TokenInfo};
pub use self::events::{EventKind, TaskEvent};
pub use self::fleet::{AgentInfo, AgentState, QueueInfo, ServerInfo};
pub use self::log_chunk::{LogChunk, LogLine};
pub use self::tasks::{
    Attempt, Concurrency, Failure, Lock, LockMode, Progress, RetryPolicy, Submission, Task, TaskPage, TaskSpecInfo,
    TaskState,
};
pub use self::workflow::{Explanation, ExplanationReason, Workflow, WorkflowTask};
