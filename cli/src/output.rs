//! Printing for people (tables) and programs (JSON, one document per line
//! for streams).

use std::time::{Duration, UNIX_EPOCH};

use muster_sdk::proto;
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

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) if t.seconds > 0 => {
            let at = UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32);
            Value::String(humantime::format_rfc3339_millis(at).to_string())
        }
        _ => Value::Null,
    }
}

fn state_name(value: i32) -> &'static str {
    proto::TaskState::try_from(value).unwrap_or(proto::TaskState::Unspecified).short_name()
}

/// An output as JSON when it is JSON, else as text.
fn body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn failure(f: &Option<proto::Failure>) -> Value {
    match f {
        Some(f) => json!({"reason": f.reason, "message": f.message, "retryable": f.retryable}),
        None => Value::Null,
    }
}

pub(crate) fn task_json(task: &proto::Task) -> Value {
    let spec = task.spec.clone().unwrap_or_default();
    json!({
        "id": task.id,
        "state": state_name(task.state),
        "attempt": task.attempt,
        "capability": spec.capability,
        "queue": spec.queue,
        "priority": proto::Priority::try_from(spec.priority).unwrap_or_default().short_name(),
        "selector": spec.selector,
        "metadata": spec.metadata,
        "output": body(&task.output),
        "output_content_type": task.output_content_type,
        "failure": failure(&task.failure),
        "progress": task.progress.as_ref().map(|p| json!({"percent": p.percent, "message": p.message})),
        "cancel_requested": task.cancel_requested,
        "created_at": time(&task.created_at),
        "updated_at": time(&task.updated_at),
        "ready_at": time(&task.ready_at),
        "deadline": time(&task.deadline),
        "sequence": task.sequence,
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

fn event_json(e: &proto::TaskEvent) -> Value {
    json!({
        "sequence": e.sequence,
        "task_id": e.task_id,
        "kind": if e.kind == proto::EventKind::Progress as i32 { "progress" } else { "state" },
        "state": state_name(e.state),
        "previous_state": state_name(e.previous_state),
        "attempt": e.attempt,
        "agent_id": e.agent_id,
        "reason": e.reason,
        "message": e.message,
        "progress": e.progress.as_ref().map(|p| json!({"percent": p.percent, "message": p.message})),
        "at": time(&e.at),
    })
}

fn agent_json(a: &proto::Agent) -> Value {
    let state = match proto::AgentState::try_from(a.state).unwrap_or_default() {
        proto::AgentState::Connected => "CONNECTED",
        proto::AgentState::Draining => "DRAINING",
        proto::AgentState::Disconnected => "DISCONNECTED",
        proto::AgentState::Unspecified => "UNSPECIFIED",
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

fn text(v: &Value) -> String {
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

    pub(crate) fn task(&self, task: &proto::Task) {
        let v = task_json(task);
        if self.json {
            println!("{v}");
            return;
        }
        for key in ["id", "state", "attempt", "capability", "queue", "priority", "created_at", "updated_at"] {
            println!("{key:<12} {}", text(&v[key]));
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

    pub(crate) fn tasks(&self, tasks: &[proto::Task]) {
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

    pub(crate) fn event(&self, event: &proto::TaskEvent) {
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

    pub(crate) fn agents(&self, agents: &[proto::Agent]) {
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

    pub(crate) fn agent(&self, agent: &proto::Agent) {
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

    pub(crate) fn chunk(&mut self, chunk: &proto::TaskLogs) {
        use std::io::Write;
        let stdout = std::io::stdout();
        let mut w = stdout.lock();
        if self.json {
            for (n, line) in chunk.lines.iter().enumerate() {
                let v = json!({
                    "attempt": chunk.attempt,
                    "line": chunk.first_line + n as u64,
                    "time": time(&line.time),
                    "stream": proto::LogStream::try_from(line.stream).unwrap_or_default().short_name(),
                    "text": line.text,
                });
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
