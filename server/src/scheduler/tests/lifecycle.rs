//! One task's life: dispatch order and routing, leases and resumes,
//! fencing, retries and timeouts, cancel, drain, queue timeouts, restart.

use std::time::Duration;

use super::*;

#[tokio::test(start_paused = true)]
async fn priorities_dispatch_highest_first_and_fifo_within_a_level() {
    let mut h = Harness::new(make_config());
    let mut ids = Vec::new();
    for (i, priority) in
        [Priority::Low, Priority::Normal, Priority::Critical, Priority::High, Priority::Critical, Priority::Normal]
            .into_iter()
            .enumerate()
    {
        let mut spec = make_spec("shell");
        spec.priority = priority;
        spec.metadata.insert("i".into(), i.to_string());
        ids.push(h.submit(spec).id);
    }
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut order = Vec::new();
    for _ in 0..ids.len() {
        let assigned = agent.assignments();
        assert_eq!(assigned.len(), 1, "one slot means one assignment at a time");
        let (id, attempt) = assigned[0];
        order.push(ids.iter().position(|x| *x == id).expect("known task"));
        h.run(&agent, id, attempt);
    }
    assert_eq!(order, vec![2, 4, 3, 1, 5, 0]);
}

#[tokio::test(start_paused = true)]
async fn selectors_route_to_matching_agents_and_slots_are_respected() {
    let mut h = Harness::new(make_config());
    let mut plain = h.connect("plain", &["shell"], &[("gpu", "false")], 2);
    let mut gpu = h.connect("gpu", &["shell"], &[("gpu", "true")], 1);
    let mut spec = make_spec("shell");
    spec.selector.insert("gpu".into(), "true".into());
    let a = h.submit(spec.clone()).id;
    let b = h.submit(spec).id;
    assert_eq!(gpu.assignments(), vec![(a, 1)]);
    assert!(plain.assignments().is_empty(), "the plain agent lacks the gpu label");
    assert_eq!(h.task(b).state, TaskState::Queued, "the gpu agent's one slot is busy");
    h.run(&gpu, a, 1);
    assert_eq!(gpu.assignments(), vec![(b, 1)]);

    let c = h.submit(make_spec("shell")).id;
    let d = h.submit(make_spec("shell")).id;
    let e = h.submit(make_spec("other")).id;
    let to_plain = plain.assignments();
    assert_eq!(to_plain.len(), 2);
    assert!(to_plain.contains(&(c, 1)) && to_plain.contains(&(d, 1)));
    assert_eq!(h.task(e).state, TaskState::Queued, "nobody has the capability");
}

#[tokio::test(start_paused = true)]
async fn a_lost_agents_attempt_fails_with_agent_lost_and_runs_on_another_agent() {
    let mut h = Harness::new(make_config());
    let mut first = h.connect("first", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(first.assignments(), vec![(id, 1)]);
    h.report(&first, AgentReport::Accept(id, 1));
    h.disconnect(&first);
    let mut second = h.connect("second", &["shell"], &[], 1);
    h.pass(&[&second], Duration::from_secs(9)).await;
    assert_eq!(h.task(id).state, TaskState::Running, "still within the lease");
    assert!(second.assignments().is_empty());
    h.pass(&[&second], Duration::from_secs(2)).await;
    let task = h.task(id);
    assert_ne!(task.state, TaskState::Running, "the lost attempt ended");
    assert_eq!(task.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
    h.pass(&[&second], Duration::from_secs(2)).await;
    assert_eq!(second.assignments(), vec![(id, 2)]);
    h.run(&second, id, 2);
    assert_eq!(h.task(id).state, TaskState::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_the_lease_and_silence_loses_it() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    for _ in 0..10 {
        h.advance(Duration::from_secs(3)).await;
        h.report(&agent, AgentReport::Heartbeat);
    }
    assert_eq!(h.task(id).state, TaskState::Running);
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Heartbeat)), "heartbeats are answered");
    h.advance(Duration::from_secs(11)).await;
    assert!(agent.closed.is_none());
    agent.messages();
    assert!(matches!(agent.closed, Some(Error::Unavailable(_))), "the silent session is closed");
    assert_eq!(h.task(id).attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
}

#[tokio::test(start_paused = true)]
async fn resuming_within_the_lease_keeps_the_running_attempt() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.disconnect(&agent);
    h.advance(Duration::from_secs(8)).await;
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![(id, 1)]);
    assert_eq!(back.id, agent.id, "same session");
    h.pass(&[&back], Duration::from_secs(30)).await;
    assert_eq!(h.task(id).state, TaskState::Running);
    assert!(back.assignments().is_empty(), "no second execution");
    h.report(&back, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"done"), String::new()));
    let task = h.task(id);
    assert_eq!((task.state, task.attempt), (TaskState::Succeeded, 1));
    assert!(back.messages().iter().any(|m| matches!(m, ToAgent::Ack { task_id, attempt: 1 } if *task_id == id)));
}

#[tokio::test(start_paused = true)]
async fn an_assignment_lost_in_transit_is_resent_on_resume() {
    let mut h = Harness::new(make_config());
    let agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    h.disconnect(&agent);
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![]);
    assert_eq!(back.assignments(), vec![(id, 1)], "same attempt, offered again");
}

#[tokio::test(start_paused = true)]
async fn fencing_rejects_stale_and_unknown_reports_and_acks_duplicates() {
    let mut h = Harness::new(make_config());
    let mut a = h.connect("a", &["shell"], &[], 1);
    let mut b = h.connect("b", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    let (holder, other) = if a.assignments() == vec![(id, 1)] { (&mut a, &mut b) } else { (&mut b, &mut a) };
    h.report(holder, AgentReport::Accept(id, 1));
    h.report(holder, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"x"), String::new()));
    holder.messages();
    // A duplicate Complete is a no-op that is acknowledged again.
    h.report(holder, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"x"), String::new()));
    assert!(holder.messages().iter().any(|m| matches!(m, ToAgent::Ack { .. })));
    // A Fail of an attempt that succeeded is stale.
    h.report(holder, AgentReport::Fail(id, 1, Failure::new("handler_error", "late", true)));
    assert!(
        holder.messages().iter().any(|m| matches!(m, ToAgent::Rejected { error: Error::FailedPrecondition(_), .. }))
    );
    assert_eq!(h.task(id).state, TaskState::Succeeded);
    // An attempt that never existed, or a task that does not exist, is a
    // mistake (a typo in an attempt number): rejected, the session stays.
    h.report(other, AgentReport::Complete(id, 7, bytes::Bytes::new(), String::new()));
    let missing = crate::model::TaskId(ulid::Ulid::new());
    h.report(other, AgentReport::Fail(missing, 1, Failure::new("handler_error", "typo", true)));
    let rejected = other
        .messages()
        .iter()
        .filter(|m| matches!(m, ToAgent::Rejected { error: Error::FailedPrecondition(_), .. }))
        .count();
    assert_eq!(rejected, 2);
    assert!(other.closed.is_none(), "a mistaken report does not close the session");
}

#[tokio::test(start_paused = true)]
async fn reports_for_an_attempt_held_by_another_agent_close_the_session() {
    let mut h = Harness::new(make_config());
    let mut a = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(a.assignments(), vec![(id, 1)]);
    let mut intruder = h.connect("intruder", &["other"], &[], 1);
    h.report(&intruder, AgentReport::Complete(id, 1, bytes::Bytes::new(), String::new()));
    intruder.messages();
    assert!(matches!(intruder.closed, Some(Error::FailedPrecondition(_))));
    assert_eq!(h.task(id).state, TaskState::Assigned, "the foreign report changed nothing");
}

#[tokio::test(start_paused = true)]
async fn failures_retry_with_capped_exponential_backoff_until_attempts_run_out() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    let mut expected_max = Duration::from_secs(1);
    for attempt in 1..=3u32 {
        assert_eq!(agent.assignments(), vec![(id, attempt)]);
        h.report(&agent, AgentReport::Fail(id, attempt, Failure::new("handler_error", "boom", true)));
        let task = h.task(id);
        if attempt == 3 {
            assert_eq!(task.state, TaskState::Failed);
            assert_eq!(task.failure.as_ref().map(|f| f.message.as_str()), Some("boom"));
            break;
        }
        assert_eq!(task.state, TaskState::Pending);
        let wait = Duration::from_millis(task.ready_at.expect("ready_at") - h.core.clock().ms(Instant::now()));
        assert!(wait >= expected_max / 2 && wait <= expected_max, "backoff {wait:?} within jitter of {expected_max:?}");
        h.advance(wait).await;
        expected_max *= 2;
    }
    assert!(h.events.iter().any(|e| e.reason == "handler_error" && e.state == TaskState::Pending));
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_failure_is_terminal_and_retry_task_runs_it_again() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Fail(id, 1, Failure::new("invalid_payload", "bad", false)));
    assert_eq!(h.task(id).state, TaskState::Failed);
    let task = h.call(|reply| Command::Retry { id, reply }).expect("retry");
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(agent.assignments(), vec![(id, 2)]);
    h.run(&agent, id, 2);
    assert_eq!(h.task(id).state, TaskState::Succeeded);
    let again = h.call(|reply| Command::Retry { id, reply });
    assert!(matches!(again, Err(Error::FailedPrecondition(_))), "only failed or cancelled tasks can be retried");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_its_timeout_is_cancelled_and_fails_with_reason_timeout() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut spec = make_spec("shell");
    spec.timeout = Duration::from_secs(30);
    spec.retry.max_attempts = 1;
    let id = h.submit(spec).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.pass(&[&agent], Duration::from_secs(29)).await;
    assert_eq!(h.task(id).state, TaskState::Running);
    h.pass(&[&agent], Duration::from_secs(2)).await;
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Cancel { reason, .. } if reason == "timeout")));
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.failure.map(|f| f.reason), Some(reason::TIMEOUT.to_owned()));
}

#[tokio::test(start_paused = true)]
async fn cancel_is_immediate_when_queued_and_two_phase_when_running() {
    let mut h = Harness::new(make_config());
    let queued = h.submit(make_spec("shell")).id;
    let task = h.call(|reply| Command::Cancel { id: queued, reason: String::new(), reply }).expect("cancel");
    assert_eq!(task.state, TaskState::Cancelled);

    let mut agent = h.connect("a", &["shell"], &[], 2);
    let polite = h.submit(make_spec("shell")).id;
    let stubborn = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments().len(), 2);
    for id in [polite, stubborn] {
        h.report(&agent, AgentReport::Accept(id, 1));
        let task = h.call(|reply| Command::Cancel { id, reason: "no longer needed".into(), reply }).expect("cancel");
        assert!(task.cancel_requested && task.state == TaskState::Running);
    }
    let cancels = agent.messages().into_iter().filter(|m| matches!(m, ToAgent::Cancel { .. })).count();
    assert_eq!(cancels, 2, "the handlers are told");
    h.report(&agent, AgentReport::Fail(polite, 1, Failure::new("cancelled", "stopped", false)));
    assert_eq!(h.task(polite).state, TaskState::Cancelled);
    assert_eq!(h.task(stubborn).state, TaskState::Running);
    h.advance(Duration::from_secs(6)).await;
    let task = h.task(stubborn);
    assert_eq!(task.state, TaskState::Cancelled, "recorded after the grace period regardless");
    assert_eq!(task.failure.map(|f| f.message), Some("no longer needed".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn not_before_holds_a_task_pending_until_its_time() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let mut spec = make_spec("shell");
    spec.not_before = Some(h.core.clock().ms(Instant::now()) + 60_000);
    let id = h.submit(spec).id;
    assert_eq!(h.task(id).state, TaskState::Pending);
    h.pass(&[&agent], Duration::from_secs(59)).await;
    assert!(agent.assignments().is_empty());
    h.pass(&[&agent], Duration::from_secs(2)).await;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_returns_the_existing_task() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("shell");
    spec.idempotency_key = Some("order-42".into());
    let created = h.submit_many(vec![spec.clone(), spec.clone()]).expect("submit");
    assert_eq!(created[0].0.id, created[1].0.id);
    assert_eq!((created[0].1, created[1].1), (false, true));
    let again = h.submit_many(vec![spec]).expect("submit");
    assert_eq!(again[0].0.id, created[0].0.id);
    assert!(again[0].1);
    assert_eq!(h.core.unfinished(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_output_over_the_limit_fails_the_attempt_for_good() {
    let mut config = make_config();
    config.limits.max_output_bytes = 4;
    let mut h = Harness::new(config);
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"too long"), String::new()));
    assert!(agent.messages().iter().any(|m| matches!(m, ToAgent::Rejected { error: Error::ResourceExhausted(_), .. })));
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert!(
        task.failure.is_some_and(|f| f.reason == reason::OUTPUT_TOO_LARGE && f.message.contains("max_output_bytes"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_queue_timeout_fails_a_task_nobody_picked_up() {
    let mut h = Harness::new(make_config());
    let mut spec = make_spec("nobody");
    spec.queue_timeout = Some(Duration::from_secs(5));
    let id = h.submit(spec).id;
    h.advance(Duration::from_secs(6)).await;
    let task = h.task(id);
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.failure.map(|f| f.reason), Some(reason::QUEUE_TIMEOUT.to_owned()));
}

#[tokio::test(start_paused = true)]
async fn draining_stops_new_assignments_and_resuming_restarts_them() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 2);
    let first = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(first, 1)]);
    let id = agent.id;
    let info = h.call(|reply| Command::SetDraining { id, draining: true, reply }).expect("drain");
    assert_eq!(info.state, AgentState::Draining);
    let second = h.submit(make_spec("shell")).id;
    assert!(agent.assignments().is_empty(), "a draining agent gets no new work");
    h.run(&agent, first, 1);
    assert_eq!(h.task(first).state, TaskState::Succeeded, "running work finishes");
    h.call(|reply| Command::SetDraining { id, draining: false, reply }).expect("resume");
    assert_eq!(agent.assignments(), vec![(second, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_restart_rebuilds_queues_and_gives_running_attempts_the_lease_to_resume() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let running = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(running, 1)]);
    h.report(&agent, AgentReport::Accept(running, 1));
    let queued = h.submit(make_spec("shell")).id;
    let last = h.store.last_sequence().expect("sequence");

    h.restart();
    let seen = h.events.len();
    assert_eq!(h.task(running).state, TaskState::Running);
    let mut back = h.connect_with("a", &["shell"], &[], 1, Some(agent.token.clone()), vec![(running, 1)]);
    assert_eq!(back.id, agent.id, "the session survives the restart");
    assert!(back.assignments().is_empty(), "its one slot is still busy");
    h.run(&back, running, 1);
    assert_eq!(back.assignments(), vec![(queued, 1)]);
    assert!(h.events[seen..].iter().all(|e| e.sequence > last), "sequence numbers keep increasing across a restart");

    // Without a resume, the attempt is lost after the lease.
    h.restart();
    h.advance(Duration::from_secs(11)).await;
    let task = h.task(queued);
    assert_eq!(task.attempts[0].failure.as_ref().map(|f| f.reason.as_str()), Some(reason::AGENT_LOST));
    drop(h.dir);
}

#[tokio::test(start_paused = true)]
async fn too_many_unfinished_tasks_are_refused_whole() {
    let mut config = make_config();
    config.limits.max_unfinished_tasks = 2;
    let mut h = Harness::new(config);
    h.submit(make_spec("shell"));
    let result = h.submit_many(vec![make_spec("shell"), make_spec("shell")]);
    assert!(matches!(result, Err(Error::ResourceExhausted(ref m)) if m.contains("max_unfinished_tasks")));
    assert_eq!(h.core.unfinished(), 1, "nothing was half-written");
}

#[tokio::test(start_paused = true)]
async fn turns_committed_as_one_group_are_seen_only_once_durable_and_publish_every_event_in_order() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    // Three turns (submit, dispatch, accept and complete), as the driver
    // would hand them over while the writer was busy.
    let (reply, mut submitted) = oneshot::channel();
    let submissions = vec![Submission { spec: make_spec("shell"), depends_on: Vec::new() }];
    h.core.handle(Command::Submit { submissions, reply }, Instant::now());
    let mut batch = vec![h.core.take_outbox()];
    h.core.dispatch(Instant::now());
    batch.push(h.core.take_outbox());
    assert!(agent.messages().is_empty(), "nothing reaches the agent before its batch is durable");
    let before = h.events.len();
    h.commit(batch);
    let created = submitted.try_recv().expect("the reply after the commit").expect("submit");
    let id = created.tasks[0].0.id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    for report in
        [AgentReport::Accept(id, 1), AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"ok"), String::new())]
    {
        h.core.handle(Command::Report { agent: agent.id, conn: agent.conn, report }, Instant::now());
    }
    let out = h.core.take_outbox();
    let task_writes = out.writes.iter().filter(|w| matches!(w, crate::store::Write::Task(_))).count();
    assert_eq!(task_writes, 2, "the accept and the result each wrote the task");
    h.commit(vec![out]);
    let task = h.task(id);
    assert_eq!((task.state, task.output.as_ref()), (TaskState::Succeeded, &b"ok"[..]));
    let states: Vec<TaskState> = h.events[before..].iter().map(|e| e.state).collect();
    let expected = [TaskState::Queued, TaskState::Assigned, TaskState::Running, TaskState::Succeeded];
    assert_eq!(states, expected);
    let sequences: Vec<u64> = h.events.iter().map(|e| e.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[1] == w[0] + 1), "published in sequence, none missing");
    let stored: Vec<u64> =
        h.store.events_after(sequences[before] - 1, 100).expect("events").iter().map(|e| e.sequence).collect();
    assert_eq!(stored, sequences[before..], "the store holds exactly what was published");
}
