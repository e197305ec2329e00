//! Fault tests with real processes: agents and servers killed with
//! SIGKILL, agents drained with SIGTERM.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use muster_sdk::{Client, NewTask, Output, TaskState, proto};
use tokio::sync::Mutex;

fn shell_payload(script: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"argv": ["sh", "-c", script]})).unwrap_or_default()
}

#[tokio::test]
async fn an_agent_killed_mid_task_hands_the_task_to_another_agent() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let marker = server.dir.path().join("first-attempt-started");
    let pid_file = server.dir.path().join("first-attempt.pid");
    let script = format!(
        "if [ -e '{m}' ]; then echo second attempt; else touch '{m}'; echo $$ > '{p}'; exec sleep 30; fi",
        m = marker.display(),
        p = pid_file.display()
    );
    let mut first = spawn_shell_agent_process(&server.endpoint, "doomed");
    wait_for_agents(&client, "shell", 1).await;
    let task = client.submit(NewTask::new("shell").payload(shell_payload(&script)).build()).await?;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    eventually(Duration::from_secs(5), "the first attempt to start", || async { pid_file.exists() }).await;

    first.kill9();
    let _second = spawn_shell_agent_process(&server.endpoint, "survivor");
    let done = client.wait(&task.id).await?;
    // The orphaned sleep of the killed agent is not ours to keep.
    if let Ok(pid) = std::fs::read_to_string(&pid_file).map(|s| s.trim().parse::<i32>().unwrap_or(0))
        && pid > 0
    {
        // SAFETY: kill(2) with a pid read from the file our script wrote.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some("agent_lost"));
    assert_eq!(done.attempts[1].agent_name, "survivor");
    let output: serde_json::Value = serde_json::from_slice(&done.output)?;
    assert_eq!(output["stdout"], "second attempt\n");
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_an_agent_letting_its_running_task_finish() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let mut agent = spawn_shell_agent_process(&server.endpoint, "draining");
    wait_for_agents(&client, "shell", 1).await;
    let task = client.submit(NewTask::new("shell").payload(shell_payload("sleep 1; echo finished")).build()).await?;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(agent.pid(), libc::SIGTERM) };
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded, "running work finishes during a drain");
    let status = tokio::task::spawn_blocking(move || agent.child.wait()).await??;
    assert!(status.success(), "the drained agent exits cleanly: {status:?}");
    Ok(())
}

#[tokio::test]
async fn a_server_killed_with_sigkill_under_load_loses_nothing_it_acknowledged() -> TestResult {
    sigkill_under_load(&[]).await
}

#[tokio::test]
async fn a_server_on_postgres_killed_with_sigkill_under_load_loses_nothing_it_acknowledged() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    sigkill_under_load(&["--store", &pg.url(), "--leader-lease-ttl", "1s"]).await
}

/// Kills the server with SIGKILL under load and starts it again on the
/// same store (`store`: more `muster serve` arguments).
async fn sigkill_under_load(store: &[&str]) -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut args = vec!["--durability", "sync", "--lease-ttl", "2s", "--heartbeat-interval", "300ms"];
    args.extend_from_slice(store);
    let (mut server, endpoint) = spawn_serve_process(dir.path(), &args);
    let client = Client::connect(endpoint.clone()).await?;
    let (stop, agent) = spawn_agent(&endpoint, "worker", "noop", &[], 8, |_| async { Ok(Output::from("done")) });

    // Every SUCCEEDED the watch reports was durable when it was published.
    let succeeded = Arc::new(Mutex::new(HashSet::new()));
    let mut events = client
        .watch(proto::WatchTasksRequest { states: vec![i32::from(TaskState::Succeeded)], ..Default::default() })
        .await?;
    let seen = succeeded.clone();
    let watcher = tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            if event.state == TaskState::Succeeded {
                seen.lock().await.insert(event.task_id);
            }
        }
    });

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut submitters = Vec::new();
    for worker in 0..4 {
        let client = client.clone();
        let acked = acknowledged.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let spec = NewTask::new("noop").metadata("worker", worker.to_string()).metadata("i", i.to_string());
                match client.submit(spec.build()).await {
                    Ok(task) => acked.lock().await.push(task.id),
                    Err(_) => return,
                }
            }
        }));
    }
    eventually(Duration::from_secs(30), "load to build up", || async {
        acknowledged.lock().await.len() >= 400 && succeeded.lock().await.len() >= 100
    })
    .await;
    server.kill9();
    for s in submitters {
        let _ = s.await;
    }
    stop.cancel();
    let _ = agent.await;
    let _ = watcher.await;

    let acknowledged = acknowledged.lock().await.clone();
    let succeeded = succeeded.lock().await.clone();
    let (_restarted, endpoint) = spawn_serve_process(dir.path(), store);
    let client = Client::connect(endpoint).await?;
    wait_until_serving(&client).await;
    for id in &acknowledged {
        let task = client.get(id).await.map_err(|e| format!("acknowledged task {id} was lost: {e}"))?;
        if succeeded.contains(id) {
            assert_eq!(task.state, TaskState::Succeeded, "task {id} lost its acknowledged result");
        }
    }
    println!("{} acknowledged submits and {} results survived kill -9", acknowledged.len(), succeeded.len());
    Ok(())
}
