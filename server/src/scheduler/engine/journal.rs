//! What handling a command produces besides the change in memory: events
//! with their sequence numbers, the store writes and the effects, in the
//! order they happened (the [`Outbox`] the driver makes durable before any
//! effect is performed).
//!
//! Invariants:
//! - Sequence numbers are given out here only, one per event, increasing.
//! - Every event is both written and published, and stamped with the actor
//!   of the command being handled.

use tokio::time::Instant;

use super::Clock;
use crate::error::Error;
use crate::model::*;
use crate::scheduler::{AgentTx, Effect, Outbox, Reply, ToAgent};
use crate::store::Write;

#[derive(Debug)]
pub(super) struct Journal {
    pub(super) clock: Clock,
    next_sequence: u64,
    /// The caller of the command being handled, recorded in its events.
    actor: Option<String>,
    out: Outbox,
}

impl Journal {
    pub(super) fn new(clock: Clock, next_sequence: u64) -> Self {
        Self { clock, next_sequence, actor: None, out: Outbox::default() }
    }

    pub(super) fn last_sequence(&self) -> u64 {
        self.next_sequence - 1
    }

    /// The caller the next events are recorded for.
    pub(super) fn set_actor(&mut self, actor: Option<String>) {
        self.actor = actor;
    }

    pub(super) fn actor(&self) -> Option<String> {
        self.actor.clone()
    }

    pub(super) fn take(&mut self) -> Outbox {
        std::mem::take(&mut self.out)
    }

    /// Moves `task` to `state` and records the event.
    pub(super) fn transition(&mut self, task: &mut Task, state: TaskState, why: &str, message: String, now: Instant) {
        let previous = task.state;
        task.state = state;
        self.event(task, Some(previous), why, message, None, now);
    }

    /// Records an event: a progress event when `progress` is given, else a
    /// state event.
    pub(super) fn event(
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
            actor: self.actor.clone(),
        };
        self.out.writes.push(Write::Event(event.clone()));
        self.out.effects.push(Effect::Publish(event));
    }

    pub(super) fn write(&mut self, write: Write) {
        self.out.writes.push(write);
    }

    /// Sends `message` to an agent's stream, if it is connected.
    pub(super) fn send(&mut self, tx: Option<AgentTx>, message: ToAgent) {
        if let Some(tx) = tx {
            self.out.effects.push(Effect::Send(tx, message));
        }
    }

    pub(super) fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, Error>) {
        self.out.effects.push(Effect::Reply(Box::new(move || {
            // The caller may have gone away; that is its business.
            let _ = reply.send(result);
        })));
    }
}
