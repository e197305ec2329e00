//! Graphs, locks, concurrency keys and queues, and explain.

use std::time::Duration;

use ulid::Ulid;

use super::*;

fn node(key: &str, capability: &str, deps: &[&str]) -> Submission {
    let mut spec = make_spec(capability);
    spec.key = Some(key.into());
    Submission { spec, depends_on: deps.iter().map(|d| d.to_string()).collect() }
}

/// Runs everything assigned to `agent` until nothing is left, returning the
/// order in which tasks completed.
fn run_all(h: &mut Harness, agent: &mut TestAgent) -> Vec<TaskId> {
    let mut done = Vec::new();
    loop {
        let assigned = agent.assignments();
        if assigned.is_empty() {
            return done;
        }
        for (id, attempt) in assigned {
            h.run(agent, id, attempt);
            done.push(id);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_diamond_runs_each_task_after_all_its_dependencies() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![
            node("d", "x", &["b", "c"]),
            node("b", "x", &["a"]),
            node("c", "x", &["a"]),
            node("a", "x", &[]),
        ])
        .expect("submit");
    assert!(outcome.workflow.is_some());
    let id = |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id);
    let (a, b, c, d) = (id("a").expect("a"), id("b").expect("b"), id("c").expect("c"), id("d").expect("d"));
    assert_eq!(h.task(d).spec.depends_on.len(), 2);
    let mut agent = h.connect("x", &["x"], &[], 4);
    let first = agent.assignments();
    assert_eq!(first, vec![(a, 1)], "only the root is ready");
    h.run(&agent, a, 1);
    let mut second: Vec<TaskId> = agent.assignments().into_iter().map(|(t, _)| t).collect();
    second.sort();
    let mut expected = vec![b, c];
    expected.sort();
    assert_eq!(second, expected);
    h.run(&agent, b, 1);
    assert!(agent.assignments().is_empty(), "d still waits for c");
    assert_eq!(h.explain(d), vec!["waiting_on_dependencies"]);
    h.run(&agent, c, 1);
    let last = agent.messages();
    let Some(ToAgent::Assign(task, parents)) = last.into_iter().find(|m| matches!(m, ToAgent::Assign(..))) else {
        panic!("d was not assigned");
    };
    assert_eq!(task.id, d);
    let mut keys: Vec<&str> = parents.iter().map(|p| p.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, vec!["b", "c"], "a child receives its parents' outputs by key");
    assert!(parents.iter().all(|p| p.output.as_ref() == b"ok"));
}

#[tokio::test(start_paused = true)]
async fn cycles_and_unknown_edges_are_rejected_with_their_names() {
    let mut h = Harness::new(make_config());
    let err = h
        .submit_graph(vec![node("a", "x", &["c"]), node("b", "x", &["a"]), node("c", "x", &["b"]), node("d", "x", &[])])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("tasks: dependency cycle:"), "{err}");
    for name in ["a", "b", "c"] {
        assert!(err.contains(name), "{err} names {name}");
    }
    let named = err.split("cycle:").nth(1).unwrap_or_default();
    assert!(!named.contains('d'), "{err} names only the cycle");
    let err = h.submit_graph(vec![node("a", "x", &["a"])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("dependency cycle: a -> a"), "{err}");
    let err = h.submit_graph(vec![node("a", "x", &["ghost"])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("tasks[0].depends_on[0]") && err.contains("'ghost'"), "{err}");
    let missing = TaskId(Ulid::new()).to_string();
    let err = h.submit_graph(vec![node("a", "x", &[&missing])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains(&missing) && err.contains("does not exist"), "{err}");
    let err =
        h.submit_graph(vec![node("a", "x", &[]), node("a", "x", &[])]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("tasks[1].key"), "{err}");
    assert_eq!(h.core.unfinished(), 0, "nothing was half-written");
}

#[tokio::test(start_paused = true)]
async fn a_failure_cancels_exactly_its_transitive_dependents() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![
            node("a", "x", &[]),
            node("b", "x", &["a"]),
            node("c", "x", &["b"]),
            node("d", "x", &["a"]),
            node("e", "x", &[]),
            node("f", "x", &["e"]),
        ])
        .expect("submit");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 1);
    let first = agent.assignments();
    assert_eq!(first.len(), 1);
    let (a, e) = (id("a"), id("e"));
    // Whichever root came first, fail a and let e run.
    if first[0].0 == e {
        h.run(&agent, e, 1);
        agent.assignments();
    }
    h.report(&agent, AgentReport::Fail(a, 1, Failure::new("handler_error", "broken", false)));
    for k in ["b", "c", "d"] {
        let task = h.task(id(k));
        assert_eq!(task.state, TaskState::Cancelled, "{k}");
        assert_eq!(task.failure.map(|f| f.reason), Some(reason::UPSTREAM_FAILED.to_owned()), "{k}");
    }
    run_all(&mut h, &mut agent);
    assert_eq!(h.task(id("f")).state, TaskState::Succeeded, "the other branch is untouched");
    assert!(h.events.iter().any(|ev| ev.task_id == id("c") && ev.reason == reason::UPSTREAM_FAILED));
}

#[tokio::test(start_paused = true)]
async fn exclusive_and_shared_locks_never_overlap_wrongly() {
    let mut h = Harness::new(make_config());
    let mut exclusive = make_spec("x");
    exclusive.locks = vec![LockSpec { name: "repo".into(), mode: LockMode::Exclusive }];
    let mut shared = make_spec("x");
    shared.locks = vec![LockSpec { name: "repo".into(), mode: LockMode::Shared }];
    let w = h.submit(exclusive.clone()).id;
    let r1 = h.submit(shared.clone()).id;
    let r2 = h.submit(shared).id;
    let w2 = h.submit(exclusive).id;
    let mut agent = h.connect("x", &["x"], &[], 4);
    assert_eq!(agent.assignments(), vec![(w, 1)], "the writer holds the lock alone");
    assert_eq!(h.explain(r1), vec!["lock_held"]);
    h.run(&agent, w, 1);
    let mut readers: Vec<TaskId> = agent.assignments().into_iter().map(|(t, _)| t).collect();
    readers.sort();
    let mut expected = vec![r1, r2];
    expected.sort();
    assert_eq!(readers, expected, "shared holders run together");
    h.run(&agent, r1, 1);
    assert!(agent.assignments().is_empty(), "the second writer waits for every reader");
    h.run(&agent, r2, 1);
    assert_eq!(agent.assignments(), vec![(w2, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_key_caps_running_tasks() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("x");
    spec.concurrency = Some(ConcurrencySpec { key: "llm".into(), max: 2 });
    let ids: Vec<TaskId> = (0..5).map(|_| h.submit(spec.clone()).id).collect();
    let mut agent = h.connect("x", &["x"], &[], 5);
    let running = agent.assignments();
    assert_eq!(running.len(), 2);
    let waiting = ids.iter().find(|id| !running.iter().any(|(r, _)| r == *id)).copied().expect("a waiting task");
    assert_eq!(h.explain(waiting), vec!["concurrency_limit"]);
    h.run(&agent, running[0].0, 1);
    assert_eq!(agent.assignments().len(), 1, "one finished, one more starts");
    h.report(&agent, AgentReport::Fail(running[1].0, 1, Failure::new("handler_error", "x", false)));
    assert_eq!(agent.assignments().len(), 1, "a failure frees the key too");
}

#[tokio::test(start_paused = true)]
async fn a_paused_queue_dispatches_nothing_and_resumes_cleanly() {
    let mut h = Harness::new(make_config());
    h.set_queue("batch", crate::scheduler::QueueChange { paused: Some(true), ..Default::default() });
    let mut spec = make_spec("x");
    spec.queue = "batch".into();
    let id = h.submit(spec).id;
    let other = h.submit(make_spec("x")).id;
    let mut agent = h.connect("x", &["x"], &[], 2);
    assert_eq!(agent.assignments(), vec![(other, 1)], "only the default queue dispatches");
    assert_eq!(h.explain(id), vec!["queue_paused"]);
    h.restart();
    let mut agent2 = h.connect_with("x", &["x"], &[], 2, Some(agent.token.clone()), vec![(other, 1)]);
    assert!(agent2.assignments().is_empty(), "the pause survives a restart");
    h.set_queue("batch", crate::scheduler::QueueChange { paused: Some(false), ..Default::default() });
    assert_eq!(agent2.assignments(), vec![(id, 1)]);
}

#[tokio::test(start_paused = true)]
async fn weighted_queues_share_a_saturated_agent_by_weight() {
    let mut h = Harness::new(make_config());
    h.set_queue("light", crate::scheduler::QueueChange { weight: Some(1), ..Default::default() });
    h.set_queue("heavy", crate::scheduler::QueueChange { weight: Some(3), ..Default::default() });
    let mut queue_of = std::collections::HashMap::new();
    for _ in 0..40 {
        for q in ["light", "heavy"] {
            let mut spec = make_spec("x");
            spec.queue = q.into();
            queue_of.insert(h.submit(spec).id, q);
        }
    }
    let mut agent = h.connect("x", &["x"], &[], 1);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..40 {
        let (id, attempt) = agent.assignments()[0];
        *counts.entry(queue_of[&id]).or_insert(0) += 1;
        h.run(&agent, id, attempt);
    }
    assert_eq!((counts.get("light"), counts.get("heavy")), (Some(&10), Some(&30)), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn explain_names_the_agent_side_reasons() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("gpu");
    spec.selector.insert("gpu".into(), "a100".into());
    let id = h.submit(spec).id;
    assert_eq!(h.explain(id), vec!["no_agent_with_capability"]);
    let _cpu = h.connect("cpu", &["gpu"], &[("gpu", "none")], 1);
    let explanation = h.call(|reply| Command::Explain { id, reply }).expect("explain");
    assert_eq!(explanation.reasons[0].code, "no_agent_matches_selector");
    assert!(explanation.reasons[0].agents[0].contains("gpu=a100 (has gpu=none)"), "{:?}", explanation.reasons);
    let mut busy = h.connect("busy", &["gpu"], &[("gpu", "a100")], 1);
    let mut filler = make_spec("gpu");
    filler.selector.insert("gpu".into(), "a100".into());
    filler.priority = Priority::Critical;
    // The matching agent takes one task; the next one waits for its slot.
    let assigned = busy.assignments();
    assert_eq!(assigned, vec![(id, 1)]);
    let second = h.submit(filler).id;
    assert_eq!(h.explain(second), vec!["all_capable_agents_busy"]);
    assert_eq!(h.explain(id), vec!["running"]);

    let mut later = make_spec("gpu");
    later.not_before = Some(h.core.clock().ms(Instant::now()) + 60_000);
    let later = h.submit(later).id;
    assert_eq!(h.explain(later), vec!["not_before"]);
    h.report(&busy, AgentReport::Fail(id, 1, Failure::new("handler_error", "oops", true)));
    assert_eq!(h.explain(id), vec!["retry_backoff"]);
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_workflow_rebuilds_dependencies_locks_and_concurrency() {
    let mut h = Harness::new(make_config());
    let mut first = node("first", "x", &[]);
    first.spec.locks = vec![LockSpec { name: "db".into(), mode: LockMode::Exclusive }];
    first.spec.concurrency = Some(ConcurrencySpec { key: "k".into(), max: 1 });
    let mut rival = node("rival", "x", &[]);
    rival.spec.locks = vec![LockSpec { name: "db".into(), mode: LockMode::Exclusive }];
    let mut sibling = node("sibling", "x", &[]);
    sibling.spec.concurrency = Some(ConcurrencySpec { key: "k".into(), max: 1 });
    let child = node("child", "x", &["first"]);
    let outcome = h.submit_graph(vec![first, rival, sibling, child]).expect("submit");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 4);
    let assigned = agent.assignments();
    assert_eq!(assigned, vec![(id("first"), 1)], "the lock and the key hold the others back");
    h.report(&agent, AgentReport::Accept(id("first"), 1));

    h.restart();
    let mut back = h.connect_with("x", &["x"], &[], 4, Some(agent.token.clone()), vec![(id("first"), 1)]);
    assert!(back.assignments().is_empty(), "the lock and the concurrency count survive the restart");
    let reasons = h.explain(id("rival"));
    assert_eq!(reasons, vec!["lock_held"]);
    assert_eq!(h.explain(id("sibling")), vec!["concurrency_limit"]);
    assert_eq!(h.explain(id("child")), vec!["waiting_on_dependencies"]);
    h.run(&back, id("first"), 1);
    let mut next: Vec<TaskId> = back.assignments().into_iter().map(|(t, _)| t).collect();
    next.sort();
    let mut expected = vec![id("rival"), id("sibling"), id("child")];
    expected.sort();
    assert_eq!(next, expected);
}

#[tokio::test(start_paused = true)]
async fn a_queue_maximum_caps_its_running_tasks() {
    let mut h = Harness::new(make_config());
    h.set_queue("narrow", crate::scheduler::QueueChange { max_running: Some(1), ..Default::default() });
    let mut spec = make_spec("x");
    spec.queue = "narrow".into();
    let first = h.submit(spec.clone()).id;
    let second = h.submit(spec).id;
    let mut agent = h.connect("x", &["x"], &[], 4);
    assert_eq!(agent.assignments(), vec![(first, 1)]);
    assert_eq!(h.explain(second), vec!["queue_at_max_running"]);
    let queues = h.call(|reply| Command::ListQueues { reply }).expect("list queues");
    let narrow = queues.iter().find(|q| q.record.name == "narrow").expect("narrow listed");
    assert_eq!((narrow.running, narrow.depth.get("QUEUED").copied()), (1, Some(1)));
    h.run(&agent, first, 1);
    assert_eq!(agent.assignments(), vec![(second, 1)]);
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_workflow_cancels_every_unfinished_task() {
    let mut h = Harness::new(make_config());
    let outcome = h
        .submit_graph(vec![node("a", "x", &[]), node("b", "x", &["a"]), node("c", "x", &[]), node("d", "x", &["c"])])
        .expect("submit");
    let workflow = outcome.workflow.expect("a workflow");
    let id =
        |k: &str| outcome.tasks.iter().find(|(t, _)| t.spec.key.as_deref() == Some(k)).map(|(t, _)| t.id).expect(k);
    let mut agent = h.connect("x", &["x"], &[], 1);
    let (first, _) = agent.assignments()[0];
    h.run(&agent, first, 1);
    agent.messages();
    let cancelled = h
        .call(|reply| Command::CancelWorkflow { id: workflow, reason: "abandoned".into(), reply })
        .expect("cancel workflow");
    assert!(!cancelled.is_empty());
    for k in ["a", "b", "c", "d"] {
        let state = h.task(id(k)).state;
        if id(k) == first {
            assert_eq!(state, TaskState::Succeeded, "{k} had finished");
        } else {
            assert!(
                matches!(state, TaskState::Cancelled | TaskState::Assigned | TaskState::Running),
                "{k} is {state:?}"
            );
        }
    }
    // A running task is cancelled in two phases; its handler is told.
    h.advance(Duration::from_secs(6)).await;
    for k in ["a", "b", "c", "d"] {
        assert!(h.task(id(k)).state.is_terminal(), "{k} finished");
    }
}
