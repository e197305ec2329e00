//! W3C trace context between the submitter, the server and the handler:
//! [`Client::submit`](crate::Client::submit) writes the current span's
//! `traceparent` into the task spec, and the runtime makes the handler's
//! span its child. Works with any `tracing` subscriber that has a
//! `tracing-opentelemetry` layer; without one, nothing is written.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header name, used as the key in `trace_context`.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, if it belongs to a trace.
pub(crate) fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8()))
}

/// Adds the current span's `traceparent` unless the spec carries one.
pub(crate) fn inject(trace_context: &mut HashMap<String, String>) {
    if trace_context.contains_key(TRACEPARENT) {
        return;
    }
    if let Some(traceparent) = current_traceparent() {
        trace_context.insert(TRACEPARENT.to_owned(), traceparent);
    }
}

/// The remote parent named by a well-formed `traceparent`.
pub(crate) fn parent(trace_context: &HashMap<String, String>) -> Option<Context> {
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
/// `Empty`) and makes `span` a child of the submitter's span named in `trace_context`.
pub(crate) fn adopt(span: &tracing::Span, trace_context: &HashMap<String, String>) {
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
    fn without_an_opentelemetry_layer_nothing_is_injected_and_an_existing_parent_is_kept() {
        let mut map = HashMap::new();
        inject(&mut map);
        assert!(map.is_empty());
        map.insert(TRACEPARENT.to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        inject(&mut map);
        assert_eq!(map.len(), 1);
        assert!(parent(&map).is_some());
        map.insert(TRACEPARENT.to_owned(), "00-abc-def-01".to_owned());
        assert!(parent(&map).is_none());
    }
}
