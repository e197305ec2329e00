//! [`LogWriter`]: bulk output (a child process, an `io::Write` user) turned
//! into log lines of one stream and pushed into an attempt's [`LogSink`].

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::logs::{LogSink, MAX_LINE_BYTES};
use crate::text::truncate_at_char_boundary;
use crate::types::LogStream;

/// A partial line held by a [`LogWriter`] stops growing here: enough for
/// every character that starts before [`MAX_LINE_BYTES`] to be complete.
const MAX_PARTIAL_BYTES: usize = MAX_LINE_BYTES + 3;

/// One line of raw output as text: a `\r` ending it is dropped, invalid
/// UTF-8 is replaced, and it is cut to [`MAX_LINE_BYTES`].
fn line_from_bytes(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    // Converting only what can be kept bounds the work for huge lines;
    // every character starting before the cut is still complete.
    let bytes = bytes.get(..MAX_PARTIAL_BYTES).unwrap_or(bytes);
    let mut line = String::from_utf8_lossy(bytes).into_owned();
    truncate_at_char_boundary(&mut line, MAX_LINE_BYTES);
    line
}

/// Turns bulk output into log lines of one stream: bytes are split at
/// `\n`, and a last line without a newline is held until one comes, or the
/// writer is flushed or dropped.
///
/// Implements [`std::io::Write`] and [`tokio::io::AsyncWrite`]; writes
/// always succeed at once, whatever happens to the lines afterwards (see
/// [`TaskContext::log`](crate::TaskContext::log)). Invalid UTF-8 is
/// replaced, and lines are cut to 16 KiB.
///
/// ```no_run
/// use std::io::Write;
///
/// use muster_sdk::{LogStream, TaskContext};
///
/// fn report(ctx: &TaskContext) -> std::io::Result<()> {
///     let mut out = ctx.log_writer(LogStream::Stdout);
///     writeln!(out, "step 1 done")?;
///     write!(out, "step 2 ")?;
///     writeln!(out, "done")?;
///     Ok(())
/// }
/// ```
pub struct LogWriter {
    sink: LogSink,
    stream: LogStream,
    /// The unfinished last line, capped at [`MAX_PARTIAL_BYTES`].
    partial: Vec<u8>,
}

impl LogWriter {
    pub(crate) fn new(sink: LogSink, stream: LogStream) -> Self {
        Self { sink, stream, partial: Vec::new() }
    }

    /// Buffers the complete lines of `buf` and holds its unfinished end.
    fn push_bytes(&mut self, buf: &[u8]) {
        let mut lines = Vec::new();
        let mut rest = buf;
        while let Some(newline) = rest.iter().position(|&byte| byte == b'\n') {
            let segment = rest.get(..newline).unwrap_or_default();
            if self.partial.is_empty() {
                lines.push(line_from_bytes(segment));
            } else {
                self.hold(segment);
                lines.push(line_from_bytes(&self.partial));
                self.partial.clear();
            }
            rest = rest.get(newline + 1..).unwrap_or_default();
        }
        self.hold(rest);
        self.sink.push(self.stream, lines);
    }

    /// Adds to the unfinished line what can still be kept of it.
    fn hold(&mut self, bytes: &[u8]) {
        let room = MAX_PARTIAL_BYTES.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(bytes.get(..room).unwrap_or(bytes));
    }

    /// Sends the unfinished line as a line of its own.
    fn end_partial(&mut self) {
        if !self.partial.is_empty() {
            let line = line_from_bytes(&self.partial);
            self.partial.clear();
            self.sink.push(self.stream, vec![line]);
        }
    }
}

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push_bytes(buf);
        Ok(buf.len())
    }

    /// Ends an unfinished line: the bytes written since the last newline
    /// become a line of their own.
    fn flush(&mut self) -> io::Result<()> {
        self.end_partial();
        Ok(())
    }
}

impl tokio::io::AsyncWrite for LogWriter {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().push_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().end_partial();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().end_partial();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.end_partial();
    }
}

impl fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogWriter")
            .field("sink", &self.sink)
            .field("stream", &self.stream)
            .field("partial_len", &self.partial.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::sync::mpsc;

    use super::*;
    use crate::proto;

    fn make_sink() -> LogSink {
        let (tx, _rx) = mpsc::channel(4);
        let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
        LogSink::new(("t1".to_owned(), 2), tx, dropped)
    }

    fn texts(lines: &[proto::LogLine]) -> Vec<&str> {
        lines.iter().map(|line| line.text.as_str()).collect()
    }

    fn take_all(sink: &LogSink) -> (Vec<proto::LogLine>, u64) {
        sink.take().unwrap_or_default()
    }

    #[test]
    fn writer_holds_a_partial_line_until_newline_or_flush() -> io::Result<()> {
        let sink = make_sink();
        let mut writer = LogWriter::new(sink.clone(), LogStream::Stdout);
        writer.write_all(b"hel")?;
        assert!(!sink.has_pending());
        writer.write_all(b"lo\r\nwor")?;
        writer.write_all(b"ld\nnext")?;
        assert_eq!(texts(&take_all(&sink).0), ["hello", "world"]);
        writer.flush()?;
        assert_eq!(texts(&take_all(&sink).0), ["next"]);
        writer.flush()?;
        assert!(!sink.has_pending());
        Ok(())
    }

    #[test]
    fn dropping_a_writer_ends_its_partial_line() -> io::Result<()> {
        let sink = make_sink();
        let mut writer = LogWriter::new(sink.clone(), LogStream::Stderr);
        writer.write_all(b"a\n\nno newline")?;
        drop(writer);
        let (lines, _) = take_all(&sink);
        assert_eq!(texts(&lines), ["a", "", "no newline"]);
        assert!(lines.iter().all(|line| line.stream() == proto::LogStream::Stderr));
        Ok(())
    }

    #[test]
    fn writer_replaces_invalid_utf8_and_caps_endless_lines() -> io::Result<()> {
        let sink = make_sink();
        let mut writer = LogWriter::new(sink.clone(), LogStream::Stdout);
        writer.write_all(&[b'o', b'k', 0xff, b'\n'])?;
        for _ in 0..100 {
            writer.write_all(&[b'x'; 4096])?;
            assert!(writer.partial.len() <= MAX_PARTIAL_BYTES, "memory stays bounded");
        }
        writer.write_all(b"END\n")?;
        let (lines, _) = take_all(&sink);
        assert_eq!(texts(&lines).first(), Some(&"ok\u{fffd}"));
        assert_eq!(lines.get(1).map(|line| line.text.len()), Some(MAX_LINE_BYTES));
        Ok(())
    }

    #[test]
    fn writer_keeps_a_character_split_across_writes() -> io::Result<()> {
        let sink = make_sink();
        let mut writer = LogWriter::new(sink.clone(), LogStream::Stdout);
        let euro = "€".as_bytes();
        writer.write_all(euro.get(..1).unwrap_or_default())?;
        writer.write_all(euro.get(1..).unwrap_or_default())?;
        writer.write_all(b"\n")?;
        assert_eq!(texts(&take_all(&sink).0), ["€"]);
        Ok(())
    }

    #[tokio::test]
    async fn writer_works_as_an_async_writer() -> io::Result<()> {
        use tokio::io::AsyncWriteExt;

        let sink = make_sink();
        let mut writer = LogWriter::new(sink.clone(), LogStream::Stdout);
        AsyncWriteExt::write_all(&mut writer, b"one\ntw").await?;
        writer.shutdown().await?;
        assert_eq!(texts(&take_all(&sink).0), ["one", "tw"]);
        Ok(())
    }
}
