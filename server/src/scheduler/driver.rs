//! Runs the core in one task and the store writer on its own thread.
//!
//! The core never waits for the disk: it hands each outbox to the writer
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

use super::core::Core;
use super::{Command, Effect, Outbox};
use crate::config::Durability;
use crate::logs::LogHub;
use crate::metrics::{EventObserver, Metrics};
use crate::model::TaskEvent;
use crate::store::{Store, Write};

/// Commands handled per loop turn before timers, dispatch and a flush of
/// the outbox: bounds the latency one busy turn adds.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// Outboxes merged into one store batch at most.
const MAX_OUTBOXES_PER_BATCH: usize = 512;

/// Runs the core until `shutdown` fires or every command sender is gone.
pub(crate) async fn run_core(
    mut core: Core,
    mut commands: mpsc::Receiver<Command>,
    writer: mpsc::Sender<Outbox>,
    shutdown: CancellationToken,
) {
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
            break;
        }
    }
    debug!("scheduler stopped");
}

/// The writer thread: group commit, then effects. It also feeds the
/// lifecycle metrics and the log hub, from the events of each batch once it
/// is durable.
pub(crate) fn spawn_writer(
    store: Arc<dyn Store>,
    durability: Durability,
    mut outboxes: mpsc::Receiver<Outbox>,
    events: broadcast::Sender<TaskEvent>,
    metrics: Arc<Metrics>,
    logs: Arc<LogHub>,
    on_failure: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("muster-writer".into()).spawn(move || {
        let mut observer = EventObserver::new(metrics.clone());
        while let Some(first) = outboxes.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_OUTBOXES_PER_BATCH {
                match outboxes.try_recv() {
                    Ok(outbox) => batch.push(outbox),
                    Err(_) => break,
                }
            }
            let writes = coalesce(batch.iter_mut().flat_map(|o| o.writes.drain(..)).collect());
            if !writes.is_empty() {
                let started = std::time::Instant::now();
                let result = store.write(&writes).and_then(|()| match durability {
                    Durability::Sync => store.flush(),
                    Durability::Relaxed => Ok(()),
                });
                if let Err(e) = result {
                    // Fail-stop: memory is now ahead of the store, so no
                    // effect of this batch may be performed. Restarting
                    // rebuilds the scheduler from what is durable.
                    error!(error = %e, "store write failed; shutting down");
                    on_failure.cancel();
                    return;
                }
                metrics.observe_commit(writes.len(), started.elapsed());
            }
            for effect in batch.into_iter().flat_map(|o| o.effects) {
                match effect {
                    Effect::Reply(reply) => reply(),
                    Effect::Send(tx, message) => {
                        // A closed session simply misses the message.
                        let _ = tx.send(message);
                    }
                    Effect::Publish(event) => {
                        observer.observe(&event);
                        logs.note_event(&event);
                        let _ = events.send(event);
                    }
                }
            }
        }
        if let Err(e) = store.flush() {
            error!(error = %e, "final store flush failed");
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
