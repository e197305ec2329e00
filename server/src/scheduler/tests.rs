//! The scheduler's semantics, driven directly with paused Tokio time over a
//! real sled store: leases, backoff, timeouts, fencing, cancel, restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::core::Core;
use super::{Command, Effect, ToAgent};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::*;
use crate::store::{SledStore, Store};
use ulid::Ulid;

struct Harness {
    core: Core,
    store: Arc<SledStore>,
    config: Arc<ServerConfig>,
    events: Vec<TaskEvent>,
    dir: tempfile::TempDir,
}

struct TestAgent {
    id: AgentId,
    conn: u64,
    token: String,
    rx: mpsc::UnboundedReceiver<ToAgent>,
    closed: Option<Error>,
}

impl TestAgent {
    /// Every message received since the last call.
    fn messages(&mut self) -> Vec<ToAgent> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            if let ToAgent::Close(e) = m {
                self.closed = Some(e);
            } else {
                out.push(m);
            }
        }
        out
    }

    fn assignments(&mut self) -> Vec<(TaskId, u32)> {
        self.messages()
            .into_iter()
            .filter_map(|m| match m {
                ToAgent::Assign(t, _) => Some((t.id, t.attempt)),
                _ => None,
            })
            .collect()
    }
}

fn make_config() -> ServerConfig {
    ServerConfig {
        lease_ttl: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        cancel_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

fn make_spec(capability: &str) -> TaskSpec {
    TaskSpec {
        capability: capability.into(),
        selector: BTreeMap::new(),
        queue: "default".into(),
        priority: Priority::Normal,
        payload: bytes::Bytes::from_static(b"{}"),
        content_type: String::new(),
        metadata: BTreeMap::new(),
        timeout: Duration::from_secs(60),
        queue_timeout: None,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            multiplier: 2.0,
        },
        idempotency_key: None,
        not_before: None,
        trace_context: BTreeMap::new(),
        key: None,
        depends_on: Vec::new(),
        locks: Vec::new(),
        concurrency: None,
    }
}

impl Harness {
    fn new(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SledStore::open(dir.path(), None).expect("open store"));
        let config = Arc::new(config);
        let core = Core::recover(config.clone(), store.clone(), Instant::now()).expect("recover");
        Self { core, store, config, events: Vec::new(), dir }
    }

    /// Simulates a restart: a new core recovered from the same store.
    fn restart(&mut self) {
        self.core = Core::recover(self.config.clone(), self.store.clone(), Instant::now()).expect("recover");
        self.settle();
    }

    /// What the driver does after each turn: timers, dispatch, then the
    /// outbox written to the store and its effects performed.
    fn settle(&mut self) {
        let now = Instant::now();
        self.core.fire_timers(now);
        self.core.dispatch(now);
        let out = self.core.take_outbox();
        self.store.write(&out.writes).expect("write");
        for effect in out.effects {
            match effect {
                Effect::Reply(reply) => reply(),
                Effect::Send(tx, message) => {
                    let _ = tx.send(message);
                }
                Effect::Publish(event) => self.events.push(event),
            }
        }
    }

    fn call<T>(&mut self, make: impl FnOnce(super::Reply<T>) -> Command) -> Result<T, Error> {
        let (tx, mut rx) = oneshot::channel();
        self.core.handle(make(tx), Instant::now());
        self.settle();
        rx.try_recv().expect("a reply after settling")
    }

    fn submit(&mut self, spec: TaskSpec) -> Task {
        let submissions = vec![Submission { spec, depends_on: Vec::new() }];
        let mut created = self.call(|reply| Command::Submit { submissions, reply }).expect("submit");
        created.tasks.remove(0).0
    }

    fn submit_graph(&mut self, submissions: Vec<Submission>) -> Result<super::SubmitOutcome, Error> {
        self.call(|reply| Command::Submit { submissions, reply })
    }

    fn explain(&mut self, id: TaskId) -> Vec<&'static str> {
        let explanation = self.call(|reply| Command::Explain { id, reply }).expect("explain");
        explanation.reasons.iter().map(|r| r.code).collect()
    }

    fn set_queue(&mut self, name: &str, change: super::QueueChange) {
        let name = name.to_owned();
        self.call(|reply| Command::SetQueue { name, change, reply }).expect("set queue");
    }

    fn submit_many(&mut self, specs: Vec<TaskSpec>) -> Result<Vec<(Task, bool)>, Error> {
        let submissions = specs.into_iter().map(|spec| Submission { spec, depends_on: Vec::new() }).collect();
        self.call(|reply| Command::Submit { submissions, reply }).map(|o| o.tasks)
    }

    fn connect(&mut self, name: &str, capabilities: &[&str], labels: &[(&str, &str)], slots: u32) -> TestAgent {
        self.connect_with(name, capabilities, labels, slots, None, vec![])
    }

    fn connect_with(
        &mut self,
        name: &str,
        capabilities: &[&str],
        labels: &[(&str, &str)],
        slots: u32,
        resume_token: Option<String>,
        held_attempts: Vec<(TaskId, u32)>,
    ) -> TestAgent {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let registration = Registration {
            name: name.into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            slots,
            sdk_version: "test".into(),
            resume_token,
            held_attempts,
            metrics_address: String::new(),
        };
        let (id, conn) = self.call(|reply| Command::Register { registration, tx, reply }).expect("register");
        let token = match rx.try_recv() {
            Ok(ToAgent::Registered { resume_token, .. }) => resume_token,
            other => panic!("expected registered first, got {other:?}"),
        };
        TestAgent { id, conn, token, rx, closed: None }
    }

    fn report(&mut self, agent: &TestAgent, report: AgentReport) {
        self.core.handle(Command::Report { agent: agent.id, conn: agent.conn, report }, Instant::now());
        self.settle();
    }

    fn disconnect(&mut self, agent: &TestAgent) {
        self.core.handle(Command::Disconnected { agent: agent.id, conn: agent.conn }, Instant::now());
        self.settle();
    }

    async fn advance(&mut self, by: Duration) {
        tokio::time::advance(by).await;
        self.settle();
    }

    /// Lets time pass while the agents keep their leases with heartbeats.
    async fn pass(&mut self, agents: &[&TestAgent], mut by: Duration) {
        let step = Duration::from_secs(1);
        while !by.is_zero() {
            let d = by.min(step);
            for agent in agents {
                self.report(agent, AgentReport::Heartbeat);
            }
            self.advance(d).await;
            by -= d;
        }
    }

    fn task(&self, id: TaskId) -> Task {
        self.store.task(id).expect("read").expect("task exists")
    }

    fn run(&mut self, agent: &TestAgent, id: TaskId, attempt: u32) {
        self.report(agent, AgentReport::Accept(id, attempt));
        self.report(agent, AgentReport::Complete(id, attempt, bytes::Bytes::from_static(b"ok"), "text/plain".into()));
    }
}

#[tokio::test(start_paused = true)]
async fn priorities_dispatch_highest_first_and_fifo_within_a_level() {
    let mut h = Harness::new(make_config());
    let mut ids = Vec::new();
    for (i, priority) in
        [Priority::Low, Priority::Normal, Priority::Critical, Priority::High, Priority::Critical, Priority::Normal]
            .into_iter()
            .enumerate()
    {
        let mut spec = make_spec("shell");
        spec.priority = priority;
        spec.metadata.insert("i".into(), i.to_string());
        ids.push(h.submit(spec).id);
    }
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut order = Vec::new();
    for _ in 0..ids.len() {
        let assigned = agent.assignments();
        assert_eq!(assigned.len(), 1, "one slot means one assignment at a time");
        let (id, attempt) = assigned[0];
        order.push(ids.iter().position(|x| *x == id).expect("known task"));
        h.run(&agent, id, attempt);
    }
    assert_eq!(order, vec![2, 4, 3, 1, 5, 0]);
}

#[tokio::test(start_paused = true)]
async fn selectors_route_to_matching_agents_and_slots_are_respected() {
    let mut h = Harness::new(make_config());
    let mut plain = h.connect("plain", &["shell"], &[("gpu", "false")], 2);
    let mut gpu = h.connect("gpu", &["shell"], &[("gpu", "true")], 1);
    let mut spec = make_spec("shell");
    spec.selector.insert("gpu".into(), "true".into());
    let a = h.submit(spec.clone()).id;
    let b = h.submit(spec).id;
    assert_eq!(gpu.assignments(), vec![(a, 1)]);
    assert!(plain.assignments().is_empty(), "the plain agent lacks the gpu label");
    assert_eq!(h.task(b).state, TaskState::Queued, "the gpu agent's one slot is busy");
    h.run(&gpu, a, 1);
    assert_eq!(gpu.assignments(), vec![(b, 1)]);

    let c = h.submit(make_spec("shell")).id;
    let d = h.submit(make_spec("shell")).id;
    let e = h.submit(make_spec("other")).id;
    let to_plain = plain.assignments();
    assert_eq!(to_plain.len(), 2);
    assert!(to_plain.contains(&(c, 1)) && to_plain.contains(&(d, 1)));
    assert_eq!(h.task(e).state, TaskState::Queued, "nobody has the capability");
}

#[tokio::test(start_paused = true)]
async fn a_lost_agents_attempt_fails_with_agent_lost_and_runs_on_another_agent() {
    let mut h = Harness::new(make_config());
    let mut first = h.connect("first", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(first.assignments(), vec![(id, 1)]);
    h.report(&first, AgentReport::Accept(id, 1));
    h.disconnect(&first);
    let mut second = h.connect("second", &["shell"], &[], 1);
    h.pass(&[&second], Duration::from_secs(9)).await;
    assert_eq!(h.task(id).state, TaskState::Running, "still within the lease");
    assert!(second.assignments().is_empty());
    h.pass(&[&second], Duration::from_secs(2)).await;
    let task = h.task(id);
    assert_ne!(task.state, TaskState::Running, "the lost attempt ended");
    assert_eq!(task.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
    h.pass(&[&second], Duration::from_secs(2)).await;
    assert_eq!(second.assignments(), vec![(id, 2)]);
    h.run(&second, id, 2);
    assert_eq!(h.task(id).state, TaskState::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_the_lease_and_silence_loses_it() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    for _ in 0..10 {
        h.advance(Duration::from_secs(3)).await;
        h.report(&agent, AgentReport::Heartbeat);
    }
    assert_eq!(h.task(id).state, TaskState::Running);
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Heartbeat)), "heartbeats are answered");
    h.advance(Duration::from_secs(11)).await;
    assert!(agent.closed.is_none());
    agent.messages();
    assert!(matches!(agent.closed, Some(Error::Unavailable(_))), "the silent session is closed");
    assert_eq!(h.task(id).attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
}

#[tokio::test(start_paused = true)]
async fn resuming_within_the_lease_keeps_the_running_attempt() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.disconnect(&agent);
    h.advance(Duration::from_secs(8)).await;
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![(id, 1)]);
    assert_eq!(back.id, agent.id, "same session");
    h.pass(&[&back], Duration::from_secs(30)).await;
    assert_eq!(h.task(id).state, TaskState::Running);
    assert!(back.assignments().is_empty(), "no second execution");
    h.report(&back, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"done"), String::new()));
    let task = h.task(id);
    assert_eq!((task.state, task.attempt), (TaskState::Succeeded, 1));
    assert!(back.messages().iter().any(|m| matches!(m, ToAgent::Ack { task_id, attempt: 1 } if *task_id == id)));
}

#[tokio::test(start_paused = true)]
async fn an_assignment_lost_in_transit_is_resent_on_resume() {
    let mut h = Harness::new(make_config());
    let agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    h.disconnect(&agent);
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![]);
    assert_eq!(back.assignments(), vec![(id, 1)], "same attempt, offered again");
}

#[tokio::test(start_paused = true)]
async fn fencing_rejects_stale_reports_acks_duplicates_and_closes_on_foreign_ones() {
    let mut h = Harness::new(make_config());
    let mut a = h.connect("a", &["shell"], &[], 1);
    let mut b = h.connect("b", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    let (holder, other) = if a.assignments() == vec![(id, 1)] { (&mut a, &mut b) } else { (&mut b, &mut a) };
    h.report(holder, AgentReport::Accept(id, 1));
    h.report(holder, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"x"), String::new()));
    holder.messages();
    // A duplicate Complete is a no-op that is acknowledged again.
    h.report(holder, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"x"), String::new()));
    assert!(holder.messages().iter().any(|m| matches!(m, ToAgent::Ack { .. })));
    // A Fail of an attempt that succeeded is stale.
    h.report(holder, AgentReport::Fail(id, 1, Failure::new("handler_error", "late", true)));
    assert!(
        holder.messages().iter().any(|m| matches!(m, ToAgent::Rejected { error: Error::FailedPrecondition(_), .. }))
    );
    assert_eq!(h.task(id).state, TaskState::Succeeded);
    // An attempt that never existed is hostile: the session is closed.
    h.report(other, AgentReport::Complete(id, 7, bytes::Bytes::new(), String::new()));
    other.messages();
    assert!(matches!(other.closed, Some(Error::FailedPrecondition(_))));
}

#[tokio::test(start_paused = true)]
async fn reports_for_an_attempt_held_by_another_agent_close_the_session() {
    let mut h = Harness::new(make_config());
    let mut a = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(a.assignments(), vec![(id, 1)]);
    let mut intruder = h.connect("intruder", &["other"], &[], 1);
    h.report(&intruder, AgentReport::Complete(id, 1, bytes::Bytes::new(), String::new()));
    intruder.messages();
    assert!(matches!(intruder.closed, Some(Error::FailedPrecondition(_))));
    assert_eq!(h.task(id).state, TaskState::Assigned, "the foreign report changed nothing");
}

#[tokio::test(start_paused = true)]
async fn failures_retry_with_capped_exponential_backoff_until_attempts_run_out() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    let mut expected_max = Duration::from_secs(1);
    for attempt in 1..=3u32 {
        assert_eq!(agent.assignments(), vec![(id, attempt)]);
        h.report(&agent, AgentReport::Fail(id, attempt, Failure::new("handler_error", "boom", true)));
        let task = h.task(id);
        if attempt == 3 {
            assert_eq!(task.state, TaskState::Failed);
            assert_eq!(task.failure.as_ref().map(|f| f.message.as_str()), Some("boom"));
            break;
        }
        assert_eq!(task.state, TaskState::Pending);
        let wait = Duration::from_millis(task.ready_at.expect("ready_at") - h.core.clock().ms(Instant::now()));
        assert!(wait >= expected_max / 2 && wait <= expected_max, "backoff {wait:?} within jitter of {expected_max:?}");
        h.advance(wait).await;
        expected_max *= 2;
    }
    assert!(h.events.iter().any(|e| e.reason == "handler_error" && e.state == TaskState::Pending));
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_failure_is_terminal_and_retry_task_runs_it_again() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Fail(id, 1, Failure::new("invalid_payload", "bad", false)));
    assert_eq!(h.task(id).state, TaskState::Failed);
    let task = h.call(|reply| Command::Retry { id, reply }).expect("retry");
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(agent.assignments(), vec![(id, 2)]);
    h.run(&agent, id, 2);
    assert_eq!(h.task(id).state, TaskState::Succeeded);
    let again = h.call(|reply| Command::Retry { id, reply });
    assert!(matches!(again, Err(Error::FailedPrecondition(_))), "only failed or cancelled tasks can be retried");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_its_timeout_is_cancelled_and_fails_with_reason_timeout() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut spec = make_spec("shell");
    spec.timeout = Duration::from_secs(30);
    spec.retry.max_attempts = 1;
    let id = h.submit(spec).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.pass(&[&agent], Duration::from_secs(29)).await;
    assert_eq!(h.task(id).state, TaskState::Running);
    h.pass(&[&agent], Duration::from_secs(2)).await;
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Cancel { reason, .. } if reason == "timeout")));
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.failure.map(|f| f.reason), Some(reason::TIMEOUT.to_owned()));
}

#[tokio::test(start_paused = true)]
async fn cancel_is_immediate_when_queued_and_two_phase_when_running() {
    let mut h = Harness::new(make_config());
    let queued = h.submit(make_spec("shell")).id;
    let task = h.call(|reply| Command::Cancel { id: queued, reason: String::new(), reply }).expect("cancel");
    assert_eq!(task.state, TaskState::Cancelled);

    let mut agent = h.connect("a", &["shell"], &[], 2);
    let polite = h.submit(make_spec("shell")).id;
    let stubborn = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments().len(), 2);
    for id in [polite, stubborn] {
        h.report(&agent, AgentReport::Accept(id, 1));
        let task = h.call(|reply| Command::Cancel { id, reason: "no longer needed".into(), reply }).expect("cancel");
        assert!(task.cancel_requested && task.state == TaskState::Running);
    }
    let cancels = agent.messages().into_iter().filter(|m| matches!(m, ToAgent::Cancel { .. })).count();
    assert_eq!(cancels, 2, "the handlers are told");
    h.report(&agent, AgentReport::Fail(polite, 1, Failure::new("cancelled", "stopped", false)));
    assert_eq!(h.task(polite).state, TaskState::Cancelled);
    assert_eq!(h.task(stubborn).state, TaskState::Running);
    h.advance(Duration::from_secs(6)).await;
    let task = h.task(stubborn);
    assert_eq!(task.state, TaskState::Cancelled, "recorded after the grace period regardless");
    assert_eq!(task.failure.map(|f| f.message), Some("no longer needed".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn not_before_holds_a_task_pending_until_its_time() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut spec = make_spec("shell");
    spec.not_before = Some(h.core.clock().ms(Instant::now()) + 60_000);
    let id = h.submit(spec).id;
    assert_eq!(h.task(id).state, TaskState::Pending);
    h.pass(&[&agent], Duration::from_secs(59)).await;
    assert!(agent.assignments().is_empty());
    h.pass(&[&agent], Duration::from_secs(2)).await;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_returns_the_existing_task() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("shell");
    spec.idempotency_key = Some("order-42".into());
    let created = h.submit_many(vec![spec.clone(), spec.clone()]).expect("submit");
    assert_eq!(created[0].0.id, created[1].0.id);
    assert_eq!((created[0].1, created[1].1), (false, true));
    let again = h.submit_many(vec![spec]).expect("submit");
    assert_eq!(again[0].0.id, created[0].0.id);
    assert!(again[0].1);
    assert_eq!(h.core.unfinished(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_output_over_the_limit_fails_the_attempt_for_good() {
    let mut config = make_config();
    config.limits.max_output_bytes = 4;
    let mut h = Harness::new(config);
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"too long"), String::new()));
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Rejected { error: Error::ResourceExhausted(_), .. })));
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert!(
        task.failure.is_some_and(|f| f.reason == reason::OUTPUT_TOO_LARGE && f.message.contains("max_output_bytes"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_queue_timeout_fails_a_task_nobody_picked_up() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("nobody");
    spec.queue_timeout = Some(Duration::from_secs(5));
    let id = h.submit(spec).id;
    h.advance(Duration::from_secs(6)).await;
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.failure.map(|f| f.reason), Some(reason::QUEUE_TIMEOUT.to_owned()));
}

#[tokio::test(start_paused = true)]
async fn draining_stops_new_assignments_and_resuming_restarts_them() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 2);
    let first = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(first, 1)]);
    let id = agent.id;
    let info = h.call(|reply| Command::SetDraining { id, draining: true, reply }).expect("drain");
    assert_eq!(info.state, AgentState::Draining);
    let second = h.submit(make_spec("shell")).id;
    assert!(agent.assignments().is_empty(), "a draining agent gets no new work");
    h.run(&agent, first, 1);
    assert_eq!(h.task(first).state, TaskState::Succeeded, "running work finishes");
    h.call(|reply| Command::SetDraining { id, draining: false, reply }).expect("resume");
    assert_eq!(agent.assignments(), vec![(second, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_restart_rebuilds_queues_and_gives_running_attempts_the_lease_to_resume() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let running = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(running, 1)]);
    h.report(&agent, AgentReport::Accept(running, 1));
    let queued = h.submit(make_spec("shell")).id;
    let last = h.store.last_sequence().expect("sequence");

    h.restart();
    let seen = h.events.len();
    assert_eq!(h.task(running).state, TaskState::Running);
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![(running, 1)]);
    assert_eq!(back.id, agent.id, "the session survives the restart");
    assert!(back.assignments().is_empty(), "its one slot is still busy");
    h.run(&back, running, 1);
    assert_eq!(back.assignments(), vec![(queued, 1)]);
    assert!(h.events[seen..].iter().all(|e| e.sequence > last), "sequence numbers keep increasing across a restart");

    // Without a resume, the attempt is lost after the lease.
    h.restart();
    h.advance(Duration::from_secs(11)).await;
    let task = h.task(queued);
    assert_eq!(task.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
    drop(h.dir);
}

#[tokio::test(start_paused = true)]
async fn too_many_unfinished_tasks_are_refused_whole() {
    let mut config = make_config();
    config.limits.max_unfinished_tasks = 2;
    let mut h = Harness::new(config);
    h.submit(make_spec("shell"));
    let result = h.submit_many(vec![make_spec("shell"), make_spec("shell")]);
    assert!(matches!(result, Err(Error::ResourceExhausted(ref m)) if m.contains("max_unfinished_tasks")));
    assert_eq!(h.core.unfinished(), 1, "nothing was half-written");
}

fn node(key: &str, capability: &str, deps: &[&str]) -> Submission {
    let mut spec = make_spec(capability);
    spec.key = Some(key.into());
    Submission { spec, depends_on: deps.iter().map(|d| d.to_string()).collect() }
}

/// Runs everything assigned to `agent` until nothing is left, returning the
/// order in which tasks completed.
fn run_all(h: &mut Harness, agent: &mut TestAgent) -> Vec<TaskId> {
    let mut done = Vec::new();
    loop {
        let assigned = agent.assignments();
        if assigned.is_empty() {
            return done;
        }
        for (id, attempt) in assigned {
            h.run(agent, id, attempt);
            done.push(id);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_diamond_runs_each_task_after_all_its_dependencies() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![
            node("d", "x", &["b", "c"]),
            node("b", "x", &["a"]),
            node("c", "x", &["a"]),
            node("a", "x", &[]),
        ])
        .expect("submit");
    assert!(outcome.workflow.is_some());
    let id = |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id);
    let (a, b, c, d) = (id("a").expect("a"), id("b").expect("b"), id("c").expect("c"), id("d").expect("d"));
    assert_eq!(h.task(d).spec.depends_on.len(), 2);
    let mut agent = h.connect("x", &["x"], &[], 4);
    let first = agent.assignments();
    assert_eq!(first, vec![(a, 1)], "only the root is ready");
    h.run(&agent, a, 1);
    let mut second: Vec<TaskId> = agent.assignments().into_iter().map(|(t, _)| t).collect();
    second.sort();
    let mut expected = vec![b, c];
    expected.sort();
    assert_eq!(second, expected);
    h.run(&agent, b, 1);
    assert!(agent.assignments().is_empty(), "d still waits for c");
    assert_eq!(h.explain(d), vec!["waiting_on_dependencies"]);
    h.run(&agent, c, 1);
    let last = agent.messages();
    let Some(ToAgent::Assign(task, parents)) = last.into_iter().find(|m| matches!(m, ToAgent::Assign(..))) else {
        panic!("d was not assigned");
    };
    assert_eq!(task.id, d);
    let mut keys: Vec<&str> = parents.iter().map(|p| p.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, vec!["b", "c"], "a child receives its parents' outputs by key");
    assert!(parents.iter().all(|p| p.output.as_ref() == b"ok"));
}

#[tokio::test(start_paused = true)]
async fn cycles_and_unknown_edges_are_rejected_with_their_names() {
    let mut h = Harness::new(make_config());
    let err = h
        .submit_graph(vec![node("a", "x", &["c"]), node("b", "x", &["a"]), node("c", "x", &["b"]), node("d", "x", &[])])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("tasks: dependency cycle:"), "{err}");
    for name in ["a", "b", "c"] {
        assert!(err.contains(name), "{err} names {name}");
    }
    let named = err.split("cycle:").nth(1).unwrap_or_default();
    assert!(!named.contains('d'), "{err} names only the cycle");
    let err = h.submit_graph(vec![node("a", "x", &["a"])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("dependency cycle: a -> a"), "{err}");
    let err = h.submit_graph(vec![node("a", "x", &["ghost"])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("tasks[0].depends_on[0]") && err.contains("'ghost'"), "{err}");
    let missing = TaskId(Ulid::new()).to_string();
    let err = h.submit_graph(vec![node("a", "x", &[&missing])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains(&missing) && err.contains("does not exist"), "{err}");
    let err =
        h.submit_graph(vec![node("a", "x", &[]), node("a", "x", &[])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("tasks[1].key"), "{err}");
    assert_eq!(h.core.unfinished(), 0, "nothing was half-written");
}

#[tokio::test(start_paused = true)]
async fn a_failure_cancels_exactly_its_transitive_dependents() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![
            node("a", "x", &[]),
            node("b", "x", &["a"]),
            node("c", "x", &["b"]),
            node("d", "x", &["a"]),
            node("e", "x", &[]),
            node("f", "x", &["e"]),
        ])
        .expect("submit");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 1);
    let first = agent.assignments();
    assert_eq!(first.len(), 1);
    let (a, e) = (id("a"), id("e"));
    // Whichever root came first, fail a and let e run.
    if first[0].0 == e {
        h.run(&agent, e, 1);
        agent.assignments();
    }
    h.report(&agent, AgentReport::Fail(a, 1, Failure::new("handler_error", "broken", false)));
    for k in ["b", "c", "d"] {
        let task = h.task(id(k));
        assert_eq!(task.state, TaskState::Cancelled, "{k}");
        assert_eq!(task.failure.map(|f| f.reason), Some(reason::UPSTREAM_FAILED.to_owned()), "{k}");
    }
    run_all(&mut h, &mut agent);
    assert_eq!(h.task(id("f")).state, TaskState::Succeeded, "the other branch is untouched");
    assert!(h.events.iter().any(|ev| ev.task_id == id("c") && ev.reason == reason::UPSTREAM_FAILED));
}

#[tokio::test(start_paused = true)]
async fn exclusive_and_shared_locks_never_overlap_wrongly() {
    let mut h = Harness::new(make_config());
    let mut exclusive = make_spec("x");
    exclusive.locks = vec![LockSpec { name: "repo".into(), mode: LockMode::Exclusive }];
    let mut shared = make_spec("x");
    shared.locks = vec![LockSpec { name: "repo".into(), mode: LockMode::Shared }];
    let w = h.submit(exclusive.clone()).id;
    let r1 = h.submit(shared.clone()).id;
    let r2 = h.submit(shared).id;
    let w2 = h.submit(exclusive).id;
    let mut agent = h.connect("x", &["x"], &[], 4);
    assert_eq!(agent.assignments(), vec![(w, 1)], "the writer holds the lock alone");
    assert_eq!(h.explain(r1), vec!["lock_held"]);
    h.run(&agent, w, 1);
    let mut readers: Vec<TaskId> = agent.assignments().into_iter().map(|(t, _)| t).collect();
    readers.sort();
    let mut expected = vec![r1, r2];
    expected.sort();
    assert_eq!(readers, expected, "shared holders run together");
    h.run(&agent, r1, 1);
    assert!(agent.assignments().is_empty(), "the second writer waits for every reader");
    h.run(&agent, r2, 1);
    assert_eq!(agent.assignments(), vec![(w2, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_key_caps_running_tasks() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("x");
    spec.concurrency = Some(ConcurrencySpec { key: "llm".into(), max: 2 });
    let ids: Vec<TaskId> = (0..5).map(|_| h.submit(spec.clone()).id).collect();
    let mut agent = h.connect("x", &["x"], &[], 5);
    let running = agent.assignments();
    assert_eq!(running.len(), 2);
    let waiting = ids.iter().find(|id| !running.iter().any(|(r, _)| r == *id)).copied().expect("a waiting task");
    assert_eq!(h.explain(waiting), vec!["concurrency_limit"]);
    h.run(&agent, running[0].0, 1);
    assert_eq!(agent.assignments().len(), 1, "one finished, one more starts");
    h.report(&agent, AgentReport::Fail(running[1].0, 1, Failure::new("handler_error", "x", false)));
    assert_eq!(agent.assignments().len(), 1, "a failure frees the key too");
}

#[tokio::test(start_paused = true)]
async fn a_paused_queue_dispatches_nothing_and_resumes_cleanly() {
    let mut h = Harness::new(make_config());
    h.set_queue("batch", super::QueueChange { paused: Some(true), ..Default::default() });
    let mut spec = make_spec("x");
    spec.queue = "batch".into();
    let id = h.submit(spec).id;
    let other = h.submit(make_spec("x")).id;
    let mut agent = h.connect("x", &["x"], &[], 2);
    assert_eq!(agent.assignments(), vec![(other, 1)], "only the default queue dispatches");
    assert_eq!(h.explain(id), vec!["queue_paused"]);
    h.restart();
    let mut agent2 = h.connect_with("x", &["x"], &[], 2, Some(agent.token.clone()), vec![(other, 1)]);
    assert!(agent2.assignments().is_empty(), "the pause survives a restart");
    h.set_queue("batch", super::QueueChange { paused: Some(false), ..Default::default() });
    assert_eq!(agent2.assignments(), vec![(id, 1)]);
}

#[tokio::test(start_paused = true)]
async fn weighted_queues_share_a_saturated_agent_by_weight() {
    let mut h = Harness::new(make_config());
    h.set_queue("light", super::QueueChange { weight: Some(1), ..Default::default() });
    h.set_queue("heavy", super::QueueChange { weight: Some(3), ..Default::default() });
    let mut queue_of = std::collections::HashMap::new();
    for _ in 0..40 {
        for q in ["light", "heavy"] {
            let mut spec = make_spec("x");
            spec.queue = q.into();
            queue_of.insert(h.submit(spec).id, q);
        }
    }
    let mut agent = h.connect("x", &["x"], &[], 1);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..40 {
        let (id, attempt) = agent.assignments()[0];
        *counts.entry(queue_of[&id]).or_insert(0) += 1;
        h.run(&agent, id, attempt);
    }
    assert_eq!((counts.get("light"), counts.get("heavy")), (Some(&10), Some(&30)), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn explain_names_the_agent_side_reasons() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("gpu");
    spec.selector.insert("gpu".into(), "a100".into());
    let id = h.submit(spec).id;
    assert_eq!(h.explain(id), vec!["no_agent_with_capability"]);
    let _cpu = h.connect("cpu", &["gpu"], &[("gpu", "none")], 1);
    let explanation = h.call(|reply| Command::Explain { id, reply }).expect("explain");
    assert_eq!(explanation.reasons[0].code, "no_agent_matches_selector");
    assert!(explanation.reasons[0].agents[0].contains("gpu=a100 (has gpu=none)"), "{:?}", explanation.reasons);
    let mut busy = h.connect("busy", &["gpu"], &[("gpu", "a100")], 1);
    let mut filler = make_spec("gpu");
    filler.selector.insert("gpu".into(), "a100".into());
    filler.priority = Priority::Critical;
    // The matching agent takes one task; the next one waits for its slot.
    let assigned = busy.assignments();
    assert_eq!(assigned, vec![(id, 1)]);
    let second = h.submit(filler).id;
    assert_eq!(h.explain(second), vec!["all_capable_agents_busy"]);
    assert_eq!(h.explain(id), vec!["running"]);

    let mut later = make_spec("gpu");
    later.not_before = Some(h.core.clock().ms(Instant::now()) + 60_000);
    let later = h.submit(later).id;
    assert_eq!(h.explain(later), vec!["not_before"]);
    h.report(&busy, AgentReport::Fail(id, 1, Failure::new("handler_error", "oops", true)));
    assert_eq!(h.explain(id), vec!["retry_backoff"]);
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_workflow_rebuilds_dependencies_locks_and_concurrency() {
    let mut h = Harness::new(make_config());
    let mut first = node("first", "x", &[]);
    first.spec.locks = vec![LockSpec { name: "db".into(), mode: LockMode::Exclusive }];
    first.spec.concurrency = Some(ConcurrencySpec { key: "k".into(), max: 1 });
    let mut rival = node("rival", "x", &[]);
    rival.spec.locks = vec![LockSpec { name: "db".into(), mode: LockMode::Exclusive }];
    let mut sibling = node("sibling", "x", &[]);
    sibling.spec.concurrency = Some(ConcurrencySpec { key: "k".into(), max: 1 });
    let child = node("child", "x", &["first"]);
    let outcome = h.submit_graph(vec![first, rival, sibling, child]).expect("submit");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 4);
    let assigned = agent.assignments();
    assert_eq!(assigned, vec![(id("first"), 1)], "the lock and the key hold the others back");
    h.report(&agent, AgentReport::Accept(id("first"), 1));

    h.restart();
    let mut back = h.connect_with("x", &["x"], &[], 4, Some(agent.token.clone()), vec![(id("first"), 1)]);
    assert!(back.assignments().is_empty(), "the lock and the concurrency count survive the restart");
    let reasons = h.explain(id("rival"));
    assert_eq!(reasons, vec!["lock_held"]);
    assert_eq!(h.explain(id("sibling")), vec!["concurrency_limit"]);
    assert_eq!(h.explain(id("child")), vec!["waiting_on_dependencies"]);
    h.run(&back, id("first"), 1);
    let mut next: Vec<TaskId> = back.assignments().into_iter().map(|(t, _)| t).collect();
    next.sort();
    let mut expected = vec![id("rival"), id("sibling"), id("child")];
    expected.sort();
    assert_eq!(next, expected);
}

#[tokio::test(start_paused = true)]
async fn a_queue_maximum_caps_its_running_tasks() {
    let mut h = Harness::new(make_config());
    h.set_queue("narrow", super::QueueChange { max_running: Some(1), ..Default::default() });
    let mut spec = make_spec("x");
    spec.queue = "narrow".into();
    let first = h.submit(spec.clone()).id;
    let second = h.submit(spec).id;
    let mut agent = h.connect("x", &["x"], &[], 4);
    assert_eq!(agent.assignments(), vec![(first, 1)]);
    assert_eq!(h.explain(second), vec!["queue_at_max_running"]);
    let queues = h.call(|reply| Command::ListQueues { reply }).expect("list queues");
    let narrow = queues.iter().find(|q| q.record.name == "narrow").expect("narrow listed");
    assert_eq!((narrow.running, narrow.depth.get("QUEUED").copied()), (1, Some(1)));
    h.run(&agent, first, 1);
    assert_eq!(agent.assignments(), vec![(second, 1)]);
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_workflow_cancels_every_unfinished_task() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![node("a", "x", &[]), node("b", "x", &["a"]), node("c", "x", &[]), node("d", "x", &["c"])])
        .expect("submit");
    let workflow = outcome.workflow.expect("a workflow");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 1);
    let (first, _) = agent.assignments()[0];
    h.run(&agent, first, 1);
    agent.messages();
    let cancelled = h
        .call(|reply| Command::CancelWorkflow { id: workflow, reason: "abandoned".into(), reply })
        .expect("cancel workflow");
    assert!(!cancelled.is_empty());
    for k in ["a", "b", "c", "d"] {
        let state = h.task(id(k)).state;
        if id(k) == first {
            assert_eq!(state, TaskState::Succeeded, "{k} had finished");
        } else {
            assert!(
                matches!(state, TaskState::Cancelled | TaskState::Assigned | TaskState::Running),
                "{k} is {state:?}"
            );
        }
    }
    // A running task is cancelled in two phases; its handler is told.
    h.advance(Duration::from_secs(6)).await;
    for k in ["a", "b", "c", "d"] {
        assert!(h.task(id(k)).state.is_terminal(), "{k} finished");
    }
}
