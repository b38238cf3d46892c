"""One client request's run upstream: attempts round the targets and over fallback models, retried by retry_policy.

Attempts go round the healthy targets without waiting while one is left untried in the round; then back off. When a
model's attempts are used up, or the upstream says the model is unavailable, its fallback model is next. The run owns
every upstream stream an attempt opens; the stream that began well is handed over in the result, once, and every
other is closed here — also when the run is cancelled (the client left).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from retry_policy import (
    Classification,
    Failure,
    Outcome,
    RetryBudget,
    RetryPolicy,
    StopReason,
    Verdict,
    backoff,
    run_with_retries,
    wait_none_after,
    wait_unless,
)
from seaking.attempt import Attempt, AttemptPlan, Overdue, UpstreamRequest, send_attempt
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


@dataclass
class _Running:
    """An attempt under way, in a task of its own (so that, past its per-try timeout, the next can start beside it)."""

    number: int  # 1 = the run's first attempt
    plan: AttemptPlan
    task: asyncio.Task[tuple[Attempt, UpstreamStream | None]]
    overdue: Overdue | None  # None: hedging is off, the per-try timeout ends the attempt
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class _Hedge:
    """What the retry loop sees of an attempt past its per-try timeout that goes on: a try that failed for now, after
    which the next attempt starts at once, beside it."""

    running: _Running
    classification: Classification
    retry_after: None = None

    @property
    def target(self) -> Target:
        return self.running.plan.target


class UpstreamRun:
    """Send one request until it gets an answer worth giving, or the policy gives up (`result()`, once).

    Attempts run in tasks of their own. With hedge_on_timeout, one past its per-try timeout (no headers within
    target_proxy.timeout; for a stream, no content within first_event_timeout) keeps running while the next starts
    beside it; the first to bring an answer worth giving wins, and every other is closed at once. Once every attempt
    is started, the open ones are waited for until the deadline. `on_attempt(attempt, stream)` hears of each attempt
    as soon as it is over (so that none is lost if the run is cancelled), `on_retry(last, number, wait)` before each
    wait."""

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
        # Which targets each model may go to, fixed now: can_start() and result() must agree, although another
        # request may meanwhile find a target refusing (`refused`: it refused a prefill for that model before).
        self._eligible = {
            model: targets for model in failover.models_for(request.model)
            if (targets := [t for t in failover.targets if request.can_go_to(t) and not refused(t, model)])
        }
        self._attempts: dict[int, Attempt] = {}  # those that are over, by number
        self._running: list[_Running] = []  # those under way
        self._winner: int | None = None  # the number of the attempt whose answer is worth giving
        self._stream: UpstreamStream | None = None  # the winner's stream, while the run owns it
        self._another_model = False  # the model being tried has a fallback model after it

    def can_start(self) -> bool:
        """Whether any target can take the request, with any of its models. `result()` needs one."""
        return bool(self._eligible)

    async def result(self) -> UpstreamResult:
        if not self._eligible:
            raise RuntimeError("UpstreamRun.result() with no target to try: ask can_start() first")
        deadline_at = time.monotonic() + self.policy.deadline
        if self.failover.budget is not None:
            self.failover.budget.record_request()
        models = list(self._eligible)
        try:
            for index, model in enumerate(models):
                self._another_model = index + 1 < len(models)
                outcome = await self._try_model(model, deadline_at)
                last = self._last_of(outcome.last)
                model_done = outcome.stopped is StopReason.ATTEMPTS or (last and last.classification.model_unavailable)
                if self._winner is not None or not (self._another_model and model_done):
                    break
                logger.info(
                    f"{self.request.method} {self.request.path}: model {model} failed ({last.classification.detail}); "
                    f"trying {models[index + 1]}"
                )
            await self._wait_for_the_open_ones(deadline_at)
            await self._close_the_rest()
        except BaseException:  # cancelled: nothing the run opened may outlive it
            for running in self._running:
                running.task.cancel()
            if self._running:
                await asyncio.wait({r.task for r in self._running})  # each closes its upstream response
            if self._stream is not None:  # pragma: no cover - a race: cancelled as an attempt had just won
                self._stream.close()
            raise
        last = self._attempts[self._winner] if self._winner is not None else self._last_of(outcome.last)
        attempts = tuple(self._attempts[number] for number in sorted(self._attempts))
        stream, self._stream = self._stream, None  # handed over: the result's holder owns it now
        return UpstreamResult(dataclasses.replace(outcome, last=last, attempts=len(attempts)), attempts, stream)

    async def _try_model(self, model: str | None, deadline_at: float) -> Outcome:
        """One model's attempts, round the targets, within what is left of the request's deadline."""
        eligible = {id(target) for target in self._eligible[model]}
        plan = self.failover.pool.plan(lambda target: id(target) in eligible)

        async def attempt(attempt_deadline: float) -> Attempt | _Hedge:
            if self._winner is not None:  # pragma: no cover - a race: an earlier attempt answered in the back-off
                return self._attempts[self._winner]
            running = self._start(AttemptPlan.of(self.request, plan.next_target(), model), attempt_deadline)
            return await self._race(running)

        return await run_with_retries(
            dataclasses.replace(self.policy, deadline=max(0.001, deadline_at - time.monotonic())),
            attempt,
            self.on_retry,
            wait=wait_none_after(
                lambda last: isinstance(last, _Hedge),
                wait_unless(plan.another_target_left, backoff(self.policy, rounds=lambda state: plan.round)),
            ),
            budget=self.failover.budget,
            # The upstream says this model is unavailable: the next model beats another try of this one.
            give_up_on=lambda last: self._another_model and last.classification.model_unavailable,
            sleep=self._sleep,
        )

    def _start(self, plan: AttemptPlan, deadline_at: float) -> _Running:
        overdue = Overdue() if self.policy.hedge_on_timeout else None
        number = len(self._attempts) + len(self._running) + 1
        task = asyncio.create_task(send_attempt(self.pools, self.policy, plan, deadline_at, overdue))
        running = _Running(number, plan, task, overdue)
        self._running.append(running)
        return running

    async def _race(self, newest: _Running) -> Attempt | _Hedge:
        """Until the newest attempt is over or overdue, or any attempt under way brings an answer worth giving."""
        while True:
            waiting = {r.task for r in self._running}
            if newest.overdue is not None and not newest.overdue.is_set():
                waiting.add(newest.overdue.future)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            self._collect()
            if self._winner is not None:
                return self._attempts[self._winner]
            if newest.number in self._attempts:
                return self._attempts[newest.number]
            if newest.overdue is not None and newest.overdue.is_set():
                detail = f"no answer within the per-try timeout; attempt {newest.number + 1} starts beside it"
                return _Hedge(newest, Classification(Verdict.RETRY, detail, Failure.TIMEOUT))

    def _collect(self) -> None:
        """Attempts whose task is done: their records, their targets' breakers, and an answer worth giving if one is."""
        for running in [r for r in self._running if r.task.done()]:
            self._collect_one(running)

    def _collect_one(self, running: _Running) -> None:
        self._running.remove(running)
        attempt, stream = running.task.result()  # an exception here is a bug: the run fails with it
        if running.overdue is not None and running.overdue.is_set():
            attempt = dataclasses.replace(attempt, hedged=True)
        classification = attempt.classification
        worth_giving = classification.verdict is not Verdict.RETRY and not (
            self._another_model and classification.model_unavailable
        )
        if worth_giving and self._winner is None:
            self._winner, self._stream = running.number, stream
        elif stream is not None:  # pragma: no cover - a race: two attempts' first content came in the same moment
            stream.close()  # the later one's: nobody reads it
            stream = None
        self._note(running.number, attempt, stream)

    def _note(self, number: int, attempt: Attempt, stream: UpstreamStream | None) -> None:
        failed = attempt.classification.verdict is Verdict.RETRY and not attempt.classification.model_unavailable
        attempt.target.record(ok=not failed, latency=attempt.elapsed, error=attempt.classification.detail if failed else None)
        self._attempts[number] = attempt
        self.on_attempt(attempt, stream)

    async def _sleep(self, seconds: float) -> None:
        """A wait between attempts: over as soon as an attempt under way brings an answer worth giving."""
        await self._wait_for_the_open_ones(time.monotonic() + seconds, then_sleep=True)

    async def _wait_for_the_open_ones(self, until: float, then_sleep: bool = False) -> None:
        """While attempts are under way and none has won, until `until` (time.monotonic()): the open ones may yet
        answer. With `then_sleep`, the rest of the time is waited out when none is open."""
        while self._winner is None and (left := until - time.monotonic()) > 0:
            if not self._running:
                if then_sleep:
                    await asyncio.sleep(left)
                return
            await asyncio.wait({r.task for r in self._running}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            self._collect()

    async def _close_the_rest(self) -> None:
        """Attempts still under way: closed (the upstream stops generating for nobody), each recorded as such."""
        if not self._running:
            return
        for running in self._running:
            running.task.cancel()
        await asyncio.wait({r.task for r in self._running})
        for running in list(self._running):
            if not running.task.cancelled():  # pragma: no cover - a race: it was over before it was closed
                self._collect_one(running)
                continue
            self._running.remove(running)
            why = f"attempt {self._winner} answered first" if self._winner else "no answer within the deadline"
            attempt = running.plan.attempt(
                Classification(Verdict.RETRY, f"closed: {why}", Failure.TIMEOUT), running.started_at,
                time.monotonic() - running.started, hedged=running.overdue is not None and running.overdue.is_set(),
            )
            self._note(running.number, attempt, None)

    def _last_of(self, last: Attempt | _Hedge) -> Attempt | None:
        """The attempt a retry loop's outcome stands for: a hedged one's record once it is over."""
        if isinstance(last, _Hedge):
            return self._attempts.get(last.running.number)
        return last
