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
//! its last `max_output_bytes` (64 KiB by default). A non-zero exit fails the
//! attempt (retryable, reason `exit_code`, unless the code is listed in
//! `non_retryable_exit_codes`).
//!
//! While the program runs, every line it writes to stdout or stderr also
//! goes to the task's live log (streams `stdout` and `stderr`; follow it
//! with `muster task logs ID --follow`), all of it before the result. A
//! program printing faster than the agent sends loses its oldest unsent
//! lines from the live log, never from the output's tails.
//!
//! The program runs in its own process group. Cancelling the task, or its
//! execution timeout, sends SIGTERM to the whole group and SIGKILL after
//! `kill_grace`, so nothing it started outlives it. On Unix a small
//! supervising process leads the group and ends it (SIGTERM, then SIGKILL
//! once the program exited or `kill_grace` passed) when the agent process
//! ends for any reason, `kill -9` included, so a task reassigned after its
//! agent died never runs twice at once. Processes that leave the group
//! (`setsid`, `setpgid`) are beyond that guarantee.
//!
//! The environment is clean: the program sees only the agent's variables
//! named in `pass_env` (by default [`DEFAULT_PASS_ENV`]) and the payload's
//! `env`, unless `inherit_env` is set. A payload may not set variables that
//! change which program, library or startup code runs (`PATH`, `LD_*`,
//! `DYLD_*`, `BASH_ENV`, `ENV`, `IFS`, `SHELLOPTS`, `PS4`, interpreters'
//! module paths and the like): such a task fails for good with reason
//! `env_not_allowed`, naming the variable.
//!
//! With `allow_programs` set, a task whose `argv[0]` is not exactly one of
//! its entries fails for good with reason `program_not_allowed`. An entry is
//! a bare name, found on the agent's `PATH` (which no payload can change),
//! or an absolute path. The allowlist guarantees which program the agent
//! executes, not what that program does: listing a shell, `env`, `xargs`,
//! an interpreter or anything else that runs its arguments allows every
//! program (the agent warns at startup when it sees one).
//!
//! Settings come from [`ShellAgentConfig::default`], a TOML file, the
//! `MUSTER_SHELL_*` environment and flags ([`ShellArgs`]):
//!
//! ```toml
//! kill_grace = "5s"
//! timeout = "10m"
//! max_output_bytes = 65536
//! allowed_dirs = ["/srv/jobs"]
//! allow_programs = ["pg_dump", "/usr/local/bin/render"]
//! inherit_env = false
//! pass_env = ["PATH", "HOME", "LANG"]
//! non_retryable_exit_codes = [2]
//! ```

mod command;
mod config;
mod policy;
#[cfg(unix)]
mod supervise;

use std::path::PathBuf;
use std::time::Duration;

use muster_sdk::{Agent, Credentials, Error};

pub use crate::command::MAX_STREAM_BYTES;
pub use crate::config::{ConfigError, ShellArgs, apply_file};
pub use crate::policy::{DEFAULT_PASS_ENV, MAX_PAYLOAD_ENV};

/// The capability this agent serves.
pub const CAPABILITY: &str = "shell";

/// What the binary's flags configure; kept as a library type so tests and
/// other binaries (`muster dev`) can start the same agent in-process.
#[derive(Debug, Clone, PartialEq)]
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
    /// After SIGTERM, how long the process group has before SIGKILL.
    pub kill_grace: Duration,
    /// The longest a command may run on this agent (the task's own deadline
    /// applies too, whichever comes first); `None` leaves it to the task.
    pub timeout: Option<Duration>,
    /// How much of stdout and of stderr the output keeps (the tail).
    pub max_output_bytes: usize,
    /// Directories a command may run in, or below; empty means any. A task
    /// naming no `cwd` runs in the first one.
    pub allowed_dirs: Vec<PathBuf>,
    /// Programs a task may run (`argv[0]`, compared exactly): bare names
    /// found on the agent's `PATH`, or absolute paths. Empty means any.
    pub allow_programs: Vec<String>,
    /// Whether commands inherit the agent's whole environment (off by
    /// default); when false they get only the variables named in
    /// `pass_env` plus the payload's `env`.
    pub inherit_env: bool,
    /// Variables passed on from the agent's environment when `inherit_env`
    /// is false; by default [`DEFAULT_PASS_ENV`].
    pub pass_env: Vec<String>,
    /// Exit codes that fail the task for good instead of being retried.
    pub non_retryable_exit_codes: Vec<i32>,
}

impl Default for ShellAgentConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:7070".to_owned(),
            name: "shell".to_owned(),
            slots: 4,
            kill_grace: Duration::from_secs(5),
            timeout: None,
            max_output_bytes: MAX_STREAM_BYTES,
            allowed_dirs: Vec::new(),
            allow_programs: Vec::new(),
            inherit_env: false,
            pass_env: DEFAULT_PASS_ENV.map(str::to_owned).to_vec(),
            non_retryable_exit_codes: Vec::new(),
            metrics_listen: None,
        }
    }
}

/// Hardens the calling process for running other people's commands. On
/// Linux it becomes non-dumpable, so processes of the same user, the
/// agent's own commands among them, can neither read its memory and
/// environment (`/proc/PID/environ`, `/proc/PID/mem`) nor trace it: a clean
/// environment would be little use if a command could read the agent's
/// token from there. The agent binaries call it first thing; the library
/// does not, as it also turns off the host process's core dumps.
pub fn protect_process() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes plain integers.
        let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Builds the shell agent; it advertises capability `shell` and the label
/// `os=<operating system>`, so tasks can select the platform their command
/// needs.
pub fn build_agent(config: &ShellAgentConfig) -> Result<Agent, Error> {
    build_agent_with(config, Credentials::default())
}

/// Like [`build_agent`], connecting with a token and TLS settings.
pub fn build_agent_with(config: &ShellAgentConfig, credentials: Credentials) -> Result<Agent, Error> {
    if config.max_output_bytes == 0 {
        return Err(Error::InvalidConfig("max_output_bytes: must be at least 1".to_owned()));
    }
    let runner = command::Runner::new(config).map_err(Error::InvalidConfig)?;
    let mut builder = Agent::builder(config.name.clone())
        .credentials(credentials)
        .slots(config.slots)
        .label("os", std::env::consts::OS)
        .handler(CAPABILITY, move |ctx| {
            let runner = runner.clone();
            async move { runner.run(ctx).await }
        });
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
        ShellAgentConfig {
            server: server.to_owned(),
            name: "shell-test".to_owned(),
            slots: 2,
            ..ShellAgentConfig::default()
        }
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
