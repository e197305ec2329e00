//! Tonic answers a request message it cannot read before any handler runs,
//! with statuses that blame the server (INTERNAL for undecodable bytes,
//! OUT_OF_RANGE for an oversized message). This layer restates those
//! answers for every method as the caller's error (see [`inbound`]) and
//! logs them at warn, so a client in any language learns what it did wrong.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};
use tracing::warn;

use super::status::inbound;

/// Wraps every service of the gRPC server.
#[derive(Clone, Debug)]
pub(crate) struct InboundErrorsLayer {
    max_message_bytes: usize,
}

impl InboundErrorsLayer {
    pub(crate) fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> Layer<S> for InboundErrorsLayer {
    type Service = InboundErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InboundErrors { inner, max_message_bytes: self.max_message_bytes }
    }
}

/// The service the layer produces.
#[derive(Clone, Debug)]
pub(crate) struct InboundErrors<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for InboundErrors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let max_message_bytes = self.max_message_bytes;
        // The clone that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            // Tonic's early answers are trailers-only: the status is in the
            // headers.
            let Some(status) = tonic::Status::from_header_map(response.headers()) else { return Ok(response) };
            let original = status.code();
            let restated = inbound(status, max_message_bytes);
            if restated.code() != original {
                warn!(%method, code = ?restated.code(), message = restated.message(), "refused an unreadable request");
                let headers = response.headers_mut();
                for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    headers.remove(name);
                }
                // Only fails for a message that cannot be a header value;
                // ours are plain text.
                let _ = restated.add_header(headers);
            }
            Ok(response)
        })
    }
}
