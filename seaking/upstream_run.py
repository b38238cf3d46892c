"""One client request's run upstream: attempts round the targets and over fallback models, retried by retry_policy.

Attempts go round the healthy targets without waiting while one is left untried in the round; then back off. When a
model's attempts are used up, or the upstream says the model is unavailable, its fallback model is next. The run owns
every upstream stream an attempt opens; the stream that began well is handed over in the result, once, and every
other is closed here — also when the run is cancelled (the client left).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from retry_policy import Outcome, RetryBudget, RetryPolicy, StopReason, Verdict, backoff, run_with_retries, wait_unless
from seaking.attempt import Attempt, UpstreamRequest, send_attempt
from seaking.connections import ConnectionPools
from seaking.streaming import UpstreamStream
from seaking.targets import Target, TargetPool

logger = logging.getLogger("seaking")


@dataclass(frozen=True)
class Failover:
    """Where attempts may go: the targets, the retry budget they share, and models to fall back on."""

    pool: TargetPool
    budget: RetryBudget | None = None
    model_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def targets(self) -> list[Target]:
        return self.pool.targets

    def models_for(self, model: str | None) -> list[str | None]:
        return [model, *self.model_fallbacks.get(model, ())] if model else [model]


@dataclass
class UpstreamResult:
    """What a run came to: every attempt, why they stopped, and for a stream whose first content was good the open
    upstream stream. Whoever holds the result owns that stream and closes it with `aclose()` (idempotent)."""

    outcome: Outcome[Attempt]
    attempts: tuple[Attempt, ...]
    stream: UpstreamStream | None = None

    @property
    def last(self) -> Attempt:
        return self.outcome.last

    async def aclose(self) -> None:
        if self.stream is not None:
            self.stream.close()


class UpstreamRun:
    """Send one request until it gets an answer worth giving, or the policy gives up (`result()`, once).

    `on_attempt(attempt, stream)` hears of each attempt as soon as it is judged (so that none is lost if the run is
    cancelled), `on_retry(last, number, wait)` before each wait."""

    def __init__(
        self,
        pools: ConnectionPools,
        policy: RetryPolicy,
        failover: Failover,
        request: UpstreamRequest,
        on_attempt: Callable[[Attempt, UpstreamStream | None], None] = lambda attempt, stream: None,
        on_retry: Callable[[Attempt, int, float], None] = lambda last, number, wait: None,
        refused: Callable[[Target, str | None], bool] = lambda target, model: False,
    ) -> None:
        self.pools, self.policy, self.failover, self.request = pools, policy, failover, request
        self.on_attempt, self.on_retry = on_attempt, on_retry
        self.refused = refused  # the target refused this kind of request for that model before (a prefill)
        self.attempts: list[Attempt] = []
        self._stream: UpstreamStream | None = None  # the open stream of the last attempt, while the run owns it

    def can_start(self) -> bool:
        """Whether any target can take the request, with any of its models."""
        return any(self._targets_for(model) for model in self.failover.models_for(self.request.model))

    def _can_try(self, target: Target, model: str | None) -> bool:
        return self.request.can_go_to(target) and not self.refused(target, model)

    def _targets_for(self, model: str | None) -> list[Target]:
        return [t for t in self.failover.targets if self._can_try(t, model)]

    async def result(self) -> UpstreamResult:
        deadline_at = time.monotonic() + self.policy.deadline
        if self.failover.budget is not None:
            self.failover.budget.record_request()
        models = [m for m in self.failover.models_for(self.request.model) if self._targets_for(m)]
        try:
            for index, model in enumerate(models):
                another_model = index + 1 < len(models)
                outcome = await self._try_model(model, another_model, deadline_at)
                last = outcome.last
                model_done = outcome.stopped is StopReason.ATTEMPTS or last.classification.model_unavailable
                if not (another_model and model_done and last.classification.verdict is not Verdict.SUCCESS):
                    break
                logger.info(
                    f"{self.request.method} {self.request.path}: model {model} failed ({last.classification.detail}); "
                    f"trying {models[index + 1]}"
                )
        except BaseException:  # cancelled: a stream opened by the last attempt must not outlive the run
            if self._stream is not None:
                self._stream.close()
            raise
        stream, self._stream = self._stream, None  # handed over: the result's holder owns it now
        return UpstreamResult(dataclasses.replace(outcome, attempts=len(self.attempts)), tuple(self.attempts), stream)

    async def _try_model(self, model: str | None, another_model: bool, deadline_at: float) -> Outcome[Attempt]:
        """One model's attempts, round the targets, within what is left of the request's deadline."""
        plan = self.failover.pool.plan(lambda target: self._can_try(target, model))

        async def attempt(attempt_deadline: float) -> Attempt:
            target = plan.next_target()
            tried, stream = await send_attempt(self.pools, self.policy, self.request, target, model, attempt_deadline)
            self._stream = stream
            failed = tried.classification.verdict is Verdict.RETRY and not tried.classification.model_unavailable
            target.record(ok=not failed, latency=tried.elapsed, error=tried.classification.detail if failed else None)
            self.attempts.append(tried)
            self.on_attempt(tried, stream)
            return tried

        return await run_with_retries(
            dataclasses.replace(self.policy, deadline=max(0.001, deadline_at - time.monotonic())),
            attempt,
            self.on_retry,
            wait=wait_unless(plan.another_target_left, backoff(self.policy, rounds=lambda state: plan.round)),
            budget=self.failover.budget,
            # The upstream says this model is unavailable: the next model beats another try of this one.
            give_up_on=lambda last: another_model and last.classification.model_unavailable,
        )
