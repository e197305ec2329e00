//! Durable state behind a small trait. The sled implementation is the
//! default; the in-memory one backs `muster bench` baselines and proves the
//! seam. Every implementation passes the same suite (`suite`).
//!
//! The store owns its indexes: writing a task also maintains the
//! unfinished-task index and the idempotency-key index, so callers only ever
//! write whole records.

mod memory;
mod sled_store;
#[cfg(test)]
mod suite;
mod verify;
#[cfg(test)]
pub(crate) use suite::{make_event as test_event, make_task as test_task_in};

/// A queued task for tests.
#[cfg(test)]
pub(crate) fn test_task() -> Task {
    test_task_in(crate::model::TaskState::Queued, None)
}

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use memory::MemoryStore;
pub use sled_store::{DEFAULT_CACHE_BYTES, SledStore};
pub use verify::{MAX_LISTED_PROBLEMS, Problem, ProblemKind, RecordCounts, VerifyReport};

pub use crate::error::StoreError;

use crate::model::{AgentId, AgentRecord, AttemptLog, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId};

/// One durable change. A batch of writes is applied atomically.
// Writes are moved once into a batch and consumed by the writer; boxing the
// large variant would add an allocation per task write for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Write {
    /// Insert or replace a task (and its index entries).
    Task(Task),
    /// Append an event.
    Event(TaskEvent),
    /// Insert or replace an agent registration.
    Agent(AgentRecord),
    /// Forget an agent registration.
    RemoveAgent(AgentId),
    /// Insert or replace a queue's settings.
    Queue(QueueRecord),
    /// Insert or replace a token.
    Token(TokenRecord),
}

/// Event sequence numbers start after this origin, which no event carries:
/// a listing on an empty store reports it, so a watch after the listing's
/// sequence replays every event (0 in a watch request means "live only").
pub const SEQUENCE_ORIGIN: u64 = 1;

/// The storage seam: everything durable goes through it.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Applies `writes` atomically, in order.
    fn write(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// Makes every applied write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// One task.
    fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError>;
    /// Up to `limit` tasks with ids greater than `after`, in id order. With
    /// `unfinished_only`, only tasks that are not terminal (via the index).
    fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished_only: bool) -> Result<Vec<Task>, StoreError>;
    /// Every task that is not terminal.
    fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError>;
    /// Up to `limit` events with sequence greater than `after`, in order.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError>;
    /// The greatest event sequence stored (0 when none; see
    /// [`SEQUENCE_ORIGIN`]).
    fn last_sequence(&self) -> Result<u64, StoreError>;
    /// Every registered agent.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Every idempotency key with its task.
    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError>;
    /// Every queue with settings.
    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError>;
    /// Every token, revoked ones included.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// The ids of a workflow's tasks, in id order.
    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError>;
    /// Inserts or replaces the log of one attempt. Logs live apart from the
    /// task records: they are written by the log hub, not the writer, and
    /// are made durable by the next flush.
    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError>;
    /// The log of one attempt.
    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError>;
    /// Reads every record and reports what does not decode and where the
    /// indexes and the event log disagree with the records (see
    /// [`VerifyReport`]). An error means the store could not be read at
    /// all; problems with its contents are in the report.
    fn verify(&self) -> Result<VerifyReport, StoreError>;
    /// How many records of each kind the store holds, without decoding
    /// them (what [`Store::verify`] reports in `records` for a sound store,
    /// at a fraction of its cost). Still visits every key: call it off the
    /// async threads, now and then (the server recounts every minute for
    /// its metrics).
    fn record_counts(&self) -> Result<RecordCounts, StoreError>;
}

/// Record encoding: a format version byte, then MessagePack with field
/// names, so fields can be added without breaking stored records.
const RECORD_VERSION: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VERSION];
    rmp_serde::encode::write_named(&mut out, value).map_err(|e| StoreError::Codec(e.to_string()))?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => rmp_serde::from_slice(rest).map_err(|e| StoreError::Codec(e.to_string())),
        Some((version, _)) => Err(StoreError::Codec(format!("unknown record version {version}"))),
        None => Err(StoreError::Codec("empty record".into())),
    }
}
