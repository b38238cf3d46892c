"""targets.py alone: circuit breaker transitions on a controllable clock, and the order attempts take."""

from __future__ import annotations

import random
from collections import Counter

from seaking.targets import BreakerState, CircuitBreaker, Target, TargetPool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_target(name: str, clock=None, weight: float = 1, threshold: int = 2, open_seconds: float = 30) -> Target:
    return Target(f"https://{name}/v1", None, weight, CircuitBreaker(threshold, open_seconds, clock or Clock()))


def test_breaker_opens_after_threshold_then_half_opens_then_closes():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, open_seconds=30, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allows_request()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows_request()
    clock.now += 29.9
    assert not breaker.allows_request()
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows_request()
    breaker.attempt_started()
    assert not breaker.allows_request()  # one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0


def test_a_failed_probe_reopens_at_once():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=5, open_seconds=10, clock=clock)
    for _ in range(5):
        breaker.record_failure()
    clock.now += 11
    breaker.attempt_started()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opened_at == clock.now


def test_a_vanished_probe_frees_its_slot():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_seconds=5, clock=clock)
    breaker.record_failure()
    clock.now += 6
    breaker.attempt_started()  # its client left: no result ever comes
    assert not breaker.allows_request()
    clock.now += 5
    assert breaker.allows_request()


def test_a_success_resets_the_count():
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=5, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_priority_tries_in_order_skipping_open_breakers():
    a, b, c = make_target("a"), make_target("b"), make_target("c")
    pool = TargetPool([a, b, c])
    plan = pool.plan()
    assert [plan.next_target(), plan.next_target(), plan.next_target()] == [a, b, c]
    assert not plan.another_target_left()
    assert plan.next_target() is a and plan.round == 2
    b.record(ok=False, latency=0.1, error="x")
    b.record(ok=False, latency=0.1, error="x")
    plan = pool.plan()
    assert [plan.next_target(), plan.next_target()] == [a, c]


def test_when_every_breaker_is_open_the_longest_failed_is_tried():
    clock = Clock()
    a, b = make_target("a", clock, threshold=1), make_target("b", clock, threshold=1)
    b.record(ok=False, latency=0.1)
    clock.now += 1
    a.record(ok=False, latency=0.1)
    plan = TargetPool([a, b]).plan()
    assert not plan.another_target_left()
    assert plan.next_target() is b


def test_round_robin_rotates_the_first_target():
    a, b, c = make_target("a"), make_target("b"), make_target("c")
    pool = TargetPool([a, b, c], "round_robin")
    assert [pool.plan().next_target() for _ in range(6)] == [a, b, c, a, b, c]
    plan = pool.plan()
    assert [plan.next_target() for _ in range(3)] == [a, b, c]  # and fails over through the rest


def test_weighted_follows_the_weights():
    heavy, light, never = make_target("heavy", weight=3), make_target("light", weight=1), make_target("never", weight=0)
    pool = TargetPool([light, heavy, never], "weighted", rng=random.Random(7))
    firsts = Counter(pool.plan().next_target().host for _ in range(4000))
    assert firsts["never"] == 0
    assert 0.7 < firsts["heavy"] / 4000 < 0.8
    plan = pool.plan()
    assert {plan.next_target().host for _ in range(3)} == {"heavy", "light", "never"}  # zero weight: still a last resort


def test_status_shows_no_secrets():
    target = Target("https://user:pw@h.example:8443/v1", "sk-secret", 1, CircuitBreaker(1, 5))
    assert target.status()["state"] == "unknown"
    target.record(ok=False, latency=0.25, error="upstream answered 503")
    status = target.status()
    assert status["url"] == "https://h.example:8443/v1"
    assert (status["state"], status["last_error"], status["last_latency_ms"]) == ("open", "upstream answered 503", 250.0)
    assert "sk-secret" not in str(status) and "pw" not in str(status)
    assert target.host == "h.example:8443"
