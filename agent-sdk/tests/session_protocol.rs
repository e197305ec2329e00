//! The agent runtime's half of the `AgentService.Connect` protocol, checked
//! against a scripted server over a real loopback connection: each test plays
//! the server message by message and asserts what the agent sends back.
//! End-to-end behaviour with the real control plane is tested in `cli/tests`.

use std::time::Duration;

use anyhow::{Context, bail};
use muster_sdk::proto::agent_service_server::{AgentService, AgentServiceServer};
use muster_sdk::proto::{self, agent_message, server_message};
use muster_sdk::{Agent, CancellationToken, Output, TaskContext, TaskError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// How long a test waits for the agent's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A running agent under test.
struct TestAgent {
    shutdown: CancellationToken,
    run: JoinHandle<Result<(), muster_sdk::Error>>,
    /// Task ids of `wait` handlers, sent when their cancellation fired.
    cancelled: mpsc::UnboundedReceiver<String>,
}

/// Spawns an agent whose `echo` returns the payload after reporting
/// progress, `panic` panics and `wait` runs until cancelled.
fn spawn_agent(endpoint: &str, drain_grace: Duration) -> anyhow::Result<TestAgent> {
    let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
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
        .build()?;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run_until(shutdown.clone()));
    Ok(TestAgent { shutdown, run, cancelled })
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
    assert_eq!(register.capabilities, ["chatty", "echo", "panic", "wait"]);
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
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));

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
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));

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
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));
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
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));
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

    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));
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
    let mut session = next_session(&mut sessions).await?;
    session.expect_register().await?;
    session.registered(false, Duration::from_secs(30));

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
