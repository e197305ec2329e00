//! The `muster-shell-agent` binary: joins a Muster fleet and runs commands
//! for tasks of capability `shell` until SIGTERM, then drains.

use anyhow::Context;
use clap::Parser;
use muster_sdk::Credentials;
use muster_shell_agent::{ShellAgentConfig, ShellArgs, build_agent_with, protect_process};
use tracing_subscriber::EnvFilter;

/// The longest agent name the server accepts.
const MAX_NAME_LEN: usize = 128;

/// Runs shell commands for a Muster control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Server endpoint, or several separated by commas (tried in order).
    #[arg(long, env = "MUSTER_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Agent name shown in listings [default: shell-<hostname>].
    #[arg(long, env = "MUSTER_AGENT_NAME")]
    name: Option<String>,
    /// How many commands run at once [default: 4].
    #[arg(long, env = "MUSTER_SLOTS")]
    slots: Option<u32>,
    /// Execution settings: TOML file, grace, limits, environment.
    #[command(flatten)]
    shell: ShellArgs,
    /// Serve Prometheus metrics at this address's /metrics (port 0 picks a
    /// free port); the address is announced to the server for discovery.
    #[arg(long, env = "MUSTER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The agent token to register with.
    #[arg(long, env = "MUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA bundle that signs the server's certificate (implies https).
    #[arg(long, env = "MUSTER_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS.
    #[arg(long, env = "MUSTER_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "MUSTER_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    protect_process().context("cannot protect the agent process")?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();
    let base = ShellAgentConfig { server: args.server, name: default_name(), ..ShellAgentConfig::default() };
    let mut config = args.shell.apply(base)?;
    if let Some(name) = args.name {
        config.name = name;
    }
    if let Some(slots) = args.slots {
        config.slots = slots;
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    let credentials = Credentials::from_parts(
        args.token.as_deref(),
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let agent = build_agent_with(&config, credentials).context("invalid shell agent configuration")?;
    agent.run().await.context("shell agent failed")?;
    Ok(())
}

/// `shell-<hostname>`, or `shell-<pid>` when the host has no usable name.
fn default_name() -> String {
    let suffix = hostname()
        .map(|host| sanitize(&host))
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| std::process::id().to_string());
    let mut name = format!("shell-{suffix}");
    name.truncate(MAX_NAME_LEN);
    name
}

/// Keeps the characters agent names allow (`[A-Za-z0-9._-]`), replacing the
/// rest.
fn sanitize(raw: &str) -> String {
    raw.trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect()
}

#[cfg(unix)]
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the
    // call; gethostname writes at most `buf.len()` bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(buf.get(..end)?).into_owned())
}

#[cfg(not(unix))]
fn hostname() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_replaces_characters_names_cannot_hold() {
        assert_eq!(sanitize("web-01.example.com"), "web-01.example.com");
        assert_eq!(sanitize(" my host/1 "), "my-host-1");
    }

    #[test]
    fn default_name_is_prefixed_and_bounded() {
        let name = default_name();
        assert!(name.starts_with("shell-"));
        assert!(name.len() <= MAX_NAME_LEN);
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let args = Args::try_parse_from(["muster-shell-agent"]);
        let args = match args {
            Ok(args) => args,
            Err(err) => panic!("{err}"),
        };
        if std::env::var_os("MUSTER_SERVER").is_none() {
            assert_eq!(args.server, "http://127.0.0.1:7070");
        }
        if std::env::var_os("MUSTER_SLOTS").is_none() {
            assert_eq!(args.slots, None);
        }
    }
}
