//! The `muster-http-agent` binary: joins a Muster fleet and makes HTTP
//! requests to allowed hosts for tasks of capability `http`, until SIGTERM,
//! then drains.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use muster_http_agent::{HttpAgentConfig, build_agent_with};
use muster_sdk::Credentials;
use tracing_subscriber::EnvFilter;

/// Makes HTTP requests for a Muster control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Server endpoint, or several separated by commas (tried in order).
    #[arg(long, env = "MUSTER_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Agent name shown in listings.
    #[arg(long, env = "MUSTER_AGENT_NAME", default_value = "http")]
    name: String,
    /// How many requests run at once.
    #[arg(long, env = "MUSTER_SLOTS", default_value_t = 16)]
    slots: u32,
    /// Allowed host (`example.com`, `10.0.0.5:8080`) or URL prefix
    /// (`https://api.example.com/v1/`); repeat or separate with commas.
    /// Required: nothing is reachable by default.
    #[arg(long, env = "MUSTER_HTTP_ALLOW", value_delimiter = ',', required = true)]
    allow: Vec<String>,
    /// Response bodies are cut to this many bytes.
    #[arg(long, env = "MUSTER_HTTP_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    /// Timeout of a request whose payload names none.
    #[arg(long, env = "MUSTER_HTTP_DEFAULT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    default_timeout: Duration,
    /// The longest timeout a payload may ask for.
    #[arg(long, env = "MUSTER_HTTP_MAX_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    max_timeout: Duration,
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
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();
    let config = HttpAgentConfig {
        server: args.server,
        name: args.name,
        slots: args.slots,
        allow: args.allow,
        max_body_bytes: args.max_body_bytes,
        default_timeout: args.default_timeout,
        max_timeout: args.max_timeout,
    };
    let credentials = Credentials::from_parts(
        args.token.as_deref(),
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let agent = build_agent_with(&config, credentials).context("invalid http agent configuration")?;
    agent.run().await.context("http agent failed")?;
    Ok(())
}
