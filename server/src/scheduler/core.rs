//! The scheduler's state machine. Synchronous and clock-explicit: every
//! entry point takes `now`, so tests drive it with paused Tokio time.
//!
//! Only unfinished tasks live in memory; a task that reaches a terminal
//! state is written and dropped. Reads of finished tasks go to the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use ulid::Ulid;

mod explain;
mod resources;
mod workflow;

use super::ready::{Entry, ReadyQueues};
use super::timers::{Timer, TimerKey, Timers};
use super::{AgentTx, Command, Effect, Outbox, Reply, ToAgent};
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
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis);
        Self { base: now, base_ms }
    }

    pub(crate) fn ms(&self, now: Instant) -> Millis {
        self.base_ms + now.saturating_duration_since(self.base).as_millis() as Millis
    }

    pub(crate) fn instant(&self, ms: Millis) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }
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
    parked: Option<resources::Resource>,
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
        }
    }
}

/// A connected or resumable agent session.
#[derive(Debug)]
struct Session {
    record: AgentRecord,
    tx: Option<AgentTx>,
    conn: u64,
    last_seen: Instant,
    disconnected_at: Option<Instant>,
    held: BTreeSet<(TaskId, u32)>,
    /// Position in the idle index while it has a free slot.
    stamp: Option<u64>,
}

impl Session {
    fn state(&self) -> AgentState {
        match (&self.tx, self.record.draining) {
            (None, _) => AgentState::Disconnected,
            (Some(_), true) => AgentState::Draining,
            (Some(_), false) => AgentState::Connected,
        }
    }
}

/// Outcome of checking a report against the fencing rules.
enum Check {
    /// The attempt is live and this agent holds it.
    Live,
    /// This attempt ended (or was taken back) in this state.
    Ended(TaskState),
    /// Not this agent's attempt, or no such attempt: a hostile report.
    Foreign(String),
}

/// How many finished tasks' attempt outcomes are kept in memory to answer
/// duplicate reports without a store read.
const RECENT_CAPACITY: usize = 16_384;
/// Attempt records kept per task.
const MAX_ATTEMPT_HISTORY: usize = 100;

pub(crate) struct Core {
    config: Arc<ServerConfig>,
    store: Arc<dyn Store>,
    clock: Clock,
    tasks: HashMap<TaskId, Live>,
    ready: ReadyQueues,
    agents: HashMap<AgentId, Session>,
    tokens: HashMap<String, AgentId>,
    /// Agents with a free slot, per capability, least recently used first.
    idle: HashMap<String, BTreeMap<u64, AgentId>>,
    idempotency: HashMap<String, TaskId>,
    recent: HashMap<TaskId, Vec<(u32, AgentId, TaskState)>>,
    recent_order: VecDeque<TaskId>,
    timers: Timers,
    next_sequence: u64,
    next_stamp: u64,
    next_conn: u64,
    ids: ulid::Generator,
    dispatch_pending: bool,
    out: Outbox,
    queues: HashMap<String, resources::QueueState>,
    locks: HashMap<String, resources::LockHolders>,
    running_by_key: HashMap<String, u32>,
    parked: HashMap<resources::Resource, Vec<TaskId>>,
    /// Tasks that just ended and have dependents to settle.
    finished: VecDeque<workflow::Finished>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("tasks", &self.tasks.len())
            .field("agents", &self.agents.len())
            .field("timers", &self.timers.len())
            .field("next_sequence", &self.next_sequence)
            .finish()
    }
}

impl Core {
    /// Rebuilds the scheduler from the store. Attempts that were live get
    /// the lease TTL for their agents to resume them.
    pub(crate) fn recover(config: Arc<ServerConfig>, store: Arc<dyn Store>, now: Instant) -> Result<Self, StoreError> {
        let mut core = Self {
            clock: Clock::new(now),
            next_sequence: store.last_sequence()? + 1,
            idempotency: store.idempotency_keys()?.into_iter().collect(),
            config,
            store,
            tasks: HashMap::new(),
            ready: ReadyQueues::default(),
            agents: HashMap::new(),
            tokens: HashMap::new(),
            idle: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            timers: Timers::default(),
            next_stamp: 0,
            next_conn: 0,
            ids: ulid::Generator::new(),
            dispatch_pending: true,
            out: Outbox::default(),
            queues: HashMap::new(),
            locks: HashMap::new(),
            running_by_key: HashMap::new(),
            parked: HashMap::new(),
            finished: VecDeque::new(),
        };
        for record in core.store.queues()? {
            core.queues.insert(record.name.clone(), resources::QueueState::new(record));
        }
        let ttl = core.config.lease_ttl;
        for record in core.store.agents()? {
            core.tokens.insert(record.resume_token.clone(), record.id);
            core.timers.add(now + ttl, Timer::Lease(record.id));
            core.agents.insert(
                record.id,
                Session {
                    record,
                    tx: None,
                    conn: 0,
                    last_seen: now,
                    disconnected_at: Some(now),
                    held: BTreeSet::new(),
                    stamp: None,
                },
            );
        }
        let mut orphans = Vec::new();
        let unfinished = core.store.unfinished_tasks()?;
        let count = unfinished.len();
        let mut upstream_failed = Vec::new();
        core.tasks = unfinished.into_iter().map(|t| (t.id, Live::new(t))).collect();
        let ids: Vec<TaskId> = core.tasks.keys().copied().collect();
        for id in &ids {
            if let Some(failed) = core.link_dependencies(*id)? {
                upstream_failed.push((*id, failed));
            }
        }
        for id in ids {
            let Some(mut live) = core.tasks.remove(&id) else { continue };
            match live.task.state {
                TaskState::Pending if live.waiting > 0 => {}
                TaskState::Pending => {
                    let at = live.task.ready_at.unwrap_or(0);
                    core.arm(&mut live, core.clock.instant(at), Timer::Ready(id, at));
                }
                TaskState::Queued => core.enqueue(&mut live, now),
                TaskState::Assigned | TaskState::Running => {
                    let attempt = live.task.attempt;
                    core.acquire(&live.task);
                    match live.task.live_agent().and_then(|a| core.agents.get_mut(&a)) {
                        Some(session) => {
                            session.held.insert((id, attempt));
                            let deadline = live.task.deadline.unwrap_or(0);
                            core.arm(&mut live, core.clock.instant(deadline), Timer::Deadline(id, attempt));
                            if live.task.cancel_requested {
                                core.arm(&mut live, now + core.config.cancel_grace, Timer::CancelGrace(id, attempt));
                            }
                        }
                        None => orphans.push((id, attempt)),
                    }
                }
                TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => continue,
            }
            core.tasks.insert(id, live);
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
        info!(tasks = count, agents = core.agents.len(), sequence = core.next_sequence - 1, "scheduler recovered");
        Ok(core)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    pub(crate) fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.out)
    }

    pub(crate) fn handle(&mut self, command: Command, now: Instant) {
        match command {
            Command::Submit { submissions, reply } => {
                let result = self.submit(submissions, now);
                self.reply(reply, result);
            }
            Command::CancelWorkflow { id, reason, reply } => {
                let result = self.cancel_workflow(id, reason, now);
                self.reply(reply, result);
            }
            Command::Explain { id, reply } => {
                let result = self.explain(id, now);
                self.reply(reply, result);
            }
            Command::ListQueues { reply } => {
                let queues = self.list_queues(now);
                self.reply(reply, Ok(queues));
            }
            Command::SetQueue { name, change, reply } => {
                let result = self.set_queue(&name, change, now);
                self.reply(reply, result);
            }
            Command::Cancel { id, reason, reply } => {
                let result = self.cancel(id, reason, now);
                self.reply(reply, result);
            }
            Command::Retry { id, reply } => {
                let result = self.retry(id, now);
                self.reply(reply, result);
            }
            Command::Register { registration, tx, reply } => {
                let result = self.register(registration, tx, now);
                self.reply(reply, Ok(result));
            }
            Command::Report { agent, conn, report } => self.report(agent, conn, report, now),
            Command::Disconnected { agent, conn } => self.disconnected(agent, conn, now),
            Command::ListAgents { capability, reply } => {
                let mut agents: Vec<AgentInfo> = self
                    .agents
                    .values()
                    .filter(|s| capability.as_ref().is_none_or(|c| s.record.capabilities.contains(c)))
                    .map(|s| self.agent_info(s))
                    .collect();
                agents.sort_by_key(|a| a.record.id);
                self.reply(reply, Ok(agents));
            }
            Command::GetAgent { id, reply } => {
                let result = self.agents.get(&id).map(|s| self.agent_info(s)).ok_or_else(|| agent_not_found(id));
                self.reply(reply, result);
            }
            Command::SetDraining { id, draining, reply } => {
                let result = self.set_draining(id, draining);
                self.reply(reply, result);
            }
            Command::Snapshot { reply } => {
                let snapshot = self.snapshot(now);
                self.reply(reply, Ok(snapshot));
            }
        }
        self.settle_finished(now);
    }

    /// Acts on every timer that is due.
    pub(crate) fn fire_timers(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Lease(agent) => self.check_lease(agent, now),
                Timer::Ready(id, at) => {
                    let Some(mut live) = self.tasks.remove(&id) else { continue };
                    if live.task.state == TaskState::Pending && live.task.ready_at == Some(at) {
                        self.clear_timers(&mut live);
                        live.task.ready_at = None;
                        self.transition(&mut live, TaskState::Queued, reason::READY, String::new(), now);
                        self.enqueue(&mut live, now);
                        self.put(live);
                    } else {
                        self.tasks.insert(id, live);
                    }
                }
                Timer::Deadline(id, attempt) => {
                    if self.is_live_attempt(id, attempt) {
                        let timeout = self.tasks.get(&id).map(|l| l.task.spec.timeout).unwrap_or_default();
                        self.send_cancel(id, attempt, reason::TIMEOUT);
                        let message = format!(
                            "attempt {attempt} exceeded its timeout of {}",
                            humantime::format_duration(timeout)
                        );
                        self.fail_attempt(id, attempt, Failure::new(reason::TIMEOUT, message, true), now);
                    }
                }
                Timer::CancelGrace(id, attempt) => {
                    if self.is_live_attempt(id, attempt) {
                        let message = format!(
                            "the handler did not stop within the cancel grace period of {}",
                            humantime::format_duration(self.config.cancel_grace)
                        );
                        self.fail_attempt(id, attempt, Failure::new(reason::CANCELLED, message, false), now);
                    }
                }
                Timer::QueueTimeout(id, token) => {
                    let Some(mut live) = self.tasks.remove(&id) else { continue };
                    if live.token == Some(token) && live.task.state == TaskState::Queued {
                        self.clear_timers(&mut live);
                        live.token = None;
                        let limit = live.task.spec.queue_timeout.unwrap_or_default();
                        let message = format!(
                            "waited queued longer than its queue timeout of {}",
                            humantime::format_duration(limit)
                        );
                        live.task.failure = Some(Failure::new(reason::QUEUE_TIMEOUT, message.clone(), false));
                        self.transition(&mut live, TaskState::Failed, reason::QUEUE_TIMEOUT, message, now);
                        self.put(live);
                    } else {
                        self.tasks.insert(id, live);
                    }
                }
            }
        }
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
            let queues = &self.queues;
            let is_live = |entry: Entry| tasks.get(&entry.task).is_some_and(|l| l.token == Some(entry.token));
            let skip = |id: usize, shape: &super::ready::Shape| {
                blocked.contains(&id) || queues.get(&shape.queue).is_some_and(|q| !q.can_dispatch())
            };
            let candidates = self.ready.best_per_queue(skip, is_live);
            let Some(queue) = self.pick_queue(&candidates) else { break };
            let Some(&(shape, priority, entry)) = candidates.get(&queue) else { break };
            if let Some(resource) = self.tasks.get(&entry.task).and_then(|l| self.unavailable(&l.task)) {
                self.ready.pop(shape, priority);
                self.park(entry.task, resource);
                continue;
            }
            match self.find_agent(shape) {
                Some(agent) => {
                    self.charge_queue(&candidates, &queue);
                    self.ready.pop(shape, priority);
                    self.assign(entry.task, agent, now);
                }
                None => {
                    blocked.insert(shape);
                }
            }
            if self.idle.values().all(BTreeMap::is_empty) {
                break;
            }
        }
    }

    fn find_agent(&self, shape: usize) -> Option<AgentId> {
        let shape = self.ready.shape(shape);
        let idle = self.idle.get(&shape.capability)?;
        idle.values().copied().find(|id| {
            self.agents.get(id).is_some_and(|s| shape.selector.iter().all(|(k, v)| s.record.labels.get(k) == Some(v)))
        })
    }

    // ---- submit, cancel, retry ----

    fn cancel(&mut self, id: TaskId, why: String, now: Instant) -> Result<Task, Error> {
        let message = if why.is_empty() { "cancelled by request".to_owned() } else { why };
        let Some(mut live) = self.tasks.remove(&id) else {
            let task = self.lookup(id)?.ok_or_else(|| task_not_found(id))?;
            return match task.state {
                TaskState::Cancelled => Ok(task),
                state => Err(Error::FailedPrecondition(format!("task {id} already ended as {}", state.name()))),
            };
        };
        match live.task.state {
            TaskState::Pending | TaskState::Queued => {
                self.clear_timers(&mut live);
                live.token = None;
                live.parked = None;
                live.task.ready_at = None;
                live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
                self.transition(&mut live, TaskState::Cancelled, reason::CANCELLED, message, now);
            }
            TaskState::Assigned | TaskState::Running if !live.task.cancel_requested => {
                let attempt = live.task.attempt;
                live.task.cancel_requested = true;
                live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
                self.arm(&mut live, now + self.config.cancel_grace, Timer::CancelGrace(id, attempt));
                let state = live.task.state;
                self.event(&mut live.task, Some(state), reason::CANCEL_REQUESTED, message, None, now);
                let task = live.task.clone();
                self.put(live);
                self.send_cancel(id, attempt, reason::CANCELLED);
                return Ok(task);
            }
            _ => {
                // A cancel is already under way.
                let task = live.task.clone();
                self.tasks.insert(id, live);
                return Ok(task);
            }
        }
        let task = live.task.clone();
        self.put(live);
        Ok(task)
    }

    fn retry(&mut self, id: TaskId, now: Instant) -> Result<Task, Error> {
        if let Some(live) = self.tasks.get(&id) {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; only FAILED or CANCELLED tasks can be retried",
                live.task.state.name()
            )));
        }
        let task = self.lookup(id)?.ok_or_else(|| task_not_found(id))?;
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; only FAILED or CANCELLED tasks can be retried",
                task.state.name()
            )));
        }
        let limit = self.config.limits.max_unfinished_tasks;
        if self.tasks.len() >= limit {
            return Err(Error::ResourceExhausted(format!("the server holds max_unfinished_tasks ({limit}) tasks")));
        }
        self.forget_recent(id);
        let mut live = Live::new(task);
        live.task.attempt_base = live.task.attempt;
        live.task.cancel_requested = false;
        live.task.failure = None;
        live.task.output = bytes::Bytes::new();
        live.task.output_content_type.clear();
        self.transition(&mut live, TaskState::Queued, reason::RETRIED, String::new(), now);
        self.enqueue(&mut live, now);
        let task = live.task.clone();
        self.put(live);
        Ok(task)
    }

    // ---- agents ----

    fn register(&mut self, reg: Registration, tx: AgentTx, now: Instant) -> (AgentId, u64) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let now_ms = self.clock.ms(now);
        let claimed: BTreeSet<(TaskId, u32)> = reg.held_attempts.iter().copied().collect();
        let resumed = reg
            .resume_token
            .as_ref()
            .and_then(|t| self.tokens.get(t))
            .copied()
            .filter(|id| self.agents.contains_key(id));
        if let Some(agent_id) = resumed {
            self.unidle(agent_id);
        }
        let (agent_id, resume_token, dropped, missing) = match resumed.and_then(|id| self.agents.get_mut(&id)) {
            Some(session) => {
                let agent_id = session.record.id;
                session.tx = Some(tx.clone());
                session.conn = conn;
                session.last_seen = now;
                session.disconnected_at = None;
                let record = &mut session.record;
                record.name = reg.name;
                record.capabilities = reg.capabilities;
                record.labels = reg.labels;
                record.slots = reg.slots;
                record.sdk_version = reg.sdk_version;
                record.metrics_address = reg.metrics_address;
                let dropped: Vec<_> = claimed.difference(&session.held).copied().collect();
                let missing: Vec<_> = session.held.difference(&claimed).copied().collect();
                let record = record.clone();
                info!(agent = %agent_id, name = %record.name, "agent resumed its session");
                self.out.writes.push(Write::Agent(record.clone()));
                (agent_id, record.resume_token, dropped, missing)
            }
            None => {
                let agent_id = AgentId(Ulid::new());
                let resume_token = format!("{:032x}", rand::thread_rng().r#gen::<u128>());
                let record = AgentRecord {
                    id: agent_id,
                    name: reg.name,
                    resume_token: resume_token.clone(),
                    capabilities: reg.capabilities,
                    labels: reg.labels,
                    slots: reg.slots,
                    draining: false,
                    sdk_version: reg.sdk_version,
                    metrics_address: reg.metrics_address,
                    connected_at: now_ms,
                };
                info!(agent = %agent_id, name = %record.name, slots = record.slots, "agent registered");
                self.out.writes.push(Write::Agent(record.clone()));
                self.tokens.insert(resume_token.clone(), agent_id);
                self.timers.add(now + self.config.lease_ttl, Timer::Lease(agent_id));
                self.agents.insert(
                    agent_id,
                    Session {
                        record,
                        tx: Some(tx.clone()),
                        conn,
                        last_seen: now,
                        disconnected_at: None,
                        held: BTreeSet::new(),
                        stamp: None,
                    },
                );
                (agent_id, resume_token, claimed.into_iter().collect(), Vec::new())
            }
        };
        self.out.effects.push(Effect::Send(
            tx,
            ToAgent::Registered {
                agent_id,
                resume_token,
                resumed: resumed.is_some(),
                heartbeat_interval: self.config.heartbeat_interval,
                lease_ttl: self.config.lease_ttl,
                dropped,
            },
        ));
        for (id, attempt) in missing {
            // An assignment lost in transit is offered again; a running
            // attempt the agent no longer has is lost.
            match self.tasks.get(&id).map(|l| (l.task.state, l.task.clone())) {
                Some((TaskState::Assigned, task)) => {
                    debug!(task = %id, attempt, "re-sending an assignment the agent did not receive");
                    let parents = self.tasks.get(&id).map(|l| l.parents.clone()).unwrap_or_default();
                    self.send(agent_id, ToAgent::Assign(Box::new(task), parents));
                }
                _ => {
                    let failure = Failure::new(reason::AGENT_LOST, "the agent resumed without this attempt", true);
                    self.fail_attempt(id, attempt, failure, now);
                }
            }
        }
        self.refresh_idle(agent_id);
        (agent_id, conn)
    }

    fn report(&mut self, agent: AgentId, conn: u64, report: AgentReport, now: Instant) {
        let Some(session) = self.agents.get_mut(&agent) else { return };
        if session.conn != conn {
            return;
        }
        session.last_seen = now;
        match report {
            AgentReport::Heartbeat => self.send(agent, ToAgent::Heartbeat),
            AgentReport::DrainSelf => {
                // set_draining's reply only matters to operators.
                let _ = self.set_draining(agent, true);
            }
            AgentReport::Accept(id, attempt) => match self.check(agent, id, attempt) {
                Check::Live => {
                    let Some(mut live) = self.tasks.remove(&id) else { return };
                    if live.task.state == TaskState::Assigned {
                        let now_ms = self.clock.ms(now);
                        if let Some(record) = live.task.attempts.last_mut() {
                            record.started_at = Some(now_ms);
                            record.state = TaskState::Running;
                        }
                        self.transition(&mut live, TaskState::Running, reason::ACCEPTED, String::new(), now);
                        self.put(live);
                    } else {
                        self.tasks.insert(id, live);
                    }
                }
                other => self.answer_stale(agent, id, attempt, other, None),
            },
            AgentReport::Progress(id, attempt, percent, message) => match self.check(agent, id, attempt) {
                Check::Live => {
                    let Some(mut live) = self.tasks.remove(&id) else { return };
                    let progress = Progress { percent: percent.min(100), message, at: self.clock.ms(now) };
                    live.task.progress = Some(progress.clone());
                    let state = live.task.state;
                    let text = progress.message.clone();
                    self.event(&mut live.task, Some(state), reason::PROGRESS, text, Some(progress), now);
                    self.put(live);
                }
                other => self.answer_stale(agent, id, attempt, other, None),
            },
            AgentReport::Complete(id, attempt, output, content_type) => match self.check(agent, id, attempt) {
                Check::Live => {
                    let limit = self.config.limits.max_output_bytes;
                    if output.len() > limit {
                        let message =
                            format!("output is {} bytes, over the limit of {limit} (max_output_bytes)", output.len());
                        self.fail_attempt(
                            id,
                            attempt,
                            Failure::new(reason::OUTPUT_TOO_LARGE, message.clone(), false),
                            now,
                        );
                        let error = Error::ResourceExhausted(message);
                        self.send(agent, ToAgent::Rejected { task_id: id, attempt, error });
                        return;
                    }
                    let Some(mut live) = self.tasks.remove(&id) else { return };
                    self.end_attempt(&mut live, TaskState::Succeeded, None, now);
                    live.task.output = output;
                    live.task.output_content_type = content_type;
                    live.task.failure = None;
                    self.transition(&mut live, TaskState::Succeeded, reason::COMPLETED, String::new(), now);
                    self.put(live);
                    self.send(agent, ToAgent::Ack { task_id: id, attempt });
                }
                other => self.answer_stale(agent, id, attempt, other, Some(TaskState::Succeeded)),
            },
            AgentReport::Fail(id, attempt, failure) => match self.check(agent, id, attempt) {
                Check::Live => {
                    self.fail_attempt(id, attempt, failure, now);
                    self.send(agent, ToAgent::Ack { task_id: id, attempt });
                }
                other => self.answer_stale(agent, id, attempt, other, Some(TaskState::Failed)),
            },
        }
    }

    /// Answers a report that does not concern a live attempt: a duplicate
    /// of the recorded outcome is acknowledged, a stale report rejected, a
    /// foreign one closes the session.
    fn answer_stale(&mut self, agent: AgentId, id: TaskId, attempt: u32, check: Check, outcome: Option<TaskState>) {
        match check {
            Check::Live => {}
            Check::Ended(state) => {
                let duplicate = match outcome {
                    Some(TaskState::Succeeded) => state == TaskState::Succeeded,
                    Some(_) => matches!(state, TaskState::Failed | TaskState::Cancelled),
                    None => false,
                };
                if duplicate {
                    self.send(agent, ToAgent::Ack { task_id: id, attempt });
                } else {
                    let error = Error::FailedPrecondition(format!(
                        "attempt {attempt} of task {id} is no longer live (it ended as {})",
                        state.name()
                    ));
                    self.send(agent, ToAgent::Rejected { task_id: id, attempt, error });
                }
            }
            Check::Foreign(message) => {
                warn!(agent = %agent, task = %id, attempt, "closing a session that reported an attempt it does not hold");
                self.send(agent, ToAgent::Close(Error::FailedPrecondition(message)));
            }
        }
    }

    fn check(&self, agent: AgentId, id: TaskId, attempt: u32) -> Check {
        let foreign = |why: &str| Check::Foreign(format!("attempt {attempt} of task {id} {why}"));
        if let Some(live) = self.tasks.get(&id) {
            let task = &live.task;
            if task.attempt == attempt && task.state.is_active() {
                return if task.live_agent() == Some(agent) {
                    Check::Live
                } else {
                    foreign("is held by another agent")
                };
            }
            return match task.attempt_record(attempt) {
                Some(record) => Check::Ended(record.state),
                None => foreign("was never assigned"),
            };
        }
        if let Some(outcomes) = self.recent.get(&id) {
            return match outcomes.iter().find(|(n, _, _)| *n == attempt) {
                Some((_, _, state)) => Check::Ended(*state),
                None => foreign("was never assigned"),
            };
        }
        match self.store.task(id) {
            Ok(Some(task)) => match task.attempt_record(attempt) {
                Some(record) => Check::Ended(record.state),
                None => foreign("was never assigned"),
            },
            Ok(None) => foreign("does not exist"),
            Err(e) => {
                warn!(error = %e, "store read failed while checking a report");
                Check::Ended(TaskState::Failed)
            }
        }
    }

    fn disconnected(&mut self, agent: AgentId, conn: u64, now: Instant) {
        let Some(session) = self.agents.get_mut(&agent) else { return };
        if session.conn != conn {
            return;
        }
        session.tx = None;
        session.disconnected_at = Some(now);
        info!(agent = %agent, held = session.held.len(), "agent disconnected; it may resume within its lease");
        self.unidle(agent);
    }

    fn check_lease(&mut self, agent: AgentId, now: Instant) {
        let Some(session) = self.agents.get(&agent) else { return };
        let deadline = session.disconnected_at.unwrap_or(session.last_seen) + self.config.lease_ttl;
        if now < deadline {
            self.timers.add(deadline, Timer::Lease(agent));
            return;
        }
        self.unidle(agent);
        let Some(session) = self.agents.remove(&agent) else { return };
        self.tokens.remove(&session.record.resume_token);
        self.out.writes.push(Write::RemoveAgent(agent));
        let ttl = humantime::format_duration(self.config.lease_ttl);
        if let Some(tx) = session.tx {
            let error = Error::Unavailable(format!("lease expired: nothing heard from the agent for {ttl}"));
            self.out.effects.push(Effect::Send(tx, ToAgent::Close(error)));
        }
        if !session.held.is_empty() {
            warn!(agent = %agent, name = %session.record.name, attempts = session.held.len(), "agent lost");
        }
        for (id, attempt) in session.held {
            let message = format!("agent {} ({agent}) was not heard from for {ttl}", session.record.name);
            self.fail_attempt(id, attempt, Failure::new(reason::AGENT_LOST, message, true), now);
        }
    }

    fn set_draining(&mut self, id: AgentId, draining: bool) -> Result<AgentInfo, Error> {
        let session = self.agents.get_mut(&id).ok_or_else(|| agent_not_found(id))?;
        if session.record.draining != draining {
            session.record.draining = draining;
            self.out.writes.push(Write::Agent(session.record.clone()));
            self.send(id, ToAgent::Drain(draining));
            self.refresh_idle(id);
        }
        self.agents.get(&id).map(|s| self.agent_info(s)).ok_or_else(|| agent_not_found(id))
    }

    fn agent_info(&self, session: &Session) -> AgentInfo {
        AgentInfo {
            record: session.record.clone(),
            state: session.state(),
            running: session.held.iter().copied().collect(),
            last_seen: self.clock.ms(session.last_seen),
        }
    }

    fn unidle(&mut self, agent: AgentId) {
        let Some(session) = self.agents.get_mut(&agent) else { return };
        if let Some(stamp) = session.stamp.take() {
            for capability in &session.record.capabilities {
                if let Some(idle) = self.idle.get_mut(capability) {
                    idle.remove(&stamp);
                }
            }
        }
    }

    /// Puts the agent at the back of the idle index if it can take work.
    fn refresh_idle(&mut self, agent: AgentId) {
        self.unidle(agent);
        let Some(session) = self.agents.get_mut(&agent) else { return };
        if session.tx.is_some() && !session.record.draining && (session.held.len() as u32) < session.record.slots {
            self.next_stamp += 1;
            session.stamp = Some(self.next_stamp);
            for capability in &session.record.capabilities {
                self.idle.entry(capability.clone()).or_default().insert(self.next_stamp, agent);
            }
            self.dispatch_pending = true;
        }
    }

    // ---- attempts ----

    fn assign(&mut self, id: TaskId, agent: AgentId, now: Instant) {
        let Some(mut live) = self.tasks.remove(&id) else { return };
        if !self.agents.contains_key(&agent) {
            self.tasks.insert(id, live);
            return;
        }
        let now_ms = self.clock.ms(now);
        live.token = None;
        self.clear_timers(&mut live);
        let Some(session) = self.agents.get_mut(&agent) else { return };
        let task = &mut live.task;
        task.attempt += 1;
        let attempt = task.attempt;
        task.deadline = Some(now_ms + task.spec.timeout.as_millis() as Millis);
        task.progress = None;
        task.attempts.push(AttemptRecord {
            number: attempt,
            agent_id: agent,
            agent_name: session.record.name.clone(),
            assigned_at: now_ms,
            started_at: None,
            finished_at: None,
            state: TaskState::Assigned,
            failure: None,
        });
        if task.attempts.len() > MAX_ATTEMPT_HISTORY {
            task.attempts.remove(0);
        }
        session.held.insert((id, attempt));
        let name = session.record.name.clone();
        let timeout = live.task.spec.timeout;
        self.acquire(&live.task);
        self.arm(&mut live, now + timeout, Timer::Deadline(id, attempt));
        self.transition(&mut live, TaskState::Assigned, reason::ASSIGNED, name, now);
        self.send(agent, ToAgent::Assign(Box::new(live.task.clone()), live.parents.clone()));
        self.put(live);
        self.refresh_idle(agent);
    }

    /// Records the end of the live attempt and frees the agent's slot.
    fn end_attempt(&mut self, live: &mut Live, outcome: TaskState, failure: Option<Failure>, now: Instant) {
        let now_ms = self.clock.ms(now);
        let id = live.task.id;
        let attempt = live.task.attempt;
        let mut holder = None;
        if let Some(record) = live.task.attempts.last_mut().filter(|r| r.number == attempt) {
            record.finished_at = Some(now_ms);
            record.state = outcome;
            record.failure = failure;
            holder = Some(record.agent_id);
        }
        live.task.deadline = None;
        self.clear_timers(live);
        self.release(&live.task, now);
        if let Some(agent) = holder
            && let Some(session) = self.agents.get_mut(&agent)
        {
            session.held.remove(&(id, attempt));
            self.refresh_idle(agent);
        }
    }

    /// Fails the live attempt `attempt`: retry after a backoff, or end the
    /// task (FAILED, or CANCELLED when a cancel was requested).
    fn fail_attempt(&mut self, id: TaskId, attempt: u32, failure: Failure, now: Instant) {
        let Some(mut live) = self.tasks.remove(&id) else { return };
        if live.task.attempt != attempt || !live.task.state.is_active() {
            self.tasks.insert(id, live);
            return;
        }
        if live.task.cancel_requested {
            self.end_attempt(&mut live, TaskState::Cancelled, Some(failure.clone()), now);
            let message = live.task.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
            self.transition(&mut live, TaskState::Cancelled, reason::CANCELLED, message, now);
            self.put(live);
            return;
        }
        self.end_attempt(&mut live, TaskState::Failed, Some(failure.clone()), now);
        let used = live.task.attempts_used();
        let max = live.task.spec.retry.max_attempts;
        let message = format!("attempt {attempt} of {max} failed: {}", failure.message);
        let why = failure.reason.clone();
        if failure.retryable && used < max {
            let delay = live.task.spec.retry.backoff(used, rand::thread_rng().r#gen::<f64>());
            live.task.failure = Some(failure);
            if delay.is_zero() {
                self.transition(&mut live, TaskState::Queued, &why, message, now);
                self.enqueue(&mut live, now);
            } else {
                let at = self.clock.ms(now) + delay.as_millis().max(1) as Millis;
                live.task.ready_at = Some(at);
                self.arm(&mut live, self.clock.instant(at), Timer::Ready(id, at));
                let message = format!("{message}; retrying in {}", humantime::format_duration(round_ms(delay)));
                self.transition(&mut live, TaskState::Pending, &why, message, now);
            }
        } else {
            live.task.failure = Some(failure);
            self.transition(&mut live, TaskState::Failed, &why, message, now);
        }
        self.put(live);
    }

    fn is_live_attempt(&self, id: TaskId, attempt: u32) -> bool {
        self.tasks.get(&id).is_some_and(|l| l.task.attempt == attempt && l.task.state.is_active())
    }

    fn send_cancel(&mut self, id: TaskId, attempt: u32, why: &str) {
        let Some(agent) = self.tasks.get(&id).and_then(|l| l.task.live_agent()) else { return };
        let grace = self.config.cancel_grace;
        self.send(agent, ToAgent::Cancel { task_id: id, attempt, reason: why.to_owned(), grace });
    }

    // ---- bookkeeping ----

    fn enqueue(&mut self, live: &mut Live, now: Instant) {
        let token = self.ready.push(&live.task.spec, live.task.id);
        live.token = Some(token);
        if let Some(limit) = live.task.spec.queue_timeout {
            self.arm(live, now + limit, Timer::QueueTimeout(live.task.id, token));
        }
        self.dispatch_pending = true;
    }

    fn arm(&mut self, live: &mut Live, at: Instant, timer: Timer) {
        live.timers.push(self.timers.add(at, timer));
    }

    fn clear_timers(&mut self, live: &mut Live) {
        for key in live.timers.drain(..) {
            self.timers.remove(&key);
        }
    }

    fn transition(&mut self, live: &mut Live, state: TaskState, why: &str, message: String, now: Instant) {
        let previous = live.task.state;
        live.task.state = state;
        self.event(&mut live.task, Some(previous), why, message, None, now);
    }

    /// Records an event: a progress event when `progress` is given, else a
    /// state event.
    fn event(
        &mut self,
        task: &mut Task,
        previous: Option<TaskState>,
        why: &str,
        message: String,
        progress: Option<Progress>,
        now: Instant,
    ) {
        let at = self.clock.ms(now);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        task.sequence = sequence;
        task.updated_at = at;
        let kind = if progress.is_some() { EventKind::Progress } else { EventKind::State };
        let event = TaskEvent {
            sequence,
            task_id: task.id,
            kind,
            state: task.state,
            previous_state: previous,
            attempt: task.attempt,
            agent_id: task.attempts.last().filter(|a| a.number == task.attempt).map(|a| a.agent_id),
            queue: task.spec.queue.clone(),
            capability: task.spec.capability.clone(),
            workflow: task.workflow,
            reason: why.to_owned(),
            message,
            progress,
            at,
        };
        self.out.writes.push(Write::Event(event.clone()));
        self.out.effects.push(Effect::Publish(event));
    }

    /// Writes the task and keeps it in memory unless it is finished.
    fn put(&mut self, live: Live) {
        self.save(&live.task);
        if live.task.state.is_terminal() {
            self.remember(&live.task);
            if !live.dependents.is_empty() {
                self.finished.push_back(workflow::Finished::of(&live.task, live.dependents));
            }
        } else {
            self.tasks.insert(live.task.id, live);
        }
    }

    fn save(&mut self, task: &Task) {
        self.out.writes.push(Write::Task(task.clone()));
    }

    fn remember(&mut self, task: &Task) {
        let outcomes = task.attempts.iter().map(|a| (a.number, a.agent_id, a.state)).collect();
        if self.recent.insert(task.id, outcomes).is_none() {
            self.recent_order.push_back(task.id);
        }
        while self.recent_order.len() > RECENT_CAPACITY {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    fn forget_recent(&mut self, id: TaskId) {
        self.recent.remove(&id);
    }

    /// A task from memory or, if finished, from the store.
    fn lookup(&self, id: TaskId) -> Result<Option<Task>, Error> {
        match self.tasks.get(&id) {
            Some(live) => Ok(Some(live.task.clone())),
            None => Ok(self.store.task(id)?),
        }
    }

    fn send(&mut self, agent: AgentId, message: ToAgent) {
        if let Some(tx) = self.agents.get(&agent).and_then(|s| s.tx.clone()) {
            self.out.effects.push(Effect::Send(tx, message));
        }
    }

    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, Error>) {
        self.out.effects.push(Effect::Reply(Box::new(move || {
            // The caller may have gone away; that is its business.
            let _ = reply.send(result);
        })));
    }

    #[cfg(test)]
    pub(crate) fn clock(&self) -> Clock {
        self.clock
    }

    #[cfg(test)]
    pub(crate) fn unfinished(&self) -> usize {
        self.tasks.len()
    }

    /// The metrics gauges from live state: a scan of unfinished tasks and
    /// sessions, run only when Prometheus scrapes, never on the hot path.
    pub(crate) fn snapshot(&self, now: Instant) -> crate::metrics::Snapshot {
        let now_ms = self.clock.ms(now);
        let mut snapshot = crate::metrics::Snapshot::default();
        for live in self.tasks.values() {
            let task = &live.task;
            // A queued task's last event is its entry into QUEUED.
            let queued_for = (task.state == TaskState::Queued)
                .then(|| Duration::from_millis(now_ms.saturating_sub(task.updated_at)));
            let overdue = task.state.is_active() && task.deadline.is_some_and(|d| d < now_ms);
            snapshot.add_task(task.state, &task.spec.queue, &task.spec.capability, queued_for, overdue);
        }
        for session in self.agents.values() {
            snapshot.add_agent(session.state(), &session.record.capabilities, session.record.slots, session.held.len());
        }
        snapshot
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn task_not_found(id: TaskId) -> Error {
    Error::NotFound(format!("task {id} not found"))
}

fn agent_not_found(id: AgentId) -> Error {
    Error::NotFound(format!("agent {id} not found"))
}
