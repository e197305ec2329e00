//! A complete Muster agent in one file: capability `echo` returns its
//! payload.
//!
//! Run a server (`muster dev`), then:
//!
//! ```text
//! MUSTER_SERVER=http://127.0.0.1:7070 cargo run -p muster-sdk --example echo_agent
//! ```
//!
//! Set the task metadata `delay_ms` to make the handler take a while, which
//! shows progress reports and cancellation.

use std::time::Duration;

use muster_sdk::{Agent, Output, TaskContext, TaskError};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let server = std::env::var("MUSTER_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7070".into());

    let agent = Agent::builder("echo-example").server(server).handler("echo", echo).slots(8).build()?;
    // Serves until SIGTERM or Ctrl-C, then lets running tasks finish.
    agent.run().await?;
    Ok(())
}

/// Returns the payload unchanged, after an optional delay.
async fn echo(ctx: TaskContext) -> Result<Output, TaskError> {
    let delay_ms: u64 = match ctx.metadata().get("delay_ms") {
        // Bad input will not get better on retry: fail for good.
        Some(raw) => raw.parse().map_err(|_| TaskError::fatal(format!("delay_ms {raw:?} is not a number")))?,
        None => 0,
    };

    // Work in ten steps, reporting progress after each one (skipped when
    // there is no delay, so a no-op echo costs one round trip). Progress is
    // best effort: it never fails the handler.
    let steps = if delay_ms == 0 { 0 } else { 10 };
    let step = Duration::from_millis(delay_ms / 10);
    for done in 1..=steps {
        tokio::select! {
            // Honour cancellation promptly: the task was cancelled, timed out
            // or the agent is shutting down. The runtime reports the right
            // outcome from this error.
            () = ctx.cancelled() => return Err(TaskError::fatal("stopped before the echo finished")),
            () = tokio::time::sleep(step) => {}
        }
        ctx.progress(done * 10, format!("step {done} of 10")).await;
    }

    // Keep the submitter's content type so readers decode the output the way
    // they encoded the payload.
    Ok(Output { data: ctx.payload().to_vec(), content_type: ctx.content_type().to_owned() })
}
