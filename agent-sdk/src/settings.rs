//! What the session runtime is given when an agent is built: its
//! [`Settings`] and the handlers, one per capability.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::Credentials;
use crate::context::{Output, TaskContext, TaskError};

/// A type-erased handler, shared by every attempt of its capability.
pub(crate) type HandlerFn = Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<Output, TaskError>> + Send + Sync>;

/// Everything the session runtime needs to know, fixed at build time.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) name: String,
    /// Normalised endpoints, tried in order.
    pub(crate) endpoints: Vec<String>,
    /// The handlers' capabilities, sorted.
    pub(crate) capabilities: Vec<String>,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) slots: u32,
    pub(crate) metrics_address: String,
    pub(crate) drain_grace: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) credentials: Credentials,
}
