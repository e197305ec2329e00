//! Deadlines the scheduler acts on, in one ordered set. Timers are removed
//! when the state they guard changes, so the set holds only live ones.

use std::collections::BTreeSet;

use tokio::time::Instant;

use crate::model::{AgentId, Millis, TaskId};

/// What to do when a deadline passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Timer {
    /// Check whether the agent's lease ran out.
    Lease(AgentId),
    /// A pending task whose `ready_at` is this instant becomes queued.
    Ready(TaskId, Millis),
    /// The attempt's execution timeout.
    Deadline(TaskId, u32),
    /// The cancelled attempt's grace period.
    CancelGrace(TaskId, u32),
    /// The queue timeout of the task enqueued with this token.
    QueueTimeout(TaskId, u64),
}

/// Identifies one armed timer, for removal.
pub(crate) type TimerKey = (Instant, u64, Timer);

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<TimerKey>,
    seq: u64,
}

impl Timers {
    pub(crate) fn add(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.seq += 1;
        let key = (at, self.seq, timer);
        self.set.insert(key);
        key
    }

    pub(crate) fn remove(&mut self, key: &TimerKey) {
        self.set.remove(key);
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|k| k.0)
    }

    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.set.first()?.0 <= now { self.set.pop_first().map(|k| k.2) } else { None }
    }

    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}
