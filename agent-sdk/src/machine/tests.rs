//! The agent's rules driven step by step with explicit instants: dialling
//! and backoff, the lease and self-fencing, the drain, the resends after a
//! registration. No network, no clock, no sleeps.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::*;
use crate::Credentials;
use crate::backoff::backoff_ceiling;
use crate::context::{Output, TaskError};
use crate::drain::{CANCEL_WAIT, FLUSH_WAIT};
use crate::logs::LogSink;

const MS: Duration = Duration::from_millis(1);
const GRACE: Duration = Duration::from_secs(30);
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A machine under test with its clock.
struct Harness {
    machine: Machine,
    now: Instant,
    _log_rx: mpsc::Receiver<AttemptKey>,
}

fn make_settings() -> Settings {
    Settings {
        name: "test-agent".to_owned(),
        endpoints: vec!["http://a:7070".to_owned(), "http://b:7070".to_owned()],
        capabilities: vec!["echo".to_owned()],
        labels: HashMap::new(),
        slots: 2,
        metrics_address: String::new(),
        drain_grace: GRACE,
        backoff_initial: BACKOFF_INITIAL,
        backoff_max: BACKOFF_MAX,
        credentials: Credentials::default(),
    }
}

impl Harness {
    fn new() -> Self {
        let (log_tx, log_rx) = mpsc::channel(16);
        let metrics = AgentMetrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
        let now = Instant::now();
        Self { machine: Machine::new(make_settings(), metrics, log_tx, now), now, _log_rx: log_rx }
    }

    fn step(&mut self, event: Event) -> Vec<Action> {
        self.machine.step(event, self.now).unwrap_or_else(|e| panic!("step failed: {e}"))
    }

    /// Moves the clock to `at` and ticks.
    fn tick_at(&mut self, at: Instant) -> Vec<Action> {
        self.now = at;
        self.step(Event::Tick)
    }

    /// Ticks at every wakeup the machine asks for until `until`, collecting
    /// the actions.
    fn run_until(&mut self, until: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        loop {
            let wakeup = self.machine.next_wakeup();
            if wakeup > until {
                actions.extend(self.tick_at(until));
                return actions;
            }
            actions.extend(self.tick_at(wakeup.max(self.now)));
        }
    }

    /// Dials and registers with `heartbeat` and `lease`; returns the
    /// `Register` sent.
    fn connect(&mut self, heartbeat: Duration, lease: Duration) -> proto::Register {
        let register = self.dial();
        self.step(Event::Registered(registered(heartbeat, lease)));
        register
    }

    /// Ticks until the machine dials and returns the `Register`.
    fn dial(&mut self) -> proto::Register {
        for _ in 0..100 {
            let wakeup = self.machine.next_wakeup().max(self.now);
            for action in self.tick_at(wakeup) {
                if let Action::Dial { register, .. } = action {
                    return register;
                }
            }
        }
        panic!("the machine never dialled");
    }

    fn assign(&mut self, task_id: &str) -> (CancellationToken, LogSink) {
        let assignment = proto::Assignment {
            attempt: Some(proto::AttemptRef::new(task_id, 1)),
            capability: "echo".to_owned(),
            ..proto::Assignment::default()
        };
        let actions = self.step(Event::Message(Some(server_message::Msg::Assign(assignment))));
        actions
            .into_iter()
            .find_map(|action| match action {
                Action::Start(start) => Some((start.token, start.logs)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{task_id} was not started"))
    }

    fn end(&mut self, task_id: &str, outcome: HandlerOutcome) -> Vec<Action> {
        self.step(Event::HandlerEnded((task_id.to_owned(), 1), outcome))
    }

    fn server(&mut self, msg: server_message::Msg) -> Vec<Action> {
        self.step(Event::Message(Some(msg)))
    }
}

fn registered(heartbeat: Duration, lease: Duration) -> proto::Registered {
    proto::Registered {
        agent_id: "agent-1".to_owned(),
        resume_token: "resume-1".to_owned(),
        resumed: false,
        heartbeat_interval: prost_types::Duration::try_from(heartbeat).ok(),
        lease_ttl: prost_types::Duration::try_from(lease).ok(),
        dropped_attempts: Vec::new(),
    }
}

fn ack(task_id: &str) -> server_message::Msg {
    server_message::Msg::Ack(proto::Ack { attempt: Some(proto::AttemptRef::new(task_id, 1)) })
}

/// The messages among `actions`.
fn sent(actions: &[Action]) -> Vec<&Msg> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(msg) => Some(msg),
            _ => None,
        })
        .collect()
}

fn failure_of(actions: &[Action]) -> Option<proto::Failure> {
    sent(actions).into_iter().find_map(|msg| match msg {
        Msg::Fail(fail) => fail.failure.clone(),
        _ => None,
    })
}

fn dialled(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|action| match action {
        Action::Dial { endpoint, .. } => Some(endpoint.as_str()),
        _ => None,
    })
}

#[test]
fn the_first_step_dials_the_first_endpoint_with_a_fresh_register() {
    let mut harness = Harness::new();
    let actions = harness.step(Event::Tick);
    assert_eq!(dialled(&actions), Some("http://a:7070"));
    match actions.first() {
        Some(Action::Dial { register, .. }) => {
            assert_eq!(register.name, "test-agent");
            assert_eq!(register.capabilities, ["echo"]);
            assert!(register.resume_token.is_empty() && register.held_attempts.is_empty());
        }
        other => panic!("expected a dial, got {other:?}"),
    }
    assert!(harness.step(Event::Tick).is_empty(), "one dial at a time");
}

#[test]
fn failed_dials_back_off_within_the_doubling_ceiling_and_move_through_the_list() {
    let mut harness = Harness::new();
    harness.step(Event::Tick);
    let mut endpoints = Vec::new();
    for failures in 1..=6 {
        let dial_failed = Event::DialFailed { error: Error::Status(Status::unavailable("down")), redirect: None };
        let failed_at = harness.now;
        let ceiling = backoff_ceiling(failures, BACKOFF_INITIAL, BACKOFF_MAX);
        let mut actions = harness.step(dial_failed);
        assert!(harness.machine.next_wakeup() - failed_at <= ceiling, "failure {failures}");
        actions.extend(harness.run_until(failed_at + ceiling));
        endpoints.push(dialled(&actions).map(str::to_owned));
    }
    let expected: Vec<Option<String>> =
        ["b", "a", "b", "a", "b", "a"].iter().map(|e| Some(format!("http://{e}:7070"))).collect();
    assert_eq!(endpoints, expected);
}

#[test]
fn a_refused_first_registration_stops_the_agent() {
    let mut harness = Harness::new();
    harness.step(Event::Tick);
    let refused = Event::DialFailed { error: Error::Status(Status::permission_denied("no")), redirect: None };
    assert!(matches!(harness.machine.step(refused, harness.now), Err(Error::Status(_))));
}

#[test]
fn heartbeats_go_out_once_per_interval_while_connected() {
    let mut harness = Harness::new();
    harness.connect(100 * MS, Duration::from_secs(30));
    let start = harness.now;
    let actions = harness.run_until(start + 350 * MS);
    let heartbeats = sent(&actions).iter().filter(|msg| matches!(msg, Msg::Heartbeat(_))).count();
    assert_eq!(heartbeats, 3);
    harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    let actions = harness.tick_at(start + Duration::from_secs(1));
    assert!(sent(&actions).is_empty(), "no heartbeats while disconnected: {actions:?}");
}

#[test]
fn a_silent_stream_is_dropped_and_the_expired_lease_fences_the_held_work() {
    let mut harness = Harness::new();
    let lease = 600 * MS;
    harness.connect(200 * MS, lease);
    let registered_at = harness.now;
    let (token, _logs) = harness.assign("t1");

    // Stale after max(2 × 200 ms, 600 ms / 2) = 400 ms of silence, found by
    // the check every 60 ms: the stream is dropped and redialled, still
    // holding the attempt.
    let actions = harness.run_until(registered_at + 399 * MS);
    assert!(!actions.iter().any(|a| matches!(a, Action::Disconnect)), "{actions:?}");
    let actions = harness.run_until(registered_at + 460 * MS);
    assert!(actions.iter().any(|a| matches!(a, Action::Disconnect)), "{actions:?}");
    assert!(!harness.machine.is_connected());
    assert!(!token.is_cancelled(), "the lease has not run out yet");
    // The redial may already be in the same actions, after the backoff.
    let register = actions
        .into_iter()
        .find_map(|action| match action {
            Action::Dial { register, .. } => Some(register),
            _ => None,
        })
        .unwrap_or_else(|| harness.dial());
    assert_eq!(register.held_attempts, [proto::AttemptRef::new("t1", 1)]);
    assert_eq!(register.resume_token, "resume-1");

    // Still no answer: at the TTL the agent fences itself.
    harness.run_until(registered_at + lease - MS);
    assert!(!token.is_cancelled());
    harness.run_until(registered_at + lease + 60 * MS);
    assert!(token.is_cancelled(), "fenced within one check of the TTL");

    // The handler's result is dropped, now and after registering again.
    let actions = harness.end("t1", HandlerOutcome::Returned(Err(TaskError::retryable("stopped"))));
    assert!(sent(&actions).is_empty());
    let actions = harness.step(Event::Registered(registered(200 * MS, lease)));
    assert!(sent(&actions).is_empty(), "{actions:?}");
    assert_eq!(harness.machine.unacked_count(), 0);
}

#[test]
fn messages_from_the_server_keep_the_lease() {
    let mut harness = Harness::new();
    harness.connect(200 * MS, 600 * MS);
    let (token, _logs) = harness.assign("t1");
    let start = harness.now;
    for i in 1..=20 {
        harness.run_until(start + i * 100 * MS);
        harness.server(server_message::Msg::Heartbeat(proto::Heartbeat {}));
    }
    assert!(harness.machine.is_connected());
    assert!(!token.is_cancelled());
}

#[test]
fn drain_waits_the_grace_then_cancels_and_reports_the_work_retryable() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    let (token, _logs) = harness.assign("t1");
    let draining_at = harness.now;
    let actions = harness.step(Event::Shutdown);
    assert!(matches!(sent(&actions).as_slice(), [Msg::Drain(_)]));

    harness.run_until(draining_at + GRACE - MS);
    assert!(!token.is_cancelled(), "running work gets the whole grace");
    harness.run_until(draining_at + GRACE);
    assert!(token.is_cancelled());

    let actions = harness.end("t1", HandlerOutcome::Returned(Err(TaskError::retryable("stopped"))));
    let failure = failure_of(&actions).unwrap_or_default();
    assert_eq!((failure.reason.as_str(), failure.retryable), ("agent_shutdown", true));
    assert!(!harness.machine.is_done(), "waiting for the ack");
    harness.server(ack("t1"));
    assert!(harness.machine.is_done());
}

#[test]
fn handlers_ignoring_cancellation_are_abandoned_and_unacked_results_wait_for_the_flush() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    harness.assign("t1");
    harness.assign("t2");
    harness.end("t2", HandlerOutcome::Returned(Ok(Output::empty())));
    let draining_at = harness.now;
    harness.step(Event::Shutdown);

    let actions = harness.run_until(draining_at + GRACE + CANCEL_WAIT - MS);
    assert!(!actions.iter().any(|a| matches!(a, Action::AbortHandlers)));
    let actions = harness.run_until(draining_at + GRACE + CANCEL_WAIT);
    assert!(actions.iter().any(|a| matches!(a, Action::AbortHandlers)));
    assert_eq!(harness.machine.running_count(), 0);

    // t2's result is never acknowledged: the agent stops at the deadline.
    harness.run_until(draining_at + GRACE + CANCEL_WAIT + FLUSH_WAIT - MS);
    assert!(!harness.machine.is_done());
    harness.run_until(draining_at + GRACE + CANCEL_WAIT + FLUSH_WAIT);
    assert!(harness.machine.is_done());
    assert_eq!(harness.machine.unacked_count(), 1);
}

#[test]
fn a_draining_agent_says_so_again_after_reconnecting() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    harness.assign("t1");
    harness.step(Event::Shutdown);
    harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    harness.dial();
    let actions = harness.step(Event::Registered(registered(Duration::from_secs(10), Duration::from_secs(3600))));
    assert!(sent(&actions).iter().any(|msg| matches!(msg, Msg::Drain(_))), "{actions:?}");
}

#[test]
fn results_are_resent_after_every_registration_until_acknowledged() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    harness.assign("t1");
    harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    let actions = harness.end("t1", HandlerOutcome::Returned(Ok(Output::from("x"))));
    assert!(sent(&actions).is_empty(), "disconnected");
    for _ in 0..2 {
        let register = harness.dial();
        assert_eq!(register.held_attempts, [proto::AttemptRef::new("t1", 1)]);
        let actions = harness.step(Event::Registered(registered(Duration::from_secs(10), Duration::from_secs(3600))));
        assert!(matches!(sent(&actions).as_slice(), [Msg::Complete(_)]), "{actions:?}");
        harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    }
    harness.dial();
    harness.step(Event::Registered(registered(Duration::from_secs(10), Duration::from_secs(3600))));
    harness.server(ack("t1"));
    harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    assert!(harness.dial().held_attempts.is_empty());
}

#[test]
fn attempts_the_server_dropped_are_stopped_and_never_reported() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    let (token, logs) = harness.assign("t1");
    harness.step(Event::Lost { reason: "test".to_owned(), redirect: None });
    harness.dial();
    logs.push(crate::LogStream::Log, vec!["for nobody".to_owned()]);
    let mut answer = registered(Duration::from_secs(10), Duration::from_secs(3600));
    answer.dropped_attempts = vec![proto::AttemptRef::new("t1", 1)];
    let actions = harness.step(Event::Registered(answer));
    assert!(sent(&actions).is_empty(), "{actions:?}");
    assert!(token.is_cancelled());
    let actions = harness.end("t1", HandlerOutcome::Returned(Ok(Output::empty())));
    assert!(sent(&actions).is_empty());
}

#[test]
fn a_server_cancel_is_reported_as_cancelled_and_final() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    let (token, _logs) = harness.assign("t1");
    harness.server(server_message::Msg::Cancel(proto::CancelAttempt {
        attempt: Some(proto::AttemptRef::new("t1", 1)),
        reason: "cancelled".to_owned(),
        grace: None,
    }));
    assert!(token.is_cancelled());
    let actions = harness.end("t1", HandlerOutcome::Returned(Err(TaskError::retryable(""))));
    let failure = failure_of(&actions).unwrap_or_default();
    assert_eq!(
        (failure.reason.as_str(), failure.message.as_str(), failure.retryable),
        ("cancelled", "cancelled", false)
    );
}

#[test]
fn a_leader_named_by_a_closing_stream_is_dialled_at_once() {
    let mut harness = Harness::new();
    harness.connect(Duration::from_secs(10), Duration::from_secs(3600));
    let actions = harness
        .step(Event::Lost { reason: "not the leader".to_owned(), redirect: Some("http://leader:7070".to_owned()) });
    assert_eq!(dialled(&actions), Some("http://leader:7070"));
}
