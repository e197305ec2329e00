//! Workflows and coordination over real gRPC: graphs, locks, concurrency
//! keys, queues and ExplainTask, with SDK agents that record what they saw.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use muster_sdk::{Client, Error, Explanation, NewTask, Output, TaskContext, TaskError, TaskState, Workflow, proto};
use tokio::sync::{Mutex, Notify};

/// What an agent saw of one execution.
#[derive(Clone, Debug)]
struct Interval {
    key: String,
    start: Instant,
    end: Instant,
}

type Log = Arc<Mutex<Vec<Interval>>>;

fn key_of(ctx: &TaskContext) -> String {
    ctx.metadata().get("key").cloned().unwrap_or_default()
}

fn make_task(key: &str, capability: &str, deps: &[&str]) -> NewTask {
    deps.iter().fold(NewTask::new(capability).key(key).metadata("key", key), |t, d| t.depends_on(*d))
}

/// An agent that records each execution's interval and returns its key.
fn spawn_recording_agent(endpoint: &str, capability: &str, slots: u32, log: Log, work: Duration) -> Stop {
    let (stop, handle) = spawn_agent(endpoint, "recorder", capability, &[], slots, move |ctx| {
        let log = log.clone();
        async move {
            let start = Instant::now();
            tokio::time::sleep(work).await;
            let key = key_of(&ctx);
            log.lock().await.push(Interval { key: key.clone(), start, end: Instant::now() });
            Ok(Output::from(key))
        }
    });
    Stop { stop, handle }
}

struct Stop {
    stop: muster_sdk::CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Stop {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

async fn wait_workflow(client: &Client, id: &str) -> Workflow {
    let mut last = None;
    for _ in 0..2400 {
        let w = client.get_workflow(id).await.expect("get workflow");
        if w.done {
            return w;
        }
        last = Some(w);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("workflow {id} did not finish: {last:?}");
}

fn state_of(w: &Workflow, key: &str) -> TaskState {
    w.tasks.iter().find(|t| t.key == key).map_or(TaskState::Unknown(0), |t| t.state)
}

#[tokio::test]
async fn diamonds_chains_and_fan_out_fan_in_run_in_dependency_order() -> TestResult {
    dependency_order(spawn_server().await).await
}

#[tokio::test]
async fn a_graph_runs_in_dependency_order_on_postgres() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    dependency_order(spawn_server_on_postgres(&pg.url()).await).await
}

async fn dependency_order(server: TestServer) -> TestResult {
    let client = server.client().await;
    let log: Log = Arc::default();
    let agent = spawn_recording_agent(&server.endpoint, "step", 8, log.clone(), Duration::from_millis(20));
    let mut edges: Vec<(String, Vec<String>)> = vec![
        ("a".into(), vec![]),
        ("b".into(), vec!["a".into()]),
        ("c".into(), vec!["a".into()]),
        ("d".into(), vec!["b".into(), "c".into()]),
    ];
    for i in 0..5 {
        let deps = if i == 0 { vec![] } else { vec![format!("chain{}", i - 1)] };
        edges.push((format!("chain{i}"), deps));
    }
    edges.push(("root".into(), vec![]));
    for i in 0..12 {
        edges.push((format!("fan{i}"), vec!["root".into()]));
    }
    edges.push(("sink".into(), (0..12).map(|i| format!("fan{i}")).collect()));
    let specs = edges
        .iter()
        .map(|(k, deps)| make_task(k, "step", &deps.iter().map(String::as_str).collect::<Vec<_>>()).build())
        .collect();
    let submitted = client.submit_many(specs).await?;
    assert!(!submitted.workflow_id.is_empty());
    let workflow = wait_workflow(&client, &submitted.workflow_id).await;
    assert_eq!(workflow.counts.get("SUCCEEDED"), Some(&(edges.len() as u32)));
    assert_eq!(workflow.percent_complete, 100.0);

    let log = log.lock().await.clone();
    let by_key: HashMap<&str, &Interval> = log.iter().map(|i| (i.key.as_str(), i)).collect();
    assert_eq!(by_key.len(), edges.len(), "every task ran exactly once");
    for (key, deps) in &edges {
        for dep in deps {
            assert!(
                by_key[dep.as_str()].end <= by_key[key.as_str()].start,
                "{key} started before its dependency {dep} finished"
            );
        }
    }
    let fan_overlap = (0..12).any(|i| {
        let a = by_key[format!("fan{i}").as_str()];
        (0..12).any(|j| {
            j != i
                && by_key[format!("fan{j}").as_str()].start < a.end
                && a.start < by_key[format!("fan{j}").as_str()].end
        })
    });
    assert!(fan_overlap, "independent branches run in parallel");
    agent.stop().await;
    Ok(())
}

#[tokio::test]
async fn cycles_and_unknown_edges_are_rejected_naming_them() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let cycle = vec![
        make_task("fetch", "x", &["verify"]).build(),
        make_task("build", "x", &["fetch"]).build(),
        make_task("verify", "x", &["build"]).build(),
    ];
    let Err(Error::Status(status)) = client.submit_many(cycle).await else { panic!("a cycle must be refused") };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    for name in ["fetch", "build", "verify"] {
        assert!(status.message().contains(name), "{} names {name}", status.message());
    }
    let unknown = vec![make_task("a", "x", &[]).build(), make_task("b", "x", &["nowhere"]).build()];
    let Err(Error::Status(status)) = client.submit_many(unknown).await else { panic!("unknown edge must be refused") };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("tasks[1].depends_on[0]") && status.message().contains("nowhere"));
    assert!(client.list(proto::ListTasksRequest::default()).await?.tasks.is_empty(), "nothing was created");
    Ok(())
}

#[tokio::test]
async fn an_upstream_failure_cancels_exactly_its_transitive_dependents() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "judge", "step", &[], 4, |ctx| async move {
        if key_of(&ctx) == "flaky" { Err(TaskError::fatal("this one breaks")) } else { Ok(Output::from("fine")) }
    });
    let specs = vec![
        make_task("flaky", "step", &[]).build(),
        make_task("child", "step", &["flaky"]).build(),
        make_task("grandchild", "step", &["child"]).build(),
        make_task("other", "step", &[]).build(),
        make_task("other-child", "step", &["other"]).build(),
    ];
    let submitted = client.submit_many(specs).await?;
    let w = wait_workflow(&client, &submitted.workflow_id).await;
    use TaskState::*;
    assert_eq!(state_of(&w, "flaky"), Failed);
    assert_eq!(state_of(&w, "child"), Cancelled);
    assert_eq!(state_of(&w, "grandchild"), Cancelled);
    assert_eq!(state_of(&w, "other"), Succeeded);
    assert_eq!(state_of(&w, "other-child"), Succeeded);
    let grandchild = w.tasks.iter().find(|t| t.key == "grandchild").ok_or("grandchild")?;
    let task = client.get(&grandchild.id).await?;
    assert_eq!(task.failure.map(|f| f.reason), Some("upstream_failed".to_owned()));
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn children_receive_their_parents_outputs_by_key() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let (stop, agent) = spawn_agent(&server.endpoint, "joiner", "step", &[], 4, |ctx| async move {
        let mut parts: Vec<String> =
            ctx.parent_outputs().iter().map(|p| format!("{}={}", p.key, String::from_utf8_lossy(&p.output))).collect();
        parts.sort();
        Ok(Output::from(format!("{}[{}]", key_of(&ctx), parts.join(","))))
    });
    let specs = vec![
        make_task("left", "step", &[]).build(),
        make_task("right", "step", &[]).build(),
        make_task("join", "step", &["left", "right"]).build(),
    ];
    let submitted = client.submit_many(specs).await?;
    wait_workflow(&client, &submitted.workflow_id).await;
    let join = client.get(&submitted.tasks[2].id).await?;
    assert_eq!(String::from_utf8_lossy(&join.output), "join[left=left[],right=right[]]");

    // A dependency on an existing, finished task by id passes its output
    // too, under that task's key.
    let later = client.submit(make_task("later", "step", &[&join.id]).build()).await?;
    let later = client.wait(&later.id).await?;
    assert_eq!(String::from_utf8_lossy(&later.output), "later[join=join[left=left[],right=right[]]]");
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn exclusive_and_shared_locks_never_overlap_wrongly_across_many_agents() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let log: Log = Arc::default();
    let mut agents = Vec::new();
    for _ in 0..6 {
        agents.push(spawn_recording_agent(&server.endpoint, "db", 3, log.clone(), Duration::from_millis(15)));
    }
    let mut specs = Vec::new();
    for i in 0..40 {
        let task = if i % 4 == 0 {
            NewTask::new("db").metadata("key", format!("write{i}")).exclusive_lock("table")
        } else {
            NewTask::new("db").metadata("key", format!("read{i}")).shared_lock("table")
        };
        specs.push(task.build());
    }
    let submitted = client.submit_many(specs).await?;
    wait_workflow(&client, &submitted.workflow_id).await;
    let log = log.lock().await.clone();
    assert_eq!(log.len(), 40);
    let overlaps = |a: &Interval, b: &Interval| a.start < b.end && b.start < a.end;
    for w in log.iter().filter(|i| i.key.starts_with("write")) {
        for other in log.iter().filter(|o| o.key != w.key) {
            assert!(!overlaps(w, other), "{} overlapped {} while holding the lock exclusively", w.key, other.key);
        }
    }
    let readers: Vec<&Interval> = log.iter().filter(|i| i.key.starts_with("read")).collect();
    let shared = readers.iter().any(|a| readers.iter().any(|b| a.key != b.key && overlaps(a, b)));
    assert!(shared, "shared holders run together");
    for agent in agents {
        agent.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_concurrency_key_is_never_exceeded_across_agents() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let mut agents = Vec::new();
    for _ in 0..4 {
        let (running, peak) = (running.clone(), peak.clone());
        agents.push(spawn_agent(&server.endpoint, "llm", "llm", &[], 4, move |_| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(Output::empty())
            }
        }));
    }
    let specs = (0..30).map(|_| NewTask::new("llm").concurrency("model", 3).build()).collect();
    let submitted = client.submit_many(specs).await?;
    wait_workflow(&client, &submitted.workflow_id).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "{peak} ran at once, over the maximum of 3");
    assert!(peak >= 2, "the key still allows parallelism ({peak})");
    for (stop, handle) in agents {
        stop.cancel();
        handle.await??;
    }
    Ok(())
}

#[tokio::test]
async fn a_paused_queue_dispatches_nothing_and_resumes_cleanly() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let paused = client.pause_queue("reports").await?;
    assert!(paused.paused);
    let (stop, agent) = spawn_agent(&server.endpoint, "w", "report", &[], 2, |_| async { Ok(Output::empty()) });
    let held = client.submit(NewTask::new("report").queue("reports").build()).await?;
    let free = client.submit(NewTask::new("report").build()).await?;
    client.wait(&free.id).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client.get(&held.id).await?.state, TaskState::Queued);
    let explanation = client.explain(&held.id).await?;
    assert_eq!(explanation.reasons.first().map(|r| r.code.as_str()), Some("queue_paused"));
    let queues = client.list_queues().await?;
    let reports = queues.iter().find(|q| q.name == "reports").ok_or("reports queue listed")?;
    assert_eq!(reports.depth.get("QUEUED"), Some(&1));
    client.resume_queue("reports").await?;
    assert_eq!(client.wait(&held.id).await?.state, TaskState::Succeeded);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn weighted_queues_share_saturated_agents_about_one_to_three() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    client.configure_queue("light", 1, 0).await?;
    client.configure_queue("heavy", 3, 0).await?;
    let mut specs = Vec::new();
    for _ in 0..60 {
        specs.push(NewTask::new("w").queue("light").metadata("key", "light").build());
        specs.push(NewTask::new("w").queue("heavy").metadata("key", "heavy").build());
    }
    client.submit_many(specs).await?;
    let log: Log = Arc::default();
    let a = spawn_recording_agent(&server.endpoint, "w", 2, log.clone(), Duration::from_millis(5));
    let b = spawn_recording_agent(&server.endpoint, "w", 2, log.clone(), Duration::from_millis(5));
    eventually(Duration::from_secs(20), "60 tasks to run", || async { log.lock().await.len() >= 60 }).await;
    let first: Vec<Interval> = {
        let mut log = log.lock().await.clone();
        log.sort_by_key(|i| i.start);
        log.into_iter().take(60).collect()
    };
    let light = first.iter().filter(|i| i.key == "light").count() as f64;
    let heavy = first.iter().filter(|i| i.key == "heavy").count() as f64;
    let ratio = heavy / light.max(1.0);
    assert!((2.0..=4.5).contains(&ratio), "heavy:light was {heavy}:{light}");
    a.stop().await;
    b.stop().await;
    Ok(())
}

#[tokio::test]
async fn explain_gives_the_true_cause_for_waiting_tasks() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let code = |e: Explanation| e.reasons.into_iter().map(|r| r.code).collect::<Vec<_>>();

    let orphan = client.submit(NewTask::new("translate").build()).await?;
    assert_eq!(code(client.explain(&orphan.id).await?), vec!["no_agent_with_capability"]);

    let release = Arc::new(Notify::new());
    let r = release.clone();
    let (stop, agent) = spawn_agent(&server.endpoint, "holder", "hold", &[("zone", "eu")], 1, move |_| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok(Output::empty())
        }
    });
    wait_for_agents(&client, "hold", 1).await;
    let picky = client.submit(NewTask::new("hold").selector("zone", "us").build()).await?;
    let e = client.explain(&picky.id).await?;
    assert_eq!(e.reasons[0].code, "no_agent_matches_selector");
    assert!(e.reasons[0].agents[0].contains("zone=us (has zone=eu)"), "{:?}", e.reasons[0].agents);

    let holder = client.submit(NewTask::new("hold").exclusive_lock("printer").build()).await?;
    wait_for_state(&client, &holder.id, TaskState::Running).await;
    let waiting = client.submit(NewTask::new("hold").exclusive_lock("printer").build()).await?;
    let e = client.explain(&waiting.id).await?;
    let codes: Vec<&str> = e.reasons.iter().map(|r| r.code.as_str()).collect();
    assert!(codes.contains(&"lock_held") && codes.contains(&"all_capable_agents_busy"), "{codes:?}");
    let lock = e.reasons.iter().find(|r| r.code == "lock_held").ok_or("lock reason")?;
    assert_eq!(lock.task_ids, vec![holder.id.clone()], "names the holder");

    let submitted = client
        .submit_many(vec![make_task("first", "hold", &[]).build(), make_task("second", "hold", &["first"]).build()])
        .await?;
    assert_eq!(code(client.explain(&submitted.tasks[1].id).await?), vec!["waiting_on_dependencies"]);
    release.notify_one();
    stop.cancel();
    release.notify_waiters();
    let _ = agent.await;
    Ok(())
}

#[tokio::test]
async fn a_workflow_survives_a_server_restart_midway() -> TestResult {
    restart_midway(&[]).await
}

#[tokio::test]
async fn a_workflow_survives_a_server_restart_midway_on_postgres() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    // The replica started after the kill stands by until the lease of the
    // killed one expires: well within the agents' lease of 5 s.
    restart_midway(&["--store", &pg.url(), "--leader-lease-ttl", "1s"]).await
}

/// A server killed while a workflow's first task runs, and started again
/// on the same store (`store`: more `muster serve` arguments).
async fn restart_midway(store: &[&str]) -> TestResult {
    let dir = tempfile::tempdir()?;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", listen.as_str(), "--lease-ttl", "5s", "--heartbeat-interval", "300ms"];
    args.extend_from_slice(store);
    let spawn = |dir: &std::path::Path| spawn_serve_process(dir, &args).0;
    let mut server = spawn(dir.path());
    let endpoint = format!("http://{listen}");
    let client = Client::connect(endpoint.clone()).await?;
    let release = Arc::new(Notify::new());
    let runs = Arc::new(Mutex::new(Vec::new()));
    let (r, log) = (release.clone(), runs.clone());
    let (stop, agent) = spawn_agent(&endpoint, "steady", "step", &[], 4, move |ctx| {
        let (r, log) = (r.clone(), log.clone());
        async move {
            let key = key_of(&ctx);
            log.lock().await.push(key.clone());
            if key == "long" {
                r.notified().await;
            }
            Ok(Output::from(key))
        }
    });
    let specs = vec![
        make_task("long", "step", &[]).exclusive_lock("db").concurrency("k", 1).build(),
        make_task("rival", "step", &[]).exclusive_lock("db").build(),
        make_task("sibling", "step", &[]).concurrency("k", 1).build(),
        make_task("after", "step", &["long"]).build(),
    ];
    let submitted = client.submit_many(specs).await?;
    wait_for_state(&client, &submitted.tasks[0].id, TaskState::Running).await;

    server.kill9();
    let _server = spawn(dir.path());
    let client = Client::connect(endpoint.clone()).await?;
    wait_until_serving(&client).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for key in ["rival", "sibling", "after"] {
        let task = submitted.tasks.iter().find(|t| t.spec.key == key).ok_or(key)?;
        assert_ne!(client.get(&task.id).await?.state, TaskState::Succeeded, "{key} must still wait");
    }
    release.notify_one();
    let w = wait_workflow(&client, &submitted.workflow_id).await;
    assert_eq!(w.counts.get("SUCCEEDED"), Some(&4), "{w:?}");
    let long = client.get(&submitted.tasks[0].id).await?;
    assert_eq!(long.attempt, 1, "the running attempt was resumed, not repeated");
    let runs = runs.lock().await.clone();
    assert_eq!(runs.iter().filter(|k| *k == "long").count(), 1);
    stop.cancel();
    agent.await??;
    Ok(())
}

#[tokio::test]
async fn a_ten_thousand_task_graph_submits_and_runs_to_completion() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let mut agents = Vec::new();
    for _ in 0..4 {
        agents.push(spawn_agent(&server.endpoint, "bulk", "noop", &[], 64, |_| async { Ok(Output::empty()) }));
    }
    // A root, 9,998 tasks fanning out of it, and one task fanning them in.
    let mut specs = vec![make_task("root", "noop", &[]).build()];
    for i in 0..9_998 {
        specs.push(NewTask::new("noop").key(format!("n{i}")).depends_on("root").build());
    }
    let mut sink = NewTask::new("noop").key("sink");
    for i in 0..9_998 {
        sink = sink.depends_on(format!("n{i}"));
    }
    specs.push(sink.build());
    let started = Instant::now();
    let submit = client.submit_many(specs).await?;
    let submitted_in = started.elapsed();
    assert_eq!(submit.tasks.len(), 10_000);
    let sink = client.wait(&submit.tasks[9_999].id).await?;
    let finished_in = started.elapsed();
    assert_eq!(sink.state, TaskState::Succeeded);
    assert_eq!(sink.depends_on_ids.len(), 9_998);
    let w = client.get_workflow(&submit.workflow_id).await?;
    assert_eq!(w.counts.get("SUCCEEDED"), Some(&10_000));
    println!("10,000-task graph: submitted in {submitted_in:?}, finished in {finished_in:?}");
    for (stop, handle) in agents {
        stop.cancel();
        handle.await??;
    }
    Ok(())
}
