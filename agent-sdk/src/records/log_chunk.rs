//! Task log chunks as [`Client::logs`](crate::Client::logs) streams them.

use std::time::SystemTime;

use super::time::system_time;
use crate::{LogStream, proto};

/// One line of a task's log, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogLine {
    /// When the agent produced it.
    pub time: Option<SystemTime>,
    /// Where it came from.
    pub stream: LogStream,
    /// Its UTF-8 text, cut by the server past its line limit.
    pub text: String,
}

impl From<proto::LogLine> for LogLine {
    fn from(line: proto::LogLine) -> Self {
        Self { time: system_time(line.time), stream: line.stream.into(), text: line.text }
    }
}

/// Consecutive lines of one attempt's log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogChunk {
    /// The attempt they belong to.
    pub attempt: u32,
    /// The position of the first line in the attempt's log, from 1,
    /// counting lines that were lost.
    pub first_line: u64,
    /// The lines.
    pub lines: Vec<LogLine>,
    /// Lines of this attempt lost right before these (dropped by the
    /// server's tail or by the agent's full buffer).
    pub dropped: u64,
    /// True on the attempt's last chunk once its log is complete.
    pub complete: bool,
}

impl From<proto::TaskLogs> for LogChunk {
    fn from(logs: proto::TaskLogs) -> Self {
        Self {
            attempt: logs.attempt,
            first_line: logs.first_line,
            lines: logs.lines.into_iter().map(LogLine::from).collect(),
            dropped: logs.dropped,
            complete: logs.complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_positions_and_streams() {
        let wire = proto::TaskLogs {
            attempt: 2,
            first_line: 11,
            lines: vec![proto::LogLine {
                time: None,
                stream: proto::LogStream::Stderr.into(),
                text: "oops".to_owned(),
            }],
            dropped: 3,
            complete: true,
        };
        let chunk = LogChunk::from(wire);
        assert_eq!((chunk.attempt, chunk.first_line, chunk.dropped, chunk.complete), (2, 11, 3, true));
        assert_eq!((chunk.lines[0].stream, chunk.lines[0].text.as_str()), (LogStream::Stderr, "oops"));
    }
}
