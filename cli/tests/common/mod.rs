//! Helpers shared by the integration tests: real servers on 127.0.0.1:0
//! with sled in a temp dir (or a private PostgreSQL cluster), real SDK
//! agents, real `muster` processes, and a TCP proxy that can cut
//! connections.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_sdk::{
    Agent, AgentState, CancellationToken, Client, Output, Task, TaskContext, TaskError, TaskState, proto,
};
use muster_server::{RunningServer, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A server in this process, with its data in a temp dir.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
}

/// Short leases so loss and resume take seconds, not minutes.
pub fn make_config(dir: &Path) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        lease_ttl: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        cancel_grace: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

/// A private PostgreSQL cluster for one test; `None` (said loudly) when
/// PostgreSQL is not installed and not required.
pub fn pg_cluster() -> Option<muster_server::pg_cluster::PgCluster> {
    muster_server::pg_cluster::PgCluster::start().unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
}

/// A server in this process on the PostgreSQL store at `url`.
pub async fn spawn_server_on_postgres(url: &str) -> TestServer {
    let url = muster_server::StoreUrl(url.to_owned());
    spawn_server_with(|c| {
        c.store = Some(url);
        // Shorter than the agents' lease of the tests.
        c.leader_lease_ttl = Duration::from_secs(1);
    })
    .await
}

pub async fn spawn_server() -> TestServer {
    spawn_server_with(|_| {}).await
}

pub async fn spawn_server_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = make_config(dir.path());
    tweak(&mut config);
    let server = muster_server::start(config, CancellationToken::new()).await.unwrap();
    let endpoint = format!("http://{}", server.grpc_addr());
    TestServer { server: Some(server), endpoint, dir }
}

impl TestServer {
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoint.clone()).await.unwrap()
    }
}

/// An SDK agent running in this process until the returned token fires.
pub fn spawn_agent<F, Fut>(
    endpoint: &str,
    name: &str,
    capability: &str,
    labels: &[(&str, &str)],
    slots: u32,
    handler: F,
) -> (CancellationToken, JoinHandle<Result<(), muster_sdk::Error>>)
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, TaskError>> + Send + 'static,
{
    let mut builder = Agent::builder(name)
        .server(endpoint)
        .slots(slots)
        .handler(capability, handler)
        .drain_grace(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    for (k, v) in labels {
        builder = builder.label(*k, *v);
    }
    let agent = builder.build().unwrap();
    let token = CancellationToken::new();
    let handle = tokio::spawn(agent.run_until(token.clone()));
    (token, handle)
}

/// Waits until the server at `client` serves (a replica on PostgreSQL
/// stands by until the lease of the one before it expires).
pub async fn wait_until_serving(client: &Client) {
    eventually(Duration::from_secs(30), "the server to lead and serve", || async {
        !matches!(client.get("01J00000000000000000000000").await,
            Err(muster_sdk::Error::Status(s)) if s.code() == tonic::Code::Unavailable)
    })
    .await;
}

/// Waits until `check` holds, polling; fails after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_for_state(client: &Client, id: &str, state: TaskState) -> Task {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let task = client.get(id).await.unwrap();
        if task.state == state {
            return task;
        }
        assert!(tokio::time::Instant::now() < deadline, "task {id} never reached {state:?}: {task:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_for_agents(client: &Client, capability: &str, count: usize) {
    eventually(Duration::from_secs(10), &format!("{count} agents for {capability}"), || async {
        client
            .list_agents(capability)
            .await
            .map(|a| a.iter().filter(|a| a.state == AgentState::Connected).count() >= count)
            .unwrap_or(false)
    })
    .await;
}

/// A TCP proxy in front of the server: `cut` resets every open
/// connection, `pause` refuses new ones until `resume`.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (conns, pause) = (connections.clone(), paused.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if pause.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let handle = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(handle);
            }
        });
        Self { addr, connections, paused, accept }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    pub fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

pub fn muster_bin() -> &'static str {
    env!("CARGO_BIN_EXE_muster")
}

/// A `muster` child process, killed when dropped.
pub struct Process {
    pub child: Child,
}

impl Process {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `muster serve` on ephemeral ports and returns it with its gRPC
/// endpoint, read from its first line of output.
pub fn spawn_serve_process(data_dir: &Path, extra: &[&str]) -> (Process, String) {
    let listen = if extra.contains(&"--listen") { vec![] } else { vec!["--listen", "127.0.0.1:0"] };
    let http = if extra.contains(&"--http-listen") { vec![] } else { vec!["--http-listen", "127.0.0.1:0"] };
    let mut child = Command::new(muster_bin())
        .arg("serve")
        .args(listen)
        .args(http)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected first line from muster serve: {line:?}"))
        .to_owned();
    (Process { child }, format!("http://{addr}"))
}

/// Starts `muster shell-agent` against `endpoint`.
pub fn spawn_shell_agent_process(endpoint: &str, name: &str) -> Process {
    shell_agent_process(endpoint, name, &[])
}

/// Starts `muster shell-agent` against `endpoint`, serving metrics on a
/// free port (announced to the server, found through `/sd/agents`).
pub fn spawn_shell_agent_process_with_metrics(endpoint: &str, name: &str) -> Process {
    shell_agent_process(endpoint, name, &["--metrics-listen", "127.0.0.1:0"])
}

fn shell_agent_process(endpoint: &str, name: &str, extra: &[&str]) -> Process {
    let child = Command::new(muster_bin())
        .args(["--server", endpoint, "shell-agent", "--name", name, "--slots", "2"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Process { child }
}

/// The first message of a raw session: capability `raw`.
pub fn register(name: &str, slots: u32) -> proto::AgentMessage {
    proto::AgentMessage {
        msg: Some(proto::agent_message::Msg::Register(proto::Register {
            name: name.into(),
            capabilities: vec!["raw".into()],
            slots,
            ..Default::default()
        })),
    }
}

/// A hand-driven agent session: what the SDK does, one message at a time.
pub async fn open_session(
    endpoint: &str,
    first: proto::AgentMessage,
) -> (tokio::sync::mpsc::Sender<proto::AgentMessage>, Result<tonic::Streaming<proto::ServerMessage>, tonic::Status>) {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(first).await.expect("send the first message");
    let response = proto::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, response)
}
