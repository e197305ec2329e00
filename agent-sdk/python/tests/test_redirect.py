"""Leader redirects: a follower answers UNAVAILABLE naming the leader in
``muster-leader`` metadata, and the agent registers with the leader."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc

import muster
from muster.v1 import agent_pb2

from .conftest import Agents, MusterServer, wait_for_agents


async def test_an_agent_follows_a_followers_redirect_to_the_leader(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    redirected: list[str] = []

    async def not_the_leader(
        requests: AsyncIterator[agent_pb2.AgentMessage], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[agent_pb2.ServerMessage]:
        first = await anext(aiter(requests))
        redirected.append(first.register.name)
        context.set_trailing_metadata((("muster-leader", server.address),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        yield agent_pb2.ServerMessage()  # never reached: abort raises

    follower = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        not_the_leader,
        request_deserializer=agent_pb2.AgentMessage.FromString,
        response_serializer=agent_pb2.ServerMessage.SerializeToString,
    )
    follower.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("muster.v1.AgentService", {"Connect": handler}),)
    )
    port = follower.add_insecure_port("127.0.0.1:0")
    await follower.start()
    try:

        async def echo(ctx: muster.TaskContext) -> bytes:
            return ctx.payload

        # Slow backoff: only a redirect (followed at once) registers in time.
        agents.start(f"127.0.0.1:{port}", {"py-echo": echo}, name="py-redirected", reconnect_backoff=(30, 30))
        await wait_for_agents(client, "py-echo", 1)
        assert redirected == ["py-redirected"]
        done = await client.wait((await client.submit("py-echo", b"via the leader")).id, timeout=10)
        assert done.output == b"via the leader"
    finally:
        await follower.stop(None)


async def test_an_agent_moves_down_its_endpoint_list_when_one_is_down(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    with socket.socket() as probe:  # a port where nothing listens any more
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def echo(ctx: muster.TaskContext) -> bytes:
        return ctx.payload

    agents.start(
        [f"127.0.0.1:{port}", server.endpoint],
        {"py-echo": echo},
        name="py-listed",
        reconnect_backoff=(0.05, 0.1),
    )
    await wait_for_agents(client, "py-echo", 1)
    done = await client.wait((await client.submit("py-echo", b"second endpoint")).id, timeout=10)
    assert done.output == b"second endpoint"
