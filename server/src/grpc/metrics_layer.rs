//! One tower layer on the tonic server counts every gRPC call and times it,
//! by method and status code, so no handler carries metrics code.
//!
//! The code is read from `grpc-status` in the response headers (errors are
//! usually trailers-only responses) or else in the trailers at the end of
//! the body; a body dropped before its trailers (the client went away) is
//! counted as `CANCELLED`. The method label is the request path only when
//! some service serves it, so hostile paths cannot grow the label set.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message;
use tower::{Layer, Service};

use crate::metrics::{METHOD_OTHER, Metrics};

/// The reflection services' one method each (v1 and v1alpha); their
/// descriptors are not in the sets the server registers.
const REFLECTION_METHODS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Wraps every service of the gRPC server.
#[derive(Clone, Debug)]
pub(crate) struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
    methods: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        let mut methods = HashSet::new();
        for set in [muster_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    for method in service.method {
                        methods.insert(format!("/{package}.{name}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
        methods.extend(REFLECTION_METHODS.map(str::to_owned));
        Self { metrics, methods: Arc::new(methods) }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, metrics: self.metrics.clone(), methods: self.methods.clone() }
    }
}

/// The service the layer produces.
#[derive(Clone, Debug)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    methods: Arc<HashSet<String>>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = match self.methods.get(path) {
            Some(known) => known.clone(),
            None => METHOD_OTHER.to_owned(),
        };
        let call = Call { metrics: self.metrics.clone(), method, started: Instant::now(), done: false };
        // The clone that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            let mut call = Some(call);
            if let Some(code) = grpc_code(response.headers())
                && let Some(call) = call.take()
            {
                call.finish(code);
            }
            Ok(response.map(|body| MetricsBody { inner: Box::pin(body), call }))
        })
    }
}

/// One call in flight; recorded exactly once.
struct Call {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(mut self, code: &'static str) {
        self.done = true;
        self.metrics.observe_grpc(&self.method, code, self.started.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.metrics.observe_grpc(&self.method, "CANCELLED", self.started.elapsed());
        }
    }
}

/// The response body, watching for the trailers that carry the status.
pub(crate) struct MetricsBody<B> {
    inner: Pin<Box<B>>,
    call: Option<Call>,
}

impl<B> std::fmt::Debug for MetricsBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.take()
                {
                    call.finish(grpc_code(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    call.finish("UNKNOWN");
                }
            }
            Poll::Ready(None) => {
                // A gRPC response always ends with a status; without one
                // the call did not complete properly.
                if let Some(call) = self.call.take() {
                    call.finish("UNKNOWN");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The name of the status code in `grpc-status`, if present.
fn grpc_code(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(code_name(code))
}

/// The canonical upper-case name of a gRPC status code.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_come_from_the_descriptors_and_codes_have_names() -> Result<(), crate::metrics::MetricsError> {
        let layer = GrpcMetricsLayer::new(Metrics::new()?);
        assert!(layer.methods.contains("/muster.v1.TaskService/Submit"));
        assert!(layer.methods.contains("/grpc.health.v1.Health/Check"));
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code(&headers), Some("NOT_FOUND"));
        assert_eq!(code_name(99), "UNKNOWN");
        Ok(())
    }
}
