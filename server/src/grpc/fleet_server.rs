//! `FleetService`: agents as operators see and steer them.

use muster_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::{Identity, audit};
use crate::scheduler::{Command, CoreHandle, QueueChange};
use crate::validate;

/// The largest queue weight: queues take turns in proportion to their
/// weights, so a ratio beyond this means nothing but a larger number to add.
const MAX_QUEUE_WEIGHT: u32 = 10_000;

/// Thin handler: validate, ask the scheduler, convert.
#[derive(Debug, Clone)]
pub(crate) struct FleetHandler {
    pub(crate) core: CoreHandle,
    pub(crate) config: std::sync::Arc<crate::config::ServerConfig>,
    /// What `GetServer` answers: fixed while this server leads.
    pub(crate) server: pb::Server,
}

impl FleetHandler {
    async fn set_queue(
        &self,
        identity: &Identity,
        action: &str,
        name: String,
        change: QueueChange,
    ) -> Result<Response<pb::Queue>, Status> {
        validate::name("name", &name, &self.config.limits)?;
        identity.scope.check_queue("name", &name)?;
        audit(identity, action, &name);
        let queue = self.core.call(|reply| Command::SetQueue { name, change, reply }).await?;
        Ok(Response::new(convert::queue_to_pb(&queue)))
    }
}

#[tonic::async_trait]
impl pb::fleet_service_server::FleetService for FleetHandler {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let capability = Some(request.into_inner().capability).filter(|c| !c.is_empty());
        let agents = self.core.call(|reply| Command::ListAgents { capability, reply }).await?;
        Ok(Response::new(pb::ListAgentsResponse { agents: agents.iter().map(convert::agent_to_pb).collect() }))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let id = convert::agent_id("id", &request.into_inner().id)?;
        let agent = self.core.call(|reply| Command::GetAgent { id, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }

    async fn drain_agent(&self, request: Request<pb::DrainAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let identity = Identity::of(&request);
        let id = convert::agent_id("id", &request.into_inner().id)?;
        audit(&identity, "agent.drain", &id.to_string());
        let agent = self.core.call(|reply| Command::SetDraining { id, draining: true, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }

    async fn get_server(&self, _: Request<pb::GetServerRequest>) -> Result<Response<pb::Server>, Status> {
        Ok(Response::new(self.server.clone()))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let identity = Identity::of(&request);
        let queues = self.core.call(|reply| Command::ListQueues { reply }).await?;
        let queues =
            queues.iter().filter(|q| identity.scope.sees_queue(&q.record.name)).map(convert::queue_to_pb).collect();
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn pause_queue(&self, request: Request<pb::PauseQueueRequest>) -> Result<Response<pb::Queue>, Status> {
        let identity = Identity::of(&request);
        let name = request.into_inner().name;
        self.set_queue(&identity, "queue.pause", name, QueueChange { paused: Some(true), ..QueueChange::default() })
            .await
    }

    async fn resume_queue(&self, request: Request<pb::ResumeQueueRequest>) -> Result<Response<pb::Queue>, Status> {
        let identity = Identity::of(&request);
        let name = request.into_inner().name;
        self.set_queue(&identity, "queue.resume", name, QueueChange { paused: Some(false), ..QueueChange::default() })
            .await
    }

    async fn configure_queue(
        &self,
        request: Request<pb::ConfigureQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let identity = Identity::of(&request);
        let request = request.into_inner();
        if request.weight > MAX_QUEUE_WEIGHT {
            return Err(crate::error::Error::invalid("weight", format!("must be at most {MAX_QUEUE_WEIGHT}")).into());
        }
        let change = QueueChange {
            paused: None,
            weight: Some(request.weight).filter(|w| *w > 0),
            max_running: Some(request.max_running),
        };
        self.set_queue(&identity, "queue.configure", request.name, change).await
    }

    async fn resume_agent(&self, request: Request<pb::ResumeAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let identity = Identity::of(&request);
        let id = convert::agent_id("id", &request.into_inner().id)?;
        audit(&identity, "agent.resume", &id.to_string());
        let agent = self.core.call(|reply| Command::SetDraining { id, draining: false, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }
}
