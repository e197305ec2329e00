//! The attempt outcomes of recently finished tasks, so a duplicate or late
//! report about them is answered without a store read.
//!
//! Invariant: at most [`RECENT_CAPACITY`] tasks are remembered; the oldest
//! is forgotten first, and a forgotten task's reports are checked against
//! the store instead.

use std::collections::{HashMap, VecDeque};

use crate::model::{AgentId, Task, TaskId, TaskState};

/// How many finished tasks' attempt outcomes are kept.
const RECENT_CAPACITY: usize = 16_384;

/// One attempt's number, holder and final state.
pub(super) type Outcome = (u32, AgentId, TaskState);

#[derive(Debug, Default)]
pub(super) struct RecentOutcomes {
    outcomes: HashMap<TaskId, Vec<Outcome>>,
    order: VecDeque<TaskId>,
}

impl RecentOutcomes {
    /// Remembers a task that just finished.
    pub(super) fn remember(&mut self, task: &Task) {
        let outcomes = task.attempts.iter().map(|a| (a.number, a.agent_id, a.state)).collect();
        if self.outcomes.insert(task.id, outcomes).is_none() {
            self.order.push_back(task.id);
        }
        while self.order.len() > RECENT_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }

    /// Forgets a task that runs again (it was retried).
    pub(super) fn forget(&mut self, id: TaskId) {
        self.outcomes.remove(&id);
    }

    /// The outcomes of `id`'s attempts, if it is remembered.
    pub(super) fn get(&self, id: TaskId) -> Option<&[Outcome]> {
        self.outcomes.get(&id).map(Vec::as_slice)
    }
}
