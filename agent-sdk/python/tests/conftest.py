"""Fixtures: a real ``muster serve`` process on free loopback ports with a
temporary data directory, clients and agents of the SDK under test, and a
TCP proxy that can cut connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import muster
from muster.v1 import fleet_pb2

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_ROOT.parent.parent
#: Short leases keep the fault tests fast: an isolated agent fences itself
#: after 2 s, a killed one is declared lost after 2 s.
LEASE_TTL = "2s"
HEARTBEAT = "400ms"


def muster_bin() -> str:
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO_ROOT / "target")
    path = os.environ.get("MUSTER_BIN") or str(Path(target) / "debug" / "muster")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no muster binary at {path}: build it with `cargo build -p muster` or set MUSTER_BIN")
    return path


class MusterServer:
    """A ``muster serve`` child process."""

    def __init__(self, data_dir: Path, extra: list[str], env: dict[str, str]) -> None:
        args = [
            muster_bin(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            *extra,
        ]
        if "--lease-ttl" not in extra:
            args += ["--lease-ttl", LEASE_TTL, "--heartbeat-interval", HEARTBEAT]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=None,
            env={**os.environ, "RUST_LOG": "warn", **env},
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        words = line.split()
        if "on" not in words:
            self.stop()
            raise RuntimeError(f"unexpected first line from muster serve: {line!r}")
        self.address = words[words.index("on") + 1]
        self.http_address = words[words.index("on", words.index("on") + 1) + 1]
        self.endpoint = f"http://{self.address}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., MusterServer]]:
    servers: list[MusterServer] = []

    def make(*extra: str, env: dict[str, str] | None = None) -> MusterServer:
        server = MusterServer(tmp_path / f"data-{len(servers)}", list(extra), env or {})
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., MusterServer]) -> MusterServer:
    return make_server()


@pytest.fixture
async def client(server: MusterServer) -> AsyncIterator[muster.Client]:
    async with muster.Client(server.endpoint) as c:
        yield c


class Agents:
    """In-process agents run by a test, stopped (drained) at teardown."""

    def __init__(self) -> None:
        self.running: list[tuple[muster.Agent, asyncio.Event, asyncio.Task[None]]] = []

    def start(
        self,
        server: str | list[str],
        handlers: dict[str, Callable[[muster.TaskContext], Awaitable[Any]]],
        name: str = "py-test",
        **options: Any,
    ) -> tuple[muster.Agent, asyncio.Task[None]]:
        options.setdefault("drain_grace", 2.0)
        agent = muster.Agent(name, server, **options)
        for capability, handler in handlers.items():
            agent.add_handler(capability, handler)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run_until(stop))
        self.running.append((agent, stop, task))
        return agent, task

    async def stop_all(self) -> None:
        for _, stop, _ in self.running:
            stop.set()
        for _, _, task in self.running:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 15)


@pytest.fixture
async def agents() -> AsyncIterator[Agents]:
    agents = Agents()
    yield agents
    await agents.stop_all()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Polls ``check`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for_state(
    client: muster.Client, task_id: str, state: int, timeout: float = 10.0
) -> muster.Task:
    found: list[muster.Task] = []

    async def check() -> bool:
        found[:] = [await client.get(task_id)]
        return found[0].state == state

    await eventually(check, f"task {task_id} to reach {muster.TaskState.Name(state)}", timeout)
    return found[0]


async def wait_for_agents(client: muster.Client, capability: str, count: int) -> None:
    async def check() -> bool:
        agents = await client.list_agents(capability)
        connected = [a for a in agents if a.state == fleet_pb2.AGENT_STATE_CONNECTED]
        return len(connected) >= count

    await eventually(check, f"{count} agents with {capability}")


class Proxy:
    """A TCP proxy in front of the server: ``cut`` resets every open
    connection, ``stall`` silently drops everything on the open ones (a
    half-open connection), and while ``paused`` new ones are refused."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.paused = False
        self.writers: list[asyncio.StreamWriter] = []
        self.stalled: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.endpoint = ""

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.paused:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if dst in self.stalled:
                        continue
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stall(self) -> None:
        self.stalled.update(self.writers)

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[[str], Awaitable[Proxy]]]:
    proxies: list[Proxy] = []

    async def make(upstream: str) -> Proxy:
        proxy = await Proxy(upstream).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


class AgentProcess:
    """``tests/agent_process.py`` as a child process (for kill -9 and SIGTERM)."""

    def __init__(self, endpoint: str, name: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).parent / "agent_process.py"),
                "--server",
                endpoint,
                "--name",
                name,
                *args,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"agent process did not exit within {timeout}s")
            await asyncio.sleep(0.05)
        return code


@pytest.fixture
def agent_processes() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(endpoint: str, name: str, *args: str) -> AgentProcess:
        process = AgentProcess(endpoint, name, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill9()
