//! Running one `shell` task: parse the payload, check it against the
//! agent's [`ExecPolicy`], spawn the program in its own process group under
//! a supervisor (see `supervise`), stream its output lines to the task's
//! live log while capturing the tails of its output, and end the whole
//! group (SIGTERM, then SIGKILL after a grace period) on cancellation or
//! timeout.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use muster_sdk::{LogStream, LogWriter, Output, TaskContext, TaskError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::policy::{ExecPolicy, MAX_PAYLOAD_ENV, is_variable_name};

/// How much of stdout and of stderr is kept (the tail: the end of a log is
/// where the error is).
pub const MAX_STREAM_BYTES: usize = 64 * 1024;

/// How much of stderr a failure message quotes.
const MESSAGE_STDERR_BYTES: usize = 1024;

/// How long output is still read after the program exited: a background
/// process that inherited the pipes may hold them open indefinitely.
const PIPE_DRAIN: Duration = Duration::from_secs(1);

/// How long a killed process group gets to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// How often a terminating process group is checked for survivors.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// The payload as submitted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShellPayload {
    argv: Vec<String>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<PathBuf>,
}

/// A validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShellCommand {
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
}

/// The task output.
#[derive(Debug, Serialize)]
struct ShellOutput {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

fn invalid_payload(message: impl std::fmt::Display) -> TaskError {
    TaskError::fatal(format!("invalid payload: {message}")).with_reason("invalid_payload")
}

/// Parses and validates a payload; every mistake is the submitter's, so none
/// is retryable.
fn parse_payload(payload: &[u8]) -> Result<ShellCommand, TaskError> {
    let payload: ShellPayload = serde_json::from_slice(payload).map_err(invalid_payload)?;
    let mut argv = payload.argv.into_iter();
    let program = argv
        .next()
        .filter(|program| !program.is_empty())
        .ok_or_else(|| invalid_payload("argv must start with a program name"))?;
    let env = payload.env.unwrap_or_default();
    if env.len() > MAX_PAYLOAD_ENV {
        return Err(invalid_payload(format!(
            "env has {} variables, more than the limit of {MAX_PAYLOAD_ENV}",
            env.len()
        )));
    }
    if let Some((name, _)) = env.iter().find(|(name, value)| !is_variable_name(name) || value.contains('\0')) {
        return Err(invalid_payload(format!("env: {name:?} is not a valid variable")));
    }
    Ok(ShellCommand { program, args: argv.collect(), env, cwd: payload.cwd })
}

/// Executes `shell` tasks under the agent's configuration; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    inner: Arc<RunnerConfig>,
}

#[derive(Debug)]
struct RunnerConfig {
    kill_grace: Duration,
    timeout: Option<Duration>,
    max_output_bytes: usize,
    /// Canonical forms of the allowed directories.
    allowed_dirs: Vec<PathBuf>,
    policy: ExecPolicy,
    non_retryable_exit_codes: Vec<i32>,
    /// This process's end of every supervisor's lifeline.
    #[cfg(unix)]
    lifeline: std::os::fd::RawFd,
}

/// Why a running program is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    TimedOut(Duration),
}

impl Runner {
    /// Checks the configuration; the error names the field.
    pub(crate) fn new(config: &crate::ShellAgentConfig) -> Result<Self, String> {
        let mut allowed_dirs = Vec::new();
        for dir in &config.allowed_dirs {
            let canonical = dir
                .canonicalize()
                .map_err(|e| format!("allowed_dirs: {} is not a usable directory: {e}", dir.display()))?;
            allowed_dirs.push(canonical);
        }
        let policy = ExecPolicy::new(config)?;
        #[cfg(unix)]
        let lifeline = crate::supervise::lifeline()
            .map_err(|e| format!("cannot create the pipe that ties commands to this agent: {e}"))?;
        Ok(Self {
            inner: Arc::new(RunnerConfig {
                kill_grace: config.kill_grace,
                timeout: config.timeout,
                max_output_bytes: config.max_output_bytes,
                allowed_dirs,
                policy,
                non_retryable_exit_codes: config.non_retryable_exit_codes.clone(),
                #[cfg(unix)]
                lifeline,
            }),
        })
    }

    /// The `shell` handler.
    pub(crate) async fn run(&self, ctx: TaskContext) -> Result<Output, TaskError> {
        let mut command = parse_payload(ctx.payload())?;
        self.inner.policy.check(&command.program, &command.env)?;
        command.cwd = self.working_dir(&command)?;
        let output = self.execute(&command, &ctx).await?;
        if output.exit_code != 0 {
            let retryable = !self.inner.non_retryable_exit_codes.contains(&output.exit_code);
            return Err(exit_error(&command.program, &output, retryable));
        }
        Output::json(&output)
    }

    /// The directory the command runs in, checked against `allowed_dirs`.
    fn working_dir(&self, command: &ShellCommand) -> Result<Option<PathBuf>, TaskError> {
        let allowed = &self.inner.allowed_dirs;
        let Some(cwd) = &command.cwd else {
            return Ok(allowed.first().cloned());
        };
        let canonical = cwd.canonicalize().map_err(|_| {
            TaskError::fatal(format!(
                "cannot run {}: working directory {} does not exist",
                command.program,
                cwd.display()
            ))
            .with_reason("spawn_failed")
        })?;
        if !canonical.is_dir() {
            return Err(TaskError::fatal(format!(
                "cannot run {}: {} is not a directory",
                command.program,
                cwd.display()
            ))
            .with_reason("spawn_failed"));
        }
        if !allowed.is_empty() && !allowed.iter().any(|dir| canonical.starts_with(dir)) {
            return Err(TaskError::fatal(format!("cwd: {} is outside the agent's allowed_dirs", cwd.display()))
                .with_reason("cwd_not_allowed"));
        }
        Ok(Some(canonical))
    }

    /// How long the command may run: the agent's limit or the task's
    /// deadline, whichever comes first.
    fn time_limit(&self, ctx: &TaskContext) -> Option<Duration> {
        let until_deadline =
            ctx.deadline().map(|deadline| deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        match (self.inner.timeout, until_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn execute(&self, command: &ShellCommand, ctx: &TaskContext) -> Result<ShellOutput, TaskError> {
        let mut cmd = Command::new(&command.program);
        if let Some(base) = self.inner.policy.base_env() {
            cmd.env_clear().envs(base);
        }
        cmd.args(&command.args)
            .envs(&command.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = &command.cwd {
            cmd.current_dir(cwd);
        }
        // Its own process group, so cancellation reaches every descendant,
        // led by a supervisor that ends the group if this agent dies.
        #[cfg(unix)]
        {
            cmd.process_group(0);
            crate::supervise::attach(&mut cmd, self.inner.lifeline, self.inner.kill_grace);
        }
        let mut child = cmd.spawn().map_err(|err| spawn_error(&command.program, &err))?;
        let pid = child.id();
        tracing::debug!(task_id = ctx.task_id(), program = %command.program, ?pid, "spawned");
        // Armed until the program exits on its own: cancellation, timeout,
        // and the agent aborting this handler at shutdown all end the group.
        let mut group = ProcessGroup::new(pid);

        let cap = self.inner.max_output_bytes;
        let mut stdout = Capture::new(cap, ctx.log_writer(LogStream::Stdout));
        let mut stderr = Capture::new(cap, ctx.log_writer(LogStream::Stderr));
        let time_limit = self.time_limit(ctx);
        let finished = {
            let collect = collect(&mut child, &mut stdout, &mut stderr);
            let expired = async {
                match time_limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = collect => Ok(status),
                () = ctx.cancelled() => Err(Stop::Cancelled),
                () = expired => Err(Stop::TimedOut(time_limit.unwrap_or_default())),
            }
        };
        match finished {
            Ok(Ok(status)) if supervisor_killed(status) => {
                // The program lost its supervisor: it was killed (Linux) or
                // is still running; either way the group must not outlive
                // an attempt that is about to be retried.
                group.kill();
                Err(TaskError::retryable(format!(
                    "{} stopped: its supervising process was killed ({status})",
                    command.program
                ))
                .with_reason("supervisor_killed"))
            }
            Ok(Ok(status)) => {
                group.disarm();
                Ok(ShellOutput { exit_code: exit_code(status), stdout: stdout.into_tail(), stderr: stderr.into_tail() })
            }
            Ok(Err(err)) => Err(TaskError::retryable(format!("waiting for {} failed: {err}", command.program))),
            Err(stop) => {
                group.terminate(&mut child, self.inner.kill_grace).await;
                Err(match stop {
                    Stop::Cancelled => TaskError::fatal(format!("{} stopped: task cancelled", command.program))
                        .with_reason("cancelled"),
                    Stop::TimedOut(limit) => TaskError::retryable(format!(
                        "{} stopped: it ran longer than its timeout of {}",
                        command.program,
                        humantime::format_duration(limit)
                    ))
                    .with_reason("timeout"),
                })
            }
        }
    }
}

fn exit_error(program: &str, output: &ShellOutput, retryable: bool) -> TaskError {
    let mut tail = TailBuffer::new(MESSAGE_STDERR_BYTES);
    tail.push(output.stderr.trim_end().as_bytes());
    let tail = tail.into_string();
    let message = if tail.is_empty() {
        format!("{program} exited with code {}", output.exit_code)
    } else {
        format!("{program} exited with code {}: {tail}", output.exit_code)
    };
    let error = if retryable { TaskError::retryable(message) } else { TaskError::fatal(message) };
    error.with_reason("exit_code")
}

/// The supervisor blocks every signal it can and exits with the program's
/// status, so a supervisor that ended by a signal was killed from outside.
fn supervisor_killed(status: ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal().is_some()
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        false
    }
}

/// A missing or unusable program will not appear on retry; other spawn
/// failures (out of processes, out of memory) may pass.
fn spawn_error(program: &str, err: &io::Error) -> TaskError {
    let retryable = !matches!(
        err.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::ArgumentListTooLong
    );
    let message = match err.kind() {
        io::ErrorKind::NotFound => format!("cannot run {program}: program not found"),
        _ => format!("cannot run {program}: {err}"),
    };
    let error = if retryable { TaskError::retryable(message) } else { TaskError::fatal(message) };
    error.with_reason("spawn_failed")
}

/// Where one output stream goes: its tail is kept for the task's output,
/// and its lines go to the task's live log as they come.
#[derive(Debug)]
struct Capture {
    tail: TailBuffer,
    /// Holds an unfinished last line until the pipe ends or the capture is
    /// dropped, whichever comes first.
    log: LogWriter,
}

impl Capture {
    fn new(cap: usize, log: LogWriter) -> Self {
        Self { tail: TailBuffer::new(cap), log }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.tail.push(chunk);
        // Writing to a log writer only buffers; it cannot fail.
        let _ = self.log.write_all(chunk);
    }

    /// The pipe ended: a last line without a newline is a line too.
    fn end(&mut self) {
        let _ = self.log.flush();
    }

    fn into_tail(self) -> String {
        self.tail.into_string()
    }
}

/// Waits for the child while reading both pipes into their captures.
async fn collect(child: &mut Child, stdout: &mut Capture, stderr: &mut Capture) -> io::Result<ExitStatus> {
    let out_pipe = child.stdout.take();
    let err_pipe = child.stderr.take();
    let reads = async {
        tokio::join!(read_tail(out_pipe, stdout), read_tail(err_pipe, stderr));
    };
    tokio::pin!(reads);
    let mut reads_done = false;
    let status = tokio::select! {
        status = child.wait() => status?,
        () = &mut reads => {
            reads_done = true;
            child.wait().await?
        }
    };
    if !reads_done && tokio::time::timeout(PIPE_DRAIN, &mut reads).await.is_err() {
        tracing::debug!("output pipes still open after the program exited; output cut");
    }
    Ok(status)
}

async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, capture: &mut Capture) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => capture.push(chunk.get(..n).unwrap_or_default()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::debug!("reading output failed: {err}");
                break;
            }
        }
    }
    capture.end();
}

/// The exit code, or 128 + signal number for a program killed by a signal
/// (the shell convention).
fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return 128 + signal;
        }
    }
    -1
}

/// The process group a spawned program leads (it was spawned with
/// `process_group(0)`), killed on [`kill`](Self::kill) or on drop unless
/// disarmed, so no grandchild outlives a cancelled or abandoned task.
#[derive(Debug)]
struct ProcessGroup {
    pgid: Option<i32>,
}

impl ProcessGroup {
    fn new(pid: Option<u32>) -> Self {
        Self { pgid: pid.and_then(|pid| i32::try_from(pid).ok()).filter(|pid| *pid > 0) }
    }

    /// The program ended on its own: leave whatever it left running alone.
    fn disarm(&mut self) {
        self.pgid = None;
    }

    /// Sends SIGTERM to the group, waits up to `grace` for every member to
    /// exit (reaping the leader meanwhile), then SIGKILLs whatever is left.
    async fn terminate(&mut self, child: &mut Child, grace: Duration) {
        let Some(pgid) = self.pgid else {
            return;
        };
        signal_group(pgid, TERMINATE);
        let deadline = tokio::time::Instant::now() + grace;
        let mut leader_reaped = false;
        while tokio::time::Instant::now() < deadline {
            if !leader_reaped {
                if let Ok(Ok(_)) = tokio::time::timeout(GROUP_POLL, child.wait()).await {
                    leader_reaped = true;
                }
            } else {
                tokio::time::sleep(GROUP_POLL).await;
            }
            if leader_reaped && !group_alive(pgid) {
                self.pgid = None;
                return;
            }
        }
        tracing::debug!(pgid, "process group outlived its grace period; killing it");
        self.kill();
        if let Err(err) = child.start_kill() {
            tracing::debug!("killing the program failed: {err}");
        }
        if tokio::time::timeout(REAP_WAIT, child.wait()).await.is_err() {
            tracing::warn!(pgid, "killed process not reaped in time");
        }
    }

    fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        signal_group(pgid, KILL);
    }
}

#[cfg(unix)]
const TERMINATE: i32 = libc::SIGTERM;
#[cfg(unix)]
const KILL: i32 = libc::SIGKILL;
#[cfg(not(unix))]
const TERMINATE: i32 = 15;
#[cfg(not(unix))]
const KILL: i32 = 9;

fn signal_group(pgid: i32, signal: i32) {
    #[cfg(unix)]
    {
        // SAFETY: kill(2) takes plain integers and has no memory-safety
        // preconditions; the negative pid addresses the process group.
        let rc = unsafe { libc::kill(-pgid, signal) };
        if rc != 0 {
            tracing::debug!(pgid, signal, "signalling the process group failed: {}", io::Error::last_os_error());
        }
    }
    #[cfg(not(unix))]
    let _ = (pgid, signal);
}

/// Whether any process of the group still exists (zombies count until
/// their parent reaps them).
fn group_alive(pgid: i32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: as in `signal_group`; signal 0 only checks for existence.
        let rc = unsafe { libc::kill(-pgid, 0) };
        rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pgid;
        false
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keeps the last `cap` bytes written to it, without holding more than
/// twice that in memory however much is written.
#[derive(Debug)]
struct TailBuffer {
    bytes: Vec<u8>,
    cap: usize,
}

impl TailBuffer {
    fn new(cap: usize) -> Self {
        Self { bytes: Vec::new(), cap }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.cap.saturating_mul(2) {
            let excess = self.bytes.len() - self.cap;
            self.bytes.drain(..excess);
        }
    }

    /// The tail as text: invalid UTF-8 is replaced, and a character cut in
    /// half at the start of the tail is dropped rather than shown as junk.
    fn into_string(self) -> String {
        let start = self.bytes.len().saturating_sub(self.cap);
        let mut tail = self.bytes.get(start..).unwrap_or_default();
        if start > 0 {
            let partial = tail.iter().take(3).take_while(|&&byte| byte & 0b1100_0000 == 0b1000_0000).count();
            tail = tail.get(partial..).unwrap_or_default();
        }
        String::from_utf8_lossy(tail).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ShellCommand, TaskError> {
        parse_payload(json.as_bytes())
    }

    fn expect_invalid(json: &str) {
        match parse(json) {
            Err(err) => {
                assert_eq!(err.reason, "invalid_payload", "{json}");
                assert!(!err.retryable, "{json}");
                assert!(err.message.starts_with("invalid payload: "), "{}", err.message);
            }
            Ok(command) => panic!("{json} parsed as {command:?}"),
        }
    }

    #[test]
    fn payload_with_argv_env_and_cwd_parses() {
        let command = parse(r#"{"argv": ["echo", "hello", "world"], "env": {"K": "V"}, "cwd": "/tmp"}"#);
        let expected = ShellCommand {
            program: "echo".to_owned(),
            args: vec!["hello".to_owned(), "world".to_owned()],
            env: BTreeMap::from([("K".to_owned(), "V".to_owned())]),
            cwd: Some(PathBuf::from("/tmp")),
        };
        assert_eq!(command, Ok(expected));
    }

    #[test]
    fn payload_env_and_cwd_are_optional_or_null() {
        for json in [r#"{"argv": ["true"]}"#, r#"{"argv": ["true"], "env": null, "cwd": null}"#] {
            let command = parse(json);
            assert!(
                matches!(&command, Ok(c) if c.program == "true" && c.env.is_empty() && c.cwd.is_none()),
                "{json}: {command:?}"
            );
        }
    }

    #[test]
    fn bad_payloads_are_fatal_invalid_payload() {
        for json in [
            "not json",
            "{}",
            r#"{"argv": []}"#,
            r#"{"argv": [""]}"#,
            r#"{"argv": "echo hi"}"#,
            r#"{"argv": ["echo"], "args": ["typo"]}"#,
            r#"{"argv": ["echo"], "env": {"K": 1}}"#,
            r#"{"argv": ["echo"], "env": {"A=B": "1"}}"#,
            r#"{"argv": ["echo"], "env": {"": "1"}}"#,
            r#"{"argv": ["echo"], "env": {"A": "x\u0000y"}}"#,
        ] {
            expect_invalid(json);
        }
    }

    #[test]
    fn more_variables_than_the_limit_are_an_invalid_payload_naming_it() {
        let env: serde_json::Map<String, serde_json::Value> =
            (0..=MAX_PAYLOAD_ENV).map(|i| (format!("V{i}"), serde_json::Value::from(""))).collect();
        let json = serde_json::json!({"argv": ["true"], "env": env}).to_string();
        expect_invalid(&json);
        let err = parse(&json).err().map(|err| err.message).unwrap_or_default();
        assert!(err.contains("env") && err.contains(&MAX_PAYLOAD_ENV.to_string()), "{err}");
    }

    #[test]
    fn tail_buffer_keeps_everything_under_the_cap() {
        let mut tail = TailBuffer::new(8);
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.into_string(), "abcdef");
    }

    #[test]
    fn tail_buffer_keeps_the_last_cap_bytes() {
        let mut tail = TailBuffer::new(4);
        for chunk in [&b"0123"[..], b"4567", b"89", b"abcdefgh", b"XYZ"] {
            tail.push(chunk);
            assert!(tail.bytes.len() <= 8, "memory stays bounded");
        }
        assert_eq!(tail.into_string(), "hXYZ");
    }

    #[test]
    fn tail_buffer_caps_64_kib_streams() {
        let mut tail = TailBuffer::new(MAX_STREAM_BYTES);
        for _ in 0..100 {
            tail.push(&[b'a'; 4096]);
        }
        tail.push(b"END");
        let text = tail.into_string();
        assert_eq!(text.len(), MAX_STREAM_BYTES);
        assert!(text.ends_with("aEND"));
    }

    #[test]
    fn tail_buffer_drops_a_character_cut_at_the_start() {
        let mut tail = TailBuffer::new(5);
        tail.push("aé€x".as_bytes()); // a(1) é(2) €(3) x(1): the last 5 bytes cut é
        assert_eq!(tail.into_string(), "€x");
    }

    #[test]
    fn tail_buffer_replaces_invalid_utf8() {
        let mut tail = TailBuffer::new(16);
        tail.push(&[b'o', b'k', 0xff]);
        assert_eq!(tail.into_string(), "ok\u{fffd}");
    }

    #[test]
    fn exit_error_names_code_and_stderr_tail() {
        let output = ShellOutput { exit_code: 3, stdout: String::new(), stderr: "warning\nfatal: broken\n".to_owned() };
        let err = exit_error("make", &output, true);
        assert_eq!(err.reason, "exit_code");
        assert!(err.retryable);
        assert!(!exit_error("make", &output, false).retryable);
        assert_eq!(err.message, "make exited with code 3: warning\nfatal: broken");
    }

    #[test]
    fn missing_program_is_a_fatal_spawn_failure_naming_it() {
        let err = spawn_error("nope", &io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(err.reason, "spawn_failed");
        assert!(!err.retryable);
        assert!(err.message.contains("nope"));
        let transient = spawn_error("x", &io::Error::from(io::ErrorKind::WouldBlock));
        assert!(transient.retryable);
    }
}
