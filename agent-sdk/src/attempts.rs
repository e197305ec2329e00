//! [`Attempts`]: every attempt the agent holds, running or finished and
//! waiting for its acknowledgement, with the progress and log throttles;
//! a state machine driven by explicit instants that says what to send
//! through an [`Outbox`].
//!
//! Invariants:
//! - A result (`Complete`/`Fail`) stays in `unacked` until the server answers
//!   `Ack` or `Rejected` for it, and is resent after every registration.
//! - `running` holds every started handler until the runtime reports its
//!   end, or the drain abandons it; attempts whose results must be dropped
//!   are marked (discarded), not removed, so drain can still wait for them.
//! - An attempt's log lines go out in the order they were logged, each at
//!   most once, and all of them before its result on the same stream (the
//!   server accepts no lines of an attempt after its result). Lines are
//!   sent at most once per `LOG_INTERVAL` per attempt, except at the end of
//!   the attempt and after registering. Lines of a discarded attempt are
//!   dropped.
//! - Progress goes out at most once per `PROGRESS_INTERVAL` per attempt;
//!   reports in between are coalesced (the latest wins) and the last one
//!   held back goes out before the result. Reports made while disconnected
//!   are dropped, never resent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::actions::{Action, Outbox, Start};
use crate::context::{Output, ProgressReport, TaskError};
use crate::logs::{AttemptKey, LogSink, batches};
use crate::metrics::{AgentMetrics, label as metric_label};
use crate::proto::{self, agent_message::Msg};

/// Least time between two progress reports of one attempt, so a chatty
/// handler cannot push its session over the server's message rate limit.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Least time between two sends of one attempt's log lines: lines logged in
/// between are batched, so a handler logging 100,000 lines a second costs a
/// handful of messages, far below the server's message rate limit.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_millis(100);

/// Why an attempt's token fired; it decides what the handler's error becomes.
/// Ordered by precedence: a later, stronger cause replaces a weaker one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CancelCause {
    /// The agent is shutting down: the work was not wrong, retry it elsewhere.
    Shutdown,
    /// The server asked (the task was cancelled or timed out).
    Server,
    /// The attempt is no longer ours: drop whatever it produces.
    Discard,
}

/// How a handler's task ended, as the runtime saw it.
#[derive(Debug)]
pub(crate) enum HandlerOutcome {
    /// The handler returned.
    Returned(Result<Output, TaskError>),
    /// The handler panicked with this text.
    Panicked(String),
    /// The runtime aborted it (abandoned at shutdown).
    Aborted,
}

/// A handler in flight.
#[derive(Debug)]
struct RunningAttempt {
    token: CancellationToken,
    capability: String,
    cause: Option<CancelCause>,
    started: Instant,
    /// When progress was last sent for this attempt.
    progress_sent_at: Option<Instant>,
    /// The latest report held back by the progress throttle.
    pending_progress: Option<(u32, String)>,
    /// Lines the handler logged and the agent has not sent yet.
    logs: LogSink,
    /// When log lines were last sent for this attempt.
    logs_sent_at: Option<Instant>,
}

impl RunningAttempt {
    fn new(token: CancellationToken, capability: String, logs: LogSink, now: Instant) -> Self {
        Self {
            token,
            capability,
            cause: None,
            started: now,
            progress_sent_at: None,
            pending_progress: None,
            logs,
            logs_sent_at: None,
        }
    }

    fn cancel(&mut self, cause: CancelCause) {
        self.cause = self.cause.max(Some(cause));
        self.token.cancel();
        if self.is_discarded() {
            self.logs.discard();
            self.pending_progress = None;
        }
    }

    /// Whether this attempt's log lines may go out now.
    fn logs_due(&self, now: Instant) -> bool {
        self.logs_sent_at.is_none_or(|at| now.saturating_duration_since(at) >= LOG_INTERVAL)
    }

    fn progress_due(&self, now: Instant) -> bool {
        self.progress_sent_at.is_none_or(|at| now.saturating_duration_since(at) >= PROGRESS_INTERVAL)
    }

    fn is_discarded(&self) -> bool {
        self.cause == Some(CancelCause::Discard)
    }

    /// Sends everything logged and not sent yet, in batches.
    fn send_logs(&mut self, key: &AttemptKey, out: &mut Outbox, now: Instant) {
        if !out.is_connected() {
            return;
        }
        if let Some((lines, dropped)) = self.logs.take() {
            for batch in batches(key, lines, dropped) {
                out.send(Msg::Log(batch));
            }
            self.logs_sent_at = Some(now);
        }
    }
}

/// A result waiting for the server's acknowledgement.
#[derive(Debug)]
struct Unacked {
    /// The `Complete` or `Fail`.
    result: Msg,
    /// The attempt's last log lines, when it ended while disconnected; they
    /// go out once, right before the result.
    logs: Vec<proto::LogLines>,
}

impl Unacked {
    /// Sends the unsent log lines, then the result, if connected.
    fn send(&mut self, out: &mut Outbox) {
        if !out.is_connected() {
            return;
        }
        for batch in self.logs.drain(..) {
            out.send(Msg::Log(batch));
        }
        out.send(self.result.clone());
    }
}

/// The attempts one agent holds.
#[derive(Debug)]
pub(crate) struct Attempts {
    running: HashMap<AttemptKey, RunningAttempt>,
    /// Results not yet acknowledged, ordered so resends are deterministic.
    unacked: BTreeMap<AttemptKey, Unacked>,
    /// Some attempt's progress is held back by the throttle.
    progress_held: bool,
    /// Some attempt's log lines are held back by the throttle.
    logs_held: bool,
    /// Where attempts' log buffers announce their first line.
    log_notify: mpsc::Sender<AttemptKey>,
    metrics: AgentMetrics,
}

impl Attempts {
    pub(crate) fn new(log_notify: mpsc::Sender<AttemptKey>, metrics: AgentMetrics) -> Self {
        Self {
            running: HashMap::new(),
            unacked: BTreeMap::new(),
            progress_held: false,
            logs_held: false,
            log_notify,
            metrics,
        }
    }

    pub(crate) fn running_count(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// The attempts a registration names as held: running ones still ours
    /// and those with unacknowledged results, in order.
    pub(crate) fn held(&self) -> Vec<proto::AttemptRef> {
        let held: BTreeSet<&AttemptKey> = self
            .running
            .iter()
            .filter(|(_, running)| !running.is_discarded())
            .map(|(key, _)| key)
            .chain(self.unacked.keys())
            .collect();
        held.into_iter().map(|(task_id, attempt)| proto::AttemptRef::new(task_id.clone(), *attempt)).collect()
    }

    /// Accepts an assignment and starts it. The server is the authority on
    /// slots, so every assignment runs; a duplicate is accepted again (and a
    /// finished one's result resent), and one without a handler fails.
    pub(crate) fn assign(&mut self, assignment: proto::Assignment, has_handler: bool, out: &mut Outbox, now: Instant) {
        let Some(attempt) = assignment.attempt.clone() else {
            warn!("assignment without an attempt ignored");
            return;
        };
        let key = key_of(&attempt);
        out.send(Msg::Accept(proto::Accept { attempt: Some(attempt.clone()) }));
        if self.running.contains_key(&key) {
            debug!(task_id = %key.0, attempt = key.1, "duplicate assignment of a running attempt");
            return;
        }
        if let Some(unacked) = self.unacked.get_mut(&key) {
            debug!(task_id = %key.0, attempt = key.1, "duplicate assignment of a finished attempt");
            unacked.send(out);
            return;
        }
        if !has_handler {
            warn!(task_id = %key.0, capability = %assignment.capability, "no handler for the assigned capability");
            let message = format!("no handler for capability {}", assignment.capability);
            self.record_result(key, fail(attempt, "no_handler", message, true), Vec::new(), out);
            return;
        }
        let token = CancellationToken::new();
        let logs = LogSink::new(key.clone(), self.log_notify.clone(), self.metrics.log_lines_dropped.clone());
        let running = RunningAttempt::new(token.clone(), assignment.capability.clone(), logs.clone(), now);
        self.running.insert(key.clone(), running);
        out.push(Action::Start(Start { key, assignment, attempt, token, logs }));
    }

    /// Fires the token of a running attempt; false if it is not running.
    pub(crate) fn cancel(&mut self, key: &AttemptKey, cause: CancelCause) -> bool {
        match self.running.get_mut(key) {
            Some(running) => {
                running.cancel(cause);
                true
            }
            None => false,
        }
    }

    /// Every running attempt's token fires with `cause`.
    pub(crate) fn cancel_all(&mut self, cause: CancelCause) {
        for running in self.running.values_mut() {
            running.cancel(cause);
        }
    }

    /// Forgets every running attempt: their handlers are being aborted.
    pub(crate) fn abandon_all(&mut self) {
        self.running.clear();
    }

    /// The server acknowledged the attempt's result.
    pub(crate) fn ack(&mut self, key: &AttemptKey) {
        self.unacked.remove(key);
    }

    /// The attempt is no longer ours (rejected, or dropped at registration):
    /// its result is forgotten and its handler stopped and ignored.
    pub(crate) fn discard(&mut self, key: &AttemptKey) {
        self.unacked.remove(key);
        self.cancel(key, CancelCause::Discard);
    }

    /// Self-fencing: the lease ran out, so everything held is someone
    /// else's now. Returns the counts of running attempts and results
    /// dropped, or `None` when nothing was held.
    pub(crate) fn fence(&mut self) -> Option<(usize, usize)> {
        let running = self.running.values().filter(|running| !running.is_discarded()).count();
        let unacked = self.unacked.len();
        if running == 0 && unacked == 0 {
            return None;
        }
        self.cancel_all(CancelCause::Discard);
        self.unacked.clear();
        Some((running, unacked))
    }

    /// After a registration: resends every unacknowledged result (with the
    /// lines logged before it) and the lines running attempts logged while
    /// disconnected.
    pub(crate) fn resend(&mut self, out: &mut Outbox, now: Instant) {
        for unacked in self.unacked.values_mut() {
            unacked.send(out);
        }
        for (key, running) in &mut self.running {
            if !running.is_discarded() {
                running.send_logs(key, out, now);
            }
        }
    }

    /// Sends a progress report now, or holds it back (replacing any held
    /// one) when the attempt reported less than `PROGRESS_INTERVAL` ago.
    pub(crate) fn progress(&mut self, report: ProgressReport, out: &mut Outbox, now: Instant) {
        if !out.is_connected() {
            return;
        }
        let key = (report.task_id, report.attempt);
        let Some(running) = self.running.get_mut(&key).filter(|running| !running.is_discarded()) else {
            return;
        };
        if !running.progress_due(now) {
            running.pending_progress = Some((report.percent, report.message));
            self.progress_held = true;
            return;
        }
        running.progress_sent_at = Some(now);
        running.pending_progress = None;
        out.send(progress_message(&key, report.percent, report.message));
    }

    /// Sends an attempt's log lines now, or leaves them for the flush when
    /// it sent some less than `LOG_INTERVAL` ago. Lines logged while
    /// disconnected wait in their buffer until the next registration.
    pub(crate) fn logs_ready(&mut self, key: &AttemptKey, out: &mut Outbox, now: Instant) {
        if !out.is_connected() {
            return;
        }
        let Some(running) = self.running.get_mut(key).filter(|running| !running.is_discarded()) else {
            return;
        };
        if running.logs_due(now) {
            running.send_logs(key, out, now);
        } else {
            self.logs_held = true;
        }
    }

    /// Sends held-back progress and log lines whose interval has passed.
    pub(crate) fn flush(&mut self, out: &mut Outbox, now: Instant) {
        if self.progress_held {
            let mut held = false;
            for (key, running) in &mut self.running {
                let due = running.progress_due(now);
                match running.pending_progress.take() {
                    Some((percent, message)) if due => {
                        running.progress_sent_at = Some(now);
                        out.send(progress_message(key, percent, message));
                    }
                    Some(pending) => {
                        running.pending_progress = Some(pending);
                        held = true;
                    }
                    None => {}
                }
            }
            self.progress_held = held;
        }
        if self.logs_held {
            // While disconnected the lines wait for the next registration.
            let mut held = false;
            if out.is_connected() {
                for (key, running) in &mut self.running {
                    if running.is_discarded() || !running.logs.has_pending() {
                        continue;
                    }
                    if running.logs_due(now) {
                        running.send_logs(key, out, now);
                    } else {
                        held = true;
                    }
                }
            }
            self.logs_held = held;
        }
    }

    /// When held-back progress or log lines next become due.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let progress = self
            .running
            .values()
            .filter(|_| self.progress_held)
            .filter(|running| running.pending_progress.is_some())
            .filter_map(|running| running.progress_sent_at.map(|at| at + PROGRESS_INTERVAL));
        let logs = self
            .running
            .values()
            .filter(|_| self.logs_held)
            .filter(|running| !running.is_discarded() && running.logs.has_pending())
            .filter_map(|running| running.logs_sent_at.map(|at| at + LOG_INTERVAL));
        progress.chain(logs).min()
    }

    /// A handler ended: its held-back progress and remaining log lines go
    /// out, then its result, which is kept until acknowledged (unless the
    /// attempt was discarded or aborted).
    pub(crate) fn handler_ended(&mut self, key: &AttemptKey, outcome: HandlerOutcome, out: &mut Outbox, now: Instant) {
        let Some(mut running) = self.running.remove(key) else {
            return;
        };
        let discarded = running.is_discarded();
        if let Some((percent, message)) = running.pending_progress.take()
            && !discarded
        {
            out.send(progress_message(key, percent, message));
        }
        // Everything the handler logged goes out before its result; lines
        // from context clones that outlive it are ignored from now on.
        let logs = running.logs.close().map(|(lines, dropped)| batches(key, lines, dropped)).unwrap_or_default();
        let elapsed = now.saturating_duration_since(running.started);
        let label = match (&outcome, running.cause) {
            _ if discarded => metric_label::DISCARDED,
            (HandlerOutcome::Returned(Ok(_)), _) => metric_label::SUCCEEDED,
            (HandlerOutcome::Returned(Err(_)), Some(CancelCause::Server)) => metric_label::CANCELLED,
            _ => metric_label::FAILED,
        };
        self.metrics.observe_handler(&running.capability, label, elapsed);
        if discarded {
            debug!(task_id = %key.0, attempt = key.1, "result of a dropped attempt discarded");
            return;
        }
        let attempt = proto::AttemptRef::new(key.0.clone(), key.1);
        let result = match outcome {
            HandlerOutcome::Returned(Ok(output)) => Msg::Complete(proto::Complete {
                attempt: Some(attempt),
                output: output.data,
                content_type: output.content_type,
            }),
            HandlerOutcome::Returned(Err(err)) => match running.cause {
                Some(CancelCause::Server) => {
                    let message = if err.message.is_empty() { "cancelled".to_owned() } else { err.message };
                    fail(attempt, "cancelled", message, false)
                }
                Some(CancelCause::Shutdown) => {
                    fail(attempt, "agent_shutdown", format!("agent shut down before the handler finished: {err}"), true)
                }
                Some(CancelCause::Discard) | None => fail(attempt, err.reason, err.message, err.retryable),
            },
            HandlerOutcome::Panicked(text) => fail(attempt, "handler_panic", format!("handler panicked: {text}"), true),
            // Aborted: only happens when the runtime gives up on a handler
            // at shutdown, and then there is no one to report to.
            HandlerOutcome::Aborted => return,
        };
        let outcome = match &result {
            Msg::Complete(_) => "succeeded",
            _ => "failed",
        };
        debug!(task_id = %key.0, attempt = key.1, outcome, elapsed_ms = elapsed.as_millis(), "handler finished");
        self.record_result(key.clone(), result, logs, out);
    }

    /// Keeps a result until the server acknowledges it, and sends it now,
    /// after the attempt's last log lines, if connected; otherwise both go
    /// out after the next registration.
    fn record_result(&mut self, key: AttemptKey, result: Msg, logs: Vec<proto::LogLines>, out: &mut Outbox) {
        let mut unacked = Unacked { result, logs };
        unacked.send(out);
        self.unacked.insert(key, unacked);
    }
}

pub(crate) fn key_of(attempt: &proto::AttemptRef) -> AttemptKey {
    (attempt.task_id.clone(), attempt.attempt)
}

fn progress_message(key: &AttemptKey, percent: u32, message: String) -> Msg {
    Msg::Progress(proto::ReportProgress {
        attempt: Some(proto::AttemptRef::new(key.0.clone(), key.1)),
        percent,
        message,
    })
}

fn fail(attempt: proto::AttemptRef, reason: impl Into<String>, message: impl Into<String>, retryable: bool) -> Msg {
    Msg::Fail(proto::Fail {
        attempt: Some(attempt),
        failure: Some(proto::Failure { reason: reason.into(), message: message.into(), retryable }),
    })
}

#[cfg(test)]
mod tests;
