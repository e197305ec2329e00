//! [`Client`], the submitter's and operator's view of a Muster server.
//!
//! Every method returns the SDK's own types ([`Task`], [`TaskEvent`],
//! [`AgentInfo`]...), converted from the wire at this edge; requests (task
//! specs, listing and watch filters, token creation) are still the generated
//! [`proto`] types.

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::backoff::jittered;
use crate::credentials::AuthChannel;
use crate::endpoint::{MAX_MESSAGE_SIZE, make_endpoint, normalize_endpoint};
use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::fleet_service_client::FleetServiceClient;
use crate::proto::task_service_client::TaskServiceClient;
use crate::{
    AgentInfo, CreatedToken, Credentials, Error, Explanation, LogChunk, QueueInfo, ServerInfo, Submission, Task,
    TaskEvent, TaskPage, TokenInfo, Workflow, proto,
};

/// What [`Client::follow`] yields.
// Almost every item is an event or a task, both large; boxing them would
// cost an allocation per item to shrink the rare resync marker.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A task event, in sequence order.
    Event(TaskEvent),
    /// The events after the last one seen were removed by retention: the
    /// [`Change::Current`] items that follow are every task the watch
    /// covers as it is now (from a listing at `sequence`), and events go on
    /// after `sequence`.
    Resync {
        /// The listing's sequence.
        sequence: u64,
    },
    /// A task as it is now, after a [`Change::Resync`].
    Current(Task),
}

/// Changes [`Client::follow`] holds for a slow reader.
const FOLLOW_BUFFER: usize = 256;

/// Backoff between watch reconnects in [`Client::wait`] and
/// [`Client::follow`].
const WATCH_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Standby redirects followed from one endpoint while looking for the
/// leader.
const MAX_LEADER_REDIRECTS: usize = 3;

/// A cheap-to-clone handle on one server for submitting, watching and
/// cancelling tasks and steering agents. Clones share the HTTP/2 connection.
///
/// ```no_run
/// use futures::StreamExt;
/// use muster_sdk::{Client, NewTask, TaskState};
///
/// # async fn run() -> Result<(), muster_sdk::Error> {
/// let client = Client::connect("http://127.0.0.1:7070").await?;
/// let task = client.submit(NewTask::new("word-count").json(&"some text")?.build()).await?;
/// let mut logs = client.logs(&task.id, 0, true).await?;
/// while let Some(chunk) = logs.next().await {
///     for line in chunk?.lines {
///         println!("[{}] {}", line.stream.as_str(), line.text);
///     }
/// }
/// let done = client.wait(&task.id).await?;
/// match done.state {
///     TaskState::Succeeded => println!("{}", String::from_utf8_lossy(&done.output)),
///     TaskState::Failed | TaskState::Cancelled => eprintln!("failed: {:?}", done.failure),
///     other => eprintln!("still {other}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    tasks: TaskServiceClient<AuthChannel>,
    fleet: FleetServiceClient<AuthChannel>,
    admin: AdminServiceClient<AuthChannel>,
}

impl Client {
    /// Connects to `endpoint` (`http://host:port`; `host:port` means
    /// `http://host:port`) without credentials. Fails fast if the server
    /// cannot be reached.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Client, Error> {
        Self::connect_with(endpoint, &Credentials::default()).await
    }

    /// Connects with a token and TLS settings; with TLS, `host:port` means
    /// `https://host:port`.
    pub async fn connect_with(endpoint: impl Into<String>, credentials: &Credentials) -> Result<Client, Error> {
        let url = normalize_endpoint(&endpoint.into(), credentials.uses_tls())?;
        let channel = make_endpoint(&url, credentials)?.connect().await?;
        Ok(Self::from_channel_with(channel, credentials))
    }

    /// Connects to the replica that leads among `endpoints` (the servers of
    /// a highly available deployment; one server that is no replica does as
    /// well): tries them in order, follows a standby's `muster-leader`
    /// redirect, and keeps the first server that answers as the leader.
    /// Fails with the last error when none does. A later failover is not
    /// followed: connect again.
    pub async fn connect_leader_with(endpoints: &[String], credentials: &Credentials) -> Result<Client, Error> {
        let mut last = Error::InvalidEndpoint("no endpoint given".to_owned());
        for endpoint in endpoints {
            let mut next = Some(endpoint.clone());
            let mut hops = 0;
            while let Some(at) = next.take() {
                let client = match Self::connect_with(at, credentials).await {
                    Ok(client) => client,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                };
                match client.standby().await {
                    None => return Ok(client),
                    Some(status) => {
                        if hops < MAX_LEADER_REDIRECTS {
                            next = crate::connect::leader_redirect(&status, credentials.uses_tls());
                            hops += 1;
                        }
                        last = Error::Status(status);
                    }
                }
            }
        }
        Err(last)
    }

    /// The status a standby answers with, or `None` from a server that
    /// serves (an empty id reaches the task service and is refused there).
    async fn standby(&self) -> Option<tonic::Status> {
        match self.tasks.clone().get_task(proto::GetTaskRequest { id: String::new() }).await {
            Err(status) if status.code() == Code::Unavailable => Some(status),
            _ => None,
        }
    }

    /// Wraps an existing channel, for callers that configure TLS, timeouts or
    /// load balancing themselves.
    pub fn from_channel(channel: Channel) -> Client {
        Self::from_channel_with(channel, &Credentials::default())
    }

    /// Wraps an existing channel, sending the credentials' token on every
    /// call (their TLS settings are the channel's business).
    pub fn from_channel_with(channel: Channel, credentials: &Credentials) -> Client {
        let authorize = credentials.interceptor();
        Client {
            tasks: TaskServiceClient::with_interceptor(channel.clone(), authorize.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            fleet: FleetServiceClient::with_interceptor(channel.clone(), authorize.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            admin: AdminServiceClient::with_interceptor(channel, authorize),
        }
    }

    /// Submits one task and returns it as created (or, with an idempotency
    /// key already in use, the existing task). Carries the current span's
    /// trace context like [`submit_many`](Self::submit_many).
    pub async fn submit(&self, spec: proto::TaskSpec) -> Result<Task, Error> {
        let response = self.submit_many(vec![spec]).await?;
        response.tasks.into_iter().next().ok_or_else(|| Error::Protocol("submit response holds no task".to_owned()))
    }

    /// Submits several tasks atomically: all are created or none is.
    ///
    /// Each spec without a `traceparent` gets the current `tracing` span's
    /// (when an OpenTelemetry layer is installed), so the server's and the
    /// handler's spans join the submitter's trace.
    pub async fn submit_many(&self, mut specs: Vec<proto::TaskSpec>) -> Result<Submission, Error> {
        for spec in &mut specs {
            crate::trace::inject(&mut spec.trace_context);
        }
        let request = proto::SubmitRequest { tasks: specs };
        Ok(self.tasks.clone().submit(request).await?.into_inner().into())
    }

    /// Fetches one task.
    pub async fn get(&self, id: &str) -> Result<Task, Error> {
        let request = proto::GetTaskRequest { id: id.to_owned() };
        Ok(self.tasks.clone().get_task(request).await?.into_inner().into())
    }

    /// Lists one page of tasks; pass `next_page_token` back for the next.
    pub async fn list(&self, request: proto::ListTasksRequest) -> Result<TaskPage, Error> {
        Ok(self.tasks.clone().list_tasks(request).await?.into_inner().into())
    }

    /// Streams task events matching `request`. The stream ends when the
    /// server closes it; resume with `after_sequence` set to the last event
    /// seen to miss nothing.
    pub async fn watch(
        &self,
        request: proto::WatchTasksRequest,
    ) -> Result<BoxStream<'static, Result<TaskEvent, Error>>, Error> {
        let stream = self.tasks.clone().watch_tasks(request).await?.into_inner();
        Ok(stream.map_ok(TaskEvent::from).map_err(Error::Status).boxed())
    }

    /// Follows task events matching `request` for as long as the caller
    /// reads, through broken connections, server restarts and retention:
    /// a watch that breaks is reopened after the last event seen (with
    /// backoff while the failure looks transient), and one whose next
    /// events were removed by retention (`OUT_OF_RANGE`) re-lists the
    /// matching tasks, yields [`Change::Resync`] and each of them as it is
    /// now ([`Change::Current`]), then continues with the events after the
    /// listing, so no change is missed. The stream ends with the first
    /// error that is not transient.
    ///
    /// `after_sequence` and `from_start` say where to begin, as for
    /// [`watch`](Self::watch); with neither, it begins now.
    pub fn follow(&self, request: proto::WatchTasksRequest) -> BoxStream<'static, Result<Change, Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(FOLLOW_BUFFER);
        let client = self.clone();
        tokio::spawn(async move {
            if let Err(err) = client.follow_into(request, &tx).await {
                let _ = tx.send(Err(err)).await;
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
    }

    /// [`follow`](Self::follow)'s loop; returns when the reader went away
    /// (Ok) or on an error that is not transient.
    async fn follow_into(
        &self,
        mut request: proto::WatchTasksRequest,
        tx: &tokio::sync::mpsc::Sender<Result<Change, Error>>,
    ) -> Result<(), Error> {
        // Pin "now" to a sequence, so a reconnect before the first event
        // still misses nothing.
        if request.after_sequence == 0 && !request.from_start {
            request.after_sequence =
                self.list(proto::ListTasksRequest { page_size: 1, ..Default::default() }).await?.sequence;
        }
        let mut failures = 0u32;
        loop {
            let broken = match self.watch(request.clone()).await {
                Ok(mut events) => loop {
                    match events.next().await {
                        Some(Ok(event)) => {
                            failures = 0;
                            request.after_sequence = event.sequence;
                            request.from_start = false;
                            if tx.send(Ok(Change::Event(event))).await.is_err() {
                                return Ok(());
                            }
                        }
                        Some(Err(err)) => break err,
                        None => break Error::Protocol("watch stream ended".to_owned()),
                    }
                },
                Err(err) => err,
            };
            match &broken {
                Error::Status(status) if status.code() == Code::OutOfRange => {
                    tracing::debug!("watch resumed before what the server keeps, re-listing: {}", status.message());
                    match self.resync(&request, tx).await? {
                        Some(sequence) => {
                            request.after_sequence = sequence;
                            request.from_start = false;
                        }
                        None => return Ok(()),
                    }
                }
                err if is_transient(err) => {
                    tracing::debug!("watch broke, reopening: {err}");
                    tokio::time::sleep(jittered(failures, WATCH_BACKOFF_INITIAL, WATCH_BACKOFF_MAX)).await;
                    failures = failures.saturating_add(1);
                }
                _ => return Err(broken),
            }
        }
    }

    /// Sends [`Change::Resync`] and every task the watch `request` covers
    /// as it is now; returns the listing's sequence (None when the reader
    /// went away).
    async fn resync(
        &self,
        request: &proto::WatchTasksRequest,
        tx: &tokio::sync::mpsc::Sender<Result<Change, Error>>,
    ) -> Result<Option<u64>, Error> {
        let mut current = Vec::new();
        let sequence;
        if request.task_id.is_empty() {
            let mut listing = proto::ListTasksRequest {
                states: request.states.clone(),
                queue: request.queue.clone(),
                capability: request.capability.clone(),
                page_size: 1000,
                ..Default::default()
            };
            let mut first = None;
            loop {
                let page = self.list(listing.clone()).await?;
                first.get_or_insert(page.sequence);
                let workflow = &request.workflow_id;
                current.extend(page.tasks.into_iter().filter(|t| workflow.is_empty() || &t.workflow_id == workflow));
                if page.next_page_token.is_empty() {
                    break;
                }
                listing.page_token = page.next_page_token;
            }
            sequence = first.unwrap_or(1);
        } else {
            // The listing's sequence first: the task read after it is at
            // least as new.
            sequence = self.list(proto::ListTasksRequest { page_size: 1, ..Default::default() }).await?.sequence;
            match self.get(&request.task_id).await {
                Ok(task) => current.push(task),
                Err(Error::Status(status)) if status.code() == Code::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        if tx.send(Ok(Change::Resync { sequence })).await.is_err() {
            return Ok(None);
        }
        for task in current {
            if tx.send(Ok(Change::Current(task))).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(sequence))
    }

    /// Streams the log lines agents sent for task `id`, attempt by attempt
    /// in chunks of consecutive lines; `attempt` 0 means every attempt.
    ///
    /// The server keeps a bounded tail per attempt: a chunk's `dropped`
    /// counts the lines lost right before it (dropped by the server's tail
    /// or by the agent's full buffer) and `first_line` numbers its first
    /// line, counting lost ones. Without `follow` the stream ends after the
    /// lines kept now; with it, new lines arrive as agents send them and the
    /// stream ends once the task is finished and its last attempt's log is
    /// complete (a chunk with `complete` set).
    pub async fn logs(
        &self,
        id: &str,
        attempt: u32,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogChunk, Error>>, Error> {
        let request = proto::GetTaskLogsRequest { task_id: id.to_owned(), attempt, follow };
        let stream = self.tasks.clone().get_task_logs(request).await?.into_inner();
        Ok(stream.map_ok(LogChunk::from).map_err(Error::Status).boxed())
    }

    /// Asks a task to stop; `reason` is recorded as the failure message.
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<Task, Error> {
        let request = proto::CancelTaskRequest { id: id.to_owned(), reason: reason.to_owned() };
        Ok(self.tasks.clone().cancel_task(request).await?.into_inner().into())
    }

    /// Requeues a failed or cancelled task with a fresh attempt budget.
    pub async fn retry(&self, id: &str) -> Result<Task, Error> {
        let request = proto::RetryTaskRequest { id: id.to_owned() };
        Ok(self.tasks.clone().retry_task(request).await?.into_inner().into())
    }

    /// Waits until the task is terminal (succeeded, failed or cancelled) and
    /// returns it.
    ///
    /// The watch is opened before the task is read, so a transition between
    /// the two cannot be missed; a watch that breaks is reopened after the
    /// last event seen, with backoff, for as long as the failure looks
    /// transient. Wrap the call in `tokio::time::timeout` to bound it.
    pub async fn wait(&self, id: &str) -> Result<Task, Error> {
        let mut events = self.watch(watch_one(id, 0)).await?;
        let mut last_seen = 0u64;
        let mut failures = 0u32;
        loop {
            let task = self.get(id).await?;
            if task.state.is_terminal() {
                return Ok(task);
            }
            last_seen = last_seen.max(task.sequence);
            // Read until a terminal state event (then read the task again) or
            // until the watch breaks (then reopen it and read the task again,
            // which also covers events the server no longer retains).
            let broken = loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        failures = 0;
                        last_seen = last_seen.max(event.sequence);
                        if event.task_id == id && event.is_terminal() {
                            break None;
                        }
                    }
                    Some(Err(err)) => break Some(err),
                    None => break Some(Error::Protocol("watch stream ended".to_owned())),
                }
            };
            if let Some(err) = broken {
                if !is_transient(&err) {
                    return Err(err);
                }
                tracing::debug!(task_id = id, "watch broke, reopening: {err}");
                events = self.rewatch(id, last_seen, &mut failures).await?;
            }
        }
    }

    /// Reopens the watch of task `id` after `last_seen`, retrying transient
    /// failures with backoff.
    async fn rewatch(
        &self,
        id: &str,
        last_seen: u64,
        failures: &mut u32,
    ) -> Result<BoxStream<'static, Result<TaskEvent, Error>>, Error> {
        let mut after = last_seen;
        loop {
            let delay = jittered(*failures, WATCH_BACKOFF_INITIAL, WATCH_BACKOFF_MAX);
            *failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
            match self.watch(watch_one(id, after)).await {
                Ok(events) => return Ok(events),
                // The events after `after` are no longer retained: watch live
                // instead; the caller reads the task right after, so nothing
                // is lost.
                Err(Error::Status(status))
                    if after != 0 && matches!(status.code(), Code::OutOfRange | Code::FailedPrecondition) =>
                {
                    after = 0;
                }
                Err(err) if is_transient(&err) => {
                    tracing::debug!(task_id = id, "reopening watch failed: {err}");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Lists connected agents, only those advertising `capability` unless it
    /// is empty.
    pub async fn list_agents(&self, capability: &str) -> Result<Vec<AgentInfo>, Error> {
        let request = proto::ListAgentsRequest { capability: capability.to_owned() };
        Ok(self
            .fleet
            .clone()
            .list_agents(request)
            .await?
            .into_inner()
            .agents
            .into_iter()
            .map(AgentInfo::from)
            .collect())
    }

    /// Fetches one agent.
    pub async fn get_agent(&self, id: &str) -> Result<AgentInfo, Error> {
        let request = proto::GetAgentRequest { id: id.to_owned() };
        Ok(self.fleet.clone().get_agent(request).await?.into_inner().into())
    }

    /// Stops new assignments to an agent; its running work finishes.
    pub async fn drain_agent(&self, id: &str) -> Result<AgentInfo, Error> {
        let request = proto::DrainAgentRequest { id: id.to_owned() };
        Ok(self.fleet.clone().drain_agent(request).await?.into_inner().into())
    }

    /// Undoes [`drain_agent`](Self::drain_agent).
    pub async fn resume_agent(&self, id: &str) -> Result<AgentInfo, Error> {
        let request = proto::ResumeAgentRequest { id: id.to_owned() };
        Ok(self.fleet.clone().resume_agent(request).await?.into_inner().into())
    }

    /// Why a task is not running: every reason that applies, from the
    /// scheduler's live state.
    pub async fn explain(&self, id: &str) -> Result<Explanation, Error> {
        let request = proto::ExplainTaskRequest { id: id.to_owned() };
        Ok(self.tasks.clone().explain_task(request).await?.into_inner().into())
    }

    /// A workflow's tasks with per-state counts and percent complete.
    pub async fn get_workflow(&self, id: &str) -> Result<Workflow, Error> {
        let request = proto::GetWorkflowRequest { id: id.to_owned() };
        Ok(self.tasks.clone().get_workflow(request).await?.into_inner().into())
    }

    /// Cancels every unfinished task of a workflow.
    pub async fn cancel_workflow(&self, id: &str, reason: &str) -> Result<Workflow, Error> {
        let request = proto::CancelWorkflowRequest { id: id.to_owned(), reason: reason.to_owned() };
        Ok(self.tasks.clone().cancel_workflow(request).await?.into_inner().into())
    }

    /// The server answering: its version, its store and who leads.
    pub async fn server(&self) -> Result<ServerInfo, Error> {
        Ok(self.fleet.clone().get_server(proto::GetServerRequest {}).await?.into_inner().into())
    }

    /// Every queue with settings or unfinished tasks.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, Error> {
        let queues = self.fleet.clone().list_queues(proto::ListQueuesRequest {}).await?.into_inner().queues;
        Ok(queues.into_iter().map(QueueInfo::from).collect())
    }

    /// Stops dispatch from a queue.
    pub async fn pause_queue(&self, name: &str) -> Result<QueueInfo, Error> {
        let request = proto::PauseQueueRequest { name: name.to_owned() };
        Ok(self.fleet.clone().pause_queue(request).await?.into_inner().into())
    }

    /// Undoes [`pause_queue`](Self::pause_queue).
    pub async fn resume_queue(&self, name: &str) -> Result<QueueInfo, Error> {
        let request = proto::ResumeQueueRequest { name: name.to_owned() };
        Ok(self.fleet.clone().resume_queue(request).await?.into_inner().into())
    }

    /// Sets a queue's dispatch weight (0 keeps it) and maximum running count
    /// (0 means unlimited).
    pub async fn configure_queue(&self, name: &str, weight: u32, max_running: u32) -> Result<QueueInfo, Error> {
        let request = proto::ConfigureQueueRequest { name: name.to_owned(), weight, max_running };
        Ok(self.fleet.clone().configure_queue(request).await?.into_inner().into())
    }

    /// Creates a token (admin only) and returns it with its secret, which
    /// the server shows only this once.
    pub async fn create_token(&self, request: proto::CreateTokenRequest) -> Result<CreatedToken, Error> {
        Ok(self.admin.clone().create_token(request).await?.into_inner().into())
    }

    /// Every token, revoked ones included (admin only).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        let tokens = self.admin.clone().list_tokens(proto::ListTokensRequest {}).await?.into_inner().tokens;
        Ok(tokens.into_iter().map(TokenInfo::from).collect())
    }

    /// Revokes a token at once and closes the agent sessions it opened
    /// (admin only).
    pub async fn revoke_token(&self, name: &str) -> Result<TokenInfo, Error> {
        Ok(self
            .admin
            .clone()
            .revoke_token(proto::RevokeTokenRequest { name: name.to_owned() })
            .await?
            .into_inner()
            .into())
    }

    /// A backup of the server's whole store as it was when the call began
    /// (admin only): the bytes of one backup file, in order. The file
    /// carries its own checksum, which `muster store restore` checks.
    pub async fn backup_store(&self) -> Result<BoxStream<'static, Result<Vec<u8>, Error>>, Error> {
        let stream = self.admin.clone().backup_store(proto::BackupStoreRequest {}).await?.into_inner();
        Ok(stream.map_ok(|chunk| chunk.data).map_err(Error::Status).boxed())
    }

    /// Checks every record and index of the server's store as it was when
    /// the call began (admin only).
    pub async fn verify_store(&self) -> Result<proto::VerifyStoreResponse, Error> {
        Ok(self.admin.clone().verify_store(proto::VerifyStoreRequest {}).await?.into_inner())
    }
}

/// A watch of one task's events after sequence `after`.
fn watch_one(id: &str, after: u64) -> proto::WatchTasksRequest {
    proto::WatchTasksRequest { task_id: id.to_owned(), after_sequence: after, ..proto::WatchTasksRequest::default() }
}

/// Whether a failed watch is worth reopening: network trouble and a server
/// restarting or failing over are; a bad request or a missing task are not.
fn is_transient(err: &Error) -> bool {
    match err {
        Error::Transport(_) | Error::Protocol(_) => true,
        Error::Status(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::Aborted
                | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;

    #[test]
    fn transient_errors_are_network_and_availability_failures() {
        assert!(is_transient(&Error::Status(Status::unavailable("restarting"))));
        assert!(is_transient(&Error::Protocol("watch stream ended".to_owned())));
        assert!(!is_transient(&Error::Status(Status::not_found("no task"))));
        assert!(!is_transient(&Error::Status(Status::invalid_argument("bad"))));
    }

    #[test]
    fn watch_one_filters_by_task_and_resumes_after_sequence() {
        let request = watch_one("t1", 42);
        assert_eq!(request.task_id, "t1");
        assert_eq!(request.after_sequence, 42);
        assert!(!request.from_start);
    }

    #[tokio::test]
    async fn connect_rejects_invalid_endpoint_before_dialing() {
        let result = Client::connect("ftp://127.0.0.1:1").await;
        assert!(matches!(result, Err(Error::InvalidEndpoint(_))));
    }
}
