//! The scheduler's state machine. Synchronous and clock-explicit: every
//! entry point takes `now`, so tests drive it with paused Tokio time.
//!
//! `Core` coordinates owners that each keep their own invariants: the
//! unfinished tasks (with the ready queues and timers), [`Sessions`],
//! [`Resources`], [`RecentOutcomes`] and the [`Journal`] that records what
//! a command produced. Because they are separate fields, a task is changed
//! in place (`self.tasks.get_mut`) while the others are borrowed beside it.
//!
//! Only unfinished tasks live in memory; a task that reaches a terminal
//! state is written and dropped. Reads of finished tasks go to the store.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tracing::info;
use ulid::Ulid;

mod agents;
mod attempts;
mod explain;
mod journal;
mod recent;
mod resources;
pub(crate) mod retention;
mod sessions;
mod workflow;

use self::journal::Journal;
use self::recent::RecentOutcomes;
use self::resources::{Resource, Resources, queue_info};
use self::retention::{Held, Reopened};
use self::sessions::Sessions;
use self::workflow::Finished;
use super::ready::{Entry, ReadyQueues};
use super::timers::{Timer, TimerKey, Timers, later};
use super::{Command, Outbox};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::*;
use crate::store::{Store, StoreError, Write};

/// Maps Tokio instants to wall-clock milliseconds and back, from one
/// anchor, so paused test time and persisted timestamps agree.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    base: Instant,
    base_ms: Millis,
}

impl Clock {
    pub(crate) fn new(now: Instant) -> Self {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis);
        Self { base: now, base_ms }
    }

    pub(crate) fn ms(&self, now: Instant) -> Millis {
        self.base_ms.saturating_add(millis(now.saturating_duration_since(self.base)))
    }

    /// The instant of wall-clock time `ms`; a time too far ahead saturates
    /// (see [`later`]) rather than overflowing.
    pub(crate) fn instant(&self, ms: Millis) -> Instant {
        later(self.base, Duration::from_millis(ms.saturating_sub(self.base_ms)))
    }
}

/// A duration in whole milliseconds, saturating.
fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// A task in memory, with the scheduler's bookkeeping.
#[derive(Debug)]
struct Live {
    task: Task,
    /// The ready-queue token while queued.
    token: Option<u64>,
    timers: Vec<TimerKey>,
    /// Dependencies that have not succeeded yet.
    waiting: usize,
    /// Unfinished tasks that depend on this one.
    dependents: Vec<TaskId>,
    /// Outputs of the dependencies that succeeded, for the assignment.
    parents: Vec<ParentOutput>,
    /// The resource a queued task waits for, out of the ready queues.
    parked: Option<Resource>,
    /// When the live attempt's progress was last recorded.
    progress_saved: Option<Instant>,
    /// Armed while the live attempt has progress newer than the last
    /// recorded: when it may be recorded. Kept apart from `timers`, which
    /// it would otherwise grow by one key per interval for as long as the
    /// attempt reports.
    progress_due: Option<TimerKey>,
}

impl Live {
    fn new(task: Task) -> Self {
        Self {
            task,
            token: None,
            timers: Vec::new(),
            waiting: 0,
            dependents: Vec::new(),
            parents: Vec::new(),
            parked: None,
            progress_saved: None,
            progress_due: None,
        }
    }

    fn arm(&mut self, timers: &mut Timers, at: Instant, timer: Timer) {
        self.timers.push(timers.add(at, timer));
    }

    fn clear_timers(&mut self, timers: &mut Timers) {
        for key in self.timers.drain(..) {
            timers.remove(&key);
        }
    }

    /// Puts the task in the ready queues, with its queue timeout.
    fn enqueue(&mut self, ready: &mut ReadyQueues, timers: &mut Timers, now: Instant) {
        let token = ready.push(&self.task.spec, self.task.id);
        self.token = Some(token);
        if let Some(limit) = self.task.spec.queue_timeout {
            self.arm(timers, later(now, limit), Timer::QueueTimeout(self.task.id, token));
        }
    }

    /// Forgets the held-back progress timer; true if one was armed.
    fn disarm_progress(&mut self, timers: &mut Timers) -> bool {
        let armed = self.progress_due.take();
        if let Some(key) = &armed {
            timers.remove(key);
        }
        armed.is_some()
    }

    fn payload_bytes(&self) -> u64 {
        self.task.spec.payload.len() as u64
    }
}

pub(crate) struct Core {
    config: Arc<ServerConfig>,
    store: Arc<dyn Store>,
    /// The unfinished tasks. Their ids are the server's own ULIDs, so a
    /// fast hash that is not keyed against flooding is safe here.
    tasks: FxHashMap<TaskId, Live>,
    ready: ReadyQueues,
    timers: Timers,
    sessions: Sessions,
    resources: Resources,
    recent: RecentOutcomes,
    idempotency: HashMap<String, TaskId>,
    /// Finished tasks unfinished ones depend on: kept past retention.
    held: Held,
    /// Tasks retried since the last expiry: kept whatever the compactor saw.
    reopened: Reopened,
    /// Tasks that just ended and have dependents to settle.
    finished: VecDeque<Finished>,
    journal: Journal,
    ids: ulid::Generator,
    /// Payload bytes of the unfinished tasks, held to
    /// `max_unfinished_payload_bytes`.
    payload_bytes: u64,
    /// Something changed that may let a task be assigned.
    dispatch_pending: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("tasks", &self.tasks.len())
            .field("agents", &self.sessions.len())
            .field("timers", &self.timers.len())
            .field("last_sequence", &self.journal.last_sequence())
            .finish()
    }
}

impl Core {
    /// Rebuilds the scheduler from the store. Attempts that were live get
    /// the lease TTL for their agents to resume them.
    pub(crate) fn recover(config: Arc<ServerConfig>, store: Arc<dyn Store>, now: Instant) -> Result<Self, StoreError> {
        let next_sequence = store.last_sequence()?.max(crate::store::SEQUENCE_ORIGIN) + 1;
        let mut core = Self {
            journal: Journal::new(Clock::new(now), next_sequence),
            idempotency: store.idempotency_keys()?.into_iter().collect(),
            config,
            store,
            tasks: FxHashMap::default(),
            ready: ReadyQueues::default(),
            timers: Timers::default(),
            sessions: Sessions::default(),
            resources: Resources::default(),
            recent: RecentOutcomes::default(),
            held: Held::default(),
            reopened: Reopened::default(),
            finished: VecDeque::new(),
            ids: ulid::Generator::new(),
            payload_bytes: 0,
            dispatch_pending: true,
        };
        for record in core.store.queues()? {
            core.resources.recovered(record);
        }
        let ttl = core.config.lease_ttl;
        for record in core.store.agents()? {
            core.timers.add(later(now, ttl), Timer::Lease(record.id));
            core.sessions.recovered(record, now);
        }
        let unfinished = core.store.unfinished_tasks()?;
        let count = unfinished.len();
        // The unfinished index holds only unfinished tasks; a finished one
        // would never be settled or dropped, so it is not taken in.
        core.tasks = unfinished.into_iter().filter(|t| !t.state.is_terminal()).map(|t| (t.id, Live::new(t))).collect();
        core.payload_bytes = core.tasks.values().map(Live::payload_bytes).sum();
        let ids: Vec<TaskId> = core.tasks.keys().copied().collect();
        let mut upstream_failed = Vec::new();
        for id in &ids {
            if let Some(failed) = core.link_dependencies(*id)? {
                upstream_failed.push((*id, failed));
            }
        }
        let mut orphans = Vec::new();
        for id in ids {
            if let Some(orphan) = core.resume_recovered(id, now) {
                orphans.push(orphan);
            }
        }
        for (id, attempt) in orphans {
            let failure =
                Failure::new(reason::AGENT_LOST, "the agent holding this attempt is unknown after a restart", true);
            core.fail_attempt(id, attempt, failure, now);
        }
        for (id, parent) in upstream_failed {
            core.cancel_upstream_failed(id, parent, now);
        }
        core.settle_finished(now);
        let sequence = core.journal.last_sequence();
        info!(tasks = count, agents = core.sessions.len(), sequence, "scheduler recovered");
        Ok(core)
    }

    /// Re-arms one recovered task for its state; returns its attempt when
    /// the agent holding it is unknown.
    fn resume_recovered(&mut self, id: TaskId, now: Instant) -> Option<(TaskId, u32)> {
        let live = self.tasks.get_mut(&id)?;
        let clock = self.journal.clock;
        match live.task.state {
            TaskState::Pending if live.waiting > 0 => {}
            TaskState::Pending => {
                let at = live.task.ready_at.unwrap_or(0);
                live.arm(&mut self.timers, clock.instant(at), Timer::Ready(id, at));
            }
            TaskState::Queued => {
                live.enqueue(&mut self.ready, &mut self.timers, now);
                self.dispatch_pending = true;
            }
            TaskState::Assigned | TaskState::Running => {
                let attempt = live.task.attempt;
                self.resources.acquire(&live.task);
                let agent = live.task.live_agent().filter(|a| self.sessions.get(*a).is_some());
                let Some(agent) = agent else { return Some((id, attempt)) };
                self.sessions.hold(agent, (id, attempt));
                let deadline = live.task.deadline.unwrap_or(0);
                live.arm(&mut self.timers, clock.instant(deadline), Timer::Deadline(id, attempt));
                if live.task.cancel_requested {
                    let grace = later(now, self.config.cancel_grace);
                    live.arm(&mut self.timers, grace, Timer::CancelGrace(id, attempt));
                }
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {}
        }
        None
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    pub(crate) fn take_outbox(&mut self) -> Outbox {
        self.journal.take()
    }

    pub(crate) fn handle(&mut self, command: Command, now: Instant) {
        match command {
            Command::Submit { submissions, reply } => {
                let result = self.submit(submissions, now);
                self.journal.reply(reply, result);
            }
            Command::CancelWorkflow { id, reason, reply } => {
                let result = self.cancel_workflow(id, reason, now);
                self.journal.reply(reply, result);
            }
            Command::Explain { id, reply } => {
                let result = self.explain(id, now);
                self.journal.reply(reply, result);
            }
            Command::ListQueues { reply } => {
                let queues = self.list_queues(now);
                self.journal.reply(reply, Ok(queues));
            }
            Command::SetQueue { name, change, reply } => {
                let result = self.set_queue(&name, change, now);
                self.journal.reply(reply, result);
            }
            Command::Cancel { id, reason, reply } => {
                let result = self.cancel(id, reason, now);
                self.journal.reply(reply, result);
            }
            Command::Retry { id, reply } => {
                let result = self.retry(id, now);
                self.journal.reply(reply, result);
            }
            Command::Register { registration, tx, reply } => {
                let result = self.register(registration, tx, now);
                self.journal.reply(reply, Ok(result));
            }
            Command::Report { agent, conn, report } => self.report(agent, conn, report, now),
            Command::Disconnected { agent, conn } => self.disconnected(agent, conn, now),
            Command::ListAgents { capability, reply } => {
                let agents = self.list_agents(capability.as_deref());
                self.journal.reply(reply, Ok(agents));
            }
            Command::GetAgent { id, reply } => {
                let result = self.agent_info(id);
                self.journal.reply(reply, result);
            }
            Command::SetDraining { id, draining, reply } => {
                let result = self.set_draining(id, draining);
                self.journal.reply(reply, result);
            }
            Command::Snapshot { reply } => {
                let snapshot = self.snapshot(now);
                self.journal.reply(reply, Ok(snapshot));
            }
            Command::PutToken { record, reply } => {
                if record.revoked_at.is_some() {
                    self.close_sessions_of(&record.name);
                }
                self.journal.write(Write::Token(record));
                self.journal.reply(reply, Ok(()));
            }
            Command::Expire { groups, events_through, reply } => {
                let expired = self.expire(groups, events_through);
                self.journal.reply(reply, Ok(expired));
            }
            Command::Acting { actor, command } => {
                self.journal.set_actor(Some(actor));
                self.handle(*command, now);
                self.journal.set_actor(None);
            }
        }
        self.settle_finished(now);
    }

    /// Acts on every timer that is due.
    pub(crate) fn fire_timers(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Lease(agent) => self.check_lease(agent, now),
                Timer::Ready(id, at) => self.ready_at(id, at, now),
                Timer::Deadline(id, attempt) => self.attempt_timed_out(id, attempt, now),
                Timer::CancelGrace(id, attempt) => self.cancel_grace_over(id, attempt, now),
                Timer::QueueTimeout(id, token) => self.queue_timed_out(id, token, now),
                Timer::Progress(id, attempt) => self.progress_due(id, attempt, now),
            }
        }
    }

    /// A pending task whose start time or retry backoff has come.
    fn ready_at(&mut self, id: TaskId, at: Millis, now: Instant) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        if live.task.state != TaskState::Pending || live.task.ready_at != Some(at) {
            return;
        }
        live.clear_timers(&mut self.timers);
        live.task.ready_at = None;
        self.journal.transition(&mut live.task, TaskState::Queued, reason::READY, String::new(), now);
        live.enqueue(&mut self.ready, &mut self.timers, now);
        self.dispatch_pending = true;
        self.commit(id);
    }

    fn queue_timed_out(&mut self, id: TaskId, token: u64, now: Instant) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        if live.token != Some(token) || live.task.state != TaskState::Queued {
            return;
        }
        live.clear_timers(&mut self.timers);
        live.token = None;
        let limit = live.task.spec.queue_timeout.unwrap_or_default();
        let message = format!("waited queued longer than its queue timeout of {}", humantime::format_duration(limit));
        live.task.failure = Some(Failure::new(reason::QUEUE_TIMEOUT, message.clone(), false));
        self.journal.transition(&mut live.task, TaskState::Failed, reason::QUEUE_TIMEOUT, message, now);
        self.commit(id);
    }

    /// Offers ready tasks to agents with free slots. Queues with work take
    /// turns by weight (smooth weighted round robin); within a queue the best
    /// head (priority, then age) goes first, to the least recently used
    /// matching agent. A task whose locks or concurrency key are taken is
    /// parked until they are released.
    pub(crate) fn dispatch(&mut self, now: Instant) {
        self.settle_finished(now);
        if !self.dispatch_pending {
            return;
        }
        self.dispatch_pending = false;
        let mut blocked = BTreeSet::new();
        loop {
            let tasks = &self.tasks;
            let resources = &self.resources;
            let is_live = |entry: Entry| tasks.get(&entry.task).is_some_and(|l| l.token == Some(entry.token));
            let skip =
                |id: usize, shape: &super::ready::Shape| blocked.contains(&id) || !resources.can_dispatch(&shape.queue);
            let candidates = self.ready.best_per_queue(skip, is_live);
            let Some(queue) = self.resources.pick_queue(&candidates) else { break };
            let Some(&(shape, priority, entry)) = candidates.get(&queue) else { break };
            if let Some(live) = self.tasks.get_mut(&entry.task)
                && let Some(resource) = self.resources.unavailable(&live.task)
            {
                self.ready.pop(shape, priority);
                live.token = None;
                live.parked = Some(resource.clone());
                self.resources.park(entry.task, resource);
                continue;
            }
            let shape_of = self.ready.shape(shape);
            match self.sessions.find_idle(&shape_of.capability, &shape_of.selector) {
                Some(agent) => {
                    self.resources.charge_queue(&candidates, &queue);
                    self.ready.pop(shape, priority);
                    self.assign(entry.task, agent, now);
                }
                None => {
                    blocked.insert(shape);
                }
            }
            if self.sessions.none_idle() {
                break;
            }
        }
    }

    // ---- queues ----

    fn list_queues(&self, now: Instant) -> Vec<QueueInfo> {
        let mut names: BTreeSet<&str> = self.resources.queue_names().collect();
        names.extend(self.tasks.values().map(|l| l.task.spec.queue.as_str()));
        names.into_iter().map(|name| self.queue_info(name, now)).collect()
    }

    fn queue_info(&self, name: &str, now: Instant) -> QueueInfo {
        queue_info(&self.resources, name, self.tasks.values().map(|l| &l.task), self.journal.clock.ms(now))
    }

    /// Pauses, resumes or reconfigures a queue; the settings are durable.
    fn set_queue(&mut self, name: &str, change: super::QueueChange, now: Instant) -> Result<QueueInfo, Error> {
        let record = self.resources.set_queue(name, change)?;
        self.journal.write(Write::Queue(record));
        self.dispatch_pending = true;
        Ok(self.queue_info(name, now))
    }

    // ---- bookkeeping ----

    /// Hands back to the ready queues the tasks parked on a resource that
    /// was released.
    fn wake(&mut self, woken: Vec<(Resource, TaskId)>, now: Instant) {
        for (resource, id) in woken {
            let Some(live) = self.tasks.get_mut(&id) else { continue };
            if live.parked.as_ref() == Some(&resource) && live.task.state == TaskState::Queued {
                live.parked = None;
                live.enqueue(&mut self.ready, &mut self.timers, now);
            }
        }
        self.dispatch_pending = true;
    }

    /// Writes the task's new state; a finished task leaves memory, and its
    /// dependents are settled next.
    fn commit(&mut self, id: TaskId) {
        let Some(live) = self.tasks.get(&id) else { return };
        self.journal.write(Write::Task(live.task.clone()));
        if !live.task.state.is_terminal() {
            return;
        }
        let Some(live) = self.tasks.remove(&id) else { return };
        self.held.release(&live.parents);
        self.payload_bytes = self.payload_bytes.saturating_sub(live.payload_bytes());
        self.recent.remember(&live.task);
        if !live.dependents.is_empty() {
            self.finished.push_back(Finished::of(&live.task, live.dependents));
        }
    }

    /// Checks that `count` more tasks with `bytes` of payload fit in memory.
    fn admit(&self, count: usize, bytes: u64) -> Result<(), Error> {
        let limits = &self.config.limits;
        let held = self.tasks.len();
        if held.saturating_add(count) > limits.max_unfinished_tasks {
            return Err(Error::ResourceExhausted(format!(
                "the server holds {held} unfinished tasks and {count} more would exceed max_unfinished_tasks ({})",
                limits.max_unfinished_tasks
            )));
        }
        if self.payload_bytes.saturating_add(bytes) > limits.max_unfinished_payload_bytes {
            return Err(Error::ResourceExhausted(format!(
                "unfinished tasks hold {} payload bytes and {bytes} more would exceed \
                 max_unfinished_payload_bytes ({})",
                self.payload_bytes, limits.max_unfinished_payload_bytes
            )));
        }
        Ok(())
    }

    /// A task from memory or, if finished, from the store.
    fn lookup(&self, id: TaskId) -> Result<Option<Task>, Error> {
        match self.tasks.get(&id) {
            Some(live) => Ok(Some(live.task.clone())),
            None => Ok(self.store.task(id)?),
        }
    }

    fn new_id(&mut self) -> Ulid {
        self.ids.generate().unwrap_or_else(|_| Ulid::new())
    }

    #[cfg(test)]
    pub(crate) fn clock(&self) -> Clock {
        self.journal.clock
    }

    #[cfg(test)]
    pub(crate) fn unfinished(&self) -> usize {
        self.tasks.len()
    }

    /// The timers armed for task `id`, held-back progress included.
    #[cfg(test)]
    pub(crate) fn armed_timers(&self, id: TaskId) -> usize {
        self.tasks.get(&id).map_or(0, |l| l.timers.len() + usize::from(l.progress_due.is_some()))
    }

    /// The metrics gauges from live state: a scan of unfinished tasks and
    /// sessions, run only when Prometheus scrapes, never on the hot path.
    pub(crate) fn snapshot(&self, now: Instant) -> crate::metrics::Snapshot {
        let now_ms = self.journal.clock.ms(now);
        let mut snapshot = crate::metrics::Snapshot::default();
        for live in self.tasks.values() {
            let task = &live.task;
            // A queued task's last event is its entry into QUEUED.
            let queued_for = (task.state == TaskState::Queued)
                .then(|| Duration::from_millis(now_ms.saturating_sub(task.updated_at)));
            let overdue = task.state.is_active() && task.deadline.is_some_and(|d| d < now_ms);
            snapshot.add_task(task.state, &task.spec.queue, &task.spec.capability, queued_for, overdue);
        }
        for session in self.sessions.iter() {
            let record = &session.record;
            snapshot.add_agent(session.state(), &record.capabilities, record.slots, session.held.len());
        }
        snapshot
    }
}

fn task_not_found(id: TaskId) -> Error {
    Error::NotFound(format!("task {id} not found"))
}

fn agent_not_found(id: AgentId) -> Error {
    Error::NotFound(format!("agent {id} not found"))
}
