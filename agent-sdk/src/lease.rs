//! [`Lease`]: the agent's side of the server's liveness contract, as a
//! state machine driven by explicit instants.
//!
//! Invariants:
//! - Heartbeats are due once per announced interval while connected, never
//!   while disconnected.
//! - A session silent for `max(2 × heartbeat, lease / 2)` (at most the
//!   lease) is stale: a healthy server answers every heartbeat, so that
//!   silence means a half-open connection no error will ever report.
//! - Silence of the lease TTL (counted from the last message or
//!   registration, connected or not) means the server has given the
//!   agent's work to someone else. Without an announced TTL nothing
//!   expires.
//! - The lease is checked about ten times per TTL (between every 10 ms and
//!   every second), so fencing happens close to the TTL.

use std::time::Duration;

use tokio::time::Instant;

/// Used until the server announces its own interval.
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// What a lease check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseCheck {
    /// How long the server has been silent.
    pub(crate) silence: Duration,
    /// The session has been silent too long to be alive.
    pub(crate) stale: bool,
    /// The lease TTL has passed: the agent's work is no longer its own.
    pub(crate) expired: bool,
}

/// Heartbeat and lease timing, from the last `Registered`.
#[derive(Debug)]
pub(crate) struct Lease {
    heartbeat: Duration,
    /// `None` before the first registration, or when the server announced
    /// none (then self-fencing is off).
    ttl: Option<Duration>,
    last_contact: Instant,
    /// When the next heartbeat is due; `None` while disconnected.
    next_heartbeat: Option<Instant>,
    next_check: Instant,
}

impl Lease {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            heartbeat: DEFAULT_HEARTBEAT,
            ttl: None,
            last_contact: now,
            next_heartbeat: None,
            next_check: now + check_period(None),
        }
    }

    /// A registration: adopts the server's timing (`None` keeps the default
    /// heartbeat and turns fencing off) and counts as contact.
    pub(crate) fn registered(&mut self, heartbeat: Option<Duration>, ttl: Option<Duration>, now: Instant) {
        self.heartbeat = heartbeat.unwrap_or(DEFAULT_HEARTBEAT).max(Duration::from_millis(1));
        self.ttl = ttl;
        self.last_contact = now;
        self.next_heartbeat = Some(now + self.heartbeat);
        self.next_check = now + check_period(ttl);
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub(crate) fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// A message from the server arrived.
    pub(crate) fn contact(&mut self, now: Instant) {
        self.last_contact = now;
    }

    /// The stream is gone: no heartbeats until the next registration.
    pub(crate) fn disconnected(&mut self) {
        self.next_heartbeat = None;
    }

    /// Whether a heartbeat is due now; if so the next one is due one
    /// interval later.
    pub(crate) fn heartbeat_due(&mut self, now: Instant) -> bool {
        match self.next_heartbeat {
            Some(at) if now >= at => {
                self.next_heartbeat = Some(now + self.heartbeat);
                true
            }
            _ => false,
        }
    }

    /// The lease check, when one is due now; `None` otherwise, or when no
    /// TTL was announced.
    pub(crate) fn check(&mut self, now: Instant) -> Option<LeaseCheck> {
        if now < self.next_check {
            return None;
        }
        self.next_check = now + check_period(self.ttl);
        let ttl = self.ttl?;
        let silence = now.saturating_duration_since(self.last_contact);
        let stale_after = (self.heartbeat * 2).max(ttl / 2).min(ttl);
        Some(LeaseCheck { silence, stale: silence >= stale_after, expired: silence >= ttl })
    }

    /// When a heartbeat or a check is next due.
    pub(crate) fn next_wakeup(&self) -> Instant {
        self.next_heartbeat.map_or(self.next_check, |at| at.min(self.next_check))
    }
}

/// How often the lease is checked: often enough that fencing happens close
/// to the TTL, rarely enough to cost nothing.
fn check_period(ttl: Option<Duration>) -> Duration {
    ttl.map_or(Duration::from_secs(1), |ttl| (ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn lease_check_period_is_a_tenth_of_the_lease_within_bounds() {
        assert_eq!(check_period(None), Duration::from_secs(1));
        assert_eq!(check_period(Some(Duration::from_secs(5))), Duration::from_millis(500));
        assert_eq!(check_period(Some(Duration::from_secs(60))), Duration::from_secs(1));
        assert_eq!(check_period(Some(Duration::from_millis(20))), Duration::from_millis(10));
    }

    #[test]
    fn heartbeats_are_due_once_per_interval_and_only_while_connected() {
        let t0 = Instant::now();
        let mut lease = Lease::new(t0);
        assert!(!lease.heartbeat_due(t0 + Duration::from_secs(60)), "not before registration");
        lease.registered(Some(100 * MS), Some(Duration::from_secs(3)), t0);
        assert!(!lease.heartbeat_due(t0 + 99 * MS));
        assert!(lease.heartbeat_due(t0 + 100 * MS));
        assert!(!lease.heartbeat_due(t0 + 150 * MS));
        assert!(lease.heartbeat_due(t0 + 200 * MS));
        assert_eq!(lease.next_wakeup(), t0 + 300 * MS);
        lease.disconnected();
        assert!(!lease.heartbeat_due(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn silence_is_stale_first_then_expires_at_the_ttl() {
        let t0 = Instant::now();
        let mut lease = Lease::new(t0);
        lease.registered(Some(200 * MS), Some(600 * MS), t0);
        // Checked every 60 ms: nothing is due in between.
        assert_eq!(lease.check(t0 + 59 * MS), None);
        let first = lease.check(t0 + 60 * MS);
        assert_eq!(first.map(|c| (c.stale, c.expired)), Some((false, false)));
        // Stale after max(2 × 200, 600 / 2) = 400 ms.
        let stale = lease.check(t0 + 400 * MS);
        assert_eq!(stale.map(|c| (c.stale, c.expired)), Some((true, false)));
        let expired = lease.check(t0 + 600 * MS);
        assert_eq!(expired, Some(LeaseCheck { silence: 600 * MS, stale: true, expired: true }));
    }

    #[test]
    fn contact_restarts_the_silence() {
        let t0 = Instant::now();
        let mut lease = Lease::new(t0);
        lease.registered(Some(100 * MS), Some(Duration::from_secs(1)), t0);
        lease.contact(t0 + 900 * MS);
        let check = lease.check(t0 + Duration::from_secs(1));
        assert_eq!(check.map(|c| (c.silence, c.stale, c.expired)), Some((100 * MS, false, false)));
    }

    #[test]
    fn stale_never_waits_longer_than_the_lease() {
        let t0 = Instant::now();
        let mut lease = Lease::new(t0);
        // A heartbeat longer than the lease: stale at the lease, not 2 × it.
        lease.registered(Some(Duration::from_secs(10)), Some(Duration::from_secs(1)), t0);
        let check = lease.check(t0 + Duration::from_secs(1));
        assert_eq!(check.map(|c| (c.stale, c.expired)), Some((true, true)));
    }

    #[test]
    fn without_a_ttl_nothing_expires() {
        let t0 = Instant::now();
        let mut lease = Lease::new(t0);
        assert_eq!(lease.check(t0 + Duration::from_secs(3600)), None);
        lease.registered(None, None, t0);
        assert_eq!(lease.heartbeat(), DEFAULT_HEARTBEAT);
        assert_eq!(lease.check(t0 + Duration::from_secs(3600)), None);
    }
}
