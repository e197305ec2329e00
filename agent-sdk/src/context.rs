//! What a handler sees ([`TaskContext`]) and what it returns ([`Output`] or
//! [`TaskError`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::log_writer::LogWriter;
use crate::logs::{LogSink, split_lines};
use crate::proto;
use crate::text::truncate_at_char_boundary;
use crate::types::{LogStream, ParentOutput, Priority};

/// Longest progress message sent to the server, in bytes; longer messages are
/// cut at a character boundary so a chatty handler cannot get the session
/// closed for an oversized report.
const MAX_PROGRESS_MESSAGE: usize = 1024;

/// The reason a failure carries unless the handler picks another one.
const HANDLER_ERROR: &str = "handler_error";

/// One attempt of one task, as handed to a handler.
///
/// Cloning is cheap (the assignment is shared), so the context can move into
/// spawned sub-tasks that report progress or watch for cancellation.
#[derive(Clone)]
pub struct TaskContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    task_id: String,
    attempt: u32,
    capability: String,
    payload: Vec<u8>,
    content_type: String,
    metadata: HashMap<String, String>,
    trace_context: HashMap<String, String>,
    queue: String,
    priority: Priority,
    deadline: Option<SystemTime>,
    parent_outputs: Vec<ParentOutput>,
    token: CancellationToken,
    progress: mpsc::Sender<ProgressReport>,
    logs: LogSink,
}

/// A progress report on its way from a handler to the session owner.
#[derive(Debug)]
pub(crate) struct ProgressReport {
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
    pub(crate) percent: u32,
    pub(crate) message: String,
}

impl TaskContext {
    /// Builds the context of one assignment; `token` fires when the attempt
    /// must stop, and its log lines go to `logs`.
    pub(crate) fn new(
        assignment: proto::Assignment,
        attempt: proto::AttemptRef,
        token: CancellationToken,
        progress: mpsc::Sender<ProgressReport>,
        logs: LogSink,
    ) -> Self {
        let priority = Priority::from(assignment.priority());
        let deadline = assignment.deadline.and_then(|deadline| SystemTime::try_from(deadline).ok());
        Self {
            inner: Arc::new(ContextInner {
                task_id: attempt.task_id,
                attempt: attempt.attempt,
                capability: assignment.capability,
                payload: assignment.payload,
                content_type: assignment.content_type,
                metadata: assignment.metadata,
                trace_context: assignment.trace_context,
                queue: assignment.queue,
                priority,
                deadline,
                parent_outputs: assignment.parent_outputs.into_iter().map(ParentOutput::from).collect(),
                token,
                progress,
                logs,
            }),
        }
    }

    /// The outputs of the tasks this one depended on, in the order they
    /// finished. Each carries the parent's key in its workflow.
    pub fn parent_outputs(&self) -> &[ParentOutput] {
        &self.inner.parent_outputs
    }

    /// The output of the dependency with this key (or task id).
    pub fn parent_output(&self, key: &str) -> Option<&[u8]> {
        self.inner.parent_outputs.iter().find(|p| p.key == key || p.task_id == key).map(|p| p.output.as_slice())
    }

    /// The JSON output of the dependency with this key, decoded.
    pub fn parent_json<T: DeserializeOwned>(&self, key: &str) -> Result<T, TaskError> {
        let bytes = self.parent_output(key).ok_or_else(|| {
            TaskError::fatal(format!("no dependency with key '{key}'")).with_reason("invalid_payload")
        })?;
        serde_json::from_slice(bytes).map_err(|e| {
            TaskError::fatal(format!("output of '{key}' is not the expected JSON: {e}")).with_reason("invalid_payload")
        })
    }

    /// The task's id, stable across attempts: use it as an idempotency key
    /// for side effects, since execution is at-least-once.
    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }

    /// The attempt number, starting at 1; higher means earlier attempts
    /// failed or were lost.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The capability this task was routed by, for handlers registered under
    /// several capabilities.
    pub fn capability(&self) -> &str {
        &self.inner.capability
    }

    /// The raw payload as submitted.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// How the submitter encoded the payload (may be empty).
    pub fn content_type(&self) -> &str {
        &self.inner.content_type
    }

    /// Decodes the payload as JSON; a payload that does not decode is the
    /// submitter's mistake, so the error is not retryable (reason
    /// `invalid_payload`) and can be returned with `?`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        serde_json::from_slice(&self.inner.payload)
            .map_err(|err| TaskError::fatal(format!("invalid payload: {err}")).with_reason("invalid_payload"))
    }

    /// The submitter's free-form metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.inner.metadata
    }

    /// The W3C trace context (`traceparent`, `tracestate`) to continue the
    /// submitter's trace from.
    pub fn trace_context(&self) -> &HashMap<String, String> {
        &self.inner.trace_context
    }

    /// The queue the task came from.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The task's priority.
    pub fn priority(&self) -> Priority {
        self.inner.priority
    }

    /// When the server times this attempt out; work past it is wasted.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.inner.deadline
    }

    /// Reports progress (`percent` is clamped to 100). Best effort: reports
    /// are dropped while the agent is disconnected or when the handler
    /// reports faster than they can be sent, and never fail the handler.
    pub async fn progress(&self, percent: u32, message: impl Into<String>) {
        let mut message = message.into();
        truncate_at_char_boundary(&mut message, MAX_PROGRESS_MESSAGE);
        let report = ProgressReport {
            task_id: self.inner.task_id.clone(),
            attempt: self.inner.attempt,
            percent: percent.min(100),
            message,
        };
        if let Err(err) = self.inner.progress.try_send(report) {
            tracing::debug!(task_id = %self.inner.task_id, "progress report dropped: {err}");
        }
    }

    /// Adds a line to this attempt's live log (stream `log`), viewable with
    /// `muster task logs ID --follow` and [`Client::logs`](crate::Client::logs).
    ///
    /// Text with newlines becomes several lines (a trailing newline and a
    /// `\r` ending a line are dropped), and lines are cut to 16 KiB. Never
    /// blocks and never fails the handler: lines wait in a per-attempt
    /// buffer (1 MiB) that the agent sends in batches a few times a second,
    /// and keeps through a disconnection; when it is full the oldest lines
    /// are dropped, and the log shows how many. Lines logged before the
    /// handler returns reach the server before its result.
    pub fn log(&self, line: impl Into<String>) {
        self.log_stream(LogStream::Log, line);
    }

    /// Like [`log`](Self::log), marking the lines as coming from `stream`:
    /// [`LogStream::Stdout`] and [`LogStream::Stderr`] for a child
    /// process's output.
    pub fn log_stream(&self, stream: LogStream, line: impl Into<String>) {
        self.inner.logs.push(stream, split_lines(line.into()));
    }

    /// A writer that turns bulk output into log lines of `stream`, for
    /// copying a child process's output or handing to code that writes to
    /// an [`std::io::Write`] or [`tokio::io::AsyncWrite`]. It holds an
    /// unfinished last line until a newline, a flush, or its drop.
    pub fn log_writer(&self, stream: LogStream) -> LogWriter {
        LogWriter::new(self.inner.logs.clone(), stream)
    }

    /// A token that fires when this attempt must stop (cancel requested,
    /// agent shutting down, or the agent lost its lease). It is a child token:
    /// cancelling it does not cancel the attempt.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.token.child_token()
    }

    /// Completes when this attempt must stop; use it in `tokio::select!`
    /// against the real work.
    pub async fn cancelled(&self) {
        self.inner.token.cancelled().await;
    }

    /// Whether this attempt must stop, for handlers that poll between steps.
    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.inner.task_id)
            .field("attempt", &self.inner.attempt)
            .field("capability", &self.inner.capability)
            .field("content_type", &self.inner.content_type)
            .field("payload_len", &self.inner.payload.len())
            .field("queue", &self.inner.queue)
            .field("deadline", &self.inner.deadline)
            .field("cancelled", &self.inner.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// A handler's successful result, stored as the task's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The output bytes.
    pub data: Vec<u8>,
    /// How `data` is encoded, so readers of the task can decode it.
    pub content_type: String,
}

impl Output {
    /// No output, for handlers whose effect is the point.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Encodes `value` as JSON (`application/json`). Failing to encode is a
    /// bug in the handler, not a transient fault, so the error is not
    /// retryable.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, TaskError> {
        let data = serde_json::to_vec(value).map_err(|err| {
            TaskError::fatal(format!("cannot encode output as json: {err}")).with_reason("invalid_output")
        })?;
        Ok(Self { data, content_type: "application/json".to_owned() })
    }
}

impl From<Vec<u8>> for Output {
    fn from(data: Vec<u8>) -> Self {
        Self { data, content_type: "application/octet-stream".to_owned() }
    }
}

impl From<String> for Output {
    fn from(text: String) -> Self {
        Self { data: text.into_bytes(), content_type: "text/plain; charset=utf-8".to_owned() }
    }
}

impl From<&str> for Output {
    fn from(text: &str) -> Self {
        Self::from(text.to_owned())
    }
}

/// A handler's failure. `retryable` decides whether the server schedules
/// another attempt (if the retry policy has attempts left) or fails the task
/// for good; `reason` is a short machine-readable word that dashboards and
/// `muster task` group failures by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// Short machine-readable reason, `handler_error` unless set.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// False when another attempt cannot succeed (bad input, missing
    /// program); true for transient faults.
    pub retryable: bool,
}

impl TaskError {
    /// A transient failure worth another attempt.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { reason: HANDLER_ERROR.to_owned(), message: message.into(), retryable: true }
    }

    /// A failure another attempt would repeat.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self { reason: HANDLER_ERROR.to_owned(), message: message.into(), retryable: false }
    }

    /// Replaces the reason, for failures callers should tell apart.
    #[must_use]
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<std::io::Error> for TaskError {
    /// I/O errors are usually transient (a full disk, a reset connection),
    /// so they are retryable.
    fn from(err: std::io::Error) -> Self {
        Self::retryable(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_context(payload: &[u8]) -> (TaskContext, mpsc::Receiver<ProgressReport>) {
        let (tx, rx) = mpsc::channel(4);
        let (log_tx, _log_rx) = mpsc::channel(4);
        let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
        let logs = LogSink::new(("t1".to_owned(), 2), log_tx, dropped);
        let assignment = proto::Assignment {
            capability: "echo".to_owned(),
            payload: payload.to_vec(),
            content_type: "application/json".to_owned(),
            ..proto::Assignment::default()
        };
        let context = TaskContext::new(assignment, proto::AttemptRef::new("t1", 2), CancellationToken::new(), tx, logs);
        (context, rx)
    }

    #[test]
    fn task_error_constructors_set_reason_and_retryability() {
        let retry = TaskError::retryable("flaky");
        assert_eq!(retry.reason, "handler_error");
        assert!(retry.retryable);
        let fatal = TaskError::fatal("bad").with_reason("invalid_payload");
        assert_eq!(fatal.reason, "invalid_payload");
        assert!(!fatal.retryable);
        assert_eq!(fatal.to_string(), "invalid_payload: bad");
    }

    #[test]
    fn io_errors_are_retryable() {
        let err = TaskError::from(std::io::Error::other("disk full"));
        assert!(err.retryable);
        assert_eq!(err.message, "disk full");
    }

    #[test]
    fn output_conversions_set_content_types() {
        let bytes = Output::from(vec![1, 2, 3]);
        assert_eq!(bytes.content_type, "application/octet-stream");
        let text = Output::from("hello");
        assert_eq!(text.data, b"hello");
        assert_eq!(text.content_type, "text/plain; charset=utf-8");
        assert_eq!(Output::from(String::from("x")).data, b"x");
        let json = Output::json(&serde_json::json!({"ok": true})).unwrap_or_default();
        assert_eq!(json.content_type, "application/json");
        assert_eq!(json.data, br#"{"ok":true}"#);
        assert_eq!(Output::empty(), Output::default());
    }

    #[test]
    fn context_json_rejects_bad_payload_as_fatal_invalid_payload() {
        let (context, _rx) = make_context(b"{not json");
        let err = context.json::<serde_json::Value>().err();
        let err = err.unwrap_or_else(|| TaskError::retryable("decoded"));
        assert_eq!(err.reason, "invalid_payload");
        assert!(!err.retryable);
        assert!(err.message.starts_with("invalid payload: "), "{}", err.message);
    }

    #[test]
    fn context_exposes_the_assignment() {
        let (context, _rx) = make_context(br#"{"n": 3}"#);
        assert_eq!(context.task_id(), "t1");
        assert_eq!(context.attempt(), 2);
        assert_eq!(context.capability(), "echo");
        let value: serde_json::Value = context.json().unwrap_or_default();
        assert_eq!(value["n"], 3);
        assert!(!context.is_cancelled());
    }

    #[tokio::test]
    async fn progress_is_clamped_and_truncated() {
        let (context, mut rx) = make_context(b"");
        context.progress(250, "é".repeat(1000)).await;
        let report = rx.recv().await;
        let report = report.map(|r| (r.percent, r.message.len(), r.task_id));
        assert_eq!(report, Some((100, 1024, "t1".to_owned())));
    }

    #[tokio::test]
    async fn progress_never_blocks_when_the_channel_is_full() {
        let (context, _rx) = make_context(b"");
        for percent in 0..20 {
            context.progress(percent, "step").await;
        }
    }

    #[test]
    fn log_lines_go_to_the_attempts_buffer_split_and_tagged() {
        let (context, _rx) = make_context(b"");
        context.log("one\ntwo\n");
        context.log_stream(LogStream::Stderr, "three\r");
        let mut writer = context.log_writer(LogStream::Stdout);
        std::io::Write::write_all(&mut writer, b"four\nfi").unwrap_or_default();
        drop(writer);
        let (lines, dropped) = context.inner.logs.take().unwrap_or_default();
        let lines: Vec<(proto::LogStream, &str)> =
            lines.iter().map(|line| (line.stream(), line.text.as_str())).collect();
        assert_eq!(
            lines,
            [
                (proto::LogStream::Log, "one"),
                (proto::LogStream::Log, "two"),
                (proto::LogStream::Stderr, "three"),
                (proto::LogStream::Stdout, "four"),
                (proto::LogStream::Stdout, "fi"),
            ]
        );
        assert_eq!(dropped, 0);
    }

    #[test]
    fn priority_and_parent_outputs_are_the_sdks_own_types() {
        let (tx, _rx) = mpsc::channel(4);
        let (log_tx, _log_rx) = mpsc::channel(4);
        let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
        let assignment = proto::Assignment {
            priority: proto::Priority::High.into(),
            parent_outputs: vec![proto::ParentOutput {
                key: "build".to_owned(),
                task_id: "t0".to_owned(),
                output: b"\"ok\"".to_vec(),
                content_type: "application/json".to_owned(),
            }],
            ..proto::Assignment::default()
        };
        let logs = LogSink::new(("t1".to_owned(), 1), log_tx, dropped);
        let attempt = proto::AttemptRef::new("t1", 1);
        let context = TaskContext::new(assignment, attempt, CancellationToken::new(), tx, logs);
        assert_eq!(context.priority(), Priority::High);
        assert_eq!(context.parent_outputs().iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["build"]);
        assert_eq!(context.parent_output("t0"), Some(&b"\"ok\""[..]));
        assert_eq!(context.parent_json::<String>("build").ok().as_deref(), Some("ok"));
    }

    #[test]
    fn child_token_does_not_cancel_the_attempt() {
        let (context, _rx) = make_context(b"");
        context.cancellation_token().cancel();
        assert!(!context.is_cancelled());
    }
}
