"""``Client`` (asyncio) and ``SyncClient``: the submitter's and operator's
view of a Muster server, plus ``task()`` to build a ``TaskSpec``."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import json as jsonlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.duration_pb2 import Duration

from ._backoff import jittered
from ._connection import Credentials, normalize_endpoint, open_channel
from ._errors import ProtocolError, RpcError
from ._rpc import FleetStub, TaskStub
from ._trace import inject
from .v1 import fleet_pb2, task_pb2

log = logging.getLogger("muster.client")

T = TypeVar("T")

#: Backoff between watch reconnects.
WATCH_BACKOFF = (0.1, 5.0)
#: States a task never leaves.
TERMINAL_STATES = frozenset(
    {task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED, task_pb2.TASK_STATE_CANCELLED}
)
#: Failures worth reopening a watch for: network trouble, a server restarting.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_PRIORITIES = {
    "low": task_pb2.PRIORITY_LOW,
    "normal": task_pb2.PRIORITY_NORMAL,
    "high": task_pb2.PRIORITY_HIGH,
    "critical": task_pb2.PRIORITY_CRITICAL,
}
_UNSET: Any = object()


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def task(
    capability: str,
    payload: bytes | str | None = None,
    *,
    json: Any = _UNSET,
    content_type: str = "",
    queue: str = "",
    priority: str | int = "normal",
    metadata: Mapping[str, str] | None = None,
    selector: Mapping[str, str] | None = None,
    timeout: float | None = None,
    queue_timeout: float | None = None,
    max_attempts: int | None = None,
    initial_backoff: float | None = None,
    max_backoff: float | None = None,
    idempotency_key: str = "",
    key: str = "",
    depends_on: Iterable[str] = (),
    not_before: dt.datetime | None = None,
    locks: Iterable[str | tuple[str, str]] = (),
    concurrency: tuple[str, int] | None = None,
    trace_context: Mapping[str, str] | None = None,
) -> task_pb2.TaskSpec:
    """A ``TaskSpec`` for ``capability``. The payload is raw bytes, text
    (``text/plain``) or, with ``json=``, a value encoded as JSON. Durations
    are in seconds. ``key`` names the task inside one ``submit_graph`` so
    ``depends_on`` can refer to it (or to existing task ids). ``locks`` are
    names (exclusive) or ``(name, "shared"|"exclusive")`` pairs."""
    spec = task_pb2.TaskSpec(
        capability=capability,
        selector=dict(selector or {}),
        queue=queue,
        metadata=dict(metadata or {}),
        idempotency_key=idempotency_key,
        key=key,
        depends_on=list(depends_on),
        trace_context=dict(trace_context or {}),
    )
    if json is not _UNSET:
        spec.payload = jsonlib.dumps(json).encode()
        spec.content_type = content_type or "application/json"
    elif isinstance(payload, str):
        spec.payload = payload.encode()
        spec.content_type = content_type or "text/plain; charset=utf-8"
    elif payload is not None:
        spec.payload = payload
        spec.content_type = content_type
    if isinstance(priority, str):
        if priority.lower() not in _PRIORITIES:
            raise ValueError(f"priority {priority!r} must be one of {', '.join(_PRIORITIES)}")
        spec.priority = _PRIORITIES[priority.lower()]
    else:
        spec.priority = cast(task_pb2.Priority, priority)
    if timeout is not None:
        spec.timeout.CopyFrom(_duration(timeout))
    if queue_timeout is not None:
        spec.queue_timeout.CopyFrom(_duration(queue_timeout))
    if max_attempts is not None:
        spec.retry.max_attempts = max_attempts
    if initial_backoff is not None:
        spec.retry.initial_backoff.CopyFrom(_duration(initial_backoff))
    if max_backoff is not None:
        spec.retry.max_backoff.CopyFrom(_duration(max_backoff))
    if not_before is not None:
        spec.not_before.FromDatetime(not_before.astimezone(dt.UTC).replace(tzinfo=None))
    for lock in locks:
        name, mode = (lock, "exclusive") if isinstance(lock, str) else lock
        lock_mode = task_pb2.LOCK_MODE_SHARED if mode == "shared" else task_pb2.LOCK_MODE_EXCLUSIVE
        spec.locks.append(task_pb2.Lock(name=name, mode=lock_mode))
    if concurrency is not None:
        spec.concurrency.key, spec.concurrency.max = concurrency
    return spec


async def _rpc(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        raise RpcError.from_grpc(err) from None


class Client:
    """An asyncio handle on one server. Use ``async with Client(url) as c``
    or call ``close()``. Credentials come from the arguments or the
    ``MUSTER_TOKEN`` / ``MUSTER_TLS_*`` environment."""

    def __init__(
        self,
        server: str = "http://127.0.0.1:7070",
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.credentials = credentials or Credentials.create(token, tls_ca, tls_cert, tls_key)
        self.endpoint = normalize_endpoint(server, self.credentials.uses_tls)
        self._channel = open_channel(self.endpoint, self.credentials)
        self._metadata = self.credentials.metadata()
        self._tasks = TaskStub(self._channel)
        self._fleet = FleetStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    # ---- tasks --------------------------------------------------------------

    async def submit(
        self, spec: task_pb2.TaskSpec | str, payload: bytes | str | None = None, **fields: Any
    ) -> task_pb2.Task:
        """Submits one task: a ``TaskSpec``, or a capability plus ``task()``'s
        arguments. Returns it as created (or the existing task of a reused
        idempotency key)."""
        if isinstance(spec, str):
            spec = task(spec, payload, **fields)
        elif payload is not None or fields:
            raise TypeError("pass either a TaskSpec or a capability with fields, not both")
        response = await self.submit_graph([spec])
        if not response.tasks:
            raise ProtocolError("submit response holds no task")
        return response.tasks[0]

    async def submit_graph(self, specs: Sequence[task_pb2.TaskSpec]) -> task_pb2.SubmitResponse:
        """Submits several tasks atomically (all or none); with ``key`` and
        ``depends_on`` they form a workflow (``response.workflow_id``). Each
        spec without a ``traceparent`` gets the current OpenTelemetry span's."""
        request = task_pb2.SubmitRequest()
        for spec in specs:
            copy = request.tasks.add()
            copy.CopyFrom(spec)
            inject(copy.trace_context)
        return await _rpc(self._tasks.submit(request, metadata=self._metadata))

    async def get(self, task_id: str) -> task_pb2.Task:
        return await _rpc(self._tasks.get_task(task_pb2.GetTaskRequest(id=task_id), metadata=self._metadata))

    async def list(
        self,
        *,
        states: Iterable[task_pb2.TaskState] = (),
        queue: str = "",
        capability: str = "",
        metadata: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> task_pb2.ListTasksResponse:
        """One page of tasks, oldest first; pass ``next_page_token`` back for the next."""
        request = task_pb2.ListTasksRequest(
            states=list(states),
            queue=queue,
            capability=capability,
            metadata=dict(metadata or {}),
            page_size=page_size,
            page_token=page_token,
        )
        return await _rpc(self._tasks.list_tasks(request, metadata=self._metadata))

    async def list_all(self, **filters: Any) -> AsyncIterator[task_pb2.Task]:
        """Every task matching ``list``'s filters, page after page."""
        token = ""
        while True:
            page = await self.list(page_token=token, **filters)
            for item in page.tasks:
                yield item
            token = page.next_page_token
            if not token or not page.tasks:
                return

    async def cancel(self, task_id: str, reason: str = "") -> task_pb2.Task:
        """Asks a task to stop; ``reason`` is recorded as the failure message."""
        request = task_pb2.CancelTaskRequest(id=task_id, reason=reason)
        return await _rpc(self._tasks.cancel_task(request, metadata=self._metadata))

    async def retry(self, task_id: str) -> task_pb2.Task:
        """Requeues a failed or cancelled task with a fresh attempt budget."""
        return await _rpc(
            self._tasks.retry_task(task_pb2.RetryTaskRequest(id=task_id), metadata=self._metadata)
        )

    async def explain(self, task_id: str) -> task_pb2.Explanation:
        """Why a task is not running, from the scheduler's live state."""
        request = task_pb2.ExplainTaskRequest(id=task_id)
        return await _rpc(self._tasks.explain_task(request, metadata=self._metadata))

    async def get_workflow(self, workflow_id: str) -> task_pb2.Workflow:
        request = task_pb2.GetWorkflowRequest(id=workflow_id)
        return await _rpc(self._tasks.get_workflow(request, metadata=self._metadata))

    async def cancel_workflow(self, workflow_id: str, reason: str = "") -> task_pb2.Workflow:
        request = task_pb2.CancelWorkflowRequest(id=workflow_id, reason=reason)
        return await _rpc(self._tasks.cancel_workflow(request, metadata=self._metadata))

    async def watch(
        self,
        *,
        task_id: str = "",
        workflow_id: str = "",
        queue: str = "",
        capability: str = "",
        states: Iterable[task_pb2.TaskState] = (),
        after_sequence: int = 0,
        from_start: bool = False,
        resume: bool = True,
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """Task events in sequence order, after ``after_sequence`` (0 with
        ``from_start=False``: live only, from when the watch starts). With
        ``resume`` a broken stream is reopened after the last event seen,
        with jittered backoff, for as long as the failure looks transient,
        so no event is missed or seen twice. Resume a later watch from an
        event's ``sequence``."""
        last = after_sequence
        # A live-only watch that breaks before its first event has no event
        # to resume after, so it starts from the sequence a listing reports
        # (the server's current one) instead: reopened, it replays what
        # happened while it was broken.
        pinned = not (resume and last == 0 and not from_start)
        failures = 0
        while True:
            error: RpcError | None = None
            if not pinned:
                try:
                    listing = await self._tasks.list_tasks(
                        task_pb2.ListTasksRequest(page_size=1), metadata=self._metadata
                    )
                    last, pinned = listing.sequence, True
                except grpc.aio.AioRpcError as err:
                    error = RpcError.from_grpc(err)
            if pinned:
                request = task_pb2.WatchTasksRequest(
                    task_id=task_id,
                    workflow_id=workflow_id,
                    queue=queue,
                    capability=capability,
                    states=list(states),
                    after_sequence=last,
                    from_start=from_start and last == 0,
                )
                call = self._tasks.watch_tasks(request, metadata=self._metadata)
                try:
                    async for event in call:
                        failures = 0
                        last = max(last, event.sequence)
                        yield event
                except grpc.aio.AioRpcError as err:
                    error = RpcError.from_grpc(err)
                finally:
                    call.cancel()
            if not resume or (error is not None and error.code not in TRANSIENT):
                if error is not None:
                    raise error
                return
            log.debug("watch broke (%s), reopening after sequence %d", error or "stream ended", last)
            await asyncio.sleep(jittered(failures, *WATCH_BACKOFF))
            failures += 1

    async def wait(self, task_id: str, timeout: float | None = None) -> task_pb2.Task:
        """Waits until the task is finished (succeeded, failed or cancelled)
        and returns it; raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            return await self._wait(task_id)

    async def _wait(self, task_id: str) -> task_pb2.Task:
        while True:
            current = await self.get(task_id)
            if current.state in TERMINAL_STATES:
                return current
            # Every event after the one the read reflects is replayed, so a
            # transition between the read and the watch cannot be missed.
            events = self.watch(task_id=task_id, after_sequence=current.sequence)
            try:
                async for event in events:
                    if event.kind == task_pb2.EVENT_KIND_STATE and event.state in TERMINAL_STATES:
                        break
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    async def logs(
        self, task_id: str, attempt: int = 0, follow: bool = False
    ) -> AsyncIterator[task_pb2.TaskLogs]:
        """The log lines agents sent for a task, attempt by attempt, in chunks
        (``attempt`` 0: every attempt). With ``follow``, new lines arrive as
        they are sent and the stream ends once the task is finished and its
        last attempt's log is complete."""
        request = task_pb2.GetTaskLogsRequest(task_id=task_id, attempt=attempt, follow=follow)
        call = self._tasks.get_task_logs(request, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as err:
            raise RpcError.from_grpc(err) from None
        finally:
            call.cancel()

    # ---- fleet --------------------------------------------------------------

    async def server(self) -> fleet_pb2.Server:
        """The server answering: its version, its store (``sled`` or
        ``postgres``) and the endpoint and lease epoch of the replica that
        leads."""
        return await _rpc(self._fleet.get_server(fleet_pb2.GetServerRequest(), metadata=self._metadata))

    async def list_agents(self, capability: str = "") -> builtins.list[fleet_pb2.Agent]:
        request = fleet_pb2.ListAgentsRequest(capability=capability)
        return list((await _rpc(self._fleet.list_agents(request, metadata=self._metadata))).agents)

    async def get_agent(self, agent_id: str) -> fleet_pb2.Agent:
        return await _rpc(
            self._fleet.get_agent(fleet_pb2.GetAgentRequest(id=agent_id), metadata=self._metadata)
        )

    async def drain_agent(self, agent_id: str) -> fleet_pb2.Agent:
        request = fleet_pb2.DrainAgentRequest(id=agent_id)
        return await _rpc(self._fleet.drain_agent(request, metadata=self._metadata))

    async def resume_agent(self, agent_id: str) -> fleet_pb2.Agent:
        request = fleet_pb2.ResumeAgentRequest(id=agent_id)
        return await _rpc(self._fleet.resume_agent(request, metadata=self._metadata))


class SyncClient:
    """A blocking ``Client`` for scripts and notebooks: the same methods,
    run on a private event loop in a background thread (so it also works
    where an event loop is already running). ``watch`` and ``logs`` return
    ordinary iterators. Call ``close()`` or use ``with``."""

    def __init__(self, server: str = "http://127.0.0.1:7070", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="muster-sync-client", daemon=True)
        self._thread.start()

        async def make() -> Client:
            return Client(server, **kwargs)

        try:
            self._client = self._run(make())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(anext(iterator))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            self._run(iterator.aclose())  # type: ignore[attr-defined]

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        self._run(self._client.close())
        self._stop_loop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, spec: task_pb2.TaskSpec | str, payload: bytes | str | None = None, **fields: Any
    ) -> task_pb2.Task:
        return self._run(self._client.submit(spec, payload, **fields))

    def submit_graph(self, specs: Sequence[task_pb2.TaskSpec]) -> task_pb2.SubmitResponse:
        return self._run(self._client.submit_graph(specs))

    def get(self, task_id: str) -> task_pb2.Task:
        return self._run(self._client.get(task_id))

    def server(self) -> fleet_pb2.Server:
        return self._run(self._client.server())

    def list(self, **filters: Any) -> task_pb2.ListTasksResponse:
        return self._run(self._client.list(**filters))

    def wait(self, task_id: str, timeout: float | None = None) -> task_pb2.Task:
        return self._run(self._client.wait(task_id, timeout))

    def watch(self, **filters: Any) -> Iterator[task_pb2.TaskEvent]:
        return self._iterate(self._client.watch(**filters))

    def logs(self, task_id: str, attempt: int = 0, follow: bool = False) -> Iterator[task_pb2.TaskLogs]:
        return self._iterate(self._client.logs(task_id, attempt, follow))

    def cancel(self, task_id: str, reason: str = "") -> task_pb2.Task:
        return self._run(self._client.cancel(task_id, reason))

    def retry(self, task_id: str) -> task_pb2.Task:
        return self._run(self._client.retry(task_id))

    def explain(self, task_id: str) -> task_pb2.Explanation:
        return self._run(self._client.explain(task_id))

    def get_workflow(self, workflow_id: str) -> task_pb2.Workflow:
        return self._run(self._client.get_workflow(workflow_id))

    def list_agents(self, capability: str = "") -> builtins.list[fleet_pb2.Agent]:
        return self._run(self._client.list_agents(capability))
