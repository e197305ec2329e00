//! `muster serve` and `muster dev`: the server configuration in layers
//! (defaults, TOML file, `MUSTER_*` environment, flags) and the process
//! lifecycle around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use muster_server::{Durability, ServerConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

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
    /// Where the store lives.
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
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
}

impl ServeArgs {
    /// The layered configuration; `data_dir` is the default data directory
    /// when neither the file, the environment nor a flag sets one.
    pub(crate) fn load(&self, default_data_dir: &str) -> anyhow::Result<ServerConfig> {
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
        config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
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

/// `muster serve`: the control plane until a signal.
pub(crate) async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.load("muster-data")?;
    let shutdown = shutdown_on_signals();
    let server = muster_server::start(config, shutdown).await?;
    println!("muster serving gRPC on {} and HTTP on {}", server.grpc_addr(), server.http_addr());
    server.wait().await?;
    Ok(())
}

/// `muster dev`: the server with a local data directory plus the shell
/// agent and the HTTP agent (loopback only), in one process.
pub(crate) async fn dev(args: &ServeArgs, agent_slots: u32) -> anyhow::Result<()> {
    let config = args.load(".muster/dev")?;
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
    println!("Muster is running (Ctrl-C to stop).");
    println!("  gRPC    {endpoint}");
    println!("  HTTP    http://{}/healthz", server.http_addr());
    println!("  metrics http://{}/metrics (agents: http://{}/sd/agents)", server.http_addr(), server.http_addr());
    println!("  data    {}", data_dir.display());
    println!("  agents  dev-shell: capability shell, {agent_slots} slots");
    println!("          dev-http: capability http, loopback hosts only");
    println!();
    println!("Try, from another terminal:");
    println!("  {exe} --server {endpoint} task submit shell --payload '{{\"argv\":[\"echo\",\"hello\"]}}' --wait");
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
        cli.serve.load("default-dir")
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
}
