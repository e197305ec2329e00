//! Tokens as the admin service reports them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use super::time::system_time;
use crate::proto;

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Everything, including token management.
    Admin,
    /// The fleet and queues, cancel and retry, and reading.
    Operator,
    /// Submit, cancel and retry tasks in scope, and reading.
    Submitter,
    /// Only connecting agents.
    Agent,
    /// Reading only.
    Viewer,
    /// A value this SDK does not know (or the wire's unspecified 0), kept
    /// as its wire number.
    Unknown(i32),
}

impl Role {
    /// The lower-case name ("operator"); `"unknown"` for an unknown value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Submitter => "submitter",
            Self::Agent => "agent",
            Self::Viewer => "viewer",
            Self::Unknown(_) => "unknown",
        }
    }
}

impl From<i32> for Role {
    fn from(value: i32) -> Self {
        match proto::Role::try_from(value) {
            Ok(proto::Role::Admin) => Self::Admin,
            Ok(proto::Role::Operator) => Self::Operator,
            Ok(proto::Role::Submitter) => Self::Submitter,
            Ok(proto::Role::Agent) => Self::Agent,
            Ok(proto::Role::Viewer) => Self::Viewer,
            Ok(proto::Role::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

/// Limits on what a token reaches; an empty list means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scope {
    /// Queues it may submit to and see.
    pub queues: Vec<String>,
    /// Capabilities an agent token may register.
    pub capabilities: Vec<String>,
    /// Labels an agent token's registration must carry.
    pub labels: BTreeMap<String, String>,
}

impl From<proto::Scope> for Scope {
    fn from(scope: proto::Scope) -> Self {
        Self { queues: scope.queues, capabilities: scope.capabilities, labels: scope.labels.into_iter().collect() }
    }
}

/// A token, never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenInfo {
    /// Its unique name, recorded as the actor of what it does.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// What it reaches.
    pub scope: Scope,
    /// When it was created.
    pub created_at: Option<SystemTime>,
    /// When it expires; `None` is never.
    pub expires_at: Option<SystemTime>,
    /// When it was revoked; `None` while active.
    pub revoked_at: Option<SystemTime>,
    /// The admin token that created it (`bootstrap` for the first).
    pub created_by: String,
}

impl From<proto::Token> for TokenInfo {
    fn from(token: proto::Token) -> Self {
        Self {
            name: token.name,
            role: token.role.into(),
            scope: token.scope.map(Scope::from).unwrap_or_default(),
            created_at: system_time(token.created_at),
            expires_at: system_time(token.expires_at),
            revoked_at: system_time(token.revoked_at),
            created_by: token.created_by,
        }
    }
}

/// A token just created, with its secret, which the server shows only
/// this once. `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatedToken {
    /// The token.
    pub token: TokenInfo,
    /// The bearer secret (`muster_` and 64 hex digits).
    pub secret: String,
}

impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken").field("token", &self.token).field("secret", &"<redacted>").finish()
    }
}

impl From<proto::CreateTokenResponse> for CreatedToken {
    fn from(response: proto::CreateTokenResponse) -> Self {
        Self {
            token: response.token.map(TokenInfo::from).unwrap_or_else(|| TokenInfo::from(proto::Token::default())),
            secret: response.secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_convert_and_the_secret_stays_out_of_debug() {
        let wire = proto::CreateTokenResponse {
            token: Some(proto::Token {
                name: "ci".to_owned(),
                role: proto::Role::Submitter.into(),
                scope: Some(proto::Scope { queues: vec!["builds".to_owned()], ..Default::default() }),
                ..Default::default()
            }),
            secret: "muster_s3cret".to_owned(),
        };
        let created = CreatedToken::from(wire);
        assert_eq!((created.token.name.as_str(), created.token.role), ("ci", Role::Submitter));
        assert_eq!(created.token.scope.queues, vec!["builds".to_owned()]);
        assert_eq!(created.token.expires_at, None);
        assert!(!format!("{created:?}").contains("s3cret"));
        assert_eq!(Role::from(0), Role::Unknown(0));
    }
}
