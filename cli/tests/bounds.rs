//! Time bounds over real gRPC: every client-supplied duration and timestamp
//! at its extremes is refused with INVALID_ARGUMENT naming the field and
//! the limit, and the scheduler keeps dispatching afterwards. Before these
//! bounds, one `queue_timeout` of 2^63−1 seconds panicked the scheduler.
//! Also: a `muster serve` whose store fails underneath it exits non-zero.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures::StreamExt;
use muster_sdk::{Error, NewTask, Output, TaskState, proto};
use prost_types::{Duration as PbDuration, Timestamp};
use tonic::Code;

const DAY: i64 = 24 * 3600;

fn secs(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos })
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn make_spec(change: impl FnOnce(&mut proto::TaskSpec)) -> proto::TaskSpec {
    let mut spec = NewTask::new("echo").build();
    change(&mut spec);
    spec
}

fn make_retry(change: impl FnOnce(&mut proto::RetryPolicy)) -> Option<proto::RetryPolicy> {
    let mut policy = proto::RetryPolicy { max_attempts: 2, ..Default::default() };
    change(&mut policy);
    Some(policy)
}

fn status_of<T: std::fmt::Debug>(result: Result<T, Error>) -> tonic::Status {
    match result {
        Err(Error::Status(status)) => status,
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// Every duration and timestamp of a task spec, each at an extreme, with
/// the message the server must answer.
fn extreme_specs() -> Vec<(&'static str, proto::TaskSpec, &'static str)> {
    let over_limit = "must be at most";
    vec![
        (
            "queue_timeout of 2^63-1 seconds",
            make_spec(|s| s.queue_timeout = secs(i64::MAX)),
            "tasks[0].queue_timeout: must be at most 30d (max_queue_timeout)",
        ),
        ("queue_timeout just over 30 days", make_spec(|s| s.queue_timeout = secs(30 * DAY + 1)), "max_queue_timeout"),
        (
            "negative queue_timeout",
            make_spec(|s| s.queue_timeout = secs(-1)),
            "tasks[0].queue_timeout: must be a non-negative duration",
        ),
        (
            "queue_timeout with negative nanos",
            make_spec(|s| s.queue_timeout = Some(PbDuration { seconds: 0, nanos: -1 })),
            "tasks[0].queue_timeout: must be a non-negative duration",
        ),
        (
            "queue_timeout with nanos out of range",
            make_spec(|s| s.queue_timeout = Some(PbDuration { seconds: 1, nanos: i32::MAX })),
            "tasks[0].queue_timeout: must be a non-negative duration",
        ),
        (
            "timeout of 2^63-1 seconds",
            make_spec(|s| s.timeout = secs(i64::MAX)),
            "tasks[0].timeout: must be at most 7d (max_timeout)",
        ),
        ("timeout just over 7 days", make_spec(|s| s.timeout = secs(7 * DAY + 1)), "max_timeout"),
        (
            "negative timeout",
            make_spec(|s| s.timeout = secs(i64::MIN)),
            "tasks[0].timeout: must be a non-negative duration",
        ),
        (
            "initial backoff of 2^63-1 seconds",
            make_spec(|s| s.retry = make_retry(|r| r.initial_backoff = secs(i64::MAX))),
            "tasks[0].retry.initial_backoff: must be at most 1d (max_retry_backoff)",
        ),
        (
            "max backoff of 2^63-1 seconds",
            make_spec(|s| s.retry = make_retry(|r| r.max_backoff = secs(i64::MAX))),
            "tasks[0].retry.max_backoff: must be at most 1d (max_retry_backoff)",
        ),
        (
            "negative backoff",
            make_spec(|s| s.retry = make_retry(|r| r.initial_backoff = secs(-5))),
            "tasks[0].retry.initial_backoff: must be a non-negative duration",
        ),
        (
            "NaN multiplier",
            make_spec(|s| s.retry = make_retry(|r| r.multiplier = f64::NAN)),
            "tasks[0].retry.multiplier: must be between 1 and 100",
        ),
        (
            "infinite multiplier",
            make_spec(|s| s.retry = make_retry(|r| r.multiplier = f64::INFINITY)),
            "retry.multiplier",
        ),
        ("multiplier over 100", make_spec(|s| s.retry = make_retry(|r| r.multiplier = 100.5)), "retry.multiplier"),
        ("negative multiplier", make_spec(|s| s.retry = make_retry(|r| r.multiplier = -2.0)), "retry.multiplier"),
        (
            "not_before at 2^63-1 seconds",
            make_spec(|s| s.not_before = at(i64::MAX, 999_999_999)),
            "tasks[0].not_before: must be at most 365d from now (max_not_before_ahead)",
        ),
        ("not_before two years ahead", make_spec(|s| s.not_before = at(now_secs() + 2 * 365 * DAY, 0)), over_limit),
        (
            "not_before before 1970",
            make_spec(|s| s.not_before = at(i64::MIN, 0)),
            "tasks[0].not_before: must be a timestamp after 1970",
        ),
        (
            "not_before with nanos out of range",
            make_spec(|s| s.not_before = at(now_secs(), -1)),
            "tasks[0].not_before: must be a timestamp after 1970",
        ),
    ]
}

#[tokio::test]
async fn extreme_durations_and_timestamps_are_refused_and_the_server_keeps_dispatching() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    for (what, spec, needle) in extreme_specs() {
        let status = status_of(client.submit(spec).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {:?} should contain {needle:?}", status.message());
    }
    // The same bounds hold for every task of a workflow.
    let parent = NewTask::new("echo").key("parent").build();
    let child = make_spec(|s| {
        s.key = "child".into();
        s.depends_on = vec!["parent".into()];
        s.queue_timeout = secs(i64::MAX);
    });
    let status = status_of(client.submit_many(vec![parent, child]).await);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("tasks[1].queue_timeout: must be at most"), "{}", status.message());

    // Values exactly at their limits are accepted, and an agent runs them.
    let (stop, agent) = spawn_agent(&server.endpoint, "worker", "echo", &[], 2, |ctx| async move {
        Ok(Output::from(ctx.payload().to_vec()))
    });
    let at_limits = make_spec(|s| {
        s.payload = b"still dispatching".to_vec();
        s.queue_timeout = secs(30 * DAY);
        s.timeout = secs(7 * DAY);
        s.retry = make_retry(|r| {
            r.initial_backoff = secs(DAY);
            r.max_backoff = secs(DAY);
            r.multiplier = 100.0;
        });
    });
    let task = client.submit(at_limits).await?;
    let done = tokio::time::timeout(Duration::from_secs(20), client.wait(&task.id)).await??;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, b"still dispatching");
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn a_not_before_at_its_limit_waits_and_a_later_one_is_refused() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let ready_at = now_secs() + 364 * DAY;
    let task = client.submit(make_spec(|s| s.not_before = at(ready_at, 0))).await?;
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(task.ready_at, Some(UNIX_EPOCH + Duration::from_secs(ready_at as u64)));
    let too_late = make_spec(|s| s.not_before = at(now_secs() + 366 * DAY, 0));
    let status = status_of(client.submit(too_late).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_not_before_ahead"), "{}", status.message());
    Ok(())
}

#[tokio::test]
async fn queue_weights_and_token_lifetimes_are_bounded() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let status = status_of(client.configure_queue("default", u32::MAX, 0).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("weight: must be at most 10000"), "{}", status.message());
    let queue = client.configure_queue("default", 10_000, 0).await?;
    assert_eq!(queue.weight, 10_000);
    let request = proto::CreateTokenRequest {
        name: "forever".into(),
        role: proto::Role::Viewer as i32,
        expires_in_seconds: u64::MAX,
        ..Default::default()
    };
    let status = status_of(client.create_token(request).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("expires_in_seconds"), "{}", status.message());
    Ok(())
}

#[tokio::test]
async fn an_agent_log_line_timestamped_past_year_9999_gets_the_time_it_arrived() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (tx, response) = open_session(&server.endpoint, register("clock-skewed", 1)).await;
    let mut inbound = response?;
    let task = client.submit(NewTask::new("raw").build()).await?;
    let attempt = loop {
        let message = inbound.message().await?.ok_or("the session ended")?;
        if let Some(proto::server_message::Msg::Assign(assign)) = message.msg {
            break assign.attempt.ok_or("an assignment names its attempt")?;
        }
    };
    let before = now_secs();
    let line = |seconds, text: &str| proto::LogLine {
        time: at(seconds, 0),
        stream: proto::LogStream::Stdout as i32,
        text: text.into(),
    };
    let lines = vec![line(i64::MAX, "far future"), line(i64::MIN, "before time")];
    let log = proto::LogLines { attempt: Some(attempt.clone()), lines, dropped: 0 };
    tx.send(proto::AgentMessage { msg: Some(proto::agent_message::Msg::Log(log)) }).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let logs = loop {
        let mut stream = client.logs(&task.id, 0, false).await?;
        let mut logs = Vec::new();
        while let Some(chunk) = stream.next().await {
            logs.extend(chunk?.lines);
        }
        if logs.len() == 2 {
            break logs;
        }
        assert!(tokio::time::Instant::now() < deadline, "the lines never became readable: {logs:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    for line in &logs {
        let seconds = line.time.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs() as i64);
        assert!((before - 5..=now_secs() + 5).contains(&seconds), "{line:?} should carry its arrival time");
    }
    Ok(())
}

/// A real store failure under a real `muster serve`: the process runs with
/// a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, as a shell sets them
/// with `ulimit -f` and `trap '' XFSZ`), so once its data files reach the
/// limit sled's writes fail with EFBIG, exactly as on a full disk. Nothing
/// in the server knows about the test: the store writer treats the failed
/// write as fatal, the scheduler stops, and the process must exit 1 rather
/// than linger answering UNAVAILABLE.
#[tokio::test]
async fn muster_serve_exits_non_zero_when_its_store_fails_underneath_the_scheduler() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 4096 blocks: 2 MiB (dash counts 512 bytes) or 4 MiB (bash, 1 KiB).
    let script = r#"trap '' XFSZ; ulimit -f 4096 && exec "$0" "$@""#;
    let mut child = Command::new("sh")
        .args(["-c", script, muster_bin(), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let process_pid = child.id();
    let mut stderr = child.stderr.take().ok_or("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
    let addr = line.split_whitespace().skip_while(|w| *w != "on").nth(1).ok_or("no address printed")?;
    let mut process = Process { child };
    let client = muster_sdk::Client::connect(format!("http://{addr}")).await?;

    let payload = vec![b'x'; 512 * 1024];
    let mut refused = None;
    for _ in 0..64 {
        match client.submit(NewTask::new("nobody").payload(payload.clone()).build()).await {
            Ok(_) => continue,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.ok_or("the store never filled up")?;
    assert!(matches!(&refused, Error::Status(s) if s.code() == Code::Unavailable), "{refused:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = process.child.try_wait()? {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "muster serve (pid {process_pid}) kept running after the failure"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(1), "{exit:?}");
    let stderr = stderr.join().map_err(|_| "stderr reader")?;
    assert!(stderr.contains("ERROR") && stderr.contains("store write failed"), "{stderr}");
    assert!(stderr.contains("error: fatal: store write failed"), "{stderr}");
    Ok(())
}
