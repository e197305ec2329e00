//! Ready tasks, indexed so dispatch never scans all tasks: one "shape" per
//! (queue, capability, selector), each with a FIFO per priority. Dispatch
//! compares only the heads of the shapes that hold work.
//!
//! Removal is lazy: an entry whose enqueue token no longer matches its task
//! is skipped when it reaches the head.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::model::{Priority, TaskId, TaskSpec};

/// One enqueued task; `token` is unique per enqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) token: u64,
    pub(crate) task: TaskId,
}

#[derive(Debug)]
pub(crate) struct Shape {
    pub(crate) queue: String,
    pub(crate) capability: String,
    pub(crate) selector: BTreeMap<String, String>,
    /// Indexed by `Priority as usize`.
    levels: [VecDeque<Entry>; 4],
}

impl Shape {
    /// The best entry (highest priority, oldest), after dropping stale heads.
    fn head(&mut self, is_live: &impl Fn(Entry) -> bool) -> Option<(Priority, Entry)> {
        for priority in Priority::DESCENDING {
            let level = &mut self.levels[priority as usize];
            while let Some(&entry) = level.front() {
                if is_live(entry) {
                    return Some((priority, entry));
                }
                level.pop_front();
            }
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.levels.iter().all(VecDeque::is_empty)
    }
}

#[derive(Debug, Default)]
pub(crate) struct ReadyQueues {
    shapes: Vec<Shape>,
    index: HashMap<(String, String, BTreeMap<String, String>), usize>,
    /// Shapes that may hold entries.
    nonempty: BTreeSet<usize>,
    next_token: u64,
}

impl ReadyQueues {
    /// Enqueues `task` at the back of its level; returns the token.
    pub(crate) fn push(&mut self, spec: &TaskSpec, task: TaskId) -> u64 {
        let key = (spec.queue.clone(), spec.capability.clone(), spec.selector.clone());
        let shapes = &mut self.shapes;
        let id = *self.index.entry(key).or_insert_with(|| {
            shapes.push(Shape {
                queue: spec.queue.clone(),
                capability: spec.capability.clone(),
                selector: spec.selector.clone(),
                levels: Default::default(),
            });
            shapes.len() - 1
        });
        self.next_token += 1;
        self.shapes[id].levels[spec.priority as usize].push_back(Entry { token: self.next_token, task });
        self.nonempty.insert(id);
        self.next_token
    }

    /// For each queue, the best head across its shapes that `skip` does not
    /// exclude: (shape, priority, entry).
    pub(crate) fn best_per_queue(
        &mut self,
        skip: impl Fn(usize, &Shape) -> bool,
        is_live: impl Fn(Entry) -> bool,
    ) -> HashMap<String, (usize, Priority, Entry)> {
        let mut best: HashMap<String, (usize, Priority, Entry)> = HashMap::new();
        let mut emptied = Vec::new();
        for &id in &self.nonempty {
            let shape = &mut self.shapes[id];
            if skip(id, shape) {
                continue;
            }
            match shape.head(&is_live) {
                None => emptied.push(id),
                Some((priority, entry)) => {
                    let current = best.get(&shape.queue);
                    let better =
                        current.is_none_or(|&(_, p, e)| priority > p || (priority == p && entry.token < e.token));
                    if better {
                        best.insert(shape.queue.clone(), (id, priority, entry));
                    }
                }
            }
        }
        for id in emptied {
            self.nonempty.remove(&id);
        }
        best
    }

    /// Removes the head of `shape` at `priority` (as returned by `best`).
    pub(crate) fn pop(&mut self, shape: usize, priority: Priority) {
        let s = &mut self.shapes[shape];
        s.levels[priority as usize].pop_front();
        if s.is_empty() {
            self.nonempty.remove(&shape);
        }
    }

    pub(crate) fn shape(&self, id: usize) -> &Shape {
        &self.shapes[id]
    }
}
