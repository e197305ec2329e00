//! Attempt logs: lines and the tails kept of them.

use serde::{Deserialize, Serialize};

use super::*;

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    /// The handler's own log.
    Log,
    /// A child process's standard output.
    Stdout,
    /// A child process's standard error.
    Stderr,
}

/// One line of an attempt's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its place in the attempt's log, from 1, counting dropped lines too.
    pub position: u64,
    /// When the agent produced it.
    pub at: Millis,
    /// Where it came from.
    pub stream: LogStream,
    /// The text, without its line terminator.
    pub text: String,
}

/// The kept tail of one attempt's log, as persisted once the attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// The task.
    pub task_id: TaskId,
    /// The attempt.
    pub attempt: u32,
    /// The kept lines, oldest first.
    pub lines: Vec<LogLine>,
    /// Lines lost in total: dropped from the tail, or by the agent.
    pub dropped: u64,
    /// The position the next line would take.
    pub next_position: u64,
}
