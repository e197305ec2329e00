//! The backup file: a store's records at one point in time, and the
//! restore that builds a data directory from one.
//!
//! Layout, integers big-endian:
//!
//! ```text
//! "MUSTERBK"   u32 format
//! frame(HEADER: Header)
//! frame(TASK | EVENTS | AGENT | QUEUE | TOKEN | LOG: record) ...
//! frame(END: Totals)
//! SHA-256 of every byte before it (32 bytes)
//! ```
//!
//! A frame is a tag byte, a u32 length and that many bytes: a value
//! encoded as the store encodes its records (a version byte, then
//! MessagePack with field names). A backup holds records only; restoring
//! writes them back through [`Store::write`], which rebuilds every index.
//! Nothing of a restore is visible until the whole file has been read,
//! checked against its checksum and the new store verified.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Export, Point, Record, SledStore, Store, StoreError, VerifyReport, Write, decode, encode};
use crate::model::Millis;

/// What every backup file begins with.
pub const MAGIC: &[u8; 8] = b"MUSTERBK";
/// The layout this build writes and reads.
pub const FORMAT: u32 = 1;
/// The largest frame a backup may hold: far above any record the limits
/// let in (a task's payload and output are 1 MiB each by default), and a
/// bound on what a corrupt length can make a reader allocate.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

const HEADER: u8 = b'H';
const TASK: u8 = b't';
const EVENTS: u8 = b'e';
const AGENT: u8 = b'a';
const QUEUE: u8 = b'q';
const TOKEN: u8 = b'c';
const LOG: u8 = b'l';
const END: u8 = b'Z';
const DIGEST_BYTES: usize = 32;
/// Writes a restore applies in one batch.
const RESTORE_BATCH: usize = 1024;

/// What a backup covers, at its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The layout of the file.
    pub format: u32,
    /// The last event sequence given out when the backup began: it holds
    /// every kept event up to this one, and nothing written later.
    pub sequence: u64,
    /// The last sequence compacted away before it (0: none was).
    pub compacted_through: u64,
    /// When the backup began (Unix milliseconds).
    pub created_at: Millis,
    /// The Muster version that wrote it.
    pub muster_version: String,
}

/// What a backup holds, written at its end and checked on reading.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Tasks.
    pub tasks: u64,
    /// Events (not records of them).
    pub events: u64,
    /// Agent registrations.
    pub agents: u64,
    /// Queue settings.
    pub queues: u64,
    /// Tokens.
    pub tokens: u64,
    /// Attempt logs.
    pub logs: u64,
}

impl Totals {
    /// Every kind with its count, in this order.
    pub fn by_kind(&self) -> [(&'static str, u64); 6] {
        [
            ("tasks", self.tasks),
            ("events", self.events),
            ("agents", self.agents),
            ("queues", self.queues),
            ("tokens", self.tokens),
            ("logs", self.logs),
        ]
    }

    fn count(&mut self, record: &Record) {
        match record {
            Record::Task(_) => self.tasks += 1,
            Record::Events(events) => self.events += events.len() as u64,
            Record::Agent(_) => self.agents += 1,
            Record::Queue(_) => self.queues += 1,
            Record::Token(_) => self.tokens += 1,
            Record::Log(_) => self.logs += 1,
        }
    }
}

/// Why a backup could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: io::Error,
    },
    /// The file does not begin as a backup does.
    #[error("not a muster backup: it does not begin with the mark every backup begins with")]
    NotABackup,
    /// The file is in a layout this build does not read.
    #[error("backup format {0} is not one this muster reads (it reads format {FORMAT})")]
    Format(u32),
    /// The file ends before its end frame and checksum.
    #[error("the backup ends early, at byte {0}: it is truncated")]
    Truncated(u64),
    /// The file's contents are damaged.
    #[error("the backup is corrupt: {0}")]
    Corrupt(String),
    /// The restore was refused before anything was written.
    #[error("{0}")]
    Refused(String),
    /// The store being restored into failed.
    #[error("the restored store: {0}")]
    Store(#[from] StoreError),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
    move |source| BackupError::Io { context: context.into(), source }
}

/// Writes a backup as [`Store::export`] hands it the records; call
/// [`BackupWriter::finish`] after the export to end the file.
pub struct BackupWriter<W: io::Write> {
    out: W,
    digest: ring::digest::Context,
    created_at: Millis,
    header: Option<Header>,
    totals: Totals,
}

impl<W: io::Write> std::fmt::Debug for BackupWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter").field("header", &self.header).field("totals", &self.totals).finish()
    }
}

impl<W: io::Write> BackupWriter<W> {
    /// A writer of a backup taken at `created_at` (Unix milliseconds).
    pub fn new(out: W, created_at: Millis) -> Self {
        Self {
            out,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
            created_at,
            header: None,
            totals: Totals::default(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.digest.update(bytes);
        self.out.write_all(bytes).map_err(|e| StoreError::Unavailable(format!("writing the backup: {e}")))
    }

    fn frame(&mut self, tag: u8, payload: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(payload.len()).ok().filter(|_| payload.len() <= MAX_FRAME_BYTES).ok_or_else(|| {
            StoreError::Codec(format!("a record of {} bytes is more than a backup frame holds", payload.len()))
        })?;
        self.put(&[tag])?;
        self.put(&len.to_be_bytes())?;
        self.put(payload)
    }

    /// Ends the file: the totals, then the checksum. Returns the output
    /// with what the backup covers and holds.
    pub fn finish(mut self) -> Result<(W, Header, Totals), StoreError> {
        let header = self.header.take().ok_or_else(|| StoreError::Unavailable("the export never began".into()))?;
        let totals = std::mem::take(&mut self.totals);
        self.frame(END, &encode(&totals)?)?;
        let digest = self.digest.finish();
        let written = |e: io::Error| StoreError::Unavailable(format!("writing the backup: {e}"));
        self.out.write_all(digest.as_ref()).map_err(written)?;
        self.out.flush().map_err(written)?;
        Ok((self.out, header, totals))
    }
}

impl<W: io::Write> Export for BackupWriter<W> {
    fn begin(&mut self, point: Point) -> Result<(), StoreError> {
        let header = Header {
            format: FORMAT,
            sequence: point.sequence,
            compacted_through: point.compacted_through,
            created_at: self.created_at,
            muster_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.put(MAGIC)?;
        self.put(&FORMAT.to_be_bytes())?;
        self.frame(HEADER, &encode(&header)?)?;
        self.header = Some(header);
        Ok(())
    }

    fn record(&mut self, record: Record) -> Result<(), StoreError> {
        let (tag, payload) = match &record {
            Record::Task(task) => (TASK, encode(task)?),
            Record::Events(events) => (EVENTS, encode(events)?),
            Record::Agent(agent) => (AGENT, encode(agent)?),
            Record::Queue(queue) => (QUEUE, encode(queue)?),
            Record::Token(token) => (TOKEN, encode(token)?),
            Record::Log(log) => (LOG, encode(log)?),
        };
        self.frame(tag, &payload)?;
        self.totals.count(&record);
        Ok(())
    }
}

/// Reads a backup, hashing what it reads and knowing where it is.
struct Framed<R> {
    input: R,
    digest: ring::digest::Context,
    offset: u64,
}

impl<R: Read> Framed<R> {
    /// Fills `buf`; the end of the input here means a truncated backup.
    fn fill(&mut self, buf: &mut [u8], hashed: bool) -> Result<(), BackupError> {
        match self.input.read_exact(buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(BackupError::Truncated(self.offset)),
            Err(e) => return Err(io_error("reading the backup")(e)),
        }
        if hashed {
            self.digest.update(buf);
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next frame: its tag, its bytes and where it began.
    fn frame(&mut self) -> Result<(u8, Vec<u8>, u64), BackupError> {
        let at = self.offset;
        let mut head = [0; 5];
        self.fill(&mut head, true)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(BackupError::Corrupt(format!(
                "the frame at byte {at} says it holds {len} bytes, more than the {MAX_FRAME_BYTES} a frame may hold"
            )));
        }
        let mut payload = vec![0; len];
        self.fill(&mut payload, true)?;
        Ok((head[0], payload, at))
    }
}

/// Reads a whole backup and checks it: its mark and format, that every
/// frame decodes, that it holds what its end frame says, its checksum and
/// that nothing follows. Hands the header to `on_header` before any record
/// and each record to `on_record` as it is read: what they were given
/// counts only once this returns `Ok`.
pub fn read(
    input: impl Read,
    mut on_header: impl FnMut(&Header) -> Result<(), BackupError>,
    mut on_record: impl FnMut(Record) -> Result<(), BackupError>,
) -> Result<(Header, Totals), BackupError> {
    let mut framed = Framed { input, digest: ring::digest::Context::new(&ring::digest::SHA256), offset: 0 };
    let mut mark = [0; MAGIC.len()];
    let mut read = 0;
    while read < mark.len() {
        match framed.input.read(&mut mark[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("reading the backup")(e)),
        }
    }
    if mark[..read] != MAGIC[..read] {
        return Err(BackupError::NotABackup);
    }
    if read < mark.len() {
        return Err(if read == 0 { BackupError::NotABackup } else { BackupError::Truncated(read as u64) });
    }
    framed.digest.update(&mark);
    framed.offset = mark.len() as u64;
    let mut format = [0; 4];
    framed.fill(&mut format, true)?;
    let format = u32::from_be_bytes(format);
    if format != FORMAT {
        return Err(BackupError::Format(format));
    }
    let corrupt = |what: &str, at: u64, e: StoreError| BackupError::Corrupt(format!("the {what} at byte {at}: {e}"));
    let (tag, payload, at) = framed.frame()?;
    if tag != HEADER {
        return Err(BackupError::Corrupt(format!("the frame at byte {at} should be the header")));
    }
    let header: Header = decode(&payload).map_err(|e| corrupt("header", at, e))?;
    on_header(&header)?;
    let mut totals = Totals::default();
    let stated: Totals = loop {
        let (tag, payload, at) = framed.frame()?;
        let record = match tag {
            TASK => Record::Task(decode(&payload).map_err(|e| corrupt("task", at, e))?),
            EVENTS => Record::Events(decode(&payload).map_err(|e| corrupt("events", at, e))?),
            AGENT => Record::Agent(decode(&payload).map_err(|e| corrupt("agent", at, e))?),
            QUEUE => Record::Queue(decode(&payload).map_err(|e| corrupt("queue", at, e))?),
            TOKEN => Record::Token(decode(&payload).map_err(|e| corrupt("token", at, e))?),
            LOG => Record::Log(decode(&payload).map_err(|e| corrupt("log", at, e))?),
            END => break decode(&payload).map_err(|e| corrupt("end", at, e))?,
            other => {
                return Err(BackupError::Corrupt(format!("the frame at byte {at} has an unknown kind {other:#04x}")));
            }
        };
        totals.count(&record);
        on_record(record)?;
    };
    let computed = std::mem::replace(&mut framed.digest, ring::digest::Context::new(&ring::digest::SHA256)).finish();
    let mut digest = [0; DIGEST_BYTES];
    framed.fill(&mut digest, false)?;
    if digest.as_slice() != computed.as_ref() {
        return Err(BackupError::Corrupt("its checksum does not match its contents".into()));
    }
    if stated != totals {
        return Err(BackupError::Corrupt(format!("its end says it holds {stated:?}, but it holds {totals:?}")));
    }
    let mut more = [0; 1];
    match framed.input.read(&mut more) {
        Ok(0) => {}
        Ok(_) => return Err(BackupError::Corrupt(format!("bytes follow its end, at byte {}", framed.offset))),
        Err(e) => return Err(io_error("reading the backup")(e)),
    }
    Ok((header, totals))
}

/// Reads and checks the backup in `file` without restoring it.
pub fn check(file: &Path) -> Result<(Header, Totals), BackupError> {
    let input = File::open(file).map_err(io_error(format!("opening {}", file.display())))?;
    read(BufReader::with_capacity(1 << 20, input), |_| Ok(()), |_| Ok(()))
}

/// A restore that succeeded.
#[derive(Debug)]
pub struct Restored {
    /// What the backup covers.
    pub header: Header,
    /// What it held.
    pub totals: Totals,
    /// The verification of the new store (clean).
    pub report: VerifyReport,
}

/// Builds a data directory in `dir` from the backup in `file`. Refuses a
/// `dir` that is not empty unless `force`, and even then one that holds
/// anything but a Muster store, or one a server has open. The new store is
/// built beside `dir` and put in its place only once the backup has been
/// read whole, its checksum matched and the new store verified; on any
/// failure `dir` is as it was.
pub fn restore(file: &Path, dir: &Path, force: bool) -> Result<Restored, BackupError> {
    let shown = dir.display();
    let name = dir.file_name().ok_or_else(|| BackupError::Refused(format!("{shown} names no directory")))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Open here, the old store stays locked: no server starts on it before
    // it is replaced.
    let replacing = replaced_store(dir, force)?;
    let input = File::open(file).map_err(io_error(format!("opening {}", file.display())))?;
    std::fs::create_dir_all(&parent).map_err(io_error(format!("creating {}", parent.display())))?;
    let pid = std::process::id();
    let building = parent.join(format!(".{}.restoring-{pid}", name.to_string_lossy()));
    let built = build(BufReader::with_capacity(1 << 20, input), &building);
    let restored = match built {
        Ok(restored) => restored,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    let placed = match replacing {
        Some(old) => {
            let aside = parent.join(format!(".{}.replaced-{pid}", name.to_string_lossy()));
            std::fs::rename(dir, &aside).map_err(io_error(format!("moving the old store in {shown} aside")))?;
            if let Err(e) = std::fs::rename(&building, dir) {
                let _ = std::fs::rename(&aside, dir);
                return Err(io_error(format!("putting the restored store in {shown}"))(e));
            }
            drop(old);
            std::fs::remove_dir_all(&aside).map_err(io_error(format!("removing the old store, {}", aside.display())))
        }
        None => {
            if dir.exists() {
                std::fs::remove_dir(dir).map_err(io_error(format!("replacing the empty directory {shown}")))?;
            }
            std::fs::rename(&building, dir).map_err(io_error(format!("putting the restored store in {shown}")))
        }
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    File::open(&parent).and_then(|d| d.sync_all()).map_err(io_error(format!("syncing {}", parent.display())))?;
    Ok(restored)
}

/// Checks what is in `dir` now: `Some` old store (held open) to replace,
/// `None` when there is nothing to replace.
fn replaced_store(dir: &Path, force: bool) -> Result<Option<SledStore>, BackupError> {
    let shown = dir.display();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(BackupError::Refused(format!("{shown} is not a directory")));
        }
        Err(e) => return Err(io_error(format!("reading {shown}"))(e)),
    };
    if entries.count() == 0 {
        return Ok(None);
    }
    if !force {
        return Err(BackupError::Refused(format!("{shown} is not empty; pass --force to replace the store in it")));
    }
    if !dir.join("db").is_file() || !dir.join("conf").is_file() {
        return Err(BackupError::Refused(format!(
            "{shown} is not empty and holds no muster store: it is not replaced, even with --force"
        )));
    }
    SledStore::open_existing(dir).map(Some).map_err(|e| BackupError::Refused(e.to_string()))
}

/// Writes the records of a backup into a new store in `dir` and checks it.
fn build(input: impl Read, dir: &Path) -> Result<Restored, BackupError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io_error(format!("removing {}", dir.display())))?;
    }
    crate::data_dir::secure(dir).map_err(io_error("creating the new store's directory"))?;
    let store = SledStore::open(dir, None)?;
    let mut pending: Vec<Write> = Vec::with_capacity(RESTORE_BATCH);
    let (header, totals) = read(
        input,
        |header| {
            if header.compacted_through > 0 {
                store.write(&[Write::CompactEvents { through: header.compacted_through }])?;
            }
            Ok(())
        },
        |record| {
            match record {
                Record::Task(task) => pending.push(Write::Task(task)),
                Record::Events(events) => pending.extend(events.into_iter().map(Write::Event)),
                Record::Agent(agent) => pending.push(Write::Agent(agent)),
                Record::Queue(queue) => pending.push(Write::Queue(queue)),
                Record::Token(token) => pending.push(Write::Token(token)),
                Record::Log(log) => store.put_log(&log)?,
            }
            if pending.len() >= RESTORE_BATCH {
                store.write(&pending)?;
                pending.clear();
            }
            Ok(())
        },
    )?;
    store.write(&pending)?;
    store.flush()?;
    let last = store.last_sequence()?;
    if last != header.sequence {
        return Err(BackupError::Corrupt(format!(
            "it covers events up to sequence {}, but holds them up to {last}",
            header.sequence
        )));
    }
    let report = store.verify()?;
    if let Some(problem) = report.problems.first() {
        return Err(BackupError::Corrupt(format!(
            "the restored store does not verify: {} problem(s), the first {} {}: {}",
            report.problem_count,
            problem.kind.as_str(),
            problem.key,
            problem.detail
        )));
    }
    drop(store);
    // What sled created after the directory follows the umask.
    crate::data_dir::secure(dir).map_err(io_error("securing the new store's directory"))?;
    Ok(Restored { header, totals, report })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{AgentId, AgentRecord, AttemptLog, QueueRecord, TaskEvent, TaskState, TokenRecord};
    use crate::store::verify::tests::fill;
    use crate::store::{MemoryStore, test_event, test_task_in};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// What an export hands out, with events one by one (stores group
    /// them into records differently).
    #[derive(Debug, Default, PartialEq)]
    struct Collected {
        point: Option<Point>,
        events: Vec<TaskEvent>,
        records: Vec<Record>,
    }

    impl Export for Collected {
        fn begin(&mut self, point: Point) -> Result<(), StoreError> {
            self.point = Some(point);
            Ok(())
        }

        fn record(&mut self, record: Record) -> Result<(), StoreError> {
            match record {
                Record::Events(events) => self.events.extend(events),
                other => self.records.push(other),
            }
            Ok(())
        }
    }

    fn collected(store: &dyn Store) -> Result<Collected, StoreError> {
        let mut out = Collected::default();
        store.export(&mut out)?;
        Ok(out)
    }

    fn backup_of(store: &dyn Store) -> Result<Vec<u8>, StoreError> {
        let mut writer = BackupWriter::new(Vec::new(), 1_700_000_000_000);
        store.export(&mut writer)?;
        Ok(writer.finish()?.0)
    }

    /// A store with a record of every kind, compacted events, a workflow,
    /// and more tasks than a reader copies in one turn.
    fn filled(store: &dyn Store) -> Result<(), StoreError> {
        let (done, _) = fill(store)?;
        let mut writes = Vec::new();
        for i in 0..600u64 {
            let state = if i % 3 == 0 { TaskState::Failed } else { TaskState::Running };
            let task = test_task_in(state, Some(&format!("bulk-{i}")));
            writes.push(Write::Event(test_event(6 + i, &task)));
            writes.push(Write::Task(task));
        }
        store.write(&writes)?;
        store.write(&[Write::CompactEvents { through: 3 }])?;
        store.write(&[
            Write::Agent(AgentRecord {
                id: AgentId(ulid::Ulid::new()),
                name: "a".into(),
                resume_token: "t".into(),
                capabilities: vec!["shell".into()],
                labels: BTreeMap::new(),
                slots: 2,
                draining: false,
                sdk_version: "0".into(),
                metrics_address: String::new(),
                connected_at: 1,
                identity: "agent-token".into(),
            }),
            Write::Queue(QueueRecord::new("batch")),
            Write::Token(TokenRecord {
                name: "ci".into(),
                role: crate::auth::Role::Submitter,
                scope: crate::auth::Scope::default(),
                secret_hash: crate::auth::hash_secret("secret"),
                created_at: 1,
                expires_at: None,
                revoked_at: None,
                created_by: "admin".into(),
            }),
        ])?;
        store.put_log(&AttemptLog { task_id: done.id, attempt: 2, lines: Vec::new(), dropped: 3, next_position: 9 })?;
        Ok(())
    }

    #[test]
    fn a_restored_store_holds_the_same_records_and_verifies() -> TestResult {
        let root = tempfile::tempdir()?;
        let sled = SledStore::open(&root.path().join("source"), None)?;
        let memory = MemoryStore::new();
        for (name, store) in [("sled", &sled as &dyn Store), ("memory", &memory)] {
            filled(store)?;
            let file = root.path().join(format!("{name}.backup"));
            std::fs::write(&file, backup_of(store)?)?;
            let (header, totals) = check(&file)?;
            assert_eq!((header.sequence, header.compacted_through), (605, 3), "{name}");
            assert_eq!(header.created_at, 1_700_000_000_000);
            let expected = Totals { tasks: 602, events: 602, agents: 1, queues: 1, tokens: 1, logs: 2 };
            assert_eq!(totals, expected, "{name}");

            let dir = root.path().join(format!("restored-{name}"));
            let restored = restore(&file, &dir, false)?;
            assert_eq!(restored.totals, expected);
            assert!(restored.report.is_clean(), "{:?}", restored.report);
            let again = SledStore::open_existing(&dir)?;
            let (before, after) = (collected(store)?, collected(&again)?);
            assert_eq!(after.point, Some(Point { sequence: 605, compacted_through: 3 }));
            assert_eq!(before.events, after.events, "{name}");
            assert_eq!(before.records.len(), after.records.len(), "{name}");
            for record in &before.records {
                assert!(after.records.contains(record), "{name}: {record:?} was not restored");
            }
            // The indexes are rebuilt: the unfinished tasks, the keys.
            assert_eq!(again.unfinished_tasks()?.len(), store.unfinished_tasks()?.len());
            let mut keys = again.idempotency_keys()?;
            keys.sort();
            let mut original = store.idempotency_keys()?;
            original.sort();
            assert_eq!(keys, original);
            assert_eq!(again.record_counts()?, store.record_counts()?, "{name}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(std::fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
            }
        }
        Ok(())
    }

    /// The error restoring `bytes` into a fresh directory, which must not
    /// come to exist, with nothing left beside it.
    fn refused(bytes: &[u8]) -> Result<BackupError, Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let file = root.path().join("backup");
        std::fs::write(&file, bytes)?;
        let dir = root.path().join("data");
        let error = restore(&file, &dir, false).err().ok_or("a damaged backup was restored")?;
        assert!(!dir.exists(), "{error}: the data directory was created");
        let left: Vec<_> = std::fs::read_dir(root.path())?.collect::<Result<_, _>>()?;
        assert_eq!(left.len(), 1, "{error}: left behind {left:?}");
        Ok(error)
    }

    #[test]
    fn a_truncated_or_corrupt_backup_is_refused_and_nothing_is_restored() -> TestResult {
        let store = MemoryStore::new();
        filled(&store)?;
        let bytes = backup_of(&store)?;
        // Cut anywhere: in the mark, the header, a record, the end, the
        // checksum.
        for cut in [0, 3, 8, 14, 40, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
            let error = refused(&bytes[..cut])?;
            let message = error.to_string();
            if cut == 0 {
                assert!(matches!(error, BackupError::NotABackup), "{message}");
            } else {
                assert!(matches!(error, BackupError::Truncated(at) if at <= cut as u64), "cut at {cut}: {message}");
                assert!(message.contains("truncated"), "{message}");
            }
        }
        // One byte changed anywhere after the mark and format.
        for at in [13, 20, bytes.len() / 3, bytes.len() / 2, bytes.len() - 45, bytes.len() - 5] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            let error = refused(&damaged)?;
            assert!(matches!(error, BackupError::Corrupt(_) | BackupError::Truncated(_)), "byte {at} changed: {error}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(refused(&flipped)?.to_string(), "the backup is corrupt: its checksum does not match its contents");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(refused(&longer)?.to_string().contains("bytes follow its end"));
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(refused(&other)?.to_string(), "backup format 7 is not one this muster reads (it reads format 1)");
        assert!(matches!(refused(b"SQLite format 3\0")?, BackupError::NotABackup));
        // A length past the bound is refused before anything is allocated.
        let mut huge = bytes[..12].to_vec();
        huge.push(HEADER);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(refused(&huge)?.to_string().contains("more than the 67108864 a frame may hold"));
        Ok(())
    }

    #[test]
    fn a_restore_replaces_only_an_empty_directory_or_with_force_a_stopped_store() -> TestResult {
        let root = tempfile::tempdir()?;
        let store = MemoryStore::new();
        filled(&store)?;
        let file = root.path().join("backup");
        std::fs::write(&file, backup_of(&store)?)?;

        let empty = root.path().join("empty");
        std::fs::create_dir(&empty)?;
        restore(&file, &empty, false)?;
        assert_eq!(SledStore::open_existing(&empty)?.record_counts()?.tasks, 602);

        // A store is there now: refused without --force, replaced with it.
        let other = MemoryStore::new();
        fill(&other)?;
        let small = root.path().join("small");
        std::fs::write(&small, backup_of(&other)?)?;
        let error = restore(&small, &empty, false).err().ok_or("replaced without --force")?;
        assert!(error.to_string().contains("is not empty; pass --force"), "{error}");
        restore(&small, &empty, true)?;
        assert_eq!(SledStore::open_existing(&empty)?.record_counts()?.tasks, 2);

        // Not while a server has it open, and never a directory that holds
        // something else.
        let running = SledStore::open(&empty, None)?;
        let error = restore(&file, &empty, true).err().ok_or("replaced a store in use")?;
        assert!(error.to_string().contains("in use by another process"), "{error}");
        drop(running);
        let home = root.path().join("home");
        std::fs::create_dir(&home)?;
        std::fs::write(home.join("notes.txt"), b"mine")?;
        let error = restore(&file, &home, true).err().ok_or("replaced a directory that holds no store")?;
        assert!(error.to_string().contains("holds no muster store"), "{error}");
        assert_eq!(std::fs::read(home.join("notes.txt"))?, b"mine");
        // A failed replacement leaves the old store as it was.
        let mut damaged = std::fs::read(&file)?;
        let middle = damaged.len() / 2;
        damaged.truncate(middle);
        std::fs::write(&file, damaged)?;
        assert!(restore(&file, &empty, true).is_err());
        assert_eq!(SledStore::open_existing(&empty)?.record_counts()?.tasks, 2);
        let names: Vec<String> = std::fs::read_dir(root.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        assert!(names.iter().all(|n| !n.starts_with('.')), "left behind: {names:?}");
        Ok(())
    }
}
