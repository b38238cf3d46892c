"""Property tests for retry_policy.py: one verdict for any answer, Retry-After in every form (garbage included), waits
within max_delay, and no wait past the deadline. Retrying runs on a virtual clock: attempts and sleeps take no real
time. Profiles (how many examples) are in conftest.py; the cases they found are plain tests at the end."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import math
import sys
import types
from unittest import mock

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

import retry_policy
from retry_policy import (
    Classification,
    Failure,
    RetryBudget,
    RetryPolicy,
    StopReason,
    Verdict,
    backoff,
    classify_response,
    error_message,
    retry_after_seconds,
    run_with_retries,
    wait_none_after,
    wait_unless,
)
from test_retry_policy import FakeAttempt, state_after

# Policies as config.py makes them: codes 100-599, retried and failed ones apart, base_delay <= max_delay.
code_sets = st.lists(st.integers(100, 599), max_size=12, unique=True).flatmap(
    lambda codes: st.integers(0, len(codes)).map(lambda cut: (frozenset(codes[:cut]), frozenset(codes[cut:])))
)
policies = st.builds(
    lambda codes, max_retries, delays, backoff, deadline, timeout, retry_empty: RetryPolicy(
        retry_codes=codes[0], fail_codes=codes[1], max_retries=max_retries, base_delay=delays[0], backoff=backoff,
        max_delay=delays[1], deadline=deadline, per_try_timeout=timeout, retry_empty=retry_empty,
    ),
    st.one_of(code_sets, st.just((RetryPolicy().retry_codes, RetryPolicy().fail_codes))),
    st.integers(0, 8),
    st.tuples(st.floats(0, 100), st.floats(0, 100)).map(sorted),
    st.floats(1, 10),
    st.floats(0.001, 1000),
    st.floats(0.001, 100),
    st.booleans(),
)

# Bodies: bytes of any kind, JSON of any shape (error objects among them), and nesting deeper than parsers go.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["error", "type", "message", "choices", "model", "x"]) | st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b" ", b"{}", b"[]", b'{"error": null}', b'{"type": "error"}', b'{"error": "model overloaded"}', b"\xff\xfe", b"null"]),
    st.builds(lambda open_, n: (open_ * n).encode(), st.sampled_from(["[", '{"a":', "[{\"error\":"]), st.integers(1, 200_000)),
    st.builds(lambda n: ('{"error": {"x": ' + "[" * n + "]" * n + "}}").encode(), st.integers(1, 5000)),
)
content_types = st.one_of(
    st.sampled_from(["", "application/json", "application/json; charset=utf-8", "text/event-stream", "TEXT/EVENT-STREAM",
                     "text/html", "text/plain", "application/problem+json", "application/x-ndjson"]),
    st.text(max_size=20),
)
blanks = st.sampled_from([None, lambda document: True, lambda document: False, lambda document: not document])


@given(policy=policies, status=st.integers(100, 599), content_type=content_types, body=bodies,
       expects_json=st.booleans(), blank=blanks)
def test_any_answer_gets_one_verdict(policy, status, content_type, body, expects_json, blank):
    verdict = classify_response(policy, status, content_type, body, expects_json, blank)
    assert isinstance(verdict, Classification) and isinstance(verdict.detail, str)
    assert verdict == classify_response(policy, status, content_type, body, expects_json, blank)  # one verdict
    assert (verdict.verdict is Verdict.RETRY) == (verdict.failure is not None)
    if status in policy.fail_codes:
        assert verdict.verdict is Verdict.FAIL_FAST
    elif status in policy.retry_codes:
        assert (verdict.verdict, verdict.failure) == (Verdict.RETRY, Failure.STATUS)
    elif not 200 <= status < 300:
        assert verdict.verdict is Verdict.PASS_THROUGH
    else:
        assert verdict.verdict in (Verdict.SUCCESS, Verdict.RETRY)
        assert verdict.failure in (None, Failure.BROKEN, Failure.EMPTY)
        assert verdict.failure is not Failure.EMPTY or (policy.retry_empty and blank is not None)


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


NESTED = {
    "error list": lambda n: '{"error": ' + "[" * n + "]" * n + "}",
    "error object": lambda n: '{"error": {"x": ' + "[" * n + "]" * n + "}}",
    "error message": lambda n: '{"error": {"message": ' + "[" * n + "]" * n + "}}",
    "answer": lambda n: '{"choices": ' + "[" * n + "]" * n + "}",
    "unclosed": lambda n: "[" * n,
}


@pytest.mark.parametrize("status", [200, 404, 429])
@pytest.mark.parametrize("shape", sorted(NESTED))
def test_json_nested_to_the_parsers_limit_gets_a_verdict(status, shape):
    """Nesting near the recursion limit, where the parser still copes but whatever handles its result may not. On
    Python 3.11 the limit counts Python frames, so the depth that matters depends on the stack: random depths miss
    it (the body property above does), so every depth around this test's edge is tried."""
    edge = sys.getrecursionlimit() - stack_depth()
    for depth in range(max(1, edge - 40), edge + 5):
        for expects_json in (True, False):
            body = NESTED[shape](depth).encode()
            assert isinstance(classify_response(RetryPolicy(), status, "application/json", body, expects_json), Classification)


# Retry-After in every form: delay-seconds, the three HTTP-date forms, retry-after-ms, and garbage.
NOW = 1_700_000_000.0
# Whole seconds (as HTTP dates have them) from 1970 to 2065, where RFC 850's two-digit years are unambiguous.
instants = st.one_of(st.integers(0, 3_000_000_000), st.integers(-10**6, 10**6).map(lambda delta: int(NOW) + delta)).map(float)


def http_dates(instant: float) -> list[str]:
    """The three forms RFC 9110 (5.6.7) says a recipient must accept: IMF-fixdate, RFC 850, asctime."""
    when = datetime.datetime.fromtimestamp(instant, datetime.timezone.utc)
    return [
        email.utils.format_datetime(when, usegmt=True),  # Sun, 06 Nov 1994 08:49:37 GMT
        when.strftime("%A, %d-%b-%y %H:%M:%S GMT"),  # Sunday, 06-Nov-94 08:49:37 GMT
        when.strftime("%a %b ") + f"{when.day:2d}" + when.strftime(" %H:%M:%S %Y"),  # Sun Nov  6 08:49:37 1994
    ]


garbage = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "infinity", "1e999", "-1e999", "9" * 400, "1_000", " 5 ",
                     "0x10", "", "  ", "Wed, 21 Oct 2015 07:28:00", "Wed, 21 Oct 2015 07:28:00 -0000",
                     "Wed, 31 Feb 2015 07:28:00 GMT", "Wed, 21 Oct 99999 07:28:00 GMT", "Wed, 21 Oct 2015 25:61:61 GMT",
                     "Wed, 21 Oct 2015 07:28:00 +9999", "0 Jan 0 0:0:0 +0", "Mon, 01 Jan 0001 00:00:00 GMT"]),
    st.lists(st.sampled_from(["Wed", ",", " ", "21", "Oct", "2015", "07:28:00", "GMT", "+0100", "-", "99", ":"]), max_size=8).map("".join),
)
header_names = st.sampled_from(["Retry-After", "retry-after", "RETRY-AFTER", "retry-after-ms", "Retry-After-Ms", "X-Other"])


def assert_a_wait(seconds) -> None:
    assert seconds is None or (type(seconds) is float and math.isfinite(seconds) and seconds >= 0)


@given(headers=st.dictionaries(header_names, garbage | st.integers(-10**6, 10**6).map(str), max_size=3), now=st.none() | instants)
def test_any_retry_after_is_a_wait_or_nothing(headers, now):
    assert_a_wait(retry_after_seconds(headers, now=now))


@given(seconds=st.integers(0, 10**400), name=st.sampled_from(["Retry-After", "retry-after"]))
def test_retry_after_seconds_are_taken_as_given(seconds, name):
    wait = retry_after_seconds({name: str(seconds)}, now=NOW)
    assert_a_wait(wait)
    if seconds < 10**308:
        assert wait == float(seconds)
    else:  # longer than a float holds: still a wait longer than any deadline, not none at all (then back-off)
        assert wait is not None and wait >= 1e308


@given(milliseconds=st.integers(0, 10**12), seconds=st.none() | st.integers(0, 10**6))
def test_retry_after_ms_comes_first(milliseconds, seconds):
    headers = {"retry-after-ms": str(milliseconds)} | ({} if seconds is None else {"Retry-After": str(seconds)})
    assert retry_after_seconds(headers) == milliseconds / 1000


@given(instant=instants, form=st.integers(0, 2))
def test_retry_after_dates_in_every_form(instant, form):
    value = http_dates(instant)[form]
    assert retry_after_seconds({"Retry-After": value}, now=NOW) == max(0.0, instant - NOW), value


# Waits.


RETRY = Classification(Verdict.RETRY, "503", Failure.STATUS)


@given(policy=policies, attempt_number=st.integers(1, 5000), rounds=st.none() | st.integers(0, 5000))
def test_the_backoff_never_exceeds_max_delay_nor_its_exponential(policy, attempt_number, rounds):
    wait = backoff(policy, None if rounds is None else lambda state: rounds)(state_after(attempt_number, FakeAttempt(RETRY)))
    n = attempt_number if rounds is None else rounds
    try:
        exponential = policy.base_delay * policy.backoff ** max(0, n - 1)
    except OverflowError:
        exponential = math.inf
    assert 0 <= wait <= min(policy.max_delay, exponential if policy.base_delay else 0.0)


@given(policy=policies, attempt_number=st.integers(1, 50), retry_after=st.none() | st.floats(0, 1e308),
       free=st.booleans(), hedged=st.booleans())
def test_composed_waits_are_retry_after_zero_or_within_max_delay(policy, attempt_number, retry_after, free, hedged):
    wait = wait_unless(lambda: free, wait_none_after(lambda attempt: attempt.hedged, backoff(policy)))
    seconds = wait(state_after(attempt_number, FakeAttempt(RETRY, retry_after, hedged)))
    if free or hedged:
        assert seconds == 0
    elif retry_after is not None:
        assert seconds == retry_after  # the upstream's wish, exactly; run_with_retries stops if it passes the deadline
    else:
        assert 0 <= seconds <= policy.max_delay


# run_with_retries on a virtual clock.


class VirtualClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return NOW + self.now


@contextlib.contextmanager
def virtual_time(clock: VirtualClock):
    """retry_policy and tenacity read the clock as time.monotonic(): both get the virtual one (asyncio keeps its own)."""
    fake = types.SimpleNamespace(monotonic=clock.monotonic, time=clock.time)
    with mock.patch.object(retry_policy, "time", fake), mock.patch.object(tenacity, "time", fake):
        yield


verdicts = st.sampled_from([Verdict.RETRY, Verdict.RETRY, Verdict.RETRY, Verdict.SUCCESS, Verdict.FAIL_FAST, Verdict.PASS_THROUGH])
scripted_attempts = st.lists(
    st.tuples(
        verdicts,
        st.none() | st.floats(0, 1000) | st.sampled_from([0.0, 1e300]),  # Retry-After
        st.floats(0, 100) | st.just(0.0),  # how long the attempt takes, if the deadline lets it
    ),
    min_size=1,
    max_size=12,
)


@given(
    policy=policies,
    script=scripted_attempts,
    budget=st.none() | st.tuples(st.floats(0, 100), st.floats(0, 5)),
    hedges=st.lists(st.booleans(), max_size=12),
    free=st.lists(st.booleans(), max_size=12),
)
def test_retrying_never_passes_the_deadline_and_waits_within_max_delay(policy, script, budget, hedges, free):
    clock = VirtualClock()
    calls: list[tuple[float, FakeAttempt]] = []  # (when it ended, what it answered)
    sleeps: list[tuple[float, float]] = []  # (when it began, how long)
    reported: list[float] = []

    async def attempt(deadline_at: float) -> FakeAttempt:
        verdict, retry_after, takes = script[min(len(calls), len(script) - 1)]
        clock.now += max(0.0, min(takes, deadline_at - clock.now))  # an attempt does not outlive its deadline
        failure = Failure.STATUS if verdict is Verdict.RETRY else None
        hedged = hedges[len(calls)] if len(calls) < len(hedges) else False
        answer = FakeAttempt(Classification(verdict, "", failure), retry_after, hedged)
        calls.append((clock.now, answer))
        return answer

    async def sleep(seconds: float) -> None:
        sleeps.append((clock.now, seconds))
        clock.now += seconds

    remaining_free = list(free)

    def free_after(number: int) -> bool:  # whether wait_unless found another target free after attempt `number`
        return number < len(free) and free[number]
    wait = wait_unless(
        lambda: remaining_free.pop(0) if remaining_free else False,
        wait_none_after(lambda attempt: attempt.hedged, backoff(policy)),
    )
    with virtual_time(clock):
        started = clock.now
        retry_budget = RetryBudget(*budget, clock=clock.monotonic) if budget else None
        outcome = asyncio.run(
            run_with_retries(policy, attempt, lambda last, number, seconds: reported.append(seconds), wait=wait,
                             budget=retry_budget, sleep=sleep)
        )

    # Never past the deadline: attempts and waits together (a little float rounding aside).
    assert clock.now - started <= policy.deadline * (1 + 1e-9) + 1e-9
    for began, seconds in sleeps:
        assert began + seconds < started + policy.deadline + 1e-9
    # Each wait: none (another target is free, or a hedge), else what Retry-After asked, else back-off within max_delay.
    assert [s for _, s in sleeps] == reported
    for number, ((_, before), (_, seconds)) in enumerate(zip(calls, sleeps)):
        if free_after(number) or before.hedged:
            assert seconds == 0
        elif before.retry_after is not None:
            assert seconds == before.retry_after
        else:
            assert 0 <= seconds <= policy.max_delay
    # Attempts and the reason to stop agree with the script.
    assert outcome.attempts == len(calls) <= policy.max_attempts
    assert len(sleeps) == len(calls) - 1
    assert outcome.last is calls[-1][1]
    last = outcome.last
    if last.classification.verdict is not Verdict.RETRY:
        assert outcome.stopped is StopReason.ANSWERED
    elif outcome.attempts == policy.max_attempts:
        assert outcome.stopped is StopReason.ATTEMPTS
    else:
        assert outcome.stopped in (StopReason.DEADLINE, StopReason.BUDGET)
        if outcome.stopped is StopReason.DEADLINE:  # the wait refused would have passed the deadline
            assert outcome.refused_wait is not None
            assert clock.now - started + outcome.refused_wait >= policy.deadline * (1 - 1e-9) - 1e-9
        elif last.retry_after is not None and not last.hedged and not free_after(len(calls) - 1):
            # A Retry-After past the deadline stops retrying as DEADLINE, never as a sleep past it; BUDGET only
            # when the wait would have fit.
            assert clock.now - started + last.retry_after < policy.deadline * (1 + 1e-9) + 1e-9


# Cases the properties found, written out.


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        # Nesting deeper than json.loads goes: RecursionError, from says_model_unavailable for any status that is not
        # 2xx (Hypothesis's case: status 100 and 1989 brackets; how many it takes depends on the stack), and from
        # classify_response's own parse for a 2xx.
        (100, b"[" * 100_000, Verdict.PASS_THROUGH),
        (503, b'{"error": ' * 100_000, Verdict.RETRY),
        (200, b"[" * 100_000, Verdict.RETRY),
    ],
)
def test_found_bodies_nested_too_deeply_get_a_verdict(status, body, verdict):
    assert classify_response(RetryPolicy(), status, "application/json", body, True).verdict is verdict


def test_found_an_error_nested_too_deeply_to_show_is_still_an_error():
    """error_message's json.dumps: a document json.loads could read, a few frames deeper (the sweep above, on 3.11)."""
    nested: list = []
    for _ in range(100_000):  # deeper than json.dumps goes on any Python line (3.12+ count C calls apart)
        nested = [nested]
    with pytest.raises(RecursionError):
        json.dumps(nested)
    assert error_message({"error": nested}) == "(nested too deeply to show)"
    assert error_message({"detail": nested}) == "(nested too deeply to show)"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        # asctime, HTTP's third date form (RFC 9110 5.6.7), has no zone and means GMT: it was ignored (None).
        ("Tue Nov 14 22:13:20 2023", 0.0),
        ("Tue Nov 14 22:13:50 2023", 30.0),
        ("Sun Nov  6 08:49:37 1994", 0.0),
        # The other two forms, and a zone-less date in the first form, which is still not an HTTP date.
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),
        ("Tue, 14 Nov 2023 22:13:50", None),
    ],
)
def test_found_retry_after_in_the_asctime_form(value, seconds):
    assert retry_after_seconds({"Retry-After": value}, now=NOW) == seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # Delay-seconds longer than a float holds was None, so the proxy retried after its own back-off instead of
        # stopping at once (a wait past the deadline): now the longest wait there is.
        ({"Retry-After": "9" * 400}, sys.float_info.max),
        ({"retry-after-ms": "9" * 400}, sys.float_info.max),
        # Not delay-seconds at all: still garbage.
        ({"Retry-After": "1e999"}, None),
        ({"Retry-After": "inf"}, None),
    ],
)
def test_found_retry_after_longer_than_a_float(headers, seconds):
    assert retry_after_seconds(headers) == seconds


def test_found_no_base_delay_means_no_wait_however_many_rounds():
    """base × backoff^(n-1) overflowed at n = 366 (backoff 7) and the wait jumped to random.uniform(0, max_delay)."""
    policy = RetryPolicy(base_delay=0.0, backoff=7.0, max_delay=1.0)
    for attempt_number in (365, 366, 5000):
        assert backoff(policy)(state_after(attempt_number, FakeAttempt(RETRY))) == 0.0
