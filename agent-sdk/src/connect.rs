//! Opening one agent stream ([`Link`]): dial an endpoint, send `Register`,
//! wait for `Registered`. Everything after that belongs to the runtime.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::Error;
use crate::credentials::Credentials;
use crate::endpoint::{MAX_MESSAGE_SIZE, make_endpoint, normalize_endpoint};
use crate::proto::agent_service_client::AgentServiceClient;
use crate::proto::{self, agent_message, server_message};

/// How long dialling plus registration may take before the attempt counts as
/// failed.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Response metadata by which a follower names the leader to connect to.
const LEADER_METADATA: &str = "muster-leader";

/// An established `Connect` stream to one server (the server's side of it
/// is its session).
pub(crate) struct Link {
    /// The endpoint this stream is connected to, for logs.
    pub(crate) endpoint: String,
    /// Messages to the server. Unbounded so the session owner never blocks
    /// on a slow network while the server waits for it to read; the volume is
    /// bounded by the work the server hands out, the progress throttle and
    /// the log buffers' caps and throttle.
    outbound: mpsc::UnboundedSender<proto::AgentMessage>,
    /// Messages from the server.
    pub(crate) inbound: Streaming<proto::ServerMessage>,
}

impl Link {
    /// Queues `msg` for the server. A failure means the stream is closing;
    /// the runtime notices through `inbound`, and results are resent from
    /// the unacknowledged set after reconnecting, so it is not reported.
    pub(crate) fn send(&self, msg: agent_message::Msg) {
        if self.outbound.send(proto::AgentMessage { msg: Some(msg) }).is_err() {
            tracing::debug!(endpoint = %self.endpoint, "message dropped: stream closing");
        }
    }
}

/// Why a session could not be opened, and where to go next.
#[derive(Debug)]
pub(crate) struct ConnectFailure {
    pub(crate) error: Error,
    /// The leader a follower redirected us to.
    pub(crate) redirect: Option<String>,
}

impl ConnectFailure {
    fn new(error: Error) -> Self {
        Self { error, redirect: None }
    }

    fn from_status(status: Status, tls: bool) -> Self {
        Self { redirect: leader_redirect(&status, tls), error: Error::Status(status) }
    }
}

impl From<Error> for ConnectFailure {
    fn from(error: Error) -> Self {
        Self::new(error)
    }
}

/// The normalised leader endpoint an `UNAVAILABLE` status from a follower
/// points to, if any.
pub(crate) fn leader_redirect(status: &Status, tls: bool) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let leader = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    normalize_endpoint(leader, tls).ok()
}

/// Dials `endpoint`, registers with `register` and returns the stream with
/// the server's `Registered` answer.
pub(crate) async fn open_link(
    endpoint: String,
    register: proto::Register,
    credentials: Credentials,
) -> Result<(Link, proto::Registered), ConnectFailure> {
    match tokio::time::timeout(REGISTER_TIMEOUT, handshake(endpoint, register, credentials)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ConnectFailure::new(Error::Protocol(format!(
            "no registration answer within {}s",
            REGISTER_TIMEOUT.as_secs()
        )))),
    }
}

async fn handshake(
    endpoint: String,
    register: proto::Register,
    credentials: Credentials,
) -> Result<(Link, proto::Registered), ConnectFailure> {
    let channel = make_endpoint(&endpoint, &credentials)?.connect().await.map_err(Error::Transport)?;
    let tls = credentials.uses_tls();
    let (outbound, requests) = mpsc::unbounded_channel();
    // Queued before the call so it is the first message the server reads;
    // the receiver is alive here, so this cannot fail.
    let _ = outbound.send(proto::AgentMessage { msg: Some(agent_message::Msg::Register(register)) });
    let mut client = AgentServiceClient::with_interceptor(channel, credentials.interceptor())
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
    let response = client
        .connect(UnboundedReceiverStream::new(requests))
        .await
        .map_err(|s| ConnectFailure::from_status(s, tls))?;
    let mut inbound = response.into_inner();
    let first = inbound.message().await.map_err(|s| ConnectFailure::from_status(s, tls))?;
    match first.and_then(|message| message.msg) {
        Some(server_message::Msg::Registered(registered)) => Ok((Link { endpoint, outbound, inbound }, registered)),
        Some(other) => Err(ConnectFailure::new(Error::Protocol(format!(
            "expected registered as the first message, got {}",
            server_message_kind(&other)
        )))),
        None => Err(ConnectFailure::new(Error::Protocol("stream closed before registration".to_owned()))),
    }
}

/// A short name for a server message, for logs (the payload of an
/// assignment does not belong there).
pub(crate) fn server_message_kind(msg: &server_message::Msg) -> &'static str {
    match msg {
        server_message::Msg::Registered(_) => "registered",
        server_message::Msg::Assign(_) => "assign",
        server_message::Msg::Cancel(_) => "cancel",
        server_message::Msg::Ack(_) => "ack",
        server_message::Msg::Rejected(_) => "rejected",
        server_message::Msg::Heartbeat(_) => "heartbeat",
        server_message::Msg::Drain(_) => "drain",
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn make_status(code: Code, leader: &'static str) -> Status {
        let mut status = Status::new(code, "not the leader");
        status.metadata_mut().insert(LEADER_METADATA, MetadataValue::from_static(leader));
        status
    }

    #[test]
    fn unavailable_with_leader_metadata_redirects() {
        let status = make_status(Code::Unavailable, "10.0.0.7:7070");
        assert_eq!(leader_redirect(&status, false).as_deref(), Some("http://10.0.0.7:7070"));
    }

    #[test]
    fn other_codes_or_missing_metadata_do_not_redirect() {
        assert_eq!(leader_redirect(&make_status(Code::Internal, "10.0.0.7:7070"), false), None);
        assert_eq!(leader_redirect(&Status::unavailable("down"), false), None);
        assert_eq!(leader_redirect(&make_status(Code::Unavailable, "ftp://x"), false), None);
    }
}
