//! `AdminService`: tokens. A change is made durable through the scheduler's
//! writer first and then applied to the table the gate reads; a revocation
//! is applied to the table first, so the token stops working at once.

use std::sync::Arc;
use std::time::Duration;

use muster_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Identity, Role, Scope, TokenTable, audit, hash_secret, new_secret};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::TokenRecord;
use crate::scheduler::{Command, CoreHandle};
use crate::validate;

/// The longest lifetime a token may be given.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Thin handler over the token table and the scheduler's writer.
#[derive(Debug, Clone)]
pub(crate) struct AdminHandler {
    pub(crate) core: CoreHandle,
    pub(crate) tokens: Arc<TokenTable>,
    pub(crate) config: Arc<ServerConfig>,
    /// Serialises token changes, so a name is checked and taken atomically.
    pub(crate) changing: Arc<tokio::sync::Mutex<()>>,
}

fn role_from_pb(value: i32) -> Result<Role, Error> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        Ok(pb::Role::Submitter) => Ok(Role::Submitter),
        Ok(pb::Role::Agent) => Ok(Role::Agent),
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::Unspecified) | Err(_) => {
            Err(Error::invalid("role", "must be one of admin, operator, submitter, agent, viewer"))
        }
    }
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Admin => pb::Role::Admin,
        Role::Operator => pb::Role::Operator,
        Role::Submitter => pb::Role::Submitter,
        Role::Agent => pb::Role::Agent,
        Role::Viewer => pb::Role::Viewer,
    }
}

/// Validates a requested scope against the role it is for: queues limit
/// callers that submit or read, capabilities and labels limit agents.
fn scope_from_pb(scope: Option<pb::Scope>, role: Role, config: &ServerConfig) -> Result<Scope, Error> {
    let scope = scope.unwrap_or_default();
    let limits = &config.limits;
    validate::within("scope.queues", "queues", scope.queues.len(), limits.max_labels, "max_labels")?;
    validate::within(
        "scope.capabilities",
        "capabilities",
        scope.capabilities.len(),
        limits.max_capabilities,
        "max_capabilities",
    )?;
    for (i, queue) in scope.queues.iter().enumerate() {
        validate::name(&format!("scope.queues[{i}]"), queue, limits)?;
    }
    for (i, capability) in scope.capabilities.iter().enumerate() {
        validate::name(&format!("scope.capabilities[{i}]"), capability, limits)?;
    }
    let labels = scope.labels.into_iter().collect();
    validate::string_map("scope.labels", &labels, limits.max_labels, "max_labels", limits)?;
    if role == Role::Agent && !scope.queues.is_empty() {
        return Err(Error::invalid("scope.queues", "an agent token is scoped by capabilities and labels, not queues"));
    }
    if role != Role::Agent && (!scope.capabilities.is_empty() || !labels.is_empty()) {
        return Err(Error::invalid(
            "scope.capabilities",
            "capabilities and labels scope agent tokens only; scope other roles by queues",
        ));
    }
    Ok(Scope { queues: scope.queues, capabilities: scope.capabilities, labels })
}

fn token_to_pb(record: &TokenRecord) -> pb::Token {
    pb::Token {
        name: record.name.clone(),
        role: role_to_pb(record.role) as i32,
        scope: Some(pb::Scope {
            queues: record.scope.queues.clone(),
            capabilities: record.scope.capabilities.clone(),
            labels: record.scope.labels.clone().into_iter().collect(),
        }),
        created_at: Some(convert::timestamp(record.created_at)),
        expires_at: record.expires_at.map(convert::timestamp),
        revoked_at: record.revoked_at.map(convert::timestamp),
        created_by: record.created_by.clone(),
    }
}

impl AdminHandler {
    async fn persist(&self, record: TokenRecord) -> Result<(), Status> {
        Ok(self.core.call(|reply| Command::PutToken { record, reply }).await?)
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminHandler {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        validate::name("name", &request.name, &self.config.limits)?;
        let role = role_from_pb(request.role)?;
        let scope = scope_from_pb(request.scope, role, &self.config)?;
        let now = crate::model::now_ms();
        let expires_at = match request.expires_in_seconds {
            0 => None,
            secs if secs > MAX_TOKEN_LIFETIME.as_secs() => {
                return Err(Error::invalid(
                    "expires_in_seconds",
                    format!("must be at most {} (ten years)", MAX_TOKEN_LIFETIME.as_secs()),
                )
                .into());
            }
            secs => Some(now.saturating_add(secs * 1000)),
        };
        let _changing = self.changing.lock().await;
        if self.tokens.get(&request.name).is_some() {
            return Err(Error::AlreadyExists(format!("name: a token named '{}' exists already", request.name)).into());
        }
        let secret = new_secret()?;
        let record = TokenRecord {
            name: request.name,
            role,
            scope,
            secret_hash: hash_secret(&secret),
            created_at: now,
            expires_at,
            revoked_at: None,
            created_by: identity.actor().unwrap_or_default(),
        };
        self.persist(record.clone()).await?;
        self.tokens.put(record.clone());
        audit(&identity, "token.create", &format!("{} ({})", record.name, record.role));
        Ok(Response::new(pb::CreateTokenResponse { token: Some(token_to_pb(&record)), secret }))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self.tokens.list().iter().map(token_to_pb).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(&self, request: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::Token>, Status> {
        let identity = Identity::of(&request);
        let name = request.into_inner().name;
        let _changing = self.changing.lock().await;
        let mut record =
            self.tokens.get(&name).ok_or_else(|| Error::NotFound(format!("name: no token named '{name}'")))?;
        if record.revoked_at.is_some() {
            return Ok(Response::new(token_to_pb(&record)));
        }
        let now = crate::model::now_ms();
        let live_admin =
            |t: &TokenRecord| t.role == Role::Admin && t.revoked_at.is_none() && t.expires_at.is_none_or(|at| at > now);
        if live_admin(&record) && !self.tokens.list().iter().any(|t| t.name != name && live_admin(t)) {
            return Err(Error::FailedPrecondition(format!(
                "revoking '{name}' would leave no admin token; create another admin token first"
            ))
            .into());
        }
        record.revoked_at = Some(now);
        // The table first: the token stops working before the write lands.
        self.tokens.put(record.clone());
        self.persist(record.clone()).await?;
        audit(&identity, "token.revoke", &name);
        Ok(Response::new(token_to_pb(&record)))
    }
}
