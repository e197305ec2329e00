"""Fault tests: real processes killed and signalled, real connections cut."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import muster
from muster.v1 import fleet_pb2, task_pb2

from .conftest import AgentProcess, Agents, MusterServer, Proxy, eventually, wait_for_agents, wait_for_state


async def agent_running(client: muster.Client, task_id: str) -> str:
    """The name of the agent running the task's live attempt."""
    task = await wait_for_state(client, task_id, task_pb2.TASK_STATE_RUNNING)
    return task.attempts[-1].agent_name


async def test_an_agent_killed_mid_task_hands_the_task_to_another_agent(
    server: MusterServer,
    client: muster.Client,
    agents: Agents,
    agent_processes: Callable[..., AgentProcess],
) -> None:
    doomed = agent_processes(server.endpoint, "py-doomed")
    await wait_for_agents(client, "py-slow", 1)
    submitted = await client.submit("py-slow", "30")
    assert await agent_running(client, submitted.id) == "py-doomed"
    doomed.kill9()

    async def quick(ctx: muster.TaskContext) -> str:
        return "done by py-survivor"

    agents.start(server.endpoint, {"py-slow": quick}, name="py-survivor")
    done = await client.wait(submitted.id, timeout=30)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"done by py-survivor"
    assert done.attempts[0].agent_name == "py-doomed"
    assert done.attempts[0].failure.reason == "agent_lost"
    assert done.attempts[-1].agent_name == "py-survivor"


async def test_a_stream_cut_and_resumed_within_the_lease_runs_the_task_once(
    make_server: Callable[..., MusterServer],
    agents: Agents,
    make_proxy: Callable[[str], Awaitable[Proxy]],
) -> None:
    # A lease a busy machine reconnects well within (the default test lease
    # is 2 s): what this proves is that the session resumes and the task
    # runs once, not how fast the agent comes back.
    server = make_server("--lease-ttl", "15s", "--heartbeat-interval", "1s")
    proxy = await make_proxy(server.address)
    async with muster.Client(server.endpoint) as client:
        runs = 0
        release = asyncio.Event()

        async def work(ctx: muster.TaskContext) -> str:
            nonlocal runs
            runs += 1
            ctx.log("before the cut")
            await release.wait()
            ctx.log("after the cut")
            return "done"

        agent, _ = agents.start(
            proxy.endpoint, {"py-work": work}, name="py-flaky-net", reconnect_backoff=(0.05, 0.2)
        )
        submitted = await client.submit("py-work")
        await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
        [info] = await client.list_agents("py-work")

        # Refuse reconnects until the server has seen the break, so the test
        # cannot miss the short disconnected window.
        proxy.paused = True
        proxy.cut()

        async def agent_state(state: int) -> bool:
            return (await client.get_agent(info.id)).state == state

        await eventually(
            lambda: agent_state(fleet_pb2.AGENT_STATE_DISCONNECTED), "the server to see the break", 10
        )
        proxy.paused = False
        await eventually(lambda: agent_state(fleet_pb2.AGENT_STATE_CONNECTED), "the agent to resume", 10)
        assert agent.agent_id == info.id, "the session was resumed, not replaced"
        release.set()
        done = await client.wait(submitted.id, timeout=20)
        assert done.state == task_pb2.TASK_STATE_SUCCEEDED
        assert done.attempt == 1, "the same attempt completed"
        assert runs == 1, "no second execution"
        lines = [line.text async for chunk in client.logs(submitted.id) for line in chunk.lines]
        assert lines == ["before the cut", "after the cut"]


async def test_an_isolated_agent_fences_itself_and_the_task_moves_on(
    server: MusterServer,
    client: muster.Client,
    agents: Agents,
    make_proxy: Callable[[str], Awaitable[Proxy]],
) -> None:
    proxy = await make_proxy(server.address)
    fenced = asyncio.Event()

    async def stuck(ctx: muster.TaskContext) -> str:
        await ctx.wait_cancelled()
        fenced.set()
        return "finished after fencing"

    agents.start(proxy.endpoint, {"py-work": stuck}, name="py-isolated")
    submitted = await client.submit("py-work")
    await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
    proxy.paused = True
    proxy.cut()
    # The lease is 2 s: the handler must be told to stop about then.
    await asyncio.wait_for(fenced.wait(), 6)

    async def healthy(ctx: muster.TaskContext) -> str:
        return "b"

    agents.start(server.endpoint, {"py-work": healthy}, name="py-healthy")
    done = await client.wait(submitted.id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"b", "the fenced attempt's result was dropped"
    assert done.attempts[0].failure.reason == "agent_lost"
    assert done.attempts[-1].agent_name == "py-healthy"


async def test_sigterm_drains_the_agent_letting_its_running_task_finish(
    server: MusterServer,
    client: muster.Client,
    agent_processes: Callable[..., AgentProcess],
) -> None:
    draining = agent_processes(server.endpoint, "py-draining")
    await wait_for_agents(client, "py-slow", 1)
    running = await client.submit("py-slow", "1.5")
    assert await agent_running(client, running.id) == "py-draining"
    draining.signal(signal.SIGTERM)
    [info] = await client.list_agents("py-slow")

    async def drained() -> bool:
        return (await client.get_agent(info.id)).state == fleet_pb2.AGENT_STATE_DRAINING

    await eventually(drained, "the server to see the drain", 5)
    later = await client.submit("py-slow", "0")
    assert await draining.wait(timeout=15) == 0, "the agent exits cleanly once its work is done"
    done = await client.get(running.id)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"done by py-draining"
    assert done.attempt == 1
    queued = await client.get(later.id)
    assert queued.state == task_pb2.TASK_STATE_QUEUED, "a draining agent takes no new work"


async def test_a_result_made_while_disconnected_is_sent_after_reconnecting(
    server: MusterServer,
    client: muster.Client,
    agents: Agents,
    make_proxy: Callable[[str], Awaitable[Proxy]],
) -> None:
    proxy = await make_proxy(server.address)
    release = asyncio.Event()
    finished = asyncio.Event()
    runs = 0

    async def work(ctx: muster.TaskContext) -> str:
        nonlocal runs
        runs += 1
        await release.wait()
        finished.set()
        ctx.log("made while disconnected")
        return "kept until acknowledged"

    agent, _ = agents.start(
        proxy.endpoint, {"py-work": work}, name="py-offline", reconnect_backoff=(0.05, 0.2)
    )
    submitted = await client.submit("py-work")
    await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
    proxy.paused = True
    proxy.cut()
    await eventually(lambda: _not_connected(agent), "the agent to see the break", 5)
    release.set()
    await finished.wait()
    assert (await client.get(submitted.id)).state == task_pb2.TASK_STATE_RUNNING, "nothing reached the server"
    proxy.paused = False
    done = await client.wait(submitted.id, timeout=10)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"kept until acknowledged"
    assert (done.attempt, runs) == (1, 1)
    lines = [line.text async for chunk in client.logs(submitted.id) for line in chunk.lines]
    assert lines == ["made while disconnected"]


async def _not_connected(agent: muster.Agent) -> bool:
    return not agent.connected


async def _connected(agent: muster.Agent) -> bool:
    return agent.connected


async def test_a_silently_stalled_stream_is_replaced_and_resumed_without_a_second_run(
    server: MusterServer,
    client: muster.Client,
    agents: Agents,
    make_proxy: Callable[[str], Awaitable[Proxy]],
) -> None:
    proxy = await make_proxy(server.address)
    release = asyncio.Event()
    runs = 0

    async def work(ctx: muster.TaskContext) -> str:
        nonlocal runs
        runs += 1
        await release.wait()
        return "done"

    agent, _ = agents.start(
        proxy.endpoint, {"py-work": work}, name="py-stalled", reconnect_backoff=(0.05, 0.2)
    )
    submitted = await client.submit("py-work")
    await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
    agent_id = agent.agent_id
    # No error ever reaches the agent: only the server's silence (its
    # heartbeat answers stop) tells it the connection is dead.
    proxy.stall()
    await eventually(lambda: _reconnected(agent, proxy), "the agent to open a new connection", 5)
    release.set()
    done = await client.wait(submitted.id, timeout=10)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert (done.attempt, runs) == (1, 1)
    assert agent.agent_id == agent_id, "the session was resumed"


async def _reconnected(agent: muster.Agent, proxy: Proxy) -> bool:
    return agent.connected and any(w not in proxy.stalled for w in proxy.writers)


async def test_an_idle_agent_keeps_its_session_with_heartbeats(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def echo(ctx: muster.TaskContext) -> bytes:
        return ctx.payload

    agent, _ = agents.start(server.endpoint, {"py-echo": echo}, name="py-idle")
    await eventually(lambda: _connected(agent), "the agent to register")
    agent_id = agent.agent_id
    await asyncio.sleep(3)  # longer than the 2 s lease: only heartbeats keep the session
    [info] = await client.list_agents("py-echo")
    assert (info.id, info.state) == (agent_id, fleet_pb2.AGENT_STATE_CONNECTED)
    done = await client.wait((await client.submit("py-echo", b"still here")).id, timeout=10)
    assert done.attempts[0].agent_id == agent_id


async def test_work_still_running_when_the_drain_grace_ends_is_cancelled_and_retried(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    stopped = asyncio.Event()

    async def stubborn(ctx: muster.TaskContext) -> str:
        await ctx.wait_cancelled()
        stopped.set()
        raise muster.Cancelled("told to stop")

    agent, running = agents.start(server.endpoint, {"py-work": stubborn}, name="py-leaving", drain_grace=0.3)
    submitted = await client.submit("py-work", max_attempts=3, initial_backoff=0.05)
    await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
    agent.stop()
    await asyncio.wait_for(running, 10)
    assert stopped.is_set(), "the handler was cancelled once the grace ran out"

    async def willing(ctx: muster.TaskContext) -> str:
        return "finished elsewhere"

    agents.start(server.endpoint, {"py-work": willing}, name="py-staying")
    done = await client.wait(submitted.id, timeout=10)
    assert done.output == b"finished elsewhere"
    first = done.attempts[0]
    assert (first.agent_name, first.failure.reason, first.failure.retryable) == (
        "py-leaving",
        "agent_shutdown",
        True,
    )
