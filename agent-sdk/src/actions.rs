//! What the agent's state machine asks the runtime's I/O shell to do: the
//! output of every step of [`Machine`](crate::machine::Machine).

use tokio_util::sync::CancellationToken;

use crate::logs::{AttemptKey, LogSink};
use crate::proto::{self, agent_message::Msg};

/// One effect for the shell to perform, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue a message on the current stream.
    Send(Msg),
    /// Open a stream to `endpoint` and register with `register`.
    Dial { endpoint: String, register: proto::Register },
    /// Drop the current stream (it went silent).
    Disconnect,
    /// Run the handler of the attempt's capability; the machine already
    /// holds the attempt as running.
    Start(Start),
    /// Abort every handler still running: they ignored their cancellation.
    AbortHandlers,
}

/// An attempt to start: everything its `TaskContext` is built from.
#[derive(Debug)]
pub(crate) struct Start {
    pub(crate) key: AttemptKey,
    pub(crate) assignment: proto::Assignment,
    pub(crate) attempt: proto::AttemptRef,
    pub(crate) token: CancellationToken,
    pub(crate) logs: LogSink,
}

/// The actions of one step. Messages are only queued while connected:
/// what would be sent while disconnected is dropped here, and whatever
/// must survive a disconnection (results, log lines) is kept by its owner
/// and sent again after the next registration.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    connected: bool,
    actions: Vec<Action>,
}

impl Outbox {
    pub(crate) fn new(connected: bool) -> Self {
        Self { connected, actions: Vec::new() }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Marks the stream up (after registration) or down (after a loss).
    pub(crate) fn set_connected(&mut self, connected: bool) {
        self.connected = connected;
    }

    /// Queues `msg` if connected; drops it otherwise.
    pub(crate) fn send(&mut self, msg: Msg) {
        if self.connected {
            self.actions.push(Action::Send(msg));
        }
    }

    pub(crate) fn push(&mut self, action: Action) {
        self.actions.push(action);
    }

    pub(crate) fn into_actions(self) -> Vec<Action> {
        self.actions
    }
}
