//! [`Phase`]: where the agent is in its life, and the drain rules, as a
//! state machine driven by explicit instants.
//!
//! Invariants:
//! - Once shutdown starts, running work gets the drain grace to finish;
//!   what is still running then is cancelled (cause shutdown) and gets
//!   `CANCEL_WAIT` to end; what ignores that is abandoned.
//! - Once nothing runs, the agent waits up to `FLUSH_WAIT` for its results
//!   to be acknowledged, and stops as soon as they all are.
//! - The phase only moves forward.

use std::time::Duration;

use tokio::time::Instant;

/// How long cancelled handlers get to end once drain grace is over.
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How long a draining agent waits for the server to acknowledge results.
pub(crate) const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// Running work may finish until the deadline.
    Draining(Instant),
    /// Running work was cancelled; it may end until the deadline.
    Cancelling(Instant),
    /// Waiting for results to be acknowledged until the deadline.
    Flushing(Instant),
    Done,
}

/// What a phase change asks of the running work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The drain grace is over: cancel what runs.
    CancelRunning,
    /// Cancelled work did not end in time: abandon it.
    AbandonRunning,
}

impl Phase {
    pub(crate) fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Draining(at) | Phase::Cancelling(at) | Phase::Flushing(at) => Some(at),
            Phase::Serving | Phase::Done => None,
        }
    }

    /// Starts the drain; returns false if it had started already.
    pub(crate) fn start_drain(&mut self, grace: Duration, now: Instant) -> bool {
        if *self != Phase::Serving {
            return false;
        }
        *self = Phase::Draining(now + grace);
        true
    }

    /// Takes one phase step whose condition or deadline is met, given how
    /// many attempts run and whether results wait for acknowledgement.
    /// Call it until it returns `None`: each transition it returns must be
    /// applied before the next call.
    pub(crate) fn advance(&mut self, running: usize, unacked: bool, now: Instant) -> Option<Option<Transition>> {
        let (next, transition) = match *self {
            Phase::Serving | Phase::Done => return None,
            Phase::Draining(_) | Phase::Cancelling(_) if running == 0 => (Phase::Flushing(now + FLUSH_WAIT), None),
            Phase::Draining(until) if now >= until => {
                (Phase::Cancelling(now + CANCEL_WAIT), Some(Transition::CancelRunning))
            }
            Phase::Cancelling(until) if now >= until => {
                (Phase::Flushing(now + FLUSH_WAIT), Some(Transition::AbandonRunning))
            }
            Phase::Flushing(until) if !unacked || now >= until => (Phase::Done, None),
            Phase::Draining(_) | Phase::Cancelling(_) | Phase::Flushing(_) => return None,
        };
        *self = next;
        Some(transition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    /// Advances until nothing changes, collecting the transitions.
    fn settle(phase: &mut Phase, running: usize, unacked: bool, now: Instant) -> Vec<Transition> {
        let mut transitions = Vec::new();
        while let Some(step) = phase.advance(running, unacked, now) {
            transitions.extend(step);
        }
        transitions
    }

    #[test]
    fn serving_never_advances_on_its_own() {
        let mut phase = Phase::Serving;
        assert!(settle(&mut phase, 0, false, Instant::now()).is_empty());
        assert_eq!(phase, Phase::Serving);
    }

    #[test]
    fn work_that_finishes_within_the_grace_is_not_cancelled() {
        let t0 = Instant::now();
        let mut phase = Phase::Serving;
        assert!(phase.start_drain(GRACE, t0));
        assert!(!phase.start_drain(GRACE, t0), "only once");
        assert!(settle(&mut phase, 1, true, t0 + GRACE - Duration::from_millis(1)).is_empty());
        assert_eq!(phase.deadline(), Some(t0 + GRACE));
        let t1 = t0 + Duration::from_secs(3);
        assert!(settle(&mut phase, 0, true, t1).is_empty());
        assert_eq!(phase, Phase::Flushing(t1 + FLUSH_WAIT));
        assert!(settle(&mut phase, 0, false, t1).is_empty());
        assert_eq!(phase, Phase::Done);
    }

    #[test]
    fn work_left_at_the_end_of_the_grace_is_cancelled_then_abandoned() {
        let t0 = Instant::now();
        let mut phase = Phase::Serving;
        phase.start_drain(GRACE, t0);
        assert_eq!(settle(&mut phase, 2, false, t0 + GRACE), [Transition::CancelRunning]);
        assert_eq!(phase, Phase::Cancelling(t0 + GRACE + CANCEL_WAIT));
        assert!(settle(&mut phase, 2, false, t0 + GRACE + CANCEL_WAIT / 2).is_empty());
        let t1 = t0 + GRACE + CANCEL_WAIT;
        assert_eq!(settle(&mut phase, 2, true, t1), [Transition::AbandonRunning]);
        assert_eq!(phase, Phase::Flushing(t1 + FLUSH_WAIT));
    }

    #[test]
    fn unacknowledged_results_are_waited_for_until_the_flush_deadline() {
        let t0 = Instant::now();
        let mut phase = Phase::Serving;
        phase.start_drain(Duration::ZERO, t0);
        settle(&mut phase, 0, true, t0);
        assert_eq!(phase, Phase::Flushing(t0 + FLUSH_WAIT));
        settle(&mut phase, 0, true, t0 + FLUSH_WAIT - Duration::from_millis(1));
        assert_eq!(phase, Phase::Flushing(t0 + FLUSH_WAIT));
        settle(&mut phase, 0, true, t0 + FLUSH_WAIT);
        assert_eq!(phase, Phase::Done);
    }
}
