"""server.http.limits.RateLimiter: a token bucket per owner, on an injected clock."""

from __future__ import annotations

import pytest

from server.http.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_when_the_rate_is_zero():
    limiter = RateLimiter(0, 0, Clock())
    assert not limiter.enabled
    assert all(limiter.wait_time("a") == 0 for _ in range(1000))


def test_burst_then_the_rate():
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)  # one token per 10 s
    assert [limiter.wait_time("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.wait_time("a") == pytest.approx(10.0)
    clock.now += 4
    assert limiter.wait_time("a") == pytest.approx(6.0)  # a refusal takes no token
    clock.now += 6
    assert limiter.wait_time("a") == 0
    assert limiter.wait_time("a") == pytest.approx(10.0)


def test_burst_defaults_to_a_minute_of_rate_and_never_grows_past_it():
    clock = Clock()
    limiter = RateLimiter(per_minute=2, burst=0, clock=clock)
    clock.now += 3600  # an idle hour refills to the burst, not to 120
    assert [limiter.wait_time("a") for _ in range(3)] == [0, 0, pytest.approx(30.0)]


def test_owners_have_separate_buckets():
    limiter = RateLimiter(per_minute=1, burst=1, clock=Clock())
    assert limiter.wait_time("a") == 0
    assert limiter.wait_time("a") > 0
    assert limiter.wait_time("b") == 0


def test_a_clock_stepping_back_adds_no_tokens():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=1, clock=clock)
    assert limiter.wait_time("a") == 0
    clock.now -= 100
    assert limiter.wait_time("a") == pytest.approx(1.0)
    clock.now += 100  # back where it was: still no token
    assert limiter.wait_time("a") == pytest.approx(1.0)
    clock.now += 1
    assert limiter.wait_time("a") == 0
