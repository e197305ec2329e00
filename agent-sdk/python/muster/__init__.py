"""Muster's Python SDK: asyncio agents (``Agent``) and clients (``Client``,
``SyncClient``) for the Muster control plane.

The wire types generated from Muster's proto files are in ``muster.v1``
(``muster.v1.task_pb2.Task``, ...); the ones most code needs are re-exported
here.
"""

from ._agent import Agent
from ._client import TERMINAL_STATES, Client, SyncClient, task
from ._connection import Credentials
from ._context import Output, TaskContext
from ._errors import (
    Cancelled,
    ConfigError,
    MusterError,
    NonRetryable,
    ProtocolError,
    Retryable,
    RpcError,
    TaskError,
)
from .v1.fleet_pb2 import Agent as AgentInfo
from .v1.task_pb2 import Task, TaskEvent, TaskLogs, TaskSpec, TaskState

__version__ = "0.1.0"

__all__ = [
    "TERMINAL_STATES",
    "Agent",
    "AgentInfo",
    "Cancelled",
    "Client",
    "ConfigError",
    "Credentials",
    "MusterError",
    "NonRetryable",
    "Output",
    "ProtocolError",
    "Retryable",
    "RpcError",
    "SyncClient",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskEvent",
    "TaskLogs",
    "TaskSpec",
    "TaskState",
    "task",
]
