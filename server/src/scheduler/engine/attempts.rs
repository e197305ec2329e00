//! Attempts: assignment, the agent's reports checked against the fencing
//! rules, the end of an attempt (success, failure with retry, timeout,
//! cancel) and the requests that cancel or retry a task.
//!
//! Invariants:
//! - A report changes a task only when it names the task's live attempt and
//!   comes from the agent holding it; anything else is answered from the
//!   recorded outcome (a duplicate is acknowledged) or rejected.
//! - Progress is kept in memory as it arrives and recorded (an event and a
//!   task write) at most once per [`PROGRESS_INTERVAL`] per attempt, and
//!   once more when the attempt ends, so a chatty agent costs the store a
//!   bounded rate.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Core, Live, millis, task_not_found};
use crate::error::Error;
use crate::model::*;
use crate::scheduler::ToAgent;
use crate::scheduler::timers::{Timer, later};
use crate::store::Write;

/// Attempt records kept per task.
const MAX_ATTEMPT_HISTORY: usize = 100;
/// Least time between two recorded progress reports of one attempt.
pub(super) const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Outcome of checking a report against the fencing rules.
enum Check {
    /// The attempt is live and this agent holds it.
    Live,
    /// This attempt ended (or was taken back) in this state.
    Ended(TaskState),
    /// No such task or attempt: a mistaken report, rejected.
    Unknown(String),
    /// Another agent holds this attempt: the session's idea of its work is
    /// wrong, so it is closed.
    Foreign(String),
    /// The store could not be read to decide.
    Unreadable(String),
}

impl Core {
    pub(super) fn report(&mut self, agent: AgentId, conn: u64, report: AgentReport, now: Instant) {
        if !self.sessions.heard(agent, conn, now) {
            return;
        }
        match report {
            AgentReport::Heartbeat => self.journal.send(self.sessions.tx(agent), ToAgent::Heartbeat),
            AgentReport::DrainSelf => {
                // set_draining's reply only matters to operators.
                let _ = self.set_draining(agent, true);
            }
            AgentReport::Accept(id, attempt) => match self.check(agent, id, attempt) {
                Check::Live => self.accepted(id, now),
                other => self.answer_stale(agent, id, attempt, other, None),
            },
            AgentReport::Progress(id, attempt, percent, message) => match self.check(agent, id, attempt) {
                Check::Live => self.progressed(id, attempt, percent, message, now),
                other => self.answer_stale(agent, id, attempt, other, None),
            },
            AgentReport::Complete(id, attempt, output, content_type) => match self.check(agent, id, attempt) {
                Check::Live => self.completed(agent, id, attempt, output, content_type, now),
                other => self.answer_stale(agent, id, attempt, other, Some(TaskState::Succeeded)),
            },
            AgentReport::Fail(id, attempt, failure) => match self.check(agent, id, attempt) {
                Check::Live => {
                    self.fail_attempt(id, attempt, failure, now);
                    self.journal.send(self.sessions.tx(agent), ToAgent::Ack { task_id: id, attempt });
                }
                other => self.answer_stale(agent, id, attempt, other, Some(TaskState::Failed)),
            },
        }
    }

    fn accepted(&mut self, id: TaskId, now: Instant) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        if live.task.state != TaskState::Assigned {
            return;
        }
        let now_ms = self.journal.clock.ms(now);
        if let Some(record) = live.task.attempts.last_mut() {
            record.started_at = Some(now_ms);
            record.state = TaskState::Running;
        }
        self.journal.transition(&mut live.task, TaskState::Running, reason::ACCEPTED, String::new(), now);
        self.commit(id);
    }

    /// Keeps the latest progress; records it now if the attempt's last
    /// record is old enough, else when [`PROGRESS_INTERVAL`] has passed.
    fn progressed(&mut self, id: TaskId, attempt: u32, percent: u32, message: String, now: Instant) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        live.task.progress = Some(Progress { percent: percent.min(100), message, at: self.journal.clock.ms(now) });
        match live.progress_saved.map(|at| later(at, PROGRESS_INTERVAL)) {
            Some(due) if due > now => {
                if live.progress_due.is_none() {
                    live.progress_due = Some(self.timers.add(due, Timer::Progress(id, attempt)));
                }
            }
            _ => self.record_progress(id, attempt, now),
        }
    }

    /// The held-back progress of attempt `attempt` may be recorded now.
    pub(super) fn progress_due(&mut self, id: TaskId, attempt: u32, now: Instant) {
        if self.tasks.get(&id).is_some_and(|l| l.progress_due.is_some()) {
            self.record_progress(id, attempt, now);
        }
    }

    /// Records the live attempt's latest progress as an event.
    fn record_progress(&mut self, id: TaskId, attempt: u32, now: Instant) {
        let Some(live) = self.tasks.get_mut(&id) else { return };
        if live.task.attempt != attempt || !live.task.state.is_active() {
            return;
        }
        let Some(progress) = live.task.progress.clone() else { return };
        live.disarm_progress(&mut self.timers);
        live.progress_saved = Some(now);
        let state = live.task.state;
        let text = progress.message.clone();
        self.journal.event(&mut live.task, Some(state), reason::PROGRESS, text, Some(progress), now);
        self.commit(id);
    }

    fn completed(
        &mut self,
        agent: AgentId,
        id: TaskId,
        attempt: u32,
        output: bytes::Bytes,
        content_type: String,
        now: Instant,
    ) {
        let limit = self.config.limits.max_output_bytes;
        if output.len() > limit {
            let message = format!("output is {} bytes, over the limit of {limit} (max_output_bytes)", output.len());
            let failure = Failure::new(reason::OUTPUT_TOO_LARGE, message.clone(), false);
            self.fail_attempt(id, attempt, failure, now);
            let error = Error::ResourceExhausted(message);
            self.journal.send(self.sessions.tx(agent), ToAgent::Rejected { task_id: id, attempt, error });
            return;
        }
        self.end_attempt(id, TaskState::Succeeded, None, now);
        let Some(live) = self.tasks.get_mut(&id) else { return };
        live.task.output = output;
        live.task.output_content_type = content_type;
        live.task.failure = None;
        self.journal.transition(&mut live.task, TaskState::Succeeded, reason::COMPLETED, String::new(), now);
        self.commit(id);
        self.journal.send(self.sessions.tx(agent), ToAgent::Ack { task_id: id, attempt });
    }

    /// Answers a report that does not concern a live attempt: a duplicate
    /// of the recorded outcome is acknowledged, a stale or unknown report
    /// rejected, a foreign one closes the session. When the store cannot
    /// say, the session is closed as unavailable: the agent reconnects and
    /// resends its result, so nothing is acknowledged or dropped wrongly.
    fn answer_stale(&mut self, agent: AgentId, id: TaskId, attempt: u32, check: Check, outcome: Option<TaskState>) {
        let message = match check {
            Check::Live => return,
            Check::Ended(state) => {
                let duplicate = match outcome {
                    Some(TaskState::Succeeded) => state == TaskState::Succeeded,
                    Some(_) => matches!(state, TaskState::Failed | TaskState::Cancelled),
                    None => false,
                };
                if duplicate {
                    ToAgent::Ack { task_id: id, attempt }
                } else {
                    let error = Error::FailedPrecondition(format!(
                        "attempt {attempt} of task {id} is no longer live (it ended as {})",
                        state.name()
                    ));
                    ToAgent::Rejected { task_id: id, attempt, error }
                }
            }
            Check::Unknown(message) => {
                debug!(agent = %agent, task = %id, attempt, "rejected a report of an unknown attempt");
                ToAgent::Rejected { task_id: id, attempt, error: Error::FailedPrecondition(message) }
            }
            Check::Foreign(message) => {
                warn!(agent = %agent, task = %id, attempt, "closing a session that reported an attempt another agent holds");
                ToAgent::Close(Error::FailedPrecondition(message))
            }
            Check::Unreadable(message) => {
                warn!(agent = %agent, task = %id, attempt, error = %message, "closing a session whose report could not be checked");
                ToAgent::Close(Error::Unavailable(format!("could not check attempt {attempt} of task {id}: {message}")))
            }
        };
        self.journal.send(self.sessions.tx(agent), message);
    }

    fn check(&self, agent: AgentId, id: TaskId, attempt: u32) -> Check {
        let unknown = |why: &str| Check::Unknown(format!("attempt {attempt} of task {id} {why}"));
        let ended = |record: Option<&AttemptRecord>| match record {
            Some(record) => Check::Ended(record.state),
            None => unknown("was never assigned"),
        };
        if let Some(live) = self.tasks.get(&id) {
            let task = &live.task;
            if task.attempt == attempt && task.state.is_active() {
                return if task.live_agent() == Some(agent) {
                    Check::Live
                } else {
                    Check::Foreign(format!("attempt {attempt} of task {id} is held by another agent"))
                };
            }
            return ended(task.attempt_record(attempt));
        }
        if let Some(outcomes) = self.recent.get(id) {
            return match outcomes.iter().find(|(n, _, _)| *n == attempt) {
                Some((_, _, state)) => Check::Ended(*state),
                None => unknown("was never assigned"),
            };
        }
        // Only reports about tasks finished long ago get here.
        match self.store.task(id) {
            Ok(Some(task)) => ended(task.attempt_record(attempt)),
            Ok(None) => unknown("does not exist"),
            Err(e) => Check::Unreadable(e.to_string()),
        }
    }

    /// Gives the queued task `id` to `agent` as a new attempt.
    pub(super) fn assign(&mut self, id: TaskId, agent: AgentId, now: Instant) {
        let Some(session) = self.sessions.get(agent) else { return };
        let Some(live) = self.tasks.get_mut(&id) else { return };
        let now_ms = self.journal.clock.ms(now);
        let name = session.record.name.clone();
        live.token = None;
        live.clear_timers(&mut self.timers);
        live.progress_saved = None;
        live.disarm_progress(&mut self.timers);
        let task = &mut live.task;
        task.attempt += 1;
        let attempt = task.attempt;
        task.deadline = Some(now_ms.saturating_add(millis(task.spec.timeout)));
        task.progress = None;
        task.attempts.push(AttemptRecord {
            number: attempt,
            agent_id: agent,
            agent_name: name.clone(),
            assigned_at: now_ms,
            started_at: None,
            finished_at: None,
            state: TaskState::Assigned,
            failure: None,
        });
        if task.attempts.len() > MAX_ATTEMPT_HISTORY {
            task.attempts.remove(0);
        }
        self.resources.acquire(&live.task);
        let timeout = live.task.spec.timeout;
        live.arm(&mut self.timers, later(now, timeout), Timer::Deadline(id, attempt));
        self.journal.transition(&mut live.task, TaskState::Assigned, reason::ASSIGNED, name, now);
        let assign = ToAgent::Assign(Box::new(live.task.clone()), live.parents.clone());
        self.journal.send(self.sessions.tx(agent), assign);
        self.commit(id);
        if self.sessions.hold(agent, (id, attempt)) {
            self.dispatch_pending = true;
        }
    }

    /// Records the end of the live attempt, frees its resources and the
    /// agent's slot. Progress not yet recorded is recorded first.
    fn end_attempt(&mut self, id: TaskId, outcome: TaskState, failure: Option<Failure>, now: Instant) {
        let now_ms = self.journal.clock.ms(now);
        let Some(live) = self.tasks.get_mut(&id) else { return };
        let attempt = live.task.attempt;
        if live.disarm_progress(&mut self.timers)
            && let Some(progress) = live.task.progress.clone()
        {
            let (state, text) = (live.task.state, progress.message.clone());
            self.journal.event(&mut live.task, Some(state), reason::PROGRESS, text, Some(progress), now);
        }
        let mut holder = None;
        if let Some(record) = live.task.attempts.last_mut().filter(|r| r.number == attempt) {
            record.finished_at = Some(now_ms);
            record.state = outcome;
            record.failure = failure;
            holder = Some(record.agent_id);
        }
        live.task.deadline = None;
        live.clear_timers(&mut self.timers);
        let woken = self.resources.release(&live.task);
        if let Some(agent) = holder {
            self.sessions.release(agent, (id, attempt));
        }
        self.wake(woken, now);
    }

    /// Fails the live attempt `attempt`: retry after a backoff, or end the
    /// task (FAILED, or CANCELLED when a cancel was requested).
    pub(super) fn fail_attempt(&mut self, id: TaskId, attempt: u32, failure: Failure, now: Instant) {
        if !self.is_live_attempt(id, attempt) {
            return;
        }
        let cancelled = self.tasks.get(&id).is_some_and(|l| l.task.cancel_requested);
        let outcome = if cancelled { TaskState::Cancelled } else { TaskState::Failed };
        self.end_attempt(id, outcome, Some(failure.clone()), now);
        let clock = self.journal.clock;
        let Some(live) = self.tasks.get_mut(&id) else { return };
        if cancelled {
            let message = live.task.failure.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
            self.journal.transition(&mut live.task, TaskState::Cancelled, reason::CANCELLED, message, now);
            self.commit(id);
            return;
        }
        let used = live.task.attempts_used();
        let max = live.task.spec.retry.max_attempts;
        let message = format!("attempt {attempt} of {max} failed: {}", failure.message);
        let why = failure.reason.clone();
        let retry = failure.retryable && used < max;
        live.task.failure = Some(failure);
        if !retry {
            self.journal.transition(&mut live.task, TaskState::Failed, &why, message, now);
            self.commit(id);
            return;
        }
        let delay = live.task.spec.retry.backoff(used, rand::thread_rng().r#gen::<f64>());
        if delay.is_zero() {
            self.journal.transition(&mut live.task, TaskState::Queued, &why, message, now);
            live.enqueue(&mut self.ready, &mut self.timers, now);
            self.dispatch_pending = true;
        } else {
            let at = clock.ms(now).saturating_add(millis(delay).max(1));
            live.task.ready_at = Some(at);
            live.arm(&mut self.timers, clock.instant(at), Timer::Ready(id, at));
            let delay = Duration::from_millis(millis(delay));
            let message = format!("{message}; retrying in {}", humantime::format_duration(delay));
            self.journal.transition(&mut live.task, TaskState::Pending, &why, message, now);
        }
        self.commit(id);
    }

    fn is_live_attempt(&self, id: TaskId, attempt: u32) -> bool {
        self.tasks.get(&id).is_some_and(|l| l.task.attempt == attempt && l.task.state.is_active())
    }

    pub(super) fn attempt_timed_out(&mut self, id: TaskId, attempt: u32, now: Instant) {
        let Some(live) = self.tasks.get(&id).filter(|l| l.task.attempt == attempt && l.task.state.is_active()) else {
            return;
        };
        let timeout = humantime::format_duration(live.task.spec.timeout);
        self.send_cancel(id, attempt, reason::TIMEOUT);
        let message = format!("attempt {attempt} exceeded its timeout of {timeout}");
        self.fail_attempt(id, attempt, Failure::new(reason::TIMEOUT, message, true), now);
    }

    pub(super) fn cancel_grace_over(&mut self, id: TaskId, attempt: u32, now: Instant) {
        if self.is_live_attempt(id, attempt) {
            let grace = humantime::format_duration(self.config.cancel_grace);
            let message = format!("the handler did not stop within the cancel grace period of {grace}");
            self.fail_attempt(id, attempt, Failure::new(reason::CANCELLED, message, false), now);
        }
    }

    fn send_cancel(&mut self, id: TaskId, attempt: u32, why: &str) {
        let Some(agent) = self.tasks.get(&id).and_then(|l| l.task.live_agent()) else { return };
        let grace = self.config.cancel_grace;
        let cancel = ToAgent::Cancel { task_id: id, attempt, reason: why.to_owned(), grace };
        self.journal.send(self.sessions.tx(agent), cancel);
    }

    /// Cancels a task: at once while it waits, else through its agent with
    /// a grace period. Cancelling a cancelled task is a no-op.
    pub(super) fn cancel(&mut self, id: TaskId, why: String, now: Instant) -> Result<Task, Error> {
        let message = if why.is_empty() { "cancelled by request".to_owned() } else { why };
        let Some(live) = self.tasks.get_mut(&id) else {
            let task = self.lookup(id)?.ok_or_else(|| task_not_found(id))?;
            return match task.state {
                TaskState::Cancelled => Ok(task),
                state => Err(Error::FailedPrecondition(format!("task {id} already ended as {}", state.name()))),
            };
        };
        match live.task.state {
            TaskState::Pending | TaskState::Queued => {
                live.clear_timers(&mut self.timers);
                live.token = None;
                live.parked = None;
                live.task.ready_at = None;
                live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
                self.journal.transition(&mut live.task, TaskState::Cancelled, reason::CANCELLED, message, now);
            }
            TaskState::Assigned | TaskState::Running if !live.task.cancel_requested => {
                let attempt = live.task.attempt;
                live.task.cancel_requested = true;
                live.task.failure = Some(Failure::new(reason::CANCELLED, message.clone(), false));
                live.arm(&mut self.timers, later(now, self.config.cancel_grace), Timer::CancelGrace(id, attempt));
                let state = live.task.state;
                self.journal.event(&mut live.task, Some(state), reason::CANCEL_REQUESTED, message, None, now);
                self.send_cancel(id, attempt, reason::CANCELLED);
            }
            // A cancel is already under way.
            _ => return Ok(live.task.clone()),
        }
        let task = self.tasks.get(&id).map(|l| l.task.clone()).ok_or_else(|| task_not_found(id))?;
        self.commit(id);
        Ok(task)
    }

    /// Runs a FAILED or CANCELLED task again, with a fresh retry budget.
    pub(super) fn retry(&mut self, id: TaskId, now: Instant) -> Result<Task, Error> {
        let only = |state: TaskState| {
            Error::FailedPrecondition(format!(
                "task {id} is {}; only FAILED or CANCELLED tasks can be retried",
                state.name()
            ))
        };
        if let Some(live) = self.tasks.get(&id) {
            return Err(only(live.task.state));
        }
        let task = self.lookup(id)?.ok_or_else(|| task_not_found(id))?;
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(only(task.state));
        }
        let mut live = Live::new(task);
        self.admit(1, live.payload_bytes())?;
        self.recent.forget(id);
        self.reopened.insert(id);
        self.journal.write(Write::Reopen { id, finished_at: live.task.updated_at });
        live.task.attempt_base = live.task.attempt;
        live.task.cancel_requested = false;
        live.task.failure = None;
        live.task.output = bytes::Bytes::new();
        live.task.output_content_type.clear();
        self.journal.transition(&mut live.task, TaskState::Queued, reason::RETRIED, String::new(), now);
        live.enqueue(&mut self.ready, &mut self.timers, now);
        self.dispatch_pending = true;
        self.payload_bytes += live.payload_bytes();
        let task = live.task.clone();
        self.tasks.insert(id, live);
        self.commit(id);
        Ok(task)
    }
}
