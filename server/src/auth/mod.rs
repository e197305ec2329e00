//! Who is calling, and what they may do.
//!
//! Every call is made by an [`Identity`]: a bearer token's or a client
//! certificate's name, a [`Role`] and a [`Scope`]. The gate (`gate`)
//! resolves it once per call in front of every service, checks the role
//! against the one table of methods and routes, and hands the identity to
//! the handlers in the request's extensions; the domain applies the scope
//! (which queues a token sees, which capabilities an agent may register).
//!
//! Token secrets are 256 random bits, shown once and stored only as their
//! SHA-256 hash, so a copy of the store does not hold usable credentials.

mod certs;
pub mod gate;
pub(crate) mod tokens;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub(crate) use certs::CertIdentities;
pub(crate) use tokens::{TokenTable, bootstrap};
pub use tokens::{hash_secret, new_secret};

/// What a credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including token management.
    Admin,
    /// The fleet and queues, cancel and retry of any task in scope, and
    /// reading.
    Operator,
    /// Submit, cancel and retry tasks in scope, and reading.
    Submitter,
    /// Only `AgentService.Connect`.
    Agent,
    /// Reading only, metrics included.
    Viewer,
}

impl Role {
    /// Every role, for tables and tests.
    pub const ALL: [Role; 5] = [Role::Admin, Role::Operator, Role::Submitter, Role::Agent, Role::Viewer];

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Agent => "agent",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role holds `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(permission, Read | Manage | Fleet),
            Role::Submitter => matches!(permission, Read | Submit | Manage),
            Role::Agent => matches!(permission, Connect),
            Role::Viewer => matches!(permission, Read),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("role must be one of admin, operator, submitter, agent, viewer, not '{s}'"))
    }
}

/// What a method or route needs. Each role holds a fixed set
/// ([`Role::allows`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read tasks, workflows, logs, agents, queues and metrics.
    Read,
    /// Submit tasks.
    Submit,
    /// Cancel and retry tasks.
    Manage,
    /// Drain and resume agents; pause, resume and configure queues.
    Fleet,
    /// Hold an agent session.
    Connect,
    /// Manage tokens.
    Admin,
}

/// Limits on what an identity reaches; an empty list means no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Scope {
    /// Queues it may submit to and see.
    pub queues: Vec<String>,
    /// Capabilities an agent may register.
    pub capabilities: Vec<String>,
    /// Labels an agent's registration must carry, with these values.
    pub labels: BTreeMap<String, String>,
}

impl Scope {
    /// Whether tasks in `queue` are within reach.
    pub fn sees_queue(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }

    /// `PermissionDenied` naming `queue` unless it is within reach.
    pub fn check_queue(&self, field: &str, queue: &str) -> Result<(), Error> {
        if self.sees_queue(queue) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{field}: queue '{queue}' is outside this credential's scope (queues: {})",
            self.queues.join(", ")
        )))
    }

    /// `PermissionDenied` naming the first capability or label of an agent
    /// registration that the scope does not allow.
    pub fn check_registration(&self, capabilities: &[String], labels: &BTreeMap<String, String>) -> Result<(), Error> {
        if !self.capabilities.is_empty()
            && let Some(outside) = capabilities.iter().find(|c| !self.capabilities.contains(c))
        {
            return Err(Error::PermissionDenied(format!(
                "register.capabilities: capability '{outside}' is outside this credential's scope (capabilities: {})",
                self.capabilities.join(", ")
            )));
        }
        for (key, value) in &self.labels {
            if labels.get(key) != Some(value) {
                return Err(Error::PermissionDenied(format!(
                    "register.labels: this credential requires label {key}={value}"
                )));
            }
        }
        Ok(())
    }
}

/// The caller of one request, as the gate resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's (or certificate mapping's) name; empty for the
    /// anonymous caller of a server without authentication.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its reach.
    pub scope: Scope,
}

impl Identity {
    /// The caller of a server that runs without authentication: an admin
    /// with no name.
    pub fn anonymous() -> Arc<Identity> {
        Arc::new(Identity { name: String::new(), role: Role::Admin, scope: Scope::default() })
    }

    /// The name to record as an actor, if there is one.
    pub fn actor(&self) -> Option<String> {
        (!self.name.is_empty()).then(|| self.name.clone())
    }

    /// The identity of a request, as the gate left it. A request that did
    /// not pass the gate (a unit test calling a handler directly) acts
    /// anonymously.
    pub fn of<T>(request: &tonic::Request<T>) -> Arc<Identity> {
        request.extensions().get::<Arc<Identity>>().cloned().unwrap_or_else(Identity::anonymous)
    }
}

/// Records an operator action in the audit log (target `muster::audit`):
/// who did what to which thing. Never a secret or a payload.
pub(crate) fn audit(identity: &Identity, action: &str, subject: &str) {
    let actor = if identity.name.is_empty() { "anonymous" } else { identity.name.as_str() };
    tracing::info!(target: "muster::audit", actor, role = %identity.role, action, subject, "audit");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_hold_exactly_their_permissions() {
        use Permission::*;
        let all = [Read, Submit, Manage, Fleet, Connect, Admin];
        let held = |role: Role| all.into_iter().filter(|p| role.allows(*p)).collect::<Vec<_>>();
        assert_eq!(held(Role::Admin), all);
        assert_eq!(held(Role::Operator), [Read, Manage, Fleet]);
        assert_eq!(held(Role::Submitter), [Read, Submit, Manage]);
        assert_eq!(held(Role::Agent), [Connect]);
        assert_eq!(held(Role::Viewer), [Read]);
    }

    #[test]
    fn roles_parse_from_their_names() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn scopes_limit_queues_capabilities_and_labels() {
        let open = Scope::default();
        assert!(open.sees_queue("anything"));
        let scope = Scope {
            queues: vec!["reports".into()],
            capabilities: vec!["capA".into()],
            labels: BTreeMap::from([("team".into(), "blue".into())]),
        };
        assert!(scope.sees_queue("reports") && !scope.sees_queue("default"));
        let err = scope.check_queue("tasks[0].queue", "default").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("tasks[0].queue") && err.contains("'default'"), "{err}");
        let blue = BTreeMap::from([("team".to_owned(), "blue".to_owned())]);
        assert!(scope.check_registration(&["capA".into()], &blue).is_ok());
        let err = scope.check_registration(&["capA".into(), "capB".into()], &blue).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("'capB'")));
        assert!(scope.check_registration(&["capA".into()], &BTreeMap::new()).is_err(), "the label is required");
    }
}
