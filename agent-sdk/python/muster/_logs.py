"""Live task logs on the agent's side: the bounded buffer each attempt's
lines wait in, and the batching of buffered lines into ``LogLines``
messages.

A handler never waits on the network to log: a line goes into its attempt's
buffer, and the first line into an empty buffer tells the session owner,
which drains the buffer on its own schedule. A full buffer drops its oldest
lines and counts them, so the server can show the gap.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from .v1 import agent_pb2, task_pb2

AttemptKey = tuple[str, int]

#: Longest line kept, in bytes (the server's default ``max_log_line_bytes``).
MAX_LINE_BYTES = 16 * 1024
#: Memory one attempt's unsent lines may take before the oldest are dropped.
MAX_PENDING_BYTES = 1024 * 1024
#: What a buffered line costs beyond its text.
LINE_OVERHEAD = 48
#: Most lines in one ``LogLines`` message.
MAX_BATCH_LINES = 4096
#: Largest estimated encoded size of one ``LogLines`` message.
MAX_BATCH_BYTES = 1024 * 1024
#: Estimated encoding cost of a line beyond its text.
ENCODED_LINE_OVERHEAD = 32


def truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


def split_lines(text: str) -> list[str]:
    """One entry per line: a trailing newline and a ``\\r`` ending a line are
    dropped, and lines are cut to ``MAX_LINE_BYTES``."""
    if text.endswith("\n"):
        text = text[:-1]
    return [truncate_utf8(line.removesuffix("\r"), MAX_LINE_BYTES) for line in text.split("\n")]


class LogBuffer:
    """The unsent lines of one attempt. ``notify`` is called when the buffer
    goes from idle to holding lines; ``on_drop`` with each count of evicted
    lines."""

    def __init__(
        self,
        notify: Callable[[], None],
        on_drop: Callable[[int], None],
        capacity: int = MAX_PENDING_BYTES,
    ) -> None:
        self._lines: deque[task_pb2.LogLine] = deque()
        self._bytes = 0
        self._capacity = capacity
        self._dropped = 0
        self._notified = False
        self._closed = False
        self._notify = notify
        self._on_drop = on_drop

    def push(self, stream: task_pb2.LogStream, texts: list[str]) -> None:
        """Buffers ``texts`` (each already one line); never blocks or fails."""
        if self._closed or not texts:
            return
        if stream == task_pb2.LOG_STREAM_UNSPECIFIED:
            stream = task_pb2.LOG_STREAM_LOG
        now = Timestamp()
        now.FromNanoseconds(time.time_ns())
        evicted = 0
        for text in texts:
            line = task_pb2.LogLine(time=now, stream=stream, text=text)
            self._lines.append(line)
            self._bytes += len(text) + LINE_OVERHEAD
            while self._bytes > self._capacity and len(self._lines) > 1:
                old = self._lines.popleft()
                self._bytes -= len(old.text) + LINE_OVERHEAD
                evicted += 1
        if evicted:
            self._dropped += evicted
            self._on_drop(evicted)
        if not self._notified:
            self._notified = True
            self._notify()

    def has_pending(self) -> bool:
        return bool(self._lines) or self._dropped > 0

    def take(self) -> tuple[list[task_pb2.LogLine], int] | None:
        """Everything buffered and the count dropped before it."""
        self._notified = False
        if not self.has_pending():
            return None
        lines, dropped = list(self._lines), self._dropped
        self._lines.clear()
        self._bytes = 0
        self._dropped = 0
        return lines, dropped

    def close(self) -> tuple[list[task_pb2.LogLine], int] | None:
        """Takes what is left and ignores every later line."""
        taken = self.take()
        self._closed = True
        return taken

    def discard(self) -> None:
        """Drops everything, now and later: the attempt is no longer ours."""
        self._lines.clear()
        self._bytes = 0
        self._dropped = 0
        self._closed = True


def batches(key: AttemptKey, lines: list[task_pb2.LogLine], dropped: int) -> list[agent_pb2.LogLines]:
    """``lines`` split into messages of at most ``MAX_BATCH_LINES`` lines and
    about ``MAX_BATCH_BYTES``; the dropped count rides on the first."""
    attempt = agent_pb2.AttemptRef(task_id=key[0], attempt=key[1])
    messages: list[agent_pb2.LogLines] = []
    current: list[task_pb2.LogLine] = []
    size = 0
    for line in lines:
        cost = len(line.text) + ENCODED_LINE_OVERHEAD
        if current and (len(current) >= MAX_BATCH_LINES or size + cost > MAX_BATCH_BYTES):
            messages.append(agent_pb2.LogLines(attempt=attempt, lines=current, dropped=dropped))
            current, size, dropped = [], 0, 0
        size += cost
        current.append(line)
    if current or dropped:
        messages.append(agent_pb2.LogLines(attempt=attempt, lines=current, dropped=dropped))
    return messages
