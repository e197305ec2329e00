"""What a handler sees (``TaskContext``) and what it returns (``Output`` or
any value that converts to one)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ._errors import Cancelled, NonRetryable
from ._logs import AttemptKey, LogBuffer, split_lines, truncate_utf8
from .v1 import agent_pb2, task_pb2

#: Longest progress message sent, in bytes; longer ones are cut.
MAX_PROGRESS_MESSAGE = 1024

T = TypeVar("T")


class ProgressSink(Protocol):
    """Where a context's progress reports go (the session owner)."""

    def report_progress(self, key: AttemptKey, percent: int, message: str) -> None: ...


@dataclass(frozen=True)
class Output:
    """A handler's result, stored as the task's output."""

    data: bytes = b""
    content_type: str = ""

    @classmethod
    def json(cls, value: Any) -> Output:
        """``value`` encoded as JSON (``application/json``)."""
        try:
            data = json.dumps(value).encode()
        except (TypeError, ValueError) as err:
            raise NonRetryable(f"cannot encode output as json: {err}", reason="invalid_output") from err
        return cls(data, "application/json")

    @classmethod
    def text(cls, text: str) -> Output:
        """UTF-8 text (``text/plain; charset=utf-8``)."""
        return cls(text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def of(cls, value: Any) -> Output:
        """What a handler's return value means: ``None`` is no output, ``bytes``
        are ``application/octet-stream``, ``str`` is text, an ``Output`` is
        itself, anything else is encoded as JSON."""
        if value is None:
            return cls()
        if isinstance(value, Output):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            return cls(bytes(value), "application/octet-stream")
        if isinstance(value, str):
            return cls.text(value)
        return cls.json(value)


class TaskContext:
    """One attempt of one task, as handed to a handler.

    Execution is at-least-once: key side effects by ``task_id``. The
    ``cancelled`` event fires when the attempt must stop (cancel requested,
    timeout, the agent shutting down or losing its lease).
    """

    def __init__(
        self,
        assignment: agent_pb2.Assignment,
        progress: ProgressSink,
        logs: LogBuffer,
        cancelled: asyncio.Event,
    ) -> None:
        self._assignment = assignment
        self._progress = progress
        self._logs = logs
        #: Set when this attempt must stop.
        self.cancelled = cancelled
        self.task_id: str = assignment.attempt.task_id
        #: The attempt number, from 1; higher means earlier attempts failed or were lost.
        self.attempt: int = assignment.attempt.attempt
        self.capability: str = assignment.capability
        self.payload: bytes = assignment.payload
        self.content_type: str = assignment.content_type
        self.metadata: Mapping[str, str] = dict(assignment.metadata)
        #: The W3C trace context (``traceparent``, ``tracestate``) of the submitter.
        self.trace_context: Mapping[str, str] = dict(assignment.trace_context)
        self.queue: str = assignment.queue
        self.priority: task_pb2.Priority = assignment.priority
        #: When the server times this attempt out (UTC); work past it is wasted.
        self.deadline: dt.datetime | None = (
            assignment.deadline.ToDatetime(dt.UTC) if assignment.HasField("deadline") else None
        )
        #: Outputs of the tasks this one depended on, in the order they finished.
        self.parent_outputs: list[agent_pb2.ParentOutput] = list(assignment.parent_outputs)

    @property
    def key(self) -> AttemptKey:
        return (self.task_id, self.attempt)

    def text(self) -> str:
        """The payload decoded as UTF-8; invalid bytes fail the task for good."""
        try:
            return self.payload.decode()
        except UnicodeDecodeError as err:
            raise NonRetryable(f"invalid payload: {err}", reason="invalid_payload") from err

    def json(self) -> Any:
        """The payload decoded as JSON; a payload that does not decode is the
        submitter's mistake, so the failure is not retryable (``invalid_payload``)."""
        try:
            return json.loads(self.payload)
        except ValueError as err:
            raise NonRetryable(f"invalid payload: {err}", reason="invalid_payload") from err

    def parent_output(self, key: str) -> bytes | None:
        """The output of the dependency with this key (or task id)."""
        for parent in self.parent_outputs:
            if key in (parent.key, parent.task_id):
                return parent.output
        return None

    def parent_json(self, key: str) -> Any:
        """The JSON output of the dependency with this key, decoded."""
        data = self.parent_output(key)
        if data is None:
            raise NonRetryable(f"no dependency with key '{key}'", reason="invalid_payload")
        try:
            return json.loads(data)
        except ValueError as err:
            raise NonRetryable(
                f"output of '{key}' is not the expected JSON: {err}", reason="invalid_payload"
            ) from err

    async def progress(self, percent: int, message: str = "") -> None:
        """Reports progress (``percent`` clamped to 0..100). Best effort: reports
        are coalesced to a few a second and dropped while disconnected; they
        never fail the handler."""
        self._progress.report_progress(
            self.key, max(0, min(100, int(percent))), truncate_utf8(message, MAX_PROGRESS_MESSAGE)
        )

    def log(self, line: str) -> None:
        """Adds a line to this attempt's live log (``muster task logs ID --follow``).

        Text with newlines becomes several lines, lines are cut to 16 KiB.
        Never blocks and never fails: lines wait in a 1 MiB buffer per
        attempt, sent in batches a few times a second and kept through a
        disconnection; when full, the oldest are dropped and counted. Lines
        logged before the handler returns reach the server before its result.
        """
        self.log_stream(task_pb2.LOG_STREAM_LOG, line)

    def log_stream(self, stream: task_pb2.LogStream, line: str) -> None:
        """Like ``log``, marking the lines as a child process's stdout or stderr."""
        self._logs.push(stream, split_lines(line))

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raises ``Cancelled`` when the attempt must stop, for loops that poll."""
        if self.cancelled.is_set():
            raise Cancelled()

    async def wait_cancelled(self) -> None:
        """Returns once the attempt must stop."""
        await self.cancelled.wait()

    async def run(self, work: Awaitable[T] | Callable[[], Awaitable[T]]) -> T:
        """Runs ``work`` until it finishes or the attempt must stop; then the
        work is cancelled (``asyncio.CancelledError`` inside it) and
        ``Cancelled`` is raised."""
        awaitable = work() if callable(work) else work
        job: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.cancelled.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {job, stop}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if job.done():
            return job.result()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        raise Cancelled()

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id!r}, attempt={self.attempt}, capability={self.capability!r}, "
            f"payload_len={len(self.payload)}, cancelled={self.is_cancelled()})"
        )
