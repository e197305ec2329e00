//! The PostgreSQL store: the key layout of `layout` in two tables of keys
//! and values, `muster_records` and `muster_logs` (`bytea` sorts bytewise,
//! as sled's keys do), so both stores read, export and verify alike.
//!
//! One writer batch is one transaction: its range cuts, then its removals,
//! then its upserts, each a single statement over arrays, whatever the
//! batch's size. The [`Store`] trait is synchronous and is called from
//! the server's async threads as well as blocking ones, so the store runs
//! its queries on a small runtime of its own and waits for each on a
//! channel (a nested `block_on` would panic).
//!
//! The schema is created and migrated on open: `muster_schema` records
//! the versions applied, one transaction per open, serialized between
//! replicas that open at once by a transaction-scoped advisory lock
//! (released at commit, so it survives connection poolers).
//!
//! A commit returns once PostgreSQL has made it durable (the server's own
//! `synchronous_commit`); [`Store::flush`] has nothing left to do.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::layout::{
    self, AGENT, EVENT, EVENT_FLOOR, Entry, FINISHED, FINISHED_INDEX, IDEMPOTENCY, LOGS, META, QUEUE, RECORDS, TASK,
    TOKEN, UNFINISHED, WORKFLOW, check_log, check_record, decode_events, events_in_record, exported, finished_key, key,
    log_key, parse_finished_key,
};
use super::verify::Checker;
use super::{Export, Point, RecordCounts, Store, StoreError, VerifyReport, Write, decode, encode};
use crate::model::{AgentRecord, AttemptLog, Millis, QueueRecord, Task, TaskEvent, TaskId, TokenRecord, WorkflowId};

/// Connections kept open: the writer's, the log persister's and readers'.
const POOL_SIZE: usize = 8;
/// Rows an export or a verification reads at a time.
const CHUNK_ROWS: i64 = 1000;
/// Chunks read ahead of the consumer of an export.
const CHUNKS_AHEAD: usize = 2;
/// Event records a listing of events reads at a time.
const EVENT_PAGE: i64 = 64;

/// The migrations, in order; a version once released never changes.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE muster_records (k bytea PRIMARY KEY, v bytea NOT NULL);
         CREATE TABLE muster_logs (k bytea PRIMARY KEY, v bytea NOT NULL);",
    ),
    (
        2,
        "CREATE TABLE muster_leader (
             id integer PRIMARY KEY CHECK (id = 1),
             holder text NOT NULL,
             address text NOT NULL,
             epoch bigint NOT NULL,
             expires_at timestamptz NOT NULL);
         INSERT INTO muster_leader VALUES (1, '', '', 0, '-infinity');",
    ),
];
/// The channel a leader that resigns notifies, so standbys take over at
/// once instead of when the lease would have expired.
const RESIGN_CHANNEL: &str = "muster_leader";
/// Any fixed number, the same in every replica: the advisory lock that
/// serializes migrations.
const MIGRATION_LOCK: i64 = 0x6d75_7374_6572;

const TABLES: [&str; 2] = ["muster_records", "muster_logs"];

/// A [`Store`] in a PostgreSQL database.
pub struct PgStore {
    pool: Pool,
    runtime: Runtime,
    /// The URL without its password, for messages.
    shown: String,
    /// The connection settings, for the connection that listens for
    /// resignations.
    config: tokio_postgres::Config,
    /// The epoch of the leader lease this process holds: once set, every
    /// write first checks the lease still has it (fencing). 0: unfenced.
    fence: Arc<AtomicI64>,
}

/// The leader lease as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Who holds (or last held) it.
    pub holder: String,
    /// The gRPC endpoint of its holder.
    pub address: String,
    /// Bumped by every takeover; 0 before the first.
    pub epoch: i64,
    /// Not expired, on the database's clock.
    pub live: bool,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("database", &self.shown).finish_non_exhaustive()
    }
}

/// The store's runtime, shut down without waiting when the store goes
/// (dropping a runtime waits for its tasks, which an async thread must
/// not do).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() || e.as_db_error().is_none() {
        StoreError::Unavailable(format!("PostgreSQL: {e}"))
    } else {
        StoreError::Engine(format!("PostgreSQL: {e}"))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(format!("PostgreSQL connection pool: {other}")),
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The first key after every key that starts with `prefix`.
fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The first key after `k` itself.
fn just_after(k: &[u8]) -> Vec<u8> {
    let mut next = k.to_vec();
    next.push(0);
    next
}

/// The first and the last (or first after) key of a range.
type KeyRange = (Vec<u8>, Vec<u8>);

/// What one batch does to the records table: the ranges it cuts, then the
/// last change to each key (a later change to a key replaces an earlier
/// one, and a cut drops the changes before it to the keys it covers).
#[derive(Default)]
struct Pending {
    cuts: Vec<KeyRange>,
    keys: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    event_floor: Option<u64>,
}

impl layout::Changes for Pending {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.keys.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.keys.insert(key, None);
    }
}

impl Pending {
    fn cut(&mut self, start: Vec<u8>, end_inclusive: Vec<u8>) {
        let covered: Vec<Vec<u8>> =
            self.keys.range(start.clone()..=end_inclusive.clone()).map(|(k, _)| k.clone()).collect();
        for k in covered {
            self.keys.remove(&k);
        }
        self.cuts.push((start, end_inclusive));
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER@HOST:PORT/DB`,
    /// or any form libpq accepts) and creates or migrates the schema.
    /// Blocks: call it off the async threads.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = redact(url);
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("the store URL {shown} is not valid: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("muster-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the PostgreSQL store's runtime: {e}")))?;
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Unavailable(format!("the PostgreSQL connection pool: {e}")))?
        };
        let store = Self { pool, runtime: Runtime(Some(runtime)), shown, config, fence: Arc::default() };
        store.run(|pool| async move { migrate(&pool).await }).map_err(|e| match e {
            StoreError::Unavailable(message) => {
                StoreError::Unavailable(format!("cannot reach the store at {}: {message}", redact(url)))
            }
            other => other,
        })?;
        Ok(store)
    }

    /// Runs `job` on the store's runtime and waits for it.
    fn run<T, F>(&self, job: impl FnOnce(Pool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let runtime = self.runtime.0.as_ref().ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = job(self.pool.clone());
        runtime.spawn(async move {
            let _ = tx.send(job.await);
        });
        rx.recv().map_err(|_| StoreError::Unavailable("the PostgreSQL store's runtime stopped".into()))?
    }

    /// The value of one key of `table`.
    fn get(&self, table: usize, k: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT v FROM {} WHERE k = $1", TABLES[table]);
        self.run(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(&sql).await.map_err(pg)?;
            let row = client.query_opt(&statement, &[&k]).await.map_err(pg)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    /// Up to `limit` keys and values of `table` from `start` (inclusive)
    /// to `end` (exclusive; `None`: to the end), in key order, or from the
    /// last back with `descending`.
    fn range(
        &self,
        table: usize,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: Option<i64>,
        descending: bool,
    ) -> Result<Vec<Entry>, StoreError> {
        let order = if descending { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT k, v FROM {} WHERE k >= $1 AND ($2::bytea IS NULL OR k < $2) ORDER BY k {order} LIMIT $3",
            TABLES[table]
        );
        self.run(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(&sql).await.map_err(pg)?;
            let rows = client.query(&statement, &[&start, &end, &limit]).await.map_err(pg)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Every key and value of the records with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.range(RECORDS, prefix.to_vec(), after_prefix(prefix), None, false)
    }

    fn meta_u64(&self, name: &[u8]) -> Result<u64, StoreError> {
        match self.get(RECORDS, key(META, name))? {
            Some(v) => {
                let bytes: [u8; 8] =
                    v.as_slice().try_into().map_err(|_| StoreError::Codec("bad metadata value".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
            None => Ok(0),
        }
    }

    /// Tasks named by the index entries of `prefix` (`u`) from `start`,
    /// joined to their records in one query.
    fn indexed_tasks(&self, start: Vec<u8>, prefix: u8, limit: Option<i64>) -> Result<Vec<Task>, StoreError> {
        let sql = "SELECT t.v FROM muster_records i JOIN muster_records t ON t.k = $4::bytea || substring(i.k from 2) \
                   WHERE i.k >= $1 AND i.k < $2 ORDER BY i.k LIMIT $3";
        let end = vec![prefix + 1];
        let task_prefix = vec![TASK];
        let rows = self.run(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let statement = client.prepare_cached(sql).await.map_err(pg)?;
            let rows = client.query(&statement, &[&start, &end, &limit, &task_prefix]).await.map_err(pg)?;
            Ok(rows.into_iter().map(|r| r.get::<_, Vec<u8>>(0)).collect::<Vec<_>>())
        })?;
        rows.iter().map(|v| decode(v)).collect()
    }

    /// Reads both tables in key order at one point in time, a chunk at a
    /// time, handing each row to `each` with its table. Returns the point
    /// read, in the same snapshot, before any row.
    fn read_snapshot(
        &self,
        mut begin: impl FnMut(Point) -> Result<(), StoreError>,
        mut each: impl FnMut(usize, &[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let runtime = self.runtime.0.as_ref().ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(CHUNKS_AHEAD);
        let pool = self.pool.clone();
        runtime.spawn(async move {
            if let Err(e) = snapshot_chunks(&pool, &tx).await {
                let _ = tx.send(Err(e));
            }
        });
        let mut ended = false;
        while let Ok(chunk) = rx.recv() {
            match chunk? {
                Chunk::Point(point) => begin(point)?,
                Chunk::Rows(table, rows) => {
                    for (k, v) in &rows {
                        each(table, k, v)?;
                    }
                }
                Chunk::End => ended = true,
            }
        }
        if ended { Ok(()) } else { Err(StoreError::Unavailable("the snapshot of the store ended early".into())) }
    }
}

/// What a snapshot reading sends, in order: the point, rows, the end.
enum Chunk {
    Point(Point),
    Rows(usize, Vec<Entry>),
    End,
}

/// The leader lease: one row, taken when it has expired (bumping the
/// epoch), renewed by its holder, released at once on a clean shutdown.
/// Times are the database's, so replicas' clocks do not matter.
impl PgStore {
    /// Runs `job` on the store's runtime without blocking the caller's.
    async fn call<T, F>(&self, job: impl FnOnce(Pool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let runtime = self.runtime.0.as_ref().ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = job(self.pool.clone());
        runtime.spawn(async move {
            let _ = tx.send(job.await);
        });
        rx.await.map_err(|_| StoreError::Unavailable("the PostgreSQL store's runtime stopped".into()))?
    }

    /// The lease as it stands.
    pub async fn lease(&self) -> Result<Lease, StoreError> {
        self.call(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one("SELECT holder, address, epoch, expires_at > now() FROM muster_leader WHERE id = 1", &[])
                .await
                .map_err(pg)?;
            Ok(Lease { holder: row.get(0), address: row.get(1), epoch: row.get(2), live: row.get(3) })
        })
        .await
    }

    /// Takes the lease for `ttl` if it has expired (or was released):
    /// the new epoch, after which every write of this store is fenced by
    /// it; `None` while another holds it.
    pub async fn acquire_lease(&self, holder: &str, address: &str, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let (holder, address, ttl_ms) = (holder.to_owned(), address.to_owned(), millis(ttl));
        let epoch = self
            .call(|pool| async move {
                let client = pool.get().await.map_err(pool_error)?;
                let row = client
                    .query_opt(
                        "UPDATE muster_leader SET holder = $1, address = $2, epoch = epoch + 1, \
                         expires_at = now() + $3::bigint * interval '1 millisecond' \
                         WHERE id = 1 AND expires_at <= now() RETURNING epoch",
                        &[&holder, &address, &ttl_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.map(|r| r.get::<_, i64>(0)))
            })
            .await?;
        if let Some(epoch) = epoch {
            self.fence.store(epoch, Ordering::SeqCst);
        }
        Ok(epoch)
    }

    /// Extends the lease this holder has at `epoch` by `ttl` from now:
    /// false when it has passed to another.
    pub async fn renew_lease(&self, holder: &str, epoch: i64, ttl: Duration) -> Result<bool, StoreError> {
        let (holder, ttl_ms) = (holder.to_owned(), millis(ttl));
        self.call(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let renewed = client
                .execute(
                    "UPDATE muster_leader SET expires_at = now() + $3::bigint * interval '1 millisecond' \
                     WHERE id = 1 AND holder = $1 AND epoch = $2",
                    &[&holder, &epoch, &ttl_ms],
                )
                .await
                .map_err(pg)?;
            Ok(renewed == 1)
        })
        .await
    }

    /// Releases the lease at `epoch` at once and tells the standbys.
    pub async fn resign_lease(&self, holder: &str, epoch: i64) -> Result<(), StoreError> {
        let holder = holder.to_owned();
        self.call(|pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(
                "UPDATE muster_leader SET expires_at = '-infinity' WHERE id = 1 AND holder = $1 AND epoch = $2",
                &[&holder, &epoch],
            )
            .await
            .map_err(pg)?;
            tx.batch_execute(&format!("NOTIFY {RESIGN_CHANNEL}")).await.map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
        .await
    }

    /// A connection that listens for resignations: the receiver gets a
    /// message for each, and closes when the connection is lost.
    pub async fn resignations(&self) -> Result<tokio::sync::mpsc::Receiver<()>, StoreError> {
        let config = self.config.clone();
        self.call(|_| async move {
            let (client, mut connection) = config.connect(NoTls).await.map_err(pg)?;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            // The client waits in `keep` as long as its connection is driven.
            let (keep, kept) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _kept = kept;
                while let Some(message) = futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                            let _ = tx.try_send(());
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            client.batch_execute(&format!("LISTEN {RESIGN_CHANNEL}")).await.map_err(pg)?;
            let _ = keep.send(client);
            Ok(rx)
        })
        .await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Creates the schema or brings it up to date, in one transaction.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS muster_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg)?;
    let applied: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM muster_schema", &[]).await.map_err(pg)?.get(0);
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    if applied > known {
        return Err(StoreError::Unavailable(format!(
            "the database holds schema version {applied}, newer than this muster knows ({known}): upgrade muster"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > applied) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute("INSERT INTO muster_schema (version) VALUES ($1)", &[version]).await.map_err(pg)?;
        if *version == 1 {
            // The finished index is kept from the first write on.
            tx.execute("INSERT INTO muster_records (k, v) VALUES ($1, '')", &[&key(META, FINISHED_INDEX)])
                .await
                .map_err(pg)?;
        }
    }
    tx.commit().await.map_err(pg)
}

/// Sends the point, then both tables a chunk at a time, from one
/// repeatable-read snapshot; stops when the receiver is gone.
async fn snapshot_chunks(
    pool: &Pool,
    tx: &std::sync::mpsc::SyncSender<Result<Chunk, StoreError>>,
) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let snapshot = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg)?;
    // Sending blocks only this task, on a thread of the store's runtime;
    // the snapshot stays consistent however long the reader takes.
    let send = |chunk| tokio::task::block_in_place(|| tx.send(Ok(chunk))).is_ok();
    let floor: Option<Vec<u8>> = snapshot
        .query_opt("SELECT v FROM muster_records WHERE k = $1", &[&key(META, EVENT_FLOOR)])
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    let compacted_through = match floor {
        Some(v) => u64::from_be_bytes(v.try_into().map_err(|_| StoreError::Codec("bad metadata value".into()))?),
        None => 0,
    };
    let last: Option<Vec<u8>> = snapshot
        .query_opt(
            "SELECT v FROM muster_records WHERE k >= $1 AND k < $2 ORDER BY k DESC LIMIT 1",
            &[&vec![EVENT], &vec![EVENT + 1]],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    let sequence = match last {
        Some(v) => decode_events(&v)?.iter().map(|e| e.sequence).max().unwrap_or(compacted_through),
        None => compacted_through,
    };
    if !send(Chunk::Point(Point { sequence, compacted_through })) {
        return Ok(());
    }
    for (table, name) in TABLES.iter().enumerate() {
        let sql = format!("SELECT k, v FROM {name} WHERE k >= $1 ORDER BY k LIMIT $2");
        let statement = snapshot.prepare(&sql).await.map_err(pg)?;
        let mut from: Vec<u8> = Vec::new();
        loop {
            let rows = snapshot.query(&statement, &[&from, &CHUNK_ROWS]).await.map_err(pg)?;
            let rows: Vec<Entry> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
            let Some((last, _)) = rows.last() else { break };
            from = just_after(last);
            let full = rows.len() as i64 == CHUNK_ROWS;
            if !send(Chunk::Rows(table, rows)) {
                return Ok(());
            }
            if !full {
                break;
            }
        }
    }
    snapshot.commit().await.map_err(pg)?;
    send(Chunk::End);
    Ok(())
}

/// Applies one batch in one transaction.
/// Fails unless the lease still has epoch `fence` (0: no check). Called
/// first in a write transaction: the row lock it takes orders the write
/// before or after any takeover, so a write after one is refused.
async fn check_fence(tx: &deadpool_postgres::Transaction<'_>, fence: i64) -> Result<(), StoreError> {
    if fence == 0 {
        return Ok(());
    }
    let statement = tx.prepare_cached("SELECT epoch FROM muster_leader WHERE id = 1 FOR SHARE").await.map_err(pg)?;
    let epoch: i64 = tx.query_one(&statement, &[]).await.map_err(pg)?.get(0);
    if epoch == fence {
        Ok(())
    } else {
        Err(StoreError::Fenced(format!(
            "this server lost the leadership: it led epoch {fence}, the lease is at {epoch}"
        )))
    }
}

async fn write_batch(pool: &Pool, fence: i64, pending: Pending, logs: Vec<KeyRange>) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(pg)?;
    check_fence(&tx, fence).await?;
    for (start, end) in &pending.cuts {
        let statement = tx.prepare_cached("DELETE FROM muster_records WHERE k >= $1 AND k <= $2").await.map_err(pg)?;
        tx.execute(&statement, &[start, end]).await.map_err(pg)?;
    }
    if !logs.is_empty() {
        let (starts, ends): (Vec<Vec<u8>>, Vec<Vec<u8>>) = logs.into_iter().unzip();
        let statement = tx
            .prepare_cached(
                "DELETE FROM muster_logs l USING unnest($1::bytea[], $2::bytea[]) AS r(lo, hi) \
                 WHERE l.k >= r.lo AND l.k < r.hi",
            )
            .await
            .map_err(pg)?;
        tx.execute(&statement, &[&starts, &ends]).await.map_err(pg)?;
    }
    let (mut removed, mut keys, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for (k, v) in pending.keys {
        match v {
            Some(v) => {
                keys.push(k);
                values.push(v);
            }
            None => removed.push(k),
        }
    }
    if !removed.is_empty() {
        let statement = tx.prepare_cached("DELETE FROM muster_records WHERE k = ANY($1::bytea[])").await.map_err(pg)?;
        tx.execute(&statement, &[&removed]).await.map_err(pg)?;
    }
    if !keys.is_empty() {
        let statement = tx
            .prepare_cached(
                "INSERT INTO muster_records (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            )
            .await
            .map_err(pg)?;
        tx.execute(&statement, &[&keys, &values]).await.map_err(pg)?;
    }
    if let Some(through) = pending.event_floor {
        // Big-endian sequences compare bytewise as numbers.
        let statement = tx
            .prepare_cached(
                "INSERT INTO muster_records (k, v) VALUES ($1, $2) \
                 ON CONFLICT (k) DO UPDATE SET v = greatest(muster_records.v, excluded.v)",
            )
            .await
            .map_err(pg)?;
        tx.execute(&statement, &[&key(META, EVENT_FLOOR), &through.to_be_bytes().to_vec()]).await.map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut pending = Pending::default();
        let mut logs = Vec::new();
        for write in writes {
            match write {
                Write::CompactEvents { through } => {
                    let (start, end) = layout::event_range_through(*through);
                    pending.cut(start, end);
                    pending.event_floor = Some(pending.event_floor.unwrap_or(0).max(*through));
                }
                Write::Remove(removal) => {
                    logs.push(layout::log_range(removal.id));
                    layout::changes(write, &mut pending)?;
                }
                _ => layout::changes(write, &mut pending)?,
            }
        }
        for (k, v) in layout::event_records(writes)? {
            layout::Changes::insert(&mut pending, k, v);
        }
        let fence = self.fence.load(Ordering::SeqCst);
        self.run(|pool| async move { write_batch(&pool, fence, pending, logs).await })
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn record_counts(&self) -> Result<RecordCounts, StoreError> {
        let counts = self.run(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let by_prefix = client
                .query("SELECT get_byte(k, 0), count(*) FROM muster_records WHERE length(k) > 0 GROUP BY 1", &[])
                .await
                .map_err(pg)?;
            // An event record's count is in its MessagePack array header.
            let headers = client
                .query(
                    "SELECT substring(v from 1 for 6) FROM muster_records WHERE k >= $1 AND k < $2",
                    &[&vec![EVENT], &vec![EVENT + 1]],
                )
                .await
                .map_err(pg)?;
            let logs: i64 = client.query_one("SELECT count(*) FROM muster_logs", &[]).await.map_err(pg)?.get(0);
            let prefixes: Vec<(i32, i64)> = by_prefix.into_iter().map(|r| (r.get(0), r.get(1))).collect();
            let events: u64 = headers.iter().map(|r| events_in_record(r.get::<_, &[u8]>(0))).sum();
            Ok((prefixes, events, logs))
        })?;
        let (prefixes, events, logs) = counts;
        let keys = |prefix: u8| {
            prefixes.iter().find(|(p, _)| *p == i32::from(prefix)).map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0))
        };
        Ok(RecordCounts {
            tasks: keys(TASK),
            events,
            agents: keys(AGENT),
            queues: keys(QUEUE),
            tokens: keys(TOKEN),
            idempotency_keys: keys(IDEMPOTENCY),
            workflow_entries: keys(WORKFLOW),
            unfinished_entries: keys(UNFINISHED),
            finished_entries: keys(FINISHED),
            logs: u64::try_from(logs).unwrap_or(0),
        })
    }

    fn task(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.get(RECORDS, key(TASK, &id.to_bytes()))?.map(|v| decode(&v)).transpose()
    }

    fn tasks_after(&self, after: Option<TaskId>, limit: usize, unfinished_only: bool) -> Result<Vec<Task>, StoreError> {
        let prefix = if unfinished_only { UNFINISHED } else { TASK };
        let start = after.map_or_else(|| vec![prefix], |id| just_after(&key(prefix, &id.to_bytes())));
        let limit = Some(i64::try_from(limit).unwrap_or(i64::MAX));
        if unfinished_only {
            return self.indexed_tasks(start, prefix, limit);
        }
        self.range(RECORDS, start, Some(vec![prefix + 1]), limit, false)?.iter().map(|(_, v)| decode(v)).collect()
    }

    fn unfinished_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.indexed_tasks(vec![UNFINISHED], UNFINISHED, None)
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        // The record holding `after + 1` starts at or before it.
        let wanted = just_after(&key(EVENT, &after.saturating_add(1).to_be_bytes()));
        let mut from = match self.range(RECORDS, vec![EVENT], Some(wanted), Some(1), true)?.pop() {
            Some((k, _)) => k,
            None => vec![EVENT],
        };
        let mut out = Vec::new();
        loop {
            let records = self.range(RECORDS, from, Some(vec![EVENT + 1]), Some(EVENT_PAGE), false)?;
            for (_, v) in &records {
                for event in decode_events(v)? {
                    if event.sequence > after {
                        if out.len() >= limit {
                            return Ok(out);
                        }
                        out.push(event);
                    }
                }
            }
            match records.last() {
                Some((k, _)) if records.len() as i64 == EVENT_PAGE => from = just_after(k),
                _ => return Ok(out),
            }
        }
    }

    fn last_sequence(&self) -> Result<u64, StoreError> {
        match self.range(RECORDS, vec![EVENT], Some(vec![EVENT + 1]), Some(1), true)?.pop() {
            Some((_, v)) => Ok(decode_events(&v)?.iter().map(|e| e.sequence).max().unwrap_or(0)),
            None => self.compacted_through(),
        }
    }

    fn compacted_through(&self) -> Result<u64, StoreError> {
        self.meta_u64(EVENT_FLOOR)
    }

    fn events_cut(&self, until: Millis, max_records: usize) -> Result<Option<u64>, StoreError> {
        let limit = Some(i64::try_from(max_records).unwrap_or(i64::MAX));
        let records = self.range(RECORDS, vec![EVENT], Some(vec![EVENT + 1]), limit, false)?;
        layout::events_cut(records.into_iter().map(|(_, v)| Ok(v)), until)
    }

    fn finished_tasks(
        &self,
        until: Millis,
        after: Option<(Millis, TaskId)>,
        limit: usize,
    ) -> Result<Vec<(Millis, TaskId)>, StoreError> {
        let start = after.map_or_else(|| vec![FINISHED], |(at, id)| just_after(&finished_key(at, id)));
        // Every key of a task that finished at `until` sorts before this.
        let end = key(FINISHED, &until.saturating_add(1).to_be_bytes());
        let limit = Some(i64::try_from(limit).unwrap_or(i64::MAX));
        self.range(RECORDS, start, Some(end), limit, false)?
            .iter()
            .map(|(k, _)| parse_finished_key(&k[1..]).ok_or_else(|| StoreError::Codec("bad finished key".into())))
            .collect()
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan_prefix(&[AGENT])?.iter().map(|(_, v)| decode(v)).collect()
    }

    fn queues(&self) -> Result<Vec<QueueRecord>, StoreError> {
        self.scan_prefix(&[QUEUE])?.iter().map(|(_, v)| decode(v)).collect()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.scan_prefix(&[TOKEN])?.iter().map(|(_, v)| decode(v)).collect()
    }

    fn workflow_tasks(&self, workflow: WorkflowId) -> Result<Vec<TaskId>, StoreError> {
        self.scan_prefix(&key(WORKFLOW, &workflow.to_bytes()))?
            .iter()
            .map(|(k, _)| layout::workflow_member(k))
            .collect()
    }

    fn idempotency_keys(&self) -> Result<Vec<(String, TaskId)>, StoreError> {
        self.scan_prefix(&[IDEMPOTENCY])?.iter().map(|(k, v)| layout::idempotency_entry(k, v)).collect()
    }

    fn put_log(&self, log: &AttemptLog) -> Result<(), StoreError> {
        let (k, v) = (log_key(log.task_id, log.attempt).to_vec(), encode(log)?);
        let fence = self.fence.load(Ordering::SeqCst);
        self.run(|pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(pg)?;
            check_fence(&tx, fence).await?;
            let statement = tx
                .prepare_cached(
                    "INSERT INTO muster_logs (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                )
                .await
                .map_err(pg)?;
            tx.execute(&statement, &[&k, &v]).await.map_err(pg)?;
            tx.commit().await.map_err(pg)
        })
    }

    fn log(&self, task: TaskId, attempt: u32) -> Result<Option<AttemptLog>, StoreError> {
        self.get(LOGS, log_key(task, attempt).to_vec())?.map(|v| decode(&v)).transpose()
    }

    fn logs_after(&self, after: Option<(TaskId, u32)>, limit: usize) -> Result<Vec<AttemptLog>, StoreError> {
        let start = after.map_or_else(Vec::new, |(task, attempt)| just_after(&log_key(task, attempt)));
        let limit = Some(i64::try_from(limit).unwrap_or(i64::MAX));
        self.range(LOGS, start, None, limit, false)?.iter().map(|(_, v)| decode(v)).collect()
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut checker = Checker::new();
        self.read_snapshot(
            |_| Ok(()),
            |table, k, v| {
                match table {
                    RECORDS => check_record(&mut checker, k, v),
                    _ => check_log(&mut checker, k, v),
                }
                Ok(())
            },
        )?;
        Ok(checker.finish())
    }

    fn export(&self, out: &mut dyn Export) -> Result<(), StoreError> {
        let out = std::cell::RefCell::new(out);
        self.read_snapshot(
            |point| out.borrow_mut().begin(point),
            |table, k, v| match exported(table, k, v)? {
                Some(record) => out.borrow_mut().record(record),
                None => Ok(()),
            },
        )
    }
}
