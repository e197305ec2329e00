//! The shell agent's configuration in layers: defaults, a TOML file,
//! `MUSTER_SHELL_*` environment variables and flags (rising precedence),
//! like the server's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ShellAgentConfig;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The TOML file is not a valid shell agent configuration.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
}

/// The execution settings a TOML file may set; every field is optional and
/// falls back to [`ShellAgentConfig::default`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    slots: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    kill_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    max_output_bytes: Option<usize>,
    allowed_dirs: Option<Vec<PathBuf>>,
    allow_programs: Option<Vec<String>>,
    inherit_env: Option<bool>,
    pass_env: Option<Vec<String>>,
    non_retryable_exit_codes: Option<Vec<i32>>,
}

/// Flags (each also read from a `MUSTER_SHELL_*` variable) for the shell
/// agent's execution settings; flatten it into a binary's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShellArgs {
    /// A TOML file with shell agent settings (see the crate docs).
    #[arg(long = "shell-config", env = "MUSTER_SHELL_CONFIG")]
    pub shell_config: Option<PathBuf>,
    /// After SIGTERM, how long the process group has before SIGKILL, e.g. 5s.
    #[arg(long, env = "MUSTER_SHELL_KILL_GRACE", value_parser = humantime::parse_duration)]
    pub kill_grace: Option<Duration>,
    /// The longest any command may run on this agent, e.g. 10m.
    #[arg(long = "shell-timeout", env = "MUSTER_SHELL_TIMEOUT", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// How much of stdout and of stderr the output keeps (the tail), in bytes.
    #[arg(long, env = "MUSTER_SHELL_MAX_OUTPUT_BYTES")]
    pub max_output_bytes: Option<usize>,
    /// Directories commands may run in (and below); comma-separated. Empty
    /// means any.
    #[arg(long, env = "MUSTER_SHELL_ALLOWED_DIRS", value_delimiter = ',')]
    pub allowed_dirs: Option<Vec<PathBuf>>,
    /// Programs tasks may run (argv[0], compared exactly): bare names found
    /// on the agent's PATH, or absolute paths; comma-separated or repeated.
    /// Unset means any.
    #[arg(long, env = "MUSTER_SHELL_ALLOW_PROGRAMS", value_delimiter = ',')]
    pub allow_programs: Option<Vec<String>>,
    /// Whether commands inherit the agent's whole environment (default
    /// false: only the pass-env variables and the payload's env).
    #[arg(long, env = "MUSTER_SHELL_INHERIT_ENV", num_args = 0..=1, default_missing_value = "true")]
    pub inherit_env: Option<bool>,
    /// Variables of the agent's environment passed on when inherit-env is
    /// false, replacing the default list (PATH HOME USER LOGNAME LANG LC_ALL
    /// TZ TMPDIR); comma-separated or repeated.
    #[arg(long, env = "MUSTER_SHELL_PASS_ENV", value_delimiter = ',')]
    pub pass_env: Option<Vec<String>>,
    /// Exit codes that fail the task for good instead of being retried;
    /// comma-separated.
    #[arg(long, env = "MUSTER_SHELL_NON_RETRYABLE_EXIT_CODES", value_delimiter = ',')]
    pub non_retryable_exit_codes: Option<Vec<i32>>,
}

impl ShellArgs {
    /// Layers the TOML file (if any) and then these flags over `base`.
    pub fn apply(&self, base: ShellAgentConfig) -> Result<ShellAgentConfig, ConfigError> {
        let mut config = match &self.shell_config {
            Some(path) => apply_file(base, path)?,
            None => base,
        };
        set(&mut config.kill_grace, self.kill_grace);
        if self.timeout.is_some() {
            config.timeout = self.timeout;
        }
        set(&mut config.max_output_bytes, self.max_output_bytes);
        set(&mut config.allowed_dirs, self.allowed_dirs.clone());
        set(&mut config.allow_programs, self.allow_programs.clone());
        set(&mut config.inherit_env, self.inherit_env);
        set(&mut config.pass_env, self.pass_env.clone());
        set(&mut config.non_retryable_exit_codes, self.non_retryable_exit_codes.clone());
        Ok(config)
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

/// Layers the settings of the TOML file at `path` over `base`.
pub fn apply_file(base: ShellAgentConfig, path: &Path) -> Result<ShellAgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    apply_toml(base, &text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
}

fn apply_toml(mut config: ShellAgentConfig, text: &str) -> Result<ShellAgentConfig, String> {
    let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    set(&mut config.name, file.name);
    set(&mut config.slots, file.slots);
    set(&mut config.kill_grace, file.kill_grace);
    if file.timeout.is_some() {
        config.timeout = file.timeout;
    }
    set(&mut config.max_output_bytes, file.max_output_bytes);
    set(&mut config.allowed_dirs, file.allowed_dirs);
    set(&mut config.allow_programs, file.allow_programs);
    set(&mut config.inherit_env, file.inherit_env);
    set(&mut config.pass_env, file.pass_env);
    set(&mut config.non_retryable_exit_codes, file.non_retryable_exit_codes);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        shell: ShellArgs,
    }

    #[test]
    fn toml_sets_fields_and_flags_override_it() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shell.toml");
        std::fs::write(
            &path,
            "kill_grace = \"2s\"\nmax_output_bytes = 100\nnon_retryable_exit_codes = [2]\nallowed_dirs = [\"/srv\"]\n",
        )?;
        let cli = Cli::try_parse_from([
            "x",
            "--shell-config",
            path.to_str().unwrap_or_default(),
            "--max-output-bytes",
            "50",
            "--non-retryable-exit-codes",
            "3,4",
        ])?;
        let config = cli.shell.apply(ShellAgentConfig::default())?;
        assert_eq!(config.kill_grace, Duration::from_secs(2));
        assert_eq!(config.max_output_bytes, 50);
        assert_eq!(config.non_retryable_exit_codes, [3, 4]);
        assert_eq!(config.allowed_dirs, [PathBuf::from("/srv")]);
        assert!(!config.inherit_env, "commands get a clean environment by default");
        assert_eq!(config.pass_env, crate::DEFAULT_PASS_ENV);
        Ok(())
    }

    #[test]
    fn environment_and_program_flags_layer_over_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shell.toml");
        std::fs::write(&path, "allow_programs = [\"make\"]\npass_env = [\"PATH\"]\ninherit_env = false\n")?;
        let file_only = Cli::try_parse_from(["x", "--shell-config", path.to_str().unwrap_or_default()])?;
        let config = file_only.shell.apply(ShellAgentConfig::default())?;
        assert_eq!(config.allow_programs, ["make"]);
        assert_eq!(config.pass_env, ["PATH"]);
        let cli = Cli::try_parse_from([
            "x",
            "--shell-config",
            path.to_str().unwrap_or_default(),
            "--allow-programs",
            "echo,/usr/bin/env",
            "--pass-env",
            "PATH",
            "--pass-env",
            "LANG,TZ",
            "--inherit-env",
        ])?;
        let config = cli.shell.apply(ShellAgentConfig::default())?;
        assert_eq!(config.allow_programs, ["echo", "/usr/bin/env"]);
        assert_eq!(config.pass_env, ["PATH", "LANG", "TZ"]);
        assert!(config.inherit_env);
        let off = Cli::try_parse_from(["x", "--inherit-env", "false"])?;
        assert_eq!(off.shell.inherit_env, Some(false));
        Ok(())
    }

    #[test]
    fn an_unknown_toml_field_is_named() {
        let err = apply_toml(ShellAgentConfig::default(), "kill_grase = \"1s\"").err().unwrap_or_default();
        assert!(err.contains("kill_grase"), "{err}");
    }
}
