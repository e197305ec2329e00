"""Exponential backoff with full jitter, shared by the agent's reconnect loop
and the client's watch reconnects.

Full jitter (a uniform delay between zero and the exponential ceiling)
spreads a fleet that lost its server at the same instant, so the agents do
not come back in lockstep.
"""

from __future__ import annotations

import random


def backoff_ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The largest delay retry number ``attempt`` (0 first) may wait:
    ``min(maximum, initial * 2**attempt)``."""
    return min(maximum, initial * (2.0 ** min(attempt, 62)))


def jittered(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """A delay in seconds drawn uniformly from ``[0, backoff_ceiling(...)]``."""
    return (rng or random).uniform(0.0, backoff_ceiling(attempt, initial, maximum))
