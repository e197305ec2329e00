//! The bundled agents and the guide's example agent over real gRPC: a real
//! server on 127.0.0.1:0 with sled in a temp dir, the agents in this
//! process, real child processes for the shell agent.

mod common;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../../agent-sdk/examples/word_count.rs"]
mod word_count;

use std::time::Duration;

use common::*;
use muster_sdk::{CancellationToken, NewTask, TaskState};
use muster_shell_agent::ShellAgentConfig;
use serde_json::{Value, json};

fn spawn_shell(endpoint: &str, kill_grace: Duration) -> Result<CancellationToken, muster_sdk::Error> {
    let config = ShellAgentConfig {
        server: endpoint.to_owned(),
        name: "plugins-shell".to_owned(),
        slots: 2,
        kill_grace,
        ..ShellAgentConfig::default()
    };
    let agent = muster_shell_agent::build_agent(&config)?;
    let token = CancellationToken::new();
    tokio::spawn(agent.run_until(token.clone()));
    Ok(token)
}

#[tokio::test]
async fn the_guide_example_agent_completes_a_task() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let agent = word_count::build(&server.endpoint)?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(agent.run_until(stop.clone()));
    let spec = NewTask::new("word-count").json(&json!({"text": "one two\nthree", "pause_ms": 10}))?.build();
    let task = client.submit(spec).await?;
    let done = tokio::time::timeout(Duration::from_secs(20), client.wait(&task.id)).await??;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let output: Value = serde_json::from_slice(&done.output)?;
    assert_eq!(output, json!({"lines": 2, "words": 3}));

    let bad = client.submit(NewTask::new("word-count").payload(b"not json".to_vec()).build()).await?;
    let bad = tokio::time::timeout(Duration::from_secs(20), client.wait(&bad.id)).await??;
    assert_eq!(bad.state, TaskState::Failed);
    assert_eq!(bad.failure.map(|f| f.reason).as_deref(), Some("invalid_payload"));
    stop.cancel();
    running.await??;
    Ok(())
}

#[tokio::test]
async fn a_shell_task_past_its_timeout_is_stopped_and_recorded_as_timeout() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let stop = spawn_shell(&server.endpoint, Duration::from_millis(200))?;
    let spec = NewTask::new("shell")
        .json(&json!({"argv": ["sh", "-c", "trap '' TERM; sleep 60"]}))?
        .timeout(Duration::from_millis(500))
        .max_attempts(1)
        .build();
    let task = client.submit(spec).await?;
    let done = tokio::time::timeout(Duration::from_secs(20), client.wait(&task.id)).await??;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    let failure = done.failure.unwrap_or_default();
    assert_eq!(failure.reason, "timeout", "{failure:?}");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn a_cancelled_shell_task_ignoring_sigterm_ends_cancelled() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let stop = spawn_shell(&server.endpoint, Duration::from_millis(200))?;
    let spec = NewTask::new("shell").json(&json!({"argv": ["sh", "-c", "trap '' TERM; sleep 60"]}))?.build();
    let task = client.submit(spec).await?;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    client.cancel(&task.id, "test").await?;
    let done = tokio::time::timeout(Duration::from_secs(20), client.wait(&task.id)).await??;
    assert_eq!(done.state, TaskState::Cancelled, "{done:?}");
    assert_eq!(done.failure.map(|f| f.reason).as_deref(), Some("cancelled"));
    stop.cancel();
    Ok(())
}
