//! The Muster control plane as a library: the sled store, the scheduler
//! and the gRPC services, wired together by [`start`].
//!
//! ```no_run
//! # async fn run() -> Result<(), muster_server::ServerError> {
//! let config = muster_server::ServerConfig::default();
//! let server = muster_server::start(config, tokio_util::sync::CancellationToken::new()).await?;
//! println!("gRPC on {}", server.grpc_addr());
//! server.wait().await
//! # }
//! ```

pub mod auth;
pub mod config;
mod data_dir;
pub mod error;
mod grpc;
mod http;
mod leader;
mod logs;
pub mod metrics;
pub mod model;
mod net;
#[cfg(any(test, feature = "test-support"))]
pub mod pg_cluster;
mod rate;
mod retention;
mod scheduler;
pub mod store;
mod store_stats;
mod supervise;
mod trace_context;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use muster_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use store_stats::dir_size;

pub use auth::tokens::ADMIN_TOKEN_FILE;
pub use config::{AuthConfig, CertIdentity, Durability, Limits, ServerConfig, StoreUrl, TlsConfig};
pub use error::Error;
pub use net::TlsError;

use grpc::admin_server::AdminHandler;
use grpc::agent_server::AgentHandler;
use grpc::fleet_server::FleetHandler;
use grpc::task_server::TaskHandler;
use scheduler::CoreHandle;
use store::{PgStore, SledStore, Store, StoreError};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(#[from] Error),
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A socket or thread could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics registry could not be set up.
    #[error("{0}")]
    Metrics(#[from] metrics::MetricsError),
    /// The TLS certificate, key or client CA could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The scheduler or the store writer stopped while the server was
    /// serving; the server shut down rather than answer UNAVAILABLE.
    #[error("fatal: {0}")]
    Fatal(String),
}

/// Queue depth between the gRPC handlers and the scheduler.
const COMMAND_QUEUE: usize = 8192;
/// Outboxes waiting for the writer before the scheduler waits too.
const WRITER_QUEUE: usize = 64;
/// Events buffered per watcher before it falls back to the store.
const EVENT_BUFFER: usize = 8192;

/// A server that is up: its addresses and a way to stop it.
#[derive(Debug)]
pub struct RunningServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Begins a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server stops: `Ok` after a shutdown through its
    /// token, [`ServerError::Fatal`] when the scheduler or the store writer
    /// failed.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.done.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Io(std::io::Error::other(e))),
        }
    }
}

/// Opens the store (PostgreSQL at `config.store`, or sled in
/// `config.data_dir`) and starts serving. The data directory is created
/// mode 0700, or tightened to it, and what it already holds loses its
/// group and other permissions; files created later follow the process
/// umask (`muster serve` sets 0077).
pub async fn start(config: ServerConfig, shutdown: CancellationToken) -> Result<RunningServer, ServerError> {
    config.validate()?;
    data_dir::secure(&config.data_dir)?;
    if let Some(url) = &config.store {
        let url = url.0.clone();
        let store = tokio::task::spawn_blocking(move || PgStore::connect(&url))
            .await
            .map_err(|e| ServerError::Io(std::io::Error::other(e)))??;
        return serve_replicated(config, Arc::new(store), shutdown).await;
    }
    let flush_every = match config.durability {
        Durability::Sync => None,
        Durability::Relaxed => Some(config.relaxed_flush_interval),
    };
    let store = SledStore::open_with_cache(&config.data_dir, flush_every, config.store_cache_bytes)?;
    let dir = config.data_dir.clone();
    serve(config, Arc::new(store), Some(dir), shutdown).await
}

/// Starts serving on `config.listen` and `config.http_listen` with the
/// given store. Cancelling `shutdown` stops the server gracefully. The
/// store's records are counted for the metrics, but with no directory
/// known to hold it, its size and free disk space are not exported.
pub async fn start_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    serve(config, store, None, shutdown).await
}

/// [`start_with_store`], measuring `store_dir` (the store's directory) for
/// the size and free-space gauges.
async fn serve(
    config: ServerConfig,
    store: Arc<dyn Store>,
    store_dir: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let listeners = Listeners::bind(&config, &shutdown).await?;
    // Alone on its store, this server always leads.
    let metrics = metrics::Metrics::new()?;
    metrics.observe_leadership(true, 0);
    lead(config, store, store_dir, listeners, metrics, None, shutdown).await
}

/// Serves as one replica of several on a PostgreSQL store: a standby
/// until it takes the leader lease, then the leader until it stops or
/// loses the lease.
async fn serve_replicated(
    config: ServerConfig,
    store: Arc<PgStore>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let mut listeners = Listeners::bind(&config, &shutdown).await?;
    let metrics = metrics::Metrics::new()?;
    let (grpc_addr, http_addr) = (listeners.grpc_addr, listeners.http_addr);
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        let replica = leader::Replica::new(&config, store.clone(), grpc_addr);
        let Some(held) = replica.standby(&config, &mut listeners, &metrics, &token).await else {
            info!("muster standby stopped");
            return Ok(());
        };
        let store: Arc<dyn Store> = store;
        let running = lead(config, store, None, listeners, metrics, Some(held), token).await?;
        running.wait().await
    });
    Ok(RunningServer { grpc_addr, http_addr, shutdown, done })
}

/// The server's listeners, accepting (and doing the TLS handshake) from
/// the moment they are bound, whichever server then takes the connections.
pub(crate) struct Listeners {
    tls: Option<Arc<net::TlsReloader>>,
    pub(crate) grpc: mpsc::Receiver<net::Conn>,
    pub(crate) http: mpsc::Receiver<net::Conn>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl Listeners {
    async fn bind(config: &ServerConfig, shutdown: &CancellationToken) -> Result<Self, ServerError> {
        let tls = config.tls.as_ref().map(net::TlsReloader::load).transpose()?.map(Arc::new);
        let certs = Arc::new(auth::CertIdentities::new(&config.auth.client_certs));
        let grpc_listener = TcpListener::bind(config.listen).await?;
        let http_listener = TcpListener::bind(config.http_listen).await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let limits = &config.limits;
        let grpc =
            net::accept(grpc_listener, net::Protocol::Grpc, tls.clone(), certs.clone(), limits, shutdown.clone());
        let http = net::accept(http_listener, net::Protocol::Http, tls.clone(), certs, limits, shutdown.clone());
        if let Some(tls) = &tls {
            tokio::spawn(tls.clone().watch(shutdown.clone()));
        }
        Ok(Self { tls, grpc, http, grpc_addr, http_addr })
    }
}

/// Runs the scheduler and every service on `listeners`. `held`: the
/// leader lease this replica runs under, renewed while it serves and
/// released when it stops.
async fn lead(
    config: Arc<ServerConfig>,
    store: Arc<dyn Store>,
    store_dir: Option<std::path::PathBuf>,
    listeners: Listeners,
    metrics: Arc<metrics::Metrics>,
    held: Option<leader::Held>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    let Listeners { tls, grpc: grpc_conns, http: http_conns, grpc_addr, http_addr } = listeners;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let tokens = Arc::new(auth::TokenTable::new(auth::bootstrap(&config, store.as_ref(), now_ms)?));
    let gate =
        Arc::new(auth::gate::Gate::new(config.auth_enabled(), tokens.clone(), config.limits.max_requests_per_second));

    let fault = supervise::Fault::new(shutdown.clone());
    // Renewed from the start: recovering a large store can outlast the lease.
    let holding = held.clone().map(|held| tokio::spawn(held.hold(metrics.clone(), fault.clone(), shutdown.clone())));
    let core = scheduler::engine::Core::recover(config.clone(), store.clone(), tokio::time::Instant::now())?;

    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (outboxes, outbox_rx) = mpsc::channel(WRITER_QUEUE);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let (log_hub, ended_logs) = logs::LogHub::new(store.clone(), &config.limits, metrics.clone());
    let log_hub = Arc::new(log_hub);
    let writer = scheduler::driver::Writer::new(
        store.clone(),
        config.durability,
        events.clone(),
        metrics.clone(),
        log_hub.clone(),
    );
    let writer = scheduler::driver::spawn_writer(writer, outbox_rx, fault.clone())?;
    let scheduler = tokio::spawn(scheduler::driver::run_core(core, command_rx, outboxes, shutdown.clone()));
    let log_persister = tokio::spawn(logs::run_persister(log_hub.clone(), ended_logs, shutdown.clone()));
    let store_stats = tokio::spawn(store_stats::run(metrics.clone(), store.clone(), store_dir, shutdown.clone()));
    let core = CoreHandle::new(commands);
    let retention = tokio::spawn(retention::run(
        store.clone(),
        core.clone(),
        metrics.clone(),
        config.retention.finished_tasks,
        shutdown.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::task_service_server::TaskServiceServer<TaskHandler>>().await;
    health.set_serving::<pb::agent_service_server::AgentServiceServer<AgentHandler>>().await;
    health.set_serving::<pb::fleet_service_server::FleetServiceServer<FleetHandler>>().await;
    health.set_serving::<pb::admin_service_server::AdminServiceServer<AdminHandler>>().await;
    let supervisor = tokio::spawn(supervise::watch_scheduler(scheduler, fault.clone(), health, shutdown.clone()));
    // Both reflection versions: grpcurl, Postman and Python's
    // grpcio-reflection still speak v1alpha.
    let health_descriptor = grpc::health_descriptor_set();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(&health_descriptor)
        .build_v1()
        .map_err(|e| ServerError::Io(std::io::Error::other(e)))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(&health_descriptor)
        .build_v1alpha()
        .map_err(|e| ServerError::Io(std::io::Error::other(e)))?;

    let max = config.limits.max_message_bytes;
    let tasks = TaskHandler {
        core: core.clone(),
        store: store.clone(),
        logs: log_hub.clone(),
        events,
        config: config.clone(),
        shutdown: shutdown.clone(),
    };
    let agents = AgentHandler { core: core.clone(), logs: log_hub, config: config.clone(), shutdown: shutdown.clone() };
    let leader = match &held {
        Some(held) => held.address.clone(),
        None => leader::advertised(&config, grpc_addr),
    };
    let server = pb::Server {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        store: store.kind().to_owned(),
        leader,
        leader_epoch: held.as_ref().map_or(0, |h| h.epoch),
    };
    let fleet = FleetHandler { core: core.clone(), config: config.clone(), server };
    let admin = AdminHandler {
        core: core.clone(),
        tokens,
        config: config.clone(),
        changing: Default::default(),
        store: store.clone(),
    };
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.heartbeat_interval))
        .http2_keepalive_timeout(Some(config.lease_ttl))
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
        .http2_max_header_list_size(Some(config.limits.max_header_bytes))
        // Outermost, so calls the gate refuses are counted too.
        .layer(grpc::metrics_layer::GrpcMetricsLayer::new(metrics.clone()))
        .layer(auth::gate::GateLayer::new(gate.clone()))
        .layer(grpc::inbound_layer::InboundErrorsLayer::new(max))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::task_service_server::TaskServiceServer::new(tasks)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::agent_service_server::AgentServiceServer::new(agents)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::fleet_service_server::FleetServiceServer::new(fleet)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(admin)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(ReceiverStream::new(grpc_conns), Ok::<_, std::io::Error>),
            shutdown.clone().cancelled_owned(),
        );
    let router = http::router(http::HttpState {
        shutdown: shutdown.clone(),
        fault: fault.clone(),
        core,
        metrics: metrics.clone(),
    })
    .layer(axum::middleware::from_fn_with_state(gate, auth::gate::http_gate));
    let http = http::serve(http_conns, router, config.limits.handshake_timeout, shutdown.clone());

    info!(
        %grpc_addr,
        %http_addr,
        durability = ?config.durability,
        tls = tls.is_some(),
        auth = config.auth_enabled(),
        "muster server listening"
    );
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        let (grpc, http) = tokio::join!(grpc, http);
        token.cancel();
        let _ = supervisor.await;
        // Live tails are written before the writer's last flush makes them
        // durable.
        let _ = log_persister.await;
        // A count under way holds the store: it ends before the writer's
        // last flush.
        let _ = store_stats.await;
        let _ = retention.await;
        // The scheduler is gone, so the writer's queue closes: it drains,
        // flushes and ends.
        let joined = tokio::task::spawn_blocking(move || writer.join()).await.map_err(std::io::Error::other)?;
        if joined.is_err() {
            fault.raise("the store writer panicked");
        }
        // Everything is written: a standby may take over at once.
        if let Some(holding) = holding {
            let _ = holding.await;
        }
        if let Some(held) = &held {
            held.resign(&metrics).await;
        }
        if let Some(reason) = fault.reason() {
            return Err(ServerError::Fatal(reason.to_owned()));
        }
        info!("muster server stopped");
        grpc?;
        http?;
        Ok(())
    });
    Ok(RunningServer { grpc_addr, http_addr, shutdown, done })
}

#[cfg(test)]
mod fuzz;
