//! The HTTP port: `/healthz` for load balancers and orchestrators.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// The HTTP routes. `/healthz` answers 200 while serving and 503 once
/// shutdown has begun.
pub(crate) fn router(shutdown: CancellationToken) -> Router {
    Router::new().route(
        "/healthz",
        get(move || {
            let shutdown = shutdown.clone();
            async move {
                if shutdown.is_cancelled() {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else {
                    (StatusCode::OK, "ok\n")
                }
            }
        }),
    )
}
