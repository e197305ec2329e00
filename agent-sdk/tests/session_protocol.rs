//! The agent runtime's half of the `AgentService.Connect` protocol, checked
//! against a scripted server over a real loopback connection: each test plays
//! the server message by message and asserts what the agent sends back.
//! End-to-end behaviour with the real control plane is tested in `cli/tests`.
//!
//! These tests check the wire protocol, not timing: the rules about time
//! (lease and self-fencing, drain grace, reconnect backoff, the progress and
//! log throttles) are tested against the agent's state machine with explicit
//! instants in `src/machine/tests.rs`, `src/attempts/tests.rs`,
//! `src/lease.rs`, `src/connection.rs` and `src/drain.rs`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use muster_sdk::proto::agent_service_server::{AgentService, AgentServiceServer};
use muster_sdk::proto::{self, agent_message, server_message};
use muster_sdk::{Agent, CancellationToken, LogStream, Output, TaskContext, TaskError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// How long a test waits for the agent's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines the `flood` handler logs as fast as it can.
const FLOOD_LINES: usize = 50_000;

/// Lines the `drip` handler logs, yielding to the runtime after each and
/// pausing a millisecond every hundred, so it spans several flush
/// intervals.
const DRIP_LINES: usize = 20_000;

/// Hands every new session to the test.
struct ScriptedServer {
    sessions: mpsc::UnboundedSender<ScriptedSession>,
}

/// The server's end of one agent session.
struct ScriptedSession {
    inbound: Streaming<proto::AgentMessage>,
    outbound: mpsc::UnboundedSender<Result<proto::ServerMessage, Status>>,
}

#[tonic::async_trait]
impl AgentService for ScriptedServer {
    type ConnectStream = UnboundedReceiverStream<Result<proto::ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbound, rx) = mpsc::unbounded_channel();
        let session = ScriptedSession { inbound: request.into_inner(), outbound };
        self.sessions.send(session).map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// A follower: refuses every session and names the leader.
struct Follower {
    leader: String,
}

#[tonic::async_trait]
impl AgentService for Follower {
    type ConnectStream = UnboundedReceiverStream<Result<proto::ServerMessage, Status>>;

    async fn connect(
        &self,
        _request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut status = Status::unavailable("not the leader");
        if let Ok(leader) = self.leader.parse() {
            status.metadata_mut().insert("muster-leader", leader);
        }
        Err(status)
    }
}

impl ScriptedSession {
    /// The agent's next message other than a heartbeat.
    async fn recv(&mut self) -> anyhow::Result<agent_message::Msg> {
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT, self.inbound.message())
                .await
                .context("timed out waiting for the agent")??
                .context("agent closed the stream")?;
            match message.msg {
                Some(agent_message::Msg::Heartbeat(_)) => {
                    self.send(server_message::Msg::Heartbeat(proto::Heartbeat {}));
                }
                Some(msg) => return Ok(msg),
                None => bail!("empty agent message"),
            }
        }
    }

    /// Fails if the agent sends anything but heartbeats within `window`.
    async fn expect_silence(&mut self, window: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(window, self.recv()).await {
            Err(_elapsed) => Ok(()),
            Ok(Ok(msg)) => bail!("expected silence, got {msg:?}"),
            Ok(Err(_closed)) => Ok(()),
        }
    }

    fn send(&self, msg: server_message::Msg) {
        let _ = self.outbound.send(Ok(proto::ServerMessage { msg: Some(msg) }));
    }

    async fn expect_register(&mut self) -> anyhow::Result<proto::Register> {
        match self.recv().await? {
            agent_message::Msg::Register(register) => Ok(register),
            other => bail!("expected register, got {other:?}"),
        }
    }

    fn registered(&self, resumed: bool, lease: Duration) {
        self.send(server_message::Msg::Registered(proto::Registered {
            agent_id: "agent-1".to_owned(),
            resume_token: "resume-1".to_owned(),
            resumed,
            heartbeat_interval: Some(make_duration(lease / 3)),
            lease_ttl: Some(make_duration(lease)),
            dropped_attempts: Vec::new(),
        }));
    }

    fn assign(&self, task_id: &str, capability: &str, payload: &[u8]) {
        self.send(server_message::Msg::Assign(proto::Assignment {
            attempt: Some(proto::AttemptRef::new(task_id, 1)),
            capability: capability.to_owned(),
            payload: payload.to_vec(),
            content_type: "text/plain".to_owned(),
            ..proto::Assignment::default()
        }));
    }

    fn ack(&self, task_id: &str) {
        self.send(server_message::Msg::Ack(proto::Ack { attempt: Some(proto::AttemptRef::new(task_id, 1)) }));
    }

    async fn expect_accept(&mut self, task_id: &str) -> anyhow::Result<()> {
        match self.recv().await? {
            agent_message::Msg::Accept(accept) if attempt_is(accept.attempt.as_ref(), task_id) => Ok(()),
            other => bail!("expected accept of {task_id}, got {other:?}"),
        }
    }

    async fn expect_fail(&mut self, task_id: &str) -> anyhow::Result<proto::Failure> {
        match self.recv().await? {
            agent_message::Msg::Fail(fail) if attempt_is(fail.attempt.as_ref(), task_id) => {
                fail.failure.context("fail without failure")
            }
            other => bail!("expected fail of {task_id}, got {other:?}"),
        }
    }

    async fn expect_complete(&mut self, task_id: &str) -> anyhow::Result<proto::Complete> {
        match self.recv().await? {
            agent_message::Msg::Complete(complete) if attempt_is(complete.attempt.as_ref(), task_id) => Ok(complete),
            other => bail!("expected complete of {task_id}, got {other:?}"),
        }
    }

    async fn expect_log(&mut self, task_id: &str) -> anyhow::Result<proto::LogLines> {
        match self.recv().await? {
            agent_message::Msg::Log(log) if attempt_is(log.attempt.as_ref(), task_id) => Ok(log),
            other => bail!("expected log lines of {task_id}, got {other:?}"),
        }
    }

    /// The log messages of `task_id` up to its result, and the result;
    /// fails on any other message.
    async fn logs_until_result(&mut self, task_id: &str) -> anyhow::Result<(Vec<proto::LogLines>, agent_message::Msg)> {
        let mut logs = Vec::new();
        loop {
            match self.recv().await? {
                agent_message::Msg::Log(log) if attempt_is(log.attempt.as_ref(), task_id) => logs.push(log),
                result @ (agent_message::Msg::Complete(_) | agent_message::Msg::Fail(_)) => return Ok((logs, result)),
                other => bail!("expected log lines or the result of {task_id}, got {other:?}"),
            }
        }
    }
}

/// Every line's stream and text, in the order received.
fn log_lines(logs: &[proto::LogLines]) -> Vec<(proto::LogStream, String)> {
    logs.iter().flat_map(|log| log.lines.iter().map(|line| (line.stream(), line.text.clone()))).collect()
}

fn log_texts(log: &proto::LogLines) -> Vec<&str> {
    log.lines.iter().map(|line| line.text.as_str()).collect()
}

fn attempt_is(attempt: Option<&proto::AttemptRef>, task_id: &str) -> bool {
    attempt.is_some_and(|a| a.task_id == task_id && a.attempt == 1)
}

fn make_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or_default()
}

async fn spawn_server() -> anyhow::Result<(String, mpsc::UnboundedReceiver<ScriptedSession>)> {
    let (sessions, rx) = mpsc::unbounded_channel();
    let endpoint = spawn_service(ScriptedServer { sessions }).await?;
    Ok((endpoint, rx))
}

async fn spawn_service(service: impl AgentService) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(format!("http://{address}"))
}

async fn next_session(sessions: &mut mpsc::UnboundedReceiver<ScriptedSession>) -> anyhow::Result<ScriptedSession> {
    tokio::time::timeout(STEP_TIMEOUT, sessions.recv())
        .await
        .context("timed out waiting for a session")?
        .context("server gone")
}

/// The agent's next session, answered as a fresh registration with a 30 s
/// lease.
async fn registered_session(
    sessions: &mut mpsc::UnboundedReceiver<ScriptedSession>,
) -> anyhow::Result<ScriptedSession> {
    let mut session = next_session(sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));
    Ok(session)
}

/// A running agent under test.
struct TestAgent {
    shutdown: CancellationToken,
    run: JoinHandle<Result<(), muster_sdk::Error>>,
    /// Task ids of `wait` handlers, sent when their cancellation fired.
    cancelled: mpsc::UnboundedReceiver<String>,
    /// Lines for the `relay` handler to log; `None` ends it.
    relay: mpsc::UnboundedSender<Option<String>>,
    /// One message per line the `relay` handler logged, and one as it ends.
    relayed: mpsc::UnboundedReceiver<()>,
}

impl TestAgent {
    /// Has the `relay` handler log `line` (or end, with `None`) and waits
    /// until it did.
    async fn relay(&mut self, line: Option<&str>) -> anyhow::Result<()> {
        self.relay.send(line.map(str::to_owned))?;
        tokio::time::timeout(STEP_TIMEOUT, self.relayed.recv()).await?.context("relay handler gone")
    }
}

/// Spawns an agent whose `echo` returns the payload after reporting
/// progress, `panic` panics, `wait` runs until cancelled, `log` logs a few
/// lines on every stream, `flood` logs [`FLOOD_LINES`] lines at once, `drip`
/// logs [`DRIP_LINES`] lines one at a time and `relay` logs what the test
/// hands it.
fn spawn_agent(endpoint: &str, drain_grace: Duration) -> anyhow::Result<TestAgent> {
    let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
    let (relay, relay_rx) = mpsc::unbounded_channel::<Option<String>>();
    let relay_rx = Arc::new(tokio::sync::Mutex::new(relay_rx));
    let (relayed_tx, relayed) = mpsc::unbounded_channel();
    let agent = Agent::builder("test-agent")
        .server(endpoint)
        .slots(2)
        .drain_grace(drain_grace)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .handler("echo", |ctx: TaskContext| async move {
            ctx.progress(50, "half way").await;
            Ok(Output::from(ctx.payload().to_vec()))
        })
        .handler("chatty", |ctx: TaskContext| async move {
            for percent in 0..=100 {
                ctx.progress(percent, format!("at {percent}")).await;
            }
            Ok(Output::empty())
        })
        .handler("panic", |_ctx: TaskContext| async move {
            if true {
                panic!("boom");
            }
            Ok(Output::empty())
        })
        .handler("wait", move |ctx: TaskContext| {
            let cancelled_tx = cancelled_tx.clone();
            async move {
                ctx.cancelled().await;
                let _ = cancelled_tx.send(ctx.task_id().to_owned());
                Err::<Output, _>(TaskError::retryable("stopped"))
            }
        })
        .handler("log", |ctx: TaskContext| async move {
            ctx.log("first");
            ctx.log("second\nthird\r\n");
            let mut out = ctx.log_writer(LogStream::Stdout);
            std::io::Write::write_all(&mut out, b"out 1\nout 2 without newline")?;
            drop(out);
            ctx.log_stream(LogStream::Stderr, "err 1");
            ctx.log("last");
            Ok(Output::empty())
        })
        .handler("flood", |ctx: TaskContext| async move {
            for i in 0..FLOOD_LINES {
                ctx.log(format!("line {i}"));
            }
            Ok(Output::empty())
        })
        .handler("drip", |ctx: TaskContext| async move {
            for i in 0..DRIP_LINES {
                ctx.log(format!("line {i}"));
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
            Ok(Output::empty())
        })
        .handler("relay", move |ctx: TaskContext| {
            let lines = relay_rx.clone();
            let relayed = relayed_tx.clone();
            async move {
                let mut lines = lines.lock().await;
                while let Some(Some(line)) = lines.recv().await {
                    ctx.log(line);
                    let _ = relayed.send(());
                }
                let _ = relayed.send(());
                Ok(Output::empty())
            }
        })
        .build()?;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run_until(shutdown.clone()));
    Ok(TestAgent { shutdown, run, cancelled, relay, relayed })
}

async fn expect_stopped(run: JoinHandle<Result<(), muster_sdk::Error>>) -> anyhow::Result<()> {
    tokio::time::timeout(STEP_TIMEOUT, run).await.context("agent did not stop")???;
    Ok(())
}

#[tokio::test]
async fn assignment_is_accepted_reported_and_completed_then_drain_stops_the_agent() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = next_session(&mut sessions).await?;

    let register = session.expect_register().await?;
    assert_eq!(register.name, "test-agent");
    assert_eq!(register.capabilities, ["chatty", "drip", "echo", "flood", "log", "panic", "relay", "wait"]);
    assert_eq!(register.slots, 2);
    assert!(register.resume_token.is_empty());
    assert!(!register.sdk_version.is_empty());
    session.registered(false, Duration::from_secs(30));

    session.assign("t1", "echo", b"hello");
    session.expect_accept("t1").await?;
    match session.recv().await? {
        agent_message::Msg::Progress(progress) => {
            assert_eq!(progress.percent, 50);
            assert_eq!(progress.message, "half way");
        }
        other => bail!("expected progress, got {other:?}"),
    }
    let complete = session.expect_complete("t1").await?;
    assert_eq!(complete.output, b"hello");
    assert_eq!(complete.content_type, "application/octet-stream");
    session.ack("t1");

    shutdown.cancel();
    match session.recv().await? {
        agent_message::Msg::Drain(_) => {}
        other => bail!("expected drain, got {other:?}"),
    }
    expect_stopped(run).await
}

#[tokio::test]
async fn panicking_and_unknown_handlers_fail_with_their_reasons() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "panic", b"");
    session.expect_accept("t1").await?;
    let failure = session.expect_fail("t1").await?;
    assert_eq!(failure.reason, "handler_panic");
    assert!(failure.retryable);
    assert!(failure.message.contains("boom"), "{}", failure.message);
    session.ack("t1");

    session.assign("t2", "nope", b"");
    session.expect_accept("t2").await?;
    let failure = session.expect_fail("t2").await?;
    assert_eq!(failure.reason, "no_handler");
    assert!(failure.retryable);
    session.ack("t2");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn server_cancel_reports_cancelled_and_not_retryable() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "wait", b"");
    session.expect_accept("t1").await?;
    session.send(server_message::Msg::Cancel(proto::CancelAttempt {
        attempt: Some(proto::AttemptRef::new("t1", 1)),
        reason: "cancelled".to_owned(),
        grace: None,
    }));
    let failure = session.expect_fail("t1").await?;
    assert_eq!(failure.reason, "cancelled");
    assert!(!failure.retryable);
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn unacknowledged_result_is_resent_after_reconnect_with_resume_token() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;
    session.assign("t1", "echo", b"again");
    session.expect_accept("t1").await?;
    session.recv().await?; // progress
    session.expect_complete("t1").await?;
    drop(session); // the stream breaks before the ack

    let mut session = next_session(&mut sessions).await?;
    let register = session.expect_register().await?;
    assert_eq!(register.resume_token, "resume-1");
    assert_eq!(register.held_attempts, [proto::AttemptRef::new("t1", 1)]);
    session.registered(true, Duration::from_secs(30));
    let complete = session.expect_complete("t1").await?;
    assert_eq!(complete.output, b"again");
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn drain_cancels_work_after_grace_and_reports_it_retryable() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_millis(200))?;
    let mut session = registered_session(&mut sessions).await?;
    session.assign("t1", "wait", b"");
    session.expect_accept("t1").await?;

    shutdown.cancel();
    match session.recv().await? {
        agent_message::Msg::Drain(_) => {}
        other => bail!("expected drain, got {other:?}"),
    }
    let failure = session.expect_fail("t1").await?;
    assert_eq!(failure.reason, "agent_shutdown");
    assert!(failure.retryable);
    session.ack("t1");
    expect_stopped(run).await
}

#[tokio::test]
async fn silent_server_past_the_lease_gets_running_work_cancelled_and_dropped() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let mut agent = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    let lease = Duration::from_millis(600);
    session.registered(false, lease);
    session.assign("t1", "wait", b"");
    session.expect_accept("t1").await?;
    // From now on the first session stays silent: heartbeats go unanswered.
    let silent = session;

    // The agent gives up on the silent session and reconnects, still holding
    // the attempt.
    let mut session = next_session(&mut sessions).await?;
    let register = session.expect_register().await?;
    assert_eq!(register.held_attempts, [proto::AttemptRef::new("t1", 1)]);
    // Without an answer, the lease runs out and the agent fences itself.
    let fenced = tokio::time::timeout(STEP_TIMEOUT, agent.cancelled.recv()).await?;
    assert_eq!(fenced.as_deref(), Some("t1"));
    session.registered(false, lease);
    // The handler was cancelled by the fence and its result dropped: nothing
    // is reported, on this session or after.
    session.expect_silence(Duration::from_millis(300)).await?;
    drop(silent);

    agent.shutdown.cancel();
    expect_stopped(agent.run).await
}

#[tokio::test]
async fn follower_redirect_leads_the_agent_to_the_leader() -> anyhow::Result<()> {
    let (leader, mut sessions) = spawn_server().await?;
    let follower = spawn_service(Follower { leader: leader.trim_start_matches("http://").to_owned() }).await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&follower, Duration::from_secs(5))?;

    let mut session = registered_session(&mut sessions).await?;
    session.assign("t1", "echo", b"x");
    session.expect_accept("t1").await?;
    session.recv().await?; // progress
    session.expect_complete("t1").await?;
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn rapid_progress_is_coalesced_and_the_latest_precedes_the_result() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "chatty", b"");
    session.expect_accept("t1").await?;
    let mut reports = Vec::new();
    loop {
        match session.recv().await? {
            agent_message::Msg::Progress(progress) => reports.push(progress.percent),
            agent_message::Msg::Complete(_) => break,
            other => bail!("expected progress or complete, got {other:?}"),
        }
    }
    assert!(reports.len() < 10, "101 reports in a burst were sent as {reports:?}");
    assert_eq!(reports.first(), Some(&0));
    assert_eq!(reports.last(), Some(&100));
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn log_lines_arrive_in_order_with_their_streams_before_the_result() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "log", b"");
    session.expect_accept("t1").await?;
    let (logs, result) = session.logs_until_result("t1").await?;
    assert!(matches!(result, agent_message::Msg::Complete(_)), "{result:?}");
    let expected = [
        (proto::LogStream::Log, "first"),
        (proto::LogStream::Log, "second"),
        (proto::LogStream::Log, "third"),
        (proto::LogStream::Stdout, "out 1"),
        (proto::LogStream::Stdout, "out 2 without newline"),
        (proto::LogStream::Stderr, "err 1"),
        (proto::LogStream::Log, "last"),
    ]
    .map(|(stream, text)| (stream, text.to_owned()));
    assert_eq!(log_lines(&logs), expected);
    assert!(logs.iter().all(|log| log.dropped == 0));
    assert!(logs.iter().flat_map(|log| &log.lines).all(|line| line.time.is_some()));
    session.ack("t1");
    // Nothing of the attempt follows its result.
    session.expect_silence(Duration::from_millis(300)).await?;

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn a_flood_of_lines_is_batched_into_few_messages_and_every_line_is_accounted_for() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "flood", b"");
    session.expect_accept("t1").await?;
    let (logs, result) = session.logs_until_result("t1").await?;
    assert!(matches!(result, agent_message::Msg::Complete(_)), "{result:?}");
    assert!(logs.len() < 100, "{FLOOD_LINES} lines took {} messages", logs.len());
    let sent: usize = logs.iter().map(|log| log.lines.len()).sum();
    let dropped: u64 = logs.iter().map(|log| log.dropped).sum();
    assert_eq!(sent as u64 + dropped, FLOOD_LINES as u64, "{sent} sent, {dropped} dropped");
    // In order, the oldest dropped first, so the newest line is there.
    let numbers: Vec<usize> = log_lines(&logs)
        .iter()
        .map(|(_, text)| text.strip_prefix("line ").and_then(|n| n.parse().ok()).context(text.clone()))
        .collect::<anyhow::Result<_>>()?;
    assert!(numbers.windows(2).all(|pair| pair[0] < pair[1]), "lines out of order");
    assert_eq!(numbers.last(), Some(&(FLOOD_LINES - 1)));
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn lines_logged_one_at_a_time_are_batched_without_loss() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let TestAgent { shutdown, run, .. } = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;

    session.assign("t1", "drip", b"");
    session.expect_accept("t1").await?;
    let (logs, result) = session.logs_until_result("t1").await?;
    assert!(matches!(result, agent_message::Msg::Complete(_)), "{result:?}");
    // Sent as logged, it would take one message per line.
    assert!(logs.len() < 100, "{DRIP_LINES} lines took {} messages", logs.len());
    assert!(logs.iter().all(|log| log.dropped == 0));
    let expected: Vec<(proto::LogStream, String)> =
        (0..DRIP_LINES).map(|i| (proto::LogStream::Log, format!("line {i}"))).collect();
    assert_eq!(log_lines(&logs), expected);
    session.ack("t1");

    shutdown.cancel();
    expect_stopped(run).await
}

#[tokio::test]
async fn lines_logged_while_disconnected_are_sent_after_reconnecting_and_before_the_result() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let mut agent = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;
    session.assign("t1", "relay", b"");
    session.expect_accept("t1").await?;
    agent.relay(Some("online")).await?;
    assert_eq!(log_texts(&session.expect_log("t1").await?), ["online"]);

    // The stream breaks; the agent reconnects, and logs before the server
    // answers its registration.
    drop(session);
    let mut session = next_session(&mut sessions).await?;
    let register = session.expect_register().await?;
    assert_eq!(register.held_attempts, [proto::AttemptRef::new("t1", 1)]);
    agent.relay(Some("while away")).await?;
    session.registered(true, Duration::from_secs(30));
    assert_eq!(log_texts(&session.expect_log("t1").await?), ["while away"]);

    // Again, and this time the handler also ends while disconnected.
    drop(session);
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    agent.relay(Some("last words")).await?;
    agent.relay(None).await?;
    // Whether the handler's end reaches the agent before or after this
    // answer, the lines come first and the result last; the ordering rule
    // itself is checked step by step in `attempts/tests.rs`.
    session.registered(true, Duration::from_secs(30));
    let (logs, result) = session.logs_until_result("t1").await?;
    assert!(matches!(result, agent_message::Msg::Complete(_)), "{result:?}");
    assert_eq!(log_lines(&logs), [(proto::LogStream::Log, "last words".to_owned())]);
    session.ack("t1");

    agent.shutdown.cancel();
    expect_stopped(agent.run).await
}

#[tokio::test]
async fn lines_of_a_dropped_attempt_are_never_sent() -> anyhow::Result<()> {
    let (endpoint, mut sessions) = spawn_server().await?;
    let mut agent = spawn_agent(&endpoint, Duration::from_secs(5))?;
    let mut session = registered_session(&mut sessions).await?;
    session.assign("t1", "relay", b"");
    session.expect_accept("t1").await?;

    drop(session);
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    agent.relay(Some("for nobody")).await?;
    session.send(server_message::Msg::Registered(proto::Registered {
        agent_id: "agent-1".to_owned(),
        resume_token: "resume-1".to_owned(),
        resumed: true,
        heartbeat_interval: Some(make_duration(Duration::from_secs(10))),
        lease_ttl: Some(make_duration(Duration::from_secs(30))),
        dropped_attempts: vec![proto::AttemptRef::new("t1", 1)],
    }));
    agent.relay(Some("still for nobody")).await?;
    agent.relay(None).await?;
    session.expect_silence(Duration::from_millis(300)).await?;

    agent.shutdown.cancel();
    expect_stopped(agent.run).await
}
