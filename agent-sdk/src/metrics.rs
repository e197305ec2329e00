//! The agent's Prometheus metrics: family names and label values in one
//! place (documented in `monitoring/METRICS.md`), one [`Registry`] per
//! agent that the author can add their own families to, and the `/metrics`
//! endpoint the agent serves when [`metrics_listen`] is set.
//!
//! [`metrics_listen`]: crate::AgentBuilder::metrics_listen

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Attempts this agent finished, by capability and outcome.
pub(crate) const TASKS: &str = "muster_agent_tasks_total";
/// Handler run time, by capability and outcome.
pub(crate) const HANDLER_DURATION: &str = "muster_agent_handler_duration_seconds";
/// Handlers running now.
pub(crate) const SLOTS_BUSY: &str = "muster_agent_slots_busy";
/// Slots the agent offers.
pub(crate) const SLOTS: &str = "muster_agent_slots";
/// 1 while a session with the server is established, else 0.
pub(crate) const CONNECTED: &str = "muster_agent_connected";
/// Sessions re-established after the first registration.
pub(crate) const RECONNECTS: &str = "muster_agent_reconnects_total";
/// Log lines dropped before sending because their attempt's buffer was full.
pub(crate) const LOG_LINES_DROPPED: &str = "muster_agent_log_lines_dropped_total";

/// Label names and values.
pub(crate) mod label {
    /// The task's capability.
    pub(crate) const CAPABILITY: &str = "capability";
    /// How the attempt ended.
    pub(crate) const OUTCOME: &str = "outcome";
    /// The handler returned an output.
    pub(crate) const SUCCEEDED: &str = "succeeded";
    /// The handler returned an error or panicked.
    pub(crate) const FAILED: &str = "failed";
    /// The server cancelled the attempt.
    pub(crate) const CANCELLED: &str = "cancelled";
    /// The attempt was no longer this agent's; its result was dropped.
    pub(crate) const DISCARDED: &str = "discarded";
}

/// Handler buckets from 1 ms to an hour.
const HANDLER_BUCKETS: [f64; 16] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];

/// The SDK's families, registered in the agent's registry.
#[derive(Debug, Clone)]
pub(crate) struct AgentMetrics {
    registry: Registry,
    tasks: IntCounterVec,
    handler_duration: HistogramVec,
    pub(crate) slots_busy: IntGauge,
    pub(crate) slots: IntGauge,
    pub(crate) connected: IntGauge,
    pub(crate) reconnects: IntCounter,
    pub(crate) log_lines_dropped: IntCounter,
}

impl AgentMetrics {
    /// Registers the SDK's families in `registry`.
    pub(crate) fn new(registry: Registry) -> Result<Self, prometheus::Error> {
        use label::{CAPABILITY, OUTCOME};
        let tasks = IntCounterVec::new(Opts::new(TASKS, "Attempts this agent finished."), &[CAPABILITY, OUTCOME])?;
        let handler_duration = HistogramVec::new(
            HistogramOpts::new(HANDLER_DURATION, "Handler run time.").buckets(HANDLER_BUCKETS.to_vec()),
            &[CAPABILITY, OUTCOME],
        )?;
        let slots_busy = IntGauge::new(SLOTS_BUSY, "Handlers running now.")?;
        let slots = IntGauge::new(SLOTS, "Slots this agent offers.")?;
        let connected = IntGauge::new(CONNECTED, "1 while a session with the server is established.")?;
        let reconnects = IntCounter::new(RECONNECTS, "Sessions re-established after the first registration.")?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(handler_duration.clone()))?;
        registry.register(Box::new(slots_busy.clone()))?;
        registry.register(Box::new(slots.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        let log_lines_dropped = IntCounter::new(
            LOG_LINES_DROPPED,
            "Log lines dropped before sending because their attempt's buffer was full.",
        )?;
        registry.register(Box::new(reconnects.clone()))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        Ok(Self { registry, tasks, handler_duration, slots_busy, slots, connected, reconnects, log_lines_dropped })
    }

    /// Creates the zero series of every outcome of `capability`, so rates
    /// and ratios have data before the first task ends.
    pub(crate) fn init_capability(&self, capability: &str) {
        use label::{CANCELLED, DISCARDED, FAILED, SUCCEEDED};
        for outcome in [SUCCEEDED, FAILED, CANCELLED, DISCARDED] {
            self.tasks.with_label_values(&[capability, outcome]);
            self.handler_duration.with_label_values(&[capability, outcome]);
        }
    }

    /// Records one finished handler.
    pub(crate) fn observe_handler(&self, capability: &str, outcome: &str, took: Duration) {
        self.tasks.with_label_values(&[capability, outcome]).inc();
        self.handler_duration.with_label_values(&[capability, outcome]).observe(took.as_secs_f64());
    }

    /// Every family of the registry (the SDK's and the author's) in the
    /// text exposition format.
    pub(crate) fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Serves `/metrics` on `listener` until `shutdown` fires.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: AgentMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                match metrics.render() {
                    Ok(text) => {
                        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
                    }
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::warn!("metrics endpoint failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authors_families_are_rendered_beside_the_sdks() -> Result<(), prometheus::Error> {
        let registry = Registry::new();
        let metrics = AgentMetrics::new(registry.clone())?;
        let own = IntCounter::new("greeter_names_total", "Names greeted.")?;
        registry.register(Box::new(own.clone()))?;
        own.inc();
        metrics.observe_handler("greet", label::SUCCEEDED, Duration::from_millis(3));
        let text = metrics.render()?;
        assert!(text.contains("greeter_names_total 1"), "{text}");
        assert!(text.contains("muster_agent_tasks_total{capability=\"greet\",outcome=\"succeeded\"} 1"), "{text}");
        Ok(())
    }
}
