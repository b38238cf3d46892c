"""What is worth retrying, how long to wait, and when to give up. Pure: the standard library and tenacity only, no
I/O, unit-tested alone (tests/test_layout.py keeps it so).

`classify_response` turns one upstream answer into a `Classification` (seaking/connections.py does the same for the
exceptions of the HTTP client). `run_with_retries`
drives attempts through tenacity, composed from small strategies: retry while the verdict is RETRY, wait what the
upstream asked for (Retry-After) or else jittered exponential back-off, stop after max_retries or when the next wait
would pass the request's deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import enum
import json
import math
import random
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, stop_before_delay
from tenacity.stop import stop_base
from tenacity.wait import wait_base


class Verdict(enum.Enum):
    SUCCESS = "success"  # a good answer: give it to the client
    PASS_THROUGH = "pass_through"  # not ours to judge (404, 422, ...): give it to the client as received
    FAIL_FAST = "fail_fast"  # retrying cannot help (bad key, bad request): answer now
    RETRY = "retry"  # another attempt may succeed


class Failure(enum.Enum):
    """Why a RETRY attempt failed; decides the status the client gets if every attempt fails so."""

    STATUS = "status"  # the upstream answered a retry code (429, 503, ...)
    NETWORK = "network"  # refused, DNS failure, reset before or while reading the answer
    TIMEOUT = "timeout"  # no response headers within the per-try timeout
    BROKEN = "broken"  # a 2xx whose body is empty, not JSON, or an error object
    EMPTY = "empty"  # a well-formed reply with no content at all: no text, no tool call, no refusal


@dataclass(frozen=True)
class Classification:
    verdict: Verdict
    detail: str = ""  # what happened, for people: logs, error messages, mitmweb comments
    failure: Failure | None = None
    model_unavailable: bool = False  # the upstream said the requested model is missing or overloaded


@dataclass(frozen=True)
class RetryPolicy:
    # 529: Anthropic's "overloaded". 520-523: Cloudflare's origin errors (down, unreachable, refused, an empty or
    # broken answer) in front of aggregators; not 524, which comes after 100 s of an origin still working on the
    # request: a retry asks the same slow thing again, behind the same 100 s limit (docs/claude.md).
    retry_codes: frozenset[int] = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 529})
    fail_codes: frozenset[int] = frozenset({400, 401, 403})
    max_retries: int = 3
    base_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    deadline: float = 300.0  # all attempts and waits of one request together
    per_try_timeout: float = 30.0  # connect until response headers, per attempt
    retry_empty: bool = True  # a reply with no content at all is a failed attempt
    # An attempt past its per-try timeout keeps running while the next one starts beside it; the first good answer
    # wins (Envoy's hedge_on_per_try_timeout). Off: the attempt is abandoned, and the next starts from zero.
    hedge_on_timeout: bool = True

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1


def classify_response(
    policy: RetryPolicy,
    status: int,
    content_type: str,
    body: bytes,
    expects_json: bool,
    blank: Callable[[object], bool] | None = None,
) -> Classification:
    """Judge a complete upstream answer. `expects_json`: the endpoint answers JSON (chat, models, ...). `blank`: says
    whether a good JSON answer is a reply with no content at all (a completion's shape is its API's)."""
    model_unavailable = not 200 <= status < 300 and says_model_unavailable(body)
    if status in policy.fail_codes:
        return Classification(Verdict.FAIL_FAST, f"upstream answered {status}", model_unavailable=model_unavailable)
    if status in policy.retry_codes:
        return Classification(Verdict.RETRY, f"upstream answered {status}", Failure.STATUS, model_unavailable)
    if not 200 <= status < 300:
        return Classification(Verdict.PASS_THROUGH, f"upstream answered {status}", model_unavailable=model_unavailable)
    judged_as_json = (expects_json and "event-stream" not in content_type.lower()) or "json" in content_type.lower()
    if not judged_as_json:
        return Classification(Verdict.SUCCESS)
    if not body.strip():
        return Classification(Verdict.RETRY, f"upstream answered {status} with an empty body", Failure.BROKEN)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return Classification(Verdict.RETRY, f"upstream answered {status} with a body that is not JSON", Failure.BROKEN)
    if isinstance(document, dict) and (document.get("error") or document.get("type") == "error"):  # OpenAI's, Anthropic's
        return Classification(
            Verdict.RETRY,
            f"upstream answered {status} with an error: {error_message(document)}",
            Failure.BROKEN,
            says_model_unavailable(body),
        )
    if policy.retry_empty and blank is not None and blank(document):
        return Classification(Verdict.RETRY, "upstream answered with an empty reply", Failure.EMPTY)
    return Classification(Verdict.SUCCESS)


_MODEL_TROUBLE = re.compile(
    r"overloaded|model_not_found|model.{0,80}(not found|does not exist|unavailable|not available|not supported|disabled)"
    r"|no (available )?(endpoints|providers|channels?) (found )?(for|available)",
    re.IGNORECASE | re.DOTALL,
)


def says_model_unavailable(body: bytes) -> bool:
    """Whether an error body says the model is missing or overloaded, so that another model may do better."""
    try:
        text = json.dumps(json.loads(body))[:2000]
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        text = body[:2000].decode("utf-8", "replace")
    return bool(_MODEL_TROUBLE.search(text))


def error_message(document: Mapping) -> str:
    """The human message of an OpenAI-style error document, whatever shape the upstream gave it."""
    error = document.get("error")
    if isinstance(error, Mapping):
        message = error.get("message") or error.get("code") or error.get("type")
        return str(message) if message else _as_json(error)
    if isinstance(error, str):
        return error
    for key in ("message", "detail"):
        if isinstance(document.get(key), str):
            return document[key]
    return _as_json(document)


def _as_json(value: object) -> str:
    try:
        return json.dumps(value)[:200]
    except RecursionError:  # json.loads took it, a few frames less deep
        return "(nested too deeply to show)"


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the upstream asked us to wait: retry-after-ms, or Retry-After as seconds or an HTTP date."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return _delay(lowered["retry-after-ms"], 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return _delay(value, 1)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is not None and when.tzinfo is None and _ASCTIME.match(value.strip()):
        when = when.replace(tzinfo=datetime.timezone.utc)  # HTTP's third date form: no zone, GMT by definition
    if when is None or when.tzinfo is None:
        return None
    return _non_negative(when.timestamp() - (time.time() if now is None else now))


_ASCTIME = re.compile(r"[A-Za-z]{3} [A-Za-z]{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$")  # Sun Nov  6 08:49:37 1994


def _delay(value: str, per_second: int) -> float | None:
    """A number of seconds (or milliseconds); ValueError when it is not a number."""
    seconds = float(value) / per_second
    if seconds == math.inf and value.strip().isdigit():  # digits beyond a float: a wait past any deadline, not none
        return sys.float_info.max
    return _non_negative(seconds)


def _non_negative(seconds: float) -> float | None:
    return max(0.0, seconds) if math.isfinite(seconds) else None


class Attempt(Protocol):
    @property
    def classification(self) -> Classification: ...

    @property
    def retry_after(self) -> float | None: ...


A = TypeVar("A", bound=Attempt)


class wait_retry_after(wait_base):
    """Wait as long as the upstream's Retry-After asks; without one, use the fallback strategy."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed and outcome.result().retry_after is not None:
            return outcome.result().retry_after
        return self.fallback(retry_state)


class wait_full_jitter(wait_base):
    """A random wait in [0, min(cap, base × multiplier^(n-1))], n counting failed rounds ("full jitter").

    A round is one attempt per target; with a single target, rounds are attempts.
    """

    def __init__(
        self, base: float, multiplier: float, cap: float, rounds: Callable[[RetryCallState], int] | None = None
    ) -> None:
        self.base, self.multiplier, self.cap = base, multiplier, cap
        self.rounds = rounds or (lambda state: state.attempt_number)

    def __call__(self, retry_state: RetryCallState) -> float:
        exponent = max(0, self.rounds(retry_state) - 1)
        try:
            ceiling = min(self.cap, self.base * self.multiplier**exponent)
        except OverflowError:
            ceiling = self.cap if self.base else 0.0  # no base delay: no wait, however many rounds
        return random.uniform(0, ceiling)


class wait_none_after(wait_base):
    """No wait after an attempt `started_beside(attempt)` says needs none (a hedge: the next one starts at once)."""

    def __init__(self, started_beside: Callable[[Attempt], bool], fallback: wait_base) -> None:
        self.started_beside, self.fallback = started_beside, fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed and self.started_beside(outcome.result()):
            return 0.0
        return self.fallback(retry_state)


class wait_unless(wait_base):
    """No wait while `free()` says the next attempt goes somewhere fresh (another target); else the fallback."""

    def __init__(self, free: Callable[[], bool], fallback: wait_base) -> None:
        self.free, self.fallback = free, fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        return 0.0 if self.free() else self.fallback(retry_state)


def backoff(policy: RetryPolicy, rounds: Callable[[RetryCallState], int] | None = None) -> wait_base:
    """The policy's wait: what Retry-After asks, else jittered exponential back-off."""
    return wait_retry_after(fallback=wait_full_jitter(policy.base_delay, policy.backoff, policy.max_delay, rounds))


class RetryBudget:
    """Retries may add at most `percent` % of the requests seen over a sliding window, and always `min_per_second`.

    When the upstream is down for everyone, every request would retry max_retries times and multiply the load on it;
    a budget (the idea of Envoy's and gRPC's retry budgets) caps retries at a share of the traffic instead.
    """

    WINDOW = 10.0  # seconds

    def __init__(self, percent: float, min_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.percent, self.min_per_second, self.clock = percent, min_per_second, clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_request(self) -> None:
        now = self.clock()
        self._forget_before(self._requests, now)  # not only in try_spend: without retries, it would never run
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one left."""
        now = self.clock()
        self._forget_before(self._requests, now)
        self._forget_before(self._retries, now)
        allowed = max(self.min_per_second * self.WINDOW, self.percent / 100 * len(self._requests))
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True

    def _forget_before(self, times: deque[float], now: float) -> None:
        """Drops the times that have left the window."""
        while times and times[0] <= now - self.WINDOW:
            times.popleft()


class stop_over_budget(stop_base):
    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.try_spend()


def _worth_retrying(attempt: Attempt, give_up_on: Callable[[Attempt], bool]) -> bool:
    return attempt.classification.verdict is Verdict.RETRY and not give_up_on(attempt)


class StopReason(enum.Enum):
    ANSWERED = "answered"  # the last attempt was not worth retrying: success, fail-fast or pass-through
    ATTEMPTS = "attempts"  # max_retries used up
    DEADLINE = "deadline"  # the next wait would have passed the deadline
    BUDGET = "budget"  # the retry budget is spent: the upstream is failing for everyone


@dataclass(frozen=True)
class Outcome(Generic[A]):
    last: A
    attempts: int
    stopped: StopReason
    refused_wait: float | None = None  # with DEADLINE: the wait that would have passed it


async def run_with_retries(
    policy: RetryPolicy,
    attempt: Callable[[float], Awaitable[A]],
    on_retry: Callable[[A, int, float], None] = lambda last, number, wait: None,
    *,
    wait: wait_base | None = None,
    budget: RetryBudget | None = None,
    give_up_on: Callable[[A], bool] = lambda attempt: False,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Outcome[A]:
    """Call `attempt(deadline_at)` until it is worth no retry, attempts run out, the deadline would be passed, or
    the retry budget is spent.

    `deadline_at` is a time.monotonic() instant the attempt must not outlive. Attempts report failures in their
    classification instead of raising. `on_retry(last, attempt_number, wait)` runs before each wait. `wait` defaults
    to `backoff(policy)`. `give_up_on(attempt)` ends retrying early (the caller has something better to try).
    `sleep` waits between attempts (it may end a wait early: the next call of `attempt` then answers at once).
    """
    started = time.monotonic()
    deadline_at = started + policy.deadline
    first = await attempt(deadline_at)
    if not _worth_retrying(first, give_up_on):
        # Most requests end here. Tenacity's machinery costs about 60 µs a request (measured with
        # benchmarks/profile.py), so it is only set up for a first attempt that failed.
        return Outcome(last=first, attempts=1, stopped=StopReason.ANSWERED)
    # Tenacity's clock starts now: what is left of the deadline is what it may use.
    remaining = policy.deadline - (time.monotonic() - started)
    pending = [first]

    async def next_attempt(deadline: float) -> A:
        return pending.pop() if pending else await attempt(deadline)  # the first outcome is already in

    def give_up(state: RetryCallState) -> Outcome[A]:
        if state.attempt_number >= policy.max_attempts:
            stopped = StopReason.ATTEMPTS
        elif state.seconds_since_start + state.upcoming_sleep >= remaining:
            stopped = StopReason.DEADLINE
        else:
            stopped = StopReason.BUDGET
        return Outcome(
            last=state.outcome.result(),
            attempts=state.attempt_number,
            stopped=stopped,
            refused_wait=state.upcoming_sleep if stopped is StopReason.DEADLINE else None,
        )

    # Order matters: the budget is only charged for a retry that nothing else stops.
    stop = stop_after_attempt(policy.max_attempts) | stop_before_delay(remaining)
    if budget is not None:
        stop = stop | stop_over_budget(budget)
    retrying = AsyncRetrying(
        retry=retry_if_result(lambda attempt: _worth_retrying(attempt, give_up_on)),
        stop=stop,
        wait=wait or backoff(policy),
        before_sleep=lambda state: on_retry(state.outcome.result(), state.attempt_number, state.upcoming_sleep),
        retry_error_callback=give_up,
        sleep=sleep,
    )
    result = await retrying(next_attempt, deadline_at)
    if isinstance(result, Outcome):
        return result
    return Outcome(last=result, attempts=retrying.statistics["attempt_number"], stopped=StopReason.ANSWERED)
