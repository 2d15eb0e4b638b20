"""Per-client token buckets for the HTTP endpoint's rate limit.

A client is the TCP peer address (``request.remote``): the project has no API keys, and a header a client
sets itself would let it pick a fresh bucket per request. Behind a proxy every client shares the proxy's
bucket; rate-limit there instead. Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a
second; a request costs one token per item. At most ``max_clients`` buckets are kept (least recently used
dropped first): a dropped client comes back with a full bucket, which is what an idle client has anyway.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, rate: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def wait_s(self, client: str, cost: float = 1.0) -> float:
        """Seconds until ``client`` can spend ``cost`` tokens (0: now). Takes nothing."""
        return max(cost - self._tokens(client, self.clock()), 0.0) / self.rate

    def take(self, client: str, cost: float) -> float:
        """Spends ``cost`` tokens and returns 0, or spends nothing and returns the seconds to wait."""
        now = self.clock()
        tokens = self._tokens(client, now)
        if tokens < cost:
            return (cost - tokens) / self.rate
        self._buckets[client] = (tokens - cost, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0.0


def retry_after(wait_s: float) -> int:
    """The Retry-After header's whole seconds (at least 1: a client retrying at 0 would be refused again)."""
    return max(1, math.ceil(wait_s))
