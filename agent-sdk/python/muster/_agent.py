"""``Agent``: how an agent author declares handlers and runs the process
that serves them."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, start_http_server

from ._connection import Credentials, normalize_endpoint
from ._errors import ConfigError
from ._metrics import AgentMetrics
from ._runtime import Handler, Runtime, Settings

log = logging.getLogger("muster.agent")

H = TypeVar("H", bound=Handler)

DEFAULT_SLOTS = 4
DEFAULT_DRAIN_GRACE = 30.0
DEFAULT_BACKOFF = (0.1, 5.0)
MAX_NAME_LEN = 128
#: What the server accepts for agent and capability names (``Register.name``
#: in the proto): ASCII letters, digits and ``._:/-``, starting with a letter
#: or digit, at most the server's default ``max_name_len`` characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_CAPABILITY = _NAME


class Agent:
    """An agent process: handlers by capability, run with ``await agent.run()``.

    ``server`` is one endpoint or a list tried in order (``http://host:port``,
    ``https://host:port``, or ``host:port``); a follower's redirect to the
    leader is followed. Credentials come from ``token``/``tls_*`` or the
    ``MUSTER_TOKEN`` / ``MUSTER_TLS_CA`` / ``MUSTER_TLS_CERT`` /
    ``MUSTER_TLS_KEY`` environment.

    ``metrics_listen`` (``"127.0.0.1:0"`` picks a free port) serves
    ``/metrics`` with the ``muster_agent_*`` families and the author's own
    (register them in ``agent.registry``), and announces the bound address
    at registration so Prometheus finds it through the server's HTTP-SD.
    """

    def __init__(
        self,
        name: str,
        server: str | Iterable[str],
        *,
        slots: int = DEFAULT_SLOTS,
        labels: Mapping[str, str] | None = None,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        metrics_listen: str | None = None,
        metrics_address: str | None = None,
        registry: CollectorRegistry | None = None,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
        reconnect_backoff: tuple[float, float] = DEFAULT_BACKOFF,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"agent name {name!r} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._:/-], "
                "starting with a letter or digit"
            )
        if slots < 1:
            raise ConfigError("slots must be at least 1")
        self.credentials = credentials or Credentials.create(token, tls_ca, tls_cert, tls_key)
        raw = [server] if isinstance(server, str) else list(server)
        if not raw:
            raise ConfigError("no server endpoint configured")
        self.endpoints = [normalize_endpoint(e, self.credentials.uses_tls) for e in raw]
        self.name = name
        self.slots = slots
        self.labels = dict(labels or {})
        self.metrics_listen = metrics_listen
        self.metrics_address = metrics_address or ""
        #: The agent's Prometheus registry; add your own families here.
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.drain_grace = drain_grace
        initial = max(0.001, reconnect_backoff[0])
        self.backoff = (initial, max(initial, reconnect_backoff[1]))
        self.handlers: dict[str, Handler] = {}
        self.metrics = AgentMetrics(self.registry)
        self.metrics.slots.set(slots)
        #: Set while ``run`` serves, to stop it from code (like SIGTERM).
        self._shutdown: asyncio.Event | None = None
        self._runtime: Runtime | None = None

    def handler(self, capability: str) -> Callable[[H], H]:
        """Decorator: runs the coroutine function for every task of ``capability``."""

        def register(fn: H) -> H:
            self.add_handler(capability, fn)
            return fn

        return register

    def add_handler(self, capability: str, fn: Handler) -> None:
        """Runs ``fn`` (an ``async def`` taking a ``TaskContext``) for every task
        of ``capability``; the agent advertises exactly its handlers' capabilities."""
        if not _CAPABILITY.fullmatch(capability):
            raise ConfigError(
                f"capability {capability!r} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._:/-], "
                "starting with a letter or digit"
            )
        if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)):
            raise ConfigError(f"the handler of {capability!r} must be an async function")
        self.handlers[capability] = fn
        self.metrics.init_capability(capability)

    @property
    def agent_id(self) -> str:
        """The id the server gave this agent ('' before registration)."""
        return self._runtime.agent_id if self._runtime else ""

    @property
    def connected(self) -> bool:
        return self._runtime is not None and self._runtime.session is not None

    def stop(self) -> None:
        """Starts the drain, like SIGTERM."""
        if self._shutdown is not None:
            self._shutdown.set()

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT, then drains: running handlers get
        ``drain_grace`` to finish and their results are delivered before this
        returns. A second signal stops at once (the server retries the
        abandoned work once the lease runs out)."""
        loop = asyncio.get_running_loop()
        shutdown = asyncio.Event()
        serving = asyncio.ensure_future(self.run_until(shutdown))
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("shutdown signal received, draining")
                shutdown.set()
            else:
                log.warning("second signal received, exiting without draining")
                serving.cancel()

        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                log.warning("cannot listen for %s; stop the agent with agent.stop()", sig.name)
        try:
            await serving
        except asyncio.CancelledError:
            if signals < 2:
                raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def run_until(self, shutdown: asyncio.Event) -> None:
        """Serves until ``shutdown`` is set, then drains like ``run``; no
        signal handling, for programs that own their shutdown."""
        if not self.handlers:
            raise ConfigError("no handler registered")
        self._shutdown = shutdown
        http_server = None
        metrics_address = self.metrics_address
        if self.metrics_listen is not None:
            host, _, port = self.metrics_listen.rpartition(":")
            try:
                http_server, _thread = start_http_server(int(port), host or "0.0.0.0", self.registry)
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot serve metrics on {self.metrics_listen}: {err}") from err
            bound = f"{host or '0.0.0.0'}:{http_server.server_port}"
            metrics_address = metrics_address or bound
            log.info("serving agent metrics at http://%s/metrics", bound)
        settings = Settings(
            name=self.name,
            endpoints=self.endpoints,
            capabilities=sorted(self.handlers),
            labels=self.labels,
            slots=self.slots,
            metrics_address=metrics_address,
            drain_grace=self.drain_grace,
            backoff_initial=self.backoff[0],
            backoff_max=self.backoff[1],
            credentials=self.credentials,
        )
        self._runtime = Runtime(settings, dict(self.handlers), self.metrics)
        try:
            await self._runtime.run(shutdown)
        finally:
            if http_server is not None:
                await asyncio.to_thread(http_server.shutdown)
                http_server.server_close()

    def __repr__(self) -> str:
        return (
            f"Agent(name={self.name!r}, endpoints={self.endpoints!r}, capabilities={sorted(self.handlers)!r})"
        )
