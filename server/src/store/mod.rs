//! Durable state behind a small trait. The sled implementation is the
//! default; the in-memory one backs `muster bench` baselines and proves the
//! seam. Every implementation passes the same suite (`suite`).
//!
//! The store owns its indexes: writing a task also maintains the
//! unfinished-task index and the idempotency-key index, so callers only ever
//! write whole records.

pub mod backup;
mod capture;
mod layout;
mod memory;
mod postgres;
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

pub use backup::{BackupError, Header, Totals};
pub use memory::MemoryStore;
pub use postgres::{Lease, PgStore, redact as redact_store_url};
pub use sled_store::{DEFAULT_CACHE_BYTES, SledStore};
pub use verify::{MAX_LISTED_PROBLEMS, Problem, ProblemKind, RecordCounts, VerifyReport};

pub use crate::error::StoreError;

use crate::model::{
    AgentId, AgentRecord, AttemptLog, Millis, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId,
};

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
    /// A finished task runs again (it was retried): its entry in the
    /// finished index, under the time it finished, goes.
    Reopen {
        /// The task.
        id: TaskId,
        /// When it had finished.
        finished_at: Millis,
    },
    /// Remove a finished task past retention with everything that belongs
    /// to it: its index entries and its attempt logs.
    Remove(Removal),
    /// Remove the event records that end at or before `through` (the
    /// caller picks a `through` that ends a record), and remember that the
    /// log now starts after it.
    CompactEvents {
        /// The last sequence removed.
        through: u64,
    },
}

/// A finished task to remove, with what names it in the indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    /// The task.
    pub id: TaskId,
    /// When it finished: its key in the finished index.
    pub finished_at: Millis,
    /// Its idempotency key, which goes too (the scheduler clears it when
    /// the key no longer names this task).
    pub idempotency_key: Option<String>,
    /// Its workflow, whose index entry goes.
    pub workflow: Option<WorkflowId>,
}

impl Removal {
    /// The removal of `task`.
    pub fn of(task: &Task) -> Self {
        Self {
            id: task.id,
            finished_at: task.updated_at,
            idempotency_key: task.spec.idempotency_key.clone(),
            workflow: task.workflow,
        }
    }
}

/// A record as a backup holds it: what the store keeps apart from its
/// indexes, which writing the records back rebuilds.
// Records are handed on one by one, each moved once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A task.
    Task(Task),
    /// Events, in sequence order.
    Events(Vec<TaskEvent>),
    /// An agent registration.
    Agent(AgentRecord),
    /// A queue's settings.
    Queue(QueueRecord),
    /// A token.
    Token(TokenRecord),
    /// The log of one attempt.
    Log(AttemptLog),
}

/// The point in time an export reads the store at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// The last event sequence given out: the export holds every event up
    /// to it that is kept.
    pub sequence: u64,
    /// The last sequence compacted away: the export's events start after it.
    pub compacted_through: u64,
}

/// Where [`Store::export`] hands what it reads.
pub trait Export {
    /// The point the export reads at, before any record.
    fn begin(&mut self, point: Point) -> Result<(), StoreError>;
    /// One record. An error stops the export.
    fn record(&mut self, record: Record) -> Result<(), StoreError>;
}

/// Event sequence numbers start after this origin, which no event carries:
/// a listing on an empty store reports it, so a watch after the listing's
/// sequence replays every event (0 in a watch request means "live only").
pub const SEQUENCE_ORIGIN: u64 = 1;

/// The storage seam: everything durable goes through it.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// What kind of store this is (`sled`, `postgres`, `memory`), for
    /// operators.
    fn kind(&self) -> &'static str;
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
    /// The greatest event sequence given out: of the last event stored, or
    /// the last compacted away when none is left (0 when there never was
    /// one; see [`SEQUENCE_ORIGIN`]).
    fn last_sequence(&self) -> Result<u64, StoreError>;
    /// The last sequence compacted away (0 when none was): the log holds
    /// only events after it.
    fn compacted_through(&self) -> Result<u64, StoreError>;
    /// Where the event log can be cut so that it drops only events at or
    /// before `until` (milliseconds): the last sequence of the last of at
    /// most `max_records` whole records from the start that hold nothing
    /// later. `None` when the first record already holds a later event.
    fn events_cut(&self, until: Millis, max_records: usize) -> Result<Option<u64>, StoreError>;
    /// Up to `limit` entries of the finished index, `(finished_at, task)`,
    /// that finished at or before `until`, after `after`, oldest first.
    fn finished_tasks(
        &self,
        until: Millis,
        after: Option<(Millis, TaskId)>,
        limit: usize,
    ) -> Result<Vec<(Millis, TaskId)>, StoreError>;
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
    /// Up to `limit` attempt logs after `after` (task, attempt), in order.
    fn logs_after(&self, after: Option<(TaskId, u32)>, limit: usize) -> Result<Vec<AttemptLog>, StoreError>;
    /// Hands every record to `out` as the store was at one point in time,
    /// while writes go on: what a backup holds. Fails on a record that does
    /// not decode (a backup must not leave anything out), and with
    /// [`StoreError::Conflict`] when another export or verification is
    /// under way or the writes outran it. Blocks: call it off the async
    /// threads.
    fn export(&self, out: &mut dyn Export) -> Result<(), StoreError>;
    /// Reads every record and reports what does not decode and where the
    /// indexes and the event log disagree with the records (see
    /// [`VerifyReport`]). An error means the store could not be read at
    /// all; problems with its contents are in the report. A running
    /// server's store is read at one point in time, as by
    /// [`Store::export`] (and fails as it does when another reading is
    /// under way).
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
