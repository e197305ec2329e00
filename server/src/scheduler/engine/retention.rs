//! Retention's side of the scheduler: which finished tasks may go, and
//! the writes that remove them. The compactor (`crate::retention`) finds
//! the candidates in the store; the core has the last word, because only
//! it knows what happened since the compactor looked.
//!
//! Invariants:
//! - A task some unfinished task depends on stays: its output is read
//!   again when the dependent is recovered after a restart. [`Held`]
//!   counts those references.
//! - A task retried since the last removal stays, whatever the store said
//!   when the compactor read it.
//! - A workflow goes whole or not at all.

use rustc_hash::{FxHashMap, FxHashSet};

use super::Core;
use crate::model::{ParentOutput, TaskId};
use crate::store::{Removal, Write};

/// Finished tasks referenced by unfinished ones, with how many reference
/// each.
#[derive(Debug, Default)]
pub(super) struct Held {
    refs: FxHashMap<TaskId, u32>,
}

impl Held {
    /// A live task now holds the output of `parent`.
    pub(super) fn hold(&mut self, parent: TaskId) {
        *self.refs.entry(parent).or_default() += 1;
    }

    /// A live task that held these outputs left memory.
    pub(super) fn release(&mut self, parents: &[ParentOutput]) {
        for parent in parents {
            if let Some(n) = self.refs.get_mut(&parent.task_id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&parent.task_id);
                }
            }
        }
    }

    fn contains(&self, id: TaskId) -> bool {
        self.refs.contains_key(&id)
    }
}

/// What an expiry did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    /// Tasks removed.
    pub(crate) tasks: u64,
    /// Groups (workflows or single tasks) kept back for now.
    pub(crate) kept: u64,
}

impl Core {
    /// Removes the groups of finished tasks (a workflow, or one task)
    /// that may go, and the event log up to `events_through`.
    pub(super) fn expire(&mut self, groups: Vec<Vec<Removal>>, events_through: Option<u64>) -> Expired {
        // Events first: a task goes only with its events gone.
        if let Some(through) = events_through {
            self.journal.write(Write::CompactEvents { through });
        }
        let mut done = Expired::default();
        for group in groups {
            let busy =
                |id: TaskId| self.tasks.contains_key(&id) || self.reopened.contains(&id) || self.held.contains(id);
            if group.iter().any(|r| busy(r.id)) {
                done.kept += 1;
                continue;
            }
            for mut removal in group {
                // The key goes only while it still names this task.
                if let Some(key) = removal.idempotency_key.take()
                    && self.idempotency.get(&key) == Some(&removal.id)
                {
                    self.idempotency.remove(&key);
                    removal.idempotency_key = Some(key);
                }
                self.recent.forget(removal.id);
                self.journal.write(Write::Remove(removal));
                done.tasks += 1;
            }
        }
        self.reopened.clear();
        done
    }
}

/// Tasks retried since the last expiry.
pub(super) type Reopened = FxHashSet<TaskId>;
