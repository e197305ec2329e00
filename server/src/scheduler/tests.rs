//! The scheduler's semantics, driven directly with paused Tokio time over a
//! real sled store and the real store writer: leases, backoff, timeouts,
//! fencing, cancel, restart, workflows and resources. The harness plays the
//! driver's part (timers, dispatch, then the writer's group commit) one
//! turn at a time, so each test decides exactly when time passes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use super::driver::Writer;
use super::engine::Core;
use super::{Command, Outbox, ToAgent};
use crate::config::{Durability, ServerConfig};
use crate::error::Error;
use crate::logs::LogHub;
use crate::model::*;
use crate::store::{SledStore, Store};

mod budgets;
mod lifecycle;
mod retention;
mod workflows;

struct Harness {
    core: Core,
    store: Arc<SledStore>,
    config: Arc<ServerConfig>,
    writer: Writer,
    /// What the writer published, drained into `events` after each commit.
    published: broadcast::Receiver<TaskEvent>,
    events: Vec<TaskEvent>,
    /// Kept open so the log hub can report ended attempts.
    _ended: tokio::sync::mpsc::UnboundedReceiver<crate::logs::Ended>,
    dir: tempfile::TempDir,
}

struct TestAgent {
    id: AgentId,
    conn: u64,
    token: String,
    rx: super::AgentRx,
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
        payload: bytes::Bytes::from_static(b"{}"),
        timeout: Duration::from_secs(60),
        retry: RetryPolicy { max_backoff: Duration::from_secs(8), ..RetryPolicy::default() },
        ..TaskSpec::new(capability)
    }
}

impl Harness {
    fn new(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SledStore::open(dir.path(), None).expect("open store"));
        let config = Arc::new(ServerConfig { durability: Durability::Sync, ..config });
        let core = Core::recover(config.clone(), store.clone(), Instant::now()).expect("recover");
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let (logs, ended) = LogHub::new(store.clone(), &config.limits, metrics.clone());
        let (events, published) = broadcast::channel(1 << 16);
        let writer = Writer::new(store.clone(), config.durability, events, metrics, Arc::new(logs));
        Self { core, store, config, writer, published, events: Vec::new(), _ended: ended, dir }
    }

    /// Simulates a restart: a new core recovered from the same store.
    fn restart(&mut self) {
        self.core = Core::recover(self.config.clone(), self.store.clone(), Instant::now()).expect("recover");
        self.settle();
    }

    /// What the driver does after each turn: timers, dispatch, then the
    /// outbox handed to the writer.
    fn settle(&mut self) {
        let now = Instant::now();
        self.core.fire_timers(now);
        self.core.dispatch(now);
        let out = self.core.take_outbox();
        self.commit(vec![out]);
    }

    /// One group commit of `batch` by the real writer; what it published
    /// joins `events`.
    fn commit(&mut self, batch: Vec<Outbox>) {
        self.writer.commit(batch).expect("commit");
        while let Ok(event) = self.published.try_recv() {
            self.events.push(event);
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
        let (tx, mut rx) = super::session_queue(1 << 16);
        let registration = Registration {
            name: name.into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            slots,
            sdk_version: "test".into(),
            resume_token,
            held_attempts,
            metrics_address: String::new(),
            identity: String::new(),
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
