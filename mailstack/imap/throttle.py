"""Counting failed logins per client address and per account, to slow down password guessing."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


# Keys kept before expired ones are dropped, which bounds memory under a wide attack.
MAX_KEYS = 10_000


class LoginThrottle:
    """Failed logins within a sliding window, keyed by client address and by account.

    A key with ``limit`` failures inside ``window`` seconds is locked until its
    oldest counted failure leaves the window. The delay before each failure
    reply doubles with every recent failure of the address, up to eight times
    ``delay``, so that one client cannot try passwords quickly.

    NOTE: the counts live in this process, so several ``mailstack serve``
    processes on one store each allow ``limit`` failures.
    """

    def __init__(
        self, *, limit: int, window: float, delay: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.delay = delay
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        entries = self._failures.get(key)
        if entries is None:
            return deque()
        cutoff = self.clock() - self.window
        while entries and entries[0] <= cutoff:
            entries.popleft()
        if not entries:
            del self._failures[key]
        return entries

    def is_locked(self, address: str, account: str | None = None) -> bool:
        keys = [f"ip:{address}"] + ([f"user:{account.lower()}"] if account else [])
        return any(len(self._recent(key)) >= self.limit for key in keys)

    def record_failure(self, address: str, account: str | None = None) -> float:
        """Count one failure; return the delay to wait before the failure reply, in seconds."""
        now = self.clock()
        if len(self._failures) > MAX_KEYS:
            self._prune()
        keys = [f"ip:{address}"] + ([f"user:{account.lower()}"] if account else [])
        for key in keys:
            self._recent(key)
            self._failures.setdefault(key, deque()).append(now)
        recent = len(self._recent(f"ip:{address}"))
        return self.delay * min(2 ** (recent - 1), 8)

    def _prune(self) -> None:
        for key in list(self._failures):
            self._recent(key)

    def record_success(self, address: str, account: str) -> None:
        """Forget the failures of the account; the address keeps its count."""
        self._failures.pop(f"user:{account.lower()}", None)
