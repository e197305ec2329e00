//! `AgentService.Connect`: one bidirectional session per agent process.
//!
//! The handler validates the first message, registers the session with the
//! scheduler, then runs two small tasks: a reader that turns inbound
//! messages into scheduler commands, and a forwarder that turns scheduler
//! messages into the response stream. A malformed message, a flood, a
//! foreign report or an agent that stops reading ends this session only:
//! the scheduler's queue to a session holds `max_session_queue` messages,
//! and when it overflows the session closes with RESOURCE_EXHAUSTED.
//!
//! Log lines skip the scheduler: the reader hands them to the log hub. They
//! are fenced by the session itself: it accepts lines only for attempts the
//! forwarder assigned to it (or that a resumed registration kept), until the
//! agent reports the attempt's result.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_proto::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::{convert, status};
use crate::config::{Limits, ServerConfig};
use crate::error::Error;
use crate::logs::LogHub;
use crate::model::{AgentId, AgentReport, TaskId};
use crate::rate::TokenBucket;
use crate::scheduler::{AgentRx, Command, CoreHandle, ToAgent};

/// Most lines one `LogLines` may report as dropped by the agent: far more
/// than any agent buffers, and small enough that positions never overflow.
const MAX_AGENT_DROPPED: u64 = 1 << 40;

/// How long a new stream may take to send its `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the reason a session is closed for may wait for room on the
/// stream: an agent that is not reading does not hold its reader.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Thin handler: one reader and one forwarder per session.
#[derive(Debug, Clone)]
pub(crate) struct AgentHandler {
    pub(crate) core: CoreHandle,
    pub(crate) logs: Arc<LogHub>,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) shutdown: CancellationToken,
}

/// The attempts a session may send log lines for.
#[derive(Debug, Default)]
struct Granted(Mutex<HashSet<(TaskId, u32)>>);

impl Granted {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<(TaskId, u32)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The response stream's queue. Messages are boxed so a queue block (32
/// slots, allocated per session) costs 512 bytes rather than 10 KiB: with
/// thousands of mostly idle sessions, that is most of a session's memory.
type Outbound = mpsc::Sender<Result<Box<pb::ServerMessage>, Status>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentHandler {
    type ConnectStream = SessionStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = crate::auth::Identity::of(&request);
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no register message within {}s of connecting",
                    REGISTER_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(status)) => {
                let status = status::inbound(status, self.config.limits.max_message_bytes);
                warn!(code = ?status.code(), message = status.message(), "refused an unreadable register message");
                return Err(status);
            }
            Ok(Ok(None)) => return Err(Status::invalid_argument("the stream ended before its register message")),
            Ok(Ok(Some(message))) => message,
        };
        let register = match first.msg {
            Some(pb::agent_message::Msg::Register(register)) => register,
            _ => return Err(Status::invalid_argument("msg: the first message of a session must be register")),
        };
        let mut registration = convert::registration(register, &self.config)?;
        // A credential registers only what its scope allows, so a rogue
        // process cannot receive another team's payloads.
        identity.scope.check_registration(&registration.capabilities, &registration.labels)?;
        registration.identity = identity.name.clone();
        let held = registration.held_attempts.clone();
        let (to_agent, from_core) = crate::scheduler::session_queue(self.config.limits.max_session_queue);
        let stalled = Stalled { token: to_agent.stalled(), limit: to_agent.limit() };
        let (agent, conn) = self.core.call(|reply| Command::Register { registration, tx: to_agent, reply }).await?;
        let (outbound, response) = mpsc::channel(256);
        let granted = Arc::new(Granted::default());
        let shutdown = self.shutdown.clone();
        tokio::spawn(forward(from_core, outbound.clone(), held, granted.clone(), stalled.token.clone(), shutdown));
        let session = SessionReader { agent, conn, core: self.core.clone(), logs: self.logs.clone(), granted };
        tokio::spawn(read(inbound, session, self.config.clone(), outbound, stalled.clone()));
        Ok(Response::new(stalled.stream(response)))
    }
}

/// A session whose queue overflowed: the agent stopped reading its stream.
#[derive(Debug, Clone)]
struct Stalled {
    token: CancellationToken,
    limit: usize,
}

impl Stalled {
    fn error(&self) -> Error {
        Error::ResourceExhausted(format!(
            "the agent is not reading its stream: {} messages queued (max_session_queue)",
            self.limit
        ))
    }

    /// The response stream: the queued messages until the session stalls,
    /// then at once (ahead of whatever is still queued) the error that
    /// ends it.
    fn stream(self, response: mpsc::Receiver<Result<Box<pb::ServerMessage>, Status>>) -> SessionStream {
        use futures::StreamExt;
        let messages = ReceiverStream::new(response).map(|item| item.map(|message| *message));
        let stop = self.token.clone().cancelled_owned();
        let end = futures::stream::once(async move { self.token.is_cancelled().then(|| Err(self.error().into())) });
        Box::pin(messages.take_until(stop).chain(end.filter_map(std::future::ready)))
    }
}

/// What `Connect` answers with.
type SessionStream = Pin<Box<dyn futures::Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

/// Scheduler messages to the wire, until the scheduler lets go of the
/// session, closes it, or the client goes away. Grants log lines for every
/// attempt it hands over: `held` (the attempts the registration claimed)
/// minus the ones the scheduler dropped, then each assignment.
async fn forward(
    mut from_core: AgentRx,
    outbound: Outbound,
    held: Vec<(TaskId, u32)>,
    granted: Arc<Granted>,
    stalled: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = from_core.recv() => message,
            _ = stalled.cancelled() => return,
            _ = shutdown.cancelled() => {
                end_with(&outbound, Status::unavailable("the server is shutting down")).await;
                return;
            }
        };
        let Some(message) = message else { return };
        if let ToAgent::Registered { dropped, .. } = &message {
            granted.set().extend(held.iter().filter(|attempt| !dropped.contains(attempt)));
        }
        if let ToAgent::Assign(task, _) = &message {
            granted.set().insert((task.id, task.attempt));
            // The scheduling step of the submitter's trace.
            let span = tracing::info_span!(
                "muster.assign",
                task_id = %task.id,
                attempt = task.attempt,
                queue = %task.spec.queue,
                capability = %task.spec.capability,
                trace_id = tracing::field::Empty,
            );
            crate::trace_context::adopt(&span, &task.spec.trace_context);
            span.in_scope(|| tracing::debug!("assignment sent"));
        }
        let item = convert::server_message(message).map(Box::new);
        let closing = item.is_err();
        let sent = tokio::select! {
            sent = outbound.send(item) => sent.is_ok(),
            // The response stream ends with the reason on its own.
            _ = stalled.cancelled() => return,
        };
        if !sent || closing {
            return;
        }
    }
}

/// One session as its reader sees it.
#[derive(Debug)]
struct SessionReader {
    agent: AgentId,
    conn: u64,
    core: CoreHandle,
    logs: Arc<LogHub>,
    granted: Arc<Granted>,
}

impl SessionReader {
    /// Hands log lines of a granted attempt to the hub; lines of any other
    /// attempt are counted and ignored.
    fn log(&self, log: pb::LogLines, limits: &Limits) -> Result<(), Error> {
        let (task, attempt) = convert::attempt_ref("log.attempt", log.attempt)?;
        if log.lines.len() > limits.max_log_lines_per_message {
            return Err(Error::ResourceExhausted(format!(
                "log.lines: {} lines in one message, more than max_log_lines_per_message ({})",
                log.lines.len(),
                limits.max_log_lines_per_message
            )));
        }
        if log.dropped > MAX_AGENT_DROPPED {
            return Err(Error::invalid("log.dropped", format!("must be at most {MAX_AGENT_DROPPED}")));
        }
        if !self.granted.set().contains(&(task, attempt)) {
            debug!(agent = %self.agent, task_id = %task, attempt, "log lines for an attempt this session does not hold");
            self.logs.ignored(log.lines.len());
            return Ok(());
        }
        if let Err(error) =
            self.logs.append(task, attempt, convert::log_lines(log.lines, limits, crate::model::now_ms()), log.dropped)
        {
            warn!(agent = %self.agent, task_id = %task, attempt, %error, "log lines lost");
        }
        Ok(())
    }
}

/// Ends the stream with `status`, unless the agent leaves no room for it
/// within [`CLOSE_WAIT`]; the session ends either way.
async fn end_with(outbound: &Outbound, status: Status) {
    let _ = tokio::time::timeout(CLOSE_WAIT, outbound.send(Err(status))).await;
}

/// Inbound messages to scheduler commands (and log lines to the hub), with
/// a per-session rate limit, until the stream ends or the session stalls.
async fn read(
    mut inbound: Streaming<pb::AgentMessage>,
    session: SessionReader,
    config: Arc<ServerConfig>,
    outbound: Outbound,
    stalled: Stalled,
) {
    let SessionReader { agent, conn, .. } = session;
    let mut bucket = TokenBucket::new(config.limits.max_agent_messages_per_second);
    loop {
        let received = tokio::select! {
            received = inbound.message() => received,
            _ = outbound.closed() => break,
            _ = stalled.token.cancelled() => {
                warn!(agent = %agent, queued = stalled.limit, "closing a session that is not reading its stream");
                break;
            }
        };
        let message = match received {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                let status = status::inbound(status, config.limits.max_message_bytes);
                if matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted) {
                    // Garbage on the stream: the agent gets the reason.
                    warn!(agent = %agent, code = ?status.code(), message = status.message(), "closing a session that sent an unreadable message");
                    end_with(&outbound, status).await;
                } else {
                    debug!(agent = %agent, %status, "agent stream ended with an error");
                }
                break;
            }
        };
        if !bucket.take(Instant::now()) {
            let limit = config.limits.max_agent_messages_per_second;
            warn!(agent = %agent, limit, "closing a session that exceeded its message rate");
            let error = Error::ResourceExhausted(format!(
                "the agent sent more than {limit} messages per second (max_agent_messages_per_second)"
            ));
            end_with(&outbound, error.into()).await;
            break;
        }
        let message = match message.msg {
            Some(pb::agent_message::Msg::Log(log)) => match session.log(log, &config.limits) {
                Ok(()) => continue,
                Err(error) => {
                    warn!(agent = %agent, %error, "closing a session that sent a malformed message");
                    end_with(&outbound, error.into()).await;
                    break;
                }
            },
            msg => pb::AgentMessage { msg },
        };
        match convert::report(message, &config) {
            Ok(report) => {
                if let AgentReport::Complete(task, attempt, ..) | AgentReport::Fail(task, attempt, _) = &report {
                    // The result ends the attempt's log.
                    session.granted.set().remove(&(*task, *attempt));
                }
                if session.core.send(Command::Report { agent, conn, report }).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                warn!(agent = %agent, %error, "closing a session that sent a malformed message");
                end_with(&outbound, error.into()).await;
                break;
            }
        }
    }
    let _ = session.core.send(Command::Disconnected { agent, conn }).await;
}
