"""Per-client rate limits: a token bucket per client name.

Each client may make ``burst`` requests at once and ``requests_per_s`` on average after that; a
request beyond it is refused with the seconds until the next one would be admitted (the service's
429 ``Retry-After``). Buckets live in each SearchAPI replica, so the limit a client meets is per
replica: with N replicas a client can reach N times it. That keeps a request's admission free of any
network call; size the limit for the replica count, or use one SearchAPI replica per key-heavy app.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    requests_per_s: float
    burst: int
    tokens: float = field(init=False)
    at: float = field(init=False)

    def __post_init__(self):
        self.tokens, self.at = float(self.burst), time.monotonic()

    def take(self, now: float) -> float:
        """Take one token: 0.0 when admitted, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.requests_per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.requests_per_s


class RateLimiter:
    """Buckets by client name; a client without a limit of its own gets the default (None: unlimited)."""

    def __init__(self, requests_per_s: float | None = None, burst: int | None = None):
        if requests_per_s is not None and requests_per_s <= 0:
            raise ValueError(f"rate_limit.requests_per_s must be > 0, got {requests_per_s}")
        self.default = (requests_per_s, burst)
        self.buckets: dict[str, Bucket] = {}

    def retry_after(self, name: str, requests_per_s: float | None = None, burst: int | None = None) -> int:
        """0 when ``name`` may go ahead now, else the whole seconds to wait (Retry-After)."""
        rate = requests_per_s or self.default[0]
        if rate is None:
            return 0
        size = burst or self.default[1] or max(1, math.ceil(rate))
        bucket = self.buckets.get(name)
        if bucket is None or (bucket.requests_per_s, bucket.burst) != (rate, size):  # new client, or its limit changed
            bucket = self.buckets[name] = Bucket(rate, size)
        wait = bucket.take(time.monotonic())
        return math.ceil(wait) if wait > 0 else 0
