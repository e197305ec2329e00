//! Retention with paused time: what expires goes with everything that
//! belongs to it; what is unfinished, or still needed, stays.

use std::time::Duration;

use super::*;
use crate::retention::{Cursor, plan};
use crate::scheduler::engine::retention::Expired;

const RETENTION: Duration = Duration::from_secs(3600);

impl Harness {
    /// One retention pass over everything due at this moment.
    fn expire(&mut self) -> Expired {
        let cutoff = self.core.clock().ms(Instant::now()) - RETENTION.as_millis() as u64;
        let mut cursor: Cursor = None;
        let plan = plan(self.store.as_ref(), cutoff, &mut cursor).expect("plan");
        let (groups, events_through) = (plan.groups, plan.events_through);
        self.call(|reply| Command::Expire { groups, events_through, reply }).expect("expire")
    }

    fn exists(&self, id: TaskId) -> bool {
        self.store.task(id).expect("read").is_some()
    }

    fn cancel(&mut self, id: TaskId) {
        let reason = "test".to_owned();
        self.call(|reply| Command::Cancel { id, reason, reply }).expect("cancel");
    }

    fn assert_clean(&self) {
        let report = self.store.verify().expect("verify");
        assert!(report.is_clean(), "{report:#?}");
    }
}

fn keyed(capability: &str, key: &str) -> TaskSpec {
    TaskSpec { idempotency_key: Some(key.into()), ..make_spec(capability) }
}

fn node(key: &str, capability: &str, deps: &[String]) -> Submission {
    Submission { spec: TaskSpec { key: Some(key.into()), ..make_spec(capability) }, depends_on: deps.to_vec() }
}

#[tokio::test(start_paused = true)]
async fn expired_tasks_go_with_their_events_logs_and_keys_while_unfinished_and_needed_work_stays() {
    let mut h = Harness::new(make_config());
    let agent = h.connect("x", &["x"], &[], 8);
    // Finished: a single task with a key and a log.
    let done = h.submit(keyed("x", "done-key"));
    h.run(&agent, done.id, 1);
    h.store
        .put_log(&AttemptLog { task_id: done.id, attempt: 1, lines: Vec::new(), dropped: 0, next_position: 0 })
        .expect("log");
    // A workflow with a finished root and an unfinished child.
    let graph = h.submit_graph(vec![node("root", "x", &[]), node("child", "y", &["root".into()])]).expect("graph");
    let (root, child) = (graph.tasks[0].0.id, graph.tasks[1].0.id);
    h.run(&agent, root, 1);
    // A finished parent that an unfinished task still depends on.
    let parent = h.submit(make_spec("x"));
    h.run(&agent, parent.id, 1);
    let blocker = h.submit(make_spec("y"));
    let dependent = h
        .submit_graph(vec![Submission {
            spec: make_spec("x"),
            depends_on: vec![parent.id.to_string(), blocker.id.to_string()],
        }])
        .expect("dependent")
        .tasks[0]
        .0
        .id;
    // Unfinished, with a key.
    let open = h.submit(keyed("y", "open-key"));
    h.disconnect(&agent);
    h.assert_clean();

    // Nothing is due before the retention has passed.
    h.advance(RETENTION / 2).await;
    assert_eq!(h.expire(), Expired::default());
    assert!(h.exists(done.id));

    // Past it. (Retention reads what is due from the store, so what expired
    // while a server was down goes at its first pass.)
    h.advance(RETENTION).await;
    let expired = h.expire();
    assert_eq!(expired.tasks, 1, "{expired:?}");
    // The scheduler keeps the parent back; the unfinished workflow never
    // leaves the plan.
    assert_eq!(expired.kept, 1, "{expired:?}");
    assert!(!h.exists(done.id));
    assert_eq!(h.store.log(done.id, 1).expect("read"), None, "its log went with it");
    for id in [root, child, parent.id, blocker.id, dependent, open.id] {
        assert!(h.exists(id), "{id} stays");
    }
    let compacted = h.store.compacted_through().expect("read");
    assert!(compacted >= done.sequence, "its events went first: {compacted} < {}", done.sequence);
    assert!(h.store.events_after(0, 1000).expect("read").iter().all(|e| e.task_id != done.id));
    h.assert_clean();
    // Its key is free again; the live task's key still deduplicates.
    let (again, existed) = h.submit_many(vec![keyed("x", "done-key")]).expect("submit").remove(0);
    assert!(!existed && again.id != done.id);
    let (same, existed) = h.submit_many(vec![keyed("y", "open-key")]).expect("submit").remove(0);
    assert!(existed && same.id == open.id);

    // Once everything has finished and expired, the rest goes; a workflow
    // as a whole.
    let agent = h.connect("y", &["x", "y"], &[], 8);
    h.run(&agent, child, 1);
    h.run(&agent, blocker.id, 1);
    h.run(&agent, dependent, 1);
    h.run(&agent, open.id, 1);
    h.run(&agent, again.id, 1);
    h.disconnect(&agent);
    h.advance(RETENTION * 2).await;
    let expired = h.expire();
    assert_eq!(expired, Expired { tasks: 7, kept: 0 });
    for id in [root, child, parent.id, blocker.id, dependent, open.id, again.id] {
        assert!(!h.exists(id), "{id} went");
    }
    assert!(h.store.workflow_tasks(graph.workflow.expect("a workflow")).expect("read").is_empty());
    assert!(h.store.idempotency_keys().expect("read").is_empty());
    assert!(h.store.events_after(0, 1000).expect("read").is_empty(), "every event was that old");
    h.assert_clean();

    // The sequence goes on from where it was, though no event is left.
    let last = h.store.last_sequence().expect("read");
    h.restart();
    let next = h.submit(make_spec("x"));
    assert_eq!(next.sequence, last + 1);
}

#[tokio::test(start_paused = true)]
async fn a_task_retried_after_the_compactor_looked_stays() {
    let mut h = Harness::new(make_config());
    let task = h.submit(make_spec("x"));
    h.cancel(task.id);
    h.advance(RETENTION * 2).await;
    let cutoff = h.core.clock().ms(Instant::now()) - RETENTION.as_millis() as u64;
    let plan = plan(h.store.as_ref(), cutoff, &mut None).expect("plan");
    assert_eq!(plan.groups.len(), 1, "the cancelled task is due");
    let id = task.id;
    h.call(|reply| Command::Retry { id, reply }).expect("retry");
    let (groups, events_through) = (plan.groups, plan.events_through);
    let expired = h.call(|reply| Command::Expire { groups, events_through, reply }).expect("expire");
    assert_eq!(expired, Expired { tasks: 0, kept: 1 });
    assert_eq!(h.task(id).state, TaskState::Queued);
    h.assert_clean();
    // Cancelled again and past retention again, it goes.
    h.cancel(id);
    h.advance(RETENTION * 2).await;
    assert_eq!(h.expire().tasks, 1);
    assert!(!h.exists(id));
    h.assert_clean();
}
