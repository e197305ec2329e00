//! The W3C trace context a task carries (`TaskSpec.trace_context`, keyed by
//! header name), read the same way by the server and the agent SDK: the
//! spans they open for a task join the submitter's trace.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header that names the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// The remote parent named by a well-formed `traceparent` among `headers`.
pub fn parent(headers: &impl Extractor) -> Option<Context> {
    headers.get(TRACEPARENT)?;
    let context = TraceContextPropagator::new().extract(headers);
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` a child of the span `headers` name, if any, and records the
/// trace id in its `trace_id` field (declare it `Empty`), so logs inside it
/// show the trace id whether or not spans are exported.
pub fn adopt(span: &tracing::Span, headers: &impl Extractor) {
    if let Some(parent) = parent(headers) {
        span.record("trace_id", tracing::field::display(parent.span().span_context().trace_id()));
        // Fails only when the span is disabled; then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_wellformed_traceparent_becomes_a_remote_parent_and_garbage_is_ignored() {
        let map = |v: &str| HashMap::from([(TRACEPARENT.to_owned(), v.to_owned())]);
        let found = parent(&map("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let span = found.as_ref().map(|c| c.span().span_context().clone());
        assert_eq!(span.map(|s| s.trace_id().to_string()).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for garbage in ["00-zz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "junk"]
        {
            assert!(parent(&map(garbage)).is_none(), "{garbage}");
        }
        assert!(parent(&HashMap::<String, String>::new()).is_none());
    }
}
