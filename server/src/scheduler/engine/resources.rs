//! Locks, concurrency keys and queues: what a ready task needs besides an
//! agent.
//!
//! Invariants:
//! - Locks and keys are granted all at once at assignment and released when
//!   the attempt ends, so there is no deadlock by construction.
//! - A queued task that cannot have them is parked under the first resource
//!   it lacks, and handed back by [`Resources::release`] when that frees.
//! - A lock with no holder and a key with no running task are absent from
//!   the maps, so their size follows the running tasks, not history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::error::Error;
use crate::model::*;
use crate::scheduler::QueueChange;

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
    exclusive: Option<TaskId>,
    shared: BTreeSet<TaskId>,
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

/// Queues, locks, concurrency keys and the tasks parked on them.
#[derive(Debug, Default)]
pub(super) struct Resources {
    queues: HashMap<String, QueueState>,
    locks: HashMap<String, LockHolders>,
    running_by_key: HashMap<String, u32>,
    parked: HashMap<Resource, Vec<TaskId>>,
}

impl Resources {
    /// Restores a queue's durable settings.
    pub(super) fn recovered(&mut self, record: QueueRecord) {
        self.queues.insert(record.name.clone(), QueueState::new(record));
    }

    fn queue_mut(&mut self, name: &str) -> &mut QueueState {
        self.queues.entry(name.to_owned()).or_insert_with(|| QueueState::new(QueueRecord::new(name)))
    }

    pub(super) fn queue(&self, name: &str) -> Option<&QueueState> {
        self.queues.get(name)
    }

    pub(super) fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// True when the queue may have a task assigned now.
    pub(super) fn can_dispatch(&self, queue: &str) -> bool {
        self.queues.get(queue).is_none_or(QueueState::can_dispatch)
    }

    /// The holders of `lock` when they exclude a holder in `mode`.
    pub(super) fn conflicting(&self, lock: &str, mode: LockMode) -> Option<&LockHolders> {
        self.locks.get(lock).filter(|h| h.conflicts(mode))
    }

    /// How many tasks with concurrency key `key` run.
    pub(super) fn running_with_key(&self, key: &str) -> u32 {
        self.running_by_key.get(key).copied().unwrap_or(0)
    }

    /// The first resource `task` needs that is taken, if any.
    pub(super) fn unavailable(&self, task: &Task) -> Option<Resource> {
        for lock in &task.spec.locks {
            if self.conflicting(&lock.name, lock.mode).is_some() {
                return Some(Resource::Lock(lock.name.clone()));
            }
        }
        if let Some(c) = &task.spec.concurrency
            && self.running_with_key(&c.key) >= c.max
        {
            return Some(Resource::Concurrency(c.key.clone()));
        }
        None
    }

    /// Takes every lock and key of `task` and counts it as running in its
    /// queue. Callers have checked [`Resources::unavailable`].
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

    /// Gives back what [`Resources::acquire`] took; returns the tasks that
    /// were parked on it, each with the resource it waited for.
    pub(super) fn release(&mut self, task: &Task) -> Vec<(Resource, TaskId)> {
        let mut woken = Vec::new();
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
            self.unpark(Resource::Lock(lock.name.clone()), &mut woken);
        }
        if let Some(c) = &task.spec.concurrency {
            if let Some(count) = self.running_by_key.get_mut(&c.key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.running_by_key.remove(&c.key);
                }
            }
            self.unpark(Resource::Concurrency(c.key.clone()), &mut woken);
        }
        let queue = self.queue_mut(&task.spec.queue);
        queue.running = queue.running.saturating_sub(1);
        woken
    }

    /// Parks a queued task until `resource` frees.
    pub(super) fn park(&mut self, id: TaskId, resource: Resource) {
        self.parked.entry(resource).or_default().push(id);
    }

    fn unpark(&mut self, resource: Resource, woken: &mut Vec<(Resource, TaskId)>) {
        let Some(ids) = self.parked.remove(&resource) else { return };
        woken.extend(ids.into_iter().map(|id| (resource.clone(), id)));
    }

    fn weight(&self, name: &str) -> i64 {
        i64::from(self.queues.get(name).map_or(1, |q| q.record.weight.max(1)))
    }

    /// Smooth weighted round robin among the queues that have a candidate:
    /// the queue with the most credit after each earns its weight. Nothing
    /// changes until [`Resources::charge_queue`] records that it was served.
    pub(super) fn pick_queue<T>(&self, candidates: &HashMap<String, T>) -> Option<String> {
        let mut names: Vec<&String> = candidates.keys().collect();
        names.sort();
        let credit = |name: &str| self.queues.get(name).map_or(0, |q| q.credit).saturating_add(self.weight(name));
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
            let credit = &mut self.queue_mut(name).credit;
            *credit = credit.saturating_add(weight);
        }
        let credit = &mut self.queue_mut(served).credit;
        *credit = credit.saturating_sub(total);
    }

    /// Pauses, resumes or reconfigures a queue; returns its new settings,
    /// which the caller makes durable.
    pub(super) fn set_queue(&mut self, name: &str, change: QueueChange) -> Result<QueueRecord, Error> {
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
        Ok(queue.record.clone())
    }
}

/// A queue's settings, depth by state and oldest queued age, from the
/// unfinished tasks.
pub(super) fn queue_info<'a>(
    resources: &Resources,
    name: &str,
    tasks: impl Iterator<Item = &'a Task>,
    now_ms: Millis,
) -> QueueInfo {
    let mut depth: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut oldest: Option<Millis> = None;
    for task in tasks.filter(|t| t.spec.queue == name) {
        *depth.entry(task.state.name()).or_default() += 1;
        if task.state == TaskState::Queued {
            oldest = Some(oldest.map_or(task.updated_at, |o| o.min(task.updated_at)));
        }
    }
    let (record, running) = match resources.queue(name) {
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
