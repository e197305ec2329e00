//! Exponential backoff with full jitter, shared by the agent's reconnect loop
//! and `Client::wait`'s watch reconnects.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling)
//! spreads a fleet that lost its server at the same instant, so the agents do
//! not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// The largest delay retry number `attempt` (0 for the first retry) may wait:
/// `min(max, initial * 2^attempt)`, without overflow for any `attempt`.
pub(crate) fn backoff_ceiling(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

/// A delay drawn uniformly from `[0, backoff_ceiling(attempt, initial, max)]`
/// with `rng`, so tests can pass a seeded source.
pub(crate) fn backoff_delay<R: Rng + ?Sized>(attempt: u32, initial: Duration, max: Duration, rng: &mut R) -> Duration {
    let ceiling = backoff_ceiling(attempt, initial, max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=nanos))
}

/// [`backoff_delay`] with the thread-local random source.
pub(crate) fn jittered(attempt: u32, initial: Duration, max: Duration) -> Duration {
    backoff_delay(attempt, initial, max, &mut rand::thread_rng())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const INITIAL: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn ceiling_doubles_from_initial_until_the_cap() {
        assert_eq!(backoff_ceiling(0, INITIAL, MAX), Duration::from_millis(100));
        assert_eq!(backoff_ceiling(1, INITIAL, MAX), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(5, INITIAL, MAX), Duration::from_millis(3200));
        assert_eq!(backoff_ceiling(6, INITIAL, MAX), MAX);
    }

    #[test]
    fn ceiling_does_not_overflow_for_huge_attempt_numbers() {
        assert_eq!(backoff_ceiling(u32::MAX, INITIAL, MAX), MAX);
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(backoff_ceiling(200, huge, huge), huge);
    }

    #[test]
    fn delay_stays_within_zero_and_the_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let ceiling = backoff_ceiling(attempt, INITIAL, MAX);
            let mut largest = Duration::ZERO;
            for _ in 0..200 {
                let delay = backoff_delay(attempt, INITIAL, MAX, &mut rng);
                assert!(delay <= ceiling, "attempt {attempt}: {delay:?} > {ceiling:?}");
                largest = largest.max(delay);
            }
            // Full jitter uses the whole range, not just its bottom.
            assert!(largest >= ceiling / 2, "attempt {attempt}: largest {largest:?}");
        }
    }

    #[test]
    fn delay_is_zero_when_initial_is_zero() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(backoff_delay(3, Duration::ZERO, MAX, &mut rng), Duration::ZERO);
    }
}
