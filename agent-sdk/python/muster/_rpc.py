"""Typed callables for every RPC the SDK uses, built on a channel.

Method paths come from the generated descriptors, so they always match the
proto. (The generated ``*_pb2_grpc`` modules are shipped for callers who
want them, but are untyped.)
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from .v1 import agent_pb2, fleet_pb2, task_pb2


def _path(service: ServiceDescriptor, method: str) -> str:
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


def _unary(
    channel: grpc.aio.Channel, service: ServiceDescriptor, method: str, request: Any, response: Any
) -> Any:
    return channel.unary_unary(
        _path(service, method),
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


_TASK = task_pb2.DESCRIPTOR.services_by_name["TaskService"]
_FLEET = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"]
_AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


class TaskStub:
    """``muster.v1.TaskService``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        t = task_pb2
        self.submit: grpc.aio.UnaryUnaryMultiCallable[t.SubmitRequest, t.SubmitResponse] = _unary(
            channel, _TASK, "Submit", t.SubmitRequest, t.SubmitResponse
        )
        self.get_task: grpc.aio.UnaryUnaryMultiCallable[t.GetTaskRequest, t.Task] = _unary(
            channel, _TASK, "GetTask", t.GetTaskRequest, t.Task
        )
        self.list_tasks: grpc.aio.UnaryUnaryMultiCallable[t.ListTasksRequest, t.ListTasksResponse] = _unary(
            channel, _TASK, "ListTasks", t.ListTasksRequest, t.ListTasksResponse
        )
        self.cancel_task: grpc.aio.UnaryUnaryMultiCallable[t.CancelTaskRequest, t.Task] = _unary(
            channel, _TASK, "CancelTask", t.CancelTaskRequest, t.Task
        )
        self.retry_task: grpc.aio.UnaryUnaryMultiCallable[t.RetryTaskRequest, t.Task] = _unary(
            channel, _TASK, "RetryTask", t.RetryTaskRequest, t.Task
        )
        self.explain_task: grpc.aio.UnaryUnaryMultiCallable[t.ExplainTaskRequest, t.Explanation] = _unary(
            channel, _TASK, "ExplainTask", t.ExplainTaskRequest, t.Explanation
        )
        self.get_workflow: grpc.aio.UnaryUnaryMultiCallable[t.GetWorkflowRequest, t.Workflow] = _unary(
            channel, _TASK, "GetWorkflow", t.GetWorkflowRequest, t.Workflow
        )
        self.cancel_workflow: grpc.aio.UnaryUnaryMultiCallable[t.CancelWorkflowRequest, t.Workflow] = _unary(
            channel, _TASK, "CancelWorkflow", t.CancelWorkflowRequest, t.Workflow
        )
        self.watch_tasks: grpc.aio.UnaryStreamMultiCallable[t.WatchTasksRequest, t.TaskEvent] = (
            channel.unary_stream(
                _path(_TASK, "WatchTasks"),
                request_serializer=t.WatchTasksRequest.SerializeToString,
                response_deserializer=t.TaskEvent.FromString,
            )
        )
        self.get_task_logs: grpc.aio.UnaryStreamMultiCallable[t.GetTaskLogsRequest, t.TaskLogs] = (
            channel.unary_stream(
                _path(_TASK, "GetTaskLogs"),
                request_serializer=t.GetTaskLogsRequest.SerializeToString,
                response_deserializer=t.TaskLogs.FromString,
            )
        )


class FleetStub:
    """``muster.v1.FleetService``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        f = fleet_pb2
        self.list_agents: grpc.aio.UnaryUnaryMultiCallable[f.ListAgentsRequest, f.ListAgentsResponse] = (
            _unary(channel, _FLEET, "ListAgents", f.ListAgentsRequest, f.ListAgentsResponse)
        )
        self.get_agent: grpc.aio.UnaryUnaryMultiCallable[f.GetAgentRequest, f.Agent] = _unary(
            channel, _FLEET, "GetAgent", f.GetAgentRequest, f.Agent
        )
        self.drain_agent: grpc.aio.UnaryUnaryMultiCallable[f.DrainAgentRequest, f.Agent] = _unary(
            channel, _FLEET, "DrainAgent", f.DrainAgentRequest, f.Agent
        )
        self.resume_agent: grpc.aio.UnaryUnaryMultiCallable[f.ResumeAgentRequest, f.Agent] = _unary(
            channel, _FLEET, "ResumeAgent", f.ResumeAgentRequest, f.Agent
        )
        self.get_server: grpc.aio.UnaryUnaryMultiCallable[f.GetServerRequest, f.Server] = _unary(
            channel, _FLEET, "GetServer", f.GetServerRequest, f.Server
        )


def connect_callable(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamStreamMultiCallable[agent_pb2.AgentMessage, agent_pb2.ServerMessage]:
    """``muster.v1.AgentService/Connect``."""
    return channel.stream_stream(
        _path(_AGENT, "Connect"),
        request_serializer=agent_pb2.AgentMessage.SerializeToString,
        response_deserializer=agent_pb2.ServerMessage.FromString,
    )
