//! `AdminService`: tokens, and backups and verification of the store. A
//! token change is made durable through the scheduler's writer first and
//! then applied to the table the gate reads; a revocation is applied to the
//! table first, so the token stops working at once. Backups and
//! verification read the store at one point in time on a blocking thread,
//! while the writer goes on.

use std::sync::Arc;
use std::time::Duration;

use muster_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Identity, Role, Scope, TokenTable, audit, hash_secret, new_secret};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::model::TokenRecord;
use crate::scheduler::{Command, CoreHandle};
use crate::store::Store;
use crate::store::backup::BackupWriter;
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
    pub(crate) store: Arc<dyn Store>,
}

/// Bytes of a backup sent per message.
const BACKUP_CHUNK_BYTES: usize = 256 << 10;
/// Chunks buffered toward a slow reader before the backup waits for it.
const BACKUP_CHUNKS_BUFFERED: usize = 4;

/// The backup file's bytes, sent on in chunks. Blocks while the reader is
/// behind; fails once it has gone, which ends the export.
struct ChunkSender {
    buffer: Vec<u8>,
    tx: mpsc::Sender<Result<pb::BackupChunk, Status>>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(BACKUP_CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(pb::BackupChunk { data }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the caller stopped reading the backup"))
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = BACKUP_CHUNK_BYTES - self.buffer.len();
        let taken = bytes.len().min(room);
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() == BACKUP_CHUNK_BYTES {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn verify_to_pb(report: &crate::store::VerifyReport) -> pb::VerifyStoreResponse {
    pb::VerifyStoreResponse {
        clean: report.is_clean(),
        records: report
            .records
            .by_kind()
            .iter()
            .map(|(kind, count)| pb::StoreKindCount { kind: (*kind).to_owned(), count: *count })
            .collect(),
        problem_count: report.problem_count,
        problems_by_kind: report
            .problems_by_kind
            .iter()
            .map(|(kind, count)| pb::StoreKindCount { kind: kind.as_str().to_owned(), count: *count })
            .collect(),
        problems: report
            .problems
            .iter()
            .map(|p| pb::StoreProblem {
                kind: p.kind.as_str().to_owned(),
                key: p.key.clone(),
                detail: p.detail.clone(),
            })
            .collect(),
    }
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

/// A backup writer that reports, once, that the export began (with the
/// sequence it covers).
struct Started<W: std::io::Write> {
    inner: BackupWriter<W>,
    started: Option<tokio::sync::oneshot::Sender<Result<u64, crate::store::StoreError>>>,
}

impl<W: std::io::Write> crate::store::Export for Started<W> {
    fn begin(&mut self, point: crate::store::Point) -> Result<(), crate::store::StoreError> {
        self.inner.begin(point)?;
        if let Some(started) = self.started.take() {
            let _ = started.send(Ok(point.sequence));
        }
        Ok(())
    }

    fn record(&mut self, record: crate::store::Record) -> Result<(), crate::store::StoreError> {
        self.inner.record(record)
    }
}

impl AdminHandler {
    async fn persist(&self, record: TokenRecord) -> Result<(), Status> {
        Ok(self.core.call(|reply| Command::PutToken { record, reply }).await?)
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminHandler {
    type BackupStoreStream = ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn backup_store(
        &self,
        request: Request<pb::BackupStoreRequest>,
    ) -> Result<Response<Self::BackupStoreStream>, Status> {
        let identity = Identity::of(&request);
        let (tx, rx) = mpsc::channel(BACKUP_CHUNKS_BUFFERED);
        let store = self.store.clone();
        // The export begins before this answers, so a backup that cannot
        // start (another is under way) fails the call itself.
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let sink = ChunkSender { buffer: Vec::with_capacity(BACKUP_CHUNK_BYTES), tx: tx.clone() };
            let mut writer =
                Started { inner: BackupWriter::new(sink, crate::model::now_ms()), started: Some(started_tx) };
            let written = store.export(&mut writer).and_then(|()| writer.inner.finish());
            match written {
                Ok((_, header, totals)) => tracing::info!(
                    sequence = header.sequence,
                    tasks = totals.tasks,
                    events = totals.events,
                    "backup sent"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "backup failed");
                    match writer.started.take() {
                        Some(started) => drop(started.send(Err(e))),
                        None => drop(tx.blocking_send(Err(Error::Store(e).into()))),
                    }
                }
            }
        });
        match started_rx.await {
            Ok(Ok(sequence)) => {
                audit(&identity, "store.backup", &format!("at sequence {sequence}"));
                Ok(Response::new(ReceiverStream::new(rx)))
            }
            Ok(Err(e)) => Err(Error::Store(e).into()),
            Err(_) => Err(Status::internal("the backup stopped before it began")),
        }
    }

    async fn verify_store(
        &self,
        request: Request<pb::VerifyStoreRequest>,
    ) -> Result<Response<pb::VerifyStoreResponse>, Status> {
        let identity = Identity::of(&request);
        let store = self.store.clone();
        let report = tokio::task::spawn_blocking(move || store.verify())
            .await
            .map_err(|_| Status::internal("the verification stopped"))?
            .map_err(Error::Store)?;
        audit(&identity, "store.verify", &format!("{} problem(s)", report.problem_count));
        Ok(Response::new(verify_to_pb(&report)))
    }

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
