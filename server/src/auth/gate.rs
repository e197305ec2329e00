//! The one gate: a tower layer in front of every gRPC service and an axum
//! middleware in front of every HTTP route, both deciding from the tables
//! below. No handler checks roles.
//!
//! For each call the gate resolves the caller (a bearer token, else an
//! mTLS client certificate's mapping, else nobody), refuses a missing or
//! bad credential with UNAUTHENTICATED (HTTP 401) and a role without the
//! needed permission with PERMISSION_DENIED (HTTP 403), applies the
//! per-caller request rate, and passes the [`Identity`] on in the request's
//! extensions for the domain's scope checks. With authentication on, a
//! method or route missing from the tables is refused (PERMISSION_DENIED,
//! HTTP 403) whatever the credential: the gate fails closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{HeaderMap, Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Identity, Permission, TokenTable};
use crate::error::Error;
use crate::net::ConnInfo;
use crate::rate::TokenBucket;

/// What a method or route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a credential.
    Open,
    /// A credential whose role holds this permission.
    Needs(Permission),
}

use Access::{Needs, Open};
use Permission::{Admin, Connect, Fleet, Manage, Read, Submit};

/// Every gRPC method the server serves, and what it needs. With
/// authentication on, a method that is not listed is refused with
/// PERMISSION_DENIED naming it, so a service added without entries here is
/// unreachable rather than open; the authorization test fails for any
/// served method missing here.
pub const GRPC_METHODS: &[(&str, Access)] = &[
    ("/muster.v1.TaskService/Submit", Needs(Submit)),
    ("/muster.v1.TaskService/GetTask", Needs(Read)),
    ("/muster.v1.TaskService/ListTasks", Needs(Read)),
    ("/muster.v1.TaskService/CancelTask", Needs(Manage)),
    ("/muster.v1.TaskService/RetryTask", Needs(Manage)),
    ("/muster.v1.TaskService/WatchTasks", Needs(Read)),
    ("/muster.v1.TaskService/ExplainTask", Needs(Read)),
    ("/muster.v1.TaskService/GetWorkflow", Needs(Read)),
    ("/muster.v1.TaskService/CancelWorkflow", Needs(Manage)),
    ("/muster.v1.TaskService/GetTaskLogs", Needs(Read)),
    ("/muster.v1.AgentService/Connect", Needs(Connect)),
    ("/muster.v1.FleetService/ListAgents", Needs(Read)),
    ("/muster.v1.FleetService/GetAgent", Needs(Read)),
    ("/muster.v1.FleetService/DrainAgent", Needs(Fleet)),
    ("/muster.v1.FleetService/ResumeAgent", Needs(Fleet)),
    ("/muster.v1.FleetService/ListQueues", Needs(Read)),
    ("/muster.v1.FleetService/PauseQueue", Needs(Fleet)),
    ("/muster.v1.FleetService/ResumeQueue", Needs(Fleet)),
    ("/muster.v1.FleetService/ConfigureQueue", Needs(Fleet)),
    ("/muster.v1.FleetService/GetServer", Needs(Read)),
    ("/muster.v1.AdminService/CreateToken", Needs(Admin)),
    ("/muster.v1.AdminService/ListTokens", Needs(Admin)),
    ("/muster.v1.AdminService/RevokeToken", Needs(Admin)),
    ("/muster.v1.AdminService/BackupStore", Needs(Admin)),
    ("/muster.v1.AdminService/VerifyStore", Needs(Admin)),
    // Load balancers and orchestrators probe health without credentials.
    ("/grpc.health.v1.Health/Check", Open),
    ("/grpc.health.v1.Health/Watch", Open),
    ("/grpc.health.v1.Health/List", Open),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Needs(Read)),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Needs(Read)),
];

/// Every HTTP route and what it needs: the HTTP router serves exactly
/// these paths, built from this same list.
pub use crate::http::ROUTES as HTTP_ROUTES;

/// What `path` needs, if it is in `table`.
pub fn access(table: &[(&str, Access)], path: &str) -> Option<Access> {
    table.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// Callers tracked by the rate limiter before idle ones are forgotten.
const MAX_TRACKED_CALLERS: usize = 65_536;

/// The gate's state, shared by the gRPC layer and the HTTP middleware.
#[derive(Debug)]
pub(crate) struct Gate {
    enabled: bool,
    tokens: Arc<TokenTable>,
    rate: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl Gate {
    pub(crate) fn new(enabled: bool, tokens: Arc<TokenTable>, rate: u32) -> Self {
        Self { enabled, tokens, rate, buckets: Mutex::new(HashMap::new()) }
    }

    /// Decides one call to `path`, which needs `access` (`None`: it is not
    /// in the tables): the caller's identity, or why not.
    pub(crate) fn admit(
        &self,
        path: &str,
        access: Option<Access>,
        headers: &HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Arc<Identity>, Error> {
        let identity = if self.enabled {
            match access {
                Some(Open) => return Ok(Identity::anonymous_open()),
                Some(Needs(_)) => {}
                None => {
                    return Err(Error::PermissionDenied(format!(
                        "{path} is not in the server's table of methods and routes, so no credential may call it"
                    )));
                }
            }
            self.authenticate(headers, conn)?
        } else {
            Identity::anonymous()
        };
        if let Some(Needs(permission)) = access
            && !identity.role.allows(permission)
        {
            return Err(Error::PermissionDenied(format!(
                "the {} role may not do this (it needs the {permission:?} permission)",
                identity.role
            )));
        }
        let key = match (identity.name.is_empty(), conn) {
            (false, _) => identity.name.clone(),
            (true, Some(conn)) => conn.remote.ip().to_string(),
            (true, None) => IpAddr::from([0, 0, 0, 0]).to_string(),
        };
        self.charge(key)?;
        Ok(identity)
    }

    fn authenticate(&self, headers: &HeaderMap, conn: Option<&ConnInfo>) -> Result<Arc<Identity>, Error> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let secret = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .ok_or_else(|| Error::Unauthenticated("authorization: expected 'Bearer <token>'".into()))?;
            return self.tokens.authenticate(secret, crate::model::now_ms());
        }
        if let Some(identity) = conn.and_then(|c| c.peer.clone()) {
            return Ok(identity);
        }
        Err(Error::Unauthenticated(
            "this server requires authentication: send 'authorization: Bearer <token>' (muster --token, \
             MUSTER_TOKEN)"
                .into(),
        ))
    }

    fn charge(&self, key: String) -> Result<(), Error> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_CALLERS && !buckets.contains_key(&key) {
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        let rate = self.rate;
        if buckets.entry(key).or_insert_with(|| TokenBucket::new(rate)).take(now) {
            return Ok(());
        }
        Err(Error::ResourceExhausted(format!(
            "more than {rate} calls per second from this caller (max_requests_per_second)"
        )))
    }
}

impl Identity {
    /// The caller of an open route on a server with authentication: nobody
    /// in particular, allowed nothing else.
    fn anonymous_open() -> Arc<Identity> {
        Arc::new(Identity { name: String::new(), role: super::Role::Viewer, scope: super::Scope::default() })
    }
}

/// The gate in front of the gRPC services.
#[derive(Clone, Debug)]
pub(crate) struct GateLayer {
    gate: Arc<Gate>,
}

impl GateLayer {
    pub(crate) fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService { inner, gate: self.gate.clone() }
    }
}

/// The service [`GateLayer`] produces.
#[derive(Clone, Debug)]
pub(crate) struct GateService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S, ReqBody> Service<Request<ReqBody>> for GateService<S>
where
    S: Service<Request<ReqBody>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let access = access(GRPC_METHODS, path);
        match self.gate.admit(path, access, request.headers(), request.extensions().get::<ConnInfo>()) {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                Either::Left(self.inner.call(request))
            }
            Err(error) => {
                tracing::debug!(path = request.uri().path(), %error, "call refused by the gate");
                Either::Right(ready(Ok(tonic::Status::from(error).into_http())))
            }
        }
    }
}

/// The gate in front of the HTTP routes (`axum::middleware::from_fn_with_state`).
pub(crate) async fn http_gate(
    axum::extract::State(gate): axum::extract::State<Arc<Gate>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let access = access(HTTP_ROUTES, request.uri().path());
    let conn = request.extensions().get::<ConnInfo>().cloned();
    match gate.admit(request.uri().path(), access, request.headers(), conn.as_ref()) {
        Ok(identity) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Err(error) => {
            let status = match &error {
                Error::Unauthenticated(_) => http::StatusCode::UNAUTHORIZED,
                Error::PermissionDenied(_) => http::StatusCode::FORBIDDEN,
                Error::ResourceExhausted(_) => http::StatusCode::TOO_MANY_REQUESTS,
                _ => http::StatusCode::BAD_REQUEST,
            };
            let mut response = (status, format!("{error}\n")).into_response();
            if status == http::StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"muster\""));
            }
            response
        }
    }
}
