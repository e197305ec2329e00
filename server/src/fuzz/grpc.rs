//! Arbitrary message streams into real agent sessions: one server on
//! 127.0.0.1 over an in-memory store, and per case one `Connect` stream
//! carrying any first message and then any mix of well-formed reports for
//! the attempts it was assigned, malformed or foreign messages and log
//! lines. Whatever a stream carries, it ends only its own session: the
//! session ends once the client closes its half (a reader that panicked
//! would leave it hanging), no call fails with INTERNAL or UNKNOWN, and
//! the server keeps accepting submits and reports itself serving.

use std::sync::OnceLock;

use muster_proto::pb;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::session::{Target, log_line, target};
use super::*;
use crate::config::{Limits, ServerConfig};
use crate::{RunningServer, store::MemoryStore};

/// The capability every fuzzed session registers.
const CAPABILITY: &str = "fuzz";

/// One server for every case, on its own runtime.
struct Shared {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    _server: RunningServer,
    _dir: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        let dir = tempfile::tempdir().expect("a temp dir");
        let (server, channel) = runtime.block_on(async {
            let config = ServerConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                http_listen: ([127, 0, 0, 1], 0).into(),
                data_dir: dir.path().to_path_buf(),
                lease_ttl: Duration::from_secs(2),
                heartbeat_interval: Duration::from_millis(500),
                limits: Limits { max_log_lines_per_message: 4, max_agent_slots: 4, ..Limits::default() },
                ..ServerConfig::default()
            };
            let store = std::sync::Arc::new(MemoryStore::new());
            let server =
                crate::start_with_store(config, store, CancellationToken::new()).await.expect("the server starts");
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr()))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            (server, channel)
        });
        Shared { runtime, channel, _server: server, _dir: dir }
    })
}

#[derive(Clone, Debug)]
enum Step {
    /// Any message, its attempt reference pointed at `Target`.
    Raw(pb::AgentMessage, Target),
    /// A well-formed report for an attempt the session was assigned.
    Work(prop::sample::Index, u8),
    /// Log lines for an assigned attempt (`None`) or for `Target`.
    Log(prop::sample::Index, Option<Target>, Vec<pb::LogLine>, u64),
    /// Lets the server answer before the next message.
    Pause,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (super::wire::agent_message(), target()).prop_map(|(m, t)| Step::Raw(m, t)),
        6 => (any::<prop::sample::Index>(), 0u8..5).prop_map(|(i, kind)| Step::Work(i, kind)),
        3 => (
            any::<prop::sample::Index>(),
            prop_oneof![4 => Just(None), 1 => target().prop_map(Some)],
            prop_oneof![9 => proptest::collection::vec(log_line(), 0..=4), 1 => proptest::collection::vec(log_line(), 5..8)],
            prop_oneof![9 => 0u64..10, 1 => edgy_u64()],
        )
            .prop_map(|(i, t, lines, dropped)| Step::Log(i, t, lines, dropped)),
        2 => Just(Step::Pause),
    ]
}

fn valid_register() -> impl Strategy<Value = pb::AgentMessage> {
    (1u32..4).prop_map(|slots| pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            name: "fuzzed".into(),
            capabilities: vec![CAPABILITY.into()],
            slots,
            ..Default::default()
        })),
    })
}

fn attempt_ref(task_id: &str, attempt: u32) -> Option<pb::AttemptRef> {
    Some(pb::AttemptRef { task_id: task_id.to_owned(), attempt })
}

/// The message `step` stands for, given the attempts assigned so far
/// (`None`: nothing to send).
fn message(step: Step, tasks: &[String], assigned: &[(String, u32)]) -> Option<pb::AgentMessage> {
    use pb::agent_message::Msg;
    let resolve = |target: &Target| match target {
        Target::Task(_, _) if tasks.is_empty() => None,
        Target::Task(i, attempt) => attempt_ref(&tasks[i.index(tasks.len())], *attempt),
        Target::Garbage(text) => attempt_ref(text, 1),
    };
    let msg = match step {
        Step::Raw(mut message, target) => {
            let attempt = resolve(&target);
            match message.msg.as_mut() {
                Some(Msg::Accept(m)) => m.attempt = attempt,
                Some(Msg::Progress(m)) => m.attempt = attempt,
                Some(Msg::Complete(m)) => m.attempt = attempt,
                Some(Msg::Fail(m)) => m.attempt = attempt,
                Some(Msg::Log(m)) => m.attempt = attempt,
                _ => {}
            }
            return Some(message);
        }
        Step::Work(_, _) if assigned.is_empty() => return None,
        Step::Work(i, kind) => {
            let (task, number) = &assigned[i.index(assigned.len())];
            let attempt = attempt_ref(task, *number);
            match kind {
                0 => Msg::Accept(pb::Accept { attempt }),
                1 => Msg::Progress(pb::ReportProgress { attempt, percent: 50, message: "halfway".into() }),
                2 => Msg::Complete(pb::Complete { attempt, output: b"done".to_vec(), content_type: String::new() }),
                kind => Msg::Fail(pb::Fail {
                    attempt,
                    failure: Some(pb::Failure {
                        reason: "handler_error".into(),
                        message: "no".into(),
                        retryable: kind == 3,
                    }),
                }),
            }
        }
        Step::Log(i, target, lines, dropped) => {
            let attempt = match target {
                Some(target) => resolve(&target),
                None if assigned.is_empty() => return None,
                None => {
                    let (task, number) = &assigned[i.index(assigned.len())];
                    attempt_ref(task, *number)
                }
            };
            Msg::Log(pb::LogLines { attempt, lines, dropped })
        }
        Step::Pause => return None,
    };
    Some(pb::AgentMessage { msg: Some(msg) })
}

/// A status that only a server fault produces.
fn is_fault(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Internal | Code::Unknown | Code::DataLoss)
}

async fn submit(channel: &Channel) -> Result<Vec<String>, tonic::Status> {
    let spec = pb::TaskSpec {
        capability: CAPABILITY.into(),
        timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
        ..Default::default()
    };
    let response = pb::task_service_client::TaskServiceClient::new(channel.clone())
        .submit(pb::SubmitRequest { tasks: vec![spec.clone(), spec] })
        .await?;
    Ok(response.into_inner().tasks.into_iter().map(|t| t.id).collect())
}

async fn run_case(first: pb::AgentMessage, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let channel = shared().channel.clone();
    let tasks = submit(&channel).await.map_err(|s| TestCaseError::fail(format!("submit: {s:?}")))?;
    let (tx, rx) = mpsc::channel(64);
    tx.send(first).await.map_err(|_| TestCaseError::fail("the request stream closed"))?;
    let response =
        pb::agent_service_client::AgentServiceClient::new(channel.clone()).connect(ReceiverStream::new(rx)).await;
    if let Ok(response) = response {
        let mut inbound = response.into_inner();
        let (seen, mut messages) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let _ = seen.send(message);
                    }
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        });
        let mut assigned: Vec<(String, u32)> = Vec::new();
        for step in steps {
            if matches!(step, Step::Pause) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            while let Ok(message) = messages.try_recv() {
                if let Some(pb::server_message::Msg::Assign(a)) = message.msg
                    && let Some(attempt) = a.attempt
                {
                    assigned.push((attempt.task_id, attempt.attempt));
                }
            }
            if reader.is_finished() {
                break;
            }
            if let Some(message) = message(step, &tasks, &assigned)
                && tx.send(message).await.is_err()
            {
                break;
            }
        }
        drop(tx);
        let ended = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .map_err(|_| TestCaseError::fail("the session did not end after the agent closed its stream"))?
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Some(status) = ended {
            prop_assert!(!is_fault(&status), "the session ended with {:?}", status);
        }
    } else if let Err(status) = response {
        prop_assert!(!is_fault(&status), "the session was refused with {:?}", status);
    }
    // The server is unharmed: it takes work and says it is serving.
    submit(&channel).await.map_err(|s| TestCaseError::fail(format!("submit after the session: {s:?}")))?;
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| TestCaseError::fail(format!("health: {s:?}")))?;
    prop_assert_eq!(health.into_inner().status(), ServingStatus::Serving);
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn any_stream_into_a_real_agent_session_ends_only_that_session(
        first in prop_oneof![3 => valid_register(), 1 => super::wire::agent_message()],
        steps in proptest::collection::vec(step(), 0..32),
    ) {
        shared().runtime.block_on(run_case(first, steps))?;
    }
}
