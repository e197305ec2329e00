//! `FleetService`: agents as operators see and steer them.

use muster_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::scheduler::{Command, CoreHandle, QueueChange};
use crate::validate;

/// Thin handler: validate, ask the scheduler, convert.
#[derive(Debug, Clone)]
pub(crate) struct FleetHandler {
    pub(crate) core: CoreHandle,
    pub(crate) config: std::sync::Arc<crate::config::ServerConfig>,
}

impl FleetHandler {
    async fn set_queue(&self, name: String, change: QueueChange) -> Result<Response<pb::Queue>, Status> {
        validate::name("name", &name, &self.config.limits)?;
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
        let id = convert::agent_id("id", &request.into_inner().id)?;
        let agent = self.core.call(|reply| Command::SetDraining { id, draining: true, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }

    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let queues = self.core.call(|reply| Command::ListQueues { reply }).await?;
        Ok(Response::new(pb::ListQueuesResponse { queues: queues.iter().map(convert::queue_to_pb).collect() }))
    }

    async fn pause_queue(&self, request: Request<pb::PauseQueueRequest>) -> Result<Response<pb::Queue>, Status> {
        let name = request.into_inner().name;
        self.set_queue(name, QueueChange { paused: Some(true), ..QueueChange::default() }).await
    }

    async fn resume_queue(&self, request: Request<pb::ResumeQueueRequest>) -> Result<Response<pb::Queue>, Status> {
        let name = request.into_inner().name;
        self.set_queue(name, QueueChange { paused: Some(false), ..QueueChange::default() }).await
    }

    async fn configure_queue(
        &self,
        request: Request<pb::ConfigureQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let request = request.into_inner();
        let change = QueueChange {
            paused: None,
            weight: Some(request.weight).filter(|w| *w > 0),
            max_running: Some(request.max_running),
        };
        self.set_queue(request.name, change).await
    }

    async fn resume_agent(&self, request: Request<pb::ResumeAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let id = convert::agent_id("id", &request.into_inner().id)?;
        let agent = self.core.call(|reply| Command::SetDraining { id, draining: false, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }
}
