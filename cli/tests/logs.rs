//! Live task logs over real gRPC: a real server with sled in a temp dir,
//! real agents (SDK agents in this process, `muster` child processes for
//! the shell agent and the `task logs` follower), and hand-driven sessions
//! for the fencing rules.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use muster_sdk::{Client, Error, LogChunk, LogStream, NewTask, Output, TaskError, TaskState, proto};
use serde_json::json;
use tonic::Code;

/// Every message of a (non-following or following) log read, until the
/// server ends the stream.
async fn read_logs(client: &Client, id: &str, attempt: u32, follow: bool) -> Result<Vec<LogChunk>, Error> {
    let mut stream = client.logs(id, attempt, follow).await?;
    let mut chunks = Vec::new();
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("log stream stalled")
    {
        chunks.push(chunk?);
    }
    Ok(chunks)
}

/// `(attempt, position, text)` of every line.
fn lines_of(chunks: &[LogChunk]) -> Vec<(u32, u64, String)> {
    chunks
        .iter()
        .flat_map(|c| {
            c.lines.iter().enumerate().map(move |(n, l)| (c.attempt, c.first_line + n as u64, l.text.clone()))
        })
        .collect()
}

#[tokio::test]
async fn a_follower_sees_a_running_shell_tasks_lines_before_it_ends() -> TestResult {
    let data = tempfile::tempdir()?;
    let scratch = tempfile::tempdir()?;
    let (_server, endpoint) = spawn_serve_process(data.path(), &[]);
    let _agent = spawn_shell_agent_process(&endpoint, "logs-shell");
    let client = Client::connect(endpoint.clone()).await?;
    let gate = scratch.path().join("gate");
    let script = format!(
        "echo 'first line'; echo 'to stderr' >&2; while [ ! -e '{}' ]; do sleep 0.05; done; echo 'last line'",
        gate.display()
    );
    let task = client.submit(NewTask::new("shell").json(&json!({"argv": ["sh", "-c", script]}))?.build()).await?;

    let mut follower = Command::new(muster_bin())
        .args(["--server", &endpoint, "task", "logs", &task.id, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = follower.stdout.take().ok_or("no stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut next_line = async || -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(tokio::time::timeout(Duration::from_secs(30), rx.recv()).await?.transpose()?)
    };

    // stdout and stderr are separate pipes: their relative order is open.
    let mut early = vec![next_line().await?.ok_or("follower ended")?, next_line().await?.ok_or("follower ended")?];
    early.sort();
    assert_eq!(early, ["first line", "to stderr"]);
    assert_eq!(client.get(&task.id).await?.state, TaskState::Running, "the lines came while it ran");

    std::fs::write(&gate, b"")?;
    assert_eq!(next_line().await?.as_deref(), Some("last line"));
    assert_eq!(next_line().await?, None, "the follower ends with the task");
    assert!(follower.wait()?.success());
    assert_eq!(client.get(&task.id).await?.state, TaskState::Succeeded);

    let streams: Vec<(String, LogStream)> = read_logs(&client, &task.id, 0, false)
        .await?
        .iter()
        .flat_map(|c| c.lines.iter().map(|l| (l.text.clone(), l.stream)))
        .collect();
    assert!(streams.contains(&("to stderr".to_owned(), LogStream::Stderr)), "{streams:?}");
    assert!(streams.contains(&("last line".to_owned(), LogStream::Stdout)), "{streams:?}");
    Ok(())
}

#[tokio::test]
async fn the_tail_keeps_the_newest_lines_counts_the_rest_and_survives_a_restart() -> TestResult {
    let mut server = spawn_server_with(|c| c.limits.max_log_bytes_per_attempt = 8 * 1024).await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "chatty", "chatty", &[], 1, |ctx| async move {
        for i in 0..2000 {
            ctx.log(format!("line {i:04}"));
        }
        Ok(Output::empty())
    });
    let task = client.submit(NewTask::new("chatty").build()).await?;
    assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);

    let chunks = read_logs(&client, &task.id, 0, false).await?;
    let lines = lines_of(&chunks);
    assert!(lines.len() > 50 && lines.len() < 2000, "kept {} lines", lines.len());
    for (attempt, position, text) in &lines {
        assert_eq!((*attempt, text.as_str()), (1, format!("line {:04}", position - 1).as_str()));
    }
    assert_eq!(lines.last().map(|l| l.1), Some(2000), "the newest line is kept");
    let first = chunks.first().ok_or("no chunk")?;
    assert_eq!(first.dropped, first.first_line - 1, "every line before the tail is counted as dropped");
    assert!(chunks.last().is_some_and(|c| c.complete), "the attempt's log is complete");

    stop.cancel();
    agent.await??;
    let dir = server.dir.path().to_path_buf();
    server.server.take().ok_or("no server")?.shutdown().await?;
    let restarted = muster_server::start(make_config(&dir), muster_sdk::CancellationToken::new()).await?;
    let client = Client::connect(format!("http://{}", restarted.grpc_addr())).await?;
    let again = lines_of(&read_logs(&client, &task.id, 0, false).await?);
    assert_eq!(again, lines, "the persisted tail is served after a restart");
    restarted.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn logs_follow_a_task_across_attempts_until_it_ends() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "flaky", "flaky", &[], 1, |ctx| async move {
        ctx.log(format!("starting attempt {}", ctx.attempt()));
        if ctx.attempt() == 1 {
            return Err(TaskError::retryable("first attempts fail"));
        }
        ctx.log("done");
        Ok(Output::empty())
    });
    let spec = NewTask::new("flaky").max_attempts(2).backoff(Duration::from_millis(300), Duration::from_secs(1));
    let task = client.submit(spec.build()).await?;
    let chunks = read_logs(&client, &task.id, 0, true).await?;
    assert_eq!(client.get(&task.id).await?.state, TaskState::Succeeded, "the follow ended with the task");
    let lines: Vec<(u32, u64, String)> = lines_of(&chunks);
    assert_eq!(
        lines,
        [(1, 1, "starting attempt 1".to_owned()), (2, 1, "starting attempt 2".to_owned()), (2, 2, "done".to_owned())]
    );
    for attempt in [1, 2] {
        let last = chunks.iter().rfind(|c| c.attempt == attempt).ok_or("no chunk for an attempt")?;
        assert!(last.complete, "attempt {attempt} was marked complete: {chunks:?}");
    }
    let second = lines_of(&read_logs(&client, &task.id, 2, false).await?);
    assert_eq!(second.len(), 2, "one attempt only: {second:?}");

    // An attempt that never runs: following it ends when the task does.
    let quiet = client.submit(NewTask::new("flaky").max_attempts(2).backoff(Duration::ZERO, Duration::ZERO).build());
    let quiet = quiet.await?;
    let follow = tokio::spawn({
        let client = client.clone();
        let id = quiet.id.clone();
        async move { read_logs(&client, &id, 3, true).await }
    });
    let ended = tokio::time::timeout(Duration::from_secs(20), follow).await???;
    assert!(ended.is_empty(), "attempt 3 never ran: {ended:?}");

    // One attempt: the follow ends with that attempt, while the task waits
    // out its backoff.
    let waiting = NewTask::new("flaky").max_attempts(2).backoff(Duration::from_secs(600), Duration::from_secs(600));
    let waiting = client.submit(waiting.build()).await?;
    wait_for_state(&client, &waiting.id, TaskState::Pending).await;
    let first = tokio::time::timeout(Duration::from_secs(10), read_logs(&client, &waiting.id, 1, true)).await??;
    assert_eq!(lines_of(&first), [(1, 1, "starting attempt 1".to_owned())]);
    client.cancel(&waiting.id, "test over").await?;

    let status = match client.logs("01ARZ3NDEKTSV4RRFFQ69G5FAV", 0, false).await {
        Err(Error::Status(status)) => status,
        Err(other) => return Err(format!("expected NOT_FOUND, got {other:?}").into()),
        Ok(_) => return Err("expected NOT_FOUND, got a stream".into()),
    };
    assert_eq!(status.code(), Code::NotFound);
    let status = match client.logs("nope", 0, false).await {
        Err(Error::Status(status)) => status,
        Err(other) => return Err(format!("expected INVALID_ARGUMENT, got {other:?}").into()),
        Ok(_) => return Err("expected INVALID_ARGUMENT, got a stream".into()),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("task_id"), "{}", status.message());
    stop.cancel();
    agent.await??;
    Ok(())
}

fn log_message(task_id: &str, attempt: u32, text: &str) -> proto::AgentMessage {
    proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Log(proto::LogLines {
            attempt: Some(proto::AttemptRef::new(task_id, attempt)),
            lines: vec![proto::LogLine { text: text.to_owned(), ..Default::default() }],
            dropped: 0,
        })),
    }
}

#[tokio::test]
async fn lines_for_attempts_a_session_does_not_hold_are_ignored() -> TestResult {
    use proto::agent_message::Msg;
    let server = spawn_server().await;
    let client = server.client().await;
    let (owner_tx, owner) = open_session(&server.endpoint, register("owner", 1)).await;
    let mut owner = owner?;
    owner.message().await?.ok_or("no registered")?;
    let task = client.submit(NewTask::new("raw").build()).await?;
    let assignment = loop {
        match owner.message().await?.ok_or("session ended")?.msg {
            Some(proto::server_message::Msg::Assign(assign)) => break assign,
            _ => continue,
        }
    };
    let attempt = assignment.attempt.ok_or("no attempt")?;
    owner_tx
        .send(proto::AgentMessage { msg: Some(Msg::Accept(proto::Accept { attempt: Some(attempt.clone()) })) })
        .await?;

    // Another session forges lines for the owner's attempt and for a task
    // that does not exist: both are ignored, and its session stays open.
    let (intruder_tx, intruder) = open_session(&server.endpoint, register("intruder", 1)).await;
    let mut intruder = intruder?;
    intruder.message().await?.ok_or("no registered")?;
    intruder_tx.send(log_message(&task.id, attempt.attempt, "forged")).await?;
    intruder_tx.send(log_message("01ARZ3NDEKTSV4RRFFQ69G5FAV", 1, "nowhere")).await?;

    owner_tx.send(log_message(&task.id, attempt.attempt, "genuine")).await?;
    let complete = proto::Complete { attempt: Some(attempt.clone()), ..Default::default() };
    owner_tx.send(proto::AgentMessage { msg: Some(Msg::Complete(complete)) }).await?;
    // Lines after the result are past the attempt's end.
    owner_tx.send(log_message(&task.id, attempt.attempt, "too late")).await?;
    wait_for_state(&client, &task.id, TaskState::Succeeded).await;

    let texts: Vec<String> = lines_of(&read_logs(&client, &task.id, 0, true).await?).into_iter().map(|l| l.2).collect();
    assert_eq!(texts, ["genuine"]);
    let still_open = tokio::time::timeout(Duration::from_millis(500), intruder.message()).await;
    assert!(still_open.is_err(), "the intruder's session was not closed: {still_open:?}");
    drop(intruder_tx);
    Ok(())
}

#[tokio::test]
async fn oversized_or_overflowing_log_messages_close_only_their_session() -> TestResult {
    use proto::agent_message::Msg;
    let server = spawn_server().await;
    let client = server.client().await;
    let closing =
        async |message: proto::AgentMessage| -> Result<tonic::Status, Box<dyn std::error::Error + Send + Sync>> {
            let (tx, session) = open_session(&server.endpoint, register("noisy", 1)).await;
            let mut session = session?;
            session.message().await?.ok_or("no registered")?;
            let task = client.submit(NewTask::new("raw").build()).await?;
            let attempt = loop {
                if let Some(proto::server_message::Msg::Assign(assign)) = session.message().await?.ok_or("ended")?.msg {
                    break assign.attempt.ok_or("no attempt")?;
                }
            };
            let mut message = message;
            if let Some(Msg::Log(log)) = &mut message.msg {
                log.attempt = Some(attempt);
            }
            tx.send(message).await?;
            loop {
                match session.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("the session ended without an error".into()),
                    Err(status) => {
                        client.cancel(&task.id, "test over").await?;
                        return Ok(status);
                    }
                }
            }
        };
    let lines = vec![proto::LogLine::default(); 5000];
    let status =
        closing(proto::AgentMessage { msg: Some(Msg::Log(proto::LogLines { attempt: None, lines, dropped: 0 })) })
            .await?;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("max_log_lines_per_message"), "{}", status.message());
    let status = closing(proto::AgentMessage {
        msg: Some(Msg::Log(proto::LogLines { attempt: None, lines: Vec::new(), dropped: u64::MAX })),
    })
    .await?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("log.dropped"), "{}", status.message());
    Ok(())
}
