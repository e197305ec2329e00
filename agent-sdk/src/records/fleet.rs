//! Agents and queues as the server reports them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use super::time::{from_seconds, system_time};
use crate::proto;

/// Whether an agent takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AgentState {
    /// Connected and taking work.
    Connected,
    /// Finishing its work, taking no new work.
    Draining,
    /// Its stream broke; it may still resume within its lease.
    Disconnected,
    /// A value this SDK does not know (or the wire's unspecified 0), kept
    /// as its wire number.
    Unknown(i32),
}

impl AgentState {
    /// The upper-case name ("DRAINING"); `"UNKNOWN"` for an unknown value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "CONNECTED",
            Self::Draining => "DRAINING",
            Self::Disconnected => "DISCONNECTED",
            Self::Unknown(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(value) => write!(f, "UNKNOWN({value})"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl From<i32> for AgentState {
    fn from(value: i32) -> Self {
        match proto::AgentState::try_from(value) {
            Ok(proto::AgentState::Connected) => Self::Connected,
            Ok(proto::AgentState::Draining) => Self::Draining,
            Ok(proto::AgentState::Disconnected) => Self::Disconnected,
            Ok(proto::AgentState::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

/// A connected (or recently connected) agent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentInfo {
    /// Its session id.
    pub id: String,
    /// The name it registered with.
    pub name: String,
    /// The capabilities it advertises.
    pub capabilities: Vec<String>,
    /// Its labels, matched by task selectors.
    pub labels: BTreeMap<String, String>,
    /// How many attempts it runs at once.
    pub slots: u32,
    /// How many of those are in use.
    pub slots_busy: u32,
    /// Whether it takes work.
    pub state: AgentState,
    /// The SDK it runs on.
    pub sdk_version: String,
    /// Where it serves `/metrics`; empty when it does not.
    pub metrics_address: String,
    /// When its session started.
    pub connected_at: Option<SystemTime>,
    /// When the server last heard from it.
    pub last_seen: Option<SystemTime>,
    /// The attempts it holds, as `task_id:attempt`.
    pub running: Vec<String>,
}

impl From<proto::Agent> for AgentInfo {
    fn from(agent: proto::Agent) -> Self {
        Self {
            id: agent.id,
            name: agent.name,
            capabilities: agent.capabilities,
            labels: agent.labels.into_iter().collect(),
            slots: agent.slots,
            slots_busy: agent.slots_busy,
            state: agent.state.into(),
            sdk_version: agent.sdk_version,
            metrics_address: agent.metrics_address,
            connected_at: system_time(agent.connected_at),
            last_seen: system_time(agent.last_seen),
            running: agent.running,
        }
    }
}

/// The server answering, and who leads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// The muster version it runs.
    pub version: String,
    /// Its store: `sled` (one server) or `postgres` (one or more replicas).
    pub store: String,
    /// The gRPC endpoint of the replica that leads (the answering one).
    pub leader: String,
    /// The leader lease's epoch: 0 on sled, one more per takeover.
    pub leader_epoch: i64,
}

impl From<proto::Server> for ServerInfo {
    fn from(s: proto::Server) -> Self {
        Self { version: s.version, store: s.store, leader: s.leader, leader_epoch: s.leader_epoch }
    }
}

/// A queue's settings and load.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// Its name.
    pub name: String,
    /// True when dispatch from it is stopped.
    pub paused: bool,
    /// Its share of dispatch when several queues have waiting work.
    pub weight: u32,
    /// How many of its tasks may run at once; 0 means unlimited.
    pub max_running: u32,
    /// Unfinished tasks per state name (`"QUEUED"`, `"PENDING"`...).
    pub depth: BTreeMap<String, u32>,
    /// How many of its tasks run now.
    pub running: u32,
    /// How long its oldest queued task has waited.
    pub oldest_queued_age: Duration,
}

impl From<proto::Queue> for QueueInfo {
    fn from(queue: proto::Queue) -> Self {
        Self {
            name: queue.name,
            paused: queue.paused,
            weight: queue.weight,
            max_running: queue.max_running,
            depth: queue.depth.into_iter().collect(),
            running: queue.running,
            oldest_queued_age: from_seconds(queue.oldest_queued_age_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_keep_their_fields_and_unknown_states() {
        let wire = proto::Agent {
            id: "a1".to_owned(),
            state: proto::AgentState::Draining.into(),
            labels: [("os".to_owned(), "linux".to_owned())].into(),
            last_seen: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
            running: vec!["t1:2".to_owned()],
            ..Default::default()
        };
        let agent = AgentInfo::from(wire);
        assert_eq!((agent.id.as_str(), agent.state), ("a1", AgentState::Draining));
        assert_eq!(agent.labels.get("os").map(String::as_str), Some("linux"));
        assert_eq!(agent.last_seen, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5)));
        assert_eq!(agent.running, vec!["t1:2".to_owned()]);
        assert_eq!(AgentState::from(0), AgentState::Unknown(0));
        assert_eq!(AgentState::from(17).to_string(), "UNKNOWN(17)");
    }

    #[test]
    fn queue_ages_become_durations() {
        let wire = proto::Queue { name: "q".to_owned(), oldest_queued_age_seconds: 2.5, ..Default::default() };
        let queue = QueueInfo::from(wire);
        assert_eq!(queue.oldest_queued_age, Duration::from_millis(2_500));
        assert_eq!(queue.name, "q");
    }
}
