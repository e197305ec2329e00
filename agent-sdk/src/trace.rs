//! W3C trace context between the submitter, the server and the handler:
//! [`Client::submit`](crate::Client::submit) writes the current span's
//! `traceparent` into the task spec; the runtime makes the handler's span
//! its child through [`muster_proto::trace_context::adopt`]. Works with any `tracing` subscriber that has a
//! `tracing-opentelemetry` layer; without one, nothing is written.

use std::collections::HashMap;

use muster_proto::trace_context::TRACEPARENT;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds the current span's `traceparent` unless the spec carries one.
pub(crate) fn inject(trace_context: &mut HashMap<String, String>) {
    if trace_context.contains_key(TRACEPARENT) {
        return;
    }
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, trace_context);
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
        assert!(muster_proto::trace_context::parent(&map).is_some());
    }
}
