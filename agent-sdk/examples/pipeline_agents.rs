//! Four agents for `examples/pipeline.yaml`: research, write, code and
//! review. Each reads its parents' outputs and passes its own on, so the
//! review sees everything upstream.
//!
//! ```sh
//! cargo run -p muster-sdk --example pipeline_agents
//! muster workflow submit examples/pipeline.yaml --wait
//! ```

use std::time::Duration;

use muster_sdk::{Agent, CancellationToken, Output, TaskContext, TaskError};
use serde_json::{Value, json};

/// Every stage: wait a little (as real work would), honour cancellation,
/// and report what it built on.
async fn stage(ctx: TaskContext, name: &'static str) -> Result<Output, TaskError> {
    let input: Value = if ctx.payload().is_empty() { Value::Null } else { ctx.json()? };
    let upstream: Vec<Value> = ctx
        .parent_outputs()
        .iter()
        .map(|p| json!({"from": p.key, "output": serde_json::from_slice::<Value>(&p.output).unwrap_or(Value::Null)}))
        .collect();
    ctx.progress(10, format!("{name} started")).await;
    tokio::select! {
        _ = ctx.cancelled() => return Err(TaskError::fatal(format!("{name} cancelled"))),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    ctx.progress(100, format!("{name} done")).await;
    Output::json(&json!({"stage": name, "input": input, "upstream": upstream}))
}

#[tokio::main]
async fn main() -> Result<(), muster_sdk::Error> {
    let server = std::env::var("MUSTER_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7070".to_owned());
    let shutdown = CancellationToken::new();
    let mut agents = Vec::new();
    for name in ["research", "write", "code", "review"] {
        let agent = Agent::builder(format!("{name}-agent"))
            .server(server.clone())
            .slots(2)
            .handler(name, move |ctx| stage(ctx, name))
            .build()?;
        agents.push(tokio::spawn(agent.run_until(shutdown.child_token())));
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
    for agent in agents {
        if let Ok(result) = agent.await {
            result?;
        }
    }
    Ok(())
}
