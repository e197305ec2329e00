//! The attempt rules with explicit instants: cancel causes, the progress
//! and log throttles, results kept until acknowledged.

use super::*;
use crate::types::LogStream;

const MS: Duration = Duration::from_millis(1);

fn make_attempts() -> (Attempts, mpsc::Receiver<AttemptKey>) {
    let (log_tx, log_rx) = mpsc::channel(16);
    let metrics = AgentMetrics::new(prometheus::Registry::new()).unwrap_or_else(|e| panic!("{e}"));
    (Attempts::new(log_tx, metrics), log_rx)
}

fn make_running() -> (RunningAttempt, LogSink) {
    let (log_tx, _log_rx) = mpsc::channel(4);
    let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
    let logs = LogSink::new(("t1".to_owned(), 1), log_tx, dropped);
    (RunningAttempt::new(CancellationToken::new(), String::new(), logs.clone(), Instant::now()), logs)
}

fn assignment(task_id: &str) -> proto::Assignment {
    proto::Assignment {
        attempt: Some(proto::AttemptRef::new(task_id, 1)),
        capability: "echo".to_owned(),
        ..proto::Assignment::default()
    }
}

fn key(task_id: &str) -> AttemptKey {
    (task_id.to_owned(), 1)
}

fn report(task_id: &str, percent: u32) -> ProgressReport {
    ProgressReport { task_id: task_id.to_owned(), attempt: 1, percent, message: format!("at {percent}") }
}

/// Starts `task_id` while connected and returns its log sink and token.
fn start(attempts: &mut Attempts, task_id: &str, now: Instant) -> (LogSink, CancellationToken) {
    let mut out = Outbox::new(true);
    attempts.assign(assignment(task_id), true, &mut out, now);
    let mut actions = out.into_actions().into_iter();
    assert!(matches!(actions.next(), Some(Action::Send(Msg::Accept(_)))));
    match actions.next() {
        Some(Action::Start(start)) => (start.logs, start.token),
        other => panic!("expected a start, got {other:?}"),
    }
}

/// The messages of `out`, in order.
fn sent(out: Outbox) -> Vec<Msg> {
    out.into_actions()
        .into_iter()
        .map(|action| match action {
            Action::Send(msg) => msg,
            other => panic!("expected only sends, got {other:?}"),
        })
        .collect()
}

fn percents(messages: &[Msg]) -> Vec<u32> {
    messages
        .iter()
        .filter_map(|msg| match msg {
            Msg::Progress(progress) => Some(progress.percent),
            _ => None,
        })
        .collect()
}

fn log_texts(messages: &[Msg]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|msg| match msg {
            Msg::Log(log) => Some(log.lines.iter().map(|line| line.text.clone())),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn stronger_cancel_causes_win() {
    let (mut running, _logs) = make_running();
    running.cancel(CancelCause::Server);
    running.cancel(CancelCause::Shutdown);
    assert_eq!(running.cause, Some(CancelCause::Server));
    running.cancel(CancelCause::Discard);
    assert!(running.is_discarded());
    assert!(running.token.is_cancelled());
}

#[test]
fn discarding_an_attempt_drops_its_log_lines_and_later_ones() {
    let (mut running, logs) = make_running();
    logs.push(LogStream::Log, vec!["before".to_owned()]);
    running.cancel(CancelCause::Server);
    assert!(logs.has_pending(), "a cancelled attempt still sends its lines");
    running.cancel(CancelCause::Discard);
    assert!(!logs.has_pending());
    logs.push(LogStream::Log, vec!["after".to_owned()]);
    assert!(!logs.has_pending());
}

#[test]
fn log_lines_are_due_once_per_interval() {
    let (mut running, _logs) = make_running();
    let now = Instant::now();
    assert!(running.logs_due(now));
    running.logs_sent_at = Some(now);
    assert!(!running.logs_due(now + LOG_INTERVAL / 2));
    assert!(running.logs_due(now + LOG_INTERVAL));
}

#[test]
fn progress_is_sent_at_most_once_per_interval_and_the_latest_wins() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    start(&mut attempts, "t1", t0);
    let mut out = Outbox::new(true);
    attempts.progress(report("t1", 1), &mut out, t0);
    attempts.progress(report("t1", 2), &mut out, t0 + 10 * MS);
    attempts.progress(report("t1", 3), &mut out, t0 + 20 * MS);
    assert_eq!(percents(&sent(out)), [1]);
    assert_eq!(attempts.next_wakeup(), Some(t0 + PROGRESS_INTERVAL));

    let mut out = Outbox::new(true);
    attempts.flush(&mut out, t0 + PROGRESS_INTERVAL - MS);
    assert!(sent(out).is_empty(), "not due yet");
    let mut out = Outbox::new(true);
    attempts.flush(&mut out, t0 + PROGRESS_INTERVAL);
    assert_eq!(percents(&sent(out)), [3]);
    assert_eq!(attempts.next_wakeup(), None);
}

#[test]
fn held_progress_goes_out_before_the_result_and_none_while_disconnected() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    start(&mut attempts, "t1", t0);
    let mut offline = Outbox::new(false);
    attempts.progress(report("t1", 5), &mut offline, t0);
    assert!(sent(offline).is_empty(), "dropped while disconnected");
    let mut out = Outbox::new(true);
    attempts.progress(report("t1", 10), &mut out, t0);
    attempts.progress(report("t1", 90), &mut out, t0 + MS);
    attempts.handler_ended(&key("t1"), HandlerOutcome::Returned(Ok(Output::empty())), &mut out, t0 + 2 * MS);
    let messages = sent(out);
    assert_eq!(percents(&messages), [10, 90]);
    assert!(matches!(messages.last(), Some(Msg::Complete(_))));
}

#[test]
fn log_lines_are_batched_per_interval_and_all_precede_the_result() {
    let t0 = Instant::now();
    let (mut attempts, mut log_rx) = make_attempts();
    let (logs, _token) = start(&mut attempts, "t1", t0);
    logs.push(LogStream::Log, vec!["one".to_owned()]);
    assert_eq!(log_rx.try_recv().ok(), Some(key("t1")));
    let mut out = Outbox::new(true);
    attempts.logs_ready(&key("t1"), &mut out, t0);
    assert_eq!(log_texts(&sent(out)), ["one"]);

    // Lines within the interval wait for the flush at its end.
    logs.push(LogStream::Log, vec!["two".to_owned()]);
    logs.push(LogStream::Log, vec!["three".to_owned()]);
    let mut out = Outbox::new(true);
    attempts.logs_ready(&key("t1"), &mut out, t0 + 40 * MS);
    assert!(sent(out).is_empty());
    assert_eq!(attempts.next_wakeup(), Some(t0 + LOG_INTERVAL));
    let mut out = Outbox::new(true);
    attempts.flush(&mut out, t0 + LOG_INTERVAL);
    assert_eq!(log_texts(&sent(out)), ["two", "three"]);
    assert_eq!(attempts.next_wakeup(), None, "nothing left to wake up for");

    // At the end of the attempt the throttle does not apply.
    logs.push(LogStream::Stderr, vec!["last".to_owned()]);
    let mut out = Outbox::new(true);
    attempts.handler_ended(&key("t1"), HandlerOutcome::Returned(Ok(Output::empty())), &mut out, t0 + LOG_INTERVAL);
    let messages = sent(out);
    assert_eq!(log_texts(&messages), ["last"]);
    assert!(matches!(messages.last(), Some(Msg::Complete(_))));
    logs.push(LogStream::Log, vec!["after the result".to_owned()]);
    assert!(!logs.has_pending(), "lines after the result are ignored");
}

#[test]
fn a_result_recorded_while_disconnected_is_sent_with_its_lines_after_registering() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    let (logs, _token) = start(&mut attempts, "t1", t0);
    logs.push(LogStream::Log, vec!["last words".to_owned()]);
    let mut offline = Outbox::new(false);
    attempts.handler_ended(&key("t1"), HandlerOutcome::Returned(Ok(Output::from("done"))), &mut offline, t0);
    assert!(sent(offline).is_empty());
    assert_eq!(attempts.held(), [proto::AttemptRef::new("t1", 1)]);

    let mut out = Outbox::new(true);
    attempts.resend(&mut out, t0 + MS);
    let messages = sent(out);
    assert_eq!(log_texts(&messages), ["last words"]);
    assert!(matches!(messages.last(), Some(Msg::Complete(_))));
    // Resent until acknowledged, the lines only once.
    let mut out = Outbox::new(true);
    attempts.resend(&mut out, t0 + 2 * MS);
    let messages = sent(out);
    assert!(matches!(messages.as_slice(), [Msg::Complete(_)]), "{messages:?}");
    attempts.ack(&key("t1"));
    assert!(attempts.held().is_empty());
}

#[test]
fn lines_logged_while_disconnected_wait_for_the_registration() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    let (logs, _token) = start(&mut attempts, "t1", t0);
    logs.push(LogStream::Log, vec!["away".to_owned()]);
    let mut offline = Outbox::new(false);
    attempts.logs_ready(&key("t1"), &mut offline, t0);
    attempts.flush(&mut offline, t0 + LOG_INTERVAL);
    assert!(sent(offline).is_empty());
    assert!(logs.has_pending());
    let mut out = Outbox::new(true);
    attempts.resend(&mut out, t0 + LOG_INTERVAL);
    assert_eq!(log_texts(&sent(out)), ["away"]);
}

#[test]
fn progress_held_back_before_a_discard_is_never_sent() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    start(&mut attempts, "t1", t0);
    let mut out = Outbox::new(true);
    attempts.progress(report("t1", 1), &mut out, t0);
    attempts.progress(report("t1", 2), &mut out, t0 + 10 * MS);
    assert_eq!(percents(&sent(out)), [1], "the second is held back");
    attempts.discard(&key("t1"));
    let mut out = Outbox::new(true);
    attempts.flush(&mut out, t0 + PROGRESS_INTERVAL);
    assert!(sent(out).is_empty(), "the attempt is someone else's now");
}

#[test]
fn a_discarded_attempt_sends_nothing_and_is_not_held() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    let (logs, token) = start(&mut attempts, "t1", t0);
    logs.push(LogStream::Log, vec!["for nobody".to_owned()]);
    attempts.discard(&key("t1"));
    assert!(token.is_cancelled());
    assert!(attempts.held().is_empty());
    assert_eq!(attempts.running_count(), 1, "still waited for");
    let mut out = Outbox::new(true);
    attempts.progress(report("t1", 50), &mut out, t0);
    attempts.logs_ready(&key("t1"), &mut out, t0);
    attempts.handler_ended(&key("t1"), HandlerOutcome::Returned(Ok(Output::empty())), &mut out, t0);
    assert!(sent(out).is_empty());
    assert_eq!((attempts.running_count(), attempts.unacked_count()), (0, 0));
}

#[test]
fn duplicate_assignments_are_accepted_again_and_unknown_capabilities_fail() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    start(&mut attempts, "t1", t0);
    let mut out = Outbox::new(true);
    attempts.assign(assignment("t1"), true, &mut out, t0);
    assert!(matches!(sent(out).as_slice(), [Msg::Accept(_)]));

    let mut out = Outbox::new(true);
    attempts.assign(assignment("t2"), false, &mut out, t0);
    let messages = sent(out);
    match messages.as_slice() {
        [Msg::Accept(_), Msg::Fail(fail)] => {
            let failure = fail.failure.clone().unwrap_or_default();
            assert_eq!((failure.reason.as_str(), failure.retryable), ("no_handler", true));
        }
        other => panic!("expected accept and fail, got {other:?}"),
    }
    // Assigned again before the ack: the result is resent.
    let mut out = Outbox::new(true);
    attempts.assign(assignment("t2"), false, &mut out, t0);
    assert!(matches!(sent(out).as_slice(), [Msg::Accept(_), Msg::Fail(_)]));
}

#[test]
fn the_cancel_cause_decides_what_the_handlers_error_becomes() {
    let t0 = Instant::now();
    let cases = [
        (Some(CancelCause::Server), "cancelled", false),
        (Some(CancelCause::Shutdown), "agent_shutdown", true),
        (None, "handler_error", true),
    ];
    for (cause, reason, retryable) in cases {
        let (mut attempts, _log_rx) = make_attempts();
        start(&mut attempts, "t1", t0);
        if let Some(cause) = cause {
            attempts.cancel(&key("t1"), cause);
        }
        let mut out = Outbox::new(true);
        let outcome = HandlerOutcome::Returned(Err(TaskError::retryable("stopped")));
        attempts.handler_ended(&key("t1"), outcome, &mut out, t0);
        match sent(out).as_slice() {
            [Msg::Fail(fail)] => {
                let failure = fail.failure.clone().unwrap_or_default();
                assert_eq!((failure.reason.as_str(), failure.retryable), (reason, retryable), "{cause:?}");
            }
            other => panic!("expected a fail, got {other:?}"),
        }
    }
}

#[test]
fn panics_fail_retryably_and_aborted_handlers_report_nothing() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    start(&mut attempts, "t1", t0);
    start(&mut attempts, "t2", t0);
    let mut out = Outbox::new(true);
    attempts.handler_ended(&key("t1"), HandlerOutcome::Panicked("boom".to_owned()), &mut out, t0);
    attempts.handler_ended(&key("t2"), HandlerOutcome::Aborted, &mut out, t0);
    match sent(out).as_slice() {
        [Msg::Fail(fail)] => {
            let failure = fail.failure.clone().unwrap_or_default();
            assert_eq!(failure.reason, "handler_panic");
            assert!(failure.retryable && failure.message.contains("boom"), "{failure:?}");
        }
        other => panic!("expected one fail, got {other:?}"),
    }
}

#[test]
fn fencing_drops_everything_held() {
    let t0 = Instant::now();
    let (mut attempts, _log_rx) = make_attempts();
    assert_eq!(attempts.fence(), None, "nothing held, nothing to fence");
    let (_logs, token) = start(&mut attempts, "t1", t0);
    let mut out = Outbox::new(true);
    attempts.assign(assignment("t2"), false, &mut out, t0);
    assert_eq!(attempts.fence(), Some((1, 1)));
    assert!(token.is_cancelled());
    assert!(attempts.held().is_empty());
    assert_eq!(attempts.fence(), None, "only once");
}
