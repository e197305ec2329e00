//! `muster workflow …`, `muster task explain` and `muster queue …`: graphs
//! from a YAML or JSON file, their live progress, and the coordination
//! state behind them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use futures::StreamExt;
use muster_sdk::{Client, EventKind, Explanation, NewTask, QueueInfo, TaskState, Workflow, proto};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::output::Output;

/// `muster workflow …`
#[derive(Debug, Subcommand)]
pub(crate) enum WorkflowCommand {
    /// Submit a graph of tasks from a YAML or JSON file.
    Submit {
        file: std::path::PathBuf,
        /// Follow the workflow until every task has finished; exit 0 only
        /// if all succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Show a workflow: its tasks, per-state counts and percent complete.
    Get { id: String },
    /// Follow a workflow with a live per-state summary until it finishes.
    Watch { id: String },
    /// Cancel every unfinished task of a workflow.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `muster queue …`
#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
    /// Every queue with its depth, running count and settings.
    List,
    /// Stop dispatching from a queue (submits are still accepted).
    Pause { name: String },
    /// Dispatch from a paused queue again.
    Resume { name: String },
    /// Set a queue's weight and maximum running count.
    Configure {
        name: String,
        /// Share of dispatch among queues with waiting work.
        #[arg(long, default_value_t = 0)]
        weight: u32,
        /// Most tasks of the queue running at once; 0 means unlimited.
        #[arg(long, default_value_t = 0)]
        max_running: u32,
    },
}

/// A workflow file: a list of tasks with keys and edges.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    tasks: Vec<TaskEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    key: String,
    capability: String,
    /// A string is sent as text; any other value as JSON.
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    locks: Vec<LockEntry>,
    #[serde(default)]
    concurrency: Option<ConcurrencyEntry>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    max_attempts: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockEntry {
    name: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrencyEntry {
    key: String,
    max: u32,
}

/// Reads a workflow file (YAML, of which JSON is a subset) into task specs.
pub(crate) fn read_workflow(path: &Path) -> anyhow::Result<Vec<proto::TaskSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: WorkflowFile = serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if file.tasks.is_empty() {
        bail!("{}: the workflow has no tasks", path.display());
    }
    file.tasks.into_iter().map(task_spec).collect()
}

fn task_spec(entry: TaskEntry) -> anyhow::Result<proto::TaskSpec> {
    let mut task = NewTask::new(entry.capability).key(entry.key.clone());
    match entry.payload {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => task = task.payload(text.into_bytes()).content_type("text/plain"),
        Some(value) => task = task.json(&value)?,
    }
    for dep in entry.depends_on {
        task = task.depends_on(dep);
    }
    for lock in entry.locks {
        task = match lock.mode.as_deref().unwrap_or("exclusive") {
            "exclusive" => task.exclusive_lock(lock.name),
            "shared" => task.shared_lock(lock.name),
            other => bail!("task {}: lock mode must be exclusive or shared, not '{other}'", entry.key),
        };
    }
    if let Some(c) = entry.concurrency {
        task = task.concurrency(c.key, c.max);
    }
    if let Some(q) = entry.queue {
        task = task.queue(q);
    }
    if let Some(p) = entry.priority {
        let priority = proto::Priority::parse(&p)
            .with_context(|| format!("task {}: priority must be low, normal, high or critical", entry.key))?;
        task = task.priority(priority);
    }
    for (k, v) in entry.selector {
        task = task.selector(k, v);
    }
    for (k, v) in entry.metadata {
        task = task.metadata(k, v);
    }
    if let Some(t) = entry.timeout {
        task = task.timeout(t);
    }
    if let Some(n) = entry.max_attempts {
        task = task.max_attempts(n);
    }
    Ok(task.build())
}

use crate::output::state_name;

fn summary(states: &HashMap<String, TaskState>) -> (String, bool, bool) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for state in states.values() {
        *counts.entry(state_name(*state)).or_default() += 1;
    }
    let finished = states.values().filter(|s| s.is_terminal()).count();
    let all_succeeded = states.values().all(|s| *s == TaskState::Succeeded);
    let percent = if states.is_empty() { 0.0 } else { finished as f64 * 100.0 / states.len() as f64 };
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    (format!("{} | {percent:.0}% complete", parts.join("  ")), finished == states.len(), all_succeeded)
}

fn workflow_json(w: &Workflow) -> Value {
    json!({
        "id": w.id,
        "counts": w.counts,
        "percent_complete": w.percent_complete,
        "done": w.done,
        "tasks": w.tasks.iter().map(|t| json!({
            "key": t.key,
            "id": t.id,
            "state": state_name(t.state),
            "capability": t.capability,
            "attempt": t.attempt,
            "depends_on_ids": t.depends_on_ids,
        })).collect::<Vec<_>>(),
    })
}

fn print_workflow(out: &Output, w: &Workflow) {
    if out.is_json() {
        println!("{}", workflow_json(w));
        return;
    }
    let states: HashMap<String, TaskState> = w.tasks.iter().map(|t| (t.id.clone(), t.state)).collect();
    println!("workflow {}: {}", w.id, summary(&states).0);
    let rows = w
        .tasks
        .iter()
        .map(|t| vec![t.key.clone(), t.id.clone(), state_name(t.state).to_owned(), t.capability.clone()])
        .collect();
    crate::output::table(&["KEY", "ID", "STATE", "CAPABILITY"], rows);
}

/// Follows a workflow until every task has finished; true when all
/// succeeded.
async fn follow(client: &Client, id: &str, out: &Output) -> anyhow::Result<bool> {
    // Watch first, then read: no change falls between the two.
    let mut events =
        client.watch(proto::WatchTasksRequest { workflow_id: id.to_owned(), ..Default::default() }).await?;
    let workflow = client.get_workflow(id).await?;
    let keys: HashMap<String, String> = workflow.tasks.iter().map(|t| (t.id.clone(), t.key.clone())).collect();
    let mut states: HashMap<String, TaskState> = workflow.tasks.iter().map(|t| (t.id.clone(), t.state)).collect();
    let (line, done, ok) = summary(&states);
    if !out.is_json() {
        println!("{line}");
    }
    if done {
        return Ok(ok);
    }
    while let Some(event) = events.next().await {
        let event = event?;
        if event.kind != EventKind::State {
            continue;
        }
        states.insert(event.task_id.clone(), event.state);
        let (line, done, ok) = summary(&states);
        let key = keys.get(&event.task_id).cloned().unwrap_or_else(|| event.task_id.clone());
        if out.is_json() {
            println!(
                "{}",
                json!({"task": key, "task_id": event.task_id, "state": state_name(event.state), "reason": event.reason, "summary": line})
            );
        } else {
            println!("{key:<16} {:<10} {:<22} {line}", state_name(event.state), event.reason);
        }
        if done {
            return Ok(ok);
        }
    }
    bail!("the event stream ended before the workflow finished")
}

pub(crate) async fn workflow(client: &Client, command: WorkflowCommand, out: &Output) -> anyhow::Result<bool> {
    match command {
        WorkflowCommand::Submit { file, wait } => {
            let specs = read_workflow(&file)?;
            let response = client.submit_many(specs).await?;
            let id = response.workflow_id.clone();
            if out.is_json() && !wait {
                let tasks: Vec<Value> = response
                    .tasks
                    .iter()
                    .map(|t| json!({"key": t.spec.key, "id": t.id, "state": state_name(t.state)}))
                    .collect();
                println!("{}", json!({"workflow_id": id, "tasks": tasks}));
            } else if !out.is_json() {
                println!("workflow {id} submitted with {} tasks", response.tasks.len());
            }
            if wait {
                return follow(client, &id, out).await;
            }
            Ok(true)
        }
        WorkflowCommand::Get { id } => {
            print_workflow(out, &client.get_workflow(&id).await?);
            Ok(true)
        }
        WorkflowCommand::Watch { id } => follow(client, &id, out).await,
        WorkflowCommand::Cancel { id, reason } => {
            print_workflow(out, &client.cancel_workflow(&id, &reason).await?);
            Ok(true)
        }
    }
}

pub(crate) async fn explain(client: &Client, id: &str, out: &Output) -> anyhow::Result<()> {
    let e = client.explain(id).await?;
    if out.is_json() {
        println!("{}", explanation_json(&e));
        return Ok(());
    }
    println!("task {} is {}", e.task_id, state_name(e.state));
    for r in &e.reasons {
        println!("  {}: {}", r.code, r.message);
        for agent in &r.agents {
            println!("    {agent}");
        }
    }
    Ok(())
}

fn explanation_json(e: &Explanation) -> Value {
    let reasons: Vec<Value> = e
        .reasons
        .iter()
        .map(|r| json!({"code": r.code, "message": r.message, "task_ids": r.task_ids, "agents": r.agents}))
        .collect();
    json!({"task_id": e.task_id, "state": state_name(e.state), "reasons": reasons})
}

fn queue_json(q: &QueueInfo) -> Value {
    json!({
        "name": q.name,
        "paused": q.paused,
        "weight": q.weight,
        "max_running": q.max_running,
        "running": q.running,
        "depth": q.depth,
        "oldest_queued_age_seconds": q.oldest_queued_age.as_secs_f64(),
    })
}

fn print_queues(out: &Output, queues: &[QueueInfo]) {
    if out.is_json() {
        println!("{}", Value::Array(queues.iter().map(queue_json).collect()));
        return;
    }
    let rows = queues
        .iter()
        .map(|q| {
            let depth = |s: &str| q.depth.get(s).copied().unwrap_or(0).to_string();
            vec![
                q.name.clone(),
                if q.paused { "paused".into() } else { "active".into() },
                q.weight.to_string(),
                if q.max_running == 0 { "-".into() } else { q.max_running.to_string() },
                q.running.to_string(),
                depth("QUEUED"),
                depth("PENDING"),
                format!("{:.1}s", q.oldest_queued_age.as_secs_f64()),
            ]
        })
        .collect();
    crate::output::table(&["QUEUE", "STATE", "WEIGHT", "MAX", "RUNNING", "QUEUED", "PENDING", "OLDEST"], rows);
}

pub(crate) async fn queue(client: &Client, command: QueueCommand, out: &Output) -> anyhow::Result<()> {
    match command {
        QueueCommand::List => print_queues(out, &client.list_queues().await?),
        QueueCommand::Pause { name } => print_queues(out, &[client.pause_queue(&name).await?]),
        QueueCommand::Resume { name } => print_queues(out, &[client.resume_queue(&name).await?]),
        QueueCommand::Configure { name, weight, max_running } => {
            print_queues(out, &[client.configure_queue(&name, weight, max_running).await?])
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_queues_and_explanations_print_every_field_by_its_name() {
        let wire = proto::Workflow {
            id: "w1".into(),
            tasks: vec![proto::WorkflowTask {
                id: "t1".into(),
                key: "build".into(),
                state: proto::TaskState::Running.into(),
                capability: "shell".into(),
                depends_on_ids: vec!["t0".into()],
                attempt: 1,
            }],
            counts: [("RUNNING".to_owned(), 1), ("QUEUED".to_owned(), 2)].into(),
            percent_complete: 12.5,
            done: false,
        };
        let expected = json!({
            "id": "w1",
            "counts": {"QUEUED": 2, "RUNNING": 1},
            "percent_complete": 12.5,
            "done": false,
            "tasks": [{"key": "build", "id": "t1", "state": "RUNNING", "capability": "shell", "attempt": 1, "depends_on_ids": ["t0"]}],
        });
        assert_eq!(workflow_json(&Workflow::from(wire)), expected);

        let wire = proto::Queue {
            name: "q".into(),
            paused: true,
            weight: 3,
            max_running: 0,
            depth: [("QUEUED".to_owned(), 4)].into(),
            running: 2,
            oldest_queued_age_seconds: 1.25,
        };
        let expected = json!({
            "name": "q",
            "paused": true,
            "weight": 3,
            "max_running": 0,
            "running": 2,
            "depth": {"QUEUED": 4},
            "oldest_queued_age_seconds": 1.25,
        });
        assert_eq!(queue_json(&QueueInfo::from(wire)), expected);

        let wire = proto::Explanation {
            task_id: "t1".into(),
            state: proto::TaskState::Queued.into(),
            reasons: vec![proto::Reason {
                code: "lock_held".into(),
                message: "m".into(),
                task_ids: vec!["t2".into()],
                until: None,
                agents: vec!["a1".into()],
            }],
        };
        let expected = json!({
            "task_id": "t1",
            "state": "QUEUED",
            "reasons": [{"code": "lock_held", "message": "m", "task_ids": ["t2"], "agents": ["a1"]}],
        });
        assert_eq!(explanation_json(&Explanation::from(wire)), expected);
    }

    #[test]
    fn summaries_count_states_and_finish_when_all_are_terminal() {
        let states: HashMap<String, TaskState> =
            [("a".to_owned(), TaskState::Succeeded), ("b".to_owned(), TaskState::Unknown(0))].into();
        assert_eq!(summary(&states), ("SUCCEEDED 1  UNSPECIFIED 1 | 50% complete".to_owned(), false, false));
        let states: HashMap<String, TaskState> = [("a".to_owned(), TaskState::Succeeded)].into();
        assert_eq!(summary(&states), ("SUCCEEDED 1 | 100% complete".to_owned(), true, true));
    }

    #[test]
    fn the_shipped_pipeline_example_parses_into_a_graph() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline.yaml");
        let specs = read_workflow(&path)?;
        let keys: Vec<&str> = specs.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, vec!["research", "write", "code", "review"]);
        assert_eq!(specs[3].depends_on, vec!["write".to_owned(), "code".to_owned()]);
        Ok(())
    }

    #[test]
    fn unknown_fields_and_bad_lock_modes_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.yaml");
        std::fs::write(&path, "tasks:\n  - key: a\n    capability: x\n    dependson: [b]\n")?;
        assert!(read_workflow(&path).is_err());
        std::fs::write(&path, "tasks:\n  - key: a\n    capability: x\n    locks: [{name: db, mode: sometimes}]\n")?;
        assert!(read_workflow(&path).is_err());
        Ok(())
    }
}
