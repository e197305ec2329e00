"""The agent's Prometheus metrics: the same ``muster_agent_*`` families as
the Rust SDK, in one ``CollectorRegistry`` per agent that the author can add
their own families to, served on ``metrics_listen``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Attempts this agent finished, by capability and outcome.
TASKS = "muster_agent_tasks"  # exposed as muster_agent_tasks_total
#: Handler run time, by capability and outcome.
HANDLER_DURATION = "muster_agent_handler_duration_seconds"
#: Handlers running now.
SLOTS_BUSY = "muster_agent_slots_busy"
#: Slots the agent offers.
SLOTS = "muster_agent_slots"
#: 1 while a session with the server is established, else 0.
CONNECTED = "muster_agent_connected"
#: Sessions re-established after the first registration.
RECONNECTS = "muster_agent_reconnects"  # exposed as muster_agent_reconnects_total
#: Log lines dropped before sending because their attempt's buffer was full.
LOG_LINES_DROPPED = "muster_agent_log_lines_dropped"  # exposed as ..._total

CAPABILITY = "capability"
OUTCOME = "outcome"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
DISCARDED = "discarded"
OUTCOMES = (SUCCEEDED, FAILED, CANCELLED, DISCARDED)

#: Handler buckets from 1 ms to an hour.
HANDLER_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)


class AgentMetrics:
    """The SDK's families, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = Counter(TASKS, "Attempts this agent finished.", [CAPABILITY, OUTCOME], registry=registry)
        self.handler_duration = Histogram(
            HANDLER_DURATION,
            "Handler run time.",
            [CAPABILITY, OUTCOME],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.slots_busy = Gauge(SLOTS_BUSY, "Handlers running now.", registry=registry)
        self.slots = Gauge(SLOTS, "Slots this agent offers.", registry=registry)
        self.connected = Gauge(
            CONNECTED, "1 while a session with the server is established.", registry=registry
        )
        self.reconnects = Counter(
            RECONNECTS, "Sessions re-established after the first registration.", registry=registry
        )
        self.log_lines_dropped = Counter(
            LOG_LINES_DROPPED,
            "Log lines dropped before sending because their attempt's buffer was full.",
            registry=registry,
        )

    def init_capability(self, capability: str) -> None:
        """Creates the zero series of every outcome, so rates have data early."""
        for outcome in OUTCOMES:
            self.tasks.labels(capability, outcome)
            self.handler_duration.labels(capability, outcome)

    def observe_handler(self, capability: str, outcome: str, seconds: float) -> None:
        self.tasks.labels(capability, outcome).inc()
        self.handler_duration.labels(capability, outcome).observe(seconds)
