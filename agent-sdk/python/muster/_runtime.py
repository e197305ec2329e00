"""The session owner: one asyncio task holds all agent state and reacts to
the server, the handlers, the timers and the shutdown event, one event at a
time. Handlers never touch this state; they report through their context
(synchronous calls on the owner's loop) and their task's completion.

Invariants (the same as the Rust SDK's):
- A result (``Complete``/``Fail``) stays in ``unacked`` until the server
  answers ``Ack`` or ``Rejected`` for it, and is resent after every
  reconnect.
- ``running`` holds every handler until its task completes; entries whose
  results must be dropped are marked, not removed, so drain can wait for
  them.
- Without contact for the lease TTL the agent stops everything it holds:
  the server has given that work to someone else.
- An attempt's log lines go out in order, each at most once, and all before
  its result. Progress is coalesced to one report per ``PROGRESS_INTERVAL``
  per attempt; lines are sent at most once per ``LOG_INTERVAL`` per attempt,
  except at the end of the attempt and after reconnecting.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from ._backoff import jittered
from ._connection import Credentials
from ._context import Output, TaskContext
from ._errors import MusterError, RpcError, TaskError
from ._logs import AttemptKey, LogBuffer, batches
from ._metrics import CANCELLED, DISCARDED, FAILED, SUCCEEDED, AgentMetrics
from ._session import ConnectFailure, Session, leader_redirect, open_session
from ._trace import task_span
from .v1 import agent_pb2, task_pb2

log = logging.getLogger("muster.agent")

Handler = Callable[[TaskContext], Awaitable[Any]]

SDK_VERSION = "python-0.1.0"
#: Used until the server announces its own interval.
DEFAULT_HEARTBEAT = 5.0
#: How long cancelled handlers get to end once drain grace is over.
CANCEL_WAIT = 5.0
#: How long a draining agent waits for the server to acknowledge results.
FLUSH_WAIT = 5.0
#: Least time between two progress reports of one attempt.
PROGRESS_INTERVAL = 0.25
#: Least time between two sends of one attempt's log lines.
LOG_INTERVAL = 0.1
#: Consecutive redirects followed without backoff.
MAX_REDIRECTS = 3
#: Status codes of a first registration that retrying cannot fix.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True)
class Settings:
    """Everything the runtime needs, fixed when the agent starts."""

    name: str
    endpoints: list[str]
    capabilities: list[str]
    labels: dict[str, str]
    slots: int
    metrics_address: str
    drain_grace: float
    backoff_initial: float
    backoff_max: float
    credentials: Credentials


class Cause(enum.IntEnum):
    """Why an attempt's cancel event fired; a stronger cause replaces a weaker."""

    SHUTDOWN = 1  # the agent is shutting down: retry the work elsewhere
    SERVER = 2  # the server asked (cancelled, timed out)
    DISCARD = 3  # the attempt is no longer ours: drop its result


@dataclass
class Running:
    """A handler in flight."""

    task: asyncio.Task[Output]
    cancel_event: asyncio.Event
    capability: str
    logs: LogBuffer
    started: float
    cause: Cause | None = None
    progress_sent_at: float | None = None
    pending_progress: tuple[int, str] | None = None
    logs_sent_at: float | None = None

    def cancel(self, cause: Cause) -> None:
        self.cause = cause if self.cause is None else max(self.cause, cause)
        self.cancel_event.set()
        if self.discarded:
            self.logs.discard()

    @property
    def discarded(self) -> bool:
        return self.cause == Cause.DISCARD


@dataclass
class Unacked:
    """A result waiting for the server's acknowledgement, with the log lines
    that must precede it (sent once)."""

    result: agent_pb2.AgentMessage
    logs: list[agent_pb2.LogLines] = field(default_factory=list)

    def send(self, session: Session) -> None:
        for batch in self.logs:
            session.send(agent_pb2.AgentMessage(log=batch))
        self.logs = []
        session.send(self.result)


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # running work may finish until the deadline
    CANCELLING = "cancelling"  # running work was cancelled; may end until the deadline
    FLUSHING = "flushing"  # waiting for results to be acknowledged
    DONE = "done"


# ---- events posted to the owner ---------------------------------------------


@dataclass(frozen=True)
class _Connected:
    session: Session
    registered: agent_pb2.Registered


@dataclass(frozen=True)
class _ConnectFailed:
    failure: ConnectFailure


@dataclass(frozen=True)
class _Inbound:
    session: Session
    message: agent_pb2.ServerMessage


@dataclass(frozen=True)
class _Closed:
    session: Session
    error: BaseException | None


@dataclass(frozen=True)
class _HandlerEnded:
    key: AttemptKey
    task: asyncio.Task[Output]


@dataclass(frozen=True)
class _Shutdown:
    pass


@dataclass(frozen=True)
class _Wake:
    """A handler held back progress or log lines: recompute the next deadline."""


_Event = _Connected | _ConnectFailed | _Inbound | _Closed | _HandlerEnded | _Shutdown | _Wake


def lease_check_period(lease: float | None) -> float:
    """A tenth of the lease, between 10 ms and 1 s."""
    return 1.0 if lease is None else min(1.0, max(0.01, lease / 10))


def _duration(value: Any) -> float | None:
    seconds = value.seconds + value.nanos / 1e9
    return seconds if seconds > 0 else None


def _attempt(key: AttemptKey) -> agent_pb2.AttemptRef:
    return agent_pb2.AttemptRef(task_id=key[0], attempt=key[1])


def _fail(key: AttemptKey, reason: str, message: str, retryable: bool) -> agent_pb2.AgentMessage:
    failure = task_pb2.Failure(reason=reason, message=message, retryable=retryable)
    return agent_pb2.AgentMessage(fail=agent_pb2.Fail(attempt=_attempt(key), failure=failure))


def _progress(key: AttemptKey, percent: int, message: str) -> agent_pb2.AgentMessage:
    report = agent_pb2.ReportProgress(attempt=_attempt(key), percent=percent, message=message)
    return agent_pb2.AgentMessage(progress=report)


class Runtime:
    """All agent state, owned by the task running ``run``."""

    def __init__(self, settings: Settings, handlers: dict[str, Handler], metrics: AgentMetrics) -> None:
        self.settings = settings
        self.handlers = handlers
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._background: set[asyncio.Task[Any]] = set()

        self.session: Session | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._connecting_to = ""
        self._reconnect_at: float | None = None
        self._connect_failures = 0
        self._endpoint_index = 0
        self._preferred: str | None = None
        self._redirect: str | None = None
        self._redirects_in_row = 0
        self.has_registered = False
        self.agent_id = ""
        self._resume_token = ""
        self._heartbeat_interval = DEFAULT_HEARTBEAT
        self._lease_ttl: float | None = None
        self._last_contact = self._now()
        self.server_draining = False
        self._next_heartbeat = self._now() + DEFAULT_HEARTBEAT
        self._next_lease_check = self._now() + lease_check_period(None)

        self.running: dict[AttemptKey, Running] = {}
        self.unacked: dict[AttemptKey, Unacked] = {}
        self._progress_held = False
        self._logs_held = False

        self.phase = Phase.SERVING
        self._phase_deadline: float | None = None

    def _now(self) -> float:
        return self._loop.time()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- the loop -----------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        """Serves until ``shutdown`` is set and the drain completes. Raises
        only when the very first registration is refused for a reason retrying
        cannot fix (a bad name, missing or wrong credentials)."""
        log.info(
            "agent starting: name=%s capabilities=%s endpoints=%s slots=%d",
            self.settings.name,
            self.settings.capabilities,
            self.settings.endpoints,
            self.settings.slots,
        )

        async def watch_shutdown() -> None:
            await shutdown.wait()
            self._events.put_nowait(_Shutdown())

        watcher = self._spawn(watch_shutdown())
        try:
            self._start_connect()
            while self.phase != Phase.DONE:
                timeout = max(0.0, self._next_deadline() - self._now())
                try:
                    event: _Event | None = await asyncio.wait_for(self._events.get(), timeout)
                except TimeoutError:
                    event = None
                if event is not None:
                    self._on_event(event)
                self._on_timers(self._now())
                self._advance_phase()
                self.metrics.slots_busy.set(len(self.running))
                self.metrics.connected.set(1 if self.session is not None else 0)
        finally:
            watcher.cancel()
            await self._stop()

    async def _stop(self) -> None:
        self.metrics.slots_busy.set(0)
        self.metrics.connected.set(0)
        if self.unacked:
            log.warning(
                "stopping with %d unacknowledged results; the server will retry those tasks",
                len(self.unacked),
            )
        if self._connecting is not None:
            self._connecting.cancel()
        for running in self.running.values():
            running.task.cancel()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()
        pending = [task for task in self._background if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *(r.task for r in self.running.values()), return_exceptions=True)
        log.info("agent stopped")

    def _next_deadline(self) -> float:
        deadlines = [self._next_lease_check]
        if self.session is not None:
            deadlines.append(self._next_heartbeat)
        if self._reconnect_at is not None:
            deadlines.append(self._reconnect_at)
        if self._phase_deadline is not None:
            deadlines.append(self._phase_deadline)
        if self._progress_held or self._logs_held:
            deadlines.append(self._now() + min(PROGRESS_INTERVAL, LOG_INTERVAL) / 2)
        return min(deadlines)

    def _on_event(self, event: _Event) -> None:
        match event:
            case _Connected(session, registered):
                self._connecting = None
                self._on_registered(session, registered)
            case _ConnectFailed(failure):
                self._connecting = None
                self._on_connect_failure(failure)
            case _Inbound(session, message) if session is self.session:
                self._last_contact = self._now()
                self._on_server_message(message)
            case _Closed(session, error) if session is self.session:
                self._on_closed(error)
            case _HandlerEnded(key, task):
                self._on_handler_end(key, task)
            case _Shutdown():
                if self.phase == Phase.SERVING:
                    self._start_drain()
            case _Wake():
                pass  # the loop recomputes its deadline after every event
            case _:
                pass  # an event of a session already replaced

    def _on_timers(self, now: float) -> None:
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._start_connect()
        if self.session is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_interval
            self.session.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
        if now >= self._next_lease_check:
            self._next_lease_check = now + lease_check_period(self._lease_ttl)
            self._check_lease(now)
        if self._progress_held:
            self._flush_progress(now)
        if self._logs_held:
            self._flush_logs(now)

    # ---- connection ---------------------------------------------------------

    def _schedule_connect(self) -> None:
        if self.session is not None or self._connecting is not None or self._reconnect_at is not None:
            return
        delay = (
            0.0
            if self._redirect is not None
            else jittered(self._connect_failures, self.settings.backoff_initial, self.settings.backoff_max)
        )
        log.debug("reconnecting in %.3fs", delay)
        self._reconnect_at = self._now() + delay

    def _start_connect(self) -> None:
        """Dials the redirect target, else the last session's endpoint, else
        the current endpoint of the list. The ``Register`` is built now, so
        it names exactly the attempts held at this moment."""
        if self.session is not None or self._connecting is not None:
            return
        endpoint = self._redirect or self._preferred
        self._redirect = None
        if endpoint is None:
            endpoints = self.settings.endpoints
            endpoint = endpoints[self._endpoint_index % len(endpoints)]
        log.debug("connecting to %s", endpoint)
        self._connecting_to = endpoint
        register = self._make_register()

        async def connect() -> None:
            try:
                session, registered = await open_session(endpoint, register, self.settings.credentials)
            except ConnectFailure as failure:
                self._events.put_nowait(_ConnectFailed(failure))
                return
            except (OSError, grpc.RpcError, MusterError) as err:
                self._events.put_nowait(_ConnectFailed(ConnectFailure(MusterError(str(err)))))
                return
            self._events.put_nowait(_Connected(session, registered))

        self._connecting = asyncio.create_task(connect())

    def _make_register(self) -> agent_pb2.Register:
        held = sorted(
            {key for key, running in self.running.items() if not running.discarded} | set(self.unacked)
        )
        return agent_pb2.Register(
            name=self.settings.name,
            capabilities=self.settings.capabilities,
            labels=self.settings.labels,
            slots=self.settings.slots,
            sdk_version=SDK_VERSION,
            resume_token=self._resume_token,
            held_attempts=[_attempt(key) for key in held],
            metrics_address=self.settings.metrics_address,
        )

    def _on_connect_failure(self, failure: ConnectFailure) -> None:
        error = failure.error
        if not self.has_registered and isinstance(error, RpcError) and error.code in REFUSALS:
            log.error("registration refused by %s: %s", self._connecting_to, error)
            raise error
        self._connect_failures += 1
        self._preferred = None
        if failure.redirect is not None and self._redirects_in_row < MAX_REDIRECTS:
            self._redirects_in_row += 1
            log.info("redirected to the leader %s", failure.redirect)
            self._redirect = failure.redirect
        else:
            self._redirects_in_row = 0
            self._endpoint_index += 1
        log.warning(
            "registration with %s failed (%d in a row): %s",
            self._connecting_to,
            self._connect_failures,
            error,
        )
        self._schedule_connect()

    def _on_registered(self, session: Session, registered: agent_pb2.Registered) -> None:
        if self.has_registered:
            self.metrics.reconnects.inc()
        now = self._now()
        self._last_contact = now
        self._connect_failures = 0
        self._redirects_in_row = 0
        self.has_registered = True
        self._heartbeat_interval = _duration(registered.heartbeat_interval) or DEFAULT_HEARTBEAT
        self._lease_ttl = _duration(registered.lease_ttl)
        if self._lease_ttl is None:
            log.warning("server announced no lease ttl; self-fencing is off")
        self.agent_id = registered.agent_id
        self._resume_token = registered.resume_token
        if registered.resumed:
            log.info(
                "session resumed: agent_id=%s endpoint=%s running=%d unacked=%d",
                self.agent_id,
                session.endpoint,
                len(self.running),
                len(self.unacked),
            )
        else:
            log.info(
                "registered: agent_id=%s endpoint=%s heartbeat=%.3fs lease_ttl=%ss",
                self.agent_id,
                session.endpoint,
                self._heartbeat_interval,
                self._lease_ttl,
            )
        for dropped in registered.dropped_attempts:
            key = (dropped.task_id, dropped.attempt)
            self.unacked.pop(key, None)
            if key in self.running:
                self.running[key].cancel(Cause.DISCARD)
            log.warning("server no longer assigns %s/%d to us; stopping it", key[0], key[1])
        for unacked in self.unacked.values():
            unacked.send(session)
        for key, running in self.running.items():
            if not running.discarded:
                self._send_logs(session, key, running, now)
        if self.phase != Phase.SERVING:
            session.send(agent_pb2.AgentMessage(drain=agent_pb2.DrainSelf()))
        self._preferred = session.endpoint
        self.session = session
        self._next_heartbeat = now + self._heartbeat_interval
        self._next_lease_check = now + lease_check_period(self._lease_ttl)
        self._spawn(self._read_loop(session))

    async def _read_loop(self, session: Session) -> None:
        try:
            while True:
                message = await session.read()
                if message is None:
                    self._events.put_nowait(_Closed(session, None))
                    return
                self._events.put_nowait(_Inbound(session, message))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._events.put_nowait(_Closed(session, err))

    def _on_closed(self, error: BaseException | None) -> None:
        if error is None:
            self._lose_session("server closed the stream")
        elif isinstance(error, grpc.aio.AioRpcError):
            status = RpcError.from_grpc(error)
            leader = leader_redirect(status, self.settings.credentials.uses_tls)
            if leader is not None:
                log.info("redirected to the leader %s", leader)
                self._redirect = leader
            self._lose_session(f"stream failed with {status.code.name}: {status.message}")
        else:
            self._lose_session(f"stream failed: {error}")

    def _lose_session(self, reason: str) -> None:
        """Drops the session and reconnects."""
        session, self.session = self.session, None
        if session is None:
            return
        log.warning("session with %s lost: %s; reconnecting", session.endpoint, reason)
        self._spawn(session.close())
        self._schedule_connect()

    def _check_lease(self, now: float) -> None:
        """Reconnects a session that went silent, and self-fences once the
        silence reaches the lease TTL."""
        lease = self._lease_ttl
        if lease is None:
            return
        silence = now - self._last_contact
        # A healthy server answers every heartbeat, so two missed answers
        # mean a half-open connection that no error will ever report.
        stale_after = min(max(self._heartbeat_interval * 2, lease / 2), lease)
        if self.session is not None and silence >= stale_after:
            self._lose_session(f"no message from the server for {silence * 1000:.0f}ms")
        if silence < lease:
            return
        held = [key for key, running in self.running.items() if not running.discarded]
        if not held and not self.unacked:
            return
        log.error(
            "lost contact with the server for the lease ttl (%.1fs); stopping all work "
            "(the server has reassigned it): running=%d unacked=%d",
            lease,
            len(held),
            len(self.unacked),
        )
        for running in self.running.values():
            running.cancel(Cause.DISCARD)
        self.unacked.clear()

    # ---- server messages ----------------------------------------------------

    def _on_server_message(self, message: agent_pb2.ServerMessage) -> None:
        kind = message.WhichOneof("msg")
        if kind == "assign":
            self._on_assign(message.assign)
        elif kind == "cancel":
            key = (message.cancel.attempt.task_id, message.cancel.attempt.attempt)
            if key in self.running:
                log.info("cancel requested for %s/%d: %s", key[0], key[1], message.cancel.reason)
                self.running[key].cancel(Cause.SERVER)
        elif kind == "ack":
            self.unacked.pop((message.ack.attempt.task_id, message.ack.attempt.attempt), None)
        elif kind == "rejected":
            rejected = message.rejected
            key = (rejected.attempt.task_id, rejected.attempt.attempt)
            self.unacked.pop(key, None)
            if key in self.running:
                self.running[key].cancel(Cause.DISCARD)
            log.warning(
                "server rejected a report of %s/%d (code %d): %s", *key, rejected.code, rejected.message
            )
        elif kind == "drain":
            if message.drain.draining != self.server_draining:
                log.info("server set this agent's drain state to %s", message.drain.draining)
            self.server_draining = message.drain.draining
        elif kind == "registered":
            log.warning("unexpected registered on an established session ignored")

    def _on_assign(self, assignment: agent_pb2.Assignment) -> None:
        """Accepts and starts an assignment; the server is the authority on slots."""
        if not assignment.HasField("attempt"):
            log.warning("assignment without an attempt ignored")
            return
        key = (assignment.attempt.task_id, assignment.attempt.attempt)
        self._send(agent_pb2.AgentMessage(accept=agent_pb2.Accept(attempt=assignment.attempt)))
        if key in self.running:
            return  # a duplicate of a running attempt
        if key in self.unacked:
            if self.session is not None:
                self.unacked[key].send(self.session)
            return
        handler = self.handlers.get(assignment.capability)
        if handler is None:
            log.warning("no handler for the assigned capability %s", assignment.capability)
            message = f"no handler for capability {assignment.capability}"
            self._record_result(key, _fail(key, "no_handler", message, True), [])
            return
        cancel_event = asyncio.Event()
        logs = LogBuffer(
            notify=lambda: self._on_logs_ready(key),
            on_drop=lambda count: self.metrics.log_lines_dropped.inc(count),
        )
        context = TaskContext(assignment, self, logs, cancel_event)
        span: dict[str, str | int] = {
            "muster.task_id": key[0],
            "muster.attempt": key[1],
            "muster.capability": assignment.capability,
        }
        task = asyncio.create_task(_invoke(handler, context, span), name=f"muster.task {key[0]}/{key[1]}")
        task.add_done_callback(lambda done: self._events.put_nowait(_HandlerEnded(key, done)))
        self.running[key] = Running(task, cancel_event, assignment.capability, logs, self._now())

    # ---- handlers -----------------------------------------------------------

    def report_progress(self, key: AttemptKey, percent: int, message: str) -> None:
        """Sends a progress report now, or holds it back (the latest wins) when
        the attempt reported less than ``PROGRESS_INTERVAL`` ago; reports made
        while disconnected are dropped."""
        running = self.running.get(key)
        if self.session is None or running is None or running.discarded:
            return
        now = self._now()
        if running.progress_sent_at is not None and now - running.progress_sent_at < PROGRESS_INTERVAL:
            running.pending_progress = (percent, message)
            self._hold(progress=True)
            return
        running.progress_sent_at = now
        running.pending_progress = None
        self.session.send(_progress(key, percent, message))

    def _flush_progress(self, now: float) -> None:
        held = False
        for key, running in self.running.items():
            if running.pending_progress is None:
                continue
            if running.progress_sent_at is None or now - running.progress_sent_at >= PROGRESS_INTERVAL:
                percent, message = running.pending_progress
                running.pending_progress = None
                running.progress_sent_at = now
                self._send(_progress(key, percent, message))
            else:
                held = True
        self._progress_held = held

    def _on_logs_ready(self, key: AttemptKey) -> None:
        running = self.running.get(key)
        if self.session is None or running is None or running.discarded:
            return
        now = self._now()
        if running.logs_sent_at is None or now - running.logs_sent_at >= LOG_INTERVAL:
            self._send_logs(self.session, key, running, now)
        else:
            self._hold(logs=True)

    def _hold(self, progress: bool = False, logs: bool = False) -> None:
        """Marks held-back work; a handler calls this while the owner may be
        waiting with a far deadline, so the owner is woken to shorten it."""
        wake = (progress and not self._progress_held) or (logs and not self._logs_held)
        self._progress_held |= progress
        self._logs_held |= logs
        if wake:
            self._events.put_nowait(_Wake())

    def _flush_logs(self, now: float) -> None:
        held = False
        if self.session is not None:
            for key, running in self.running.items():
                if running.discarded or not running.logs.has_pending():
                    continue
                if running.logs_sent_at is None or now - running.logs_sent_at >= LOG_INTERVAL:
                    self._send_logs(self.session, key, running, now)
                else:
                    held = True
        self._logs_held = held

    @staticmethod
    def _send_logs(session: Session, key: AttemptKey, running: Running, now: float) -> None:
        taken = running.logs.take()
        if taken is not None:
            for batch in batches(key, *taken):
                session.send(agent_pb2.AgentMessage(log=batch))
            running.logs_sent_at = now

    def _on_handler_end(self, key: AttemptKey, task: asyncio.Task[Output]) -> None:
        running = self.running.get(key)
        if running is None or running.task is not task:
            return
        del self.running[key]
        if running.pending_progress is not None and not running.discarded:
            self._send(_progress(key, *running.pending_progress))
        closed = running.logs.close()
        logs = batches(key, *closed) if closed is not None else []
        elapsed = self._now() - running.started
        error: BaseException | None = None
        output: Output | None = None
        if task.cancelled():
            error = asyncio.CancelledError("the handler was cancelled")
        elif (error := task.exception()) is None:
            output = task.result()
        if running.discarded:
            label = DISCARDED
        elif output is not None:
            label = SUCCEEDED
        elif running.cause == Cause.SERVER:
            label = CANCELLED
        else:
            label = FAILED
        self.metrics.observe_handler(running.capability, label, elapsed)
        if running.discarded:
            log.debug("result of dropped attempt %s/%d discarded", *key)
            return
        if error is not None and not isinstance(error, TaskError | asyncio.CancelledError):
            # The server records only the type and text; keep the traceback here.
            log.warning("handler of %s/%d raised", key[0], key[1], exc_info=error)
        if output is not None:
            complete = agent_pb2.Complete(
                attempt=_attempt(key), output=output.data, content_type=output.content_type
            )
            result = agent_pb2.AgentMessage(complete=complete)
        else:
            result = self._failure_of(key, running.cause, error)
        log.debug("handler of %s/%d finished: %s in %.3fs", key[0], key[1], label, elapsed)
        self._record_result(key, result, logs)

    @staticmethod
    def _failure_of(
        key: AttemptKey, cause: Cause | None, error: BaseException | None
    ) -> agent_pb2.AgentMessage:
        text = str(error) if error is not None else ""
        if cause == Cause.SERVER:
            return _fail(key, "cancelled", text or "cancelled", False)
        if cause == Cause.SHUTDOWN:
            return _fail(key, "agent_shutdown", f"agent shut down before the handler finished: {text}", True)
        if isinstance(error, TaskError):
            return _fail(key, error.reason, error.message, error.retryable)
        name = type(error).__name__ if error is not None else "error"
        return _fail(key, "handler_error", f"{name}: {text}" if text else name, True)

    def _record_result(
        self, key: AttemptKey, result: agent_pb2.AgentMessage, logs: list[agent_pb2.LogLines]
    ) -> None:
        """Keeps a result until acknowledged; sends it now (after the attempt's
        last log lines) if connected, else after the next registration."""
        unacked = Unacked(result, logs)
        if self.session is not None:
            unacked.send(self.session)
        self.unacked[key] = unacked

    def _send(self, message: agent_pb2.AgentMessage) -> None:
        if self.session is not None:
            self.session.send(message)

    # ---- shutdown -----------------------------------------------------------

    def _start_drain(self) -> None:
        log.info(
            "draining: finishing %d running handlers for up to %.1fs, taking no more work",
            len(self.running),
            self.settings.drain_grace,
        )
        self._send(agent_pb2.AgentMessage(drain=agent_pb2.DrainSelf()))
        self.phase = Phase.DRAINING
        self._phase_deadline = self._now() + self.settings.drain_grace

    def _advance_phase(self) -> None:
        while True:
            now = self._now()
            deadline = self._phase_deadline if self._phase_deadline is not None else float("inf")
            if self.phase in (Phase.SERVING, Phase.DONE):
                return
            if self.phase in (Phase.DRAINING, Phase.CANCELLING) and not self.running:
                self.phase, self._phase_deadline = Phase.FLUSHING, now + FLUSH_WAIT
            elif self.phase == Phase.DRAINING and now >= deadline:
                log.warning("drain grace over; cancelling %d running handlers", len(self.running))
                for running in self.running.values():
                    running.cancel(Cause.SHUTDOWN)
                self.phase, self._phase_deadline = Phase.CANCELLING, now + CANCEL_WAIT
            elif self.phase == Phase.CANCELLING and now >= deadline:
                log.warning("%d handlers ignored cancellation; abandoning them", len(self.running))
                for running in self.running.values():
                    running.task.cancel()
                self.running.clear()
                self.phase, self._phase_deadline = Phase.FLUSHING, now + FLUSH_WAIT
            elif self.phase == Phase.FLUSHING and (not self.unacked or now >= deadline):
                self.phase, self._phase_deadline = Phase.DONE, None
            else:
                return


async def _invoke(handler: Handler, context: TaskContext, span: dict[str, str | int]) -> Output:
    """Runs one handler inside its trace span and converts what it returns."""
    with task_span(context.trace_context, span):
        value = await handler(context)
    return Output.of(value)
