//! The default store: one sled tree with prefixed keys (the layout in
//! `layout`), so a batch touching tasks, events, agents and indexes is one
//! atomic `apply_batch`. Attempt logs live in a second tree, `logs`.
//!
//! Every write goes through one lock shared with `capture`, which reads
//! the trees at a point in time for exports and verification.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::capture::{self, Changes, Reader};
use super::layout::Changes as _;
use super::layout::{
    self, AGENT, EVENT, EVENT_FLOOR, FINISHED, FINISHED_INDEX, IDEMPOTENCY, LOGS, META, QUEUE, RECORDS, TASK, TOKEN,
    UNFINISHED, WORKFLOW, check_log, check_record, decode_events, events_in_record, exported, finished_key, key,
    log_key, parse_finished_key, task_id_of,
};
use super::verify::Checker;
use super::{Export, Point, RecordCounts, Store, StoreError, VerifyReport, Write, decode, encode};
use crate::model::{AgentRecord, AttemptLog, Millis, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId};

/// sled's own default is 1 GiB, which would dominate the server's memory.
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;
/// What the writes during an export or a verification may keep of the
/// values they replace before the reading is abandoned.
const CAPTURE_LIMIT_BYTES: usize = 256 << 20;

/// A sled-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    logs: sled::Tree,
    /// Set when a write or flush failed (a full disk, an I/O error).
    failed: Arc<AtomicBool>,
    /// Held by every write; holds the point-in-time reading under way.
    capture: capture::Shared,
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // sled flushes when its last handle goes, and after a failed write
        // that flush waits forever for the write that failed: a server
        // stopping on a store failure would hang instead of exiting. A
        // failed store is left open for the process's exit; what it
        // acknowledged is durable already.
        if self.failed.load(Ordering::SeqCst) {
            std::mem::forget((self.db.clone(), self.tree.clone(), self.logs.clone()));
        }
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl SledStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    /// `flush_every` is sled's background flush period; `None` leaves
    /// flushing to [`Store::flush`].
    pub fn open(dir: &Path, flush_every: Option<std::time::Duration>) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, flush_every, DEFAULT_CACHE_BYTES)
    }

    /// Like [`SledStore::open`], with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        flush_every: Option<std::time::Duration>,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let store = Self::open_raw(dir, flush_every, cache_bytes)?;
        store.index_finished()?;
        Ok(store)
    }

    /// Builds the finished index of a store written before there was one:
    /// an entry for every finished task, then the mark that it is complete.
    fn index_finished(&self) -> Result<(), StoreError> {
        if self.tree.contains_key(key(META, FINISHED_INDEX)).map_err(engine)? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for item in self.tree.scan_prefix([TASK]) {
            let (_, v) = item.map_err(engine)?;
            // An undecodable record is for verify to report.
            if let Ok(task) = decode::<Task>(&v)
                && task.state.is_terminal()
            {
                batch.insert(finished_key(task.updated_at, task.id), &[][..]);
            }
        }
        batch.insert(key(META, FINISHED_INDEX), &[][..]);
        self.tree.apply_batch(batch).map_err(|e| self.failure(e))?;
        self.flush()
    }

    fn meta_u64(&self, name: &[u8]) -> Result<u64, StoreError> {
        match self.tree.get(key(META, name)).map_err(engine)? {
            Some(v) => {
                let bytes: [u8; 8] =
                    v.as_ref().try_into().map_err(|_| StoreError::Codec("bad metadata value".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
            None => Ok(0),
        }
    }

    fn open_raw(dir: &Path, flush_every: Option<std::time::Duration>, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(flush_every.map(|d| d.as_millis().max(1) as u64))
            .open()
            .map_err(engine)?;
        let tree = db.open_tree("muster").map_err(engine)?;
        let logs = db.open_tree("logs").map_err(engine)?;
        Ok(Self { db, tree, logs, failed: Arc::default(), capture: capture::Shared::default() })
    }

    /// Opens the store that already is in `dir`, for inspection with the
    /// server stopped: refused when `dir` does not exist, holds no store,
    /// or is open in another process (a running server holds its lock).
    /// sled has no read-only mode; nothing is written here but what sled
    /// itself does on opening.
    pub fn open_existing(dir: &Path) -> Result<Self, StoreError> {
        let shown = dir.display();
        if !dir.is_dir() {
            return Err(StoreError::Unavailable(format!("the data directory {shown} does not exist")));
        }
        // sled keeps its pages in `db`, next to its `conf`.
        if !dir.join("db").is_file() || !dir.join("conf").is_file() {
            return Err(StoreError::Unavailable(format!("{shown} holds no muster store")));
        }
        Self::open_raw(dir, None, 16 << 20).map_err(|e| match e {
            StoreError::Engine(message) if message.contains("could not acquire lock") => StoreError::Unavailable(
                format!("the store in {shown} is in use by another process (is a server running on it?)"),
            ),
            other => other,
        })
    }

    /// A write that failed: remembered, see `Drop`.
    fn failure(&self, e: sled::Error) -> StoreError {
        self.failed.store(true, Ordering::SeqCst);
        engine(e)
    }

    /// Removes the attempt logs of the tasks `writes` remove, in their own
    /// tree and one batch, ahead of the records (a task left without its
    /// logs by a crash between the two is removed again by the next pass).
    fn remove_logs(&self, writes: &[Write], capture: &mut Option<capture::Capture>) -> Result<(), StoreError> {
        let mut logs = Changes::new(&self.logs, LOGS, capture);
        let mut any = false;
        for write in writes {
            if let Write::Remove(removal) = write {
                let (start, end) = layout::log_range(removal.id);
                for k in self.logs.range(start..end).keys() {
                    logs.remove(k.map_err(engine)?.to_vec());
                    any = true;
                }
            }
        }
        if any {
            self.logs.apply_batch(logs.into_batch()).map_err(|e| self.failure(e))?;
        }
        Ok(())
    }

    /// Begins reading the trees at this point in time, reading first, with
    /// no write between, what `at_start` reads.
    fn reader<T>(&self, at_start: impl FnOnce() -> Result<T, StoreError>) -> Result<(Reader, T), StoreError> {
        let trees = [self.tree.clone(), self.logs.clone()];
        Reader::begin(&self.capture, trees, CAPTURE_LIMIT_BYTES, at_start)
    }

    fn scan_prefix<T>(
        &self,
        prefix: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.tree
            .scan_prefix([prefix])
            .map(|item| {
                let (k, v) = item.map_err(engine)?;
                f(&k, &v)
            })
            .collect()
    }
}

impl Store for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut capture = capture::lock(&self.capture);
        self.remove_logs(writes, &mut capture)?;
        let mut batch = Changes::new(&self.tree, RECORDS, &mut capture);
        for write in writes {
            if let Write::CompactEvents { through } = write {
                let (start, end) = layout::event_range_through(*through);
                for k in self.tree.range(start..=end).keys() {
                    batch.remove(k.map_err(engine)?.to_vec());
                }
                let floor = self.meta_u64(EVENT_FLOOR)?.max(*through);
                batch.insert(key(META, EVENT_FLOOR), floor.to_be_bytes().to_vec());
            } else {
                layout::changes(write, &mut batch)?;
            }
        }
        for (k, v) in layout::event_records(writes)? {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch.into_batch()).map_err(|e| self.failure(e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.failure(e))
    }

    fn record_counts(&self) -> Result<RecordCounts, StoreError> {
        let keys = |prefix: u8| -> Result<u64, StoreError> {
            self.tree.scan_prefix([prefix]).keys().try_fold(0, |n, k| k.map(|_| n + 1).map_err(engine))
        };
        let events = self
            .tree
            .scan_prefix([EVENT])
            .values()
            .try_fold(0, |n, v| v.map(|v| n + events_in_record(&v)).map_err(engine))?;
        Ok(RecordCounts {
            tasks: keys(TASK)?,
            events,
            agents: keys(AGENT)?,
            queues: keys(QUEUE)?,
            tokens: keys(TOKEN)?,
            idempotency_keys: keys(IDEMPOTENCY)?,
            workflow_entries: keys(WORKFLOW)?,
            unfinished_entries: keys(UNFINISHED)?,
            finished_entries: keys(FINISHED)?,
            logs: self.logs.iter().keys().try_fold(0, |n, k| k.map(|_| n + 1).map_err(engine))?,
        })
    }

    fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.tree.get(key(TASK, &id.to_bytes())).map_err(engine)?.map(|v| decode(&v)).transpose()
    }

    fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished_only: bool) -> Result<Vec<Task>, StoreError> {
        let prefix = if unfinished_only { UNFINISHED } else { TASK };
        let start = match after {
            // The byte after the id's last key sorts after it and before the
            // next id.
            Some(id) => {
                let mut k = key(prefix, &id.to_bytes());
                k.push(0);
                k
            }
            None => vec![prefix],
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![prefix + 1]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(engine)?;
            if unfinished_only {
                if let Some(task) = self.task(task_id_of(&k)?)? {
                    out.push(task);
                }
            } else {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let ids = self.scan_prefix(UNFINISHED, |k, _| task_id_of(k))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(task) = self.task(id)? {
                out.push(task);
            }
        }
        Ok(out)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        // The record holding `after + 1` starts at or before it.
        let wanted = key(EVENT, &after.saturating_add(1).to_be_bytes());
        let start = match self.tree.range(vec![EVENT]..=wanted).next_back() {
            Some(item) => item.map_err(engine)?.0.to_vec(),
            None => vec![EVENT],
        };
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![EVENT + 1]) {
            let (_, v) = item.map_err(engine)?;
            for event in decode_events(&v)? {
                if event.sequence > after {
                    if out.len() >= limit {
                        return Ok(out);
                    }
                    out.push(event);
                }
            }
        }
        Ok(out)
    }

    fn last_sequence(&self) -> Result<u64, StoreError> {
        match self.tree.scan_prefix([EVENT]).next_back() {
            Some(item) => {
                let (_, v) = item.map_err(engine)?;
                Ok(decode_events(&v)?.iter().map(|e| e.sequence).max().unwrap_or(0))
            }
            None => self.compacted_through(),
        }
    }

    fn compacted_through(&self) -> Result<u64, StoreError> {
        self.meta_u64(EVENT_FLOOR)
    }

    fn events_cut(&self, until: Millis, max_records: usize) -> Result<Option<u64>, StoreError> {
        let records = self.tree.scan_prefix([EVENT]).values().take(max_records);
        layout::events_cut(records.map(|v| v.map_err(engine)), until)
    }

    fn finished_tasks(
        &self,
        until: Millis,
        after: Option<(Millis, TaskId)>,
        limit: usize,
    ) -> Result<Vec<(Millis, TaskId)>, StoreError> {
        let start = match after {
            Some((at, id)) => {
                let mut k = finished_key(at, id);
                k.push(0);
                k
            }
            None => vec![FINISHED],
        };
        // Every key of a task that finished at `until` sorts before this.
        let end = key(FINISHED, &until.saturating_add(1).to_be_bytes());
        let mut out = Vec::new();
        for k in self.tree.range(start..end).keys().take(limit) {
            let k = k.map_err(engine)?;
            out.push(parse_finished_key(&k[1..]).ok_or_else(|| StoreError::Codec("bad finished key".into()))?);
        }
        Ok(out)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan_prefix(AGENT, |_, v| decode(v))
    }

    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError> {
        self.scan_prefix(QUEUE, |_, v| decode(v))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.scan_prefix(TOKEN, |_, v| decode(v))
    }

    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError> {
        let prefix = key(WORKFLOW, &workflow.to_bytes());
        self.tree.scan_prefix(&prefix).keys().map(|k| layout::workflow_member(&k.map_err(engine)?)).collect()
    }

    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError> {
        self.scan_prefix(IDEMPOTENCY, layout::idempotency_entry)
    }

    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError> {
        let (key, value) = (log_key(log.task_id, log.attempt), encode(log)?);
        let mut capture = capture::lock(&self.capture);
        if let Some(capture) = capture.as_mut() {
            capture.before_write(LOGS, &self.logs, &key);
        }
        self.logs.insert(key, value).map(|_| ()).map_err(|e| self.failure(e))
    }

    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError> {
        self.logs.get(log_key(task, attempt)).map_err(engine)?.map(|v| decode(&v)).transpose()
    }

    fn logs_after(&self, after: Option<(TaskId, u32)>, limit: usize) -> Result<Vec<AttemptLog>, StoreError> {
        let range = match after {
            Some((task, attempt)) => self
                .logs
                .range((std::ops::Bound::Excluded(log_key(task, attempt).to_vec()), std::ops::Bound::Unbounded)),
            None => self.logs.iter(),
        };
        range.values().take(limit).map(|v| decode(&v.map_err(engine)?)).collect()
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let (mut reader, ()) = self.reader(|| Ok(()))?;
        let mut checker = Checker::new();
        // Keys sort by keyspace, and events by sequence within theirs.
        while let Some(chunk) = reader.next_chunk()? {
            for (tree, k, v) in chunk {
                match tree {
                    RECORDS => check_record(&mut checker, &k, &v),
                    _ => check_log(&mut checker, &k, &v),
                }
            }
        }
        Ok(checker.finish())
    }

    fn export(&self, out: &mut dyn Export) -> Result<(), StoreError> {
        let (mut reader, point) = self
            .reader(|| Ok(Point { sequence: self.last_sequence()?, compacted_through: self.compacted_through()? }))?;
        out.begin(point)?;
        while let Some(chunk) = reader.next_chunk()? {
            for (tree, k, v) in chunk {
                if let Some(record) = exported(tree, &k, &v)? {
                    out.record(record)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AgentId;
    use crate::store::layout::workflow_key;

    #[test]
    fn single_event_records_of_earlier_stores_are_still_read() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let task = crate::store::test_task();
        let old = crate::store::test_event(1, &task);
        store.tree.insert(key(EVENT, &1u64.to_be_bytes()), encode(&old)?)?;
        store.write(&[
            Write::Event(crate::store::test_event(2, &task)),
            Write::Event(crate::store::test_event(3, &task)),
        ])?;
        let seqs: Vec<u64> = store.events_after(0, 10)?.into_iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(store.events_after(1, 10)?.len(), 2);
        assert_eq!(store.last_sequence()?, 3);
        assert_eq!(store.record_counts()?.events, 3, "an old record is one event, a group holds its events");
        Ok(())
    }

    use crate::model::TaskState;
    use crate::store::verify::tests::{fill, kinds};
    use crate::store::{ProblemKind, test_event, test_task_in};

    #[test]
    fn records_that_do_not_decode_are_reported_with_their_keys() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let (done, open) = fill(&store)?;
        store.tree.insert(key(TASK, &open.id.to_bytes()), &b"\x01garbage"[..])?;
        store.tree.insert(key(AGENT, &[7; 16]), &b"\x09"[..])?;
        store.tree.insert(key(EVENT, &4u64.to_be_bytes()), &b""[..])?;
        store.tree.insert(&b"zzz"[..], &b""[..])?;
        store.logs.insert(log_key(done.id, 1), &b"\x01\xc1"[..])?;
        let report = store.verify()?;
        let agent = AgentId::from_bytes([7; 16]);
        assert_eq!(
            kinds(&report),
            [
                (ProblemKind::Undecodable, format!("agent/{agent}")),
                // The event record of 4 and 5 is lost, so the log jumps.
                (ProblemKind::Undecodable, "event/4".to_owned()),
                (ProblemKind::Undecodable, format!("task/{}", open.id)),
                (ProblemKind::UnknownKey, "zzz".to_owned()),
                (ProblemKind::Undecodable, format!("log/{}/1", done.id)),
            ],
            "{report:#?}"
        );
        // The undecodable task still counts as stored: its index entries,
        // events and key are not reported as strays.
        assert_eq!(report.records.tasks, 2);
        assert_eq!(report.records.events, 2);
        Ok(())
    }

    #[test]
    fn dropped_and_stray_index_entries_are_reported() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let (_, open) = fill(&store)?;
        let workflow = open.workflow.ok_or("no workflow")?;
        // Dropped: the open task's unfinished marker, key and membership.
        store.tree.remove(key(UNFINISHED, &open.id.to_bytes()))?;
        store.tree.remove(key(IDEMPOTENCY, b"key-1"))?;
        store.tree.remove(workflow_key(workflow, open.id))?;
        let report = store.verify()?;
        let task = format!("task/{}", open.id);
        assert_eq!(
            kinds(&report),
            [
                (ProblemKind::MissingUnfinished, task.clone()),
                (ProblemKind::MissingIdempotencyKey, task.clone()),
                (ProblemKind::MissingWorkflowEntry, task),
            ],
            "{report:#?}"
        );

        // Stray: entries for the finished task and for one never stored.
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let (done, open) = fill(&store)?;
        let ghost = test_task_in(TaskState::Queued, None).id;
        store.tree.insert(key(UNFINISHED, &done.id.to_bytes()), &[][..])?;
        store.tree.insert(key(UNFINISHED, &ghost.to_bytes()), &[][..])?;
        store.tree.insert(key(IDEMPOTENCY, b"ghost"), &ghost.to_bytes()[..])?;
        store.tree.insert(key(IDEMPOTENCY, b"other"), &done.id.to_bytes()[..])?;
        store.tree.insert(workflow_key(open.workflow.ok_or("no workflow")?, done.id), &[][..])?;
        store.tree.insert(workflow_key(workflow, ghost), &[][..])?;
        let report = store.verify()?;
        let mut found = kinds(&report);
        let mut expected = vec![
            (ProblemKind::StrayWorkflowEntry, format!("workflow/{}/{}", open.workflow.ok_or("no workflow")?, done.id)),
            (ProblemKind::StrayWorkflowEntry, format!("workflow/{workflow}/{ghost}")),
            (ProblemKind::StrayUnfinished, format!("unfinished/{}", done.id)),
            (ProblemKind::StrayUnfinished, format!("unfinished/{ghost}")),
            (ProblemKind::StrayIdempotencyKey, "idempotency/ghost".to_owned()),
            (ProblemKind::StrayIdempotencyKey, "idempotency/other".to_owned()),
        ];
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "{report:#?}");
        assert_eq!(report.problem_count, 6);
        Ok(())
    }

    #[test]
    fn event_gaps_disorder_and_events_of_missing_tasks_are_reported() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let (done, _) = fill(&store)?;
        // 2..=5 are stored; 6 and 7 never were.
        store.write(&[Write::Event(test_event(8, &done)), Write::Event(test_event(9, &done))])?;
        let stranger = test_task_in(TaskState::Queued, None);
        store.write(&[Write::Event(test_event(10, &stranger))])?;
        // A record that repeats a sequence.
        let repeated = vec![test_event(11, &done), test_event(11, &done)];
        store.tree.insert(key(EVENT, &11u64.to_be_bytes()), encode(&repeated)?)?;
        let report = store.verify()?;
        assert_eq!(
            kinds(&report),
            [
                (ProblemKind::EventGap, "event/8".to_owned()),
                (ProblemKind::EventOrder, "event/11".to_owned()),
                (ProblemKind::EventTaskMissing, "event/10".to_owned()),
            ],
            "{report:#?}"
        );
        assert_eq!(report.problems[0].detail, "sequences 6 to 7 are missing");

        // With no compaction, a log that starts late lost its beginning.
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let task = test_task_in(TaskState::Queued, None);
        store.write(&[Write::Task(task.clone()), Write::Event(test_event(5, &task))])?;
        assert_eq!(kinds(&store.verify()?), [(ProblemKind::EventGap, "event/5".to_owned())]);
        Ok(())
    }

    /// Hands on what an export reads and, once it has read `after` tasks,
    /// makes `change` (the store is written while it reads).
    struct Interrupted<F: FnMut() -> Result<(), StoreError>> {
        after: usize,
        tasks: usize,
        change: Option<F>,
        records: Vec<crate::store::Record>,
    }

    impl<F: FnMut() -> Result<(), StoreError>> Export for Interrupted<F> {
        fn begin(&mut self, _: Point) -> Result<(), StoreError> {
            Ok(())
        }

        fn record(&mut self, record: crate::store::Record) -> Result<(), StoreError> {
            if matches!(record, crate::store::Record::Task(_)) {
                self.tasks += 1;
                if self.tasks == self.after
                    && let Some(mut change) = self.change.take()
                {
                    change()?;
                }
            }
            self.records.push(record);
            Ok(())
        }
    }

    #[test]
    fn an_export_reads_the_store_as_it_was_when_it_began_while_it_is_written() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        let mut tasks: Vec<Task> = (0..700).map(|_| test_task_in(TaskState::Queued, None)).collect();
        tasks.sort_by_key(|t| t.id);
        let mut writes: Vec<Write> = tasks.iter().cloned().map(Write::Task).collect();
        writes.extend(tasks.iter().enumerate().map(|(i, t)| Write::Event(test_event(2 + i as u64, t))));
        store.write(&writes)?;
        for task in &tasks[..3] {
            store.put_log(&AttemptLog {
                task_id: task.id,
                attempt: 1,
                lines: Vec::new(),
                dropped: 0,
                next_position: 0,
            })?;
        }
        let mut before =
            Interrupted { after: 0, tasks: 0, change: None::<fn() -> Result<(), StoreError>>, records: Vec::new() };
        store.export(&mut before)?;

        let writer = store.clone();
        let (copied, ahead, removed) = (tasks[0].clone(), tasks[500].clone(), tasks[600].clone());
        let change = move || {
            let mut done = copied.clone();
            done.state = TaskState::Succeeded;
            let mut later = ahead.clone();
            later.state = TaskState::Running;
            later.attempt = 1;
            let mut gone = removed.clone();
            gone.state = TaskState::Failed;
            writer.write(&[Write::Task(done), Write::Task(later), Write::Task(gone.clone())])?;
            writer.write(&[Write::Remove(crate::store::Removal::of(&gone))])?;
            let mut newer = test_task_in(TaskState::Queued, None);
            newer.id = TaskId::from_bytes([0xff; 16]);
            writer.write(&[Write::Task(newer.clone()), Write::Event(test_event(702, &newer))])?;
            writer.put_log(&AttemptLog {
                task_id: newer.id,
                attempt: 1,
                lines: Vec::new(),
                dropped: 0,
                next_position: 0,
            })
        };
        let mut during = Interrupted { after: 10, tasks: 0, change: Some(change), records: Vec::new() };
        store.export(&mut during)?;
        assert!(during.change.is_none(), "the store was not written during the export");
        assert_eq!(during.records.len(), before.records.len());
        assert!(during.records == before.records, "the export saw writes made after it began");
        // The writes themselves landed, and the next export sees them.
        assert_eq!(store.task(tasks[500].id)?.map(|t| t.state), Some(TaskState::Running));
        assert_eq!(store.task(tasks[600].id)?, None);
        let mut after =
            Interrupted { after: 0, tasks: 0, change: None::<fn() -> Result<(), StoreError>>, records: Vec::new() };
        store.export(&mut after)?;
        assert_eq!(after.tasks, 700, "one removed, one added");
        // The removed task's event stays (retention compacts events apart).
        let problems = kinds(&store.verify()?);
        assert_eq!(problems, [(ProblemKind::EventTaskMissing, format!("event/{}", 602))]);
        Ok(())
    }

    #[test]
    fn one_reading_at_a_time_and_one_the_writes_outrun_is_abandoned_without_failing_them()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = SledStore::open(dir.path(), None)?;
        store.write(&[Write::Task(test_task_in(TaskState::Queued, None))])?;
        let trees = || [store.tree.clone(), store.logs.clone()];
        let (mut reader, ()) = Reader::begin(&store.capture, trees(), 4096, || Ok(()))?;
        let error = store.verify().err().ok_or("a second reading began")?;
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");
        // Writes ahead of the reader keep what they replace, past the bound.
        for _ in 0..100 {
            store.write(&[Write::Task(test_task_in(TaskState::Queued, None))])?;
        }
        let error = reader.next_chunk().err().ok_or("the reading went on past its bound")?;
        assert!(error.to_string().contains("the store changed faster than it could be read"), "{error}");
        drop(reader);
        assert_eq!(store.verify()?.records.tasks, 101, "a new reading begins once the last ended");
        Ok(())
    }

    #[test]
    fn open_existing_refuses_a_missing_directory_an_empty_one_and_a_store_in_use()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("missing");
        let error = SledStore::open_existing(&missing).err().ok_or("opened")?;
        assert!(error.to_string().contains("does not exist"), "{error}");
        assert!(!missing.exists(), "nothing is created");
        let error = SledStore::open_existing(dir.path()).err().ok_or("opened")?;
        assert!(error.to_string().contains("holds no muster store"), "{error}");
        let running = SledStore::open(dir.path(), None)?;
        let error = SledStore::open_existing(dir.path()).err().ok_or("opened a store in use")?;
        assert!(error.to_string().contains("in use by another process"), "{error}");
        drop(running);
        let store = SledStore::open_existing(dir.path())?;
        assert!(store.verify()?.is_clean());
        Ok(())
    }
}
