//! Server configuration: one typed struct, filled in layers by the CLI
//! (defaults, TOML file, `MUSTER_*` environment, flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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

/// Everything the server needs to run.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address (`/healthz`).
    pub http_listen: SocketAddr,
    /// Where the sled store lives.
    pub data_dir: PathBuf,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            data_dir: PathBuf::from("muster-data"),
            durability: Durability::Sync,
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            relaxed_flush_interval: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(5),
            cancel_grace: Duration::from_secs(30),
            default_timeout: Duration::from_secs(300),
            default_retry: RetryDefaults::default(),
            limits: Limits::default(),
        }
    }
}

impl ServerConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), Error> {
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
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
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
    /// Most messages per second one agent session may send.
    pub max_agent_messages_per_second: u32,
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_output_bytes: 1 << 20,
            max_tasks_per_submit: 10_000,
            max_unfinished_tasks: 1_000_000,
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
            max_timeout: Duration::from_secs(7 * 24 * 3600),
            max_agent_messages_per_second: 10_000,
            max_dependencies_per_task: 10_000,
            max_locks_per_task: 16,
            max_message_len: 4096,
            max_log_bytes_per_attempt: 256 << 10,
            max_log_line_bytes: 16 << 10,
            max_log_lines_per_message: 4096,
        }
    }
}
