//! Authentication and authorization end to end: every gRPC method and HTTP
//! route called with no token, a revoked and an expired token and each
//! role; scopes; revocation closing sessions; who did what; the per-caller
//! rate; the bootstrap token file; refusing to expose an open server.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use muster_sdk::{Agent, AgentState, Client, Credentials, NewTask, Output, TaskState, proto};
use muster_server::ServerConfig;
use muster_server::model::TokenRecord;
use muster_server::store::{SledStore, Store, Write};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const ADMIN_SECRET: &str = "muster_test_admin_secret_0123456789abcdef";
const EXPIRED_SECRET: &str = "muster_test_expired_secret_0123456789abcdef";

/// Who may call what, written out here independently of the server's own
/// table; `None` is open to anyone.
const READ: &[&str] = &["admin", "operator", "submitter", "viewer"];
const SUBMIT: &[&str] = &["admin", "submitter"];
const MANAGE: &[&str] = &["admin", "operator", "submitter"];
const FLEET: &[&str] = &["admin", "operator"];
const CONNECT: &[&str] = &["admin", "agent"];
const ADMIN: &[&str] = &["admin"];
const EXPECTED: &[(&str, Option<&[&str]>)] = &[
    ("/muster.v1.TaskService/Submit", Some(SUBMIT)),
    ("/muster.v1.TaskService/GetTask", Some(READ)),
    ("/muster.v1.TaskService/ListTasks", Some(READ)),
    ("/muster.v1.TaskService/CancelTask", Some(MANAGE)),
    ("/muster.v1.TaskService/RetryTask", Some(MANAGE)),
    ("/muster.v1.TaskService/WatchTasks", Some(READ)),
    ("/muster.v1.TaskService/ExplainTask", Some(READ)),
    ("/muster.v1.TaskService/GetWorkflow", Some(READ)),
    ("/muster.v1.TaskService/CancelWorkflow", Some(MANAGE)),
    ("/muster.v1.TaskService/GetTaskLogs", Some(READ)),
    ("/muster.v1.AgentService/Connect", Some(CONNECT)),
    ("/muster.v1.FleetService/ListAgents", Some(READ)),
    ("/muster.v1.FleetService/GetAgent", Some(READ)),
    ("/muster.v1.FleetService/DrainAgent", Some(FLEET)),
    ("/muster.v1.FleetService/ResumeAgent", Some(FLEET)),
    ("/muster.v1.FleetService/ListQueues", Some(READ)),
    ("/muster.v1.FleetService/PauseQueue", Some(FLEET)),
    ("/muster.v1.FleetService/ResumeQueue", Some(FLEET)),
    ("/muster.v1.FleetService/ConfigureQueue", Some(FLEET)),
    ("/muster.v1.FleetService/GetServer", Some(READ)),
    ("/muster.v1.AdminService/CreateToken", Some(ADMIN)),
    ("/muster.v1.AdminService/ListTokens", Some(ADMIN)),
    ("/muster.v1.AdminService/RevokeToken", Some(ADMIN)),
    ("/muster.v1.AdminService/BackupStore", Some(ADMIN)),
    ("/muster.v1.AdminService/VerifyStore", Some(ADMIN)),
    ("/grpc.health.v1.Health/Check", None),
    ("/grpc.health.v1.Health/Watch", None),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Some(READ)),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Some(READ)),
];
/// Every HTTP route; the test checks it against the list the server's
/// router is built from, so a new route needs an entry here.
const HTTP_EXPECTED: &[(&str, Option<&[&str]>)] =
    &[("/healthz", None), ("/metrics", Some(READ)), ("/sd/agents", Some(READ))];

/// Every method the server serves, from the descriptor sets it registers.
fn served_methods() -> HashSet<String> {
    let mut methods = HashSet::new();
    for set in [muster_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                for method in service.method {
                    methods.insert(format!(
                        "/{package}.{}/{}",
                        service.name.clone().unwrap_or_default(),
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    methods.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned());
    methods.insert("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_owned());
    methods
}

/// A server with authentication on (plaintext, loopback) whose store
/// already holds an admin token and an expired viewer token.
async fn spawn_auth_server(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path(), None).unwrap();
        let record = |name: &str, role, secret: &str, expires_at| TokenRecord {
            name: name.into(),
            role,
            scope: Default::default(),
            secret_hash: muster_server::auth::hash_secret(secret),
            created_at: 1,
            expires_at,
            revoked_at: None,
            created_by: "test".into(),
        };
        let admin = record("admin", muster_server::auth::Role::Admin, ADMIN_SECRET, None);
        let expired = record("expired", muster_server::auth::Role::Viewer, EXPIRED_SECRET, Some(2));
        store.write(&[Write::Token(admin), Write::Token(expired)]).unwrap();
        store.flush().unwrap();
    }
    let mut config = make_config(dir.path());
    config.auth.enabled = Some(true);
    tweak(&mut config);
    let server = muster_server::start(config, muster_sdk::CancellationToken::new()).await.unwrap();
    let endpoint = format!("http://{}", server.grpc_addr());
    TestServer { server: Some(server), endpoint, dir }
}

async fn client_with(endpoint: &str, token: &str) -> Client {
    Client::connect_with(endpoint.to_owned(), &Credentials::new().token(token).unwrap()).await.unwrap()
}

async fn create_token(admin: &Client, name: &str, role: proto::Role, scope: proto::Scope) -> String {
    let request =
        proto::CreateTokenRequest { name: name.into(), role: role as i32, scope: Some(scope), expires_in_seconds: 0 };
    admin.create_token(request).await.unwrap().secret
}

/// Calls `path` with one empty message and returns the status code the
/// call opened with (OK when the server accepted it and began answering).
async fn raw_call(channel: tonic::transport::Channel, path: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(vec![()]));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match tokio::time::timeout(Duration::from_secs(10), grpc.streaming(request, path, codec)).await {
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(status)) => status.code(),
        Err(_) => panic!("no answer to a call"),
    }
}

/// A plain HTTP/1.0 GET with an optional bearer token: the status.
async fn http_status(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn every_method_and_route_answers_each_credential_as_the_role_table_says() {
    let served = served_methods();
    let listed: HashSet<String> = EXPECTED.iter().map(|(p, _)| (*p).to_owned()).collect();
    let missing: Vec<_> = served.difference(&listed).collect();
    assert!(missing.is_empty(), "methods served without an entry in this test's table: {missing:?}");
    for (path, _) in EXPECTED {
        assert!(
            muster_server::auth::gate::access(muster_server::auth::gate::GRPC_METHODS, path).is_some(),
            "{path} has no entry in the server's table"
        );
    }
    let routes: HashSet<&str> = muster_server::auth::gate::HTTP_ROUTES.iter().map(|(p, _)| *p).collect();
    let listed: HashSet<&str> = HTTP_EXPECTED.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        routes, listed,
        "the HTTP routes the server serves (its router is built from HTTP_ROUTES) and this test's table"
    );

    let server = spawn_auth_server(|_| {}).await;
    let admin = client_with(&server.endpoint, ADMIN_SECRET).await;
    let mut credentials: Vec<(String, Option<String>)> = vec![("none".into(), None)];
    for (name, role) in [
        ("admin", proto::Role::Admin),
        ("operator", proto::Role::Operator),
        ("submitter", proto::Role::Submitter),
        ("agent", proto::Role::Agent),
        ("viewer", proto::Role::Viewer),
    ] {
        let secret = create_token(&admin, &format!("{name}-token"), role, proto::Scope::default()).await;
        credentials.push((name.into(), Some(secret)));
    }
    let revoked = create_token(&admin, "revoked-token", proto::Role::Admin, proto::Scope::default()).await;
    admin.revoke_token("revoked-token").await.unwrap();
    credentials.push(("revoked".into(), Some(revoked)));
    credentials.push(("expired".into(), Some(EXPIRED_SECRET.into())));
    credentials.push(("garbage".into(), Some("muster_not_a_token".into())));

    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone()).unwrap().connect().await.unwrap();
    let http = server.server.as_ref().unwrap().http_addr();
    for (who, secret) in &credentials {
        for (path, allowed) in EXPECTED {
            let code = raw_call(channel.clone(), path, secret.as_deref()).await;
            let expected = match (allowed, secret) {
                (None, _) => None,
                (Some(_), None) => Some(Code::Unauthenticated),
                (Some(_), Some(_)) if ["revoked", "expired", "garbage"].contains(&who.as_str()) => {
                    Some(Code::Unauthenticated)
                }
                (Some(roles), Some(_)) if roles.contains(&who.as_str()) => None,
                (Some(_), Some(_)) => Some(Code::PermissionDenied),
            };
            match expected {
                Some(code_expected) => assert_eq!(code, code_expected, "{who} calling {path}"),
                None => assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{who} calling {path} was refused with {code:?}"
                ),
            }
        }
        for (path, allowed) in HTTP_EXPECTED {
            let status = http_status(http, path, secret.as_deref()).await;
            let expected = match (allowed, secret) {
                (None, _) => 200,
                (Some(_), None) => 401,
                (Some(_), Some(_)) if ["revoked", "expired", "garbage"].contains(&who.as_str()) => 401,
                (Some(roles), Some(_)) if roles.contains(&who.as_str()) => 200,
                (Some(_), Some(_)) => 403,
            };
            assert_eq!(status, expected, "{who} getting {path}");
        }
    }
}

#[tokio::test]
async fn scoped_tokens_reach_only_their_queues_and_capabilities() {
    let server = spawn_auth_server(|_| {}).await;
    let admin = client_with(&server.endpoint, ADMIN_SECRET).await;
    let agent_scope = proto::Scope { capabilities: vec!["capA".into()], ..Default::default() };
    let agent_secret = create_token(&admin, "agent-a", proto::Role::Agent, agent_scope).await;
    let submit_scope = proto::Scope { queues: vec!["team-a".into()], ..Default::default() };
    let submitter_secret = create_token(&admin, "team-a-ci", proto::Role::Submitter, submit_scope).await;

    // Registering capB with a capA token is refused, naming capB.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut client = proto::agent_service_client::AgentServiceClient::new(channel);
    let first = proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Register(proto::Register {
            name: "rogue".into(),
            capabilities: vec!["capA".into(), "capB".into()],
            slots: 1,
            ..Default::default()
        })),
    };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![first]));
    request.metadata_mut().insert("authorization", format!("Bearer {agent_secret}").parse().unwrap());
    let status = client.connect(request).await.expect_err("registration refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("capB"), "{status:?}");

    // A capA agent on that token runs capA work; capB work is never offered.
    let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ran.clone();
    let agent = Agent::builder("agent-a")
        .server(server.endpoint.clone())
        .credentials(Credentials::new().token(&agent_secret).unwrap())
        .handler("capA", move |ctx| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(ctx.task_id().to_owned());
                Ok(Output::from("a"))
            }
        })
        .build()
        .unwrap();
    let stop = muster_sdk::CancellationToken::new();
    let running = tokio::spawn(agent.run_until(stop.clone()));
    let a = admin.submit(NewTask::new("capA").build()).await.unwrap();
    let b = admin.submit(NewTask::new("capB").build()).await.unwrap();
    assert_eq!(admin.wait(&a.id).await.unwrap().state, TaskState::Succeeded);
    assert_eq!(admin.get(&b.id).await.unwrap().state, TaskState::Queued);
    assert_eq!(*ran.lock().unwrap(), vec![a.id.clone()]);

    // The submitter sees and submits only in team-a.
    let team = client_with(&server.endpoint, &submitter_secret).await;
    let own = team.submit(NewTask::new("capA").queue("team-a").build()).await.unwrap();
    assert_eq!(own.submitted_by, "team-a-ci");
    let err = team.submit(NewTask::new("capA").queue("default").build()).await.err().unwrap();
    assert!(
        matches!(&err, muster_sdk::Error::Status(s) if s.code() == Code::PermissionDenied && s.message().contains("tasks[0].queue")),
        "{err:?}"
    );
    let err = team.get(&b.id).await.err().unwrap();
    assert!(matches!(&err, muster_sdk::Error::Status(s) if s.code() == Code::PermissionDenied), "{err:?}");
    let err = team.cancel(&b.id, "").await.err().unwrap();
    assert!(matches!(&err, muster_sdk::Error::Status(s) if s.code() == Code::PermissionDenied), "{err:?}");
    let listed = team.list(proto::ListTasksRequest::default()).await.unwrap();
    assert_eq!(listed.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![own.id.clone()]);
    stop.cancel();
    let _ = running.await;
}

#[tokio::test]
async fn revoking_a_token_closes_its_sessions_and_refuses_it_at_once() {
    let server = spawn_auth_server(|_| {}).await;
    let admin = client_with(&server.endpoint, ADMIN_SECRET).await;
    let secret = create_token(&admin, "worker", proto::Role::Agent, proto::Scope::default()).await;
    let stop = muster_sdk::CancellationToken::new();
    let agent = Agent::builder("worker")
        .server(server.endpoint.clone())
        .credentials(Credentials::new().token(&secret).unwrap())
        .handler("echo", |_ctx| async { Ok(Output::from("ok")) })
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let running = tokio::spawn(agent.run_until(stop.clone()));
    wait_for_agents(&admin, "echo", 1).await;
    let revoked = admin.revoke_token("worker").await.unwrap();
    assert!(revoked.revoked_at.is_some());
    eventually(Duration::from_secs(10), "the revoked agent's session closes", || async {
        let agents = admin.list_agents("echo").await.unwrap();
        agents.iter().all(|a| a.state != AgentState::Connected)
    })
    .await;
    let (_, response) = open_session_with_token(&server.endpoint, register("again", 1), &secret).await;
    assert_eq!(response.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let err = admin.revoke_token("admin").await.err().unwrap();
    assert!(
        matches!(&err, muster_sdk::Error::Status(s) if s.code() == Code::FailedPrecondition),
        "the last admin token cannot be revoked: {err:?}"
    );
    stop.cancel();
    let _ = running.await;
}

async fn open_session_with_token(
    endpoint: &str,
    first: proto::AgentMessage,
    token: &str,
) -> ((), Result<tonic::Streaming<proto::ServerMessage>, tonic::Status>) {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(vec![first]));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let response = proto::agent_service_client::AgentServiceClient::new(channel).connect(request).await;
    ((), response.map(|r| r.into_inner()))
}

#[tokio::test]
async fn tasks_record_their_submitter_and_events_their_actor() {
    let server = spawn_auth_server(|_| {}).await;
    let admin = client_with(&server.endpoint, ADMIN_SECRET).await;
    let secret = create_token(&admin, "ci", proto::Role::Submitter, proto::Scope::default()).await;
    let ci = client_with(&server.endpoint, &secret).await;
    let task = ci.submit(NewTask::new("nobody-runs-this").build()).await.unwrap();
    assert_eq!(task.submitted_by, "ci");
    assert_eq!(admin.get(&task.id).await.unwrap().submitted_by, "ci");
    admin.cancel(&task.id, "not needed").await.unwrap();
    let mut events = admin
        .watch(proto::WatchTasksRequest { task_id: task.id.clone(), from_start: true, ..Default::default() })
        .await
        .unwrap();
    let mut actors = Vec::new();
    while actors.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut events))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        actors.push((event.reason.clone(), event.actor.clone()));
    }
    assert_eq!(actors, vec![("submitted".into(), "ci".into()), ("cancelled".into(), "admin".into())]);
}

#[tokio::test]
async fn a_flooding_token_is_slowed_alone() {
    let server = spawn_auth_server(|config| config.limits.max_requests_per_second = 5).await;
    let admin = client_with(&server.endpoint, ADMIN_SECRET).await;
    let noisy =
        client_with(&server.endpoint, &create_token(&admin, "noisy", proto::Role::Viewer, Default::default()).await)
            .await;
    let quiet =
        client_with(&server.endpoint, &create_token(&admin, "quiet", proto::Role::Viewer, Default::default()).await)
            .await;
    let mut refused = 0;
    for _ in 0..40 {
        if let Err(muster_sdk::Error::Status(status)) = noisy.list_queues().await {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("max_requests_per_second"), "{status:?}");
            refused += 1;
        }
    }
    assert!(refused >= 25, "the flood was mostly refused ({refused} of 40)");
    quiet.list_queues().await.expect("another caller is not slowed");
}

#[tokio::test]
async fn the_bootstrap_admin_token_is_written_only_for_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = make_config(dir.path());
    config.auth.enabled = Some(true);
    let server = muster_server::start(config, muster_sdk::CancellationToken::new()).await.unwrap();
    let path = dir.path().join(muster_server::ADMIN_TOKEN_FILE);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    let secret = std::fs::read_to_string(&path).unwrap();
    let admin = client_with(&format!("http://{}", server.grpc_addr()), secret.trim()).await;
    let tokens = admin.list_tokens().await.unwrap();
    assert_eq!(tokens.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["admin"]);
    let anonymous = Client::connect(format!("http://{}", server.grpc_addr())).await.unwrap();
    let err = anonymous.list_queues().await.err().unwrap();
    assert!(matches!(&err, muster_sdk::Error::Status(s) if s.code() == Code::Unauthenticated), "{err:?}");
    server.shutdown().await.unwrap();
}

#[test]
fn serving_beyond_loopback_without_tls_and_auth_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(muster_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listen") && stderr.contains("--insecure") && stderr.contains("TLS"), "{stderr}");
    assert!(!Path::new(&dir.path().join("db")).exists(), "nothing was started");

    let (mut process, endpoint) = spawn_serve_process(dir.path(), &["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(endpoint.starts_with("http://0.0.0.0:"), "{endpoint}");
    process.kill9();
}

#[tokio::test]
async fn a_method_or_route_missing_from_the_table_is_refused_for_every_credential() {
    let server = spawn_auth_server(|_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint.clone()).unwrap().connect().await.unwrap();
    for path in ["/muster.v1.TaskService/NotInTheTable", "/some.other.v1.Service/Call"] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_SECRET}").parse().unwrap());
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let status = grpc
            .unary(request, http::uri::PathAndQuery::try_from(path.to_owned()).unwrap(), codec)
            .await
            .expect_err("an unlisted method is refused");
        assert_eq!(status.code(), Code::PermissionDenied, "an admin calling {path}: {status:?}");
        assert!(status.message().contains(path), "the refusal names the method: {status:?}");
    }
    let http = server.server.as_ref().unwrap().http_addr();
    assert_eq!(http_status(http, "/not-a-route", Some(ADMIN_SECRET)).await, 403, "an admin getting an unlisted route");
}
