//! [`Machine`]: the agent's half of the `Connect` protocol as one
//! synchronous state machine. Each [`step`](Machine::step) takes an event
//! and the current instant and returns the [`Action`]s for the I/O shell
//! (`runtime.rs`) to perform; it never waits, sleeps or reads a clock, so
//! every rule is tested with explicit instants.
//!
//! Each concern has its owner: [`Connection`] (where and when to dial),
//! [`Lease`] (heartbeats, staleness, self-fencing), [`Attempts`] (running
//! work, unacknowledged results, the progress and log throttles) and
//! [`Phase`] (the drain). The machine routes events between them.
//!
//! Invariants:
//! - Messages go out only while registered; a `Register` is built when its
//!   dial starts, so it names exactly the attempts held at that moment.
//! - Without contact for the lease TTL the agent stops everything it holds:
//!   the server has given that work to someone else.
//! - A draining agent says so on every stream it registers.

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::actions::{Action, Outbox};
use crate::attempts::{Attempts, CancelCause, HandlerOutcome, key_of};
use crate::connection::{Connection, DialVerdict};
use crate::context::ProgressReport;
use crate::drain::{Phase, Transition};
use crate::error::error_chain;
use crate::lease::Lease;
use crate::logs::AttemptKey;
use crate::metrics::AgentMetrics;
use crate::proto::{self, agent_message::Msg, server_message};
use crate::settings::Settings;
use crate::task::from_proto_duration;

/// Something that happened, for the machine to react to.
#[derive(Debug)]
pub(crate) enum Event {
    /// Nothing but time passed (a wakeup the machine asked for).
    Tick,
    /// Shutdown was requested: drain.
    Shutdown,
    /// The dial succeeded and the server answered `Registered`.
    Registered(proto::Registered),
    /// The dial failed; `redirect` is the leader a follower named.
    DialFailed { error: Error, redirect: Option<String> },
    /// A message from the server on the current stream.
    Message(Option<server_message::Msg>),
    /// The current stream ended or failed; `redirect` is a leader named in
    /// its closing status.
    Lost { reason: String, redirect: Option<String> },
    /// A handler reported progress.
    Progress(ProgressReport),
    /// An attempt's log buffer has lines.
    LogsReady(AttemptKey),
    /// A handler's task ended.
    HandlerEnded(AttemptKey, HandlerOutcome),
}

/// All agent state that is not I/O.
#[derive(Debug)]
pub(crate) struct Machine {
    settings: Settings,
    connection: Connection,
    lease: Lease,
    attempts: Attempts,
    phase: Phase,
    agent_id: String,
    resume_token: String,
    metrics: AgentMetrics,
}

impl Machine {
    /// A machine that has not dialled yet; attempts' log buffers announce
    /// their lines on `log_notify`.
    pub(crate) fn new(
        settings: Settings,
        metrics: AgentMetrics,
        log_notify: mpsc::Sender<AttemptKey>,
        now: Instant,
    ) -> Self {
        let connection = Connection::new(settings.endpoints.clone(), settings.backoff_initial, settings.backoff_max);
        Self {
            settings,
            connection,
            lease: Lease::new(now),
            attempts: Attempts::new(log_notify, metrics.clone()),
            phase: Phase::Serving,
            agent_id: String::new(),
            resume_token: String::new(),
            metrics,
        }
    }

    /// The drain is complete: stop.
    pub(crate) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub(crate) fn is_serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.is_connected()
    }

    pub(crate) fn running_count(&self) -> usize {
        self.attempts.running_count()
    }

    pub(crate) fn unacked_count(&self) -> usize {
        self.attempts.unacked_count()
    }

    /// The earliest instant at which [`Event::Tick`] has something to do.
    pub(crate) fn next_wakeup(&self) -> Instant {
        [self.connection.next_wakeup(), self.attempts.next_wakeup(), self.phase.deadline()]
            .into_iter()
            .flatten()
            .fold(self.lease.next_wakeup(), Instant::min)
    }

    /// Reacts to `event` at `now`, then to whatever timers are due. Fails
    /// only when the very first registration is refused for a reason
    /// retrying cannot fix (a bad name, missing credentials).
    pub(crate) fn step(&mut self, event: Event, now: Instant) -> Result<Vec<Action>, Error> {
        let mut out = Outbox::new(self.connection.is_connected());
        match event {
            Event::Tick => {}
            Event::Shutdown => self.start_drain(&mut out, now),
            Event::Registered(registered) => self.on_registered(registered, &mut out, now),
            Event::DialFailed { error, redirect } => self.on_dial_failed(error, redirect, now)?,
            Event::Message(msg) => {
                self.lease.contact(now);
                match msg {
                    Some(msg) => self.on_server_message(msg, &mut out, now),
                    None => debug!("empty server message ignored"),
                }
            }
            Event::Lost { reason, redirect } => self.lose_stream(&reason, redirect, &mut out, now),
            Event::Progress(report) => self.attempts.progress(report, &mut out, now),
            Event::LogsReady(key) => self.attempts.logs_ready(&key, &mut out, now),
            Event::HandlerEnded(key, outcome) => self.attempts.handler_ended(&key, outcome, &mut out, now),
        }
        self.on_timers(&mut out, now);
        self.advance_phase(&mut out, now);
        if !self.is_done()
            && let Some(endpoint) = self.connection.dial(now)
        {
            debug!(%endpoint, "connecting");
            out.push(Action::Dial { endpoint, register: self.make_register() });
        }
        Ok(out.into_actions())
    }

    fn make_register(&self) -> proto::Register {
        proto::Register {
            name: self.settings.name.clone(),
            capabilities: self.settings.capabilities.clone(),
            labels: self.settings.labels.clone(),
            slots: self.settings.slots,
            sdk_version: env!("CARGO_PKG_VERSION").to_owned(),
            resume_token: self.resume_token.clone(),
            held_attempts: self.attempts.held(),
            metrics_address: self.settings.metrics_address.clone(),
        }
    }

    // ---- connection ----------------------------------------------------

    fn on_dial_failed(&mut self, error: Error, redirect: Option<String>, now: Instant) -> Result<(), Error> {
        let endpoint = self.connection.endpoint().to_owned();
        match self.connection.dial_failed(&error, redirect.clone(), now) {
            DialVerdict::Stop => {
                error!(%endpoint, "registration refused: {}", error_chain(&error));
                Err(error)
            }
            DialVerdict::Retry { delay } => {
                if let Some(leader) = redirect {
                    info!(%leader, "redirected to the leader");
                }
                warn!(
                    %endpoint,
                    failures = self.connection.failures(),
                    "registration failed: {}",
                    error_chain(&error)
                );
                debug!(?delay, "reconnecting after backoff");
                Ok(())
            }
        }
    }

    fn on_registered(&mut self, registered: proto::Registered, out: &mut Outbox, now: Instant) {
        if self.connection.registered() {
            self.metrics.reconnects.inc();
        }
        out.set_connected(true);
        let heartbeat = from_proto_duration(registered.heartbeat_interval);
        let ttl = from_proto_duration(registered.lease_ttl);
        self.lease.registered(heartbeat, ttl, now);
        if ttl.is_none() {
            warn!("server announced no lease ttl; self-fencing is off");
        }
        self.agent_id = registered.agent_id;
        self.resume_token = registered.resume_token;
        let endpoint = self.connection.endpoint();
        if registered.resumed {
            info!(
                agent_id = %self.agent_id,
                %endpoint,
                running = self.attempts.running_count(),
                unacked = self.attempts.unacked_count(),
                "session resumed"
            );
        } else {
            info!(
                agent_id = %self.agent_id,
                %endpoint,
                heartbeat = ?self.lease.heartbeat(),
                lease_ttl = ?ttl,
                "registered"
            );
        }
        for dropped in registered.dropped_attempts {
            let key = key_of(&dropped);
            self.attempts.discard(&key);
            warn!(task_id = %key.0, attempt = key.1, "server no longer assigns this attempt to us; stopping it");
        }
        self.attempts.resend(out, now);
        if !self.is_serving() {
            out.send(Msg::Drain(proto::DrainSelf {}));
        }
    }

    /// Forgets the stream and schedules the reconnect.
    fn lose_stream(&mut self, reason: &str, redirect: Option<String>, out: &mut Outbox, now: Instant) {
        let endpoint = self.connection.endpoint().to_owned();
        if let Some(leader) = &redirect {
            info!(%leader, "redirected to the leader");
        }
        let Some(delay) = self.connection.lost(redirect, now) else {
            return;
        };
        warn!(%endpoint, "session lost: {reason}; reconnecting");
        debug!(?delay, "reconnecting after backoff");
        self.lease.disconnected();
        out.set_connected(false);
    }

    /// Heartbeats, the lease check (a silent stream is dropped, an expired
    /// lease fences), and the throttled sends.
    fn on_timers(&mut self, out: &mut Outbox, now: Instant) {
        if self.lease.heartbeat_due(now) {
            out.send(Msg::Heartbeat(proto::Heartbeat {}));
        }
        if let Some(check) = self.lease.check(now) {
            if check.stale && self.connection.is_connected() {
                let reason = format!("no message from the server for {}ms", check.silence.as_millis());
                out.push(Action::Disconnect);
                self.lose_stream(&reason, None, out, now);
            }
            if check.expired
                && let Some((running, unacked)) = self.attempts.fence()
            {
                error!(
                    silence_ms = check.silence.as_millis(),
                    lease_ttl_ms = self.lease.ttl().unwrap_or_default().as_millis(),
                    running,
                    unacked,
                    "lost contact with the server for the lease ttl; stopping all work \
                     (the server has reassigned it)"
                );
            }
        }
        self.attempts.flush(out, now);
    }

    // ---- server messages -------------------------------------------------

    fn on_server_message(&mut self, msg: server_message::Msg, out: &mut Outbox, now: Instant) {
        debug!(kind = crate::connect::server_message_kind(&msg), "server message");
        match msg {
            server_message::Msg::Registered(_) => {
                warn!("unexpected registered on an established session ignored");
            }
            server_message::Msg::Assign(assignment) => {
                let has_handler = self.settings.capabilities.contains(&assignment.capability);
                self.attempts.assign(assignment, has_handler, out, now);
            }
            server_message::Msg::Cancel(cancel) => {
                let Some(attempt) = cancel.attempt else {
                    warn!("cancel without an attempt ignored");
                    return;
                };
                let key = key_of(&attempt);
                if self.attempts.cancel(&key, CancelCause::Server) {
                    info!(task_id = %key.0, attempt = key.1, reason = %cancel.reason, "cancel requested");
                } else {
                    debug!(task_id = %key.0, attempt = key.1, "cancel for an attempt not running");
                }
            }
            server_message::Msg::Ack(ack) => {
                if let Some(attempt) = ack.attempt {
                    self.attempts.ack(&key_of(&attempt));
                }
            }
            server_message::Msg::Rejected(rejected) => {
                let Some(attempt) = rejected.attempt else {
                    warn!(code = rejected.code, "rejected without an attempt: {}", rejected.message);
                    return;
                };
                let key = key_of(&attempt);
                self.attempts.discard(&key);
                warn!(
                    task_id = %key.0,
                    attempt = key.1,
                    code = rejected.code,
                    "server rejected a report: {}",
                    rejected.message
                );
            }
            server_message::Msg::Heartbeat(_) => {}
            // The server sends this when the agent's drain state changes
            // (an operator's drain or resume, or the agent's own drain); it
            // stops or resumes assignments itself, so there is nothing to do
            // but say so.
            server_message::Msg::Drain(drain) => {
                info!(draining = drain.draining, "the server changed this agent's drain state");
            }
        }
    }

    // ---- shutdown ----------------------------------------------------------

    fn start_drain(&mut self, out: &mut Outbox, now: Instant) {
        if !self.phase.start_drain(self.settings.drain_grace, now) {
            return;
        }
        info!(
            running = self.attempts.running_count(),
            grace_ms = self.settings.drain_grace.as_millis(),
            "draining: finishing running work, taking no more"
        );
        out.send(Msg::Drain(proto::DrainSelf {}));
    }

    /// Moves through the drain phases as their conditions or deadlines are
    /// met.
    fn advance_phase(&mut self, out: &mut Outbox, now: Instant) {
        while let Some(transition) =
            self.phase.advance(self.attempts.running_count(), self.attempts.unacked_count() > 0, now)
        {
            match transition {
                Some(Transition::CancelRunning) => {
                    warn!(running = self.attempts.running_count(), "drain grace over; cancelling running handlers");
                    self.attempts.cancel_all(CancelCause::Shutdown);
                }
                Some(Transition::AbandonRunning) => {
                    warn!(running = self.attempts.running_count(), "handlers ignored cancellation; abandoning them");
                    out.push(Action::AbortHandlers);
                    self.attempts.abandon_all();
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
