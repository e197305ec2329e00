//! The session owner: one task holds all agent state and reacts to the
//! server, the handlers, the timers and the shutdown token in one
//! `tokio::select!` loop. Handlers never touch this state; they report
//! through the progress channel, their attempts' log buffers and their join
//! handles.
//!
//! Invariants:
//! - A result (`Complete`/`Fail`) stays in `unacked` until the server answers
//!   `Ack` or `Rejected` for it, and is resent after every reconnect.
//! - `running` holds every spawned handler until its join handle completes;
//!   entries whose results must be dropped are marked, not removed, so drain
//!   can still wait for them.
//! - Without contact for the lease TTL the agent stops everything it holds:
//!   the server has given that work to someone else.
//! - An attempt's log lines go out in the order they were logged, each at
//!   most once, and all of them before its result on the same stream (the
//!   server accepts no lines of an attempt after its result). Lines are
//!   sent at most once per `LOG_INTERVAL` per attempt, except at the end of
//!   the attempt and after reconnecting. Lines of a discarded attempt are
//!   dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{Instrument, debug, error, info, warn};

use crate::Error;
use crate::agent::{HandlerFn, Settings};
use crate::backoff::jittered;
use crate::connect::{ConnectFailure, Session, leader_redirect, open_session, server_message_kind};
use crate::context::{Output, ProgressReport, TaskContext, TaskError};
use crate::error::error_chain;
use crate::logs::{AttemptKey, LogSink, batches};
use crate::metrics::{AgentMetrics, label as metric_label};
use crate::proto::{self, agent_message::Msg, server_message};
use crate::task::from_proto_duration;

type ConnectResult = Result<(Session, proto::Registered), ConnectFailure>;
type ConnectFuture = Pin<Box<dyn Future<Output = ConnectResult> + Send>>;
type HandlerResult = Result<Output, TaskError>;

/// Used until the server announces its own interval.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long cancelled handlers get to end once drain grace is over.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How long a draining agent waits for the server to acknowledge results.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Progress reports buffered between handlers and the session owner.
const PROGRESS_BUFFER: usize = 1024;
/// Least time between two progress reports of one attempt: reports in
/// between are coalesced (the latest wins), so a chatty handler cannot push
/// its session over the server's message rate limit.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Least time between two sends of one attempt's log lines: lines logged in
/// between are batched, so a handler logging 100,000 lines a second costs a
/// handful of messages, far below the server's message rate limit.
const LOG_INTERVAL: Duration = Duration::from_millis(100);
/// Attempts whose log buffer became non-empty, queued for the session
/// owner; each attempt has at most one entry queued per drain.
const LOG_NOTIFY_BUFFER: usize = 1024;
/// Consecutive redirects followed without backoff, so two servers that each
/// name the other cannot spin the agent.
const MAX_REDIRECTS: u32 = 3;

/// Why an attempt's token fired; it decides what the handler's error becomes.
/// Ordered by precedence: a later, stronger cause replaces a weaker one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CancelCause {
    /// The agent is shutting down: the work was not wrong, retry it elsewhere.
    Shutdown,
    /// The server asked (the task was cancelled or timed out).
    Server,
    /// The attempt is no longer ours: drop whatever it produces.
    Discard,
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
    fn new(token: CancellationToken, capability: String, logs: LogSink) -> Self {
        Self {
            token,
            capability,
            cause: None,
            started: Instant::now(),
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
        }
    }

    /// Whether this attempt's log lines may go out now.
    fn logs_due(&self, now: Instant) -> bool {
        self.logs_sent_at.is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL)
    }

    fn is_discarded(&self) -> bool {
        self.cause == Some(CancelCause::Discard)
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
    /// Sends the unsent log lines, then the result.
    fn send(&mut self, session: &Session) {
        for batch in self.logs.drain(..) {
            session.send(Msg::Log(batch));
        }
        session.send(self.result.clone());
    }
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Running work may finish until the deadline.
    Draining(Instant),
    /// Running work was cancelled; it may end until the deadline.
    Cancelling(Instant),
    /// Waiting for results to be acknowledged until the deadline.
    Flushing(Instant),
    Done,
}

impl Phase {
    fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Draining(at) | Phase::Cancelling(at) | Phase::Flushing(at) => Some(at),
            Phase::Serving | Phase::Done => None,
        }
    }
}

/// All agent state, owned by the task running [`Runtime::run`].
pub(crate) struct Runtime {
    settings: Settings,
    handlers: HashMap<String, HandlerFn>,
    metrics: AgentMetrics,

    session: Option<Session>,
    connecting: Option<ConnectFuture>,
    /// The endpoint `connecting` dials, for logs.
    connecting_to: String,
    /// When the next connection attempt starts, while waiting out backoff.
    reconnect_at: Option<Instant>,
    /// Failed connection attempts since the last registration.
    connect_failures: u32,
    endpoint_index: usize,
    /// The endpoint of the last session, tried first after losing it (it
    /// may be a leader found through a redirect, absent from the list).
    preferred: Option<String>,
    redirect: Option<String>,
    redirects_in_row: u32,
    has_registered: bool,
    agent_id: String,
    resume_token: String,
    heartbeat_interval: Duration,
    /// From the last `Registered`; `None` before the first one.
    lease_ttl: Option<Duration>,
    last_contact: Instant,
    server_draining: bool,
    heartbeat: Interval,
    lease_check: Interval,

    running: HashMap<AttemptKey, RunningAttempt>,
    task_ids: HashMap<tokio::task::Id, AttemptKey>,
    joins: JoinSet<HandlerResult>,
    /// Results not yet acknowledged, ordered so resends are deterministic.
    unacked: BTreeMap<AttemptKey, Unacked>,
    progress_tx: mpsc::Sender<ProgressReport>,
    progress_rx: mpsc::Receiver<ProgressReport>,
    /// Sends held-back progress; only polled while some is held back.
    progress_flush: Interval,
    progress_held: bool,
    /// Attempts whose log buffer has lines, from their contexts.
    log_tx: mpsc::Sender<AttemptKey>,
    log_rx: mpsc::Receiver<AttemptKey>,
    /// Sends log lines held back by `LOG_INTERVAL`; only polled while some
    /// are.
    log_flush: Interval,
    logs_held: bool,

    phase: Phase,
}

impl Runtime {
    pub(crate) fn new(settings: Settings, handlers: HashMap<String, HandlerFn>, metrics: AgentMetrics) -> Self {
        let (progress_tx, progress_rx) = mpsc::channel(PROGRESS_BUFFER);
        let (log_tx, log_rx) = mpsc::channel(LOG_NOTIFY_BUFFER);
        Self {
            settings,
            handlers,
            metrics,
            session: None,
            connecting: None,
            connecting_to: String::new(),
            reconnect_at: None,
            connect_failures: 0,
            endpoint_index: 0,
            preferred: None,
            redirect: None,
            redirects_in_row: 0,
            has_registered: false,
            agent_id: String::new(),
            resume_token: String::new(),
            heartbeat_interval: DEFAULT_HEARTBEAT,
            lease_ttl: None,
            last_contact: Instant::now(),
            server_draining: false,
            heartbeat: make_interval(DEFAULT_HEARTBEAT),
            lease_check: make_interval(lease_check_period(None)),
            running: HashMap::new(),
            task_ids: HashMap::new(),
            joins: JoinSet::new(),
            unacked: BTreeMap::new(),
            progress_tx,
            progress_rx,
            progress_flush: make_interval(PROGRESS_INTERVAL),
            progress_held: false,
            log_tx,
            log_rx,
            log_flush: make_interval(LOG_INTERVAL),
            logs_held: false,
            phase: Phase::Serving,
        }
    }

    /// Serves until `shutdown` fires and the drain completes. Fails only when
    /// the very first registration is refused for a reason retrying cannot
    /// fix (a bad name, missing credentials).
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        info!(
            name = %self.settings.name,
            capabilities = ?self.settings.capabilities,
            endpoints = ?self.settings.endpoints,
            slots = self.settings.slots,
            "agent starting"
        );
        self.start_connect();
        while self.phase != Phase::Done {
            let phase_deadline = self.phase.deadline();
            let reconnect_at = self.reconnect_at;
            tokio::select! {
                () = shutdown.cancelled(), if self.phase == Phase::Serving => self.start_drain(),
                Some(report) = self.progress_rx.recv() => self.on_progress(report),
                Some(key) = self.log_rx.recv() => self.on_logs_ready(key),
                Some(joined) = self.joins.join_next_with_id(), if !self.joins.is_empty() => {
                    self.on_handler_end(joined);
                }
                message = next_message(&mut self.session) => self.on_inbound(message),
                outcome = poll_connect(&mut self.connecting) => self.on_connect_outcome(outcome)?,
                () = sleep_until_opt(reconnect_at) => {
                    self.reconnect_at = None;
                    self.start_connect();
                }
                _ = self.heartbeat.tick() => self.on_heartbeat_tick(),
                _ = self.lease_check.tick() => self.check_lease(),
                _ = self.progress_flush.tick(), if self.progress_held => self.flush_progress(),
                _ = self.log_flush.tick(), if self.logs_held => self.flush_logs(),
                () = sleep_until_opt(phase_deadline) => {}
            }
            self.advance_phase();
            self.metrics.slots_busy.set(self.running.len() as i64);
            self.metrics.connected.set(i64::from(self.session.is_some()));
        }
        self.metrics.slots_busy.set(0);
        self.metrics.connected.set(0);
        if !self.unacked.is_empty() {
            warn!(
                results = self.unacked.len(),
                "stopping with unacknowledged results; the server will retry those tasks"
            );
        }
        // Dropping the session half-closes the stream; dropping the join set
        // aborts any handler that outlived its cancellation.
        self.session = None;
        info!("agent stopped");
        Ok(())
    }

    // ---- connection ----------------------------------------------------

    /// Waits out the reconnect backoff, or starts at once when none is due.
    fn schedule_connect(&mut self) {
        if self.session.is_some() || self.connecting.is_some() || self.reconnect_at.is_some() {
            return;
        }
        let delay = if self.redirect.is_some() {
            Duration::ZERO
        } else {
            jittered(self.connect_failures, self.settings.backoff_initial, self.settings.backoff_max)
        };
        debug!(?delay, "reconnecting after backoff");
        self.reconnect_at = Some(Instant::now() + delay);
    }

    /// Starts a connection attempt to the redirect target, else the last
    /// session's endpoint, else the current endpoint of the list. The
    /// `Register` is built now, so it names exactly the attempts held at
    /// this moment.
    fn start_connect(&mut self) {
        if self.session.is_some() || self.connecting.is_some() {
            return;
        }
        let endpoint = match self.redirect.take().or_else(|| self.preferred.clone()) {
            Some(endpoint) => endpoint,
            None => {
                let count = self.settings.endpoints.len().max(1);
                let index = self.endpoint_index % count;
                match self.settings.endpoints.get(index) {
                    Some(endpoint) => endpoint.clone(),
                    None => return,
                }
            }
        };
        debug!(%endpoint, "connecting");
        let register = self.make_register();
        self.connecting_to.clone_from(&endpoint);
        self.connecting = Some(Box::pin(open_session(endpoint, register)));
    }

    fn make_register(&self) -> proto::Register {
        let held: BTreeSet<&AttemptKey> = self
            .running
            .iter()
            .filter(|(_, running)| !running.is_discarded())
            .map(|(key, _)| key)
            .chain(self.unacked.keys())
            .collect();
        proto::Register {
            name: self.settings.name.clone(),
            capabilities: self.settings.capabilities.clone(),
            labels: self.settings.labels.clone(),
            slots: self.settings.slots,
            sdk_version: env!("CARGO_PKG_VERSION").to_owned(),
            resume_token: self.resume_token.clone(),
            held_attempts: held
                .into_iter()
                .map(|(task_id, attempt)| proto::AttemptRef::new(task_id.clone(), *attempt))
                .collect(),
            metrics_address: self.settings.metrics_address.clone(),
        }
    }

    fn on_connect_outcome(&mut self, outcome: ConnectResult) -> Result<(), Error> {
        self.connecting = None;
        match outcome {
            Ok((session, registered)) => {
                self.on_registered(session, registered);
                Ok(())
            }
            Err(failure) => self.on_connect_failure(failure),
        }
    }

    fn on_connect_failure(&mut self, failure: ConnectFailure) -> Result<(), Error> {
        if !self.has_registered && is_refusal(&failure.error) {
            error!(
                endpoint = %self.connecting_to,
                "registration refused: {}",
                error_chain(&failure.error)
            );
            return Err(failure.error);
        }
        self.connect_failures = self.connect_failures.saturating_add(1);
        self.preferred = None;
        match failure.redirect {
            Some(leader) if self.redirects_in_row < MAX_REDIRECTS => {
                self.redirects_in_row += 1;
                info!(%leader, "redirected to the leader");
                self.redirect = Some(leader);
            }
            _ => {
                self.redirects_in_row = 0;
                self.endpoint_index = self.endpoint_index.wrapping_add(1);
            }
        }
        warn!(
            endpoint = %self.connecting_to,
            failures = self.connect_failures,
            "registration failed: {}",
            error_chain(&failure.error)
        );
        self.schedule_connect();
        Ok(())
    }

    fn on_registered(&mut self, session: Session, registered: proto::Registered) {
        if self.has_registered {
            self.metrics.reconnects.inc();
        }
        self.last_contact = Instant::now();
        self.connect_failures = 0;
        self.redirects_in_row = 0;
        self.has_registered = true;
        self.heartbeat_interval = from_proto_duration(registered.heartbeat_interval).unwrap_or(DEFAULT_HEARTBEAT);
        self.lease_ttl = from_proto_duration(registered.lease_ttl);
        if self.lease_ttl.is_none() {
            warn!("server announced no lease ttl; self-fencing is off");
        }
        self.agent_id = registered.agent_id;
        self.resume_token = registered.resume_token;
        if registered.resumed {
            info!(
                agent_id = %self.agent_id,
                endpoint = %session.endpoint,
                running = self.running.len(),
                unacked = self.unacked.len(),
                "session resumed"
            );
        } else {
            info!(
                agent_id = %self.agent_id,
                endpoint = %session.endpoint,
                heartbeat = ?self.heartbeat_interval,
                lease_ttl = ?self.lease_ttl,
                "registered"
            );
        }
        for dropped in registered.dropped_attempts {
            let key = key_of(&dropped);
            self.unacked.remove(&key);
            if let Some(running) = self.running.get_mut(&key) {
                running.cancel(CancelCause::Discard);
            }
            warn!(
                task_id = %key.0,
                attempt = key.1,
                "server no longer assigns this attempt to us; stopping it"
            );
        }
        for unacked in self.unacked.values_mut() {
            unacked.send(&session);
        }
        // Lines logged while disconnected, for attempts still ours.
        let now = Instant::now();
        for (key, running) in &mut self.running {
            if !running.is_discarded() {
                send_logs(&session, key, running, now);
            }
        }
        if self.phase != Phase::Serving {
            session.send(Msg::Drain(proto::DrainSelf {}));
        }
        self.preferred = Some(session.endpoint.clone());
        self.session = Some(session);
        self.heartbeat = make_interval(self.heartbeat_interval);
        self.lease_check = make_interval(lease_check_period(self.lease_ttl));
    }

    /// Drops the session and reconnects; a leader named in the closing
    /// status is tried first.
    fn lose_session(&mut self, reason: &str, status: Option<&Status>) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Some(leader) = status.and_then(leader_redirect) {
            info!(%leader, "redirected to the leader");
            self.redirect = Some(leader);
        }
        warn!(endpoint = %session.endpoint, "session lost: {reason}; reconnecting");
        drop(session);
        self.schedule_connect();
    }

    fn on_heartbeat_tick(&mut self) {
        if let Some(session) = &self.session {
            session.send(Msg::Heartbeat(proto::Heartbeat {}));
        }
    }

    /// Reconnects a session that went silent, and self-fences once the
    /// silence reaches the lease TTL.
    fn check_lease(&mut self) {
        let Some(lease) = self.lease_ttl else {
            return;
        };
        let silence = self.last_contact.elapsed();
        // A healthy server answers every heartbeat, so two missed answers
        // mean a half-open connection that no error will ever report.
        let stale_after = (self.heartbeat_interval * 2).max(lease / 2).min(lease);
        if self.session.is_some() && silence >= stale_after {
            let reason = format!("no message from the server for {}ms", silence.as_millis());
            self.lose_session(&reason, None);
        }
        if silence < lease {
            return;
        }
        let held: Vec<&AttemptKey> =
            self.running.iter().filter(|(_, running)| !running.is_discarded()).map(|(key, _)| key).collect();
        if held.is_empty() && self.unacked.is_empty() {
            return;
        }
        error!(
            silence_ms = silence.as_millis(),
            lease_ttl_ms = lease.as_millis(),
            running = held.len(),
            unacked = self.unacked.len(),
            "lost contact with the server for the lease ttl; stopping all work \
             (the server has reassigned it)"
        );
        for running in self.running.values_mut() {
            running.cancel(CancelCause::Discard);
        }
        self.unacked.clear();
    }

    // ---- server messages -------------------------------------------------

    fn on_inbound(&mut self, message: Result<Option<proto::ServerMessage>, Status>) {
        match message {
            Ok(Some(message)) => {
                self.last_contact = Instant::now();
                match message.msg {
                    Some(msg) => self.on_server_message(msg),
                    None => debug!("empty server message ignored"),
                }
            }
            Ok(None) => self.lose_session("server closed the stream", None),
            Err(status) => {
                let reason = format!("stream failed with {:?}: {}", status.code(), status.message());
                self.lose_session(&reason, Some(&status));
            }
        }
    }

    fn on_server_message(&mut self, msg: server_message::Msg) {
        debug!(kind = server_message_kind(&msg), "server message");
        match msg {
            server_message::Msg::Registered(_) => {
                warn!("unexpected registered on an established session ignored");
            }
            server_message::Msg::Assign(assignment) => self.on_assign(assignment),
            server_message::Msg::Cancel(cancel) => {
                let Some(attempt) = cancel.attempt else {
                    warn!("cancel without an attempt ignored");
                    return;
                };
                let key = key_of(&attempt);
                match self.running.get_mut(&key) {
                    Some(running) => {
                        info!(
                            task_id = %key.0,
                            attempt = key.1,
                            reason = %cancel.reason,
                            "cancel requested"
                        );
                        running.cancel(CancelCause::Server);
                    }
                    None => debug!(task_id = %key.0, attempt = key.1, "cancel for an attempt not running"),
                }
            }
            server_message::Msg::Ack(ack) => {
                if let Some(attempt) = ack.attempt {
                    self.unacked.remove(&key_of(&attempt));
                }
            }
            server_message::Msg::Rejected(rejected) => {
                let Some(attempt) = rejected.attempt else {
                    warn!(code = rejected.code, "rejected without an attempt: {}", rejected.message);
                    return;
                };
                let key = key_of(&attempt);
                self.unacked.remove(&key);
                if let Some(running) = self.running.get_mut(&key) {
                    running.cancel(CancelCause::Discard);
                }
                warn!(
                    task_id = %key.0,
                    attempt = key.1,
                    code = rejected.code,
                    "server rejected a report: {}",
                    rejected.message
                );
            }
            server_message::Msg::Heartbeat(_) => {}
            server_message::Msg::Drain(drain) => {
                if drain.draining != self.server_draining {
                    info!(draining = drain.draining, "server changed this agent's drain state");
                }
                self.server_draining = drain.draining;
            }
        }
    }

    /// Accepts and starts an assignment. The server is the authority on
    /// slots, so every assignment runs.
    fn on_assign(&mut self, assignment: proto::Assignment) {
        let Some(attempt) = assignment.attempt.clone() else {
            warn!("assignment without an attempt ignored");
            return;
        };
        let key = key_of(&attempt);
        self.send(Msg::Accept(proto::Accept { attempt: Some(attempt.clone()) }));
        if self.running.contains_key(&key) {
            debug!(task_id = %key.0, attempt = key.1, "duplicate assignment of a running attempt");
            return;
        }
        if let Some(unacked) = self.unacked.get_mut(&key) {
            debug!(task_id = %key.0, attempt = key.1, "duplicate assignment of a finished attempt");
            if let Some(session) = &self.session {
                unacked.send(session);
            }
            return;
        }
        let Some(handler) = self.handlers.get(&assignment.capability).cloned() else {
            warn!(
                task_id = %key.0,
                capability = %assignment.capability,
                "no handler for the assigned capability"
            );
            let message = format!("no handler for capability {}", assignment.capability);
            self.record_result(key, fail(attempt, "no_handler", message, true), Vec::new());
            return;
        };
        let token = CancellationToken::new();
        let span = tracing::info_span!(
            "muster.task",
            task_id = %key.0,
            attempt = key.1,
            capability = %assignment.capability,
            trace_id = tracing::field::Empty,
        );
        crate::trace::adopt(&span, &assignment.trace_context);
        let assignment_capability = assignment.capability.clone();
        let logs = LogSink::new(key.clone(), self.log_tx.clone(), self.metrics.log_lines_dropped.clone());
        let context = TaskContext::new(assignment, attempt, token.clone(), self.progress_tx.clone(), logs.clone());
        // The handler is called inside the task so a panic while building
        // its future is caught like any other.
        let handle = self.joins.spawn(async move { handler(context).await }.instrument(span));
        self.task_ids.insert(handle.id(), key.clone());
        self.running.insert(key, RunningAttempt::new(token, assignment_capability, logs));
    }

    // ---- handlers ----------------------------------------------------------

    /// Sends a progress report now, or holds it back (replacing any held
    /// one) when the attempt reported less than `PROGRESS_INTERVAL` ago.
    /// Reports made while disconnected are dropped, never resent.
    fn on_progress(&mut self, report: ProgressReport) {
        let Some(session) = &self.session else {
            return;
        };
        let key = (report.task_id, report.attempt);
        let Some(running) = self.running.get_mut(&key).filter(|running| !running.is_discarded()) else {
            return;
        };
        let now = Instant::now();
        if running.progress_sent_at.is_some_and(|at| now.duration_since(at) < PROGRESS_INTERVAL) {
            running.pending_progress = Some((report.percent, report.message));
            self.progress_held = true;
            return;
        }
        running.progress_sent_at = Some(now);
        running.pending_progress = None;
        session.send(progress_message(&key, report.percent, report.message));
    }

    /// Sends held-back progress whose interval has passed.
    fn flush_progress(&mut self) {
        let now = Instant::now();
        let mut held = false;
        for (key, running) in &mut self.running {
            let due = running.progress_sent_at.is_none_or(|at| now.duration_since(at) >= PROGRESS_INTERVAL);
            match running.pending_progress.take() {
                Some((percent, message)) if due => {
                    running.progress_sent_at = Some(now);
                    if let Some(session) = &self.session {
                        session.send(progress_message(key, percent, message));
                    }
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

    /// Sends an attempt's log lines now, or leaves them for the log flush
    /// when it sent some less than `LOG_INTERVAL` ago. Lines logged while
    /// disconnected wait in their buffer until the next registration.
    fn on_logs_ready(&mut self, key: AttemptKey) {
        let Some(session) = &self.session else {
            return;
        };
        let Some(running) = self.running.get_mut(&key).filter(|running| !running.is_discarded()) else {
            return;
        };
        let now = Instant::now();
        if running.logs_due(now) {
            send_logs(session, &key, running, now);
        } else {
            self.logs_held = true;
        }
    }

    /// Sends held-back log lines whose interval has passed.
    fn flush_logs(&mut self) {
        let Some(session) = &self.session else {
            // Sent after the next registration; no need to tick until then.
            self.logs_held = false;
            return;
        };
        let now = Instant::now();
        let mut held = false;
        for (key, running) in &mut self.running {
            if running.is_discarded() || !running.logs.has_pending() {
                continue;
            }
            if running.logs_due(now) {
                send_logs(session, key, running, now);
            } else {
                held = true;
            }
        }
        self.logs_held = held;
    }

    fn on_handler_end(&mut self, joined: Result<(tokio::task::Id, HandlerResult), JoinError>) {
        let (id, outcome) = match joined {
            Ok((id, result)) => (id, Ok(result)),
            Err(err) => (err.id(), Err(err)),
        };
        let Some(key) = self.task_ids.remove(&id) else {
            return;
        };
        // Progress the handler sent before returning must reach the server
        // before its result, which the server would otherwise answer with a
        // rejection.
        while let Ok(report) = self.progress_rx.try_recv() {
            self.on_progress(report);
        }
        let Some(mut running) = self.running.remove(&key) else {
            return;
        };
        if let Some((percent, message)) = running.pending_progress.take()
            && !running.is_discarded()
        {
            self.send(progress_message(&key, percent, message));
        }
        // Everything the handler logged goes out before its result; lines
        // from context clones that outlive it are ignored from now on.
        let logs = running.logs.close().map(|(lines, dropped)| batches(&key, lines, dropped)).unwrap_or_default();
        let elapsed = running.started.elapsed();
        let label = match (&outcome, running.cause) {
            _ if running.is_discarded() => metric_label::DISCARDED,
            (Ok(Ok(_)), _) => metric_label::SUCCEEDED,
            (Ok(Err(_)), Some(CancelCause::Server)) => metric_label::CANCELLED,
            _ => metric_label::FAILED,
        };
        self.metrics.observe_handler(&running.capability, label, elapsed);
        if running.is_discarded() {
            debug!(task_id = %key.0, attempt = key.1, "result of a dropped attempt discarded");
            return;
        }
        let attempt = proto::AttemptRef::new(key.0.clone(), key.1);
        let result = match outcome {
            Ok(Ok(output)) => Msg::Complete(proto::Complete {
                attempt: Some(attempt),
                output: output.data,
                content_type: output.content_type,
            }),
            Ok(Err(err)) => match running.cause {
                Some(CancelCause::Server) => {
                    let message = if err.message.is_empty() { "cancelled".to_owned() } else { err.message };
                    fail(attempt, "cancelled", message, false)
                }
                Some(CancelCause::Shutdown) => {
                    fail(attempt, "agent_shutdown", format!("agent shut down before the handler finished: {err}"), true)
                }
                Some(CancelCause::Discard) | None => fail(attempt, err.reason, err.message, err.retryable),
            },
            Err(err) if err.is_panic() => {
                let message = format!("handler panicked: {}", panic_message(err));
                fail(attempt, "handler_panic", message, true)
            }
            // Aborted: only happens when the runtime gives up on a handler
            // at shutdown, and then there is no one to report to.
            Err(_) => return,
        };
        let outcome = match &result {
            Msg::Complete(_) => "succeeded",
            _ => "failed",
        };
        debug!(
            task_id = %key.0,
            attempt = key.1,
            outcome,
            elapsed_ms = elapsed.as_millis(),
            "handler finished"
        );
        self.record_result(key, result, logs);
    }

    /// Keeps a result until the server acknowledges it, and sends it now,
    /// after the attempt's last log lines, if connected; otherwise both go
    /// out after the next registration.
    fn record_result(&mut self, key: AttemptKey, result: Msg, logs: Vec<proto::LogLines>) {
        let mut unacked = Unacked { result, logs };
        if let Some(session) = &self.session {
            unacked.send(session);
        }
        self.unacked.insert(key, unacked);
    }

    fn send(&self, msg: Msg) {
        if let Some(session) = &self.session {
            session.send(msg);
        }
    }

    // ---- shutdown ----------------------------------------------------------

    fn start_drain(&mut self) {
        info!(
            running = self.running.len(),
            grace_ms = self.settings.drain_grace.as_millis(),
            "draining: finishing running work, taking no more"
        );
        self.send(Msg::Drain(proto::DrainSelf {}));
        self.phase = Phase::Draining(Instant::now() + self.settings.drain_grace);
    }

    /// Moves through the drain phases as their conditions or deadlines are
    /// met.
    fn advance_phase(&mut self) {
        loop {
            let now = Instant::now();
            let next = match self.phase {
                Phase::Serving | Phase::Done => return,
                Phase::Draining(_) | Phase::Cancelling(_) if self.running.is_empty() => {
                    Phase::Flushing(now + FLUSH_WAIT)
                }
                Phase::Draining(until) if now >= until => {
                    warn!(running = self.running.len(), "drain grace over; cancelling running handlers");
                    for running in self.running.values_mut() {
                        running.cancel(CancelCause::Shutdown);
                    }
                    Phase::Cancelling(now + CANCEL_WAIT)
                }
                Phase::Cancelling(until) if now >= until => {
                    warn!(running = self.running.len(), "handlers ignored cancellation; abandoning them");
                    self.joins.abort_all();
                    self.running.clear();
                    self.task_ids.clear();
                    Phase::Flushing(now + FLUSH_WAIT)
                }
                Phase::Flushing(until) if self.unacked.is_empty() || now >= until => Phase::Done,
                Phase::Draining(_) | Phase::Cancelling(_) | Phase::Flushing(_) => return,
            };
            self.phase = next;
        }
    }
}

/// Whether a failed first registration should stop the agent rather than be
/// retried: the server understood the request and refused it (a bad name, a
/// limit such as `max_agent_slots`, missing credentials).
fn is_refusal(error: &Error) -> bool {
    match error {
        Error::Status(status) => {
            matches!(
                status.code(),
                Code::InvalidArgument | Code::ResourceExhausted | Code::Unauthenticated | Code::PermissionDenied
            )
        }
        _ => false,
    }
}

/// Sends everything `running` has logged and not sent yet, in batches.
fn send_logs(session: &Session, key: &AttemptKey, running: &mut RunningAttempt, now: Instant) {
    if let Some((lines, dropped)) = running.logs.take() {
        for batch in batches(key, lines, dropped) {
            session.send(Msg::Log(batch));
        }
        running.logs_sent_at = Some(now);
    }
}

fn progress_message(key: &AttemptKey, percent: u32, message: String) -> Msg {
    Msg::Progress(proto::ReportProgress {
        attempt: Some(proto::AttemptRef::new(key.0.clone(), key.1)),
        percent,
        message,
    })
}

fn key_of(attempt: &proto::AttemptRef) -> AttemptKey {
    (attempt.task_id.clone(), attempt.attempt)
}

fn fail(attempt: proto::AttemptRef, reason: impl Into<String>, message: impl Into<String>, retryable: bool) -> Msg {
    Msg::Fail(proto::Fail {
        attempt: Some(attempt),
        failure: Some(proto::Failure { reason: reason.into(), message: message.into(), retryable }),
    })
}

/// The text a handler panicked with, when it was a string.
fn panic_message(err: JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned()),
        Err(_) => "task aborted".to_owned(),
    }
}

/// A ticker whose first tick is one period from now, and which does not
/// burst to catch up after a stall.
fn make_interval(period: Duration) -> Interval {
    let period = period.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

/// How often the lease is checked: often enough that fencing happens close
/// to the TTL, rarely enough to cost nothing.
fn lease_check_period(lease: Option<Duration>) -> Duration {
    lease.map_or(Duration::from_secs(1), |lease| (lease / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)))
}

async fn next_message(session: &mut Option<Session>) -> Result<Option<proto::ServerMessage>, Status> {
    match session {
        Some(session) => session.inbound.message().await,
        None => std::future::pending().await,
    }
}

async fn poll_connect(connecting: &mut Option<ConnectFuture>) -> ConnectResult {
    match connecting {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_running() -> (RunningAttempt, LogSink) {
        let (log_tx, _log_rx) = mpsc::channel(4);
        let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
        let logs = LogSink::new(("t1".to_owned(), 1), log_tx, dropped);
        (RunningAttempt::new(CancellationToken::new(), String::new(), logs.clone()), logs)
    }

    #[test]
    fn stronger_cancel_causes_win() {
        let (mut running, _logs) = make_running();
        running.cancel(CancelCause::Server);
        running.cancel(CancelCause::Shutdown);
        assert_eq!(running.cause, Some(CancelCause::Server));
        running.cancel(CancelCause::Discard);
        assert!(running.is_discarded());
        assert!(running.token.is_cancelled());
    }

    #[test]
    fn discarding_an_attempt_drops_its_log_lines_and_later_ones() {
        let (mut running, logs) = make_running();
        logs.push(proto::LogStream::Log, vec!["before".to_owned()]);
        running.cancel(CancelCause::Server);
        assert!(logs.has_pending(), "a cancelled attempt still sends its lines");
        running.cancel(CancelCause::Discard);
        assert!(!logs.has_pending());
        logs.push(proto::LogStream::Log, vec!["after".to_owned()]);
        assert!(!logs.has_pending());
    }

    #[test]
    fn log_lines_are_due_once_per_interval() {
        let (mut running, _logs) = make_running();
        let now = Instant::now();
        assert!(running.logs_due(now));
        running.logs_sent_at = Some(now);
        assert!(!running.logs_due(now + LOG_INTERVAL / 2));
        assert!(running.logs_due(now + LOG_INTERVAL));
    }

    #[test]
    fn lease_check_period_is_a_tenth_of_the_lease_within_bounds() {
        assert_eq!(lease_check_period(None), Duration::from_secs(1));
        assert_eq!(lease_check_period(Some(Duration::from_secs(5))), Duration::from_millis(500));
        assert_eq!(lease_check_period(Some(Duration::from_secs(60))), Duration::from_secs(1));
        assert_eq!(lease_check_period(Some(Duration::from_millis(20))), Duration::from_millis(10));
    }

    #[test]
    fn refusals_are_only_client_side_errors() {
        assert!(is_refusal(&Error::Status(Status::invalid_argument("bad name"))));
        assert!(!is_refusal(&Error::Status(Status::unavailable("starting"))));
        assert!(!is_refusal(&Error::Protocol("timeout".to_owned())));
    }
}
