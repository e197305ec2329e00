//! Locks, concurrency keys and queues: what a ready task needs besides an
//! agent. Locks and keys are granted all at once at assignment and released
//! when the attempt ends, so there is no deadlock by construction; a task
//! that cannot have them is parked until they are released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::Core;
use crate::error::Error;
use crate::model::*;
use crate::scheduler::QueueChange;
use crate::store::Write;

/// Something a ready task can wait for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Resource {
    /// A named lock.
    Lock(String),
    /// A concurrency key at its maximum.
    Concurrency(String),
}

/// The holders of one lock.
#[derive(Debug, Default)]
pub(crate) struct LockHolders {
    pub(super) exclusive: Option<TaskId>,
    pub(super) shared: BTreeSet<TaskId>,
}

impl LockHolders {
    pub(super) fn conflicts(&self, mode: LockMode) -> bool {
        match mode {
            LockMode::Exclusive => self.exclusive.is_some() || !self.shared.is_empty(),
            LockMode::Shared => self.exclusive.is_some(),
        }
    }

    pub(super) fn holders(&self) -> Vec<TaskId> {
        self.exclusive.iter().chain(self.shared.iter()).copied().collect()
    }
}

/// A queue's settings and live counters.
#[derive(Debug)]
pub(crate) struct QueueState {
    pub(super) record: QueueRecord,
    pub(super) running: u32,
    /// Smooth weighted round robin credit.
    credit: i64,
}

impl QueueState {
    pub(crate) fn new(record: QueueRecord) -> Self {
        Self { record, running: 0, credit: 0 }
    }

    /// Not paused and below its maximum running count.
    pub(crate) fn can_dispatch(&self) -> bool {
        !self.record.paused && (self.record.max_running == 0 || self.running < self.record.max_running)
    }
}

impl Core {
    fn queue_mut(&mut self, name: &str) -> &mut QueueState {
        self.queues.entry(name.to_owned()).or_insert_with(|| QueueState::new(QueueRecord::new(name)))
    }

    /// The first resource `task` needs that is taken, if any.
    pub(super) fn unavailable(&self, task: &Task) -> Option<Resource> {
        for lock in &task.spec.locks {
            if self.locks.get(&lock.name).is_some_and(|h| h.conflicts(lock.mode)) {
                return Some(Resource::Lock(lock.name.clone()));
            }
        }
        if let Some(c) = &task.spec.concurrency
            && self.running_by_key.get(&c.key).copied().unwrap_or(0) >= c.max
        {
            return Some(Resource::Concurrency(c.key.clone()));
        }
        None
    }

    /// Takes every lock and key of `task` and counts it as running in its
    /// queue. Callers have checked [`Core::unavailable`].
    pub(super) fn acquire(&mut self, task: &Task) {
        for lock in &task.spec.locks {
            let holders = self.locks.entry(lock.name.clone()).or_default();
            match lock.mode {
                LockMode::Exclusive => holders.exclusive = Some(task.id),
                LockMode::Shared => {
                    holders.shared.insert(task.id);
                }
            }
        }
        if let Some(c) = &task.spec.concurrency {
            *self.running_by_key.entry(c.key.clone()).or_default() += 1;
        }
        self.queue_mut(&task.spec.queue).running += 1;
    }

    /// Gives back what [`Core::acquire`] took and wakes the tasks parked on
    /// it.
    pub(super) fn release(&mut self, task: &Task, now: Instant) {
        for lock in &task.spec.locks {
            if let Some(holders) = self.locks.get_mut(&lock.name) {
                if holders.exclusive == Some(task.id) {
                    holders.exclusive = None;
                }
                holders.shared.remove(&task.id);
                if holders.exclusive.is_none() && holders.shared.is_empty() {
                    self.locks.remove(&lock.name);
                }
            }
            self.unpark(&Resource::Lock(lock.name.clone()), now);
        }
        if let Some(c) = &task.spec.concurrency {
            if let Some(count) = self.running_by_key.get_mut(&c.key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.running_by_key.remove(&c.key);
                }
            }
            self.unpark(&Resource::Concurrency(c.key.clone()), now);
        }
        let queue = self.queue_mut(&task.spec.queue);
        queue.running = queue.running.saturating_sub(1);
        self.dispatch_pending = true;
    }

    /// Moves a queued task out of the ready queues until `resource` frees.
    pub(super) fn park(&mut self, id: TaskId, resource: Resource) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        live.token = None;
        live.parked = Some(resource.clone());
        self.parked.entry(resource).or_default().push(id);
    }

    fn unpark(&mut self, resource: &Resource, now: Instant) {
        let Some(ids) = self.parked.remove(resource) else { return };
        for id in ids {
            let Some(mut live) = self.tasks.remove(&id) else { continue };
            if live.parked.as_ref() == Some(resource) && live.task.state == TaskState::Queued {
                live.parked = None;
                self.enqueue(&mut live, now);
            }
            self.tasks.insert(id, live);
        }
    }

    fn weight(&self, name: &str) -> i64 {
        i64::from(self.queues.get(name).map_or(1, |q| q.record.weight.max(1)))
    }

    /// Smooth weighted round robin among the queues that have a candidate:
    /// the queue with the most credit after each earns its weight. Nothing
    /// changes until [`Core::charge_queue`] records that it was served.
    pub(super) fn pick_queue<T>(&self, candidates: &HashMap<String, T>) -> Option<String> {
        let mut names: Vec<&String> = candidates.keys().collect();
        names.sort();
        let credit = |name: &str| self.queues.get(name).map_or(0, |q| q.credit) + self.weight(name);
        names.into_iter().max_by_key(|name| (credit(name), std::cmp::Reverse(*name))).cloned()
    }

    /// Records that `served` was picked among `candidates`.
    pub(super) fn charge_queue<T>(&mut self, candidates: &HashMap<String, T>, served: &str) {
        if candidates.len() < 2 {
            return;
        }
        let mut total = 0;
        for name in candidates.keys() {
            let weight = self.weight(name);
            total += weight;
            self.queue_mut(name).credit += weight;
        }
        self.queue_mut(served).credit -= total;
    }

    pub(super) fn queue_info(&self, name: &str, now: Instant) -> QueueInfo {
        let now_ms = self.clock.ms(now);
        let mut depth: BTreeMap<&'static str, u32> = BTreeMap::new();
        let mut oldest: Option<Millis> = None;
        for live in self.tasks.values().filter(|l| l.task.spec.queue == name) {
            *depth.entry(live.task.state.name()).or_default() += 1;
            if live.task.state == TaskState::Queued {
                oldest = Some(oldest.map_or(live.task.updated_at, |o| o.min(live.task.updated_at)));
            }
        }
        let (record, running) = match self.queues.get(name) {
            Some(q) => (q.record.clone(), q.running),
            None => (QueueRecord::new(name), 0),
        };
        QueueInfo {
            record,
            depth,
            running,
            oldest_queued_age: oldest.map(|o| Duration::from_millis(now_ms.saturating_sub(o))),
        }
    }

    /// Every queue that has settings or unfinished tasks.
    pub(super) fn list_queues(&self, now: Instant) -> Vec<QueueInfo> {
        let mut names: BTreeSet<&str> = self.queues.keys().map(String::as_str).collect();
        names.extend(self.tasks.values().map(|l| l.task.spec.queue.as_str()));
        names.into_iter().map(|name| self.queue_info(name, now)).collect()
    }

    /// Pauses, resumes or reconfigures a queue; the settings are durable.
    pub(super) fn set_queue(&mut self, name: &str, change: QueueChange, now: Instant) -> Result<QueueInfo, Error> {
        if change.weight == Some(0) {
            return Err(Error::invalid("weight", "must be at least 1"));
        }
        let queue = self.queue_mut(name);
        if let Some(paused) = change.paused {
            queue.record.paused = paused;
        }
        if let Some(weight) = change.weight {
            queue.record.weight = weight;
        }
        if let Some(max) = change.max_running {
            queue.record.max_running = max;
        }
        let record = queue.record.clone();
        self.out.writes.push(Write::Queue(record));
        self.dispatch_pending = true;
        Ok(self.queue_info(name, now))
    }
}
