//! The `muster` binary as a new user meets it: `muster dev` in one
//! process, `muster task …` from another.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn muster(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(muster_bin())
        .args(["--server", endpoint])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run muster")
}

#[test]
fn muster_dev_runs_a_shell_task_submitted_with_wait() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(muster_bin())
        .args(["dev", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut dev = Process { child };
    // Keep draining stdout so the child never writes into a closed pipe.
    let (found, endpoint) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.trim().strip_prefix("gRPC") {
                let _ = found.send(rest.trim().to_owned());
            }
        }
    });
    let endpoint = endpoint.recv_timeout(std::time::Duration::from_secs(30))?;

    let out = muster(
        &endpoint,
        &["task", "submit", "shell", "--payload", r#"{"argv":["echo","hello"]}"#, "--wait", "--output", "json"],
    );
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let task: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(task["state"], "SUCCEEDED");
    assert_eq!(task["attempt"], 1);
    assert!(task["output"]["stdout"].as_str().unwrap_or_default().contains("hello"), "{task}");

    let out = muster(
        &endpoint,
        &[
            "task",
            "submit",
            "shell",
            "--payload",
            r#"{"argv":["false"]}"#,
            "--max-attempts",
            "1",
            "--wait",
            "--output",
            "json",
        ],
    );
    assert!(!out.status.success(), "a failed task makes --wait exit non-zero");
    let task: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(task["state"], "FAILED");

    let out = muster(&endpoint, &["task", "list", "--state", "succeeded", "--output", "json"]);
    assert!(out.status.success());
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(tasks.as_array().map(Vec::len), Some(1));

    let out = muster(&endpoint, &["agent", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = agents.as_array().into_iter().flatten().filter_map(|a| a["name"].as_str()).collect();
    assert!(names.contains(&"dev-shell") && names.contains(&"dev-http"), "{names:?}");

    let out = muster(&endpoint, &["task", "get", "not-an-id"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT") && stderr.contains("id"), "{stderr}");

    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(dev.pid(), libc::SIGTERM) };
    let status = dev.child.wait()?;
    assert!(status.success(), "muster dev stops cleanly on SIGTERM: {status:?}");
    Ok(())
}

#[tokio::test]
async fn the_pipeline_example_runs_through_the_workflow_and_queue_commands() -> TestResult {
    let server = spawn_server().await;
    let mut agents = Vec::new();
    for capability in ["research", "write", "code", "review"] {
        agents.push(spawn_agent(&server.endpoint, capability, capability, &[], 2, move |ctx| async move {
            let upstream: Vec<String> = ctx.parent_outputs().iter().map(|p| p.key.clone()).collect();
            Ok(muster_sdk::Output::from(format!("{capability} after {upstream:?}")))
        }));
    }
    let endpoint = server.endpoint.clone();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pipeline.yaml");
    let run = move |args: Vec<String>| {
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            muster(&endpoint, &args)
        })
    };
    let out = run(vec!["workflow".into(), "submit".into(), example.into(), "--wait".into()]).await?;
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCEEDED 4") && text.contains("100% complete"), "{text}");
    let id = text.split_whitespace().nth(1).ok_or("no workflow id printed")?.to_owned();

    let out = run(vec!["workflow".into(), "get".into(), id, "--output".into(), "json".into()]).await?;
    let workflow: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(workflow["done"], true);
    let review = workflow["tasks"].as_array().and_then(|t| t.iter().find(|t| t["key"] == "review")).ok_or("review")?;
    let review_id = review["id"].as_str().ok_or("review id")?.to_owned();
    let out = run(vec!["task".into(), "get".into(), review_id.clone(), "--output".into(), "json".into()]).await?;
    let task: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let output = task["output"].as_str().unwrap_or_default();
    assert!(output.contains("\"write\"") && output.contains("\"code\""), "review saw its parents: {output}");

    let out = run(vec!["task".into(), "explain".into(), review_id]).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("finished"));
    let out = run(vec!["queue".into(), "pause".into(), "default".into()]).await?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused"));
    let out = run(vec!["queue".into(), "list".into(), "--output".into(), "json".into()]).await?;
    let queues: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(queues[0]["paused"], true);
    let out = run(vec!["queue".into(), "resume".into(), "default".into()]).await?;
    assert!(out.status.success());
    for (stop, handle) in agents {
        stop.cancel();
        handle.await??;
    }
    Ok(())
}

/// `muster` with a bearer token, as an operator runs it.
fn muster_as(endpoint: &str, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(muster_bin())
        .args(["--server", endpoint, "--token", token])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run muster")
}

#[test]
fn token_create_list_and_revoke_from_the_cli_scope_and_then_refuse_the_secret() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_server, endpoint) = spawn_serve_process(dir.path(), &["--auth"]);
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?.trim().to_owned();

    let out = muster_as(
        &endpoint,
        &admin,
        &[
            "token",
            "create",
            "--name",
            "ci",
            "--role",
            "submitter",
            "--queue",
            "builds",
            "--expires",
            "30d",
            "--output",
            "json",
        ],
    );
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((created["name"].as_str(), created["role"].as_str()), (Some("ci"), Some("submitter")));
    assert_eq!(created["queues"], serde_json::json!(["builds"]));
    assert!(!created["expires_at"].is_null(), "{created}");
    let secret = created["secret"].as_str().ok_or("a secret, shown once")?.to_owned();

    // Listed without its secret.
    let out = muster_as(&endpoint, &admin, &["token", "list", "--output", "json"]);
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout)?;
    assert!(listed.contains("\"ci\"") && !listed.contains(&secret), "{listed}");

    // The token submits to its queue only, and cannot manage tokens.
    let submit = |queue: &str| {
        muster_as(
            &endpoint,
            &secret,
            &["task", "submit", "shell", "--queue", queue, "--payload", r#"{"argv":["true"]}"#],
        )
    };
    assert!(submit("builds").status.success());
    let refused = submit("other");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).to_lowercase().contains("permission"), "{refused:?}");
    let out = muster_as(&endpoint, &secret, &["token", "list"]);
    assert!(!out.status.success(), "a submitter cannot list tokens");

    // Revoked, the secret is refused at once.
    let out = muster_as(&endpoint, &admin, &["token", "revoke", "ci", "--output", "json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let revoked: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(!revoked["revoked_at"].is_null(), "{revoked}");
    let after = submit("builds");
    assert!(!after.status.success());
    assert!(String::from_utf8_lossy(&after.stderr).contains("revoked"), "{after:?}");
    Ok(())
}

#[test]
fn muster_serve_keeps_serving_when_nobody_reads_its_banner() -> TestResult {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(muster_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    // The reader goes away before the banner is written.
    drop(child.stdout.take());
    let server = Process { child };
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = muster(&endpoint, &["queue", "list"]);
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the server never answered: {out:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Its whole banner has been written (or failed to be) by now.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut server = server;
    assert!(server.child.try_wait()?.is_none(), "muster serve exited");
    assert!(muster(&endpoint, &["queue", "list"]).status.success());
    Ok(())
}

#[tokio::test]
async fn status_names_the_version_the_store_and_this_server_as_leader() -> TestResult {
    let server = spawn_server().await;
    let endpoint = server.endpoint.clone();
    let out = tokio::task::spawn_blocking(move || muster(&endpoint, &["--output", "json", "status"])).await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["store"], "sled", "{status}");
    assert_eq!(status["leader"], server.endpoint);
    assert_eq!(status["leader_epoch"], 0);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    Ok(())
}
