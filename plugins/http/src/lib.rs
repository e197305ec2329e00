//! `muster-http-agent`: a Muster agent that makes HTTP requests (capability
//! `http`), built only on the public `muster-sdk` API.
//!
//! A task's payload is JSON:
//!
//! ```json
//! {"method": "POST", "url": "https://api.example.com/v1/jobs",
//!  "headers": {"content-type": "application/json"}, "body": "{}", "timeout": "10s"}
//! ```
//!
//! Only `url` is required (the method defaults to `GET`, the timeout to the
//! agent's default, capped by its maximum). Nothing is reachable by default:
//! the agent refuses every URL that no entry of its allowlist admits, and
//! it never follows redirects (a redirect could leave the allowlist).
//!
//! The output is JSON: `{"status": 200, "headers": {...}, "body": "...",
//! "body_truncated": false}`, the body cut to the configured cap. A 5xx or
//! 429 response, a connection error and a timeout fail the attempt as
//! retryable; any other 4xx fails it for good (reason `http_status`).

mod allow;
mod request;

use std::time::Duration;

use muster_sdk::{Agent, Credentials, Error};

pub use crate::allow::{AllowEntry, Allowlist};

/// The capability this agent serves.
pub const CAPABILITY: &str = "http";

/// What the binary's flags configure; a library type so tests and `muster
/// dev` can start the same agent in-process.
#[derive(Debug, Clone)]
pub struct HttpAgentConfig {
    /// Server endpoint; several may be given separated by commas.
    pub server: String,
    /// The agent's name in listings.
    pub name: String,
    /// How many requests run at once.
    pub slots: u32,
    /// Hosts (`example.com`, `127.0.0.1:8080`) and URL prefixes
    /// (`https://api.example.com/v1/`) requests may go to. Required: an
    /// empty list is a configuration error.
    pub allow: Vec<String>,
    /// Response bodies are cut to this many bytes in the output.
    pub max_body_bytes: usize,
    /// Timeout of a request whose payload names none.
    pub default_timeout: Duration,
    /// The longest timeout a payload may ask for.
    pub max_timeout: Duration,
}

impl Default for HttpAgentConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:7070".to_owned(),
            name: "http".to_owned(),
            slots: 16,
            allow: Vec::new(),
            max_body_bytes: 64 * 1024,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
        }
    }
}

/// Builds the HTTP agent, advertising capability `http`.
pub fn build_agent(config: &HttpAgentConfig) -> Result<Agent, Error> {
    build_agent_with(config, Credentials::default())
}

/// Like [`build_agent`], connecting with a token and TLS settings.
pub fn build_agent_with(config: &HttpAgentConfig, credentials: Credentials) -> Result<Agent, Error> {
    let allowlist = Allowlist::parse(&config.allow).map_err(Error::InvalidConfig)?;
    if allowlist.is_empty() {
        return Err(Error::InvalidConfig(
            "allow: the http agent needs at least one allowed host or URL prefix".to_owned(),
        ));
    }
    if config.max_body_bytes == 0 {
        return Err(Error::InvalidConfig("max_body_bytes: must be at least 1".to_owned()));
    }
    let runner = request::Runner::new(allowlist, config)?;
    let mut builder = Agent::builder(config.name.clone()).credentials(credentials).slots(config.slots).handler(
        CAPABILITY,
        move |ctx| {
            let runner = runner.clone();
            async move { runner.run(ctx).await }
        },
    );
    for endpoint in config.server.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        builder = builder.server(endpoint);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_allowlist_is_rejected() {
        let config = HttpAgentConfig::default();
        let err = build_agent(&config).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("allow"), "{err}");
    }

    #[test]
    fn a_valid_config_builds() {
        let config = HttpAgentConfig { allow: vec!["127.0.0.1".to_owned()], ..HttpAgentConfig::default() };
        assert!(build_agent(&config).is_ok());
    }
}
