//! `muster bench`: Muster's performance targets, measured on this
//! machine. The server runs as its own process (its own temp data dir) so
//! its CPU time and memory can be read from `/proc`; agents, submitters
//! and watchers run in this process on the real SDK.
//!
//! Every scenario checks correctness as it goes: each task completes
//! exactly once and none is lost.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use muster_sdk::{Agent, AgentState, CancellationToken, Client, NewTask, Output, TaskState, proto};
use serde_json::{Value, json};
use tokio::sync::Mutex;

mod postgres;
mod soak;

/// Which measurements to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Submit N no-op tasks and drain them with A agents x S slots.
    BurnDown,
    /// Open-loop arrivals at a fixed rate; dispatch and result latency.
    Latency,
    /// K idle agents connected: server memory per agent, heartbeat cost.
    Agents,
    /// Restart with M stored tasks: time until serving and dispatching.
    Recovery,
    /// A steady stream of tasks for a long time with a short retention:
    /// data-directory size and server RSS over time, which must level off.
    Soak,
}

/// Durability modes to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Modes {
    Sync,
    Relaxed,
    Both,
}

/// `muster bench` options; the defaults are the sizes the targets name.
#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Scenarios to run (repeatable); all when omitted.
    #[arg(long, value_enum)]
    scenario: Vec<Scenario>,
    /// Durability modes for burn-down and latency.
    #[arg(long, value_enum, default_value_t = Modes::Both)]
    durability: Modes,
    /// burn-down: tasks to drain.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// burn-down and latency: agents.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// burn-down and latency: slots per agent.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// burn-down: tasks per Submit call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// burn-down: concurrent submitters.
    #[arg(long, default_value_t = 4)]
    submitters: usize,
    /// latency: arrivals per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// latency: how long arrivals last.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// agents: idle agents to connect.
    #[arg(long, default_value_t = 10_000)]
    idle_agents: usize,
    /// recovery: tasks in the store.
    #[arg(long, default_value_t = 1_000_000)]
    stored: usize,
    /// recovery: share of stored tasks that are unfinished.
    #[arg(long, default_value_t = 0.1)]
    unfinished: f64,
    /// soak: how long the stream of tasks lasts.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    soak_duration: Duration,
    /// soak: the server's retention of finished tasks.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    soak_retention: Duration,
    /// soak: tasks submitted per second.
    #[arg(long, default_value_t = 500)]
    soak_rate: u32,
    /// burn-down and latency: run the server on PostgreSQL. Each run gets
    /// a new database, created from this URL's connection (which needs
    /// CREATEDB) and dropped after.
    #[arg(long)]
    store: Option<String>,
    /// soak: how often the data directory and the server's memory are
    /// measured.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    soak_sample: Duration,
}

/// A `muster serve` child with its data directory.
struct ServerProcess {
    child: Child,
    endpoint: String,
    /// The PostgreSQL database of this run, dropped after the server.
    _scratch: Option<postgres::Scratch>,
    /// The HTTP listener's address (`/metrics`).
    http: String,
    /// The settings the server runs with, kept until it stops.
    _config: tempfile::NamedTempFile,
}

/// What the benchmarked server changes from the defaults: the per-caller
/// and per-session rate limits guard a server against hostile clients, and
/// the load generator, one caller that submits task by task, would measure
/// them instead of the server.
const BENCH_CONFIG: &str = "[limits]\nmax_requests_per_second = 1000000\nmax_agent_messages_per_second = 1000000\n";

impl ServerProcess {
    fn spawn(data_dir: &Path, durability: &str) -> anyhow::Result<Self> {
        Self::spawn_with(data_dir, durability, &[])
    }

    /// Like [`ServerProcess::spawn`], on a new PostgreSQL database made
    /// from `store` when there is one.
    async fn spawn_on(data_dir: &Path, durability: &str, store: Option<&str>) -> anyhow::Result<Self> {
        let Some(base) = store else { return Self::spawn(data_dir, durability) };
        let scratch = postgres::Scratch::create(base).await?;
        let mut server = Self::spawn_with(data_dir, durability, &["--store", &scratch.url])?;
        server._scratch = Some(scratch);
        Ok(server)
    }

    /// Like [`ServerProcess::spawn`], with more `muster serve` arguments.
    fn spawn_with(data_dir: &Path, durability: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the muster binary")?;
        let mut config = tempfile::NamedTempFile::new().context("writing the server's settings")?;
        std::io::Write::write_all(&mut config, BENCH_CONFIG.as_bytes()).context("writing the server's settings")?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--durability", durability])
            .arg("--config")
            .arg(config.path())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting muster serve")?;
        let stdout = child.stdout.take().context("no stdout from muster serve")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // Keep draining so the server never writes into a closed pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        // "muster serving gRPC on ADDR and HTTP on ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |word: &str| words.iter().position(|w| *w == word).and_then(|i| words.get(i + 2)).copied();
        let addr = after("gRPC").context("no gRPC address from muster serve")?;
        let http = after("HTTP").context("no HTTP address from muster serve")?.to_owned();
        Ok(Self { endpoint: format!("http://{addr}"), http, child, _config: config, _scratch: None })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.pid().to_string())
    }

    /// Seconds the server's writer has spent applying (and flushing)
    /// batches so far, from its `muster_store_commit_seconds` histogram.
    fn commit_seconds(&self) -> f64 {
        self.metric(&format!("{}_sum", muster_server::metrics::STORE_COMMIT)).unwrap_or(0.0)
    }

    /// The value of one series (name and labels as exposed) on /metrics.
    fn metric(&self, series: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let read = || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(&self.http)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.http)?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        };
        let text = read().ok()?;
        let prefix = format!("{series} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    /// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
    fn memory(&self, field: &str) -> u64 {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid())) else { return 0 };
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn kill(self) {
        drop(self);
    }
}

/// A scenario that fails part-way still stops the server it started.
impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU seconds of process `pid` ("self" for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Beyond this p99 from submit to handler start, the server is not keeping
/// up: tasks wait in a queue that grows.
const SUSTAINED_P99_MS: f64 = 100.0;
/// Beyond this from the last arrival to the last result, a backlog built up.
const SUSTAINED_DRAIN: Duration = Duration::from_secs(1);

/// What limited a run, from what each part used of its capacity over it.
fn bottleneck(server_cores: f64, load_cores: f64, commit_busy: f64) -> &'static str {
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    if commit_busy > 0.8 {
        "store commit time"
    } else if server_cores + load_cores > 0.85 * cores {
        if server_cores >= load_cores { "server CPU" } else { "load generator CPU" }
    } else {
        "none seen"
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn latency_summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "count": samples.len(),
        "p50_ms": percentile(&samples, 50.0),
        "p99_ms": percentile(&samples, 99.0),
        "p999_ms": percentile(&samples, 99.9),
        "max_ms": samples.last().copied().unwrap_or(0.0),
    })
}

/// No-op agents that count every execution per task id.
struct Fleet {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<Result<(), muster_sdk::Error>>>,
    runs: Arc<Mutex<HashMap<String, u32>>>,
    started: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Fleet {
    async fn start(
        client: &Client,
        endpoint: &str,
        agents: usize,
        slots: u32,
        capability: &str,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut handles = Vec::new();
        for i in 0..agents {
            let (runs, started) = (runs.clone(), started.clone());
            let agent = Agent::builder(format!("bench-{i}"))
                .server(endpoint)
                .slots(slots)
                .handler(capability, move |ctx| {
                    let (runs, started) = (runs.clone(), started.clone());
                    async move {
                        let now = Instant::now();
                        if let Some(n) = ctx.metadata().get("n") {
                            started.lock().await.insert(n.clone(), now);
                        }
                        *runs.lock().await.entry(ctx.task_id().to_owned()).or_default() += 1;
                        Ok(Output::empty())
                    }
                })
                .build()?;
            handles.push(tokio::spawn(agent.run_until(stop.child_token())));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.list_agents(capability).await?.len() < agents {
            if Instant::now() > deadline {
                bail!("the bench agents did not all register within 60s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { stop, handles, runs, started })
    }

    async fn stop(self) {
        self.stop.cancel();
        for handle in self.handles {
            let _ = handle.await;
        }
    }
}

/// When each task was seen, by task id.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Counts SUCCEEDED events (each is durable when published) and when they
/// arrived, by task id. The watch is open when this returns (the server
/// has subscribed and fixed its starting sequence), so no task submitted
/// afterwards can finish unseen.
async fn watch_successes(client: &Client) -> anyhow::Result<(Arc<AtomicU64>, Seen, tokio::task::JoinHandle<()>)> {
    let count = Arc::new(AtomicU64::new(0));
    let done: Seen = Arc::default();
    let (c, d) = (count.clone(), done.clone());
    let request = proto::WatchTasksRequest { states: vec![TaskState::Succeeded.into()], ..Default::default() };
    let mut events = client.watch(request).await.context("watching for finished tasks")?;
    let handle = tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            if event.state == TaskState::Succeeded {
                d.lock().await.insert(event.task_id, Instant::now());
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    Ok((count, done, handle))
}

async fn wait_for(count: &AtomicU64, target: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while count.load(Ordering::SeqCst) < target {
        if Instant::now() > deadline {
            bail!("only {} of {target} tasks finished within {limit:?}", count.load(Ordering::SeqCst));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Ends a run: checks the final state against what the fleet ran, then
/// stops the agents, the watcher and the server.
async fn finish(
    client: &Client,
    submitted: &HashSet<String>,
    fleet: Fleet,
    watcher: tokio::task::JoinHandle<()>,
    server: ServerProcess,
) -> anyhow::Result<Value> {
    let runs = fleet.runs.lock().await.clone();
    let check = verify(client, submitted, &runs).await?;
    fleet.stop().await;
    watcher.abort();
    server.kill();
    Ok(check)
}

/// Checks the final state: every submitted task SUCCEEDED, exactly once.
async fn verify(client: &Client, submitted: &HashSet<String>, runs: &HashMap<String, u32>) -> anyhow::Result<Value> {
    let mut succeeded = 0usize;
    let mut page_token = String::new();
    loop {
        let page = client
            .list(proto::ListTasksRequest {
                states: vec![TaskState::Succeeded.into()],
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?;
        succeeded += page.tasks.iter().filter(|t| submitted.contains(&t.id)).count();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let duplicates = runs.values().filter(|n| **n > 1).count();
    let missing = submitted.iter().filter(|id| !runs.contains_key(*id)).count();
    let ok = succeeded == submitted.len() && duplicates == 0 && missing == 0;
    if !ok {
        bail!(
            "correctness check failed: {succeeded} of {} SUCCEEDED, {duplicates} ran more than once, {missing} never ran",
            submitted.len()
        );
    }
    Ok(json!({"all_succeeded": true, "ran_exactly_once": true, "lost": 0}))
}

async fn burn_down(args: &BenchArgs, durability: &str) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::spawn_on(dir.path(), durability, args.store.as_deref()).await?;
    let client = Client::connect(server.endpoint.clone()).await?;
    let fleet = Fleet::start(&client, &server.endpoint, args.agents, args.slots, "noop").await?;
    let (succeeded, _, watcher) = watch_successes(&client).await?;
    let cpu_before = server.cpu_seconds();
    let started = Instant::now();
    let submitted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let batches = args.tasks.div_ceil(args.batch);
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..args.submitters.max(1) {
        let (client, submitted, next, tasks, batch) =
            (client.clone(), submitted.clone(), next.clone(), args.tasks, args.batch);
        submitters.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::SeqCst) as usize;
                if b >= batches {
                    return Ok::<_, anyhow::Error>(());
                }
                let count = batch.min(tasks - b * batch);
                let specs = (0..count).map(|_| NewTask::new("noop").build()).collect();
                let response = client.submit_many(specs).await?;
                submitted.lock().await.extend(response.tasks.into_iter().map(|t| t.id));
            }
        }));
    }
    for s in submitters {
        s.await??;
    }
    let submit_seconds = started.elapsed().as_secs_f64();
    wait_for(&succeeded, args.tasks as u64, Duration::from_secs(900)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu_before;
    let peak = server.memory("VmHWM");
    let submitted = submitted.lock().await.clone();
    let check = finish(&client, &submitted, fleet, watcher, server).await?;
    Ok(json!({
        "durability": durability,
        "store": if args.store.is_some() { "postgres" } else { "sled" },
        "tasks": args.tasks,
        "agents": args.agents,
        "slots_per_agent": args.slots,
        "submit_batch": args.batch,
        "submitters": args.submitters,
        "submit_tasks_per_second": args.tasks as f64 / submit_seconds,
        "tasks_per_second": args.tasks as f64 / seconds,
        "seconds": seconds,
        "server_cpu_seconds": cpu,
        "server_peak_rss_bytes": peak,
        "check": check,
    }))
}

async fn latency(args: &BenchArgs, durability: &str) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::spawn_on(dir.path(), durability, args.store.as_deref()).await?;
    let client = Client::connect(server.endpoint.clone()).await?;
    let fleet = Fleet::start(&client, &server.endpoint, args.agents, args.slots, "noop").await?;
    let (succeeded, done, watcher) = watch_successes(&client).await?;
    let total = (f64::from(args.rate) * args.duration.as_secs_f64()) as u64;
    let submit_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let ids: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let failures = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (server_cpu, load_cpu, commit) = (server.cpu_seconds(), cpu_seconds("self"), server.commit_seconds());
    let started = Instant::now();
    let mut inflight = Vec::with_capacity(total as usize);
    for n in 0..total {
        ticker.tick().await;
        let (client, submit_at, ids, failures) = (client.clone(), submit_at.clone(), ids.clone(), failures.clone());
        inflight.push(tokio::spawn(async move {
            let key = n.to_string();
            let at = Instant::now();
            submit_at.lock().await.insert(key.clone(), at);
            match client.submit(NewTask::new("noop").metadata("n", key.clone()).build()).await {
                Ok(task) => {
                    ids.lock().await.insert(task.id, key);
                }
                Err(_) => {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let arrival_seconds = started.elapsed().as_secs_f64();
    for task in inflight {
        let _ = task.await;
    }
    wait_for(&succeeded, total, Duration::from_secs(120)).await?;
    let window = started.elapsed().as_secs_f64();
    let drain_seconds = window - arrival_seconds;
    let server_cores = (server.cpu_seconds() - server_cpu) / window;
    let load_cores = (cpu_seconds("self") - load_cpu) / window;
    let commit_busy = (server.commit_seconds() - commit) / window;
    let submit_at = submit_at.lock().await.clone();
    let started_at = fleet.started.lock().await.clone();
    let ids = ids.lock().await.clone();
    let done = done.lock().await.clone();
    let to_start: Vec<f64> = submit_at
        .iter()
        .filter_map(|(n, at)| Some(started_at.get(n)?.duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    let to_durable: Vec<f64> = ids
        .iter()
        .filter_map(|(id, n)| Some(done.get(id)?.duration_since(*submit_at.get(n)?).as_secs_f64() * 1000.0))
        .collect();
    let achieved = total as f64 / arrival_seconds;
    let submitted: HashSet<String> = ids.keys().cloned().collect();
    let check = finish(&client, &submitted, fleet, watcher, server).await?;
    let to_start = latency_summary(to_start);
    // The server kept up: arrivals went out on time, none failed, tasks did
    // not wait in a growing queue, and no backlog was left at the end.
    let sustained = achieved >= f64::from(args.rate) * 0.95
        && failures.load(Ordering::SeqCst) == 0
        && to_start["p99_ms"].as_f64().is_some_and(|p99| p99 < SUSTAINED_P99_MS)
        && drain_seconds < SUSTAINED_DRAIN.as_secs_f64();
    Ok(json!({
        "durability": durability,
        "store": if args.store.is_some() { "postgres" } else { "sled" },
        "target_rate": args.rate,
        "achieved_rate": achieved,
        "sustained": sustained,
        "drain_seconds": drain_seconds,
        "server_cpu_cores": server_cores,
        "load_generator_cpu_cores": load_cores,
        "store_commit_busy": commit_busy,
        "bottleneck": bottleneck(server_cores, load_cores, commit_busy),
        "tasks": total,
        "submit_errors": failures.load(Ordering::SeqCst),
        "submit_to_handler_start": to_start,
        "submit_to_result_durable": latency_summary(to_durable),
        "check": check,
    }))
}

/// Lets this process (and the server it starts) hold many sockets.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn idle_agents(args: &BenchArgs) -> anyhow::Result<Value> {
    raise_fd_limit();
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::spawn(dir.path(), "sync")?;
    let client = Client::connect(server.endpoint.clone()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = server.memory("VmRSS");
    let stop = CancellationToken::new();
    let mut handles = Vec::with_capacity(args.idle_agents);
    let started = Instant::now();
    for i in 0..args.idle_agents {
        let agent = Agent::builder(format!("idle-{i}"))
            .server(server.endpoint.clone())
            .slots(1)
            .handler("idle", |_| async { Ok(Output::empty()) })
            .build()?;
        handles.push(tokio::spawn(agent.run_until(stop.child_token())));
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut connected = 0;
    while connected < args.idle_agents {
        if Instant::now() > deadline {
            bail!("only {connected} of {} agents connected within 300s", args.idle_agents);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        connected = client.list_agents("idle").await?.iter().filter(|a| a.state == AgentState::Connected).count();
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server.memory("VmRSS");
    let window = Duration::from_secs(10);
    let cpu_before = server.cpu_seconds();
    tokio::time::sleep(window).await;
    let cpu = server.cpu_seconds() - cpu_before;
    stop.cancel();
    for handle in handles {
        let _ = handle.await;
    }
    server.kill();
    Ok(json!({
        "agents": args.idle_agents,
        "connect_seconds": connect_seconds,
        "server_rss_bytes": rss_after,
        "server_rss_before_bytes": rss_before,
        "server_bytes_per_agent": (rss_after.saturating_sub(rss_before)) as f64 / args.idle_agents.max(1) as f64,
        "heartbeat_cpu_cores": cpu / window.as_secs_f64(),
    }))
}

fn fill_store(dir: &Path, stored: usize, unfinished: usize) -> anyhow::Result<()> {
    use muster_server::model::*;
    use muster_server::store::{SledStore, Store, Write};
    let store = SledStore::open(dir, None)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut generator = ulid::Generator::new();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..stored {
        let id = TaskId(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()));
        let done = i >= unfinished;
        let spec = TaskSpec {
            payload: bytes::Bytes::from_static(b"{\"job\":\"stored\"}"),
            content_type: "application/json".into(),
            ..TaskSpec::new("recover")
        };
        let task = Task {
            state: if done { TaskState::Succeeded } else { TaskState::Queued },
            attempt: u32::from(done),
            output: if done { bytes::Bytes::from_static(b"ok") } else { bytes::Bytes::new() },
            ..Task::new(id, spec, None, None, now)
        };
        batch.push(Write::Task(task));
        if batch.len() == 10_000 {
            store.write(&batch)?;
            batch.clear();
        }
    }
    store.write(&batch)?;
    store.flush()?;
    Ok(())
}

/// Time from process start until the first RPC answers, and until a
/// recovered task reaches an agent.
async fn time_restart(dir: &Path) -> anyhow::Result<(f64, f64, ServerProcess)> {
    let started = Instant::now();
    let server = ServerProcess::spawn(dir, "sync")?;
    let client = loop {
        if let Ok(client) = Client::connect(server.endpoint.clone()).await
            && client.list_queues().await.is_ok()
        {
            break client;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the server did not serve within 300s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let serving = started.elapsed().as_secs_f64();
    let first = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    let f = first.clone();
    let agent = Agent::builder("recovery")
        .server(server.endpoint.clone())
        .slots(16)
        .handler("recover", move |_| {
            let f = f.clone();
            async move {
                f.notify_one();
                Ok(Output::empty())
            }
        })
        .build()?;
    let handle = tokio::spawn(agent.run_until(stop.clone()));
    tokio::time::timeout(Duration::from_secs(300), first.notified()).await.context("no recovered task dispatched")?;
    let dispatching = started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = handle.await;
    drop(client);
    Ok((serving, dispatching, server))
}

async fn recovery(args: &BenchArgs) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let unfinished = (args.stored as f64 * args.unfinished) as usize;
    let fill = Instant::now();
    fill_store(dir.path(), args.stored, unfinished)?;
    let fill_seconds = fill.elapsed().as_secs_f64();
    let (first_serving, first_dispatching, server) = time_restart(dir.path()).await?;
    // The crash the target is about: kill -9 while serving, then restart.
    server.kill();
    let (serving, dispatching, server) = time_restart(dir.path()).await?;
    let rss = server.memory("VmRSS");
    server.kill();
    Ok(json!({
        "stored_tasks": args.stored,
        "unfinished_tasks": unfinished,
        "fill_seconds": fill_seconds,
        "first_start": {"serving_seconds": first_serving, "dispatching_seconds": first_dispatching},
        "restart_after_kill": {"serving_seconds": serving, "dispatching_seconds": dispatching},
        "server_rss_bytes": rss,
    }))
}

fn summary_line(name: &str, result: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    match name {
        "burn_down" => format!(
            "burn-down  {:<8} {:<8} {:>9.0} tasks/s end to end, submit {:>9.0}/s, server cpu {:.1}s, peak rss {:.0} MiB",
            result["durability"].as_str().unwrap_or(""),
            result["store"].as_str().unwrap_or(""),
            f(&result["tasks_per_second"]),
            f(&result["submit_tasks_per_second"]),
            f(&result["server_cpu_seconds"]),
            f(&result["server_peak_rss_bytes"]) / 1048576.0
        ),
        "latency" => format!(
            "latency    {:<8} {:<8} {:>6.0}/s (sustained: {}, bottleneck: {}), handler start p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, durable result p99 {:.2} ms",
            result["durability"].as_str().unwrap_or(""),
            result["store"].as_str().unwrap_or(""),
            f(&result["achieved_rate"]),
            result["sustained"],
            result["bottleneck"].as_str().unwrap_or(""),
            f(&result["submit_to_handler_start"]["p50_ms"]),
            f(&result["submit_to_handler_start"]["p99_ms"]),
            f(&result["submit_to_handler_start"]["p999_ms"]),
            f(&result["submit_to_result_durable"]["p99_ms"])
        ),
        "agents" => format!(
            "agents     {} idle agents: server rss {:.0} MiB ({:.1} KiB per agent), heartbeats use {:.3} cores",
            result["agents"],
            f(&result["server_rss_bytes"]) / 1048576.0,
            f(&result["server_bytes_per_agent"]) / 1024.0,
            f(&result["heartbeat_cpu_cores"])
        ),
        "recovery" => format!(
            "recovery   {} stored ({} unfinished): serving after {:.2}s, dispatching after {:.2}s",
            result["stored_tasks"],
            result["unfinished_tasks"],
            f(&result["restart_after_kill"]["serving_seconds"]),
            f(&result["restart_after_kill"]["dispatching_seconds"])
        ),
        "soak" => soak::summary_line(result),
        _ => String::new(),
    }
}

/// Runs the chosen scenarios and prints a JSON report (and, for tables, a
/// human summary on stderr).
pub(crate) async fn run(args: BenchArgs, json_only: bool) -> anyhow::Result<()> {
    let scenarios = if args.scenario.is_empty() {
        vec![Scenario::BurnDown, Scenario::Latency, Scenario::Agents, Scenario::Recovery]
    } else {
        args.scenario.clone()
    };
    if args.store.is_some() && scenarios.iter().any(|s| !matches!(s, Scenario::BurnDown | Scenario::Latency)) {
        bail!("--store applies to the burn-down and latency scenarios: name them with --scenario");
    }
    let modes: &[&str] = match args.durability {
        Modes::Sync => &["sync"],
        Modes::Relaxed => &["relaxed"],
        Modes::Both => &["sync", "relaxed"],
    };
    let mut report = serde_json::Map::new();
    let mut lines = Vec::new();
    for scenario in scenarios {
        let (name, results) = match scenario {
            Scenario::BurnDown => {
                let mut results = Vec::new();
                for mode in modes {
                    results.push(burn_down(&args, mode).await?);
                }
                ("burn_down", results)
            }
            Scenario::Latency => {
                let mut results = Vec::new();
                for mode in modes {
                    results.push(latency(&args, mode).await?);
                }
                ("latency", results)
            }
            Scenario::Agents => ("agents", vec![idle_agents(&args).await?]),
            Scenario::Recovery => ("recovery", vec![recovery(&args).await?]),
            Scenario::Soak => ("soak", vec![soak::soak(&args, json_only).await?]),
        };
        for result in &results {
            let line = summary_line(name, result);
            if !json_only {
                eprintln!("{line}");
            }
            lines.push(line);
        }
        report.insert(name.to_owned(), Value::Array(results));
    }
    let report = json!({
        "muster_bench": 1,
        "version": env!("CARGO_PKG_VERSION"),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "scenarios": report,
    });
    println!("{report}");
    Ok(())
}
