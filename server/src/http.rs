//! The HTTP port: `/healthz` for load balancers and orchestrators,
//! `/metrics` for Prometheus, and `/sd/agents`, a Prometheus HTTP
//! service-discovery document listing every connected agent's metrics
//! address.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::model::AgentState;
use crate::scheduler::{Command, CoreHandle};

/// The Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the HTTP routes need.
#[derive(Clone, Debug)]
pub(crate) struct HttpState {
    pub(crate) shutdown: CancellationToken,
    pub(crate) core: CoreHandle,
    pub(crate) metrics: Arc<Metrics>,
}

/// The HTTP routes. `/healthz` answers 200 while serving and 503 once
/// shutdown has begun.
pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/sd/agents", get(agents_sd))
        .with_state(state)
}

async fn healthz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ok\n")
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
