//! Property tests that fuzz what the server takes from outside: stored
//! records (`codec`), task specs and agent messages from the wire, whole
//! workflows included (`wire`), and sequences of agent-session messages
//! into the scheduler and the log hub (`session`) and into a real agent
//! session over gRPC (`grpc`). Each property is that
//! nothing panics and bad input is refused with the right error, plus the
//! invariants named in each test.
//!
//! The default case counts keep the suite to a few seconds under
//! `cargo test`; `scripts/fuzz.sh` runs it with many more cases
//! (`PROPTEST_CASES`). Failing inputs proptest finds are kept under
//! `server/proptest-regressions/fuzz/` and replayed first.

mod codec;
mod grpc;
mod session;
mod wire;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` unless `PROPTEST_CASES` asks for another count.
fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// Text of every kind a client can send: empty, plain names, long runs,
/// control characters and any Unicode.
fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[a-z][a-z0-9._:/-]{0,12}",
        proptest::collection::vec(any::<char>(), 0..=max).prop_map(|chars| chars.into_iter().collect()),
        (1..=max).prop_map(|n| "a".repeat(n)),
    ]
    .boxed()
}

/// Integers at and around their edges, and anything.
fn edgy_i64() -> BoxedStrategy<i64> {
    prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0i64), Just(-1i64), -100i64..100_000_000, any::<i64>()].boxed()
}

fn edgy_i32() -> BoxedStrategy<i32> {
    prop_oneof![
        Just(i32::MIN),
        Just(i32::MAX),
        Just(-1i32),
        Just(999_999_999i32),
        Just(1_000_000_000i32),
        0..1_000_000_000i32,
        any::<i32>()
    ]
    .boxed()
}

fn edgy_u32() -> BoxedStrategy<u32> {
    prop_oneof![Just(0u32), Just(1u32), Just(u32::MAX), 0u32..200, any::<u32>()].boxed()
}

fn edgy_u64() -> BoxedStrategy<u64> {
    prop_oneof![Just(0u64), Just(u64::MAX), Just(1u64 << 40), 0u64..10_000, any::<u64>()].boxed()
}

fn edgy_f64() -> BoxedStrategy<f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(1.0),
        Just(100.0),
        Just(100.000_001),
        Just(f64::MIN_POSITIVE),
        Just(f64::MAX),
        any::<f64>(),
    ]
    .boxed()
}

/// A wire duration anywhere, canonical or not.
fn pb_duration() -> BoxedStrategy<Option<prost_types::Duration>> {
    proptest::option::of((edgy_i64(), edgy_i32()).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }))
        .boxed()
}

/// A wire timestamp anywhere, around now included.
fn pb_timestamp() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let seconds = prop_oneof![edgy_i64(), (now - 1000)..(now + 2 * 365 * 24 * 3600)];
    proptest::option::of((seconds, edgy_i32()).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }))
        .boxed()
}

/// A domain duration anywhere a `Duration` can be.
fn duration() -> BoxedStrategy<Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..1_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
    .boxed()
}

/// The scheduler core over a real in-memory store, driven the way the
/// driver drives it (commands, then timers, dispatch, the outbox written
/// and its effects performed), with the log hub beside it. Time is a
/// number the test advances.
struct Harness {
    core: crate::scheduler::engine::Core,
    store: std::sync::Arc<crate::store::MemoryStore>,
    logs: std::sync::Arc<crate::logs::LogHub>,
    /// Kept open so the hub can report ended attempts.
    _ended: tokio::sync::mpsc::UnboundedReceiver<crate::logs::Ended>,
    config: std::sync::Arc<crate::config::ServerConfig>,
    now: tokio::time::Instant,
}

impl Harness {
    fn new(config: crate::config::ServerConfig) -> Self {
        let config = std::sync::Arc::new(config);
        let store = std::sync::Arc::new(crate::store::MemoryStore::new());
        let now = tokio::time::Instant::now();
        let core = crate::scheduler::engine::Core::recover(config.clone(), store.clone(), now).expect("recover");
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let (logs, ended) = crate::logs::LogHub::new(store.clone(), &config.limits, metrics);
        Self { core, store, logs: std::sync::Arc::new(logs), _ended: ended, config, now }
    }

    /// One turn of the driver: timers, dispatch, the outbox written, then
    /// its effects.
    fn settle(&mut self) {
        use crate::store::Store;
        self.core.fire_timers(self.now);
        self.core.dispatch(self.now);
        let out = self.core.take_outbox();
        self.store.write(&out.writes).expect("the memory store writes");
        for effect in out.effects {
            match effect {
                crate::scheduler::Effect::Reply(reply) => reply(),
                crate::scheduler::Effect::Send(tx, message) => {
                    let _ = tx.send(message);
                }
                crate::scheduler::Effect::Publish(event) => self.logs.note_event(&event),
            }
        }
    }

    fn handle(&mut self, command: crate::scheduler::Command) {
        self.core.handle(command, self.now);
        self.settle();
    }

    fn call<T>(
        &mut self,
        make: impl FnOnce(crate::scheduler::Reply<T>) -> crate::scheduler::Command,
    ) -> Result<T, crate::error::Error> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.handle(make(tx));
        rx.try_recv().expect("a reply after settling")
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.settle();
    }
}
