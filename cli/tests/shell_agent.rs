//! The shell agent as a real process (`muster shell-agent`) against a real
//! server on 127.0.0.1:0 with sled in a temp dir: what its commands see, what
//! its flags refuse, and what is left of its commands when it is killed.
#![cfg(target_os = "linux")]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use muster_sdk::{AgentState, Client, NewTask, Task, TaskState};
use serde_json::{Value, json};

/// How long the processes of a killed agent's commands may take to be seen
/// gone: the supervisor notices at once and the grace below is short; the
/// rest is room for a loaded machine to schedule the dying processes.
const GONE_BOUND: Duration = Duration::from_secs(10);

/// `muster shell-agent` with `extra` flags and `env` added to this
/// process's environment.
fn agent_command(endpoint: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(muster_bin());
    command
        .args(["--server", endpoint, "shell-agent", "--name", name, "--slots", "2"])
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

fn spawn_agent(endpoint: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Process {
    Process { child: agent_command(endpoint, name, extra, env).spawn().expect("start muster shell-agent") }
}

async fn run_to_end(client: &Client, payload: &Value) -> Result<Task, Box<dyn std::error::Error + Send + Sync>> {
    let task = client.submit(NewTask::new("shell").json(payload)?.build()).await?;
    Ok(tokio::time::timeout(Duration::from_secs(20), client.wait(&task.id)).await??)
}

fn stdout_of(task: &Task) -> String {
    serde_json::from_slice::<Value>(&task.output)
        .ok()
        .and_then(|output| output["stdout"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The variable names in `env`'s output.
fn names_in(env_output: &str) -> Vec<String> {
    env_output.lines().filter_map(|line| line.split_once('=').map(|(name, _)| name.to_owned())).collect()
}

/// Variables `sh` sets by itself.
const SHELL_OWN: [&str; 4] = ["PWD", "OLDPWD", "SHLVL", "_"];

#[tokio::test]
async fn by_default_a_command_sees_the_pass_list_and_not_the_agents_secrets() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let _agent = spawn_agent(
        &server.endpoint,
        "clean-shell",
        &[],
        &[("MUSTER_TEST_SECRET", "hunter2"), ("LANG", "C.UTF-8"), ("TZ", "UTC")],
    );
    wait_for_agents(&client, "shell", 1).await;
    let done =
        run_to_end(&client, &json!({"argv": ["sh", "-c", "echo \"secret=[$MUSTER_TEST_SECRET]\"; env"]})).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let stdout = stdout_of(&done);
    assert!(stdout.starts_with("secret=[]\n"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(stdout.contains("LANG=C.UTF-8\n") && stdout.contains("TZ=UTC\n"), "passed by default: {stdout}");
    for name in names_in(stdout.trim_start_matches("secret=[]\n")) {
        let expected =
            muster_shell_agent::DEFAULT_PASS_ENV.contains(&name.as_str()) || SHELL_OWN.contains(&name.as_str());
        assert!(expected, "{name} reached the command: {stdout}");
    }
    Ok(())
}

#[tokio::test]
async fn a_command_cannot_read_the_agents_environment_through_proc() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let mut command = agent_command(&server.endpoint, "guarded-shell", &[], &[("MUSTER_TEST_SECRET", "hunter2")]);
    // Root reads any process's /proc files: run the agent, and so its
    // commands, as an ordinary user, as it should be run.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534).current_dir("/");
    }
    let agent = Process { child: command.spawn()? };
    wait_for_agents(&client, "shell", 1).await;
    // $PPID is the command's supervisor, a fork of the agent.
    let script = format!("for p in {} $PPID; do cat /proc/$p/environ; done; echo read", agent.pid());
    let done = run_to_end(&client, &json!({"argv": ["sh", "-c", script]})).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let output: Value = serde_json::from_slice(&done.output)?;
    let (stdout, stderr) =
        (output["stdout"].as_str().unwrap_or_default(), output["stderr"].as_str().unwrap_or_default());
    assert!(stdout.ends_with("read\n"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "the agent's environment leaked ({} bytes read)", stdout.len());
    assert_eq!(stderr.matches("Permission denied").count(), 2, "both reads were refused: {stderr}");
    Ok(())
}

#[tokio::test]
async fn pass_env_replaces_the_list_and_inherit_env_passes_everything() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let env = [("MUSTER_TEST_SECRET", "hunter2"), ("MUSTER_TEST_VISIBLE", "yes")];
    let mut listed = spawn_agent(&server.endpoint, "listed-shell", &["--pass-env", "MUSTER_TEST_VISIBLE"], &env);
    wait_for_agents(&client, "shell", 1).await;
    let done = run_to_end(&client, &json!({"argv": ["/usr/bin/env"]})).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(names_in(&stdout_of(&done)), ["MUSTER_TEST_VISIBLE"], "{}", stdout_of(&done));
    listed.kill9();

    let _everything = spawn_agent(&server.endpoint, "inheriting-shell", &["--inherit-env"], &env);
    eventually(Duration::from_secs(10), "the inheriting agent alone serves shell", || async {
        client.list_agents("shell").await.is_ok_and(|agents| {
            agents.iter().filter(|a| a.state == AgentState::Connected).all(|a| a.name == "inheriting-shell")
                && agents.iter().any(|a| a.name == "inheriting-shell" && a.state == AgentState::Connected)
        })
    })
    .await;
    let done = run_to_end(&client, &json!({"argv": ["/usr/bin/env"]})).await?;
    assert!(stdout_of(&done).contains("MUSTER_TEST_SECRET=hunter2\n"), "{done:?}");
    Ok(())
}

#[tokio::test]
async fn the_allowlist_flag_and_refused_variables_fail_tasks_for_good() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let _agent = spawn_agent(&server.endpoint, "strict-shell", &["--allow-programs", "echo"], &[]);
    wait_for_agents(&client, "shell", 1).await;

    let done = run_to_end(&client, &json!({"argv": ["echo", "hi"]})).await?;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(stdout_of(&done), "hi\n");

    let done = run_to_end(&client, &json!({"argv": ["sh", "-c", "echo hi"]})).await?;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!(done.attempt, 1, "not retried");
    let failure = done.failure.unwrap_or_default();
    assert_eq!(failure.reason, "program_not_allowed", "{failure:?}");
    assert!(failure.message.contains("sh"), "{}", failure.message);

    let done = run_to_end(&client, &json!({"argv": ["echo", "hi"], "env": {"LD_PRELOAD": "/tmp/evil.so"}})).await?;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!(done.attempt, 1, "not retried");
    let failure = done.failure.unwrap_or_default();
    assert_eq!(failure.reason, "env_not_allowed", "{failure:?}");
    assert!(failure.message.contains("LD_PRELOAD"), "{}", failure.message);
    Ok(())
}

#[tokio::test]
async fn killing_the_agent_with_sigkill_ends_its_commands_process_groups() -> TestResult {
    let server = spawn_server().await;
    let client = server.client().await;
    let mut agent = spawn_agent(&server.endpoint, "doomed-shell", &["--kill-grace", "300ms"], &[]);
    wait_for_agents(&client, "shell", 1).await;
    let dir = tempfile::tempdir()?;
    // One command ends on SIGTERM; the other (shell and child) ignores it
    // and needs the SIGKILL after the grace.
    let mut groups = Vec::new();
    let mut processes = Vec::new();
    for (name, prologue) in [("cooperative", ""), ("stubborn", "trap '' TERM; ")] {
        let shell_file = dir.path().join(format!("{name}.shell"));
        let child_file = dir.path().join(format!("{name}.child"));
        let script = format!(
            "{prologue}echo $$ > '{}'; sleep 60 & echo $! > '{}'; wait",
            shell_file.display(),
            child_file.display()
        );
        client.submit(NewTask::new("shell").json(&json!({"argv": ["sh", "-c", script]}))?.build()).await?;
        let shell = wait_for_pid(&shell_file).await;
        let child = wait_for_pid(&child_file).await;
        let pgid = process_group(shell);
        let members = group_members(pgid);
        assert!(members.contains(&shell) && members.contains(&child), "{name}: {members:?} in group {pgid}");
        groups.push(pgid);
        processes.extend([shell, child]);
    }

    agent.kill9();
    let deadline = tokio::time::Instant::now() + GONE_BOUND;
    loop {
        let left: Vec<u32> = groups.iter().flat_map(|pgid| group_members(*pgid)).collect();
        let alive: Vec<u32> = processes.iter().copied().filter(|pid| is_alive(*pid)).collect();
        if left.is_empty() && alive.is_empty() {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{GONE_BOUND:?} after the agent was killed, groups {groups:?} still hold {left:?} (alive: {alive:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_pid(path: &Path) -> u32 {
    let mut pid = None;
    eventually(Duration::from_secs(10), &format!("{} to be written", path.display()), || {
        pid = std::fs::read_to_string(path).ok().and_then(|text| text.trim().parse().ok());
        std::future::ready(pid.is_some())
    })
    .await;
    pid.unwrap_or_default()
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid,
/// pgrp, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Present and not a zombie (a container's init may never reap an orphan).
fn is_alive(pid: u32) -> bool {
    stat_fields(pid).and_then(|fields| fields.first().cloned()).is_some_and(|state| state != "Z" && state != "X")
}

fn process_group(pid: u32) -> u32 {
    stat_fields(pid).and_then(|fields| fields.get(2)?.parse().ok()).unwrap_or_default()
}

/// Live processes of group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_alive(*pid) && process_group(*pid) == pgid)
        .collect()
}
