//! The shared store suite: every [`Store`] implementation runs it.

use std::collections::BTreeMap;
use std::time::Duration;

use ulid::Ulid;

use super::{MemoryStore, RecordCounts, Removal, SledStore, Store, Write};
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
        finished_entries: 1,
        logs: 1,
    };
    assert_eq!(store.record_counts()?, counts);
    assert_eq!(store.verify()?.records, counts, "what verify finds, decoding everything");
    store.write(&[Write::Agent(agent)])?;
    assert_eq!(store.record_counts()?, RecordCounts { agents: 1, ..counts });
    Ok(())
}

/// Retention's part: the finished index, removal with everything that
/// belongs to a task, and cutting the event log.
fn run_retention_suite(store: &dyn Store) -> Result<(), Box<dyn std::error::Error>> {
    let finished = |at: Millis, key: Option<&str>, workflow: Option<WorkflowId>| Task {
        updated_at: at,
        workflow,
        ..make_task(TaskState::Succeeded, key)
    };
    let workflow = WorkflowId(Ulid::new());
    let (a, b, c) = (finished(10, Some("ka"), None), finished(20, None, Some(workflow)), finished(30, None, None));
    let open = make_task(TaskState::Queued, Some("kq"));
    let mut writes = vec![Write::Task(a.clone()), Write::Task(b.clone()), Write::Task(c.clone()), Write::Task(open)];
    for sequence in 2..=40 {
        let at = if sequence <= 30 { 10 } else { 50 };
        writes.push(Write::Event(TaskEvent { at, ..make_event(sequence, &a) }));
    }
    store.write(&writes)?;
    let log = |task: &Task, attempt| AttemptLog {
        task_id: task.id,
        attempt,
        lines: Vec::new(),
        dropped: 0,
        next_position: 0,
    };
    for l in [log(&a, 1), log(&a, 2), log(&b, 1)] {
        store.put_log(&l)?;
    }
    let logged: Vec<(TaskId, u32)> = store.logs_after(None, 10)?.iter().map(|l| (l.task_id, l.attempt)).collect();
    assert_eq!(logged.len(), 3);
    assert_eq!(store.logs_after(Some(logged[0]), 10)?.len(), 2);

    // The finished index, oldest first, up to a time, from a cursor.
    assert_eq!(store.finished_tasks(25, None, 10)?, [(10, a.id), (20, b.id)]);
    assert_eq!(store.finished_tasks(30, Some((10, a.id)), 1)?, [(20, b.id)]);
    assert_eq!(store.finished_tasks(5, None, 10)?, []);

    // A retried task leaves the index.
    let mut reopened = c.clone();
    reopened.state = TaskState::Queued;
    store.write(&[Write::Reopen { id: c.id, finished_at: 30 }, Write::Task(reopened)])?;
    assert_eq!(store.finished_tasks(100, None, 10)?.len(), 2);

    // The event log is cut at whole records holding nothing later.
    let cut = store.events_cut(10, 1000)?.ok_or("no cut")?;
    assert!((2..=30).contains(&cut), "{cut}");
    assert_eq!(store.events_cut(5, 1000)?, None);
    assert_eq!(store.compacted_through()?, 0);
    store.write(&[Write::CompactEvents { through: cut }])?;
    assert_eq!(store.compacted_through()?, cut);
    assert_eq!(store.events_after(0, 100)?.first().map(|e| e.sequence), Some(cut + 1));
    assert_eq!(store.last_sequence()?, 40);

    store.write(&[Write::Remove(Removal::of(&a)), Write::Remove(Removal::of(&b))])?;
    assert_eq!(store.task(a.id)?, None);
    assert_eq!(store.log(a.id, 2)?, None);
    assert!(store.logs_after(None, 10)?.is_empty(), "every log of both tasks went");
    assert!(store.idempotency_keys()?.iter().all(|(k, _)| k != "ka"));
    assert!(store.workflow_tasks(workflow)?.is_empty());
    assert!(store.finished_tasks(100, None, 10)?.is_empty());

    // With every event cut, the last sequence given out is still known.
    store.write(&[Write::CompactEvents { through: 40 }])?;
    assert!(store.events_after(0, 100)?.is_empty());
    assert_eq!(store.last_sequence()?, 40);
    let report = store.verify()?;
    assert!(report.is_clean(), "{report:#?}");
    Ok(())
}

#[test]
fn memory_store_passes_the_suite() -> Result<(), Box<dyn std::error::Error>> {
    run_suite(&MemoryStore::new())?;
    run_retention_suite(&MemoryStore::new())?;
    Ok(())
}

#[test]
fn sled_store_passes_the_retention_suite_and_keeps_its_compaction_point() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    {
        let store = SledStore::open(dir.path(), None)?;
        run_retention_suite(&store)?;
    }
    let store = SledStore::open(dir.path(), None)?;
    assert_eq!((store.compacted_through()?, store.last_sequence()?), (40, 40));
    Ok(())
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

/// A private PostgreSQL cluster for one test, or `None` when PostgreSQL is
/// not installed (see [`crate::pg_cluster`]).
fn pg_cluster() -> Result<Option<crate::pg_cluster::PgCluster>, Box<dyn std::error::Error>> {
    Ok(crate::pg_cluster::PgCluster::start()?)
}

#[test]
fn postgres_store_passes_both_suites_and_keeps_data_across_reconnect() -> Result<(), Box<dyn std::error::Error>> {
    let Some(cluster) = pg_cluster()? else { return Ok(()) };
    let suite = cluster.create_database("suite")?;
    {
        let store = super::PgStore::connect(&suite)?;
        run_suite(&store)?;
    }
    // A second open finds the schema in place and the data kept.
    let store = super::PgStore::connect(&suite)?;
    assert_eq!(store.last_sequence()?, 41);
    assert_eq!(store.unfinished_tasks()?.len(), 2, "the queued task and the workflow member");
    assert_eq!(store.tokens()?.len(), 1);

    let retention = cluster.create_database("retention")?;
    let store = super::PgStore::connect(&retention)?;
    run_retention_suite(&store)?;
    assert_eq!((store.compacted_through()?, store.last_sequence()?), (40, 40));
    Ok(())
}

#[test]
fn a_postgres_batch_that_fails_leaves_nothing_behind() -> Result<(), Box<dyn std::error::Error>> {
    let Some(cluster) = pg_cluster()? else { return Ok(()) };
    let store = super::PgStore::connect(&cluster.url())?;
    let kept = make_task(TaskState::Queued, Some("kept"));
    let event = make_event(1, &kept);
    // A key past what a PostgreSQL index row can hold (random, so it
    // does not compress) fails the batch after the task and its event.
    let random: String = (0..400).map(|_| Ulid::new().to_string()).collect();
    let refused = make_task(TaskState::Queued, Some(&random));
    let batch = [Write::Task(kept.clone()), Write::Event(event), Write::Task(refused)];
    assert!(store.write(&batch).is_err(), "an index row of 10 kB is refused");
    assert_eq!(store.task(kept.id)?, None);
    assert_eq!(store.last_sequence()?, 0);
    assert!(store.idempotency_keys()?.is_empty());
    assert_eq!(store.record_counts()?, RecordCounts::default());
    // The store goes on working.
    store.write(&[Write::Task(kept.clone())])?;
    assert_eq!(store.task(kept.id)?, Some(kept));
    Ok(())
}

#[test]
fn a_postgres_writer_that_lost_the_lease_writes_nothing_and_epochs_only_grow() -> Result<(), Box<dyn std::error::Error>>
{
    let Some(cluster) = pg_cluster()? else { return Ok(()) };
    let (old, new) = (super::PgStore::connect(&cluster.url())?, super::PgStore::connect(&cluster.url())?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ttl = Duration::from_secs(1);
    let first = runtime.block_on(old.acquire_lease("old", "http://old:7070", ttl))?;
    assert_eq!(first, Some(1));
    assert_eq!(runtime.block_on(new.acquire_lease("new", "http://new:7070", ttl))?, None, "the lease is held");
    let task = make_task(TaskState::Queued, Some("before"));
    old.write(&[Write::Task(task.clone())])?;
    assert!(runtime.block_on(old.renew_lease("old", 1, ttl))?);

    // The old holder stops renewing; once the lease expires the other takes
    // it. Expiry is on PostgreSQL's clock, which no test can pause.
    std::thread::sleep(ttl + Duration::from_millis(200));
    assert_eq!(runtime.block_on(new.acquire_lease("new", "http://new:7070", ttl))?, Some(2));
    let lease = runtime.block_on(new.lease())?;
    assert_eq!(
        (lease.holder.as_str(), lease.address.as_str(), lease.epoch, lease.live),
        ("new", "http://new:7070", 2, true)
    );

    let late = make_task(TaskState::Queued, Some("late"));
    let refused = old.write(&[Write::Task(late.clone()), Write::Event(make_event(1, &late))]);
    assert!(matches!(refused, Err(super::StoreError::Fenced(_))), "{refused:?}");
    let log = AttemptLog { task_id: task.id, attempt: 1, lines: Vec::new(), dropped: 0, next_position: 0 };
    assert!(matches!(old.put_log(&log), Err(super::StoreError::Fenced(_))));
    assert!(!runtime.block_on(old.renew_lease("old", 1, ttl))?, "the old epoch cannot be renewed");
    assert_eq!(new.task(late.id)?, None);
    assert_eq!(new.last_sequence()?, 0);
    assert_eq!(new.log(task.id, 1)?, None);
    assert_eq!(new.task(task.id)?, Some(task), "what it wrote while it led stays");

    // A resignation frees the lease at once, and the next epoch follows.
    runtime.block_on(new.resign_lease("new", 2))?;
    assert!(!runtime.block_on(old.lease())?.live);
    assert_eq!(runtime.block_on(old.acquire_lease("old", "http://old:7070", ttl))?, Some(3));
    Ok(())
}
