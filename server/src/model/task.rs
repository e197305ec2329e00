//! Tasks: specs, states, attempts, failures, progress, events and the
//! queries and explanations about them.
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::*;

/// The lifecycle of a task: PENDING (not ready yet) and QUEUED (ready),
/// then ASSIGNED and RUNNING on an agent, ending SUCCEEDED, FAILED or
/// CANCELLED; a failed attempt with attempts left goes back to PENDING or
/// QUEUED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for `not_before` or a retry backoff.
    Pending,
    /// Ready, waiting for an agent.
    Queued,
    /// Offered to an agent that has not accepted yet.
    Assigned,
    /// Executing on an agent.
    Running,
    /// Finished with an output.
    Succeeded,
    /// Failed for good (kept for `RetryTask`).
    Failed,
    /// Cancelled by request or by the server.
    Cancelled,
}

impl TaskState {
    /// True for the states a task never leaves on its own.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// True while an attempt is live (assigned or running).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }

    /// The upper-case name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::Assigned => "ASSIGNED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// Dispatch order: higher first, FIFO within a level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Priority {
    /// Runs when nothing else waits.
    Low = 0,
    /// The default.
    Normal = 1,
    /// Ahead of normal work.
    High = 2,
    /// Ahead of everything.
    Critical = 3,
}

impl Priority {
    /// All levels, highest first.
    pub const DESCENDING: [Priority; 4] = [Self::Critical, Self::High, Self::Normal, Self::Low];
}

/// How failed attempts are retried.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, including the first.
    pub max_attempts: u32,
    /// The backoff before the second attempt.
    pub initial_backoff: Duration,
    /// The cap on any backoff.
    pub max_backoff: Duration,
    /// Growth between consecutive backoffs.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    /// Three attempts, backing off from one second, doubling, capped at a
    /// minute.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The backoff before attempt `failures + 1`, given the failures so far
    /// (at least 1) and a uniform random number in `[0, 1)`: "equal jitter",
    /// so the delay lies in `[d/2, d]` with `d = min(max, initial * m^(n-1))`.
    pub fn backoff(&self, failures: u32, unit_random: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jittered = capped / 2.0 + capped / 2.0 * unit_random.clamp(0.0, 1.0);
        // A stored policy is trusted no further than the wire: whatever it
        // holds, the delay is a valid duration no longer than its cap.
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max_backoff).min(self.max_backoff)
    }
}

/// What to run and under which rules: a validated `TaskSpec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The capability an agent must advertise.
    pub capability: String,
    /// Labels the agent must carry.
    pub selector: BTreeMap<String, String>,
    /// The queue, "default" unless given.
    pub queue: String,
    /// Dispatch priority.
    pub priority: Priority,
    /// Opaque input for the handler.
    pub payload: Bytes,
    /// The payload's media type.
    pub content_type: String,
    /// Free-form key/value pairs.
    pub metadata: BTreeMap<String, String>,
    /// Execution timeout per attempt.
    pub timeout: Duration,
    /// How long the task may wait queued.
    pub queue_timeout: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Deduplicates submissions.
    pub idempotency_key: Option<String>,
    /// Earliest start.
    pub not_before: Option<Millis>,
    /// W3C trace context of the submitter.
    pub trace_context: BTreeMap<String, String>,
    /// The task's name within its workflow.
    #[serde(default)]
    pub key: Option<String>,
    /// Tasks that must succeed first (resolved ids).
    #[serde(default)]
    pub depends_on: Vec<TaskId>,
    /// Resources held while an attempt runs.
    #[serde(default)]
    pub locks: Vec<LockSpec>,
    /// A cap on concurrently running tasks sharing a key.
    #[serde(default)]
    pub concurrency: Option<ConcurrencySpec>,
}

impl TaskSpec {
    /// A spec for `capability` with everything else at its default: queue
    /// `default`, normal priority, an empty payload, a five-minute timeout,
    /// the default retry policy, no dependencies, locks or limits.
    pub fn new(capability: impl Into<String>) -> Self {
        Self {
            capability: capability.into(),
            selector: BTreeMap::new(),
            queue: "default".to_owned(),
            priority: Priority::Normal,
            payload: Bytes::new(),
            content_type: String::new(),
            metadata: BTreeMap::new(),
            timeout: Duration::from_secs(300),
            queue_timeout: None,
            retry: RetryPolicy::default(),
            idempotency_key: None,
            not_before: None,
            trace_context: BTreeMap::new(),
            key: None,
            depends_on: Vec::new(),
            locks: Vec::new(),
            concurrency: None,
        }
    }
}

/// How a lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockMode {
    /// Alone.
    Exclusive,
    /// With other shared holders, never with an exclusive one.
    Shared,
}

/// A named lock a task holds while it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockSpec {
    /// The resource's name.
    pub name: String,
    /// Exclusive or shared.
    pub mode: LockMode,
}

/// At most `max` tasks with this `key` run at once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConcurrencySpec {
    /// Shared by the tasks it limits.
    pub key: String,
    /// At least 1.
    pub max: u32,
}

/// One task of a submit, before its dependencies are resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    /// The validated spec; `depends_on` is filled in by the scheduler.
    pub spec: TaskSpec,
    /// Its dependencies as submitted: keys of tasks in the same request, or
    /// ids of existing tasks.
    pub depends_on: Vec<String>,
}

/// The output of a finished dependency, handed to its dependents.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentOutput {
    /// The parent's key (its id when it has none).
    pub key: String,
    /// The parent's id.
    pub task_id: TaskId,
    /// What it produced.
    pub output: Bytes,
    /// The output's media type.
    pub content_type: String,
}

/// A queue's persisted settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecord {
    /// Its name.
    pub name: String,
    /// No dispatch while set.
    pub paused: bool,
    /// Share of dispatch among queues with work.
    pub weight: u32,
    /// Most tasks of this queue running at once; 0 means no limit.
    pub max_running: u32,
}

impl QueueRecord {
    /// A queue with default settings.
    pub fn new(name: &str) -> Self {
        Self { name: name.to_owned(), paused: false, weight: 1, max_running: 0 }
    }
}

/// A queue as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueInfo {
    /// Settings.
    pub record: QueueRecord,
    /// Unfinished tasks per state.
    pub depth: BTreeMap<&'static str, u32>,
    /// Attempts running now.
    pub running: u32,
    /// Age of the oldest queued task.
    pub oldest_queued_age: Option<Duration>,
}

/// One reason a task is not running.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Reason {
    /// Machine-readable code.
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Tasks involved.
    pub task_ids: Vec<TaskId>,
    /// Until when.
    pub until: Option<Millis>,
    /// Agents involved.
    pub agents: Vec<String>,
}

/// Why a task is where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The task.
    pub task_id: TaskId,
    /// Its state.
    pub state: TaskState,
    /// Every reason that applies.
    pub reasons: Vec<Reason>,
}

/// Why an attempt or a task failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Machine-readable reason, e.g. `agent_lost`.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// False when the failure must not be retried.
    pub retryable: bool,
}

impl Failure {
    /// A failure with the given reason and message.
    pub fn new(reason: &str, message: impl Into<String>, retryable: bool) -> Self {
        Self { reason: reason.to_owned(), message: message.into(), retryable }
    }
}

/// Reasons the server itself records.
pub mod reason {
    /// The agent missed its lease.
    pub const AGENT_LOST: &str = "agent_lost";
    /// The attempt ran past its timeout.
    pub const TIMEOUT: &str = "timeout";
    /// The task waited queued past its queue timeout.
    pub const QUEUE_TIMEOUT: &str = "queue_timeout";
    /// The agent's output exceeded the limit.
    pub const OUTPUT_TOO_LARGE: &str = "output_too_large";
    /// Cancelled by request.
    pub const CANCELLED: &str = "cancelled";
    /// The task was created.
    pub const SUBMITTED: &str = "submitted";
    /// An attempt was offered to an agent.
    pub const ASSIGNED: &str = "assigned";
    /// The agent accepted the attempt.
    pub const ACCEPTED: &str = "accepted";
    /// The attempt finished successfully.
    pub const COMPLETED: &str = "completed";
    /// A pending task's time came.
    pub const READY: &str = "ready";
    /// `RetryTask` put the task back.
    pub const RETRIED: &str = "retried";
    /// Cancel was requested of a running attempt.
    pub const CANCEL_REQUESTED: &str = "cancel_requested";
    /// The agent reported progress.
    pub const PROGRESS: &str = "progress";
    /// A dependency failed or was cancelled.
    pub const UPSTREAM_FAILED: &str = "upstream_failed";
    /// Every dependency succeeded.
    pub const DEPENDENCIES_SUCCEEDED: &str = "dependencies_succeeded";
}

/// One execution of a task by one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based, strictly increasing per task: the fencing token.
    pub number: u32,
    /// The agent that holds or held it.
    pub agent_id: AgentId,
    /// That agent's name, for people.
    pub agent_name: String,
    /// When it was offered.
    pub assigned_at: Millis,
    /// When the agent accepted it.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub finished_at: Option<Millis>,
    /// Running while live; then Succeeded, Failed or Cancelled.
    pub state: TaskState,
    /// Why it failed.
    pub failure: Option<Failure>,
}

/// The latest progress of the live attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    pub percent: u32,
    /// What the handler is doing.
    pub message: String,
    /// When it was reported.
    pub at: Millis,
}

/// A task and everything the server knows about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// What was submitted.
    pub spec: TaskSpec,
    /// Where it is in its lifecycle.
    pub state: TaskState,
    /// The current or last attempt number (0 before the first).
    pub attempt: u32,
    /// Attempts made before the last `RetryTask`: they do not count against
    /// the retry budget.
    pub attempt_base: u32,
    /// Attempt history, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// The result of the successful attempt.
    pub output: Bytes,
    /// The output's media type.
    pub output_content_type: String,
    /// Why the task or its last attempt failed.
    pub failure: Option<Failure>,
    /// The live attempt's latest progress.
    pub progress: Option<Progress>,
    /// Creation time.
    pub created_at: Millis,
    /// Time of the last change.
    pub updated_at: Millis,
    /// When a pending task becomes queued.
    pub ready_at: Option<Millis>,
    /// When the live attempt times out.
    pub deadline: Option<Millis>,
    /// Cancel was requested while an attempt was live.
    pub cancel_requested: bool,
    /// Sequence number of this task's last event.
    pub sequence: u64,
    /// The workflow it belongs to.
    #[serde(default)]
    pub workflow: Option<WorkflowId>,
    /// The name of the token that submitted it (none without
    /// authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

impl Task {
    /// A new task, PENDING, created at `now` by `submitted_by`.
    pub fn new(
        id: TaskId,
        spec: TaskSpec,
        workflow: Option<WorkflowId>,
        submitted_by: Option<String>,
        now: Millis,
    ) -> Self {
        Self {
            id,
            spec,
            state: TaskState::Pending,
            attempt: 0,
            attempt_base: 0,
            attempts: Vec::new(),
            output: Bytes::new(),
            output_content_type: String::new(),
            failure: None,
            progress: None,
            created_at: now,
            updated_at: now,
            ready_at: None,
            deadline: None,
            cancel_requested: false,
            sequence: 0,
            workflow,
            submitted_by,
        }
    }

    /// The agent holding the live attempt, if any.
    pub fn live_agent(&self) -> Option<AgentId> {
        if self.state.is_active() { self.attempts.last().map(|a| a.agent_id) } else { None }
    }

    /// The record of attempt `number`.
    pub fn attempt_record(&self, number: u32) -> Option<&AttemptRecord> {
        self.attempts.iter().rev().find(|a| a.number == number)
    }

    /// Attempts used against the current retry budget.
    pub fn attempts_used(&self) -> u32 {
        self.attempt.saturating_sub(self.attempt_base)
    }
}

/// What an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A state transition (or a note on the current state).
    State,
    /// Progress of the live attempt.
    Progress,
}

/// One entry of the event log; sequence numbers are strictly increasing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Position in the log.
    pub sequence: u64,
    /// The task concerned.
    pub task_id: TaskId,
    /// State or progress.
    pub kind: EventKind,
    /// The state after the event.
    pub state: TaskState,
    /// The state before it; None at creation.
    pub previous_state: Option<TaskState>,
    /// The attempt concerned (0 before any).
    pub attempt: u32,
    /// The agent concerned.
    pub agent_id: Option<AgentId>,
    /// The task's queue, for filtering.
    pub queue: String,
    /// The task's capability, for filtering.
    pub capability: String,
    /// The task's workflow, for filtering.
    #[serde(default)]
    pub workflow: Option<WorkflowId>,
    /// Why it happened.
    pub reason: String,
    /// Detail for people.
    pub message: String,
    /// For progress events.
    pub progress: Option<Progress>,
    /// When it happened.
    pub at: Millis,
    /// Who caused it by a call (submit, cancel, retry), when authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// A task query for `ListTasks`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskFilter {
    /// Any of these states; empty means all.
    pub states: Vec<TaskState>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this capability.
    pub capability: Option<String>,
    /// All of these metadata entries.
    pub metadata: BTreeMap<String, String>,
}

impl TaskFilter {
    /// Whether `task` passes the filter.
    pub fn matches(&self, task: &Task) -> bool {
        (self.states.is_empty() || self.states.contains(&task.state))
            && self.queue.as_ref().is_none_or(|q| *q == task.spec.queue)
            && self.capability.as_ref().is_none_or(|c| *c == task.spec.capability)
            && self.metadata.iter().all(|(k, v)| task.spec.metadata.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let p = policy();
        assert_eq!(p.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.backoff(10, 1.0), Duration::from_secs(10));
        assert_eq!(p.backoff(u32::MAX, 0.5), Duration::from_millis(7500));
    }
}
