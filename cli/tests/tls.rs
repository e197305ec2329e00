//! TLS and mutual TLS end to end, with certificates made here by rcgen: the
//! SDK's agent and client, the `muster` CLI and the shell agent process over
//! TLS; a client certificate mapped to an agent identity; an untrusted
//! client certificate refused; certificates reloaded without dropping the
//! sessions; and connections that never speak closed after the handshake
//! timeout so they cannot starve real clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use muster_sdk::{Agent, AgentState, Client, Credentials, NewTask, Output, TaskState};
use muster_server::{CertIdentity, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tokio::io::AsyncReadExt;

const ADMIN_SECRET: &str = "muster_tls_test_admin_secret_0123456789abcdef";

/// A CA that signs server and client certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf for `common_name`, valid for 127.0.0.1 and localhost; PEM
    /// certificate and key.
    fn issue(&self, common_name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("muster test ca");
        write(dir.path(), "ca.pem", &ca.cert.pem());
        let (cert, key) = ca.issue("muster-server");
        write(dir.path(), "server.pem", &cert);
        write(dir.path(), "server.key", &key);
        for client in ["agent-1", "cli"] {
            let (cert, key) = ca.issue(client);
            write(dir.path(), &format!("{client}.pem"), &cert);
            write(dir.path(), &format!("{client}.key"), &key);
        }
        Self { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self, name: &str) -> Credentials {
        Credentials::new()
            .tls_ca_file(self.path("ca.pem"))
            .unwrap()
            .tls_identity_files(self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")))
            .unwrap()
    }
}

/// A server with TLS, mutual TLS (client certificates required) and
/// authentication; certificate `agent-1` acts as an agent for `echo` and
/// `shell`.
async fn spawn_tls_server(pki: &Pki) -> (TestServer, String) {
    spawn_server_tuned(pki, |_| {}).await
}

async fn spawn_server_tuned(pki: &Pki, tweak: impl FnOnce(&mut muster_server::ServerConfig)) -> (TestServer, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = make_config(dir.path());
    config.tls = Some(TlsConfig {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
        reload_interval: Duration::from_millis(100),
    });
    config.auth.bootstrap_token = Some(ADMIN_SECRET.into());
    config.auth.client_certs = vec![CertIdentity {
        common_name: "agent-1".into(),
        role: muster_server::auth::Role::Agent,
        name: None,
        queues: vec![],
        capabilities: vec!["echo".into(), "shell".into()],
        labels: Default::default(),
    }];
    tweak(&mut config);
    let server = muster_server::start(config, muster_sdk::CancellationToken::new()).await.unwrap();
    let endpoint = format!("https://127.0.0.1:{}", server.grpc_addr().port());
    (TestServer { server: Some(server), endpoint: endpoint.clone(), dir }, endpoint)
}

fn echo_agent(
    endpoint: &str,
    credentials: Credentials,
) -> (muster_sdk::CancellationToken, tokio::task::JoinHandle<Result<(), muster_sdk::Error>>) {
    let agent = Agent::builder("tls-echo")
        .server(endpoint.to_owned())
        .credentials(credentials)
        .handler("echo", |ctx| async move { Ok(Output::from(ctx.payload().to_vec())) })
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .unwrap();
    let stop = muster_sdk::CancellationToken::new();
    (stop.clone(), tokio::spawn(agent.run_until(stop)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_cli_and_shell_agent_work_over_mutual_tls() {
    let pki = Pki::new();
    let (_server, endpoint) = spawn_tls_server(&pki).await;
    // The agent authenticates by its certificate alone.
    let (stop, running) = echo_agent(&endpoint, pki.client("agent-1"));
    let admin = Client::connect_with(endpoint.clone(), &pki.client("cli").token(ADMIN_SECRET).unwrap()).await.unwrap();
    wait_for_agents(&admin, "echo", 1).await;
    let task = admin.submit(NewTask::new("echo").payload("over tls").build()).await.unwrap();
    let done = admin.wait(&task.id).await.unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, b"over tls");

    // The CLI, with flags.
    let tls_args = |pki: &Pki| {
        vec![
            "--tls-ca".to_owned(),
            pki.path("ca.pem").display().to_string(),
            "--tls-cert".to_owned(),
            pki.path("cli.pem").display().to_string(),
            "--tls-key".to_owned(),
            pki.path("cli.key").display().to_string(),
        ]
    };
    let mut cli = Command::new(muster_bin());
    cli.args(["--server", &endpoint, "--token", ADMIN_SECRET, "--output", "json"]).args(tls_args(&pki)).args([
        "task",
        "submit",
        "echo",
        "--payload",
        "from the cli",
        "--wait",
    ]);
    // The server runs in this test's runtime: wait for the CLI off it.
    let output = tokio::task::spawn_blocking(move || cli.output()).await.unwrap().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["state"], "SUCCEEDED");
    assert_eq!(json["submitted_by"], "admin");

    // The shell agent process, with the same certificate, through the
    // environment.
    let mut shell = Process {
        child: Command::new(muster_bin())
            .args(["--server", &endpoint, "shell-agent", "--name", "tls-shell", "--slots", "1"])
            .env("MUSTER_TLS_CA", pki.path("ca.pem"))
            .env("MUSTER_TLS_CERT", pki.path("agent-1.pem"))
            .env("MUSTER_TLS_KEY", pki.path("agent-1.key"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    };
    wait_for_agents(&admin, "shell", 1).await;
    let task = admin.submit(NewTask::new("shell").payload(r#"{"argv":["echo","hi"]}"#).build()).await.unwrap();
    assert_eq!(admin.wait(&task.id).await.unwrap().state, TaskState::Succeeded);
    shell.kill9();
    stop.cancel();
    let _ = running.await;
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused() {
    let pki = Pki::new();
    let (_server, endpoint) = spawn_tls_server(&pki).await;
    let stranger = Ca::new("stranger ca");
    let (cert, key) = stranger.issue("agent-1");
    let untrusted = Credentials::new()
        .tls_ca_file(pki.path("ca.pem"))
        .unwrap()
        .tls_identity_pem(cert, key)
        .token(ADMIN_SECRET)
        .unwrap();
    let refused = match Client::connect_with(endpoint.clone(), &untrusted).await {
        Err(_) => true,
        Ok(client) => client.list_queues().await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA must not get in");
    let no_certificate = Credentials::new().tls_ca_file(pki.path("ca.pem")).unwrap().token(ADMIN_SECRET).unwrap();
    let refused = match Client::connect_with(endpoint.clone(), &no_certificate).await {
        Err(_) => true,
        Ok(client) => client.list_queues().await.is_err(),
    };
    assert!(refused, "mutual TLS requires a client certificate");
    // Plaintext to a TLS port gets nowhere either.
    let plain = endpoint.replace("https://", "http://");
    let refused = match Client::connect(plain).await {
        Err(_) => true,
        Ok(client) => client.list_queues().await.is_err(),
    };
    assert!(refused);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_without_dropping_sessions() {
    check_renewal(Reload::Poll).await;
}

#[tokio::test]
async fn sighup_reloads_a_renewed_certificate_without_waiting_for_the_poll() {
    check_renewal(Reload::Hangup).await;
}

/// How the server learns of renewed files.
#[derive(Clone, Copy, PartialEq)]
enum Reload {
    /// Its poll of the files (every 100 ms here).
    Poll,
    /// SIGHUP; the poll is an hour away.
    Hangup,
}

async fn check_renewal(reload: Reload) {
    // A SIGHUP to this process must never take its default action (exit),
    // whatever the server's own handler is doing at that moment.
    let _caught = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let pki = Pki::new();
    let (server, endpoint) = spawn_server_tuned(&pki, |config| {
        if reload == Reload::Hangup
            && let Some(tls) = config.tls.as_mut()
        {
            tls.reload_interval = Duration::from_secs(3600);
        }
    })
    .await;
    let (stop, running) = echo_agent(&endpoint, pki.client("agent-1"));
    let admin = Client::connect_with(endpoint.clone(), &pki.client("cli").token(ADMIN_SECRET).unwrap()).await.unwrap();
    wait_for_agents(&admin, "echo", 1).await;
    let agent_id = admin.list_agents("echo").await.unwrap()[0].id.clone();

    // A new server certificate from a new CA (which also signs clients).
    let renewed = Ca::new("renewed ca");
    let (cert, key) = renewed.issue("muster-server");
    let ca_both = format!("{}{}", pki.ca.cert.pem(), renewed.cert.pem());
    write(pki.dir.path(), "server.pem", &cert);
    write(pki.dir.path(), "server.key", &key);
    write(pki.dir.path(), "ca.pem", &ca_both);
    let renewed_only = Credentials::new()
        .tls_ca_pem(renewed.cert.pem())
        .tls_identity_files(pki.path("cli.pem"), pki.path("cli.key"))
        .unwrap()
        .token(ADMIN_SECRET)
        .unwrap();
    eventually(Duration::from_secs(10), "new connections get the renewed certificate", || {
        let (endpoint, renewed_only) = (endpoint.clone(), renewed_only.clone());
        if reload == Reload::Hangup {
            // SAFETY: kill(2) on this process's own id with a caught signal.
            unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        }
        async move {
            match Client::connect_with(endpoint, &renewed_only).await {
                Ok(client) => client.list_queues().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    // The agent's session was never dropped: same id, still connected, and
    // it still runs work.
    let agents = admin.list_agents("echo").await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].id, agent_id);
    assert_eq!(agents[0].state, AgentState::Connected);
    let task = admin.submit(NewTask::new("echo").payload("after reload").build()).await.unwrap();
    assert_eq!(admin.wait(&task.id).await.unwrap().state, TaskState::Succeeded);
    stop.cancel();
    let _ = running.await;
    drop(server);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_handshake_timeout_and_cannot_starve_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = make_config(dir.path());
    config.limits.max_connections = 8;
    config.limits.handshake_timeout = Duration::from_millis(500);
    let server = muster_server::start(config, muster_sdk::CancellationToken::new()).await.unwrap();
    let addr = server.grpc_addr();
    // Fill every slot with connections that never speak.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    // A real client gets in once the idle ones are shed.
    let client = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(client) = Client::connect(format!("http://{addr}")).await
                && client.list_queues().await.is_ok()
            {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a real client connects once the idle connections time out");
    assert!(started.elapsed() >= Duration::from_millis(400), "the slots were full until the timeout");
    for mut stream in idle {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "an idle connection was closed by the server");
    }
    client.list_queues().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_http_listener_speaks_tls_with_client_certificates_and_keeps_its_gate() {
    let pki = Pki::new();
    let (server, _) = spawn_tls_server(&pki).await;
    let port = server.server.as_ref().unwrap().http_addr().port();
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let ca = reqwest::Certificate::from_pem(pki.ca.cert.pem().as_bytes()).unwrap();
    let identity = format!(
        "{}{}",
        std::fs::read_to_string(pki.path("cli.pem")).unwrap(),
        std::fs::read_to_string(pki.path("cli.key")).unwrap()
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
        .build()
        .unwrap();
    let status = |request: reqwest::RequestBuilder| async move { request.send().await.unwrap().status().as_u16() };
    assert_eq!(status(client.get(url("/healthz"))).await, 200);
    assert_eq!(status(client.get(url("/metrics"))).await, 401, "the gate still asks for a token");
    assert_eq!(status(client.get(url("/metrics")).bearer_auth(ADMIN_SECRET)).await, 200);
    // Without a client certificate the handshake is refused; plaintext gets
    // no HTTP answer at all.
    let anonymous = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    assert!(anonymous.get(url("/healthz")).send().await.is_err());
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/healthz")).send().await;
    assert!(plain.is_err(), "{plain:?}");
}
