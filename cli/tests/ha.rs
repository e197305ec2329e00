//! High availability on PostgreSQL with real processes: three `muster
//! serve` replicas on one private PostgreSQL cluster, SDK agents and a
//! submitter running while the leader is killed, paused and stopped.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use muster_sdk::{Agent, CancellationToken, Client, NewTask, Output, TaskState};
use muster_server::store::PgStore;
use tokio::sync::Mutex;

/// The leader lease of the replicas under test.
const TTL: Duration = Duration::from_secs(2);

/// One replica: its process, data directory and fixed port (so a restart
/// comes back at the same address).
struct Replica {
    process: Option<Process>,
    dir: tempfile::TempDir,
    listen: String,
    http: String,
    url: String,
}

fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    format!("127.0.0.1:{}", port.unwrap_or_else(|e| panic!("no free port: {e}")))
}

impl Replica {
    fn new(url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut replica =
            Self { process: None, dir, listen: free_address(), http: free_address(), url: url.to_owned() };
        replica.start();
        replica
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn start(&mut self) {
        let ttl = format!("{}s", TTL.as_secs());
        let args = [
            "--listen",
            self.listen.as_str(),
            "--http-listen",
            self.http.as_str(),
            "--store",
            self.url.as_str(),
            "--leader-lease-ttl",
            ttl.as_str(),
            "--lease-ttl",
            "10s",
            "--heartbeat-interval",
            "300ms",
        ];
        self.process = Some(spawn_serve_process(self.dir.path(), &args).0);
    }

    /// One sample of this replica's metrics (`None`: not exported).
    async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://{}/metrics", self.http)).await.ok()?.text().await.ok()?;
        body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(process) = &self.process {
            // SAFETY: kill(2) on the child we spawned and have not reaped.
            unsafe { libc::kill(process.pid(), signal) };
        }
    }
}

/// Whether the replica at `endpoint` leads: a standby answers UNAVAILABLE,
/// the leader NOT_FOUND for a task that does not exist.
async fn leads(endpoint: &str) -> bool {
    let Ok(client) = Client::connect(endpoint.to_owned()).await else { return false };
    match client.get("01J00000000000000000000000").await {
        Err(muster_sdk::Error::Status(status)) => status.code() == tonic::Code::NotFound,
        _ => false,
    }
}

/// The index of the replica that leads, waiting up to `within`.
async fn leader_of(replicas: &[Replica], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for (i, replica) in replicas.iter().enumerate() {
            if replica.process.is_some() && leads(&replica.endpoint()).await {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// An SDK agent that knows every replica and records each execution.
fn recording_agent(endpoints: &[String], runs: Arc<Mutex<HashMap<String, u32>>>) -> CancellationToken {
    let mut builder = Agent::builder("ha-worker")
        .slots(16)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .handler("noop", move |ctx| {
            let runs = runs.clone();
            async move {
                *runs.lock().await.entry(ctx.task_id().to_owned()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Output::from("done"))
            }
        });
    for endpoint in endpoints {
        builder = builder.server(endpoint.clone());
    }
    let agent = builder.build().unwrap_or_else(|e| panic!("agent: {e}"));
    let token = CancellationToken::new();
    tokio::spawn(agent.run_until(token.clone()));
    token
}

/// Submits one task at a time to whichever replica leads, recording what
/// was acknowledged, until `stop`.
fn submitter(
    endpoints: Vec<String>,
    acked: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut at = 0;
        while !stop.is_cancelled() {
            let Ok(client) = Client::connect(endpoints[at].clone()).await else {
                at = (at + 1) % endpoints.len();
                continue;
            };
            match client.submit(NewTask::new("noop").build()).await {
                Ok(task) => acked.lock().await.push(task.id),
                Err(_) => {
                    at = (at + 1) % endpoints.len();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn lease(url: &str) -> muster_server::store::Lease {
    let store = PgStore::connect(url).unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
    store.lease().await.unwrap_or_else(|e| panic!("reading the lease: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_ten_times_fails_over_within_the_ttl_and_nothing_acknowledged_is_lost() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::new(&url)).collect();
    let endpoints: Vec<String> = replicas.iter().map(Replica::endpoint).collect();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let agent = recording_agent(&endpoints, runs.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let submitting = submitter(endpoints.clone(), acked.clone(), stop.clone());

    let mut failovers = Vec::new();
    let mut epoch = 0;
    for round in 0..10 {
        let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
        let now = lease(&url).await;
        assert!(now.epoch > epoch, "round {round}: epochs only increase ({epoch} then {})", now.epoch);
        epoch = now.epoch;
        let before = acked.lock().await.len();
        eventually(Duration::from_secs(20), "submits to go through", || async {
            acked.lock().await.len() >= before + 20
        })
        .await;

        if let Some(mut process) = replicas[leader].process.take() {
            process.kill9();
        }
        let killed = Instant::now();
        let next = leader_of(&replicas, TTL + Duration::from_secs(10)).await.ok_or("no replica took over")?;
        let took = killed.elapsed();
        assert_ne!(next, leader);
        assert!(took <= TTL + Duration::from_secs(3), "round {round}: failover took {took:?}");
        failovers.push(took);
        // A supervisor starts the killed replica again; it comes back a standby.
        replicas[leader].start();
    }
    stop.cancel();
    submitting.await?;

    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads at the end")?;
    let client = Client::connect(replicas[leader].endpoint()).await?;
    let acked = acked.lock().await.clone();
    for id in &acked {
        let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id)).await??;
        assert_eq!(done.state, TaskState::Succeeded, "acknowledged task {id}");
    }
    let runs = runs.lock().await.clone();
    let repeated: Vec<(&String, &u32)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "no agent was lost, so nothing may run twice: {repeated:?}");
    failovers.sort();
    println!(
        "{} acknowledged, all succeeded once; failover min {:?} median {:?} max {:?}",
        acked.len(),
        failovers[0],
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
    agent.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_leadership_over_in_under_a_second() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let mut replicas: Vec<Replica> = (0..2).map(|_| Replica::new(&url)).collect();
    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let epoch = lease(&url).await.epoch;
    let standby = &replicas[1 - leader];
    assert_eq!(replicas[leader].metric("muster_leader").await, Some(1.0));
    assert_eq!(replicas[leader].metric("muster_leader_epoch").await, Some(epoch as f64));
    assert_eq!(standby.metric("muster_leader").await, Some(0.0));
    let health = reqwest::get(format!("http://{}/healthz", standby.http)).await?;
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE, "a standby is not healthy to route to");
    replicas[leader].signal(libc::SIGTERM);
    let stopped = Instant::now();
    let mut process = replicas[leader].process.take().ok_or("no process")?;
    let next = leader_of(&replicas, Duration::from_secs(10)).await.ok_or("no replica took over")?;
    let took = stopped.elapsed();
    assert_ne!(next, leader);
    assert!(took < Duration::from_secs(1), "handover took {took:?}");
    assert_eq!(lease(&url).await.epoch, epoch + 1);
    assert_eq!(replicas[next].metric("muster_leader").await, Some(1.0));
    assert_eq!(replicas[next].metric("muster_leader_epoch").await, Some((epoch + 1) as f64));
    assert_eq!(replicas[next].metric("muster_leader_failovers_total").await, Some(1.0));
    let status = tokio::task::spawn_blocking(move || process.child.wait()).await??;
    assert!(status.success(), "a resigning leader exits cleanly: {status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_ttl_is_fenced_and_steps_down() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let mut replicas: Vec<Replica> = (0..2).map(|_| Replica::new(&url)).collect();
    let endpoints: Vec<String> = replicas.iter().map(Replica::endpoint).collect();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let agent = recording_agent(&endpoints, runs.clone());
    let old = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let epoch = lease(&url).await.epoch;

    replicas[old].signal(libc::SIGSTOP);
    let next = leader_of(&replicas, TTL * 3).await.ok_or("no replica took over from the paused leader")?;
    assert_ne!(next, old);
    let taken = lease(&url).await;
    assert_eq!(taken.epoch, epoch + 1);
    // Work goes on under the new leader.
    let client = Client::connect(replicas[next].endpoint()).await?;
    let task = client.submit(NewTask::new("noop").build()).await?;
    assert_eq!(client.wait(&task.id).await?.state, TaskState::Succeeded);

    replicas[old].signal(libc::SIGCONT);
    let mut process = replicas[old].process.take().ok_or("no process")?;
    let status =
        tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || process.child.wait()))
            .await???;
    assert!(!status.success(), "the fenced leader stops with an error: {status:?}");
    let now = lease(&url).await;
    assert_eq!((now.epoch, now.holder), (taken.epoch, taken.holder), "the old leader took nothing back");
    assert_eq!(client.get(&task.id).await?.state, TaskState::Succeeded);
    agent.cancel();
    Ok(())
}

/// `muster bench --store`: a short burn-down on PostgreSQL, on a database
/// of its own that is gone afterwards.
#[tokio::test]
async fn a_short_burn_down_runs_on_postgres_in_a_scratch_database() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let out = tokio::process::Command::new(muster_bin())
        .args(["--output", "json", "bench", "--scenario", "burn-down", "--durability", "sync"])
        .args(["--tasks", "3000", "--agents", "2", "--slots", "16", "--batch", "100", "--store", &pg.url()])
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let run = &report["scenarios"]["burn_down"][0];
    assert_eq!(run["store"], "postgres", "{run}");
    assert_eq!(run["check"]["ran_exactly_once"], true, "{run}");
    assert!(run["tasks_per_second"].as_f64().unwrap_or(0.0) > 0.0, "{run}");
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let left: i64 =
        client.query_one("SELECT count(*) FROM pg_database WHERE datname LIKE 'muster_bench_%'", &[]).await?.get(0);
    assert_eq!(left, 0, "the scratch database was dropped");
    Ok(())
}

/// `--server` takes the replicas comma-separated and finds the leader,
/// through a standby's redirect too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_the_leader_among_comma_separated_servers() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let replicas: Vec<Replica> = (0..2).map(|_| Replica::new(&url)).collect();
    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let standby = replicas[1 - leader].endpoint();
    let cli = |server: String| async move {
        tokio::process::Command::new(muster_bin())
            .args(["--server", &server, "--output", "json", "task", "submit", "noop"])
            .output()
            .await
    };
    for server in [format!("{standby},{}", replicas[leader].endpoint()), standby.clone()] {
        let out = cli(server.clone()).await?;
        assert!(out.status.success(), "--server {server}: {}", String::from_utf8_lossy(&out.stderr));
        let task: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(task["state"], "QUEUED", "{task}");
    }
    let dead = "http://127.0.0.1:1".to_owned();
    let out = cli(format!("{dead},{standby}")).await?;
    assert!(out.status.success(), "a dead endpoint is skipped: {}", String::from_utf8_lossy(&out.stderr));

    // `muster status` names the leader, wherever it is asked.
    let out = tokio::process::Command::new(muster_bin())
        .args(["--server", &standby, "--output", "json", "status"])
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["leader"], replicas[leader].endpoint(), "{status}");
    assert_eq!(status["store"], "postgres");
    assert_eq!(status["leader_epoch"], lease(&url).await.epoch);
    Ok(())
}

/// What an agent saw of one execution.
#[derive(Clone, Debug)]
struct Run {
    task: String,
    started: Instant,
    ended: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_concurrency_keys_are_never_held_twice_across_failovers() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let mut replicas: Vec<Replica> = (0..2).map(|_| Replica::new(&url)).collect();
    let endpoints: Vec<String> = replicas.iter().map(Replica::endpoint).collect();
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let recorded = runs.clone();
    let mut builder = Agent::builder("locker")
        .slots(8)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .handler("locked", move |ctx| {
            let runs = recorded.clone();
            async move {
                let started = Instant::now();
                tokio::time::sleep(Duration::from_millis(300)).await;
                runs.lock().await.push(Run { task: ctx.task_id().to_owned(), started, ended: Instant::now() });
                Ok(Output::from("done"))
            }
        });
    for endpoint in &endpoints {
        builder = builder.server(endpoint.clone());
    }
    let stop = CancellationToken::new();
    tokio::spawn(builder.build()?.run_until(stop.clone()));

    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let client = Client::connect(replicas[leader].endpoint()).await?;
    let mut exclusive = Vec::new();
    let mut limited = Vec::new();
    for i in 0..12 {
        exclusive
            .push(client.submit(NewTask::new("locked").exclusive_lock("db").key(format!("x{i}")).build()).await?.id);
        limited.push(client.submit(NewTask::new("locked").concurrency("k", 2).key(format!("c{i}")).build()).await?.id);
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
        if let Some(mut process) = replicas[leader].process.take() {
            process.kill9();
        }
        leader_of(&replicas, TTL + Duration::from_secs(10)).await.ok_or("no replica took over")?;
        replicas[leader].start();
    }
    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let client = Client::connect(replicas[leader].endpoint()).await?;
    for id in exclusive.iter().chain(&limited) {
        let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id)).await??;
        assert_eq!(done.state, TaskState::Succeeded, "{id}");
    }
    let runs = runs.lock().await.clone();
    let of = |ids: &[String]| -> Vec<Run> { runs.iter().filter(|r| ids.contains(&r.task)).cloned().collect() };
    // The most runs at once is reached as one of them starts.
    let most_at_once = |runs: &[Run]| {
        runs.iter().map(|r| runs.iter().filter(|o| o.started <= r.started && r.started < o.ended).count()).max()
    };
    assert_eq!(most_at_once(&of(&exclusive)), Some(1), "the exclusive lock was held twice at once");
    assert!(most_at_once(&of(&limited)).is_some_and(|n| n <= 2), "concurrency key k exceeded 2");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_load_loses_nothing_acknowledged() -> TestResult {
    let Some(mut pg) = pg_cluster() else { return Ok(()) };
    let url = pg.url();
    let mut replicas: Vec<Replica> = (0..2).map(|_| Replica::new(&url)).collect();
    let endpoints: Vec<String> = replicas.iter().map(Replica::endpoint).collect();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let agent = recording_agent(&endpoints, runs.clone());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let submitting = submitter(endpoints.clone(), acked.clone(), stop.clone());
    leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    eventually(Duration::from_secs(20), "submits to go through", || async { acked.lock().await.len() >= 50 }).await;

    pg.restart()?;
    let before = acked.lock().await.len();
    // A replica that stepped down comes back, as under a supervisor.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().await.len() < before + 50 {
        assert!(Instant::now() < deadline, "work did not resume after the restart");
        for replica in &mut replicas {
            let exited = replica.process.as_mut().is_some_and(|p| matches!(p.child.try_wait(), Ok(Some(_))));
            if exited {
                replica.start();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    submitting.await?;

    let leader = leader_of(&replicas, Duration::from_secs(20)).await.ok_or("no replica leads")?;
    let client = Client::connect(replicas[leader].endpoint()).await?;
    let acked = acked.lock().await.clone();
    for id in &acked {
        let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id)).await??;
        assert_eq!(done.state, TaskState::Succeeded, "acknowledged task {id}");
    }
    println!("{} acknowledged across a PostgreSQL restart, all succeeded", acked.len());
    agent.cancel();
    Ok(())
}

/// Online backup and verify on a PostgreSQL store, and the backup restored
/// into a sled data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_is_backed_up_verified_and_restored_into_sled() -> TestResult {
    let Some(pg) = pg_cluster() else { return Ok(()) };
    let replica = Replica::new(&pg.url());
    let endpoint = replica.endpoint();
    let client = Client::connect(endpoint.clone()).await?;
    wait_until_serving(&client).await;
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let agent = recording_agent(std::slice::from_ref(&endpoint), runs);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(client.submit(NewTask::new("noop").build()).await?.id);
    }
    for id in &ids {
        client.wait(id).await?;
    }
    let muster = |args: Vec<String>| async move {
        tokio::process::Command::new(muster_bin()).args(args).env("RUST_LOG", "warn").output().await
    };
    let verified = muster(vec!["--server".into(), endpoint.clone(), "store".into(), "verify".into()]).await?;
    assert!(verified.status.success(), "online verify: {}", String::from_utf8_lossy(&verified.stderr));
    let file = replica.dir.path().join("pg.backup").display().to_string();
    let backup =
        muster(vec!["--server".into(), endpoint.clone(), "store".into(), "backup".into(), file.clone()]).await?;
    assert!(backup.status.success(), "backup: {}", String::from_utf8_lossy(&backup.stderr));
    let restored_dir = replica.dir.path().join("restored").display().to_string();
    let restore =
        muster(vec!["store".into(), "restore".into(), file, "--data-dir".into(), restored_dir.clone()]).await?;
    assert!(restore.status.success(), "restore: {}", String::from_utf8_lossy(&restore.stderr));
    agent.cancel();

    let (_sled, sled_endpoint) = spawn_serve_process(std::path::Path::new(&restored_dir), &[]);
    let restored = Client::connect(sled_endpoint).await?;
    for id in &ids {
        assert_eq!(restored.get(id).await?.state, TaskState::Succeeded, "{id} in the restored store");
    }
    Ok(())
}
