import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from muster.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttemptRef(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "accept", "progress", "heartbeat", "complete", "fail", "drain", "log")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    FAIL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    register: Register
    accept: Accept
    progress: ReportProgress
    heartbeat: Heartbeat
    complete: Complete
    fail: Fail
    drain: DrainSelf
    log: LogLines
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., accept: _Optional[_Union[Accept, _Mapping]] = ..., progress: _Optional[_Union[ReportProgress, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., complete: _Optional[_Union[Complete, _Mapping]] = ..., fail: _Optional[_Union[Fail, _Mapping]] = ..., drain: _Optional[_Union[DrainSelf, _Mapping]] = ..., log: _Optional[_Union[LogLines, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("name", "capabilities", "labels", "slots", "sdk_version", "resume_token", "held_attempts", "metrics_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SDK_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HELD_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    slots: int
    sdk_version: str
    resume_token: str
    held_attempts: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    metrics_address: str
    def __init__(self, name: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., slots: _Optional[int] = ..., sdk_version: _Optional[str] = ..., resume_token: _Optional[str] = ..., held_attempts: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class Accept(_message.Message):
    __slots__ = ("attempt",)
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ...) -> None: ...

class ReportProgress(_message.Message):
    __slots__ = ("attempt", "percent", "message")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    percent: int
    message: str
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., percent: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Complete(_message.Message):
    __slots__ = ("attempt", "output", "content_type")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    output: bytes
    content_type: str
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., output: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class Fail(_message.Message):
    __slots__ = ("attempt", "failure")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    failure: _task_pb2.Failure
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., failure: _Optional[_Union[_task_pb2.Failure, _Mapping]] = ...) -> None: ...

class LogLines(_message.Message):
    __slots__ = ("attempt", "lines", "dropped")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    lines: _containers.RepeatedCompositeFieldContainer[_task_pb2.LogLine]
    dropped: int
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., lines: _Optional[_Iterable[_Union[_task_pb2.LogLine, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class DrainSelf(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("registered", "assign", "cancel", "ack", "rejected", "heartbeat", "drain")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assign: Assignment
    cancel: CancelAttempt
    ack: Ack
    rejected: Rejected
    heartbeat: Heartbeat
    drain: DrainState
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assign: _Optional[_Union[Assignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelAttempt, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., drain: _Optional[_Union[DrainState, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("agent_id", "resume_token", "resumed", "heartbeat_interval", "lease_ttl", "dropped_attempts")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    resume_token: str
    resumed: bool
    heartbeat_interval: _duration_pb2.Duration
    lease_ttl: _duration_pb2.Duration
    dropped_attempts: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    def __init__(self, agent_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dropped_attempts: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("attempt", "capability", "payload", "content_type", "metadata", "queue", "priority", "deadline", "timeout", "trace_context", "parent_outputs")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARENT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    capability: str
    payload: bytes
    content_type: str
    metadata: _containers.ScalarMap[str, str]
    queue: str
    priority: _task_pb2.Priority
    deadline: _timestamp_pb2.Timestamp
    timeout: _duration_pb2.Duration
    trace_context: _containers.ScalarMap[str, str]
    parent_outputs: _containers.RepeatedCompositeFieldContainer[ParentOutput]
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., capability: _Optional[str] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., queue: _Optional[str] = ..., priority: _Optional[_Union[_task_pb2.Priority, str]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., parent_outputs: _Optional[_Iterable[_Union[ParentOutput, _Mapping]]] = ...) -> None: ...

class ParentOutput(_message.Message):
    __slots__ = ("key", "task_id", "output", "content_type")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    task_id: str
    output: bytes
    content_type: str
    def __init__(self, key: _Optional[str] = ..., task_id: _Optional[str] = ..., output: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class CancelAttempt(_message.Message):
    __slots__ = ("attempt", "reason", "grace")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    reason: str
    grace: _duration_pb2.Duration
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., reason: _Optional[str] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("attempt",)
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("attempt", "code", "message")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    attempt: AttemptRef
    code: int
    message: str
    def __init__(self, attempt: _Optional[_Union[AttemptRef, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DrainState(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...
