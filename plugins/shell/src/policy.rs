//! What a task may ask of the agent beyond its arguments: which programs it
//! may run, which environment variables it may set, and which of the
//! agent's own variables its command sees.
//!
//! The environment is clean by default: a command gets the variables named
//! in `pass_env` (by default [`DEFAULT_PASS_ENV`]) from the agent, plus the
//! payload's `env`. The payload may not set variables that change which
//! program, library or startup code runs ([`refused_variable`]), so with a
//! program allowlist the program named is the program that runs, loaded the
//! way the agent's own environment says.

use std::collections::BTreeMap;
use std::ffi::OsString;

use muster_sdk::TaskError;

/// The agent's variables a command sees unless configured otherwise.
pub const DEFAULT_PASS_ENV: [&str; 8] = ["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Variables a payload may not set: they choose where programs and
/// libraries are found, inject code at startup (shells, dynamic loaders,
/// interpreters) or change how a shell parses its input.
const REFUSED_NAMES: [&str; 32] = [
    "PATH",
    "IFS",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "CDPATH",
    "GLOBIGNORE",
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYLIB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
];

/// Prefixes of variables a payload may not set: the dynamic loaders'
/// (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `DYLD_INSERT_LIBRARIES`, …) and
/// bash's exported functions.
const REFUSED_PREFIXES: [&str; 4] = ["LD_", "DYLD_", "BASH_FUNC_", "_JAVA_"];

/// Programs that run other programs or code given as arguments: on an
/// allowlist they allow everything, which the agent warns about.
const RUNS_ANYTHING: [&str; 31] = [
    "sh", "bash", "dash", "zsh", "ksh", "fish", "csh", "tcsh", "busybox", "env", "xargs", "find", "nice", "nohup",
    "timeout", "sudo", "su", "doas", "python", "python3", "perl", "ruby", "node", "awk", "make", "setsid", "stdbuf",
    "flock", "watch", "chroot", "strace",
];

/// The most variables a payload's `env` may hold.
pub const MAX_PAYLOAD_ENV: usize = 256;

/// The execution policy of one agent, checked before anything is spawned.
#[derive(Debug, Clone)]
pub(crate) struct ExecPolicy {
    inherit_env: bool,
    pass_env: Vec<String>,
    /// Empty: any program.
    allow_programs: Vec<String>,
}

impl ExecPolicy {
    /// Checks the configuration; the error names the field and the value.
    pub(crate) fn new(config: &crate::ShellAgentConfig) -> Result<Self, String> {
        for name in &config.pass_env {
            if !is_variable_name(name) {
                return Err(format!("pass_env: {name:?} is not a variable name"));
            }
        }
        for program in &config.allow_programs {
            if program.is_empty() || program.contains('\0') {
                return Err(format!("allow_programs: {program:?} is not a program name"));
            }
            if program.contains('/') && !program.starts_with('/') {
                return Err(format!(
                    "allow_programs: {program} must be a bare name (found on PATH) or an absolute path"
                ));
            }
            let base = program.rsplit('/').next().unwrap_or(program);
            if RUNS_ANYTHING.contains(&base) {
                tracing::warn!(
                    program = %program,
                    "allow_programs lists a program that runs other programs: tasks can run anything through it"
                );
            }
        }
        Ok(Self {
            inherit_env: config.inherit_env,
            pass_env: config.pass_env.clone(),
            allow_programs: config.allow_programs.clone(),
        })
    }

    /// Refuses a program off the allowlist and payload variables on the
    /// refused list; neither will pass on a retry.
    pub(crate) fn check(&self, program: &str, env: &BTreeMap<String, String>) -> Result<(), TaskError> {
        if !self.allow_programs.is_empty() && !self.allow_programs.iter().any(|allowed| allowed == program) {
            return Err(TaskError::fatal(format!("program {program} is not in the agent's allow_programs"))
                .with_reason("program_not_allowed"));
        }
        for name in env.keys() {
            if refused_variable(name) {
                return Err(TaskError::fatal(format!(
                    "env: {name} may not be set by a task (it changes which program, library or startup code runs)"
                ))
                .with_reason("env_not_allowed"));
            }
        }
        Ok(())
    }

    /// The environment a command starts from, before the payload's `env`:
    /// `None` to inherit the agent's whole environment.
    pub(crate) fn base_env(&self) -> Option<Vec<(String, OsString)>> {
        if self.inherit_env {
            return None;
        }
        let passed =
            self.pass_env.iter().filter_map(|name| std::env::var_os(name).map(|value| (name.clone(), value))).collect();
        Some(passed)
    }
}

/// Whether a payload may not set `name`; compared without regard to case,
/// so near-misses are refused too.
pub(crate) fn refused_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    REFUSED_NAMES.contains(&upper.as_str()) || REFUSED_PREFIXES.iter().any(|prefix| upper.starts_with(prefix))
}

/// A name `execve` can carry: not empty, without `=` or NUL.
pub(crate) fn is_variable_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_policy(tweak: impl FnOnce(&mut crate::ShellAgentConfig)) -> Result<ExecPolicy, String> {
        let mut config = crate::ShellAgentConfig::default();
        tweak(&mut config);
        ExecPolicy::new(&config)
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn loader_shell_and_interpreter_variables_are_refused() {
        for name in [
            "PATH",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "ld_preload",
            "DYLD_INSERT_LIBRARIES",
            "BASH_ENV",
            "ENV",
            "IFS",
            "SHELLOPTS",
            "PS4",
            "BASH_FUNC_ls%%",
            "GLIBC_TUNABLES",
            "PYTHONPATH",
            "NODE_OPTIONS",
        ] {
            assert!(refused_variable(name), "{name}");
        }
        for name in ["HOME", "LANG", "GREETING", "MY_PATH", "TMPDIR", "ENVIRONMENT"] {
            assert!(!refused_variable(name), "{name}");
        }
    }

    #[test]
    fn a_refused_variable_fails_for_good_naming_it() -> Result<(), String> {
        let policy = make_policy(|_| {})?;
        let err = policy.check("true", &env(&[("OK", "1"), ("LD_PRELOAD", "/tmp/evil.so")])).err();
        let err = err.ok_or("LD_PRELOAD was accepted")?;
        assert_eq!(err.reason, "env_not_allowed");
        assert!(!err.retryable);
        assert!(err.message.contains("LD_PRELOAD"), "{}", err.message);
        assert!(policy.check("true", &env(&[("OK", "1")])).is_ok());
        Ok(())
    }

    #[test]
    fn the_allowlist_matches_the_program_exactly() -> Result<(), String> {
        let policy = make_policy(|c| c.allow_programs = vec!["echo".to_owned(), "/usr/bin/env".to_owned()])?;
        assert!(policy.check("echo", &BTreeMap::new()).is_ok());
        assert!(policy.check("/usr/bin/env", &BTreeMap::new()).is_ok());
        for program in ["/bin/echo", "./echo", "/tmp/x/echo", "env", "ECHO"] {
            let err = policy.check(program, &BTreeMap::new()).err().ok_or(program)?;
            assert_eq!(err.reason, "program_not_allowed");
            assert!(!err.retryable);
            assert!(err.message.contains(program), "{}", err.message);
        }
        Ok(())
    }

    #[test]
    fn bad_configuration_is_named() {
        let err = make_policy(|c| c.allow_programs = vec!["bin/tool".to_owned()]).err().unwrap_or_default();
        assert!(err.starts_with("allow_programs: bin/tool"), "{err}");
        let err = make_policy(|c| c.allow_programs = vec![String::new()]).err().unwrap_or_default();
        assert!(err.starts_with("allow_programs: "), "{err}");
        let err = make_policy(|c| c.pass_env = vec!["A=B".to_owned()]).err().unwrap_or_default();
        assert!(err.starts_with("pass_env: "), "{err}");
    }

    #[test]
    fn the_default_passes_only_the_listed_variables() -> Result<(), String> {
        let policy = make_policy(|_| {})?;
        let base = policy.base_env().ok_or("the default inherits everything")?;
        assert!(base.iter().all(|(name, _)| DEFAULT_PASS_ENV.contains(&name.as_str())), "{base:?}");
        assert!(make_policy(|c| c.inherit_env = true)?.base_env().is_none());
        Ok(())
    }
}
