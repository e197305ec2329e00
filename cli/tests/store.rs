//! `muster store` against a real `muster serve`: verify of its data
//! directory (sound after a graceful stop, refused while the server runs or
//! where there is no store, non-zero with the problem named once a record is
//! made inconsistent) and of the running server; retention; a backup taken
//! under load and restored; damaged backups refused.

mod common;

use std::path::Path;
use std::process::{Command, Output as ProcessOutput};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use muster_sdk::{Client, NewTask, Output, TaskState, proto};
use muster_server::store::{SledStore, Store, Write};
use tokio::sync::Mutex;

fn verify(data_dir: &Path, json: bool) -> std::io::Result<ProcessOutput> {
    let mut command = Command::new(muster_bin());
    if json {
        command.args(["--output", "json"]);
    }
    command.args(["store", "verify", "--data-dir"]).arg(data_dir).env("RUST_LOG", "warn").output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn a_stopped_servers_store_verifies_and_a_gap_in_its_event_log_does_not() -> TestResult {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let (mut server, endpoint) = spawn_serve_process(&data, &[]);
    let client = Client::connect(endpoint.clone()).await?;
    let (stop, agent) = spawn_agent(&endpoint, "echo", "echo", &[], 2, |ctx| async move {
        ctx.log("echoing");
        Ok(Output::from(ctx.payload().to_vec()))
    });
    wait_for_agents(&client, "echo", 1).await;
    // Three that finish (one under an idempotency key), a workflow of two
    // that finishes, two that wait for an agent that never comes (one
    // under a key).
    let mut finished = Vec::new();
    for key in [Some("done-1"), None, None] {
        let mut task = NewTask::new("echo").payload(b"hi".to_vec());
        if let Some(key) = key {
            task = task.idempotency_key(key);
        }
        finished.push(client.submit(task.build()).await?.id);
    }
    // A workflow of two, the second after the first.
    let graph = client
        .submit_many(vec![
            NewTask::new("echo").key("first").build(),
            NewTask::new("echo").key("second").depends_on("first").build(),
        ])
        .await?;
    assert!(!graph.workflow_id.is_empty());
    finished.extend(graph.tasks.into_iter().map(|t| t.id));
    for id in &finished {
        wait_for_state(&client, id, TaskState::Succeeded).await;
    }
    client.submit(NewTask::new("nobody").idempotency_key("waiting-1").build()).await?;
    client.submit(NewTask::new("nobody").build()).await?;

    // The running server holds the store.
    let refused = verify(&data, false)?;
    assert!(!refused.status.success(), "verify ran beside the server: {}", text(&refused.stdout));
    assert!(text(&refused.stderr).contains("in use by another process"), "{}", text(&refused.stderr));

    stop.cancel();
    agent.await??;
    // SAFETY: kill only sends a signal to the child this test started.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.child.try_wait()?.is_none() {
        assert!(std::time::Instant::now() < deadline, "muster serve did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let clean = verify(&data, true)?;
    assert!(clean.status.success(), "{}{}", text(&clean.stdout), text(&clean.stderr));
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout)?;
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["problem_count"], 0, "{report}");
    let records = &report["records"];
    assert_eq!(records["tasks"], 7, "{report}");
    assert_eq!(records["workflow_entries"], 2, "{report}");
    assert_eq!(records["unfinished_entries"], 2, "{report}");
    assert_eq!(records["idempotency_keys"], 2, "{report}");
    assert_eq!(records["logs"], 5, "one log per finished attempt: {report}");
    // Each task was submitted; each finished one was also assigned, started
    // and succeeded.
    let events = records["events"].as_u64().ok_or("no event count")?;
    assert!(events >= 7 + 5 * 3, "{report}");

    let table = verify(&data, false)?;
    assert!(table.status.success(), "{}", text(&table.stderr));
    let printed = text(&table.stdout);
    assert!(printed.contains("problems  0"), "{printed}");
    assert!(printed.lines().any(|l| l.split_whitespace().eq(["task", "7"])), "{printed}");

    // An event appended past a missing sequence: a gap in the log.
    let gap = {
        let store = SledStore::open(&data, None)?;
        let last = store.last_sequence()?;
        let mut event = store.events_after(last - 1, 1)?.pop().ok_or("no last event")?;
        event.sequence = last + 2;
        store.write(&[Write::Event(event)])?;
        store.flush()?;
        last + 2
    };
    let broken = verify(&data, true)?;
    assert!(!broken.status.success(), "a gap verified: {}", text(&broken.stdout));
    let stderr = text(&broken.stderr);
    assert!(stderr.contains(&format!("event_gap event/{gap}: sequences {0} to {0} are missing", gap - 1)), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout)?;
    assert_eq!(report["problem_count"], 1, "{report}");
    assert_eq!(report["problems_by_kind"]["event_gap"], 1, "{report}");
    assert_eq!(report["problems"][0]["key"], format!("event/{gap}"), "{report}");
    Ok(())
}

#[test]
fn verify_refuses_a_missing_directory_and_one_without_a_store() -> TestResult {
    let root = tempfile::tempdir()?;
    let missing = root.path().join("missing");
    let out = verify(&missing, false)?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("does not exist"), "{}", text(&out.stderr));
    assert!(!missing.exists(), "verify created the directory");

    let out = verify(root.path(), false)?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("holds no muster store"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(root.path())?.count(), 0, "verify wrote into the directory");
    Ok(())
}

/// Whether `client.get(id)` says the task does not exist.
async fn gone(client: &Client, id: &str) -> bool {
    matches!(client.get(id).await, Err(muster_sdk::Error::Status(s)) if s.code() == tonic::Code::NotFound)
}

#[tokio::test]
async fn finished_tasks_expire_and_a_watch_from_before_them_recovers_by_re_listing() -> TestResult {
    use futures::StreamExt;
    use muster_sdk::{Change, proto};

    let server = spawn_server_with(|c| c.retention.finished_tasks = Duration::from_secs(1)).await;
    let client = server.client().await;
    let (stop, agent) =
        spawn_agent(
            &server.endpoint,
            "echo",
            "echo",
            &[],
            2,
            |ctx| async move { Ok(Output::from(ctx.payload().to_vec())) },
        );
    wait_for_agents(&client, "echo", 1).await;
    let done = client.submit(NewTask::new("echo").payload(b"one".to_vec()).idempotency_key("once").build()).await?;
    client.wait(&done.id).await?;
    // Unfinished: no agent has this capability.
    let open = client.submit(NewTask::new("nobody").build()).await?;

    eventually(Duration::from_secs(20), "the finished task expires", || gone(&client, &done.id)).await;
    assert_eq!(client.get(&open.id).await?.state, TaskState::Queued, "unfinished work stays");
    // Its idempotency key went with it.
    let again = client.submit(NewTask::new("echo").idempotency_key("once").build()).await?;
    assert_ne!(again.id, done.id);
    client.wait(&again.id).await?;

    // A watch resuming from before what is kept is told so, with the
    // oldest sequence still there.
    let resume = proto::WatchTasksRequest { after_sequence: 1, ..Default::default() };
    let refused = match client.watch(resume.clone()).await {
        Ok(mut events) => events.next().await.ok_or("the watch ended without a word")?.err(),
        Err(err) => Some(err),
    };
    let Some(muster_sdk::Error::Status(status)) = refused else { panic!("not refused: {refused:?}") };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("the oldest kept is"), "{status:?}");

    // The SDK's follow re-lists and goes on: the tasks as they are now,
    // then the next live event.
    let mut changes = client.follow(resume);
    let Some(Ok(Change::Resync { sequence })) = changes.next().await else { panic!("no resync first") };
    assert!(sequence > 1);
    let next = client.submit(NewTask::new("nobody").build()).await?;
    let mut current = Vec::new();
    let event = loop {
        match tokio::time::timeout(Duration::from_secs(10), changes.next()).await?.ok_or("follow ended")?? {
            Change::Current(task) => current.push(task.id),
            Change::Event(event) => break event,
            Change::Resync { .. } => panic!("a second resync"),
        }
    };
    assert!(current.contains(&open.id) && !current.contains(&done.id), "{current:?}");
    assert_eq!(event.task_id, next.id, "the first live event after the listing");

    stop.cancel();
    agent.await??;
    Ok(())
}

fn muster(args: &[&str], paths: &[&Path]) -> std::io::Result<ProcessOutput> {
    let mut command = Command::new(muster_bin());
    command.args(args).args(paths).env("RUST_LOG", "warn");
    command.output()
}

/// How far along its life a task is: a backup may hold a later state than
/// was seen before it began, never an earlier one.
fn progress(state: TaskState) -> u8 {
    match state {
        TaskState::Pending | TaskState::Queued => 0,
        TaskState::Assigned => 1,
        TaskState::Running => 2,
        _ => 3,
    }
}

/// Every task the server at `client` holds, with its state.
async fn all_tasks(client: &Client) -> Result<std::collections::HashMap<String, TaskState>, muster_sdk::Error> {
    let mut tasks = std::collections::HashMap::new();
    let mut page_token = String::new();
    loop {
        let request = proto::ListTasksRequest { page_size: 1000, page_token, ..Default::default() };
        let page = client.list(request).await?;
        tasks.extend(page.tasks.into_iter().map(|t| (t.id, t.state)));
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_task_acknowledged_before_it_began() -> TestResult {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let (_server, endpoint) = spawn_serve_process(&data, &[]);
    let client = Client::connect(endpoint.clone()).await?;
    let (stop_agent, agent) = spawn_agent(&endpoint, "worker", "work", &[], 8, |ctx| async move {
        ctx.log("working");
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(Output::from(ctx.payload().to_vec()))
    });
    wait_for_agents(&client, "work", 1).await;

    // Submitters that go on through the backup: single tasks, some under
    // idempotency keys, and workflows of two; and tasks no agent takes.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop_load = tokio_util::sync::CancellationToken::new();
    let mut submitters = Vec::new();
    for s in 0..2 {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop_load.clone());
        submitters.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let ids: Vec<String> = match n % 4 {
                    0 => client
                        .submit_many(vec![
                            NewTask::new("work").key("a").build(),
                            NewTask::new("work").key("b").depends_on("a").build(),
                        ])
                        .await?
                        .tasks
                        .into_iter()
                        .map(|t| t.id)
                        .collect(),
                    1 => vec![
                        client.submit(NewTask::new("work").idempotency_key(format!("k-{s}-{n}")).build()).await?.id,
                    ],
                    2 => vec![client.submit(NewTask::new("nobody").build()).await?.id],
                    _ => vec![client.submit(NewTask::new("work").payload(b"x".to_vec()).build()).await?.id],
                };
                acked.lock().await.extend(ids);
            }
            Ok::<u64, muster_sdk::Error>(n)
        }));
    }
    eventually(Duration::from_secs(30), "a few hundred tasks acknowledged", || async {
        acked.lock().await.len() >= 300
    })
    .await;

    // What was acknowledged, and in what state, before the backup began.
    let before: Vec<String> = acked.lock().await.clone();
    let seen = all_tasks(&client).await?;
    let file = root.path().join("store.backup");
    let backup = muster(&["--output", "json", "store", "backup", "--server", &endpoint], &[&file])?;
    assert!(backup.status.success(), "backup failed: {}", text(&backup.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&backup.stdout)?;
    // The running server verifies clean while it is written, too.
    let online = muster(&["--output", "json", "store", "verify", "--server", &endpoint], &[])?;
    assert!(online.status.success(), "online verify: {}{}", text(&online.stdout), text(&online.stderr));
    let online: serde_json::Value = serde_json::from_slice(&online.stdout)?;
    assert_eq!(online["clean"], true, "{online}");
    assert!(online["records"]["tasks"].as_u64() >= summary["records"]["tasks"].as_u64(), "{online}");

    stop_load.cancel();
    let mut submitted = 0;
    for submitter in submitters {
        submitted += submitter.await??;
    }
    assert!(acked.lock().await.len() > before.len(), "the load stopped before the backup ({submitted} calls)");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o600, "a backup holds secrets");
    }
    assert!(!root.path().join("store.backup.partial").exists());

    let restored = root.path().join("restored");
    let restore = muster(&["--output", "json", "store", "restore", "--data-dir"], &[&restored, &file])?;
    assert!(restore.status.success(), "restore failed: {}", text(&restore.stderr));
    let report: serde_json::Value = serde_json::from_slice(&restore.stdout)?;
    assert_eq!(report["records"], summary["records"], "{report}");
    assert_eq!(report["sequence"], summary["sequence"], "{report}");
    let clean = verify(&restored, true)?;
    assert!(clean.status.success(), "{}{}", text(&clean.stdout), text(&clean.stderr));

    // A server on the restored directory has every task acknowledged
    // before the backup began, as it was then or further along.
    let (_again, restored_endpoint) = spawn_serve_process(&restored, &[]);
    let restored_client = Client::connect(restored_endpoint.clone()).await?;
    let kept = all_tasks(&restored_client).await?;
    assert_eq!(kept.len() as u64, summary["records"]["tasks"].as_u64().unwrap_or(0));
    for id in &before {
        let state =
            kept.get(id).ok_or_else(|| format!("task {id}, acknowledged before the backup, was not restored"))?;
        let then = seen.get(id).ok_or_else(|| format!("task {id} was not listed"))?;
        assert!(progress(*state) >= progress(*then), "task {id}: {then:?} before the backup, {state:?} restored");
    }
    // And runs what was unfinished once an agent comes.
    let (stop_again, agent_again) = spawn_agent(&restored_endpoint, "worker-2", "work", &[], 8, |ctx| async move {
        Ok(Output::from(ctx.payload().to_vec()))
    });
    eventually(Duration::from_secs(60), "the restored server finishes the work it holds", || async {
        all_tasks(&restored_client)
            .await
            .map(|tasks| tasks.values().all(|s| s.is_terminal() || *s == TaskState::Queued))
            .unwrap_or(false)
    })
    .await;
    stop_again.cancel();
    agent_again.await??;
    stop_agent.cancel();
    agent.await??;
    Ok(())
}

// The CLI runs as a child the test waits for: the in-process server needs
// another thread meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_backup_is_refused_with_the_reason_and_nothing_is_restored() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    for _ in 0..20 {
        client.submit(NewTask::new("nobody").payload(vec![7; 4096]).build()).await?;
    }
    let root = tempfile::tempdir()?;
    let file = root.path().join("good.backup");
    let backup = muster(&["store", "backup", "--server", &server.endpoint], &[&file])?;
    assert!(backup.status.success(), "{}", text(&backup.stderr));
    assert!(text(&backup.stdout).contains("task"), "{}", text(&backup.stdout));
    let bytes = std::fs::read(&file)?;

    let damaged = [
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "flipped",
            {
                let mut b = bytes.clone();
                b[bytes.len() / 2] ^= 0x55;
                b
            },
            "corrupt",
        ),
        ("other", b"{\"not\": \"a backup\"}".to_vec(), "not a muster backup"),
    ];
    for (name, contents, reason) in damaged {
        let path = root.path().join(name);
        std::fs::write(&path, contents)?;
        let dir = root.path().join(format!("data-{name}"));
        let refused = muster(&["store", "restore", "--data-dir"], &[&dir, &path])?;
        assert!(!refused.status.success(), "{name} was restored");
        let stderr = text(&refused.stderr);
        assert!(stderr.contains(reason), "{name}: {stderr}");
        assert!(!dir.exists(), "{name}: {} was created", dir.display());
    }
    let leftovers: Vec<String> = std::fs::read_dir(root.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(leftovers.iter().all(|n| !n.starts_with('.')), "left behind: {leftovers:?}");

    // The good one restores, once; again only with --force.
    let dir = root.path().join("data");
    assert!(muster(&["store", "restore", "--data-dir"], &[&dir, &file])?.status.success());
    let again = muster(&["store", "restore", "--data-dir"], &[&dir, &file])?;
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("pass --force"), "{}", text(&again.stderr));
    let forced = muster(&["store", "restore", "--force", "--data-dir"], &[&dir, &file])?;
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    Ok(())
}

/// The soak bench, shortened: a steady stream with a retention of a few
/// seconds keeps the data directory and the server's memory level, and
/// retention keeps only a small share of what ran.
#[test]
fn a_short_soak_levels_off_and_keeps_only_what_retention_allows() {
    let out = Command::new(muster_bin())
        .args(["--output", "json", "bench", "--scenario", "soak"])
        .args(["--soak-duration", "40s", "--soak-retention", "3s", "--soak-sample", "2s", "--soak-rate", "200"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "soak failed: {}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let soak = &report["scenarios"]["soak"][0];
    assert_eq!(soak["level"], true, "{soak}");
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 15, "{} samples", samples.len());
    let tasks = soak["tasks"].as_f64().unwrap();
    assert!(tasks >= 2000.0, "only {tasks} tasks ran");
    let kept = samples.last().unwrap()["tasks_kept"].as_f64().unwrap();
    assert!(kept < tasks / 4.0, "{kept} of {tasks} tasks still stored");
}
