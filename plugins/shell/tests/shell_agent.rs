//! The shell agent running real programs, driven through the SDK runtime by
//! a scripted server on a loopback connection: the test plays the server,
//! assigns `shell` tasks and reads what the agent reports.
#![cfg(unix)]

use std::time::Duration;

use anyhow::{Context, bail};
use muster_sdk::CancellationToken;
use muster_sdk::proto::agent_service_server::{AgentService, AgentServiceServer};
use muster_sdk::proto::{self, agent_message, server_message};
use muster_shell_agent::{ShellAgentConfig, build_agent};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process that was sent SIGKILL may take to be seen gone: the
/// signal is delivered asynchronously, and a loaded machine may not run the
/// dying process (or the one that reaps it) at once. Generous on purpose:
/// the tests below measure *whether* a process ends, and the agent's own
/// timing is asserted separately.
#[cfg(target_os = "linux")]
const DEATH_BOUND: Duration = Duration::from_secs(10);

struct ScriptedServer {
    sessions: mpsc::UnboundedSender<ScriptedSession>,
}

struct ScriptedSession {
    inbound: Streaming<proto::AgentMessage>,
    outbound: mpsc::UnboundedSender<Result<proto::ServerMessage, Status>>,
    /// Every log message received so far, in order.
    logs: Vec<proto::LogLines>,
}

#[tonic::async_trait]
impl AgentService for ScriptedServer {
    type ConnectStream = UnboundedReceiverStream<Result<proto::ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbound, rx) = mpsc::unbounded_channel();
        let session = ScriptedSession { inbound: request.into_inner(), outbound, logs: Vec::new() };
        self.sessions.send(session).map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

impl ScriptedSession {
    /// The agent's next message other than a heartbeat, progress or log
    /// lines (which are kept in `logs`).
    async fn recv(&mut self) -> anyhow::Result<agent_message::Msg> {
        loop {
            let message = tokio::time::timeout(STEP_TIMEOUT, self.inbound.message())
                .await
                .context("timed out waiting for the agent")??
                .context("agent closed the stream")?;
            match message.msg {
                Some(agent_message::Msg::Heartbeat(_) | agent_message::Msg::Progress(_)) => {}
                Some(agent_message::Msg::Log(log)) => self.logs.push(log),
                Some(msg) => return Ok(msg),
                None => bail!("empty agent message"),
            }
        }
    }

    fn send(&self, msg: server_message::Msg) {
        let _ = self.outbound.send(Ok(proto::ServerMessage { msg: Some(msg) }));
    }

    fn assign(&self, task_id: &str, payload: &Value) {
        self.send(server_message::Msg::Assign(proto::Assignment {
            attempt: Some(proto::AttemptRef::new(task_id, 1)),
            capability: "shell".to_owned(),
            payload: payload.to_string().into_bytes(),
            content_type: "application/json".to_owned(),
            ..proto::Assignment::default()
        }));
    }

    /// The texts of the log lines of `stream` received so far for `task_id`.
    fn log_texts(&self, task_id: &str, stream: proto::LogStream) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|log| log.attempt.as_ref().is_some_and(|a| a.task_id == task_id))
            .flat_map(|log| &log.lines)
            .filter(|line| line.stream() == stream)
            .map(|line| line.text.as_str())
            .collect()
    }

    /// Assigns a task and returns its result, acknowledged.
    async fn run(&mut self, task_id: &str, payload: &Value) -> anyhow::Result<agent_message::Msg> {
        self.assign(task_id, payload);
        match self.recv().await? {
            agent_message::Msg::Accept(_) => {}
            other => bail!("expected accept, got {other:?}"),
        }
        let result = self.recv().await?;
        self.send(server_message::Msg::Ack(proto::Ack { attempt: Some(proto::AttemptRef::new(task_id, 1)) }));
        Ok(result)
    }
}

/// A registered session with a running shell agent.
async fn spawn_shell_agent() -> anyhow::Result<(ScriptedSession, CancellationToken)> {
    spawn_shell_agent_with(|_| {}).await
}

/// Like [`spawn_shell_agent`], with the configuration adjusted by `tweak`.
async fn spawn_shell_agent_with(
    tweak: impl FnOnce(&mut ShellAgentConfig),
) -> anyhow::Result<(ScriptedSession, CancellationToken)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (sessions_tx, mut sessions) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(ScriptedServer { sessions: sessions_tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut config = ShellAgentConfig {
        server: format!("http://{address}"),
        name: "shell-test".to_owned(),
        slots: 2,
        ..ShellAgentConfig::default()
    };
    tweak(&mut config);
    let agent = build_agent(&config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(agent.run_until(shutdown.clone()));

    let mut session = tokio::time::timeout(STEP_TIMEOUT, sessions.recv()).await?.context("no session")?;
    match session.recv().await? {
        agent_message::Msg::Register(register) => {
            assert_eq!(register.capabilities, ["shell"]);
            assert_eq!(register.labels.get("os").map(String::as_str), Some(std::env::consts::OS));
        }
        other => bail!("expected register, got {other:?}"),
    }
    session.send(server_message::Msg::Registered(proto::Registered {
        agent_id: "agent-1".to_owned(),
        resume_token: "resume-1".to_owned(),
        heartbeat_interval: Some(prost_duration(5)),
        lease_ttl: Some(prost_duration(30)),
        ..proto::Registered::default()
    }));
    Ok((session, shutdown))
}

fn prost_duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

fn expect_complete(result: agent_message::Msg) -> anyhow::Result<Value> {
    match result {
        agent_message::Msg::Complete(complete) => {
            assert_eq!(complete.content_type, "application/json");
            Ok(serde_json::from_slice(&complete.output)?)
        }
        other => bail!("expected complete, got {other:?}"),
    }
}

fn expect_failure(result: agent_message::Msg) -> anyhow::Result<proto::Failure> {
    match result {
        agent_message::Msg::Fail(fail) => fail.failure.context("fail without failure"),
        other => bail!("expected fail, got {other:?}"),
    }
}

#[tokio::test]
async fn command_output_env_and_cwd_are_reported() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let dir = tempfile::tempdir()?;
    let payload = json!({
        "argv": ["sh", "-c", "echo \"$GREETING\"; pwd; echo warn >&2"],
        "env": {"GREETING": "hello"},
        "cwd": dir.path(),
    });
    let output = expect_complete(session.run("t1", &payload).await?)?;
    let cwd = dir.path().canonicalize()?;
    assert_eq!(output["exit_code"], 0);
    assert_eq!(output["stdout"], format!("hello\n{}\n", cwd.display()));
    assert_eq!(output["stderr"], "warn\n");
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn stdout_and_stderr_lines_stream_as_live_logs_before_the_result() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let script = r"echo out 1; echo err 1 >&2; printf 'out 2\r\nno newline'; printf 'bad \377 byte\n' >&2";
    let output = expect_complete(session.run("t1", &json!({"argv": ["sh", "-c", script]})).await?)?;
    // The output keeps the bytes as they were.
    assert_eq!(output["stdout"], "out 1\nout 2\r\nno newline");
    // `run` returns at the result: every line below came before it.
    assert_eq!(session.log_texts("t1", proto::LogStream::Stdout), ["out 1", "out 2", "no newline"]);
    assert_eq!(session.log_texts("t1", proto::LogStream::Stderr), ["err 1", "bad \u{fffd} byte"]);
    assert!(session.logs.iter().all(|log| log.dropped == 0));
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn large_output_keeps_only_the_last_64_kib() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let payload = json!({"argv": ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a; echo END"]});
    let output = expect_complete(session.run("t1", &payload).await?)?;
    let stdout = output["stdout"].as_str().context("stdout is a string")?;
    assert_eq!(stdout.len(), muster_shell_agent::MAX_STREAM_BYTES);
    assert!(stdout.ends_with("aaEND\n"));
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn non_zero_exit_fails_retryable_with_code_and_stderr() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let payload = json!({"argv": ["sh", "-c", "echo broken >&2; exit 3"]});
    let failure = expect_failure(session.run("t1", &payload).await?)?;
    assert_eq!(failure.reason, "exit_code");
    assert!(failure.retryable);
    assert!(failure.message.contains("code 3"), "{}", failure.message);
    assert!(failure.message.contains("broken"), "{}", failure.message);
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn missing_program_and_bad_payload_fail_for_good() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let payload = json!({"argv": ["muster-no-such-program"]});
    let failure = expect_failure(session.run("t1", &payload).await?)?;
    assert_eq!(failure.reason, "spawn_failed");
    assert!(!failure.retryable);
    assert!(failure.message.contains("muster-no-such-program"));

    let failure = expect_failure(session.run("t2", &json!({"argv": []})).await?)?;
    assert_eq!(failure.reason, "invalid_payload");
    assert!(!failure.retryable);
    shutdown.cancel();
    Ok(())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn cancel_kills_the_whole_process_group() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let dir = tempfile::tempdir()?;
    let pid_file = dir.path().join("grandchild.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    session.assign("t1", &json!({"argv": ["sh", "-c", script]}));
    match session.recv().await? {
        agent_message::Msg::Accept(_) => {}
        other => bail!("expected accept, got {other:?}"),
    }
    let grandchild = wait_for_pid(&pid_file).await?;
    assert!(is_alive(grandchild), "the grandchild runs before the cancel");

    session.send(server_message::Msg::Cancel(proto::CancelAttempt {
        attempt: Some(proto::AttemptRef::new("t1", 1)),
        reason: "cancelled".to_owned(),
        grace: None,
    }));
    let failure = expect_failure(session.recv().await?)?;
    assert_eq!(failure.reason, "cancelled");
    assert!(!failure.retryable);
    wait_until_gone(&[grandchild]).await?;
    shutdown.cancel();
    Ok(())
}

#[cfg(target_os = "linux")]
async fn wait_for_pid(path: &std::path::Path) -> anyhow::Result<u32> {
    for _ in 0..250 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return Ok(pid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{} never written", path.display())
}

/// Waits until none of `pids` is alive, at most [`DEATH_BOUND`].
#[cfg(target_os = "linux")]
async fn wait_until_gone(pids: &[u32]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEATH_BOUND;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|pid| is_alive(*pid)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("still alive after {DEATH_BOUND:?}: {alive:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no live process is left in group `pgid`, at most
/// [`DEATH_BOUND`].
#[cfg(target_os = "linux")]
async fn wait_until_group_gone(pgid: u32) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEATH_BOUND;
    loop {
        let members = group_members(pgid);
        if members.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("group {pgid} still has {members:?} after {DEATH_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process group of `pid`, from `/proc`.
#[cfg(target_os = "linux")]
fn process_group(pid: u32) -> anyhow::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(')').context("malformed stat")?;
    // state, ppid, pgrp
    Ok(rest.split_whitespace().nth(2).context("no pgrp in stat")?.parse()?)
}

/// Alive means present and not a zombie (a container's init may never reap
/// the orphan).
#[cfg(target_os = "linux")]
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The processes of a started script: the shell, its background child, and
/// the process group they run in (led by the agent's supervisor).
#[cfg(target_os = "linux")]
struct Started {
    shell: u32,
    child: u32,
    pgid: u32,
}

/// Assigns `script` under `sh -c` and waits until it wrote its shell's and
/// background child's pids to files in `dir`.
#[cfg(target_os = "linux")]
async fn start_script(session: &mut ScriptedSession, dir: &std::path::Path, script: &str) -> anyhow::Result<Started> {
    let leader_file = dir.join("leader.pid");
    let child_file = dir.join("child.pid");
    let script = format!("echo $$ > {}; {script} & echo $! > {}; wait", leader_file.display(), child_file.display());
    session.assign("t1", &json!({"argv": ["sh", "-c", script]}));
    match session.recv().await? {
        agent_message::Msg::Accept(_) => {}
        other => bail!("expected accept, got {other:?}"),
    }
    let shell = wait_for_pid(&leader_file).await?;
    let child = wait_for_pid(&child_file).await?;
    Ok(Started { shell, child, pgid: process_group(shell)? })
}

/// Live (non-zombie) processes whose process group is `pgid`.
#[cfg(target_os = "linux")]
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                // state, ppid, pgrp
                fields.first().is_some_and(|state| *state != "Z" && *state != "X")
                    && fields.get(2).and_then(|pgrp| pgrp.parse::<u32>().ok()) == Some(pgid)
            })
        })
        .collect()
}

fn cancel(session: &ScriptedSession) {
    session.send(server_message::Msg::Cancel(proto::CancelAttempt {
        attempt: Some(proto::AttemptRef::new("t1", 1)),
        reason: "cancelled".to_owned(),
        grace: None,
    }));
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_and_the_group_is_gone() -> anyhow::Result<()> {
    let grace = Duration::from_millis(500);
    let (mut session, shutdown) = spawn_shell_agent_with(|config| config.kill_grace = grace).await?;
    let dir = tempfile::tempdir()?;
    // SIG_IGN is inherited: both the shell and its background child ignore
    // SIGTERM.
    let started = start_script(&mut session, dir.path(), "trap '' TERM; sleep 60").await?;
    assert!(is_alive(started.child));
    let members = group_members(started.pgid);
    assert!(members.contains(&started.shell) && members.contains(&started.child), "{members:?}");

    let cancelled_at = std::time::Instant::now();
    cancel(&session);
    let failure = expect_failure(session.recv().await?)?;
    let took = cancelled_at.elapsed();
    assert_eq!(failure.reason, "cancelled");
    assert!(!failure.retryable);
    // The agent reports only after the group ignored SIGTERM for the whole
    // grace; no upper bound here, a loaded machine may be slow to report.
    assert!(took >= grace, "SIGKILL came only after the grace period ({took:?})");
    wait_until_gone(&[started.shell, started.child]).await?;
    wait_until_group_gone(started.pgid).await?;
    shutdown.cancel();
    Ok(())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn cancel_sends_sigterm_first_so_a_cooperative_program_ends_before_the_grace() -> anyhow::Result<()> {
    let grace = Duration::from_secs(30);
    let (mut session, shutdown) = spawn_shell_agent_with(|config| config.kill_grace = grace).await?;
    let dir = tempfile::tempdir()?;
    let started = start_script(&mut session, dir.path(), "sleep 60").await?;
    let cancelled_at = std::time::Instant::now();
    cancel(&session);
    let failure = expect_failure(session.recv().await?)?;
    assert_eq!(failure.reason, "cancelled");
    assert!(cancelled_at.elapsed() < grace, "SIGTERM ended it without waiting for SIGKILL");
    wait_until_gone(&[started.shell, started.child]).await?;
    wait_until_group_gone(started.pgid).await?;
    shutdown.cancel();
    Ok(())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_agent_timeout_stops_the_group_with_reason_timeout() -> anyhow::Result<()> {
    // The timeout runs from the spawn, so it must leave the script time to
    // start and write its pids even on a loaded machine; what is tested is
    // that the timeout ends the group, not how soon.
    let timeout = Duration::from_secs(3);
    let (mut session, shutdown) = spawn_shell_agent_with(|config| {
        config.timeout = Some(timeout);
        config.kill_grace = Duration::from_millis(200);
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let started = start_script(&mut session, dir.path(), "trap '' TERM; sleep 60").await?;
    let failure = expect_failure(session.recv().await?)?;
    assert_eq!(failure.reason, "timeout");
    assert!(failure.retryable);
    assert!(failure.message.contains("timeout"), "{}", failure.message);
    wait_until_gone(&[started.shell, started.child]).await?;
    wait_until_group_gone(started.pgid).await?;
    shutdown.cancel();
    Ok(())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_killed_supervisor_fails_the_attempt_and_takes_the_group_with_it() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let dir = tempfile::tempdir()?;
    let started = start_script(&mut session, dir.path(), "trap '' TERM; sleep 60").await?;
    // The supervisor leads the group and is neither the shell nor its child.
    let supervisor = started.pgid;
    assert!(supervisor != started.shell && is_alive(supervisor), "group {} led by a live supervisor", started.pgid);
    // SAFETY: kill(2) takes plain integers.
    let rc = unsafe { libc::kill(i32::try_from(supervisor)?, libc::SIGKILL) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let failure = expect_failure(session.recv().await?)?;
    assert_eq!(failure.reason, "supervisor_killed", "{failure:?}");
    assert!(failure.retryable);
    wait_until_gone(&[started.shell, started.child]).await?;
    wait_until_group_gone(started.pgid).await?;
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn output_cap_holds_for_a_command_printing_far_more() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent_with(|config| config.max_output_bytes = 1000).await?;
    // About 5 MB on each stream.
    let script = "i=0; while [ $i -lt 50 ]; do head -c 100000 /dev/zero | tr '\\0' o; head -c 100000 /dev/zero | tr '\\0' e >&2; i=$((i+1)); done; echo END; echo ERR >&2";
    let output = expect_complete(session.run("t1", &json!({"argv": ["sh", "-c", script]})).await?)?;
    let stdout = output["stdout"].as_str().context("stdout")?;
    let stderr = output["stderr"].as_str().context("stderr")?;
    assert_eq!(stdout.len(), 1000);
    assert_eq!(stderr.len(), 1000);
    assert!(stdout.ends_with("ooEND\n"));
    assert!(stderr.ends_with("eeERR\n"));
    // The live log got one line per stream, cut to 16 KiB.
    let lines = session.log_texts("t1", proto::LogStream::Stdout);
    assert_eq!(lines.iter().map(|line| line.len()).collect::<Vec<_>>(), [16 * 1024]);
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn listed_exit_codes_fail_for_good() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent_with(|config| config.non_retryable_exit_codes = vec![2]).await?;
    let failure = expect_failure(session.run("t1", &json!({"argv": ["sh", "-c", "exit 2"]})).await?)?;
    assert_eq!(failure.reason, "exit_code");
    assert!(!failure.retryable);
    let failure = expect_failure(session.run("t2", &json!({"argv": ["sh", "-c", "exit 3"]})).await?)?;
    assert!(failure.retryable);
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn working_dirs_outside_the_allowed_ones_are_refused() -> anyhow::Result<()> {
    let allowed = tempfile::tempdir()?;
    let inner = allowed.path().join("inner");
    std::fs::create_dir(&inner)?;
    let allowed_path = allowed.path().to_owned();
    let (mut session, shutdown) =
        spawn_shell_agent_with(move |config| config.allowed_dirs = vec![allowed_path]).await?;
    let output = expect_complete(session.run("t1", &json!({"argv": ["pwd"], "cwd": inner})).await?)?;
    assert_eq!(output["stdout"], format!("{}\n", inner.canonicalize()?.display()));
    // No cwd: the first allowed directory.
    let output = expect_complete(session.run("t2", &json!({"argv": ["pwd"]})).await?)?;
    assert_eq!(output["stdout"], format!("{}\n", allowed.path().canonicalize()?.display()));
    let outside = tempfile::tempdir()?;
    let failure = expect_failure(session.run("t3", &json!({"argv": ["pwd"], "cwd": outside.path()})).await?)?;
    assert_eq!(failure.reason, "cwd_not_allowed");
    assert!(!failure.retryable);
    assert!(failure.message.contains("allowed_dirs"), "{}", failure.message);
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn without_inherited_environment_only_passed_variables_remain() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent_with(|config| {
        config.inherit_env = false;
        config.pass_env = vec!["PATH".to_owned()];
    })
    .await?;
    let payload = json!({"argv": ["sh", "-c", "env | cut -d= -f1 | sort | tr '\\n' ' '"], "env": {"EXTRA": "1"}});
    let output = expect_complete(session.run("t1", &payload).await?)?;
    let names: Vec<&str> = output["stdout"].as_str().context("stdout")?.split_whitespace().collect();
    assert!(names.contains(&"PATH") && names.contains(&"EXTRA"), "{names:?}");
    assert!(!names.contains(&"HOME") || std::env::var_os("HOME").is_none(), "{names:?}");
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn payload_variables_that_change_what_runs_fail_for_good_naming_them() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    for (i, name) in ["LD_PRELOAD", "PATH", "BASH_ENV", "IFS", "DYLD_INSERT_LIBRARIES"].into_iter().enumerate() {
        let task = format!("t{i}");
        let payload = json!({"argv": ["sh", "-c", "echo ran"], "env": {"OK": "1", name: "/tmp/x"}});
        let failure = expect_failure(session.run(&task, &payload).await?)?;
        assert_eq!(failure.reason, "env_not_allowed", "{name}: {failure:?}");
        assert!(!failure.retryable, "{name}");
        assert!(failure.message.contains(name), "{}", failure.message);
    }
    // Ordinary variables still reach the program.
    let output =
        expect_complete(session.run("ok", &json!({"argv": ["sh", "-c", "echo $OK"], "env": {"OK": "1"}})).await?)?;
    assert_eq!(output["stdout"], "1\n");
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_program_off_the_allowlist_fails_for_good_naming_it() -> anyhow::Result<()> {
    let (mut session, shutdown) =
        spawn_shell_agent_with(|config| config.allow_programs = vec!["echo".to_owned(), "/bin/sh".to_owned()]).await?;
    let output = expect_complete(session.run("t1", &json!({"argv": ["echo", "allowed"]})).await?)?;
    assert_eq!(output["stdout"], "allowed\n");
    let output = expect_complete(session.run("t2", &json!({"argv": ["/bin/sh", "-c", "echo by path"]})).await?)?;
    assert_eq!(output["stdout"], "by path\n");
    // Neither another name for an allowed program nor a look-alike passes.
    for (i, program) in ["sh", "/bin/echo", "./echo", "true"].into_iter().enumerate() {
        let failure = expect_failure(session.run(&format!("n{i}"), &json!({"argv": [program]})).await?)?;
        assert_eq!(failure.reason, "program_not_allowed", "{program}: {failure:?}");
        assert!(!failure.retryable);
        assert!(failure.message.contains(program), "{}", failure.message);
    }
    shutdown.cancel();
    Ok(())
}

#[cfg(unix)]
#[tokio::test]
async fn a_program_killed_by_a_signal_reports_128_plus_the_signal_through_its_supervisor() -> anyhow::Result<()> {
    let (mut session, shutdown) = spawn_shell_agent().await?;
    let failure = expect_failure(session.run("t1", &json!({"argv": ["sh", "-c", "kill -KILL $$"]})).await?)?;
    assert_eq!(failure.reason, "exit_code", "the program died, not its supervisor: {failure:?}");
    assert!(failure.message.contains("code 137"), "{}", failure.message);
    let failure = expect_failure(session.run("t2", &json!({"argv": ["sh", "-c", "kill -TERM $$"]})).await?)?;
    assert!(failure.message.contains("code 143"), "{}", failure.message);
    shutdown.cancel();
    Ok(())
}
