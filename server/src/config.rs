//! Server configuration: one typed struct, filled in layers by the CLI
//! (defaults, TOML file, `MUSTER_*` environment, flags).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::Role;
use crate::error::Error;

/// When a write is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every acknowledged submit or result has been flushed to disk (group
    /// commit: one flush per batch of writes).
    #[default]
    Sync,
    /// Writes are flushed periodically; a crash may lose the last interval.
    Relaxed,
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Self::Sync),
            "relaxed" => Ok(Self::Relaxed),
            other => Err(format!("durability must be 'sync' or 'relaxed', not '{other}'")),
        }
    }
}

/// The longest idempotency key a PostgreSQL store can index: a B-tree
/// entry holds at most about 2.7 kB.
const MAX_PG_KEY_BYTES: usize = 2048;

/// A store URL, shown without its password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::store::redact_store_url(&self.0))
    }
}

/// Everything the server needs to run.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address (`/healthz`).
    pub http_listen: SocketAddr,
    /// Where the sled store lives, and the server's own files (the
    /// bootstrap admin token) whatever the store.
    pub data_dir: PathBuf,
    /// The PostgreSQL store (`postgres://USER@HOST:PORT/DB`) instead of
    /// the sled store in `data_dir`.
    pub store: Option<StoreUrl>,
    /// With a PostgreSQL store, how long the leader lease lasts unless
    /// renewed: a standby takes over within about this long of a leader's
    /// loss.
    #[serde(with = "humantime_serde")]
    pub leader_lease_ttl: Duration,
    /// The gRPC endpoint other replicas send clients to when this one
    /// leads (default: `http(s)://` and the bound gRPC address).
    pub advertise: Option<String>,
    /// Flush on every batch, or periodically.
    pub durability: Durability,
    /// The store's page cache, in bytes.
    pub store_cache_bytes: u64,
    /// The flush period in relaxed mode.
    #[serde(with = "humantime_serde")]
    pub relaxed_flush_interval: Duration,
    /// An agent silent this long, or disconnected this long, is lost.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often agents are told to send heartbeats.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a running attempt has to stop after a cancel.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Execution timeout of tasks that set none.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Retry policy of tasks that set none.
    pub default_retry: RetryDefaults,
    /// Input limits.
    pub limits: Limits,
    /// How long finished work is kept.
    pub retention: Retention,
    /// TLS on the gRPC and HTTP listeners; plaintext when unset.
    pub tls: Option<TlsConfig>,
    /// Who may call, and as what.
    pub auth: AuthConfig,
    /// Allows listening on a non-loopback address without TLS and
    /// authentication. Anyone who reaches the port can then do anything.
    pub insecure: bool,
}

/// How long finished work is kept before retention removes it.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// A finished task (with its events, logs and idempotency key) is
    /// removed this long after it finished; a workflow once its last task
    /// has been finished this long. Zero keeps everything forever.
    #[serde(with = "humantime_serde")]
    pub finished_tasks: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self { finished_tasks: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// The server's certificate and, for mutual TLS, the CA that signs client
/// certificates. The files are re-read when they change (checked every
/// `reload_interval`) and on SIGHUP; connections already open keep the
/// certificate they were made with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, every client must present a
    /// certificate signed by one of them (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// Authentication and authorization.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether every call needs a credential. Unset: on exactly when TLS is
    /// configured.
    pub enabled: Option<bool>,
    /// The secret of the first admin token, used when the store holds no
    /// token yet (otherwise one is generated and written to
    /// `<data_dir>/admin.token`). Usually set through
    /// `MUSTER_BOOTSTRAP_TOKEN`.
    pub bootstrap_token: Option<String>,
    /// Client certificates (mutual TLS) that act as identities without a
    /// token, by the subject's common name.
    pub client_certs: Vec<CertIdentity>,
}

/// A client certificate subject mapped to a role and scope.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertIdentity {
    /// The certificate subject's common name (CN) to match exactly.
    pub common_name: String,
    /// The role it acts with.
    pub role: Role,
    /// The name recorded as its actor; `cert:<common_name>` when unset.
    #[serde(default)]
    pub name: Option<String>,
    /// Queues it is limited to (empty: all).
    #[serde(default)]
    pub queues: Vec<String>,
    /// Capabilities an agent may register (empty: all).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Labels an agent's registration must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl AuthConfig {
    /// Whether credentials are required, given whether TLS is on.
    pub fn is_enabled(&self, tls: bool) -> bool {
        self.enabled.unwrap_or(tls)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            data_dir: PathBuf::from("muster-data"),
            store: None,
            leader_lease_ttl: Duration::from_secs(5),
            advertise: None,
            durability: Durability::Sync,
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            relaxed_flush_interval: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(5),
            cancel_grace: Duration::from_secs(30),
            default_timeout: Duration::from_secs(300),
            default_retry: RetryDefaults::default(),
            limits: Limits::default(),
            retention: Retention::default(),
            tls: None,
            auth: AuthConfig::default(),
            insecure: false,
        }
    }
}

impl ServerConfig {
    /// Whether every call needs a credential.
    pub fn auth_enabled(&self) -> bool {
        self.auth.is_enabled(self.tls.is_some())
    }

    /// Refuses to expose an unauthenticated or plaintext server beyond this
    /// machine unless `insecure` says the operator means it.
    fn check_exposure(&self) -> Result<(), Error> {
        if self.insecure {
            return Ok(());
        }
        for (field, addr) in [("listen", self.listen), ("http_listen", self.http_listen)] {
            if addr.ip().is_loopback() {
                continue;
            }
            let missing = match (self.tls.is_some(), self.auth_enabled()) {
                (true, true) => continue,
                (false, false) => "TLS and authentication",
                (false, true) => "TLS",
                (true, false) => "authentication",
            };
            return Err(Error::invalid(
                field,
                format!(
                    "{addr} is reachable beyond this machine, but {missing} is off: anyone who reaches it could \
                     read every payload and run anything; configure tls (--tls-cert, --tls-key) with auth on, \
                     or pass --insecure if that is really intended"
                ),
            ));
        }
        Ok(())
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), Error> {
        self.check_exposure()?;
        if let Some(store) = &self.store
            && !(store.0.starts_with("postgres://") || store.0.starts_with("postgresql://"))
        {
            return Err(Error::invalid("store", "must be a PostgreSQL URL: postgres://USER@HOST:PORT/DB"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.leader_lease_ttl) {
            return Err(Error::invalid("leader_lease_ttl", "must be between 1s and 10m"));
        }
        if self.store.is_some() && self.leader_lease_ttl >= self.lease_ttl {
            return Err(Error::invalid(
                "leader_lease_ttl",
                format!(
                    "must be shorter than lease_ttl ({}): agents wait that long for a new leader before they give up \
                     their running work",
                    humantime::format_duration(self.lease_ttl)
                ),
            ));
        }
        if self.store.is_some() && self.limits.max_idempotency_key_len > MAX_PG_KEY_BYTES {
            return Err(Error::invalid(
                "limits.max_idempotency_key_len",
                format!("must be at most {MAX_PG_KEY_BYTES} with a PostgreSQL store (the longest key it indexes)"),
            ));
        }
        if !self.auth.client_certs.is_empty() && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            return Err(Error::invalid(
                "auth.client_certs",
                "certificate identities need mutual TLS: set tls.client_ca (--tls-client-ca)",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(Error::invalid("limits.max_connections", "must be greater than zero"));
        }
        if self.limits.max_session_queue == 0 {
            return Err(Error::invalid("limits.max_session_queue", "must be greater than zero"));
        }
        if self.limits.handshake_timeout.is_zero() {
            return Err(Error::invalid("limits.handshake_timeout", "must be greater than zero"));
        }
        if self.lease_ttl.is_zero() {
            return Err(Error::invalid("lease_ttl", "must be greater than zero"));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease_ttl {
            return Err(Error::invalid(
                "heartbeat_interval",
                format!(
                    "must be greater than zero and shorter than lease_ttl ({})",
                    humantime::format_duration(self.lease_ttl)
                ),
            ));
        }
        if self.default_timeout.is_zero() || self.default_timeout > self.limits.max_timeout {
            return Err(Error::invalid(
                "default_timeout",
                format!(
                    "must be between 1ms and max_timeout ({})",
                    humantime::format_duration(self.limits.max_timeout)
                ),
            ));
        }
        if self.default_retry.max_attempts == 0 || self.default_retry.max_attempts > self.limits.max_attempts {
            return Err(Error::invalid(
                "default_retry.max_attempts",
                format!("must be between 1 and max_attempts ({})", self.limits.max_attempts),
            ));
        }
        let retry = &self.default_retry;
        for (field, backoff) in
            [("default_retry.initial_backoff", retry.initial_backoff), ("default_retry.max_backoff", retry.max_backoff)]
        {
            if backoff > self.limits.max_retry_backoff {
                return Err(Error::invalid(
                    field,
                    format!(
                        "must be at most max_retry_backoff ({})",
                        crate::validate::limit_text(self.limits.max_retry_backoff)
                    ),
                ));
            }
        }
        if retry.max_backoff < retry.initial_backoff {
            return Err(Error::invalid("default_retry.max_backoff", "must not be shorter than initial_backoff"));
        }
        if !(1.0..=100.0).contains(&retry.multiplier) {
            return Err(Error::invalid("default_retry.multiplier", "must be between 1 and 100"));
        }
        Ok(())
    }
}

/// The retry policy of tasks that set none.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryDefaults {
    /// Attempts in total.
    pub max_attempts: u32,
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Backoff cap.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth factor.
    pub multiplier: f64,
}

impl Default for RetryDefaults {
    fn default() -> Self {
        let policy = crate::model::RetryPolicy::default();
        Self {
            max_attempts: policy.max_attempts,
            initial_backoff: policy.initial_backoff,
            max_backoff: policy.max_backoff,
            multiplier: policy.multiplier,
        }
    }
}

/// Every size and count the server accepts, each with a safe default. The
/// field names appear in error messages so users can find the setting.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest task payload.
    pub max_payload_bytes: usize,
    /// Largest task output.
    pub max_output_bytes: usize,
    /// Most tasks in one `Submit`.
    pub max_tasks_per_submit: usize,
    /// Most unfinished tasks the server holds.
    pub max_unfinished_tasks: usize,
    /// Most payload bytes the unfinished tasks hold together: the scheduler
    /// keeps them in memory until they finish, so this bounds its memory
    /// whatever the task count.
    pub max_unfinished_payload_bytes: u64,
    /// Most labels on an agent or entries in a selector.
    pub max_labels: usize,
    /// Most metadata entries on a task.
    pub max_metadata_entries: usize,
    /// Longest label or metadata key.
    pub max_key_len: usize,
    /// Longest label or metadata value.
    pub max_value_len: usize,
    /// Longest name (capability, queue, agent name).
    pub max_name_len: usize,
    /// Longest idempotency key.
    pub max_idempotency_key_len: usize,
    /// Most capabilities one agent advertises.
    pub max_capabilities: usize,
    /// Most slots one agent declares.
    pub max_agent_slots: u32,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
    /// Most attempts a retry policy may ask for.
    pub max_attempts: u32,
    /// Longest execution timeout.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Longest time a task may wait queued (`queue_timeout`).
    #[serde(with = "humantime_serde")]
    pub max_queue_timeout: Duration,
    /// Longest retry backoff, initial or cap.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
    /// Farthest a task's `not_before` may lie in the future.
    #[serde(with = "humantime_serde")]
    pub max_not_before_ahead: Duration,
    /// Most messages per second one agent session may send.
    pub max_agent_messages_per_second: u32,
    /// Most messages waiting to be sent to one agent session; an agent that
    /// stops reading its stream while they pile up past it is disconnected
    /// (RESOURCE_EXHAUSTED), so it cannot grow the server's memory.
    pub max_session_queue: usize,
    /// Most dependencies one task declares.
    pub max_dependencies_per_task: usize,
    /// Most locks one task declares.
    pub max_locks_per_task: usize,
    /// Longest free-text message (failure, progress, cancel reason); longer
    /// agent text is truncated, longer client text is rejected.
    pub max_message_len: usize,
    /// Log kept per attempt (text plus a small per-line overhead); older
    /// lines are dropped first, and the drops are counted.
    pub max_log_bytes_per_attempt: usize,
    /// Longest log line; longer lines are cut.
    pub max_log_line_bytes: usize,
    /// Most lines in one `LogLines` message from an agent.
    pub max_log_lines_per_message: usize,
    /// Most connections open at once on each listener; past it the server
    /// stops accepting until one closes.
    pub max_connections: usize,
    /// How long a new connection has to complete its TLS handshake and send
    /// its first bytes (the HTTP/2 preface on the gRPC port) before it is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub max_concurrent_streams: u32,
    /// Largest request header block, in bytes.
    pub max_header_bytes: u32,
    /// Most calls per second one credential (or, without authentication,
    /// one client address) may start, with bursts of twice that; past it
    /// calls get RESOURCE_EXHAUSTED.
    pub max_requests_per_second: u32,
}

/// Seconds in a day.
const DAY: u64 = 24 * 3600;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_output_bytes: 1 << 20,
            max_tasks_per_submit: 10_000,
            max_unfinished_tasks: 1_000_000,
            max_unfinished_payload_bytes: 512 << 20,
            max_labels: 32,
            max_metadata_entries: 32,
            max_key_len: 63,
            max_value_len: 1024,
            max_name_len: 128,
            max_idempotency_key_len: 256,
            max_capabilities: 64,
            max_agent_slots: 1024,
            max_message_bytes: 16 << 20,
            max_attempts: 100,
            max_timeout: Duration::from_secs(7 * DAY),
            max_queue_timeout: Duration::from_secs(30 * DAY),
            max_retry_backoff: Duration::from_secs(DAY),
            max_not_before_ahead: Duration::from_secs(365 * DAY),
            max_agent_messages_per_second: 10_000,
            max_session_queue: 4096,
            max_dependencies_per_task: 10_000,
            max_locks_per_task: 16,
            max_message_len: 4096,
            max_log_bytes_per_attempt: 256 << 10,
            max_log_line_bytes: 16 << 10,
            max_log_lines_per_message: 4096,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            max_header_bytes: 16 << 10,
            max_requests_per_second: 2000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(config: &ServerConfig) -> String {
        config.validate().err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn default_retry_is_held_to_the_same_bounds_as_a_task() {
        assert!(ServerConfig::default().validate().is_ok());
        let mut config = ServerConfig::default();
        config.default_retry.max_backoff = Duration::from_secs(2 * 24 * 3600);
        assert!(message(&config).contains("default_retry.max_backoff: must be at most max_retry_backoff (1d)"));
        let mut config = ServerConfig::default();
        config.default_retry.multiplier = f64::NAN;
        assert!(message(&config).contains("default_retry.multiplier"));
        let mut config = ServerConfig::default();
        config.default_retry.initial_backoff = Duration::from_secs(120);
        assert!(message(&config).contains("must not be shorter than initial_backoff"));
    }
}
