//! [`Agent`] and [`AgentBuilder`]: how an agent author declares handlers and
//! runs the process that serves them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::context::{Output, TaskContext, TaskError};
use crate::endpoint::normalize_endpoint;
use crate::metrics::AgentMetrics;
use crate::runtime::Runtime;
use crate::settings::{HandlerFn, Settings};
use crate::{Credentials, Error};

/// Default number of attempts run at once.
const DEFAULT_SLOTS: u32 = 4;
/// Default time running work gets to finish after a drain starts.
const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Default reconnect backoff bounds.
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest agent name the server accepts.
const MAX_NAME_LEN: usize = 128;

/// A configured agent process, ready to join the fleet with
/// [`run`](Agent::run).
///
/// ```no_run
/// use muster_sdk::{Agent, Output, TaskContext, TaskError};
///
/// # async fn demo() -> Result<(), muster_sdk::Error> {
/// Agent::builder("greeter")
///     .server("http://127.0.0.1:7070")
///     .handler("greet", |ctx: TaskContext| async move {
///         let name: String = ctx.json()?;
///         Ok::<_, TaskError>(Output::from(format!("hello, {name}")))
///     })
///     .build()?
///     .run()
///     .await
/// # }
/// ```
pub struct Agent {
    settings: Settings,
    handlers: HashMap<String, HandlerFn>,
    metrics: AgentMetrics,
    metrics_listen: Option<SocketAddr>,
}

impl Agent {
    /// Starts configuring an agent called `name` (not unique; shown in
    /// listings; `[A-Za-z0-9._:/-]` starting with a letter or digit, at most
    /// 128 characters, as the server accepts).
    pub fn builder(name: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            name: name.into(),
            endpoints: Vec::new(),
            handlers: BTreeMap::new(),
            labels: HashMap::new(),
            slots: DEFAULT_SLOTS,
            metrics_address: String::new(),
            metrics_listen: None,
            registry: prometheus::Registry::new(),
            drain_grace: DEFAULT_DRAIN_GRACE,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            credentials: Credentials::default(),
        }
    }

    /// Serves tasks until SIGTERM or SIGINT, then drains: running work gets
    /// the drain grace to finish and its results are delivered before the
    /// call returns. A second signal stops at once, abandoning running work
    /// (the server retries it once the lease runs out).
    pub async fn run(self) -> Result<(), Error> {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let signals = tokio::spawn(watch_signals(shutdown.clone(), force.clone()));
        let result = tokio::select! {
            result = self.run_until(shutdown) => result,
            () = force.cancelled() => {
                tracing::warn!("second signal received, exiting without draining");
                Ok(())
            }
        };
        signals.abort();
        result
    }

    /// Serves tasks until `shutdown` fires, then drains like
    /// [`run`](Agent::run). No signal handling: for embedding the agent in a
    /// process that owns its own shutdown tree.
    ///
    /// With [`metrics_listen`](AgentBuilder::metrics_listen) set, `/metrics`
    /// is served for as long as this runs, and the bound address (the real
    /// port when 0 was asked for) is announced at registration unless
    /// [`metrics_address`](AgentBuilder::metrics_address) names another.
    pub async fn run_until(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let stop_metrics = CancellationToken::new();
        let mut endpoint = None;
        if let Some(address) = self.metrics_listen {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| Error::MetricsListen { address, source })?;
            let bound = listener.local_addr().map_err(|source| Error::MetricsListen { address, source })?;
            if self.settings.metrics_address.is_empty() {
                self.settings.metrics_address = bound.to_string();
            }
            tracing::info!(address = %bound, "serving agent metrics at /metrics");
            endpoint = Some(tokio::spawn(crate::metrics::serve(listener, self.metrics.clone(), stop_metrics.clone())));
        }
        let result = Runtime::new(self.settings, self.handlers, self.metrics).run(shutdown).await;
        stop_metrics.cancel();
        if let Some(endpoint) = endpoint {
            let _ = endpoint.await;
        }
        result
    }
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Collects an agent's configuration; [`build`](AgentBuilder::build) checks
/// it.
#[must_use = "an AgentBuilder does nothing until built and run"]
pub struct AgentBuilder {
    name: String,
    endpoints: Vec<String>,
    handlers: BTreeMap<String, HandlerFn>,
    labels: HashMap<String, String>,
    slots: u32,
    metrics_address: String,
    metrics_listen: Option<SocketAddr>,
    registry: prometheus::Registry,
    drain_grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    credentials: Credentials,
}

impl AgentBuilder {
    /// Adds a server endpoint (`http://host:port` or `host:port`). Call it
    /// once per server of a highly available deployment: endpoints are tried
    /// in order and a follower's redirect to the leader is followed.
    pub fn server(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// The token and TLS settings to connect with (default: none; see
    /// [`Credentials::from_env`]).
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Runs `f` for every task of `capability`; the agent advertises exactly
    /// the capabilities it has handlers for. Registering a capability twice
    /// keeps the last handler.
    pub fn handler<F, Fut>(mut self, capability: impl Into<String>, f: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Output, TaskError>> + Send + 'static,
    {
        let handler: HandlerFn = Arc::new(move |ctx| f(ctx).boxed());
        self.handlers.insert(capability.into(), handler);
        self
    }

    /// Adds a label that task selectors can require (`os=linux`,
    /// `gpu=a100`).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// How many attempts the server may give this agent at once (default 4).
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// The `host:port` of this agent's `/metrics` endpoint, announced at
    /// registration so Prometheus can discover it through the server.
    pub fn metrics_address(mut self, address: impl Into<String>) -> Self {
        self.metrics_address = address.into();
        self
    }

    /// Serves this agent's metrics at `http://<address>/metrics` while it
    /// runs (port 0 picks a free port) and announces the bound address at
    /// registration, so Prometheus finds it through the server's HTTP-SD
    /// endpoint.
    pub fn metrics_listen(mut self, address: SocketAddr) -> Self {
        self.metrics_listen = Some(address);
        self
    }

    /// The agent's Prometheus registry: register your own metrics here
    /// before [`build`](Self::build) and they are served on the same
    /// `/metrics` beside the SDK's `muster_agent_*` families.
    ///
    /// ```
    /// use muster_sdk::prometheus::{IntCounter, Registry};
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let builder = muster_sdk::Agent::builder("greeter");
    /// let greeted = IntCounter::new("greeter_names_total", "Names greeted.")?;
    /// builder.metrics_registry().register(Box::new(greeted.clone()))?;
    /// # Ok(()) }
    /// ```
    pub fn metrics_registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    /// How long running work may finish after a drain starts before it is
    /// cancelled (default 30 s).
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// Bounds of the reconnect backoff (defaults 100 ms and 5 s); each delay
    /// is drawn uniformly below the doubling ceiling (full jitter).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Checks the configuration: at least one valid server, at least one
    /// handler, at least one slot and a name the server accepts.
    pub fn build(self) -> Result<Agent, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig("no server endpoint configured".to_owned()));
        }
        if self.handlers.is_empty() {
            return Err(Error::InvalidConfig("no handler registered".to_owned()));
        }
        if self.slots == 0 {
            return Err(Error::InvalidConfig("slots must be at least 1".to_owned()));
        }
        validate_names(&self.name, self.handlers.keys())?;
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e, self.credentials.uses_tls()))
            .collect::<Result<_, _>>()?;
        // A zero initial backoff would reconnect in a tight loop.
        let backoff_initial = self.backoff_initial.max(Duration::from_millis(1));
        let backoff_max = self.backoff_max.max(backoff_initial);
        let metrics = AgentMetrics::new(self.registry)
            .map_err(|e| Error::InvalidConfig(format!("cannot register the agent's metrics: {e}")))?;
        metrics.slots.set(i64::from(self.slots));
        for capability in self.handlers.keys() {
            metrics.init_capability(capability);
        }
        let settings = Settings {
            name: self.name,
            endpoints,
            capabilities: self.handlers.keys().cloned().collect(),
            labels: self.labels,
            slots: self.slots,
            metrics_address: self.metrics_address,
            drain_grace: self.drain_grace,
            backoff_initial,
            backoff_max,
            credentials: self.credentials,
        };
        Ok(Agent {
            settings,
            handlers: self.handlers.into_iter().collect(),
            metrics,
            metrics_listen: self.metrics_listen,
        })
    }
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .field("capabilities", &self.handlers.keys().collect::<Vec<_>>())
            .field("labels", &self.labels)
            .field("slots", &self.slots)
            .field("metrics_address", &self.metrics_address)
            .field("metrics_listen", &self.metrics_listen)
            .field("drain_grace", &self.drain_grace)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// The characters a name may use besides ASCII letters and digits.
const NAME_PUNCTUATION: &str = "._:/-";

/// Whether `name` is 1 to 128 characters, starts with a letter or digit and
/// uses only letters, digits and [`NAME_PUNCTUATION`]: the server's rule for
/// agent names and capabilities alike.
fn is_valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(c))
}

/// Rejects agent names and capabilities the server would refuse, so the
/// mistake shows when the agent is built rather than at registration.
fn validate_names<'a>(name: &str, capabilities: impl IntoIterator<Item = &'a String>) -> Result<(), Error> {
    if !is_valid_name(name) {
        return Err(Error::InvalidConfig(format!(
            "agent name {name:?} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._:/-], starting with a letter or digit"
        )));
    }
    for capability in capabilities {
        if !is_valid_name(capability) {
            return Err(Error::InvalidConfig(format!(
                "capability {capability:?} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._:/-], starting with a letter or digit"
            )));
        }
    }
    Ok(())
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT and `force` on the second.
async fn watch_signals(shutdown: CancellationToken, force: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("shutdown signal received, draining");
    shutdown.cancel();
    wait_for_signal().await;
    force.cancel();
}

/// Completes on the next SIGTERM or SIGINT (Ctrl-C).
#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};

    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(err) => {
            tracing::warn!("cannot listen for SIGTERM, only SIGINT stops the agent: {err}");
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => {
            if let Err(err) = result {
                tracing::warn!("cannot listen for SIGINT: {err}");
                terminate.recv().await;
            }
        }
    }
}

/// Completes on the next Ctrl-C.
#[cfg(not(unix))]
async fn wait_for_signal() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn noop(_ctx: TaskContext) -> Result<Output, TaskError> {
        Ok(Output::empty())
    }

    fn config_error(result: Result<Agent, Error>) -> String {
        match result {
            Err(Error::InvalidConfig(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn build_requires_a_server() {
        let message = config_error(Agent::builder("a").handler("echo", noop).build());
        assert!(message.contains("server"), "{message}");
    }

    #[test]
    fn build_requires_a_handler() {
        let message = config_error(Agent::builder("a").server("127.0.0.1:7070").build());
        assert!(message.contains("handler"), "{message}");
    }

    #[test]
    fn build_requires_a_slot() {
        let result = Agent::builder("a").server("127.0.0.1:7070").handler("echo", noop).slots(0).build();
        assert!(config_error(result).contains("slots"));
    }

    #[test]
    fn build_rejects_names_the_server_refuses() {
        for name in ["", "has space", "-leading-dash", "semi;colon", &"x".repeat(129)] {
            let result = Agent::builder(name).server("127.0.0.1:7070").handler("echo", noop).build();
            assert!(config_error(result).contains("agent name"));
        }
    }

    #[test]
    fn build_accepts_every_name_the_server_accepts() {
        for name in ["team/planner:1", "a.b_c-d", &"x".repeat(128)] {
            let result = Agent::builder(name).server("127.0.0.1:7070").handler("echo", noop).build();
            assert!(result.is_ok(), "{name:?}");
        }
    }

    #[test]
    fn build_rejects_capabilities_the_server_refuses() {
        for capability in ["", "with space", ".hidden"] {
            let result = Agent::builder("a").server("127.0.0.1:7070").handler(capability, noop).build();
            assert!(config_error(result).contains("capability"), "{capability:?}");
        }
        let result = Agent::builder("a").server("127.0.0.1:7070").handler("gpu.render/v2:x", noop).build();
        assert!(result.is_ok());
    }

    #[test]
    fn build_rejects_invalid_endpoints() {
        let result = Agent::builder("a").server("ftp://x").handler("echo", noop).build();
        assert!(matches!(result, Err(Error::InvalidEndpoint(_))));
    }

    #[test]
    fn build_collects_capabilities_and_normalises_endpoints() {
        let agent = Agent::builder("worker-1")
            .server("127.0.0.1:7070")
            .server("http://10.0.0.2:7070")
            .handler("shell", noop)
            .handler("echo", noop)
            .label("os", "linux")
            .reconnect_backoff(Duration::ZERO, Duration::ZERO)
            .build();
        let agent = match agent {
            Ok(agent) => agent,
            Err(err) => panic!("build failed: {err}"),
        };
        let settings = &agent.settings;
        assert_eq!(settings.capabilities, ["echo", "shell"]);
        assert_eq!(settings.endpoints, ["http://127.0.0.1:7070", "http://10.0.0.2:7070"]);
        assert_eq!(settings.slots, 4);
        assert_eq!(settings.drain_grace, Duration::from_secs(30));
        assert_eq!(settings.backoff_initial, Duration::from_millis(1));
        assert_eq!(settings.backoff_max, Duration::from_millis(1));
        assert_eq!(agent.handlers.len(), 2);
    }
}
