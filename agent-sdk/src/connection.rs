//! [`Connection`]: where and when the agent dials, as a state machine
//! driven by explicit instants. The dialling itself is `connect.rs`'s.
//!
//! Invariants:
//! - At most one stream is open or being opened at a time.
//! - After a failure or a lost stream the next dial waits a jittered
//!   backoff (full jitter below `initial × 2^failures`, capped at `max`),
//!   except towards a leader a follower named, which is dialled at once; at
//!   most `MAX_REDIRECTS` redirects are followed in a row, so two servers
//!   that each name the other cannot spin the agent.
//! - The endpoint of the last stream is tried first after losing it (it may
//!   be a leader found through a redirect, absent from the list); a failure
//!   there moves on to the list, which is tried in turn.
//! - Before the first registration, a refusal retrying cannot fix (a bad
//!   name, a limit, missing or insufficient credentials) stops the agent;
//!   after it, every failure is retried.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;
use tonic::Code;

use crate::Error;
use crate::backoff::backoff_delay;

/// Consecutive redirects followed without backoff.
const MAX_REDIRECTS: u32 = 3;

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    /// Nothing open; dial at the next chance.
    Idle,
    /// Waiting out the backoff until then.
    Backoff(Instant),
    /// Opening a stream to this endpoint.
    Dialing(String),
    /// Registered on a stream to this endpoint.
    Connected(String),
}

/// What to do after a failed dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DialVerdict {
    /// Give up: the first registration was refused.
    Stop,
    /// Dial again after `delay`.
    Retry { delay: Duration },
}

/// The dialling state of one agent.
#[derive(Debug)]
pub(crate) struct Connection {
    /// Normalised endpoints, tried in order.
    endpoints: Vec<String>,
    backoff_initial: Duration,
    backoff_max: Duration,
    rng: StdRng,
    link: Link,
    /// Failed dials since the last registration.
    failures: u32,
    endpoint_index: usize,
    /// The endpoint of the last stream, tried first after losing it.
    preferred: Option<String>,
    /// A leader a follower named, dialled next.
    redirect: Option<String>,
    redirects_in_row: u32,
    has_registered: bool,
}

impl Connection {
    pub(crate) fn new(endpoints: Vec<String>, backoff_initial: Duration, backoff_max: Duration) -> Self {
        Self::with_rng(endpoints, backoff_initial, backoff_max, StdRng::from_entropy())
    }

    /// Like [`new`](Self::new) with a given random source, so tests can
    /// seed the jitter.
    pub(crate) fn with_rng(
        endpoints: Vec<String>,
        backoff_initial: Duration,
        backoff_max: Duration,
        rng: StdRng,
    ) -> Self {
        Self {
            endpoints,
            backoff_initial,
            backoff_max,
            rng,
            link: Link::Idle,
            failures: 0,
            endpoint_index: 0,
            preferred: None,
            redirect: None,
            redirects_in_row: 0,
            has_registered: false,
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        matches!(self.link, Link::Connected(_))
    }

    /// Failed dials since the last registration.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The endpoint being dialled or connected to, for logs.
    pub(crate) fn endpoint(&self) -> &str {
        match &self.link {
            Link::Dialing(endpoint) | Link::Connected(endpoint) => endpoint,
            Link::Idle | Link::Backoff(_) => "",
        }
    }

    /// When the backoff ends, while waiting it out.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        match self.link {
            Link::Backoff(at) => Some(at),
            _ => None,
        }
    }

    /// The endpoint to dial now, if a dial is due: the redirect target,
    /// else the last stream's endpoint, else the current one of the list.
    pub(crate) fn dial(&mut self, now: Instant) -> Option<String> {
        match self.link {
            Link::Idle => {}
            Link::Backoff(at) if now >= at => {}
            Link::Backoff(_) | Link::Dialing(_) | Link::Connected(_) => return None,
        }
        let endpoint = match self.redirect.take().or_else(|| self.preferred.clone()) {
            Some(endpoint) => endpoint,
            None => {
                let index = self.endpoint_index % self.endpoints.len().max(1);
                self.endpoints.get(index)?.clone()
            }
        };
        self.link = Link::Dialing(endpoint.clone());
        Some(endpoint)
    }

    /// The dial failed with `error`; `redirect` is the leader a follower
    /// named, if any.
    pub(crate) fn dial_failed(&mut self, error: &Error, redirect: Option<String>, now: Instant) -> DialVerdict {
        if !self.has_registered && is_refusal(error) {
            self.link = Link::Idle;
            return DialVerdict::Stop;
        }
        self.failures = self.failures.saturating_add(1);
        self.preferred = None;
        match redirect {
            Some(leader) if self.redirects_in_row < MAX_REDIRECTS => {
                self.redirects_in_row += 1;
                self.redirect = Some(leader);
            }
            _ => {
                self.redirects_in_row = 0;
                self.endpoint_index = self.endpoint_index.wrapping_add(1);
            }
        }
        DialVerdict::Retry { delay: self.back_off(now) }
    }

    /// The dial succeeded and the server registered the agent; returns
    /// whether this was a re-registration.
    pub(crate) fn registered(&mut self) -> bool {
        let again = self.has_registered;
        self.failures = 0;
        self.redirects_in_row = 0;
        self.has_registered = true;
        let endpoint = match std::mem::replace(&mut self.link, Link::Idle) {
            Link::Dialing(endpoint) | Link::Connected(endpoint) => endpoint,
            Link::Idle | Link::Backoff(_) => String::new(),
        };
        self.preferred = Some(endpoint.clone());
        self.link = Link::Connected(endpoint);
        again
    }

    /// The stream is gone; `redirect` is a leader named in its closing
    /// status. Returns the backoff before the next dial, or `None` when no
    /// stream was open.
    pub(crate) fn lost(&mut self, redirect: Option<String>, now: Instant) -> Option<Duration> {
        if !self.is_connected() {
            return None;
        }
        if redirect.is_some() {
            self.redirect = redirect;
        }
        Some(self.back_off(now))
    }

    /// Waits before the next dial: not at all towards a redirect target.
    fn back_off(&mut self, now: Instant) -> Duration {
        let delay = if self.redirect.is_some() {
            Duration::ZERO
        } else {
            backoff_delay(self.failures, self.backoff_initial, self.backoff_max, &mut self.rng)
        };
        self.link = Link::Backoff(now + delay);
        delay
    }
}

/// Whether a failed first registration should stop the agent rather than be
/// retried: the server understood the request and refused it (a bad name, a
/// limit such as `max_agent_slots`, missing credentials).
fn is_refusal(error: &Error) -> bool {
    match error {
        Error::Status(status) => {
            matches!(
                status.code(),
                Code::InvalidArgument | Code::ResourceExhausted | Code::Unauthenticated | Code::PermissionDenied
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;
    use crate::backoff::backoff_ceiling;

    const INITIAL: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn make_connection(endpoints: &[&str]) -> Connection {
        let endpoints = endpoints.iter().map(|e| (*e).to_owned()).collect();
        Connection::with_rng(endpoints, INITIAL, MAX, StdRng::seed_from_u64(3))
    }

    fn unavailable() -> Error {
        Error::Status(Status::unavailable("down"))
    }

    fn retry_delay(verdict: DialVerdict) -> Duration {
        match verdict {
            DialVerdict::Retry { delay } => delay,
            DialVerdict::Stop => panic!("expected a retry"),
        }
    }

    #[test]
    fn refusals_are_only_client_side_errors() {
        assert!(is_refusal(&Error::Status(Status::invalid_argument("bad name"))));
        assert!(!is_refusal(&Error::Status(Status::unavailable("starting"))));
        assert!(!is_refusal(&Error::Protocol("timeout".to_owned())));
    }

    #[test]
    fn one_dial_at_a_time_and_none_during_backoff() {
        let t0 = Instant::now();
        let mut connection = make_connection(&["http://a", "http://b"]);
        assert_eq!(connection.dial(t0).as_deref(), Some("http://a"));
        assert_eq!(connection.dial(t0), None, "already dialling");
        let delay = retry_delay(connection.dial_failed(&unavailable(), None, t0));
        assert!(delay <= backoff_ceiling(1, INITIAL, MAX));
        assert_eq!(connection.next_wakeup(), Some(t0 + delay));
        if !delay.is_zero() {
            assert_eq!(connection.dial(t0), None, "waiting out the backoff");
        }
        assert_eq!(connection.dial(t0 + delay).as_deref(), Some("http://b"), "the next endpoint of the list");
    }

    #[test]
    fn backoff_ceiling_doubles_with_each_failure_and_resets_at_registration() {
        let t0 = Instant::now();
        let mut connection = make_connection(&["http://a"]);
        let mut now = t0;
        for failures in 1..=8 {
            assert!(connection.dial(now).is_some());
            let delay = retry_delay(connection.dial_failed(&unavailable(), None, now));
            assert!(delay <= backoff_ceiling(failures, INITIAL, MAX), "failure {failures}: {delay:?}");
            now += delay;
        }
        assert_eq!(connection.failures(), 8);
        assert!(connection.dial(now).is_some());
        assert!(!connection.registered(), "the first registration");
        assert_eq!(connection.failures(), 0);
        assert!(connection.is_connected());
        let delay = connection.lost(None, now);
        assert!(delay.is_some_and(|d| d <= INITIAL), "{delay:?}");
    }

    #[test]
    fn first_registration_refused_stops_later_refusals_are_retried() {
        let t0 = Instant::now();
        let refused = Error::Status(Status::unauthenticated("no token"));
        let mut connection = make_connection(&["http://a"]);
        connection.dial(t0);
        assert_eq!(connection.dial_failed(&refused, None, t0), DialVerdict::Stop);

        let mut connection = make_connection(&["http://a"]);
        connection.dial(t0);
        connection.registered();
        connection.lost(None, t0);
        connection.dial(t0 + MAX);
        assert!(matches!(connection.dial_failed(&refused, None, t0 + MAX), DialVerdict::Retry { .. }));
    }

    #[test]
    fn a_redirect_is_dialled_at_once_but_not_forever() {
        let t0 = Instant::now();
        let mut connection = make_connection(&["http://follower"]);
        connection.dial(t0);
        for _ in 0..MAX_REDIRECTS {
            let leader = Some("http://leader".to_owned());
            assert_eq!(retry_delay(connection.dial_failed(&unavailable(), leader, t0)), Duration::ZERO);
            assert_eq!(connection.dial(t0).as_deref(), Some("http://leader"));
        }
        // A fourth redirect in a row is ignored: back off, then the list.
        let delay = retry_delay(connection.dial_failed(&unavailable(), Some("http://leader".to_owned()), t0));
        assert_eq!(connection.dial(t0 + delay).as_deref(), Some("http://follower"));
    }

    #[test]
    fn the_last_streams_endpoint_is_tried_first_after_losing_it() {
        let t0 = Instant::now();
        let mut connection = make_connection(&["http://a", "http://b"]);
        connection.dial(t0);
        connection.dial_failed(&unavailable(), Some("http://leader".to_owned()), t0);
        assert_eq!(connection.dial(t0).as_deref(), Some("http://leader"));
        connection.registered();
        assert_eq!(connection.endpoint(), "http://leader");
        let delay = connection.lost(None, t0).unwrap_or_default();
        assert!(!connection.is_connected());
        assert_eq!(connection.dial(t0 + delay).as_deref(), Some("http://leader"));
        // It failed: on to the next endpoint of the list.
        let delay = retry_delay(connection.dial_failed(&unavailable(), None, t0 + delay));
        assert_eq!(connection.dial(t0 + INITIAL * 4 + delay).as_deref(), Some("http://b"));
    }

    #[test]
    fn a_lost_stream_naming_a_leader_redials_at_once() {
        let t0 = Instant::now();
        let mut connection = make_connection(&["http://a"]);
        connection.dial(t0);
        connection.registered();
        assert_eq!(connection.lost(Some("http://leader".to_owned()), t0), Some(Duration::ZERO));
        assert_eq!(connection.dial(t0).as_deref(), Some("http://leader"));
        assert_eq!(connection.lost(None, t0), None, "nothing was open");
    }
}
