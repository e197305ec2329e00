//! Runs the core in one task and the store writer on its own thread.
//!
//! The core never waits for a write: it hands each outbox to the writer
//! and goes on. The writer takes every outbox that is waiting, applies all
//! their writes as one batch, flushes once (in sync mode) and then performs
//! the effects in order. That is group commit: the busier the server, the
//! larger the batches and the cheaper each acknowledgement.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::engine::Core;
use super::{Command, Effect, Outbox};
use crate::config::Durability;
use crate::logs::LogHub;
use crate::metrics::{EventObserver, Metrics};
use crate::model::TaskEvent;
use crate::store::{Store, StoreError, Write};
use crate::supervise::Fault;

/// Commands handled per loop turn before timers, dispatch and a flush of
/// the outbox: bounds the latency one busy turn adds.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// Outboxes merged into one store batch at most.
const MAX_OUTBOXES_PER_BATCH: usize = 512;

/// Runs the core until `shutdown` fires or every command sender is gone;
/// an error when the store writer is gone (nothing could be made durable).
pub(crate) async fn run_core(
    mut core: Core,
    mut commands: mpsc::Receiver<Command>,
    writer: mpsc::Sender<Outbox>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    loop {
        let next = core.next_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            command = commands.recv() => {
                let Some(command) = command else { break };
                let now = Instant::now();
                core.handle(command, now);
                for _ in 1..MAX_COMMANDS_PER_TURN {
                    match commands.try_recv() {
                        Ok(command) => core.handle(command, now),
                        Err(_) => break,
                    }
                }
            }
            _ = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
        }
        let now = Instant::now();
        core.fire_timers(now);
        core.dispatch(now);
        let outbox = core.take_outbox();
        if !outbox.is_empty() && writer.send(outbox).await.is_err() {
            return Err("the store writer is gone".to_owned());
        }
    }
    debug!("scheduler stopped");
    Ok(())
}

/// The store writer: applies batches of outboxes as one group commit, then
/// performs their effects in order. It also feeds the lifecycle metrics
/// and the log hub from the events of each batch once it is durable.
pub(crate) struct Writer {
    store: Arc<dyn Store>,
    durability: Durability,
    events: broadcast::Sender<TaskEvent>,
    metrics: Arc<Metrics>,
    observer: EventObserver,
    logs: Arc<LogHub>,
}

impl Writer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        durability: Durability,
        events: broadcast::Sender<TaskEvent>,
        metrics: Arc<Metrics>,
        logs: Arc<LogHub>,
    ) -> Self {
        let observer = EventObserver::new(metrics.clone());
        Self { store, durability, events, metrics, observer, logs }
    }

    /// Makes every write of `batch` durable as one store batch (each task
    /// written once, see [`coalesce`]), flushed in sync mode, and only then
    /// performs the effects. On an error no effect is performed: memory is
    /// ahead of the store, and only a restart makes them agree again.
    pub(crate) fn commit(&mut self, mut batch: Vec<Outbox>) -> Result<(), StoreError> {
        let writes = coalesce(batch.iter_mut().flat_map(|o| o.writes.drain(..)).collect());
        if !writes.is_empty() {
            let started = std::time::Instant::now();
            self.store.write(&writes)?;
            if self.durability == Durability::Sync {
                self.store.flush()?;
            }
            self.metrics.observe_commit(writes.len(), started.elapsed());
        }
        for effect in batch.into_iter().flat_map(|o| o.effects) {
            match effect {
                Effect::Reply(reply) => reply(),
                Effect::Send(tx, message) => {
                    // Never waits: a full queue closes that session (its
                    // agent is not reading), a closed one simply misses the
                    // message.
                    let _ = tx.send(message);
                }
                Effect::Publish(event) => {
                    self.observer.observe(&event);
                    self.logs.note_event(&event);
                    let _ = self.events.send(event);
                }
            }
        }
        Ok(())
    }
}

/// Runs `writer` on its own thread over the outboxes the core hands it,
/// merging every outbox waiting into one batch. A failed write or a panic
/// raises `fault` and ends the thread (fail-stop).
pub(crate) fn spawn_writer(
    mut writer: Writer,
    mut outboxes: mpsc::Receiver<Outbox>,
    fault: Fault,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("muster-writer".into()).spawn(move || {
        let run = std::panic::AssertUnwindSafe(|| {
            while let Some(first) = outboxes.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_OUTBOXES_PER_BATCH {
                    match outboxes.try_recv() {
                        Ok(outbox) => batch.push(outbox),
                        Err(_) => break,
                    }
                }
                if let Err(e) = writer.commit(batch) {
                    fault.raise(format!("store write failed: {e}"));
                    return;
                }
            }
            if let Err(e) = writer.store.flush() {
                error!(error = %e, "final store flush failed");
            }
        });
        // A panic must stop the server at once, not when the core next
        // finds the writer's queue closed.
        if let Err(panic) = std::panic::catch_unwind(run) {
            fault.raise(format!("the store writer panicked: {}", crate::supervise::panic_message(panic)));
        }
    })
}

/// Keeps only the last write of each task in a batch: a task submitted,
/// assigned and finished within one group commit is written once. Events
/// and other writes are kept, in order.
fn coalesce(writes: Vec<Write>) -> Vec<Write> {
    let mut seen = HashSet::new();
    let mut kept: Vec<Write> = writes
        .into_iter()
        .rev()
        .filter(|w| match w {
            Write::Task(task) => seen.insert(task.id),
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskState;

    #[test]
    fn coalescing_keeps_the_last_version_of_each_task_and_every_event() {
        let mut task = crate::store::test_task();
        let first = Write::Task(task.clone());
        task.state = TaskState::Succeeded;
        let event = Write::Event(crate::store::test_event(1, &task));
        let last = Write::Task(task.clone());
        let kept = coalesce(vec![first, event, last]);
        assert_eq!(kept.len(), 2);
        assert!(matches!(&kept[0], Write::Event(e) if e.sequence == 1));
        assert!(matches!(&kept[1], Write::Task(t) if t.state == TaskState::Succeeded));
    }
}
