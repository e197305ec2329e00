//! The scheduler: the one owner of live state.
//!
//! [`engine::Core`] is a synchronous state machine: commands and timers go in,
//! and it produces an [`Outbox`] of store writes plus effects (replies,
//! messages to agents, published events). The driver (`driver`) runs it in
//! one task and hands each outbox to the writer thread, which makes the
//! writes durable as a group and only then performs the effects: nothing
//! leaves the server before it is on disk.

pub(crate) mod driver;
pub(crate) mod engine;
mod ready;
#[cfg(test)]
mod tests;
mod timers;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::model::{
    AgentId, AgentInfo, AgentReport, Explanation, ParentOutput, QueueInfo, Registration, Submission, Task, TaskEvent,
    TaskId, TokenRecord, WorkflowId,
};
use crate::store::Write;

/// Where a command's answer goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// The outbound half of an agent session: a bounded queue the writer
/// fills without ever waiting. When the agent stops reading and the queue
/// is full, the message is lost and the session is marked stalled
/// ([`AgentTx::stalled`]), which closes that session alone.
#[derive(Clone, Debug)]
pub(crate) struct AgentTx {
    tx: mpsc::Sender<ToAgent>,
    stalled: CancellationToken,
}

/// Why [`AgentTx::send`] dropped a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// The queue was full: the session is now stalled.
    Full,
    /// The session is gone.
    Closed,
}

/// The inbound half of an agent session, read by its forwarder.
pub(crate) type AgentRx = mpsc::Receiver<ToAgent>;

/// A session queue holding at most `limit` messages (at least one).
pub(crate) fn session_queue(limit: usize) -> (AgentTx, AgentRx) {
    let (tx, rx) = mpsc::channel(limit.max(1));
    (AgentTx { tx, stalled: CancellationToken::new() }, rx)
}

impl AgentTx {
    /// Queues `message` without waiting. A full queue marks the session
    /// stalled; a closed one (the session is gone) just misses the message.
    pub(crate) fn send(&self, message: ToAgent) -> Result<(), Undelivered> {
        match self.tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stalled.cancel();
                Err(Undelivered::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Undelivered::Closed),
        }
    }

    /// Fires once the queue has overflowed: the agent is not reading.
    pub(crate) fn stalled(&self) -> CancellationToken {
        self.stalled.clone()
    }

    /// How many messages the queue holds at most.
    pub(crate) fn limit(&self) -> usize {
        self.tx.max_capacity()
    }
}

/// Requests to the scheduler.
#[derive(Debug)]
pub(crate) enum Command {
    Submit {
        submissions: Vec<Submission>,
        reply: Reply<SubmitOutcome>,
    },
    CancelWorkflow {
        id: WorkflowId,
        reason: String,
        reply: Reply<Vec<TaskId>>,
    },
    Explain {
        id: TaskId,
        reply: Reply<Explanation>,
    },
    ListQueues {
        reply: Reply<Vec<QueueInfo>>,
    },
    SetQueue {
        name: String,
        change: QueueChange,
        reply: Reply<QueueInfo>,
    },
    Cancel {
        id: TaskId,
        reason: String,
        reply: Reply<Task>,
    },
    Retry {
        id: TaskId,
        reply: Reply<Task>,
    },
    Register {
        registration: Registration,
        tx: AgentTx,
        reply: Reply<(AgentId, u64)>,
    },
    Report {
        agent: AgentId,
        conn: u64,
        report: AgentReport,
    },
    Disconnected {
        agent: AgentId,
        conn: u64,
    },
    ListAgents {
        capability: Option<String>,
        reply: Reply<Vec<AgentInfo>>,
    },
    GetAgent {
        id: AgentId,
        reply: Reply<AgentInfo>,
    },
    SetDraining {
        id: AgentId,
        draining: bool,
        reply: Reply<AgentInfo>,
    },
    Snapshot {
        reply: Reply<crate::metrics::Snapshot>,
    },
    /// Stores a token; a revoked one also closes the sessions opened with
    /// it.
    PutToken {
        record: TokenRecord,
        reply: Reply<()>,
    },
    /// Removes the finished tasks (each group a workflow or one task) and
    /// the events the compactor found past retention, except what must
    /// stay (see `engine::retention`).
    Expire {
        groups: Vec<Vec<crate::store::Removal>>,
        events_through: Option<u64>,
        reply: Reply<engine::retention::Expired>,
    },
    /// `command` on behalf of a named caller: the events it causes, and a
    /// submitted task, record the name.
    Acting {
        actor: String,
        command: Box<Command>,
    },
}

/// What a submit created.
#[derive(Debug)]
pub(crate) struct SubmitOutcome {
    /// The tasks in request order, each with `true` when it already existed.
    pub(crate) tasks: Vec<(Task, bool)>,
    /// The workflow, when the request formed one.
    pub(crate) workflow: Option<WorkflowId>,
}

/// A change to a queue's settings; `None` keeps the current value.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct QueueChange {
    pub(crate) paused: Option<bool>,
    pub(crate) weight: Option<u32>,
    pub(crate) max_running: Option<u32>,
}

/// Messages from the scheduler to one agent session.
#[derive(Debug)]
pub(crate) enum ToAgent {
    Registered {
        agent_id: AgentId,
        resume_token: String,
        resumed: bool,
        heartbeat_interval: Duration,
        lease_ttl: Duration,
        dropped: Vec<(TaskId, u32)>,
    },
    Assign(Box<Task>, Vec<ParentOutput>),
    Cancel {
        task_id: TaskId,
        attempt: u32,
        reason: String,
        grace: Duration,
    },
    Ack {
        task_id: TaskId,
        attempt: u32,
    },
    Rejected {
        task_id: TaskId,
        attempt: u32,
        error: Error,
    },
    Heartbeat,
    Drain(bool),
    /// End the session with this error.
    Close(Error),
}

/// What the writer does after a batch is durable.
pub(crate) enum Effect {
    Reply(Box<dyn FnOnce() + Send>),
    Send(AgentTx, ToAgent),
    Publish(TaskEvent),
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reply(_) => f.write_str("Reply"),
            Self::Send(_, msg) => f.debug_tuple("Send").field(msg).finish(),
            Self::Publish(event) => f.debug_tuple("Publish").field(event).finish(),
        }
    }
}

/// Writes to make durable, then effects to perform, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) writes: Vec<Write>,
    pub(crate) effects: Vec<Effect>,
}

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.effects.is_empty()
    }
}

/// The gRPC layer's handle on the scheduler.
#[derive(Clone, Debug)]
pub(crate) struct CoreHandle {
    tx: mpsc::Sender<Command>,
}

impl CoreHandle {
    pub(crate) fn new(tx: mpsc::Sender<Command>) -> Self {
        Self { tx }
    }

    /// Sends a command built around a reply channel and awaits the answer.
    pub(crate) async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| stopped())?
    }

    /// Like [`call`](Self::call), on behalf of `actor` when it is named.
    pub(crate) async fn call_as<T>(
        &self,
        actor: Option<String>,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        let command = match actor {
            Some(actor) => Command::Acting { actor, command: Box::new(make(reply)) },
            None => make(reply),
        };
        self.send(command).await?;
        rx.await.map_err(|_| stopped())?
    }

    /// Sends a command that needs no answer.
    pub(crate) async fn send(&self, command: Command) -> Result<(), Error> {
        self.tx.send(command).await.map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Unavailable("the scheduler has stopped: the server is shutting down".into())
}
