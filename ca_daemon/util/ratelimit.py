"""Client-side request limits toward the apiserver and Vault: a token bucket.

The semantics are client-go's (``rest.Config.QPS``/``Burst``): tokens refill at ``qps``
per second up to ``burst``; a request takes one, waiting for it when none is left. A
waiting request reserves its token first and sleeps after, outside the lock, so
callers on many threads are served in order and never oversubscribe the rate. ``qps``
0 means no limit (``limiter`` then returns None): concurrency already bounds the
requests in flight, and the servers protect themselves (the apiserver's API Priority
and Fairness, Vault's rate-limit quotas).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class TokenBucket:
    """``qps`` requests per second on average, up to ``burst`` at once after a quiet spell.

    ``clock`` and ``sleep`` are parameters so that tests move time instead of waiting.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("a token bucket needs qps > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(burst)  # may go negative: tokens promised to waiting callers
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        # max(): a clock swapped in (tests) may start behind the one the bucket began with.
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.qps)
        self._last = now

    def _reserve(self) -> float:
        """Take a token (now, or one that is still to come); seconds until it is ours."""
        with self._lock:
            self._refill()
            self._tokens -= 1
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def acquire(self) -> None:
        """Wait until a request may go."""
        wait = self._reserve()
        if wait > 0:
            self.sleep(wait)

    def try_acquire(self) -> bool:
        """Take a token if one is there now; never waits, never reserves."""
        with self._lock:
            self._refill()
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


def limiter(qps: float, burst: int) -> TokenBucket | None:
    """The bucket for a ``qps``/``burst`` pair of the configuration; None when unlimited."""
    return TokenBucket(qps, burst) if qps > 0 else None


def limit_kubernetes_client(api: Any, bucket: TokenBucket | None) -> None:
    """Every request of the ``kubernetes`` ApiClient ``api`` waits for ``bucket`` first.

    All of the client's calls (reads, writes, LIST pages) end in its REST client's
    ``request``, so wrapping that one method covers them, as client-go's limiter sits in
    its REST client.
    """
    if bucket is None:
        return
    rest = api.rest_client
    send = rest.request

    def request(*args: Any, **kwargs: Any) -> Any:
        bucket.acquire()
        return send(*args, **kwargs)

    rest.request = request
