//! The SDK's own public types for what a handler is given, with
//! conversions from and to the wire types. Agent authors depend on these,
//! not on the generated proto structs, so a change to the proto does not
//! break their code.

use crate::proto;

/// How urgent a task is; higher priorities are dispatched first (FIFO
/// within a level).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Priority {
    /// Background work, dispatched after everything else.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Ahead of normal work.
    High,
    /// Ahead of everything.
    Critical,
}

impl From<proto::Priority> for Priority {
    /// An unspecified priority is treated as normal, as the server does.
    fn from(priority: proto::Priority) -> Self {
        match priority {
            proto::Priority::Low => Self::Low,
            proto::Priority::Unspecified | proto::Priority::Normal => Self::Normal,
            proto::Priority::High => Self::High,
            proto::Priority::Critical => Self::Critical,
        }
    }
}

impl From<i32> for Priority {
    /// Reads a wire value; unspecified and unknown values are normal.
    fn from(value: i32) -> Self {
        proto::Priority::try_from(value).unwrap_or_default().into()
    }
}

impl Priority {
    /// The lower-case name ("critical").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

impl From<Priority> for proto::Priority {
    fn from(priority: Priority) -> Self {
        match priority {
            Priority::Low => Self::Low,
            Priority::Normal => Self::Normal,
            Priority::High => Self::High,
            Priority::Critical => Self::Critical,
        }
    }
}

/// The output of a task the current one depended on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParentOutput {
    /// The parent's key in its workflow (its id when it had none).
    pub key: String,
    /// The parent task's id.
    pub task_id: String,
    /// What the parent's handler returned.
    pub output: Vec<u8>,
    /// How `output` is encoded.
    pub content_type: String,
}

impl From<proto::ParentOutput> for ParentOutput {
    fn from(parent: proto::ParentOutput) -> Self {
        Self { key: parent.key, task_id: parent.task_id, output: parent.output, content_type: parent.content_type }
    }
}

/// Where a log line came from; see
/// [`TaskContext::log_stream`](crate::TaskContext::log_stream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LogStream {
    /// The handler's own log ([`TaskContext::log`](crate::TaskContext::log)).
    #[default]
    Log,
    /// A child process's standard output.
    Stdout,
    /// A child process's standard error.
    Stderr,
}

impl LogStream {
    /// The lower-case name ("stdout").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

impl From<proto::LogStream> for LogStream {
    /// An unspecified stream is the handler's log.
    fn from(stream: proto::LogStream) -> Self {
        match stream {
            proto::LogStream::Unspecified | proto::LogStream::Log => Self::Log,
            proto::LogStream::Stdout => Self::Stdout,
            proto::LogStream::Stderr => Self::Stderr,
        }
    }
}

impl From<i32> for LogStream {
    /// Reads a wire value; unspecified and unknown values are the log.
    fn from(value: i32) -> Self {
        proto::LogStream::try_from(value).unwrap_or_default().into()
    }
}

impl From<LogStream> for proto::LogStream {
    fn from(stream: LogStream) -> Self {
        match stream {
            LogStream::Log => Self::Log,
            LogStream::Stdout => Self::Stdout,
            LogStream::Stderr => Self::Stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_convert_both_ways_and_unspecified_is_normal() {
        for priority in [Priority::Low, Priority::Normal, Priority::High, Priority::Critical] {
            assert_eq!(Priority::from(proto::Priority::from(priority)), priority);
        }
        assert_eq!(Priority::from(proto::Priority::Unspecified), Priority::Normal);
        assert!(Priority::Critical > Priority::High && Priority::Low < Priority::Normal);
    }

    #[test]
    fn parent_outputs_keep_every_field() {
        let wire = proto::ParentOutput {
            key: "build".to_owned(),
            task_id: "t1".to_owned(),
            output: b"{}".to_vec(),
            content_type: "application/json".to_owned(),
        };
        let parent = ParentOutput::from(wire);
        assert_eq!((parent.key.as_str(), parent.task_id.as_str()), ("build", "t1"));
        assert_eq!((parent.output.as_slice(), parent.content_type.as_str()), (&b"{}"[..], "application/json"));
    }

    #[test]
    fn log_streams_map_to_their_wire_values() {
        assert_eq!(proto::LogStream::from(LogStream::default()), proto::LogStream::Log);
        assert_eq!(proto::LogStream::from(LogStream::Stdout), proto::LogStream::Stdout);
        assert_eq!(proto::LogStream::from(LogStream::Stderr), proto::LogStream::Stderr);
        for stream in [LogStream::Log, LogStream::Stdout, LogStream::Stderr] {
            assert_eq!(LogStream::from(i32::from(proto::LogStream::from(stream))), stream);
        }
        assert_eq!(LogStream::from(0), LogStream::Log);
        assert_eq!(LogStream::from(99).as_str(), "log");
    }

    #[test]
    fn wire_priorities_read_unknown_values_as_normal() {
        assert_eq!(Priority::from(i32::from(proto::Priority::High)), Priority::High);
        assert_eq!(Priority::from(99), Priority::Normal);
        assert_eq!(Priority::Critical.as_str(), "critical");
    }
}
