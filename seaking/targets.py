"""The upstreams a request may go to: circuit breakers, load balancing, failover order, and their health.

Vocabulary from Envoy: a target whose breaker is open is skipped (outlier ejection) until open_seconds have passed;
then one request is let through as a probe (half-open), and its result closes or re-opens the breaker.
"""

from __future__ import annotations

import enum
import functools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from seaking.outbound import OutboundProxy


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int, open_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.clock = clock
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probe_since: float | None = None  # a half-open probe is under way

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.open_seconds:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allows_request(self) -> bool:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            # One probe at a time; a probe whose request vanished (client left) frees the slot after open_seconds.
            return self._probe_since is None or self.clock() - self._probe_since >= max(self.open_seconds, 1.0)
        return state is BreakerState.CLOSED

    def attempt_started(self) -> None:
        if self.state is not BreakerState.CLOSED:
            self._probe_since = self.clock()

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.opened_at = None
        self._probe_since = None

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        probe_failed = self._probe_since is not None
        self._probe_since = None
        if probe_failed or self.consecutive_failures >= self.failure_threshold:
            self.opened_at = self.clock()


@dataclass
class Target:
    base_url: str
    api_key: str | None
    weight: float
    breaker: CircuitBreaker
    proxy: OutboundProxy | None = None  # the outbound proxy its requests go through
    prefill: str = "auto"  # how it continues a reply that broke off: auto, assistant, prefix, none (resume.py)
    # What the status shows: results of live requests and health probes alike.
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    last_latency: float | None = None
    last_result_at: float | None = None  # time.time()
    prompt_tokens: int = 0  # as the upstream reported them, through this target
    completion_tokens: int = 0

    @functools.cached_property  # named in every attempt's headers, log lines and records; the URL never changes
    def host(self) -> str:
        """host[:port], never the path or credentials: what headers, logs and comments name a target by."""
        parts = urlsplit(self.base_url)
        return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""

    @property
    def state(self) -> str:
        """For people and health checks: 'unknown' until the first result, else the breaker's state."""
        return "unknown" if self.last_result_at is None else self.breaker.state.value

    def record(self, ok: bool, latency: float, error: str | None = None) -> None:
        self.requests += 1
        self.last_latency = latency
        self.last_result_at = time.time()
        if ok:
            self.breaker.record_success()
        else:
            self.failures += 1
            self.last_error = error
            self.breaker.record_failure()

    def status(self) -> dict:
        """Everything about this target that is safe to show: no key, no credentials in the URL."""
        parts = urlsplit(self.base_url)
        port = f":{parts.port}" if parts.port else ""
        return {
            "url": f"{parts.scheme}://{parts.hostname}{port}{parts.path}",
            "proxy": self.proxy.shown if self.proxy else None,
            "state": self.state,
            "consecutive_failures": self.breaker.consecutive_failures,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_latency_ms": None if self.last_latency is None else round(self.last_latency * 1000, 1),
            "last_result_age_s": None if self.last_result_at is None else round(time.time() - self.last_result_at, 1),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
        }


class TargetPool:
    """All targets, in config order (target_proxy first), and the load-balancing strategy among them."""

    def __init__(self, targets: Sequence[Target], strategy: str = "priority", rng: random.Random | None = None) -> None:
        self.targets = list(targets)
        self.strategy = strategy
        self.rng = rng or random.Random()
        self._next_start = 0

    def plan(self, eligible: Callable[[Target], bool] | None = None) -> TargetPlan:
        """The order in which one request tries the targets (those `eligible` for it, if not all are)."""
        order = list(self.targets)
        if self.strategy == "round_robin":
            start = self._next_start % len(order)
            self._next_start += 1
            order = order[start:] + order[:start]
        elif self.strategy == "weighted":
            # Weighted random order without replacement (Efraimidis-Spirakis): heavier targets tend to come first.
            order.sort(key=lambda t: self.rng.random() ** (1 / t.weight) if t.weight > 0 else -1.0, reverse=True)
        return TargetPlan([t for t in order if eligible is None or eligible(t)])


@dataclass
class TargetPlan:
    """One request's way through the targets: each round tries every target its breaker allows, once."""

    order: list[Target]
    round: int = 1
    tried: set[int] = field(default_factory=set)  # ids of targets tried in this round

    def next_target(self) -> Target:
        """The target for the next attempt; starts a new round when this one is used up."""
        target = self._untried()
        if target is None:
            self.round += 1
            self.tried.clear()
            target = self._untried()
        if target is None:
            # Every breaker is open: rather than fail without trying, try the target that failed longest ago.
            target = min(self.order, key=lambda t: t.breaker.opened_at or 0.0)
        self.tried.add(id(target))
        target.breaker.attempt_started()
        return target

    def another_target_left(self) -> bool:
        """Whether the next attempt can go to a target not yet tried in this round (and so needs no back-off)."""
        return self._untried() is not None

    def _untried(self) -> Target | None:
        return next((t for t in self.order if id(t) not in self.tried and t.breaker.allows_request()), None)
