//! The HTTP port: `/healthz` for load balancers and orchestrators,
//! `/metrics` for Prometheus, and `/sd/agents`, a Prometheus HTTP
//! service-discovery document listing every connected agent's metrics
//! address.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

use crate::auth::Permission::Read;
use crate::auth::gate::Access::{self, Needs, Open};
use crate::metrics::Metrics;
use crate::model::AgentState;
use crate::net::Conn;
use crate::scheduler::{Command, CoreHandle};
use crate::supervise::Fault;

/// How long open requests may take to finish at shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` over HTTP/1.1 on the connections the listener hands
/// over, until shutdown. Each request's headers must arrive within
/// `header_timeout` (a slow-header client holds a connection no longer);
/// each request carries its connection's `ConnInfo` for the gate.
pub(crate) async fn serve(
    mut conns: tokio::sync::mpsc::Receiver<Conn>,
    router: Router,
    header_timeout: std::time::Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            conn = conns.recv() => match conn {
                Some(conn) => conn,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (info, router) = (conn.info.clone(), router.clone());
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(info.clone());
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {}
    }
    Ok(())
}

/// The Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the HTTP routes need.
#[derive(Clone, Debug)]
pub(crate) struct HttpState {
    pub(crate) shutdown: CancellationToken,
    pub(crate) fault: Fault,
    pub(crate) core: CoreHandle,
    pub(crate) metrics: Arc<Metrics>,
}

/// Every HTTP route and what it needs. The router is built from this list
/// (see [`handler`]) and the gate reads it (as `gate::HTTP_ROUTES`), so a
/// route cannot be served without an entry.
pub const ROUTES: &[(&str, Access)] = &[("/healthz", Open), ("/metrics", Needs(Read)), ("/sd/agents", Needs(Read))];

/// The handler of a path in [`ROUTES`].
fn handler(path: &str) -> MethodRouter<HttpState> {
    match path {
        "/healthz" => get(healthz),
        "/metrics" => get(metrics),
        "/sd/agents" => get(agents_sd),
        other => unreachable!("the HTTP route {other} is listed in ROUTES but has no handler"),
    }
}

/// The HTTP routes, exactly [`ROUTES`]. `/healthz` answers 200 while
/// serving and 503 once shutdown has begun or the server failed (its
/// scheduler or store writer stopped).
pub(crate) fn router(state: HttpState) -> Router {
    ROUTES.iter().fold(Router::new(), |router, (path, _)| router.route(path, handler(path))).with_state(state)
}

async fn healthz(State(state): State<HttpState>) -> (StatusCode, String) {
    if let Some(reason) = state.fault.reason() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {reason}\n"))
    } else if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".to_owned())
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let snapshot = match state.core.call(|reply| Command::Snapshot { reply }).await {
        Ok(snapshot) => snapshot,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    match state.metrics.render(&snapshot) {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// One target group of the HTTP-SD format.
#[derive(Debug, Serialize)]
struct TargetGroup {
    targets: Vec<String>,
    labels: BTreeMap<&'static str, String>,
}

/// Target label with the agent's name.
const SD_LABEL_NAME: &str = "agent_name";
/// Target label with the agent's capabilities, comma-separated and
/// wrapped in commas (`,shell,http,`) so a regex can match one of them.
const SD_LABEL_CAPABILITIES: &str = "agent_capabilities";

/// Connected agents that announced a metrics address, one group each.
async fn agents_sd(State(state): State<HttpState>) -> Response {
    let agents = match state.core.call(|reply| Command::ListAgents { capability: None, reply }).await {
        Ok(agents) => agents,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    };
    let groups: Vec<TargetGroup> = agents
        .into_iter()
        .filter(|a| a.state != AgentState::Disconnected && !a.record.metrics_address.is_empty())
        .map(|a| TargetGroup {
            targets: vec![a.record.metrics_address],
            labels: BTreeMap::from([
                (SD_LABEL_NAME, a.record.name),
                (SD_LABEL_CAPABILITIES, format!(",{},", a.record.capabilities.join(","))),
            ]),
        })
        .collect();
    match serde_json::to_string(&groups) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
