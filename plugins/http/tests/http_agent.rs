//! The HTTP agent against a real Muster server (sled in a temp dir) and a
//! local test HTTP server on 127.0.0.1, driven through the SDK client.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use muster_http_agent::{HttpAgentConfig, build_agent};
use muster_sdk::{CancellationToken, Client, Failure, NewTask, Task, TaskState};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

struct Fixture {
    client: Client,
    web: SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A test HTTP server: `/ok` echoes, `/flaky` answers 503 twice then 200,
/// `/missing` is 404, `/slow` answers after 5 s, `/big` sends 100 KiB.
async fn spawn_web() -> SocketAddr {
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route("/ok", get(|| async { ([("x-test", "yes")], "hello") }))
        .route(
            "/flaky",
            get(move || {
                let calls = flaky_calls.clone();
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        (StatusCode::SERVICE_UNAVAILABLE, "try later")
                    } else {
                        (StatusCode::OK, "recovered")
                    }
                }
            }),
        )
        .route("/missing", get(|| async { (StatusCode::NOT_FOUND, "no such thing") }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route("/big", get(|| async { "a".repeat(100 * 1024) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A Muster server, the HTTP agent allowed only the test web server's host
/// and port, and a client.
async fn spawn_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = muster_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..muster_server::ServerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let server = muster_server::start(config, shutdown.clone()).await.unwrap();
    let endpoint = format!("http://{}", server.grpc_addr());
    let web = spawn_web().await;
    let agent = build_agent(&HttpAgentConfig {
        server: endpoint.clone(),
        name: "http-test".to_owned(),
        allow: vec![format!("127.0.0.1:{}", web.port())],
        max_body_bytes: 1024,
        ..HttpAgentConfig::default()
    })
    .unwrap();
    tokio::spawn(agent.run_until(shutdown.child_token()));
    let client = Client::connect(endpoint).await.unwrap();
    Fixture { client, web, shutdown, _dir: dir }
}

impl Fixture {
    /// Submits an `http` task with fast retries and waits for its end.
    async fn run(&self, payload: &Value) -> Task {
        let spec = NewTask::new("http")
            .json(payload)
            .unwrap()
            .max_attempts(3)
            .backoff(Duration::from_millis(50), Duration::from_millis(100))
            .build();
        let task = self.client.submit(spec).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.client.wait(&task.id)).await.unwrap().unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web)
    }
}

fn output(task: &Task) -> Value {
    serde_json::from_slice(&task.output).unwrap()
}

fn failure(task: &Task) -> Failure {
    task.failure.clone().unwrap()
}

#[tokio::test]
async fn success_returns_status_headers_and_body() -> TestResult {
    let fixture = spawn_fixture().await;
    let task = fixture.run(&json!({"url": fixture.url("/ok")})).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    let output = output(&task);
    assert_eq!(output["status"], 200);
    assert_eq!(output["headers"]["x-test"], "yes");
    assert_eq!(output["body"], "hello");
    assert_eq!(output["body_truncated"], false);
    fixture.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_503_is_retried_until_it_succeeds() -> TestResult {
    let fixture = spawn_fixture().await;
    let task = fixture.run(&json!({"url": fixture.url("/flaky")})).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    assert_eq!(task.attempt, 3, "two 503s, then success");
    assert_eq!(output(&task)["body"], "recovered");
    fixture.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_404_fails_without_retry() -> TestResult {
    let fixture = spawn_fixture().await;
    let task = fixture.run(&json!({"url": fixture.url("/missing")})).await;
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    assert_eq!(task.attempt, 1);
    let failure = failure(&task);
    assert_eq!(failure.reason, "http_status");
    assert!(failure.message.contains("404"), "{}", failure.message);
    fixture.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_host_outside_the_allowlist_is_refused() -> TestResult {
    let fixture = spawn_fixture().await;
    // Same host, another port: not on the list.
    let task = fixture.run(&json!({"url": "http://127.0.0.1:1/ok"})).await;
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    assert_eq!(task.attempt, 1);
    assert_eq!(failure(&task).reason, "not_allowed");
    fixture.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_slow_endpoint_hits_the_timeout() -> TestResult {
    let fixture = spawn_fixture().await;
    let payload = json!({"url": fixture.url("/slow"), "timeout": "200ms"});
    let spec = NewTask::new("http").json(&payload)?.max_attempts(1).build();
    let task = fixture.client.submit(spec).await?;
    let task = tokio::time::timeout(Duration::from_secs(10), fixture.client.wait(&task.id)).await??;
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    let failure = failure(&task);
    assert_eq!(failure.reason, "timeout");
    assert!(failure.retryable);
    fixture.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_large_body_is_capped() -> TestResult {
    let fixture = spawn_fixture().await;
    let task = fixture.run(&json!({"url": fixture.url("/big")})).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    let output = output(&task);
    assert_eq!(output["body"].as_str().map(str::len), Some(1024));
    assert_eq!(output["body_truncated"], true);
    fixture.shutdown.cancel();
    Ok(())
}
