//! The agent of the guide (`agent-sdk/README.md`): capability `word-count`
//! counts the words of a text, with a typed JSON payload and output,
//! progress, live log lines, cancellation and graceful shutdown.
//!
//! ```text
//! cargo run -p muster -- dev                      # a server with its agents
//! cargo run -p muster-sdk --example word_count    # this agent joins it
//! muster task submit word-count --payload '{"text":"a b c"}' --wait --output json
//! ```

use std::time::Duration;

use muster_sdk::{Agent, Output, TaskContext, TaskError};
use serde::{Deserialize, Serialize};

/// What a submitter sends.
#[derive(Debug, Deserialize)]
pub struct CountRequest {
    /// The text to count.
    pub text: String,
    /// Pause per line, to watch progress and cancellation (default 0).
    #[serde(default)]
    pub pause_ms: u64,
}

/// What the task returns.
#[derive(Debug, Serialize)]
pub struct CountResult {
    /// Lines in the text.
    pub lines: usize,
    /// Words in the text.
    pub words: usize,
}

/// The handler: one call per attempt.
pub async fn count(ctx: TaskContext) -> Result<Output, TaskError> {
    // A payload that does not parse fails for good (reason
    // `invalid_payload`): retrying cannot fix it.
    let request: CountRequest = ctx.json()?;
    let lines: Vec<&str> = request.text.lines().collect();
    // Live log lines: `muster task logs ID --follow` shows them as they
    // come. Never blocks; the oldest lines are dropped if the agent cannot
    // keep up.
    ctx.log(format!("counting {} lines", lines.len()));
    let mut words = 0;
    for (done, line) in lines.iter().enumerate() {
        tokio::select! {
            // Cancelled, timed out, or the agent is shutting down: stop now.
            () = ctx.cancelled() => return Err(TaskError::fatal("stopped before counting finished")),
            () = tokio::time::sleep(Duration::from_millis(request.pause_ms)) => {}
        }
        words += line.split_whitespace().count();
        // Best effort: dropped rather than queued when the agent is busy or
        // disconnected, and never fails the handler.
        let percent = u32::try_from((done + 1) * 100 / lines.len()).unwrap_or(100);
        ctx.progress(percent, format!("{} of {} lines", done + 1, lines.len())).await;
    }
    if words > 1_000_000 {
        // A failure that may pass on another attempt would be
        // `TaskError::retryable`; the retry policy decides when.
        return Err(TaskError::fatal("more than a million words").with_reason("too_large"));
    }
    ctx.log(format!("counted {words} words"));
    Output::json(&CountResult { lines: lines.len(), words })
}

/// The agent, ready to run against `server`.
pub fn build(server: &str) -> Result<Agent, muster_sdk::Error> {
    Agent::builder("word-counter")
        .server(server)
        .slots(4)
        .label("team", "docs")
        .handler("word-count", count)
        // On SIGTERM the agent stops taking work and waits this long for
        // running handlers before cancelling them.
        .drain_grace(Duration::from_secs(30))
        .build()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let server = std::env::var("MUSTER_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7070".into());
    // Runs until SIGTERM or Ctrl-C, then drains.
    build(&server)?.run().await?;
    Ok(())
}
