//! The gRPC edge: thin `*Handler`s that validate, call the scheduler or
//! read the store, and convert. Domain code never imports tonic.

pub(crate) mod admin_server;
pub(crate) mod agent_server;
pub(crate) mod convert;
pub(crate) mod fleet_server;
pub(crate) mod inbound_layer;
pub(crate) mod metrics_layer;
mod reads;
pub(crate) mod status;
mod task_logs;
pub(crate) mod task_server;

/// The health service's descriptor set, its file named by its package path
/// (`grpc/health/v1/health.proto`, as every other language's stock health
/// module names it) rather than tonic's bare `health.proto`, so a client
/// that resolves it through reflection and also imports its own health
/// module does not see the same symbols twice.
pub(crate) fn health_descriptor_set() -> Vec<u8> {
    use prost::Message;
    const STOCK_NAME: &str = "grpc/health/v1/health.proto";
    let Ok(mut set) = prost_types::FileDescriptorSet::decode(tonic_health::pb::FILE_DESCRIPTOR_SET) else {
        return tonic_health::pb::FILE_DESCRIPTOR_SET.to_vec();
    };
    for file in &mut set.file {
        if file.package.as_deref() == Some("grpc.health.v1") {
            file.name = Some(STOCK_NAME.to_owned());
        }
    }
    set.encode_to_vec()
}
