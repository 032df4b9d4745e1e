"""Log helpers: rate limiting of repeated events."""

from __future__ import annotations

from mailstack.logs import RepeatLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeat_limiter_burst_then_summary():
    clock = FakeClock()
    limiter = RepeatLimiter(burst=3, interval=60.0, clock=clock)
    results = [limiter.allow("127.0.0.1") for _ in range(10)]
    assert results[:3] == [(True, 0)] * 3
    assert results[3:] == [(False, 0)] * 7
    clock.now = 61.0
    assert limiter.allow("127.0.0.1") == (True, 7)
    assert limiter.allow("127.0.0.1") == (True, 0)


def test_repeat_limiter_keys_independent():
    limiter = RepeatLimiter(burst=1, interval=60.0, clock=FakeClock())
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("b") == (True, 0)


def test_repeat_limiter_bounded_keys():
    limiter = RepeatLimiter(burst=1, interval=60.0, max_keys=100, clock=FakeClock())
    for index in range(1000):
        limiter.allow(f"127.0.{index // 256}.{index % 256}")
    assert len(limiter._windows) <= 100
