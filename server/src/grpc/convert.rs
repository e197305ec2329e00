//! Conversions between `muster.v1` wire types and the domain model, with
//! validation of everything that comes in.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use muster_proto::pb;

use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::*;
use crate::scheduler::ToAgent;
use crate::validate;

/// An agent's log lines as the log hub keeps them: each cut to
/// `max_log_line_bytes`, timed by the agent (a time before 1970 or past
/// year 9999 takes `now`, the arrival); positions are set when they join a
/// tail.
pub(crate) fn log_lines(lines: Vec<pb::LogLine>, limits: &crate::config::Limits, now: Millis) -> Vec<LogLine> {
    let line = |line: pb::LogLine| {
        let mut text = line.text;
        validate::cut(&mut text, limits.max_log_line_bytes);
        let at = line
            .time
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| Millis::try_from(d.as_millis()).ok())
            .filter(|&ms| ms <= validate::LAST_TIMESTAMP_MS)
            .unwrap_or(now);
        let stream = match pb::LogStream::try_from(line.stream) {
            Ok(pb::LogStream::Stdout) => LogStream::Stdout,
            Ok(pb::LogStream::Stderr) => LogStream::Stderr,
            _ => LogStream::Log,
        };
        LogLine { position: 0, at, stream, text }
    };
    lines.into_iter().map(line).collect()
}

pub(crate) fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

fn opt_timestamp(ms: Option<Millis>) -> Option<prost_types::Timestamp> {
    ms.map(timestamp)
}

pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn from_duration(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Error> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 => {
            Err(Error::invalid(field, "must be a non-negative duration"))
        }
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

/// A client's duration, refused when it is longer than `max` (the limit
/// named `limit`): everything the scheduler adds to a clock is bounded here.
fn bounded_duration(
    field: &str,
    d: Option<prost_types::Duration>,
    max: Duration,
    limit: &str,
) -> Result<Option<Duration>, Error> {
    match from_duration(field, d)? {
        Some(d) if d > max => {
            Err(Error::invalid(field, format!("must be at most {} ({limit})", validate::limit_text(max))))
        }
        d => Ok(d),
    }
}

/// A client's timestamp in milliseconds since 1970, refused when it lies
/// more than `max_ahead` (the limit named `limit`) after `now`.
fn from_timestamp(
    field: &str,
    t: Option<prost_types::Timestamp>,
    now: Millis,
    max_ahead: Duration,
    limit: &str,
) -> Result<Option<Millis>, Error> {
    let Some(t) = t else { return Ok(None) };
    if t.seconds < 0 || t.nanos < 0 || t.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a timestamp after 1970"));
    }
    let latest = now.saturating_add(u64::try_from(max_ahead.as_millis()).unwrap_or(u64::MAX));
    let ms = (t.seconds as u64)
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(t.nanos as u64 / 1_000_000))
        .filter(|&ms| ms <= latest)
        .ok_or_else(|| {
            Error::invalid(field, format!("must be at most {} from now ({limit})", validate::limit_text(max_ahead)))
        })?;
    Ok(Some(ms))
}

pub(crate) fn state_to_pb(state: TaskState) -> pb::TaskState {
    match state {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Queued => pb::TaskState::Queued,
        TaskState::Assigned => pb::TaskState::Assigned,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

pub(crate) fn state_from_pb(field: &str, value: i32) -> Result<TaskState, Error> {
    match pb::TaskState::try_from(value) {
        Ok(pb::TaskState::Pending) => Ok(TaskState::Pending),
        Ok(pb::TaskState::Queued) => Ok(TaskState::Queued),
        Ok(pb::TaskState::Assigned) => Ok(TaskState::Assigned),
        Ok(pb::TaskState::Running) => Ok(TaskState::Running),
        Ok(pb::TaskState::Succeeded) => Ok(TaskState::Succeeded),
        Ok(pb::TaskState::Failed) => Ok(TaskState::Failed),
        Ok(pb::TaskState::Cancelled) => Ok(TaskState::Cancelled),
        _ => Err(Error::invalid(field, format!("{value} is not a task state"))),
    }
}

fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Low => pb::Priority::Low,
        Priority::Normal => pb::Priority::Normal,
        Priority::High => pb::Priority::High,
        Priority::Critical => pb::Priority::Critical,
    }
}

fn priority_from_pb(value: i32) -> Result<Priority, Error> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Critical) => Ok(Priority::Critical),
        Err(_) => Err(Error::invalid("priority", format!("{value} is not a priority"))),
    }
}

fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn unsorted(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(crate) fn task_id(field: &str, value: &str) -> Result<TaskId, Error> {
    value.parse::<TaskId>().map_err(|e| Error::invalid(field, e.to_string()))
}

pub(crate) fn workflow_id(field: &str, value: &str) -> Result<WorkflowId, Error> {
    value.parse::<WorkflowId>().map_err(|e| Error::invalid(field, e.to_string()))
}

pub(crate) fn agent_id(field: &str, value: &str) -> Result<AgentId, Error> {
    value.parse::<AgentId>().map_err(|e| Error::invalid(field, e.to_string()))
}

/// Validates one submitted task, graph fields included.
pub(crate) fn submission(mut spec: pb::TaskSpec, config: &ServerConfig) -> Result<Submission, Error> {
    let limits = &config.limits;
    let depends_on = std::mem::take(&mut spec.depends_on);
    validate::within(
        "depends_on",
        "dependencies",
        depends_on.len(),
        limits.max_dependencies_per_task,
        "max_dependencies_per_task",
    )?;
    for (i, dep) in depends_on.iter().enumerate() {
        if dep.is_empty() {
            return Err(Error::invalid(format!("depends_on[{i}]"), "must not be empty"));
        }
    }
    Ok(Submission { spec: task_spec(spec, config)?, depends_on })
}

fn lock_mode(value: i32) -> Result<LockMode, Error> {
    match pb::LockMode::try_from(value) {
        Ok(pb::LockMode::Unspecified | pb::LockMode::Exclusive) => Ok(LockMode::Exclusive),
        Ok(pb::LockMode::Shared) => Ok(LockMode::Shared),
        Err(_) => Err(Error::invalid("locks.mode", format!("{value} is not a lock mode"))),
    }
}

/// Validates a submitted spec and fills in the server's defaults.
pub(crate) fn task_spec(spec: pb::TaskSpec, config: &ServerConfig) -> Result<TaskSpec, Error> {
    let limits = &config.limits;
    let key = if spec.key.is_empty() {
        None
    } else {
        validate::name("key", &spec.key, limits)?;
        Some(spec.key)
    };
    validate::within("locks", "locks", spec.locks.len(), limits.max_locks_per_task, "max_locks_per_task")?;
    let mut locks: Vec<LockSpec> = Vec::with_capacity(spec.locks.len());
    for (i, lock) in spec.locks.into_iter().enumerate() {
        validate::name(&format!("locks[{i}].name"), &lock.name, limits)?;
        if locks.iter().any(|l| l.name == lock.name) {
            return Err(Error::invalid(format!("locks[{i}].name"), format!("'{}' is named twice", lock.name)));
        }
        locks.push(LockSpec { name: lock.name, mode: lock_mode(lock.mode)? });
    }
    let concurrency = match spec.concurrency {
        None => None,
        Some(c) => {
            validate::name("concurrency.key", &c.key, limits)?;
            if c.max == 0 {
                return Err(Error::invalid("concurrency.max", "must be at least 1"));
            }
            Some(ConcurrencySpec { key: c.key, max: c.max })
        }
    };
    validate::name("capability", &spec.capability, limits)?;
    let queue = if spec.queue.is_empty() { "default".to_owned() } else { spec.queue };
    validate::name("queue", &queue, limits)?;
    let selector = sorted(spec.selector);
    validate::string_map("selector", &selector, limits.max_labels, "max_labels", limits)?;
    let metadata = sorted(spec.metadata);
    validate::string_map("metadata", &metadata, limits.max_metadata_entries, "max_metadata_entries", limits)?;
    let trace_context = sorted(spec.trace_context);
    validate::string_map("trace_context", &trace_context, 8, "8 entries", limits)?;
    validate::within("payload", "bytes", spec.payload.len(), limits.max_payload_bytes, "max_payload_bytes")?;
    validate::within("content_type", "characters", spec.content_type.len(), limits.max_value_len, "max_value_len")?;
    let timeout = match bounded_duration("timeout", spec.timeout, limits.max_timeout, "max_timeout")? {
        None => config.default_timeout,
        Some(d) if d.is_zero() => config.default_timeout,
        Some(d) if d < Duration::from_millis(1) => return Err(Error::invalid("timeout", "must be at least 1ms")),
        Some(d) => d,
    };
    let queue_timeout =
        bounded_duration("queue_timeout", spec.queue_timeout, limits.max_queue_timeout, "max_queue_timeout")?
            .filter(|d| !d.is_zero());
    let defaults = &config.default_retry;
    let retry = match spec.retry {
        None => RetryPolicy {
            max_attempts: defaults.max_attempts,
            initial_backoff: defaults.initial_backoff,
            max_backoff: defaults.max_backoff,
            multiplier: defaults.multiplier,
        },
        Some(r) => {
            let max_attempts = if r.max_attempts == 0 { defaults.max_attempts } else { r.max_attempts };
            if max_attempts > limits.max_attempts {
                return Err(Error::ResourceExhausted(format!(
                    "retry.max_attempts: {max_attempts} is over the limit of {} (max_attempts)",
                    limits.max_attempts
                )));
            }
            let max = limits.max_retry_backoff;
            let initial_backoff =
                bounded_duration("retry.initial_backoff", r.initial_backoff, max, "max_retry_backoff")?
                    .unwrap_or(defaults.initial_backoff);
            let max_backoff = bounded_duration("retry.max_backoff", r.max_backoff, max, "max_retry_backoff")?
                .unwrap_or(defaults.max_backoff);
            if max_backoff < initial_backoff {
                return Err(Error::invalid("retry.max_backoff", "must not be shorter than retry.initial_backoff"));
            }
            let multiplier = if r.multiplier == 0.0 { 2.0 } else { r.multiplier };
            // NaN is in no range, so it is refused here too.
            if !(1.0..=100.0).contains(&multiplier) {
                return Err(Error::invalid("retry.multiplier", "must be between 1 and 100"));
            }
            RetryPolicy { max_attempts, initial_backoff, max_backoff, multiplier }
        }
    };
    let idempotency_key = if spec.idempotency_key.is_empty() {
        None
    } else {
        validate::within(
            "idempotency_key",
            "bytes",
            spec.idempotency_key.len(),
            limits.max_idempotency_key_len,
            "max_idempotency_key_len",
        )?;
        Some(spec.idempotency_key)
    };
    Ok(TaskSpec {
        capability: spec.capability,
        selector,
        queue,
        priority: priority_from_pb(spec.priority)?,
        payload: spec.payload.into(),
        content_type: spec.content_type,
        metadata,
        timeout,
        queue_timeout,
        retry,
        idempotency_key,
        not_before: from_timestamp(
            "not_before",
            spec.not_before,
            now_ms(),
            limits.max_not_before_ahead,
            "max_not_before_ahead",
        )?,
        trace_context,
        key,
        depends_on: Vec::new(),
        locks,
        concurrency,
    })
}

fn spec_to_pb(spec: &TaskSpec) -> pb::TaskSpec {
    pb::TaskSpec {
        capability: spec.capability.clone(),
        selector: unsorted(&spec.selector),
        queue: spec.queue.clone(),
        priority: priority_to_pb(spec.priority) as i32,
        payload: spec.payload.to_vec(),
        content_type: spec.content_type.clone(),
        metadata: unsorted(&spec.metadata),
        timeout: Some(duration(spec.timeout)),
        queue_timeout: spec.queue_timeout.map(duration),
        retry: Some(pb::RetryPolicy {
            max_attempts: spec.retry.max_attempts,
            initial_backoff: Some(duration(spec.retry.initial_backoff)),
            max_backoff: Some(duration(spec.retry.max_backoff)),
            multiplier: spec.retry.multiplier,
        }),
        idempotency_key: spec.idempotency_key.clone().unwrap_or_default(),
        not_before: opt_timestamp(spec.not_before),
        trace_context: unsorted(&spec.trace_context),
        key: spec.key.clone().unwrap_or_default(),
        depends_on: spec.depends_on.iter().map(ToString::to_string).collect(),
        locks: spec
            .locks
            .iter()
            .map(|l| pb::Lock {
                name: l.name.clone(),
                mode: match l.mode {
                    LockMode::Exclusive => pb::LockMode::Exclusive,
                    LockMode::Shared => pb::LockMode::Shared,
                } as i32,
            })
            .collect(),
        concurrency: spec.concurrency.as_ref().map(|c| pb::Concurrency { key: c.key.clone(), max: c.max }),
    }
}

fn failure_to_pb(f: &Failure) -> pb::Failure {
    pb::Failure { reason: f.reason.clone(), message: f.message.clone(), retryable: f.retryable }
}

fn progress_to_pb(p: &Progress) -> pb::Progress {
    pb::Progress { percent: p.percent, message: p.message.clone(), at: Some(timestamp(p.at)) }
}

pub(crate) fn task_to_pb(task: &Task) -> pb::Task {
    pb::Task {
        id: task.id.to_string(),
        spec: Some(spec_to_pb(&task.spec)),
        state: state_to_pb(task.state) as i32,
        attempt: task.attempt,
        attempts: task
            .attempts
            .iter()
            .map(|a| pb::Attempt {
                number: a.number,
                agent_id: a.agent_id.to_string(),
                agent_name: a.agent_name.clone(),
                assigned_at: Some(timestamp(a.assigned_at)),
                started_at: opt_timestamp(a.started_at),
                finished_at: opt_timestamp(a.finished_at),
                state: state_to_pb(a.state) as i32,
                failure: a.failure.as_ref().map(failure_to_pb),
            })
            .collect(),
        output: task.output.to_vec(),
        output_content_type: task.output_content_type.clone(),
        failure: task.failure.as_ref().map(failure_to_pb),
        progress: task.progress.as_ref().map(progress_to_pb),
        created_at: Some(timestamp(task.created_at)),
        updated_at: Some(timestamp(task.updated_at)),
        ready_at: opt_timestamp(task.ready_at),
        deadline: opt_timestamp(task.deadline),
        cancel_requested: task.cancel_requested,
        sequence: task.sequence,
        workflow_id: task.workflow.map(|w| w.to_string()).unwrap_or_default(),
        depends_on_ids: task.spec.depends_on.iter().map(ToString::to_string).collect(),
        submitted_by: task.submitted_by.clone().unwrap_or_default(),
    }
}

pub(crate) fn event_to_pb(event: &TaskEvent) -> pb::TaskEvent {
    pb::TaskEvent {
        sequence: event.sequence,
        task_id: event.task_id.to_string(),
        kind: match event.kind {
            EventKind::State => pb::EventKind::State,
            EventKind::Progress => pb::EventKind::Progress,
        } as i32,
        state: state_to_pb(event.state) as i32,
        previous_state: event.previous_state.map_or(pb::TaskState::Unspecified, state_to_pb) as i32,
        attempt: event.attempt,
        agent_id: event.agent_id.map(|a| a.to_string()).unwrap_or_default(),
        queue: event.queue.clone(),
        capability: event.capability.clone(),
        reason: event.reason.clone(),
        message: event.message.clone(),
        progress: event.progress.as_ref().map(progress_to_pb),
        at: Some(timestamp(event.at)),
        workflow_id: event.workflow.map(|w| w.to_string()).unwrap_or_default(),
        actor: event.actor.clone().unwrap_or_default(),
    }
}

pub(crate) fn explanation_to_pb(e: &Explanation) -> pb::Explanation {
    pb::Explanation {
        task_id: e.task_id.to_string(),
        state: state_to_pb(e.state) as i32,
        reasons: e
            .reasons
            .iter()
            .map(|r| pb::Reason {
                code: r.code.to_owned(),
                message: r.message.clone(),
                task_ids: r.task_ids.iter().map(ToString::to_string).collect(),
                until: opt_timestamp(r.until),
                agents: r.agents.clone(),
            })
            .collect(),
    }
}

pub(crate) fn workflow_to_pb(id: WorkflowId, tasks: &[Task]) -> pb::Workflow {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for task in tasks {
        *counts.entry(task.state.name().to_owned()).or_default() += 1;
    }
    let finished = tasks.iter().filter(|t| t.state.is_terminal()).count();
    pb::Workflow {
        id: id.to_string(),
        tasks: tasks
            .iter()
            .map(|t| pb::WorkflowTask {
                id: t.id.to_string(),
                key: t.spec.key.clone().unwrap_or_default(),
                state: state_to_pb(t.state) as i32,
                capability: t.spec.capability.clone(),
                depends_on_ids: t.spec.depends_on.iter().map(ToString::to_string).collect(),
                attempt: t.attempt,
            })
            .collect(),
        counts,
        percent_complete: if tasks.is_empty() { 0.0 } else { finished as f64 * 100.0 / tasks.len() as f64 },
        done: finished == tasks.len(),
    }
}

pub(crate) fn queue_to_pb(q: &QueueInfo) -> pb::Queue {
    pb::Queue {
        name: q.record.name.clone(),
        paused: q.record.paused,
        weight: q.record.weight,
        max_running: q.record.max_running,
        depth: q.depth.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        running: q.running,
        oldest_queued_age_seconds: q.oldest_queued_age.map_or(0.0, |d| d.as_secs_f64()),
    }
}

pub(crate) fn agent_to_pb(info: &AgentInfo) -> pb::Agent {
    let r = &info.record;
    pb::Agent {
        id: r.id.to_string(),
        name: r.name.clone(),
        capabilities: r.capabilities.clone(),
        labels: unsorted(&r.labels),
        slots: r.slots,
        slots_busy: info.running.len() as u32,
        state: match info.state {
            AgentState::Connected => pb::AgentState::Connected,
            AgentState::Draining => pb::AgentState::Draining,
            AgentState::Disconnected => pb::AgentState::Disconnected,
        } as i32,
        sdk_version: r.sdk_version.clone(),
        metrics_address: r.metrics_address.clone(),
        connected_at: Some(timestamp(r.connected_at)),
        last_seen: Some(timestamp(info.last_seen)),
        running: info.running.iter().map(|(id, attempt)| format!("{id}:{attempt}")).collect(),
    }
}

pub(crate) fn attempt_ref(field: &str, r: Option<pb::AttemptRef>) -> Result<(TaskId, u32), Error> {
    let r = r.ok_or_else(|| Error::invalid(field, "is required"))?;
    let id = task_id(&format!("{field}.task_id"), &r.task_id)?;
    if r.attempt == 0 {
        return Err(Error::invalid(format!("{field}.attempt"), "must be at least 1"));
    }
    Ok((id, r.attempt))
}

fn to_ref((id, attempt): (TaskId, u32)) -> pb::AttemptRef {
    pb::AttemptRef { task_id: id.to_string(), attempt }
}

/// Validates an agent's first message.
pub(crate) fn registration(reg: pb::Register, config: &ServerConfig) -> Result<Registration, Error> {
    let limits = &config.limits;
    validate::name("register.name", &reg.name, limits)?;
    if reg.capabilities.is_empty() {
        return Err(Error::invalid("register.capabilities", "at least one capability is required"));
    }
    validate::within(
        "register.capabilities",
        "capabilities",
        reg.capabilities.len(),
        limits.max_capabilities,
        "max_capabilities",
    )?;
    let mut capabilities = Vec::with_capacity(reg.capabilities.len());
    for (i, c) in reg.capabilities.into_iter().enumerate() {
        validate::name(&format!("register.capabilities[{i}]"), &c, limits)?;
        if !capabilities.contains(&c) {
            capabilities.push(c);
        }
    }
    let labels = sorted(reg.labels);
    validate::string_map("register.labels", &labels, limits.max_labels, "max_labels", limits)?;
    if reg.slots == 0 {
        return Err(Error::invalid("register.slots", "must be at least 1"));
    }
    validate::within(
        "register.slots",
        "slots",
        reg.slots as usize,
        limits.max_agent_slots as usize,
        "max_agent_slots",
    )?;
    validate::within("register.sdk_version", "characters", reg.sdk_version.len(), limits.max_name_len, "max_name_len")?;
    validate::within(
        "register.metrics_address",
        "characters",
        reg.metrics_address.len(),
        limits.max_name_len,
        "max_name_len",
    )?;
    let max_held = limits.max_agent_slots as usize * 4;
    validate::within("register.held_attempts", "attempts", reg.held_attempts.len(), max_held, "4 x max_agent_slots")?;
    let held_attempts = reg
        .held_attempts
        .into_iter()
        .enumerate()
        .map(|(i, r)| attempt_ref(&format!("register.held_attempts[{i}]"), Some(r)))
        .collect::<Result<_, _>>()?;
    validate::within("register.resume_token", "characters", reg.resume_token.len(), 128, "128")?;
    Ok(Registration {
        name: reg.name,
        capabilities,
        labels,
        slots: reg.slots,
        sdk_version: reg.sdk_version,
        resume_token: Some(reg.resume_token).filter(|t| !t.is_empty()),
        held_attempts,
        metrics_address: reg.metrics_address,
        identity: String::new(),
    })
}

/// Validates one message of a running session.
pub(crate) fn report(message: pb::AgentMessage, config: &ServerConfig) -> Result<AgentReport, Error> {
    use pb::agent_message::Msg;
    let limits = &config.limits;
    match message.msg {
        None => Err(Error::invalid("msg", "an agent message must carry one of its variants")),
        Some(Msg::Register(_)) => Err(Error::invalid("register", "a session registers once, in its first message")),
        Some(Msg::Heartbeat(_)) => Ok(AgentReport::Heartbeat),
        Some(Msg::Drain(_)) => Ok(AgentReport::DrainSelf),
        // Log lines go to the log hub from the session reader.
        Some(Msg::Log(_)) => Err(Error::invalid("log", "log lines are not a scheduler report")),
        Some(Msg::Accept(a)) => {
            let (id, attempt) = attempt_ref("accept.attempt", a.attempt)?;
            Ok(AgentReport::Accept(id, attempt))
        }
        Some(Msg::Progress(p)) => {
            let (id, attempt) = attempt_ref("progress.attempt", p.attempt)?;
            Ok(AgentReport::Progress(id, attempt, p.percent.min(100), validate::clip(p.message, limits)))
        }
        Some(Msg::Complete(c)) => {
            let (id, attempt) = attempt_ref("complete.attempt", c.attempt)?;
            let content_type = validate::clip(c.content_type, limits);
            Ok(AgentReport::Complete(id, attempt, c.output.into(), content_type))
        }
        Some(Msg::Fail(f)) => {
            let (id, attempt) = attempt_ref("fail.attempt", f.attempt)?;
            let failure = f.failure.unwrap_or_default();
            let reason = if failure.reason.is_empty() { "handler_error".to_owned() } else { failure.reason };
            let reason: String = reason.chars().take(limits.max_name_len).collect();
            Ok(AgentReport::Fail(
                id,
                attempt,
                Failure { reason, message: validate::clip(failure.message, limits), retryable: failure.retryable },
            ))
        }
    }
}

/// The wire form of a scheduler message; `Close` becomes the status that
/// ends the session.
pub(crate) fn server_message(message: ToAgent) -> Result<pb::ServerMessage, tonic::Status> {
    use pb::server_message::Msg;
    let msg = match message {
        ToAgent::Registered { agent_id, resume_token, resumed, heartbeat_interval, lease_ttl, dropped } => {
            Msg::Registered(pb::Registered {
                agent_id: agent_id.to_string(),
                resume_token,
                resumed,
                heartbeat_interval: Some(duration(heartbeat_interval)),
                lease_ttl: Some(duration(lease_ttl)),
                dropped_attempts: dropped.into_iter().map(to_ref).collect(),
            })
        }
        ToAgent::Assign(task, parents) => Msg::Assign(pb::Assignment {
            parent_outputs: parents
                .into_iter()
                .map(|p| pb::ParentOutput {
                    key: p.key,
                    task_id: p.task_id.to_string(),
                    output: p.output.to_vec(),
                    content_type: p.content_type,
                })
                .collect(),
            attempt: Some(to_ref((task.id, task.attempt))),
            capability: task.spec.capability.clone(),
            payload: task.spec.payload.to_vec(),
            content_type: task.spec.content_type.clone(),
            metadata: unsorted(&task.spec.metadata),
            queue: task.spec.queue.clone(),
            priority: priority_to_pb(task.spec.priority) as i32,
            deadline: opt_timestamp(task.deadline),
            timeout: Some(duration(task.spec.timeout)),
            trace_context: unsorted(&task.spec.trace_context),
        }),
        ToAgent::Cancel { task_id, attempt, reason, grace } => Msg::Cancel(pb::CancelAttempt {
            attempt: Some(to_ref((task_id, attempt))),
            reason,
            grace: Some(duration(grace)),
        }),
        ToAgent::Ack { task_id, attempt } => Msg::Ack(pb::Ack { attempt: Some(to_ref((task_id, attempt))) }),
        ToAgent::Rejected { task_id, attempt, error } => {
            let status = tonic::Status::from(error);
            Msg::Rejected(pb::Rejected {
                attempt: Some(to_ref((task_id, attempt))),
                code: status.code() as i32,
                message: status.message().to_owned(),
            })
        }
        ToAgent::Heartbeat => Msg::Heartbeat(pb::Heartbeat {}),
        ToAgent::Drain(draining) => Msg::Drain(pb::DrainState { draining }),
        ToAgent::Close(error) => return Err(error.into()),
    };
    Ok(pb::ServerMessage { msg: Some(msg) })
}
