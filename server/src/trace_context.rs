//! W3C trace context (`traceparent`) carried in a task's spec: the server's
//! spans for a task use the submitter's span as their parent, so one trace
//! shows submit, assignment and the agent's handler.

use std::collections::BTreeMap;

use opentelemetry::propagation::Extractor;

/// A task's trace context read as W3C headers.
struct Headers<'a>(&'a BTreeMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Makes `span` a child of the task's submitter span, when it has one (see
/// [`muster_proto::trace_context::adopt`]).
pub(crate) fn adopt(span: &tracing::Span, trace_context: &BTreeMap<String, String>) {
    muster_proto::trace_context::adopt(span, &Headers(trace_context));
}
