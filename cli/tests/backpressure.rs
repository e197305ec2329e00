//! Agents that stop reading their stream, over real gRPC: the server's
//! queue to each session is bounded, and a session whose queue overflows
//! is closed alone.

mod common;

use std::time::Duration;

use common::*;
use muster_sdk::{AgentState, NewTask, Output, TaskState, proto};
use tonic::Code;

#[tokio::test]
async fn an_agent_that_stops_reading_is_disconnected_and_only_its_session_closes() -> TestResult {
    let server = spawn_server_with(|c| {
        c.limits.max_session_queue = 16;
        c.limits.max_agent_messages_per_second = 1_000_000;
    })
    .await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "good", "good", &[], 1, |_| async { Ok(Output::from("fine")) });

    // A raw session on its own connection with a small receive window, so
    // that what the network can hold for it fills after a few thousand
    // answers; it sends heartbeats (each one answered) and never reads.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())?
        .initial_stream_window_size(Some(4096))
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(register("deaf", 1)).await?;
    let mut inbound = proto::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    wait_for_agents(&client, "raw", 1).await;
    // It holds an attempt, which it will never read about.
    let held = client.submit(NewTask::new("raw").build()).await?;
    wait_for_state(&client, &held.id, TaskState::Assigned).await;
    let flooding = muster_sdk::CancellationToken::new();
    let sender = tokio::spawn({
        let flooding = flooding.clone();
        async move {
            let mut sent = 0u64;
            while !flooding.is_cancelled() {
                let heartbeat =
                    proto::AgentMessage { msg: Some(proto::agent_message::Msg::Heartbeat(proto::Heartbeat {})) };
                if tx.send(heartbeat).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        }
    });

    // The server gives up on it: the session is no longer connected.
    eventually(Duration::from_secs(30), "the session that does not read is closed", || async {
        client.list_agents("raw").await.is_ok_and(|agents| !agents.iter().any(|a| a.state == AgentState::Connected))
    })
    .await;
    flooding.cancel();
    let sent = sender.await?;

    // Reading now, the agent finds what was in flight, then the reason.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await?
    .ok_or("the stream should end with an error")?;
    assert_eq!(closed.code(), Code::ResourceExhausted, "{closed:?}");
    assert!(
        closed.message().contains("not reading its stream: 16 messages queued (max_session_queue)"),
        "{} (after {sent} heartbeats)",
        closed.message()
    );

    // The well-behaved agent on the same server never noticed.
    wait_for_agents(&client, "good", 1).await;
    let task = client.submit(NewTask::new("good").build()).await?;
    assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);

    // Its attempt followed the lease, as after any disconnect: lost when
    // the lease ran out, then retried on another agent.
    let (stop_survivor, survivor) =
        spawn_agent(&server.endpoint, "survivor", "raw", &[], 1, |_| async { Ok(Output::from("done")) });
    let done = client.wait(&held.id).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2);
    assert_eq!(done.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some("agent_lost"));
    stop.cancel();
    stop_survivor.cancel();
    agent.await??;
    survivor.await??;
    Ok(())
}

#[tokio::test]
async fn an_agent_that_floods_and_does_not_read_is_closed_at_once_not_after_its_lease() -> TestResult {
    // The queue is large enough never to overflow here, and the lease long:
    // only the rate limit can end this session within the test.
    let server = spawn_server_with(|c| {
        c.limits.max_session_queue = 1 << 20;
        c.limits.max_agent_messages_per_second = 2_000;
        c.lease_ttl = Duration::from_secs(120);
    })
    .await;
    let client = server.client().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())?
        .initial_stream_window_size(Some(4096))
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(register("flood", 1)).await?;
    let _inbound = proto::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    wait_for_agents(&client, "raw", 1).await;
    // Heartbeats as fast as the connection takes them, each answered, none
    // read: the answers fill the stream, then the rate limit trips while
    // there is no room left for its error.
    let flooding = tokio::spawn(async move {
        let heartbeat = proto::AgentMessage { msg: Some(proto::agent_message::Msg::Heartbeat(proto::Heartbeat {})) };
        for _ in 0..1_000_000 {
            if tx.send(heartbeat.clone()).await.is_err() {
                break;
            }
        }
    });
    eventually(Duration::from_secs(15), "the flooding session is closed well within its lease", || async {
        client.list_agents("raw").await.is_ok_and(|agents| !agents.iter().any(|a| a.state == AgentState::Connected))
    })
    .await;
    flooding.abort();
    Ok(())
}
