//! Agents and tokens: registrations, sessions as operators see them,
//! what agents report, and stored credentials.
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::*;

/// A registered agent, persisted so sessions can resume across a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Its self-chosen name.
    pub name: String,
    /// The secret that resumes the session.
    pub resume_token: String,
    /// What it can run.
    pub capabilities: Vec<String>,
    /// Its labels, matched by selectors.
    pub labels: BTreeMap<String, String>,
    /// How many attempts it runs at once.
    pub slots: u32,
    /// No new work is assigned while set.
    pub draining: bool,
    /// The SDK version it reported.
    pub sdk_version: String,
    /// Where its metrics are served.
    pub metrics_address: String,
    /// When it first registered.
    pub connected_at: Millis,
    /// The credential it registered with (a token's name; empty without
    /// authentication). Only the same credential may resume the session,
    /// and revoking it closes the session.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// What an agent sends at the start of a session, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// Human-readable name.
    pub name: String,
    /// Capabilities, deduplicated.
    pub capabilities: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Slot count.
    pub slots: u32,
    /// SDK version.
    pub sdk_version: String,
    /// Token of the session to resume, if any.
    pub resume_token: Option<String>,
    /// Attempts the agent still holds.
    pub held_attempts: Vec<(TaskId, u32)>,
    /// Its metrics endpoint.
    pub metrics_address: String,
    /// The credential the session was opened with (empty without
    /// authentication).
    pub identity: String,
}

/// Reports an agent sends during a session.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentReport {
    /// The agent started the attempt.
    Accept(TaskId, u32),
    /// Progress of a running attempt.
    Progress(TaskId, u32, u32, String),
    /// Liveness.
    Heartbeat,
    /// The attempt succeeded.
    Complete(TaskId, u32, Bytes, String),
    /// The attempt failed.
    Fail(TaskId, u32, Failure),
    /// The agent drains itself.
    DrainSelf,
}

/// The state of an agent session, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Connected and taking work.
    Connected,
    /// Connected, taking no new work.
    Draining,
    /// Stream broken; may resume within its lease.
    Disconnected,
}

/// An agent as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInfo {
    /// Its persisted registration.
    pub record: AgentRecord,
    /// Session state.
    pub state: AgentState,
    /// Attempts held.
    pub running: Vec<(TaskId, u32)>,
    /// When the server last heard from it.
    pub last_seen: Millis,
}

/// A bearer token as stored: its secret only as a hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Unique name; the actor recorded for what the token does.
    pub name: String,
    /// What it may do.
    pub role: crate::auth::Role,
    /// What it reaches.
    pub scope: crate::auth::Scope,
    /// SHA-256 of the secret.
    #[serde(with = "serde_bytes")]
    pub secret_hash: Vec<u8>,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry, if any.
    pub expires_at: Option<Millis>,
    /// Revocation time, once revoked.
    pub revoked_at: Option<Millis>,
    /// The token name of its creator.
    pub created_by: String,
}
