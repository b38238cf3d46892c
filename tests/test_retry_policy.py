"""retry_policy alone: classification, Retry-After, back-off bounds and stopping."""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass

import pytest
from tenacity import RetryCallState

from retry_policy import (
    Classification,
    Failure,
    RetryPolicy,
    StopReason,
    Verdict,
    classify_response,
    error_message,
    retry_after_seconds,
    RetryBudget,
    backoff,
    run_with_retries,
    says_model_unavailable,
    wait_unless,
)

POLICY = RetryPolicy()


def verdict(status, body=b'{"ok": true}', content_type="application/json", expects_json=True):
    return classify_response(POLICY, status, content_type, body, expects_json)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 520, 521, 522, 523, 529])
def test_retry_codes_retry(status):
    result = verdict(status)
    assert (result.verdict, result.failure) == (Verdict.RETRY, Failure.STATUS)


@pytest.mark.parametrize("status", [400, 401, 403])
def test_fail_codes_fail_fast(status):
    assert verdict(status).verdict is Verdict.FAIL_FAST


@pytest.mark.parametrize("status", [301, 404, 409, 422, 501, 524])
def test_other_statuses_pass_through(status):
    assert verdict(status).verdict is Verdict.PASS_THROUGH


def test_codes_come_from_the_policy():
    policy = RetryPolicy(retry_codes=frozenset({404}), fail_codes=frozenset({503}))
    assert classify_response(policy, 404, "", b"", False).verdict is Verdict.RETRY
    assert classify_response(policy, 503, "", b"", False).verdict is Verdict.FAIL_FAST
    assert classify_response(policy, 429, "", b"", False).verdict is Verdict.PASS_THROUGH


@pytest.mark.parametrize(
    ("body", "why"),
    [(b"", "empty"), (b"  \n", "empty"), (b"{not json", "not JSON"), (b'{"error": {"message": "overloaded"}}', "overloaded"),
     (b'{"error": "quota"}', "quota"),
     (b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}', "Overloaded"),
     (b'{"type": "error"}', "error")],
)
def test_broken_2xx_json_is_retryable(body, why):
    result = verdict(200, body)
    assert (result.verdict, result.failure) == (Verdict.RETRY, Failure.BROKEN)
    assert why in result.detail


@pytest.mark.parametrize("body", [b'{"choices": []}', b"[]", b'{"error": null, "data": []}', b'"text"'])
def test_good_json_succeeds(body):
    assert verdict(200, body).verdict is Verdict.SUCCESS


def test_json_is_judged_by_content_type_when_the_endpoint_is_unknown():
    assert verdict(200, b"plain text", "text/plain", expects_json=False).verdict is Verdict.SUCCESS
    assert verdict(200, b"", "text/plain", expects_json=False).verdict is Verdict.SUCCESS
    assert verdict(200, b"{bad", "application/json; charset=utf-8", expects_json=False).verdict is Verdict.RETRY


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"error": {"message": "m", "code": "c"}}, "m"),
        ({"error": {"code": "rate_limit"}}, "rate_limit"),
        ({"error": {"param": 1}}, '{"param": 1}'),
        ({"error": "plain"}, "plain"),
        ({"message": "top"}, "top"),
        ({"detail": "fastapi"}, "fastapi"),
        ({"weird": 1}, '{"weird": 1}'),
    ],
)
def test_error_message_reads_common_shapes(document, message):
    assert error_message(document) == message


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00"}, None),  # no zone: not an HTTP date
    ],
)
def test_retry_after_seconds(headers, seconds):
    assert retry_after_seconds(headers) == seconds


def test_retry_after_http_date():
    now = 1_700_000_000.0
    assert retry_after_seconds({"Retry-After": email.utils.formatdate(now + 30, usegmt=True)}, now=now) == 30.0
    assert retry_after_seconds({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0.0


@dataclass
class FakeAttempt:
    classification: Classification
    retry_after: float | None = None
    hedged: bool = False


RETRY = FakeAttempt(Classification(Verdict.RETRY, "503", Failure.STATUS))
OK = FakeAttempt(Classification(Verdict.SUCCESS))


def state_after(attempt_number: int, attempt) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt_number
    state.set_result(attempt)
    return state


def test_backoff_is_jittered_exponential_capped_at_max_delay():
    wait = backoff(RetryPolicy(base_delay=1, backoff=3, max_delay=20))
    for attempt_number, ceiling in [(1, 1), (2, 3), (3, 9), (4, 20), (9, 20), (5000, 20)]:
        waits = [wait(state_after(attempt_number, RETRY)) for _ in range(300)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # full jitter reaches towards the ceiling
        assert min(waits) < ceiling * 0.2  # ... and down towards zero


def test_backoff_counts_rounds_when_told():
    wait = backoff(RetryPolicy(base_delay=1, backoff=10, max_delay=1000), rounds=lambda state: 1)
    assert all(wait(state_after(7, RETRY)) <= 1 for _ in range(100))


def test_retry_after_replaces_the_backoff():
    assert backoff(POLICY)(state_after(1, FakeAttempt(RETRY.classification, retry_after=45.0))) == 45.0


def test_no_wait_while_another_target_is_left():
    wait = wait_unless(lambda: True, backoff(POLICY))
    assert wait(state_after(3, FakeAttempt(RETRY.classification, retry_after=45.0))) == 0


def scripted(*attempts):
    calls = []

    async def attempt(deadline_at):
        calls.append(deadline_at)
        return attempts[min(len(calls), len(attempts)) - 1]

    return attempt, calls


FAST = RetryPolicy(base_delay=0, max_delay=0, max_retries=3)


async def test_stops_at_the_first_answer_worth_giving():
    attempt, calls = scripted(RETRY, RETRY, OK)
    retries = []
    outcome = await run_with_retries(FAST, attempt, lambda last, n, wait: retries.append(n))
    assert (outcome.last, outcome.attempts, outcome.stopped) == (OK, 3, StopReason.ANSWERED)
    assert retries == [1, 2]
    assert len(calls) == 3


async def test_never_more_than_max_retries():
    attempt, calls = scripted(RETRY)
    outcome = await run_with_retries(FAST, attempt)
    assert (outcome.attempts, outcome.stopped, len(calls)) == (4, StopReason.ATTEMPTS, 4)


async def test_a_wait_past_the_deadline_stops_before_waiting():
    policy = RetryPolicy(deadline=5, max_retries=10)
    attempt, calls = scripted(FakeAttempt(RETRY.classification, retry_after=60))
    outcome = await asyncio.wait_for(run_with_retries(policy, attempt), 2)
    assert (outcome.stopped, outcome.refused_wait, len(calls)) == (StopReason.DEADLINE, 60, 1)


async def test_attempts_get_the_deadline_instant():
    policy = RetryPolicy(deadline=42)
    attempt, calls = scripted(OK)
    now = time.monotonic()
    await run_with_retries(policy, attempt)
    assert 41 < calls[0] - now < 43


async def test_give_up_on_ends_retrying_early():
    attempt, calls = scripted(RETRY)
    outcome = await run_with_retries(FAST, attempt, give_up_on=lambda a: True)
    assert (outcome.stopped, len(calls)) == (StopReason.ANSWERED, 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_a_share_of_requests_and_a_floor():
    clock = FakeClock()
    budget = RetryBudget(percent=20, min_per_second=0.5, clock=clock)  # floor: 5 retries per 10 s window
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 20  # 20 % of 100 requests
    clock.now += 11  # the window slides past everything
    assert sum(budget.try_spend() for _ in range(50)) == 5  # no traffic: the floor


def test_retry_budget_keeps_only_its_window_without_retries():
    clock = FakeClock()
    budget = RetryBudget(percent=20, min_per_second=0.5, clock=clock)
    for _ in range(1000):  # a healthy upstream: requests, never a retry
        budget.record_request()
        clock.now += 1
    assert len(budget._requests) <= 10


async def test_a_spent_budget_stops_retrying_at_once():
    budget = RetryBudget(percent=0, min_per_second=0.1)  # one retry per 10 s
    attempt, calls = scripted(RETRY)
    outcome = await run_with_retries(FAST, attempt, budget=budget)
    assert (outcome.stopped, len(calls)) == (StopReason.BUDGET, 2)


@pytest.mark.parametrize(
    ("body", "unavailable"),
    [
        (b'{"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.", "code": "model_not_found"}}', True),
        (b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}', True),
        (b'{"error": {"message": "No endpoints found for model x/y"}}', True),
        (b'{"error": {"message": "The model is currently unavailable"}}', True),
        (b"model gpt-4 not found", True),
        (b'{"error": {"message": "Invalid API key"}}', False),
        (b'{"error": {"message": "Rate limit reached for requests"}}', False),
        (b"", False),
    ],
)
def test_says_model_unavailable(body, unavailable):
    assert says_model_unavailable(body) is unavailable


def test_model_trouble_is_flagged_on_error_answers_only():
    body = b'{"error": {"message": "model overloaded"}}'
    assert classify_response(POLICY, 503, "application/json", body, True).model_unavailable
    assert classify_response(POLICY, 200, "application/json", body, True).model_unavailable  # an error object in a 200
    assert not classify_response(POLICY, 200, "application/json", b'{"text": "overloaded"}', True).model_unavailable
