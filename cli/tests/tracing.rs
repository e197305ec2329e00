//! One trace across three processes: this test submits inside a client
//! span, `muster serve` and `muster shell-agent` export their spans over
//! OTLP (switched on by `OTEL_EXPORTER_OTLP_ENDPOINT`) to a receiver in
//! this process, and the submit, assignment and handler spans must all
//! carry the client's trace id.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use muster_sdk::{NewTask, TaskState};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// (service.name, span name, trace id in hex) of every exported span.
type Received = Arc<Mutex<Vec<(String, String, String)>>>;

#[derive(Clone, Default)]
struct Receiver {
    spans: Received,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let trace_id: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((service.clone(), span.name, trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Stops a process the way an operator does, so it flushes its spans.
async fn terminate(process: &mut Process) {
    // SAFETY: kill(2) on the pid of a child this test spawned and still owns.
    unsafe {
        libc::kill(process.pid(), libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = process.child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {} did not stop on SIGTERM", process.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_scheduling_and_handler_spans_share_the_clients_trace_id_across_processes() -> TestResult {
    // The OTLP receiver.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // This process's tracing: an OpenTelemetry layer so the client span
    // has a trace id for the SDK to propagate.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let data = tempfile::tempdir()?;
    let server_log = data.path().join("server.log");
    let mut server = Process {
        child: Command::new(muster_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path().join("store"))
            .env("RUST_LOG", "info,muster_server=debug")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&server_log)?)
            .spawn()?,
    };
    let mut line = String::new();
    BufReader::new(server.child.stdout.take().unwrap()).read_line(&mut line)?;
    let endpoint = format!("http://{}", line.split_whitespace().nth(4).unwrap());
    let mut agent = Process {
        child: Command::new(muster_bin())
            .args(["--server", &endpoint, "shell-agent", "--name", "traced", "--slots", "1"])
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    let client = muster_sdk::Client::connect(endpoint.clone()).await?;
    wait_for_agents(&client, "shell", 1).await;

    let span = tracing::info_span!("client.submit");
    let trace_id = span.context().span().span_context().trace_id().to_string();
    let spec = NewTask::new("shell").payload(r#"{"argv":["true"]}"#).build();
    let task = client.submit(spec).instrument(span).await?;
    assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);

    terminate(&mut agent).await;
    terminate(&mut server).await;
    let expected =
        [("muster-server", "muster.submit"), ("muster-server", "muster.assign"), ("muster-agent", "muster.task")];
    eventually(Duration::from_secs(10), "the three spans exported", || {
        let spans = receiver.spans.clone();
        let trace_id = trace_id.clone();
        async move {
            let spans = spans.lock().unwrap();
            expected
                .iter()
                .all(|(service, name)| spans.iter().any(|(s, n, t)| s == service && n == name && *t == trace_id))
        }
    })
    .await;
    // Logs inside the task's spans carry its trace id.
    let log = std::fs::read_to_string(&server_log)?;
    assert!(
        log.lines().any(|l| l.contains("assignment sent") && l.contains(&trace_id)),
        "no assignment log line with trace id {trace_id}:\n{log}"
    );
    Ok(())
}
