//! W3C trace context (`traceparent`) carried in a task's spec: the server's
//! spans for a task use the submitter's span as their parent, so one trace
//! shows submit, assignment and the agent's handler.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header name, used as the key in `trace_context`.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// The remote parent named by `traceparent` (`00-<trace>-<span>-<flags>`),
/// if it is well formed.
pub(crate) fn parent(trace_context: &BTreeMap<String, String>) -> Option<Context> {
    let value = trace_context.get(TRACEPARENT)?;
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    context.is_valid().then(|| Context::new().with_remote_span_context(context))
}

/// Records the trace id in `span`'s `trace_id` field (declare it
/// `Empty`) and makes `span` a child of the task's submitter span, when it has one.
pub(crate) fn adopt(span: &tracing::Span, trace_context: &BTreeMap<String, String>) {
    if let Some(parent) = parent(trace_context) {
        // Logs inside the span show the trace id, exporter or not.
        span.record("trace_id", tracing::field::display(parent.span().span_context().trace_id()));
        // Fails only when the span is disabled; then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wellformed_traceparent_becomes_a_remote_parent_and_garbage_is_ignored() {
        let map = |v: &str| BTreeMap::from([(TRACEPARENT.to_owned(), v.to_owned())]);
        let parent = parent(&map("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let span = parent.as_ref().map(|c| c.span().span_context().clone());
        assert_eq!(span.map(|s| s.trace_id().to_string()).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(super::parent(&map("00-zz-00f067aa0ba902b7-01")).is_none());
        assert!(super::parent(&map("00-00000000000000000000000000000000-00f067aa0ba902b7-01")).is_none());
        assert!(super::parent(&BTreeMap::new()).is_none());
    }
}
