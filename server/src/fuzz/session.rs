//! Agent sessions: arbitrary sequences of agent messages (well-formed or
//! not, for attempts they hold or not), log lines, disconnects, resumes,
//! cancels, retries and the passing of time, fed to the scheduler core and
//! the log hub as the session handler feeds them. Nothing panics, and the
//! fencing invariants hold after every step: attempt numbers only grow, a
//! finished task stays finished unless retried, and no agent holds more
//! attempts than it has slots.

use std::collections::{BTreeMap, HashMap, HashSet};

use muster_proto::pb;
use proptest::prelude::*;

use super::*;
use crate::config::ServerConfig;
use crate::grpc::convert;
use crate::model::*;
use crate::scheduler::{Command, ToAgent};
use crate::store::Store;

const AGENTS: usize = 3;
const SLOTS: u32 = 2;

/// An attempt reference as the test draws it: one of the tasks submitted
/// so far (by index), or text that is no task at all.
#[derive(Clone, Debug)]
pub(super) enum Target {
    Task(prop::sample::Index, u32),
    Garbage(String),
}

#[derive(Clone, Debug)]
enum Step {
    /// A message from an agent, its attempt reference replaced by `target`.
    Message(usize, pb::AgentMessage, Target),
    /// A well-formed report for one of the attempts the agent holds:
    /// accept, progress, complete or fail (retryable or not).
    Work(usize, prop::sample::Index, u8),
    /// Log lines from an agent for `target`.
    Log(usize, Target, Vec<pb::LogLine>, u64),
    Advance(Duration),
    Disconnect(usize),
    Resume(usize, Vec<Target>),
    Cancel(prop::sample::Index),
    Retry(prop::sample::Index),
    Submit(u32, Option<u64>, bool),
}

pub(super) fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), prop_oneof![0u32..4, edgy_u32()]).prop_map(|(i, a)| Target::Task(i, a)),
        1 => text(30).prop_map(Target::Garbage),
    ]
}

pub(super) fn log_line() -> impl Strategy<Value = pb::LogLine> {
    (pb_timestamp(), prop_oneof![0..4i32, any::<i32>()], text(200)).prop_map(|(time, stream, text)| pb::LogLine {
        time,
        stream,
        text,
    })
}

fn step() -> impl Strategy<Value = Step> {
    let agent = 0..AGENTS;
    prop_oneof![
        3 => (agent.clone(), super::wire::agent_message(), target()).prop_map(|(a, m, t)| Step::Message(a, m, t)),
        8 => (agent.clone(), any::<prop::sample::Index>(), 0u8..5).prop_map(|(a, i, kind)| Step::Work(a, i, kind)),
        2 => (agent.clone(), target(), proptest::collection::vec(log_line(), 0..6), edgy_u64())
            .prop_map(|(a, t, lines, dropped)| Step::Log(a, t, lines, dropped)),
        3 => prop_oneof![0u64..3, 0u64..120, Just(400 * 24 * 3600)].prop_map(|s| Step::Advance(Duration::from_secs(s))),
        1 => agent.clone().prop_map(Step::Disconnect),
        1 => (agent, proptest::collection::vec(target(), 0..3)).prop_map(|(a, held)| Step::Resume(a, held)),
        1 => any::<prop::sample::Index>().prop_map(Step::Cancel),
        1 => any::<prop::sample::Index>().prop_map(Step::Retry),
        2 => (1u32..4, proptest::option::of(0u64..600_000), any::<bool>()).prop_map(|(m, q, b)| Step::Submit(m, q, b)),
    ]
}

/// A session's queue, as the agent handler makes it for a registration.
fn session_queue() -> (crate::scheduler::AgentTx, crate::scheduler::AgentRx) {
    crate::scheduler::session_queue(crate::config::Limits::default().max_session_queue)
}

/// One agent as its session handler sees it.
struct Agent {
    id: AgentId,
    conn: u64,
    token: String,
    rx: Option<crate::scheduler::AgentRx>,
    /// Attempts it may send log lines for (what the forwarder granted).
    granted: HashSet<(TaskId, u32)>,
}

struct World {
    harness: Harness,
    agents: Vec<Agent>,
    tasks: Vec<TaskId>,
    /// The greatest attempt number seen per task.
    attempts: HashMap<TaskId, u32>,
    /// Tasks seen finished, and whether a retry was accepted since.
    finished: HashSet<TaskId>,
}

fn registration(name: &str, token: Option<String>, held: Vec<(TaskId, u32)>) -> Registration {
    Registration {
        name: name.into(),
        capabilities: vec!["work".into()],
        labels: BTreeMap::new(),
        slots: SLOTS,
        sdk_version: String::new(),
        resume_token: token,
        held_attempts: held,
        metrics_address: String::new(),
        identity: String::new(),
    }
}

impl World {
    fn new() -> Self {
        let config = ServerConfig {
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            cancel_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let mut world = Self {
            harness: Harness::new(config),
            agents: Vec::new(),
            tasks: Vec::new(),
            attempts: HashMap::new(),
            finished: HashSet::new(),
        };
        for i in 0..AGENTS {
            let (tx, rx) = session_queue();
            let registration = registration(&format!("agent-{i}"), None, Vec::new());
            let (id, conn) = world
                .harness
                .call(|reply| Command::Register { registration, tx, reply })
                .expect("a fresh registration");
            world.agents.push(Agent { id, conn, token: String::new(), rx: Some(rx), granted: HashSet::new() });
        }
        world.read_inboxes();
        world
    }

    fn resolve(&self, target: &Target) -> Option<pb::AttemptRef> {
        match target {
            Target::Task(_, _) if self.tasks.is_empty() => None,
            Target::Task(i, attempt) => {
                Some(pb::AttemptRef { task_id: self.tasks[i.index(self.tasks.len())].to_string(), attempt: *attempt })
            }
            Target::Garbage(text) => Some(pb::AttemptRef { task_id: text.clone(), attempt: 1 }),
        }
    }

    /// What each forwarder does with the scheduler's messages: grants log
    /// lines for assignments, remembers resume tokens, closes on `Close`.
    fn read_inboxes(&mut self) {
        for agent in &mut self.agents {
            let Some(rx) = agent.rx.as_mut() else { continue };
            let mut closed = false;
            while let Ok(message) = rx.try_recv() {
                match message {
                    ToAgent::Registered { resume_token, dropped, .. } => {
                        agent.token = resume_token;
                        for attempt in dropped {
                            agent.granted.remove(&attempt);
                        }
                    }
                    ToAgent::Assign(task, _) => {
                        agent.granted.insert((task.id, task.attempt));
                    }
                    ToAgent::Close(_) => closed = true,
                    _ => {}
                }
            }
            if closed {
                agent.rx = None;
                agent.granted.clear();
            }
        }
    }

    fn disconnect(&mut self, i: usize) {
        let agent = &mut self.agents[i];
        if agent.rx.take().is_some() {
            agent.granted.clear();
            let (id, conn) = (agent.id, agent.conn);
            self.harness.handle(Command::Disconnected { agent: id, conn });
        }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Message(i, mut message, target) => {
                if self.agents[i].rx.is_none() {
                    return;
                }
                retarget(&mut message, self.resolve(&target));
                match convert::report(message, &self.harness.config) {
                    Ok(report) => {
                        if let AgentReport::Complete(task, attempt, ..) | AgentReport::Fail(task, attempt, _) = &report
                        {
                            self.agents[i].granted.remove(&(*task, *attempt));
                        }
                        let (agent, conn) = (self.agents[i].id, self.agents[i].conn);
                        self.harness.handle(Command::Report { agent, conn, report });
                    }
                    // A malformed message ends the session.
                    Err(_) => self.disconnect(i),
                }
            }
            Step::Work(i, pick, kind) => {
                let mut held: Vec<(TaskId, u32)> = self.agents[i].granted.iter().copied().collect();
                if held.is_empty() {
                    return;
                }
                held.sort();
                let (task, attempt) = held[pick.index(held.len())];
                let report = match kind {
                    0 => AgentReport::Accept(task, attempt),
                    1 => AgentReport::Progress(task, attempt, 50, "halfway".into()),
                    2 => AgentReport::Complete(task, attempt, bytes::Bytes::from_static(b"done"), String::new()),
                    kind => AgentReport::Fail(task, attempt, Failure::new("handler_error", "failed", kind == 3)),
                };
                if matches!(report, AgentReport::Complete(..) | AgentReport::Fail(..)) {
                    self.agents[i].granted.remove(&(task, attempt));
                }
                let (agent, conn) = (self.agents[i].id, self.agents[i].conn);
                self.harness.handle(Command::Report { agent, conn, report });
            }
            Step::Log(i, target, lines, dropped) => {
                let Some(r) = self.resolve(&target) else { return };
                let Ok((task, attempt)) = convert::attempt_ref("log.attempt", Some(r)) else { return };
                if self.agents[i].granted.contains(&(task, attempt)) {
                    let lines = convert::log_lines(lines, &self.harness.config.limits, crate::model::now_ms());
                    let _ = self.harness.logs.append(task, attempt, lines, dropped.min(1 << 40));
                }
                if let Ok(read) = self.harness.logs.read(task, attempt, 0) {
                    let positions: Vec<u64> = read.lines.iter().map(|l| l.position).collect();
                    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions grow: {positions:?}");
                    assert!(read.lines.iter().all(|l| l.at <= crate::validate::LAST_TIMESTAMP_MS));
                }
            }
            Step::Advance(by) => self.harness.advance(by),
            Step::Disconnect(i) => self.disconnect(i),
            Step::Resume(i, held) => {
                self.disconnect(i);
                let held = held
                    .iter()
                    .filter_map(|t| self.resolve(t))
                    .filter_map(|r| convert::attempt_ref("held", Some(r)).ok())
                    .collect::<Vec<_>>();
                let agent = &self.agents[i];
                let registration = registration(&format!("agent-{i}"), Some(agent.token.clone()), held.clone());
                let (tx, rx) = session_queue();
                if let Ok((id, conn)) = self.harness.call(|reply| Command::Register { registration, tx, reply }) {
                    let agent = &mut self.agents[i];
                    agent.id = id;
                    agent.conn = conn;
                    agent.rx = Some(rx);
                    agent.granted = held.into_iter().collect();
                }
            }
            Step::Cancel(i) if !self.tasks.is_empty() => {
                let id = self.tasks[i.index(self.tasks.len())];
                let _ = self.harness.call(|reply| Command::Cancel { id, reason: "fuzz".into(), reply });
            }
            Step::Retry(i) if !self.tasks.is_empty() => {
                let id = self.tasks[i.index(self.tasks.len())];
                if self.harness.call(|reply| Command::Retry { id, reply }).is_ok() {
                    self.finished.remove(&id);
                }
            }
            Step::Cancel(_) | Step::Retry(_) => {}
            Step::Submit(max_attempts, queue_timeout_ms, short_timeout) => {
                let spec = pb::TaskSpec {
                    capability: "work".into(),
                    timeout: Some(convert::duration(Duration::from_secs(if short_timeout { 1 } else { 60 }))),
                    queue_timeout: queue_timeout_ms.map(|ms| convert::duration(Duration::from_millis(ms))),
                    retry: Some(pb::RetryPolicy { max_attempts, ..Default::default() }),
                    ..Default::default()
                };
                let submission = convert::submission(spec, &self.harness.config).expect("a valid spec");
                let submissions = vec![submission];
                let outcome = self.harness.call(|reply| Command::Submit { submissions, reply }).expect("submit");
                self.tasks.extend(outcome.tasks.iter().map(|(task, _)| task.id));
            }
        }
        self.read_inboxes();
    }

    /// The fencing invariants, checked against the store.
    fn check(&mut self) -> Result<(), TestCaseError> {
        for id in self.tasks.clone() {
            let task = self.harness.store.task(id).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let Some(task) = task else { return Err(TestCaseError::fail(format!("task {id} is not stored"))) };
            let seen = self.attempts.entry(id).or_default();
            prop_assert!(task.attempt >= *seen, "task {} went from attempt {} back to {}", id, seen, task.attempt);
            *seen = task.attempt;
            if self.finished.contains(&id) {
                prop_assert!(task.state.is_terminal(), "finished task {} came back as {:?}", id, task.state);
            }
            if task.state.is_terminal() {
                self.finished.insert(id);
            }
        }
        let agents = self.harness.call(|reply| Command::ListAgents { capability: None, reply });
        for agent in agents.map_err(|e| TestCaseError::fail(e.to_string()))? {
            prop_assert!(agent.running.len() <= SLOTS as usize, "{} holds {:?}", agent.record.name, agent.running);
        }
        Ok(())
    }
}

/// Points the message's attempt reference at `target`.
fn retarget(message: &mut pb::AgentMessage, target: Option<pb::AttemptRef>) {
    use pb::agent_message::Msg;
    let slot = match message.msg.as_mut() {
        Some(Msg::Accept(m)) => &mut m.attempt,
        Some(Msg::Progress(m)) => &mut m.attempt,
        Some(Msg::Complete(m)) => &mut m.attempt,
        Some(Msg::Fail(m)) => &mut m.attempt,
        Some(Msg::Log(m)) => &mut m.attempt,
        _ => return,
    };
    *slot = target;
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn arbitrary_agent_sessions_never_panic_and_keep_fencing(
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let mut world = World::new();
        for step in steps {
            world.apply(step);
            world.check()?;
        }
    }
}
