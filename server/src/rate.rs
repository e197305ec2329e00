//! A token bucket: the rate limit of agent sessions and of callers.

use tokio::time::Instant;

/// Allows `rate` events per second on average, with bursts of twice that.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, tokens: rate * 2.0, at: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely: its owner has been idle
    /// and can be forgotten without changing any decision.
    pub(crate) fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate * 2.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_bursts_then_the_steady_rate() {
        let mut bucket = TokenBucket::new(10);
        let now = Instant::now();
        assert_eq!((0..25).filter(|_| bucket.take(now)).count(), 20);
        assert!(!bucket.is_full(now));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..25).filter(|_| bucket.take(Instant::now())).count(), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(bucket.is_full(Instant::now()));
    }
}
