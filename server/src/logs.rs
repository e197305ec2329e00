//! Live task logs.
//!
//! Agents stream log lines over their session. The hub keeps a bounded tail
//! per attempt in memory, serves it to readers and followers, and persists
//! it through the store once the attempt has ended. It sits beside the
//! scheduler, never in it: log traffic never waits behind task writes, and
//! the scheduler never holds log text.
//!
//! Positions number every line of an attempt from 1, lines lost included
//! (dropped by the agent's full buffer, or from the tail to stay within
//! `max_log_bytes_per_attempt`), so a reader sees a gap as a count.
//!
//! The hub learns that an attempt ended from the store writer, which shows
//! it every committed event ([`LogHub::note_event`]: one atomic load while
//! nothing logs); the persister task then writes the tail. Should lines
//! arrive for an attempt that already ended (an agent still sending after
//! a timeout), a periodic sweep compares the tails it holds with the
//! stored tasks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::model::{AttemptLog, LogLine, Task, TaskEvent, TaskId};
use crate::store::{Store, StoreError};

/// Memory a kept line costs beyond its text.
const LINE_OVERHEAD: usize = 48;
/// How often held tails are checked against the stored tasks.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The live tails, shared by agent sessions, log readers and the persister.
#[derive(Debug)]
pub(crate) struct LogHub {
    store: Arc<dyn Store>,
    tail_bytes: usize,
    metrics: Arc<Metrics>,
    /// Tasks with a tail or a follower; lets the event path skip the lock
    /// while nobody logs.
    live: AtomicUsize,
    state: Mutex<State>,
    /// Tasks with a tail that may have ended, for the persister.
    ended: mpsc::UnboundedSender<Ended>,
}

/// An event that may have ended attempts of a task with a live tail.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ended {
    task: TaskId,
    attempt: u32,
    active: bool,
}

impl Ended {
    fn covers(self, attempt: u32) -> bool {
        attempt < self.attempt || (attempt == self.attempt && !self.active)
    }
}

#[derive(Debug, Default)]
struct State {
    tasks: HashMap<TaskId, TaskLogs>,
    /// Memory held by every tail.
    bytes: usize,
    /// Bumped whenever a persisted tail leaves memory, so an append that
    /// read the store meanwhile knows its copy may be stale.
    persisted: u64,
}

#[derive(Debug)]
struct TaskLogs {
    attempts: BTreeMap<u32, Tail>,
    /// Bumped on every change; followers wait on it.
    version: watch::Sender<u64>,
}

impl TaskLogs {
    fn new() -> Self {
        Self { attempts: BTreeMap::new(), version: watch::Sender::new(0) }
    }

    fn touch(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// One attempt's kept lines.
#[derive(Debug)]
struct Tail {
    lines: VecDeque<LogLine>,
    bytes: usize,
    dropped: u64,
    next: u64,
}

impl Tail {
    fn new(restored: Option<AttemptLog>) -> Self {
        match restored {
            Some(log) => {
                let bytes = log.lines.iter().map(line_cost).sum();
                Self { lines: log.lines.into(), bytes, dropped: log.dropped, next: log.next_position }
            }
            None => Self { lines: VecDeque::new(), bytes: 0, dropped: 0, next: 1 },
        }
    }

    fn to_log(&self, task_id: TaskId, attempt: u32) -> AttemptLog {
        AttemptLog {
            task_id,
            attempt,
            lines: self.lines.iter().cloned().collect(),
            dropped: self.dropped,
            next_position: self.next,
        }
    }
}

fn line_cost(line: &LogLine) -> usize {
    line.text.len() + LINE_OVERHEAD
}

/// What a reader gets for one attempt.
#[derive(Debug, Default)]
pub(crate) struct LogRead {
    /// Lines after the reader's position, oldest first.
    pub(crate) lines: Vec<LogLine>,
    /// True while the attempt's tail is live (more lines may come).
    pub(crate) live: bool,
}

impl LogHub {
    /// A hub and the queue its persister ([`run_persister`]) drains.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        limits: &Limits,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::UnboundedReceiver<Ended>) {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        let hub = Self {
            store,
            tail_bytes: limits.max_log_bytes_per_attempt,
            metrics,
            live: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            ended,
        };
        (hub, ended_rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent, so a panic in
        // one does not invalidate them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_live(&self, state: &State) {
        self.live.store(state.tasks.len(), Ordering::Relaxed);
        self.metrics.set_log_tail_bytes(state.bytes);
    }

    /// Adds lines an agent sent for an attempt its session holds, after
    /// the `agent_dropped` lines it lost before them.
    pub(crate) fn append(
        &self,
        task: TaskId,
        attempt: u32,
        lines: Vec<LogLine>,
        agent_dropped: u64,
    ) -> Result<(), StoreError> {
        // Lines a full tail would drop at once are skipped before the lock
        // is taken.
        let received = lines.len() as u64;
        let mut kept: Vec<LogLine> = Vec::new();
        let mut kept_bytes = 0;
        for line in lines.into_iter().rev() {
            kept_bytes += line_cost(&line);
            if kept_bytes > self.tail_bytes && !kept.is_empty() {
                break;
            }
            kept.push(line);
        }
        kept.reverse();
        let skipped = received - kept.len() as u64;
        // A tail that was already persisted (lines after the attempt ended,
        // or after a restart) continues where it stopped. The store is read
        // outside the lock, and read again if a tail was persisted meanwhile.
        let mut restored = None;
        let mut state = loop {
            let state = self.lock();
            let held = state.tasks.get(&task).is_some_and(|logs| logs.attempts.contains_key(&attempt));
            if held || restored.as_ref().is_some_and(|(generation, _)| *generation == state.persisted) {
                break state;
            }
            let generation = state.persisted;
            drop(state);
            restored = Some((generation, self.store.log(task, attempt)?));
        };
        let mut evicted = agent_dropped.saturating_add(skipped);
        let State { tasks, bytes, .. } = &mut *state;
        let logs = tasks.entry(task).or_insert_with(TaskLogs::new);
        let tail = logs.attempts.entry(attempt).or_insert_with(|| {
            let tail = Tail::new(restored.and_then(|(_, log)| log));
            *bytes += tail.bytes;
            tail
        });
        tail.next = tail.next.saturating_add(evicted);
        tail.dropped = tail.dropped.saturating_add(evicted);
        for mut line in kept {
            line.position = tail.next;
            tail.next = tail.next.saturating_add(1);
            let cost = line_cost(&line);
            tail.bytes += cost;
            *bytes += cost;
            tail.lines.push_back(line);
            while tail.bytes > self.tail_bytes && tail.lines.len() > 1 {
                let Some(old) = tail.lines.pop_front() else { break };
                let cost = line_cost(&old);
                tail.bytes -= cost;
                *bytes -= cost;
                tail.dropped = tail.dropped.saturating_add(1);
                evicted = evicted.saturating_add(1);
            }
        }
        logs.touch();
        self.update_live(&state);
        drop(state);
        self.metrics.count_log_lines(received, evicted, 0);
        Ok(())
    }

    /// Counts lines a session sent for an attempt it does not hold.
    pub(crate) fn ignored(&self, lines: usize) {
        self.metrics.count_log_lines(0, 0, lines as u64);
    }

    /// The lines of one attempt after position `after`: from the live tail
    /// when there is one, else from the store.
    pub(crate) fn read(&self, task: TaskId, attempt: u32, after: u64) -> Result<LogRead, StoreError> {
        {
            let state = self.lock();
            if let Some(tail) = state.tasks.get(&task).and_then(|logs| logs.attempts.get(&attempt)) {
                let lines = tail.lines.iter().filter(|l| l.position > after).cloned().collect();
                return Ok(LogRead { lines, live: true });
            }
        }
        // A tail is written to the store before it leaves the hub, so a
        // tail missed above is in the store.
        let lines = match self.store.log(task, attempt)? {
            Some(log) => log.lines.into_iter().filter(|l| l.position > after).collect(),
            None => Vec::new(),
        };
        Ok(LogRead { lines, live: false })
    }

    /// Subscribes to changes of a task's logs until the returned guard is
    /// dropped.
    pub(crate) fn follow(self: &Arc<Self>, task: TaskId) -> Follower {
        let mut state = self.lock();
        let changes = state.tasks.entry(task).or_insert_with(TaskLogs::new).version.subscribe();
        self.update_live(&state);
        Follower { hub: self.clone(), task, changes: Some(changes) }
    }

    /// Forgets a task with neither tails nor followers.
    fn release(&self, task: TaskId) {
        let mut state = self.lock();
        if state.tasks.get(&task).is_some_and(|logs| logs.attempts.is_empty() && logs.version.receiver_count() == 0) {
            state.tasks.remove(&task);
            self.update_live(&state);
        }
    }

    /// Called by the store writer with every committed event: queues the
    /// task for the persister when the event ended an attempt it holds a
    /// tail of. Never touches the store.
    pub(crate) fn note_event(&self, event: &TaskEvent) {
        if self.live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let ended = Ended { task: event.task_id, attempt: event.attempt, active: event.state.is_active() };
        let holds = self
            .lock()
            .tasks
            .get(&event.task_id)
            .is_some_and(|logs| logs.attempts.keys().any(|attempt| ended.covers(*attempt)));
        if holds {
            let _ = self.ended.send(ended);
        }
    }

    /// Persists every held tail whose attempt the store shows ended; catches
    /// up after a lagged event stream and with lines that came late.
    pub(crate) fn sweep(&self) {
        let tasks: Vec<TaskId> =
            self.lock().tasks.iter().filter(|(_, logs)| !logs.attempts.is_empty()).map(|(id, _)| *id).collect();
        for id in tasks {
            match self.store.task(id) {
                Ok(Some(task)) => self.persist(id, |attempt| attempt_over(&task, attempt)),
                Ok(None) => self.persist(id, |_| true),
                Err(error) => warn!(task_id = %id, %error, "cannot read a task to settle its logs"),
            }
        }
    }

    /// Writes every held tail to the store, ended or not, and keeps them:
    /// used at shutdown so a restart serves what was received.
    pub(crate) fn persist_all(&self) {
        let logs: Vec<AttemptLog> = {
            let state = self.lock();
            state
                .tasks
                .iter()
                .flat_map(|(id, logs)| logs.attempts.iter().map(|(attempt, tail)| tail.to_log(*id, *attempt)))
                .collect()
        };
        for log in logs {
            if let Err(error) = self.store.put_log(&log) {
                warn!(task_id = %log.task_id, attempt = log.attempt, %error, "cannot persist a task log");
            }
        }
    }

    /// Writes the tails of `task` whose attempt `ended`, then drops them
    /// from memory unless lines arrived meanwhile (the next event or sweep
    /// writes those).
    fn persist(&self, task: TaskId, ended: impl Fn(u32) -> bool) {
        let logs: Vec<AttemptLog> = {
            let state = self.lock();
            let Some(logs) = state.tasks.get(&task) else { return };
            logs.attempts
                .iter()
                .filter(|(attempt, _)| ended(**attempt))
                .map(|(a, tail)| tail.to_log(task, *a))
                .collect()
        };
        for log in logs {
            if let Err(error) = self.store.put_log(&log) {
                // Kept in memory: the next sweep tries again.
                warn!(task_id = %task, attempt = log.attempt, %error, "cannot persist a task log");
                continue;
            }
            debug!(task_id = %task, attempt = log.attempt, lines = log.lines.len(), "task log persisted");
            let mut state = self.lock();
            let State { tasks, bytes, persisted } = &mut *state;
            let Some(entry) = tasks.get_mut(&task) else { continue };
            if entry.attempts.get(&log.attempt).is_some_and(|tail| tail.next == log.next_position) {
                if let Some(tail) = entry.attempts.remove(&log.attempt) {
                    *bytes -= tail.bytes;
                    *persisted += 1;
                }
                entry.touch();
            }
            if entry.attempts.is_empty() && entry.version.receiver_count() == 0 {
                tasks.remove(&task);
            }
            self.update_live(&state);
        }
    }
}

/// Whether no more lines can come for `attempt` of `task`: the attempt
/// ended, or the task is finished.
pub(crate) fn attempt_over(task: &Task, attempt: u32) -> bool {
    task.state.is_terminal() || attempt < task.attempt || (attempt == task.attempt && !task.state.is_active())
}

/// A subscription to one task's log changes.
#[derive(Debug)]
pub(crate) struct Follower {
    hub: Arc<LogHub>,
    task: TaskId,
    changes: Option<watch::Receiver<u64>>,
}

impl Follower {
    /// Waits for the next change of the task's logs.
    pub(crate) async fn changed(&mut self) {
        match &mut self.changes {
            Some(changes) => {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.changes = None;
        self.hub.release(self.task);
    }
}

/// Settles tails as attempts end, until shutdown; then writes what is left.
pub(crate) async fn run_persister(
    hub: Arc<LogHub>,
    mut ended: mpsc::UnboundedReceiver<Ended>,
    shutdown: CancellationToken,
) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(ended) = ended.recv() => hub.persist(ended.task, |attempt| ended.covers(attempt)),
            _ = sweep.tick() => hub.sweep(),
            () = shutdown.cancelled() => break,
        }
    }
    hub.persist_all();
}

#[cfg(test)]
mod tests {
    use muster_proto::pb;

    use super::*;
    use crate::model::TaskState;
    use crate::store::{MemoryStore, Write, test_task};

    fn hub(tail_bytes: usize) -> (Arc<LogHub>, Arc<MemoryStore>) {
        let (hub, store, _) = hub_with_queue(tail_bytes);
        (hub, store)
    }

    fn hub_with_queue(tail_bytes: usize) -> (Arc<LogHub>, Arc<MemoryStore>, mpsc::UnboundedReceiver<Ended>) {
        let store = Arc::new(MemoryStore::new());
        let limits = Limits { max_log_bytes_per_attempt: tail_bytes, max_log_line_bytes: 8, ..Limits::default() };
        let metrics = Metrics::new().expect("metrics");
        let (hub, ended) = LogHub::new(store.clone(), &limits, metrics);
        (Arc::new(hub), store, ended)
    }

    /// Lines as an agent session hands them over, cut to 8 bytes.
    fn lines(texts: &[&str]) -> Vec<LogLine> {
        let limits = Limits { max_log_line_bytes: 8, ..Limits::default() };
        let wire = texts.iter().map(|t| pb::LogLine { text: (*t).to_owned(), ..pb::LogLine::default() }).collect();
        crate::grpc::convert::log_lines(wire, &limits, crate::model::now_ms())
    }

    fn texts(read: &LogRead) -> Vec<(u64, &str)> {
        read.lines.iter().map(|l| (l.position, l.text.as_str())).collect()
    }

    #[test]
    fn lines_are_numbered_cut_and_dropped_oldest_first() {
        let (hub, _) = hub(2 * (LINE_OVERHEAD + 1));
        let task = test_task().id;
        hub.append(task, 1, lines(&["a", "b"]), 0).expect("append");
        hub.append(task, 1, lines(&["c", "d"]), 2).expect("append");
        let read = hub.read(task, 1, 0).expect("read");
        assert!(read.live);
        assert_eq!(texts(&read), vec![(5, "c"), (6, "d")], "b was dropped from the tail, 3 and 4 by the agent");
        assert_eq!(texts(&hub.read(task, 1, 5).expect("read")), vec![(6, "d")]);
        hub.append(task, 1, lines(&["0123456789"]), 0).expect("append");
        let last = hub.read(task, 1, 6).expect("read");
        assert_eq!(texts(&last), vec![(7, "01234567…")]);
    }

    #[test]
    fn ended_attempts_move_to_the_store_and_continue_from_there() {
        let (hub, store, mut queue) = hub_with_queue(1 << 20);
        let mut task = test_task();
        task.state = TaskState::Running;
        task.attempt = 1;
        store.write(&[Write::Task(task.clone())]).expect("write");
        hub.append(task.id, 1, lines(&["one", "two"]), 0).expect("append");
        hub.sweep();
        assert!(hub.read(task.id, 1, 0).expect("read").live, "a running attempt stays in memory");

        let mut event = crate::store::test_event(1, &Task { state: TaskState::Running, ..task.clone() });
        event.attempt = 1;
        hub.note_event(&event);
        assert!(queue.try_recv().is_err(), "a running attempt has not ended");
        event.state = TaskState::Queued;
        hub.note_event(&event);
        let ended = queue.try_recv().expect("the retry ended attempt 1");
        hub.persist(ended.task, |attempt| ended.covers(attempt));
        let read = hub.read(task.id, 1, 0).expect("read");
        assert!(!read.live);
        assert_eq!(texts(&read), vec![(1, "one"), (2, "two")]);
        assert_eq!(hub.live.load(Ordering::Relaxed), 0);

        // A late line continues the stored log instead of restarting it.
        hub.append(task.id, 1, lines(&["late"]), 0).expect("append");
        assert_eq!(texts(&hub.read(task.id, 1, 2).expect("read")), vec![(3, "late")]);
        task.state = TaskState::Succeeded;
        store.write(&[Write::Task(task.clone())]).expect("write");
        hub.sweep();
        let stored = store.log(task.id, 1).expect("log").map(|log| log.lines.len());
        assert_eq!(stored, Some(3));
    }

    #[tokio::test]
    async fn followers_wake_on_new_lines_and_are_released() {
        let (hub, _) = hub(1 << 20);
        let task = test_task().id;
        let mut follower = hub.follow(task);
        hub.append(task, 1, lines(&["x"]), 0).expect("append");
        tokio::time::timeout(Duration::from_secs(5), follower.changed()).await.expect("woken");
        drop(follower);
        assert_eq!(hub.live.load(Ordering::Relaxed), 1, "the tail keeps the task");
        let follower = hub.follow(test_task().id);
        assert_eq!(hub.live.load(Ordering::Relaxed), 2);
        drop(follower);
        assert_eq!(hub.live.load(Ordering::Relaxed), 1);
    }
}
