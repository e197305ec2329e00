//! Store verification: every record decodes and the indexes agree with the
//! records they index. Each store walks its own layout and feeds what it
//! finds to a [`Checker`], which holds the checks every store shares and
//! produces the [`VerifyReport`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::{SEQUENCE_ORIGIN, StoreError};
use crate::model::{
    AgentId, AgentRecord, AttemptLog, Millis, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId,
};

/// Problems a report lists; the rest are only counted.
pub const MAX_LISTED_PROBLEMS: usize = 100;

/// Records found, per keyspace (those that do not decode included; for
/// events, the events the decodable records hold).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecordCounts {
    /// Task records.
    pub tasks: u64,
    /// Events.
    pub events: u64,
    /// Agent registrations.
    pub agents: u64,
    /// Queue settings.
    pub queues: u64,
    /// Tokens, revoked ones included.
    pub tokens: u64,
    /// Idempotency-key index entries.
    pub idempotency_keys: u64,
    /// Workflow index entries.
    pub workflow_entries: u64,
    /// Unfinished-task index entries.
    pub unfinished_entries: u64,
    /// Finished-task index entries.
    #[serde(default)]
    pub finished_entries: u64,
    /// Attempt logs.
    pub logs: u64,
}

impl RecordCounts {
    /// Every kind with its count, always all of them and in this order; the
    /// names are the `kind` label of `muster_store_records`.
    pub fn by_kind(&self) -> [(&'static str, u64); 10] {
        [
            ("task", self.tasks),
            ("event", self.events),
            ("agent", self.agents),
            ("queue", self.queues),
            ("token", self.tokens),
            ("idempotency_key", self.idempotency_keys),
            ("workflow_index", self.workflow_entries),
            ("unfinished_index", self.unfinished_entries),
            ("finished_index", self.finished_entries),
            ("log_tail", self.logs),
        ]
    }

    /// The counts [`RecordCounts::by_kind`] named (a kind it does not name
    /// is left out).
    pub fn from_kinds<'a>(kinds: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut counts = Self::default();
        for (kind, n) in kinds {
            let field = match kind {
                "task" => &mut counts.tasks,
                "event" => &mut counts.events,
                "agent" => &mut counts.agents,
                "queue" => &mut counts.queues,
                "token" => &mut counts.tokens,
                "idempotency_key" => &mut counts.idempotency_keys,
                "workflow_index" => &mut counts.workflow_entries,
                "unfinished_index" => &mut counts.unfinished_entries,
                "finished_index" => &mut counts.finished_entries,
                "log_tail" => &mut counts.logs,
                _ => continue,
            };
            *field = n;
        }
        counts
    }
}

/// What is wrong with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The record does not decode.
    Undecodable,
    /// The key is malformed, or names something other than the record.
    BadKey,
    /// A key outside every known keyspace.
    UnknownKey,
    /// A task that is not terminal is missing from the unfinished index.
    MissingUnfinished,
    /// An unfinished-index entry for a terminal or missing task.
    StrayUnfinished,
    /// A task's idempotency key is not indexed to it.
    MissingIdempotencyKey,
    /// An idempotency key whose task is missing or does not carry it.
    StrayIdempotencyKey,
    /// A task's workflow does not index it.
    MissingWorkflowEntry,
    /// A workflow-index entry whose task is missing or in another workflow.
    StrayWorkflowEntry,
    /// A finished task is missing from the finished index.
    MissingFinished,
    /// A finished-index entry for an unfinished or missing task, or under
    /// another time than the task finished at.
    StrayFinished,
    /// Event sequences are missing.
    EventGap,
    /// An event's sequence does not follow the one before it.
    EventOrder,
    /// Events of a task that does not exist.
    EventTaskMissing,
    /// An attempt log of a task that does not exist.
    LogTaskMissing,
}

impl ProblemKind {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::BadKey => "bad_key",
            Self::UnknownKey => "unknown_key",
            Self::MissingUnfinished => "missing_unfinished",
            Self::StrayUnfinished => "stray_unfinished",
            Self::MissingIdempotencyKey => "missing_idempotency_key",
            Self::StrayIdempotencyKey => "stray_idempotency_key",
            Self::MissingWorkflowEntry => "missing_workflow_entry",
            Self::StrayWorkflowEntry => "stray_workflow_entry",
            Self::MissingFinished => "missing_finished",
            Self::StrayFinished => "stray_finished",
            Self::EventGap => "event_gap",
            Self::EventOrder => "event_order",
            Self::EventTaskMissing => "event_task_missing",
            Self::LogTaskMissing => "log_task_missing",
        }
    }
}

/// One problem, with the key of the record concerned (`task/<id>`,
/// `event/<sequence>`, `idempotency/<key>`, `workflow/<workflow>/<task>`,
/// `unfinished/<id>`, `agent/<id>`, `queue/<name>`, `token/<name>`,
/// `log/<task>/<attempt>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The record's key.
    pub key: String,
    /// Why, in words.
    pub detail: String,
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records per keyspace.
    pub records: RecordCounts,
    /// Problems found in all.
    pub problem_count: u64,
    /// Problems per kind.
    pub problems_by_kind: BTreeMap<ProblemKind, u64>,
    /// The first [`MAX_LISTED_PROBLEMS`] problems, in the order found.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }
}

/// What the cross checks need of a task.
#[derive(Debug)]
struct TaskFacts {
    terminal: bool,
    updated_at: Millis,
    state: crate::model::TaskState,
    key: Option<String>,
    workflow: Option<WorkflowId>,
}

/// The shared checks. A store feeds it every record it holds, in any
/// order except that events come in sequence order, then calls
/// [`Checker::finish`].
#[derive(Debug, Default)]
pub(crate) struct Checker {
    report: VerifyReport,
    tasks: HashMap<TaskId, TaskFacts>,
    /// Tasks stored under an id whose record does not decode: the cross
    /// checks neither miss them nor report them as missing.
    undecodable_tasks: BTreeSet<TaskId>,
    unfinished: BTreeSet<TaskId>,
    keys: BTreeMap<String, TaskId>,
    workflows: BTreeSet<(WorkflowId, TaskId)>,
    finished: BTreeSet<(Millis, TaskId)>,
    /// Whether the store keeps a finished index (stores written before
    /// there was one have it built when a server opens them).
    finished_index: bool,
    /// The last sequence compacted away.
    compacted_through: u64,
    /// The first event found, checked against `compacted_through` at the
    /// end (the store's metadata may come after its events).
    first_sequence: Option<u64>,
    last_sequence: Option<u64>,
    /// Each task events name, with the first sequence naming it.
    event_tasks: BTreeMap<TaskId, u64>,
    logs: Vec<(TaskId, u32)>,
}

fn task_key(id: TaskId) -> String {
    format!("task/{id}")
}

fn event_key(sequence: u64) -> String {
    format!("event/{sequence}")
}

fn log_key(task: TaskId, attempt: u32) -> String {
    format!("log/{task}/{attempt}")
}

impl Checker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records a problem.
    pub(crate) fn problem(&mut self, kind: ProblemKind, key: String, detail: impl Into<String>) {
        self.report.problem_count += 1;
        *self.report.problems_by_kind.entry(kind).or_default() += 1;
        if self.report.problems.len() < MAX_LISTED_PROBLEMS {
            self.report.problems.push(Problem { kind, key, detail: detail.into() });
        }
    }

    fn undecodable(&mut self, key: String, error: &StoreError) {
        self.problem(ProblemKind::Undecodable, key, error.to_string());
    }

    /// A key the store cannot place, shown as escaped bytes.
    pub(crate) fn unknown_key(&mut self, raw: &[u8]) {
        self.problem(ProblemKind::UnknownKey, raw.escape_ascii().to_string(), "outside every known keyspace");
    }

    /// A malformed key of a known keyspace.
    pub(crate) fn bad_key(&mut self, keyspace: &str, raw: &[u8], detail: &str) {
        self.problem(ProblemKind::BadKey, format!("{keyspace}/{}", raw.escape_ascii()), detail);
    }

    /// A task record stored under `id`.
    pub(crate) fn task(&mut self, id: TaskId, record: Result<Task, StoreError>) {
        self.report.records.tasks += 1;
        match record {
            Ok(task) => {
                if task.id != id {
                    self.problem(ProblemKind::BadKey, task_key(id), format!("holds task {}", task.id));
                }
                let facts = TaskFacts {
                    terminal: task.state.is_terminal(),
                    updated_at: task.updated_at,
                    state: task.state,
                    key: task.spec.idempotency_key,
                    workflow: task.workflow,
                };
                self.tasks.insert(id, facts);
            }
            Err(e) => {
                self.undecodable(task_key(id), &e);
                self.undecodable_tasks.insert(id);
            }
        }
    }

    /// An unfinished-index entry.
    pub(crate) fn unfinished(&mut self, id: TaskId) {
        self.report.records.unfinished_entries += 1;
        self.unfinished.insert(id);
    }

    /// An idempotency-key index entry (`key` itself must decode, else see
    /// [`Checker::bad_idempotency_entry`]).
    pub(crate) fn idempotency_key(&mut self, key: String, task: TaskId) {
        self.report.records.idempotency_keys += 1;
        self.keys.insert(key, task);
    }

    /// An idempotency-key index entry that does not decode.
    pub(crate) fn bad_idempotency_entry(&mut self, raw_key: &[u8], detail: &str) {
        self.report.records.idempotency_keys += 1;
        self.problem(ProblemKind::Undecodable, format!("idempotency/{}", raw_key.escape_ascii()), detail);
    }

    /// A workflow-index entry.
    pub(crate) fn workflow_entry(&mut self, workflow: WorkflowId, task: TaskId) {
        self.report.records.workflow_entries += 1;
        self.workflows.insert((workflow, task));
    }

    /// A finished-index entry.
    pub(crate) fn finished_entry(&mut self, finished_at: Millis, task: TaskId) {
        self.report.records.finished_entries += 1;
        self.finished.insert((finished_at, task));
    }

    /// The store keeps a complete finished index.
    pub(crate) fn finished_index_complete(&mut self) {
        self.finished_index = true;
    }

    /// The last sequence the store compacted away.
    pub(crate) fn compacted_through(&mut self, sequence: u64) {
        self.compacted_through = sequence;
    }

    /// An event record stored under `first` (a single event is a record of
    /// one). Records come in sequence order.
    pub(crate) fn events(&mut self, first: u64, record: Result<Vec<TaskEvent>, StoreError>) {
        let events = match record {
            Ok(events) => events,
            Err(e) => return self.undecodable(event_key(first), &e),
        };
        match events.first() {
            None => return self.problem(ProblemKind::Undecodable, event_key(first), "holds no event"),
            Some(event) if event.sequence != first => {
                let detail = format!("starts at sequence {}", event.sequence);
                self.problem(ProblemKind::BadKey, event_key(first), detail);
            }
            Some(_) => {}
        }
        for event in events {
            self.report.records.events += 1;
            let sequence = event.sequence;
            match self.last_sequence {
                None => self.first_sequence = Some(sequence),
                Some(last) if sequence <= last => {
                    let detail = format!("follows sequence {last}");
                    self.problem(ProblemKind::EventOrder, event_key(sequence), detail);
                }
                Some(last) if sequence > last + 1 => {
                    let detail = format!("sequences {} to {} are missing", last + 1, sequence - 1);
                    self.problem(ProblemKind::EventGap, event_key(sequence), detail);
                }
                _ => {}
            }
            self.last_sequence = Some(self.last_sequence.map_or(sequence, |last| last.max(sequence)));
            self.event_tasks.entry(event.task_id).or_insert(sequence);
        }
    }

    /// An agent record stored under `id`.
    pub(crate) fn agent(&mut self, id: AgentId, record: Result<AgentRecord, StoreError>) {
        self.report.records.agents += 1;
        let key = format!("agent/{id}");
        match record {
            Ok(agent) if agent.id != id => self.problem(ProblemKind::BadKey, key, format!("holds agent {}", agent.id)),
            Ok(_) => {}
            Err(e) => self.undecodable(key, &e),
        }
    }

    /// A queue record stored under `name`.
    pub(crate) fn queue(&mut self, name: &str, record: Result<QueueRecord, StoreError>) {
        self.report.records.queues += 1;
        let key = format!("queue/{name}");
        match record {
            Ok(queue) if queue.name != name => {
                self.problem(ProblemKind::BadKey, key, format!("holds queue {}", queue.name))
            }
            Ok(_) => {}
            Err(e) => self.undecodable(key, &e),
        }
    }

    /// A token record stored under `name`.
    pub(crate) fn token(&mut self, name: &str, record: Result<TokenRecord, StoreError>) {
        self.report.records.tokens += 1;
        let key = format!("token/{name}");
        match record {
            Ok(token) if token.name != name => {
                self.problem(ProblemKind::BadKey, key, format!("holds token {}", token.name))
            }
            Ok(_) => {}
            Err(e) => self.undecodable(key, &e),
        }
    }

    /// An attempt log stored under `task` and `attempt`.
    pub(crate) fn log(&mut self, task: TaskId, attempt: u32, record: Result<AttemptLog, StoreError>) {
        self.report.records.logs += 1;
        match record {
            Ok(log) if (log.task_id, log.attempt) != (task, attempt) => {
                let detail = format!("holds the log of {} attempt {}", log.task_id, log.attempt);
                self.problem(ProblemKind::BadKey, log_key(task, attempt), detail);
            }
            Ok(_) => {}
            Err(e) => self.undecodable(log_key(task, attempt), &e),
        }
        self.logs.push((task, attempt));
    }

    /// True when `id`'s record exists, decodable or not.
    fn stored(&self, id: TaskId) -> bool {
        self.tasks.contains_key(&id) || self.undecodable_tasks.contains(&id)
    }

    /// The cross checks between records and indexes, then the report.
    pub(crate) fn finish(mut self) -> VerifyReport {
        let mut found = Vec::new();
        let mut note = |kind, key, detail: String| found.push((kind, key, detail));

        // The log starts just after what was compacted away, or after the
        // origin (at the origin itself in stores written before there was
        // one).
        if let Some(first) = self.first_sequence {
            let expected = self.compacted_through.max(SEQUENCE_ORIGIN) + 1;
            let from_origin = self.compacted_through == 0 && first == SEQUENCE_ORIGIN;
            if first != expected && !from_origin {
                let detail = match self.compacted_through {
                    0 => format!("the first event is {first}; the log starts at {expected}"),
                    through => format!("the first event is {first}; events up to {through} were compacted away"),
                };
                note(ProblemKind::EventGap, event_key(first), detail);
            }
        }

        // The unfinished index lists exactly the tasks that are not terminal.
        for &id in &self.unfinished {
            match self.tasks.get(&id) {
                Some(facts) if facts.terminal => {
                    note(ProblemKind::StrayUnfinished, format!("unfinished/{id}"), format!("task is {:?}", facts.state))
                }
                None if !self.undecodable_tasks.contains(&id) => {
                    note(ProblemKind::StrayUnfinished, format!("unfinished/{id}"), "no such task".into())
                }
                _ => {}
            }
        }
        let mut ids: Vec<&TaskId> = self.tasks.keys().collect();
        ids.sort();
        for &id in ids {
            let facts = &self.tasks[&id];
            if !facts.terminal && !self.unfinished.contains(&id) {
                let detail = format!("task is {:?} but not in the unfinished index", facts.state);
                note(ProblemKind::MissingUnfinished, task_key(id), detail);
            }
            if let Some(key) = &facts.key {
                match self.keys.get(key) {
                    Some(&indexed) if indexed == id => {}
                    Some(&indexed) => note(
                        ProblemKind::MissingIdempotencyKey,
                        task_key(id),
                        format!("its idempotency key {key:?} is indexed to task {indexed}"),
                    ),
                    None => note(
                        ProblemKind::MissingIdempotencyKey,
                        task_key(id),
                        format!("its idempotency key {key:?} is not indexed"),
                    ),
                }
            }
            if let Some(workflow) = facts.workflow
                && !self.workflows.contains(&(workflow, id))
            {
                let detail = format!("workflow {workflow} does not index it");
                note(ProblemKind::MissingWorkflowEntry, task_key(id), detail);
            }
        }

        // The finished index lists exactly the finished tasks, each under
        // the time it finished.
        if self.finished_index {
            for &(at, id) in &self.finished {
                let entry = format!("finished/{at}/{id}");
                match self.tasks.get(&id) {
                    Some(facts) if facts.terminal && facts.updated_at == at => {}
                    Some(facts) if facts.terminal => {
                        note(ProblemKind::StrayFinished, entry, format!("the task finished at {}", facts.updated_at))
                    }
                    Some(facts) => note(ProblemKind::StrayFinished, entry, format!("task is {:?}", facts.state)),
                    None if !self.undecodable_tasks.contains(&id) => {
                        note(ProblemKind::StrayFinished, entry, "no such task".into())
                    }
                    None => {}
                }
            }
            let mut ids: Vec<(&TaskId, &TaskFacts)> = self.tasks.iter().filter(|(_, f)| f.terminal).collect();
            ids.sort_by_key(|(id, _)| **id);
            for (&id, facts) in ids {
                if !self.finished.contains(&(facts.updated_at, id)) {
                    let detail = format!("task is {:?} but not in the finished index", facts.state);
                    note(ProblemKind::MissingFinished, task_key(id), detail);
                }
            }
        }

        // Every idempotency key points at a task that carries it.
        for (key, &id) in &self.keys {
            let entry = format!("idempotency/{key}");
            match self.tasks.get(&id) {
                Some(facts) if facts.key.as_deref() == Some(key.as_str()) => {}
                Some(facts) => {
                    let carries = facts.key.as_ref().map_or("no key".to_owned(), |k| format!("key {k:?}"));
                    note(ProblemKind::StrayIdempotencyKey, entry, format!("task {id} carries {carries}"));
                }
                None if !self.undecodable_tasks.contains(&id) => {
                    note(ProblemKind::StrayIdempotencyKey, entry, format!("task {id} does not exist"))
                }
                None => {}
            }
        }

        // Every workflow entry names a task of that workflow.
        for &(workflow, id) in &self.workflows {
            let entry = format!("workflow/{workflow}/{id}");
            match self.tasks.get(&id) {
                Some(facts) if facts.workflow == Some(workflow) => {}
                Some(facts) => {
                    let belongs = facts.workflow.map_or("no workflow".to_owned(), |w| format!("workflow {w}"));
                    note(ProblemKind::StrayWorkflowEntry, entry, format!("the task is in {belongs}"));
                }
                None if !self.undecodable_tasks.contains(&id) => {
                    note(ProblemKind::StrayWorkflowEntry, entry, "no such task".into())
                }
                None => {}
            }
        }

        // Events and logs belong to tasks that exist.
        for (&id, &first) in &self.event_tasks {
            if !self.stored(id) {
                note(ProblemKind::EventTaskMissing, event_key(first), format!("task {id} does not exist"));
            }
        }
        for &(id, attempt) in &self.logs {
            if !self.stored(id) {
                note(ProblemKind::LogTaskMissing, log_key(id, attempt), format!("task {id} does not exist"));
            }
        }

        for (kind, key, detail) in found {
            self.problem(kind, key, detail);
        }
        self.report
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::TaskState;
    use crate::store::{MemoryStore, SledStore, Store, Write, test_event, test_task_in};

    /// A consistent store: a finished task, an unfinished one with an
    /// idempotency key in a workflow, four events, a log.
    pub(crate) fn fill(store: &dyn Store) -> Result<(Task, Task), StoreError> {
        let mut done = test_task_in(TaskState::Succeeded, None);
        done.attempt = 1;
        let mut open = test_task_in(TaskState::Queued, Some("key-1"));
        open.workflow = Some(WorkflowId(ulid::Ulid::new()));
        store.write(&[
            Write::Task(done.clone()),
            Write::Task(open.clone()),
            Write::Event(test_event(2, &done)),
            Write::Event(test_event(3, &open)),
        ])?;
        store.write(&[Write::Event(test_event(4, &done)), Write::Event(test_event(5, &open))])?;
        store.put_log(&AttemptLog { task_id: done.id, attempt: 1, lines: Vec::new(), dropped: 0, next_position: 0 })?;
        Ok((done, open))
    }

    pub(crate) fn kinds(report: &VerifyReport) -> Vec<(ProblemKind, String)> {
        report.problems.iter().map(|p| (p.kind, p.key.clone())).collect()
    }

    #[test]
    fn counts_by_kind_read_back_from_their_names() {
        let counts = RecordCounts {
            tasks: 1,
            events: 2,
            agents: 3,
            queues: 4,
            tokens: 5,
            idempotency_keys: 6,
            workflow_entries: 7,
            unfinished_entries: 8,
            finished_entries: 9,
            logs: 10,
        };
        assert_eq!(RecordCounts::from_kinds(counts.by_kind()), counts);
        assert_eq!(RecordCounts::from_kinds([("tasks", 1)]), RecordCounts::default(), "not a kind's name");
    }

    #[test]
    fn a_consistent_store_is_clean_and_counted() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let sled = SledStore::open(dir.path(), None)?;
        let memory = MemoryStore::new();
        for store in [&sled as &dyn Store, &memory] {
            fill(store)?;
            let report = store.verify()?;
            assert!(report.is_clean(), "{report:?}");
            let expected = RecordCounts {
                tasks: 2,
                events: 4,
                idempotency_keys: 1,
                workflow_entries: 1,
                unfinished_entries: 1,
                finished_entries: 1,
                logs: 1,
                ..RecordCounts::default()
            };
            assert_eq!(report.records, expected);
        }
        Ok(())
    }

    #[test]
    fn a_stray_or_dropped_index_entry_and_a_foreign_log_are_reported_by_both_stores()
    -> Result<(), Box<dyn std::error::Error>> {
        let memory = MemoryStore::new();
        let (_, open) = fill(&memory)?;
        // A task rewritten under another key and workflow leaves its old
        // entries behind: the stores never remove them.
        let mut moved = open.clone();
        moved.spec.idempotency_key = Some("key-2".into());
        moved.workflow = None;
        memory.write(&[Write::Task(moved)])?;
        let stranger = test_task_in(TaskState::Queued, None);
        memory.put_log(&AttemptLog {
            task_id: stranger.id,
            attempt: 1,
            lines: Vec::new(),
            dropped: 0,
            next_position: 0,
        })?;
        let report = memory.verify()?;
        let workflow = open.workflow.ok_or("no workflow")?;
        assert_eq!(
            kinds(&report),
            [
                (ProblemKind::StrayIdempotencyKey, "idempotency/key-1".to_owned()),
                (ProblemKind::StrayWorkflowEntry, format!("workflow/{workflow}/{}", open.id)),
                (ProblemKind::LogTaskMissing, format!("log/{}/1", stranger.id)),
            ]
        );
        assert_eq!(report.problem_count, 3);
        assert!(report.problems[0].detail.contains("\"key-2\""), "{:?}", report.problems[0]);
        Ok(())
    }
}
