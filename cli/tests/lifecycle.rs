//! The task lifecycle over real gRPC: a real server on 127.0.0.1:0 with
//! sled in a temp dir, agents and clients built on the real SDK.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use muster_sdk::{AgentState, EventKind, NewTask, Output, TaskError, TaskState, proto};
use tokio::sync::{Mutex, Notify};

#[tokio::test]
async fn a_task_runs_on_an_sdk_agent_and_its_output_and_events_come_back() -> TestResult {
    lifecycle(spawn_server().await).await
}

#[tokio::test]
async fn a_task_runs_through_its_lifecycle_on_postgres() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    lifecycle(spawn_server_on_postgres(&pg.url()).await).await
}

async fn lifecycle(server: TestServer) -> TestResult {
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "echo", "echo", &[], 2, |ctx| async move {
        ctx.progress(50, "halfway").await;
        Ok(Output::from(ctx.payload().to_vec()))
    });
    let task = client.submit(NewTask::new("echo").payload(b"hello".to_vec()).build()).await?;
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, b"hello");
    assert_eq!(done.attempt, 1);

    let mut events = client
        .watch(proto::WatchTasksRequest { task_id: task.id.clone(), from_start: true, ..Default::default() })
        .await?;
    let mut states = Vec::new();
    while let Some(event) = events.next().await {
        let event = event?;
        if event.kind == EventKind::State {
            states.push(event.state);
        }
        if event.state == TaskState::Succeeded {
            break;
        }
    }
    use TaskState::*;
    assert_eq!(states, vec![Queued, Assigned, Running, Succeeded]);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn priorities_run_highest_first_and_fifo_within_a_level() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let mut ids = Vec::new();
    for priority in [
        proto::Priority::Low,
        proto::Priority::Normal,
        proto::Priority::Critical,
        proto::Priority::High,
        proto::Priority::Critical,
    ] {
        ids.push(client.submit(NewTask::new("ordered").priority(priority).build()).await?.id);
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = order.clone();
    let (stop, agent) = spawn_agent(&server.endpoint, "one-slot", "ordered", &[], 1, move |ctx| {
        let seen = seen.clone();
        async move {
            seen.lock().await.push(ctx.task_id().to_owned());
            Ok(Output::empty())
        }
    });
    for id in &ids {
        client.wait(id).await?;
    }
    let order = order.lock().await.clone();
    let expected: Vec<String> = [2, 4, 3, 1, 0].iter().map(|&i| ids[i].clone()).collect();
    assert_eq!(order, expected);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn selectors_send_tasks_only_to_agents_with_matching_labels() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop_cpu, cpu) =
        spawn_agent(&server.endpoint, "cpu", "render", &[("gpu", "false")], 4, |_| async { Ok(Output::from("cpu")) });
    let (stop_gpu, gpu) =
        spawn_agent(&server.endpoint, "gpu", "render", &[("gpu", "true")], 4, |_| async { Ok(Output::from("gpu")) });
    wait_for_agents(&client, "render", 2).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(client.submit(NewTask::new("render").selector("gpu", "true").build()).await?.id);
    }
    for id in &ids {
        let task = client.wait(id).await?;
        assert_eq!(task.output, b"gpu", "task {id} ran on the wrong agent");
    }
    let unmatched = client.submit(NewTask::new("render").selector("gpu", "tpu").build()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(&unmatched.id).await?.state, TaskState::Queued);
    stop_cpu.cancel();
    stop_gpu.cancel();
    cpu.await??;
    gpu.await??;
    Ok(())
}

#[tokio::test]
async fn cancelling_a_running_task_fires_the_handlers_token() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let started = Arc::new(Notify::new());
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let (s, c) = (started.clone(), saw_cancel.clone());
    let (stop, agent) = spawn_agent(&server.endpoint, "slow", "slow", &[], 1, move |ctx| {
        let (s, c) = (s.clone(), c.clone());
        async move {
            s.notify_one();
            tokio::select! {
                _ = ctx.cancelled() => {
                    c.store(true, Ordering::SeqCst);
                    Err(TaskError::fatal("stopped on request"))
                }
                _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(Output::empty()),
            }
        }
    });
    let task = client.submit(NewTask::new("slow").build()).await?;
    started.notified().await;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    let requested = client.cancel(&task.id, "operator asked").await?;
    assert!(requested.cancel_requested);
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Cancelled);
    assert!(saw_cancel.load(Ordering::SeqCst), "the handler saw the cancellation");
    assert_eq!(done.failure.map(|f| f.message), Some("operator asked".to_owned()));

    let queued = client.submit(NewTask::new("nobody-has-this").build()).await?;
    let cancelled = client.cancel(&queued.id, "").await?;
    assert_eq!(cancelled.state, TaskState::Cancelled, "a queued task is cancelled at once");
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn an_agent_that_reconnects_within_the_lease_keeps_its_task_and_runs_it_once() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let upstream = server.server.as_ref().map(|s| s.grpc_addr()).ok_or("server")?;
    let proxy = Proxy::start(upstream).await;
    let runs = Arc::new(AtomicU32::new(0));
    let release = Arc::new(Notify::new());
    let (r, rel) = (runs.clone(), release.clone());
    let (stop, agent) = spawn_agent(&proxy.endpoint(), "flaky-net", "work", &[], 1, move |_| {
        let (r, rel) = (r.clone(), rel.clone());
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            rel.notified().await;
            Ok(Output::from("done"))
        }
    });
    let task = client.submit(NewTask::new("work").build()).await?;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    let agent_id = client.list_agents("work").await?[0].id.clone();

    proxy.cut();
    eventually(Duration::from_secs(5), "the server to see the break", || async {
        client.get_agent(&agent_id).await.map(|a| a.state == AgentState::Disconnected).unwrap_or(false)
    })
    .await;
    eventually(Duration::from_secs(5), "the agent to resume", || async {
        client.get_agent(&agent_id).await.map(|a| a.state == AgentState::Connected).unwrap_or(false)
    })
    .await;
    release.notify_one();
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.attempt, 1, "the same attempt completed");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "no second execution");
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn an_agent_cut_off_for_the_lease_fences_itself_and_the_task_moves_on() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let upstream = server.server.as_ref().map(|s| s.grpc_addr()).ok_or("server")?;
    let proxy = Proxy::start(upstream).await;
    let fenced = Arc::new(AtomicBool::new(false));
    let f = fenced.clone();
    let (stop_a, a) = spawn_agent(&proxy.endpoint(), "isolated", "work", &[], 1, move |ctx| {
        let f = f.clone();
        async move {
            ctx.cancelled().await;
            f.store(true, Ordering::SeqCst);
            Err(TaskError::retryable("cancelled"))
        }
    });
    let task = client.submit(NewTask::new("work").build()).await?;
    wait_for_state(&client, &task.id, TaskState::Running).await;
    proxy.pause();
    proxy.cut();
    eventually(Duration::from_secs(10), "the isolated handler to be cancelled", || async {
        fenced.load(Ordering::SeqCst)
    })
    .await;
    let (stop_b, b) = spawn_agent(&server.endpoint, "healthy", "work", &[], 1, |_| async { Ok(Output::from("b")) });
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, b"b");
    assert_eq!(done.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some("agent_lost"));
    stop_a.cancel();
    stop_b.cancel();
    let _ = a.await?;
    b.await??;
    Ok(())
}

#[tokio::test]
async fn a_watch_from_a_listings_sequence_misses_no_event_and_resumes_mid_stream() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    client.submit(NewTask::new("nothing").build()).await?;
    let listing = client.list(proto::ListTasksRequest::default()).await?;
    assert_eq!(listing.tasks.len(), 1);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(client.submit(NewTask::new("nothing").build()).await?.id);
    }
    let mut events =
        client.watch(proto::WatchTasksRequest { after_sequence: listing.sequence, ..Default::default() }).await?;
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let event = events.next().await.ok_or("stream ended")??;
        seen.push((event.sequence, event.task_id));
    }
    assert_eq!(seen.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(), ids);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "sequence numbers increase");

    let resume_from = seen[9].0;
    let mut resumed =
        client.watch(proto::WatchTasksRequest { after_sequence: resume_from, ..Default::default() }).await?;
    let first = resumed.next().await.ok_or("stream ended")??;
    assert_eq!(first.sequence, seen[10].0);
    Ok(())
}

#[tokio::test]
async fn idempotency_keys_retry_and_drain_work_over_grpc() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let first = client.submit(NewTask::new("flaky").idempotency_key("job-1").max_attempts(1).build()).await?;
    let again = client.submit_many(vec![NewTask::new("flaky").idempotency_key("job-1").build()]).await?;
    assert_eq!(again.tasks[0].id, first.id);
    assert_eq!(again.existing, vec![true]);

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let (stop, agent) = spawn_agent(&server.endpoint, "flaky", "flaky", &[], 1, move |_| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { if n == 0 { Err(TaskError::retryable("first try fails")) } else { Ok(Output::from("ok")) } }
    });
    let failed = client.wait(&first.id).await?;
    assert_eq!(failed.state, TaskState::Failed, "one attempt allowed");
    let retried = client.retry(&first.id).await?;
    assert_eq!(retried.state, TaskState::Queued);
    let done = client.wait(&first.id).await?;
    assert_eq!((done.state, done.attempt), (TaskState::Succeeded, 2));

    wait_for_agents(&client, "flaky", 1).await;
    let agent_id = client.list_agents("flaky").await?[0].id.clone();
    let drained = client.drain_agent(&agent_id).await?;
    assert_eq!(drained.state, AgentState::Draining);
    let held = client.submit(NewTask::new("flaky").build()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(&held.id).await?.state, TaskState::Queued, "a drained agent takes no work");
    client.resume_agent(&agent_id).await?;
    assert_eq!(client.wait(&held.id).await?.state, TaskState::Succeeded);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn a_delayed_task_waits_for_not_before() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "later", "later", &[], 1, |_| async { Ok(Output::empty()) });
    let at = std::time::SystemTime::now() + Duration::from_millis(800);
    let task = client.submit(NewTask::new("later").not_before(at).build()).await?;
    assert_eq!(task.state, TaskState::Pending);
    let done = client.wait(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded);
    assert!(std::time::SystemTime::now() >= at);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn relaxed_durability_serves_the_same_lifecycle() -> TestResult {
    let server = spawn_server_with(|c| c.durability = muster_server::Durability::Relaxed).await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "fast", "fast", &[], 4, |_| async { Ok(Output::from("ok")) });
    let specs = (0..50).map(|_| NewTask::new("fast").build()).collect();
    let submitted = client.submit_many(specs).await?;
    for task in &submitted.tasks {
        assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);
    }
    stop.cancel();
    agent.await??;
    Ok(())
}
