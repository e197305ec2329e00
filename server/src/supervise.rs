//! Supervision: the process never pretends to be healthy without its
//! scheduler.
//!
//! Every request that changes state goes through the scheduler task and the
//! store writer behind it. If either ends while the server is not shutting
//! down (a panic, or a store write the writer treats as fatal), the server
//! could only answer UNAVAILABLE from then on. Instead a [`Fault`] is raised:
//! it is logged at error, gRPC health turns NOT_SERVING for the scheduler's
//! services and the whole server (""), `/healthz` answers 503, and the
//! server shuts down with [`crate::ServerError::Fatal`], so `muster serve`
//! exits non-zero and a supervisor restarts it (recovery rebuilds the
//! scheduler from what is durable).

use std::sync::{Arc, OnceLock};

use muster_proto::pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::error;

use crate::grpc::admin_server::AdminHandler;
use crate::grpc::agent_server::AgentHandler;
use crate::grpc::fleet_server::FleetHandler;
use crate::grpc::task_server::TaskHandler;

/// The first fatal failure of the server, shared by whoever may detect one.
#[derive(Clone, Debug)]
pub(crate) struct Fault {
    reason: Arc<OnceLock<String>>,
    raised: CancellationToken,
    shutdown: CancellationToken,
}

impl Fault {
    /// A fault that, once raised, shuts the server down through `shutdown`.
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self { reason: Arc::default(), raised: CancellationToken::new(), shutdown }
    }

    /// Records `reason` (only the first one is kept), logs it at error and
    /// begins the shutdown. Callable from any thread.
    pub(crate) fn raise(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.reason.get().is_none() {
            error!(%reason, "fatal: the server stops and exits with an error");
        }
        let _ = self.reason.set(reason);
        self.raised.cancel();
        self.shutdown.cancel();
    }

    /// Why the server failed, once it has.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Resolves when a fault is raised.
    async fn raised(&self) {
        self.raised.cancelled().await;
    }
}

/// Watches the scheduler task until it ends. An end before shutdown began,
/// an error or a panic raises `fault`; a raised fault (from here or from
/// the store writer) turns gRPC health NOT_SERVING at once.
pub(crate) async fn watch_scheduler(
    mut scheduler: JoinHandle<Result<(), String>>,
    fault: Fault,
    health: HealthReporter,
    shutdown: CancellationToken,
) {
    let ended = tokio::select! {
        ended = &mut scheduler => Some(ended),
        _ = fault.raised() => None,
    };
    let finished = ended.is_some();
    if let Some(ended) = ended {
        judge(ended, &fault, &shutdown);
    }
    if fault.reason().is_some() {
        set_not_serving(&health).await;
    }
    if !finished {
        // The writer failed first; the scheduler stops on the shutdown.
        judge(scheduler.await, &fault, &shutdown);
    }
}

/// Raises `fault` unless the scheduler ended because shutdown began.
fn judge(ended: Result<Result<(), String>, tokio::task::JoinError>, fault: &Fault, shutdown: &CancellationToken) {
    match ended {
        Err(e) if e.is_panic() => fault.raise(format!("the scheduler panicked: {}", panic_message(e.into_panic()))),
        Err(e) => fault.raise(format!("the scheduler task failed: {e}")),
        Ok(Err(reason)) => fault.raise(format!("the scheduler stopped: {reason}")),
        Ok(Ok(())) if !shutdown.is_cancelled() => fault.raise("the scheduler stopped while the server was serving"),
        Ok(Ok(())) => {}
    }
}

/// Marks every service that needs the scheduler, and the server as a whole,
/// NOT_SERVING.
async fn set_not_serving(health: &HealthReporter) {
    health.set_not_serving::<pb::task_service_server::TaskServiceServer<TaskHandler>>().await;
    health.set_not_serving::<pb::agent_service_server::AgentServiceServer<AgentHandler>>().await;
    health.set_not_serving::<pb::fleet_service_server::FleetServiceServer<FleetHandler>>().await;
    health.set_not_serving::<pb::admin_service_server::AdminServiceServer<AdminHandler>>().await;
    health.set_service_status("", ServingStatus::NotServing).await;
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

#[cfg(test)]
mod tests {
    //! The server over a store that fails underneath it, the way a full
    //! disk or a broken engine would: the store is a real `MemoryStore`
    //! until the test flips it, then every write errs or panics, or every
    //! read panics. Nothing in the server is replaced.

    use std::sync::atomic::{AtomicU8, Ordering};

    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::*;
    use crate::config::ServerConfig;
    use crate::model::*;
    use crate::store::{MemoryStore, Store, StoreError, Write};
    use crate::{RunningServer, ServerError};

    const WRITES_FAIL: u8 = 1;
    const WRITES_PANIC: u8 = 2;
    const READS_PANIC: u8 = 3;

    /// A working store until `mode` says otherwise (0: it works).
    #[derive(Debug, Default)]
    struct FailingStore {
        inner: MemoryStore,
        mode: AtomicU8,
    }

    impl FailingStore {
        fn check_write(&self) -> Result<(), StoreError> {
            match self.mode.load(Ordering::SeqCst) {
                WRITES_FAIL => Err(StoreError::Engine("no space left on device".into())),
                WRITES_PANIC => panic!("the engine's write path panicked"),
                _ => Ok(()),
            }
        }

        fn check_read(&self) {
            if self.mode.load(Ordering::SeqCst) == READS_PANIC {
                panic!("the engine's read path panicked");
            }
        }
    }

    impl Store for FailingStore {
        fn kind(&self) -> &'static str {
            "failing"
        }

        fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
            self.check_write()?;
            self.inner.write(writes)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.check_write()?;
            self.inner.flush()
        }
        fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
            self.check_read();
            self.inner.task(id)
        }
        fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished: bool) -> Result<Vec<Task>, StoreError> {
            self.inner.tasks_after(after, limit, unfinished)
        }
        fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
            self.inner.unfinished_tasks()
        }
        fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
            self.inner.events_after(after, limit)
        }
        fn last_sequence(&self) -> Result<u64, StoreError> {
            self.inner.last_sequence()
        }
        fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
            self.inner.agents()
        }
        fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError> {
            self.inner.idempotency_keys()
        }
        fn queues(&self) -> Result<Vec<QueueRecord>, StoreError> {
            self.inner.queues()
        }
        fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
            self.inner.tokens()
        }
        fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError> {
            self.inner.workflow_tasks(workflow)
        }
        fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError> {
            self.inner.put_log(log)
        }
        fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError> {
            self.inner.log(task, attempt)
        }
        fn logs_after(&self, after: Option<(TaskId, u32)>, limit: usize) -> Result<Vec<AttemptLog>, StoreError> {
            self.inner.logs_after(after, limit)
        }
        fn compacted_through(&self) -> Result<u64, StoreError> {
            self.inner.compacted_through()
        }
        fn events_cut(&self, until: crate::model::Millis, max_records: usize) -> Result<Option<u64>, StoreError> {
            self.inner.events_cut(until, max_records)
        }
        fn finished_tasks(
            &self,
            until: crate::model::Millis,
            after: Option<(crate::model::Millis, TaskId)>,
            limit: usize,
        ) -> Result<Vec<(crate::model::Millis, TaskId)>, StoreError> {
            self.inner.finished_tasks(until, after, limit)
        }
        fn verify(&self) -> Result<crate::store::VerifyReport, StoreError> {
            self.inner.verify()
        }
        fn export(&self, out: &mut dyn crate::store::Export) -> Result<(), StoreError> {
            self.inner.export(out)
        }
        fn record_counts(&self) -> Result<crate::store::RecordCounts, StoreError> {
            self.inner.record_counts()
        }
    }

    struct Running {
        server: RunningServer,
        store: Arc<FailingStore>,
        channel: tonic::transport::Channel,
        _dir: tempfile::TempDir,
    }

    async fn spawn_server() -> Running {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            data_dir: dir.path().to_path_buf(),
            ..ServerConfig::default()
        };
        let store = Arc::new(FailingStore::default());
        let server =
            crate::start_with_store(config, store.clone(), CancellationToken::new()).await.expect("server starts");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Running { server, store, channel, _dir: dir }
    }

    async fn overall_health(channel: &tonic::transport::Channel) -> tonic::Streaming<HealthCheckResponse> {
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest { service: String::new() })
            .await
            .expect("health watch")
            .into_inner();
        let first = watch.message().await.expect("health status").expect("a first status");
        assert_eq!(first.status(), Status::Serving);
        watch
    }

    async fn submit(channel: &tonic::transport::Channel) -> Result<(), tonic::Status> {
        let spec = pb::TaskSpec { capability: "shell".into(), ..Default::default() };
        pb::task_service_client::TaskServiceClient::new(channel.clone())
            .submit(pb::SubmitRequest { tasks: vec![spec] })
            .await
            .map(drop)
    }

    /// Waits for the server to stop and returns its fatal reason.
    async fn fatal_reason(mut health: tonic::Streaming<HealthCheckResponse>, server: RunningServer) -> String {
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), health.message())
            .await
            .expect("health changes")
            .expect("health stream")
            .expect("a status");
        assert_eq!(status.status(), Status::NotServing);
        // An open watch would hold the graceful shutdown: let it go.
        drop(health);
        match tokio::time::timeout(std::time::Duration::from_secs(20), server.wait()).await.expect("the server stops") {
            Err(ServerError::Fatal(reason)) => reason,
            other => panic!("expected a fatal error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_store_write_stops_the_server_with_an_error_and_not_serving_health() {
        let running = spawn_server().await;
        submit(&running.channel).await.expect("a submit while the store works");
        let health = overall_health(&running.channel).await;
        running.store.mode.store(WRITES_FAIL, Ordering::SeqCst);
        let status = submit(&running.channel).await.expect_err("the write fails");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let reason = fatal_reason(health, running.server).await;
        assert!(reason.contains("store write failed") && reason.contains("no space left"), "{reason}");
    }

    #[tokio::test]
    async fn a_writer_that_panics_stops_the_scheduler_and_the_server_with_an_error() {
        let running = spawn_server().await;
        let health = overall_health(&running.channel).await;
        running.store.mode.store(WRITES_PANIC, Ordering::SeqCst);
        let _ = submit(&running.channel).await.expect_err("the write panics");
        let reason = fatal_reason(health, running.server).await;
        assert!(reason.contains("the store writer panicked: the engine's write path panicked"), "{reason}");
    }

    #[tokio::test]
    async fn a_panic_in_the_scheduler_stops_the_server_with_an_error() {
        let running = spawn_server().await;
        let health = overall_health(&running.channel).await;
        running.store.mode.store(READS_PANIC, Ordering::SeqCst);
        // Cancelling a task the scheduler does not hold reads the store
        // from inside the scheduler task.
        let request = pb::CancelTaskRequest { id: TaskId(ulid::Ulid::new()).to_string(), ..Default::default() };
        let status = pb::task_service_client::TaskServiceClient::new(running.channel.clone())
            .cancel_task(request)
            .await
            .expect_err("the scheduler panics");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let reason = fatal_reason(health, running.server).await;
        assert!(reason.contains("the scheduler panicked: the engine's read path panicked"), "{reason}");
    }

    #[tokio::test]
    async fn healthz_answers_503_naming_the_fault() {
        use tower::ServiceExt;
        let shutdown = CancellationToken::new();
        let fault = Fault::new(shutdown.clone());
        let (commands, _rx) = tokio::sync::mpsc::channel(1);
        let state = crate::http::HttpState {
            shutdown,
            fault: fault.clone(),
            core: crate::scheduler::CoreHandle::new(commands),
            metrics: crate::metrics::Metrics::new().expect("metrics"),
        };
        let router = crate::http::router(state);
        let get = || axum::http::Request::get("/healthz").body(axum::body::Body::empty()).expect("request");
        let ok = router.clone().oneshot(get()).await.expect("response");
        assert_eq!(ok.status(), axum::http::StatusCode::OK);
        fault.raise("the scheduler panicked: boom");
        let failed = router.oneshot(get()).await.expect("response");
        assert_eq!(failed.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(failed.into_body(), 1024).await.expect("body");
        assert_eq!(&body[..], b"failed: the scheduler panicked: boom\n");
    }
}
