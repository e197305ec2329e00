//! `muster-shell-agent`: a Muster agent that runs programs (capability
//! `shell`), built only on the public `muster-sdk` API.
//!
//! A task's payload is JSON naming the program and its arguments, with
//! optional extra environment and working directory:
//!
//! ```json
//! {"argv": ["echo", "hello"], "env": {"K": "V"}, "cwd": null}
//! ```
//!
//! The program is executed directly, never through a shell, so arguments
//! need no quoting and cannot inject commands. The output is JSON:
//! `{"exit_code": 0, "stdout": "...", "stderr": "..."}`, each stream cut to
//! its last 64 KiB. A non-zero exit fails the attempt (retryable, reason
//! `exit_code`); cancelling the task kills the program and everything it
//! started.

mod command;

use muster_sdk::{Agent, Error};

pub use crate::command::MAX_STREAM_BYTES;

/// The capability this agent serves.
pub const CAPABILITY: &str = "shell";

/// What the binary's flags configure; kept as a library type so tests and
/// other binaries (`muster dev`) can start the same agent in-process.
#[derive(Debug, Clone)]
pub struct ShellAgentConfig {
    /// Server endpoint; several may be given separated by commas, tried in
    /// order (a highly available deployment).
    pub server: String,
    /// The agent's name in listings.
    pub name: String,
    /// How many commands run at once.
    pub slots: u32,
    /// Where to serve `/metrics` (port 0 picks one); announced to the
    /// server for discovery. `None` serves no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Builds the shell agent; it advertises capability `shell` and the label
/// `os=<operating system>`, so tasks can select the platform their command
/// needs.
pub fn build_agent(config: &ShellAgentConfig) -> Result<Agent, Error> {
    let mut builder = Agent::builder(config.name.clone())
        .slots(config.slots)
        .label("os", std::env::consts::OS)
        .handler(CAPABILITY, command::run);
    if let Some(address) = config.metrics_listen {
        builder = builder.metrics_listen(address);
    }
    for endpoint in config.server.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        builder = builder.server(endpoint);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_config(server: &str) -> ShellAgentConfig {
        ShellAgentConfig { server: server.to_owned(), name: "shell-test".to_owned(), slots: 2, metrics_listen: None }
    }

    #[test]
    fn build_agent_accepts_one_or_several_servers() {
        assert!(build_agent(&make_config("http://127.0.0.1:7070")).is_ok());
        assert!(build_agent(&make_config("127.0.0.1:7070, 127.0.0.1:7071")).is_ok());
    }

    #[test]
    fn build_agent_rejects_an_empty_server_list() {
        assert!(matches!(build_agent(&make_config(" , ")), Err(Error::InvalidConfig(_))));
    }
}
