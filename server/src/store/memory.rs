//! An in-memory [`Store`] with the same semantics as sled, minus
//! durability: a second implementation that keeps the trait honest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::verify::Checker;
use super::{Export, Point, Record, RecordCounts, Store, StoreError, VerifyReport, Write};
use crate::model::{
    AgentId, AgentRecord, AttemptLog, Millis, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId,
};

/// A [`Store`] that lives and dies with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: BTreeMap<TaskId, Task>,
    unfinished: BTreeMap<TaskId, ()>,
    events: BTreeMap<u64, TaskEvent>,
    agents: BTreeMap<AgentId, AgentRecord>,
    keys: BTreeMap<String, TaskId>,
    queues: BTreeMap<String, QueueRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    workflows: BTreeMap<(WorkflowId, TaskId), ()>,
    logs: BTreeMap<(TaskId, u32), AttemptLog>,
    finished: BTreeSet<(Millis, TaskId)>,
    compacted_through: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another writer panicked mid-batch; the
        // maps are still structurally sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for write in writes {
            match write {
                Write::Task(task) => {
                    if task.state.is_terminal() {
                        inner.unfinished.remove(&task.id);
                        inner.finished.insert((task.updated_at, task.id));
                    } else {
                        inner.unfinished.insert(task.id, ());
                    }
                    if let Some(k) = &task.spec.idempotency_key {
                        inner.keys.insert(k.clone(), task.id);
                    }
                    if let Some(workflow) = task.workflow {
                        inner.workflows.insert((workflow, task.id), ());
                    }
                    inner.tasks.insert(task.id, task.clone());
                }
                Write::Event(event) => {
                    inner.events.insert(event.sequence, event.clone());
                }
                Write::Agent(agent) => {
                    inner.agents.insert(agent.id, agent.clone());
                }
                Write::RemoveAgent(id) => {
                    inner.agents.remove(id);
                }
                Write::Queue(queue) => {
                    inner.queues.insert(queue.name.clone(), queue.clone());
                }
                Write::Token(token) => {
                    inner.tokens.insert(token.name.clone(), token.clone());
                }
                Write::Reopen { id, finished_at } => {
                    inner.finished.remove(&(*finished_at, *id));
                }
                Write::Remove(removal) => {
                    let id = removal.id;
                    inner.tasks.remove(&id);
                    inner.unfinished.remove(&id);
                    inner.finished.remove(&(removal.finished_at, id));
                    if let Some(k) = &removal.idempotency_key {
                        inner.keys.remove(k);
                    }
                    if let Some(workflow) = removal.workflow {
                        inner.workflows.remove(&(workflow, id));
                    }
                    inner.logs.retain(|(task, _), _| *task != id);
                }
                Write::CompactEvents { through } => {
                    let kept = inner.events.split_off(&through.saturating_add(1));
                    inner.events = kept;
                    inner.compacted_through = inner.compacted_through.max(*through);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn record_counts(&self) -> Result<RecordCounts, StoreError> {
        let inner = self.lock();
        let n = |len: usize| len as u64;
        Ok(RecordCounts {
            tasks: n(inner.tasks.len()),
            events: n(inner.events.len()),
            agents: n(inner.agents.len()),
            queues: n(inner.queues.len()),
            tokens: n(inner.tokens.len()),
            idempotency_keys: n(inner.keys.len()),
            workflow_entries: n(inner.workflows.len()),
            unfinished_entries: n(inner.unfinished.len()),
            finished_entries: n(inner.finished.len()),
            logs: n(inner.logs.len()),
        })
    }

    fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        Ok(self.lock().tasks.get(&id).cloned())
    }

    fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished_only: bool) -> Result<Vec<Task>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let inner = self.lock();
        let lower = after.map_or(Unbounded, Excluded);
        let tasks: Vec<Task> = if unfinished_only {
            inner
                .unfinished
                .range((lower, Unbounded))
                .filter_map(|(id, _)| inner.tasks.get(id).cloned())
                .take(limit)
                .collect()
        } else {
            inner.tasks.range((lower, Unbounded)).map(|(_, t)| t.clone()).take(limit).collect()
        };
        Ok(tasks)
    }

    fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let inner = self.lock();
        Ok(inner.unfinished.keys().filter_map(|id| inner.tasks.get(id).cloned()).collect())
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        let inner = self.lock();
        Ok(inner.events.range(after.saturating_add(1)..).map(|(_, e)| e.clone()).take(limit).collect())
    }

    fn last_sequence(&self) -> Result<u64, StoreError> {
        let inner = self.lock();
        Ok(inner.events.keys().next_back().copied().unwrap_or(inner.compacted_through))
    }

    fn compacted_through(&self) -> Result<u64, StoreError> {
        Ok(self.lock().compacted_through)
    }

    fn events_cut(&self, until: Millis, max_records: usize) -> Result<Option<u64>, StoreError> {
        let inner = self.lock();
        Ok(inner.events.values().take(max_records).take_while(|e| e.at <= until).map(|e| e.sequence).last())
    }

    fn finished_tasks(
        &self,
        until: Millis,
        after: Option<(Millis, TaskId)>,
        limit: usize,
    ) -> Result<Vec<(Millis, TaskId)>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let inner = self.lock();
        let lower = after.map_or(Unbounded, Excluded);
        Ok(inner.finished.range((lower, Unbounded)).take_while(|(at, _)| *at <= until).take(limit).copied().collect())
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        Ok(self.lock().agents.values().cloned().collect())
    }

    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError> {
        Ok(self.lock().queues.values().cloned().collect())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.values().cloned().collect())
    }

    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError> {
        let inner = self.lock();
        Ok(inner.workflows.keys().filter(|(w, _)| *w == workflow).map(|(_, t)| *t).collect())
    }

    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError> {
        Ok(self.lock().keys.iter().map(|(k, v)| (k.clone(), *v)).collect())
    }

    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError> {
        self.lock().logs.insert((log.task_id, log.attempt), log.clone());
        Ok(())
    }

    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError> {
        Ok(self.lock().logs.get(&(task, attempt)).cloned())
    }

    fn logs_after(&self, after: Option<(TaskId, u32)>, limit: usize) -> Result<Vec<AttemptLog>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let inner = self.lock();
        Ok(inner
            .logs
            .range((after.map_or(Unbounded, Excluded), Unbounded))
            .map(|(_, l)| l.clone())
            .take(limit)
            .collect())
    }

    fn export(&self, out: &mut dyn Export) -> Result<(), StoreError> {
        // A copy taken under the lock is the point in time; the records go
        // out after it is released.
        let (point, records) = {
            let inner = self.lock();
            let point = Point {
                sequence: inner.events.keys().next_back().copied().unwrap_or(inner.compacted_through),
                compacted_through: inner.compacted_through,
            };
            let mut records: Vec<Record> = Vec::new();
            records.extend(inner.agents.values().cloned().map(Record::Agent));
            records.extend(inner.tokens.values().cloned().map(Record::Token));
            let events: Vec<TaskEvent> = inner.events.values().cloned().collect();
            records.extend(events.chunks(64).map(|group| Record::Events(group.to_vec())));
            records.extend(inner.queues.values().cloned().map(Record::Queue));
            records.extend(inner.tasks.values().cloned().map(Record::Task));
            records.extend(inner.logs.values().cloned().map(Record::Log));
            (point, records)
        };
        out.begin(point)?;
        records.into_iter().try_for_each(|record| out.record(record))
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let inner = self.lock();
        let mut checker = Checker::new();
        for (id, task) in &inner.tasks {
            checker.task(*id, Ok(task.clone()));
        }
        for id in inner.unfinished.keys() {
            checker.unfinished(*id);
        }
        for (sequence, event) in &inner.events {
            checker.events(*sequence, Ok(vec![event.clone()]));
        }
        for (id, agent) in &inner.agents {
            checker.agent(*id, Ok(agent.clone()));
        }
        for (key, task) in &inner.keys {
            checker.idempotency_key(key.clone(), *task);
        }
        for (name, queue) in &inner.queues {
            checker.queue(name, Ok(queue.clone()));
        }
        for (name, token) in &inner.tokens {
            checker.token(name, Ok(token.clone()));
        }
        for (workflow, task) in inner.workflows.keys() {
            checker.workflow_entry(*workflow, *task);
        }
        for ((task, attempt), log) in &inner.logs {
            checker.log(*task, *attempt, Ok(log.clone()));
        }
        for (at, task) in &inner.finished {
            checker.finished_entry(*at, *task);
        }
        checker.finished_index_complete();
        checker.compacted_through(inner.compacted_through);
        Ok(checker.finish())
    }
}
