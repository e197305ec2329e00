//! The wire contract as a client in any language sees it: paging and
//! list-then-watch exactly as the proto comments say.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use muster_sdk::{NewTask, TaskState, proto};

fn list_request(page_size: u32, page_token: String) -> proto::ListTasksRequest {
    proto::ListTasksRequest { page_size, page_token, ..Default::default() }
}

#[tokio::test]
async fn an_exactly_full_last_page_carries_no_page_token() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    for _ in 0..4 {
        client.submit(NewTask::new("nobody").build()).await?;
    }
    let first = client.list(list_request(2, String::new())).await?;
    assert_eq!(first.tasks.len(), 2);
    assert!(!first.next_page_token.is_empty(), "two more tasks follow the first page");
    let last = client.list(list_request(2, first.next_page_token)).await?;
    assert_eq!(last.tasks.len(), 2);
    assert_eq!(last.next_page_token, "", "the last page is exactly full and nothing follows it");
    let everything = client.list(list_request(4, String::new())).await?;
    assert_eq!((everything.tasks.len(), everything.next_page_token.as_str()), (4, ""));
    Ok(())
}

#[tokio::test]
async fn list_then_watch_on_an_empty_server_misses_nothing() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let listing = client.list(list_request(0, String::new())).await?;
    assert!(listing.tasks.is_empty());
    assert_ne!(listing.sequence, 0, "0 would mean live only to a watch");
    // A change lands between the listing and the watch.
    let task = client.submit(NewTask::new("nobody").build()).await?;
    let request = proto::WatchTasksRequest { after_sequence: listing.sequence, ..Default::default() };
    let mut events = client.watch(request).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), events.next()).await?.unwrap()?;
    assert_eq!(first.task_id, task.id);
    assert!(first.sequence > listing.sequence);
    Ok(())
}

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

/// Bytes that are no protobuf message: field 1 with the reserved wire type 7.
const GARBAGE: &[u8] = &[0x0f, 0xff, 0xff, 0xff];

async fn raw_grpc(endpoint: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc
}

/// The status a call opened with, or the stream's first error.
async fn raw_status(endpoint: &str, path: &'static str, messages: Vec<Vec<u8>>) -> tonic::Status {
    let mut grpc = raw_grpc(endpoint).await;
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let path = http::uri::PathAndQuery::from_static(path);
    let call = grpc.streaming(request, path, RawCodec);
    match tokio::time::timeout(Duration::from_secs(20), call).await.expect("an answer") {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(20), stream.message()).await.expect("an answer") {
                    Ok(Some(_)) => continue,
                    Ok(None) => return tonic::Status::ok("the stream ended without an error"),
                    Err(status) => return status,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_bytes_are_invalid_argument_on_every_kind_of_call() -> TestResult {
    let server = spawn_server().await;
    for path in [
        "/muster.v1.TaskService/Submit",
        "/muster.v1.TaskService/GetTask",
        "/muster.v1.TaskService/WatchTasks",
        "/muster.v1.AgentService/Connect",
    ] {
        let status = raw_status(&server.endpoint, path, vec![GARBAGE.to_vec()]).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{path}: {status:?}");
        assert!(status.message().contains("not a valid protobuf message"), "{path}: {status:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_register_ends_the_session_with_a_reason() -> TestResult {
    use prost::Message;
    let server = spawn_server().await;
    let register = proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Register(proto::Register {
            name: "garbled".into(),
            capabilities: vec!["echo".into()],
            slots: 1,
            ..Default::default()
        })),
    };
    let status = raw_status(
        &server.endpoint,
        "/muster.v1.AgentService/Connect",
        vec![register.encode_to_vec(), GARBAGE.to_vec()],
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not a valid protobuf message"), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_resource_exhausted_naming_the_setting() -> TestResult {
    let server = spawn_server_with(|config| config.limits.max_message_bytes = 1 << 20).await;
    // Just over the limit, and far over it.
    for size in [(1 << 20) + 1, 8 << 20] {
        for path in ["/muster.v1.TaskService/Submit", "/muster.v1.AgentService/Connect"] {
            let status = raw_status(&server.endpoint, path, vec![vec![0; size]]).await;
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{path} with {size} bytes: {status:?}");
            assert!(status.message().contains("max_message_bytes"), "{status:?}");
        }
    }
    // The server is still serving.
    server.client().await.submit(NewTask::new("nobody").build()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_far_over_the_default_limit_are_resource_exhausted_too() -> TestResult {
    let server = spawn_server().await;
    let limit = muster_server::ServerConfig::default().limits.max_message_bytes;
    assert_eq!(limit, 16 << 20, "the documented default");
    // Just over the default, and five times it: the server answers from the
    // message's length prefix, before the body has arrived. (The raw client
    // has no send limit of its own, so this is the server's answer.)
    for size in [limit + 1, 80 << 20] {
        for path in ["/muster.v1.TaskService/Submit", "/muster.v1.AgentService/Connect"] {
            let status = raw_status(&server.endpoint, path, vec![vec![0; size]]).await;
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{path} with {size} bytes: {status:?}");
            let needle = format!("max_message_bytes ({limit} bytes)");
            assert!(status.message().contains(&needle), "{path} with {size} bytes: {status:?}");
        }
    }
    server.client().await.submit(NewTask::new("nobody").build()).await?;
    Ok(())
}

/// What a reflection client in any language does with one version of the
/// protocol: list the services, fetch a service's file by symbol, then
/// resolve each import both by its file name and by a symbol it defines
/// (grpcio-reflection asks for `google.protobuf.Duration` when a message
/// field names it).
macro_rules! reflection_test {
    ($name:ident, $version:ident) => {
        #[tokio::test]
        async fn $name() -> TestResult {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::{ServerReflectionRequest, ServerReflectionResponse};

            let server = spawn_server().await;
            let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())?.connect().await?;
            let mut client = ServerReflectionClient::new(channel);
            let ask = |request: MessageRequest| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            };
            let files = |response: ServerReflectionResponse| -> Vec<prost_types::FileDescriptorProto> {
                let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
                    panic!("no file descriptor in {response:?}")
                };
                let decode = |bytes: &Vec<u8>| prost::Message::decode(bytes.as_slice()).unwrap();
                files.file_descriptor_proto.iter().map(decode).collect()
            };
            let requests = vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into())),
                ask(MessageRequest::FileContainingSymbol("muster.v1.TaskService".into())),
                ask(MessageRequest::FileContainingSymbol("muster.v1.AgentService".into())),
            ];
            let mut answers = client.server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
            let mut next = async || -> ServerReflectionResponse { answers.message().await.unwrap().unwrap() };

            let Some(MessageResponse::ListServicesResponse(list)) = next().await.message_response else { panic!() };
            let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            for expected in ["muster.v1.TaskService", "muster.v1.AgentService", "grpc.health.v1.Health"] {
                assert!(services.iter().any(|s| s == expected), "{expected} in {services:?}");
            }
            assert_eq!(files(next().await)[0].name(), "grpc/health/v1/health.proto");
            let task_file = files(next().await).remove(0);
            assert_eq!(task_file.name(), "muster/v1/task.proto");
            let agent_file = files(next().await).remove(0);
            assert_eq!(agent_file.name(), "muster/v1/agent.proto");
            assert!(agent_file.dependency.iter().any(|d| d == "muster/v1/task.proto"), "{:?}", agent_file.dependency);

            // Every import, by the name it is imported as and by a symbol
            // it defines, comes back under that same name.
            let by_symbol = [
                ("google/protobuf/duration.proto", "google.protobuf.Duration"),
                ("google/protobuf/timestamp.proto", "google.protobuf.Timestamp"),
                ("muster/v1/task.proto", "muster.v1.TaskEvent"),
            ];
            let mut imports: Vec<&String> = task_file.dependency.iter().chain(&agent_file.dependency).collect();
            imports.sort();
            imports.dedup();
            for (file, _) in by_symbol {
                assert!(imports.iter().any(|d| *d == file), "{file} in {imports:?}");
            }
            let mut requests: Vec<_> =
                imports.iter().map(|d| ask(MessageRequest::FileByFilename((*d).clone()))).collect();
            requests.extend(
                by_symbol.iter().map(|(_, symbol)| ask(MessageRequest::FileContainingSymbol((*symbol).into()))),
            );
            let mut answers = client.server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
            let expected = imports.iter().map(|d| d.as_str()).chain(by_symbol.iter().map(|(file, _)| *file));
            for file in expected {
                let answer = answers.message().await?.ok_or("an answer per request")?;
                let got = files(answer);
                assert_eq!(got[0].name(), file);
                // A symbol's answer may add the files it imports; never a
                // second copy of one under another name.
                let mut names: Vec<&str> = got.iter().map(|f| f.name()).collect();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), got.len(), "{names:?}");
            }
            Ok(())
        }
    };
}

reflection_test!(reflection_v1_serves_every_file_under_its_stock_name, v1);
reflection_test!(reflection_v1alpha_serves_every_file_under_its_stock_name, v1alpha);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_wins_over_a_pending_cancel_and_a_failure_records_cancelled() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    // The handler stops when told to and reports what its payload says.
    let (stop, _agent) = spawn_agent(&server.endpoint, "stubborn", "stop", &[], 2, |ctx| async move {
        ctx.cancelled().await;
        if ctx.payload() == b"finish" {
            Ok(muster_sdk::Output::from("finished anyway"))
        } else {
            Err(muster_sdk::TaskError::retryable("stopped"))
        }
    });
    wait_for_agents(&client, "stop", 1).await;
    let finishes = client.submit(NewTask::new("stop").payload("finish").build()).await?;
    let fails = client.submit(NewTask::new("stop").payload("fail").build()).await?;
    for task in [&finishes, &fails] {
        wait_for_state(&client, &task.id, TaskState::Running).await;
        client.cancel(&task.id, "changed my mind").await?;
    }
    let finished = client.wait(&finishes.id).await?;
    assert_eq!(finished.state, TaskState::Succeeded, "{finished:?}");
    assert_eq!(finished.output, b"finished anyway");
    let failed = client.wait(&fails.id).await?;
    assert_eq!(failed.state, TaskState::Cancelled, "{failed:?}");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_with_no_accept_records_succeeded() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (tx, response) = open_session(&server.endpoint, register("no-accept", 1)).await;
    let mut inbound = response?;
    let task = client.submit(NewTask::new("raw").build()).await?;
    let assignment = loop {
        match inbound.message().await?.and_then(|m| m.msg) {
            Some(proto::server_message::Msg::Assign(assignment)) => break assignment,
            Some(_) => continue,
            None => return Err("the session ended before the assignment".into()),
        }
    };
    let attempt = assignment.attempt.ok_or("an assignment names its attempt")?;
    assert_eq!(attempt.task_id, task.id);
    assert_eq!(client.get(&task.id).await?.state, TaskState::Assigned, "not accepted yet");
    let complete = proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Complete(proto::Complete {
            attempt: Some(attempt.clone()),
            output: b"done unannounced".to_vec(),
            content_type: String::new(),
        })),
    };
    tx.send(complete).await?;
    let acked = loop {
        match inbound.message().await?.and_then(|m| m.msg) {
            Some(proto::server_message::Msg::Ack(ack)) => break ack,
            Some(proto::server_message::Msg::Rejected(rejected)) => return Err(format!("{rejected:?}").into()),
            Some(_) => continue,
            None => return Err("the session ended instead of acknowledging".into()),
        }
    };
    assert_eq!(acked.attempt, Some(attempt));
    let done = client.get(&task.id).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.output, b"done unannounced");
    let first = done.attempts.first().ok_or("one attempt")?;
    assert_eq!(first.state, TaskState::Succeeded);
    assert!(first.started_at.is_none(), "an attempt never accepted has no start time: {first:?}");
    Ok(())
}

/// The proto's "within 10 seconds of opening the stream"; the server has no
/// setting for it.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_registers_ends_deadline_exceeded() -> TestResult {
    let server = spawn_server().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone())?.connect().await?;
    // The sender stays alive: the stream is open, just silent.
    let (_tx, rx) = tokio::sync::mpsc::channel::<proto::AgentMessage>(1);
    let started = tokio::time::Instant::now();
    let mut agents = proto::agent_service_client::AgentServiceClient::new(channel);
    let call = agents.connect(tokio_stream::wrappers::ReceiverStream::new(rx));
    let answer = tokio::time::timeout(REGISTER_TIMEOUT + Duration::from_secs(5), call).await?;
    let elapsed = started.elapsed();
    let status = answer.err().ok_or("a silent stream must not be accepted")?;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("register"), "{status:?}");
    assert!(elapsed >= REGISTER_TIMEOUT - Duration::from_millis(100), "ended after {elapsed:?}");
    // The server is still serving.
    server.client().await.submit(NewTask::new("nobody").build()).await?;
    Ok(())
}
