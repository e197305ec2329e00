//! What a chatty agent or a heavy submitter can cost the server: progress
//! is coalesced before it reaches the store, and payloads held in memory
//! have a budget.

use std::time::Duration;

use super::*;

fn progress_events(h: &Harness, id: TaskId) -> Vec<TaskEvent> {
    h.events.iter().filter(|e| e.task_id == id && e.kind == EventKind::Progress).cloned().collect()
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_progress_is_recorded_at_most_once_a_second_and_the_latest_wins() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("chatty", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    // 5,000 reports within one millisecond-stepped second.
    for i in 0..5_000u32 {
        h.report(&agent, AgentReport::Progress(id, 1, i / 50, format!("step {i}")));
        if i % 10 == 9 {
            h.advance(Duration::from_micros(2_000)).await;
        }
    }
    let recorded = progress_events(&h, id);
    assert!(recorded.len() <= 12, "{} progress events for 5,000 reports over ~1s", recorded.len());
    assert_eq!(recorded[0].message, "step 0", "the first report is recorded at once");
    // The held-back latest report is recorded when its interval has passed.
    h.advance(Duration::from_secs(1)).await;
    let recorded = progress_events(&h, id);
    let last = recorded.last().expect("progress recorded");
    assert_eq!(last.message, "step 4999");
    assert_eq!(last.progress.as_ref().map(|p| p.percent), Some(99));
    assert_eq!(h.task(id).progress.map(|p| p.message).as_deref(), Some("step 4999"));
    let sequences: Vec<u64> = recorded.iter().map(|e| e.sequence).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    let times: Vec<Millis> = recorded.iter().map(|e| e.at).collect();
    assert!(times.windows(2).all(|w| w[1] >= w[0] + 1_000), "recorded at most once a second: {times:?}");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_reporting_for_hours_holds_a_bounded_number_of_timers() {
    let mut h = Harness::new(ServerConfig { lease_ttl: Duration::from_secs(3600), ..make_config() });
    let mut agent = h.connect("steady", &["shell"], &[], 1);
    let id = h.submit(TaskSpec { timeout: Duration::from_secs(86_400), ..make_spec("shell") }).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    for i in 0..2_000u32 {
        // Twice a second: every other report is held back, then recorded.
        h.report(&agent, AgentReport::Progress(id, 1, i % 100, format!("tick {i}")));
        h.advance(Duration::from_millis(500)).await;
    }
    assert!(h.core.armed_timers(id) <= 3, "{} timers armed", h.core.armed_timers(id));
    let recorded = progress_events(&h, id);
    assert!((990..=1_001).contains(&recorded.len()), "{} progress events in 1,000 s", recorded.len());
}

#[tokio::test(start_paused = true)]
async fn progress_held_back_is_recorded_before_the_attempt_ends() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.report(&agent, AgentReport::Progress(id, 1, 10, "started".into()));
    h.report(&agent, AgentReport::Progress(id, 1, 100, "done".into()));
    h.report(&agent, AgentReport::Complete(id, 1, bytes::Bytes::from_static(b"ok"), String::new()));
    let messages: Vec<String> = progress_events(&h, id).into_iter().map(|e| e.message).collect();
    assert_eq!(messages, vec!["started", "done"]);
    let of_task: Vec<&TaskEvent> = h.events.iter().filter(|e| e.task_id == id).collect();
    let [.., last_progress, end] = of_task.as_slice() else { panic!("too few events") };
    assert_eq!((last_progress.kind, last_progress.message.as_str()), (EventKind::Progress, "done"));
    assert_eq!((end.kind, end.state), (EventKind::State, TaskState::Succeeded), "the held-back progress comes first");
    assert_eq!(h.task(id).progress.map(|p| p.percent), Some(100));
    // No timer of the ended attempt fires later.
    let before = h.events.len();
    h.advance(Duration::from_secs(5)).await;
    assert_eq!(h.events.len(), before);
}

#[tokio::test(start_paused = true)]
async fn payloads_past_the_memory_budget_are_refused_whole_until_tasks_finish() {
    let mut config = make_config();
    config.limits.max_unfinished_payload_bytes = 10_000;
    let mut h = Harness::new(config);
    let heavy = |n: usize| TaskSpec { payload: bytes::Bytes::from(vec![b'x'; n]), ..make_spec("shell") };
    let first = h.submit_many(vec![heavy(4_000), heavy(4_000)]).expect("8,000 bytes fit");
    let refused = h.submit_many(vec![heavy(1_000), heavy(1_001)]);
    match refused {
        Err(Error::ResourceExhausted(message)) => {
            assert!(message.contains("max_unfinished_payload_bytes (10000)"), "{message}");
            assert!(message.contains("8000 payload bytes"), "{message}");
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    assert_eq!(h.core.unfinished(), 2, "nothing of the refused submit was created");
    h.submit_many(vec![heavy(2_000)]).expect("exactly at the budget");

    // A finished task gives its bytes back; a retry takes them again.
    let mut agent = h.connect("a", &["shell"], &[], 3);
    let assigned = agent.assignments();
    assert_eq!(assigned.len(), 3);
    let (done, _) = assigned.iter().copied().find(|(id, _)| *id == first[0].0.id).expect("assigned");
    h.report(&agent, AgentReport::Fail(done, 1, Failure::new("boom", "failed for good", false)));
    h.submit_many(vec![heavy(4_000)]).expect("the failed task's bytes are free again");
    let retried = h.call(|reply| Command::Retry { id: done, reply });
    assert!(matches!(retried, Err(Error::ResourceExhausted(ref m)) if m.contains("max_unfinished_payload_bytes")));
}

#[tokio::test(start_paused = true)]
async fn a_report_arriving_as_held_back_progress_falls_due_is_recorded_once() {
    let mut h = Harness::new(make_config());
    let mut agent = h.connect("a", &["shell"], &[], 1);
    let id = h.submit(make_spec("shell")).id;
    assert_eq!(agent.assignments(), vec![(id, 1)]);
    h.report(&agent, AgentReport::Accept(id, 1));
    h.report(&agent, AgentReport::Progress(id, 1, 10, "first".into()));
    h.advance(Duration::from_millis(500)).await;
    h.report(&agent, AgentReport::Progress(id, 1, 20, "held back".into()));
    // The interval ends, and a report comes in before the scheduler's
    // timers run (commands go first in a turn).
    tokio::time::advance(Duration::from_millis(500)).await;
    h.report(&agent, AgentReport::Progress(id, 1, 30, "on time".into()));
    h.advance(Duration::from_secs(5)).await;
    let messages: Vec<String> = progress_events(&h, id).into_iter().map(|e| e.message).collect();
    assert_eq!(messages, vec!["first", "on time"]);
}
