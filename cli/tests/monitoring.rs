//! The shipped monitoring against a real Prometheus: a server and agents
//! doing real work (successes, failures, retries, a lost agent, work no
//! agent can run) are scraped by `prometheus` started from the shipped
//! `monitoring/prometheus/prometheus.yml`; then every PromQL expression in
//! the dashboards and rule files must parse and return data, `promtool`
//! must accept both kinds of `/metrics`, and the rule unit tests must pass.
//! A server with authentication is scraped from the shipped
//! `prometheus-secure.yml` with a viewer token.
//!
//! Needs `prometheus` and `promtool` on PATH (Debian: `apt-get install
//! prometheus`; `.ci/run` installs it). Missing tools fail the test.

// A test: a malformed shipped file or a missing tool should fail loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use muster_sdk::{Agent, NewTask, Output, TaskError, TaskState, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

/// A plain HTTP/1.0 GET: (status, body).
async fn http_get(addr: &str, path_and_query: &str) -> Result<(u16, String), std::io::Error> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .map_err(std::io::Error::other)??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; `Err` carries Prometheus's error (a parse error).
async fn query(prometheus: &str, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={}", percent_encode(expr)))
        .await
        .map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status != 200 || json["status"] != "success" {
        return Err(format!("{status}: {}", json["error"]));
    }
    Ok(json["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Every `expr` of a rules file: one-line values and `|` blocks.
fn rule_exprs(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(n) = trimmed.strip_prefix("alert:").or_else(|| trimmed.strip_prefix("record:")) {
            name = n.trim().to_owned();
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            if value == "|" || value == "|-" {
                let indent = line.len() - line.trim_start().len();
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                exprs.push((name.clone(), block.join(" ").trim().to_owned()));
            } else {
                exprs.push((name.clone(), value.to_owned()));
            }
        }
        i += 1;
    }
    exprs
}

/// Every panel target `expr` of a dashboard, with Grafana's variables
/// replaced by what "All" and the default range mean.
fn dashboard_exprs(path: &Path) -> Vec<(String, String)> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        // A row only groups the panels after it.
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr.replace("$__rate_interval", "1m").replace("$queue", ".*").replace("$agent", ".*");
            exprs.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    exprs
}

/// The `.yml` files of `dir`, sorted.
fn yml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

/// An alert's expression without its final threshold comparison, so its
/// signal can be checked for data even when the alert is not firing.
fn without_threshold(expr: &str) -> Option<String> {
    let trimmed = expr.trim_end();
    let number_start = trimmed.rfind(|c: char| !(c.is_ascii_digit() || c == '.'))? + 1;
    if number_start == trimmed.len() {
        return None;
    }
    let rest = trimmed[..number_start].trim_end();
    for op in [">=", "<=", "==", "!=", ">", "<"] {
        if let Some(lhs) = rest.strip_suffix(op) {
            return Some(lhs.trim_end().to_owned());
        }
    }
    None
}

fn promtool_check_metrics(body: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed: apt-get install prometheus");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics rejected the {what}'s /metrics:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn fail_twice() -> proto::TaskSpec {
    NewTask::new("echo")
        .payload("fail")
        .max_attempts(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
}

/// Waits until Prometheus scrapes the server and `agents` agents found
/// through HTTP-SD, all up.
async fn wait_for_targets(prometheus: &str, agents: usize) {
    eventually(Duration::from_secs(60), &format!("the server and {agents} agents scraped"), || async {
        let Ok((_, body)) = http_get(prometheus, "/api/v1/targets?state=active").await else { return false };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { return false };
        let targets = json["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let up = |job: &str| targets.iter().filter(|t| t["labels"]["job"] == job && t["health"] == "up").count();
        up("muster-server") == 1 && up("muster-agents") == agents
    })
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The shipped `file` (prometheus.yml or prometheus-secure.yml) pointed at
/// `server_http`, scraping every second, with absolute rule paths.
fn write_prometheus_config(dir: &Path, file: &str, server_http: SocketAddr) -> PathBuf {
    let shipped = std::fs::read_to_string(monitoring_dir().join("prometheus").join(file)).unwrap();
    let rules = monitoring_dir().join("prometheus/rules").canonicalize().unwrap();
    let config = shipped
        .replace("127.0.0.1:7071", &server_http.to_string())
        .replace(": 15s", ": 1s")
        .replace("- rules/", &format!("- {}/", rules.display()));
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_server_and_agents_and_every_dashboard_and_rule_query_returns_data() -> TestResult {
    let server = spawn_server().await;
    let http = server.server.as_ref().unwrap().http_addr();
    let client = server.client().await;

    // An in-process SDK agent with metrics: "fail" payloads fail (retryable).
    let echo = Agent::builder("echo-1")
        .server(server.endpoint.clone())
        .slots(4)
        .metrics_listen("127.0.0.1:0".parse()?)
        .handler("echo", |ctx| async move {
            if ctx.payload() == b"fail" {
                return Err(TaskError::retryable("asked to fail"));
            }
            Ok(Output::from(ctx.payload().to_vec()))
        })
        .build()?;
    let echo_stop = muster_sdk::CancellationToken::new();
    tokio::spawn(echo.run_until(echo_stop.clone()));
    // A shell agent process that will be killed while it holds work.
    let mut doomed = spawn_shell_agent_process_with_metrics(&server.endpoint, "shell-doomed");
    wait_for_agents(&client, "echo", 1).await;
    wait_for_agents(&client, "shell", 1).await;

    let prom_dir = tempfile::tempdir()?;
    let config = write_prometheus_config(prom_dir.path(), "prometheus.yml", http);
    let prometheus = format!("127.0.0.1:{}", free_port());
    let _prometheus_process = Process {
        child: Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
            .arg(format!("--web.listen-address={prometheus}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("prometheus is not installed: apt-get install prometheus"),
    };
    eventually(Duration::from_secs(30), "prometheus ready", || async {
        matches!(http_get(&prometheus, "/-/ready").await, Ok((200, _)))
    })
    .await;

    // Discovery reaches the scrapers only every few seconds: scrape the
    // counters at zero before the work, or increase() cannot see it.
    wait_for_targets(&prometheus, 2).await;

    // Work: successes, failures that retry and then fail, work no agent
    // can run, a NOT_FOUND call, and an attempt lost with its agent.
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(client.submit(NewTask::new("echo").payload(format!("hello {i}")).build()).await?.id);
    }
    for _ in 0..4 {
        ids.push(client.submit(fail_twice()).await?.id);
    }
    for _ in 0..2 {
        client.submit(NewTask::new("gpu").queue("render").build()).await?;
    }
    assert!(client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV").await.is_err());
    let sleeper = NewTask::new("shell")
        .payload(r#"{"argv":["sleep","300"]}"#)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build();
    let sleeper = client.submit(sleeper).await?.id;
    wait_for_state(&client, &sleeper, TaskState::Running).await;
    doomed.kill9();
    let _survivor = spawn_shell_agent_process_with_metrics(&server.endpoint, "shell-survivor");
    for id in &ids {
        let task = client.wait(id).await?;
        assert!(matches!(task.state, TaskState::Succeeded | TaskState::Failed), "{id} ended {:?}", task.state);
    }
    // The lost attempt is retried on the surviving agent.
    eventually(Duration::from_secs(20), "the lost attempt retried", || async {
        client.get(&sleeper).await.is_ok_and(|t| t.state == TaskState::Running && t.attempt == 2)
    })
    .await;

    // promtool accepts the server's and an agent's exposition.
    let (status, server_metrics) = http_get(&http.to_string(), "/metrics").await?;
    assert_eq!(status, 200);
    assert!(server_metrics.contains("muster_tasks_lost_total{"), "{server_metrics}");
    assert!(
        server_metrics
            .contains("muster_grpc_requests_total{code=\"NOT_FOUND\",method=\"/muster.v1.TaskService/GetTask\"} 1"),
        "the gRPC layer counts the failed call by method and code: {server_metrics}"
    );
    for family in ["muster_store_size_bytes ", "muster_store_disk_free_bytes ", "muster_store_records{kind=\"task\"} "]
    {
        assert!(server_metrics.contains(family), "the store gauges are measured at start: {server_metrics}");
    }
    promtool_check_metrics(&server_metrics, "server");
    let (_, sd) = http_get(&http.to_string(), "/sd/agents").await?;
    let sd: serde_json::Value = serde_json::from_str(&sd)?;
    let agent_targets: Vec<String> =
        sd.as_array().unwrap().iter().map(|g| g["targets"][0].as_str().unwrap().to_owned()).collect();
    let names: Vec<&str> = sd.as_array().unwrap().iter().map(|g| g["labels"]["agent_name"].as_str().unwrap()).collect();
    assert!(names.contains(&"echo-1") && names.contains(&"shell-survivor"), "{sd}");
    assert!(!names.contains(&"shell-doomed"), "a lost agent leaves discovery: {sd}");
    for target in &agent_targets {
        let (status, body) = http_get(target, "/metrics").await?;
        assert_eq!(status, 200, "{target}");
        assert!(body.contains("muster_agent_tasks_total"), "{body}");
        promtool_check_metrics(&body, "agent");
    }

    // Prometheus found the agents through HTTP-SD and scrapes everything.
    wait_for_targets(&prometheus, agent_targets.len()).await;
    for (what, expr) in [
        ("the lost attempt scraped", "increase(muster_tasks_lost_total[5m]) > 0"),
        ("the failure ratio recorded", "muster:task_failure_ratio:rate5m"),
        ("the surviving agent scraped", "muster_agent_tasks_total{agent_name=\"shell-survivor\"}"),
    ] {
        eventually(Duration::from_secs(30), what, || async {
            query(&prometheus, expr).await.is_ok_and(|r| !r.is_empty())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut failures = Vec::new();
    let mut checked = 0;
    let dashboards = monitoring_dir().join("grafana/dashboards");
    let mut sources: Vec<(String, String, bool)> = Vec::new();
    for entry in std::fs::read_dir(&dashboards)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            for (title, expr) in dashboard_exprs(&path) {
                sources.push((format!("{file}: {title}"), expr, false));
            }
        }
    }
    let rule_files = yml_files(&monitoring_dir().join("prometheus/rules"));
    assert!(rule_files.len() >= 2, "the recording and alert rules: {rule_files:?}");
    for path in &rule_files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for (name, expr) in rule_exprs(path) {
            sources.push((format!("{file}: {name}"), expr, file.contains("alerts")));
        }
    }
    assert!(sources.len() > 30, "expected every panel and rule, found {}", sources.len());
    for (what, expr, is_alert) in &sources {
        checked += 1;
        match query(&prometheus, expr).await {
            Err(e) => failures.push(format!("{what}: does not parse: {e}\n  {expr}")),
            Ok(result) if !result.is_empty() => {}
            Ok(_) => {
                // An alert that is not firing returns nothing: its signal
                // (the expression without the threshold) must have data.
                let signal = if *is_alert { without_threshold(expr) } else { None };
                let ok = match &signal {
                    Some(signal) => query(&prometheus, signal).await.is_ok_and(|r| !r.is_empty()),
                    None => false,
                };
                if !ok {
                    failures.push(format!("{what}: no data\n  {expr}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} expressions failed:\n{}", failures.len(), failures.join("\n"));

    // The rule unit tests pass, every file of them.
    let tests = yml_files(&monitoring_dir().join("prometheus/tests"));
    assert!(!tests.is_empty(), "no rule unit tests");
    let output = Command::new("promtool")
        .args(["test", "rules"])
        .args(&tests)
        .current_dir(monitoring_dir().join("prometheus/tests"))
        .output()
        .expect("promtool is not installed: apt-get install prometheus");
    assert!(
        output.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    echo_stop.cancel();
    Ok(())
}

#[test]
fn thresholds_are_stripped_only_from_the_end_of_an_alert_expression() {
    assert_eq!(without_threshold("max(x) > 600").as_deref(), Some("max(x)"));
    assert_eq!(without_threshold("a > 0 unless on (c) b > 0.25").as_deref(), Some("a > 0 unless on (c) b"));
    assert_eq!(without_threshold("rate(x[5m])"), None);
}

#[tokio::test]
async fn state_gauges_describe_the_stored_backlog_after_a_restart() -> TestResult {
    let mut server = spawn_server().await;
    let client = server.client().await;
    for _ in 0..3 {
        client.submit(NewTask::new("gpu").queue("render").build()).await?;
    }
    server.server.take().unwrap().shutdown().await?;

    let restarted = muster_server::start(make_config(server.dir.path()), muster_sdk::CancellationToken::new()).await?;
    let (status, text) = http_get(&restarted.http_addr().to_string(), "/metrics").await?;
    assert_eq!(status, 200);
    assert!(text.contains("muster_queue_backlog{capability=\"gpu\",queue=\"render\"} 3"), "{text}");
    assert!(text.contains("muster_tasks{state=\"queued\"} 3"), "{text}");
    restarted.shutdown().await?;
    Ok(())
}

/// Points the shipped prometheus-secure.yml's `credentials_file` (for
/// /metrics and /sd/agents) at `token_file`, as an operator would.
fn with_token_file(config: &Path, token_file: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let shipped = "credentials_file: /etc/prometheus/muster.token";
    assert_eq!(text.matches(shipped).count(), 2, "prometheus-secure.yml sends a token to /metrics and /sd/agents");
    let mine = format!("credentials_file: {}", token_file.display());
    std::fs::write(config, text.replace(shipped, &mine)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_server_with_auth_using_a_viewer_token() -> TestResult {
    const ADMIN: &str = "muster_monitoring_admin_secret_0123456789abcdef";
    let server = spawn_server_with(|config| {
        config.auth.enabled = Some(true);
        config.auth.bootstrap_token = Some(ADMIN.into());
    })
    .await;
    let http = server.server.as_ref().unwrap().http_addr();
    let admin =
        muster_sdk::Client::connect_with(server.endpoint.clone(), &muster_sdk::Credentials::new().token(ADMIN)?)
            .await?;
    let request = proto::CreateTokenRequest {
        name: "prometheus".into(),
        role: proto::Role::Viewer as i32,
        scope: None,
        expires_in_seconds: 0,
    };
    let viewer = admin.create_token(request).await?.secret;
    let agent_token = admin
        .create_token(proto::CreateTokenRequest {
            name: "echo-agent".into(),
            role: proto::Role::Agent as i32,
            scope: None,
            expires_in_seconds: 0,
        })
        .await?
        .secret;

    let echo = Agent::builder("echo-1")
        .server(server.endpoint.clone())
        .credentials(muster_sdk::Credentials::new().token(&agent_token)?)
        .metrics_listen("127.0.0.1:0".parse()?)
        .handler("echo", |ctx| async move { Ok(Output::from(ctx.payload().to_vec())) })
        .build()?;
    let echo_stop = muster_sdk::CancellationToken::new();
    tokio::spawn(echo.run_until(echo_stop.clone()));
    wait_for_agents(&admin, "echo", 1).await;

    let prom_dir = tempfile::tempdir()?;
    let token_file = prom_dir.path().join("muster.token");
    std::fs::write(&token_file, &viewer)?;
    let config = write_prometheus_config(prom_dir.path(), "prometheus-secure.yml", http);
    with_token_file(&config, &token_file);
    let prometheus = format!("127.0.0.1:{}", free_port());
    let _prometheus_process = Process {
        child: Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
            .arg(format!("--web.listen-address={prometheus}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("prometheus is not installed: apt-get install prometheus"),
    };
    // The server target is up only if /metrics accepted the token, and the
    // agent is found only if /sd/agents did.
    wait_for_targets(&prometheus, 1).await;
    let up = query(&prometheus, "up{job=\"muster-server\"}").await?;
    assert_eq!(up[0]["value"][1], "1", "{up:?}");
    echo_stop.cancel();
    Ok(())
}
