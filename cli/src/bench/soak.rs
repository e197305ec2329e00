//! The soak scenario: a steady stream of tasks through a server with a
//! short retention, for long enough that retention removes as much as
//! arrives. The data directory's size on disk and the server's RSS are
//! measured as it runs; after a warm-up both must level off. Every task
//! must still run exactly once and succeed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use muster_sdk::{Agent, CancellationToken, Client, NewTask, Output};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{BenchArgs, ServerProcess, latency_summary, percentile, wait_for, watch_successes};

/// Agents, and slots each, that run the stream: far more than it needs.
const AGENTS: usize = 4;
const SLOTS: u32 = 64;
/// How much the later half of the run after warm-up may exceed the
/// earlier half, at its peak, and still count as level: a share, or an
/// absolute slack for small runs, whichever is larger. Sled grows and
/// cleans its files a 512 KiB segment at a time, and the allocator's
/// arenas settle in steps of megabytes.
const LEVEL_TOLERANCE: f64 = 0.10;
const DISK_SLACK_BYTES: f64 = 8.0 * 512.0 * 1024.0;
const RSS_SLACK_BYTES: f64 = 8.0 * 1024.0 * 1024.0;

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// One measurement.
struct Sample {
    seconds: f64,
    disk_bytes: u64,
    rss_bytes: u64,
    /// Tasks retention has removed so far.
    tasks_compacted: u64,
    submitted: u64,
    succeeded: u64,
    start_p99_ms: f64,
}

impl Sample {
    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "data_dir_bytes": self.disk_bytes,
            "server_rss_bytes": self.rss_bytes,
            "tasks_compacted": self.tasks_compacted,
            "tasks_kept": self.succeeded.saturating_sub(self.tasks_compacted),
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "submit_to_handler_start_p99_ms": self.start_p99_ms,
        })
    }
}

/// Whether `values` (one per sample after warm-up) level off: the peak of
/// the later half against the peak of the earlier one, within `slack` or
/// [`LEVEL_TOLERANCE`].
fn level(values: &[f64], slack: f64) -> Value {
    let half = values.len() / 2;
    let peak = |part: &[f64]| part.iter().copied().fold(0.0, f64::max);
    let (earlier, later) = (peak(&values[..half]), peak(&values[half..]));
    let growth = if earlier > 0.0 { later / earlier - 1.0 } else { 0.0 };
    json!({
        "earlier_peak": earlier,
        "later_peak": later,
        "growth": growth,
        "level": half > 0 && (growth <= LEVEL_TOLERANCE || later - earlier <= slack),
    })
}

pub(super) async fn soak(args: &BenchArgs, quiet: bool) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let retention = humantime::format_duration(args.soak_retention).to_string();
    let server = ServerProcess::spawn_with(dir.path(), "sync", &["--retention", &retention])?;
    let client = Client::connect(server.endpoint.clone()).await?;

    // Agents that count runs per task and measure submit to start from the
    // time the submitter put in the task's metadata.
    let stop = CancellationToken::new();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let window: Arc<std::sync::Mutex<Vec<f64>>> = Arc::default();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (runs, window) = (runs.clone(), window.clone());
        let agent = Agent::builder(format!("soak-{i}"))
            .server(server.endpoint.clone())
            .slots(SLOTS)
            .handler("soak", move |ctx| {
                let (runs, window) = (runs.clone(), window.clone());
                async move {
                    if let Some(at) = ctx.metadata().get("submitted_us").and_then(|t| t.parse::<u64>().ok()) {
                        let ms = unix_micros().saturating_sub(at) as f64 / 1000.0;
                        window.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                    }
                    ctx.log("soaking");
                    *runs.lock().await.entry(ctx.task_id().to_owned()).or_default() += 1;
                    Ok(Output::from(b"done".to_vec()))
                }
            })
            .build()?;
        agents.push(tokio::spawn(agent.run_until(stop.child_token())));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.list_agents("soak").await?.len() < AGENTS {
        if Instant::now() > deadline {
            bail!("the soak agents did not all register within 60s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (succeeded, _, watcher) = watch_successes(&client).await?;

    // The stream: a batch every 100 ms.
    let submitted = Arc::new(AtomicU64::new(0));
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let per_tick = (args.soak_rate / 10).max(1) as usize;
    let stream_stop = CancellationToken::new();
    let submitter = {
        let (client, submitted, ids, stream_stop) =
            (client.clone(), submitted.clone(), ids.clone(), stream_stop.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stream_stop.is_cancelled() {
                ticker.tick().await;
                let at = unix_micros().to_string();
                let specs = (0..per_tick)
                    .map(|_| NewTask::new("soak").payload(vec![b'x'; 256]).metadata("submitted_us", at.clone()).build())
                    .collect();
                let response = client.submit_many(specs).await.context("submitting the stream")?;
                submitted.fetch_add(response.tasks.len() as u64, Ordering::SeqCst);
                ids.lock().await.extend(response.tasks.into_iter().map(|t| t.id));
            }
            Ok::<_, anyhow::Error>(())
        })
    };

    let started = Instant::now();
    let mut samples = Vec::new();
    let compacted = format!("{}{{kind=\"task\"}}", muster_server::metrics::STORE_COMPACTED);
    while started.elapsed() < args.soak_duration {
        let left = args.soak_duration.saturating_sub(started.elapsed());
        tokio::time::sleep(args.soak_sample.min(left)).await;
        let mut latencies = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
        latencies.sort_by(f64::total_cmp);
        let sample = Sample {
            seconds: started.elapsed().as_secs_f64(),
            disk_bytes: muster_server::dir_size(dir.path()).context("measuring the data directory")?,
            rss_bytes: server.memory("VmRSS"),
            tasks_compacted: server.metric(&compacted).map_or(0, |n| n as u64),
            submitted: submitted.load(Ordering::SeqCst),
            succeeded: succeeded.load(Ordering::SeqCst),
            start_p99_ms: percentile(&latencies, 99.0),
        };
        if !quiet {
            eprintln!(
                "soak {:>6.0}s  data dir {:>7.1} MiB  rss {:>6.1} MiB  finished tasks kept {:>7}  submitted {:>8}  start p99 {:.1} ms",
                sample.seconds,
                sample.disk_bytes as f64 / 1048576.0,
                sample.rss_bytes as f64 / 1048576.0,
                sample.succeeded.saturating_sub(sample.tasks_compacted),
                sample.submitted,
                sample.start_p99_ms
            );
        }
        if submitter.is_finished() {
            break;
        }
        samples.push(sample);
    }
    stream_stop.cancel();
    submitter.await.context("the submitter stopped")??;
    let total = submitted.load(Ordering::SeqCst);
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    wait_for(&succeeded, total, Duration::from_secs(120)).await?;
    let runs = runs.lock().await.clone();
    let ids = ids.lock().await.clone();
    let duplicates = runs.values().filter(|n| **n > 1).count();
    let missing = ids.iter().filter(|id| !runs.contains_key(*id)).count();
    stop.cancel();
    for agent in agents {
        let _ = agent.await;
    }
    watcher.abort();
    if duplicates > 0 || missing > 0 {
        bail!("correctness check failed: {duplicates} of {total} ran more than once, {missing} never ran");
    }

    // Warm-up: until retention has had time to remove as much as arrives
    // (three retention periods), and at least the first quarter.
    let warm_up = (args.soak_retention.as_secs_f64() * 3.0).max(args.soak_duration.as_secs_f64() / 4.0);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.seconds >= warm_up).collect();
    if after.len() < 4 {
        bail!(
            "too few samples after the {warm_up:.0}s warm-up to judge a plateau ({}): run longer or sample more often",
            after.len()
        );
    }
    let disk = level(&after.iter().map(|s| s.disk_bytes as f64).collect::<Vec<_>>(), DISK_SLACK_BYTES);
    let rss = level(&after.iter().map(|s| s.rss_bytes as f64).collect::<Vec<_>>(), RSS_SLACK_BYTES);
    let p99s: Vec<f64> = after.iter().map(|s| s.start_p99_ms).collect();
    let level_off = disk["level"] == true && rss["level"] == true;
    server.kill();
    let result = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "retention_seconds": args.soak_retention.as_secs_f64(),
        "target_rate": args.soak_rate,
        "achieved_rate": achieved,
        "tasks": total,
        "warm_up_seconds": warm_up,
        "data_dir": disk,
        "server_rss": rss,
        "submit_to_handler_start_p99_ms_per_sample": latency_summary(p99s),
        "level": level_off,
        "samples": samples.iter().map(Sample::json).collect::<Vec<_>>(),
        "check": {"all_succeeded": true, "ran_exactly_once": true, "lost": 0},
    });
    if !level_off {
        bail!("the store or the server's memory kept growing after warm-up: {result}");
    }
    Ok(result)
}

pub(super) fn summary_line(result: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    format!(
        "soak       {:.0}s at {:.0}/s, retention {:.0}s: data dir {:.1} → {:.1} MiB ({:+.1} %), rss {:.1} → {:.1} MiB ({:+.1} %), level: {}",
        f(&result["seconds"]),
        f(&result["achieved_rate"]),
        f(&result["retention_seconds"]),
        f(&result["data_dir"]["earlier_peak"]) / 1048576.0,
        f(&result["data_dir"]["later_peak"]) / 1048576.0,
        f(&result["data_dir"]["growth"]) * 100.0,
        f(&result["server_rss"]["earlier_peak"]) / 1048576.0,
        f(&result["server_rss"]["later_peak"]) / 1048576.0,
        f(&result["server_rss"]["growth"]) * 100.0,
        result["level"]
    )
}

#[cfg(test)]
mod tests {
    use super::level;

    #[test]
    fn a_series_that_keeps_climbing_is_not_level_and_one_that_saws_within_bounds_is() {
        let climbing: Vec<f64> = (0..10).map(|i| 100.0 + 10.0 * f64::from(i)).collect();
        assert_eq!(level(&climbing, 0.0)["level"], false);
        // Unless all of the climb is within the slack.
        assert_eq!(level(&climbing, 60.0)["level"], true);

        let sawing = [100.0, 108.0, 96.0, 104.0, 99.0, 107.0, 95.0, 106.0];
        assert_eq!(level(&sawing, 0.0)["level"], true);

        // One sample cannot show a trend either way.
        assert_eq!(level(&[100.0], 1000.0)["level"], false);
    }
}
