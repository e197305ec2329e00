//! `muster serve` and `muster dev`: the server configuration in layers
//! (defaults, TOML file, `MUSTER_*` environment, flags) and the process
//! lifecycle around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use muster_server::{Durability, ServerConfig, TlsConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Prints a line of the start-up banner. A reader that went away (a
/// supervisor that read only the first line) is no reason to stop serving.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Settings shared by `serve` and `dev`. Each flag also reads a `MUSTER_*`
/// variable; both override the TOML file given by `--config`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    /// A TOML file with any ServerConfig fields (see README).
    #[arg(long, env = "MUSTER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "MUSTER_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// HTTP listen address (/healthz).
    #[arg(long, env = "MUSTER_HTTP_LISTEN")]
    pub(crate) http_listen: Option<SocketAddr>,
    /// Where the sled store lives, with the server's own files (the
    /// admin token) whatever the store.
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// A PostgreSQL store instead of sled: postgres://USER@HOST:PORT/DB.
    #[arg(long, env = "MUSTER_STORE")]
    pub(crate) store: Option<String>,
    /// With --store, how long the leader lease lasts unless renewed, e.g.
    /// 5s (the default): a standby takes over within about this long.
    #[arg(long, env = "MUSTER_LEADER_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub(crate) leader_lease_ttl: Option<Duration>,
    /// The gRPC endpoint standbys send clients to while this replica
    /// leads (default: the bound gRPC address).
    #[arg(long, env = "MUSTER_ADVERTISE")]
    pub(crate) advertise: Option<String>,
    /// sync: acknowledge after a flush (default); relaxed: flush periodically.
    #[arg(long, env = "MUSTER_DURABILITY")]
    pub(crate) durability: Option<Durability>,
    /// An agent silent (or disconnected) this long is lost, e.g. 15s.
    #[arg(long, env = "MUSTER_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub(crate) lease_ttl: Option<Duration>,
    /// How often agents send heartbeats, e.g. 5s.
    #[arg(long, env = "MUSTER_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub(crate) heartbeat_interval: Option<Duration>,
    /// How long a cancelled running task has to stop, e.g. 30s.
    #[arg(long, env = "MUSTER_CANCEL_GRACE", value_parser = humantime::parse_duration)]
    pub(crate) cancel_grace: Option<Duration>,
    /// How long finished tasks (with their events, logs and idempotency
    /// keys) are kept, e.g. 7d (the default); 0 keeps them forever.
    #[arg(long, env = "MUSTER_RETENTION", value_parser = parse_retention)]
    pub(crate) retention: Option<Duration>,
    /// PEM CA bundle of client certificates: with it, every client must
    /// present a certificate it signs (mutual TLS).
    #[arg(long, env = "MUSTER_TLS_CLIENT_CA")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Require a credential on every call (on by default with TLS);
    /// --auth=false turns it off.
    #[arg(long, env = "MUSTER_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) auth: Option<bool>,
    /// Allow listening beyond loopback without TLS and authentication.
    #[arg(long, env = "MUSTER_INSECURE")]
    pub(crate) insecure: bool,
}

/// A retention: a duration such as `7d` or `30s`, or `0` for forever.
fn parse_retention(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" => Ok(Duration::ZERO),
        other => humantime::parse_duration(other).map_err(|e| format!("{e} (a duration such as 7d, or 0 for forever)")),
    }
}

/// The server's own certificate and key (the global --tls-cert and
/// --tls-key).
pub(crate) type TlsFiles = (Option<PathBuf>, Option<PathBuf>);

impl ServeArgs {
    /// The layered configuration, checked; `data_dir` is the default data
    /// directory when neither the file, the environment nor a flag sets one.
    pub(crate) fn load(&self, default_data_dir: &str, tls_files: TlsFiles) -> anyhow::Result<ServerConfig> {
        let config = self.layered(default_data_dir, tls_files)?;
        config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        Ok(config)
    }

    /// `muster dev`'s configuration: the layers, then plaintext and without
    /// authentication whatever they say, so only on loopback addresses.
    pub(crate) fn load_dev(&self) -> anyhow::Result<ServerConfig> {
        if self.insecure || self.auth == Some(true) || self.tls_client_ca.is_some() {
            anyhow::bail!(
                "muster dev is always plaintext and without authentication, on loopback only: --insecure, --auth \
                 and --tls-client-ca are for muster serve"
            );
        }
        let mut config = self.layered(".muster/dev", (None, None))?;
        for (field, addr) in [("listen", config.listen), ("http_listen", config.http_listen)] {
            if !addr.ip().is_loopback() {
                anyhow::bail!(
                    "invalid configuration: {field}: muster dev serves plaintext without authentication, so only \
                     on a loopback address, not {addr}; run muster serve with TLS and tokens to be reachable from \
                     other machines"
                );
            }
        }
        config.tls = None;
        config.auth = muster_server::AuthConfig { enabled: Some(false), ..Default::default() };
        config.insecure = false;
        config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        Ok(config)
    }

    /// The layers, unchecked.
    fn layered(&self, default_data_dir: &str, tls_files: TlsFiles) -> anyhow::Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ServerConfig { data_dir: PathBuf::from(default_data_dir), ..ServerConfig::default() },
        };
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.http_listen {
            config.http_listen = v;
        }
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &self.store {
            config.store = Some(muster_server::StoreUrl(v.clone()));
        }
        if let Some(v) = self.leader_lease_ttl {
            config.leader_lease_ttl = v;
        }
        if let Some(v) = &self.advertise {
            config.advertise = Some(v.clone());
        }
        if let Some(v) = self.durability {
            config.durability = v;
        }
        if let Some(v) = self.lease_ttl {
            config.lease_ttl = v;
        }
        if let Some(v) = self.heartbeat_interval {
            config.heartbeat_interval = v;
        }
        if let Some(v) = self.cancel_grace {
            config.cancel_grace = v;
        }
        if let Some(v) = self.retention {
            config.retention.finished_tasks = v;
        }
        match (tls_files, &mut config.tls) {
            ((Some(cert), Some(key)), tls) => {
                let previous = tls.take();
                *tls = Some(TlsConfig {
                    cert,
                    key,
                    client_ca: previous.as_ref().and_then(|t| t.client_ca.clone()),
                    reload_interval: previous.map_or(Duration::from_secs(10), |t| t.reload_interval),
                });
            }
            ((None, None), _) => {}
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        if let Some(ca) = &self.tls_client_ca {
            match &mut config.tls {
                Some(tls) => tls.client_ca = Some(ca.clone()),
                None => anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key"),
            }
        }
        if let Some(v) = self.auth {
            config.auth.enabled = Some(v);
        }
        if let Some(token) = std::env::var("MUSTER_BOOTSTRAP_TOKEN").ok().filter(|t| !t.is_empty()) {
            config.auth.bootstrap_token = Some(token);
        }
        config.insecure |= self.insecure;
        Ok(config)
    }
}

/// A root token cancelled by SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        info!("shutting down");
        trigger.cancel();
    });
    token
}

/// Raises the soft limit on open files to the hard limit: each connection
/// is a descriptor, and the common default of 1,024 would cap the server
/// far below its `max_connections`.
fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit only read and write `limit`.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// Makes every file the process creates from now on its user's alone
/// (umask 0077): the store's later files (snapshots, blobs) hold payloads.
/// Not for `muster dev`, whose shell agent's commands would inherit it;
/// its data directory is 0700 all the same.
fn owner_only_files() {
    #[cfg(unix)]
    // SAFETY: umask only replaces the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// `muster serve`: the control plane until a signal.
pub(crate) async fn serve(args: &ServeArgs, tls_files: TlsFiles) -> anyhow::Result<()> {
    let config = args.load("muster-data", tls_files)?;
    raise_open_files_limit();
    owner_only_files();
    let (tls, auth, data_dir) = (config.tls.is_some(), config.auth_enabled(), config.data_dir.clone());
    let store = config.store.clone();
    let shutdown = shutdown_on_signals();
    let server = muster_server::start(config, shutdown).await?;
    say!("muster serving gRPC on {} and HTTP on {}", server.grpc_addr(), server.http_addr());
    if tls || auth {
        say!("  tls {}, authentication {}", if tls { "on" } else { "off" }, if auth { "on" } else { "off" });
    }
    if let Some(store) = &store {
        say!("  store {store:?}");
    }
    let token_file = data_dir.join(muster_server::ADMIN_TOKEN_FILE);
    if auth && token_file.exists() {
        say!("  the bootstrap admin token is in {}", token_file.display());
    }
    server.wait().await?;
    Ok(())
}

/// `muster dev`: the server with a local data directory plus the shell
/// agent and the HTTP agent (loopback only), in one process.
pub(crate) async fn dev(args: &ServeArgs, agent_slots: u32) -> anyhow::Result<()> {
    // Plaintext on loopback, without authentication: a development box.
    let config = args.load_dev()?;
    let data_dir = config.data_dir.clone();
    let shutdown = shutdown_on_signals();
    let server = muster_server::start(config, shutdown.clone()).await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    let shell = muster_shell_agent::ShellAgentConfig {
        server: endpoint.clone(),
        name: "dev-shell".into(),
        slots: agent_slots,
        metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ..muster_shell_agent::ShellAgentConfig::default()
    };
    let agent = muster_shell_agent::build_agent(&shell)?;
    let agent_token = shutdown.child_token();
    let agent_task = tokio::spawn(agent.run_until(agent_token));
    // The HTTP agent may reach this machine only.
    let http = muster_http_agent::HttpAgentConfig {
        server: endpoint.clone(),
        name: "dev-http".into(),
        allow: ["127.0.0.1", "localhost", "[::1]"].map(String::from).to_vec(),
        ..muster_http_agent::HttpAgentConfig::default()
    };
    let http_agent = muster_http_agent::build_agent(&http)?;
    let http_task = tokio::spawn(http_agent.run_until(shutdown.child_token()));

    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "muster".into());
    say!("Muster is running (Ctrl-C to stop).");
    say!("  gRPC    {endpoint}");
    say!("  HTTP    http://{}/healthz", server.http_addr());
    say!("  metrics http://{}/metrics (agents: http://{}/sd/agents)", server.http_addr(), server.http_addr());
    say!("  data    {}", data_dir.display());
    say!("  access  plaintext, no authentication, this machine only");
    say!("  agents  dev-shell: capability shell, {agent_slots} slots");
    say!("          dev-http: capability http, loopback hosts only");
    say!();
    say!("Try, from another terminal:");
    say!("  {exe} --server {endpoint} task submit shell --payload '{{\"argv\":[\"echo\",\"hello\"]}}' --wait");
    server.wait().await?;
    match agent_task.await {
        Ok(result) => result?,
        Err(e) => anyhow::bail!("the shell agent task failed: {e}"),
    }
    match http_task.await {
        Ok(result) => result?,
        Err(e) => anyhow::bail!("the http agent task failed: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn load(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let cli = Cli::try_parse_from(std::iter::once("muster").chain(args.iter().copied()))?;
        cli.serve.load("default-dir", (None, None))
    }

    fn load_dev(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let cli = Cli::try_parse_from(std::iter::once("muster").chain(args.iter().copied()))?;
        cli.serve.load_dev()
    }

    #[test]
    fn dev_is_plaintext_and_open_on_loopback_whatever_the_file_and_flags_say() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let secured = dir.path().join("secured.toml");
        std::fs::write(
            &secured,
            "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\n[auth]\nenabled = true\n\n\
             [[auth.client_certs]]\ncommon_name = \"render-07\"\nrole = \"agent\"\n",
        )?;
        let secured = secured.display().to_string();
        assert!(load(&["--config", &secured])?.tls.is_some(), "serve keeps the file's TLS");
        let config = load_dev(&["--config", &secured])?;
        assert!(config.tls.is_none(), "dev drops the file's TLS");
        assert!(!config.auth_enabled() && config.auth.client_certs.is_empty(), "dev drops authentication");
        assert!(load_dev(&["--listen", "127.0.0.1:0", "--http-listen", "[::1]:0"]).is_ok());

        let exposed = dir.path().join("exposed.toml");
        std::fs::write(&exposed, "listen = \"0.0.0.0:7070\"\ninsecure = true\n")?;
        let exposed = exposed.display().to_string();
        for args in [
            vec!["--config", exposed.as_str()],
            vec!["--http-listen", "0.0.0.0:7071"],
            vec!["--listen", "0.0.0.0:7070", "--insecure"],
            vec!["--auth"],
            vec!["--insecure"],
        ] {
            let err = load_dev(&args).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("loopback"), "{args:?}: {err:?}");
        }
        Ok(())
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("muster.toml");
        std::fs::write(
            &path,
            "lease_ttl = \"20s\"\nheartbeat_interval = \"4s\"\ndurability = \"relaxed\"\n\n[limits]\nmax_payload_bytes = 10\n",
        )?;
        let path = path.display().to_string();
        let config = load(&["--config", &path, "--lease-ttl", "30s"])?;
        assert_eq!(config.lease_ttl, Duration::from_secs(30), "the flag wins");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(4), "the file fills what flags leave");
        assert_eq!(config.durability, Durability::Relaxed);
        assert_eq!(config.limits.max_payload_bytes, 10);
        assert_eq!(config.limits.max_tasks_per_submit, ServerConfig::default().limits.max_tasks_per_submit);
        assert_eq!(config.listen, ServerConfig::default().listen);

        let config = load(&[])?;
        assert_eq!(config.data_dir, PathBuf::from("default-dir"));
        assert_eq!(config.durability, Durability::Sync);
        Ok(())
    }

    #[test]
    fn retention_is_a_week_unless_the_file_or_flag_says_otherwise_and_zero_keeps_forever() -> anyhow::Result<()> {
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(load(&[])?.retention.finished_tasks, week);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("muster.toml");
        std::fs::write(&path, "[retention]\nfinished_tasks = \"2h\"\n")?;
        let path = path.display().to_string();
        assert_eq!(load(&["--config", &path])?.retention.finished_tasks, Duration::from_secs(7200));
        assert_eq!(load(&["--config", &path, "--retention", "30s"])?.retention.finished_tasks, Duration::from_secs(30));
        assert_eq!(load(&["--retention", "0"])?.retention.finished_tasks, Duration::ZERO);
        let err = load(&["--retention", "soon"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("0 for forever"), "{err}");
        Ok(())
    }

    #[test]
    fn the_store_is_sled_unless_a_postgres_url_is_given_and_its_password_is_never_shown() -> anyhow::Result<()> {
        assert_eq!(load(&[])?.store, None);
        let config = load(&["--store", "postgres://muster:secret@db.internal:5432/muster"])?;
        let url = config.store.as_ref().map(|u| u.0.as_str());
        assert_eq!(url, Some("postgres://muster:secret@db.internal:5432/muster"));
        let shown = format!("{config:?}");
        assert!(
            shown.contains("postgres://muster:***@db.internal:5432/muster") && !shown.contains("secret"),
            "{shown}"
        );
        let err = load(&["--store", "/var/lib/muster"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("store") && err.contains("postgres://"), "{err}");
        assert_eq!(config.leader_lease_ttl, Duration::from_secs(5));
        let url = "postgres://muster@db:5432/muster";
        assert_eq!(load(&["--store", url, "--leader-lease-ttl", "3s"])?.leader_lease_ttl, Duration::from_secs(3));
        let err = load(&["--store", url, "--leader-lease-ttl", "20s"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("leader_lease_ttl") && err.contains("lease_ttl (15s)"), "{err}");
        Ok(())
    }

    #[test]
    fn inconsistent_or_unknown_settings_are_refused() -> anyhow::Result<()> {
        let err = load(&["--lease-ttl", "1s", "--heartbeat-interval", "2s"]).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("heartbeat_interval")));
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("muster.toml");
        std::fs::write(&path, "lease_tll = \"20s\"\n")?;
        let path = path.display().to_string();
        assert!(load(&["--config", &path]).is_err(), "a misspelt setting is an error, not ignored");
        assert!(load(&["--durability", "fast"]).is_err());
        Ok(())
    }

    #[test]
    fn the_session_queue_limit_is_set_in_the_file_and_must_hold_something() -> anyhow::Result<()> {
        assert_eq!(load(&[])?.limits.max_session_queue, 4096, "a safe default");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("muster.toml");
        std::fs::write(&path, "[limits]\nmax_session_queue = 64\n")?;
        assert_eq!(load(&["--config", &path.display().to_string()])?.limits.max_session_queue, 64);
        std::fs::write(&path, "[limits]\nmax_session_queue = 0\n")?;
        let err = load(&["--config", &path.display().to_string()]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("limits.max_session_queue: must be greater than zero"), "{err}");
        Ok(())
    }
}
