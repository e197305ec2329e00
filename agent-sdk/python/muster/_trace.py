"""W3C trace context between the submitter, the server and the handler.

When the OpenTelemetry API is installed (``pip install muster-sdk[otel]``),
``Client.submit`` writes the current span's ``traceparent`` into each spec
that has none, and the agent runs each handler inside a ``muster.task``
span whose parent is the span the assignment names. Without it, nothing is
written and handlers still see the raw ``trace_context``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, MutableMapping

#: The W3C header name, used as the key in ``trace_context``.
TRACEPARENT = "traceparent"

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator as _Propagator
except ImportError:  # pragma: no cover - exercised only without the extra
    _otel_trace = None  # type: ignore[assignment]
    _Propagator = None  # type: ignore[assignment,misc]


def trace_id(trace_context: Mapping[str, str]) -> str | None:
    """The 32-hex-digit trace id of a well-formed ``traceparent``."""
    match = _TRACEPARENT.match(trace_context.get(TRACEPARENT, "").strip())
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1)


def inject(trace_context: MutableMapping[str, str]) -> None:
    """Adds the current span's ``traceparent`` unless one is there."""
    if TRACEPARENT in trace_context or _Propagator is None:
        return
    carrier: dict[str, str] = {}
    _Propagator().inject(carrier)
    if TRACEPARENT in carrier:
        trace_context[TRACEPARENT] = carrier[TRACEPARENT]


@contextlib.contextmanager
def task_span(trace_context: Mapping[str, str], attributes: Mapping[str, str | int]) -> Iterator[None]:
    """Runs the body inside a ``muster.task`` span parented on the
    assignment's trace context (a no-op without OpenTelemetry)."""
    if _otel_trace is None or _Propagator is None:
        yield
        return
    parent = _Propagator().extract(dict(trace_context)) if trace_id(trace_context) else None
    tracer = _otel_trace.get_tracer("muster")
    with tracer.start_as_current_span("muster.task", context=parent, attributes=dict(attributes)):
        yield
