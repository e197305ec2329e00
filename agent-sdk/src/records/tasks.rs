//! Tasks as the server reports them: [`Task`], its [`TaskState`], attempts,
//! failure and progress, and the spec it was submitted with.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use super::time::system_time;
use crate::Priority;
use crate::proto;
use crate::task::from_proto_duration;

/// Where a task is in its lifecycle.
///
/// `Unknown` carries a wire value this SDK does not know (a newer server's
/// state) or the wire's unspecified value, 0; treat it as "not finished".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskState {
    /// Not ready yet: waiting for its start time, a retry backoff, or its
    /// dependencies in a workflow.
    Pending,
    /// Ready, waiting for a matching agent with a free slot.
    Queued,
    /// Offered to an agent that has not accepted it yet.
    Assigned,
    /// Accepted by an agent and executing.
    Running,
    /// Finished with an output.
    Succeeded,
    /// Finished without success, out of attempts or not retryable.
    Failed,
    /// Stopped by a cancel.
    Cancelled,
    /// A value this SDK does not know, kept as its wire number.
    Unknown(i32),
}

impl TaskState {
    /// The states this SDK knows, in lifecycle order.
    pub const ALL: [TaskState; 7] =
        [Self::Pending, Self::Queued, Self::Assigned, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled];

    /// True for succeeded, failed and cancelled: no further change happens
    /// unless the task is retried.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The upper-case name the CLI and the server's JSON use ("RUNNING");
    /// `"UNKNOWN"` for an unknown value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::Assigned => "ASSIGNED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::Unknown(_) => "UNKNOWN",
        }
    }

    /// Parses a name in any case ("running", "RUNNING") or the full proto
    /// name ("TASK_STATE_RUNNING").
    pub fn parse(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        let short = upper.strip_prefix("TASK_STATE_").unwrap_or(&upper);
        Self::ALL.into_iter().find(|state| state.as_str() == short)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(value) => write!(f, "UNKNOWN({value})"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl From<i32> for TaskState {
    /// Reads a wire value; values this SDK does not know become `Unknown`.
    fn from(value: i32) -> Self {
        match proto::TaskState::try_from(value) {
            Ok(proto::TaskState::Pending) => Self::Pending,
            Ok(proto::TaskState::Queued) => Self::Queued,
            Ok(proto::TaskState::Assigned) => Self::Assigned,
            Ok(proto::TaskState::Running) => Self::Running,
            Ok(proto::TaskState::Succeeded) => Self::Succeeded,
            Ok(proto::TaskState::Failed) => Self::Failed,
            Ok(proto::TaskState::Cancelled) => Self::Cancelled,
            Ok(proto::TaskState::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

impl From<proto::TaskState> for TaskState {
    fn from(state: proto::TaskState) -> Self {
        Self::from(i32::from(state))
    }
}

impl From<TaskState> for i32 {
    /// The wire value, for filters such as
    /// [`ListTasksRequest::states`](crate::proto::ListTasksRequest::states).
    fn from(state: TaskState) -> Self {
        let wire = match state {
            TaskState::Pending => proto::TaskState::Pending,
            TaskState::Queued => proto::TaskState::Queued,
            TaskState::Assigned => proto::TaskState::Assigned,
            TaskState::Running => proto::TaskState::Running,
            TaskState::Succeeded => proto::TaskState::Succeeded,
            TaskState::Failed => proto::TaskState::Failed,
            TaskState::Cancelled => proto::TaskState::Cancelled,
            TaskState::Unknown(value) => return value,
        };
        wire.into()
    }
}

/// The state of a wire field where 0 means "none" (an event's previous
/// state before the task existed).
pub(super) fn optional_state(value: i32) -> Option<TaskState> {
    (value != 0).then(|| TaskState::from(value))
}

/// Why an attempt, or the task, failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// A short machine-readable reason: `handler_error`, `agent_lost`,
    /// `timeout`, `queue_timeout`, `output_too_large`, `cancelled`,
    /// `upstream_failed`, or one the handler chose.
    pub reason: String,
    /// What went wrong, for people.
    pub message: String,
    /// False when the failure must not be retried.
    pub retryable: bool,
}

impl From<proto::Failure> for Failure {
    fn from(failure: proto::Failure) -> Self {
        Self { reason: failure.reason, message: failure.message, retryable: failure.retryable }
    }
}

/// The latest progress the live attempt reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// 0 to 100.
    pub percent: u32,
    /// What the handler is doing.
    pub message: String,
    /// When it was reported.
    pub at: Option<SystemTime>,
}

impl From<proto::Progress> for Progress {
    fn from(progress: proto::Progress) -> Self {
        Self { percent: progress.percent, message: progress.message, at: system_time(progress.at) }
    }
}

/// One execution of a task by one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attempt {
    /// From 1.
    pub number: u32,
    /// The agent's session id.
    pub agent_id: String,
    /// The agent's name.
    pub agent_name: String,
    /// When the attempt was offered to the agent.
    pub assigned_at: Option<SystemTime>,
    /// When the agent accepted it.
    pub started_at: Option<SystemTime>,
    /// When it ended.
    pub finished_at: Option<SystemTime>,
    /// Assigned until accepted, running while live, then succeeded, failed
    /// or cancelled.
    pub state: TaskState,
    /// Why it failed, if it did.
    pub failure: Option<Failure>,
}

impl From<proto::Attempt> for Attempt {
    fn from(attempt: proto::Attempt) -> Self {
        Self {
            number: attempt.number,
            agent_id: attempt.agent_id,
            agent_name: attempt.agent_name,
            assigned_at: system_time(attempt.assigned_at),
            started_at: system_time(attempt.started_at),
            finished_at: system_time(attempt.finished_at),
            state: attempt.state.into(),
            failure: attempt.failure.map(Failure::from),
        }
    }
}

/// How a task's failed attempts are retried; unset values are the
/// server's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, including the first; 0 means the server default.
    pub max_attempts: u32,
    /// The first backoff.
    pub initial_backoff: Option<Duration>,
    /// The largest backoff.
    pub max_backoff: Option<Duration>,
    /// Growth between backoffs; 0 means 2.
    pub multiplier: f64,
}

impl From<proto::RetryPolicy> for RetryPolicy {
    fn from(retry: proto::RetryPolicy) -> Self {
        Self {
            max_attempts: retry.max_attempts,
            initial_backoff: from_proto_duration(retry.initial_backoff),
            max_backoff: from_proto_duration(retry.max_backoff),
            multiplier: retry.multiplier,
        }
    }
}

/// How a lock is held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockMode {
    /// Alone (the wire's unspecified value means this too).
    #[default]
    Exclusive,
    /// Alongside other shared holders.
    Shared,
    /// A value this SDK does not know, kept as its wire number.
    Unknown(i32),
}

impl From<i32> for LockMode {
    fn from(value: i32) -> Self {
        match proto::LockMode::try_from(value) {
            Ok(proto::LockMode::Unspecified | proto::LockMode::Exclusive) => Self::Exclusive,
            Ok(proto::LockMode::Shared) => Self::Shared,
            Err(_) => Self::Unknown(value),
        }
    }
}

/// A named resource held while an attempt runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lock {
    /// The resource's name.
    pub name: String,
    /// Exclusive or shared.
    pub mode: LockMode,
}

impl From<proto::Lock> for Lock {
    fn from(lock: proto::Lock) -> Self {
        Self { name: lock.name, mode: lock.mode.into() }
    }
}

/// A cap on how many tasks with the same key run at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Concurrency {
    /// The key tasks share.
    pub key: String,
    /// How many may run at once.
    pub max: u32,
}

impl From<proto::Concurrency> for Concurrency {
    fn from(concurrency: proto::Concurrency) -> Self {
        Self { key: concurrency.key, max: concurrency.max }
    }
}

/// What a task was submitted with, as the server recorded it (the read
/// side of the spec [`NewTask`](crate::NewTask) builds).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct TaskSpecInfo {
    /// The capability an agent must advertise to run it.
    pub capability: String,
    /// Labels the agent must carry, with these values.
    pub selector: BTreeMap<String, String>,
    /// Its queue; empty means `default`.
    pub queue: String,
    /// Its dispatch priority.
    pub priority: Priority,
    /// What the handler is given.
    pub payload: Vec<u8>,
    /// How `payload` is encoded.
    pub content_type: String,
    /// Free-form entries, usable in listing filters.
    pub metadata: BTreeMap<String, String>,
    /// The execution timeout of one attempt; `None` is the server default.
    pub timeout: Option<Duration>,
    /// How long it may wait queued; `None` is forever.
    pub queue_timeout: Option<Duration>,
    /// Its retry policy; `None` is the server default.
    pub retry: Option<RetryPolicy>,
    /// The key that makes resubmission return this task.
    pub idempotency_key: String,
    /// It stays pending until then.
    pub not_before: Option<SystemTime>,
    /// The submitter's W3C trace context.
    pub trace_context: BTreeMap<String, String>,
    /// Its name within the submit that created it.
    pub key: String,
    /// The keys or ids it was submitted to depend on (see
    /// [`Task::depends_on_ids`] for the resolved ids).
    pub depends_on: Vec<String>,
    /// Locks held while an attempt runs.
    pub locks: Vec<Lock>,
    /// Its concurrency cap, if any.
    pub concurrency: Option<Concurrency>,
}

impl From<proto::TaskSpec> for TaskSpecInfo {
    fn from(spec: proto::TaskSpec) -> Self {
        Self {
            capability: spec.capability,
            selector: spec.selector.into_iter().collect(),
            queue: spec.queue,
            priority: Priority::from(spec.priority),
            payload: spec.payload,
            content_type: spec.content_type,
            metadata: spec.metadata.into_iter().collect(),
            timeout: from_proto_duration(spec.timeout),
            queue_timeout: from_proto_duration(spec.queue_timeout),
            retry: spec.retry.map(RetryPolicy::from),
            idempotency_key: spec.idempotency_key,
            not_before: system_time(spec.not_before),
            trace_context: spec.trace_context.into_iter().collect(),
            key: spec.key,
            depends_on: spec.depends_on,
            locks: spec.locks.into_iter().map(Lock::from).collect(),
            concurrency: spec.concurrency.map(Concurrency::from),
        }
    }
}

/// A task: its spec, state, attempts and outcome.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Task {
    /// The server-assigned id.
    pub id: String,
    /// What it was submitted with.
    pub spec: TaskSpecInfo,
    /// Where it is in its lifecycle.
    pub state: TaskState,
    /// The current or last attempt number; 0 before the first assignment.
    pub attempt: u32,
    /// Attempt history, oldest first.
    pub attempts: Vec<Attempt>,
    /// What the handler returned, once succeeded.
    pub output: Vec<u8>,
    /// How `output` is encoded.
    pub output_content_type: String,
    /// Why the task failed or was cancelled, or why its last attempt
    /// failed.
    pub failure: Option<Failure>,
    /// The live attempt's latest progress.
    pub progress: Option<Progress>,
    /// When it was submitted.
    pub created_at: Option<SystemTime>,
    /// When it last changed.
    pub updated_at: Option<SystemTime>,
    /// When a pending task becomes queued (its start time or retry
    /// backoff).
    pub ready_at: Option<SystemTime>,
    /// When the live attempt times out.
    pub deadline: Option<SystemTime>,
    /// Set once a running task was asked to stop.
    pub cancel_requested: bool,
    /// The sequence number of its last event.
    pub sequence: u64,
    /// The workflow it belongs to; empty when none.
    pub workflow_id: String,
    /// Ids of the tasks it waits for.
    pub depends_on_ids: Vec<String>,
    /// The name of the token that submitted it; empty without
    /// authentication.
    pub submitted_by: String,
}

impl Task {
    /// Decodes the output as JSON.
    pub fn output_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::Error> {
        Ok(serde_json::from_slice(&self.output)?)
    }
}

impl From<proto::Task> for Task {
    fn from(task: proto::Task) -> Self {
        Self {
            id: task.id,
            spec: task.spec.map(TaskSpecInfo::from).unwrap_or_default(),
            state: task.state.into(),
            attempt: task.attempt,
            attempts: task.attempts.into_iter().map(Attempt::from).collect(),
            output: task.output,
            output_content_type: task.output_content_type,
            failure: task.failure.map(Failure::from),
            progress: task.progress.map(Progress::from),
            created_at: system_time(task.created_at),
            updated_at: system_time(task.updated_at),
            ready_at: system_time(task.ready_at),
            deadline: system_time(task.deadline),
            cancel_requested: task.cancel_requested,
            sequence: task.sequence,
            workflow_id: task.workflow_id,
            depends_on_ids: task.depends_on_ids,
            submitted_by: task.submitted_by,
        }
    }
}

/// What a submit created: the tasks in request order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Submission {
    /// The tasks, in request order.
    pub tasks: Vec<Task>,
    /// For each task, true when it already existed (same idempotency key).
    pub existing: Vec<bool>,
    /// The workflow created, when the submit held several tasks or
    /// dependencies; empty otherwise.
    pub workflow_id: String,
}

impl From<proto::SubmitResponse> for Submission {
    fn from(response: proto::SubmitResponse) -> Self {
        Self {
            tasks: response.tasks.into_iter().map(Task::from).collect(),
            existing: response.existing,
            workflow_id: response.workflow_id,
        }
    }
}

/// One page of a task listing.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskPage {
    /// The tasks, oldest first.
    pub tasks: Vec<Task>,
    /// Pass back as `page_token` for the next page; empty on the last.
    pub next_page_token: String,
    /// The event sequence when the listing started: watching after it
    /// misses no later change. Never 0.
    pub sequence: u64,
}

impl From<proto::ListTasksResponse> for TaskPage {
    fn from(response: proto::ListTasksResponse) -> Self {
        Self {
            tasks: response.tasks.into_iter().map(Task::from).collect(),
            next_page_token: response.next_page_token,
            sequence: response.sequence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_values_are_kept() {
        for state in TaskState::ALL {
            assert_eq!(TaskState::from(i32::from(state)), state);
            assert_eq!(TaskState::parse(state.as_str()), Some(state));
        }
        assert_eq!(TaskState::from(42), TaskState::Unknown(42));
        assert_eq!(i32::from(TaskState::Unknown(42)), 42);
        assert_eq!(TaskState::from(0), TaskState::Unknown(0));
        assert!(!TaskState::Unknown(42).is_terminal());
        assert_eq!(TaskState::parse("task_state_running"), Some(TaskState::Running));
        assert_eq!(TaskState::parse("unspecified"), None);
        assert_eq!(TaskState::Unknown(9).to_string(), "UNKNOWN(9)");
    }

    #[test]
    fn a_task_keeps_every_field_and_a_missing_spec_reads_as_default() {
        let wire = proto::Task {
            id: "t1".to_owned(),
            spec: Some(proto::TaskSpec {
                capability: "shell".to_owned(),
                priority: proto::Priority::High.into(),
                metadata: [("team".to_owned(), "infra".to_owned())].into(),
                timeout: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
                locks: vec![proto::Lock { name: "db".to_owned(), mode: proto::LockMode::Shared.into() }],
                ..Default::default()
            }),
            state: proto::TaskState::Failed.into(),
            attempt: 2,
            attempts: vec![proto::Attempt {
                number: 1,
                state: proto::TaskState::Failed.into(),
                failure: Some(proto::Failure { reason: "agent_lost".to_owned(), ..Default::default() }),
                started_at: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
                ..Default::default()
            }],
            failure: Some(proto::Failure { reason: "timeout".to_owned(), message: "m".to_owned(), retryable: true }),
            sequence: 7,
            ..Default::default()
        };
        let task = Task::from(wire);
        assert_eq!((task.id.as_str(), task.state, task.attempt, task.sequence), ("t1", TaskState::Failed, 2, 7));
        assert_eq!(task.spec.priority, Priority::High);
        assert_eq!(task.spec.metadata.get("team").map(String::as_str), Some("infra"));
        assert_eq!(task.spec.timeout, Some(Duration::from_secs(30)));
        assert_eq!(task.spec.locks[0].mode, LockMode::Shared);
        assert_eq!(task.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some("agent_lost"));
        assert_eq!(task.attempts[0].started_at, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(10)));
        assert_eq!(task.failure.map(|f| (f.reason, f.retryable)), Some(("timeout".to_owned(), true)));
        assert_eq!(Task::from(proto::Task::default()).spec, TaskSpecInfo::default());
    }
}
