//! Printing for people (tables) and programs (JSON, one document per line
//! for streams).

use std::time::{SystemTime, UNIX_EPOCH};

use muster_sdk::{AgentInfo, AgentState, EventKind, Failure, LogChunk, Progress, Task, TaskEvent, TaskState};
use serde_json::{Value, json};

/// Prints results in the chosen format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

/// A one-line description of an error, with the gRPC code when there is one.
pub(crate) fn describe(error: &anyhow::Error) -> String {
    for cause in error.chain() {
        let status = cause
            .downcast_ref::<muster_sdk::Error>()
            .and_then(|e| match e {
                muster_sdk::Error::Status(s) => Some(s),
                _ => None,
            })
            .or_else(|| cause.downcast_ref::<tonic::Status>());
        if let Some(status) = status {
            return format!("{}: {}", code_name(status.code()), status.message());
        }
    }
    format!("{error:#}")
}

fn code_name(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// A time as RFC 3339 with milliseconds; `null` when unset or at the epoch
/// itself (the wire's zero), and the whole seconds since the epoch (floored)
/// when out of range for a date, never a panic.
pub(crate) fn time(t: &Option<SystemTime>) -> Value {
    let Some(t) = t else { return Value::Null };
    let seconds = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            0i64.saturating_sub_unsigned(before.as_secs()).saturating_sub(i64::from(before.subsec_nanos() > 0))
        }
    };
    if (1..=LAST_RFC3339_SECOND).contains(&seconds) {
        Value::String(humantime::format_rfc3339_millis(*t).to_string())
    } else if seconds != 0 {
        Value::from(seconds)
    } else {
        Value::Null
    }
}

/// A task state's name in tables and JSON; one this CLI does not know reads
/// `UNSPECIFIED`, as the wire's zero does.
pub(crate) fn state_name(state: TaskState) -> &'static str {
    match state {
        TaskState::Unknown(_) => "UNSPECIFIED",
        known => known.as_str(),
    }
}

fn progress(p: &Option<Progress>) -> Option<Value> {
    p.as_ref().map(|p| json!({"percent": p.percent, "message": p.message}))
}

/// An output as JSON when it is JSON, else as text.
fn body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn failure(f: &Option<Failure>) -> Value {
    match f {
        Some(f) => json!({"reason": f.reason, "message": f.message, "retryable": f.retryable}),
        None => Value::Null,
    }
}

pub(crate) fn task_json(task: &Task) -> Value {
    let spec = &task.spec;
    json!({
        "id": task.id,
        "state": state_name(task.state),
        "attempt": task.attempt,
        "capability": spec.capability,
        "queue": spec.queue,
        "priority": spec.priority.as_str(),
        "selector": spec.selector,
        "metadata": spec.metadata,
        "output": body(&task.output),
        "output_content_type": task.output_content_type,
        "failure": failure(&task.failure),
        "progress": progress(&task.progress),
        "cancel_requested": task.cancel_requested,
        "created_at": time(&task.created_at),
        "updated_at": time(&task.updated_at),
        "ready_at": time(&task.ready_at),
        "deadline": time(&task.deadline),
        "sequence": task.sequence,
        "submitted_by": task.submitted_by,
        "attempts": task.attempts.iter().map(|a| json!({
            "number": a.number,
            "agent_id": a.agent_id,
            "agent_name": a.agent_name,
            "state": state_name(a.state),
            "failure": failure(&a.failure),
            "assigned_at": time(&a.assigned_at),
            "started_at": time(&a.started_at),
            "finished_at": time(&a.finished_at),
        })).collect::<Vec<_>>(),
    })
}

fn event_json(e: &TaskEvent) -> Value {
    json!({
        "sequence": e.sequence,
        "task_id": e.task_id,
        "kind": if e.kind == EventKind::Progress { "progress" } else { "state" },
        "state": state_name(e.state),
        "previous_state": e.previous_state.map_or("UNSPECIFIED", state_name),
        "actor": e.actor,
        "attempt": e.attempt,
        "agent_id": e.agent_id,
        "reason": e.reason,
        "message": e.message,
        "progress": progress(&e.progress),
        "at": time(&e.at),
    })
}

fn agent_json(a: &AgentInfo) -> Value {
    let state = match a.state {
        AgentState::Unknown(_) => "UNSPECIFIED",
        known => known.as_str(),
    };
    json!({
        "id": a.id,
        "name": a.name,
        "state": state,
        "capabilities": a.capabilities,
        "labels": a.labels,
        "slots": a.slots,
        "slots_busy": a.slots_busy,
        "running": a.running,
        "sdk_version": a.sdk_version,
        "metrics_address": a.metrics_address,
        "connected_at": time(&a.connected_at),
        "last_seen": time(&a.last_seen),
    })
}

/// One JSON object per line of a log chunk.
fn log_lines_json(chunk: &LogChunk) -> impl Iterator<Item = Value> + '_ {
    chunk.lines.iter().enumerate().map(|(n, line)| {
        json!({
            "attempt": chunk.attempt,
            "line": chunk.first_line + n as u64,
            "time": time(&line.time),
            "stream": line.stream.as_str(),
            "text": line.text,
        })
    })
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

impl Output {
    pub(crate) fn new(json: bool) -> Self {
        Self { json }
    }

    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    pub(crate) fn task(&self, task: &Task) {
        let v = task_json(task);
        if self.json {
            println!("{v}");
            return;
        }
        for key in ["id", "state", "attempt", "capability", "queue", "priority", "created_at", "updated_at"] {
            println!("{key:<12} {}", text(&v[key]));
        }
        if !task.submitted_by.is_empty() {
            println!("{:<12} {}", "submitted_by", task.submitted_by);
        }
        if let Some(p) = task.progress.as_ref() {
            println!("{:<12} {}% {}", "progress", p.percent, p.message);
        }
        if let Some(f) = task.failure.as_ref() {
            println!("{:<12} {}: {}", "failure", f.reason, f.message);
        }
        if !task.output.is_empty() {
            println!("{:<12} {}", "output", text(&v["output"]));
        }
    }

    pub(crate) fn server(&self, server: &muster_sdk::ServerInfo) {
        let v = serde_json::json!({
            "version": server.version,
            "store": server.store,
            "leader": server.leader,
            "leader_epoch": server.leader_epoch,
        });
        if self.json {
            println!("{v}");
            return;
        }
        for key in ["version", "store", "leader", "leader_epoch"] {
            println!("{key:<12} {}", text(&v[key]));
        }
    }

    pub(crate) fn tasks(&self, tasks: &[Task]) {
        if self.json {
            println!("{}", Value::Array(tasks.iter().map(task_json).collect()));
            return;
        }
        let rows = tasks
            .iter()
            .map(task_json)
            .map(|v| {
                ["id", "state", "attempt", "capability", "queue", "priority", "updated_at"]
                    .iter()
                    .map(|k| text(&v[*k]))
                    .collect()
            })
            .collect();
        table(&["ID", "STATE", "ATTEMPT", "CAPABILITY", "QUEUE", "PRIORITY", "UPDATED"], rows);
    }

    pub(crate) fn event_header(&self) {
        if !self.json {
            println!("{:<8} {:<24} {:<26} {:<10} {:<18} MESSAGE", "SEQ", "AT", "TASK", "STATE", "REASON");
        }
    }

    pub(crate) fn event(&self, event: &TaskEvent) {
        let v = event_json(event);
        if self.json {
            println!("{v}");
        } else {
            let message = match &event.progress {
                Some(p) => format!("{}% {}", p.percent, p.message),
                None => event.message.clone(),
            };
            println!(
                "{:<8} {:<24} {:<26} {:<10} {:<18} {}",
                event.sequence,
                text(&v["at"]),
                event.task_id,
                text(&v["state"]),
                event.reason,
                message
            );
        }
    }

    /// A watch lost the events after `sequence`'s predecessor to retention:
    /// the tasks as they are now follow ([`Output::current`]).
    pub(crate) fn resync(&self, sequence: u64) {
        if self.json {
            println!("{}", serde_json::json!({ "resync": { "sequence": sequence } }));
        } else {
            eprintln!(
                "muster: events this watch had not seen were removed by retention; the tasks as they are now \
                 follow, then the events after sequence {sequence}"
            );
        }
    }

    /// A task as it is now, in a watch after [`Output::resync`]: an event
    /// row whose reason is `current`.
    pub(crate) fn current(&self, task: &Task) {
        let v = task_json(task);
        if self.json {
            println!("{}", serde_json::json!({ "current": v }));
        } else {
            println!(
                "{:<8} {:<24} {:<26} {:<10} {:<18} as listed",
                task.sequence,
                text(&v["updated_at"]),
                task.id,
                text(&v["state"]),
                "current"
            );
        }
    }

    pub(crate) fn agents(&self, agents: &[AgentInfo]) {
        if self.json {
            println!("{}", Value::Array(agents.iter().map(agent_json).collect()));
            return;
        }
        let rows = agents
            .iter()
            .map(|a| {
                let v = agent_json(a);
                vec![
                    a.id.clone(),
                    a.name.clone(),
                    text(&v["state"]),
                    a.capabilities.join(","),
                    format!("{}/{}", a.slots_busy, a.slots),
                    text(&v["last_seen"]),
                ]
            })
            .collect();
        table(&["ID", "NAME", "STATE", "CAPABILITIES", "BUSY", "LAST SEEN"], rows);
    }

    pub(crate) fn agent(&self, agent: &AgentInfo) {
        let v = agent_json(agent);
        if self.json {
            println!("{v}");
            return;
        }
        for key in ["id", "name", "state", "capabilities", "labels", "slots", "slots_busy", "running", "last_seen"] {
            println!("{key:<12} {}", text(&v[key]));
        }
    }
}

/// Prints log chunks: the bare lines (optionally timed), a header when the
/// attempt changes after the first, and a marker where lines were lost; in
/// JSON mode, one object per line.
#[derive(Debug)]
pub(crate) struct LogPrinter {
    json: bool,
    timestamps: bool,
    attempt: Option<u32>,
}

impl LogPrinter {
    pub(crate) fn new(out: &Output, timestamps: bool) -> Self {
        Self { json: out.json, timestamps, attempt: None }
    }

    pub(crate) fn chunk(&mut self, chunk: &LogChunk) {
        use std::io::Write;
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        if self.json {
            for v in log_lines_json(chunk) {
                let _ = writeln!(w, "{v}");
            }
            return;
        }
        if self.attempt.is_some_and(|a| a != chunk.attempt) || (self.attempt.is_none() && chunk.attempt > 1) {
            let _ = writeln!(w, "--- attempt {} ---", chunk.attempt);
        }
        self.attempt = Some(chunk.attempt);
        if chunk.dropped > 0 {
            let _ = writeln!(w, "[{} line(s) dropped]", chunk.dropped);
        }
        for line in &chunk.lines {
            if self.timestamps {
                let _ = writeln!(w, "{} {}", text(&time(&line.time)), line.text);
            } else {
                let _ = writeln!(w, "{}", line.text);
            }
        }
        let _ = w.flush();
    }
}

#[cfg(test)]
mod tests {
    //! The JSON documents are a contract other tools read: these pin every
    //! field's name and shape, from wire message to printed value.

    use muster_sdk::proto;
    use prost_types::Timestamp;

    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    fn converted(t: Option<Timestamp>) -> Value {
        let task = Task::from(proto::Task { created_at: t, ..Default::default() });
        time(&task.created_at)
    }

    #[test]
    fn times_are_rfc3339_millis_null_at_zero_and_raw_seconds_out_of_range() {
        assert_eq!(converted(at(1_700_000_000, 123_456_789)), json!("2023-11-14T22:13:20.123Z"));
        assert_eq!(converted(at(253_402_300_799, 0)), json!("9999-12-31T23:59:59.000Z"));
        assert_eq!(converted(None), Value::Null);
        assert_eq!(converted(at(0, 0)), Value::Null);
        assert_eq!(converted(at(0, 5)), Value::Null);
        assert_eq!(converted(at(253_402_300_800, 0)), json!(253_402_300_800_i64));
        assert_eq!(converted(at(i64::MAX, 0)), json!(i64::MAX));
        assert_eq!(converted(at(i64::MIN, 0)), json!(i64::MIN));
        assert_eq!(converted(at(-5, 500_000_000)), json!(-5));
        assert_eq!(converted(at(-1, 0)), json!(-1));
    }

    fn wire_task() -> proto::Task {
        let failure = |reason: &str| proto::Failure { reason: reason.into(), message: "m".into(), retryable: true };
        proto::Task {
            id: "t1".into(),
            spec: Some(proto::TaskSpec {
                capability: "shell".into(),
                queue: "builds".into(),
                priority: proto::Priority::High.into(),
                selector: [("os".to_owned(), "linux".to_owned())].into(),
                metadata: [("b".to_owned(), "2".to_owned()), ("a".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            }),
            state: proto::TaskState::Failed.into(),
            attempt: 2,
            attempts: vec![proto::Attempt {
                number: 1,
                agent_id: "a1".into(),
                agent_name: "worker".into(),
                assigned_at: at(1_700_000_000, 0),
                started_at: at(1_700_000_001, 0),
                finished_at: None,
                state: proto::TaskState::Failed.into(),
                failure: Some(failure("agent_lost")),
            }],
            output: br#"{"n":1}"#.to_vec(),
            output_content_type: "application/json".into(),
            failure: Some(failure("timeout")),
            progress: Some(proto::Progress { percent: 40, message: "p".into(), at: at(1_700_000_002, 0) }),
            created_at: at(1_700_000_000, 0),
            updated_at: at(1_700_000_003, 0),
            ready_at: None,
            deadline: at(1_700_000_300, 0),
            cancel_requested: true,
            sequence: 9,
            workflow_id: "w1".into(),
            depends_on_ids: vec!["t0".into()],
            submitted_by: "ci".into(),
        }
    }

    #[test]
    fn a_task_prints_every_field_by_its_name() {
        let expected = json!({
            "id": "t1",
            "state": "FAILED",
            "attempt": 2,
            "capability": "shell",
            "queue": "builds",
            "priority": "high",
            "selector": {"os": "linux"},
            "metadata": {"a": "1", "b": "2"},
            "output": {"n": 1},
            "output_content_type": "application/json",
            "failure": {"reason": "timeout", "message": "m", "retryable": true},
            "progress": {"percent": 40, "message": "p"},
            "cancel_requested": true,
            "created_at": "2023-11-14T22:13:20.000Z",
            "updated_at": "2023-11-14T22:13:23.000Z",
            "ready_at": null,
            "deadline": "2023-11-14T22:18:20.000Z",
            "sequence": 9,
            "submitted_by": "ci",
            "attempts": [{
                "number": 1,
                "agent_id": "a1",
                "agent_name": "worker",
                "state": "FAILED",
                "failure": {"reason": "agent_lost", "message": "m", "retryable": true},
                "assigned_at": "2023-11-14T22:13:20.000Z",
                "started_at": "2023-11-14T22:13:21.000Z",
                "finished_at": null,
            }],
        });
        assert_eq!(task_json(&Task::from(wire_task())), expected);
    }

    #[test]
    fn a_bare_task_prints_defaults_unknown_states_as_unspecified_and_text_output_as_a_string() {
        let wire = proto::Task { state: 42, output: b"plain".to_vec(), spec: None, ..Default::default() };
        let v = task_json(&Task::from(wire));
        assert_eq!(v["state"], "UNSPECIFIED");
        assert_eq!(v["priority"], "normal");
        assert_eq!(v["output"], "plain");
        assert_eq!((&v["failure"], &v["progress"], &v["selector"]), (&Value::Null, &Value::Null, &json!({})));
        assert_eq!(v["attempts"], json!([]));
        let wire = proto::Task { spec: Some(proto::TaskSpec { priority: 77, ..Default::default() }), ..wire_task() };
        assert_eq!(task_json(&Task::from(wire))["priority"], "normal");
    }

    #[test]
    fn an_event_prints_every_field_and_a_first_event_has_an_unspecified_previous_state() {
        let wire = proto::TaskEvent {
            sequence: 5,
            task_id: "t1".into(),
            kind: proto::EventKind::State.into(),
            state: proto::TaskState::Queued.into(),
            previous_state: 0,
            attempt: 0,
            agent_id: String::new(),
            queue: "q".into(),
            capability: "c".into(),
            reason: "submitted".into(),
            message: String::new(),
            progress: None,
            at: at(1_700_000_000, 0),
            workflow_id: "w".into(),
            actor: "ci".into(),
        };
        let expected = json!({
            "sequence": 5,
            "task_id": "t1",
            "kind": "state",
            "state": "QUEUED",
            "previous_state": "UNSPECIFIED",
            "actor": "ci",
            "attempt": 0,
            "agent_id": "",
            "reason": "submitted",
            "message": "",
            "progress": null,
            "at": "2023-11-14T22:13:20.000Z",
        });
        assert_eq!(event_json(&TaskEvent::from(wire.clone())), expected);
        let progress = proto::TaskEvent {
            kind: proto::EventKind::Progress.into(),
            previous_state: proto::TaskState::Running.into(),
            progress: Some(proto::Progress { percent: 10, message: "x".into(), at: None }),
            ..wire
        };
        let v = event_json(&TaskEvent::from(progress));
        assert_eq!((&v["kind"], &v["previous_state"]), (&json!("progress"), &json!("RUNNING")));
        assert_eq!(v["progress"], json!({"percent": 10, "message": "x"}));
        let unknown = TaskEvent::from(proto::TaskEvent { kind: 9, ..Default::default() });
        assert_eq!(event_json(&unknown)["kind"], "state");
    }

    #[test]
    fn an_agent_prints_every_field_by_its_name() {
        let wire = proto::Agent {
            id: "a1".into(),
            name: "worker".into(),
            capabilities: vec!["shell".into()],
            labels: [("os".to_owned(), "linux".to_owned())].into(),
            slots: 4,
            slots_busy: 1,
            state: proto::AgentState::Draining.into(),
            sdk_version: "0.1.0".into(),
            metrics_address: "127.0.0.1:9100".into(),
            connected_at: at(1_700_000_000, 0),
            last_seen: None,
            running: vec!["t1:1".into()],
        };
        let expected = json!({
            "id": "a1",
            "name": "worker",
            "state": "DRAINING",
            "capabilities": ["shell"],
            "labels": {"os": "linux"},
            "slots": 4,
            "slots_busy": 1,
            "running": ["t1:1"],
            "sdk_version": "0.1.0",
            "metrics_address": "127.0.0.1:9100",
            "connected_at": "2023-11-14T22:13:20.000Z",
            "last_seen": null,
        });
        assert_eq!(agent_json(&AgentInfo::from(wire.clone())), expected);
        for (state, name) in [(0, "UNSPECIFIED"), (1, "CONNECTED"), (3, "DISCONNECTED"), (8, "UNSPECIFIED")] {
            let agent = AgentInfo::from(proto::Agent { state, ..wire.clone() });
            assert_eq!(agent_json(&agent)["state"], name);
        }
    }

    #[test]
    fn log_lines_print_their_position_time_and_stream() {
        let wire = proto::TaskLogs {
            attempt: 2,
            first_line: 7,
            lines: vec![
                proto::LogLine {
                    time: at(1_700_000_000, 0),
                    stream: proto::LogStream::Stderr.into(),
                    text: "e".into(),
                },
                proto::LogLine { time: None, stream: 0, text: "l".into() },
            ],
            dropped: 1,
            complete: false,
        };
        let lines: Vec<Value> = log_lines_json(&LogChunk::from(wire)).collect();
        assert_eq!(
            lines,
            [
                json!({"attempt": 2, "line": 7, "time": "2023-11-14T22:13:20.000Z", "stream": "stderr", "text": "e"}),
                json!({"attempt": 2, "line": 8, "time": null, "stream": "log", "text": "l"}),
            ]
        );
    }
}
