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

pub mod config;
pub mod error;
mod grpc;
mod http;
mod logs;
pub mod metrics;
pub mod model;
mod scheduler;
pub mod store;
mod trace_context;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use muster_proto::pb;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{Durability, Limits, ServerConfig};
pub use error::Error;

use grpc::agent_server::AgentHandler;
use grpc::fleet_server::FleetHandler;
use grpc::task_server::TaskHandler;
use scheduler::CoreHandle;
use store::{SledStore, Store, StoreError};

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

    /// Waits until the server stops (its shutdown token fired, or the store
    /// failed).
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.done.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Io(std::io::Error::other(e))),
        }
    }
}

/// Accepted gRPC connections with `TCP_NODELAY` set: tonic's own setting
/// applies only to listeners it binds, and without it small replies wait
/// for the peer's delayed ACK (tens of milliseconds per message).
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Opens the sled store in `config.data_dir` and starts serving.
pub async fn start(config: ServerConfig, shutdown: CancellationToken) -> Result<RunningServer, ServerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)?;
    let flush_every = match config.durability {
        Durability::Sync => None,
        Durability::Relaxed => Some(config.relaxed_flush_interval),
    };
    let store = SledStore::open_with_cache(&config.data_dir, flush_every, config.store_cache_bytes)?;
    start_with_store(config, Arc::new(store), shutdown).await
}

/// Starts serving on `config.listen` and `config.http_listen` with the
/// given store. Cancelling `shutdown` stops the server gracefully.
pub async fn start_with_store(
    config: ServerConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<RunningServer, ServerError> {
    config.validate()?;
    let config = Arc::new(config);
    let grpc_listener = TcpListener::bind(config.listen).await?;
    let http_listener = TcpListener::bind(config.http_listen).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let core = scheduler::core::Core::recover(config.clone(), store.clone(), tokio::time::Instant::now())?;
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (outboxes, outbox_rx) = mpsc::channel(WRITER_QUEUE);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let metrics = metrics::Metrics::new()?;
    let (log_hub, ended_logs) = logs::LogHub::new(store.clone(), &config.limits, metrics.clone());
    let log_hub = Arc::new(log_hub);
    let writer = scheduler::driver::spawn_writer(
        store.clone(),
        config.durability,
        outbox_rx,
        events.clone(),
        metrics.clone(),
        log_hub.clone(),
        shutdown.clone(),
    )?;
    let scheduler = tokio::spawn(scheduler::driver::run_core(core, command_rx, outboxes, shutdown.clone()));
    let log_persister = tokio::spawn(logs::run_persister(log_hub.clone(), ended_logs, shutdown.clone()));
    let core = CoreHandle::new(commands);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::task_service_server::TaskServiceServer<TaskHandler>>().await;
    health.set_serving::<pb::agent_service_server::AgentServiceServer<AgentHandler>>().await;
    health.set_serving::<pb::fleet_service_server::FleetServiceServer<FleetHandler>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
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
    let fleet = FleetHandler { core: core.clone(), config: config.clone() };
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(config.heartbeat_interval))
        .http2_keepalive_timeout(Some(config.lease_ttl))
        .layer(grpc::metrics_layer::GrpcMetricsLayer::new(metrics.clone()))
        .add_service(health_service)
        .add_service(reflection)
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
        .serve_with_incoming_shutdown(incoming(grpc_listener), shutdown.clone().cancelled_owned());
    let http = axum::serve(http_listener, http::router(http::HttpState { shutdown: shutdown.clone(), core, metrics }))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    info!(%grpc_addr, %http_addr, durability = ?config.durability, "muster server listening");
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        let (grpc, http) = tokio::join!(grpc, async { http.await });
        token.cancel();
        let _ = scheduler.await;
        // Live tails are written before the writer's last flush makes them
        // durable.
        let _ = log_persister.await;
        // The scheduler is gone, so the writer's queue closes: it drains,
        // flushes and ends.
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("the store writer panicked"))?;
        info!("muster server stopped");
        grpc?;
        http?;
        Ok(())
    });
    Ok(RunningServer { grpc_addr, http_addr, shutdown, done })
}
