//! The I/O shell around the agent's state machine ([`Machine`]): one task
//! owns the stream, the handlers' join set and the channels, turns what
//! happens on them into [`Event`]s in one `tokio::select!` loop, and
//! performs the [`Action`]s each step returns. The rules live in the
//! machine; this file only moves bytes and tasks.
//!
//! Invariants:
//! - Handlers never touch agent state; they report through the progress
//!   channel, their attempts' log buffers and their join handles.
//! - `task_ids` maps every handler task in the join set to its attempt
//!   until the task's end is handed to the machine, so every attempt the
//!   machine holds as running ends exactly once.
//! - Progress a handler sent before returning reaches the machine before
//!   the handler's end, so it goes out before the result.
//! - Actions are performed in the order the machine returned them; the
//!   stream is stored before the actions of its registration run.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, info, warn};

use crate::Error;
use crate::actions::{Action, Start};
use crate::attempts::HandlerOutcome;
use crate::connect::{ConnectFailure, Link, leader_redirect, open_link};
use crate::context::{Output, ProgressReport, TaskContext, TaskError};
use crate::logs::AttemptKey;
use crate::machine::{Event, Machine};
use crate::metrics::AgentMetrics;
use crate::proto;
use crate::settings::{HandlerFn, Settings};

type ConnectResult = Result<(Link, proto::Registered), ConnectFailure>;
type ConnectFuture = Pin<Box<dyn Future<Output = ConnectResult> + Send>>;
type HandlerResult = Result<Output, TaskError>;

/// Progress reports buffered between handlers and the session owner.
const PROGRESS_BUFFER: usize = 1024;
/// Attempts whose log buffer became non-empty, queued for the session
/// owner; each attempt has at most one entry queued per drain.
const LOG_NOTIFY_BUFFER: usize = 1024;

/// The session owner, running [`Runtime::run`].
pub(crate) struct Runtime {
    machine: Machine,
    handlers: HashMap<String, HandlerFn>,
    metrics: AgentMetrics,
    settings: Settings,
    link: Option<Link>,
    connecting: Option<ConnectFuture>,
    joins: JoinSet<HandlerResult>,
    task_ids: HashMap<tokio::task::Id, AttemptKey>,
    progress_tx: mpsc::Sender<ProgressReport>,
    progress_rx: mpsc::Receiver<ProgressReport>,
    log_rx: mpsc::Receiver<AttemptKey>,
}

impl Runtime {
    pub(crate) fn new(settings: Settings, handlers: HashMap<String, HandlerFn>, metrics: AgentMetrics) -> Self {
        let (progress_tx, progress_rx) = mpsc::channel(PROGRESS_BUFFER);
        let (log_tx, log_rx) = mpsc::channel(LOG_NOTIFY_BUFFER);
        Self {
            machine: Machine::new(settings.clone(), metrics.clone(), log_tx, Instant::now()),
            handlers,
            metrics,
            settings,
            link: None,
            connecting: None,
            joins: JoinSet::new(),
            task_ids: HashMap::new(),
            progress_tx,
            progress_rx,
            log_rx,
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
        self.step(Event::Tick)?;
        while !self.machine.is_done() {
            let wakeup = self.machine.next_wakeup();
            let event = tokio::select! {
                () = shutdown.cancelled(), if self.machine.is_serving() => Event::Shutdown,
                Some(report) = self.progress_rx.recv() => Event::Progress(report),
                Some(key) = self.log_rx.recv() => Event::LogsReady(key),
                Some(joined) = self.joins.join_next_with_id(), if !self.joins.is_empty() => {
                    match self.handler_end(joined)? {
                        Some(event) => event,
                        None => continue,
                    }
                }
                message = next_message(&mut self.link) => self.inbound(message),
                outcome = poll_connect(&mut self.connecting) => self.connected(outcome),
                () = tokio::time::sleep_until(wakeup) => Event::Tick,
            };
            self.step(event)?;
        }
        self.metrics.slots_busy.set(0);
        self.metrics.connected.set(0);
        if self.machine.unacked_count() > 0 {
            warn!(
                results = self.machine.unacked_count(),
                "stopping with unacknowledged results; the server will retry those tasks"
            );
        }
        // Dropping the stream half-closes it; dropping the join set aborts
        // any handler that outlived its cancellation.
        self.link = None;
        info!("agent stopped");
        Ok(())
    }

    /// One machine step at the current instant, its actions performed.
    fn step(&mut self, event: Event) -> Result<(), Error> {
        let actions = self.machine.step(event, Instant::now())?;
        for action in actions {
            self.perform(action);
        }
        self.metrics.slots_busy.set(self.machine.running_count() as i64);
        self.metrics.connected.set(i64::from(self.machine.is_connected()));
        Ok(())
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Send(msg) => {
                if let Some(link) = &self.link {
                    link.send(msg);
                }
            }
            Action::Dial { endpoint, register } => {
                self.connecting = Some(Box::pin(open_link(endpoint, register, self.settings.credentials.clone())));
            }
            Action::Disconnect => self.link = None,
            Action::Start(start) => self.start_handler(start),
            Action::AbortHandlers => {
                self.joins.abort_all();
                self.task_ids.clear();
            }
        }
    }

    fn start_handler(&mut self, start: Start) {
        let Start { key, assignment, attempt, token, logs } = start;
        // The machine starts only attempts of capabilities with a handler.
        let Some(handler) = self.handlers.get(&assignment.capability).cloned() else {
            return;
        };
        let span = tracing::info_span!(
            "muster.task",
            task_id = %key.0,
            attempt = key.1,
            capability = %assignment.capability,
            trace_id = tracing::field::Empty,
        );
        muster_proto::trace_context::adopt(&span, &assignment.trace_context);
        let context = TaskContext::new(assignment, attempt, token, self.progress_tx.clone(), logs);
        // The handler is called inside the task so a panic while building
        // its future is caught like any other.
        let handle = self.joins.spawn(async move { handler(context).await }.instrument(span));
        self.task_ids.insert(handle.id(), key);
    }

    /// The event for a connection attempt's outcome; a new stream is
    /// stored before the machine sees its registration.
    fn connected(&mut self, outcome: ConnectResult) -> Event {
        self.connecting = None;
        match outcome {
            Ok((link, registered)) => {
                self.link = Some(link);
                Event::Registered(registered)
            }
            Err(failure) => Event::DialFailed { error: failure.error, redirect: failure.redirect },
        }
    }

    /// The event for what the stream delivered; a stream that ended is
    /// dropped.
    fn inbound(&mut self, message: Result<Option<proto::ServerMessage>, Status>) -> Event {
        match message {
            Ok(Some(message)) => Event::Message(message.msg),
            Ok(None) => {
                self.link = None;
                Event::Lost { reason: "server closed the stream".to_owned(), redirect: None }
            }
            Err(status) => {
                self.link = None;
                let redirect = leader_redirect(&status, self.settings.credentials.uses_tls());
                let reason = format!("stream failed with {:?}: {}", status.code(), status.message());
                Event::Lost { reason, redirect }
            }
        }
    }

    /// The event for a handler task's end, after the progress it sent
    /// before returning; `None` for tasks no longer tracked (aborted).
    fn handler_end(
        &mut self,
        joined: Result<(tokio::task::Id, HandlerResult), JoinError>,
    ) -> Result<Option<Event>, Error> {
        let (id, outcome) = match joined {
            Ok((id, result)) => (id, HandlerOutcome::Returned(result)),
            Err(err) => {
                let id = err.id();
                let outcome =
                    if err.is_panic() { HandlerOutcome::Panicked(panic_message(err)) } else { HandlerOutcome::Aborted };
                (id, outcome)
            }
        };
        let Some(key) = self.task_ids.remove(&id) else {
            return Ok(None);
        };
        // Progress the handler sent before returning must reach the server
        // before its result, which the server would otherwise answer with a
        // rejection.
        while let Ok(report) = self.progress_rx.try_recv() {
            self.step(Event::Progress(report))?;
        }
        Ok(Some(Event::HandlerEnded(key, outcome)))
    }
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

async fn next_message(link: &mut Option<Link>) -> Result<Option<proto::ServerMessage>, Status> {
    match link {
        Some(link) => link.inbound.message().await,
        None => std::future::pending().await,
    }
}

async fn poll_connect(connecting: &mut Option<ConnectFuture>) -> ConnectResult {
    match connecting {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}
