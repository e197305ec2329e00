//! The default store: one sled tree with prefixed keys, so a batch touching
//! tasks, events, agents and indexes is one atomic `apply_batch`.
//!
//! Keys: `t`+id → task, `u`+id → unfinished marker, `e`+seq → the events
//! of one batch from that sequence on (at most `EVENTS_PER_RECORD`),
//! `a`+id → agent, `k`+key → task id, `q`+name → queue settings,
//! `w`+workflow id+task id → workflow membership.
//!
//! Attempt logs live in a second tree, `logs` (task id + attempt → log),
//! so their larger records never share leaves with the task records the
//! scheduler rewrites on every transition.

use std::path::Path;

use super::{Store, StoreError, Write, decode, encode};
use crate::model::{AgentRecord, AttemptLog, QueueRecord, Task, TaskEvent, TaskId, WorkflowId};

const TASK: u8 = b't';
const UNFINISHED: u8 = b'u';
const EVENT: u8 = b'e';
/// Events stored under one key. A batch's events go out together, so
/// grouping them saves a tree operation per event; the bound keeps a leaf
/// of such records (sled splits leaves past 16 entries) well under sled's
/// blob threshold of a quarter segment.
const EVENTS_PER_RECORD: usize = 16;
const AGENT: u8 = b'a';
const IDEMPOTENCY: u8 = b'k';
const QUEUE: u8 = b'q';
/// sled's own default is 1 GiB, which would dominate the server's memory.
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;
const WORKFLOW: u8 = b'w';

/// A sled-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    logs: sled::Tree,
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn key(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id);
    k
}

fn log_key(task: TaskId, attempt: u32) -> [u8; 20] {
    let mut k = [0; 20];
    k[..16].copy_from_slice(&task.to_bytes());
    k[16..].copy_from_slice(&attempt.to_be_bytes());
    k
}

/// An event record: a group of events, or one event as stores before
/// grouping wrote them.
fn decode_events(bytes: &[u8]) -> Result<Vec<TaskEvent>, StoreError> {
    decode::<Vec<TaskEvent>>(bytes).or_else(|_| decode::<TaskEvent>(bytes).map(|event| vec![event]))
}

fn task_id_of(key: &[u8]) -> Result<TaskId, StoreError> {
    let bytes: [u8; 16] =
        key.get(1..17).and_then(|b| b.try_into().ok()).ok_or_else(|| StoreError::Codec("bad task key".into()))?;
    Ok(TaskId::from_bytes(bytes))
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    /// `flush_every` is sled's background flush period; `None` leaves
    /// flushing to [`Store::flush`].
    pub fn open(dir: &Path, flush_every: Option<std::time::Duration>) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, flush_every, DEFAULT_CACHE_BYTES)
    }

    /// Like [`SledStore::open`], with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        flush_every: Option<std::time::Duration>,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every.map(|d| d.as_millis().max(1) as u64))
            .open()
            .map_err(engine)?;
        let tree = db.open_tree("muster").map_err(engine)?;
        let logs = db.open_tree("logs").map_err(engine)?;
        Ok(Self { db, tree, logs })
    }

    fn scan_prefix<T>(
        &self,
        prefix: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.tree
            .scan_prefix([prefix])
            .map(|item| {
                let (k, v) = item.map_err(engine)?;
                f(&k, &v)
            })
            .collect()
    }
}

impl Store for SledStore {
    fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut events: Vec<&TaskEvent> = Vec::new();
        for write in writes {
            match write {
                Write::Task(task) => {
                    let id = task.id.to_bytes();
                    batch.insert(key(TASK, &id), encode(task)?);
                    if task.state.is_terminal() {
                        batch.remove(key(UNFINISHED, &id));
                    } else {
                        batch.insert(key(UNFINISHED, &id), &[][..]);
                    }
                    if let Some(k) = &task.spec.idempotency_key {
                        batch.insert(key(IDEMPOTENCY, k.as_bytes()), &id[..]);
                    }
                    if let Some(workflow) = task.workflow {
                        let mut member = key(WORKFLOW, &workflow.to_bytes());
                        member.extend_from_slice(&id);
                        batch.insert(member, &[][..]);
                    }
                }
                Write::Queue(queue) => batch.insert(key(QUEUE, queue.name.as_bytes()), encode(queue)?),
                Write::Event(event) => events.push(event),
                Write::Agent(agent) => batch.insert(key(AGENT, &agent.id.to_bytes()), encode(agent)?),
                Write::RemoveAgent(id) => batch.remove(key(AGENT, &id.to_bytes())),
            }
        }
        // Sequences only grow, so records never overlap and each is found
        // by the first sequence it holds.
        for group in events.chunks(EVENTS_PER_RECORD) {
            if let Some(first) = group.first() {
                batch.insert(key(EVENT, &first.sequence.to_be_bytes()), encode(&group)?);
            }
        }
        self.tree.apply_batch(batch).map_err(engine)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(engine)
    }

    fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.tree.get(key(TASK, &id.to_bytes())).map_err(engine)?.map(|v| decode(&v)).transpose()
    }

    fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished_only: bool) -> Result<Vec<Task>, StoreError> {
        let prefix = if unfinished_only { UNFINISHED } else { TASK };
        let start = match after {
            // The byte after the id's last key sorts after it and before the
            // next id.
            Some(id) => {
                let mut k = key(prefix, &id.to_bytes());
                k.push(0);
                k
            }
            None => vec![prefix],
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![prefix + 1]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(engine)?;
            if unfinished_only {
                if let Some(task) = self.task(task_id_of(&k)?)? {
                    out.push(task);
                }
            } else {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let ids = self.scan_prefix(UNFINISHED, |k, _| task_id_of(k))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(task) = self.task(id)? {
                out.push(task);
            }
        }
        Ok(out)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        // The record holding `after + 1` starts at or before it.
        let wanted = key(EVENT, &after.saturating_add(1).to_be_bytes());
        let start = match self.tree.range(vec![EVENT]..=wanted).next_back() {
            Some(item) => item.map_err(engine)?.0.to_vec(),
            None => vec![EVENT],
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![EVENT + 1]) {
            let (_, v) = item.map_err(engine)?;
            for event in decode_events(&v)? {
                if event.sequence > after {
                    if out.len() >= limit {
                        return Ok(out);
                    }
                    out.push(event);
                }
            }
        }
        Ok(out)
    }

    fn last_sequence(&self) -> Result<u64, StoreError> {
        match self.tree.scan_prefix([EVENT]).next_back() {
            Some(item) => {
                let (_, v) = item.map_err(engine)?;
                Ok(decode_events(&v)?.iter().map(|e| e.sequence).max().unwrap_or(0))
            }
            None => Ok(0),
        }
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan_prefix(AGENT, |_, v| decode(v))
    }

    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError> {
        self.scan_prefix(QUEUE, |_, v| decode(v))
    }

    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError> {
        let prefix = key(WORKFLOW, &workflow.to_bytes());
        self.tree
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, _) = item.map_err(engine)?;
                let bytes: [u8; 16] = k
                    .get(17..33)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| StoreError::Codec("bad workflow key".into()))?;
                Ok(TaskId::from_bytes(bytes))
            })
            .collect()
    }

    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError> {
        self.scan_prefix(IDEMPOTENCY, |k, v| {
            let name = String::from_utf8(k[1..].to_vec()).map_err(|e| StoreError::Codec(e.to_string()))?;
            let bytes: [u8; 16] =
                v.as_ref().try_into().map_err(|_| StoreError::Codec("bad idempotency value".into()))?;
            Ok((name, TaskId::from_bytes(bytes)))
        })
    }

    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError> {
        self.logs.insert(log_key(log.task_id, log.attempt), encode(log)?).map(|_| ()).map_err(engine)
    }

    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError> {
        self.logs.get(log_key(task, attempt)).map_err(engine)?.map(|v| decode(&v)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_event_records_of_earlier_stores_are_still_read() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let task = crate::store::test_task();
        let old = crate::store::test_event(1, &task);
        store.tree.insert(key(EVENT, &1u64.to_be_bytes()), encode(&old)?)?;
        store.write(&[
            Write::Event(crate::store::test_event(2, &task)),
            Write::Event(crate::store::test_event(3, &task)),
        ])?;
        let seqs: Vec<u64> = store.events_after(0, 10)?.into_iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(store.events_after(1, 10)?.len(), 2);
        assert_eq!(store.last_sequence()?, 3);
        Ok(())
    }
}
