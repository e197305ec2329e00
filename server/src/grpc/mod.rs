//! The gRPC edge: thin `*Handler`s that validate, call the scheduler or
//! read the store, and convert. Domain code never imports tonic.

pub(crate) mod agent_server;
pub(crate) mod convert;
pub(crate) mod fleet_server;
pub(crate) mod metrics_layer;
mod status;
mod task_logs;
pub(crate) mod task_server;
