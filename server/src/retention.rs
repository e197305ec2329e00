//! Retention: finished tasks older than `retention.finished_tasks` go with
//! everything that belongs to them, and so do the events of that age.
//!
//! The compactor reads candidates from the store off the async threads, in
//! small passes ([`plan`]), and hands each pass to the scheduler as one
//! `Expire` command; the scheduler drops what must stay (a task retried
//! meanwhile, one an unfinished task depends on) and its removal writes go
//! through the writer like any other. While there is a backlog (after a
//! restart, say) a pass follows the last after a pause as long as that
//! pass took; otherwise one runs every [`pass_interval`].
//!
//! Invariants:
//! - A task goes only once its events are gone, so no event ever names a
//!   task that is not stored.
//! - A workflow goes whole, once its last task is past retention.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::model::{Millis, TaskId};
use crate::scheduler::engine::Clock;
use crate::scheduler::{Command, CoreHandle};
use crate::store::{Removal, Store, StoreError};

/// Finished-index entries read per pass. Small, so that one pass holds
/// the writer for a millisecond or two and work behind it barely waits.
pub(crate) const PASS_TASKS: usize = 64;
/// Event records (of up to 16 events) cut per pass.
pub(crate) const PASS_EVENT_RECORDS: usize = 64;
/// The shortest pause between passes while there is a backlog. The pause
/// is as long as the pass took, at least this: retention takes at most
/// about half of the time, and less the busier the writer and the core
/// are, since a pass waits its turn with them.
const BACKLOG_PAUSE: Duration = Duration::from_millis(5);

/// How often retention looks for expired work when it has none: a tenth
/// of the retention, between one second and a minute.
pub(crate) fn pass_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// The pause before the next pass: with a backlog, as long as the last
/// pass `took` (at least [`BACKLOG_PAUSE`]); without, [`pass_interval`].
fn pause(backlog: bool, took: Duration, retention: Duration) -> Duration {
    if backlog { took.max(BACKLOG_PAUSE) } else { pass_interval(retention) }
}

/// One pass: what to remove, and where the next one starts.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Workflows and single tasks, each removed whole or not at all.
    pub(crate) groups: Vec<Vec<Removal>>,
    /// The event log is cut after this sequence.
    pub(crate) events_through: Option<u64>,
    /// Events the cut removes.
    pub(crate) events: u64,
    /// The finished index holds more expired entries after this pass.
    pub(crate) more: bool,
}

/// Where a sweep of the finished index has got to: passes continue from
/// it, past entries kept back, and start over once they reach the end.
pub(crate) type Cursor = Option<(Millis, TaskId)>;

/// Finds what finished (and what was logged) at or before `cutoff` and
/// may go, from `cursor` on. Reads the store: call it off the async
/// threads.
pub(crate) fn plan(store: &dyn Store, cutoff: Millis, cursor: &mut Cursor) -> Result<Plan, StoreError> {
    let compacted = store.compacted_through()?;
    let events_through = store.events_cut(cutoff, PASS_EVENT_RECORDS)?.filter(|&through| through > compacted);
    let floor = events_through.unwrap_or(compacted);
    let entries = store.finished_tasks(cutoff, *cursor, PASS_TASKS)?;
    let more = entries.len() == PASS_TASKS;
    *cursor = if more { entries.last().copied() } else { None };

    let gone =
        |task: &crate::model::Task| task.state.is_terminal() && task.updated_at <= cutoff && task.sequence <= floor;
    let mut workflows = HashSet::new();
    let mut groups = Vec::new();
    for (finished_at, id) in entries {
        let Some(task) = store.task(id)? else { continue };
        if task.updated_at != finished_at || !gone(&task) {
            continue;
        }
        match task.workflow {
            None => groups.push(vec![Removal::of(&task)]),
            Some(workflow) if workflows.insert(workflow) => {
                let mut group = Vec::new();
                let mut whole = true;
                for member in store.workflow_tasks(workflow)? {
                    match store.task(member)? {
                        Some(task) if gone(&task) => group.push(Removal::of(&task)),
                        Some(_) => {
                            whole = false;
                            break;
                        }
                        None => {}
                    }
                }
                if whole {
                    groups.push(group);
                }
            }
            Some(_) => {}
        }
    }
    let events = events_through.map_or(0, |through| through - compacted);
    Ok(Plan { groups, events_through, events, more })
}

/// Runs retention until `shutdown`: passes while there is a backlog, then
/// one every [`pass_interval`]. With a zero `retention` nothing expires,
/// and only the oldest-sequence gauge is set.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    core: CoreHandle,
    metrics: Arc<Metrics>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let clock = Clock::new(Instant::now());
    let mut oldest = store.compacted_through().unwrap_or(0) + 1;
    metrics.observe_compaction(0, 0, oldest);
    if retention.is_zero() {
        return;
    }
    let retention_ms = Millis::try_from(retention.as_millis()).unwrap_or(Millis::MAX);
    let mut cursor: Cursor = None;
    let mut failing = false;
    loop {
        let started = Instant::now();
        let backlog = {
            let cutoff = clock.ms(Instant::now()).saturating_sub(retention_ms);
            match pass(&store, &core, cutoff, &mut cursor).await {
                Ok((removed, plan)) => {
                    failing = false;
                    if let Some(through) = plan.events_through {
                        oldest = through + 1;
                    }
                    metrics.observe_compaction(removed, plan.events, oldest);
                    if removed > 0 || plan.events > 0 {
                        debug!(tasks = removed, events = plan.events, oldest, "retention pass");
                    }
                    // A cut of fewer events than records a pass may take
                    // caught up with the log; more means there may be a
                    // backlog (a record holds 1 to 16 events).
                    plan.more || plan.events >= PASS_EVENT_RECORDS as u64
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "retention pass failed; retrying");
                    }
                    failing = true;
                    false
                }
            }
        };
        let wait = pause(backlog, started.elapsed(), retention);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One pass: the plan, read on a blocking thread, then the scheduler's
/// expiry. Returns the tasks removed, with the plan.
async fn pass(
    store: &Arc<dyn Store>,
    core: &CoreHandle,
    cutoff: Millis,
    cursor: &mut Cursor,
) -> Result<(u64, Plan), crate::error::Error> {
    let (store, mut moved) = (store.clone(), *cursor);
    let (mut plan, next) =
        tokio::task::spawn_blocking(move || plan(store.as_ref(), cutoff, &mut moved).map(|p| (p, moved)))
            .await
            .map_err(|e| crate::error::Error::Unavailable(format!("the retention pass panicked: {e}")))??;
    *cursor = next;
    if plan.groups.is_empty() && plan.events_through.is_none() {
        return Ok((0, plan));
    }
    let groups = std::mem::take(&mut plan.groups);
    let events_through = plan.events_through;
    let expired = core.call(|reply| Command::Expire { groups, events_through, reply }).await?;
    Ok((expired.tasks, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_pauses_as_long_as_the_pass_took_and_idle_passes_wait_the_interval() {
        let hour = Duration::from_secs(3600);
        assert_eq!(pause(true, Duration::from_millis(12), hour), Duration::from_millis(12));
        assert_eq!(pause(true, Duration::from_micros(300), hour), BACKLOG_PAUSE);
        assert_eq!(pause(false, Duration::from_millis(12), hour), Duration::from_secs(60));
        assert_eq!(pause(false, Duration::ZERO, Duration::from_secs(20)), Duration::from_secs(2));
        assert_eq!(pause(false, Duration::ZERO, Duration::from_secs(3)), Duration::from_secs(1));
    }
}
