"""Health checks: targets whose breaker is open (or that were never used) are probed in the background, so that they
come back without live traffic having to risk a request on them."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from retry_policy import RetryPolicy, Verdict, classify_response
from seaking.connections import NETWORK_ERRORS, ConnectionPools, classify_exception
from seaking.routing import route
from seaking.targets import Target

if TYPE_CHECKING:
    from seaking.shared import Shared

logger = logging.getLogger("seaking")


class HealthChecks:
    """mitmproxy addon: one background task, from running to done."""

    name = "seaking.health"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._check_forever())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _check_forever(self) -> None:
        while True:
            snapshot = self.shared.snapshot
            interval = snapshot.config.health_check.interval
            if interval <= 0:
                await asyncio.sleep(1)
                continue
            doubtful = [t for t in snapshot.failover.targets if t.state != "closed"]
            await asyncio.gather(*(probe(self.shared.pools, t, snapshot.config.retry) for t in doubtful))
            await asyncio.sleep(interval)


async def probe(pools: ConnectionPools, target: Target, policy: RetryPolicy) -> None:
    """A health check: GET <base>/models with the target's key. Any answer that is not worth a retry counts as
    healthy (a 401 still means the target is up); the result goes to the target's breaker and status."""
    headers = [("Authorization", f"Bearer {target.api_key}")] if target.api_key else []
    started = time.monotonic()
    try:
        async with asyncio.timeout(policy.per_try_timeout):
            async with pools.request(target, "GET", route(target.base_url, "/v1/models").url, headers) as response:
                body = await response.read()
        result = classify_response(policy, response.status, response.content_type, body, expects_json=True)
    except NETWORK_ERRORS as exc:
        result = classify_exception(exc)
    failed = result.verdict is Verdict.RETRY
    target.record(ok=not failed, latency=time.monotonic() - started, error=f"health check: {result.detail}" if failed else None)
    if not failed:
        logger.debug(f"health check: {target.host} is up")
