"""The client against a real server: watches that resume, the sync
wrapper, logs, explain, and token authentication."""

from __future__ import annotations

import asyncio
import itertools
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
import pytest

import muster
from muster.v1 import task_pb2

from .conftest import Agents, MusterServer, Proxy, eventually

TOKEN = "py-sdk-test-bootstrap-token-0123456789abcdefghij"


async def test_a_watch_from_a_listings_sequence_misses_nothing_and_resumes_after_any_event(
    client: muster.Client,
) -> None:
    await client.submit("py-nobody")
    listing = await client.list()
    assert len(listing.tasks) == 1
    ids = [(await client.submit("py-nobody")).id for _ in range(20)]
    seen: list[muster.TaskEvent] = []
    async for event in client.watch(after_sequence=listing.sequence):
        seen.append(event)
        if len(seen) == 20:
            break
    assert [e.task_id for e in seen] == ids
    assert all(a.sequence < b.sequence for a, b in itertools.pairwise(seen))

    resumed = client.watch(after_sequence=seen[9].sequence)
    first = await anext(resumed)
    await resumed.aclose()  # type: ignore[attr-defined]
    assert first.sequence == seen[10].sequence


async def test_a_watch_reopens_after_a_cut_connection_without_gaps_or_duplicates(
    server: MusterServer, client: muster.Client, make_proxy: Callable[[str], Awaitable[Proxy]]
) -> None:
    proxy = await make_proxy(server.address)
    seen: list[muster.TaskEvent] = []
    async with muster.Client(proxy.endpoint) as watcher:

        async def watch() -> None:
            async for event in watcher.watch(capability="py-nobody", from_start=True):
                seen.append(event)

        watching = asyncio.create_task(watch())
        first = [(await client.submit("py-nobody")).id for _ in range(5)]

        async def seen_count(count: int) -> bool:
            return len(seen) >= count

        await eventually(lambda: seen_count(5), "the first five events")
        proxy.cut()
        second = [(await client.submit("py-nobody")).id for _ in range(5)]
        await eventually(lambda: seen_count(10), "the next five events after the cut")
        watching.cancel()
    assert [e.task_id for e in seen] == first + second
    assert all(a.sequence < b.sequence for a, b in itertools.pairwise(seen))


def listings_answered(server: MusterServer) -> int:
    """How many ListTasks calls the server has finished, from its metrics."""
    with urllib.request.urlopen(f"http://{server.http_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("muster_grpc_requests_total{") and "/ListTasks" in line
    )


async def test_a_live_only_watch_cut_before_its_first_event_misses_nothing(
    server: MusterServer, client: muster.Client, make_proxy: Callable[[str], Awaitable[Proxy]]
) -> None:
    proxy = await make_proxy(server.address)
    seen: list[muster.TaskEvent] = []
    async with muster.Client(proxy.endpoint) as watcher:

        async def watch() -> None:
            async for event in watcher.watch(capability="py-gap"):
                seen.append(event)

        watching = asyncio.create_task(watch())

        # The watch starts from a listing's sequence: once the server has
        # answered that listing, where the watch starts is fixed.
        async def pinned() -> bool:
            return await asyncio.to_thread(listings_answered, server) >= 1

        await eventually(pinned, "the watch to take its starting point")
        await asyncio.sleep(0.3)  # most likely the stream is open now; correct either way
        # Broken before any event, and kept broken while tasks are submitted.
        proxy.paused = True
        proxy.cut()
        missed = [(await client.submit("py-gap")).id for _ in range(3)]
        proxy.paused = False
        later = [(await client.submit("py-gap")).id for _ in range(2)]

        async def seen_count(count: int) -> bool:
            return len(seen) >= count

        await eventually(lambda: seen_count(5), "the events made while the watch was broken", 20)
        watching.cancel()
    assert [e.task_id for e in seen] == missed + later
    assert all(a.sequence < b.sequence for a, b in itertools.pairwise(seen))


async def test_a_request_over_the_servers_limit_is_resource_exhausted_naming_it_however_large(
    client: muster.Client,
) -> None:
    # The server's default max_message_bytes is 16 MiB; the SDK has no send
    # limit of its own, so even 80 MiB gets the server's answer.
    limit = 16 << 20
    for size in (limit + 1, 80 << 20):
        with pytest.raises(muster.RpcError) as raised:
            await client.submit("py-nobody", b"\0" * size)
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, raised.value)
        assert f"max_message_bytes ({limit} bytes)" in raised.value.message, (size, raised.value)
    assert (await client.submit("py-nobody")).id, "the server still serves"


async def test_logs_follow_a_running_task_until_it_ends(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    release = asyncio.Event()

    async def chatty(ctx: muster.TaskContext) -> None:
        ctx.log("one")
        await release.wait()
        ctx.log("two")

    agents.start(server.endpoint, {"py-chatty": chatty})
    submitted = await client.submit("py-chatty")
    lines: list[str] = []
    chunks = client.logs(submitted.id, follow=True)
    async for chunk in chunks:
        lines += [line.text for line in chunk.lines]
        if lines == ["one"]:
            release.set()
    assert lines == ["one", "two"]
    assert (await client.get(submitted.id)).state == task_pb2.TASK_STATE_SUCCEEDED


async def test_retry_requeues_a_failed_task_with_a_fresh_budget(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def once_bad(ctx: muster.TaskContext) -> str:
        if ctx.attempt == 1:
            raise muster.NonRetryable("the input was missing")
        return f"passed on attempt {ctx.attempt}"

    agents.start(server.endpoint, {"py-once-bad": once_bad})
    submitted = await client.submit("py-once-bad", max_attempts=1)
    failed = await client.wait(submitted.id, timeout=10)
    assert failed.state == task_pb2.TASK_STATE_FAILED
    retried = await client.retry(submitted.id)
    assert retried.state in (
        task_pb2.TASK_STATE_QUEUED,
        task_pb2.TASK_STATE_ASSIGNED,
        task_pb2.TASK_STATE_RUNNING,
    )
    done = await client.wait(submitted.id, timeout=10)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"passed on attempt 2"


def test_the_sync_client_submits_explains_cancels_waits_and_watches(server: MusterServer) -> None:
    with muster.SyncClient(server.endpoint) as client:
        queued = client.submit("py-nobody", "payload", priority="high", metadata={"team": "docs"})
        assert queued.spec.priority == task_pb2.PRIORITY_HIGH
        assert client.get(queued.id).state == task_pb2.TASK_STATE_QUEUED
        explanation = client.explain(queued.id)
        assert "no_agent_with_capability" in [r.code for r in explanation.reasons]
        client.cancel(queued.id, "not needed")
        done = client.wait(queued.id, timeout=10)
        assert done.state == task_pb2.TASK_STATE_CANCELLED
        listed = client.list(metadata={"team": "docs"})
        assert [t.id for t in listed.tasks] == [queued.id]
        states = []
        for event in client.watch(task_id=queued.id, from_start=True):
            states.append(event.state)
            if event.state == task_pb2.TASK_STATE_CANCELLED:
                break
        assert states == [task_pb2.TASK_STATE_QUEUED, task_pb2.TASK_STATE_CANCELLED]
        with pytest.raises(muster.RpcError) as missing:
            client.get("0" * 26)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_token_authenticated_server_serves_agents_and_clients_with_the_token(
    make_server: Callable[..., MusterServer], agents: Agents, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server("--auth", env={"MUSTER_BOOTSTRAP_TOKEN": TOKEN})
    monkeypatch.delenv("MUSTER_TOKEN", raising=False)

    async with muster.Client(server.endpoint) as anonymous:
        with pytest.raises(muster.RpcError) as refused:
            await anonymous.list()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def echo(ctx: muster.TaskContext) -> bytes:
        return ctx.payload

    # Without a token the first registration is refused for good.
    _, unauthenticated = agents.start(server.endpoint, {"py-echo": echo}, name="py-anonymous")
    with pytest.raises(muster.RpcError) as rejected:
        await asyncio.wait_for(unauthenticated, 10)
    assert rejected.value.code == grpc.StatusCode.UNAUTHENTICATED

    agents.start(server.endpoint, {"py-echo": echo}, token=TOKEN)
    monkeypatch.setenv("MUSTER_TOKEN", TOKEN)
    async with muster.Client(server.endpoint) as client:  # the token from MUSTER_TOKEN
        done = await client.wait((await client.submit("py-echo", b"secret work")).id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"secret work"
    assert done.submitted_by != ""


async def test_server_names_the_version_the_store_and_itself_as_leader(
    server: MusterServer, client: muster.Client
) -> None:
    info = await client.server()
    assert info.store == "sled"
    assert info.leader == server.endpoint
    assert info.leader_epoch == 0
    assert info.version
