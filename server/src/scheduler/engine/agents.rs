//! Agents joining, resuming, leaving and being lost: the session rules
//! that touch tasks (a lost agent's attempts fail, a resumed one keeps
//! what both sides agree it holds).

use std::collections::BTreeSet;

use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use ulid::Ulid;

use super::sessions::AgentSession;
use super::{Core, agent_not_found};
use crate::error::Error;
use crate::model::*;
use crate::scheduler::timers::{Timer, later};
use crate::scheduler::{AgentTx, ToAgent};
use crate::store::Write;

impl Core {
    /// Opens a session, or resumes the one the registration's token names
    /// (opened with the same credential). On a resume, attempts the agent
    /// claims but the server does not know are dropped, and attempts the
    /// server knows but the agent lost are offered again (if never
    /// accepted) or failed.
    pub(super) fn register(&mut self, reg: Registration, tx: AgentTx, now: Instant) -> (AgentId, u64) {
        let conn = self.sessions.next_conn();
        let claimed: BTreeSet<(TaskId, u32)> = reg.held_attempts.iter().copied().collect();
        let resumed = reg.resume_token.as_deref().and_then(|t| self.sessions.resumable(t, &reg.identity));
        let (agent_id, resume_token, dropped, missing) =
            match resumed.and_then(|id| self.sessions.reconnect(id, tx.clone(), conn, now)) {
                Some(session) => {
                    let dropped: Vec<_> = claimed.difference(&session.held).copied().collect();
                    let missing: Vec<_> = session.held.difference(&claimed).copied().collect();
                    let record = &mut session.record;
                    record.name = reg.name;
                    record.capabilities = reg.capabilities;
                    record.labels = reg.labels;
                    record.slots = reg.slots;
                    record.sdk_version = reg.sdk_version;
                    record.metrics_address = reg.metrics_address;
                    info!(agent = %record.id, name = %record.name, "agent resumed its session");
                    self.journal.write(Write::Agent(record.clone()));
                    (record.id, record.resume_token.clone(), dropped, missing)
                }
                None => {
                    let agent_id = AgentId(Ulid::new());
                    let resume_token = format!("{:032x}", rand::thread_rng().r#gen::<u128>());
                    let record = AgentRecord {
                        id: agent_id,
                        name: reg.name,
                        resume_token: resume_token.clone(),
                        capabilities: reg.capabilities,
                        labels: reg.labels,
                        slots: reg.slots,
                        draining: false,
                        sdk_version: reg.sdk_version,
                        metrics_address: reg.metrics_address,
                        connected_at: self.journal.clock.ms(now),
                        identity: reg.identity,
                    };
                    info!(agent = %agent_id, name = %record.name, slots = record.slots, "agent registered");
                    self.journal.write(Write::Agent(record.clone()));
                    self.timers.add(later(now, self.config.lease_ttl), Timer::Lease(agent_id));
                    self.sessions.open(record, tx.clone(), conn, now);
                    (agent_id, resume_token, claimed.into_iter().collect(), Vec::new())
                }
            };
        let registered = ToAgent::Registered {
            agent_id,
            resume_token,
            resumed: resumed.is_some(),
            heartbeat_interval: self.config.heartbeat_interval,
            lease_ttl: self.config.lease_ttl,
            dropped,
        };
        self.journal.send(Some(tx), registered);
        for (id, attempt) in missing {
            // An assignment lost in transit is offered again; a running
            // attempt the agent no longer has is lost.
            match self.tasks.get(&id) {
                Some(live) if live.task.state == TaskState::Assigned => {
                    debug!(task = %id, attempt, "re-sending an assignment the agent did not receive");
                    let assign = ToAgent::Assign(Box::new(live.task.clone()), live.parents.clone());
                    self.journal.send(self.sessions.tx(agent_id), assign);
                }
                _ => {
                    let failure = Failure::new(reason::AGENT_LOST, "the agent resumed without this attempt", true);
                    self.fail_attempt(id, attempt, failure, now);
                }
            }
        }
        if self.sessions.refile(agent_id) {
            self.dispatch_pending = true;
        }
        (agent_id, conn)
    }

    /// Closes every connected session opened with the credential `name`
    /// (it was revoked); their attempts follow the lease rules.
    pub(super) fn close_sessions_of(&mut self, name: &str) {
        for agent in self.sessions.connected_with(name) {
            warn!(agent = %agent, token = name, "closing a session whose token was revoked");
            let error = Error::Unauthenticated(format!("token '{name}' has been revoked"));
            self.journal.send(self.sessions.tx(agent), ToAgent::Close(error));
        }
    }

    pub(super) fn disconnected(&mut self, agent: AgentId, conn: u64, now: Instant) {
        if let Some(session) = self.sessions.disconnect(agent, conn, now) {
            info!(agent = %agent, held = session.held.len(), "agent disconnected; it may resume within its lease");
        }
    }

    /// Ends the session of an agent not heard from for the lease TTL; its
    /// attempts fail as `agent_lost` and follow their retry policy.
    pub(super) fn check_lease(&mut self, agent: AgentId, now: Instant) {
        let Some(session) = self.sessions.get(agent) else { return };
        let deadline = later(session.disconnected_at.unwrap_or(session.last_seen), self.config.lease_ttl);
        if now < deadline {
            self.timers.add(deadline, Timer::Lease(agent));
            return;
        }
        let tx = self.sessions.tx(agent);
        let Some(session) = self.sessions.remove(agent) else { return };
        self.journal.write(Write::RemoveAgent(agent));
        let ttl = humantime::format_duration(self.config.lease_ttl);
        let error = Error::Unavailable(format!("lease expired: nothing heard from the agent for {ttl}"));
        self.journal.send(tx, ToAgent::Close(error));
        if !session.held.is_empty() {
            warn!(agent = %agent, name = %session.record.name, attempts = session.held.len(), "agent lost");
        }
        for (id, attempt) in session.held {
            let message = format!("agent {} ({agent}) was not heard from for {ttl}", session.record.name);
            self.fail_attempt(id, attempt, Failure::new(reason::AGENT_LOST, message, true), now);
        }
    }

    pub(super) fn set_draining(&mut self, id: AgentId, draining: bool) -> Result<AgentInfo, Error> {
        let session = self.sessions.get(id).ok_or_else(|| agent_not_found(id))?;
        if session.record.draining != draining {
            if let Some(record) = self.sessions.update_record(id, |r| r.draining = draining) {
                self.journal.write(Write::Agent(record.clone()));
            }
            self.journal.send(self.sessions.tx(id), ToAgent::Drain(draining));
            self.dispatch_pending = true;
        }
        self.agent_info(id)
    }

    pub(super) fn agent_info(&self, id: AgentId) -> Result<AgentInfo, Error> {
        self.sessions.get(id).map(|s| self.info_of(s)).ok_or_else(|| agent_not_found(id))
    }

    /// Every session, with `capability` when given, by id.
    pub(super) fn list_agents(&self, capability: Option<&str>) -> Vec<AgentInfo> {
        let mut agents: Vec<AgentInfo> = self
            .sessions
            .iter()
            .filter(|s| capability.is_none_or(|c| s.record.capabilities.iter().any(|have| have == c)))
            .map(|s| self.info_of(s))
            .collect();
        agents.sort_by_key(|a| a.record.id);
        agents
    }

    fn info_of(&self, session: &AgentSession) -> AgentInfo {
        AgentInfo {
            record: session.record.clone(),
            state: session.state(),
            running: session.held.iter().copied().collect(),
            last_seen: self.journal.clock.ms(session.last_seen),
        }
    }
}
