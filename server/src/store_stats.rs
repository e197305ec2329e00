//! The store's footprint for the `muster_store_*` gauges: the data
//! directory's size and its filesystem's free space, measured every few
//! seconds, and the records by kind, recounted about once a minute; all off
//! the async threads, so neither the hot path nor a scrape waits for them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// How often [`run`] measures the data directory.
pub(crate) const STORE_DISK_EVERY: Duration = Duration::from_secs(15);
/// How often it recounts the records (a scan of every key) at most...
const STORE_RECOUNT_EVERY: Duration = Duration::from_secs(60);
/// ...and at least this many times the last count's duration apart, so
/// counting a large store keeps at most a twentieth of one thread busy.
const STORE_RECOUNT_SPACING: u32 = 20;

/// The data directory's footprint and its filesystem's free space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DiskUsage {
    /// Allocated bytes of every file under the directory, as `du` counts.
    pub(crate) size_bytes: u64,
    /// Bytes available to unprivileged users on its filesystem.
    pub(crate) free_bytes: u64,
}

/// Measures `dir`: walks it (files vanishing meanwhile, as sled's old
/// snapshots do, are skipped) and asks its filesystem for free space.
pub(crate) fn disk_usage(dir: &Path) -> std::io::Result<DiskUsage> {
    Ok(DiskUsage { size_bytes: dir_size(dir)?, free_bytes: free_bytes(dir)? })
}

/// Allocated bytes of every file under `dir`, as `du` counts (what
/// `muster_store_size_bytes` reports); files vanishing meanwhile are
/// skipped.
pub fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries = match std::fs::read_dir(&next) {
            Ok(entries) => entries,
            Err(e) if gone(&e) && next != dir => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match entry.path().symlink_metadata() {
                Ok(meta) => meta,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                pending.push(entry.path());
            }
            total = total.saturating_add(allocated(&meta));
        }
    }
    Ok(total)
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    // st_blocks counts 512-byte units whatever the filesystem's block size.
    std::os::unix::fs::MetadataExt::blocks(meta).saturating_mul(512)
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

#[cfg(unix)]
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `stat` is a statvfs for the call
    // to fill.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `stat` (zeroed before anyway).
    let stat = unsafe { stat.assume_init() };
    // Both fields are u64 on Linux, narrower on some other unixes.
    #[allow(clippy::unnecessary_cast)]
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> std::io::Result<u64> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "free space is measured on unix only"))
}

/// Keeps the store gauges current until `shutdown`: measures `dir` (when
/// the store has one) every [`STORE_DISK_EVERY`] and recounts the records
/// every minute (or 20 times as long as the last count took, if longer),
/// first at once, each on a blocking thread. A failure is logged once and
/// leaves the last values (and the count's timestamp) as they were. A
/// count under way when the server stops is waited for.
pub(crate) async fn run(
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    dir: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(STORE_DISK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_count: Option<tokio::time::Instant> = None;
    let (mut counts_failing, mut disk_failing) = (false, false);
    loop {
        let tick = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            tick = ticks.tick() => tick,
        };
        let recount = next_count.is_none_or(|next| tick >= next);
        let (store, dir) = (store.clone(), dir.clone());
        let measured = tokio::task::spawn_blocking(move || {
            let counts = recount.then(|| {
                let started = std::time::Instant::now();
                (store.record_counts(), std::time::SystemTime::now(), started.elapsed())
            });
            (counts, dir.map(|dir| disk_usage(&dir)))
        })
        .await;
        let Ok((counts, usage)) = measured else { continue };
        if let Some((counts, at, took)) = counts {
            next_count = Some(tick + STORE_RECOUNT_EVERY.max(took.saturating_mul(STORE_RECOUNT_SPACING)));
            match counts {
                Ok(counts) => {
                    metrics.set_record_counts(&counts, at);
                    counts_failing = false;
                }
                Err(e) if !counts_failing => {
                    tracing::warn!(error = %e, "could not count the store's records; the metrics keep the last count");
                    counts_failing = true;
                }
                Err(_) => {}
            }
        }
        match usage {
            Some(Ok(usage)) => {
                metrics.set_disk_usage(usage);
                disk_failing = false;
            }
            Some(Err(e)) if !disk_failing => {
                tracing::warn!(error = %e, "could not measure the data directory; the metrics keep the last values");
                disk_failing = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Snapshot;

    #[test]
    fn disk_usage_counts_files_in_subdirectories_and_finds_free_space() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let empty = disk_usage(dir.path())?;
        std::fs::create_dir(dir.path().join("blobs"))?;
        std::fs::write(dir.path().join("blobs/1"), vec![7u8; 64 * 1024])?;
        std::fs::write(dir.path().join("db"), vec![7u8; 64 * 1024])?;
        let usage = disk_usage(dir.path())?;
        assert!(usage.size_bytes >= empty.size_bytes + 128 * 1024, "{empty:?} then {usage:?}");
        assert!(usage.free_bytes > 0, "{usage:?}");
        assert!(disk_usage(&dir.path().join("missing")).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn the_store_stats_task_measures_at_once_and_stops_with_the_server() -> Result<(), Box<dyn std::error::Error>>
    {
        let metrics = Metrics::new()?;
        let store = Arc::new(crate::store::MemoryStore::new());
        store.write(&[crate::store::Write::Task(crate::store::test_task())])?;
        let dir = tempfile::tempdir()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(metrics.clone(), store, Some(dir.path().to_path_buf()), shutdown.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = metrics.render(&Snapshot::default())?;
            if text.contains("muster_store_disk_free_bytes") && text.contains("muster_store_records{") {
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "not measured: {text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(text.contains("muster_store_records{kind=\"task\"} 1"), "{text}");
        assert!(text.contains("muster_store_records{kind=\"unfinished_index\"} 1"), "{text}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await??;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_stats_task_recounts_every_minute_not_at_every_measurement()
    -> Result<(), Box<dyn std::error::Error>> {
        let metrics = Metrics::new()?;
        let store = Arc::new(crate::store::MemoryStore::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(metrics.clone(), store.clone(), None, shutdown.clone()));
        let tasks = || {
            let text = metrics.render(&Snapshot::default()).unwrap_or_default();
            text.lines().find_map(|l| l.strip_prefix("muster_store_records{kind=\"task\"} ")?.parse::<u64>().ok())
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let text = metrics.render(&Snapshot::default())?;
        assert!(text.contains("muster_store_records{kind=\"task\"} 0"), "counted at once: {text}");
        assert!(!text.contains("muster_store_size_bytes"), "no directory, no size: {text}");
        store.write(&[crate::store::Write::Task(crate::store::test_task())])?;
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert_eq!(tasks(), Some(0), "three measurements of the directory, no recount");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(tasks(), Some(1), "recounted after a minute");
        shutdown.cancel();
        task.await?;
        Ok(())
    }
}
