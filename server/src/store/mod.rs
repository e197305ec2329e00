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

use crate::model::{AgentId, AgentRecord, AttemptLog, QueueRecord, Task, TaskEvent, TaskId, WorkflowId};

/// A failure of the storage engine or of a stored record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine reported an error.
    #[error("storage engine: {0}")]
    Engine(String),
    /// A record could not be encoded or decoded.
    #[error("record codec: {0}")]
    Codec(String),
}

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
}

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
    /// The greatest event sequence stored (0 when none).
    fn last_sequence(&self) -> Result<u64, StoreError>;
    /// Every registered agent.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Every idempotency key with its task.
    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError>;
    /// Every queue with settings.
    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError>;
    /// The ids of a workflow's tasks, in id order.
    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError>;
    /// Inserts or replaces the log of one attempt. Logs live apart from the
    /// task records: they are written by the log hub, not the writer, and
    /// are made durable by the next flush.
    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError>;
    /// The log of one attempt.
    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError>;
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
