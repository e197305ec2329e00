//! `TaskService`: submit, inspect, watch, cancel and retry tasks.
//!
//! Writes go through the scheduler; reads of tasks and events go straight
//! to the store, which holds exactly what has been acknowledged.

use std::sync::Arc;

use muster_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert;
use super::reads::{blocking, read_task};
use super::task_logs::{self, LogRequest};
use crate::auth::{Identity, Scope};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::logs::LogHub;
use crate::model::{EventKind, Task, TaskEvent, TaskFilter, TaskId, TaskState, WorkflowId};
use crate::scheduler::{Command, CoreHandle};
use crate::store::{SEQUENCE_ORIGIN, Store};
use crate::validate;

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// Events read from the store per replay step.
const REPLAY_CHUNK: usize = 1000;

/// Thin handler: validate, ask the scheduler or read the store, convert.
#[derive(Debug, Clone)]
pub(crate) struct TaskHandler {
    pub(crate) core: CoreHandle,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) logs: Arc<LogHub>,
    pub(crate) events: broadcast::Sender<TaskEvent>,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) shutdown: CancellationToken,
}

/// Which events a watch passes.
#[derive(Debug, Clone)]
struct WatchFilter {
    task: Option<TaskId>,
    workflow: Option<WorkflowId>,
    queue: Option<String>,
    capability: Option<String>,
    states: Vec<TaskState>,
    /// The caller's reach: events of tasks in other queues are left out.
    scope: Scope,
}

impl WatchFilter {
    fn matches(&self, event: &TaskEvent) -> bool {
        self.scope.sees_queue(&event.queue)
            && self.task.is_none_or(|t| t == event.task_id)
            && self.workflow.is_none_or(|w| Some(w) == event.workflow)
            && self.queue.as_ref().is_none_or(|q| *q == event.queue)
            && self.capability.as_ref().is_none_or(|c| *c == event.capability)
            && (self.states.is_empty() || event.kind == EventKind::Progress || self.states.contains(&event.state))
    }
}

impl TaskHandler {
    /// The task `id` when it is within the caller's reach; checked only for
    /// callers limited to some queues, so others pay no store read.
    async fn check_reach(&self, identity: &Identity, id: TaskId) -> Result<(), Status> {
        if identity.scope.queues.is_empty() {
            return Ok(());
        }
        let task = read_task(&self.store, id).await?;
        Ok(identity.scope.check_queue("id", &task.spec.queue)?)
    }

    /// A workflow's tasks as the store holds them (only acknowledged
    /// state).
    async fn workflow_tasks(&self, id: WorkflowId) -> Result<Vec<Task>, Status> {
        let store = self.store.clone();
        let tasks = blocking(move || {
            let ids = store.workflow_tasks(id)?;
            let mut tasks = Vec::with_capacity(ids.len());
            for task in ids {
                if let Some(task) = store.task(task)? {
                    tasks.push(task);
                }
            }
            Ok::<_, Error>(tasks)
        })
        .await?;
        if tasks.is_empty() {
            return Err(Error::NotFound(format!("workflow {id} not found")).into());
        }
        Ok(tasks)
    }

    /// A workflow as the caller may see it: tasks outside `scope` are left
    /// out, and a workflow with none left is not found.
    async fn read_workflow(&self, id: WorkflowId, scope: &Scope) -> Result<pb::Workflow, Status> {
        let mut tasks = self.workflow_tasks(id).await?;
        tasks.retain(|t| scope.sees_queue(&t.spec.queue));
        if tasks.is_empty() {
            return Err(Error::NotFound(format!("workflow {id} not found")).into());
        }
        Ok(convert::workflow_to_pb(id, &tasks))
    }
}

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskHandler {
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        let limits = &self.config.limits;
        if request.tasks.is_empty() {
            return Err(Error::invalid("tasks", "at least one task is required").into());
        }
        validate::within("tasks", "tasks", request.tasks.len(), limits.max_tasks_per_submit, "max_tasks_per_submit")?;
        let submissions = request
            .tasks
            .into_iter()
            .enumerate()
            .map(|(i, spec)| convert::submission(spec, &self.config).map_err(|e| e.in_field(&format!("tasks[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, submission) in submissions.iter().enumerate() {
            identity.scope.check_queue(&format!("tasks[{i}].queue"), &submission.spec.queue)?;
        }
        let span = tracing::info_span!("muster.submit", tasks = submissions.len(), trace_id = tracing::field::Empty);
        if let Some(submission) = submissions.first() {
            crate::trace_context::adopt(&span, &submission.spec.trace_context);
        }
        let outcome = self
            .core
            .call_as(identity.actor(), |reply| Command::Submit { submissions, reply })
            .instrument(span)
            .await?;
        Ok(Response::new(pb::SubmitResponse {
            existing: outcome.tasks.iter().map(|(_, existing)| *existing).collect(),
            tasks: outcome.tasks.iter().map(|(task, _)| convert::task_to_pb(task)).collect(),
            workflow_id: outcome.workflow.map(|w| w.to_string()).unwrap_or_default(),
        }))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let identity = Identity::of(&request);
        let id = convert::task_id("id", &request.into_inner().id)?;
        let task = read_task(&self.store, id).await?;
        identity.scope.check_queue("id", &task.spec.queue)?;
        Ok(Response::new(convert::task_to_pb(&task)))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let scope = Identity::of(&request).scope.clone();
        let request = request.into_inner();
        if !request.queue.is_empty() {
            scope.check_queue("queue", &request.queue)?;
        }
        let states = request
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::state_from_pb(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        let unfinished_only = !states.is_empty() && states.iter().all(|s| !s.is_terminal());
        let filter = TaskFilter {
            states,
            queue: Some(request.queue).filter(|q| !q.is_empty()),
            capability: Some(request.capability).filter(|c| !c.is_empty()),
            metadata: request.metadata.into_iter().collect(),
        };
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut after = if request.page_token.is_empty() {
            None
        } else {
            Some(convert::task_id("page_token", &request.page_token)?)
        };
        let store = self.store.clone();
        let (sequence, mut tasks) = blocking(move || {
            // The sequence is read first: any change after it is replayed by
            // a watch that starts from it.
            let sequence = store.last_sequence()?.max(SEQUENCE_ORIGIN);
            // One match past the page tells whether another page exists.
            let mut tasks = Vec::new();
            loop {
                let chunk = store.tasks_after(after, MAX_PAGE_SIZE, unfinished_only)?;
                let exhausted = chunk.len() < MAX_PAGE_SIZE;
                for task in chunk {
                    after = Some(task.id);
                    if filter.matches(&task) && scope.sees_queue(&task.spec.queue) {
                        tasks.push(task);
                        if tasks.len() > page_size {
                            return Ok((sequence, tasks));
                        }
                    }
                }
                if exhausted {
                    return Ok((sequence, tasks));
                }
            }
        })
        .await?;
        let more = tasks.len() > page_size;
        tasks.truncate(page_size);
        let next_page_token =
            if more { tasks.last().map(|t| t.id.to_string()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(convert::task_to_pb).collect(),
            next_page_token,
            sequence,
        }))
    }

    async fn cancel_task(&self, request: Request<pb::CancelTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        let id = convert::task_id("id", &request.id)?;
        validate::text("reason", &request.reason, &self.config.limits)?;
        self.check_reach(&identity, id).await?;
        let task =
            self.core.call_as(identity.actor(), |reply| Command::Cancel { id, reason: request.reason, reply }).await?;
        Ok(Response::new(convert::task_to_pb(&task)))
    }

    async fn retry_task(&self, request: Request<pb::RetryTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let identity = Identity::of(&request);
        let id = convert::task_id("id", &request.into_inner().id)?;
        self.check_reach(&identity, id).await?;
        let task = self.core.call_as(identity.actor(), |reply| Command::Retry { id, reply }).await?;
        Ok(Response::new(convert::task_to_pb(&task)))
    }

    async fn explain_task(
        &self,
        request: Request<pb::ExplainTaskRequest>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let identity = Identity::of(&request);
        let id = convert::task_id("id", &request.into_inner().id)?;
        self.check_reach(&identity, id).await?;
        let explanation = self.core.call(|reply| Command::Explain { id, reply }).await?;
        Ok(Response::new(convert::explanation_to_pb(&explanation)))
    }

    async fn get_workflow(&self, request: Request<pb::GetWorkflowRequest>) -> Result<Response<pb::Workflow>, Status> {
        let identity = Identity::of(&request);
        let id = convert::workflow_id("id", &request.into_inner().id)?;
        Ok(Response::new(self.read_workflow(id, &identity.scope).await?))
    }

    async fn cancel_workflow(
        &self,
        request: Request<pb::CancelWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        let id = convert::workflow_id("id", &request.id)?;
        validate::text("reason", &request.reason, &self.config.limits)?;
        if !identity.scope.queues.is_empty() {
            // Every task must be within reach: a partial cancel would be a
            // surprise.
            for task in self.workflow_tasks(id).await? {
                identity.scope.check_queue("id", &task.spec.queue)?;
            }
        }
        let reason = request.reason;
        self.core.call_as(identity.actor(), |reply| Command::CancelWorkflow { id, reason, reply }).await?;
        Ok(Response::new(self.read_workflow(id, &identity.scope).await?))
    }

    type WatchTasksStream = ReceiverStream<Result<pb::TaskEvent, Status>>;
    type GetTaskLogsStream = ReceiverStream<Result<pb::TaskLogs, Status>>;

    async fn get_task_logs(
        &self,
        request: Request<pb::GetTaskLogsRequest>,
    ) -> Result<Response<Self::GetTaskLogsStream>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        let request = LogRequest {
            task: convert::task_id("task_id", &request.task_id)?,
            attempt: Some(request.attempt).filter(|a| *a > 0),
            follow: request.follow,
        };
        let task = read_task(&self.store, request.task).await?;
        identity.scope.check_queue("task_id", &task.spec.queue)?;
        let (tx, rx) = mpsc::channel(64);
        let (store, hub, events, shutdown) =
            (self.store.clone(), self.logs.clone(), self.events.clone(), self.shutdown.clone());
        tokio::spawn(async move { task_logs::stream(store, hub, &events, request, tx, shutdown).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch_tasks(
        &self,
        request: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let scope = Identity::of(&request).scope.clone();
        let request = request.into_inner();
        if !request.queue.is_empty() {
            scope.check_queue("queue", &request.queue)?;
        }
        let filter = WatchFilter {
            scope,
            task: if request.task_id.is_empty() { None } else { Some(convert::task_id("task_id", &request.task_id)?) },
            queue: Some(request.queue).filter(|q| !q.is_empty()),
            capability: Some(request.capability).filter(|c| !c.is_empty()),
            workflow: if request.workflow_id.is_empty() {
                None
            } else {
                Some(convert::workflow_id("workflow_id", &request.workflow_id)?)
            },
            states: request
                .states
                .iter()
                .enumerate()
                .map(|(i, s)| convert::state_from_pb(&format!("states[{i}]"), *s))
                .collect::<Result<_, _>>()?,
        };
        // Subscribe before reading the store: every event is then either
        // in the store read or in the subscription (or both).
        let live = self.events.subscribe();
        let start = if request.after_sequence > 0 || request.from_start {
            request.after_sequence
        } else {
            let store = self.store.clone();
            blocking(move || store.last_sequence().map_err(Error::from)).await?
        };
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch(self.store.clone(), live, start, filter, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The stored events after `after`, or `OUT_OF_RANGE` when retention has
/// removed some of them (0 means from the oldest kept). The compaction
/// point is read after the events, so a cut made meanwhile is noticed.
fn replay(store: &dyn Store, after: u64) -> Result<Vec<TaskEvent>, Error> {
    let chunk = store.events_after(after, REPLAY_CHUNK)?;
    let compacted = store.compacted_through()?;
    if after > 0 && after < compacted {
        return Err(Error::OutOfRange(format!(
            "after_sequence: events up to {compacted} were removed by retention and {after} is before them; the \
             oldest kept is {}: list the tasks again and watch from the listing's sequence",
            compacted + 1
        )));
    }
    Ok(chunk)
}

/// Replays stored events after `last`, then follows live ones; falls back
/// to the store whenever the live feed lags.
async fn watch(
    store: Arc<dyn Store>,
    mut live: broadcast::Receiver<TaskEvent>,
    mut last: u64,
    filter: WatchFilter,
    tx: mpsc::Sender<Result<pb::TaskEvent, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        loop {
            let store = store.clone();
            let from = last;
            let chunk = match blocking(move || replay(store.as_ref(), from)).await {
                Ok(chunk) => chunk,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let done = chunk.len() < REPLAY_CHUNK;
            for event in chunk {
                last = event.sequence;
                if filter.matches(&event) && tx.send(Ok(convert::event_to_pb(&event))).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                    return;
                }
                received = live.recv() => match received {
                    Ok(event) => {
                        if event.sequence <= last {
                            continue;
                        }
                        last = event.sequence;
                        if filter.matches(&event) && tx.send(Ok(convert::event_to_pb(&event))).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                        return;
                    }
                },
            }
        }
    }
}
