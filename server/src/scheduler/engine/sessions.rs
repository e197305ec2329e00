//! Agent sessions: every agent that is connected or may still resume, found
//! by id or by resume token, and the idle index of those with a free slot.
//!
//! Invariants:
//! - An agent is in the idle index (under each of its capabilities, at its
//!   `stamp`) exactly when it is connected, not draining and holds fewer
//!   attempts than its slots. Every method that changes one of those
//!   re-files the agent, so callers never touch the index.
//! - The token map and the session map hold the same agents.
//! - A session's `conn` is unique per registration, so messages of a stream
//!   that was replaced are recognised and ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rustc_hash::FxHashMap;
use tokio::time::Instant;

use crate::model::*;
use crate::scheduler::AgentTx;

/// One agent's session: its durable record and what the scheduler knows
/// of its connection and work.
#[derive(Debug)]
pub(super) struct AgentSession {
    pub(super) record: AgentRecord,
    /// The stream to the agent, while connected.
    tx: Option<AgentTx>,
    /// The registration this session belongs to.
    conn: u64,
    pub(super) last_seen: Instant,
    pub(super) disconnected_at: Option<Instant>,
    /// The attempts it holds.
    pub(super) held: BTreeSet<(TaskId, u32)>,
    /// Position in the idle index while it has a free slot.
    stamp: Option<u64>,
}

impl AgentSession {
    pub(super) fn state(&self) -> AgentState {
        match (&self.tx, self.record.draining) {
            (None, _) => AgentState::Disconnected,
            (Some(_), true) => AgentState::Draining,
            (Some(_), false) => AgentState::Connected,
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.tx.is_some()
    }

    /// Connected, not draining, with a free slot.
    pub(super) fn can_take_work(&self) -> bool {
        self.tx.is_some() && !self.record.draining && self.busy() < self.record.slots
    }

    pub(super) fn busy(&self) -> u32 {
        u32::try_from(self.held.len()).unwrap_or(u32::MAX)
    }

    pub(super) fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.record.labels.get(k) == Some(v))
    }
}

/// The sessions and their idle index.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    /// By the server's own ULIDs, so a fast unkeyed hash is safe.
    agents: FxHashMap<AgentId, AgentSession>,
    by_token: HashMap<String, AgentId>,
    /// Agents with a free slot, per capability, least recently used first.
    idle: HashMap<String, BTreeMap<u64, AgentId>>,
    next_stamp: u64,
    next_conn: u64,
}

impl Sessions {
    /// A recovered agent: known from the store, not connected until it
    /// resumes.
    pub(super) fn recovered(&mut self, record: AgentRecord, now: Instant) {
        self.by_token.insert(record.resume_token.clone(), record.id);
        let session = AgentSession {
            record,
            tx: None,
            conn: 0,
            last_seen: now,
            disconnected_at: Some(now),
            held: BTreeSet::new(),
            stamp: None,
        };
        self.agents.insert(session.record.id, session);
    }

    /// A number for a new registration.
    pub(super) fn next_conn(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    /// The agent that `token` resumes, if it exists and was opened with the
    /// same credential.
    pub(super) fn resumable(&self, token: &str, identity: &str) -> Option<AgentId> {
        self.by_token
            .get(token)
            .copied()
            .filter(|id| self.agents.get(id).is_some_and(|s| s.record.identity == identity))
    }

    /// Attaches a new stream to an existing session.
    pub(super) fn reconnect(
        &mut self,
        agent: AgentId,
        tx: AgentTx,
        conn: u64,
        now: Instant,
    ) -> Option<&mut AgentSession> {
        self.unidle(agent);
        let session = self.agents.get_mut(&agent)?;
        session.tx = Some(tx);
        session.conn = conn;
        session.last_seen = now;
        session.disconnected_at = None;
        Some(session)
    }

    /// A new session for a first registration.
    pub(super) fn open(&mut self, record: AgentRecord, tx: AgentTx, conn: u64, now: Instant) {
        self.by_token.insert(record.resume_token.clone(), record.id);
        let session = AgentSession {
            record,
            tx: Some(tx),
            conn,
            last_seen: now,
            disconnected_at: None,
            held: BTreeSet::new(),
            stamp: None,
        };
        self.agents.insert(session.record.id, session);
    }

    /// Notes that the agent's current stream spoke; false for a stream that
    /// was replaced (or an unknown agent), whose messages are ignored.
    pub(super) fn heard(&mut self, agent: AgentId, conn: u64, now: Instant) -> bool {
        match self.agents.get_mut(&agent) {
            Some(session) if session.conn == conn => {
                session.last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// Detaches the stream `conn`; the session may resume within its lease.
    pub(super) fn disconnect(&mut self, agent: AgentId, conn: u64, now: Instant) -> Option<&AgentSession> {
        if self.agents.get(&agent)?.conn != conn {
            return None;
        }
        self.unidle(agent);
        let session = self.agents.get_mut(&agent)?;
        session.tx = None;
        session.disconnected_at = Some(now);
        Some(session)
    }

    /// Forgets the agent (its lease ran out).
    pub(super) fn remove(&mut self, agent: AgentId) -> Option<AgentSession> {
        self.unidle(agent);
        let session = self.agents.remove(&agent)?;
        self.by_token.remove(&session.record.resume_token);
        Some(session)
    }

    pub(super) fn get(&self, agent: AgentId) -> Option<&AgentSession> {
        self.agents.get(&agent)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &AgentSession> {
        self.agents.values()
    }

    pub(super) fn len(&self) -> usize {
        self.agents.len()
    }

    /// The agent's stream, while it is connected.
    pub(super) fn tx(&self, agent: AgentId) -> Option<AgentTx> {
        self.agents.get(&agent).and_then(|s| s.tx.clone())
    }

    /// Changes the agent's durable record; `None` for an unknown agent.
    pub(super) fn update_record(
        &mut self,
        agent: AgentId,
        change: impl FnOnce(&mut AgentRecord),
    ) -> Option<&AgentRecord> {
        // Out of the index first: the change may touch its capabilities.
        self.unidle(agent);
        change(&mut self.agents.get_mut(&agent)?.record);
        self.refile(agent);
        self.agents.get(&agent).map(|s| &s.record)
    }

    /// Records that the agent holds `attempt`; true if it still has a free
    /// slot.
    pub(super) fn hold(&mut self, agent: AgentId, attempt: (TaskId, u32)) -> bool {
        if let Some(session) = self.agents.get_mut(&agent) {
            session.held.insert(attempt);
        }
        self.refile(agent)
    }

    /// Records that the agent no longer holds `attempt`; true if it now
    /// has a free slot.
    pub(super) fn release(&mut self, agent: AgentId, attempt: (TaskId, u32)) -> bool {
        if let Some(session) = self.agents.get_mut(&agent) {
            session.held.remove(&attempt);
        }
        self.refile(agent)
    }

    /// Puts the agent at the back of the idle index if it can take work;
    /// returns whether it can.
    pub(super) fn refile(&mut self, agent: AgentId) -> bool {
        self.unidle(agent);
        let Some(session) = self.agents.get_mut(&agent) else { return false };
        if !session.can_take_work() {
            return false;
        }
        self.next_stamp += 1;
        session.stamp = Some(self.next_stamp);
        for capability in &session.record.capabilities {
            self.idle.entry(capability.clone()).or_default().insert(self.next_stamp, agent);
        }
        true
    }

    fn unidle(&mut self, agent: AgentId) {
        let Some(session) = self.agents.get_mut(&agent) else { return };
        if let Some(stamp) = session.stamp.take() {
            for capability in &session.record.capabilities {
                if let Some(idle) = self.idle.get_mut(capability) {
                    idle.remove(&stamp);
                }
            }
        }
    }

    /// The least recently used idle agent with `capability` whose labels
    /// match `selector`.
    pub(super) fn find_idle(&self, capability: &str, selector: &BTreeMap<String, String>) -> Option<AgentId> {
        let idle = self.idle.get(capability)?;
        idle.values().copied().find(|id| self.agents.get(id).is_some_and(|s| s.matches(selector)))
    }

    /// True when no agent has a free slot.
    pub(super) fn none_idle(&self) -> bool {
        self.idle.values().all(BTreeMap::is_empty)
    }

    /// The connected agents opened with the credential `identity`.
    pub(super) fn connected_with(&self, identity: &str) -> Vec<AgentId> {
        self.agents.values().filter(|s| s.tx.is_some() && s.record.identity == identity).map(|s| s.record.id).collect()
    }
}
