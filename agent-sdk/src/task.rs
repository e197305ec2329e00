//! [`NewTask`], the builder for a [`TaskSpec`](crate::proto::TaskSpec).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::{Error, proto};

/// Builds a task spec without spelling out the generated struct, its
/// `Option<prost_types::Duration>` fields and its integer enums.
///
/// ```
/// use std::time::Duration;
/// use muster_sdk::{NewTask, proto};
///
/// let spec = NewTask::new("shell")
///     .json(&serde_json::json!({"argv": ["echo", "hello"]}))?
///     .priority(proto::Priority::High)
///     .timeout(Duration::from_secs(30))
///     .max_attempts(5)
///     .build();
/// assert_eq!(spec.capability, "shell");
/// # Ok::<(), muster_sdk::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a NewTask does nothing until it is built and submitted"]
pub struct NewTask {
    spec: proto::TaskSpec,
}

impl NewTask {
    /// Starts a task for agents advertising `capability`.
    pub fn new(capability: impl Into<String>) -> Self {
        Self { spec: proto::TaskSpec { capability: capability.into(), ..proto::TaskSpec::default() } }
    }

    /// Sets raw payload bytes; pair it with [`content_type`](Self::content_type)
    /// so the handler knows how to read them.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.spec.payload = payload.into();
        self
    }

    /// Encodes `value` as the JSON payload and sets the content type to
    /// `application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, Error> {
        self.spec.payload = serde_json::to_vec(value)?;
        self.spec.content_type = "application/json".to_owned();
        Ok(self)
    }

    /// Tells the handler how the payload is encoded.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.spec.content_type = content_type.into();
        self
    }

    /// Orders this task against other ready tasks (FIFO within a level);
    /// takes the SDK's [`Priority`](crate::Priority) or the wire enum.
    pub fn priority(mut self, priority: impl Into<proto::Priority>) -> Self {
        self.spec.priority = priority.into().into();
        self
    }

    /// Requires the agent to carry label `key=value`; every selector entry
    /// must match.
    pub fn selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.selector.insert(key.into(), value.into());
        self
    }

    /// Puts the task in `queue`, the unit of pausing and fairness.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.spec.queue = queue.into();
        self
    }

    /// Adds a free-form metadata entry, usable later to filter listings.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.metadata.insert(key.into(), value.into());
        self
    }

    /// Carries the submitter's W3C trace context (`traceparent`,
    /// `tracestate`) so the handler's span joins the same trace.
    pub fn trace_context(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.trace_context.insert(key.into(), value.into());
        self
    }

    /// Bounds one attempt's execution (the server default is 5 minutes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout = Some(to_proto_duration(timeout));
        self
    }

    /// Fails the task with reason `queue_timeout` if it waits queued longer.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.spec.queue_timeout = Some(to_proto_duration(timeout));
        self
    }

    /// Attempts in total, including the first; 1 disables retries.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.spec.retry.get_or_insert_with(Default::default).max_attempts = attempts;
        self
    }

    /// The retry backoff: starts at `initial`, doubles, never exceeds `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        let retry = self.spec.retry.get_or_insert_with(Default::default);
        retry.initial_backoff = Some(to_proto_duration(initial));
        retry.max_backoff = Some(to_proto_duration(max));
        self
    }

    /// Makes resubmission safe: a second submit with the same key returns the
    /// task created by the first.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.spec.idempotency_key = key.into();
        self
    }

    /// Keeps the task pending until `at`.
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.spec.not_before = Some(at.into());
        self
    }

    /// Names the task within one submit, so others in it can depend on it.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.spec.key = key.into();
        self
    }

    /// Runs only after this task succeeds: a key in the same submit or an
    /// existing task's id. May be called several times.
    pub fn depends_on(mut self, key_or_id: impl Into<String>) -> Self {
        self.spec.depends_on.push(key_or_id.into());
        self
    }

    /// Holds the named lock alone while an attempt runs.
    pub fn exclusive_lock(mut self, name: impl Into<String>) -> Self {
        self.spec.locks.push(proto::Lock { name: name.into(), mode: proto::LockMode::Exclusive as i32 });
        self
    }

    /// Holds the named lock alongside other shared holders while an attempt
    /// runs.
    pub fn shared_lock(mut self, name: impl Into<String>) -> Self {
        self.spec.locks.push(proto::Lock { name: name.into(), mode: proto::LockMode::Shared as i32 });
        self
    }

    /// Runs only while fewer than `max` tasks with the same key run.
    pub fn concurrency(mut self, key: impl Into<String>, max: u32) -> Self {
        self.spec.concurrency = Some(proto::Concurrency { key: key.into(), max });
        self
    }

    /// Returns the spec to pass to [`Client::submit`](crate::Client::submit).
    pub fn build(self) -> proto::TaskSpec {
        self.spec
    }
}

impl From<NewTask> for proto::TaskSpec {
    fn from(task: NewTask) -> Self {
        task.build()
    }
}

/// Converts a std duration, saturating at the largest protobuf duration
/// instead of failing: "practically forever" is what such a caller means.
pub(crate) fn to_proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 999_999_999 })
}

/// Converts a protobuf duration, treating absent, negative or zero values as
/// absent.
pub(crate) fn from_proto_duration(duration: Option<prost_types::Duration>) -> Option<Duration> {
    duration.and_then(|d| Duration::try_from(d).ok()).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_sets_every_field() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let spec = NewTask::new("shell")
            .payload(b"raw".to_vec())
            .content_type("text/plain")
            .priority(proto::Priority::High)
            .selector("os", "linux")
            .queue("builds")
            .metadata("team", "infra")
            .trace_context("traceparent", "00-abc-def-01")
            .timeout(Duration::from_secs(30))
            .queue_timeout(Duration::from_secs(600))
            .max_attempts(5)
            .backoff(Duration::from_millis(500), Duration::from_secs(10))
            .idempotency_key("build-42")
            .not_before(at)
            .build();
        assert_eq!(spec.capability, "shell");
        assert_eq!(spec.payload, b"raw");
        assert_eq!(spec.content_type, "text/plain");
        assert_eq!(spec.priority(), proto::Priority::High);
        assert_eq!(spec.selector.get("os").map(String::as_str), Some("linux"));
        assert_eq!(spec.queue, "builds");
        assert_eq!(spec.metadata.get("team").map(String::as_str), Some("infra"));
        assert_eq!(spec.trace_context.get("traceparent").map(String::as_str), Some("00-abc-def-01"));
        assert_eq!(from_proto_duration(spec.timeout), Some(Duration::from_secs(30)));
        assert_eq!(from_proto_duration(spec.queue_timeout), Some(Duration::from_secs(600)));
        let retry = spec.retry.unwrap_or_default();
        assert_eq!(retry.max_attempts, 5);
        assert_eq!(from_proto_duration(retry.initial_backoff), Some(Duration::from_millis(500)));
        assert_eq!(from_proto_duration(retry.max_backoff), Some(Duration::from_secs(10)));
        assert_eq!(spec.idempotency_key, "build-42");
        assert_eq!(spec.not_before.map(|t| t.seconds), Some(1_700_000_000), "not_before is carried as a timestamp");
    }

    #[test]
    fn builder_defaults_leave_server_defaults_in_place() {
        let spec = NewTask::new("echo").build();
        assert_eq!(spec.capability, "echo");
        assert!(spec.payload.is_empty());
        assert_eq!(spec.priority(), proto::Priority::Unspecified);
        assert!(spec.retry.is_none());
        assert!(spec.timeout.is_none());
        assert!(spec.queue.is_empty());
    }

    #[test]
    fn priority_takes_the_sdks_enum_or_the_wire_one() {
        let spec = NewTask::new("x").priority(crate::Priority::Critical).build();
        assert_eq!(spec.priority(), proto::Priority::Critical);
        let spec = NewTask::new("x").priority(proto::Priority::Low).build();
        assert_eq!(spec.priority(), proto::Priority::Low);
    }

    #[test]
    fn json_sets_payload_and_content_type() {
        let spec = NewTask::new("shell").json(&serde_json::json!({"argv": ["echo", "hi"]})).map(NewTask::build);
        let spec = match spec {
            Ok(spec) => spec,
            Err(err) => panic!("json failed: {err}"),
        };
        assert_eq!(spec.content_type, "application/json");
        let value: serde_json::Value = serde_json::from_slice(&spec.payload).unwrap_or_default();
        assert_eq!(value["argv"][1], "hi");
    }

    #[test]
    fn max_attempts_and_backoff_share_one_retry_policy() {
        let spec = NewTask::new("x").backoff(Duration::from_secs(1), Duration::from_secs(2)).max_attempts(1).build();
        let retry = spec.retry.unwrap_or_default();
        assert_eq!(retry.max_attempts, 1);
        assert!(retry.initial_backoff.is_some());
    }

    #[test]
    fn huge_durations_saturate_instead_of_failing() {
        let d = to_proto_duration(Duration::MAX);
        assert_eq!(d.seconds, i64::MAX);
    }

    #[test]
    fn zero_or_negative_proto_durations_read_as_absent() {
        assert_eq!(from_proto_duration(None), None);
        assert_eq!(from_proto_duration(Some(prost_types::Duration::default())), None);
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        assert_eq!(from_proto_duration(Some(negative)), None);
    }
}
