//! Live task logs on the agent's side: the bounded buffer each attempt's
//! lines wait in ([`LogSink`]) and the batching of buffered lines into
//! `LogLines` messages. `log_writer.rs` turns bulk output into lines.
//!
//! Handlers never wait on the network to log. A line goes into its attempt's
//! buffer under a short lock; the first line into an empty buffer also
//! queues the attempt's key to the session owner (`runtime.rs`), whose
//! state machine drains the buffer on the throttle's schedule
//! (`attempts.rs`). A full buffer drops its oldest lines and counts them, so
//! the server can show the gap.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::proto;
use crate::text::truncate_at_char_boundary;
use crate::types::LogStream;

/// One attempt of one task: `(task_id, attempt)`.
pub(crate) type AttemptKey = (String, u32);

/// Longest line kept, in bytes; longer lines are cut at a character
/// boundary. Matches the server's default `max_log_line_bytes`.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024;

/// Memory one attempt's unsent lines may take (text plus
/// [`LINE_OVERHEAD`] per line) before the oldest are dropped.
pub(crate) const MAX_PENDING_BYTES: usize = 1024 * 1024;

/// What a buffered line costs beyond its text: the struct, its timestamp
/// and the queue slot.
const LINE_OVERHEAD: usize = 48;

/// Most lines in one `LogLines` message.
pub(crate) const MAX_BATCH_LINES: usize = 4096;

/// Largest estimated encoded size of one `LogLines` message: far below the
/// server's 16 MiB message limit, small enough not to stall other messages
/// of the session behind it.
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Estimated encoding cost of a line beyond its text (timestamp, stream,
/// field tags and lengths).
const ENCODED_LINE_OVERHEAD: usize = 32;

/// The unsent lines of one attempt.
#[derive(Debug)]
pub(crate) struct PendingLogs {
    lines: VecDeque<proto::LogLine>,
    /// Cost of `lines`, see [`line_cost`].
    bytes: usize,
    capacity: usize,
    /// Lines dropped since the last drain, oldest first, to make room.
    dropped: u64,
    /// The session owner has been told there is something to drain.
    notified: bool,
    /// The attempt ended or was discarded: new lines are ignored.
    closed: bool,
}

impl PendingLogs {
    fn new(capacity: usize) -> Self {
        Self { lines: VecDeque::new(), bytes: 0, capacity, dropped: 0, notified: false, closed: false }
    }

    /// Appends `line`, dropping the oldest lines while over capacity (the
    /// newest line always stays); returns how many were dropped.
    fn push(&mut self, line: proto::LogLine) -> u64 {
        self.bytes += line_cost(&line);
        self.lines.push_back(line);
        let mut evicted = 0;
        while self.bytes > self.capacity && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= line_cost(&old);
                evicted += 1;
            }
        }
        self.dropped += evicted;
        evicted
    }

    /// Everything buffered and the count dropped before it; `None` when
    /// there is nothing to send.
    fn take(&mut self) -> Option<(Vec<proto::LogLine>, u64)> {
        self.notified = false;
        if self.lines.is_empty() && self.dropped == 0 {
            return None;
        }
        let lines = std::mem::take(&mut self.lines).into();
        let dropped = std::mem::take(&mut self.dropped);
        self.bytes = 0;
        Some((lines, dropped))
    }

    fn has_pending(&self) -> bool {
        !self.lines.is_empty() || self.dropped > 0
    }
}

/// What a buffered line costs against [`MAX_PENDING_BYTES`].
fn line_cost(line: &proto::LogLine) -> usize {
    line.text.len() + LINE_OVERHEAD
}

/// The handle through which one attempt's context and writers log, shared
/// with the session owner that drains it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LogSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    key: AttemptKey,
    pending: Mutex<PendingLogs>,
    /// Wakes the session owner; carries the attempt whose buffer went from
    /// empty to not empty.
    notify: mpsc::Sender<AttemptKey>,
    /// `muster_agent_log_lines_dropped_total`.
    dropped_total: prometheus::IntCounter,
}

impl LogSink {
    /// A sink for the attempt `key`, holding up to [`MAX_PENDING_BYTES`].
    pub(crate) fn new(
        key: AttemptKey,
        notify: mpsc::Sender<AttemptKey>,
        dropped_total: prometheus::IntCounter,
    ) -> Self {
        Self::with_capacity(key, notify, dropped_total, MAX_PENDING_BYTES)
    }

    fn with_capacity(
        key: AttemptKey,
        notify: mpsc::Sender<AttemptKey>,
        dropped_total: prometheus::IntCounter,
        capacity: usize,
    ) -> Self {
        Self {
            inner: Arc::new(SinkInner { key, pending: Mutex::new(PendingLogs::new(capacity)), notify, dropped_total }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PendingLogs> {
        // The buffer stays consistent across a panic in another holder: every
        // mutation completes before anything that could panic.
        self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Buffers `texts`, each already one line, as lines of `stream`, and
    /// wakes the session owner if the buffer was idle. Never blocks on the
    /// network and never fails.
    pub(crate) fn push(&self, stream: LogStream, texts: Vec<String>) {
        if texts.is_empty() {
            return;
        }
        let stream = proto::LogStream::from(stream);
        let time = prost_types::Timestamp::from(SystemTime::now());
        let (evicted, notify) = {
            let mut pending = self.lock();
            if pending.closed {
                return;
            }
            let mut evicted = 0;
            for text in texts {
                evicted += pending.push(proto::LogLine { time: Some(time), stream: stream.into(), text });
            }
            let notify = !pending.notified;
            pending.notified = true;
            (evicted, notify)
        };
        if evicted > 0 {
            self.inner.dropped_total.inc_by(evicted);
        }
        if notify && self.inner.notify.try_send(self.inner.key.clone()).is_err() {
            // The session owner is far behind or gone: let the next line try
            // again. The lines are not lost either way, the owner drains
            // every buffer when its attempt ends.
            self.lock().notified = false;
        }
    }

    /// Takes everything buffered, for sending.
    pub(crate) fn take(&self) -> Option<(Vec<proto::LogLine>, u64)> {
        self.lock().take()
    }

    /// Whether lines (or a count of dropped ones) wait to be sent.
    pub(crate) fn has_pending(&self) -> bool {
        self.lock().has_pending()
    }

    /// The attempt ended: takes what is left and ignores later lines (from
    /// a context clone that outlived the handler), which the server would
    /// no longer accept after the result.
    pub(crate) fn close(&self) -> Option<(Vec<proto::LogLine>, u64)> {
        let mut pending = self.lock();
        pending.closed = true;
        pending.take()
    }

    /// The attempt is no longer this agent's: forgets its lines.
    pub(crate) fn discard(&self) {
        let mut pending = self.lock();
        pending.closed = true;
        pending.take();
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending = self.lock();
        f.debug_struct("LogSink")
            .field("task_id", &self.inner.key.0)
            .field("attempt", &self.inner.key.1)
            .field("lines", &pending.lines.len())
            .field("bytes", &pending.bytes)
            .field("dropped", &pending.dropped)
            .field("closed", &pending.closed)
            .finish()
    }
}

/// Splits `text` into lines at `\n`. A single trailing newline ends the last
/// line rather than starting an empty one, a `\r` ending a line is dropped,
/// and lines are cut to [`MAX_LINE_BYTES`].
pub(crate) fn split_lines(text: String) -> Vec<String> {
    if !text.contains('\n') {
        let mut line = text;
        if line.ends_with('\r') {
            line.pop();
        }
        truncate_at_char_boundary(&mut line, MAX_LINE_BYTES);
        return vec![line];
    }
    let body = text.strip_suffix('\n').unwrap_or(&text);
    body.split('\n').map(|line| clip(line.strip_suffix('\r').unwrap_or(line)).to_owned()).collect()
}

/// The longest prefix of `line` within [`MAX_LINE_BYTES`] that ends at a
/// character boundary.
fn clip(line: &str) -> &str {
    crate::text::prefix_at_char_boundary(line, MAX_LINE_BYTES)
}

/// Groups `lines` into messages of at most [`MAX_BATCH_LINES`] lines and
/// about [`MAX_BATCH_BYTES`] encoded, in order; the first carries
/// `dropped`. Dropped lines alone still make one message, so the server
/// counts the gap.
pub(crate) fn batches(key: &AttemptKey, lines: Vec<proto::LogLine>, dropped: u64) -> Vec<proto::LogLines> {
    let make = |lines: Vec<proto::LogLine>, dropped: u64| proto::LogLines {
        attempt: Some(proto::AttemptRef::new(key.0.clone(), key.1)),
        lines,
        dropped,
    };
    let mut messages = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0;
    let mut dropped = dropped;
    for line in lines {
        let cost = line.text.len() + ENCODED_LINE_OVERHEAD;
        if !current.is_empty() && (current.len() >= MAX_BATCH_LINES || current_bytes + cost > MAX_BATCH_BYTES) {
            messages.push(make(std::mem::take(&mut current), std::mem::take(&mut dropped)));
            current_bytes = 0;
        }
        current_bytes += cost;
        current.push(line);
    }
    if !current.is_empty() || dropped > 0 {
        messages.push(make(current, dropped));
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_sink(capacity: usize) -> (LogSink, mpsc::Receiver<AttemptKey>, prometheus::IntCounter) {
        let (tx, rx) = mpsc::channel(4);
        let dropped = prometheus::IntCounter::new("dropped_total", "Dropped.").unwrap_or_else(|e| panic!("{e}"));
        (LogSink::with_capacity(("t1".to_owned(), 2), tx, dropped.clone(), capacity), rx, dropped)
    }

    fn texts(lines: &[proto::LogLine]) -> Vec<&str> {
        lines.iter().map(|line| line.text.as_str()).collect()
    }

    fn take_all(sink: &LogSink) -> (Vec<proto::LogLine>, u64) {
        sink.take().unwrap_or_default()
    }

    #[test]
    fn split_lines_breaks_at_newlines_and_trims_carriage_returns() {
        assert_eq!(split_lines("one".to_owned()), ["one"]);
        assert_eq!(split_lines("one\r".to_owned()), ["one"]);
        assert_eq!(split_lines("one\ntwo\r\nthree".to_owned()), ["one", "two", "three"]);
        assert_eq!(split_lines("one\n".to_owned()), ["one"]);
        assert_eq!(split_lines("one\n\nthree\n".to_owned()), ["one", "", "three"]);
        assert_eq!(split_lines(String::new()), [""]);
        assert_eq!(split_lines("\n".to_owned()), [""]);
        assert_eq!(split_lines("a\rb".to_owned()), ["a\rb"]);
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_LINE_BYTES); // two bytes each
        let lines = split_lines(format!("{long}\nshort"));
        assert_eq!(lines.iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE_BYTES, 5]);
        let odd = format!("x{long}");
        let lines = split_lines(odd);
        assert_eq!(lines.first().map(String::len), Some(MAX_LINE_BYTES - 1));
        assert!(lines.iter().all(|line| line.len() <= MAX_LINE_BYTES));
    }

    #[test]
    fn full_buffer_drops_the_oldest_lines_and_counts_them() {
        // Each 2-byte line costs 50: three fit in 150.
        let (sink, _rx, dropped_total) = make_sink(150);
        sink.push(LogStream::Log, (0..5).map(|i| format!("l{i}")).collect());
        let (lines, dropped) = take_all(&sink);
        assert_eq!(texts(&lines), ["l2", "l3", "l4"]);
        assert_eq!(dropped, 2);
        assert_eq!(dropped_total.get(), 2);
        // The count is reported once.
        sink.push(LogStream::Log, vec!["l5".to_owned()]);
        let (lines, dropped) = take_all(&sink);
        assert_eq!((texts(&lines), dropped), (vec!["l5"], 0));
    }

    #[test]
    fn a_line_larger_than_the_buffer_is_still_kept() {
        let (sink, _rx, _) = make_sink(10);
        sink.push(LogStream::Log, vec!["a".to_owned(), "far too long for the buffer".to_owned()]);
        let (lines, dropped) = take_all(&sink);
        assert_eq!(texts(&lines), ["far too long for the buffer"]);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn only_the_first_line_into_an_idle_buffer_notifies() {
        let (sink, mut rx, _) = make_sink(MAX_PENDING_BYTES);
        sink.push(LogStream::Log, vec!["a".to_owned()]);
        sink.push(LogStream::Stderr, vec!["b".to_owned()]);
        assert_eq!(rx.try_recv().ok(), Some(("t1".to_owned(), 2)));
        assert!(rx.try_recv().is_err());
        let (lines, _) = take_all(&sink);
        assert_eq!(
            lines.iter().map(|line| line.stream()).collect::<Vec<_>>(),
            [proto::LogStream::Log, proto::LogStream::Stderr]
        );
        sink.push(LogStream::default(), vec!["c".to_owned()]);
        assert_eq!(rx.try_recv().ok(), Some(("t1".to_owned(), 2)));
        assert_eq!(take_all(&sink).0.first().map(|line| line.stream()), Some(proto::LogStream::Log));
    }

    #[test]
    fn closed_and_discarded_sinks_ignore_new_lines() {
        let (sink, _rx, _) = make_sink(MAX_PENDING_BYTES);
        sink.push(LogStream::Log, vec!["kept".to_owned()]);
        let closed = sink.close().unwrap_or_default();
        assert_eq!(texts(&closed.0), ["kept"]);
        sink.push(LogStream::Log, vec!["late".to_owned()]);
        assert!(!sink.has_pending());

        let (sink, _rx, _) = make_sink(MAX_PENDING_BYTES);
        sink.push(LogStream::Log, vec!["lost".to_owned()]);
        sink.discard();
        assert!(sink.take().is_none());
    }

    #[test]
    fn batches_split_by_line_count_and_carry_dropped_first() {
        let key = ("t1".to_owned(), 3);
        let line = |i: usize| proto::LogLine { text: format!("{i}"), ..proto::LogLine::default() };
        let lines: Vec<_> = (0..MAX_BATCH_LINES * 2 + 1).map(line).collect();
        let messages = batches(&key, lines, 7);
        assert_eq!(messages.iter().map(|m| m.lines.len()).collect::<Vec<_>>(), [MAX_BATCH_LINES, MAX_BATCH_LINES, 1]);
        assert_eq!(messages.iter().map(|m| m.dropped).collect::<Vec<_>>(), [7, 0, 0]);
        let all: Vec<String> = messages.iter().flat_map(|m| m.lines.iter().map(|l| l.text.clone())).collect();
        assert_eq!(all, (0..MAX_BATCH_LINES * 2 + 1).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(messages.iter().all(|m| m.attempt == Some(proto::AttemptRef::new("t1", 3))));
    }

    #[test]
    fn batches_split_by_size_and_report_drops_without_lines() {
        let key = ("t1".to_owned(), 1);
        let big = proto::LogLine { text: "x".repeat(MAX_LINE_BYTES), ..proto::LogLine::default() };
        let count = 2 * MAX_BATCH_BYTES / MAX_LINE_BYTES;
        let messages = batches(&key, vec![big; count], 0);
        assert!(messages.len() >= 2, "{} messages", messages.len());
        assert_eq!(messages.iter().map(|m| m.lines.len()).sum::<usize>(), count);
        assert!(messages.iter().all(|m| m.lines.len() * (MAX_LINE_BYTES + ENCODED_LINE_OVERHEAD) <= MAX_BATCH_BYTES));

        let only_drops = batches(&key, Vec::new(), 5);
        assert_eq!(only_drops.len(), 1);
        assert_eq!(only_drops.first().map(|m| (m.lines.len(), m.dropped)), Some((0, 5)));
        assert!(batches(&key, Vec::new(), 0).is_empty());
    }
}
