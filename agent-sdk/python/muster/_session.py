"""Opening one agent session: dial an endpoint, send ``Register``, wait for
``Registered``. Everything after that belongs to the runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from ._connection import Credentials, normalize_endpoint, open_channel
from ._errors import MusterError, ProtocolError, RpcError
from ._rpc import connect_callable
from .v1 import agent_pb2

log = logging.getLogger("muster.agent")

#: How long dialling plus registration may take before the attempt fails.
REGISTER_TIMEOUT = 10.0


class ConnectFailure(Exception):
    """Why a session could not be opened, and the leader a follower named."""

    def __init__(self, error: MusterError, redirect: str | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.redirect = redirect


def leader_redirect(error: RpcError, tls: bool) -> str | None:
    """The normalised leader endpoint an UNAVAILABLE status points to."""
    if error.code != grpc.StatusCode.UNAVAILABLE or not error.leader:
        return None
    try:
        return normalize_endpoint(error.leader, tls)
    except MusterError:
        return None


class Session:
    """An established session: a queue of outbound messages drained by a
    writer task (so the owner never blocks on the network) and the inbound
    stream."""

    def __init__(
        self,
        endpoint: str,
        channel: grpc.aio.Channel,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.ServerMessage],
    ) -> None:
        self.endpoint = endpoint
        self._channel = channel
        self._call = call
        self._outbound: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop())

    def send(self, message: agent_pb2.AgentMessage) -> None:
        """Queues ``message``; a failure to write means the stream is closing,
        which the reader reports, and results are resent after reconnecting."""
        self._outbound.put_nowait(message)

    async def _write_loop(self) -> None:
        while True:
            message = await self._outbound.get()
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
                log.debug("message dropped, stream closing: %s", err)
                return

    async def read(self) -> agent_pb2.ServerMessage | None:
        """The next server message; ``None`` when the server closed the stream."""
        message = await self._call.read()
        if message is EOF:
            return None
        assert isinstance(message, agent_pb2.ServerMessage)
        return message

    async def close(self) -> None:
        """Stops writing and closes the connection (half-closing first)."""
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._call.cancel()
        await self._channel.close(None)


async def open_session(
    endpoint: str, register: agent_pb2.Register, credentials: Credentials
) -> tuple[Session, agent_pb2.Registered]:
    """Dials ``endpoint``, registers and returns the session with the server's
    ``Registered`` answer; raises ``ConnectFailure``."""
    channel = open_channel(endpoint, credentials)
    try:
        async with asyncio.timeout(REGISTER_TIMEOUT):
            call = connect_callable(channel)(None, metadata=credentials.metadata())
            await call.write(agent_pb2.AgentMessage(register=register))
            first = await call.read()
    except TimeoutError:
        await channel.close(None)
        raise ConnectFailure(
            ProtocolError(f"no registration answer within {REGISTER_TIMEOUT:.0f}s")
        ) from None
    except grpc.aio.AioRpcError as err:
        await channel.close(None)
        error = RpcError.from_grpc(err)
        raise ConnectFailure(error, leader_redirect(error, credentials.uses_tls)) from None
    except BaseException:
        await channel.close(None)
        raise
    if first is EOF or not isinstance(first, agent_pb2.ServerMessage):
        await channel.close(None)
        raise ConnectFailure(ProtocolError("stream closed before registration"))
    if first.WhichOneof("msg") != "registered":
        await channel.close(None)
        raise ConnectFailure(
            ProtocolError(f"expected registered as the first message, got {first.WhichOneof('msg')}")
        )
    return Session(endpoint, channel, call), first.registered
