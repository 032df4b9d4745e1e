"""Slowing down and then refusing repeated AUTH failures, per client address and per account."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class AuthThrottle:
    """Counts AUTH failures within a sliding window.

    A client address or an account name with ``limit`` failures inside
    ``window`` seconds is locked until its oldest failure leaves the window,
    so a lockout lasts at most ``window`` seconds after the last failure.
    Each failure earns a delay before its reply: ``delay`` doubled per
    earlier failure in the window, at most 8 times ``delay``. State is kept
    in memory and is per process.
    """

    def __init__(
        self,
        *,
        limit: int,
        window: float,
        delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.delay = delay
        self.clock = clock
        self._failures: dict[tuple[str, str], collections.deque[float]] = {}

    def _recent(self, key: tuple[str, str]) -> collections.deque[float]:
        times = self._failures.get(key)
        if times is None:
            return collections.deque()
        cutoff = self.clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def is_locked(self, address: str, account: str | None = None) -> bool:
        """Tell whether the address, or the account when given, is locked out now."""
        if len(self._recent(("address", address))) >= self.limit:
            return True
        return account is not None and len(self._recent(("account", account.lower()))) >= self.limit

    def record_failure(self, address: str, account: str) -> float:
        """Count a failure and return how long to wait before replying, in seconds."""
        now = self.clock()
        earlier = 0
        for key in (("address", address), ("account", account.lower())):
            times = self._recent(key)
            earlier = max(earlier, len(times))
            self._failures.setdefault(key, times).append(now)
        self._prune()
        return min(self.delay * (2**earlier), self.delay * 8)

    def _prune(self) -> None:
        # Bound the memory that many distinct addresses or names can take.
        if len(self._failures) > 100_000:
            for key in list(self._failures):
                self._recent(key)
