//! `TaskService.GetTaskLogs`: a task's logs attempt by attempt, optionally
//! followed until the task is finished.
//!
//! Each pass reads the task from the store, then each attempt's lines past
//! the reader's position from the log hub (live tails) or the store (ended
//! attempts). A follower waits for a change of the task's logs or an event
//! of the task between passes; it subscribes to both before the first pass,
//! so nothing that happens between a read and the wait is missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use muster_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::convert;
use super::reads::{blocking, read_task};
use crate::error::Error;
use crate::logs::{Follower, LogHub, attempt_over};
use crate::model::{LogLine, LogStream, TaskEvent, TaskId};
use crate::store::Store;

/// Most lines in one streamed message.
const CHUNK_LINES: usize = 1000;
/// A follower re-reads this often even without a change, as a safety net.
const RECHECK: Duration = Duration::from_secs(2);

/// What a reader asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogRequest {
    pub(crate) task: TaskId,
    /// One attempt, or every attempt.
    pub(crate) attempt: Option<u32>,
    pub(crate) follow: bool,
}

/// Where a reader is in one attempt's log.
#[derive(Debug, Default)]
struct Cursor {
    /// Position of the last line sent (0 before any).
    last: u64,
    /// Whether any message was sent for the attempt.
    sent: bool,
    /// Whether the attempt's log was sent in full.
    complete: bool,
}

type Tx = mpsc::Sender<Result<pb::TaskLogs, Status>>;

/// Streams the logs `request` asks for into `tx`.
pub(crate) async fn stream(
    store: Arc<dyn Store>,
    hub: Arc<LogHub>,
    events: &broadcast::Sender<TaskEvent>,
    request: LogRequest,
    tx: Tx,
    shutdown: CancellationToken,
) {
    let mut follower = request.follow.then(|| hub.follow(request.task));
    let mut events = request.follow.then(|| events.subscribe());
    let mut cursors: BTreeMap<u32, Cursor> = BTreeMap::new();
    loop {
        let task = match read_task(&store, request.task).await {
            Ok(task) => task,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let attempts = match request.attempt {
            Some(attempt) => attempt..=attempt,
            None => 1..=task.attempt,
        };
        let mut all_over = true;
        for attempt in attempts {
            let cursor = cursors.entry(attempt).or_default();
            if cursor.complete {
                continue;
            }
            let (reader, id, after) = (hub.clone(), task.id, cursor.last);
            let read = match blocking(move || reader.read(id, attempt, after).map_err(Error::from)).await {
                Ok(read) => read,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let over = !read.live && attempt_over(&task, attempt);
            if send_lines(&tx, attempt, cursor, read.lines, over).await.is_err() {
                return;
            }
            cursor.complete = over;
            all_over &= over;
        }
        // One attempt is done once its log is; every attempt, once the
        // task is finished too.
        if !request.follow || (all_over && (task.state.is_terminal() || request.attempt.is_some())) {
            return;
        }
        tokio::select! {
            () = changed(&mut follower) => {}
            () = task_event(&mut events, request.task) => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = tx.closed() => return,
            () = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("the server is shutting down"))).await;
                return;
            }
        }
    }
}

/// Sends `lines` in messages of consecutive positions, the last one marked
/// complete when `over`. Errs when the reader went away.
async fn send_lines(tx: &Tx, attempt: u32, cursor: &mut Cursor, lines: Vec<LogLine>, over: bool) -> Result<(), ()> {
    let mut chunks: Vec<pb::TaskLogs> = Vec::new();
    for line in lines {
        let extends = chunks.last().is_some_and(|chunk| {
            chunk.lines.len() < CHUNK_LINES
                && chunk.first_line.saturating_add(chunk.lines.len() as u64) == line.position
        });
        if !extends {
            chunks.push(pb::TaskLogs {
                attempt,
                first_line: line.position,
                dropped: line.position.saturating_sub(cursor.last.saturating_add(1)),
                ..pb::TaskLogs::default()
            });
        }
        cursor.last = line.position;
        if let Some(chunk) = chunks.last_mut() {
            chunk.lines.push(line_to_pb(line));
        }
    }
    match chunks.last_mut() {
        Some(chunk) => chunk.complete = over,
        // An attempt already shown gets its end marked.
        None if over && cursor.sent => {
            chunks.push(pb::TaskLogs {
                attempt,
                first_line: cursor.last + 1,
                complete: true,
                ..pb::TaskLogs::default()
            });
        }
        None => {}
    }
    for chunk in chunks {
        cursor.sent = true;
        tx.send(Ok(chunk)).await.map_err(|_| ())?;
    }
    Ok(())
}

fn line_to_pb(line: LogLine) -> pb::LogLine {
    let stream = match line.stream {
        LogStream::Log => pb::LogStream::Log,
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
    };
    pb::LogLine { time: Some(convert::timestamp(line.at)), stream: stream.into(), text: line.text }
}

async fn changed(follower: &mut Option<Follower>) {
    match follower {
        Some(follower) => follower.changed().await,
        None => std::future::pending().await,
    }
}

/// Completes on the next event of `task` (or when events were missed).
async fn task_event(events: &mut Option<broadcast::Receiver<TaskEvent>>, task: TaskId) {
    let Some(events) = events else { return std::future::pending().await };
    loop {
        match events.recv().await {
            Ok(event) if event.task_id == task => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}
