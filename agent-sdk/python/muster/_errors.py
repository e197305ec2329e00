"""The SDK's exceptions: what a client call raises and what a handler raises
to fail its attempt."""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class MusterError(Exception):
    """Base of every error the SDK raises."""


class ConfigError(MusterError):
    """An agent or client was configured with settings it cannot run with."""


class ProtocolError(MusterError):
    """The server broke the protocol (an unexpected first message, a stream
    closed before registration)."""


class RpcError(MusterError):
    """The server answered with an error status.

    ``code`` is the gRPC status code (``grpc.StatusCode.NOT_FOUND``, ...) and
    ``message`` the server's text, which names the offending field and limit.
    """

    def __init__(self, code: grpc.StatusCode, message: str, leader: str | None = None) -> None:
        super().__init__(f"server returned {code.name}: {message}")
        self.code = code
        self.message = message
        #: The ``muster-leader`` a follower named when it answered UNAVAILABLE.
        self.leader = leader

    @classmethod
    def from_grpc(cls, err: grpc.aio.AioRpcError) -> RpcError:
        """Wraps a grpc error, keeping its code, details and leader hint."""
        return cls(err.code(), err.details() or "", leader_of(err))


def leader_of(err: grpc.aio.AioRpcError) -> str | None:
    """The raw ``muster-leader`` metadata of an UNAVAILABLE status, if any."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for metadata in (err.trailing_metadata(), err.initial_metadata()):
        # grpc.aio yields (key, value) pairs; the stubs type them otherwise.
        pairs: Iterable[tuple[str, str | bytes]] = metadata or ()  # type: ignore[assignment]
        for key, value in pairs:
            if key == "muster-leader":
                return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


class TaskError(MusterError):
    """Raised by a handler to fail its attempt with a chosen reason.

    ``retryable`` decides whether the task's retry policy may run it again;
    ``reason`` is a short machine-readable word shown in ``muster task get``.
    """

    def __init__(self, message: str, *, reason: str = "handler_error", retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable


class Retryable(TaskError):
    """A failure that may pass next time (a flaky dependency)."""

    def __init__(self, message: str, *, reason: str = "handler_error") -> None:
        super().__init__(message, reason=reason, retryable=True)


class NonRetryable(TaskError):
    """A failure that will not pass (bad input): the task fails for good."""

    def __init__(self, message: str, *, reason: str = "handler_error") -> None:
        super().__init__(message, reason=reason, retryable=False)


class Cancelled(TaskError):
    """The attempt must stop: raised by ``TaskContext.check_cancelled`` and
    ``TaskContext.run``. The runtime records the right outcome (cancelled,
    timed out, shut down) whatever the message says."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message, reason="cancelled", retryable=False)
