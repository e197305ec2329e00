//! Graph submits and dependency bookkeeping: validation (keys, unknown
//! edges, cycles) in time linear in the graph, creation in topological
//! order, and settling dependents when a task ends.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use super::{Core, Live, Timer};
use crate::error::Error;
use crate::model::*;
use crate::scheduler::SubmitOutcome;
use crate::store::StoreError;

/// A task that ended while others depended on it.
#[derive(Debug)]
pub(super) struct Finished {
    id: TaskId,
    state: TaskState,
    output: ParentOutput,
    dependents: Vec<TaskId>,
}

impl Finished {
    pub(super) fn of(task: &Task, dependents: Vec<TaskId>) -> Self {
        Self { id: task.id, state: task.state, output: parent_output(task), dependents }
    }
}

fn parent_output(task: &Task) -> ParentOutput {
    ParentOutput {
        key: task.spec.key.clone().unwrap_or_else(|| task.id.to_string()),
        task_id: task.id,
        output: task.output.clone(),
        content_type: task.output_content_type.clone(),
    }
}

/// Where a submitted task's dependency points.
#[derive(Clone, Copy, Debug)]
enum Parent {
    /// Another task of this request, by index.
    Local(usize),
    /// An unfinished task that already exists.
    Waiting(TaskId),
}

fn label(subs: &[Submission], i: usize) -> String {
    subs[i].spec.key.clone().unwrap_or_else(|| format!("tasks[{i}]"))
}

impl Core {
    /// Creates every task of the request or none. Several tasks, or any
    /// dependency, make a workflow.
    pub(super) fn submit(&mut self, subs: Vec<Submission>, now: Instant) -> Result<SubmitOutcome, Error> {
        let n = subs.len();
        let mut by_key: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, sub) in subs.iter().enumerate() {
            if let Some(key) = sub.spec.key.as_deref()
                && let Some(j) = by_key.insert(key, i)
            {
                return Err(Error::invalid(
                    format!("tasks[{i}].key"),
                    format!("'{key}' is also the key of tasks[{j}]"),
                ));
            }
        }

        // Idempotency: a task may already exist, or repeat an earlier one of
        // this request.
        let mut existing: Vec<Option<Task>> = vec![None; n];
        let mut alias: Vec<Option<usize>> = vec![None; n];
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut fresh = 0usize;
        for (i, sub) in subs.iter().enumerate() {
            match sub.spec.idempotency_key.as_deref() {
                Some(key) => {
                    if let Some(&id) = self.idempotency.get(key) {
                        let task = self.lookup(id)?.ok_or_else(|| {
                            Error::Unavailable(format!("task {id} for idempotency key '{key}' is being written; retry"))
                        })?;
                        existing[i] = Some(task);
                    } else if let Some(&j) = first_with_key.get(key) {
                        alias[i] = Some(j);
                    } else {
                        first_with_key.insert(key, i);
                        fresh += 1;
                    }
                }
                None => fresh += 1,
            }
        }
        let creating = |i: usize| existing[i].is_none() && alias[i].is_none();
        let payload: u64 = (0..n).filter(|&i| creating(i)).map(|i| subs[i].spec.payload.len() as u64).sum();
        self.admit(fresh, payload)?;

        // Resolve every edge; remember outputs of dependencies that already
        // succeeded.
        let mut parents: Vec<Vec<Parent>> = vec![Vec::new(); n];
        let mut outputs: Vec<Vec<ParentOutput>> = vec![Vec::new(); n];
        let mut resolved: Vec<Vec<TaskId>> = vec![Vec::new(); n];
        for (i, sub) in subs.iter().enumerate() {
            if !creating(i) {
                continue;
            }
            for (d, dep) in sub.depends_on.iter().enumerate() {
                let field = || format!("tasks[{i}].depends_on[{d}]");
                if let Some(&j) = by_key.get(dep.as_str()) {
                    if j == i {
                        return Err(Error::invalid("tasks", format!("dependency cycle: {dep} -> {dep}")));
                    }
                    let target = alias[j].unwrap_or(j);
                    match &existing[target] {
                        None => parents[i].push(Parent::Local(target)),
                        Some(task) => self.resolve_existing(
                            task.clone(),
                            &field(),
                            &mut parents[i],
                            &mut outputs[i],
                            &mut resolved[i],
                        )?,
                    }
                    continue;
                }
                let id = dep.parse::<TaskId>().map_err(|_| {
                    Error::invalid(field(), format!("'{dep}' is neither a key in this request nor an existing task id"))
                })?;
                let task =
                    self.lookup(id)?.ok_or_else(|| Error::invalid(field(), format!("task {id} does not exist")))?;
                self.resolve_existing(task, &field(), &mut parents[i], &mut outputs[i], &mut resolved[i])?;
            }
        }

        let order = topological_order(&subs, &parents, &creating)?;
        let workflow =
            if n > 1 || subs.iter().any(|s| !s.depends_on.is_empty()) { Some(WorkflowId(self.new_id())) } else { None };

        let mut created: Vec<Option<Task>> = vec![None; n];
        let mut subs: Vec<Option<Submission>> = subs.into_iter().map(Some).collect();
        for i in order {
            let Some(mut sub) = subs[i].take() else { continue };
            let mut depends_on = std::mem::take(&mut resolved[i]);
            let mut waiting = 0;
            let mut unfinished = Vec::new();
            for parent in &parents[i] {
                let id = match *parent {
                    Parent::Local(j) => created[j].as_ref().map(|t| t.id),
                    Parent::Waiting(id) => Some(id),
                };
                if let Some(id) = id {
                    if !depends_on.contains(&id) {
                        depends_on.push(id);
                    }
                    if !unfinished.contains(&id) {
                        unfinished.push(id);
                        waiting += 1;
                    }
                }
            }
            sub.spec.depends_on = depends_on;
            let task = self.create(sub.spec, workflow, waiting, std::mem::take(&mut outputs[i]), now);
            for parent in unfinished {
                if let Some(live) = self.tasks.get_mut(&parent) {
                    live.dependents.push(task.id);
                }
            }
            created[i] = Some(task);
        }
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let entry = match (&existing[i], alias[i]) {
                (Some(task), _) => (task.clone(), true),
                (None, Some(j)) => (created[j].clone().or_else(|| existing[j].clone()).ok_or_else(missing)?, true),
                (None, None) => (created[i].clone().ok_or_else(missing)?, false),
            };
            tasks.push(entry);
        }
        Ok(SubmitOutcome { tasks, workflow })
    }

    fn resolve_existing(
        &self,
        task: Task,
        field: &str,
        parents: &mut Vec<Parent>,
        outputs: &mut Vec<ParentOutput>,
        resolved: &mut Vec<TaskId>,
    ) -> Result<(), Error> {
        match task.state {
            TaskState::Succeeded => {
                if !resolved.contains(&task.id) {
                    resolved.push(task.id);
                    outputs.push(parent_output(&task));
                }
                Ok(())
            }
            TaskState::Failed | TaskState::Cancelled => Err(Error::FailedPrecondition(format!(
                "{field}: task {} already ended as {}, so this task could never run",
                task.id,
                task.state.name()
            ))),
            _ => {
                parents.push(Parent::Waiting(task.id));
                Ok(())
            }
        }
    }

    /// Creates one task: pending while it waits on dependencies or
    /// `not_before`, else queued.
    pub(super) fn create(
        &mut self,
        spec: TaskSpec,
        workflow: Option<WorkflowId>,
        waiting: usize,
        parents: Vec<ParentOutput>,
        now: Instant,
    ) -> Task {
        let now_ms = self.journal.clock.ms(now);
        let id = TaskId(self.new_id());
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert(key.clone(), id);
        }
        let task = Task::new(id, spec, workflow, self.journal.actor(), now_ms);
        let mut live = Live::new(task);
        live.waiting = waiting;
        for parent in &parents {
            self.held.hold(parent.task_id);
        }
        live.parents = parents;
        if waiting == 0 {
            self.make_ready(&mut live, now);
        }
        self.journal.event(&mut live.task, None, reason::SUBMITTED, String::new(), None, now);
        let task = live.task.clone();
        self.payload_bytes += live.payload_bytes();
        self.tasks.insert(id, live);
        self.commit(id);
        task
    }

    /// A task with no dependency left: queued, or pending until
    /// `not_before`.
    fn make_ready(&mut self, live: &mut Live, now: Instant) {
        let clock = self.journal.clock;
        match live.task.spec.not_before.filter(|&t| t > clock.ms(now)) {
            Some(at) => {
                live.task.ready_at = Some(at);
                let id = live.task.id;
                live.arm(&mut self.timers, clock.instant(at), Timer::Ready(id, at));
            }
            None => {
                live.task.state = TaskState::Queued;
                live.enqueue(&mut self.ready, &mut self.timers, now);
                self.dispatch_pending = true;
            }
        }
    }

    /// Settles the dependents of every task that ended: a success counts
    /// down their wait, anything else cancels them (and, in turn, theirs).
    pub(super) fn settle_finished(&mut self, now: Instant) {
        while let Some(finished) = self.finished.pop_front() {
            for child in finished.dependents {
                if finished.state == TaskState::Succeeded {
                    self.parent_succeeded(child, finished.output.clone(), now);
                } else {
                    self.cancel_upstream_failed(child, (finished.id, finished.state), now);
                }
            }
        }
    }

    fn parent_succeeded(&mut self, child: TaskId, output: ParentOutput, now: Instant) {
        let clock = self.journal.clock;
        let Some(live) = self.tasks.get_mut(&child) else { return };
        if live.task.state != TaskState::Pending || live.waiting == 0 {
            return;
        }
        live.waiting -= 1;
        self.held.hold(output.task_id);
        live.parents.push(output);
        if live.waiting > 0 {
            return;
        }
        match live.task.spec.not_before.filter(|&t| t > clock.ms(now)) {
            Some(at) => {
                live.task.ready_at = Some(at);
                live.arm(&mut self.timers, clock.instant(at), Timer::Ready(child, at));
            }
            None => {
                let why = reason::DEPENDENCIES_SUCCEEDED;
                self.journal.transition(&mut live.task, TaskState::Queued, why, String::new(), now);
                live.enqueue(&mut self.ready, &mut self.timers, now);
                self.dispatch_pending = true;
            }
        }
        self.commit(child);
    }

    pub(super) fn cancel_upstream_failed(&mut self, child: TaskId, (parent, state): (TaskId, TaskState), now: Instant) {
        let Some(live) = self.tasks.get_mut(&child) else { return };
        if live.task.state != TaskState::Pending {
            return;
        }
        live.clear_timers(&mut self.timers);
        live.task.ready_at = None;
        let message = format!("dependency {parent} ended as {}", state.name());
        live.task.failure = Some(Failure::new(reason::UPSTREAM_FAILED, message.clone(), false));
        self.journal.transition(&mut live.task, TaskState::Cancelled, reason::UPSTREAM_FAILED, message, now);
        self.commit(child);
    }

    /// Rebuilds one recovered task's links: its wait count, its place among
    /// its parents' dependents, and the outputs of parents that succeeded.
    /// Returns a parent that failed while the task still waited on it.
    pub(super) fn link_dependencies(&mut self, id: TaskId) -> Result<Option<(TaskId, TaskState)>, StoreError> {
        let Some(live) = self.tasks.get(&id) else { return Ok(None) };
        let state = live.task.state;
        let deps = live.task.spec.depends_on.clone();
        let mut failed = None;
        for dep in deps {
            if let Some(parent) = self.tasks.get_mut(&dep) {
                parent.dependents.push(id);
                if let Some(live) = self.tasks.get_mut(&id) {
                    live.waiting += 1;
                }
                continue;
            }
            match self.store.task(dep)? {
                Some(parent) if parent.state == TaskState::Succeeded => {
                    if let Some(live) = self.tasks.get_mut(&id) {
                        self.held.hold(parent.id);
                        live.parents.push(parent_output(&parent));
                    }
                }
                Some(parent) if state == TaskState::Pending => failed = Some((parent.id, parent.state)),
                _ => {}
            }
        }
        Ok(failed)
    }

    /// Cancels every unfinished task of a workflow; returns their ids.
    pub(super) fn cancel_workflow(&mut self, id: WorkflowId, why: String, now: Instant) -> Result<Vec<TaskId>, Error> {
        let members = self.store.workflow_tasks(id)?;
        if members.is_empty() {
            return Err(Error::NotFound(format!("workflow {id} not found")));
        }
        let mut cancelled = Vec::new();
        for task in members {
            if self.tasks.contains_key(&task) && self.cancel(task, why.clone(), now).is_ok() {
                cancelled.push(task);
            }
            self.settle_finished(now);
        }
        Ok(cancelled)
    }
}

fn missing() -> Error {
    Error::Unavailable("a task of this submit is being written; retry".into())
}

/// Kahn's algorithm over the local edges; on a cycle, names it.
fn topological_order(
    subs: &[Submission],
    parents: &[Vec<Parent>],
    creating: &impl Fn(usize) -> bool,
) -> Result<Vec<usize>, Error> {
    let n = subs.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (i, list) in parents.iter().enumerate() {
        for parent in list {
            if let Parent::Local(j) = *parent {
                children[j].push(i);
                indegree[i] += 1;
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| creating(i) && indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &c in &children[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    let total = (0..n).filter(|&i| creating(i)).count();
    if order.len() == total {
        return Ok(order);
    }
    // Every node left has a local parent that is also left: walk parents
    // until a node repeats, and report that loop.
    let Some(start) = (0..n).find(|&i| creating(i) && indegree[i] > 0) else { return Ok(order) };
    let mut path = vec![start];
    let mut position: HashMap<usize, usize> = HashMap::from([(start, 0)]);
    let mut node = start;
    loop {
        let next = parents[node].iter().find_map(|p| match *p {
            Parent::Local(j) if indegree[j] > 0 => Some(j),
            _ => None,
        });
        let Some(next) = next else { break };
        if let Some(&at) = position.get(&next) {
            let mut names: Vec<String> = path[at..].iter().map(|&i| label(subs, i)).collect();
            names.push(label(subs, next));
            return Err(Error::invalid("tasks", format!("dependency cycle: {}", names.join(" -> "))));
        }
        position.insert(next, path.len());
        path.push(next);
        node = next;
    }
    Err(Error::invalid("tasks", "dependency cycle"))
}
