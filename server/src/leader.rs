//! Leadership among replicas on one PostgreSQL store. One replica leads:
//! it holds the lease row (`PgStore::acquire_lease`), runs the scheduler
//! and renews the lease about every TTL/5. The others are standbys: they
//! answer every scheduler call `UNAVAILABLE` with the leader's endpoint in
//! `muster-leader` metadata (the SDKs follow it), report the scheduler
//! services NOT_SERVING, and try to take the lease every TTL/5 and at once
//! when a leader resigns.
//!
//! Invariants:
//! - A leader writes only under its epoch: every write transaction checks
//!   it first (fencing, in the store), so once a standby has taken over,
//!   nothing the old leader tries to write lands.
//! - A leader that learns it lost the lease, or cannot renew it within
//!   the TTL, stops at once (a fault: the process exits and its supervisor
//!   starts it again, as a standby).
//! - Times are the database's: replicas' clocks play no part in who leads.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use muster_proto::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::grpc::admin_server::AdminHandler;
use crate::grpc::agent_server::AgentHandler;
use crate::grpc::fleet_server::FleetHandler;
use crate::grpc::task_server::TaskHandler;
use crate::metrics::Metrics;
use crate::net::Conn;
use crate::store::PgStore;
use crate::supervise::Fault;

/// The metadata key naming the leader in a standby's answers.
pub(crate) const LEADER_METADATA: &str = "muster-leader";

/// The gRPC endpoint clients are sent to for this server: `advertise`, or
/// the bound address.
pub(crate) fn advertised(config: &ServerConfig, grpc_addr: SocketAddr) -> String {
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    config.advertise.clone().unwrap_or_else(|| format!("{scheme}://{grpc_addr}"))
}

/// How often the lease is renewed, and standbys try to take it.
fn renew_every(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(50))
}

/// This replica: who it is and where it can be reached.
pub(crate) struct Replica {
    store: Arc<PgStore>,
    holder: String,
    address: String,
    ttl: Duration,
}

/// The lease this replica holds while it leads.
#[derive(Clone)]
pub(crate) struct Held {
    store: Arc<PgStore>,
    holder: String,
    /// This replica's gRPC endpoint, which standbys name.
    pub(crate) address: String,
    pub(crate) epoch: i64,
    ttl: Duration,
    /// When the request that took the lease was sent: the lease is surely
    /// live until this plus the TTL.
    since: Instant,
}

impl Replica {
    pub(crate) fn new(config: &ServerConfig, store: Arc<PgStore>, grpc_addr: SocketAddr) -> Self {
        let address = advertised(config, grpc_addr);
        let holder = format!("{address} pid {} {}", std::process::id(), ulid::Ulid::new());
        Self { store, holder, address, ttl: config.leader_lease_ttl }
    }

    /// Serves as a standby on `listeners` until this replica takes the
    /// lease (returned) or `shutdown` (`None`).
    pub(crate) async fn standby(
        &self,
        config: &ServerConfig,
        listeners: &mut crate::Listeners,
        metrics: &Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Option<Held> {
        metrics.observe_leadership(false, 0);
        let leader = Arc::new(RwLock::new(String::new()));
        let stop = shutdown.child_token();
        let (grpc_tx, grpc_rx) = mpsc::channel(64);
        let (http_tx, http_rx) = mpsc::channel(64);
        let grpc = tokio::spawn(serve_standby_grpc(config.limits.clone(), leader.clone(), grpc_rx, stop.clone()));
        let http = tokio::spawn(crate::http::serve(
            http_rx,
            standby_router(leader.clone(), metrics.clone()),
            config.limits.handshake_timeout,
            stop.clone(),
        ));
        info!(address = %self.address, "muster standby: waiting to lead");
        let held = self.wait_to_lead(&leader, listeners, &grpc_tx, &http_tx, shutdown).await;
        stop.cancel();
        let _ = grpc.await;
        let _ = http.await;
        if let Some(held) = &held {
            metrics.observe_leadership(true, held.epoch);
            if held.epoch > 1 {
                metrics.observe_failover();
            }
            info!(epoch = held.epoch, address = %self.address, "muster leads");
        }
        held
    }

    async fn wait_to_lead(
        &self,
        leader: &RwLock<String>,
        listeners: &mut crate::Listeners,
        grpc: &mpsc::Sender<Conn>,
        http: &mpsc::Sender<Conn>,
        shutdown: &CancellationToken,
    ) -> Option<Held> {
        let mut resignations: Option<mpsc::Receiver<()>> = None;
        let mut failing = false;
        loop {
            if resignations.is_none() {
                resignations = self.store.resignations().await.ok();
            }
            let since = Instant::now();
            match self.store.acquire_lease(&self.holder, &self.address, self.ttl).await {
                Ok(Some(epoch)) => {
                    return Some(Held {
                        store: self.store.clone(),
                        holder: self.holder.clone(),
                        address: self.address.clone(),
                        epoch,
                        ttl: self.ttl,
                        since,
                    });
                }
                Ok(None) => {
                    failing = false;
                    if let Ok(lease) = self.store.lease().await {
                        *leader.write().unwrap_or_else(|p| p.into_inner()) = lease.address;
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "taking the leader lease failed; retrying");
                    }
                    failing = true;
                }
            }
            let next = tokio::time::sleep(renew_every(self.ttl));
            tokio::pin!(next);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = &mut next => break,
                    notified = async {
                        match resignations.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if notified.is_none() {
                            resignations = None;
                        }
                        break;
                    }
                    Some(conn) = listeners.grpc.recv() => { let _ = grpc.send(conn).await; }
                    Some(conn) = listeners.http.recv() => { let _ = http.send(conn).await; }
                }
            }
        }
    }
}

impl Held {
    /// Renews the lease until `shutdown`; raises `fault` (stopping the
    /// server) when another replica has it or it could not be renewed
    /// within its TTL.
    pub(crate) async fn hold(self, metrics: Arc<Metrics>, fault: Fault, shutdown: CancellationToken) {
        let mut live_until = self.since + self.ttl;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(renew_every(self.ttl)) => {}
            }
            let sent = Instant::now();
            let left = live_until.saturating_duration_since(sent);
            let renewed = tokio::time::timeout(left, self.store.renew_lease(&self.holder, self.epoch, self.ttl)).await;
            match renewed {
                Ok(Ok(true)) => live_until = sent + self.ttl,
                Ok(Ok(false)) => {
                    metrics.observe_leadership(false, self.epoch);
                    fault.raise(format!("lost the leadership (epoch {}) to another replica", self.epoch));
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, epoch = self.epoch, "renewing the leader lease failed; retrying"),
                Err(_) => {}
            }
            if Instant::now() >= live_until {
                metrics.observe_leadership(false, self.epoch);
                fault.raise(format!(
                    "could not renew the leader lease (epoch {}) within its TTL of {}",
                    self.epoch,
                    humantime::format_duration(self.ttl)
                ));
                return;
            }
        }
    }

    /// Releases the lease so a standby takes over at once.
    pub(crate) async fn resign(&self, metrics: &Metrics) {
        metrics.observe_leadership(false, self.epoch);
        match self.store.resign_lease(&self.holder, self.epoch).await {
            Ok(()) => info!(epoch = self.epoch, "resigned the leadership"),
            Err(e) => warn!(error = %e, epoch = self.epoch, "could not resign the leadership; it expires with its TTL"),
        }
    }
}

/// The standby's gRPC server: health says NOT_SERVING for the scheduler
/// services, and every call to them is redirected to the leader.
async fn serve_standby_grpc(
    limits: crate::config::Limits,
    leader: Arc<RwLock<String>>,
    conns: mpsc::Receiver<Conn>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<pb::task_service_server::TaskServiceServer<TaskHandler>>().await;
    health.set_not_serving::<pb::agent_service_server::AgentServiceServer<AgentHandler>>().await;
    health.set_not_serving::<pb::fleet_service_server::FleetServiceServer<FleetHandler>>().await;
    health.set_not_serving::<pb::admin_service_server::AdminServiceServer<AdminHandler>>().await;
    tonic::transport::Server::builder()
        .http2_max_header_list_size(Some(limits.max_header_bytes))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .add_service(health_service)
        .add_service(Redirect::<pb::task_service_server::TaskServiceServer<TaskHandler>>::new(leader.clone()))
        .add_service(Redirect::<pb::agent_service_server::AgentServiceServer<AgentHandler>>::new(leader.clone()))
        .add_service(Redirect::<pb::fleet_service_server::FleetServiceServer<FleetHandler>>::new(leader.clone()))
        .add_service(Redirect::<pb::admin_service_server::AdminServiceServer<AdminHandler>>::new(leader))
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(ReceiverStream::new(conns), Ok::<_, std::io::Error>),
            stop.cancelled_owned(),
        )
        .await
}

/// Answers every call to service `S` with `UNAVAILABLE` naming the leader.
struct Redirect<S> {
    leader: Arc<RwLock<String>>,
    service: PhantomData<fn() -> S>,
}

impl<S> Redirect<S> {
    fn new(leader: Arc<RwLock<String>>) -> Self {
        Self { leader, service: PhantomData }
    }
}

impl<S> Clone for Redirect<S> {
    fn clone(&self) -> Self {
        Self::new(self.leader.clone())
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Redirect<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Redirect<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        let leader = self.leader.read().unwrap_or_else(|p| p.into_inner()).clone();
        std::future::ready(Ok(redirect(&leader).into_http()))
    }
}

/// The status a standby answers with.
fn redirect(leader: &str) -> tonic::Status {
    if leader.is_empty() {
        return tonic::Status::unavailable("this server is a standby and no replica leads yet; retry shortly");
    }
    let mut status = tonic::Status::unavailable(format!("this server is a standby; the leader is {leader}"));
    if let Ok(value) = leader.parse() {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// The standby's HTTP routes: `/healthz` answers 503 naming the leader,
/// `/metrics` the replica's metrics.
fn standby_router(leader: Arc<RwLock<String>>, metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let leader = leader.read().unwrap_or_else(|p| p.into_inner()).clone();
                async move { (StatusCode::SERVICE_UNAVAILABLE, format!("standby; leader: {leader}\n")) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let rendered = metrics.render(&crate::metrics::Snapshot::default());
                async move {
                    match rendered {
                        Ok(text) => (StatusCode::OK, text),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_names_the_leader_in_its_unavailable_status() {
        let status = redirect("http://10.0.0.7:7070");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let named = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok());
        assert_eq!(named, Some("http://10.0.0.7:7070"));
        let none = redirect("");
        assert_eq!(none.code(), tonic::Code::Unavailable);
        assert!(none.metadata().get(LEADER_METADATA).is_none());
        assert_eq!(renew_every(Duration::from_secs(5)), Duration::from_secs(1));
    }
}
