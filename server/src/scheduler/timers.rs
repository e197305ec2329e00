//! Deadlines the scheduler acts on, in one ordered set. Timers are removed
//! when the state they guard changes, so the set holds only live ones.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{AgentId, Millis, TaskId};

/// What to do when a deadline passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Timer {
    /// Check whether the agent's lease ran out.
    Lease(AgentId),
    /// A pending task whose `ready_at` is this instant becomes queued.
    Ready(TaskId, Millis),
    /// The attempt's execution timeout.
    Deadline(TaskId, u32),
    /// The cancelled attempt's grace period.
    CancelGrace(TaskId, u32),
    /// The queue timeout of the task enqueued with this token.
    QueueTimeout(TaskId, u64),
    /// Record the attempt's latest progress, held back by the progress
    /// interval.
    Progress(TaskId, u32),
}

/// The farthest the scheduler ever looks ahead: about thirty years, well
/// past every bounded input and still an instant every platform can hold.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + d`, saturating at [`FAR_FUTURE`] instead of panicking: the one way
/// the scheduler computes a deadline, so no stored or configured duration can
/// overflow the clock.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR_FUTURE)).unwrap_or(now)
}

/// Identifies one armed timer, for removal.
pub(crate) type TimerKey = (Instant, u64, Timer);

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<TimerKey>,
    seq: u64,
}

impl Timers {
    pub(crate) fn add(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.seq += 1;
        let key = (at, self.seq, timer);
        self.set.insert(key);
        key
    }

    pub(crate) fn remove(&mut self, key: &TimerKey) {
        self.set.remove(key);
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|k| k.0)
    }

    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.set.first()?.0 <= now { self.set.pop_first().map(|k| k.2) } else { None }
    }

    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(later(now, Duration::MAX), now + FAR_FUTURE);
        assert_eq!(later(now, Duration::from_secs(i64::MAX as u64)), now + FAR_FUTURE);
    }
}
