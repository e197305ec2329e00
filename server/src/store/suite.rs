//! The shared store suite: every [`Store`] implementation runs it.

use std::collections::BTreeMap;
use std::time::Duration;

use ulid::Ulid;

use super::{MemoryStore, RecordCounts, SledStore, Store, Write};
use crate::model::*;

pub(crate) fn make_task(state: TaskState, key: Option<&str>) -> Task {
    let spec = TaskSpec {
        payload: bytes::Bytes::from_static(b"{}"),
        timeout: Duration::from_secs(60),
        idempotency_key: key.map(str::to_owned),
        ..TaskSpec::new("shell")
    };
    Task { state, ..Task::new(TaskId(Ulid::new()), spec, None, Some("ci".into()), 1) }
}

pub(crate) fn make_event(sequence: u64, task: &Task) -> TaskEvent {
    TaskEvent {
        sequence,
        task_id: task.id,
        kind: EventKind::State,
        state: task.state,
        previous_state: None,
        attempt: 0,
        agent_id: None,
        queue: "default".into(),
        capability: "shell".into(),
        workflow: None,
        reason: "submitted".into(),
        message: String::new(),
        progress: None,
        at: 1,
        actor: Some("ci".into()),
    }
}

fn run_suite(store: &dyn Store) -> Result<(), super::StoreError> {
    assert_eq!(store.last_sequence()?, 0);
    assert_eq!(store.record_counts()?, RecordCounts::default());
    let queued = make_task(TaskState::Queued, Some("k1"));
    let mut done = make_task(TaskState::Queued, None);
    store.write(&[
        Write::Task(queued.clone()),
        Write::Task(done.clone()),
        Write::Event(make_event(1, &queued)),
        Write::Event(make_event(2, &done)),
    ])?;
    done.state = TaskState::Succeeded;
    store.write(&[Write::Task(done.clone()), Write::Event(make_event(3, &done))])?;
    store.flush()?;

    assert_eq!(store.task(queued.id)?, Some(queued.clone()));
    assert_eq!(store.task(TaskId(Ulid::new()))?, None);
    let unfinished: Vec<TaskId> = store.unfinished_tasks()?.into_iter().map(|t| t.id).collect();
    assert_eq!(unfinished, vec![queued.id]);
    assert_eq!(store.tasks_after(None, 10, true)?.len(), 1);
    let mut ordered = vec![queued.id, done.id];
    ordered.sort();
    let all: Vec<TaskId> = store.tasks_after(None, 10, false)?.into_iter().map(|t| t.id).collect();
    assert_eq!(all, ordered);
    let page: Vec<TaskId> = store.tasks_after(Some(ordered[0]), 10, false)?.into_iter().map(|t| t.id).collect();
    assert_eq!(page, vec![ordered[1]]);
    assert_eq!(store.tasks_after(None, 1, false)?.len(), 1);

    let seqs: Vec<u64> = store.events_after(1, 10)?.into_iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(store.events_after(0, 1)?.len(), 1);
    assert_eq!(store.last_sequence()?, 3);
    assert_eq!(store.idempotency_keys()?, vec![("k1".to_owned(), queued.id)]);

    let agent = AgentRecord {
        id: AgentId(Ulid::new()),
        name: "a".into(),
        resume_token: "t".into(),
        capabilities: vec!["shell".into()],
        labels: BTreeMap::new(),
        slots: 2,
        draining: false,
        sdk_version: "0".into(),
        metrics_address: String::new(),
        connected_at: 1,
        identity: "agent-token".into(),
    };
    store.write(&[Write::Agent(agent.clone())])?;
    assert_eq!(store.agents()?, vec![agent.clone()]);
    store.write(&[Write::RemoveAgent(agent.id)])?;
    assert!(store.agents()?.is_empty());

    let mut queue = QueueRecord::new("batch");
    store.write(&[Write::Queue(queue.clone())])?;
    queue.paused = true;
    store.write(&[Write::Queue(queue.clone())])?;
    assert_eq!(store.queues()?, vec![queue]);

    let mut token = TokenRecord {
        name: "ci".into(),
        role: crate::auth::Role::Submitter,
        scope: crate::auth::Scope { queues: vec!["batch".into()], ..Default::default() },
        secret_hash: crate::auth::hash_secret("secret"),
        created_at: 1,
        expires_at: Some(2),
        revoked_at: None,
        created_by: "admin".into(),
    };
    store.write(&[Write::Token(token.clone())])?;
    token.revoked_at = Some(3);
    store.write(&[Write::Token(token.clone())])?;
    assert_eq!(store.tokens()?, vec![token]);

    let workflow = WorkflowId(Ulid::new());
    let mut member = make_task(TaskState::Pending, None);
    member.workflow = Some(workflow);
    store.write(&[Write::Task(member.clone())])?;
    member.state = TaskState::Queued;
    store.write(&[Write::Task(member.clone())])?;
    assert_eq!(store.workflow_tasks(workflow)?, vec![member.id]);
    assert!(store.workflow_tasks(WorkflowId(Ulid::new()))?.is_empty());

    // A batch of many events, read back from any point.
    let many: Vec<Write> = (4..=40).map(|seq| Write::Event(make_event(seq, &queued))).collect();
    store.write(&many)?;
    store.write(&[Write::Event(make_event(41, &queued))])?;
    assert_eq!(store.last_sequence()?, 41);
    for after in [0, 3, 4, 19, 20, 21, 39, 40] {
        let seqs: Vec<u64> = store.events_after(after, 7)?.into_iter().map(|e| e.sequence).collect();
        let expected: Vec<u64> = (after + 1..=41).take(7).collect();
        assert_eq!(seqs, expected, "after {after}");
    }
    assert!(store.events_after(41, 10)?.is_empty());
    assert_eq!(store.events_after(0, 100)?.len(), 41);

    let line = LogLine { position: 3, at: 5, stream: LogStream::Stderr, text: "boom".into() };
    let mut log = AttemptLog { task_id: queued.id, attempt: 2, lines: vec![line], dropped: 2, next_position: 4 };
    store.put_log(&log)?;
    log.dropped = 7;
    store.put_log(&log)?;
    assert_eq!(store.log(queued.id, 2)?, Some(log.clone()));
    assert_eq!(store.log(queued.id, 1)?, None);
    assert_eq!(store.log(done.id, 2)?, None);

    // Every kind counted once per record, replaced records once, removed
    // ones not at all; events one by one, however they are grouped.
    let counts = RecordCounts {
        tasks: 3,
        events: 41,
        agents: 0,
        queues: 1,
        tokens: 1,
        idempotency_keys: 1,
        workflow_entries: 1,
        unfinished_entries: 2,
        logs: 1,
    };
    assert_eq!(store.record_counts()?, counts);
    assert_eq!(store.verify()?.records, counts, "what verify finds, decoding everything");
    store.write(&[Write::Agent(agent)])?;
    assert_eq!(store.record_counts()?, RecordCounts { agents: 1, ..counts });
    Ok(())
}

#[test]
fn memory_store_passes_the_suite() -> Result<(), super::StoreError> {
    run_suite(&MemoryStore::new())
}

#[test]
fn sled_store_passes_the_suite_and_keeps_data_across_reopen() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    {
        let store = SledStore::open(dir.path(), None)?;
        run_suite(&store)?;
    }
    let store = SledStore::open(dir.path(), None)?;
    assert_eq!(store.last_sequence()?, 41);
    assert_eq!(store.unfinished_tasks()?.len(), 2, "the queued task and the workflow member");
    assert_eq!(store.queues()?.len(), 1);
    assert_eq!(store.tokens()?.len(), 1);
    let logged = store.tasks_after(None, 10, false)?.into_iter().find_map(|t| store.log(t.id, 2).transpose());
    assert_eq!(logged.transpose()?.map(|log| log.dropped), Some(7));
    Ok(())
}
