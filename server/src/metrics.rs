//! The server's Prometheus metrics: every family name and label value in
//! one place, because dashboards and alert rules depend on them (see
//! `monitoring/METRICS.md`).
//!
//! Three sources feed the registry:
//! - counters and histograms of the task lifecycle are derived by the store
//!   writer from the events it publishes after each commit
//!   ([`EventObserver`]), so they count only durable transitions;
//! - gauges that describe state (tasks by state, backlog, oldest queued
//!   age, agents, slots) are computed from the scheduler's live state at
//!   scrape time ([`Snapshot`]), so they are right after a restart;
//! - gRPC requests and latency come from one tower layer
//!   (`grpc::metrics_layer`);
//! - the store's size, its filesystem's free space and its record counts
//!   are measured by a background task (`store_stats::run`) off the async
//!   threads, so neither a scrape nor a write ever waits for a scan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::model::{AgentState, EventKind, Millis, TaskEvent, TaskId, TaskState, reason};
use crate::store::RecordCounts;
use crate::store_stats::DiskUsage;

/// Tasks accepted by `Submit`.
pub(crate) const TASKS_SUBMITTED: &str = "muster_tasks_submitted_total";
/// Tasks that reached a terminal state.
pub(crate) const TASKS_FINISHED: &str = "muster_tasks_finished_total";
/// Failed attempts that were retried.
pub(crate) const TASKS_RETRIED: &str = "muster_tasks_retried_total";
/// Attempts lost because their agent was lost.
pub(crate) const TASKS_LOST: &str = "muster_tasks_lost_total";
/// Unfinished tasks by state.
pub(crate) const TASKS: &str = "muster_tasks";
/// Queued tasks.
pub(crate) const QUEUE_BACKLOG: &str = "muster_queue_backlog";
/// Age of the oldest queued task.
pub(crate) const QUEUE_OLDEST_AGE: &str = "muster_queue_oldest_task_age_seconds";
/// Assigned or running tasks past their execution deadline.
pub(crate) const TASKS_OVERDUE: &str = "muster_tasks_overdue";
/// Time from QUEUED to ASSIGNED.
pub(crate) const READY_TO_ASSIGNED: &str = "muster_task_ready_to_assigned_seconds";
/// Time from RUNNING to the end of the attempt.
pub(crate) const EXECUTION: &str = "muster_task_execution_seconds";
/// Known agents by session state.
pub(crate) const AGENTS: &str = "muster_agents";
/// Connected, non-draining agents per capability.
pub(crate) const CAPABILITY_AGENTS: &str = "muster_capability_agents";
/// Slots of connected agents.
pub(crate) const SLOTS: &str = "muster_slots";
/// Slots of connected agents holding an attempt.
pub(crate) const SLOTS_BUSY: &str = "muster_slots_busy";
/// Writes per store batch.
pub(crate) const STORE_BATCH_SIZE: &str = "muster_store_batch_writes";
/// Time to apply (and in sync mode flush) one batch.
pub const STORE_COMMIT: &str = "muster_store_commit_seconds";
/// Log lines agents sent, by what became of them.
pub(crate) const LOG_LINES: &str = "muster_task_log_lines_total";
/// The `result` values of [`LOG_LINES`], always exported.
const LOG_LINE_RESULTS: [&str; 3] = ["received", "dropped", "ignored"];
/// Memory held by live log tails.
pub(crate) const LOG_TAIL_BYTES: &str = "muster_task_log_tail_bytes";
/// Bytes the data directory takes on disk.
pub(crate) const STORE_SIZE: &str = "muster_store_size_bytes";
/// Bytes free (to the server's user) on the data directory's filesystem.
pub(crate) const STORE_DISK_FREE: &str = "muster_store_disk_free_bytes";
/// Stored records by kind, as last counted.
pub(crate) const STORE_RECORDS: &str = "muster_store_records";
/// When [`STORE_RECORDS`] was last counted.
pub(crate) const STORE_RECORDS_COUNTED: &str = "muster_store_records_counted_timestamp_seconds";
/// Records retention removed, by kind.
pub const STORE_COMPACTED: &str = "muster_store_compacted_total";
/// The `kind` values of [`STORE_COMPACTED`], always exported.
const COMPACTED_KINDS: [&str; 2] = ["task", "event"];
/// The oldest event sequence the store still holds (a watch can resume
/// from one before it).
pub(crate) const STORE_OLDEST_SEQUENCE: &str = "muster_store_oldest_sequence";
/// 1 while this replica leads (PostgreSQL store), 0 while it stands by.
pub(crate) const LEADER: &str = "muster_leader";
/// The epoch of the lease this replica holds or last held.
pub(crate) const LEADER_EPOCH: &str = "muster_leader_epoch";
/// Times this replica took the lease over from another.
pub(crate) const LEADER_FAILOVERS: &str = "muster_leader_failovers_total";
/// gRPC requests finished.
pub(crate) const GRPC_REQUESTS: &str = "muster_grpc_requests_total";
/// gRPC request latency (stream lifetime for streaming calls).
pub(crate) const GRPC_DURATION: &str = "muster_grpc_request_duration_seconds";

/// Label names.
pub(crate) mod label {
    /// A task's queue.
    pub(crate) const QUEUE: &str = "queue";
    /// A task's or agent's capability.
    pub(crate) const CAPABILITY: &str = "capability";
    /// A task or agent state.
    pub(crate) const STATE: &str = "state";
    /// How a task or attempt ended.
    pub(crate) const OUTCOME: &str = "outcome";
    /// A gRPC method, `/package.Service/Method`.
    pub(crate) const METHOD: &str = "method";
    /// A gRPC status code name (`OK`, `NOT_FOUND`, …).
    pub(crate) const CODE: &str = "code";
    /// What became of log lines: `received`, `dropped`, `ignored`.
    pub(crate) const RESULT: &str = "result";
    /// A kind of stored record (see `RecordCounts::by_kind`).
    pub(crate) const KIND: &str = "kind";
}

/// `outcome` of an attempt whose agent was lost.
pub(crate) const OUTCOME_LOST: &str = "lost";
/// `method` of calls to paths no service serves.
pub(crate) const METHOD_OTHER: &str = "other";

/// The label value of a task state.
pub(crate) fn state_label(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "pending",
        TaskState::Queued => "queued",
        TaskState::Assigned => "assigned",
        TaskState::Running => "running",
        TaskState::Succeeded => "succeeded",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
    }
}

/// The label value of an agent session state.
pub(crate) fn agent_state_label(state: AgentState) -> &'static str {
    match state {
        AgentState::Connected => "connected",
        AgentState::Draining => "draining",
        AgentState::Disconnected => "disconnected",
    }
}

/// Unfinished states, always exported (zero when empty).
const UNFINISHED: [TaskState; 4] = [TaskState::Pending, TaskState::Queued, TaskState::Assigned, TaskState::Running];
const AGENT_STATES: [AgentState; 3] = [AgentState::Connected, AgentState::Draining, AgentState::Disconnected];

/// Latency buckets from 1 ms to about 2 minutes.
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Execution buckets from 10 ms to an hour.
const EXECUTION_BUCKETS: [f64; 14] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
/// Batch sizes from 1 write to the writer's largest batches.
const BATCH_BUCKETS: [f64; 12] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// Why the metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A family could not be created or registered.
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    /// The text encoding was not UTF-8.
    #[error("metrics encoding: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// Live counts the scheduler computes at scrape time.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Snapshot {
    /// Unfinished tasks per state.
    pub(crate) tasks: BTreeMap<&'static str, i64>,
    /// Per (queue, capability) with unfinished tasks.
    pub(crate) queues: BTreeMap<(String, String), QueueStats>,
    /// Agents per session state.
    pub(crate) agents: BTreeMap<&'static str, i64>,
    /// Connected, non-draining agents per capability.
    pub(crate) capability_agents: BTreeMap<String, i64>,
    pub(crate) slots_total: i64,
    pub(crate) slots_busy: i64,
}

/// One (queue, capability) pair's numbers.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct QueueStats {
    pub(crate) backlog: i64,
    pub(crate) oldest_queued_seconds: f64,
    pub(crate) overdue: i64,
}

impl Snapshot {
    /// Counts one unfinished task. `queued_for` is how long it has been
    /// queued (when queued); `overdue` whether its live attempt is past its
    /// deadline.
    pub(crate) fn add_task(
        &mut self,
        state: TaskState,
        queue: &str,
        capability: &str,
        queued_for: Option<Duration>,
        overdue: bool,
    ) {
        *self.tasks.entry(state_label(state)).or_default() += 1;
        let stats = self.queues.entry((queue.to_owned(), capability.to_owned())).or_default();
        if let Some(age) = queued_for {
            stats.backlog += 1;
            stats.oldest_queued_seconds = stats.oldest_queued_seconds.max(age.as_secs_f64());
        }
        if overdue {
            stats.overdue += 1;
        }
    }

    /// Counts one agent session holding `busy` attempts.
    pub(crate) fn add_agent(&mut self, state: AgentState, capabilities: &[String], slots: u32, busy: usize) {
        *self.agents.entry(agent_state_label(state)).or_default() += 1;
        if state == AgentState::Disconnected {
            return;
        }
        self.slots_total += i64::from(slots);
        self.slots_busy += busy as i64;
        if state == AgentState::Connected {
            for capability in capabilities {
                *self.capability_agents.entry(capability.clone()).or_default() += 1;
            }
        }
    }
}

/// The server's registry and families. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    submitted: IntCounterVec,
    finished: IntCounterVec,
    retried: IntCounterVec,
    lost: IntCounterVec,
    ready_to_assigned: HistogramVec,
    execution: HistogramVec,
    tasks: IntGaugeVec,
    backlog: IntGaugeVec,
    oldest: GaugeVec,
    overdue: IntGaugeVec,
    agents: IntGaugeVec,
    capability_agents: IntGaugeVec,
    slots_total: IntGauge,
    slots_busy: IntGauge,
    store_batch: Histogram,
    store_commit: Histogram,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    log_lines: IntCounterVec,
    log_tail_bytes: IntGauge,
    // The store gauges have no series until first measured: a server
    // without a data directory exports none rather than a full disk.
    store_size: IntGaugeVec,
    store_disk_free: IntGaugeVec,
    store_records: IntGaugeVec,
    store_records_counted: GaugeVec,
    store_compacted: IntCounterVec,
    store_oldest_sequence: IntGauge,
    leader: IntGauge,
    leader_epoch: IntGauge,
    leader_failovers: prometheus::IntCounter,
    /// Serialises scrapes: each resets and refills the state gauges.
    render: Mutex<()>,
}

impl Metrics {
    /// Creates every family in a fresh registry.
    pub fn new() -> Result<Arc<Self>, MetricsError> {
        use label::*;
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, MetricsError> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, labels: &[&str], buckets: &[f64]| -> Result<HistogramVec, MetricsError> {
                let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let metrics = Self {
            submitted: counter(TASKS_SUBMITTED, "Tasks accepted by Submit.", &[QUEUE, CAPABILITY])?,
            finished: counter(TASKS_FINISHED, "Tasks that reached a terminal state.", &[QUEUE, CAPABILITY, OUTCOME])?,
            retried: counter(TASKS_RETRIED, "Failed attempts put back for another attempt.", &[QUEUE, CAPABILITY])?,
            lost: counter(TASKS_LOST, "Attempts failed because their agent was lost.", &[QUEUE, CAPABILITY])?,
            ready_to_assigned: histogram(
                READY_TO_ASSIGNED,
                "Time a task waited QUEUED before it was assigned.",
                &[QUEUE, CAPABILITY],
                &LATENCY_BUCKETS,
            )?,
            execution: histogram(
                EXECUTION,
                "Time from RUNNING to the end of the attempt.",
                &[QUEUE, CAPABILITY, OUTCOME],
                &EXECUTION_BUCKETS,
            )?,
            tasks: gauge(TASKS, "Unfinished tasks by state.", &[STATE])?,
            backlog: gauge(QUEUE_BACKLOG, "Tasks QUEUED waiting for an agent.", &[QUEUE, CAPABILITY])?,
            oldest: {
                let g = GaugeVec::new(
                    Opts::new(QUEUE_OLDEST_AGE, "How long the oldest QUEUED task has waited (0 when none)."),
                    &[QUEUE, CAPABILITY],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            overdue: gauge(
                TASKS_OVERDUE,
                "Assigned or running tasks past their execution timeout.",
                &[QUEUE, CAPABILITY],
            )?,
            agents: gauge(AGENTS, "Known agent sessions by state.", &[STATE])?,
            capability_agents: gauge(
                CAPABILITY_AGENTS,
                "Connected agents taking work (not draining) per capability.",
                &[CAPABILITY],
            )?,
            slots_total: {
                let g = IntGauge::new(SLOTS, "Slots of connected agents.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            slots_busy: {
                let g = IntGauge::new(SLOTS_BUSY, "Slots of connected agents holding an attempt.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            store_batch: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(STORE_BATCH_SIZE, "Writes applied per store batch (group commit).")
                        .buckets(BATCH_BUCKETS.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            store_commit: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(STORE_COMMIT, "Time to apply one store batch and, in sync mode, flush it.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            grpc_requests: counter(GRPC_REQUESTS, "gRPC calls finished, by method and status code.", &[METHOD, CODE])?,
            grpc_duration: histogram(
                GRPC_DURATION,
                "gRPC call latency; for streaming calls, the stream's lifetime.",
                &[METHOD, CODE],
                &LATENCY_BUCKETS,
            )?,
            log_lines: counter(
                LOG_LINES,
                "Task log lines: received from agents, dropped (by an agent or from a full tail), or ignored \
                 (sent for an attempt the session does not hold).",
                &[RESULT],
            )?,
            log_tail_bytes: {
                let g = IntGauge::new(LOG_TAIL_BYTES, "Memory held by the log tails of live attempts.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            store_size: gauge(
                STORE_SIZE,
                "Bytes the data directory takes on disk (allocated blocks of every file in it).",
                &[],
            )?,
            store_disk_free: gauge(
                STORE_DISK_FREE,
                "Bytes free to the server on the data directory's filesystem.",
                &[],
            )?,
            store_records: gauge(STORE_RECORDS, "Stored records by kind, as last counted.", &[KIND])?,
            store_records_counted: {
                let g = GaugeVec::new(
                    Opts::new(STORE_RECORDS_COUNTED, "Unix time of the last count of muster_store_records."),
                    &[],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            store_compacted: counter(
                STORE_COMPACTED,
                "Records retention removed: finished tasks (with their index entries and logs) and events.",
                &[KIND],
            )?,
            store_oldest_sequence: {
                let g = IntGauge::new(
                    STORE_OLDEST_SEQUENCE,
                    "The oldest event sequence kept; a watch resuming before it must re-list.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            leader: {
                let g = IntGauge::new(LEADER, "1 while this replica leads, 0 while it stands by (PostgreSQL store).")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            leader_epoch: {
                let g = IntGauge::new(LEADER_EPOCH, "The epoch of the leader lease this replica holds or last held.")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            leader_failovers: {
                let c =
                    prometheus::IntCounter::new(LEADER_FAILOVERS, "Times this replica took the leader lease over.")?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            render: Mutex::new(()),
            registry,
        };
        for kind in COMPACTED_KINDS {
            metrics.store_compacted.with_label_values(&[kind]);
        }
        for result in LOG_LINE_RESULTS {
            metrics.log_lines.with_label_values(&[result]);
        }
        Ok(Arc::new(metrics))
    }

    /// The registry, for embedding more families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records one store batch.
    pub(crate) fn observe_commit(&self, writes: usize, took: Duration) {
        self.store_batch.observe(writes as f64);
        self.store_commit.observe(took.as_secs_f64());
    }

    /// Counts log lines by what became of them.
    pub(crate) fn count_log_lines(&self, received: u64, dropped: u64, ignored: u64) {
        for (result, n) in LOG_LINE_RESULTS.into_iter().zip([received, dropped, ignored]) {
            if n > 0 {
                self.log_lines.with_label_values(&[result]).inc_by(n);
            }
        }
    }

    /// Sets the memory held by live log tails.
    pub(crate) fn set_log_tail_bytes(&self, bytes: usize) {
        self.log_tail_bytes.set(bytes as i64);
    }

    /// Sets the record gauges from a count finished at `at`.
    pub(crate) fn set_record_counts(&self, counts: &RecordCounts, at: std::time::SystemTime) {
        for (kind, count) in counts.by_kind() {
            self.store_records.with_label_values(&[kind]).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let seconds = at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.store_records_counted.with_label_values::<&str>(&[]).set(seconds);
    }

    /// Sets the data directory's size and its filesystem's free space.
    pub(crate) fn set_disk_usage(&self, usage: DiskUsage) {
        let gauge = |bytes: u64| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.store_size.with_label_values::<&str>(&[]).set(gauge(usage.size_bytes));
        self.store_disk_free.with_label_values::<&str>(&[]).set(gauge(usage.free_bytes));
    }

    /// Counts what one retention pass removed, and where the event log now
    /// starts.
    pub(crate) fn observe_compaction(&self, tasks: u64, events: u64, oldest_sequence: u64) {
        self.store_compacted.with_label_values(&["task"]).inc_by(tasks);
        self.store_compacted.with_label_values(&["event"]).inc_by(events);
        self.store_oldest_sequence.set(i64::try_from(oldest_sequence).unwrap_or(i64::MAX));
    }

    /// Whether this replica leads, and under which epoch.
    pub(crate) fn observe_leadership(&self, leads: bool, epoch: i64) {
        self.leader.set(i64::from(leads));
        self.leader_epoch.set(epoch);
    }

    /// This replica took the lease over from another.
    pub(crate) fn observe_failover(&self) {
        self.leader_failovers.inc();
    }

    /// Records one finished gRPC call.
    pub(crate) fn observe_grpc(&self, method: &str, code: &str, took: Duration) {
        self.grpc_requests.with_label_values(&[method, code]).inc();
        self.grpc_duration.with_label_values(&[method, code]).observe(took.as_secs_f64());
    }

    /// Sets the state gauges from `snapshot` and renders every family in
    /// the text exposition format.
    pub(crate) fn render(&self, snapshot: &Snapshot) -> Result<String, MetricsError> {
        let _serial = self.render.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.tasks.reset();
        for state in UNFINISHED {
            let label = state_label(state);
            self.tasks.with_label_values(&[label]).set(snapshot.tasks.get(label).copied().unwrap_or(0));
        }
        self.backlog.reset();
        self.oldest.reset();
        self.overdue.reset();
        for ((queue, capability), stats) in &snapshot.queues {
            let labels = [queue.as_str(), capability.as_str()];
            self.backlog.with_label_values(&labels).set(stats.backlog);
            self.oldest.with_label_values(&labels).set(stats.oldest_queued_seconds);
            self.overdue.with_label_values(&labels).set(stats.overdue);
        }
        self.agents.reset();
        for state in AGENT_STATES {
            let label = agent_state_label(state);
            self.agents.with_label_values(&[label]).set(snapshot.agents.get(label).copied().unwrap_or(0));
        }
        self.capability_agents.reset();
        for (capability, count) in &snapshot.capability_agents {
            self.capability_agents.with_label_values(&[capability.as_str()]).set(*count);
        }
        self.slots_total.set(snapshot.slots_total);
        self.slots_busy.set(snapshot.slots_busy);
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8(buffer)?)
    }
}

/// Derives lifecycle counters and histograms from published events. Owned
/// by the writer thread; remembers when tasks entered QUEUED and RUNNING
/// (only for tasks in those states, so it is bounded by the live set).
#[derive(Debug)]
pub(crate) struct EventObserver {
    metrics: Arc<Metrics>,
    queued_at: HashMap<TaskId, Millis>,
    running_at: HashMap<(TaskId, u32), Millis>,
    /// (queue, capability) pairs whose counters exist.
    seen: HashSet<(String, String)>,
}

impl EventObserver {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, queued_at: HashMap::new(), running_at: HashMap::new(), seen: HashSet::new() }
    }

    /// Creates the zero series of a pair's counters the first time it is
    /// seen: a counter that appears already at 1 shows no `increase()`, so
    /// the first lost attempt or failure would go unnoticed.
    fn init_pair(&mut self, queue: &str, capability: &str) {
        if self.seen.contains(&(queue.to_owned(), capability.to_owned())) {
            return;
        }
        self.seen.insert((queue.to_owned(), capability.to_owned()));
        let m = &self.metrics;
        let pair = [queue, capability];
        m.submitted.with_label_values(&pair);
        m.retried.with_label_values(&pair);
        m.lost.with_label_values(&pair);
        for outcome in [TaskState::Succeeded, TaskState::Failed, TaskState::Cancelled] {
            m.finished.with_label_values(&[queue, capability, state_label(outcome)]);
        }
    }

    /// Updates the families for one durable event.
    pub(crate) fn observe(&mut self, event: &TaskEvent) {
        if event.kind != EventKind::State {
            return;
        }
        self.init_pair(&event.queue, &event.capability);
        let m = &self.metrics;
        let (queue, capability) = (event.queue.as_str(), event.capability.as_str());
        let pair = [queue, capability];
        let Some(previous) = event.previous_state else {
            m.submitted.with_label_values(&pair).inc();
            if event.state == TaskState::Queued {
                self.queued_at.insert(event.task_id, event.at);
            }
            return;
        };
        let lost = event.reason == reason::AGENT_LOST;
        if lost && matches!(previous, TaskState::Assigned | TaskState::Running) {
            m.lost.with_label_values(&pair).inc();
        }
        if matches!(previous, TaskState::Assigned | TaskState::Running)
            && matches!(event.state, TaskState::Pending | TaskState::Queued)
        {
            m.retried.with_label_values(&pair).inc();
        }
        if previous == TaskState::Queued
            && let Some(since) = self.queued_at.remove(&event.task_id)
            && event.state == TaskState::Assigned
        {
            m.ready_to_assigned.with_label_values(&pair).observe(seconds_between(since, event.at));
        }
        if event.state == TaskState::Queued {
            self.queued_at.insert(event.task_id, event.at);
        }
        if event.state == TaskState::Running {
            self.running_at.insert((event.task_id, event.attempt), event.at);
        } else if let Some(since) = self.running_at.remove(&(event.task_id, event.attempt)) {
            let outcome = if lost {
                OUTCOME_LOST
            } else {
                match event.state {
                    TaskState::Succeeded => state_label(TaskState::Succeeded),
                    TaskState::Cancelled => state_label(TaskState::Cancelled),
                    _ => state_label(TaskState::Failed),
                }
            };
            m.execution.with_label_values(&[queue, capability, outcome]).observe(seconds_between(since, event.at));
        }
        if event.state.is_terminal() && !previous.is_terminal() {
            m.finished.with_label_values(&[queue, capability, state_label(event.state)]).inc();
            self.queued_at.remove(&event.task_id);
        }
    }
}

fn seconds_between(from: Millis, to: Millis) -> f64 {
    Duration::from_millis(to.saturating_sub(from)).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_event(id: TaskId, previous: Option<TaskState>, state: TaskState, why: &str, at: Millis) -> TaskEvent {
        TaskEvent {
            sequence: 1,
            task_id: id,
            kind: EventKind::State,
            state,
            previous_state: previous,
            attempt: 1,
            agent_id: None,
            queue: "default".into(),
            capability: "shell".into(),
            workflow: None,
            reason: why.into(),
            message: String::new(),
            progress: None,
            at,
            actor: None,
        }
    }

    #[test]
    fn a_lost_attempt_that_is_retried_counts_as_lost_and_retried_and_then_finished() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        let mut observer = EventObserver::new(metrics.clone());
        let id = TaskId(ulid::Ulid::new());
        use TaskState::*;
        observer.observe(&make_event(id, None, Queued, reason::SUBMITTED, 1_000));
        observer.observe(&make_event(id, Some(Queued), Assigned, reason::ASSIGNED, 1_500));
        observer.observe(&make_event(id, Some(Assigned), Running, reason::ACCEPTED, 1_600));
        observer.observe(&make_event(id, Some(Running), Pending, reason::AGENT_LOST, 3_600));
        observer.observe(&make_event(id, Some(Pending), Queued, reason::READY, 4_000));
        observer.observe(&make_event(id, Some(Queued), Assigned, reason::ASSIGNED, 4_100));
        observer.observe(&make_event(id, Some(Assigned), Succeeded, reason::COMPLETED, 4_200));
        let labels = ["default", "shell"];
        assert_eq!(metrics.submitted.with_label_values(&labels).get(), 1);
        assert_eq!(metrics.lost.with_label_values(&labels).get(), 1);
        assert_eq!(metrics.retried.with_label_values(&labels).get(), 1);
        assert_eq!(metrics.finished.with_label_values(&["default", "shell", "succeeded"]).get(), 1);
        assert_eq!(metrics.ready_to_assigned.with_label_values(&labels).get_sample_count(), 2);
        let lost = metrics.execution.with_label_values(&["default", "shell", OUTCOME_LOST]);
        assert_eq!(lost.get_sample_count(), 1);
        assert!((lost.get_sample_sum() - 2.0).abs() < 1e-9);
        assert!(observer.queued_at.is_empty() && observer.running_at.is_empty(), "nothing left behind");
        Ok(())
    }

    #[test]
    fn render_exports_zero_gauges_for_every_state_and_drops_vanished_queues() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        let mut snapshot = Snapshot::default();
        snapshot.add_task(TaskState::Queued, "default", "gpu", Some(Duration::from_secs(7)), false);
        let text = metrics.render(&snapshot)?;
        assert!(text.contains("muster_tasks{state=\"running\"} 0"), "{text}");
        assert!(text.contains("muster_queue_oldest_task_age_seconds{capability=\"gpu\",queue=\"default\"} 7"));
        assert!(text.contains("muster_agents{state=\"disconnected\"} 0"));
        let text = metrics.render(&Snapshot::default())?;
        assert!(!text.contains("capability=\"gpu\""), "{text}");
        Ok(())
    }

    #[test]
    fn store_gauges_are_absent_until_measured_then_export_every_kind() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        let text = metrics.render(&Snapshot::default())?;
        assert!(!text.contains("muster_store_records") && !text.contains("muster_store_disk_free_bytes"), "{text}");
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        metrics.set_record_counts(&RecordCounts { tasks: 5, events: 12, ..RecordCounts::default() }, at);
        metrics.set_disk_usage(DiskUsage { size_bytes: 4096, free_bytes: 1 << 40 });
        let text = metrics.render(&Snapshot::default())?;
        assert!(text.contains("muster_store_records{kind=\"task\"} 5"), "{text}");
        assert!(text.contains("muster_store_records{kind=\"event\"} 12"), "{text}");
        assert!(text.contains("muster_store_records{kind=\"log_tail\"} 0"), "{text}");
        assert_eq!(text.matches("muster_store_records{kind=").count(), 10, "{text}");
        assert!(text.contains("muster_store_records_counted_timestamp_seconds 1700000000"), "{text}");
        assert!(text.contains("muster_store_size_bytes 4096"), "{text}");
        assert!(text.contains("muster_store_disk_free_bytes 1099511627776"), "{text}");
        Ok(())
    }
}
