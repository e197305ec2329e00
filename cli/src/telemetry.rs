//! Logging and tracing for the `muster` binary: `tracing-subscriber` to
//! stderr (filtered by `RUST_LOG`), plus an OpenTelemetry layer exporting
//! spans over OTLP/gRPC when an endpoint is configured (`--otlp-endpoint`
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`; the exporter reads the
//! other `OTEL_EXPORTER_OTLP_*` variables itself).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sets up the global subscriber for a process calling itself
    /// `service` (`service.name` in exported spans). Must run inside the
    /// Tokio runtime: the exporter's channel lives there.
    pub(crate) fn init(service: &'static str, default_level: &str, endpoint: Option<&str>) -> Self {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(filter).with(fmt);
        let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
            registry.init();
            return Self { provider: None };
        };
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build() {
            Ok(exporter) => {
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder_empty().with_service_name(service).build())
                    .build();
                let tracer = provider.tracer("muster");
                registry.with(tracing_opentelemetry::layer().with_tracer(tracer)).init();
                Self { provider: Some(provider) }
            }
            Err(e) => {
                registry.init();
                tracing::warn!(%endpoint, "the OTLP exporter could not start, traces are not exported: {e}");
                Self { provider: None }
            }
        }
    }

    /// Exports the spans still buffered. Call it while the runtime is alive.
    pub(crate) fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing traces failed: {e}");
        }
    }
}
