//! Bad input over real gRPC: every limit answered with the right status
//! and a message naming the field and the limit; hostile agent streams
//! close only their own session.

mod common;

use std::time::Duration;

use common::*;
use muster_sdk::{Error, NewTask, Output, TaskState, proto};
use tonic::Code;

fn status_of(result: Result<impl std::fmt::Debug, Error>) -> tonic::Status {
    match result {
        Err(Error::Status(status)) => status,
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test]
async fn every_submit_limit_is_answered_with_a_clear_error() -> TestResult {
    let server = spawn_server_with(|c| {
        c.limits.max_payload_bytes = 1024;
        c.limits.max_tasks_per_submit = 5;
        c.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    let client = server.client().await;
    let long = "k".repeat(64);
    let cases: Vec<(&str, proto::TaskSpec, Code, &str)> = vec![
        ("empty capability", NewTask::new("").build(), Code::InvalidArgument, "tasks[0].capability: must not be empty"),
        ("odd capability", NewTask::new("rm -rf").build(), Code::InvalidArgument, "tasks[0].capability"),
        ("long capability", NewTask::new("c".repeat(129)).build(), Code::ResourceExhausted, "max_name_len"),
        ("bad queue", NewTask::new("shell").queue("a queue").build(), Code::InvalidArgument, "tasks[0].queue"),
        (
            "payload over the limit",
            NewTask::new("shell").payload(vec![0u8; 1025]).build(),
            Code::ResourceExhausted,
            "tasks[0].payload: 1025 bytes is over the limit of 1024 (max_payload_bytes)",
        ),
        (
            "too much metadata",
            (0..33).fold(NewTask::new("shell"), |t, i| t.metadata(format!("k{i}"), "v")).build(),
            Code::ResourceExhausted,
            "max_metadata_entries",
        ),
        (
            "long selector key",
            NewTask::new("shell").selector(long.clone(), "v").build(),
            Code::ResourceExhausted,
            "max_key_len",
        ),
        (
            "long metadata value",
            NewTask::new("shell").metadata("k", "v".repeat(1025)).build(),
            Code::ResourceExhausted,
            "max_value_len",
        ),
        (
            "timeout over the limit",
            NewTask::new("shell").timeout(Duration::from_secs(8 * 24 * 3600)).build(),
            Code::InvalidArgument,
            "tasks[0].timeout: must be at most 7d (max_timeout)",
        ),
        ("too many attempts", NewTask::new("shell").max_attempts(101).build(), Code::ResourceExhausted, "max_attempts"),
        (
            "backoff cap below its start",
            NewTask::new("shell").backoff(Duration::from_secs(10), Duration::from_secs(1)).build(),
            Code::InvalidArgument,
            "retry.max_backoff",
        ),
        (
            "long idempotency key",
            NewTask::new("shell").idempotency_key("i".repeat(257)).build(),
            Code::ResourceExhausted,
            "max_idempotency_key_len",
        ),
    ];
    for (what, spec, code, needle) in cases {
        let status = status_of(client.submit(spec).await);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().contains(needle), "{what}: {:?} lacks {needle:?}", status.message());
    }

    let too_many = (0..6).map(|_| NewTask::new("shell").build()).collect();
    let status = status_of(client.submit_many(too_many).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("max_tasks_per_submit"), "{}", status.message());

    let status = status_of(client.submit_many(vec![]).await);
    assert_eq!(status.code(), Code::InvalidArgument);

    // A batch with one bad task creates none of them.
    let batch = vec![NewTask::new("shell").build(), NewTask::new("bad name").build()];
    let status = status_of(client.submit_many(batch).await);
    assert!(status.message().starts_with("tasks[1].capability"), "{}", status.message());
    let listing = client.list(proto::ListTasksRequest::default()).await?;
    assert!(listing.tasks.is_empty(), "nothing was half-written");

    let huge = NewTask::new("shell").payload(vec![0u8; 100 * 1024]).build();
    let status = status_of(client.submit(huge).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "message over max_message_bytes: {status:?}");
    assert!(status.message().contains("max_message_bytes (65536 bytes)"), "{}", status.message());

    let status = status_of(client.get("not-an-id").await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("id:"), "{}", status.message());
    let status = status_of(client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV").await);
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status_of(client.retry("01ARZ3NDEKTSV4RRFFQ69G5FAV").await).code(), Code::NotFound);
    assert_eq!(status_of(client.get_agent("nope").await).code(), Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn malformed_and_hostile_agent_streams_close_only_their_own_session() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "good", "good", &[], 1, |_| async { Ok(Output::from("fine")) });

    let heartbeat = proto::AgentMessage { msg: Some(proto::agent_message::Msg::Heartbeat(proto::Heartbeat {})) };
    let (_tx, response) = open_session(&server.endpoint, heartbeat).await;
    let status = response.err().ok_or("a heartbeat first must be refused")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("register"), "{}", status.message());

    let (_tx, response) = open_session(&server.endpoint, register("zero", 0)).await;
    let status = response.err().ok_or("zero slots must be refused")?;
    assert!(status.message().contains("register.slots"), "{}", status.message());
    let (_tx, response) = open_session(&server.endpoint, register("many", 5000)).await;
    let status = response.err().ok_or("too many slots must be refused")?;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("max_agent_slots"), "{}", status.message());

    // A registered session that reports an attempt it was never given is
    // rejected, changes nothing, and keeps its session.
    let (tx, response) = open_session(&server.endpoint, register("intruder", 1)).await;
    let mut inbound = response?;
    let registered = inbound.message().await?.ok_or("no registered message")?;
    assert!(matches!(registered.msg, Some(proto::server_message::Msg::Registered(_))));
    let victim = client.submit(NewTask::new("nobody").build()).await?;
    let forged = proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Complete(proto::Complete {
            attempt: Some(proto::AttemptRef::new(victim.id.clone(), 1)),
            output: b"forged".to_vec(),
            content_type: String::new(),
        })),
    };
    tx.send(forged).await?;
    let rejected = loop {
        match inbound.message().await?.and_then(|m| m.msg) {
            Some(proto::server_message::Msg::Rejected(rejected)) => break rejected,
            Some(_) => continue,
            None => return Err("the session ended instead of rejecting the report".into()),
        }
    };
    assert_eq!(rejected.attempt.map(|a| a.task_id), Some(victim.id.clone()));
    assert_eq!(client.get(&victim.id).await?.state, TaskState::Queued, "the forgery changed nothing");
    let heartbeat = proto::AgentMessage { msg: Some(proto::agent_message::Msg::Heartbeat(proto::Heartbeat {})) };
    tx.send(heartbeat).await?;
    let answer = inbound.message().await?.and_then(|m| m.msg);
    assert!(matches!(answer, Some(proto::server_message::Msg::Heartbeat(_))), "the session is still open: {answer:?}");

    // A message with no variant is malformed.
    let (tx, response) = open_session(&server.endpoint, register("garbage", 1)).await;
    let mut inbound = response?;
    inbound.message().await?;
    tx.send(proto::AgentMessage { msg: None }).await?;
    let closed = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(closed.map(|s| s.code()), Some(Code::InvalidArgument));

    // The well-behaved agent never noticed.
    let task = client.submit(NewTask::new("good").build()).await?;
    assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn a_flooding_agent_session_is_closed_with_resource_exhausted() -> TestResult {
    let server = spawn_server_with(|c| c.limits.max_agent_messages_per_second = 50).await;
    let (tx, response) = open_session(&server.endpoint, register("flood", 1)).await;
    let mut inbound = response?;
    inbound.message().await?;
    let sender = tokio::spawn(async move {
        for _ in 0..1000 {
            let heartbeat =
                proto::AgentMessage { msg: Some(proto::agent_message::Msg::Heartbeat(proto::Heartbeat {})) };
            if tx.send(heartbeat).await.is_err() {
                return;
            }
        }
    });
    let closed = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let closed = closed.ok_or("the session should end with an error")?;
    assert_eq!(closed.code(), Code::ResourceExhausted);
    assert!(closed.message().contains("max_agent_messages_per_second"), "{}", closed.message());
    sender.abort();
    Ok(())
}
