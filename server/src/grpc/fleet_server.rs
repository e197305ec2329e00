//! `FleetService`: agents as operators see and steer them.

use muster_proto::pb;
use tonic::{Request, Response, Status};

use super::convert;
use crate::scheduler::{Command, CoreHandle};

/// Thin handler: validate, ask the scheduler, convert.
#[derive(Debug, Clone)]
pub(crate) struct FleetHandler {
    pub(crate) core: CoreHandle,
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

    async fn resume_agent(&self, request: Request<pb::ResumeAgentRequest>) -> Result<Response<pb::Agent>, Status> {
        let id = convert::agent_id("id", &request.into_inner().id)?;
        let agent = self.core.call(|reply| Command::SetDraining { id, draining: false, reply }).await?;
        Ok(Response::new(convert::agent_to_pb(&agent)))
    }
}
